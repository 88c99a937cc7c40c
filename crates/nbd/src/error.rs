//! The crate's error type: a small stable kind, a context string and an optional source.

use std::fmt;

/// What went wrong, in terms stable enough to match on and to carry over the wire.
///
/// The first group maps one-to-one onto NBD errno values (see [`ErrorKind::to_errno`]);
/// the rest are local conditions that travel as `EIO` if they ever have to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// `EPERM`: a write, trim or zero on a read-only export.
    PermissionDenied,
    /// `EIO`: the storage failed, or the connection was lost for longer than allowed.
    Io,
    /// `ENOMEM`: the peer could not allocate.
    NoMemory,
    /// `EINVAL`: bad offset, length, flag or command.
    InvalidArgument,
    /// `ENOSPC`: a write past the end of the export.
    NoSpace,
    /// `EOVERFLOW`: a DF read too large to send in one chunk.
    Overflow,
    /// `ENOTSUP`: FAST_ZERO could not be honoured quickly.
    NotSupported,
    /// `ESHUTDOWN`: the server is shutting down.
    Shutdown,
    /// The peer broke the protocol (bad magic, impossible length, unexpected reply).
    Protocol,
    /// The socket failed or closed.
    Disconnected,
    /// The named export does not exist.
    UnknownExport,
    /// The export name is not acceptable (too long, NUL, not UTF-8, duplicate).
    InvalidName,
    /// The operation was refused because clients are still connected.
    Busy,
    /// A configuration value (address, option) is unusable.
    Config,
}

impl ErrorKind {
    /// The NBD error value (Linux errno numbering, as the protocol fixes it) for this kind.
    pub fn to_errno(self) -> u32 {
        match self {
            ErrorKind::PermissionDenied => crate::protocol::EPERM,
            ErrorKind::NoMemory => crate::protocol::ENOMEM,
            ErrorKind::InvalidArgument => crate::protocol::EINVAL,
            ErrorKind::NoSpace => crate::protocol::ENOSPC,
            ErrorKind::Overflow => crate::protocol::EOVERFLOW,
            ErrorKind::NotSupported => crate::protocol::ENOTSUP,
            ErrorKind::Shutdown => crate::protocol::ESHUTDOWN,
            _ => crate::protocol::EIO,
        }
    }

    /// The kind for an NBD error value received from a peer; unknown values are
    /// treated as `EINVAL`, as the protocol requires.
    pub fn from_errno(errno: u32) -> ErrorKind {
        match errno {
            crate::protocol::EPERM => ErrorKind::PermissionDenied,
            crate::protocol::EIO => ErrorKind::Io,
            crate::protocol::ENOMEM => ErrorKind::NoMemory,
            crate::protocol::EINVAL => ErrorKind::InvalidArgument,
            crate::protocol::ENOSPC => ErrorKind::NoSpace,
            crate::protocol::EOVERFLOW => ErrorKind::Overflow,
            crate::protocol::ENOTSUP => ErrorKind::NotSupported,
            crate::protocol::ESHUTDOWN => ErrorKind::Shutdown,
            _ => ErrorKind::InvalidArgument,
        }
    }

    /// The kind for a local I/O error (from a file or socket).
    pub fn from_io(e: &std::io::Error) -> ErrorKind {
        use std::io::ErrorKind as K;
        match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => {
                return ErrorKind::PermissionDenied
            }
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => {
                return ErrorKind::NoSpace
            }
            Some(libc::EINVAL) => return ErrorKind::InvalidArgument,
            Some(libc::ENOMEM) => return ErrorKind::NoMemory,
            Some(libc::EOPNOTSUPP) => return ErrorKind::NotSupported,
            _ => {}
        }
        match e.kind() {
            K::UnexpectedEof
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
            | K::NotConnected => ErrorKind::Disconnected,
            _ => ErrorKind::Io,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::PermissionDenied => "permission denied (EPERM)",
            ErrorKind::Io => "I/O error (EIO)",
            ErrorKind::NoMemory => "out of memory (ENOMEM)",
            ErrorKind::InvalidArgument => "invalid argument (EINVAL)",
            ErrorKind::NoSpace => "no space (ENOSPC)",
            ErrorKind::Overflow => "value too large (EOVERFLOW)",
            ErrorKind::NotSupported => "not supported (ENOTSUP)",
            ErrorKind::Shutdown => "server shutting down (ESHUTDOWN)",
            ErrorKind::Protocol => "NBD protocol violation",
            ErrorKind::Disconnected => "NBD connection lost",
            ErrorKind::UnknownExport => "unknown export",
            ErrorKind::InvalidName => "invalid export name",
            ErrorKind::Busy => "export busy",
            ErrorKind::Config => "invalid configuration",
        };
        f.write_str(s)
    }
}

/// The error every fallible function of this crate returns.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {context}")]
pub struct NbdError {
    /// What went wrong.
    pub kind: ErrorKind,
    /// Where: export name, offset, length, option or command.
    pub context: String,
    /// The underlying I/O error, when there is one.
    #[source]
    pub source: Option<std::io::Error>,
}

impl NbdError {
    /// An error of `kind` with a context message.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> NbdError {
        NbdError {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// An error caused by an I/O error, its kind derived from the errno.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> NbdError {
        NbdError {
            kind: ErrorKind::from_io(&source),
            context: context.into(),
            source: Some(source),
        }
    }

    /// A protocol violation by the peer.
    pub fn protocol(context: impl Into<String>) -> NbdError {
        NbdError::new(ErrorKind::Protocol, context)
    }

    /// The error kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, NbdError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_round_trip() {
        for kind in [
            ErrorKind::PermissionDenied,
            ErrorKind::Io,
            ErrorKind::NoMemory,
            ErrorKind::InvalidArgument,
            ErrorKind::NoSpace,
            ErrorKind::Overflow,
            ErrorKind::NotSupported,
            ErrorKind::Shutdown,
        ] {
            assert_eq!(ErrorKind::from_errno(kind.to_errno()), kind);
        }
        assert_eq!(ErrorKind::Protocol.to_errno(), 5);
        assert_eq!(ErrorKind::from_errno(9999), ErrorKind::InvalidArgument);
        assert_eq!(ErrorKind::PermissionDenied.to_errno(), 1);
        assert_eq!(ErrorKind::NoSpace.to_errno(), 28);
        assert_eq!(ErrorKind::NotSupported.to_errno(), 95);
    }

    #[test]
    fn io_errors_map() {
        let e = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert_eq!(ErrorKind::from_io(&e), ErrorKind::NoSpace);
        let e = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(ErrorKind::from_io(&e), ErrorKind::Disconnected);
    }
}
