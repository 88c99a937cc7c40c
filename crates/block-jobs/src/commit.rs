//! Plain commit (`block-commit` of an intermediate range top..base) and stream
//! (`block-stream`: copy the backing chain into the top, then drop it).
//!
//! Plain commit: the layers from `top` down to (excluding) `base` are
//! read-only backing files, so their allocated data is copied into `base`
//! without dirty tracking; then, in a drained section, the overlay above `top`
//! takes `base` as its backing (the intermediate layers drop out) and its
//! image records the new backing file name (`backing_file_str`).
//!
//! Stream: every run not allocated in `top` but allocated between `top` and
//! `base` is read through `top` and written into `top` under a serialising
//! guard (so a concurrent guest write to the same range cannot be overwritten
//! with older data); then `top`'s backing becomes `base` (or nothing).

use std::collections::VecDeque;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use block_graph::{
    BlockOp, BlockerGuard, ErrorKind as GKind, Graph, Mapping, NodeRef, Role, WriteFlags, ZeroFlags,
};

use crate::error::{ErrorKind, JobError, Result};
use crate::job::{
    ErrorAction, IoOperation, Job, JobContext, JobDriver, JobManager, JobOptions, JobType,
};

/// Largest copy request.
const CHUNK: u64 = 1 << 20;

/// Copy requests in flight at once (plain commit): one worker thread each.
const IN_FLIGHT: usize = 4;

type CopyResult = std::result::Result<(), (IoOperation, block_graph::Error)>;

/// Copy one chunk `src -> dst` through the worker's own buffer; all-zero
/// data becomes a zero write (the base stays sparse where it can).
fn copy_chunk(src: &NodeRef, dst: &NodeRef, (off, n): (u64, u64), buf: &mut [u8]) -> CopyResult {
    let b = &mut buf[..n as usize];
    src.read(off, b).map_err(|e| (IoOperation::Read, e))?;
    let w = if b.iter().all(|&x| x == 0) {
        dst.write_zeroes(off, n, ZeroFlags::default())
    } else {
        dst.write(off, b, WriteFlags::default())
    };
    w.map_err(|e| (IoOperation::Write, e))
}

