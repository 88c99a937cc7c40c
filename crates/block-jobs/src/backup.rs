//! The backup job (`blockdev-backup`, replication's sync=none backup).
//!
//! A `copy-before-write` filter node goes above the source; the filter copies
//! old data to the target before guest writes land. sync=none copies nothing
//! else and runs until cancelled (checkpoints re-arm it); sync=full and
//! sync=top also copy every cluster (every cluster allocated in the source's
//! top layer) in the background and then complete.

use std::sync::Arc;
use std::time::Duration;

use block_graph::{BlockOp, BlockerGuard, Graph, NodeRef};
use serde_json::json;

use crate::cbw::{copy_range_op, CopyBeforeWrite, CBW_DRIVER};
use crate::copy::{CopyTracker, ReadGuard};
use crate::error::{ErrorKind, JobError, Result};
use crate::job::{ErrorAction, Job, JobContext, JobDriver, JobManager, JobOptions, JobType};

/// What a backup copies besides the copy-before-write of guest writes
/// (QEMU's `MirrorSyncMode` for backup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackupSync {
    /// Only copy-before-write; runs until cancelled (replication).
    #[default]
    None,
    /// Every cluster.
    Full,
    /// Clusters allocated in the source's top layer.
    Top,
}

impl BackupSync {
    /// Parse QMP's spelling.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(BackupSync::None),
            "full" => Ok(BackupSync::Full),
            "top" => Ok(BackupSync::Top),
            o => Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!("sync '{o}': allowed values are none, full, top"),
            )),
        }
    }
}

/// Options of a backup job.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Sync mode.
    pub sync: BackupSync,
    /// Copy unit in bytes; default 64 KiB. Pass the target's cluster size
    /// when it is larger (block-graph has no generic cluster-size query).
    pub cluster_size: Option<u64>,
    /// Common job options (id, speed, error policies).
    pub job: JobOptions,
}

/// Registers this crate's filter drivers (`copy-before-write`, `mirror-top`)
/// on a graph. Idempotent.
pub fn register_drivers(graph: &Graph) {
    graph.register_driver(CBW_DRIVER, CopyBeforeWrite::open);
    graph.register_driver(
        crate::mirror::MIRROR_TOP_DRIVER,
        crate::mirror::MirrorTop::open,
    );
}

/// A running backup job: the job handle plus the copy-before-write state that
/// replication needs (checkpoint, read lock).
#[derive(Clone)]
pub struct BackupJob {
    job: Job,
    tracker: Arc<CopyTracker>,
    filter: NodeRef,
}

impl std::fmt::Debug for BackupJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupJob")
            .field("job", &self.job)
            .field("filter", &self.filter.name())
            .finish()
    }
}

impl BackupJob {
    /// Start a backup of `source` into `target` (same length). Inserts the
    /// copy-before-write filter above `source` (drained) before returning, so
    /// every later write to `source` through its parents and backends is
    /// preserved in `target`.
    pub fn start(
        manager: &JobManager,
        graph: &Graph,
        source: &NodeRef,
        target: &NodeRef,
        opts: BackupOptions,
    ) -> Result<BackupJob> {
        if source.len() != target.len() {
            return Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "backup: source '{}' has length {} but target '{}' has length {}",
                    source.name(),
                    source.len(),
                    target.name(),
                    target.len()
                ),
            ));
        }
        if Arc::ptr_eq(source, target) {
            return Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "backup: source and target are the same node '{}'",
                    source.name()
                ),
            ));
        }
        let cs = opts.cluster_size.unwrap_or(65536).max(65536);
        if !cs.is_power_of_two() {
            return Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!("backup: cluster size {cs} is not a power of two"),
            ));
        }
        // every op on both nodes, until the job ends (dropped on error)
        let blockers = crate::blockers::claim_nodes(
            JobType::Backup,
            &[
                (source, BlockOp::BackupSource),
                (target, BlockOp::BackupTarget),
            ],
        )?;
        register_drivers(graph);
        let filter = graph.add_node(&json!({
            "driver": CBW_DRIVER,
            "file": source.name(),
            "target": target.name(),
            "cluster-size": cs,
        }))?;
        let tracker = match filter.driver_as::<CopyBeforeWrite>() {
            Some(d) => d.tracker().clone(),
            None => {
                let _ = graph.remove_node(filter.name());
                return Err(JobError::new(
                    ErrorKind::Graph,
                    format!("driver '{CBW_DRIVER}' is registered to something else"),
                ));
            }
        };
        if let Err(e) = graph.insert_filter_above(source, &filter) {
            let _ = graph.remove_node(filter.name());
            return Err(e.into());
        }
        let drv = BackupDriver {
            graph: graph.clone(),
            filter: Some(filter.clone()),
            source: source.clone(),
            target: target.clone(),
            tracker: tracker.clone(),
            sync: opts.sync,
            _blockers: blockers,
        };
        // on error the unrun driver is dropped, and its Drop removes the filter
        let job = manager.start(Box::new(drv), opts.job)?;
        Ok(BackupJob {
            job,
            tracker,
            filter,
        })
    }

    /// The job handle (cancel, pause, wait, events).
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Re-arm every cluster: after this, the next write to any cluster copies it
    /// again. Waits for copies in flight. Cost O(clusters copied since the last
    /// checkpoint). Call with the source quiescent (guests paused), as
    /// replication does.
    pub fn checkpoint(&self) -> Result<()> {
        if self.job.outcome().is_some() {
            return Err(JobError::new(
                ErrorKind::InvalidState,
                "backup job has already ended",
            ));
        }
        self.tracker.checkpoint();
        Ok(())
    }

    /// Wait for copy-before-write requests overlapping `[offset, offset+len)`
    /// and hold off new ones while the guard lives. Replication's secondary
    /// reads of active -> hidden -> secondary take this.
    pub fn read_lock(&self, offset: u64, len: u64) -> ReadGuard<'_> {
        self.tracker.read_lock(offset, len)
    }

    /// The copy state (counters, cluster size).
    pub fn tracker(&self) -> &Arc<CopyTracker> {
        &self.tracker
    }

    /// The copy-before-write filter node (gone from the graph once the job ended).
    pub fn filter_node(&self) -> &NodeRef {
        &self.filter
    }
}

