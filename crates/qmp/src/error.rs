//! Errors: the error a command returns on the wire ([`QmpError`]) and the
//! crate's own error for setting things up ([`Error`]).

use std::path::PathBuf;

use serde_json::{json, Value};

/// QEMU's error classes (`QapiErrorClass` in QEMU's `qapi/control.json`).
///
/// Nearly every error is [`ErrorClass::GenericError`]; the others exist so
/// that clients that match on them (libvirt, iotests) keep working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Any error without a more specific class.
    GenericError,
    /// The command does not exist (or is not allowed before negotiation).
    CommandNotFound,
    /// A device (block backend, node, job) exists but is not active.
    DeviceNotActive,
    /// A device (block backend, node, job) named by the client is unknown.
    DeviceNotFound,
    /// QEMU's KVM capability error; kept for completeness of the set.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }

    /// The class named `name` on the wire; unknown names (a newer QEMU's)
    /// read as `GenericError`, which is what they mean to old clients.
    pub fn from_name(name: &str) -> ErrorClass {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == name)
            .unwrap_or(ErrorClass::GenericError)
    }

    /// Every class, in QEMU's order.
    pub const ALL: [ErrorClass; 5] = [
        ErrorClass::GenericError,
        ErrorClass::CommandNotFound,
        ErrorClass::DeviceNotActive,
        ErrorClass::DeviceNotFound,
        ErrorClass::KVMMissingCap,
    ];
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error as a QMP client sees it: `{"error": {"class": ..., "desc": ...}}`.
///
/// Command handlers return this; its `desc` is the human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The message, worded as QEMU words it where QEMU has the same error.
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// QEMU's "Parameter 'x' is missing".
    pub fn missing(param: &str) -> Self {
        Self::generic(format!("Parameter '{param}' is missing"))
    }

    /// QEMU's "Parameter 'x' is unexpected".
    pub fn unexpected(param: &str) -> Self {
        Self::generic(format!("Parameter '{param}' is unexpected"))
    }

    /// QEMU's "Invalid parameter type for 'x', expected: TYPE".
    pub fn invalid_type(param: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{param}', expected: {expected}"
        ))
    }

    /// QEMU's "Parameter 'x' expects WHAT" (a value out of range, a bad value).
    pub fn invalid_value(param: &str, expects: &str) -> Self {
        Self::generic(format!("Parameter '{param}' expects {expects}"))
    }

    /// The `{"class": ..., "desc": ...}` object.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.desc})
    }
}

/// Coarse kind of an [`Error`], stable for callers to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A socket could not be set up (bind, listen, permissions).
    Socket,
    /// Another live server already listens on the Unix socket path.
    AddressInUse,
    /// A schema definition is malformed or names an unknown type.
    Schema,
    /// A command name is registered twice.
    DuplicateCommand,
    /// (client) The peer broke the protocol or did not answer in time.
    Protocol,
    /// (client) The command ran and failed; the server's error is inside.
    Command,
}

/// The crate's error: setting up a server or a registry, and the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Socket {
        /// What was being done, with the path or address.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A live server answers on this Unix socket path already.
    #[error("QMP socket {path:?} is in use by a running server")]
    AddressInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A schema definition is wrong.
    #[error("QAPI schema error in '{name}': {reason}")]
    Schema {
        /// The type or command the definition is about.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A command is registered twice.
    #[error("command '{name}' is already registered")]
    DuplicateCommand {
        /// The command name.
        name: String,
    },
    /// (client) The server sent something that is not QMP, or timed out.
    #[error("QMP protocol error: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// (client) The command `name` returned an error.
    #[error("QMP command {name} failed: {error}")]
    Command {
        /// The command that failed.
        name: String,
        /// The server's error.
        #[source]
        error: QmpError,
    },
}

impl Error {
    /// The stable kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Socket { .. } => ErrorKind::Socket,
            Error::AddressInUse { .. } => ErrorKind::AddressInUse,
            Error::Schema { .. } => ErrorKind::Schema,
            Error::DuplicateCommand { .. } => ErrorKind::DuplicateCommand,
            Error::Protocol { .. } => ErrorKind::Protocol,
            Error::Command { .. } => ErrorKind::Command,
        }
    }

    pub(crate) fn schema(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Schema {
            name: name.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn socket(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Socket {
            context: context.into(),
            source,
        }
    }
}
