//! An image and its backing chain, opened from files: qcow2 layers through
//! `qcow-lite`, raw layers as plain files. Reads go through the chain, writes
//! into one chosen layer (with copy-on-write from the layers below it), and
//! block status says which layer holds each range, as `qemu-img map` shows it.

use super::header::{is_qcow2, ClusterKind, L2Walker, QHeader};
use super::{Format, ImgError};
use qcow_lite::{BackingRead, Qcow2, Storage};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Backing chains deeper than this are refused.
pub const MAX_DEPTH: usize = 64;

/// The bytes of one layer.
pub enum Backend {
    /// A qcow2 image.
    Qcow2(Box<Qcow2<File>>),
    /// A raw file.
    Raw(File),
}

/// One image of a chain.
pub struct Layer {
    /// The name as the user gave it, or as stored in the header above.
    pub name: String,
    /// The path it was opened from.
    pub path: PathBuf,
    /// Its format.
    pub format: Format,
    /// The header (qcow2 only).
    pub header: Option<QHeader>,
    /// The image.
    pub backend: Backend,
    walker: Option<Mutex<L2Walker>>,
    /// QEMU's guess that the image was made with preallocation=metadata: data
    /// clusters over holes of the file then read as zeros in block status.
    prealloc: bool,
}

impl Layer {
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match &self.backend {
            Backend::Qcow2(q) => q.size(),
            // Like QEMU, whole 512-byte sectors (the tail reads as zeros).
            Backend::Raw(f) => Storage::len(f).unwrap_or(0).div_ceil(512) * 512,
        }
    }
}

/// Where a range lives, as `qemu-img map --output=json` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Bytes from the asked offset with this status.
    pub len: u64,
    /// Index in the chain of the layer that answered (the bottom when none did).
    pub depth: usize,
    /// Some layer holds the range.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data (or preallocated clusters) in that layer.
    pub data: bool,
    /// A compressed cluster.
    pub compressed: bool,
    /// Host offset in that layer's file, when there is one.
    pub offset: Option<u64>,
}

/// An image with its backing chain; `layers[0]` is the image itself.
pub struct Chain {
    /// Top first.
    pub layers: Vec<Layer>,
}

fn open_file(path: &Path, name: &str, rw: bool) -> Result<File, ImgError> {
    OpenOptions::new()
        .read(true)
        .write(rw)
        .open(path)
        .map_err(|e| ImgError::Open {
            path: name.to_string(),
            source: e,
        })
}

/// Open one image file as `fmt` (probed when None).
pub fn open_layer(
    path: &Path,
    name: &str,
    fmt: Option<Format>,
    rw: bool,
) -> Result<Layer, ImgError> {
    if path.is_dir() {
        return Err(ImgError::image(format!(
            "Could not open '{name}': Is a directory"
        )));
    }
    let f = open_file(path, name, rw)?;
    let qcow = is_qcow2(&f)?;
    let format = match fmt {
        Some(Format::Qcow2) if !qcow => {
            return Err(ImgError::image(format!(
                "Could not open '{name}': Image is not in qcow2 format"
            )))
        }
        Some(f) => f,
        None if qcow => Format::Qcow2,
        None => Format::Raw,
    };
    match format {
        Format::Raw => Ok(Layer {
            name: name.to_string(),
            path: path.to_path_buf(),
            format,
            header: None,
            backend: Backend::Raw(f),
            walker: None,
            prealloc: false,
        }),
        Format::Qcow2 => {
            let header = QHeader::read(&f, name)?;
            let wf = f
                .try_clone()
                .map_err(|e| ImgError::io(format!("open '{name}'"), e))?;
            let walker = L2Walker::new(wf, &header, name)?;
            let prealloc = looks_preallocated(&f, &header);
            let q = Qcow2::open(f, !rw)
                .map_err(|e| ImgError::qcow(format!("Could not open '{name}'"), e))?;
            Ok(Layer {
                name: name.to_string(),
                path: path.to_path_buf(),
                format,
                header: Some(header),
                backend: Backend::Qcow2(Box::new(q)),
                walker: Some(Mutex::new(walker)),
                prealloc,
            })
        }
    }
}

