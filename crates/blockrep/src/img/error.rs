//! The error of `blockrep img`: what went wrong, on which file, and why.

use std::io;

/// Every failure of an image verb. Its message is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    /// A bad argument or option (size, format name, option string...).
    #[error("{0}")]
    Usage(String),
    /// A file could not be opened or created.
    #[error("Could not open '{path}': {source}")]
    Open {
        /// The file name as the user gave it (or as resolved from a header).
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// I/O on an image file failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing, on which file.
        context: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The qcow2 engine refused or failed.
    #[error("{context}: {source}")]
    Qcow {
        /// What we were doing, on which file.
        context: String,
        /// Why.
        #[source]
        source: qcow_lite::Error,
    },
    /// The image is not what the command needs (no backing file, loop, ...).
    #[error("{0}")]
    Image(String),
}

impl ImgError {
    /// A usage error with this message.
    pub fn usage(msg: impl Into<String>) -> Self {
        ImgError::Usage(msg.into())
    }
    /// An image-state error with this message.
    pub fn image(msg: impl Into<String>) -> Self {
        ImgError::Image(msg.into())
    }
    /// Wrap an I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        ImgError::Io {
            context: context.into(),
            source,
        }
    }
    /// Wrap a qcow-lite error with context.
    pub fn qcow(context: impl Into<String>, source: qcow_lite::Error) -> Self {
        ImgError::Qcow {
            context: context.into(),
            source,
        }
    }
}
