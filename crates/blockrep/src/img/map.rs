//! `map`: where each range of the disk lives, as `qemu-img map` prints it.

use super::chain::{Chain, Status};
use super::size::parse_size;
use super::{fail1, ImageOpt, ImgError, OutputFormat, VerbResult};
use clap::Args;
use std::io::Write;

/// Arguments of `map`.
#[derive(Debug, Args)]
pub struct MapArgs {
    #[command(flatten)]
    image: ImageOpt,
    /// Output format.
    #[arg(long = "output", value_enum, default_value = "human")]
    output: OutputFormat,
    /// First byte to map.
    #[arg(long = "start-offset")]
    start_offset: Option<String>,
    /// How many bytes to map.
    #[arg(long = "max-length")]
    max_length: Option<String>,
    /// Force share (accepted for compatibility; we take no locks).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    filename: String,
}

/// One merged entry of the map.
#[derive(Debug, Clone, Copy)]
struct Entry {
    start: u64,
    st: Status,
}

fn mergeable(a: &Entry, b: &Status) -> bool {
    let s = &a.st;
    s.depth == b.depth
        && s.present == b.present
        && s.zero == b.zero
        && s.data == b.data
        && s.compressed == b.compressed
        && match (s.offset, b.offset) {
            (None, None) => true,
            (Some(x), Some(y)) => y == x + s.len,
            _ => false,
        }
}

fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// Run `map`.
pub fn run(a: MapArgs) -> VerbResult {
    let _ = a.force_share;
    fail1(run_inner(a)).map(|()| 0)
}

fn run_inner(a: MapArgs) -> Result<(), ImgError> {
    let chain = Chain::open(&a.filename, super::opt_fmt(&a.image.format)?, false, true)?;
    let size = chain.size();
    let start = match &a.start_offset {
        Some(s) => parse_size(s)?,
        None => 0,
    };
    let end = match &a.max_length {
        Some(s) => start.saturating_add(parse_size(s)?).min(size),
        None => size,
    };
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut cur: Option<Entry> = None;
    let mut first = true;
    let mut pos = start;
    let mut emit = |e: Entry, out: &mut std::io::StdoutLock| -> std::io::Result<()> {
        match a.output {
            OutputFormat::Json => {
                let s = e.st;
                let mut line = format!(
                    "{}{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                    if first { "[" } else { ",\n" },
                    e.start, s.len, s.depth, s.present, s.zero, s.data, s.compressed
                );
                if let Some(o) = s.offset {
                    line += &format!(", \"offset\": {o}");
                }
                line += "}";
                first = false;
                out.write_all(line.as_bytes())
            }
            OutputFormat::Human => {
                if e.st.data && !e.st.zero {
                    if let Some(o) = e.st.offset {
                        let file = &chain.layers[e.st.depth].name;
                        writeln!(
                            out,
                            "{:<16}{:<16}{:<16}{}",
                            hex(e.start),
                            hex(e.st.len),
                            hex(o),
                            file
                        )?;
                    }
                }
                Ok(())
            }
        }
    };
    let io = |e: std::io::Error| ImgError::io("write output", e);
    if a.output == OutputFormat::Human {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )
        .map_err(io)?;
    }
    while pos < end {
        let st = chain.status(pos, end - pos)?;
        let st = Status {
            len: st.len.max(1).min(end - pos),
            ..st
        };
        match &mut cur {
            Some(c) if mergeable(c, &st) => c.st.len += st.len,
            _ => {
                if let Some(c) = cur.take() {
                    emit(c, &mut out).map_err(io)?;
                }
                cur = Some(Entry { start: pos, st });
            }
        }
        pos += st.len;
    }
    if let Some(c) = cur.take() {
        emit(c, &mut out).map_err(io)?;
    }
    if a.output == OutputFormat::Json {
        if first {
            out.write_all(b"[").map_err(io)?;
        }
        out.write_all(b"]\n").map_err(io)?;
    }
    Ok(())
}
