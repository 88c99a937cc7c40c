//! Copy-before-write bookkeeping: which clusters were copied since the last
//! checkpoint, which copies are in flight, and reader locks.
//!
//! The rules (after QEMU's `block-copy.c` and the replication filter's
//! `backup_wait_for_overlapping_requests`):
//! * a cluster is copied at most once per checkpoint: a request that finds it
//!   copied goes on, one that finds its copy in flight waits for that copy;
//! * a failed copy leaves the cluster uncopied (and the trigger fails);
//! * a reader lock waits for overlapping copies in flight and holds off new
//!   ones until dropped, so a reader of the target chain never sees a
//!   half-copied cluster;
//! * `checkpoint` forgets every copied cluster at a cost that grows with the
//!   number of copied clusters (roaring bitmap), never with the disk size.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};
use roaring::RoaringTreemap;

#[derive(Default)]
struct State {
    copied: RoaringTreemap,
    in_flight: RoaringTreemap,
    readers: Vec<(u64, Range<u64>)>,
    next_reader: u64,
    /// Copies of this epoch (since the last checkpoint), in clusters.
    epoch_copies: u64,
}

/// Per-cluster copy state of one copy-before-write relation (source -> target).
pub struct CopyTracker {
    cluster: u64,
    len: u64,
    nb_clusters: u64,
    st: Mutex<State>,
    cv: Condvar,
    total_copies: AtomicU64,
}

impl std::fmt::Debug for CopyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyTracker")
            .field("cluster", &self.cluster)
            .field("len", &self.len)
            .finish()
    }
}

/// A held reader lock; see [`CopyTracker::read_lock`].
pub struct ReadGuard<'a> {
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

