//! Where image bytes live: a small positional-I/O trait with a file, an
//! in-memory and a crash-simulating implementation.

use parking_lot::Mutex;
use parking_lot::RwLock;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Positional byte storage under an image (the image file, or a block-graph child).
///
/// Reads past the end of the storage return zeros (an image file may end in
/// the middle of a cluster). Writes past the end extend it.
#[allow(clippy::len_without_is_empty)] // a storage is never "empty" in a useful sense
pub trait Storage: Send + Sync {
    /// Read `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `buf` at `offset`, extending the storage when needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Write `buf` at `offset` and make this write durable before returning;
    /// other writes not yet flushed may stay volatile (a file uses
    /// `RWF_DSYNC`: no write-back of the rest of the page cache). The
    /// default writes and then flushes everything.
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        self.flush()
    }
    /// The current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncate or extend to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Release the bytes of a range (they then read as zeros). Optional: the
    /// default says "not supported" and callers treat it as a hint.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "discard not supported by this storage",
        ))
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_durable(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        (**self).discard(offset, len)
    }
}

impl Storage for File {
    fn read_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match FileExt::read_at(self, buf, offset) {
                Ok(0) => {
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.sync_data()
    }
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        block_graph::drivers::file::write_all_at_dsync(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "discard range too large",
            ));
        };
        // SAFETY: fallocate on a file descriptor we own for the duration of
        // the call; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// A growable byte vector as storage, for tests and scratch images.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }
    /// A storage holding `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        MemStorage {
            data: RwLock::new(bytes),
        }
    }
    /// A copy of the current contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().clone()
    }
}

fn mem_read(data: &[u8], buf: &mut [u8], offset: u64) {
    buf.fill(0);
    let len = data.len() as u64;
    if offset >= len {
        return;
    }
    let start = offset as usize;
    let n = buf.len().min(data.len() - start);
    buf[..n].copy_from_slice(&data[start..start + n]);
}

fn mem_write(data: &mut Vec<u8>, buf: &[u8], offset: u64) -> io::Result<()> {
    let end = offset
        .checked_add(buf.len() as u64)
        .filter(|&e| e <= MEM_LIMIT)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "memory storage limit"))?;
    if data.len() < end as usize {
        data.resize(end as usize, 0);
    }
    data[offset as usize..end as usize].copy_from_slice(buf);
    Ok(())
}

/// In-memory storages refuse to grow past this (tests must never eat the machine).
pub const MEM_LIMIT: u64 = 1 << 32;

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        mem_read(&self.data.read(), buf, offset);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        mem_write(&mut self.data.write(), buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > MEM_LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "memory storage limit",
            ));
        }
        self.data.write().resize(len as usize, 0);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.data.write();
        let dl = d.len() as u64;
        let s = offset.min(dl) as usize;
        let e = offset.saturating_add(len).min(dl) as usize;
        d[s..e].fill(0);
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug)]
struct CrashState {
    durable: Vec<u8>,
    volatile: Vec<u8>,
    pending: Vec<Pending>,
    ops_left: Option<u64>,
    ops: u64,
}

/// A storage that simulates power loss: it keeps a durable image and the
/// writes since the last completed flush. [`CrashStorage::crash`] returns what
/// a disk could hold after a crash: the durable image plus a random subset of
/// the unflushed writes, torn at 512-byte sectors and applied in random order.
/// [`CrashStorage::fail_after`] makes every operation fail after a number of
/// operations, so that a crash can hit any point of an image operation.
#[derive(Debug)]
pub struct CrashStorage {
    st: Mutex<CrashState>,
}

/// The sector size at which [`CrashStorage`] tears unflushed writes.
pub const CRASH_SECTOR: u64 = 512;

/// A small deterministic random generator (xorshift64*), for tests.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (any value).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// A value in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