struct BackupDriver {
    graph: Graph,
    filter: Option<NodeRef>,
    source: NodeRef,
    target: NodeRef,
    tracker: Arc<CopyTracker>,
    sync: BackupSync,
    _blockers: Vec<BlockerGuard>,
}

impl BackupDriver {
    fn progress(&self, ctx: &JobContext) {
        let cs = self.tracker.cluster_size();
        ctx.set_progress((self.tracker.total_copies() * cs).min(u64::MAX / 2));
    }

    fn run_none(&mut self, ctx: &JobContext) -> Result<()> {
        loop {
            ctx.pause_point();
            if ctx.cancel_requested() {
                return Ok(());
            }
            let cs = self.tracker.cluster_size();
            let done = self.tracker.total_copies() * cs;
            ctx.set_len(done);
            ctx.set_progress(done);
            ctx.sleep(Duration::from_millis(200));
        }
    }

    fn run_copy(&mut self, ctx: &JobContext) -> Result<()> {
        let nb = self.tracker.nb_clusters();
        let cs = self.tracker.cluster_size();
        ctx.set_len(self.source.len());
        if self.sync == BackupSync::Top {
            // skip whole clusters the source's top layer does not allocate;
            // cost follows the number of extents
            let len = self.source.len();
            let backing = self.source.backing();
            let mut off = 0;
            while off < len {
                let (alloc, run) = self.graph.is_allocated_above(
                    &self.source,
                    backing.as_ref(),
                    off,
                    len - off,
                )?;
                let end = off + run.max(1);
                if !alloc {
                    let c0 = off.div_ceil(cs);
                    let c1 = if end >= len { nb } else { end / cs };
                    if c1 > c0 {
                        self.tracker.mark_skipped(c0..c1);
                    }
                }
                off = end;
            }
        }
        let mut from = 0;
        loop {
            ctx.pause_point();
            if ctx.cancel_requested() {
                return Ok(());
            }
            self.progress(ctx);
            // Wait for the speed limit before claiming, never while holding
            // a claim: the wait is a pause point, and a guest write to a
            // claimed cluster waits (copy-before-write) for the claim while
            // in flight. Parked by a drained section with a claim held, the
            // job would keep that write, and so the section, waiting for ever.
            ctx.throttle(0);
            if ctx.cancel_requested() {
                return Ok(());
            }
            let Some(r) = self.tracker.claim_next(from, nb, 16) else {
                if self.tracker.remaining() == 0 {
                    break;
                }
                // clusters claimed by guest writes are still in flight
                from = 0;
                ctx.sleep(Duration::from_millis(1));
                continue;
            };
            let bytes = self.tracker.byte_range(&r);
            // no pause point from the claim to finish_claim
            ctx.account(bytes.end - bytes.start);
            match copy_range_op(&self.source, &self.target, bytes.clone()) {
                Ok(()) => {
                    self.tracker.finish_claim(r.clone(), true);
                    from = r.end;
                }
                Err((op, e)) => {
                    self.tracker.finish_claim(r.clone(), false);
                    let je = JobError::from(e);
                    match ctx.io_error(op, &je) {
                        ErrorAction::Report => return Err(je),
                        ErrorAction::Ignore | ErrorAction::Stop => from = r.start,
                    }
                }
            }
        }
        self.progress(ctx);
        Ok(())
    }
}

impl JobDriver for BackupDriver {
    fn job_type(&self) -> JobType {
        JobType::Backup
    }

    fn drained_nodes(&self) -> Option<(Graph, Vec<NodeRef>)> {
        Some((
            self.graph.clone(),
            vec![self.source.clone(), self.target.clone()],
        ))
    }

    fn run(&mut self, ctx: &JobContext) -> Result<()> {
        match self.sync {
            BackupSync::None => self.run_none(ctx),
            BackupSync::Full | BackupSync::Top => self.run_copy(ctx),
        }
    }

    fn prepare(&mut self, _ctx: &JobContext) -> Result<()> {
        self.target.flush()?;
        Ok(())
    }

    fn clean(&mut self, _ctx: &JobContext) {
        if let Some(f) = self.filter.take() {
            // drained inside remove_filter; copies in flight finish first
            let _ = crate::graph_util::take_out_filter(&self.graph, &f);
        }
    }
}

impl Drop for BackupDriver {
    fn drop(&mut self) {
        if let Some(f) = self.filter.take() {
            let _ = crate::graph_util::take_out_filter(&self.graph, &f);
        }
    }
}
