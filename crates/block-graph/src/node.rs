//! [`Node`]: the one door every request passes through.

use crate::clock;
use crate::driver::{BlockStatus, Driver, Role, WriteFlags, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};
use crate::graph::{Graph, GraphInner};
use crate::perm::{BlockOp, PermPair};
use parking_lot::{Condvar, Mutex, RwLock};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::ThreadId;

/// A shared handle on a node. The node lives while any parent, backend, job or
/// caller holds one.
pub type NodeRef = Arc<Node>;

thread_local! {
    /// How many node requests this thread is inside of. A request issued while
    /// inside another one is part of it (a parent's request reaching its child)
    /// and is not held by drained sections (the parent is drained too).
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Marks requests issued by this thread as nested inside an already admitted
/// request until dropped. A driver that issues child I/O from a helper thread on
/// behalf of a request it is serving wraps that I/O in this scope, so drained
/// sections (which wait for the parent request) do not hold it.
pub struct NestedScope(());

impl NestedScope {
    /// Enters the scope.
    pub fn enter() -> NestedScope {
        DEPTH.with(|d| d.set(d.get() + 1));
        NestedScope(())
    }
}

impl Drop for NestedScope {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

pub(crate) struct ChildEdge {
    pub(crate) role: Role,
    pub(crate) node: NodeRef,
    pub(crate) perms: PermPair,
}

pub(crate) struct ParentEdge {
    pub(crate) parent: Weak<Node>,
    pub(crate) parent_name: String,
    pub(crate) role: Role,
    pub(crate) perms: PermPair,
}

pub(crate) struct BackendUse {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) perms: PermPair,
    pub(crate) inner: Weak<crate::backend::BackendInner>,
}

struct Tracked {
    id: u64,
    start: u64,
    end: u64,
    serialising: bool,
    /// Set for [`SerialGuard`]s: requests from the owner thread pass through.
    owner: Option<ThreadId>,
}

#[derive(Default)]
struct ReqState {
    quiesce: u32,
    drain_owners: Vec<ThreadId>,
    in_flight: u64,
    next_id: u64,
    tracked: Vec<Tracked>,
    serialising: u32,
    waiters: u32,
}

/// Request kinds, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    /// Reads.
    Read = 0,
    /// Writes.
    Write = 1,
    /// Flushes.
    Flush = 2,
    /// Discards.
    Discard = 3,
    /// Write-zeroes.
    WriteZeroes = 4,
    /// Block status queries.
    BlockStatus = 5,
}

const KINDS: usize = 6;

#[derive(Default)]
struct OpCounters {
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    nanos: AtomicU64,
}

/// Counters of one request kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Completed requests (successful or not).
    pub ops: u64,
    /// Bytes of successful requests.
    pub bytes: u64,
    /// Failed requests.
    pub errors: u64,
    /// Total time spent in requests, in nanoseconds.
    pub nanos: u64,
}

/// A snapshot of a node's statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Reads.
    pub read: OpStats,
    /// Writes.
    pub write: OpStats,
    /// Flushes.
    pub flush: OpStats,
    /// Discards.
    pub discard: OpStats,
    /// Write-zeroes.
    pub write_zeroes: OpStats,
    /// Block status queries.
    pub block_status: OpStats,
}

impl NodeStats {
    /// The counters of one kind.
    pub fn get(&self, kind: IoKind) -> OpStats {
        match kind {
            IoKind::Read => self.read,
            IoKind::Write => self.write,
            IoKind::Flush => self.flush,
            IoKind::Discard => self.discard,
            IoKind::WriteZeroes => self.write_zeroes,
            IoKind::BlockStatus => self.block_status,
        }
    }
}

struct Blocker {
    id: u64,
    mask: u32,
    reason: String,
}

/// Options the graph applies to every node regardless of driver.
#[derive(Debug, Clone)]
pub(crate) struct NodeConfig {
    pub(crate) name: String,
    pub(crate) driver_name: String,
    pub(crate) read_only: bool,
    pub(crate) discard_ignore: bool,
    pub(crate) implicit: bool,
}

