//! The mirror engine: `blockdev-mirror` and active commit (a mirror whose
//! target is the base of the source's backing chain).
//!
//! A `mirror-top` filter goes above the source and marks the chunks guest
//! writes touch in a roaring bitmap (after the write landed). The job copies
//! dirty chunks source -> target, several runs in flight (no chunk twice at
//! once), until nothing is dirty: then it is ready (`BLOCK_JOB_READY`). On
//! `complete` (or by itself with `auto_complete`) it drains the source's
//! graph, copies what is still dirty, flushes the target and, inside the same
//! drained section, makes every parent and backend of the source use the
//! target; the filter leaves. A soft cancel after ready does the same without
//! the pivot (target in sync, source in place). A cancel before ready or a
//! failure removes the filter and leaves the graph as it was.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use block_graph::{
    BlockOp, BlockerGuard, Driver, Error as GError, ErrorKind as GKind, Graph, Node, NodeRef,
    OpenContext, Role, WriteFlags, ZeroFlags,
};
use parking_lot::Mutex;
use roaring::RoaringTreemap;
use serde_json::json;

use crate::backup::register_drivers;
use crate::cbw::copy_range_op;
use crate::error::{ErrorKind, JobError, Result};
use crate::job::{ErrorAction, Job, JobContext, JobDriver, JobManager, JobOptions, JobType};

/// Driver name of the dirty-tracking filter.
pub const MIRROR_TOP_DRIVER: &str = "mirror-top";

/// Dirty chunks of a source, fed by the `mirror-top` filter.
pub struct DirtyMap {
    gran: u64,
    len: u64,
    bits: Mutex<RoaringTreemap>,
    job: Mutex<Option<Job>>,
}

impl std::fmt::Debug for DirtyMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyMap")
            .field("granularity", &self.gran)
            .field("dirty", &self.count())
            .finish()
    }
}

impl DirtyMap {
    fn new(len: u64, gran: u64) -> Self {
        DirtyMap {
            gran,
            len,
            bits: Mutex::new(RoaringTreemap::new()),
            job: Mutex::new(None),
        }
    }

    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        self.gran
    }

    /// Mark `[offset, offset+len)` dirty and wake the job.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.len {
            return;
        }
        let end = offset.saturating_add(len).min(self.len);
        self.bits
            .lock()
            .insert_range(offset / self.gran..end.div_ceil(self.gran));
        if let Some(j) = &*self.job.lock() {
            j.kick();
        }
    }

    fn mark_chunks(&self, r: Range<u64>) {
        self.bits.lock().insert_range(r);
    }

    /// Number of dirty chunks.
    pub fn count(&self) -> u64 {
        self.bits.lock().len()
    }

    /// Remove and return up to `max_runs` runs of at most `max_chunks` dirty chunks.
    fn take(&self, max_runs: usize, max_chunks: u64) -> Vec<Range<u64>> {
        let mut bits = self.bits.lock();
        let mut out: Vec<Range<u64>> = Vec::new();
        for v in bits.iter() {
            match out.last_mut() {
                Some(r) if r.end == v && r.end - r.start < max_chunks => r.end += 1,
                _ => {
                    if out.len() == max_runs {
                        break;
                    }
                    out.push(v..v + 1);
                }
            }
        }
        for r in &out {
            bits.remove_range(r.clone());
        }
        out
    }

    fn bytes(&self, r: &Range<u64>) -> Range<u64> {
        r.start * self.gran..(r.end * self.gran).min(self.len)
    }
}

/// The `mirror-top` filter: passes everything to its `file` child and marks
/// written ranges dirty. Options: `file`, `granularity` (default 64 KiB).
pub struct MirrorTop {
    dirty: Arc<DirtyMap>,
}

impl std::fmt::Debug for MirrorTop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorTop")
            .field("dirty", &self.dirty)
            .finish()
    }
}

impl MirrorTop {
    /// Opens from options (see the type docs).
    pub fn open(ctx: &mut OpenContext<'_>) -> block_graph::Result<Box<dyn Driver>> {
        let source = ctx
            .open_child("file", Role::File, true)?
            .ok_or_else(|| GError::invalid("mirror-top: option 'file' is required"))?;
        let gran = ctx.options().take_u64("granularity")?.unwrap_or(65536);
        if !gran.is_power_of_two() || !(512..=(64 << 20)).contains(&gran) {
            return Err(GError::invalid(format!(
                "mirror-top: option 'granularity' must be a power of two in 512..64 MiB, got {gran}"
            )));
        }
        Ok(Box::new(MirrorTop {
            dirty: Arc::new(DirtyMap::new(source.len(), gran)),
        }))
    }