/// Copy `chunks` from `src` to `dst` with [`IN_FLIGHT`] long-lived worker
/// threads fed one chunk at a time, so reads and writes of different chunks
/// overlap with no barrier between batches (the earlier version copied
/// batches of 8 on freshly spawned threads and waited for the slowest).
///
/// The job thread dispatches, throttles and applies the error policies. It
/// waits until nothing is in flight before it parks at a pause point, before
/// a throttle that would sleep, and before handling failed chunks (which go
/// back to the queue for a retry on ignore/stop): a paused job, or one in a
/// drained section, has no copy request in flight.
fn copy_pipelined(
    ctx: &JobContext,
    src: &NodeRef,
    dst: &NodeRef,
    mut chunks: VecDeque<(u64, u64)>,
) -> Result<()> {
    let (work_tx, work_rx) = crossbeam_channel::bounded::<(u64, u64)>(0);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<((u64, u64), CopyResult)>();
    std::thread::scope(|s| {
        for _ in 0..IN_FLIGHT {
            let (rx, tx) = (work_rx.clone(), done_tx.clone());
            s.spawn(move || {
                let mut buf = vec![0u8; CHUNK as usize];
                for c in rx.iter() {
                    let r = copy_chunk(src, dst, c, &mut buf);
                    if tx.send((c, r)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let res = dispatch(ctx, &work_tx, &done_rx, &mut chunks);
        // workers end when the work channel closes (after their current chunk)
        drop(work_tx);
        res
    })
}

fn dispatch(
    ctx: &JobContext,
    work_tx: &Sender<(u64, u64)>,
    done_rx: &Receiver<((u64, u64), CopyResult)>,
    chunks: &mut VecDeque<(u64, u64)>,
) -> Result<()> {
    let mut in_flight = 0usize;
    let mut failed: Vec<((u64, u64), IoOperation, block_graph::Error)> = Vec::new();
    // The first copy runs alone: qcow-lite switches an image reopened
    // read-write to its writable state on the first write, and concurrent
    // first writes can still see the read-only image.
    let mut first = true;
    let recv_one = |in_flight: &mut usize, failed: &mut Vec<_>| -> Result<()> {
        let (c, r): ((u64, u64), CopyResult) = done_rx.recv().map_err(|_| {
            JobError::from(block_graph::Error::new(
                GKind::Io,
                "commit copy worker ended",
            ))
        })?;
        *in_flight -= 1;
        match r {
            Ok(()) => ctx.add_progress(c.1),
            Err((op, e)) => failed.push((c, op, e)),
        }
        Ok(())
    };
    loop {
        // quiesce before parking, sleeping for the limit or handling errors
        let quiesce = ctx.pause_requested() || ctx.throttle_would_wait() || !failed.is_empty();
        if quiesce {
            while in_flight > 0 {
                recv_one(&mut in_flight, &mut failed)?;
            }
        }
        for (c, op, e) in failed.drain(..) {
            let je = JobError::from(e);
            match ctx.io_error(op, &je) {
                ErrorAction::Report => return Err(je),
                ErrorAction::Ignore | ErrorAction::Stop => chunks.push_back(c),
            }
        }
        ctx.pause_point();
        if ctx.is_cancelled() {
            while in_flight > 0 {
                recv_one(&mut in_flight, &mut failed)?;
            }
            return Ok(());
        }
        if chunks.is_empty() && in_flight == 0 {
            return Ok(());
        }
        if in_flight < IN_FLIGHT && !chunks.is_empty() {
            let c = chunks.pop_front().unwrap_or_default();
            ctx.throttle(c.1);
            if ctx.is_cancelled() {
                chunks.push_front(c);
                continue;
            }
            if work_tx.send(c).is_err() {
                return Err(JobError::from(block_graph::Error::new(
                    GKind::Io,
                    "commit copy workers ended",
                )));
            }
            in_flight += 1;
            if first {
                recv_one(&mut in_flight, &mut failed)?;
                first = !failed.is_empty();
            }
        } else {
            recv_one(&mut in_flight, &mut failed)?;
        }
    }
}

/// Options of a plain commit or a stream.
#[derive(Debug, Clone, Default)]
pub struct CommitOptions {
    /// Backing file name to record in the overlay above `top` (commit) or in
    /// `top` (stream). Default: `base`'s file name, or its node name when it
    /// has none. A driver that cannot record a name fails the job only when
    /// this was given explicitly.
    pub backing_file: Option<String>,
    /// Common job options.
    pub job: JobOptions,
}

/// The overlay of `top`: the node whose backing child is `top`.
fn overlay_of(top: &NodeRef) -> Option<NodeRef> {
    top.parents()
        .into_iter()
        .find(|(_, r)| *r == Role::Backing)
        .map(|(p, _)| p)
}

fn in_chain_below(graph: &Graph, top: &NodeRef, base: &NodeRef) -> bool {
    graph
        .backing_chain(top)
        .iter()
        .skip(1)
        .any(|n| std::sync::Arc::ptr_eq(n, base))
}

fn backing_name(base: Option<&NodeRef>, given: &Option<String>) -> Option<String> {
    given
        .clone()
        .or_else(|| base.map(|b| b.filename().unwrap_or_else(|| b.name().to_string())))
}

/// Record the backing file name in `node`'s image. NotSupported is fine when
/// the name was not asked for explicitly (in-memory images record nothing).
fn record_backing(node: &NodeRef, base: Option<&NodeRef>, opts: &CommitOptions) -> Result<()> {
    let name = backing_name(base, &opts.backing_file);
    let fmt = base.map(|b| b.driver_name().to_string());
    match node
        .driver()
        .change_backing_file(node, name.as_deref(), fmt.as_deref())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == GKind::NotSupported && opts.backing_file.is_none() => Ok(()),
        Err(e) => Err(JobError::from(e.or_node(node.name()))),
    }
}

/// Plain commit job.
#[derive(Debug, Clone)]
pub struct CommitJob {
    job: Job,
}

impl CommitJob {
    /// `block-commit` of `top` (not the active layer) into `base`, a node
    /// below `top` in its backing chain.
    pub fn start(
        manager: &JobManager,
        graph: &Graph,
        top: &NodeRef,
        base: &NodeRef,
        opts: CommitOptions,
    ) -> Result<CommitJob> {
        if std::sync::Arc::ptr_eq(top, base) {
            return Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!("commit: top '{}' and base are the same node", top.name()),
            ));
        }
        if !in_chain_below(graph, top, base) {
            return Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "commit: '{}' is not in the backing chain of '{}'",
                    base.name(),
                    top.name()
                ),
            ));
        }
        let Some(overlay) = overlay_of(top) else {
            return Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "commit: '{}' is the active layer (no overlay): use an active commit",
                    top.name()
                ),
            ));
        };
        if !overlay.driver().accepts_child(&Role::Backing) {
            return Err(JobError::new(
                ErrorKind::Unsupported,
                format!(
                    "commit: overlay '{}' (driver '{}') cannot change its backing at run time",
                    overlay.name(),
                    overlay.driver_name()
                ),
            ));
        }
        // every op on top, the nodes between and base, until the job ends
        let between = crate::blockers::intermediates(graph, top, Some(base));
        let mut uses = vec![(top, BlockOp::CommitSource)];
        uses.extend(between.iter().map(|n| (n, BlockOp::CommitTarget)));
        uses.push((base, BlockOp::CommitTarget));
        let blockers = crate::blockers::claim_nodes(JobType::Commit, &uses)?;
        let ro_queue = crate::graph_util::read_only_data_nodes(base);
        let restore_ro = !ro_queue.is_empty();
        if restore_ro {
            crate::graph_util::set_read_only(graph, &ro_queue, false)?;
        }
        let drv = CommitDriver {
            graph: graph.clone(),
            top: top.clone(),
            base: base.clone(),
            overlay,
            opts: opts.clone(),
            restore_ro,
            ro_queue,
            done: false,
            _blockers: blockers,
        };
        let job = manager.start(Box::new(drv), opts.job)?;
        Ok(CommitJob { job })
    }

    /// The job handle.
    pub fn job(&self) -> &Job {
        &self.job
    }
}