/// The canonical path of a file, for loop detection (the path itself when it cannot be resolved).
fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The path of a backing file named `name` in the header of the image at `image`.
pub fn backing_path(image: &Path, name: &str) -> PathBuf {
    qcow_lite::resolve_backing(image, name)
}

impl Chain {
    /// Open the image `name` (format `fmt`, probed when None) and, when
    /// `with_backing`, its whole backing chain read-only. The top is
    /// read-write when `rw`.
    pub fn open(
        name: &str,
        fmt: Option<Format>,
        rw: bool,
        with_backing: bool,
    ) -> Result<Chain, ImgError> {
        let top = open_layer(Path::new(name), name, fmt, rw)?;
        let mut chain = Chain { layers: vec![top] };
        if with_backing {
            chain.open_backings()?;
        }
        Ok(chain)
    }

    /// Open the backing chain below the last layer.
    fn open_backings(&mut self) -> Result<(), ImgError> {
        let mut seen: HashSet<PathBuf> = self.layers.iter().map(|l| canon(&l.path)).collect();
        loop {
            let last = self.layers.last().expect("a chain has a top");
            let Some(h) = &last.header else { break };
            let Some(bname) = h.backing_file.clone() else {
                break;
            };
            let bfmt = match h.backing_format.as_deref() {
                Some(f) => Some(Format::parse(f).map_err(|_| {
                    ImgError::image(format!("'{}': unsupported backing format '{f}'", last.name))
                })?),
                None => None,
            };
            let bpath = backing_path(&last.path, &bname);
            let top_name = self.layers[0].name.clone();
            if !seen.insert(canon(&bpath)) {
                return Err(ImgError::image(format!(
                    "Backing file loop: '{}' appears twice in the backing chain of '{top_name}'",
                    bpath.display()
                )));
            }
            if self.layers.len() >= MAX_DEPTH {
                return Err(ImgError::image(format!(
                    "Backing chain of '{top_name}' is deeper than {MAX_DEPTH} images"
                )));
            }
            let bdisp = bpath.display().to_string();
            let layer = open_layer(&bpath, &bdisp, bfmt, false).map_err(|e| {
                ImgError::image(format!(
                    "Could not open backing file of '{}': {e}",
                    last.name
                ))
            })?;
            self.layers.push(layer);
        }
        Ok(())
    }

    /// Replace layer `idx` by a read-write opening of the same file.
    pub fn reopen_rw(&mut self, idx: usize) -> Result<(), ImgError> {
        let l = &self.layers[idx];
        let (path, name, fmt) = (l.path.clone(), l.name.clone(), l.format);
        // Drop the read-only handle first.
        let placeholder = open_layer(&path, &name, Some(Format::Raw), false)?;
        let old = std::mem::replace(&mut self.layers[idx], placeholder);
        drop(old);
        self.layers[idx] = open_layer(&path, &name, Some(fmt), true)?;
        Ok(())
    }

    /// Virtual size of the top image.
    pub fn size(&self) -> u64 {
        self.layers[0].size()
    }

