//! `rebase`: give an image a new backing file. Safe mode first copies into
//! the image every range where the old and new backing chains differ, so
//! the image reads the same afterwards; `-u` only rewrites the header.

use super::chain::{backing_path, Chain};
use super::header::set_backing;
use super::{fail1, opt_fmt, Format, FormatName, ImgError, VerbResult};
use clap::Args;
use qcow_lite::Mapping;
use std::fs::OpenOptions;
use std::path::Path;

/// Arguments of `rebase`.
#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// Format of the image.
    #[arg(short = 'f')]
    format: Option<FormatName>,
    /// The new backing file ("" for none), relative to the image's directory.
    #[arg(short = 'b', required = true)]
    backing: String,
    /// Format of the new backing file.
    #[arg(short = 'F')]
    backing_format: Option<FormatName>,
    /// Unsafe: only change the header, copy nothing.
    #[arg(short = 'u')]
    unsafe_mode: bool,
    /// Progress (accepted, not shown).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Source cache mode (accepted for compatibility).
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// The image.
    filename: String,
}

/// Run `rebase`.
pub fn run(a: RebaseArgs) -> VerbResult {
    let _ = (a.progress, a.quiet, &a.cache, &a.src_cache);
    fail1(run_inner(&a)).map(|()| 0)
}

fn run_inner(a: &RebaseArgs) -> Result<(), ImgError> {
    let new_backing = (!a.backing.is_empty()).then_some(a.backing.as_str());
    let fname = &a.filename;
    let top_fmt = opt_fmt(&a.format)?;
    let backing_fmt = opt_fmt(&a.backing_format)?;
    // The top alone first: its format, and that it can have a backing file.
    let top = Chain::open(fname, top_fmt, false, false)?;
    if top.layers[0].format != Format::Qcow2 {
        return Err(ImgError::usage(format!(
            "'{fname}': format {} does not support backing files",
            top.layers[0].format.name()
        )));
    }
    let top_path = top.layers[0].path.clone();
    drop(top);
    // The new chain, opened from the image's directory; it must not reach the image.
    let mut new_fmt = backing_fmt;
    let new_chain = match new_backing {
        None => None,
        Some(b) => {
            let bp = backing_path(&top_path, b);
            let name = bp.display().to_string();
            let opened = Chain::open(&name, backing_fmt, false, true);
            match opened {
                Ok(c) => {
                    let top_canon = std::fs::canonicalize(&top_path).ok();
                    if c.layers
                        .iter()
                        .any(|l| std::fs::canonicalize(&l.path).ok() == top_canon)
                    {
                        return Err(ImgError::image(format!(
                            "Backing file loop: '{name}' has '{fname}' in its backing chain"
                        )));
                    }
                    new_fmt = Some(c.layers[0].format);
                    Some(c)
                }
                Err(e) if a.unsafe_mode && backing_fmt.is_some() => {
                    // Unsafe mode need not open the new backing file.
                    let _ = e;
                    None
                }
                Err(e) => {
                    return Err(ImgError::image(format!(
                        "Could not open new backing file '{b}': {e}"
                    )))
                }
            }
        }
    };
    if !a.unsafe_mode {
        copy_differences(fname, top_fmt, new_chain.as_ref())?;
    }
    drop(new_chain);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new(fname))
        .map_err(|e| ImgError::Open {
            path: fname.clone(),
            source: e,
        })?;
    set_backing(&f, fname, new_backing, new_fmt.map(Format::name))
}

const CHUNK: u64 = 1 << 20;

/// Write into the image every range it does not hold itself where the old
/// chain and the new one read differently.
fn copy_differences(fname: &str, fmt: Option<Format>, new: Option<&Chain>) -> Result<(), ImgError> {
    let mut chain = Chain::open(fname, fmt, false, true)?;
    chain.reopen_rw(0)?;
    let super::chain::Backend::Qcow2(q) = &chain.layers[0].backend else {
        return Err(ImgError::usage(format!("'{fname}' is not a qcow2 image")));
    };
    let size = q.size();
    let cs = q.cluster_size();
    let chunk = CHUNK.max(cs);
    let mut old = vec![0u8; chunk as usize];
    let mut newb = vec![0u8; chunk as usize];
    let mut pos = 0u64;
    while pos < size {
        let want = (size - pos).min(chunk);
        let (m, n) = q
            .map(pos, want)
            .map_err(|e| ImgError::qcow(format!("map '{fname}' at {pos}"), e))?;
        let n = n.clamp(1, want);
        if m != Mapping::Unallocated {
            pos += n;
            continue;
        }
        // Old contents: the chain below the image.
        let o = &mut old[..n as usize];
        if chain.layers.len() > 1 {
            read_clamped(&chain, 1, pos, o)?;
        } else {
            o.fill(0);
        }
        let nb = &mut newb[..n as usize];
        match new {
            Some(c) => read_clamped(c, 0, pos, nb)?,
            None => nb.fill(0),
        }
        // Copy whole clusters of the image that differ.
        let mut i = 0u64;
        while i < n {
            let cl_end = ((pos + i) / cs + 1) * cs;
            let e = (cl_end - pos).min(n);
            let (a0, a1) = (i as usize, e as usize);
            if o[a0..a1] != nb[a0..a1] {
                write_over(q, new, pos + i, &o[a0..a1], fname)?;
            }
            i = e;
        }
        pos += n;
    }
    q.close()
        .map_err(|e| ImgError::qcow(format!("close '{fname}'"), e))
}

/// Write `buf` into the top image, reading the rest of partial clusters
/// through the new backing chain.
fn write_over(
    q: &qcow_lite::Qcow2<std::fs::File>,
    new: Option<&Chain>,
    offset: u64,
    buf: &[u8],
    fname: &str,
) -> Result<(), ImgError> {
    struct NewBacking<'a>(&'a Chain);
    impl qcow_lite::BackingRead for NewBacking<'_> {
        fn backing_len(&self) -> u64 {
            self.0.size()
        }
        fn read_backing(&self, offset: u64, buf: &mut [u8]) -> qcow_lite::Result<()> {
            self.0
                .read(offset, buf)
                .map_err(|e| qcow_lite::Error::new(qcow_lite::ErrorKind::Io, e.to_string()))
        }
    }
    let nb = new.map(NewBacking);
    q.write(
        offset,
        buf,
        nb.as_ref().map(|b| b as &dyn qcow_lite::BackingRead),
    )
    .map_err(|e| ImgError::qcow(format!("write '{fname}' at {offset}"), e))
}

/// Read from layer `idx` of `c`, with zeros past its end.
fn read_clamped(c: &Chain, idx: usize, offset: u64, buf: &mut [u8]) -> Result<(), ImgError> {
    let len = c.layers[idx].size();
    let avail = len.saturating_sub(offset).min(buf.len() as u64) as usize;
    if avail > 0 {
        c.read_at_layer(idx, offset, &mut buf[..avail])?;
    }
    buf[avail..].fill(0);
    Ok(())
}