impl CopyTracker {
    /// Tracker for a source of `len` bytes copied in `cluster`-byte units
    /// (a power of two).
    pub fn new(len: u64, cluster: u64) -> Self {
        debug_assert!(cluster.is_power_of_two());
        CopyTracker {
            cluster,
            len,
            nb_clusters: len.div_ceil(cluster),
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
            total_copies: AtomicU64::new(0),
        }
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    /// Source length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a zero-length source.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Clusters covering `[offset, offset+len)`, clipped to the source.
    pub fn clusters(&self, offset: u64, len: u64) -> Range<u64> {
        if len == 0 || offset >= self.len {
            return 0..0;
        }
        let end = offset.saturating_add(len).min(self.len);
        offset / self.cluster..end.div_ceil(self.cluster).min(self.nb_clusters)
    }

    /// Byte range of a cluster range, clipped to the source.
    pub fn byte_range(&self, c: &Range<u64>) -> Range<u64> {
        c.start * self.cluster..(c.end * self.cluster).min(self.len)
    }

    fn reader_overlaps(st: &State, c: &Range<u64>) -> bool {
        st.readers
            .iter()
            .any(|(_, r)| r.start < c.end && c.start < r.end)
    }

    /// Make sure every cluster touching `[offset, offset+len)` was copied this
    /// epoch, calling `copy(byte_range)` for runs this caller claims. Runs
    /// claimed by others are waited for (and retried if their copy failed).
    pub fn ensure_copied<E>(
        &self,
        offset: u64,
        len: u64,
        mut copy: impl FnMut(Range<u64>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let c = self.clusters(offset, len);
        if c.is_empty() {
            return Ok(());
        }
        let mut st = self.st.lock();
        // fast path: every cluster already copied (rewrites after the first)
        if c.end - c.start <= 64 && c.clone().all(|x| st.copied.contains(x)) {
            return Ok(());
        }
        loop {
            let mut want = RoaringTreemap::new();
            want.insert_range(c.clone());
            want -= &st.copied;
            if want.is_empty() {
                return Ok(());
            }
            let mut claim = want.clone();
            claim -= &st.in_flight;
            if claim.is_empty() {
                // everything left is being copied by others: wait and re-check
                self.cv.wait(&mut st);
                continue;
            }
            if Self::reader_overlaps(&st, &c) {
                self.cv.wait(&mut st);
                continue;
            }
            st.in_flight |= &claim;
            drop(st);
            let mut result = Ok(());
            let mut done = RoaringTreemap::new();
            for run in runs(&claim) {
                match copy(self.byte_range(&run)) {
                    Ok(()) => done.insert_range(run),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                };
            }
            st = self.st.lock();
            st.in_flight -= &claim;
            let n = done.len();
            st.copied |= &done;
            st.epoch_copies += n;
            self.total_copies.fetch_add(n, Ordering::Relaxed);
            self.cv.notify_all();
            result?;
        }
    }

    /// Claim the first uncopied, not-in-flight run of up to `max_clusters`
    /// clusters at or after cluster `from`, within `limit` (cluster range);
    /// for background copying. Returns the claimed cluster range; the caller
    /// must call [`CopyTracker::finish_claim`].
    pub fn claim_next(&self, from: u64, limit: u64, max_clusters: u64) -> Option<Range<u64>> {
        let limit = limit.min(self.nb_clusters);
        let mut st = self.st.lock();
        loop {
            let mut cur = from;
            let mut found = None;
            while cur < limit {
                // next cluster not copied
                let start = match next_absent(&st.copied, cur, limit) {
                    Some(s) => s,
                    None => break,
                };
                if st.in_flight.contains(start) {
                    cur = start + 1;
                    continue;
                }
                let mut end = start + 1;
                while end < limit
                    && end - start < max_clusters
                    && !st.copied.contains(end)
                    && !st.in_flight.contains(end)
                {
                    end += 1;
                }
                found = Some(start..end);
                break;
            }
            let r = found?;
            if Self::reader_overlaps(&st, &r) {
                self.cv.wait(&mut st);
                continue;
            }
            st.in_flight.insert_range(r.clone());
            return Some(r);
        }
    }

    /// End a claim from [`CopyTracker::claim_next`]: mark it copied if `ok`.
    pub fn finish_claim(&self, r: Range<u64>, ok: bool) {
        let mut st = self.st.lock();
        st.in_flight.remove_range(r.clone());
        if ok {
            let n = r.end - r.start;
            st.copied.insert_range(r);
            st.epoch_copies += n;
            self.total_copies.fetch_add(n, Ordering::Relaxed);
        }
        self.cv.notify_all();
    }

    /// Mark clusters as not needing a copy this epoch (sync=top: clusters not
    /// allocated in the source's top layer are skipped by the background copy).
    pub fn mark_skipped(&self, c: Range<u64>) {
        let mut st = self.st.lock();
        st.copied.insert_range(c);
    }

    /// Wait until no copy overlapping `[offset, offset+len)` is in flight and
    /// hold off new overlapping copies (and so the writes that trigger them)
    /// until the guard drops. The replication filter takes this around its
    /// secondary-mode reads of active -> hidden -> secondary.
    pub fn read_lock(&self, offset: u64, len: u64) -> ReadGuard<'_> {
        let c = self.clusters(offset, len);
        let mut st = self.st.lock();
        loop {
            let mut r = RoaringTreemap::new();
            if !c.is_empty() {
                r.insert_range(c.clone());
            }
            r &= &st.in_flight;
            if r.is_empty() {
                break;
            }
            self.cv.wait(&mut st);
        }
        let id = st.next_reader;
        st.next_reader += 1;
        st.readers.push((id, c));
        ReadGuard { t: self, id }
    }

    /// Forget every copied cluster (waits for copies in flight first).
    /// Cost: O(copied clusters).
    pub fn checkpoint(&self) {
        let mut st = self.st.lock();
        while !st.in_flight.is_empty() {
            self.cv.wait(&mut st);
        }
        st.copied.clear();
        st.epoch_copies = 0;
    }

    /// Clusters copied since the last checkpoint (each counted once per copy).
    pub fn epoch_copies(&self) -> u64 {
        self.st.lock().epoch_copies
    }

    /// Clusters copied since creation.
    pub fn total_copies(&self) -> u64 {
        self.total_copies.load(Ordering::Relaxed)
    }

    /// True if cluster `c` counts as copied this epoch.
    pub fn is_copied(&self, c: u64) -> bool {
        self.st.lock().copied.contains(c)
    }

    /// Number of clusters of the source.
    pub fn nb_clusters(&self) -> u64 {
        self.nb_clusters
    }

    /// Number of clusters still to copy (for progress).
    pub fn remaining(&self) -> u64 {
        self.nb_clusters - self.st.lock().copied.len()
    }
}

/// First value in `from..limit` absent from `set` (callers advance `from`,
/// so a full pass is linear in the range).
fn next_absent(set: &RoaringTreemap, from: u64, limit: u64) -> Option<u64> {
    (from..limit).find(|v| !set.contains(*v))
}

/// Maximal runs of consecutive values of a bitmap.
pub(crate) fn runs(set: &RoaringTreemap) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for v in set.iter() {
        match out.last_mut() {
            Some(r) if r.end == v => r.end = v + 1,
            _ => out.push(v..v + 1),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorKind, JobError};
    use std::sync::Arc;

    #[test]
    fn copies_once_and_checkpoint_rearms() {
        let t = CopyTracker::new(10 * 65536 + 100, 65536);
        assert_eq!(t.nb_clusters(), 11);
        let mut seen = vec![];
        t.ensure_copied(65536 + 5, 65536, |r| {
            seen.push(r);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(seen, vec![65536..3 * 65536]);
        seen.clear();
        t.ensure_copied(0, 4 * 65536, |r| {
            seen.push(r);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(seen, vec![0..65536, 3 * 65536..4 * 65536]);
        assert_eq!(t.epoch_copies(), 4);
        seen.clear();
        t.ensure_copied(10 * 65536, 100, |r| {
            seen.push(r);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(seen, vec![10 * 65536..10 * 65536 + 100]);
        t.checkpoint();
        assert_eq!(t.epoch_copies(), 0);
        assert!(!t.is_copied(1));
        assert_eq!(t.total_copies(), 5);
    }

    #[test]
    fn failed_copy_stays_uncopied() {
        let t = CopyTracker::new(4 * 65536, 65536);
        let e = t
            .ensure_copied(0, 65536, |_| {
                Err::<(), _>(JobError::new(ErrorKind::Io, "boom"))
            })
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(!t.is_copied(0));
        let mut n = 0;
        t.ensure_copied(0, 65536, |_| {
            n += 1;
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn concurrent_overlapping_copy_exactly_once() {
        let t = Arc::new(CopyTracker::new(64 * 65536, 65536));
        let counts: Arc<Vec<AtomicU64>> = Arc::new((0..64).map(|_| AtomicU64::new(0)).collect());
        std::thread::scope(|s| {
            for i in 0..8u64 {
                let t = t.clone();
                let counts = counts.clone();
                s.spawn(move || {
                    for k in 0..64u64 {
                        let off = ((k * 7 + i * 13) % 60) * 65536 + 17;
                        t.ensure_copied(off, 3 * 65536, |r| {
                            std::thread::sleep(std::time::Duration::from_micros(50));
                            for c in r.start / 65536..r.end.div_ceil(65536) {
                                counts[c as usize].fetch_add(1, Ordering::SeqCst);
                            }
                            Ok::<(), ()>(())
                        })
                        .unwrap();
                    }
                });
            }
        });
        for (i, c) in counts.iter().enumerate() {
            assert!(c.load(Ordering::SeqCst) <= 1, "cluster {i} copied twice");
        }
        assert_eq!(
            t.epoch_copies(),
            counts.iter().map(|c| c.load(Ordering::SeqCst)).sum::<u64>()
        );
    }

    #[test]
    fn claim_next_skips_copied_and_in_flight() {
        let t = CopyTracker::new(16 * 65536, 65536);
        t.ensure_copied(2 * 65536, 65536, |_| Ok::<(), ()>(()))
            .unwrap();
        let a = t.claim_next(0, 16, 4).unwrap();
        assert_eq!(a, 0..2);
        let b = t.claim_next(0, 16, 4).unwrap();
        assert_eq!(b, 3..7);
        t.finish_claim(a, true);
        t.finish_claim(b, false);
        assert_eq!(t.claim_next(0, 16, 100).unwrap(), 3..16);
        assert_eq!(t.claim_next(0, 16, 100), None);
    }

    #[test]
    fn read_lock_holds_off_copies() {
        let t = Arc::new(CopyTracker::new(16 * 65536, 65536));
        let g = t.read_lock(0, 65536);
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.ensure_copied(0, 10, |_| Ok::<(), ()>(())).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!t.is_copied(0), "copy must wait for the reader");
        drop(g);
        h.join().unwrap();
        assert!(t.is_copied(0));
    }
}
