//! The `replication` driver: options, state machine, I/O by state and mode,
//! and the replication operations (start, checkpoint, get_error, stop).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, ErrorKind, Result};
use crate::state::{ReplicationState, ReplicationStatus};
use crate::statepart::{EpochParticipant, STATE_ID, STATE_VERSION};
use block_graph::{
    BlockOp, BlockerGuard, Driver, Error as BlockError, ErrorKind as BlockErrorKind, Graph, Node,
    NodeRef, OpenContext, PermPair, Perms, ReopenOpts, Result as BlockResult, Role, WriteFlags,
};
use block_jobs::{
    BackupJob, BackupOptions, BackupSync, CopyTracker, Job, JobManager, JobOptions, JobOutcome,
    JobStatus, MirrorJob, MirrorOptions,
};
use parking_lot::{Condvar, Mutex, RwLock};
use replication_core::{
    OpError, RegistrationHandle, Registry, ReplicationMode, ReplicationOps, StateHandle,
    StateRegistry,
};

/// Role of the hidden disk as an extra child of the filter while running.
pub const HIDDEN_ROLE: &str = "hidden";
/// Role of the secondary disk as an extra child of the filter while running.
pub const SECONDARY_ROLE: &str = "secondary";

/// Copy-before-write granularity (the default qcow2 and memory cluster size).
pub(crate) const CBW_CLUSTER: u64 = 64 * 1024;
/// How long closing a node waits for a cancelled failover commit.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// What a running secondary holds.
pub(crate) struct Running {
    pub(crate) active: NodeRef,
    pub(crate) hidden: NodeRef,
    pub(crate) secondary: NodeRef,
    /// The internal backup job (sync=none, secondary disk -> hidden disk).
    backup: Mutex<Option<BackupJob>>,
    tracker: Arc<CopyTracker>,
    /// True while the backup job runs and stop has not cancelled it.
    backup_active: AtomicBool,
    /// Bytes forwarded through the backup's filter, counted when it ends.
    forwarded_done: AtomicU64,
    blocker: Mutex<Option<BlockerGuard>>,
    orig_hidden_ro: bool,
    orig_secondary_ro: bool,
}

impl Running {
    fn forwarded(&self) -> u64 {
        let live = self
            .backup
            .lock()
            .as_ref()
            .map(|b| b.filter_node().stats().write.bytes)
            .unwrap_or(0);
        self.forwarded_done.load(Ordering::Relaxed) + live
    }
}

struct Failover {
    job: Job,
    done: Mutex<bool>,
    cv: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: Mutex<Option<ThreadId>>,
}

/// State shared by the driver, its registry member and its state participant.
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) mode: ReplicationMode,
    top_id: Option<String>,
    jobs: JobManager,
    state: AtomicU8,
    control: Mutex<()>,
    run: RwLock<Option<Arc<Running>>>,
    error: Mutex<Option<String>>,
    self_node: Mutex<Weak<Node>>,
    bytes_forwarded: AtomicU64,
    forward_errors: AtomicU64,
    pub(crate) epoch: AtomicU64,
    last_checkpoint: Mutex<Option<(SystemTime, Duration)>>,
    failover: Mutex<Option<Arc<Failover>>>,
    failover_duration: Mutex<Option<Duration>>,
    registration: Mutex<Option<RegistrationHandle>>,
    state_handle: Mutex<Option<StateHandle>>,
    /// Set while the active and hidden disks do not hold a usable view (a
    /// checkpoint could not empty them, or the backup job is gone): secondary
    /// guest I/O through the top fails with EIO meanwhile.
    invalid_flag: AtomicBool,
    invalid: Mutex<Option<Invalid>>,
}

/// Why the secondary's buffers (active and hidden disks) are invalid.
#[derive(Clone)]
struct Invalid {
    reason: String,
    /// True when the checkpoint state can still be rebuilt at failover: the
    /// backup job's copy state was reset at the failed checkpoint, so every
    /// cluster a forwarded write changed since then has its checkpoint
    /// contents in the hidden disk (copy-before-write), and every other
    /// cluster of the secondary disk still holds it.
    restorable: bool,
}

fn buffers_eio(node: &Node) -> BlockError {
    eio(
        node,
        "the secondary buffers are invalid (a checkpoint could not empty the active or \
         hidden disk): I/O refused until a checkpoint succeeds",
    )
}

fn eio(node: &Node, what: &str) -> BlockError {
    BlockError::new(BlockErrorKind::Io, what.to_string()).with_node(node.name())
}

impl Shared {
    pub(crate) fn state(&self) -> ReplicationState {
        ReplicationState::from_u8(self.state.load(Ordering::Acquire))
    }

    fn set_state(&self, s: ReplicationState) {
        self.state.store(s.to_u8(), Ordering::Release);
    }

    fn running(&self) -> Option<Arc<Running>> {
        self.run.read().clone()
    }

    fn err(&self, kind: ErrorKind, msg: impl Into<String>) -> Error {
        Error::new(kind, &self.name, msg)
    }

    fn gerr(&self, msg: impl Into<String>, e: BlockError) -> Error {
        Error::graph(&self.name, msg, e)
    }

    fn node(&self) -> Result<NodeRef> {
        self.self_node.lock().upgrade().ok_or_else(|| {
            self.err(
                ErrorKind::NotRunning,
                "the replication node is not open (or was removed)",
            )
        })
    }

    fn graph_of(&self, node: &Node) -> Result<Graph> {
        node.graph()
            .ok_or_else(|| self.err(ErrorKind::NotRunning, "the block graph is gone"))
    }

    /// Marks the buffers invalid (the first reason is kept; a later
    /// non-restorable cause makes the condition non-restorable).
    fn set_invalid(&self, reason: String, restorable: bool) {
        let mut g = self.invalid.lock();
        match g.as_mut() {
            Some(i) => i.restorable &= restorable,
            None => *g = Some(Invalid { reason, restorable }),
        }
        self.invalid_flag.store(true, Ordering::Release);
    }