    /// The dirty map shared with the job.
    pub fn dirty(&self) -> &Arc<DirtyMap> {
        &self.dirty
    }

    fn file(node: &Node) -> block_graph::Result<NodeRef> {
        node.file().ok_or_else(|| {
            GError::new(GKind::NotFound, "mirror-top has no file child").with_node(node.name())
        })
    }
}

impl Driver for MirrorTop {
    fn format_name(&self) -> &str {
        MIRROR_TOP_DRIVER
    }

    fn length(&self, node: &Node) -> block_graph::Result<u64> {
        Ok(Self::file(node)?.len())
    }

    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> block_graph::Result<()> {
        Self::file(node)?.read(offset, buf)
    }

    fn write(
        &self,
        node: &Node,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> block_graph::Result<()> {
        let r = Self::file(node)?.write(offset, buf, flags);
        // mark even on failure: part of the range may have changed
        self.dirty.mark(offset, buf.len() as u64);
        r
    }

    fn flush(&self, node: &Node) -> block_graph::Result<()> {
        Self::file(node)?.flush()
    }

    fn discard(&self, node: &Node, offset: u64, len: u64) -> block_graph::Result<()> {
        let r = Self::file(node)?.discard(offset, len);
        self.dirty.mark(offset, len);
        r
    }

    fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> block_graph::Result<()> {
        let r = Self::file(node)?.write_zeroes(offset, len, flags);
        self.dirty.mark(offset, len);
        r
    }

    fn is_filter(&self) -> bool {
        true
    }

    /// The filtered child may be re-attached at run time (rollback of a
    /// failed filter removal).
    fn accepts_child(&self, role: &Role) -> bool {
        *role == Role::File
    }
}

/// What a mirror copies at first (QEMU's `MirrorSyncMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MirrorSync {
    /// The whole disk as the chain reads it.
    #[default]
    Full,
    /// What the source's top layer allocates (the target shares the backing).
    Top,
    /// Only what the guest writes from now on.
    None,
}

impl MirrorSync {
    /// Parse QMP's spelling.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "full" => Ok(MirrorSync::Full),
            "top" => Ok(MirrorSync::Top),
            "none" => Ok(MirrorSync::None),
            o => Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!("sync '{o}': allowed values are full, top, none"),
            )),
        }
    }
}

/// Options of a mirror or active commit.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// Initial copy (ignored by active commit, which copies what is allocated above base).
    pub sync: MirrorSync,
    /// Dirty tracking and copy granularity (power of two), default 64 KiB.
    pub granularity: u64,
    /// Copy runs in flight at once (each up to 1 MiB), default 4.
    pub max_in_flight: usize,
    /// Complete by itself once converged (replication's failover).
    pub auto_complete: bool,
    /// Common job options.
    pub job: JobOptions,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            sync: MirrorSync::Full,
            granularity: 65536,
            max_in_flight: 4,
            auto_complete: false,
            job: JobOptions::default(),
        }
    }
}

/// A running mirror or active commit.
#[derive(Clone)]
pub struct MirrorJob {
    job: Job,
    dirty: Arc<DirtyMap>,
}

impl std::fmt::Debug for MirrorJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorJob").field("job", &self.job).finish()
    }
}

