//! The secondary's internal backup job, sync=none: a copy-before-write filter
//! inserted above the secondary disk, so that every write reaching the
//! secondary disk (the primary's forwarded writes, through the NBD export's
//! backend) first copies the old contents of its clusters to the hidden disk,
//! once per cluster per checkpoint.
//!
//! * A copy that fails fails the write that triggered it (the cluster stays
//!   uncopied, the secondary disk is not written).
//! * Readers of the secondary chain take a [`ReadGuard`]: it waits for copies in
//!   flight over its range and holds off new ones until dropped, so a reader
//!   never sees a cluster whose old contents are neither in the hidden disk
//!   nor still in the secondary disk.
//! * A checkpoint forgets the copied clusters; its cost grows with the number
//!   of copied clusters (a roaring bitmap), never with the disk size.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use block_graph::{
    Driver, Error as BlockError, ErrorKind as BlockErrorKind, Node, OpenContext,
    Result as BlockResult, Role, WriteFlags,
};
use parking_lot::{Condvar, Mutex};
use roaring::RoaringTreemap;

/// Largest run of clusters one copy moves.
const MAX_COPY: u64 = 1 << 20;

#[derive(Default)]
struct TrackerState {
    copied: RoaringTreemap,
    in_flight: Vec<Range<u64>>,
    readers: Vec<(u64, Range<u64>)>,
    next_reader: u64,
    epoch_copies: u64,
}

/// Per-cluster copy state of one copy-before-write relation.
pub(crate) struct CopyTracker {
    cluster: u64,
    len: u64,
    st: Mutex<TrackerState>,
    cv: Condvar,
    total_copies: AtomicU64,
}

/// A reader lock on a range of the secondary chain; see the module docs.
pub(crate) struct ReadGuard<'a> {
    t: &'a CopyTracker,
    id: u64,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.t.st.lock();
        st.readers.retain(|(id, _)| *id != self.id);
        self.t.cv.notify_all();
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl CopyTracker {
    pub(crate) fn new(len: u64, cluster: u64) -> CopyTracker {
        CopyTracker {
            cluster,
            len,
            st: Mutex::new(TrackerState::default()),
            cv: Condvar::new(),
            total_copies: AtomicU64::new(0),
        }
    }

    fn clusters(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 || offset >= self.len {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.len);
        offset / self.cluster..end.div_ceil(self.cluster)
    }

    /// Makes sure every cluster touching `[offset, offset+len)` was copied in
    /// this epoch, calling `copy(byte_offset, byte_len)` for runs this caller
    /// claims; runs claimed by others are waited for (and retried if their
    /// copy failed).
    pub(crate) fn ensure_copied(
        &self,
        offset: u64,
        len: u64,
        mut copy: impl FnMut(u64, u64) -> BlockResult<()>,
    ) -> BlockResult<()> {
        let cr = self.clusters(offset, len);
        let max_run = (MAX_COPY / self.cluster).max(1);
        let mut c = cr.start;
        while c < cr.end {
            let run = {
                let mut st = self.st.lock();
                loop {
                    if st.copied.contains(c) {
                        break None;
                    }
                    let one = c..c + 1;
                    let busy = st.in_flight.iter().any(|r| overlaps(r, &one))
                        || st.readers.iter().any(|(_, r)| overlaps(r, &one));
                    if !busy {
                        let mut e = c + 1;
                        while e < cr.end && e - c < max_run {
                            let next = e..e + 1;
                            if st.copied.contains(e)
                                || st.in_flight.iter().any(|r| overlaps(r, &next))
                                || st.readers.iter().any(|(_, r)| overlaps(r, &next))
                            {
                                break;
                            }
                            e += 1;
                        }
                        st.in_flight.push(c..e);
                        break Some(c..e);
                    }
                    self.cv.wait(&mut st);
                }
            };
            let Some(run) = run else {
                c += 1;
                continue;
            };
            let start = run.start * self.cluster;
            let end = (run.end * self.cluster).min(self.len);
            let r = copy(start, end - start);
            let mut st = self.st.lock();
            st.in_flight.retain(|x| *x != run);
            if r.is_ok() {
                st.copied.insert_range(run.clone());
                st.epoch_copies += run.end - run.start;
                self.total_copies
                    .fetch_add(run.end - run.start, Ordering::Relaxed);
            }
            self.cv.notify_all();
            drop(st);
            r?;
            c = run.end;
        }
        Ok(())
    }

    /// Waits for copies in flight over the range, then holds off new ones
    /// until the guard drops.
    pub(crate) fn read_lock(&self, offset: u64, len: u64) -> ReadGuard<'_> {
        let cr = self.clusters(offset, len);
        let mut st = self.st.lock();
        while st.in_flight.iter().any(|r| overlaps(r, &cr)) {
            self.cv.wait(&mut st);
        }
        let id = st.next_reader;
        st.next_reader += 1;
        st.readers.push((id, cr));
        ReadGuard { t: self, id }
    }

    /// Forgets every copied cluster (a checkpoint).
    pub(crate) fn checkpoint(&self) {
        let mut st = self.st.lock();
        st.copied.clear();
        st.epoch_copies = 0;
    }

    /// Clusters copied since the last checkpoint.
    pub(crate) fn epoch_copies(&self) -> u64 {
        self.st.lock().epoch_copies
    }
}