struct CommitDriver {
    graph: Graph,
    top: NodeRef,
    base: NodeRef,
    overlay: NodeRef,
    opts: CommitOptions,
    restore_ro: bool,
    ro_queue: Vec<NodeRef>,
    done: bool,
    _blockers: Vec<BlockerGuard>,
}

impl JobDriver for CommitDriver {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }

    fn drained_nodes(&self) -> Option<(Graph, Vec<NodeRef>)> {
        Some((
            self.graph.clone(),
            vec![self.top.clone(), self.base.clone()],
        ))
    }

    fn run(&mut self, ctx: &JobContext) -> Result<()> {
        let len = self.top.len().min(self.base.len());
        // length to copy: everything allocated above base
        let mut runs = Vec::new();
        let mut off = 0;
        while off < len {
            // the scan of a large sparse chain may take a while: a drained
            // section or a pause must not wait for its end
            ctx.pause_point();
            if ctx.is_cancelled() {
                return Ok(());
            }
            let (alloc, run) =
                self.graph
                    .is_allocated_above(&self.top, Some(&self.base), off, len - off)?;
            let run = run.max(1);
            if alloc {
                runs.push((off, run));
            }
            off += run;
        }
        ctx.set_len(runs.iter().map(|r| r.1).sum());
        // chunks of at most CHUNK bytes
        let chunks: VecDeque<(u64, u64)> = runs
            .iter()
            .flat_map(|&(off, run)| {
                (0..run.div_ceil(CHUNK)).map(move |i| {
                    let o = off + i * CHUNK;
                    (o, CHUNK.min(off + run - o))
                })
            })
            .collect();
        copy_pipelined(ctx, &self.top, &self.base, chunks)?;
        self.base.flush()?;
        Ok(())
    }

    fn prepare(&mut self, _ctx: &JobContext) -> Result<()> {
        let _drained = self.graph.drain(&[self.overlay.clone(), self.base.clone()]);
        self.graph
            .attach_child(&self.overlay, Role::Backing, &self.base)?;
        if let Err(e) = record_backing(&self.overlay, Some(&self.base), &self.opts) {
            // put the old backing back: the graph stays as it was
            let _ = self
                .graph
                .attach_child(&self.overlay, Role::Backing, &self.top);
            return Err(e);
        }
        self.done = true;
        Ok(())
    }

    fn clean(&mut self, _ctx: &JobContext) {
        if self.restore_ro && !self.done {
            let _ = crate::graph_util::set_read_only(&self.graph, &self.ro_queue, true);
        }
    }
}

/// Stream job.
#[derive(Debug, Clone)]
pub struct StreamJob {
    job: Job,
}