    fn clear_invalid(&self) {
        let mut g = self.invalid.lock();
        *g = None;
        self.invalid_flag.store(false, Ordering::Release);
    }

    fn invalid(&self) -> Option<Invalid> {
        self.invalid.lock().clone()
    }

    pub(crate) fn buffers_invalid(&self) -> Option<String> {
        self.invalid.lock().as_ref().map(|i| i.reason.clone())
    }

    fn record_error(&self, msg: String) {
        let mut e = self.error.lock();
        if e.is_none() {
            *e = Some(msg);
        }
    }

    pub(crate) fn status(&self) -> ReplicationStatus {
        let run = self.running();
        let (at, dur) = match *self.last_checkpoint.lock() {
            Some((a, d)) => (Some(a), Some(d)),
            None => (None, None),
        };
        let bytes_forwarded = match (self.mode, &run) {
            (ReplicationMode::Primary, _) => self.bytes_forwarded.load(Ordering::Relaxed),
            (ReplicationMode::Secondary, Some(r)) => r.forwarded(),
            (ReplicationMode::Secondary, None) => self.bytes_forwarded.load(Ordering::Relaxed),
        };
        ReplicationStatus {
            node_name: self.name.clone(),
            mode: self.mode,
            state: self.state(),
            // What get_error reports: a recorded error, else invalid buffers.
            error: self.error.lock().clone().or_else(|| {
                self.buffers_invalid()
                    .map(|r| format!("secondary buffers invalid: {r}"))
            }),
            bytes_forwarded,
            forward_errors: self.forward_errors.load(Ordering::Relaxed),
            clusters_copied_since_checkpoint: run
                .as_ref()
                .map(|r| r.tracker.epoch_copies())
                .unwrap_or(0),
            checkpoint_epoch: self.epoch.load(Ordering::Relaxed),
            last_checkpoint_at: at,
            last_checkpoint_duration: dur,
            failover_duration: *self.failover_duration.lock(),
            buffers_invalid: self.buffers_invalid(),
        }
    }

    // ------------------------------------------------------------------ start

    pub(crate) fn start(self: &Arc<Self>, mode: ReplicationMode) -> Result<()> {
        let _c = self.control.lock();
        match self.state() {
            // A failover promoted this node: the survivor may join a new pair.
            ReplicationState::Failover | ReplicationState::Done => return Ok(()),
            ReplicationState::None => {}
            other => {
                return Err(self.err(
                    ErrorKind::AlreadyStarted,
                    format!("Block replication is running or done (state {other})"),
                ))
            }
        }
        if mode != self.mode {
            return Err(self.err(
                ErrorKind::ModeMismatch,
                format!(
                    "The parameter mode's value is invalid, needs {}, but got {mode}",
                    self.mode
                ),
            ));
        }
        match self.mode {
            ReplicationMode::Primary => {}
            ReplicationMode::Secondary => {
                let run = self.start_secondary()?;
                *self.run.write() = Some(run.clone());
                self.set_state(ReplicationState::Running);
                if let Err(e) = self.secondary_checkpoint(&run) {
                    self.set_state(ReplicationState::None);
                    *self.run.write() = None;
                    self.teardown(&run, true);
                    self.clear_invalid();
                    return Err(e);
                }
            }
        }
        self.clear_invalid();
        *self.error.lock() = None;
        self.bytes_forwarded.store(0, Ordering::Relaxed);
        self.forward_errors.store(0, Ordering::Relaxed);
        self.epoch.store(0, Ordering::Relaxed);
        *self.last_checkpoint.lock() = None;
        self.set_state(ReplicationState::Running);
        Ok(())
    }

