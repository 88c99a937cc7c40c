//! `convert`: copy an image (its backing chain flattened) into a new image,
//! or (with `-B`) only the image's own data into a new image over a backing
//! file, or (with `-n`) into an existing image.

use super::chain::{backing_path, is_zero, open_layer, Chain};
use super::create::{create_image, parse_options};
use super::size::parse_size;
use super::{fail1, opt_fmt, Format, FormatName, ImgError, VerbResult};
use clap::Args;
use std::path::Path;

/// Arguments of `convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Format of the input image.
    #[arg(short = 'f')]
    format: Option<FormatName>,
    /// Format of the output image.
    #[arg(short = 'O', default_value = "raw")]
    output_format: FormatName,
    /// Options of the output image (as for create).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Progress (accepted, not shown).
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Source cache mode (accepted for compatibility).
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Cache mode (accepted for compatibility).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Compress (not supported: refused).
    #[arg(short = 'c')]
    compress: bool,
    /// Do not create the output: write into an existing image.
    #[arg(short = 'n')]
    no_create: bool,
    /// Backing file of the output (qcow2): only the input's own data is copied.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the output's backing file.
    #[arg(short = 'F')]
    backing_format: Option<FormatName>,
    /// Consecutive zero bytes that are not written (default 4k; 0 writes everything).
    #[arg(short = 'S')]
    sparse: Option<String>,
    /// Input image, then output image.
    #[arg(num_args = 2.., required = true)]
    files: Vec<String>,
}

const CHUNK: u64 = 2 << 20;
/// Like QEMU's default `-S 4k`: all-zero 4 KiB blocks are not written.
const SPARSE: u64 = 4096;

/// Run `convert`.
pub fn run(a: ConvertArgs) -> VerbResult {
    let _ = (a.progress, a.quiet, &a.src_cache, &a.cache);
    fail1(run_inner(&a)).map(|()| 0)
}

fn run_inner(a: &ConvertArgs) -> Result<(), ImgError> {
    if a.compress {
        return Err(ImgError::usage(
            "Compressed output (-c) is not supported: qcow-lite does not write compressed clusters",
        ));
    }
    if a.files.len() != 2 {
        return Err(ImgError::usage(
            "convert takes exactly one input and one output file",
        ));
    }
    let (input, output) = (&a.files[0], &a.files[1]);
    let ofmt = a.output_format.get()?;
    let mut o = parse_options(&a.options, ofmt)?;
    if let Some(b) = &a.backing {
        o.backing_file = Some(b.clone());
    }
    if let Some(f) = opt_fmt(&a.backing_format)? {
        o.backing_fmt = Some(f);
    }
    let sparse = match &a.sparse {
        None => SPARSE,
        Some(s) => {
            let v = parse_size(s)?;
            if v % 512 != 0 || v > CHUNK {
                return Err(ImgError::usage(format!(
                    "Invalid buffer size for sparse output specified: '{s}' (a multiple of 512 up to 2M)"
                )));
            }
            v
        }
    };
    let src = Chain::open(input, opt_fmt(&a.format)?, false, true)?;
    let size = src.size();
    o.size = Some(size);
    let with_backing = o.backing_file.is_some();
    if with_backing {
        if ofmt != Format::Qcow2 {
            return Err(ImgError::usage(format!(
                "convert: format {} does not support backing files",
                ofmt.name()
            )));
        }
        if a.no_create {
            return Err(ImgError::usage("convert: -B cannot be used with -n"));
        }
        let b = o.backing_file.clone().unwrap_or_default();
        let bpath = backing_path(Path::new(output), &b);
        let bdisp = bpath.display().to_string();
        let layer = open_layer(&bpath, &bdisp, o.backing_fmt, false)
            .map_err(|e| ImgError::image(format!("{output}: Could not open backing image: {e}")))?;
        o.backing_fmt = Some(layer.format);
    }
    if let (Ok(x), Ok(y)) = (std::fs::canonicalize(input), std::fs::canonicalize(output)) {
        if x == y {
            return Err(ImgError::usage(format!(
                "convert: output '{output}' is the input image"
            )));
        }
    }
    let dst = if a.no_create {
        let d = Chain::open(output, Some(ofmt), true, true)?;
        if d.size() < size {
            return Err(ImgError::usage(format!(
                "convert: output '{output}' ({} bytes) is smaller than the input ({size} bytes)",
                d.size()
            )));
        }
        d
    } else {
        create_image(output, ofmt, size, &o, true)?;
        Chain::open(output, Some(ofmt), true, with_backing)?
    };
    // A new image without a backing file reads as zeros: zeros need not be
    // written there. An existing image or one over a backing file needs them.
    let zeros_needed = a.no_create || with_backing;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < size {
        let want = (size - pos).min(CHUNK);
        // With -B, only what the input holds itself (its backing is assumed
        // to read like the output's).
        let st = if with_backing {
            src.status_range(0, 1, pos, want)?
        } else {
            src.status(pos, want)?
        };
        let n = st.len.clamp(1, want);
        let b = &mut buf[..n as usize];
        if !st.present && with_backing {
            // Left to the output's backing file.
        } else if !st.present || st.zero {
            if sparse == 0 {
                b.fill(0);
                dst.write_at_layer(0, pos, b)?;
            } else if zeros_needed {
                dst.zero_at_layer(0, pos, n)?;
            }
        } else {
            src.read(pos, b)?;
            write_sparse(&dst, pos, b, sparse, zeros_needed)?;
        }
        pos += n;
    }
    dst.close()
}

/// Write `b` at `pos`: runs of `sparse`-byte all-zero blocks are skipped
/// (or zeroed when `zeros_needed`), the rest written; `sparse == 0` writes all.
fn write_sparse(
    dst: &Chain,
    pos: u64,
    b: &[u8],
    sparse: u64,
    zeros_needed: bool,
) -> Result<(), ImgError> {
    if sparse == 0 {
        return dst.write_at_layer(0, pos, b);
    }
    let sparse = sparse as usize;
    let mut i = 0usize;
    while i < b.len() {
        let first_zero = is_zero(&b[i..(i + sparse).min(b.len())]);
        let mut j = (i + sparse).min(b.len());
        while j < b.len() {
            let e = (j + sparse).min(b.len());
            if is_zero(&b[j..e]) != first_zero {
                break;
            }
            j = e;
        }
        if !first_zero {
            dst.write_at_layer(0, pos + i as u64, &b[i..j])?;
        } else if zeros_needed {
            dst.zero_at_layer(0, pos + i as u64, (j - i) as u64)?;
        }
        i = j;
    }
    Ok(())
}
