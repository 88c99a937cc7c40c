//! The COLO `replication` block filter (QEMU's `block/replication.c`), its
//! state machine, its registration with `replication-core`, and helpers that
//! build the primary and secondary stacks.
//!
//! # Use
//!
//! [`register`] adds the `replication` driver to a [`block_graph::Graph`]; every
//! node opened with it joins the given [`replication_core::Registry`] (member
//! name = node-name) so `start_all` / `checkpoint_all` / `get_error_all` /
//! `stop_all` drive it, and, when given, the checkpoint
//! [`replication_core::StateRegistry`] (see [`statepart`]). [`Replication::of`]
//! gives the operations and the status of one node.
//!
//! Options: `mode` = `primary` | `secondary` (anything else is refused with
//! the allowed values); `top-id` (required in secondary mode, refused in
//! primary mode with "The primary side does not support option top-id");
//! `file` (the child: the active disk on the secondary, the NBD client on the
//! primary).
//!
//! ```
//! use block_graph::{Graph, PermPair, WriteFlags};
//! use replication_core::{Registry, ReplicationMode};
//! use replication_driver::{build_secondary_stack, register, Replication, SecondaryStackOptions};
//! use serde_json::json;
//!
//! let graph = Graph::new();
//! let registry = Registry::new();
//! register(&graph, &registry, None);
//! let disk = graph.add_node(&json!({"driver": "memory", "node-name": "disk", "size": 1 << 20})).unwrap();
//! let export = graph.new_backend(&disk, PermPair::READ_WRITE).unwrap(); // the NBD export
//! let stack = build_secondary_stack(&graph, &SecondaryStackOptions::memory("sec", "disk")).unwrap();
//! registry.start_all(ReplicationMode::Secondary).unwrap();
//! export.write(0, &[0x22; 4096], WriteFlags::default()).unwrap(); // a forwarded write
//! let mut buf = [0u8; 4096];
//! stack.filter.read(0, &mut buf).unwrap();
//! assert_eq!(buf, [0u8; 4096]); // the secondary guest still sees the checkpoint
//! registry.checkpoint_all().unwrap();
//! stack.filter.read(0, &mut buf).unwrap();
//! assert_eq!(buf, [0x22; 4096]);
//! let repl = Replication::of(&stack.filter).unwrap();
//! assert_eq!(repl.status().checkpoint_epoch, 1);
//! registry.stop_all(false).unwrap();
//! ```
//!
//! # Behaviour
//!
//! As `DESIGN.md` ("The replication filter") says, plus what QEMU fixed after
//! the 2016 seed:
//!
//! * `top-id` must name a root node (no parent nodes; backends are fine)
//!   whose subtree contains the filter.
//! * Once a failover promoted the secondary (state FAILOVER or DONE), start,
//!   checkpoint and stop are accepted and do nothing, so the survivor can take
//!   part in a new replication pair (QEMU ignores them on any DONE node, and
//!   so do we).
//! * Closing the node while RUNNING stops without failover; closing it during
//!   FAILOVER cancels the commit and waits for it.
//! * The backup job is internal (not listed, not cancellable by users) and
//!   a copy-before-write error fails the forwarded write that triggered it.
//! * The hidden and secondary disks are held as extra children
//!   ([`HIDDEN_ROLE`], [`SECONDARY_ROLE`]) while running.
//! * Every operation on the `top-id` node is blocked while running, with a
//!   QEMU's reason ("Block device is in use by internal backup job", plus the
//!   filter's name), except `dataplane-start` and
//!   `drive-del` (deleting the top closes the filter, which stops replication
//!   without failover); the blockers are lifted when the replication is
//!   stopped or a failover completed (not after a failed failover: active and
//!   hidden are still in the path then).
//!
//! # Decisions where QEMU is inconsistent
//!
//! * `stop(failover=false)` on the secondary cancels the backup job, empties
//!   the active and hidden disks (the buffers of the last checkpoint are
//!   dropped), reaches DONE and returns success. QEMU 7.2 returns "Backup job
//!   was cancelled unexpectedly" and keeps the buffers.
//! * `get_error` during a healthy failover is not an error (QEMU reports "I/O
//!   error occurred" until the merge ends); [`Replication::state`] says
//!   FAILOVER. After a failed failover `get_error` reports the commit error.
//! * A checkpoint before start is an error on the secondary ("not running")
//!   and a no-op on the primary.
//! * `get_error` is an error before start on both sides ("not running").
//! * **Failed secondary checkpoint** (QEMU returns the error and leaves
//!   whatever make_empty left: e.g. the active disk emptied and the hidden
//!   disk still holding the previous checkpoint's copies, which mask the new
//!   checkpoint's data, and a later failover commits that mix). Here:
//!   - The checkpoint resets the backup job's copy state, then tries to empty
//!     both the active and the hidden disk (both are always tried). If either
//!     fails, it returns an error of kind [`ErrorKind::BuffersInvalid`]
//!     naming the disk, and the filter marks its buffers invalid. The
//!     checkpoint epoch still advances (the checkpoint's state is
//!     established: a failover yields it), so it stays in step with the
//!     primary's and the checkpoint stream of the next checkpoint loads (a
//!     reset that fails because the backup job is gone is not counted).
//!     [`ReplicationStatus::buffers_invalid`] and
//!     [`Replication::buffers_invalid`] say why, `get_error` reports it, the
//!     state stays RUNNING, and secondary guest reads and writes through the
//!     top fail with EIO (never wrong data; flush passes).
//!   - The correct view at that point is the secondary disk as the
//!     checkpoint found it (all forwarded writes applied; the guest's own
//!     writes of the ended epoch are dropped, as by any checkpoint). Since
//!     the copy state was reset, every forwarded write after the failed
//!     checkpoint still copies its cluster's checkpoint contents to the
//!     hidden disk first (or fails, leaving the secondary disk unchanged).
//!   - A later checkpoint retries (reset, then both make_empty); on success
//!     the condition clears and the view is the secondary disk.
//!   - A failover while invalid commits nothing of active or hidden: with
//!     forwarded writes held, the clusters copied since the failed checkpoint
//!     (the hidden disk's allocation, filtered by the copy state: cost
//!     follows the copies) are written back from the hidden disk into the
//!     secondary disk, which is flushed; then the backup job is cancelled and
//!     the secondary disk replaces the active disk under the filter; state
//!     DONE, `get_error` fine. The result is exactly the failed checkpoint's
//!     state, which is all the guest was told: no guest write was accepted
//!     after it. It runs synchronously; if it fails before the backup job is
//!     cancelled (e.g. the hidden disk cannot be read) the state returns to
//!     RUNNING, still invalid, and the failover can be retried.
//!   - `stop(failover=false)` that cannot empty a disk still reaches DONE
//!     with the result of a successful stop (the top reads the secondary disk
//!     as it is): the active and hidden disks are taken out of the path (the
//!     secondary disk replaces the active disk under the filter), and the
//!     error is returned and recorded. On close no graph change is made.
//!   - A backup job that ended without stop (or whose checkpoint reset fails
//!     because it ended) marks the buffers invalid for good: forwarded writes
//!     no longer copy before write, so the checkpoint state cannot be
//!     rebuilt. Guest I/O fails, a failover is refused with an error saying
//!     so (state RUNNING), and `stop(failover=false)` is the way out (it keeps
//!     the secondary disk as it is: the primary's last forwarded writes).
//!
//! # Composition
//!
//! * The backup job is `block-jobs`' [`block_jobs::BackupJob`] with sync=none
//!   (a `copy-before-write` filter above the secondary disk, copying into the
//!   hidden disk, 64 KiB clusters), internal (no job id).
//!   A watcher thread plays QEMU's completion callback: if the job ends
//!   while stop has not cancelled it, the error "Backup job was cancelled
//!   unexpectedly" is recorded for `get_error` and start is undone
//!   (blockers, extra children, read-only flags).
//! * The failover commit is `block-jobs`' active commit
//!   ([`block_jobs::MirrorJob::start_active_commit`], auto-completing),
//!   internal, with one copy in flight: block-jobs' final drained pass
//!   copies further runs on helper threads that its own drained section
//!   holds, a deadlock when the guest left dirty data behind. A thread
//!   waits for the commit and moves the state to DONE or FAILOVER_FAILED.
//! * Closing a node may happen with the graph lock held (node removal) while
//!   the jobs' clean-up needs that lock: close removes the backup filter
//!   itself, cancels the jobs and waits until they stopped copying; their
//!   remaining clean-up runs once the lock is free.
//! * Active and hidden disks must answer `Node::supports_make_empty()`
//!   with true (block-graph's capability query; `memory` and qcow-lite's
//!   `qcow2` do).

