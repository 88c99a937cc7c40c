//! Opening an image file together with its backing chain (files only): the
//! backing name resolves against the image's directory, the chain depth is capped.

use crate::error::{invalid, unsupported, Error, Result};
use crate::image::{BackingRead, Qcow2, RawBacking};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// How deep a backing chain may be before we refuse it (a loop, most likely).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// A qcow2 image file and its backing chain, opened from files.
pub struct ImageChain {
    /// The top image.
    pub image: Qcow2<File>,
    /// Its backing (raw file, or a qcow2 image with its own chain).
    pub backing: Option<Box<dyn BackingRead>>,
}

impl std::fmt::Debug for ImageChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageChain")
            .field("image", &self.image)
            .field("has_backing", &self.backing.is_some())
            .finish()
    }
}

impl BackingRead for ImageChain {
    fn backing_len(&self) -> u64 {
        self.image.size()
    }
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(offset, buf)
    }
}

/// Resolve a backing file name stored in `image` against the image's directory.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or_else(|| Path::new(".")).join(p)
    }
}

fn open_file(path: &Path, read_only: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|e| Error::io(e, format!("open {}", path.display())))
}

fn open_backing(path: &Path, fmt: Option<&str>, depth: usize) -> Result<Box<dyn BackingRead>> {
    if depth > MAX_CHAIN_DEPTH {
        return Err(invalid(format!(
            "backing chain deeper than {MAX_CHAIN_DEPTH} at {}",
            path.display()
        )));
    }
    let f = open_file(path, true)?;
    let fmt = match fmt {
        Some(f) => f.to_string(),
        None => {
            let mut magic = [0u8; 4];
            crate::storage::Storage::read_at(&f, &mut magic, 0)
                .map_err(|e| Error::io(e, format!("probe {}", path.display())))?;
            if magic == *b"QFI\xfb" { "qcow2" } else { "raw" }.to_string()
        }
    };
    match fmt.as_str() {
        "raw" => Ok(Box::new(RawBacking(f))),
        "qcow2" => Ok(Box::new(open_chain_at(path, f, true, depth)?)),
        other => Err(unsupported(format!("backing format {other:?}"))),
    }
}

fn open_chain_at(path: &Path, f: File, read_only: bool, depth: usize) -> Result<ImageChain> {
    let image = Qcow2::open(f, read_only)?;
    let backing = match image.backing_file() {
        Some(name) => {
            let bp = resolve_backing(path, &name);
            let fmt = image.backing_format();
            Some(open_backing(&bp, fmt.as_deref(), depth + 1)?)
        }
        None => None,
    };
    Ok(ImageChain { image, backing })
}

/// Open the qcow2 image at `path` and its backing chain (backings read-only).
pub fn open_chain(path: &Path, read_only: bool) -> Result<ImageChain> {
    let f = open_file(path, read_only)?;
    open_chain_at(path, f, read_only, 0)
}

impl ImageChain {
    fn backing(&self) -> Option<&dyn BackingRead> {
        self.backing.as_deref()
    }
    /// Read through the chain.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.image.read(offset, buf, self.backing())
    }
    /// Write into the top image (copy-on-write from the chain).
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.image.write(offset, buf, self.backing())
    }
    /// Zero a range of the top image.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.image
            .write_zeroes(offset, len, may_unmap, self.backing())
    }
    /// Close the top image cleanly.
    pub fn close(&self) -> Result<()> {
        self.image.close()
    }
}
