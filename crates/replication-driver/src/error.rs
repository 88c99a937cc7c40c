//! The crate's error type.

use std::fmt;

/// A small, stable classification of [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A bad or missing driver option (`mode`, `top-id`).
    InvalidOption,
    /// `start` while already running (or failed over unsuccessfully).
    AlreadyStarted,
    /// `start` with a mode other than the one the node was opened with.
    ModeMismatch,
    /// An operation that needs replication running while it is not.
    NotRunning,
    /// The secondary chain (active -> hidden -> secondary disk) is incomplete
    /// or inconsistent: missing backing, no backend, unequal lengths,
    /// make_empty unsupported.
    BadChain,
    /// `top-id` names no node, a node with parents, or one that does not
    /// reach the filter.
    TopId,
    /// The internal backup job is gone although stop did not cancel it.
    BackupCancelled,
    /// A replication I/O error was recorded (primary write forwarding failed,
    /// or a failover failed).
    IoError,
    /// A checkpoint state stream disagrees with this side (epoch mismatch,
    /// malformed section).
    StateMismatch,
    /// A block-graph operation failed (reopen, attach, make_empty, ...).
    Graph,
    /// The secondary's active and hidden disks hold no usable view: a
    /// checkpoint could not empty them (or the backup job is gone). Secondary
    /// guest I/O fails until a checkpoint succeeds; see the crate docs.
    BuffersInvalid,
}

/// Everything that can go wrong in `replication-driver`. The message says
/// which check failed and on which node.
#[derive(Debug, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    node: String,
    message: String,
    #[source]
    source: Option<Box<block_graph::Error>>,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "replication node '{}': {}", self.node, self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl Error {
    /// A new error of `kind` about replication node `node`.
    pub fn new(kind: ErrorKind, node: &str, message: impl Into<String>) -> Error {
        Error {
            kind,
            node: node.to_string(),
            message: message.into(),
            source: None,
        }
    }

    /// A [`ErrorKind::Graph`] error wrapping a block-graph error.
    pub fn graph(node: &str, message: impl Into<String>, source: block_graph::Error) -> Error {
        Error {
            kind: ErrorKind::Graph,
            node: node.to_string(),
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// Same as `self` but with another kind (keeps message and source).
    pub fn with_kind(mut self, kind: ErrorKind) -> Error {
        self.kind = kind;
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The replication node this error is about.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The message without node name and source.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The block-graph error underneath, if any.
    pub fn graph_error(&self) -> Option<&block_graph::Error> {
        self.source.as_deref()
    }

    /// This error as a block-graph error (for driver factories and I/O):
    /// option errors become InvalidArgument, everything else keeps the
    /// underlying block-graph kind or becomes Io.
    pub fn into_block_error(self) -> block_graph::Error {
        let kind = match (&self.kind, &self.source) {
            (ErrorKind::InvalidOption, _) => block_graph::ErrorKind::InvalidArgument,
            (_, Some(s)) => s.kind(),
            _ => block_graph::ErrorKind::Io,
        };
        block_graph::Error::new(kind, self.to_string()).with_node(self.node.clone())
    }
}

/// Convenience alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
