//! Replication states and the status snapshot.

use std::fmt;
use std::time::{Duration, SystemTime};

use replication_core::ReplicationMode;

/// The state of a replication filter (QEMU's `ReplicationStage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicationState {
    /// Not started: every request fails.
    None,
    /// Replicating.
    Running,
    /// Secondary: the failover commit is running in the background.
    Failover,
    /// Secondary: the failover commit failed; writes go where the data is.
    FailoverFailed,
    /// Stopped (cleanly, or a failover completed).
    Done,
}

impl ReplicationState {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            ReplicationState::None => 0,
            ReplicationState::Running => 1,
            ReplicationState::Failover => 2,
            ReplicationState::FailoverFailed => 3,
            ReplicationState::Done => 4,
        }
    }

    pub(crate) fn from_u8(v: u8) -> ReplicationState {
        match v {
            1 => ReplicationState::Running,
            2 => ReplicationState::Failover,
            3 => ReplicationState::FailoverFailed,
            4 => ReplicationState::Done,
            _ => ReplicationState::None,
        }
    }

    /// QEMU's upper-case name (`NONE`, `RUNNING`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationState::None => "NONE",
            ReplicationState::Running => "RUNNING",
            ReplicationState::Failover => "FAILOVER",
            ReplicationState::FailoverFailed => "FAILOVER_FAILED",
            ReplicationState::Done => "DONE",
        }
    }
}

impl fmt::Display for ReplicationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of a replication filter for status queries (the daemon's
/// `query-...` commands).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationStatus {
    /// The filter's node-name.
    pub node_name: String,
    /// The mode it was opened with.
    pub mode: ReplicationMode,
    /// The current state.
    pub state: ReplicationState,
    /// The recorded replication error (what `get_error` reports), if any.
    pub error: Option<String>,
    /// Primary: bytes of guest writes forwarded successfully to the child
    /// since start. Secondary: bytes of forwarded writes that reached the
    /// secondary disk since start.
    pub bytes_forwarded: u64,
    /// Primary: forwarded writes that failed (recorded, reported as success
    /// to the guest) since start.
    pub forward_errors: u64,
    /// Secondary: clusters copied to the hidden disk since the last
    /// checkpoint.
    pub clusters_copied_since_checkpoint: u64,
    /// Checkpoints completed since start (the epoch both sides agree on).
    pub checkpoint_epoch: u64,
    /// When the last checkpoint completed.
    pub last_checkpoint_at: Option<SystemTime>,
    /// How long the last checkpoint took.
    pub last_checkpoint_duration: Option<Duration>,
    /// How long the last completed (or failed) failover commit took.
    pub failover_duration: Option<Duration>,
    /// Secondary: why the active and hidden disks hold no usable view (a
    /// checkpoint could not empty them, or the backup job is gone), while
    /// that lasts. Secondary guest I/O fails meanwhile; a successful
    /// checkpoint, stop or failover clears it.
    pub buffers_invalid: Option<String>,
}