mod driver;
mod error;
mod stack;
mod state;
pub mod statepart;

use std::sync::Arc;
use std::time::Duration;

use block_graph::{Graph, Node, OpenContext};
use block_jobs::{Job, JobManager};
use replication_core::{Registry, ReplicationMode, StateRegistry};

pub use driver::{ReplicationDriver, HIDDEN_ROLE, SECONDARY_ROLE};
pub use error::{Error, ErrorKind, Result};
pub use stack::{
    build_primary_stack, build_secondary_stack, PrimaryStack, PrimaryStackOptions, SecondaryStack,
    SecondaryStackOptions,
};
pub use state::{ReplicationState, ReplicationStatus};

/// Registers the `replication` driver with `graph`. Nodes opened with it
/// join `registry` and, if given, the checkpoint state registry `states`;
/// their internal jobs (backup, failover commit) run in a job manager of
/// their own.
pub fn register(graph: &Graph, registry: &Registry, states: Option<&StateRegistry>) {
    register_with_jobs(graph, registry, states, &JobManager::new());
}

/// Like [`register`], with the internal jobs in `jobs` (the daemon's job
/// manager; internal jobs are hidden from its listings).
pub fn register_with_jobs(
    graph: &Graph,
    registry: &Registry,
    states: Option<&StateRegistry>,
    jobs: &JobManager,
) {
    let registry = registry.clone();
    let states = states.cloned();
    let jobs = jobs.clone();
    block_jobs::register_drivers(graph);
    graph.register_driver("replication", move |ctx: &mut OpenContext<'_>| {
        ReplicationDriver::open(ctx, Some(&registry), states.as_ref(), &jobs)
    });
}

