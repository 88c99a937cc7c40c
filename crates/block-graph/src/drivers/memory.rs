//! `memory`: a sparse in-memory image with optional backing, for tests and as
//! the active/hidden disks of test setups. Options: `size` (bytes; defaults to
//! the backing's length), `cluster-size` (allocation unit, power of two, default
//! 64 KiB), `align` (request alignment, default 1), `backing` (child).
//!
//! Never-written clusters are unallocated (read from the backing, zeros past its
//! end or without one); a partial write to an unallocated cluster copies the rest
//! of the cluster from the backing first. Discard and write-zeroes leave zero
//! clusters (or, without a backing, nothing). `make_empty`, `truncate`, block
//! status and reads cost what is allocated, not the virtual size.
//!
//! Cluster buffers dropped by `make_empty` and `truncate` are not freed on the
//! spot: up to [`FREE_POOL_BYTES`] per node are kept for the next writes, the
//! rest is freed on a background thread (see [`MemoryDriver::make_empty`] for
//! why).

use crate::driver::{read_backing, BlockStatus, Driver, Mapping, Role, WriteFlags, ZeroFlags};
use crate::error::{Error, Result};
use crate::graph::OpenContext;
use crate::node::Node;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

/// Bytes of dropped cluster buffers a `memory` node keeps for reuse (64 MiB:
/// a checkpoint period of 1,000 dirty 64 KiB clusters fits).
pub const FREE_POOL_BYTES: u64 = 64 << 20;

/// Frees buffers on a background thread ("memory-free"), started on first use;
/// frees inline if the thread cannot be started.
fn free_in_background(bufs: Vec<Box<[u8]>>) {
    type Bufs = Vec<Box<[u8]>>;
    static TX: OnceLock<Option<crossbeam_channel::Sender<Bufs>>> = OnceLock::new();
    let tx = TX.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded::<Bufs>();
        std::thread::Builder::new()
            .name("memory-free".into())
            .spawn(move || rx.iter().for_each(drop))
            .ok()
            .map(|_| tx)
    });
    match tx {
        Some(tx) => {
            // The receiver lives as long as the process; if it is gone the
            // buffers come back in the error and are dropped here.
            let _ = tx.send(bufs);
        }
        None => drop(bufs),
    }
}

enum Chunk {
    Data(Box<[u8]>),
    Zero,
}

struct State {
    size: u64,
    /// Bytes at or past this offset never come from the backing (area grown by truncate).
    cutoff: u64,
    chunks: BTreeMap<u64, Chunk>,
}

/// The `memory` driver.
pub struct MemoryDriver {
    cs: u64,
    align: u64,
    st: RwLock<State>,
    /// Dropped cluster buffers kept for reuse (at most [`FREE_POOL_BYTES`]).
    /// Lock order: `st` before `pool`.
    pool: Mutex<Vec<Box<[u8]>>>,
}

#[derive(PartialEq, Clone, Copy)]
enum Class {
    Data,
    Zero,
    Unalloc,
}

impl MemoryDriver {
    /// Opens from options (see the module docs).
    pub fn open(ctx: &mut OpenContext<'_>) -> Result<Box<dyn Driver>> {
        let backing = ctx.open_child("backing", Role::Backing, false)?;
        let o = ctx.options();
        let size = match (o.take_u64("size")?, &backing) {
            (Some(s), _) => s,
            (None, Some(b)) => b.len(),
            (None, None) => return Err(o.missing("size")),
        };
        let cs = o.take_u64("cluster-size")?.unwrap_or(65536);
        if !cs.is_power_of_two() || cs > (16 << 20) {
            return Err(Error::invalid(format!(
                "driver 'memory': option 'cluster-size' must be a power of two up to 16 MiB, got {cs}"
            )));
        }
        let align = o.take_u64("align")?.unwrap_or(1);
        if !align.is_power_of_two() || align > cs {
            return Err(Error::invalid(format!(
                "driver 'memory': option 'align' must be a power of two not above cluster-size, got {align}"
            )));
        }
        Ok(Box::new(MemoryDriver {
            cs,
            align,
            st: RwLock::new(State {
                size,
                cutoff: size,
                chunks: BTreeMap::new(),
            }),
            pool: Mutex::new(Vec::new()),
        }))
    }

    /// Bytes allocated (data clusters), for tests of "cost follows the work".
    pub fn allocated_bytes(&self) -> u64 {
        self.st
            .read()
            .chunks
            .values()
            .filter(|c| matches!(c, Chunk::Data(_)))
            .count() as u64
            * self.cs
    }

    /// Number of clusters with an entry (data or zero).
    pub fn allocated_clusters(&self) -> usize {
        self.st.read().chunks.len()
    }

    /// Bytes of dropped cluster buffers kept for reuse (at most [`FREE_POOL_BYTES`]).
    pub fn pooled_bytes(&self) -> u64 {
        self.pool.lock().len() as u64 * self.cs
    }