impl MirrorJob {
    /// `blockdev-mirror`: mirror `source` to `target` (same length) while the
    /// guest writes. Ready when converged; `complete` pivots every parent and
    /// backend of `source` to `target`.
    pub fn start(
        manager: &JobManager,
        graph: &Graph,
        source: &NodeRef,
        target: &NodeRef,
        opts: MirrorOptions,
    ) -> Result<MirrorJob> {
        if Arc::ptr_eq(source, target) || source.reaches(target) {
            return Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "mirror: target '{}' is part of the source '{}' (use active commit)",
                    target.name(),
                    source.name()
                ),
            ));
        }
        // a target that writes into the source (a quorum over it) dirties
        // every chunk it copies again: the job would copy for ever
        if crate::graph_util::writes_reach(target, source) {
            return Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "mirror: target '{}' writes into the source '{}'",
                    target.name(),
                    source.name()
                ),
            ));
        }
        start_engine(manager, graph, source, target, Mode::Mirror, opts)
    }

    /// Active commit (`block-commit` of the active layer): copy everything
    /// allocated in `active` and every layer above `base` into `base` while the
    /// guest writes to `active`; then `base` replaces `active` in every parent
    /// and backend (the intermediate layers drop out of the guest's path).
    /// With `opts.auto_complete` it completes by itself once converged.
    pub fn start_active_commit(
        manager: &JobManager,
        graph: &Graph,
        active: &NodeRef,
        base: &NodeRef,
        opts: MirrorOptions,
    ) -> Result<MirrorJob> {
        if Arc::ptr_eq(active, base) {
            return Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!("commit: top '{}' and base are the same node", active.name()),
            ));
        }
        if !graph
            .backing_chain(active)
            .iter()
            .any(|n| Arc::ptr_eq(n, base))
        {
            return Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "commit: '{}' is not in the backing chain of '{}'",
                    base.name(),
                    active.name()
                ),
            ));
        }
        start_engine(
            manager,
            graph,
            active,
            base,
            Mode::ActiveCommit,
            MirrorOptions {
                sync: MirrorSync::Full,
                ..opts
            },
        )
    }

    /// The job handle.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// Chunks currently dirty.
    pub fn dirty_count(&self) -> u64 {
        self.dirty.count()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Mirror,
    ActiveCommit,
}

fn start_engine(
    manager: &JobManager,
    graph: &Graph,
    source: &NodeRef,
    target: &NodeRef,
    mode: Mode,
    opts: MirrorOptions,
) -> Result<MirrorJob> {
    if source.len() != target.len() {
        return Err(JobError::new(
            ErrorKind::InvalidArgument,
            format!(
                "source '{}' has length {} but target '{}' has length {}",
                source.name(),
                source.len(),
                target.name(),
                target.len()
            ),
        ));
    }
    if !opts.granularity.is_power_of_two() || !(512..=(64 << 20)).contains(&opts.granularity) {
        return Err(JobError::new(
            ErrorKind::InvalidArgument,
            format!(
                "granularity must be a power of two in 512..64 MiB, got {}",
                opts.granularity
            ),
        ));
    }
    // every op on source, target and (active commit) the nodes between,
    // until the job ends; dropped on error
    let (job_type, between) = match mode {
        Mode::Mirror => (JobType::Mirror, Vec::new()),
        Mode::ActiveCommit => (
            JobType::Commit,
            crate::blockers::intermediates(graph, source, Some(target)),
        ),
    };
    let (src_op, tgt_op) = match mode {
        Mode::Mirror => (BlockOp::MirrorSource, BlockOp::MirrorTarget),
        Mode::ActiveCommit => (BlockOp::CommitSource, BlockOp::CommitTarget),
    };
    let mut uses = vec![(source, src_op)];
    uses.extend(between.iter().map(|n| (n, tgt_op)));
    uses.push((target, tgt_op));
    let blockers = crate::blockers::claim_nodes(job_type, &uses)?;
    let ro_queue = crate::graph_util::read_only_data_nodes(target);
    let restore_ro = !ro_queue.is_empty();
    if restore_ro {
        crate::graph_util::set_read_only(graph, &ro_queue, false)?;
    }
    let undo_ro = |graph: &Graph| {
        if restore_ro {
            let _ = crate::graph_util::set_read_only(graph, &ro_queue, true);
        }
    };
    register_drivers(graph);
    let filter = match graph.add_node(&json!({
        "driver": MIRROR_TOP_DRIVER,
        "file": source.name(),
        "granularity": opts.granularity,
    })) {
        Ok(f) => f,
        Err(e) => {
            undo_ro(graph);
            return Err(e.into());
        }
    };
    let Some(dirty) = filter.driver_as::<MirrorTop>().map(|d| d.dirty().clone()) else {
        let _ = graph.remove_node(filter.name());
        undo_ro(graph);
        return Err(JobError::new(
            ErrorKind::Graph,
            format!("driver '{MIRROR_TOP_DRIVER}' is registered to something else"),
        ));
    };
    if let Err(e) = graph.insert_filter_above(source, &filter) {
        let _ = graph.remove_node(filter.name());
        undo_ro(graph);
        return Err(e.into());
    }
    let drv = MirrorDriver {
        graph: graph.clone(),
        source: source.clone(),
        target: target.clone(),
        filter: Some(filter),
        dirty: dirty.clone(),
        mode,
        sync: opts.sync,
        auto_complete: opts.auto_complete,
        max_in_flight: opts.max_in_flight.max(1),
        restore_ro,
        ro_queue: ro_queue.clone(),
        pivoted: false,
        _blockers: blockers,
    };
    let job = manager.start(Box::new(drv), opts.job)?;
    *dirty.job.lock() = Some(job.clone());
    job.kick();
    Ok(MirrorJob { job, dirty })
}