    fn start_secondary(self: &Arc<Self>) -> Result<Arc<Running>> {
        let node = self.node()?;
        let graph = self.graph_of(&node)?;
        let active = node.file().ok_or_else(|| {
            self.err(
                ErrorKind::BadChain,
                "Active disk doesn't have backing file (the filter has no file child)",
            )
        })?;
        let hidden = active.backing().ok_or_else(|| {
            self.err(
                ErrorKind::BadChain,
                format!("Active disk '{}' doesn't have backing file", active.name()),
            )
        })?;
        let secondary = hidden.backing().ok_or_else(|| {
            self.err(
                ErrorKind::BadChain,
                format!("Hidden disk '{}' doesn't have backing file", hidden.name()),
            )
        })?;
        if !secondary.has_backend() {
            return Err(self.err(
                ErrorKind::BadChain,
                format!(
                    "The secondary disk '{}' doesn't have block backend (it must be exported to the primary)",
                    secondary.name()
                ),
            ));
        }
        let (la, lh, ls) = (active.len(), hidden.len(), secondary.len());
        if la != lh || lh != ls {
            return Err(self.err(
                ErrorKind::BadChain,
                format!(
                    "active disk, hidden disk, secondary disk's length are not the same \
                     ('{}' {la}, '{}' {lh}, '{}' {ls} bytes)",
                    active.name(),
                    hidden.name(),
                    secondary.name()
                ),
            ));
        }
        for d in [&active, &hidden] {
            if !d.supports_make_empty() {
                return Err(self.err(
                    ErrorKind::BadChain,
                    format!(
                        "active disk or hidden disk doesn't support make_empty ('{}' has driver '{}')",
                        d.name(),
                        d.driver_name()
                    ),
                ));
            }
        }

        // Reopen hidden and secondary read-write.
        let orig_hidden_ro = hidden.is_read_only();
        let orig_secondary_ro = secondary.is_read_only();
        let mut queue = Vec::new();
        if orig_hidden_ro {
            queue.push((hidden.clone(), ReopenOpts { read_only: false }));
        }
        if orig_secondary_ro {
            queue.push((secondary.clone(), ReopenOpts { read_only: false }));
        }
        if !queue.is_empty() {
            graph.reopen(&queue).map_err(|e| {
                self.gerr("cannot reopen the hidden and secondary disks read-write", e)
            })?;
        }
        let restore_flags = || {
            let mut q = Vec::new();
            if orig_hidden_ro {
                q.push((hidden.clone(), ReopenOpts { read_only: true }));
            }
            if orig_secondary_ro {
                q.push((secondary.clone(), ReopenOpts { read_only: true }));
            }
            if !q.is_empty() {
                let _ = graph.reopen(&q);
            }
        };

        // top-id: exists, is a root node, reaches this filter.
        let top_id = self.top_id.clone().unwrap_or_default();
        let top = match self.check_top(&graph, &node, &top_id) {
            Ok(t) => t,
            Err(e) => {
                restore_flags();
                return Err(e);
            }
        };

        // QEMU's reason text, then which filter holds the node.
        let blocker = top.block_all(format!(
            "Block device is in use by internal backup job (replication filter '{}')",
            self.name
        ));
        blocker.unblock(BlockOp::DataplaneStart);
        blocker.unblock(BlockOp::DriveDel);

        // The internal backup job: sync=none from the secondary disk to the
        // hidden disk (a copy-before-write filter above the secondary disk).
        let backup = match BackupJob::start(
            &self.jobs,
            &graph,
            &secondary,
            &hidden,
            BackupOptions {
                sync: BackupSync::None,
                cluster_size: Some(CBW_CLUSTER),
                job: JobOptions::default(),
            },
        ) {
            Ok(b) => b,
            Err(e) => {
                drop(blocker);
                restore_flags();
                return Err(self.err(
                    ErrorKind::Graph,
                    format!("cannot start the backup job: {e}"),
                ));
            }
        };

        let run = Arc::new(Running {
            active,
            hidden,
            secondary,
            tracker: backup.tracker().clone(),
            backup: Mutex::new(Some(backup)),
            backup_active: AtomicBool::new(true),
            forwarded_done: AtomicU64::new(0),
            blocker: Mutex::new(Some(blocker)),
            orig_hidden_ro,
            orig_secondary_ro,
        });

        // Hold hidden and secondary disks as extra children.
        for (role, child) in [(HIDDEN_ROLE, &run.hidden), (SECONDARY_ROLE, &run.secondary)] {
            if let Err(e) = graph.attach_child(&node, Role::Named(role.into()), child) {
                self.teardown(&run, true);
                return Err(self.gerr(format!("cannot hold the {role} disk"), e));
            }
        }
        self.watch_backup(&run);
        Ok(run)
    }