/// A node of the block graph. Every request enters through its methods, which
/// check bounds and permissions, count the request in flight, hold it while the
/// node is drained, track it (serialising requests wait for overlapping ones and
/// make later overlapping ones wait), pad it to the node's alignment
/// (read-modify-write under serialisation) and record statistics; then the
/// driver runs.
pub struct Node {
    name: String,
    driver_name: String,
    driver: Box<dyn Driver>,
    pub(crate) graph: Weak<GraphInner>,
    pub(crate) children: RwLock<Vec<ChildEdge>>,
    pub(crate) parents: Mutex<Vec<ParentEdge>>,
    pub(crate) backends: Mutex<Vec<BackendUse>>,
    read_only: AtomicBool,
    removed: AtomicBool,
    closed: AtomicBool,
    pub(crate) implicit: AtomicBool,
    discard_ignore: bool,
    size: AtomicU64,
    align: u64,
    req: Mutex<ReqState>,
    cv: Condvar,
    blockers: Mutex<Vec<Blocker>>,
    next_blocker: AtomicU64,
    stats: [OpCounters; KINDS],
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver_name)
            .field("len", &self.len())
            .field("read_only", &self.is_read_only())
            .finish()
    }
}

impl Node {
    pub(crate) fn new(
        cfg: NodeConfig,
        driver: Box<dyn Driver>,
        graph: Weak<GraphInner>,
        children: Vec<ChildEdge>,
    ) -> Node {
        let align = driver.request_alignment().max(1);
        clock::init();
        Node {
            name: cfg.name,
            driver_name: cfg.driver_name,
            driver,
            graph,
            children: RwLock::new(children),
            parents: Mutex::new(Vec::new()),
            backends: Mutex::new(Vec::new()),
            read_only: AtomicBool::new(cfg.read_only),
            removed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            implicit: AtomicBool::new(cfg.implicit),
            discard_ignore: cfg.discard_ignore,
            size: AtomicU64::new(0),
            align: if align.is_power_of_two() {
                align
            } else {
                align.next_power_of_two()
            },
            req: Mutex::new(ReqState::default()),
            cv: Condvar::new(),
            blockers: Mutex::new(Vec::new()),
            next_blocker: AtomicU64::new(1),
            stats: Default::default(),
        }
    }

    pub(crate) fn refresh_len(&self) -> Result<u64> {
        let l = self
            .driver
            .length(self)
            .map_err(|e| e.or_node(&self.name))?;
        self.size.store(l, Ordering::Release);
        Ok(l)
    }

    // ---------------------------------------------------------------- identity

    /// The node name (user-given or generated `#blockN`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver name this node was opened with.
    pub fn driver_name(&self) -> &str {
        &self.driver_name
    }

    /// The driver object.
    pub fn driver(&self) -> &dyn Driver {
        &*self.driver
    }

    /// The driver as its concrete type (e.g. `node.driver_as::<BlkDebug>()`).
    pub fn driver_as<T: Driver>(&self) -> Option<&T> {
        self.driver.as_any().downcast_ref::<T>()
    }

    /// The graph this node belongs to (None once the graph is gone).
    pub fn graph(&self) -> Option<Graph> {
        self.graph.upgrade().map(Graph::from_inner)
    }