/// What the replication filter and the copy-before-write filter share.
pub(crate) struct CbwShared {
    pub(crate) tracker: CopyTracker,
    /// The hidden disk (weak: the hidden disk's backing is this filter).
    target: Weak<Node>,
    target_name: String,
    /// False once the job was cancelled: writes then pass straight through.
    pub(crate) active: AtomicBool,
    /// Bytes written to the secondary disk through this filter.
    pub(crate) bytes_written: AtomicU64,
}

impl CbwShared {
    pub(crate) fn new(len: u64, cluster: u64, target: &Arc<Node>) -> Arc<CbwShared> {
        Arc::new(CbwShared {
            tracker: CopyTracker::new(len, cluster),
            target: Arc::downgrade(target),
            target_name: target.name().to_string(),
            active: AtomicBool::new(true),
            bytes_written: AtomicU64::new(0),
        })
    }

    fn copy(&self, node: &Node, offset: u64, len: u64) -> BlockResult<()> {
        let src = node.file().ok_or_else(|| {
            BlockError::new(BlockErrorKind::NotFound, "copy-before-write filter has no file child")
        })?;
        let target = self.target.upgrade().ok_or_else(|| {
            BlockError::new(
                BlockErrorKind::NotFound,
                format!("hidden disk '{}' is gone", self.target_name),
            )
        })?;
        let mut buf = vec![0u8; len as usize];
        src.read(offset, &mut buf)
            .and_then(|()| target.write(offset, &buf, WriteFlags::default()))
            .map_err(|e| {
                e.context(format!(
                    "copy-before-write of offset {offset} length {len} to hidden disk '{}'",
                    self.target_name
                ))
            })
    }

    fn before_write(&self, node: &Node, offset: u64, len: u64) -> BlockResult<()> {
        if !self.active.load(Ordering::Acquire) {
            return Ok(());
        }
        self.tracker
            .ensure_copied(offset, len, |s, l| self.copy(node, s, l))
    }
}

/// The copy-before-write filter driver (registered per replication node under
/// a private driver name).
pub(crate) struct CbwDriver {
    shared: Arc<CbwShared>,
}

impl CbwDriver {
    pub(crate) fn open(
        ctx: &mut OpenContext<'_>,
        shared: Arc<CbwShared>,
    ) -> BlockResult<Box<dyn Driver>> {
        ctx.open_child("file", Role::File, true)?;
        Ok(Box::new(CbwDriver { shared }))
    }

    fn file(node: &Node) -> BlockResult<Arc<Node>> {
        node.file().ok_or_else(|| {
            BlockError::new(BlockErrorKind::NotFound, "copy-before-write filter has no file child")
                .with_node(node.name())
        })
    }
}

impl Driver for CbwDriver {
    fn format_name(&self) -> &str {
        "replication-copy-before-write"
    }

    fn length(&self, node: &Node) -> BlockResult<u64> {
        Ok(Self::file(node)?.len())
    }

    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        Self::file(node)?.read(offset, buf)
    }

    fn write(&self, node: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> BlockResult<()> {
        self.shared.before_write(node, offset, buf.len() as u64)?;
        Self::file(node)?.write(offset, buf, flags)?;
        self.shared
            .bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn discard(&self, node: &Node, offset: u64, len: u64) -> BlockResult<()> {
        self.shared.before_write(node, offset, len)?;
        Self::file(node)?.discard(offset, len)
    }

    fn is_filter(&self) -> bool {
        true
    }
}
