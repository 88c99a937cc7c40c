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

/// Bytes written into the base between two [`start_writeback`] calls.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Chunks read ahead of the writer (each holds one `CHUNK` buffer).
const QUEUE: usize = 4;

/// One piece of the copy, in offset order.
enum Piece {
    /// `len` bytes at `pos` read as zeros in the layers above the base.
    Zero { pos: u64, len: u64 },
    /// Data read from the layers above the base.
    Data { pos: u64, buf: Vec<u8> },
}

/// Start writing the base's dirty pages back without waiting for them, so
/// the device writes while the copy goes on and the closing flush finds
/// little left to do. A hint only: durability still comes from that flush.
/// Measured by hand on a fully written 1 GiB overlay (5 runs each, page
/// reporting paused, 2026-11-24 02:50 UTC): 0.56-0.77 s with a kick every
/// 32 MiB, 0.80-1.02 s without (one outlier of 1.85 s); every 4 to 128 MiB
/// gave about the same. Dropping the read layers' cached pages as well
/// (`POSIX_FADV_DONTNEED`) made it slower (1.25-1.51 s) and was left out.
fn start_writeback(base: &std::fs::File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a plain syscall on a descriptor `base` keeps open for the
    // call; no memory is passed. A failure only means no early writeback.
    unsafe {
        libc::sync_file_range(base.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

fn layer_file(chain: &Chain, idx: usize) -> &std::fs::File {
    match &chain.layers[idx].backend {
        Backend::Qcow2(q) => q.storage(),
        Backend::Raw(f) => f,
    }
}

/// Copy what the layers above `base_idx` hold into it. A reader thread walks
/// the block status and reads ahead (skipping what the upper layers do not
/// hold) while this thread writes into the base, so reading and writing
/// overlap; buffers go back to the reader for reuse. The reader only ever
/// reads ranges the upper layers hold, which the writer never touches in
/// them, and the writer writes each range once, in order.
fn copy_into(chain: &Chain, base_idx: usize, size: u64) -> Result<(), ImgError> {
    let (tx, rx) = crossbeam_channel::bounded::<Result<Piece, ImgError>>(QUEUE);
    let (back_tx, back_rx) = crossbeam_channel::bounded::<Vec<u8>>(QUEUE + 2);
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut pos = 0u64;
            while pos < size {
                let want = (size - pos).min(CHUNK);
                let piece = chain.status_range(0, base_idx, pos, want).and_then(|st| {
                    let n = st.len.clamp(1, want);
                    Ok((
                        n,
                        match (st.present, st.zero) {
                            (false, _) => None,
                            (true, true) => Some(Piece::Zero { pos, len: n }),
                            (true, false) => {
                                let mut buf = back_rx
                                    .try_recv()
                                    .unwrap_or_else(|_| Vec::with_capacity(CHUNK as usize));
                                buf.resize(n as usize, 0);
                                chain.read(pos, &mut buf)?;
                                Some(Piece::Data { pos, buf })
                            }
                        },
                    ))
                });
                match piece {
                    Ok((n, p)) => {
                        if let Some(p) = p {
                            if tx.send(Ok(p)).is_err() {
                                return; // the writer stopped on an error
                            }
                        }
                        pos += n;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        // Dropping `rx` on an error (leaving this closure, before the scope
        // joins the reader) makes the reader's next send fail, so it stops.
        let rx = rx;
        let mut written_since = 0u64;
        for piece in rx.iter() {
            match piece? {
                Piece::Zero { pos, len } => chain.zero_at_layer(base_idx, pos, len)?,
                Piece::Data { pos, buf } => {
                    chain.write_at_layer(base_idx, pos, &buf)?;
                    written_since += buf.len() as u64;
                    let _ = back_tx.try_send(buf);
                }
            }
            if written_since >= WRITEBACK_EVERY {
                written_since = 0;
                start_writeback(layer_file(chain, base_idx));
            }
        }
        Ok(())
    })
}

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
    copy_into(&chain, base_idx, size)?;
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
