//! The guests: one thread per side doing random reads, writes and flushes
//! of mixed sizes through its NBD export, checked against an in-memory
//! model of what that guest must see. The manager parks both threads at a
//! barrier for each checkpoint.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use nbd::NbdClient;
use parking_lot::{Condvar, Mutex};

use super::rng::Rng;
use super::DemoError;

/// Granularity of dirty tracking (what the checkpoint stream ships).
pub(crate) const BLOCK: u64 = 4096;

/// Percentages of reads, writes and flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Weight of writes.
    pub write: u32,
    /// Weight of reads.
    pub read: u32,
    /// Weight of flushes.
    pub flush: u32,
}

impl Mix {
    /// Parses `write=60,read=35,flush=5` (weights; any may be left out and
    /// then counts 0; at least one must be non-zero).
    pub fn parse(s: &str) -> Result<Mix, String> {
        let mut m = Mix {
            write: 0,
            read: 0,
            flush: 0,
        };
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}' is not KIND=WEIGHT (write, read, flush)"))?;
            let v: u32 = v
                .trim()
                .parse()
                .ok()
                .filter(|v| *v <= 1000)
                .ok_or_else(|| format!("weight '{v}' of '{k}' is not a number 0..=1000"))?;
            match k.trim() {
                "write" => m.write = v,
                "read" => m.read = v,
                "flush" => m.flush = v,
                other => return Err(format!("unknown kind '{other}' (write, read, flush)")),
            }
        }
        if m.total() == 0 {
            return Err("the mix has no operation with a non-zero weight".into());
        }
        Ok(m)
    }

    fn total(&self) -> u32 {
        self.write + self.read + self.flush
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "write={},read={},flush={}",
            self.write, self.read, self.flush
        )
    }
}

/// One guest operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Write { offset: u64, len: u64 },
    Read { offset: u64, len: u64 },
    Flush,
}

/// The workload generator: its position is the seeded RNG state and the
/// number of operations done (what the checkpoint stream ships).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Generator {
    pub(crate) rng: Rng,
    pub(crate) ops: u64,
}

impl Generator {
    /// The next operation on a disk of `size` bytes, I/O sizes 512 B to
    /// `max_io` (power-of-two classes, some odd multiples of 512), half of
    /// them in a hot eighth of the disk so both guests and the primary's
    /// forwarded writes meet in the same clusters.
    pub(crate) fn next_op(&mut self, mix: &Mix, size: u64, max_io: u64) -> Op {
        self.ops += 1;
        let r = self.rng.below(u64::from(mix.total())) as u32;
        if r >= mix.write + mix.read {
            return Op::Flush;
        }
        let classes = u64::from((max_io / 512).max(1).ilog2());
        let mut len = 512u64 << self.rng.below(classes + 1);
        if self.rng.below(4) == 0 {
            len = 512 * (1 + self.rng.below(len / 512 * 2));
        }
        let len = len.min(max_io).min(size).max(512);
        let span = if self.rng.below(2) == 0 {
            (size / 8).max(len)
        } else {
            size
        };
        let offset = 512 * self.rng.below((span - len) / 512 + 1);
        if r < mix.write {
            Op::Write { offset, len }
        } else {
            Op::Read { offset, len }
        }
    }
}

/// What one guest must see, and what it changed since the last checkpoint.
pub(crate) struct GuestState {
    pub(crate) gen: Generator,
    /// The disk as this guest must see it.
    pub(crate) model: Vec<u8>,
    /// Blocks written since the last checkpoint (bitmap and list).
    dirty_bits: Vec<u64>,
    pub(crate) dirty: Vec<u64>,
}

impl GuestState {
    pub(crate) fn new(seed: u64, model: Vec<u8>) -> GuestState {
        let blocks = (model.len() as u64).div_ceil(BLOCK);
        GuestState {
            gen: Generator {
                rng: Rng(seed),
                ops: 0,
            },
            model,
            dirty_bits: vec![0; blocks.div_ceil(64) as usize],
            dirty: Vec::new(),
        }
    }

    /// Records a write in the model and the dirty set.
    pub(crate) fn apply(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.model[o..o + data.len()].copy_from_slice(data);
        self.mark(offset, data.len() as u64);
    }

