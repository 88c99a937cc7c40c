//! `file`: a host file with positional I/O. Options: `filename` (required),
//! `cache: {"direct": bool, "no-flush": bool}` (O_DIRECT with 4 KiB alignment;
//! skip fdatasync), `aio` ("threads" only), `locking` ("auto"/"on"/"off",
//! accepted for compatibility: no lock is taken).
//!
//! Discard punches a hole (fallocate), write-zeroes punches a hole (may-unmap)
//! or uses FALLOC_FL_ZERO_RANGE, flush is fdatasync, block status uses
//! SEEK_DATA/SEEK_HOLE (holes are reported as zero).

use crate::driver::{BlockStatus, Driver, Mapping, ReopenOpts, WriteFlags, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};
use crate::graph::OpenContext;
use crate::node::Node;
use parking_lot::{Mutex, RwLock};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const DIRECT_ALIGN: usize = 4096;

/// Creates (or truncates) a host file of `size` bytes, sparse.
pub fn create_file(path: &Path, size: u64) -> Result<()> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::from_io(e, format!("cannot create '{}'", path.display())))?;
    f.set_len(size)
        .map_err(|e| Error::from_io(e, format!("cannot resize '{}'", path.display())))
}

/// The `file` driver.
pub struct FileDriver {
    path: PathBuf,
    direct: bool,
    no_flush: bool,
    file: RwLock<File>,
    pending: Mutex<Option<File>>,
}

fn open_file(path: &Path, read_only: bool, direct: bool) -> Result<File> {
    let mut oo = OpenOptions::new();
    oo.read(true).write(!read_only);
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    oo.open(path).map_err(|e| {
        if direct && e.raw_os_error() == Some(libc::EINVAL) {
            Error::new(
                ErrorKind::NotSupported,
                format!("cannot open '{}' with cache.direct=on: the file system does not support O_DIRECT", path.display()),
            )
            .with_source(e)
        } else {
            Error::from_io(e, format!("cannot open '{}'", path.display()))
        }
    })
}

/// A heap buffer aligned for O_DIRECT (over-allocated, safely sliced).
struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let v = vec![0u8; len + DIRECT_ALIGN];
        let start = v.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { v, start, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
    fn as_ref(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }
}

/// `pwritev2(RWF_DSYNC)` of the whole buffer: each call returns once its
/// bytes (and the file metadata needed to read them) are durable, without
/// writing back the file's other dirty pages. Where the kernel or file
/// system refuses the flag: a plain write and `fdatasync`.
pub fn write_all_at_dsync(f: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: one iovec describing `buf`, valid and unmodified for the
        // duration of the call; the descriptor is owned by `f`.
        let n = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, off, libc::RWF_DSYNC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => {
                    f.write_all_at(buf, offset)?;
                    return f.sync_data();
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

/// True if `buf` can go to an O_DIRECT descriptor as it is (address and
/// length aligned), sparing the copy through an [`AlignedBuf`]; callers that
/// care (`blockrep img bench`, as QEMU's `qemu_blockalign`) allocate so.
fn direct_ready(buf: &[u8]) -> bool {
    buf.as_ptr().align_offset(DIRECT_ALIGN) == 0 && buf.len() % DIRECT_ALIGN == 0
}

fn errno_err(op: &str) -> Error {
    let e = std::io::Error::last_os_error();
    Error::from_io(e, op.to_string())
}

impl FileDriver {
    /// Opens from options (see the module docs).
    pub fn open(ctx: &mut OpenContext<'_>) -> Result<Box<dyn Driver>> {
        let ro = ctx.read_only();
        let o = ctx.options();
        let filename = o.require_str("filename")?;
        let (mut direct, mut no_flush) = (false, false);
        if let Some(mut c) = o.take_object("cache")? {
            direct = c.take_bool("direct")?.unwrap_or(false);
            no_flush = c.take_bool("no-flush")?.unwrap_or(false);
            c.finish()?;
        }
        o.take_enum("aio", &["threads"])?;
        o.take_enum("locking", &["auto", "on", "off"])?;
        let path = PathBuf::from(&filename);
        let file = open_file(&path, ro, direct)?;
        Ok(Box::new(FileDriver {
            path,
            direct,
            no_flush,
            file: RwLock::new(file),
            pending: Mutex::new(None),
        }))
    }

    fn fallocate(
        &self,
        node: &Node,
        mode: libc::c_int,
        offset: u64,
        len: u64,
        what: &str,
    ) -> Result<()> {
        let f = self.file.read();
        // SAFETY: fallocate on a valid open fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                Err(crate::driver::not_supported(node, what).with_source(e))
            }
            _ => Err(Error::from_io(e, what.to_string())),
        }
    }
}

impl Driver for FileDriver {
    fn format_name(&self) -> &str {
        "file"
    }

