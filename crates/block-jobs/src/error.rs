//! The crate's one error type: a small stable kind, context and a source.

use std::fmt;

/// What went wrong, in a form callers (the QMP layer, replication) can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A caller passed an impossible argument (bad speed, length mismatch...).
    InvalidArgument,
    /// The command is not allowed in the job's current state (QMP's
    /// "Job 'x' in state 'y' cannot accept command verb 'z'").
    InvalidState,
    /// No job with that id.
    NotFound,
    /// A job with that id already exists.
    DuplicateId,
    /// An I/O error on the source or target (read or write).
    Io,
    /// The job was cancelled.
    Cancelled,
    /// A graph change (filter insertion, node replacement) failed.
    Graph,
    /// A node the job would use is blocked by another user (another job,
    /// replication): QMP's "Node 'x' is busy: block device is in use by
    /// block job: backup".
    Busy,
    /// A node lacks a capability the job needs (e.g. changing a backing name).
    Unsupported,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::InvalidState => "invalid state",
            ErrorKind::NotFound => "not found",
            ErrorKind::DuplicateId => "duplicate id",
            ErrorKind::Io => "I/O error",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Graph => "graph change failed",
            ErrorKind::Busy => "node busy",
            ErrorKind::Unsupported => "unsupported",
        })
    }
}

/// Error of every block-jobs operation.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {context}")]
pub struct JobError {
    kind: ErrorKind,
    context: String,
    /// The OS errno of an I/O error, when known (used by `on-*-error=enospc`).
    errno: Option<i32>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl JobError {
    /// A new error of `kind` saying what and where.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        JobError {
            kind,
            context: context.into(),
            errno: None,
            source: None,
        }
    }

    /// Attach the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Attach an errno (for ENOSPC detection).
    pub fn with_errno(mut self, errno: Option<i32>) -> Self {
        self.errno = errno;
        self
    }

    /// The stable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The context text (what and where).
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The errno of an I/O error, when known.
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }

    /// True if the error is "no space left on device".
    pub fn is_enospc(&self) -> bool {
        self.errno == Some(ENOSPC)
    }

    /// Shorthand: the job was cancelled.
    pub fn cancelled() -> Self {
        JobError::new(ErrorKind::Cancelled, "job cancelled")
    }

    /// Full message including the source chain, for QMP `error` fields.
    pub fn full_message(&self) -> String {
        use std::error::Error as _;
        let mut s = self.to_string();
        let mut cur = self.source();
        while let Some(e) = cur {
            let t = e.to_string();
            if !s.ends_with(&t) {
                s.push_str(": ");
                s.push_str(&t);
            }
            cur = e.source();
        }
        s
    }
}

impl From<block_graph::Error> for JobError {
    fn from(e: block_graph::Error) -> Self {
        use block_graph::ErrorKind as G;
        let kind = match e.kind() {
            G::Cancelled => ErrorKind::Cancelled,
            G::InvalidArgument | G::OutOfRange => ErrorKind::InvalidArgument,
            G::NotSupported => ErrorKind::Unsupported,
            G::NotFound => ErrorKind::NotFound,
            G::Busy | G::PermissionDenied => ErrorKind::Graph,
            G::Io | G::NoSpace | G::Corrupt => ErrorKind::Io,
        };
        JobError::new(kind, e.to_string())
            .with_errno(Some(e.errno()))
            .with_source(e)
    }
}

/// Linux's ENOSPC.
pub(crate) const ENOSPC: i32 = 28;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, JobError>;