    pub(crate) fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for b in offset / BLOCK..=(offset + len - 1) / BLOCK {
            let (w, bit) = ((b / 64) as usize, b % 64);
            if self.dirty_bits[w] & (1 << bit) == 0 {
                self.dirty_bits[w] |= 1 << bit;
                self.dirty.push(b);
            }
        }
    }

    /// Forgets the dirty set (cost follows the number of dirty blocks).
    pub(crate) fn clear_dirty(&mut self) -> Vec<u64> {
        let list = std::mem::take(&mut self.dirty);
        for &b in &list {
            self.dirty_bits[(b / 64) as usize] &= !(1 << (b % 64));
        }
        list
    }
}

/// Counters of one guest.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) writes: AtomicU64,
    pub(crate) reads: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
}

/// A read that returned something else than the model.
#[derive(Debug, Clone)]
pub(crate) struct Mismatch {
    pub(crate) side: &'static str,
    pub(crate) offset: u64,
    pub(crate) expected: u8,
    pub(crate) found: u8,
}

/// One guest: its NBD connection, model, counters.
pub(crate) struct Guest {
    pub(crate) side: &'static str,
    pub(crate) client: NbdClient,
    pub(crate) state: Mutex<GuestState>,
    pub(crate) stats: Stats,
    /// Set before the guest's host is killed: errors are then expected.
    pub(crate) dying: AtomicBool,
}

/// Where the manager parks the guests (QEMU's vm_stop / vm_start).
#[derive(Default)]
pub(crate) struct Gate {
    m: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    pause: bool,
    stop: bool,
    parked: usize,
    workers: usize,
}

impl Gate {
    /// Called by a worker before each operation: false means stop.
    fn enter(&self) -> bool {
        let mut g = self.m.lock();
        loop {
            if g.stop {
                return false;
            }
            if !g.pause {
                return true;
            }
            g.parked += 1;
            self.cv.notify_all();
            while g.pause && !g.stop {
                self.cv.wait(&mut g);
            }
            g.parked -= 1;
        }
    }

    fn join(&self) {
        self.m.lock().workers += 1;
    }

    fn leave(&self) {
        self.m.lock().workers -= 1;
        self.cv.notify_all();
    }

    /// Parks every running worker; returns once none is in an operation.
    pub(crate) fn pause(&self) {
        let mut g = self.m.lock();
        g.pause = true;
        while g.parked < g.workers {
            self.cv.wait(&mut g);
        }
    }

    /// Lets the workers go on.
    pub(crate) fn resume(&self) {
        self.m.lock().pause = false;
        self.cv.notify_all();
    }

    /// Stops every worker for good.
    pub(crate) fn stop(&self) {
        self.m.lock().stop = true;
        self.cv.notify_all();
    }
}

/// How a worker ended.
pub(crate) enum WorkerEnd {
    Stopped,
    Mismatch(Mismatch),
    Error(DemoError),
}

/// Runs one guest until the gate stops it, its host dies, a read differs
/// from the model, or an I/O error.
pub(crate) fn spawn_worker(
    guest: Arc<Guest>,
    gate: Arc<Gate>,
    mix: Mix,
    max_io: u64,
) -> std::thread::JoinHandle<WorkerEnd> {
    gate.join();
    std::thread::Builder::new()
        .name(format!("guest-{}", guest.side))
        .spawn(move || {
            let end = worker(&guest, &gate, mix, max_io);
            gate.leave();
            end
        })
        .expect("spawn a guest thread")
}