impl CrashStorage {
    /// A crash storage whose durable and current contents are `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        CrashStorage {
            st: Mutex::new(CrashState {
                durable: bytes.clone(),
                volatile: bytes,
                pending: Vec::new(),
                ops_left: None,
                ops: 0,
            }),
        }
    }

    /// After `n` more operations (reads, writes, flushes...), every operation fails
    /// as if the power went off. `None` disarms.
    pub fn fail_after(&self, n: Option<u64>) {
        self.st.lock().ops_left = n;
    }

    /// How many operations were issued so far.
    pub fn ops(&self) -> u64 {
        self.st.lock().ops
    }

    /// The current (volatile) contents.
    pub fn current(&self) -> Vec<u8> {
        self.st.lock().volatile.clone()
    }

    /// The contents after a power loss now: the durable image plus, when
    /// `keep` is given, a random subset of the unflushed writes (torn at
    /// [`CRASH_SECTOR`] granularity, applied in random order). `keep = None`
    /// drops every unflushed write.
    pub fn crash(&self, keep: Option<&mut Rng>) -> Vec<u8> {
        let st = self.st.lock();
        let mut img = st.durable.clone();
        let Some(rng) = keep else {
            return img;
        };
        // Split into sector pieces, keep each with probability 1/2, shuffle.
        let mut pieces: Vec<Pending> = Vec::new();
        for p in &st.pending {
            match p {
                Pending::Write(off, data) => {
                    let mut pos = 0usize;
                    while pos < data.len() {
                        let o = off + pos as u64;
                        let to_boundary = (CRASH_SECTOR - o % CRASH_SECTOR) as usize;
                        let n = to_boundary.min(data.len() - pos);
                        if rng.below(2) == 0 {
                            pieces.push(Pending::Write(o, data[pos..pos + n].to_vec()));
                        }
                        pos += n;
                    }
                }
                Pending::SetLen(l) => {
                    if rng.below(2) == 0 {
                        pieces.push(Pending::SetLen(*l));
                    }
                }
            }
        }
        for i in (1..pieces.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            pieces.swap(i, j);
        }
        for p in pieces {
            match p {
                Pending::Write(off, data) => {
                    let _ = mem_write(&mut img, &data, off);
                }
                Pending::SetLen(l) => img.resize(l as usize, 0),
            }
        }
        img
    }

    fn tick(st: &mut CrashState) -> io::Result<()> {
        st.ops += 1;
        if let Some(left) = st.ops_left.as_mut() {
            if *left == 0 {
                return Err(io::Error::other("simulated power loss"));
            }
            *left -= 1;
        }
        Ok(())
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        Self::tick(&mut st)?;
        mem_read(&st.volatile, buf, offset);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        Self::tick(&mut st)?;
        mem_write(&mut st.volatile, buf, offset)?;
        st.pending.push(Pending::Write(offset, buf.to_vec()));
        Ok(())
    }
    /// Durable at once, without flushing the other pending writes. The
    /// page cache holds only the newest bytes, so what a pending write
    /// still carries for this range is replaced by them (a crash cannot
    /// bring older bytes back over a durable write).
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        Self::tick(&mut st)?;
        mem_write(&mut st.volatile, buf, offset)?;
        mem_write(&mut st.durable, buf, offset)?;
        let end = offset + buf.len() as u64;
        for p in &mut st.pending {
            if let Pending::Write(o, data) = p {
                let pend = *o + data.len() as u64;
                let (lo, hi) = ((*o).max(offset), pend.min(end));
                if lo < hi {
                    data[(lo - *o) as usize..(hi - *o) as usize]
                        .copy_from_slice(&buf[(lo - offset) as usize..(hi - offset) as usize]);
                }
            }
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let mut st = self.st.lock();
        Self::tick(&mut st)?;
        let pending = std::mem::take(&mut st.pending);
        for p in pending {
            match p {
                Pending::Write(off, data) => mem_write(&mut st.durable, &data, off)?,
                Pending::SetLen(l) => st.durable.resize(l as usize, 0),
            }
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        let mut st = self.st.lock();
        Self::tick(&mut st)?;
        Ok(st.volatile.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.st.lock();
        Self::tick(&mut st)?;
        if len > MEM_LIMIT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "memory storage limit",
            ));
        }
        st.volatile.resize(len as usize, 0);
        st.pending.push(Pending::SetLen(len));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_drops_unflushed_and_keeps_flushed() {
        let s = CrashStorage::new(vec![0; 1024]);
        s.write_at(&[1; 512], 0).unwrap();
        s.flush().unwrap();
        s.write_at(&[2; 512], 512).unwrap();
        let img = s.crash(None);
        assert_eq!(&img[..512], &[1; 512][..]);
        assert_eq!(&img[512..], &[0; 512][..]);
        let mut buf = [0u8; 4];
        s.read_at(&mut buf, 510).unwrap();
        assert_eq!(buf, [1, 1, 2, 2]);
    }

    #[test]
    fn fail_after_stops_everything() {
        let s = CrashStorage::new(Vec::new());
        s.fail_after(Some(1));
        s.write_at(&[1], 0).unwrap();
        assert!(s.write_at(&[1], 0).is_err());
        assert!(s.flush().is_err());
    }

    #[test]
    fn mem_reads_past_end_are_zero() {
        let s = MemStorage::from_vec(vec![7; 10]);
        let mut b = [9u8; 20];
        s.read_at(&mut b, 5).unwrap();
        assert_eq!(&b[..5], &[7; 5]);
        assert_eq!(&b[5..], &[0; 15]);
    }
}