    /// QEMU's backup completion callback: a backup job that ends while stop
    /// has not cancelled it is an error, and its clean-up undoes start.
    fn watch_backup(self: &Arc<Self>, run: &Arc<Running>) {
        let Some(job) = run.backup.lock().as_ref().map(|b| b.job().clone()) else {
            return;
        };
        let shared = Arc::downgrade(self);
        let run = run.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("backup-watch-{}", self.name))
            .spawn(move || {
                job.wait();
                if !run.backup_active.load(Ordering::Acquire) {
                    return;
                }
                let Some(s) = shared.upgrade() else { return };
                let _c = s.control.lock();
                if run.backup_active.load(Ordering::Acquire) {
                    let _ = s.check_backup(&run);
                }
            });
        if spawned.is_err() {
            // Without the watcher the next checkpoint still notices.
            self.record_error("cannot watch the backup job".into());
        }
    }

    fn check_top(&self, graph: &Graph, node: &NodeRef, top_id: &str) -> Result<NodeRef> {
        let top = graph.node(top_id).map_err(|e| {
            Error::graph(&self.name, format!("top-id '{top_id}': no such node"), e)
                .with_kind(ErrorKind::TopId)
        })?;
        let parents = top.parents();
        if let Some((p, role)) = parents.first() {
            return Err(self.err(
                ErrorKind::TopId,
                format!(
                    "top-id '{top_id}' is not a root node: it is the '{role}' child of '{}'",
                    p.name()
                ),
            ));
        }
        if !top.reaches(node) {
            return Err(self.err(
                ErrorKind::TopId,
                format!("top-id '{top_id}' does not reach the replication node"),
            ));
        }
        Ok(top)
    }

    /// Undo what start did: extra children, backup job, blockers, flags.
    /// With `restore_secondary` the secondary disk's read-only flag is
    /// restored too (not after a failover, where it became the active layer).
    fn teardown(&self, run: &Running, restore_secondary: bool) {
        if let Ok(node) = self.node() {
            if let Some(graph) = node.graph() {
                for role in [HIDDEN_ROLE, SECONDARY_ROLE] {
                    let r = Role::Named(role.into());
                    if node.child(&r).is_some() {
                        let _ = graph.detach_child(&node, &r);
                    }
                }
            }
        }
        self.cancel_backup(run, true);
        run.blocker.lock().take();
        let mut q = Vec::new();
        if run.orig_hidden_ro && !run.hidden.is_removed() {
            q.push((run.hidden.clone(), ReopenOpts { read_only: true }));
        }
        if restore_secondary && run.orig_secondary_ro && !run.secondary.is_removed() {
            q.push((run.secondary.clone(), ReopenOpts { read_only: true }));
        }
        if let Some(g) = run.hidden.graph() {
            for item in q {
                // Best effort, as QEMU: a writer (the NBD export) may keep
                // the secondary disk writable.
                let _ = g.reopen(std::slice::from_ref(&item));
            }
        }
    }

    /// Cancels the backup job. Its filter is taken out of the graph here
    /// (synchronously), then the job is cancelled. With `closing` the job's
    /// own clean-up is not waited for: close may run with the graph lock held
    /// (node removal) and the clean-up needs it; the job has stopped copying
    /// when this returns either way.
    fn cancel_backup(&self, run: &Running, closing: bool) {
        run.backup_active.store(false, Ordering::Release);
        let job = run.backup.lock().clone();
        if let Some(b) = job {
            let f = b.filter_node();
            let bytes = f.stats().write.bytes;
            if let Some(g) = f.graph() {
                if !f.is_removed() {
                    let _ = g.remove_filter(f);
                }
            }
            let _ = b.job().cancel(true);
            if closing {
                wait_stopped(b.job(), CLOSE_WAIT);
            } else {
                b.job().wait();
            }
            run.forwarded_done.fetch_add(bytes, Ordering::Relaxed);
            run.backup.lock().take();
        }
    }

    /// If the backup job ended without stop cancelling it: record the error
    /// and undo what start did (blockers, flags, extra children).
    fn check_backup(&self, run: &Running) -> Result<()> {
        let ended = {
            let b = run.backup.lock();
            match b.as_ref() {
                Some(b) => b.job().outcome().is_some(),
                None => true,
            }
        };
        if ended && run.backup_active.load(Ordering::Acquire) {
            let msg = "Backup job was cancelled unexpectedly".to_string();
            // From now on forwarded writes land without copy-before-write:
            // the hidden disk can no longer restore the checkpoint state.
            self.set_invalid(
                "the backup job ended: forwarded writes are no longer copied before write, \
                 the checkpoint state cannot be rebuilt"
                    .into(),
                false,
            );
            self.teardown(run, true);
            // Recorded last, so that whoever sees this error also sees the
            // blockers and extra children gone.
            self.record_error(msg.clone());
            return Err(self.err(ErrorKind::BackupCancelled, msg));
        }
        if ended {
            let msg = "Backup job was cancelled unexpectedly".to_string();
            return Err(self.err(ErrorKind::BackupCancelled, msg));
        }
        Ok(())
    }

    // ------------------------------------------------------------- checkpoint

    /// The secondary's checkpoint: reset the backup job's copy state, then
    /// empty the active and the hidden disk, with forwarded writes and guest
    /// I/O held. If either disk cannot be emptied the buffers are marked
    /// invalid (see the crate docs, "Failed secondary checkpoint"): both are
    /// always tried, the error names the disk(s), and a later checkpoint
    /// retries.
    fn secondary_checkpoint(&self, run: &Running) -> Result<()> {
        let t0 = Instant::now();
        self.check_backup(run)?;
        let Some(backup) = run.backup.lock().clone() else {
            return Err(self.err(
                ErrorKind::BackupCancelled,
                "Backup job was cancelled unexpectedly",
            ));
        };
        let graph = self.graph_of(&run.secondary)?;
        // Forwarded writes and guest I/O are held while the copy state resets
        // and the buffers empty.
        let _d = graph.drain(&[backup.filter_node().clone()]);
        if let Err(e) = backup.checkpoint() {
            self.set_invalid(
                format!("the backup job ended before the checkpoint could reset it: {e}"),
                false,
            );
            return Err(self.err(
                ErrorKind::BackupCancelled,
                format!("Backup job checkpoint failed: {e}"),
            ));
        }
        // From here the copy state is reset: the secondary disk is the new
        // checkpoint state, and the hidden disk receives its old contents of
        // every cluster a forwarded write changes from now on.
        let ra = run.active.make_empty();
        let rh = run.hidden.make_empty();
        let (what, e) = match (ra, rh) {
            (Ok(()), Ok(())) => {
                self.clear_invalid();
                *self.last_checkpoint.lock() = Some((SystemTime::now(), t0.elapsed()));
                return Ok(());
            }
            (Err(e), Ok(())) => (format!("active disk '{}'", run.active.name()), e),
            (Ok(()), Err(e)) => (format!("hidden disk '{}'", run.hidden.name()), e),
            (Err(e), Err(eh)) => (
                format!(
                    "active disk '{}' (and hidden disk '{}': {eh})",
                    run.active.name(),
                    run.hidden.name()
                ),
                e,
            ),
        };
        self.set_invalid(
            format!("checkpoint could not make the {what} empty: {e}"),
            true,
        );
        Err(self
            .gerr(
                format!(
                    "Cannot make {what} empty at checkpoint; the secondary buffers are invalid: \
                     secondary guest I/O fails until a checkpoint succeeds, and a failover \
                     promotes the checkpoint state without them"
                ),
                e,
            )
            .with_kind(ErrorKind::BuffersInvalid))
    }

    pub(crate) fn checkpoint(&self) -> Result<()> {
        let _c = self.control.lock();
        match (self.state(), self.mode) {
            (ReplicationState::Failover | ReplicationState::Done, _) => return Ok(()),
            (ReplicationState::None, ReplicationMode::Primary) => return Ok(()),
            (ReplicationState::None, ReplicationMode::Secondary) => {
                return Err(self.err(
                    ErrorKind::NotRunning,
                    "Block replication is not running (checkpoint before start)",
                ))
            }
            (ReplicationState::FailoverFailed, _) => {
                return Err(self.err(
                    ErrorKind::NotRunning,
                    "the failover failed; there is no backup job to checkpoint",
                ))
            }
            (ReplicationState::Running, ReplicationMode::Primary) => {
                *self.last_checkpoint.lock() = Some((SystemTime::now(), Duration::ZERO));
            }
            (ReplicationState::Running, ReplicationMode::Secondary) => {
                let run = self
                    .running()
                    .ok_or_else(|| self.err(ErrorKind::NotRunning, "no running state"))?;
                if let Err(e) = self.secondary_checkpoint(&run) {
                    if e.kind() == ErrorKind::BuffersInvalid {
                        // The copy state was reset: this checkpoint's state
                        // is established (a failover yields it), only the
                        // buffers could not be emptied. The epoch stays in
                        // step with the primary's, so the pair can go on
                        // once a later checkpoint empties them.
                        self.epoch.fetch_add(1, Ordering::AcqRel);
                    }
                    return Err(e);
                }
            }
        }
        self.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    // -------------------------------------------------------------- get_error

    pub(crate) fn get_error(&self) -> Result<()> {
        if self.state() == ReplicationState::None {
            return Err(self.err(ErrorKind::NotRunning, "Block replication is not running"));
        }
        if let Some(e) = self.error.lock().clone() {
            return Err(self.err(ErrorKind::IoError, format!("I/O error occurred: {e}")));
        }
        if let Some(i) = self.invalid() {
            return Err(self.err(
                ErrorKind::BuffersInvalid,
                format!("secondary buffers invalid: {}", i.reason),
            ));
        }
        Ok(())
    }

    // ------------------------------------------------------------------- stop

    pub(crate) fn stop(self: &Arc<Self>, failover: bool) -> Result<()> {
        let _c = self.control.lock();
        match self.state() {
            ReplicationState::Failover | ReplicationState::Done => return Ok(()),
            ReplicationState::Running => {}
            other => {
                return Err(self.err(
                    ErrorKind::NotRunning,
                    format!("Block replication is not running (state {other})"),
                ))
            }
        }
        match self.mode {
            ReplicationMode::Primary => {
                self.set_state(ReplicationState::Done);
                *self.error.lock() = None;
                Ok(())
            }
            ReplicationMode::Secondary if !failover => self.stop_secondary(false),
            ReplicationMode::Secondary => self.start_failover(),
        }
    }

    fn stop_secondary(&self, closing: bool) -> Result<()> {
        let run = self
            .running()
            .ok_or_else(|| self.err(ErrorKind::NotRunning, "no running state"))?;
        self.cancel_backup(&run, closing);
        let failed = match (run.active.make_empty(), run.hidden.make_empty()) {
            (Ok(()), Ok(())) => None,
            (Err(e), _) => Some((format!("active disk '{}'", run.active.name()), e)),
            (Ok(()), Err(e)) => Some((format!("hidden disk '{}'", run.hidden.name()), e)),
        };
        self.set_state(ReplicationState::Done);
        let mut bypassed = false;
        let r = match failed {
            None => {
                self.clear_invalid();
                Ok(())
            }
            // Closing: the node goes away, nothing reads the buffers again
            // (and the graph lock may be held: no graph change here).
            Some((what, e)) if closing => {
                Err(self.gerr(format!("Cannot make {what} empty at close"), e))
            }
            // The stop's result must be what a successful one gives: the top
            // reads the secondary disk as it is. Take the buffers out of the
            // path instead of exposing them.
            Some((what, e)) => match self.bypass_buffers(&run) {
                Ok(()) => {
                    bypassed = true;
                    self.clear_invalid();
                    let msg = format!(
                        "Cannot make {what} empty at stop: {e}; active and hidden disks \
                         were taken out of the path instead (the top reads the secondary disk)"
                    );
                    self.record_error(msg.clone());
                    Err(self.gerr(msg, e))
                }
                Err(e2) => {
                    let msg = format!(
                        "Cannot make {what} empty at stop: {e}; nor take the buffers out of \
                         the path: {e2}"
                    );
                    self.record_error(msg.clone());
                    self.set_invalid(msg.clone(), false);
                    Err(self.gerr(msg, e).with_kind(ErrorKind::BuffersInvalid))
                }
            },
        };
        self.teardown(&run, !bypassed);
        *self.run.write() = None;
        r
    }

    /// Takes the active and hidden disks out of the I/O path: the filter's
    /// file child becomes the secondary disk itself (as after a completed
    /// failover commit, but without committing anything).
    fn bypass_buffers(&self, run: &Running) -> Result<()> {
        let node = self.node()?;
        let graph = self.graph_of(&node)?;
        for role in [HIDDEN_ROLE, SECONDARY_ROLE] {
            let r = Role::Named(role.into());
            if node.child(&r).is_some() {
                let _ = graph.detach_child(&node, &r);
            }
        }
        graph
            .replace_node(&run.active, &run.secondary)
            .map_err(|e| {
                self.gerr(
                    format!(
                        "cannot put the secondary disk '{}' in place of the active disk '{}'",
                        run.secondary.name(),
                        run.active.name()
                    ),
                    e,
                )
            })
    }

    /// Failover while the buffers are invalid (a checkpoint failed to empty
    /// them): nothing of active or hidden is committed. The checkpoint state
    /// is the secondary disk, except where a forwarded write changed it
    /// since the failed checkpoint: there the hidden disk holds the
    /// checkpoint contents (the copy state was reset at that checkpoint), and
    /// they are written back. Then the secondary disk replaces the active
    /// disk under the filter. Synchronous; on an error before the backup job
    /// is cancelled the state goes back to RUNNING (still invalid), so the
    /// failover can be retried.
    fn failover_without_buffers(&self, run: &Arc<Running>, inv: Invalid) -> Result<()> {
        if !inv.restorable {
            return Err(self.err(
                ErrorKind::BuffersInvalid,
                format!(
                    "failover refused: the secondary buffers are invalid and the checkpoint \
                     state cannot be rebuilt ({}); stop(failover=false) keeps the secondary \
                     disk as it is",
                    inv.reason
                ),
            ));
        }
        let t0 = Instant::now();
        self.set_state(ReplicationState::Failover);
        if let Err(e) = self.restore_checkpoint_state(run) {
            self.set_state(ReplicationState::Running);
            return Err(e);
        }
        self.cancel_backup(run, false);
        *self.failover_duration.lock() = Some(t0.elapsed());
        if let Err(e) = self.bypass_buffers(run) {
            // The secondary disk holds the checkpoint state, but the
            // buffers are still in the path: keep failing guest I/O.
            let msg = format!("failover could not take the invalid buffers out of the path: {e}");
            *self.error.lock() = Some(msg.clone());
            self.set_invalid(msg.clone(), false);
            self.set_state(ReplicationState::FailoverFailed);
            return Err(self.err(ErrorKind::BuffersInvalid, msg));
        }
        self.clear_invalid();
        *self.error.lock() = None;
        self.set_state(ReplicationState::Done);
        self.teardown(run, false);
        *self.run.write() = None;
        Ok(())
    }

    /// Writes back into the secondary disk the checkpoint contents of every
    /// cluster copied before write since the last (failed) checkpoint. Cost
    /// follows the hidden disk's allocation.
    fn restore_checkpoint_state(&self, run: &Running) -> Result<()> {
        let Some(backup) = run.backup.lock().clone() else {
            return Err(self.err(
                ErrorKind::BackupCancelled,
                "Backup job was cancelled unexpectedly",
            ));
        };
        let graph = self.graph_of(&run.secondary)?;
        // Forwarded writes held: the copy state cannot change underneath.
        let _d = graph.drain(&[backup.filter_node().clone()]);
        let len = run.secondary.len();
        let cl = run.tracker.cluster_size();
        let mut buf = Vec::new();
        let mut next_cluster = 0u64;
        let mut off = 0u64;
        while off < len {
            let (alloc, n) = graph
                .is_allocated_above(&run.hidden, Some(&run.secondary), off, len - off)
                .map_err(|e| {
                    self.gerr(
                        format!("failover: cannot query the hidden disk's allocation at {off}"),
                        e,
                    )
                })?;
            if alloc {
                for c in (off / cl).max(next_cluster)..(off + n).div_ceil(cl) {
                    next_cluster = c + 1;
                    if !run.tracker.is_copied(c) {
                        continue;
                    }
                    let start = c * cl;
                    let l = cl.min(len - start);
                    buf.resize(l as usize, 0);
                    run.hidden.read(start, &mut buf).map_err(|e| {
                        self.gerr(
                            format!(
                                "failover: cannot read the checkpoint copy at {start} \
                                 (+{l}) from the hidden disk"
                            ),
                            e,
                        )
                    })?;
                    run.secondary
                        .write(start, &buf, WriteFlags::default())
                        .map_err(|e| {
                            self.gerr(
                                format!(
                                    "failover: cannot restore {start} (+{l}) on the secondary disk"
                                ),
                                e,
                            )
                        })?;
                }
            }
            off += n;
        }
        run.secondary
            .flush()
            .map_err(|e| self.gerr("failover: cannot flush the secondary disk", e))
    }

    fn start_failover(self: &Arc<Self>) -> Result<()> {
        let run = self
            .running()
            .ok_or_else(|| self.err(ErrorKind::NotRunning, "no running state"))?;
        if let Some(inv) = self.invalid() {
            return self.failover_without_buffers(&run, inv);
        }
        let node = self.node()?;
        let graph = self.graph_of(&node)?;
        self.set_state(ReplicationState::Failover);
        self.cancel_backup(&run, false);
        let t0 = Instant::now();
        // The copy-before-write copies in the hidden disk and the guest's
        // writes in the active disk may still sit in a format's metadata
        // cache. Hand them to the operating system before the commit starts
        // rewriting the secondary disk, so that a kill of this process
        // during the commit leaves a chain that still reads as the guest's
        // view and re-running the commit recovers. A write-back, not a
        // flush: syncing the buffered data first would write it to the disk
        // twice (measured: 0.6 of dd's copy rate instead of 1.0 for 64 MiB),
        // and the active and hidden disks' contents do not survive a power
        // loss of the secondary in any phase (forwarded writes are not
        // ordered against their copy-before-write copies by a flush either).
        // Best effort: a failure does not stop the failover (the commit reads
        // the same data and reports its own errors).
        let _ = run.hidden.write_back();
        let _ = run.active.write_back();
        let commit = MirrorJob::start_active_commit(
            &self.jobs,
            &graph,
            &run.active,
            &run.secondary,
            MirrorOptions {
                auto_complete: true,
                // One copy at a time: block-jobs' final drained pass copies
                // extra runs on helper threads that its own drain holds
                // (a deadlock when the guest left dirty data behind).
                max_in_flight: 1,
                job: JobOptions::default(),
                ..MirrorOptions::default()
            },
        );
        let commit = match commit {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("failover commit could not start: {e}");
                *self.error.lock() = Some(msg.clone());
                self.set_state(ReplicationState::FailoverFailed);
                return Err(self.err(ErrorKind::IoError, msg));
            }
        };
        let fo = Arc::new(Failover {
            job: commit.job().clone(),
            done: Mutex::new(false),
            cv: Condvar::new(),
            thread: Mutex::new(None),
            thread_id: Mutex::new(None),
        });
        *self.failover.lock() = Some(fo.clone());
        let shared = self.clone();
        let weak = Arc::downgrade(&node);
        drop(node);
        let fo2 = fo.clone();
        let handle = std::thread::Builder::new()
            .name(format!("failover-{}", self.name))
            .spawn(move || {
                let r = match fo2.job.wait() {
                    JobOutcome::Completed => Ok(()),
                    JobOutcome::Cancelled => Err("the failover commit was cancelled".to_string()),
                    JobOutcome::Failed(e) => Err(e.to_string()),
                };
                shared.failover_done(&run, &weak, &graph, r, t0.elapsed());
                *fo2.done.lock() = true;
                fo2.cv.notify_all();
            })
            .map_err(|e| {
                self.err(
                    ErrorKind::Graph,
                    format!("cannot start the failover watcher: {e}"),
                )
            })?;
        *fo.thread_id.lock() = Some(handle.thread().id());
        *fo.thread.lock() = Some(handle);
        Ok(())
    }

    fn failover_done(
        &self,
        run: &Arc<Running>,
        node: &Weak<Node>,
        graph: &Graph,
        r: std::result::Result<(), String>,
        took: Duration,
    ) {
        let _c = self.control.lock();
        *self.failover_duration.lock() = Some(took);
        match r {
            Ok(()) => {
                self.set_state(ReplicationState::Done);
                *self.error.lock() = None;
                if let Some(node) = node.upgrade() {
                    for role in [HIDDEN_ROLE, SECONDARY_ROLE] {
                        let _ = graph.detach_child(&node, &Role::Named(role.into()));
                    }
                }
                self.teardown(run, false);
                *self.run.write() = None;
            }
            Err(e) => {
                *self.error.lock() = Some(format!("failover commit failed: {e}"));
                self.set_state(ReplicationState::FailoverFailed);
            }
        }
    }

    /// Waits until no failover commit is running; false on timeout.
    pub(crate) fn wait_failover(&self, timeout: Duration) -> bool {
        let fo = self.failover.lock().clone();
        let Some(fo) = fo else { return true };
        let deadline = Instant::now() + timeout;
        let mut done = fo.done.lock();
        while !*done {
            if fo.cv.wait_until(&mut done, deadline).timed_out() {
                return *done;
            }
        }
        true
    }

    // ------------------------------------------------------------------ close

    fn close(&self) {
        match self.state() {
            ReplicationState::Running => {
                let _c = self.control.lock();
                if self.state() == ReplicationState::Running {
                    match self.mode {
                        ReplicationMode::Primary => self.set_state(ReplicationState::Done),
                        ReplicationMode::Secondary => {
                            let _ = self.stop_secondary(true);
                        }
                    }
                }
            }
            ReplicationState::Failover => {
                let fo = self.failover.lock().clone();
                if let Some(fo) = fo {
                    let _ = fo.job.cancel(true);
                    // Close may run with the graph lock held (node removal)
                    // and the commit's roll-back needs it: wait until the
                    // commit stopped copying; its roll-back follows.
                    wait_stopped(&fo.job, CLOSE_WAIT);
                }
            }
            _ => {}
        }
        if let Some(run) = self.run.write().take() {
            run.blocker.lock().take();
        }
        self.registration.lock().take();
        self.state_handle.lock().take();
    }
}