/// Dirty bytes at or below which the job counts as converged (ready).
const CONVERGED_BYTES: u64 = 1 << 20;

/// Passes without a new minimum of dirty chunks after which the job counts
/// as converged.
const STALL_PASSES: u32 = 16;

/// Largest run copied by one request, in bytes.
const MAX_RUN_BYTES: u64 = 1 << 20;

struct MirrorDriver {
    graph: Graph,
    source: NodeRef,
    target: NodeRef,
    filter: Option<NodeRef>,
    dirty: Arc<DirtyMap>,
    mode: Mode,
    sync: MirrorSync,
    auto_complete: bool,
    max_in_flight: usize,
    restore_ro: bool,
    ro_queue: Vec<NodeRef>,
    pivoted: bool,
    _blockers: Vec<BlockerGuard>,
}

impl MirrorDriver {
    fn initial_dirty(&self) -> Result<()> {
        let len = self.source.len();
        let gran = self.dirty.granularity();
        let nb = len.div_ceil(gran);
        let base: Option<NodeRef> = match (self.mode, self.sync) {
            (Mode::ActiveCommit, _) => Some(self.target.clone()),
            (Mode::Mirror, MirrorSync::Full) => {
                self.dirty.mark_chunks(0..nb);
                return Ok(());
            }
            (Mode::Mirror, MirrorSync::None) => return Ok(()),
            (Mode::Mirror, MirrorSync::Top) => self.source.backing(),
        };
        let mut off = 0;
        while off < len {
            let (alloc, run) =
                self.graph
                    .is_allocated_above(&self.source, base.as_ref(), off, len - off)?;
            let run = run.max(1);
            if alloc {
                self.dirty
                    .mark_chunks(off / gran..(off + run).min(len).div_ceil(gran));
            }
            off += run;
        }
        Ok(())
    }

    /// Copy the given chunk runs in parallel; failed runs are dirty again.
    /// Returns the first failure.
    /// With `parallel == false` everything runs on this thread (inside a
    /// drained section only the draining thread's requests pass).
    fn copy_runs(
        &self,
        runs: &[Range<u64>],
        parallel: bool,
    ) -> std::result::Result<u64, (crate::job::IoOperation, block_graph::Error)> {
        let src = &self.source;
        let dst = &self.target;
        let results: Vec<_> = if !parallel {
            runs.iter()
                .map(|r| copy_range_op(src, dst, self.dirty.bytes(r)))
                .collect()
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = runs
                    .iter()
                    .skip(1)
                    .map(|r| {
                        let b = self.dirty.bytes(r);
                        s.spawn(move || copy_range_op(src, dst, b))
                    })
                    .collect();
                let mut out = vec![copy_range_op(src, dst, self.dirty.bytes(&runs[0]))];
                for h in handles {
                    out.push(h.join().unwrap_or_else(|_| {
                        Err((
                            crate::job::IoOperation::Write,
                            GError::new(GKind::Io, "copy thread panicked"),
                        ))
                    }));
                }
                out
            })
        };
        let mut first_err = None;
        let mut bytes = 0;
        for (r, res) in runs.iter().zip(results) {
            match res {
                Ok(()) => {
                    let b = self.dirty.bytes(r);
                    bytes += b.end - b.start;
                }
                Err(e) => {
                    self.dirty.mark_chunks(r.clone());
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(bytes),
        }
    }

    /// Chunks per run: up to 1 MiB, and at most a tenth of a second's worth
    /// at the speed limit so throttling stays smooth.
    fn max_chunks(&self, speed: u64) -> u64 {
        let mut bytes = MAX_RUN_BYTES;
        if speed > 0 {
            bytes = bytes.min(speed / 10 / self.max_in_flight as u64);
        }
        (bytes / self.dirty.granularity()).max(1)
    }
}

