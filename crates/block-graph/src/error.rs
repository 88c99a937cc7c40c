//! The crate's one error type: a small stable [`ErrorKind`], the node it concerns,
//! a human context string (what and where: offsets, lengths, option names) and an
//! optional source error.

use std::fmt;

/// Convenience alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The stable classification of an [`Error`]. Map to errno with [`ErrorKind::errno`]
/// (NBD uses it) and back with [`ErrorKind::from_errno`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An I/O error (EIO).
    Io,
    /// No space left on the device (ENOSPC).
    NoSpace,
    /// Read-only node, missing permission or a permission conflict (EPERM).
    PermissionDenied,
    /// Bad option, bad argument, malformed request (EINVAL).
    InvalidArgument,
    /// Request beyond the end of a node (EINVAL on the wire).
    OutOfRange,
    /// The driver does not support this operation (ENOTSUP).
    NotSupported,
    /// No such node, driver or child; or the node has been removed (ENOENT).
    NotFound,
    /// An operation blocker or a user prevents this (EBUSY); the context holds the reason.
    Busy,
    /// The operation was cancelled (ECANCELED).
    Cancelled,
    /// On-disk or in-memory structures are inconsistent (EUCLEAN).
    Corrupt,
}

impl ErrorKind {
    /// The positive errno value that best represents this kind.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Io => libc::EIO,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::PermissionDenied => libc::EPERM,
            ErrorKind::InvalidArgument | ErrorKind::OutOfRange => libc::EINVAL,
            ErrorKind::NotSupported => libc::ENOTSUP,
            ErrorKind::NotFound => libc::ENOENT,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::Cancelled => libc::ECANCELED,
            ErrorKind::Corrupt => libc::EUCLEAN,
        }
    }

    /// The kind for a (positive or negative) errno value; unknown values map to [`ErrorKind::Io`].
    pub fn from_errno(errno: i32) -> ErrorKind {
        match errno.abs() {
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ErrorKind::NoSpace,
            libc::EPERM | libc::EACCES | libc::EROFS => ErrorKind::PermissionDenied,
            libc::EINVAL => ErrorKind::InvalidArgument,
            libc::ENOTSUP | libc::ENOSYS | libc::ENOTTY => ErrorKind::NotSupported,
            libc::ENOENT | libc::ENODEV | libc::ENXIO => ErrorKind::NotFound,
            libc::EBUSY => ErrorKind::Busy,
            libc::ECANCELED => ErrorKind::Cancelled,
            libc::EUCLEAN => ErrorKind::Corrupt,
            _ => ErrorKind::Io,
        }
    }

    /// A short lowercase name ("io", "no-space", ...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::Io => "io",
            ErrorKind::NoSpace => "no-space",
            ErrorKind::PermissionDenied => "permission-denied",
            ErrorKind::InvalidArgument => "invalid-argument",
            ErrorKind::OutOfRange => "out-of-range",
            ErrorKind::NotSupported => "not-supported",
            ErrorKind::NotFound => "not-found",
            ErrorKind::Busy => "busy",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Corrupt => "corrupt",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of every block-graph operation.
///
/// Display: `node 'disk0': write at offset 4096 length 512: <context>: <source>`
/// (the node part only when known).
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    node: Option<String>,
    context: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = &self.node {
            write!(f, "node '{n}': ")?;
        }
        f.write_str(&self.context)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl Error {
    /// A new error of `kind` with a context message.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Error {
        Error {
            kind,
            node: None,
            context: context.into(),
            source: None,
        }
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(context: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, context)
    }

    /// Shorthand for [`ErrorKind::NotSupported`].
    pub fn not_supported(context: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotSupported, context)
    }

    /// An error from an errno value (positive or negative).
    pub fn from_errno(errno: i32, context: impl Into<String>) -> Error {
        let ctx = context.into();
        Error::new(ErrorKind::from_errno(errno), ctx)
            .with_source(std::io::Error::from_raw_os_error(errno.abs()))
    }

    /// Wraps an `std::io::Error`, classifying it by its OS error code.
    pub fn from_io(err: std::io::Error, context: impl Into<String>) -> Error {
        let kind = match err.raw_os_error() {
            Some(e) => ErrorKind::from_errno(e),
            None => match err.kind() {
                std::io::ErrorKind::NotFound => ErrorKind::NotFound,
                std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                std::io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
                std::io::ErrorKind::Unsupported => ErrorKind::NotSupported,
                _ => ErrorKind::Io,
            },
        };
        Error::new(kind, context).with_source(err)
    }

    /// Sets the node name (replacing any previous one).
    pub fn with_node(mut self, node: impl Into<String>) -> Error {
        self.node = Some(node.into());
        self
    }

    /// Sets the node name unless one is already recorded (the innermost node wins).
    pub fn or_node(mut self, node: &str) -> Error {
        if self.node.is_none() {
            self.node = Some(node.to_string());
        }
        self
    }

    /// Attaches a source error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(source));
        self
    }

    /// Prefixes the context with more outer context (`"outer: inner"`).
    pub fn context(mut self, outer: impl fmt::Display) -> Error {
        self.context = format!("{outer}: {}", self.context);
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The node this error concerns, if known (the innermost node that failed).
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The context message (without node name and source).
    pub fn context_str(&self) -> &str {
        &self.context
    }

    /// The errno for this error (`self.kind().errno()`).
    pub fn errno(&self) -> i32 {
        self.kind.errno()
    }

    /// A copy of this error (the source is flattened into the context text).
    pub fn duplicate(&self) -> Error {
        let mut context = self.context.clone();
        if let Some(s) = &self.source {
            context = format!("{context}: {s}");
        }
        Error {
            kind: self.kind,
            node: self.node.clone(),
            context,
            source: None,
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::from_io(e, "I/O error")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_round_trip() {
        for k in [
            ErrorKind::Io,
            ErrorKind::NoSpace,
            ErrorKind::PermissionDenied,
            ErrorKind::InvalidArgument,
            ErrorKind::NotSupported,
            ErrorKind::NotFound,
            ErrorKind::Busy,
            ErrorKind::Cancelled,
            ErrorKind::Corrupt,
        ] {
            assert_eq!(ErrorKind::from_errno(k.errno()), k);
            assert_eq!(ErrorKind::from_errno(-k.errno()), k);
        }
        assert_eq!(ErrorKind::OutOfRange.errno(), libc::EINVAL);
        assert_eq!(ErrorKind::from_errno(5), ErrorKind::Io);
        assert_eq!(ErrorKind::from_errno(28), ErrorKind::NoSpace);
    }

    #[test]
    fn display_names_node_and_source() {
        let e = Error::from_errno(28, "write at offset 0 length 512").with_node("disk0");
        let s = e.to_string();
        assert!(
            s.starts_with("node 'disk0': write at offset 0 length 512: "),
            "{s}"
        );
        assert_eq!(e.kind(), ErrorKind::NoSpace);
        let e2 = e.or_node("outer");
        assert_eq!(e2.node(), Some("disk0"));
    }
}
