//! The crate's error type.

use std::fmt;

/// The error a member or participant returns from one of its callbacks; the
/// registry wraps it into an [`Error`] that names the member.
pub type OpError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Which replication operation failed (for messages and matching).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicationOp {
    /// `start(mode)`.
    Start,
    /// `checkpoint()`.
    Checkpoint,
    /// `get_error()`.
    GetError,
    /// `stop(failover)`.
    Stop,
}

impl fmt::Display for ReplicationOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplicationOp::Start => "start",
            ReplicationOp::Checkpoint => "checkpoint",
            ReplicationOp::GetError => "get_error",
            ReplicationOp::Stop => "stop",
        })
    }
}

/// Which checkpoint state handler failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SavePhase {
    /// The setup handler (first section of a checkpoint).
    Setup,
    /// The iterate handler (middle sections).
    Iterate,
    /// The complete handler (last section).
    Complete,
    /// The load handler on the receiving side.
    Load,
}

impl fmt::Display for SavePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SavePhase::Setup => "setup",
            SavePhase::Iterate => "iterate",
            SavePhase::Complete => "complete",
            SavePhase::Load => "load",
        })
    }
}

/// A small, stable classification of [`Error`] for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A replication mode word other than `primary` / `secondary`.
    InvalidMode,
    /// A replication member's callback failed.
    Member,
    /// A registration was refused (duplicate or malformed id).
    Registration,
    /// A checkpoint state participant's handler failed.
    Participant,
    /// Reading or writing the checkpoint stream failed.
    Io,
    /// The checkpoint stream ended early.
    Truncated,
    /// The checkpoint stream is corrupt (bad magic, tag, checksum, field).
    Corrupt,
    /// A section or the stream is larger than the documented maximum.
    TooLarge,
    /// A section names an (id, instance) that no participant registered.
    UnknownSection,
    /// A section was written by a newer version than the participant's.
    NewerVersion,
}

/// Everything that can go wrong in `replication-core`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The given word is not a replication mode.
    #[error("invalid replication mode '{given}': expected 'primary' or 'secondary'")]
    InvalidMode {
        /// The word that was given.
        given: String,
    },

    /// A replication member failed; `*_all` stopped here.
    #[error("replication member '{member}' failed in {op}: {source}")]
    Member {
        /// The member's [`name`](crate::ReplicationOps::name).
        member: String,
        /// The operation that failed.
        op: ReplicationOp,
        /// What the member reported.
        #[source]
        source: OpError,
    },

    /// A participant is already registered under this id and instance.
    #[error("checkpoint state '{id}' instance {instance} is already registered")]
    DuplicateParticipant {
        /// Participant id.
        id: String,
        /// Instance id.
        instance: u32,
    },

    /// A participant id is unusable (empty or too long).
    #[error("invalid checkpoint state id '{id}': {reason}")]
    InvalidId {
        /// The id given.
        id: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// No free instance id is left for this participant id.
    #[error("no free instance id left for checkpoint state '{id}'")]
    InstancesExhausted {
        /// Participant id.
        id: String,
    },

    /// A participant's handler failed.
    #[error("checkpoint state '{id}' instance {instance} failed in {phase}: {source}")]
    Participant {
        /// Participant id.
        id: String,
        /// Instance id.
        instance: u32,
        /// The handler that failed.
        phase: SavePhase,
        /// What the participant reported.
        #[source]
        source: OpError,
    },

    /// An I/O error other than an early end of the stream.
    #[error("checkpoint stream I/O error at byte {offset} while {what}: {source}")]
    Io {
        /// Stream offset at which the operation started.
        offset: u64,
        /// What was being read or written.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The stream ended before its end marker and checksum.
    #[error("checkpoint stream truncated at byte {offset} while reading {what}")]
    Truncated {
        /// Stream offset at which the missing field starts.
        offset: u64,
        /// The field being read.
        what: &'static str,
    },

    /// The stream is corrupt.
    #[error("checkpoint stream corrupt at byte {offset}: {detail}")]
    Corrupt {
        /// Stream offset of the offending field.
        offset: u64,
        /// What is wrong.
        detail: String,
    },

    /// A section (or the whole stream) exceeds the documented maximum.
    #[error(
        "checkpoint stream at byte {offset}: {what} of {len} bytes exceeds the maximum of {max}"
    )]
    TooLarge {
        /// Stream offset of the length field.
        offset: u64,
        /// What is too large.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The maximum allowed.
        max: u64,
    },

    /// A section names a participant that is not registered here.
    #[error("checkpoint stream has a section for unknown state '{id}' instance {instance}")]
    UnknownSection {
        /// Section id.
        id: String,
        /// Section instance id.
        instance: u32,
    },

    /// A section was written by a newer version than the registered one.
    #[error("checkpoint state '{id}' instance {instance}: stream version {stream_version} is newer than supported version {supported}")]
    NewerVersion {
        /// Section id.
        id: String,
        /// Section instance id.
        instance: u32,
        /// The version in the stream.
        stream_version: u32,
        /// The version the local participant registered with.
        supported: u32,
    },
}

impl Error {
    /// The stable classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidMode { .. } => ErrorKind::InvalidMode,
            Error::Member { .. } => ErrorKind::Member,
            Error::DuplicateParticipant { .. }
            | Error::InvalidId { .. }
            | Error::InstancesExhausted { .. } => ErrorKind::Registration,
            Error::Participant { .. } => ErrorKind::Participant,
            Error::Io { .. } => ErrorKind::Io,
            Error::Truncated { .. } => ErrorKind::Truncated,
            Error::Corrupt { .. } => ErrorKind::Corrupt,
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::UnknownSection { .. } => ErrorKind::UnknownSection,
            Error::NewerVersion { .. } => ErrorKind::NewerVersion,
        }
    }

    /// The name of the member or participant this error is about, if any.
    pub fn member(&self) -> Option<&str> {
        match self {
            Error::Member { member, .. } => Some(member),
            Error::Participant { id, .. }
            | Error::DuplicateParticipant { id, .. }
            | Error::UnknownSection { id, .. }
            | Error::NewerVersion { id, .. } => Some(id),
            _ => None,
        }
    }
}