/// A handle on one replication filter node: its operations (as the registry
/// calls them) and its status.
#[derive(Clone)]
pub struct Replication {
    shared: Arc<driver::Shared>,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication")
            .field("node", &self.shared.name)
            .field("mode", &self.shared.mode)
            .field("state", &self.shared.state())
            .finish()
    }
}

impl Replication {
    /// The handle of `node`, if it is a `replication` node.
    pub fn of(node: &Node) -> Option<Replication> {
        node.driver_as::<ReplicationDriver>().map(|d| Replication {
            shared: d.shared.clone(),
        })
    }

    /// The filter's node-name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The mode the node was opened with.
    pub fn mode(&self) -> ReplicationMode {
        self.shared.mode
    }

    /// The current state.
    pub fn state(&self) -> ReplicationState {
        self.shared.state()
    }

    /// A status snapshot.
    pub fn status(&self) -> ReplicationStatus {
        self.shared.status()
    }

    /// Start replicating in `mode` (see the crate docs for the checks).
    pub fn start(&self, mode: ReplicationMode) -> Result<()> {
        self.shared.start(mode)
    }

    /// Take a checkpoint.
    pub fn checkpoint(&self) -> Result<()> {
        self.shared.checkpoint()
    }

    /// Report a recorded replication error.
    pub fn get_error(&self) -> Result<()> {
        self.shared.get_error()
    }

    /// Stop; `failover` promotes the secondary (the commit runs in the
    /// background: see [`Replication::wait_failover`]).
    pub fn stop(&self, failover: bool) -> Result<()> {
        self.shared.stop(failover)
    }

    /// Waits until no failover commit is running. False on timeout.
    pub fn wait_failover(&self, timeout: Duration) -> bool {
        self.shared.wait_failover(timeout)
    }

    /// Why the secondary's active and hidden disks hold no usable view (a
    /// checkpoint could not empty them), while that lasts; see the crate
    /// docs, "Failed secondary checkpoint".
    pub fn buffers_invalid(&self) -> Option<String> {
        self.shared.buffers_invalid()
    }

    /// The internal backup job while it runs (for monitoring; users cannot
    /// see it in the job manager's listings).
    pub fn backup_job(&self) -> Option<Job> {
        self.shared.backup_job()
    }
}
