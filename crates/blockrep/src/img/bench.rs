//! `bench`: qemu-img's simple I/O benchmark, over our stack: the image is
//! opened as a block-graph node (`qcow2` from qcow-lite, or `raw`, over a
//! `file` node, with its backing chain), and `depth` threads issue `count`
//! requests of `size` bytes through the node's door, `step` bytes apart,
//! wrapping at the end of the image.
//!
//! As with qemu-img, the image may also be an NBD URI
//! (`nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`): the node
//! is then the format over our `nbd` client driver. `--latency` (ours, not
//! qemu-img's) prints one JSON line with the run's time and the per-request
//! latency percentiles, for benchmarks that need more than a total time.

use super::header::is_qcow2;
use super::size::parse_size;
use super::{fail1, opt_fmt, Format, FormatName, ImgError, VerbResult};
use block_graph::{Graph, NodeRef, WriteFlags};
use clap::Args;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Arguments of `bench` (qemu-img's flags).
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    count: u64,
    /// Requests in flight (threads).
    #[arg(short = 'd', default_value_t = 64)]
    depth: u64,
    /// Format of the image.
    #[arg(short = 'f')]
    format: Option<FormatName>,
    /// Flush after this many write requests (0: never).
    #[arg(long = "flush-interval", default_value_t = 0)]
    flush_interval: u64,
    /// Do not flush at the end (with --flush-interval).
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// Native AIO mode (accepted; we use threads).
    #[arg(short = 'i')]
    aio: Option<String>,
    /// No host cache (O_DIRECT, like -t none).
    #[arg(short = 'n')]
    nocache: bool,
    /// Offset of the first request.
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Byte written by write requests.
    #[arg(long = "pattern", default_value_t = 0)]
    pattern: u8,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Request size.
    #[arg(short = 's', default_value = "4096")]
    size: String,
    /// Step between requests (default: the request size).
    #[arg(short = 'S')]
    step: Option<String>,
    /// Cache mode: none, writeback (default), writethrough, directsync, unsafe.
    #[arg(short = 't')]
    cache: Option<String>,
    /// Write requests instead of reads.
    #[arg(short = 'w')]
    write: bool,
    /// Force share (accepted for compatibility).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Print one JSON line: requests, bytes, seconds (through the final
    /// flush) and per-request latency percentiles in microseconds.
    #[arg(long = "latency")]
    latency: bool,
    /// The image.
    filename: String,
}

/// The `server` and `export` options of the `nbd` driver for an NBD URI
/// (`nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST[:PORT]/EXPORT`), or None
/// when `name` is not one.
fn nbd_target(name: &str) -> Result<Option<(serde_json::Value, String)>, ImgError> {
    let bad = || ImgError::usage(format!("Invalid NBD URI '{name}'"));
    if let Some(rest) = name.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once('?').ok_or_else(bad)?;
        let export = path.strip_prefix('/').unwrap_or(path);
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .filter(|s| !s.is_empty())
            .ok_or_else(bad)?;
        return Ok(Some((
            json!({"type": "unix", "path": socket}),
            export.to_string(),
        )));
    }
    if let Some(rest) = name.strip_prefix("nbd://") {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
            None => (hostport, 10809),
        };
        if host.is_empty() {
            return Err(bad());
        }
        return Ok(Some((
            json!({"type": "inet", "host": host, "port": port.to_string()}),
            export.to_string(),
        )));
    }
    Ok(None)
}

/// Open the image as node "bench" of a new graph.
fn open_node(a: &BenchArgs) -> Result<(Graph, NodeRef), ImgError> {
    if let Some((server, export)) = nbd_target(&a.filename)? {
        let fmt = opt_fmt(&a.format)?.unwrap_or(Format::Raw);
        let g = Graph::new();
        qcow_lite::register(&g);
        nbd::blockdev::register(&g);
        let def = json!({
            "driver": fmt.name(),
            "node-name": "bench",
            "read-only": !a.write,
            "file": {"driver": "nbd", "server": server, "export": export,
                     "read-only": !a.write}
        });
        let node = g
            .add_node(&def)
            .map_err(|e| ImgError::image(format!("Could not open '{}': {e}", a.filename)))?;
        return Ok((g, node));
    }
    let fmt = match opt_fmt(&a.format)? {
        Some(f) => f,
        None => {
            let f = std::fs::File::open(&a.filename).map_err(|e| ImgError::Open {
                path: a.filename.clone(),
                source: e,
            })?;
            if is_qcow2(&f)? {
                Format::Qcow2
            } else {
                Format::Raw
            }
        }
    };
    if !std::path::Path::new(&a.filename).is_file() {
        return Err(ImgError::image(format!(
            "Could not open '{}': not a regular file",
            a.filename
        )));
    }
    let (direct, no_flush) = match a.cache.as_deref() {
        None | Some("writeback") | Some("writethrough") => (a.nocache, false),
        Some("none") | Some("directsync") => (true, false),
        Some("unsafe") => (a.nocache, true),
        Some(other) => {
            return Err(ImgError::usage(format!(
            "Invalid cache option: '{other}' (none, writeback, writethrough, directsync, unsafe)"
        )))
        }
    };
    let g = Graph::new();
    qcow_lite::register(&g);
    let def = json!({
        "driver": fmt.name(),
        "node-name": "bench",
        "read-only": !a.write,
        "file": {
            "driver": "file",
            "filename": a.filename,
            "read-only": !a.write,
            "cache": {"direct": direct, "no-flush": no_flush}
        }
    });
    let node = g
        .add_node(&def)
        .map_err(|e| ImgError::image(format!("Could not open '{}': {e}", a.filename)))?;
    Ok((g, node))
}