    /// A cluster buffer, from the pool when it has one. `zeroed`: the caller
    /// needs zeros (it will not overwrite the whole buffer).
    fn alloc(&self, zeroed: bool) -> Box<[u8]> {
        match self.pool.lock().pop() {
            Some(mut b) => {
                if zeroed {
                    b.fill(0);
                }
                b
            }
            None => vec![0u8; self.cs as usize].into_boxed_slice(),
        }
    }

    /// Takes dropped chunks: data buffers go to the pool up to its bound, the
    /// rest to the background free thread. Costs O(number of chunks).
    fn recycle(&self, chunks: impl Iterator<Item = Chunk>) {
        let cap = (FREE_POOL_BYTES / self.cs).max(1) as usize;
        let mut excess = Vec::new();
        {
            let mut pool = self.pool.lock();
            for c in chunks {
                if let Chunk::Data(b) = c {
                    if pool.len() < cap {
                        pool.push(b);
                    } else {
                        excess.push(b);
                    }
                }
            }
        }
        if !excess.is_empty() {
            free_in_background(excess);
        }
    }

    fn backed(&self, node: &Node, pos: u64, cutoff: u64) -> bool {
        pos < cutoff && node.backing().is_some()
    }

    /// Content the cluster at `start` has while unallocated.
    fn underlying(&self, node: &Node, start: u64, cutoff: u64) -> Result<Box<[u8]>> {
        let mut b = self.alloc(true);
        if start < cutoff {
            let n = (cutoff - start).min(self.cs) as usize;
            read_backing(node, start, &mut b[..n])?;
        }
        Ok(b)
    }

    fn write_inner(&self, node: &Node, offset: u64, buf: &[u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let cs = self.cs;
        let end = offset + buf.len() as u64;
        loop {
            // Clusters that need their old content (partial writes to unallocated clusters).
            let (need, cutoff): (Vec<u64>, u64) = {
                let st = self.st.read();
                let mut v = Vec::new();
                let mut pos = offset;
                while pos < end {
                    let idx = pos / cs;
                    let cstart = idx * cs;
                    let n = (cstart + cs).min(end) - pos;
                    if n < cs && !st.chunks.contains_key(&idx) {
                        v.push(idx);
                    }
                    pos += n;
                }
                (v, st.cutoff)
            };
            let mut pre: HashMap<u64, Box<[u8]>> = HashMap::new();
            for idx in &need {
                pre.insert(*idx, self.underlying(node, idx * cs, cutoff)?);
            }
            let mut st = self.st.write();
            if st.cutoff != cutoff {
                continue;
            }
            let missing = (offset / cs..=(end - 1) / cs).any(|idx| {
                let cstart = idx * cs;
                let full = cstart >= offset && cstart + cs <= end;
                !full && !st.chunks.contains_key(&idx) && !pre.contains_key(&idx)
            });
            if missing {
                continue;
            }
            let mut pos = offset;
            while pos < end {
                let idx = pos / cs;
                let cstart = idx * cs;
                let within = (pos - cstart) as usize;
                let n = ((cstart + cs).min(end) - pos) as usize;
                let src = &buf[(pos - offset) as usize..(pos - offset) as usize + n];
                let entry = st
                    .chunks
                    .entry(idx)
                    .or_insert_with(|| match pre.remove(&idx) {
                        Some(b) => Chunk::Data(b),
                        None => Chunk::Zero,
                    });
                if let Chunk::Zero = entry {
                    // A write of the whole cluster overwrites every byte.
                    *entry = Chunk::Data(self.alloc(n as u64 != cs));
                }
                if let Chunk::Data(d) = entry {
                    d[within..within + n].copy_from_slice(src);
                }
                pos += n as u64;
            }
            return Ok(());
        }
    }

    fn zero_inner(&self, node: &Node, offset: u64, len: u64, unmap: bool) -> Result<()> {
        let cs = self.cs;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let idx = pos / cs;
            let cstart = idx * cs;
            let n = (cstart + cs).min(end) - pos;
            if n < cs {
                let (present, cutoff) = {
                    let st = self.st.read();
                    (
                        st.chunks.get(&idx).map(|c| matches!(c, Chunk::Data(_))),
                        st.cutoff,
                    )
                };
                match present {
                    Some(false) => {}
                    None if !self.backed(node, pos, cutoff) => {}
                    _ => self.write_inner(node, pos, &vec![0u8; n as usize])?,
                }
            } else {
                let mut st = self.st.write();
                let backed = self.backed(node, cstart, st.cutoff);
                if unmap && !backed {
                    st.chunks.remove(&idx);
                } else {
                    st.chunks.insert(idx, Chunk::Zero);
                }
            }
            pos += n;
        }
        Ok(())
    }
}

impl Driver for MemoryDriver {
    fn format_name(&self) -> &str {
        "memory"
    }