impl StreamJob {
    /// `block-stream`: copy into `top` what its backing chain down to (and
    /// excluding) `base` holds, then make `base` (or nothing) its backing.
    pub fn start(
        manager: &JobManager,
        graph: &Graph,
        top: &NodeRef,
        base: Option<&NodeRef>,
        opts: CommitOptions,
    ) -> Result<StreamJob> {
        if let Some(b) = base {
            if !in_chain_below(graph, top, b) {
                return Err(JobError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "stream: '{}' is not in the backing chain of '{}'",
                        b.name(),
                        top.name()
                    ),
                ));
            }
        }
        if top.backing().is_none() {
            return Err(JobError::new(
                ErrorKind::InvalidArgument,
                format!("stream: '{}' has no backing file", top.name()),
            ));
        }
        if !top.driver().accepts_child(&Role::Backing) {
            return Err(JobError::new(
                ErrorKind::Unsupported,
                format!(
                    "stream: '{}' (driver '{}') cannot change its backing at run time",
                    top.name(),
                    top.driver_name()
                ),
            ));
        }
        // every op on top and the nodes down to (excluding) base
        let below = crate::blockers::intermediates(graph, top, base);
        let mut uses = vec![(top, BlockOp::Stream)];
        uses.extend(below.iter().map(|n| (n, BlockOp::Stream)));
        let blockers = crate::blockers::claim_nodes(JobType::Stream, &uses)?;
        let drv = StreamDriver {
            graph: graph.clone(),
            top: top.clone(),
            base: base.cloned(),
            opts: opts.clone(),
            _blockers: blockers,
        };
        let job = manager.start(Box::new(drv), opts.job)?;
        Ok(StreamJob { job })
    }

    /// The job handle.
    pub fn job(&self) -> &Job {
        &self.job
    }
}

struct StreamDriver {
    graph: Graph,
    top: NodeRef,
    base: Option<NodeRef>,
    opts: CommitOptions,
    _blockers: Vec<BlockerGuard>,
}

impl StreamDriver {
    /// Copy one run into `top` if it is still unallocated there; returns bytes.
    fn stream_run(
        &self,
        off: u64,
        len: u64,
    ) -> std::result::Result<u64, (IoOperation, block_graph::Error)> {
        let _g = self.top.serialise(off, len);
        let st = self
            .top
            .block_status(off, len)
            .map_err(|e| (IoOperation::Read, e))?;
        if st.mapping != Mapping::Unallocated {
            return Ok(st.len);
        }
        let n = st.len;
        let mut buf = vec![0u8; n as usize];
        self.top
            .read(off, &mut buf)
            .map_err(|e| (IoOperation::Read, e))?;
        let w = if buf.iter().all(|&b| b == 0) {
            self.top.write_zeroes(off, n, ZeroFlags::default())
        } else {
            self.top.write(off, &buf, WriteFlags::default())
        };
        w.map_err(|e| (IoOperation::Write, e))?;
        Ok(n)
    }
}

impl JobDriver for StreamDriver {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    fn drained_nodes(&self) -> Option<(Graph, Vec<NodeRef>)> {
        let mut nodes = vec![self.top.clone()];
        nodes.extend(self.base.clone());
        Some((self.graph.clone(), nodes))
    }

    fn run(&mut self, ctx: &JobContext) -> Result<()> {
        let len = self.top.len();
        ctx.set_len(len);
        let Some(backing) = self.top.backing() else {
            return Ok(());
        };
        let mut off = 0;
        while off < len {
            ctx.pause_point();
            if ctx.is_cancelled() {
                return Ok(());
            }
            if off >= backing.len() {
                // past the backing's end the top reads zeros of its own
                ctx.add_progress(len - off);
                break;
            }
            let want = CHUNK.min(len - off).min(backing.len() - off);
            // allocated below top (and above base)?
            let (alloc, run) =
                self.graph
                    .is_allocated_above(&backing, self.base.as_ref(), off, want)?;
            let run = run.max(1).min(want);
            if !alloc {
                ctx.add_progress(run);
                off += run;
                continue;
            }
            ctx.throttle(run);
            match self.stream_run(off, run) {
                Ok(n) => {
                    let n = n.max(1).min(run);
                    ctx.add_progress(n);
                    off += n;
                }
                Err((op, e)) => {
                    let je = JobError::from(e);
                    match ctx.io_error(op, &je) {
                        ErrorAction::Report => return Err(je),
                        ErrorAction::Ignore | ErrorAction::Stop => {
                            ctx.sleep(Duration::from_millis(1));
                        }
                    }
                }
            }
        }
        self.top.flush()?;
        Ok(())
    }

    fn prepare(&mut self, _ctx: &JobContext) -> Result<()> {
        let old = self.top.backing();
        let _drained = self.graph.drain(std::slice::from_ref(&self.top));
        match &self.base {
            Some(b) => self.graph.attach_child(&self.top, Role::Backing, b)?,
            None => {
                self.graph.detach_child(&self.top, &Role::Backing)?;
            }
        }
        if let Err(e) = record_backing(&self.top, self.base.as_ref(), &self.opts) {
            if let Some(o) = old {
                let _ = self.graph.attach_child(&self.top, Role::Backing, &o);
            }
            return Err(e);
        }
        Ok(())
    }
}
