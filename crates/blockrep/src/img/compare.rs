//! `compare`: do two images read the same? Exit 0 identical, 1 different, 2 error.

use super::chain::Chain;
use super::{opt_fmt, FormatName, ImgError, VerbResult};
use clap::Args;

/// Arguments of `compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Format of the first image.
    #[arg(short = 'f')]
    format1: Option<FormatName>,
    /// Format of the second image.
    #[arg(short = 'F')]
    format2: Option<FormatName>,
    /// Strict: sizes and allocation must match too.
    #[arg(short = 's')]
    strict: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Progress (accepted, not shown).
    #[arg(short = 'p')]
    progress: bool,
    /// Force share (accepted for compatibility; we take no locks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// First image.
    filename1: String,
    /// Second image.
    filename2: String,
}

const CHUNK: u64 = 2 << 20;

/// Run `compare`.
pub fn run(a: CompareArgs) -> VerbResult {
    let _ = (a.progress, a.force_share);
    let f1 = opt_fmt(&a.format1).map_err(|e| (e, 2))?;
    let f2 = opt_fmt(&a.format2).map_err(|e| (e, 2))?;
    let c1 = Chain::open(&a.filename1, f1, false, true).map_err(|e| (e, 2))?;
    let c2 = Chain::open(&a.filename2, f2, false, true).map_err(|e| (e, 2))?;
    match compare(&c1, &c2, a.strict, a.quiet) {
        Ok(None) => {
            if !a.quiet {
                println!("Images are identical.");
            }
            Ok(0)
        }
        Ok(Some(msg)) => {
            if !a.quiet {
                println!("{msg}");
            }
            Ok(1)
        }
        Err(e) => Err((e, 2)),
    }
}

/// QEMU reports the start of the first differing 512-byte sector.
fn mismatch(pos: u64, i: usize) -> String {
    let at = (pos + i as u64) / 512 * 512;
    format!("Content mismatch at offset {at}!")
}

/// Offset of the first non-zero byte.
fn first_nonzero(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b != 0)
}

/// Compare the common part, then the tail of the longer image against zeros.
/// Returns the mismatch message, or None when the images read the same.
fn compare(c1: &Chain, c2: &Chain, strict: bool, quiet: bool) -> Result<Option<String>, ImgError> {
    let (s1, s2) = (c1.size(), c2.size());
    if strict && s1 != s2 {
        return Ok(Some("Strict mode: Image size mismatch!".into()));
    }
    let common = s1.min(s2);
    let mut b1 = vec![0u8; CHUNK as usize];
    let mut b2 = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < common {
        let want = (common - pos).min(CHUNK);
        let st1 = c1.status(pos, want)?;
        let st2 = c2.status(pos, want)?;
        let n = st1.len.min(st2.len).clamp(1, want);
        if strict && (st1.present != st2.present || st1.zero != st2.zero) {
            return Ok(Some(format!(
                "Strict mode: Offset {pos} block status mismatch!"
            )));
        }
        let (r1, r2) = (&mut b1[..n as usize], &mut b2[..n as usize]);
        match (st1.present, st2.present) {
            (false, false) => {}
            (true, true) => {
                c1.read(pos, r1)?;
                c2.read(pos, r2)?;
                if r1 != r2 {
                    let i = r1
                        .iter()
                        .zip(r2.iter())
                        .position(|(x, y)| x != y)
                        .unwrap_or(0);
                    return Ok(Some(mismatch(pos, i)));
                }
            }
            (true, false) | (false, true) => {
                let (c, r) = if st1.present { (c1, r1) } else { (c2, r2) };
                c.read(pos, r)?;
                if let Some(i) = first_nonzero(r) {
                    return Ok(Some(mismatch(pos, i)));
                }
            }
        }
        pos += n;
    }
    if s1 != s2 {
        if !quiet {
            println!("Warning: Image size mismatch!");
        }
        let longer = if s1 > s2 { c1 } else { c2 };
        let end = s1.max(s2);
        let mut pos = common;
        while pos < end {
            let want = (end - pos).min(CHUNK);
            let st = longer.status(pos, want)?;
            let n = st.len.clamp(1, want);
            if st.present && !st.zero {
                let r = &mut b1[..n as usize];
                longer.read(pos, r)?;
                if let Some(i) = first_nonzero(r) {
                    return Ok(Some(mismatch(pos, i)));
                }
            }
            pos += n;
        }
    }
    Ok(None)
}