    /// The node's length in bytes (cached; changes with [`Node::truncate`]).
    pub fn len(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// True if the node has length 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The alignment requests are padded to before they reach the driver.
    pub fn request_alignment(&self) -> u64 {
        self.align
    }

    /// True if the node is read-only (writes fail with PermissionDenied).
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::Acquire)
    }

    pub(crate) fn set_read_only(&self, ro: bool) {
        self.read_only.store(ro, Ordering::Release)
    }

    /// True once the node was removed from its graph; requests then fail with NotFound.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub(crate) fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
        let st = self.req.lock();
        if st.waiters > 0 {
            self.cv.notify_all();
        }
    }

    pub(crate) fn close_once(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.driver.close(self);
        }
    }

    /// True if this node was created from a nested definition inside another
    /// node's options (it is removed with its parent when nothing else uses it).
    pub fn is_implicit(&self) -> bool {
        self.implicit.load(Ordering::Acquire)
    }

    /// True if the driver is a filter.
    pub fn is_filter(&self) -> bool {
        self.driver.is_filter()
    }

    /// The host file name behind this node: the driver's, else its file child's.
    pub fn filename(&self) -> Option<String> {
        self.driver
            .filename()
            .or_else(|| self.file().and_then(|f| f.filename()))
    }

    // ---------------------------------------------------------------- edges

    /// The child with `role`, if any.
    pub fn child(&self, role: &Role) -> Option<NodeRef> {
        self.children
            .read()
            .iter()
            .find(|e| &e.role == role)
            .map(|e| e.node.clone())
    }

    /// All children with their roles, in attach order.
    pub fn children(&self) -> Vec<(Role, NodeRef)> {
        self.children
            .read()
            .iter()
            .map(|e| (e.role.clone(), e.node.clone()))
            .collect()
    }

    /// The `file` child.
    pub fn file(&self) -> Option<NodeRef> {
        self.child(&Role::File)
    }

    /// The `backing` child.
    pub fn backing(&self) -> Option<NodeRef> {
        self.child(&Role::Backing)
    }

    /// For filters, the filtered child; None for other nodes.
    pub fn filtered(&self) -> Option<NodeRef> {
        if self.is_filter() {
            self.child(&self.driver.filtered_child())
        } else {
            None
        }
    }

    /// The parent nodes and the role this node has in each.
    pub fn parents(&self) -> Vec<(NodeRef, Role)> {
        self.parents
            .lock()
            .iter()
            .filter_map(|p| p.parent.upgrade().map(|n| (n, p.role.clone())))
            .collect()
    }

    /// Names of the backends (users' handles) on this node.
    pub fn backend_names(&self) -> Vec<String> {
        self.backends
            .lock()
            .iter()
            .map(|b| b.name.clone())
            .collect()
    }

    /// True if a backend is attached to this node.
    pub fn has_backend(&self) -> bool {
        !self.backends.lock().is_empty()
    }

    /// True if `other` is this node or reachable from it through child edges.
    pub fn reaches(&self, other: &Node) -> bool {
        if std::ptr::eq(self, other) {
            return true;
        }
        let kids: Vec<NodeRef> = self
            .children
            .read()
            .iter()
            .map(|e| e.node.clone())
            .collect();
        kids.iter().any(|k| k.reaches(other))
    }

    // ---------------------------------------------------------------- op blockers

    /// Blocks every operation type on this node with `reason` until the guard is dropped.
    pub fn block_all(self: &Arc<Self>, reason: impl Into<String>) -> BlockerGuard {
        self.add_blocker(u32::MAX, reason.into())
    }

    /// Blocks one operation type with `reason` until the guard is dropped.
    pub fn block_op(self: &Arc<Self>, op: BlockOp, reason: impl Into<String>) -> BlockerGuard {
        self.add_blocker(op.bit(), reason.into())
    }

    fn add_blocker(self: &Arc<Self>, mask: u32, reason: String) -> BlockerGuard {
        let id = self.next_blocker.fetch_add(1, Ordering::Relaxed);
        self.blockers.lock().push(Blocker { id, mask, reason });
        BlockerGuard {
            node: Arc::downgrade(self),
            id,
        }
    }

    /// Fails with [`ErrorKind::Busy`] and the blocker's reason if `op` is blocked.
    pub fn check_op(&self, op: BlockOp) -> Result<()> {
        let b = self.blockers.lock();
        if let Some(bl) = b.iter().find(|bl| bl.mask & op.bit() != 0) {
            return Err(Error::new(
                ErrorKind::Busy,
                format!("operation '{op}' is blocked: {}", bl.reason),
            )
            .with_node(&self.name));
        }
        Ok(())
    }

    /// True if `op` is blocked.
    pub fn is_op_blocked(&self, op: BlockOp) -> bool {
        self.check_op(op).is_err()
    }

    // ---------------------------------------------------------------- request machinery

    fn check_range(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        if self.is_removed() {
            return Err(self.removed_error(what));
        }
        let size = self.len();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!("{what} at offset {offset} length {len} is beyond the end of the node (size {size})"),
            )
            .with_node(&self.name)),
        }
    }

    fn removed_error(&self, what: &str) -> Error {
        Error::new(
            ErrorKind::NotFound,
            format!("{what} on a node that has been removed"),
        )
        .with_node(&self.name)
    }

    fn check_writable(&self, what: &str) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!("{what} on a read-only node"),
            )
            .with_node(&self.name));
        }
        Ok(())
    }

    fn begin(&self, start: u64, len: u64, serialising: bool) -> Result<ReqGuard<'_>> {
        let nested = DEPTH.with(|d| d.get()) > 0;
        let mut st = self.req.lock();
        if st.quiesce > 0 && !nested {
            let me = std::thread::current().id();
            while st.quiesce > 0 && !st.drain_owners.contains(&me) {
                st.waiters += 1;
                self.cv.wait(&mut st);
                st.waiters -= 1;
            }
        }
        if self.is_removed() {
            return Err(self.removed_error("request"));
        }
        let id = st.next_id;
        st.next_id += 1;
        let end = start.saturating_add(len);
        st.tracked.push(Tracked {
            id,
            start,
            end,
            serialising,
            owner: None,
        });
        if serialising {
            st.serialising += 1;
        }
        st.in_flight += 1;
        if st.serialising > 0 && len > 0 {
            let me = std::thread::current().id();
            loop {
                let conflict = st.tracked.iter().any(|t| {
                    t.id < id
                        && t.start < end
                        && start < t.end
                        && (t.serialising || serialising)
                        && t.owner != Some(me)
                });
                if !conflict {
                    break;
                }
                st.waiters += 1;
                self.cv.wait(&mut st);
                st.waiters -= 1;
            }
        }
        drop(st);
        DEPTH.with(|d| d.set(d.get() + 1));
        Ok(ReqGuard {
            node: self,
            id,
            serialising,
        })
    }

    fn end(&self, id: u64, serialising: bool, counted: bool) {
        let mut st = self.req.lock();
        if let Some(i) = st.tracked.iter().position(|t| t.id == id) {
            st.tracked.swap_remove(i);
        }
        if serialising {
            st.serialising -= 1;
        }
        if counted {
            st.in_flight -= 1;
        }
        if st.waiters > 0 {
            self.cv.notify_all();
        }
    }

    pub(crate) fn drain_begin(&self, owner: ThreadId) {
        let mut st = self.req.lock();
        st.quiesce += 1;
        st.drain_owners.push(owner);
    }

    pub(crate) fn drain_wait(&self) {
        let mut st = self.req.lock();
        while st.in_flight > 0 {
            st.waiters += 1;
            self.cv.wait(&mut st);
            st.waiters -= 1;
        }
    }

    pub(crate) fn drain_end(&self, owner: ThreadId) {
        let mut st = self.req.lock();
        st.quiesce -= 1;
        if let Some(i) = st.drain_owners.iter().position(|t| *t == owner) {
            st.drain_owners.swap_remove(i);
        }
        if st.waiters > 0 {
            self.cv.notify_all();
        }
    }

    /// True while the node is inside at least one drained section.
    pub fn is_drained(&self) -> bool {
        self.req.lock().quiesce > 0
    }

    /// Number of requests currently in flight in this node.
    pub fn in_flight(&self) -> u64 {
        self.req.lock().in_flight
    }

    /// A serialising range guard: waits for earlier overlapping requests to finish,
    /// then makes overlapping requests from *other* threads wait until dropped.
    /// Requests from the thread that created the guard pass through (so a job can
    /// read the old data and write it elsewhere before letting a guest write in).
    /// Not counted as in flight: drained sections do not wait for guards. Do
    /// not hold a guard while waiting for something that itself waits for the
    /// range (a drain owner's `make_empty` on this node, for example).
    pub fn serialise(self: &Arc<Self>, offset: u64, len: u64) -> SerialGuard {
        let me = std::thread::current().id();
        let end = offset.saturating_add(len);
        let mut st = self.req.lock();
        let id = st.next_id;
        st.next_id += 1;
        st.tracked.push(Tracked {
            id,
            start: offset,
            end,
            serialising: true,
            owner: Some(me),
        });
        st.serialising += 1;
        loop {
            let conflict = st
                .tracked
                .iter()
                .any(|t| t.id < id && t.start < end && offset < t.end && t.owner != Some(me));
            if !conflict {
                break;
            }
            st.waiters += 1;
            self.cv.wait(&mut st);
            st.waiters -= 1;
        }
        SerialGuard {
            node: self.clone(),
            id,
        }
    }

    fn record(&self, kind: IoKind, bytes: u64, ok: bool, t0: u64) {
        let c = &self.stats[kind as usize];
        c.ops.fetch_add(1, Ordering::Relaxed);
        if ok {
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        c.nanos
            .fetch_add(clock::ticks().wrapping_sub(t0), Ordering::Relaxed);
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> NodeStats {
        let g = |k: IoKind| {
            let c = &self.stats[k as usize];
            OpStats {
                ops: c.ops.load(Ordering::Relaxed),
                bytes: c.bytes.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                nanos: clock::to_nanos(c.nanos.load(Ordering::Relaxed)),
            }
        };
        NodeStats {
            read: g(IoKind::Read),
            write: g(IoKind::Write),
            flush: g(IoKind::Flush),
            discard: g(IoKind::Discard),
            write_zeroes: g(IoKind::WriteZeroes),
            block_status: g(IoKind::BlockStatus),
        }
    }

    fn finish<T>(&self, r: Result<T>, what: &str, offset: u64, len: u64) -> Result<T> {
        r.map_err(|e| {
            if e.node().is_none() {
                e.context(format!("{what} at offset {offset} length {len}"))
                    .with_node(&self.name)
            } else {
                e
            }
        })
    }

    fn is_aligned(&self, offset: u64, len: u64) -> bool {
        (offset | len) & (self.align - 1) == 0
    }

    fn align_out(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = self.align;
        let start = offset & !(a - 1);
        let end = (offset + len).div_ceil(a) * a;
        (start, end)
    }

    // ---------------------------------------------------------------- the door

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range("read", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let t0 = clock::ticks();
        let r = if self.is_aligned(offset, len) {
            self.begin(offset, len, false)
                .and_then(|_g| self.driver.read(self, offset, buf))
        } else {
            self.read_padded(offset, buf)
        };
        self.record(IoKind::Read, len, r.is_ok(), t0);
        self.finish(r, "read", offset, len)
    }

    fn read_padded(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (s, e) = self.align_out(offset, buf.len() as u64);
        let _g = self.begin(s, e - s, false)?;
        let mut bounce = vec![0u8; (e - s) as usize];
        self.driver.read(self, s, &mut bounce)?;
        let skip = (offset - s) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let len = buf.len() as u64;
        self.check_range("write", offset, len)?;
        self.check_writable("write")?;
        if len == 0 {
            return Ok(());
        }
        let t0 = clock::ticks();
        let r = if self.is_aligned(offset, len) {
            let ser = self.driver.serialise_writes();
            self.begin(offset, len, ser)
                .and_then(|_g| self.driver.write(self, offset, buf, flags))
        } else {
            self.write_padded(offset, buf, flags)
        };
        self.record(IoKind::Write, len, r.is_ok(), t0);
        self.finish(r, "write", offset, len)
    }

    /// Read-modify-write of the partial blocks at both ends, under serialisation.
    fn write_padded(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let (s, e) = self.align_out(offset, buf.len() as u64);
        let _g = self.begin(s, e - s, true)?;
        let a = self.align as usize;
        let mut bounce = vec![0u8; (e - s) as usize];
        let head = (offset - s) as usize;
        let tail_start = head + buf.len();
        if head != 0 {
            self.driver.read(self, s, &mut bounce[..a])?;
        }
        if tail_start % a != 0 {
            let blk = tail_start / a * a;
            if blk != 0 || head == 0 {
                self.driver
                    .read(self, s + blk as u64, &mut bounce[blk..blk + a])?;
            }
        }
        bounce[head..tail_start].copy_from_slice(buf);
        self.driver.write(self, s, &bounce, flags)
    }

    /// Makes everything written to this node (and below) durable.
    pub fn flush(&self) -> Result<()> {
        if self.is_removed() {
            return Err(self.removed_error("flush"));
        }
        let t0 = clock::ticks();
        let r = self
            .begin(0, 0, false)
            .and_then(|_g| self.driver.flush(self));
        self.record(IoKind::Flush, 0, r.is_ok(), t0);
        self.finish(r, "flush", 0, 0)
    }

    /// Hands every write this node and its subtree hold in process memory
    /// (a format's metadata caches) to the layers below, down to the
    /// operating system, without making anything durable: afterwards a kill
    /// of this process loses nothing, a power loss still may (that is what
    /// [`Node::flush`] is for, and what this skips: syncing data). Children
    /// shared by several parents are written back once per path.
    pub fn write_back(&self) -> Result<()> {
        if self.is_removed() {
            return Err(self.removed_error("write_back"));
        }
        let r = self
            .begin(0, 0, false)
            .and_then(|_g| self.driver.write_back(self));
        self.finish(r, "write_back", 0, 0)?;
        for (_, child) in self.children() {
            child.write_back()?;
        }
        Ok(())
    }

    /// Discards a range; afterwards it reads as zeros. Unaligned edges are zeroed
    /// with writes. With the node option `discard: "ignore"` this does nothing.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range("discard", offset, len)?;
        self.check_writable("discard")?;
        if len == 0 || self.discard_ignore {
            return Ok(());
        }
        let t0 = clock::ticks();
        let r = self.zeroish(offset, len, |s, l| self.driver.discard(self, s, l));
        self.record(IoKind::Discard, len, r.is_ok(), t0);
        self.finish(r, "discard", offset, len)
    }

    /// Writes zeros over a range. Falls back to writing zero buffers when the
    /// driver has no efficient way (unless `flags.no_fallback`).
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_range("write_zeroes", offset, len)?;
        self.check_writable("write_zeroes")?;
        if len == 0 {
            return Ok(());
        }
        let t0 = clock::ticks();
        let r = self.zeroish(offset, len, |s, l| {
            match self.driver.write_zeroes(self, s, l, flags) {
                Err(e) if e.kind() == ErrorKind::NotSupported && !flags.no_fallback => {
                    self.write_zero_buffers(s, l, WriteFlags { fua: flags.fua })
                }
                r => r,
            }
        });
        self.record(IoKind::WriteZeroes, len, r.is_ok(), t0);
        self.finish(r, "write_zeroes", offset, len)
    }

    /// Runs `op` on the aligned middle under tracking; zero-writes the unaligned edges.
    fn zeroish(&self, offset: u64, len: u64, op: impl Fn(u64, u64) -> Result<()>) -> Result<()> {
        let a = self.align;
        let end = offset + len;
        let mid_s = offset.div_ceil(a) * a;
        let mid_e = end & !(a - 1);
        if mid_s >= mid_e {
            return self.zero_edge(offset, len);
        }
        if mid_s > offset {
            self.zero_edge(offset, mid_s - offset)?;
        }
        {
            let _g = self.begin(mid_s, mid_e - mid_s, self.driver.serialise_writes())?;
            op(mid_s, mid_e - mid_s)?;
        }
        if end > mid_e {
            self.zero_edge(mid_e, end - mid_e)?;
        }
        Ok(())
    }

    fn zero_edge(&self, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len as usize];
        if self.is_aligned(offset, len) {
            let _g = self.begin(offset, len, self.driver.serialise_writes())?;
            self.driver
                .write(self, offset, &zeros, WriteFlags::default())
        } else {
            self.write_padded(offset, &zeros, WriteFlags::default())
        }
    }

    fn write_zero_buffers(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.driver
                .write(self, offset + done, &zeros[..n as usize], flags)?;
            done += n;
        }
        Ok(())
    }

    /// Where the run starting at `offset` lives in this node (not following the
    /// backing chain; see `Graph::is_allocated_above` / `Graph::block_status_above`).
    /// The returned length is in `1..=len`, clipped to the node's end.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.len();
        if self.is_removed() {
            return Err(self.removed_error("block status"));
        }
        if offset >= size || len == 0 {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("block status at offset {offset} length {len} is beyond the end of the node (size {size})"),
            )
            .with_node(&self.name));
        }
        let len = len.min(size - offset);
        let t0 = clock::ticks();
        let r = self.begin(offset, len, false).and_then(|_g| {
            let st = self.driver.block_status(self, offset, len)?;
            if st.len == 0 {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    "driver returned an empty block status run",
                ));
            }
            Ok(BlockStatus {
                mapping: st.mapping,
                len: st.len.min(len),
            })
        });
        self.record(IoKind::BlockStatus, len, r.is_ok(), t0);
        self.finish(r, "block status", offset, len)
    }

    /// Changes the node's length (serialised against every request past the
    /// smaller of the old and new lengths). Fails with [`ErrorKind::Busy`] and
    /// the blocker's reason while [`BlockOp::Resize`] is blocked on this node.
    pub fn truncate(&self, new_len: u64) -> Result<()> {
        if self.is_removed() {
            return Err(self.removed_error("truncate"));
        }
        self.check_op(BlockOp::Resize)?;
        self.check_writable("truncate")?;
        let old = self.len();
        let r = self.begin(old.min(new_len), u64::MAX, true).and_then(|_g| {
            self.driver.truncate(self, new_len)?;
            self.refresh_len().map(|_| ())
        });
        self.finish(r, "truncate", new_len, 0)
    }

    /// True if this node's driver implements [`Node::make_empty`]
    /// ([`Driver::supports_make_empty`]).
    pub fn supports_make_empty(&self) -> bool {
        self.driver.supports_make_empty()
    }

    /// Drops all content of this layer (reads then come from the backing), as
    /// the replication checkpoint needs. Serialised against every request.
    pub fn make_empty(&self) -> Result<()> {
        if self.is_removed() {
            return Err(self.removed_error("make_empty"));
        }
        self.check_writable("make_empty")?;
        let r = self
            .begin(0, u64::MAX, true)
            .and_then(|_g| self.driver.make_empty(self));
        self.finish(r, "make_empty", 0, self.len())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.close_once();
    }
}