/// The `replication` block driver (a filter). Open it with
/// `{"driver": "replication", "mode": "primary"|"secondary", "top-id": ..., "file": ...}`
/// after [`crate::register`]; reach its operations with
/// [`crate::Replication::of`].
pub struct ReplicationDriver {
    pub(crate) shared: Arc<Shared>,
}

struct Member(Arc<Shared>);

impl ReplicationOps for Member {
    fn name(&self) -> String {
        self.0.name.clone()
    }
    fn start(&self, mode: ReplicationMode) -> std::result::Result<(), OpError> {
        self.0.start(mode).map_err(|e| Box::new(e) as OpError)
    }
    fn checkpoint(&self) -> std::result::Result<(), OpError> {
        self.0.checkpoint().map_err(|e| Box::new(e) as OpError)
    }
    fn get_error(&self) -> std::result::Result<(), OpError> {
        self.0.get_error().map_err(|e| Box::new(e) as OpError)
    }
    fn stop(&self, failover: bool) -> std::result::Result<(), OpError> {
        self.0.stop(failover).map_err(|e| Box::new(e) as OpError)
    }
}

impl ReplicationDriver {
    /// The factory registered by [`crate::register`].
    pub(crate) fn open(
        ctx: &mut OpenContext<'_>,
        registry: Option<&Registry>,
        states: Option<&StateRegistry>,
        jobs: &JobManager,
    ) -> BlockResult<Box<dyn Driver>> {
        let name = ctx.node_name().to_string();
        let o = ctx.options();
        let mode = match o.take_value("mode") {
            None => {
                return Err(BlockError::invalid(
                    "Missing the option mode (allowed values: 'primary', 'secondary')",
                ))
            }
            Some(serde_json::Value::String(s)) if s == "primary" => ReplicationMode::Primary,
            Some(serde_json::Value::String(s)) if s == "secondary" => ReplicationMode::Secondary,
            Some(v) => {
                return Err(BlockError::invalid(format!(
                    "The option mode's value should be primary or secondary, got {v}"
                )))
            }
        };
        let top_id = o.take_str("top-id")?;
        match (mode, &top_id) {
            (ReplicationMode::Primary, Some(_)) => {
                return Err(BlockError::invalid(
                    "The primary side does not support option top-id",
                ))
            }
            (ReplicationMode::Secondary, None) => {
                return Err(BlockError::invalid("Missing the option top-id"))
            }
            _ => {}
        }
        ctx.open_child("file", Role::File, true)?;
        let shared = Arc::new(Shared {
            name,
            mode,
            top_id,
            jobs: jobs.clone(),
            state: AtomicU8::new(ReplicationState::None.to_u8()),
            control: Mutex::new(()),
            run: RwLock::new(None),
            error: Mutex::new(None),
            self_node: Mutex::new(Weak::new()),
            bytes_forwarded: AtomicU64::new(0),
            forward_errors: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            last_checkpoint: Mutex::new(None),
            failover: Mutex::new(None),
            failover_duration: Mutex::new(None),
            registration: Mutex::new(None),
            state_handle: Mutex::new(None),
            invalid_flag: AtomicBool::new(false),
            invalid: Mutex::new(None),
        });
        if let Some(reg) = registry {
            *shared.registration.lock() = Some(reg.register(Arc::new(Member(shared.clone()))));
        }
        if let Some(states) = states {
            let h = states
                .register(
                    STATE_ID,
                    None,
                    STATE_VERSION,
                    Arc::new(EpochParticipant::new(&shared)),
                )
                .map_err(|e| {
                    BlockError::invalid(format!("cannot register checkpoint state: {e}"))
                })?;
            *shared.state_handle.lock() = Some(h);
        }
        Ok(Box::new(ReplicationDriver { shared }))
    }