    /// Read through the chain from the top.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImgError> {
        self.read_from(0, offset, buf)
            .map_err(|e| ImgError::qcow(format!("read '{}' at {offset}", self.layers[0].name), e))
    }

    /// Read as seen from layer `idx` (that layer and the ones below).
    pub fn read_at_layer(&self, idx: usize, offset: u64, buf: &mut [u8]) -> Result<(), ImgError> {
        self.read_from(idx, offset, buf)
            .map_err(|e| ImgError::qcow(format!("read '{}' at {offset}", self.layers[idx].name), e))
    }

    fn below(&self, idx: usize) -> Option<Below<'_>> {
        (idx + 1 < self.layers.len()).then_some(Below {
            chain: self,
            idx: idx + 1,
        })
    }

    fn read_from(&self, idx: usize, offset: u64, buf: &mut [u8]) -> qcow_lite::Result<()> {
        let l = &self.layers[idx];
        match &l.backend {
            Backend::Raw(f) => Storage::read_at(f, buf, offset)
                .map_err(|e| qcow_lite::Error::io(e, format!("read '{}' at {offset}", l.name))),
            Backend::Qcow2(q) => {
                let below = self.below(idx);
                q.read(offset, buf, below.as_ref().map(|b| b as &dyn BackingRead))
            }
        }
    }

    /// Write into layer `idx` (copy-on-write from the layers below it).
    pub fn write_at_layer(&self, idx: usize, offset: u64, buf: &[u8]) -> Result<(), ImgError> {
        let l = &self.layers[idx];
        let ctx = || format!("write '{}' at {offset}", l.name);
        match &l.backend {
            Backend::Raw(f) => f
                .write_all_at(buf, offset)
                .map_err(|e| ImgError::io(ctx(), e)),
            Backend::Qcow2(q) => {
                let below = self.below(idx);
                q.write(offset, buf, below.as_ref().map(|b| b as &dyn BackingRead))
                    .map_err(|e| ImgError::qcow(ctx(), e))
            }
        }
    }

    /// Make `len` bytes at `offset` of layer `idx` read as zeros.
    pub fn zero_at_layer(&self, idx: usize, offset: u64, len: u64) -> Result<(), ImgError> {
        let l = &self.layers[idx];
        let ctx = || format!("write zeroes to '{}' at {offset}", l.name);
        match &l.backend {
            Backend::Raw(f) => zero_raw(f, offset, len).map_err(|e| ImgError::io(ctx(), e)),
            Backend::Qcow2(q) => {
                let below = self.below(idx);
                q.write_zeroes(
                    offset,
                    len,
                    true,
                    below.as_ref().map(|b| b as &dyn BackingRead),
                )
                .map_err(|e| ImgError::qcow(ctx(), e))
            }
        }
    }

    /// Flush and cleanly close every writable layer.
    pub fn close(&self) -> Result<(), ImgError> {
        for l in &self.layers {
            match &l.backend {
                Backend::Qcow2(q) => q
                    .close()
                    .map_err(|e| ImgError::qcow(format!("close '{}'", l.name), e))?,
                Backend::Raw(f) => {
                    // Read-only handles have nothing to flush; ignore EBADF there.
                    let _ = f.sync_all();
                }
            }
        }
        Ok(())
    }

    /// Block status of one layer: (allocated here, status with `len`).
    fn layer_status(&self, idx: usize, offset: u64, len: u64) -> Result<Status, ImgError> {
        let l = &self.layers[idx];
        let mut st = Status {
            len,
            depth: idx,
            present: false,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
        };
        match &l.backend {
            Backend::Raw(f) => {
                let (data, n) = raw_extent(f, offset, len)
                    .map_err(|e| ImgError::io(format!("block status of '{}'", l.name), e))?;
                st.len = n;
                st.present = true;
                st.data = data;
                st.zero = !data;
                st.offset = Some(offset);
            }
            Backend::Qcow2(q) => {
                let cs = q.cluster_size();
                let walker = l.walker.as_ref().expect("qcow2 layers have a walker");
                let mut w = walker.lock().unwrap_or_else(|p| p.into_inner());
                let (kind, n) = w.run(offset, len)?;
                st.len = n;
                let within = offset % cs;
                match kind {
                    ClusterKind::Unallocated => {}
                    ClusterKind::ZeroPlain => {
                        st.present = true;
                        st.zero = true;
                    }
                    ClusterKind::ZeroAlloc(h) => {
                        st.present = true;
                        st.zero = true;
                        st.offset = Some(h + within);
                    }
                    ClusterKind::Normal(h) => {
                        st.present = true;
                        st.data = true;
                        st.offset = Some(h + within);
                        if l.prealloc {
                            let (data, n) =
                                raw_extent(q.storage(), h + within, st.len).map_err(|e| {
                                    ImgError::io(format!("block status of '{}'", l.name), e)
                                })?;
                            st.zero = !data;
                            st.len = n;
                        }
                    }
                    ClusterKind::Compressed => {
                        st.present = true;
                        st.data = true;
                        st.compressed = true;
                    }
                }
            }
        }
        Ok(st)
    }

    /// Block status of the chain from layer `from` down to layer `to`
    /// (exclusive; `layers.len()` for the whole chain) at `offset`, up to `len` bytes.
    pub fn status_range(
        &self,
        from: usize,
        to: usize,
        offset: u64,
        len: u64,
    ) -> Result<Status, ImgError> {
        let mut len = len;
        let mut last = from;
        for i in from..to {
            last = i;
            if offset >= self.layers[i].size() {
                // Past the end of a shorter backing file: reads as zeros.
                return Ok(Status {
                    len,
                    depth: i,
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: None,
                });
            }
            let l_len = len.min(self.layers[i].size() - offset);
            let st = self.layer_status(i, offset, l_len)?;
            if st.present {
                return Ok(st);
            }
            len = st.len;
        }
        Ok(Status {
            len,
            depth: last,
            present: false,
            zero: true,
            data: false,
            compressed: false,
            offset: None,
        })
    }

    /// Block status of the whole chain.
    pub fn status(&self, offset: u64, len: u64) -> Result<Status, ImgError> {
        self.status_range(0, self.layers.len(), offset, len)
    }
}

