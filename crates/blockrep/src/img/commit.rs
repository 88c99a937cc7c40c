//! `commit`: copy an image's own data (and that of the images between it
//! and the base) into the base, then empty it (unless `-d`, implied by `-b`).

use super::chain::{backing_path, Backend, Chain};
use super::{fail1, ImageOpt, ImgError, VerbResult};
use clap::Args;
use std::path::Path;

/// Arguments of `commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    #[command(flatten)]
    image: ImageOpt,
    /// Commit into this image of the backing chain (implies -d).
    #[arg(short = 'b')]
    base: Option<String>,
    /// Drop: keep the image's contents instead of emptying it.
    #[arg(short = 'd')]
    drop: bool,
    /// Progress (accepted, not shown).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Rate limit (accepted for compatibility).
    #[arg(short = 'r')]
    rate: Option<String>,
    /// The image to commit.
    filename: String,
}

const CHUNK: u64 = 2 << 20;

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Run `commit`.
pub fn run(a: CommitArgs) -> VerbResult {
    let _ = (a.progress, a.cache.as_ref(), a.rate.as_ref());
    fail1(run_inner(&a)).map(|()| {
        if !a.quiet {
            println!("Image committed.");
        }
        0
    })
}

fn run_inner(a: &CommitArgs) -> Result<(), ImgError> {
    let mut chain = Chain::open(&a.filename, super::opt_fmt(&a.image.format)?, false, true)?;
    if chain.layers.len() < 2 {
        return Err(ImgError::image(format!(
            "'{}' does not have a backing file to commit into",
            a.filename
        )));
    }
    let base_idx = match &a.base {
        None => 1,
        Some(b) => {
            // Like qemu-img, a relative base name is relative to the image's directory.
            let want = backing_path(&chain.layers[0].path, b);
            let idx = chain
                .layers
                .iter()
                .enumerate()
                .skip(1)
                .find(|(_, l)| same_file(&l.path, &want))
                .map(|(i, _)| i);
            match idx {
                Some(i) => i,
                None if same_file(&want, &chain.layers[0].path) => {
                    return Err(ImgError::usage(format!(
                        "Base '{b}' is the image itself: nothing to commit"
                    )))
                }
                None => {
                    return Err(ImgError::image(format!(
                        "Did not find '{b}' in the backing chain of '{}'",
                        a.filename
                    )))
                }
            }
        }
    };
    let drop_top = a.drop || a.base.is_some();
    chain.reopen_rw(base_idx)?;
    if !drop_top {
        chain.reopen_rw(0)?;
    }
    let size = chain.size();
    // Grow the base when it is shorter than the image.
    if chain.layers[base_idx].size() < size {
        match &chain.layers[base_idx].backend {
            Backend::Qcow2(q) => q.grow(size).map_err(|e| {
                ImgError::qcow(format!("resize '{}'", chain.layers[base_idx].name), e)
            })?,
            Backend::Raw(f) => f.set_len(size).map_err(|e| {
                ImgError::io(format!("resize '{}'", chain.layers[base_idx].name), e)
            })?,
        }
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < size {
        let want = (size - pos).min(CHUNK);
        let st = chain.status_range(0, base_idx, pos, want)?;
        let n = st.len.clamp(1, want);
        if st.present {
            if st.zero {
                chain.zero_at_layer(base_idx, pos, n)?;
            } else {
                let b = &mut buf[..n as usize];
                chain.read(pos, b)?;
                chain.write_at_layer(base_idx, pos, b)?;
            }
        }
        pos += n;
    }
    chain.close()?;
    if !drop_top {
        if let Backend::Qcow2(q) = &chain.layers[0].backend {
            q.make_empty()
                .map_err(|e| ImgError::qcow(format!("empty '{}'", a.filename), e))?;
            q.close()
                .map_err(|e| ImgError::qcow(format!("close '{}'", a.filename), e))?;
        }
    }
    Ok(())
}