    fn file(node: &Node) -> BlockResult<NodeRef> {
        node.file().ok_or_else(|| {
            BlockError::new(
                BlockErrorKind::NotFound,
                "the replication filter has no file child",
            )
            .with_node(node.name())
        })
    }

    /// Remembers our own node (the graph gives drivers `&Node` only): it is
    /// the parent of our file child with our address.
    fn learn_self(&self, node: &Node) {
        let mut slot = self.shared.self_node.lock();
        if slot.upgrade().is_some() {
            return;
        }
        for (_, child) in node.children() {
            for (p, _) in child.parents() {
                if std::ptr::eq(Arc::as_ptr(&p), node) {
                    *slot = Arc::downgrade(&p);
                    return;
                }
            }
        }
    }

    fn write_failover_failed(
        &self,
        node: &Node,
        run: &Running,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> BlockResult<()> {
        let graph = node
            .graph()
            .ok_or_else(|| eio(node, "the block graph is gone"))?;
        let mut done = 0u64;
        let len = buf.len() as u64;
        while done < len {
            let (alloc, n) = graph.is_allocated_above(
                &run.active,
                Some(&run.secondary),
                offset + done,
                len - done,
            )?;
            let target = if alloc { &run.active } else { &run.secondary };
            target.write(
                offset + done,
                &buf[done as usize..(done + n) as usize],
                flags,
            )?;
            done += n;
        }
        Ok(())
    }
}

impl Drop for ReplicationDriver {
    fn drop(&mut self) {
        self.shared.registration.lock().take();
        self.shared.state_handle.lock().take();
    }
}

impl Driver for ReplicationDriver {
    fn format_name(&self) -> &str {
        "replication"
    }

