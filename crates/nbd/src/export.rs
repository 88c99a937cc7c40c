//! What the server exports: the [`Export`] trait, and two implementations
//! (an in-memory disk for tests, a raw file for benchmarks and tools).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use parking_lot::RwLock;

use crate::error::{ErrorKind, NbdError, Result};

/// One run of the `base:allocation` map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never 0).
    pub len: u64,
    /// Unallocated (NBD_STATE_HOLE).
    pub hole: bool,
    /// Reads as zeroes (NBD_STATE_ZERO).
    pub zero: bool,
}

/// A block device the server can export. Bounds are checked by the server
/// before any call, so implementations see only in-range requests.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `data` at `offset`; with `fua` it is durable before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()>;
    /// Makes every acknowledged write durable.
    fn flush(&self) -> Result<()>;
    /// Hint that a range is no longer needed; it may read back as anything until rewritten.
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Makes a range read as zeroes. `may_trim`: a hole may be punched (no NO_HOLE flag).
    /// `fast`: fail with [`ErrorKind::NotSupported`] rather than write zeroes slowly.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fast: bool) -> Result<()>;
    /// The allocation map of `[offset, offset+len)`; extents must be contiguous from
    /// `offset`, non-empty, and may stop before `offset+len` (the client asks again).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent {
            len,
            hole: false,
            zero: false,
        }])
    }
    /// Prefetch hint.
    fn cache(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Whether the export refuses writes.
    fn is_read_only(&self) -> bool {
        false
    }
    /// Whether flush on one connection covers writes of all connections.
    fn can_multi_conn(&self) -> bool {
        true
    }
}

const MEM_BLOCK: u64 = 4096;

struct MemState {
    data: Vec<u8>,
    /// One bit per 4 KiB block: written since the last hole punch.
    allocated: Vec<u64>,
}

impl MemState {
    fn is_alloc(&self, block: u64) -> bool {
        self.allocated[(block / 64) as usize] & (1 << (block % 64)) != 0
    }
    fn set_alloc(&mut self, block: u64, v: bool) {
        let w = &mut self.allocated[(block / 64) as usize];
        if v {
            *w |= 1 << (block % 64);
        } else {
            *w &= !(1 << (block % 64));
        }
    }
}

/// An in-memory disk with a 4 KiB allocation map, for tests and examples.
pub struct MemExport {
    size: u64,
    read_only: bool,
    state: RwLock<MemState>,
}

impl MemExport {
    /// A zeroed, fully unallocated disk of `size` bytes.
    pub fn new(size: u64) -> MemExport {
        let blocks = size.div_ceil(MEM_BLOCK);
        MemExport {
            size,
            read_only: false,
            state: RwLock::new(MemState {
                data: vec![0; size as usize],
                allocated: vec![0; blocks.div_ceil(64) as usize],
            }),
        }
    }

    /// The same disk, refusing writes.
    pub fn read_only(mut self) -> MemExport {
        self.read_only = true;
        self
    }