fn worker(g: &Guest, gate: &Gate, mix: Mix, max_io: u64) -> WorkerEnd {
    let mut buf = vec![0u8; max_io as usize];
    let size = g.client.size();
    while gate.enter() {
        let mut st = g.state.lock();
        let op = st.gen.next_op(&mix, size, max_io);
        let res = match op {
            Op::Write { offset, len } => {
                let data = &mut buf[..len as usize];
                st.gen.rng.fill(data);
                let r = g.client.write(offset, data, false);
                if r.is_ok() {
                    st.apply(offset, data);
                    g.stats.writes.fetch_add(1, Ordering::Relaxed);
                    g.stats.bytes_written.fetch_add(len, Ordering::Relaxed);
                }
                r.map_err(|e| (op, "write", offset, len, e))
            }
            Op::Read { offset, len } => {
                let data = &mut buf[..len as usize];
                match g.client.read(offset, data) {
                    Ok(()) => {
                        g.stats.reads.fetch_add(1, Ordering::Relaxed);
                        g.stats.bytes_read.fetch_add(len, Ordering::Relaxed);
                        let want = &st.model[offset as usize..(offset + len) as usize];
                        if let Some(i) = first_difference(want, data) {
                            return WorkerEnd::Mismatch(Mismatch {
                                side: g.side,
                                offset: offset + i as u64,
                                expected: want[i],
                                found: data[i],
                            });
                        }
                        Ok(())
                    }
                    Err(e) => Err((op, "read", offset, len, e)),
                }
            }
            Op::Flush => match g.client.flush() {
                Ok(()) => {
                    g.stats.flushes.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => Err((op, "flush", 0, 0, e)),
            },
        };
        if let Err((_, op, offset, len, source)) = res {
            if g.dying.load(Ordering::SeqCst) {
                return WorkerEnd::Stopped;
            }
            return WorkerEnd::Error(DemoError::Nbd {
                side: g.side,
                op,
                offset,
                len,
                source,
            });
        }
    }
    WorkerEnd::Stopped
}

/// Index of the first byte where `a` and `b` differ (compared in 8-byte
/// words first).
pub(crate) fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 4096 <= n {
        if a[i..i + 4096] != b[i..i + 4096] {
            break;
        }
        i += 4096;
    }
    (i..n)
        .find(|&j| a[j] != b[j])
        .or((a.len() != b.len()).then_some(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_rejects() {
        assert_eq!(
            Mix::parse("write=60,read=35,flush=5").unwrap(),
            Mix {
                write: 60,
                read: 35,
                flush: 5
            }
        );
        assert_eq!(
            Mix::parse("read=1").unwrap(),
            Mix {
                write: 0,
                read: 1,
                flush: 0
            }
        );
        assert!(Mix::parse("write=0").unwrap_err().contains("non-zero"));
        assert!(Mix::parse("trim=3")
            .unwrap_err()
            .contains("unknown kind 'trim'"));
        assert!(Mix::parse("write").unwrap_err().contains("KIND=WEIGHT"));
        assert!(Mix::parse("write=x").unwrap_err().contains("not a number"));
    }

    #[test]
    fn ops_stay_in_bounds_aligned_and_follow_the_mix() {
        let mix = Mix::parse("write=50,read=50").unwrap();
        let mut g = Generator {
            rng: Rng(3),
            ops: 0,
        };
        let size = 8 << 20;
        let (mut w, mut r) = (0, 0);
        let mut sizes = std::collections::BTreeSet::new();
        for _ in 0..10_000 {
            match g.next_op(&mix, size, 256 << 10) {
                Op::Write { offset, len } | Op::Read { offset, len } => {
                    assert!(offset % 512 == 0 && len % 512 == 0 && len > 0);
                    assert!(offset + len <= size && len <= 256 << 10);
                    sizes.insert(len);
                }
                Op::Flush => panic!("no flush in this mix"),
            }
            match g.next_op(&mix, size, 4096) {
                Op::Write { .. } => w += 1,
                Op::Read { .. } => r += 1,
                Op::Flush => panic!("no flush in this mix"),
            }
        }
        assert_eq!(g.ops, 20_000);
        assert!((4000..6000).contains(&w) && w + r == 10_000, "{w} {r}");
        assert!(sizes.contains(&512) && sizes.contains(&(256 << 10)) && sizes.len() > 20);
        // Same seed, same sequence.
        let mut a = Generator {
            rng: Rng(9),
            ops: 0,
        };
        let mut b = a;
        for _ in 0..100 {
            assert_eq!(a.next_op(&mix, size, 65536), b.next_op(&mix, size, 65536));
        }
    }

    #[test]
    fn dirty_tracking_marks_each_block_once() {
        let mut s = GuestState::new(1, vec![0; 64 * 1024]);
        s.apply(4000, &[1; 200]); // blocks 0 and 1
        s.apply(4096, &[2; 4096]); // block 1 again
        s.mark(60 * 1024, 4096); // block 15
        assert_eq!(s.dirty, vec![0, 1, 15]);
        assert_eq!(s.model[3999], 0);
        assert_eq!(s.model[4000], 1);
        assert_eq!(s.model[4095], 1);
        assert_eq!(s.model[4096], 2);
        assert_eq!(s.clear_dirty(), vec![0, 1, 15]);
        s.mark(0, 1);
        assert_eq!(s.dirty, vec![0]);
    }

    #[test]
    fn first_difference_finds_the_first_byte() {
        let a = vec![7u8; 10_000];
        let mut b = a.clone();
        assert_eq!(first_difference(&a, &b), None);
        b[9000] = 1;
        b[9999] = 2;
        assert_eq!(first_difference(&a, &b), Some(9000));
        assert_eq!(first_difference(&a[..5], &b[..4]), Some(4));
    }
}