    fn length(&self, node: &Node) -> BlockResult<u64> {
        self.learn_self(node);
        Ok(Self::file(node)?.len())
    }

    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        let s = &self.shared;
        if s.mode == ReplicationMode::Primary {
            return Err(eio(
                node,
                "the primary replication filter only forwards writes",
            ));
        }
        if s.state() == ReplicationState::None {
            return Err(eio(node, "replication is not started"));
        }
        if s.invalid_flag.load(Ordering::Acquire) {
            return Err(buffers_eio(node));
        }
        let file = Self::file(node)?;
        match s.running() {
            Some(run) if run.backup_active.load(Ordering::Acquire) => {
                let _g = run.tracker.read_lock(offset, buf.len() as u64);
                file.read(offset, buf)
            }
            _ => file.read(offset, buf),
        }
    }

    fn write(&self, node: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> BlockResult<()> {
        let s = &self.shared;
        let state = s.state();
        match (s.mode, state) {
            (_, ReplicationState::None) => Err(eio(node, "replication is not started")),
            (ReplicationMode::Secondary, _) if s.invalid_flag.load(Ordering::Acquire) => {
                Err(buffers_eio(node))
            }
            (ReplicationMode::Primary, ReplicationState::Running) => {
                match Self::file(node).and_then(|f| f.write(offset, buf, flags)) {
                    Ok(()) => {
                        s.bytes_forwarded
                            .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        s.forward_errors.fetch_add(1, Ordering::Relaxed);
                        s.record_error(e.to_string());
                    }
                }
                Ok(())
            }
            (ReplicationMode::Primary, other) => Err(eio(
                node,
                &format!("the primary replication filter is in state {other}"),
            )),
            (ReplicationMode::Secondary, ReplicationState::FailoverFailed) => match s.running() {
                Some(run) => self.write_failover_failed(node, &run, offset, buf, flags),
                None => Self::file(node)?.write(offset, buf, flags),
            },
            (ReplicationMode::Secondary, _) => {
                let file = Self::file(node)?;
                match s.running() {
                    Some(run) => {
                        // The write may copy the rest of a cluster from the
                        // backing chain: read-lock it like a read.
                        let _g = run
                            .backup_active
                            .load(Ordering::Acquire)
                            .then(|| run.tracker.read_lock(offset, buf.len() as u64));
                        file.write(offset, buf, flags)
                    }
                    None => file.write(offset, buf, flags),
                }
            }
        }
    }

    fn flush(&self, node: &Node) -> BlockResult<()> {
        let s = &self.shared;
        match (s.mode, s.state()) {
            (ReplicationMode::Primary, ReplicationState::Running) => {
                if let Err(e) = Self::file(node).and_then(|f| f.flush()) {
                    s.forward_errors.fetch_add(1, Ordering::Relaxed);
                    s.record_error(e.to_string());
                }
                Ok(())
            }
            (ReplicationMode::Primary, _) => Ok(()),
            (ReplicationMode::Secondary, _) => Self::file(node)?.flush(),
        }
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn close(&self, node: &Node) {
        let _ = node;
        self.shared.close();
    }

    fn child_perms(&self, role: &Role, read_only: bool) -> PermPair {
        match role {
            Role::Named(_) => PermPair {
                perm: if read_only {
                    Perms::CONSISTENT_READ
                } else {
                    Perms::CONSISTENT_READ | Perms::WRITE
                },
                shared: Perms::ALL,
            },
            _ => block_graph::default_child_perms(true, role, read_only),
        }
    }

    fn accepts_child(&self, role: &Role) -> bool {
        matches!(role, Role::Named(n) if n == HIDDEN_ROLE || n == SECONDARY_ROLE)
    }
}

/// Waits (bounded) until `job` no longer runs: its work loop returned, only
/// its roll-back or clean-up may be left.
fn wait_stopped(job: &Job, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while matches!(
        job.status(),
        JobStatus::Created
            | JobStatus::Running
            | JobStatus::Paused
            | JobStatus::Ready
            | JobStatus::Standby
    ) && job.outcome().is_none()
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Shared {
    pub(crate) fn backup_job(&self) -> Option<Job> {
        self.running()
            .and_then(|r| r.backup.lock().as_ref().map(|b| b.job().clone()))
    }
}