    /// A copy of the whole contents, for test assertions.
    pub fn snapshot(&self) -> Vec<u8> {
        self.state.read().data.clone()
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let s = self.state.read();
        let o = offset as usize;
        buf.copy_from_slice(&s.data[o..o + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<()> {
        if self.read_only {
            return Err(NbdError::new(ErrorKind::PermissionDenied, "read-only"));
        }
        let mut s = self.state.write();
        let o = offset as usize;
        s.data[o..o + data.len()].copy_from_slice(data);
        if !data.is_empty() {
            for b in offset / MEM_BLOCK..=(offset + data.len() as u64 - 1) / MEM_BLOCK {
                s.set_alloc(b, true);
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, _fast: bool) -> Result<()> {
        if self.read_only {
            return Err(NbdError::new(ErrorKind::PermissionDenied, "read-only"));
        }
        if len == 0 {
            return Ok(());
        }
        let mut s = self.state.write();
        let o = offset as usize;
        s.data[o..o + len as usize].fill(0);
        let end = offset + len;
        for b in offset / MEM_BLOCK..=(end - 1) / MEM_BLOCK {
            let bs = b * MEM_BLOCK;
            let be = (bs + MEM_BLOCK).min(self.size);
            let whole = bs >= offset && be <= end;
            if may_trim && whole {
                s.set_alloc(b, false);
            } else {
                s.set_alloc(b, true);
            }
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let s = self.state.read();
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / MEM_BLOCK;
            let alloc = s.is_alloc(b);
            let next = ((b + 1) * MEM_BLOCK).min(end);
            let l = next - pos;
            match out.last_mut() {
                Some(e) if e.hole != alloc => e.len += l,
                _ => out.push(Extent {
                    len: l,
                    hole: !alloc,
                    zero: !alloc,
                }),
            }
            pos = next;
        }
        Ok(out)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// A raw image file exported as is (positional I/O, `fdatasync` for flush,
/// hole punching for trim/zero, `SEEK_DATA`/`SEEK_HOLE` for block status).
pub struct FileExport {
    file: File,
    size: u64,
    read_only: bool,
}

impl FileExport {
    /// Opens `path`, read-write unless `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<FileExport> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| NbdError::io(format!("open {}", path.display()), e))?;
        let size = file
            .metadata()
            .map_err(|e| NbdError::io(format!("stat {}", path.display()), e))?
            .len();
        Ok(FileExport {
            file,
            size,
            read_only,
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate on a valid open fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> Option<u64> {
        // SAFETY: lseek on a valid fd; it moves only this fd's offset, which we never use
        // (all data I/O is positional).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            None
        } else {
            Some(r as u64)
        }
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| NbdError::io(format!("read {} bytes at {offset}", buf.len()), e))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| NbdError::io(format!("write {} bytes at {offset}", data.len()), e))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| NbdError::io("fdatasync", e))
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        // A hint: if the file system can't punch holes, doing nothing is correct.
        let _ = self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        );
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fast: bool) -> Result<()> {
        let ctx = || format!("write zeroes {len} bytes at {offset}");
        let mode = if may_trim {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if self.fallocate(mode, offset, len).is_ok() {
            return Ok(());
        }
        if fast {
            return Err(NbdError::new(ErrorKind::NotSupported, ctx()));
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], pos)
                .map_err(|e| NbdError::io(ctx(), e))?;
            pos += n as u64;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset + len;
        let data = match self.seek(offset, libc::SEEK_DATA) {
            Some(d) => d,
            // ENXIO: no data after offset, all hole.
            None => {
                return Ok(vec![Extent {
                    len,
                    hole: true,
                    zero: true,
                }])
            }
        };
        if data > offset {
            return Ok(vec![Extent {
                len: data.min(end) - offset,
                hole: true,
                zero: true,
            }]);
        }
        let hole = self.seek(offset, libc::SEEK_HOLE).unwrap_or(end);
        Ok(vec![Extent {
            len: hole.clamp(offset + 1, end) - offset,
            hole: false,
            zero: false,
        }])
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_export_allocation_map() {
        let m = MemExport::new(64 * 1024);
        assert_eq!(
            m.block_status(0, 65536).unwrap(),
            vec![Extent {
                len: 65536,
                hole: true,
                zero: true
            }]
        );
        m.write(4096, &[1; 100], false).unwrap();
        let e = m.block_status(0, 65536).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[1],
            Extent {
                len: 4096,
                hole: false,
                zero: false
            }
        );
        m.write_zeroes(4096, 4096, true, false).unwrap();
        assert_eq!(m.block_status(0, 65536).unwrap().len(), 1);
        m.write_zeroes(0, 10, false, false).unwrap();
        assert!(!m.block_status(0, 1).unwrap()[0].hole);
    }

    #[test]
    fn file_export_zero_and_status() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        drop(f);
        let e = FileExport::open(&p, false).unwrap();
        e.write(65536, &[7; 65536], false).unwrap();
        let mut b = vec![0; 4];
        e.read(65536, &mut b).unwrap();
        assert_eq!(b, vec![7; 4]);
        let s = e.block_status(65536, 65536).unwrap();
        assert!(!s[0].hole);
        e.write_zeroes(65536, 65536, true, false).unwrap();
        e.read(65536, &mut b).unwrap();
        assert_eq!(b, vec![0; 4]);
    }
}
