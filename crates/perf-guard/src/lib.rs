//! Regression guard for the hot paths, by instruction count.
//!
//! Wall-clock benchmarks on a shared 2-core machine swing by tens of percent;
//! the number of instructions a path executes under
//! `valgrind --tool=callgrind` does not. This crate holds:
//!
//! * the hot-path workloads ([`HotPath`]): a 4 KiB write through
//!   block-graph's one door on the memory driver, a qcow2 L2 lookup
//!   ([`qcow_lite::Qcow2::map`] on a cached table), a 4 KiB rewrite through
//!   the copy-before-write filter of a running backup job (the "already
//!   copied?" check), and one 4 KiB NBD read round between our client and
//!   our server over a Unix socket, with a memory export;
//! * the probe binary `perf-guard-probe ITERS [PATH...]` that, for each path,
//!   sets the workload up, warms it up and runs it `ITERS` times between two
//!   marker functions;
//! * [`measure`]: runs the probe once under callgrind with
//!   `--dump-before` on both markers, so each path's window is
//!   its own profile part: set-up, start-up and tear-down are not counted,
//!   every thread inside the window is (the NBD server's too);
//! * the committed baseline (`baseline.txt`, one line per profile and path)
//!   and [`compare`], which the test `tests/guard.rs` uses to fail when a
//!   count grows by more than [`TOLERANCE`].
//!
//! The test measures the probe built in the test's own profile (debug under
//! a plain `cargo test`); the baseline keeps one figure per profile, so a
//! `cargo test --release` run compares against release counts. Re-record with
//! `PERF_GUARD_BLESS=1 cargo test -p perf-guard` and commit `baseline.txt`
//! together with the change that moved the counts.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;

use block_graph::{Backend, Graph, NodeRef, PermPair, WriteFlags};
use block_jobs::{BackupJob, BackupOptions, JobManager};
use nbd::{ExportOptions, MemExport, NbdClient, NbdServer, ServerAddr, ServerConfig};
use qcow_lite::{CreateOptions, MemStorage, Qcow2};
use serde_json::json;

/// Growth of an instruction count over its baseline that fails the guard.
pub const TOLERANCE: f64 = 0.10;

/// Measured operations per window.
pub const ITERS: u64 = 200;

/// Measured windows per path; the guard takes the smallest per-operation
/// count. Deterministic paths give equal windows; the NBD round's threads
/// can spin a little longer or shorter depending on where valgrind switches
/// threads, which only ever adds instructions, so the minimum is the stable
/// figure.
pub const WINDOWS_PER_PATH: u32 = 5;

/// Errors of the guard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A workload could not be set up or one of its operations failed.
    #[error("hot path {path}: {what}")]
    Workload {
        /// The hot path.
        path: &'static str,
        /// What failed.
        what: String,
    },
    /// valgrind could not be run, or failed.
    #[error("valgrind: {0}")]
    Valgrind(String),
    /// A callgrind output file or the baseline could not be parsed.
    #[error("parse {file}: {what}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// File I/O.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The guarded hot paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotPath {
    /// 4 KiB write through the one door on the memory driver.
    DoorWrite4k,
    /// qcow2 L2 lookup of an allocated cluster (L2 table cached).
    Qcow2Map,
    /// 4 KiB rewrite of an already-copied cluster through the
    /// copy-before-write filter of a running backup job (sync=none).
    CbwCheck4k,
    /// One 4 KiB NBD read round: our client, our server, a memory export,
    /// a Unix socket.
    NbdRead4k,
}

impl HotPath {
    /// Every guarded path.
    pub const ALL: [HotPath; 4] = [
        HotPath::DoorWrite4k,
        HotPath::Qcow2Map,
        HotPath::CbwCheck4k,
        HotPath::NbdRead4k,
    ];

    /// Stable name (baseline key and probe argument).
    pub fn name(self) -> &'static str {
        match self {
            HotPath::DoorWrite4k => "door-write-4k",
            HotPath::Qcow2Map => "qcow2-l2-map",
            HotPath::CbwCheck4k => "cbw-check-write-4k",
            HotPath::NbdRead4k => "nbd-read-round-4k",
        }
    }
}

impl fmt::Display for HotPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HotPath {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        HotPath::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = HotPath::ALL.iter().map(|p| p.name()).collect();
                format!("unknown hot path '{s}' (one of {})", names.join(", "))
            })
    }
}