/// The chain below one layer, as a backing for `qcow-lite`.
struct Below<'a> {
    chain: &'a Chain,
    idx: usize,
}

impl BackingRead for Below<'_> {
    fn backing_len(&self) -> u64 {
        self.chain.layers[self.idx].size()
    }
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> qcow_lite::Result<()> {
        self.chain.read_from(self.idx, offset, buf)
    }
}

/// QEMU's heuristic (qcow2_detect_metadata_preallocation): the file claims
/// many more clusters than the file system has allocated.
fn looks_preallocated(f: &File, h: &QHeader) -> bool {
    use std::os::unix::fs::MetadataExt;
    let cs = h.cluster_size();
    let Ok(md) = f.metadata() else { return false };
    let real_clusters = md.blocks() * 512 / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let end = md.len().div_ceil(cs);
    super::header::count_used_clusters(f, h, end, threshold).is_some_and(|n| n >= threshold)
}

/// Data or hole at `offset` of a raw file, and how far it goes (up to `len`).
fn raw_extent(f: &File, offset: u64, len: u64) -> std::io::Result<(bool, u64)> {
    let fd = f.as_raw_fd();
    let end = offset + len;
    let flen = f.metadata()?.len();
    if offset >= flen {
        return Ok((false, len));
    }
    // SAFETY: lseek on a file descriptor we own; it only moves the file position.
    let data = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data after offset; other errors: report data (safe answer).
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENXIO) {
            return Ok((false, len));
        }
        return Ok((true, len));
    }
    let data = data as u64;
    if data > offset {
        return Ok((false, data.min(end) - offset));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        return Ok((true, len));
    }
    Ok((true, (hole as u64).clamp(offset + 1, end) - offset))
}

/// Zero a range of a raw file: punch a hole, or write zeros where that fails.
fn zero_raw(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let flen = f.metadata()?.len();
    if offset + len > flen {
        f.set_len(offset + len)?;
    }
    // SAFETY: fallocate on a file descriptor we own, within its length.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Zero-copy check: every byte zero.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.iter().all(|&b| b == 0)
}