    fn length(&self, _node: &Node) -> Result<u64> {
        Ok(self.st.read().size)
    }

    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.cs;
        let end = offset + buf.len() as u64;
        let mut holes: Vec<(u64, u64)> = Vec::new();
        let cutoff;
        {
            let st = self.st.read();
            cutoff = st.cutoff;
            let mut pos = offset;
            while pos < end {
                let idx = pos / cs;
                let cstart = idx * cs;
                let within = (pos - cstart) as usize;
                let n = (cstart + cs).min(end) - pos;
                let dst = &mut buf[(pos - offset) as usize..(pos - offset + n) as usize];
                match st.chunks.get(&idx) {
                    Some(Chunk::Data(d)) => dst.copy_from_slice(&d[within..within + n as usize]),
                    Some(Chunk::Zero) => dst.fill(0),
                    None => match holes.last_mut() {
                        Some((s, l)) if *s + *l == pos => *l += n,
                        _ => holes.push((pos, n)),
                    },
                }
                pos += n;
            }
        }
        for (s, l) in holes {
            let dst = &mut buf[(s - offset) as usize..(s - offset + l) as usize];
            let from_backing = cutoff.saturating_sub(s).min(l) as usize;
            read_backing(node, s, &mut dst[..from_backing])?;
            dst[from_backing..].fill(0);
        }
        Ok(())
    }

    fn write(&self, node: &Node, offset: u64, buf: &[u8], _flags: WriteFlags) -> Result<()> {
        self.write_inner(node, offset, buf)
    }

    fn flush(&self, _node: &Node) -> Result<()> {
        Ok(())
    }

    fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.zero_inner(node, offset, len, true)
    }

    fn write_zeroes(&self, node: &Node, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.zero_inner(node, offset, len, flags.may_unmap)
    }

    fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<BlockStatus> {
        let cs = self.cs;
        let st = self.st.read();
        let end = offset + len;
        let has_backing = node.backing().is_some();
        let class_at = |idx: u64| -> Class {
            match st.chunks.get(&idx) {
                Some(Chunk::Data(_)) => Class::Data,
                Some(Chunk::Zero) => Class::Zero,
                None if has_backing && idx * cs >= st.cutoff => Class::Zero,
                None => Class::Unalloc,
            }
        };
        let first = offset / cs;
        let c = class_at(first);
        let mut run_end = ((first + 1) * cs).min(end);
        match c {
            Class::Unalloc => {
                let next = st
                    .chunks
                    .range(first + 1..)
                    .next()
                    .map(|(k, _)| k * cs)
                    .unwrap_or(u64::MAX);
                let mut e = next.min(end);
                if has_backing {
                    e = e.min(st.cutoff.max(run_end));
                }
                run_end = e.max(run_end);
            }
            _ => {
                let mut idx = first + 1;
                while idx * cs < end && class_at(idx) == c {
                    idx += 1;
                    run_end = (idx * cs).min(end);
                }
            }
        }
        let mapping = match c {
            Class::Data => Mapping::Data,
            Class::Zero => Mapping::Zero,
            Class::Unalloc => Mapping::Unallocated,
        };
        Ok(BlockStatus {
            mapping,
            len: run_end - offset,
        })
    }

    fn truncate(&self, _node: &Node, len: u64) -> Result<()> {
        let cs = self.cs;
        let mut st = self.st.write();
        if len < st.size {
            let first_gone = len.div_ceil(cs);
            let gone = st.chunks.split_off(&first_gone);
            self.recycle(gone.into_values());
            if len % cs != 0 {
                let idx = len / cs;
                let within = (len % cs) as usize;
                if let Some(Chunk::Data(d)) = st.chunks.get_mut(&idx) {
                    d[within..].fill(0);
                }
            }
            st.cutoff = st.cutoff.min(len);
        }
        st.size = len;
        Ok(())
    }

    /// Empties the layer in O(allocated clusters), without freeing memory on
    /// the caller's thread.
    ///
    /// Freeing the buffers here made this slow: with 1,000 dirty 64 KiB
    /// clusters, `chunks.clear()` took tens of milliseconds (README), because
    /// glibc hands the freed 64 MiB back to the kernel (heap trim), and the
    /// next checkpoint period then page-faults the same amount back in. A
    /// COLO active/hidden disk dirties about as much every period, so the
    /// buffers are kept in a bounded pool ([`FREE_POOL_BYTES`]) that the next
    /// writes take from (zeroing only buffers that are not fully
    /// overwritten). What exceeds the bound goes to one background thread to
    /// be freed, so a very large make_empty does not stall the caller either
    /// (a background thread alone would still pay the trim and the page
    /// faults, just elsewhere).
    fn make_empty(&self, _node: &Node) -> Result<()> {
        let chunks = std::mem::take(&mut self.st.write().chunks);
        self.recycle(chunks.into_values());
        Ok(())
    }

    fn supports_make_empty(&self) -> bool {
        true
    }

    fn request_alignment(&self) -> u64 {
        self.align
    }

    fn accepts_child(&self, role: &Role) -> bool {
        *role == Role::Backing
    }
}
