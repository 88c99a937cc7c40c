//! The crate's one error type: a small stable kind, context and a source.

use std::fmt;
use std::io;

/// What went wrong, in a few stable categories that callers can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The underlying storage failed.
    Io,
    /// The image is not a qcow2 image, or a header field is invalid.
    InvalidImage,
    /// The image uses a feature this crate does not support (the message names it).
    Unsupported,
    /// Metadata is inconsistent (bad table entry, reference past the end of the file...).
    Corrupt,
    /// A write was attempted on an image opened read-only (or one that may only be read).
    ReadOnly,
    /// A request lies outside the virtual disk.
    OutOfRange,
    /// An argument is invalid (bad cluster size, shrinking, ...).
    InvalidArgument,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::InvalidImage => "invalid qcow2 image",
            ErrorKind::Unsupported => "unsupported qcow2 feature",
            ErrorKind::Corrupt => "corrupt qcow2 metadata",
            ErrorKind::ReadOnly => "image is read-only",
            ErrorKind::OutOfRange => "request out of range",
            ErrorKind::InvalidArgument => "invalid argument",
        };
        f.write_str(s)
    }
}

/// The error of every fallible operation in this crate.
#[derive(Debug, thiserror::Error)]
#[error("qcow2: {kind}: {context}")]
pub struct Error {
    kind: ErrorKind,
    context: String,
    #[source]
    source: Option<io::Error>,
}

impl Error {
    /// A new error of `kind` with a message saying what and where.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An I/O error from the storage, with what we were doing.
    pub fn io(source: io::Error, context: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Io,
            context: context.into(),
            source: Some(source),
        }
    }

    /// The stable category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message part (what and where).
    pub fn context(&self) -> &str {
        &self.context
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind {
            ErrorKind::Io => e
                .source
                .as_ref()
                .map(|s| s.kind())
                .unwrap_or(io::ErrorKind::Other),
            ErrorKind::InvalidImage | ErrorKind::Corrupt => io::ErrorKind::InvalidData,
            ErrorKind::Unsupported => io::ErrorKind::Unsupported,
            ErrorKind::ReadOnly => io::ErrorKind::PermissionDenied,
            ErrorKind::OutOfRange | ErrorKind::InvalidArgument => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidImage, msg)
}

pub(crate) fn unsupported(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}