/// Slots the workloads cycle over (all pre-written: no allocation while measured).
const SLOTS: u64 = 64;

/// A prepared workload: everything set up, `op(i)` runs the hot path once.
pub struct Workload {
    path: HotPath,
    op: Box<dyn FnMut(u64) -> std::result::Result<(), String>>,
    finish: Option<Box<dyn FnOnce()>>,
}

impl Workload {
    /// Runs the hot path `iters` times.
    pub fn run(&mut self, iters: u64) -> Result<()> {
        for i in 0..iters {
            (self.op)(i).map_err(|what| Error::Workload {
                path: self.path.name(),
                what,
            })?;
        }
        Ok(())
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            f();
        }
    }
}

fn werr(path: HotPath) -> impl Fn(String) -> Error {
    move |what| Error::Workload {
        path: path.name(),
        what,
    }
}

/// Sets up the workload of `path` (pre-writing what it touches, so the
/// measured operations allocate nothing new).
pub fn prepare(path: HotPath) -> Result<Workload> {
    let e = werr(path);
    let w = match path {
        HotPath::DoorWrite4k => {
            let g = Graph::new();
            let n: NodeRef = g
                .add_node(&json!({"driver": "memory", "node-name": "m",
                                  "size": 64u64 << 20, "cluster-size": 4096}))
                .map_err(|x| e(x.to_string()))?;
            let data = vec![0xa5u8; 4096];
            for s in 0..SLOTS {
                n.write(s * 4096, &data, WriteFlags::default())
                    .map_err(|x| e(x.to_string()))?;
            }
            Workload {
                path,
                op: Box::new(move |i| {
                    let _keep = &g;
                    n.write((i % SLOTS) * 4096, &data, WriteFlags::default())
                        .map_err(|x| x.to_string())
                }),
                finish: None,
            }
        }
        HotPath::Qcow2Map => {
            let img = Qcow2::create(
                MemStorage::new(),
                &CreateOptions {
                    size: 128 << 20,
                    cluster_size: 65536,
                    ..Default::default()
                },
            )
            .map_err(|x| e(x.to_string()))?;
            // One 512-byte write allocates each slot's cluster.
            let data = vec![0x5au8; 512];
            let stride = (128u64 << 20) / SLOTS;
            for s in 0..SLOTS {
                img.write(s * stride, &data, None)
                    .map_err(|x| e(x.to_string()))?;
            }
            Workload {
                path,
                op: Box::new(move |i| {
                    let (_m, n) = img
                        .map((i % SLOTS) * stride, 65536)
                        .map_err(|x| x.to_string())?;
                    if n == 0 {
                        return Err("map returned an empty run".into());
                    }
                    Ok(())
                }),
                finish: None,
            }
        }
        HotPath::CbwCheck4k => {
            let cs = 65536u64;
            let size = SLOTS * cs;
            let g = Graph::new();
            block_jobs::register_drivers(&g);
            let src = g
                .add_node(&json!({"driver": "memory", "node-name": "src", "size": size}))
                .map_err(|x| e(x.to_string()))?;
            let tgt = g
                .add_node(
                    &json!({"driver": "memory", "node-name": "tgt", "size": size,
                                  "backing": "src"}),
                )
                .map_err(|x| e(x.to_string()))?;
            let be: Backend = g
                .new_backend(&src, PermPair::READ_WRITE)
                .map_err(|x| e(x.to_string()))?;
            let m = JobManager::new();
            let bk = BackupJob::start(&m, &g, &src, &tgt, BackupOptions::default())
                .map_err(|x| e(x.to_string()))?;
            let data = vec![0x33u8; 4096];
            for s in 0..SLOTS {
                be.write(s * cs, &data, WriteFlags::default())
                    .map_err(|x| e(x.to_string()))?;
            }
            if bk.tracker().epoch_copies() != SLOTS {
                return Err(e(format!(
                    "expected {SLOTS} clusters copied, tracker says {}",
                    bk.tracker().epoch_copies()
                )));
            }
            let job = bk.job().clone();
            Workload {
                path,
                op: Box::new(move |i| {
                    let _keep = (&g, &m, &bk);
                    be.write((i % SLOTS) * cs, &data, WriteFlags::default())
                        .map_err(|x| x.to_string())
                }),
                finish: Some(Box::new(move || {
                    let _ = job.cancel(true);
                    job.wait();
                })),
            }
        }
        HotPath::NbdRead4k => {
            let dir = tempfile::tempdir().map_err(|x| e(x.to_string()))?;
            let sock = dir.path().join("nbd.sock");
            let server = Arc::new(NbdServer::new(ServerConfig::default()));
            server
                .add_export(
                    "m",
                    Arc::new(MemExport::new(64 << 20)),
                    ExportOptions {
                        read_only: false,
                        description: None,
                    },
                )
                .map_err(|x| e(x.to_string()))?;
            server.listen_unix(&sock).map_err(|x| e(x.to_string()))?;
            let client =
                NbdClient::connect(ServerAddr::Unix(sock), "m").map_err(|x| e(x.to_string()))?;
            let data = vec![0x77u8; 4096];
            for s in 0..SLOTS {
                client
                    .write(s * 4096, &data, false)
                    .map_err(|x| e(x.to_string()))?;
            }
            let mut buf = vec![0u8; 4096];
            let client = Arc::new(client);
            let (c2, s2) = (client.clone(), server.clone());
            Workload {
                path,
                op: Box::new(move |i| {
                    let _keep = &dir;
                    client
                        .read((i % SLOTS) * 4096, &mut buf)
                        .map_err(|x| x.to_string())?;
                    if buf[0] != 0x77 {
                        return Err(format!("read back {:#x}, wrote 0x77", buf[0]));
                    }
                    Ok(())
                }),
                finish: Some(Box::new(move || {
                    c2.close();
                    s2.stop();
                })),
            }
        }
    };
    Ok(w)
}