struct ReqGuard<'a> {
    node: &'a Node,
    id: u64,
    serialising: bool,
}

impl Drop for ReqGuard<'_> {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get() - 1));
        self.node.end(self.id, self.serialising, true);
    }
}

/// Returned by [`Node::serialise`]; the range is released when dropped.
pub struct SerialGuard {
    node: NodeRef,
    id: u64,
}

impl SerialGuard {
    /// The node this guard serialises.
    pub fn node(&self) -> &NodeRef {
        &self.node
    }
}

impl Drop for SerialGuard {
    fn drop(&mut self) {
        self.node.end(self.id, true, false);
    }
}

/// Returned by [`Node::block_all`] and [`Node::block_op`]; unblocks when dropped.
///
/// Holds only a weak reference: a blocker does not keep its node alive (a
/// job or filter holding a blocker on the top node must not stop that node
/// from being closed when the graph and its users let go of it). Unblocking a
/// node that is already gone does nothing.
pub struct BlockerGuard {
    node: Weak<Node>,
    id: u64,
}

impl BlockerGuard {
    /// Lets `op` through this blocker again (QEMU's `bdrv_op_unblock`). Does
    /// nothing once the node is gone.
    pub fn unblock(&self, op: BlockOp) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        if let Some(b) = node.blockers.lock().iter_mut().find(|b| b.id == self.id) {
            b.mask &= !op.bit();
        };
    }

    /// The node this blocker is on, while it is alive.
    pub fn node(&self) -> Option<NodeRef> {
        self.node.upgrade()
    }
}

impl Drop for BlockerGuard {
    fn drop(&mut self) {
        if let Some(node) = self.node.upgrade() {
            node.blockers.lock().retain(|b| b.id != self.id);
        }
    }
}