impl JobDriver for MirrorDriver {
    fn job_type(&self) -> JobType {
        match self.mode {
            Mode::Mirror => JobType::Mirror,
            Mode::ActiveCommit => JobType::Commit,
        }
    }

    fn drained_nodes(&self) -> Option<(Graph, Vec<NodeRef>)> {
        Some((
            self.graph.clone(),
            vec![self.source.clone(), self.target.clone()],
        ))
    }

    fn run(&mut self, ctx: &JobContext) -> Result<()> {
        self.initial_dirty()?;
        let gran = self.dirty.granularity();
        let mut done: u64 = 0;
        let mut copied_any = false;
        // the guest may dirty chunks as fast as we copy them: once the dirty
        // count stops falling for a while, the rest is left to the drained
        // final copy (bounded by the guest's working set)
        let mut min_dirty = u64::MAX;
        let mut stalled = 0u32;
        loop {
            ctx.pause_point();
            if ctx.is_cancelled() {
                return Ok(());
            }
            let dirty = self.dirty.count();
            ctx.set_len(done + dirty * gran);
            // Converged: what is left is small enough to copy inside the
            // final drained section without holding the guest for long.
            if dirty < min_dirty {
                min_dirty = dirty;
                stalled = 0;
            } else {
                stalled += 1;
            }
            if dirty == 0
                || (copied_any && (dirty * gran <= CONVERGED_BYTES || stalled >= STALL_PASSES))
            {
                ctx.set_ready();
                if ctx.should_complete() || self.auto_complete || ctx.cancel_requested() {
                    return Ok(());
                }
                if dirty == 0 {
                    ctx.sleep(Duration::from_millis(100));
                    continue;
                }
            }
            let runs = self
                .dirty
                .take(self.max_in_flight, self.max_chunks(ctx.speed()));
            if runs.is_empty() {
                continue;
            }
            let bytes: u64 = runs
                .iter()
                .map(|r| {
                    let b = self.dirty.bytes(r);
                    b.end - b.start
                })
                .sum();
            ctx.throttle(bytes);
            match self.copy_runs(&runs, true) {
                Ok(n) => {
                    done += n;
                    copied_any = true;
                    ctx.set_progress(done);
                }
                Err((op, e)) => {
                    let je = JobError::from(e);
                    match ctx.io_error(op, &je) {
                        ErrorAction::Report => return Err(je),
                        ErrorAction::Ignore | ErrorAction::Stop => {}
                    }
                }
            }
        }
    }

    fn prepare(&mut self, ctx: &JobContext) -> Result<()> {
        let Some(filter) = self.filter.clone() else {
            return Ok(());
        };
        let pivot = !ctx.cancel_requested();
        let _drain = self.graph.drain(&[filter.clone(), self.target.clone()]);
        // guest writes are held now; copy what they left dirty
        loop {
            let runs = self.dirty.take(self.max_in_flight, self.max_chunks(0));
            if runs.is_empty() {
                break;
            }
            let n = self
                .copy_runs(&runs, false)
                .map_err(|(_, e)| JobError::from(e))?;
            ctx.add_progress(n);
        }
        self.target.flush()?;
        if pivot {
            self.graph.replace_node(&filter, &self.target)?;
            self.pivoted = true;
        }
        crate::graph_util::take_out_filter(&self.graph, &filter)?;
        self.filter = None;
        Ok(())
    }

    fn abort(&mut self, _ctx: &JobContext) {
        if let Some(f) = self.filter.take() {
            let _ = crate::graph_util::take_out_filter(&self.graph, &f);
        }
        if self.restore_ro && !self.pivoted {
            let _ = crate::graph_util::set_read_only(&self.graph, &self.ro_queue, true);
            self.restore_ro = false;
        }
    }

    fn clean(&mut self, _ctx: &JobContext) {
        *self.dirty.job.lock() = None;
        if let Some(f) = self.filter.take() {
            let _ = crate::graph_util::take_out_filter(&self.graph, &f);
        }
    }
}

impl Drop for MirrorDriver {
    fn drop(&mut self) {
        if let Some(f) = self.filter.take() {
            let _ = crate::graph_util::take_out_filter(&self.graph, &f);
        }
    }
}