/// The profile this crate was built in ("debug" or "release"): the probe
/// binary a test runs is built in the same one.
pub fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// Checks that valgrind is installed, with a message saying how to install it.
pub fn check_valgrind() -> Result<()> {
    match Command::new("valgrind").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err(Error::Valgrind(
            "valgrind is not installed: install it (Debian/Ubuntu: apt-get install valgrind)"
                .into(),
        )),
    }
}

/// Total instructions (`Ir`) of a callgrind output file (`totals:` or
/// `summary:` line, first event).
pub fn parse_callgrind_total(file: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(file).map_err(|source| Error::Io {
        file: file.to_path_buf(),
        source,
    })?;
    let mut found = None;
    for line in text.lines() {
        let rest = line
            .strip_prefix("totals:")
            .or_else(|| line.strip_prefix("summary:"));
        if let Some(rest) = rest {
            let v = rest.split_whitespace().next().unwrap_or("");
            found = Some(v.parse::<u64>().map_err(|_| Error::Parse {
                file: file.to_path_buf(),
                what: format!("bad count in '{line}'"),
            })?);
            if line.starts_with("totals:") {
                break;
            }
        }
    }
    found.ok_or_else(|| Error::Parse {
        file: file.to_path_buf(),
        what: "no totals:/summary: line".into(),
    })
}

/// Operations run before the measured window (lazy initialisation, caches).
pub const WARMUP: u64 = 50;

/// Marks the start of a measured window; callgrind dumps (and resets) its
/// counters on entry (`--dump-before`), so the next part holds the window only.
#[inline(never)]
pub fn window_begin(path: HotPath) {
    // Distinct bodies: the two markers must not be merged into one symbol.
    WINDOWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::hint::black_box(path);
}

static WINDOWS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Marks the end of a measured window; callgrind dumps on entry too
/// (`--dump-before`): that part holds exactly the window's instructions, on
/// every thread (the NBD server's too).
#[inline(never)]
pub fn window_end(path: HotPath) {
    std::hint::black_box((path, WINDOWS.load(std::sync::atomic::Ordering::Relaxed)));
}

/// What the probe binary runs: for each path, set up, [`WARMUP`] operations,
/// then [`WINDOWS_PER_PATH`] times `iters` operations between
/// [`window_begin`] and [`window_end`].
pub fn probe_main(paths: &[HotPath], iters: u64) -> Result<()> {
    for &p in paths {
        let mut w = prepare(p)?;
        w.run(WARMUP)?;
        for _ in 0..WINDOWS_PER_PATH {
            window_begin(p);
            let r = w.run(iters);
            window_end(p);
            r?;
        }
    }
    Ok(())
}