    fn length(&self, _node: &Node) -> Result<u64> {
        let f = self.file.read();
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| Error::from_io(e, format!("cannot stat '{}'", self.path.display())))
    }

    fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.file.read();
        let mut bounce;
        let bounced = self.direct && !direct_ready(buf);
        let target: &mut [u8] = if bounced {
            bounce = AlignedBuf::new(buf.len());
            bounce.as_mut()
        } else {
            bounce = AlignedBuf {
                v: Vec::new(),
                start: 0,
                len: 0,
            };
            let _ = &bounce;
            &mut *buf
        };
        let mut done = 0;
        while done < target.len() {
            match f.read_at(&mut target[done..], offset + done as u64) {
                Ok(0) => {
                    target[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::from_io(e, "pread")),
            }
        }
        if bounced {
            buf.copy_from_slice(bounce.as_ref());
        }
        Ok(())
    }

    fn write(&self, _node: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let f = self.file.read();
        // FUA: only this write is made durable, not the file's other dirty pages.
        let fua = flags.fua && !self.no_flush;
        let write = |b: &[u8]| {
            if fua {
                write_all_at_dsync(&f, b, offset)
            } else {
                f.write_all_at(b, offset)
            }
        };
        let r = if self.direct && !direct_ready(buf) {
            let mut b = AlignedBuf::new(buf.len());
            b.as_mut().copy_from_slice(buf);
            write(b.as_ref())
        } else {
            write(buf)
        };
        r.map_err(|e| Error::from_io(e, "pwrite"))?;
        Ok(())
    }

    fn flush(&self, _node: &Node) -> Result<()> {
        if self.no_flush {
            return Ok(());
        }
        self.file
            .read()
            .sync_data()
            .map_err(|e| Error::from_io(e, "fdatasync"))
    }

    fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.fallocate(
            node,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
            "discard (punch hole)",
        )
    }

    fn write_zeroes(&self, node: &Node, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        if flags.may_unmap {
            self.fallocate(
                node,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
                "write_zeroes (punch hole)",
            )
        } else {
            self.fallocate(
                node,
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
                "write_zeroes (zero range)",
            )
        }
    }

    fn block_status(&self, _node: &Node, offset: u64, len: u64) -> Result<BlockStatus> {
        let f = self.file.read();
        let fd = f.as_raw_fd();
        let end = offset + len;
        // SAFETY: lseek on a valid fd with integer arguments.
        let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data at or after offset: a hole to the end.
                Some(libc::ENXIO) => Ok(BlockStatus {
                    mapping: Mapping::Zero,
                    len,
                }),
                // SEEK_DATA not supported: report data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(BlockStatus {
                    mapping: Mapping::Data,
                    len,
                }),
                _ => Err(Error::from_io(e, "lseek(SEEK_DATA)")),
            };
        }
        let data = data as u64;
        if data > offset {
            return Ok(BlockStatus {
                mapping: Mapping::Zero,
                len: data.min(end) - offset,
            });
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(errno_err("lseek(SEEK_HOLE)"));
        }
        let hole = (hole as u64).max(offset + 1);
        Ok(BlockStatus {
            mapping: Mapping::Data,
            len: hole.min(end) - offset,
        })
    }

    fn truncate(&self, _node: &Node, len: u64) -> Result<()> {
        self.file
            .read()
            .set_len(len)
            .map_err(|e| Error::from_io(e, format!("cannot resize '{}'", self.path.display())))
    }

    fn request_alignment(&self) -> u64 {
        if self.direct {
            DIRECT_ALIGN as u64
        } else {
            1
        }
    }

    fn filename(&self) -> Option<String> {
        Some(self.path.to_string_lossy().into_owned())
    }

    fn reopen_prepare(&self, _node: &Node, opts: &ReopenOpts) -> Result<()> {
        let f = open_file(&self.path, opts.read_only, self.direct)?;
        *self.pending.lock() = Some(f);
        Ok(())
    }

    fn reopen_commit(&self, _node: &Node, _opts: &ReopenOpts) {
        if let Some(f) = self.pending.lock().take() {
            *self.file.write() = f;
        }
    }

    fn reopen_abort(&self, _node: &Node, _opts: &ReopenOpts) {
        self.pending.lock().take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsync_writes_land_where_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.write_all_at(&[1u8; 8192], 0).unwrap();
        write_all_at_dsync(&f, &[2u8; 3000], 1000).unwrap();
        // Beyond the end: the file grows, the gap reads as zeros.
        write_all_at_dsync(&f, &[3u8; 100], 10_000).unwrap();
        let got = std::fs::read(&p).unwrap();
        let mut want = vec![1u8; 8192];
        want[1000..4000].fill(2);
        want.resize(10_000, 0);
        want.extend_from_slice(&[3u8; 100]);
        assert_eq!(got, want);
    }
}