/// Run `bench`.
pub fn run(a: BenchArgs) -> VerbResult {
    let _ = (&a.aio, a.force_share);
    fail1(run_inner(&a)).map(|()| 0)
}

fn run_inner(a: &BenchArgs) -> Result<(), ImgError> {
    let bufsize = parse_size(&a.size)?;
    let step = match &a.step {
        Some(s) => parse_size(s)?,
        None => bufsize,
    };
    let offset = parse_size(&a.offset)?;
    if bufsize == 0 || bufsize > (64 << 20) {
        return Err(ImgError::usage("Invalid buffer size (1 byte to 64 MiB)"));
    }
    if a.depth == 0 || a.depth > 1024 {
        return Err(ImgError::usage("Invalid queue depth (1 to 1024)"));
    }
    if a.flush_interval > 0 && !a.write {
        return Err(ImgError::usage(
            "--flush-interval is only available in write tests",
        ));
    }
    let (graph, node) = open_node(a)?;
    let image_size = node.len();
    if offset.checked_add(bufsize).map_or(true, |e| e > image_size) {
        return Err(ImgError::usage(format!(
            "Requests of {bufsize} bytes at offset {offset} do not fit in the image ({image_size} bytes)"
        )));
    }
    if !a.quiet {
        println!(
            "Sending {} {} requests, {bufsize} bytes each, {} in parallel (starting at offset {offset}, step size {step})",
            a.count,
            if a.write { "write" } else { "read" },
            a.depth
        );
    }
    let flags = WriteFlags {
        fua: matches!(a.cache.as_deref(), Some("writethrough" | "directsync")),
    };
    let next = AtomicU64::new(0);
    let first_err: Mutex<Option<ImgError>> = Mutex::new(None);
    let span = image_size - bufsize + 1;
    let lat_ns: Mutex<Vec<u64>> = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.depth.min(a.count.max(1)) {
            s.spawn(|| {
                // Aligned for O_DIRECT (`-t none`), as qemu-img's buffers:
                // the file driver then writes it without a bounce copy.
                let mut store = vec![a.pattern; bufsize as usize + 4096];
                let at = store.as_ptr().align_offset(4096).min(4096);
                let buf = &mut store[at..at + bufsize as usize];
                let mut mine: Vec<u64> = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= a.count {
                        break;
                    }
                    let t = a.latency.then(Instant::now);
                    let off = (offset + i.wrapping_mul(step) % span.max(1)) % span.max(1);
                    let r = if a.write {
                        let r = node.write(off, buf, flags);
                        if r.is_ok() && a.flush_interval > 0 && (i + 1) % a.flush_interval == 0 {
                            node.flush()
                        } else {
                            r
                        }
                    } else {
                        node.read(off, buf)
                    };
                    if let Some(t) = t {
                        mine.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                    }
                    let r = r.map_err(|e| ImgError::image(format!("bench: {e}")));
                    if let Err(e) = r {
                        let mut g = first_err.lock().unwrap_or_else(|p| p.into_inner());
                        g.get_or_insert(e);
                        next.store(a.count, Ordering::Relaxed);
                        break;
                    }
                }
                if !mine.is_empty() {
                    lat_ns
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(mine);
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    if a.write && !a.no_drain {
        node.flush()
            .map_err(|e| ImgError::image(format!("bench: flush: {e}")))?;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(node);
    // Closing the node closes the image cleanly (qcow2: exact refcounts).
    graph
        .remove_node("bench")
        .map_err(|e| ImgError::image(format!("bench: close: {e}")))?;
    if !a.quiet {
        println!("Run completed in {secs:.3} seconds.");
    }
    if a.latency {
        let mut v = lat_ns.into_inner().unwrap_or_else(|p| p.into_inner());
        v.sort_unstable();
        let us = |q: f64| percentile_ns(&v, q) as f64 / 1000.0;
        println!(
            "{}",
            json!({
                "requests": v.len(),
                "bytes": v.len() as u64 * bufsize,
                "seconds": secs,
                "latency-us": {"p50": us(0.5), "p90": us(0.9), "p99": us(0.99),
                               "max": us(1.0)}
            })
        );
    }
    Ok(())
}

/// Nearest-rank percentile of sorted samples (0 when empty).
fn percentile_ns(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