/// Runs the probe for `paths` under callgrind and returns the instructions
/// per operation of each, in order (the smallest of its windows).
pub fn measure(probe: &Path, paths: &[HotPath], iters: u64, out_dir: &Path) -> Result<Vec<u64>> {
    let out = out_dir.join("callgrind.out");
    let mut cmd = Command::new("valgrind");
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg("--dump-instr=no")
        .arg("--dump-before=perf_guard::window_begin")
        .arg("--dump-before=perf_guard::window_end")
        .arg(probe)
        .arg(iters.to_string())
        .args(paths.iter().map(|p| p.name()));
    let o = cmd.output().map_err(|x| {
        Error::Valgrind(format!(
            "could not run valgrind ({x}); install it (Debian/Ubuntu: apt-get install valgrind)"
        ))
    })?;
    if !o.status.success() {
        return Err(Error::Valgrind(format!(
            "{cmd:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    // Parts are `callgrind.out.N`; the windows are those dumped on entering window_end.
    let mut parts = Vec::new();
    let rd = std::fs::read_dir(out_dir).map_err(|source| Error::Io {
        file: out_dir.to_path_buf(),
        source,
    })?;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name.strip_prefix("callgrind.out.") {
            if let Ok(n) = n.parse::<u32>() {
                parts.push((n, e.path()));
            }
        }
    }
    parts.sort();
    let mut windows = Vec::new();
    for (_, f) in parts {
        let text = std::fs::read_to_string(&f).map_err(|source| Error::Io {
            file: f.clone(),
            source,
        })?;
        let after = text
            .lines()
            .take(20)
            .any(|l| l.starts_with("desc: Trigger:") && l.contains("window_end"));
        if after {
            windows.push(parse_callgrind_total(&f)?);
        }
    }
    let per_path = WINDOWS_PER_PATH as usize;
    if windows.len() != paths.len() * per_path {
        return Err(Error::Parse {
            file: out,
            what: format!(
                "expected {} measured windows (parts dumped at window_end), found {}",
                paths.len() * per_path,
                windows.len()
            ),
        });
    }
    Ok(windows
        .chunks(per_path)
        .map(|w| w.iter().copied().min().unwrap_or(0) / iters.max(1))
        .collect())
}

/// One baseline entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// "debug" or "release".
    pub profile: String,
    /// Hot path name.
    pub path: String,
    /// Instructions per operation.
    pub per_op: u64,
}

/// Parses a baseline file: `profile path instructions-per-op` lines, `#` comments.
pub fn parse_baseline(text: &str, file: &Path) -> Result<Vec<Entry>> {
    let mut v = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let bad = || Error::Parse {
            file: file.to_path_buf(),
            what: format!(
                "line {}: expected 'profile path count', got '{line}'",
                no + 1
            ),
        };
        if f.len() != 3 {
            return Err(bad());
        }
        v.push(Entry {
            profile: f[0].to_string(),
            path: f[1].to_string(),
            per_op: f[2].parse().map_err(|_| bad())?,
        });
    }
    Ok(v)
}

/// Renders a baseline file.
pub fn render_baseline(entries: &[Entry]) -> String {
    let mut s = String::from(
        "# perf-guard baseline: instructions per operation under callgrind.\n\
         # profile path instructions-per-op. Re-record with\n\
         # PERF_GUARD_BLESS=1 cargo test -p perf-guard (and --release for release rows),\n\
         # and commit this file with the change that moved the counts.\n",
    );
    for e in entries {
        s.push_str(&format!("{} {} {}\n", e.profile, e.path, e.per_op));
    }
    s
}

/// Verdict of one measured path against the baseline.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Within tolerance (ratio measured/baseline).
    Ok(f64),
    /// Grew by more than [`TOLERANCE`] (ratio).
    Regressed(f64),
    /// No baseline entry for this profile and path.
    Missing,
}

/// Compares a measured count with the baseline entry for `profile`/`path`.
pub fn compare(baseline: &[Entry], profile: &str, path: &str, measured: u64) -> Verdict {
    match baseline
        .iter()
        .find(|e| e.profile == profile && e.path == path)
    {
        None => Verdict::Missing,
        Some(e) => {
            let ratio = measured as f64 / e.per_op.max(1) as f64;
            if ratio > 1.0 + TOLERANCE {
                Verdict::Regressed(ratio)
            } else {
                Verdict::Ok(ratio)
            }
        }
    }
}
