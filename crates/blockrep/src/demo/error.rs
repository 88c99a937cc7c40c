//! The demo's error type: what failed, on which side, with its source.

use std::path::PathBuf;

/// Why the demo could not run to its verification (a verification that
/// ran and found a difference is not an error: it is a result).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Bad command-line value.
    #[error("{0}")]
    Usage(String),
    /// A file or directory operation failed.
    #[error("{what} {path:?}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Creating an image failed.
    #[error("creating image {path:?}: {source}")]
    Image {
        /// The image path.
        path: PathBuf,
        /// The qcow-lite error.
        #[source]
        source: qcow_lite::Error,
    },
    /// A daemon could not be started or stopped.
    #[error("{side} daemon: {reason}")]
    Daemon {
        /// `primary` or `secondary`.
        side: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// A QMP command failed.
    #[error("{side} QMP {command}: {source}")]
    Qmp {
        /// `primary` or `secondary`.
        side: &'static str,
        /// The command.
        command: String,
        /// The client error (with the server's class and desc).
        #[source]
        source: qmp::Error,
    },
    /// A guest's NBD request failed.
    #[error("{side} guest NBD {op} at offset {offset} length {len}: {source}")]
    Nbd {
        /// `primary` or `secondary`.
        side: &'static str,
        /// `connect`, `read`, `write` or `flush`.
        op: &'static str,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// The NBD error.
        #[source]
        source: nbd::NbdError,
    },
    /// Shipping the primary guest's state to the secondary failed.
    #[error("checkpoint {epoch}: shipping guest state: {source}")]
    State {
        /// The checkpoint number.
        epoch: u64,
        /// The state registry error.
        #[source]
        source: replication_core::Error,
    },
    /// The replication status is not what the step needs.
    #[error("{side}: {reason}")]
    Replication {
        /// `primary` or `secondary`.
        side: &'static str,
        /// What was seen.
        reason: String,
    },
}

impl DemoError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DemoError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
