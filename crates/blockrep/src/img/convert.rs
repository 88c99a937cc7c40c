//! `convert`: copy an image (its backing chain flattened) into a new image.

use super::chain::{is_zero, Chain};
use super::create::{create_image, parse_options};
use super::{fail1, opt_fmt, FormatName, ImgError, VerbResult};
use clap::Args;

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
    /// Input image, then output image.
    #[arg(num_args = 2.., required = true)]
    files: Vec<String>,
}

const CHUNK: u64 = 2 << 20;
/// Like QEMU's default `-S 4k`: all-zero 4 KiB blocks are not written.
const SPARSE: usize = 4096;

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
    if o.backing_file.is_some() {
        return Err(ImgError::usage(
            "convert: a backing file for the output is not supported",
        ));
    }
    let src = Chain::open(input, opt_fmt(&a.format)?, false, true)?;
    let size = src.size();
    o.size = Some(size);
    if let (Ok(x), Ok(y)) = (std::fs::canonicalize(input), std::fs::canonicalize(output)) {
        if x == y {
            return Err(ImgError::usage(format!(
                "convert: output '{output}' is the input image"
            )));
        }
    }
    create_image(output, ofmt, size, &o, true)?;
    let dst = Chain::open(output, Some(ofmt), true, false)?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < size {
        let want = (size - pos).min(CHUNK);
        let st = src.status(pos, want)?;
        let n = st.len.clamp(1, want);
        if st.present && !st.zero {
            let b = &mut buf[..n as usize];
            src.read(pos, b)?;
            // Write only the non-zero 4 KiB blocks, in runs.
            let mut i = 0usize;
            while i < b.len() {
                let end = (i + SPARSE).min(b.len());
                if is_zero(&b[i..end]) {
                    i = end;
                    continue;
                }
                let mut j = end;
                while j < b.len() {
                    let e = (j + SPARSE).min(b.len());
                    if is_zero(&b[j..e]) {
                        break;
                    }
                    j = e;
                }
                dst.write_at_layer(0, pos + i as u64, &b[i..j])?;
                i = j;
            }
        }
        pos += n;
    }
    dst.close()
}
