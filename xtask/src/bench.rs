//! `cargo xtask bench [--quick] [--no-criterion]`: the criterion benches of
//! every crate, then the side-by-side harness (ours against QEMU's tools, in
//! alternating runs on the same files), written to `BENCHMARKS.md`.
//!
//! Every timed run is one process (or one client process against a running
//! server) timed by wall clock from spawn to exit, so both sides pay the same
//! open, flush and close. Each row alternates ours and the peer `reps` times
//! after one unrecorded warm-up pair; the table shows throughput medians with
//! min and max, and the ratio of the medians (ours / peer, higher is better).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

mod notes;
mod overhead;
mod page_reporting;
mod saved;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Options of the task.
struct Opts {
    /// Only write the report again from the last run's saved figures.
    render: bool,
    quick: bool,
    criterion: bool,
    reps: usize,
    /// Side-by-side figures to run (numbers); empty: all.
    only: Vec<u32>,
}

fn parse_opts(rest: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        render: false,
        quick: false,
        criterion: true,
        reps: 5,
        only: Vec::new(),
    };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--render" => o.render = true,
            "--no-criterion" => o.criterion = false,
            "--reps" => {
                let n = it.next().ok_or("--reps needs a number")?;
                o.reps = n
                    .parse()
                    .ok()
                    .filter(|&n: &usize| n >= 5)
                    .ok_or_else(|| format!("--reps needs a number >= 5, got '{n}'"))?;
            }
            "--only" => {
                let v = it.next().ok_or("--only needs figure numbers, e.g. 1,3")?;
                for f in v.split(',') {
                    let n = f.parse().map_err(|_| format!("--only: bad figure '{f}'"))?;
                    o.only.push(n);
                }
            }
            other => {
                return Err(format!(
                    "bench: unexpected option '{other}' \
                     (expected --quick, --no-criterion, --reps N, --only 1,4,7 (figures 1-7), \
                     --render)"
                ))
            }
        }
    }
    Ok(o)
}

/// One side-by-side row.
struct Row {
    figure: &'static str,
    name: String,
    /// Bytes moved by one run (throughput = bytes / seconds).
    bytes: u64,
    ours_cmd: String,
    peer_cmd: String,
    ours: Vec<f64>,
    peer: Vec<f64>,
    /// Per-run p99 request latency in µs (ours, peer), for rows whose
    /// writer reports it (figure 4).
    p99: Option<(Vec<f64>, Vec<f64>)>,
}

/// Checkpoint pause samples of one case (microseconds).
struct Pause {
    disk: String,
    dirty: u64,
    /// The daemon's own measure (`last-checkpoint-duration-us`).
    reported: Vec<f64>,
    /// QMP round trip of `xen-colo-do-checkpoint`, seen by the client.
    wall: Vec<f64>,
}

/// A row that could not be measured, with the reason.
struct Missing {
    figure: &'static str,
    what: String,
    why: String,
}

/// Everything the report needs.
struct Report {
    quick: bool,
    reps: usize,
    started: String,
    load_start: String,
    load_end: String,
    elapsed: Duration,
    criterion_status: String,
    criterion: Vec<(String, f64, f64, f64)>,
    rows: Vec<Row>,
    pauses: Vec<Pause>,
    missing: Vec<Missing>,
    versions: Vec<String>,
    /// Lines of the perf-guard test (instructions per operation).
    guard: Vec<String>,
}

/// Entry point of `cargo xtask bench`.
pub fn run(root: &Path, rest: &[String]) -> Result<(), String> {
    let opts = parse_opts(rest)?;
    let t0 = Instant::now();
    let started = sh_out("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default();
    let load_start = loadavg();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };
    if opts.render {
        let report = saved::load(&target.join("xtask-bench-last.json"))?;
        let out = root.join("BENCHMARKS.md");
        std::fs::write(&out, render(&report))
            .map_err(|e| format!("bench: {}: {e}", out.display()))?;
        eprintln!(
            "xtask bench: wrote {} again from the run started {} (notes from xtask/src/bench/notes.md)",
            out.display(),
            report.started
        );
        return Ok(());
    }

    for tool in ["qemu-img", "qemu-nbd", "qemu-io"] {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Err(format!(
                "bench: {tool} not found: install QEMU's tools (Debian/Ubuntu: apt-get install qemu-utils)"
            ));
        }
    }

    let crit_started = SystemTime::now();
    let criterion_status = if opts.criterion {
        // --no-fail-fast: one failing bench target does not skip the others.
        // --noplot: the harness reads criterion's JSON, not its charts.
        let mut args = vec![
            "bench",
            "--no-fail-fast",
            "--workspace",
            "--bench",
            "*",
            "--",
            "--noplot",
        ];
        // --quick: criterion's own quick mode (each bench runs until its
        // estimate is stable or its measurement time is up, no warm-up), and
        // the block-jobs commit bench on 64 MiB instead of 1 GiB.
        let env: &[(&str, &str)] = if opts.quick {
            args.extend(["--quick", "--measurement-time", "0.5"]);
            &[("BENCH_COMMIT_MIB", "64")]
        } else {
            &[]
        };
        let cmd = format!(
            "{}cargo {}",
            env.iter()
                .map(|(k, v)| format!("{k}={v} "))
                .collect::<String>(),
            args.join(" ")
        );
        eprintln!("xtask bench: {cmd}");
        let st = Command::new(&cargo)
            .args(&args)
            .envs(env.iter().copied())
            .current_dir(root)
            .status()
            .map_err(|e| format!("bench: could not run `{cmd}`: {e}"))?;
        if st.success() {
            format!("`{cmd}`: passed")
        } else {
            format!(
                "`{cmd}`: FAILED ({st}); the results below are those written before the failure"
            )
        }
    } else {
        "not run (--no-criterion)".to_string()
    };
    let criterion = collect_criterion(&target.join("criterion"), crit_started);

    eprintln!("xtask bench: cargo build --release -p blockrep");
    let st = Command::new(&cargo)
        .args(["build", "--release", "-p", "blockrep"])
        .current_dir(root)
        .status()
        .map_err(|e| format!("bench: cargo build: {e}"))?;
    if !st.success() {
        return Err("bench: cargo build --release -p blockrep failed".into());
    }
    let blockrep = target.join("release").join("blockrep");
    let work = target.join("xtask-bench");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("bench: {}: {e}", work.display()))?;

    let reporting = page_reporting::pause(&target.join("xtask-page-reporting-order.saved"));
    let h = Harness {
        blockrep,
        work: work.clone(),
        reps: opts.reps,
        quick: opts.quick,
        missing: std::cell::RefCell::new(Vec::new()),
    };
    let mut rows = Vec::new();
    let mut missing = Vec::new();
    let want = |f: u32| opts.only.is_empty() || opts.only.contains(&f);
    let mut pauses = Vec::new();
    // A figure that fails is reported as not measured, with its error; the
    // others still run.
    let mut failed = |figure: &'static str, r: Result<(), String>| {
        if let Err(e) = r {
            eprintln!("xtask bench: {figure} FAILED: {e}");
            missing.push(Missing {
                figure,
                what: "the whole figure (or its remaining rows)".into(),
                why: format!(
                    "the harness failed: {}",
                    e.replace('\n', " ").replace('|', "/")
                ),
            });
        }
    };
    if want(1) {
        failed("1. Image I/O", h.image_io(&mut rows));
    }
    if want(2) {
        failed("2. NBD", h.nbd(&mut rows));
    }
    if want(3) {
        failed("3. Commit", h.commit(&mut rows));
    }
    if want(4) {
        failed("4. Replication overhead", h.overhead(&mut rows));
    }
    if want(5) {
        failed("5. Copy-before-write", h.cbw(&mut rows));
    }
    if want(6) {
        failed("6. Checkpoint pause", h.checkpoint(&mut pauses));
    }
    if want(7) {
        failed("7. Failover", h.failover(&mut rows));
    }
    missing.extend(h.missing.take());
    not_measured(&mut missing, opts.quick, want(6));
    drop(reporting.paused);

    let guard = if opts.quick {
        vec!["not run in --quick (it runs in `cargo test --workspace`)".to_string()]
    } else {
        perf_guard(&cargo, root)
    };
    let versions = vec![
        sh_out("qemu-img", &["--version"])
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        sh_out("rustc", &["--version"]).unwrap_or_default(),
        format!(
            "{} CPUs ({})",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model()
        ),
        sh_out("uname", &["-sr"]).unwrap_or_default(),
        reporting.line,
    ];
    let report = Report {
        quick: opts.quick,
        reps: opts.reps,
        started,
        load_start,
        load_end: loadavg(),
        elapsed: t0.elapsed(),
        criterion_status,
        criterion,
        rows,
        pauses,
        missing,
        versions,
        guard,
    };
    let saved = target.join("xtask-bench-last.json");
    if let Err(e) = saved::save(&report, &saved) {
        eprintln!("xtask bench: could not keep the figures for --render: {e}");
    }
    let md = render(&report);
    let out = root.join("BENCHMARKS.md");
    std::fs::write(&out, md).map_err(|e| format!("bench: {}: {e}", out.display()))?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "xtask bench: wrote {} ({:.0} s)",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The perf-guard test's lines (instructions per operation).
fn perf_guard(cargo: &str, root: &Path) -> Vec<String> {
    eprintln!("xtask bench: cargo test -p perf-guard --test guard (callgrind counts)");
    Command::new(cargo)
        .args([
            "test",
            "-p",
            "perf-guard",
            "--test",
            "guard",
            "--",
            "--nocapture",
            "hot_path",
        ])
        .current_dir(root)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stderr).to_string()
                + &String::from_utf8_lossy(&o.stdout);
            let mut lines: Vec<String> = text
                .lines()
                .filter(|l| l.starts_with("perf-guard: "))
                .map(|l| l.trim_start_matches("perf-guard: ").to_string())
                .collect();
            lines.push(if o.status.success() {
                "guard test passed".into()
            } else {
                format!("guard test FAILED ({})", o.status)
            });
            lines
        })
        .unwrap_or_else(|e| vec![format!("could not run the guard: {e}")])
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn sh_out(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    Some(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Runs a command to completion, failing with its output if it fails.
fn run_ok(cmd: &mut Command) -> Result<(), String> {
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

/// Runs a command, returning its wall time from spawn to exit.
fn timed(cmd: &mut Command) -> Result<f64, String> {
    let t = Instant::now();
    run_ok(cmd)?;
    Ok(t.elapsed().as_secs_f64())
}

/// The command line, shell-like, for the report.
fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().to_string();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        s.push(' ');
        if a.contains(' ') || a.contains('?') || a.contains('&') {
            s.push('\'');
            s.push_str(&a);
            s.push('\'');
        } else {
            s.push_str(&a);
        }
    }
    s
}

struct Harness {
    blockrep: PathBuf,
    work: PathBuf,
    reps: usize,
    quick: bool,
    /// Rows a figure could not measure (with the reason), added to the
    /// report's "Rows not measured".
    missing: std::cell::RefCell<Vec<Missing>>,
}

/// A benchmark side: builds the command of one run, after preparing its files.
type Side<'a> = dyn FnMut() -> Result<Command, String> + 'a;

impl Harness {
    fn qemu_img(&self) -> Command {
        Command::new("qemu-img")
    }

    fn ours_img(&self) -> Command {
        let mut c = Command::new(&self.blockrep);
        c.arg("img");
        c
    }

    /// Alternates ours and the peer: one unrecorded warm-up pair, then
    /// `reps` recorded pairs.
    fn alternate(
        &self,
        figure: &'static str,
        name: String,
        bytes: u64,
        ours: &mut Side<'_>,
        peer: &mut Side<'_>,
    ) -> Result<Row, String> {
        eprintln!("xtask bench: {figure}: {name}");
        let (mut o, mut p) = (Vec::new(), Vec::new());
        let (mut ours_cmd, mut peer_cmd) = (String::new(), String::new());
        for rep in 0..=self.reps {
            let mut c = ours()?;
            ours_cmd = show(&c);
            let to = timed(&mut c)?;
            let mut c = peer()?;
            peer_cmd = show(&c);
            let tp = timed(&mut c)?;
            if rep > 0 {
                o.push(to);
                p.push(tp);
            }
        }
        Ok(Row {
            figure,
            name,
            bytes,
            ours_cmd,
            peer_cmd,
            ours: o,
            peer: p,
            p99: None,
        })
    }

    fn create_qcow2(&self, path: &Path, size: u64) -> Result<(), String> {
        let _ = std::fs::remove_file(path);
        run_ok(
            self.qemu_img()
                .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
                .arg(path)
                .arg(size.to_string()),
        )
    }

    /// A qcow2 image whose every cluster is allocated (written with 0x11).
    fn prefilled(&self, path: &Path, size: u64) -> Result<(), String> {
        self.create_qcow2(path, size)?;
        run_ok(
            Command::new("qemu-io")
                .args(["-f", "qcow2", "-c"])
                .arg(format!("write -P 0x11 0 {size}"))
                .arg(path),
        )
    }

    /// Figure 1: `blockrep img bench` vs `qemu-img bench`, same flags.
    fn image_io(&self, rows: &mut Vec<Row>) -> Result<(), String> {
        let size = if self.quick { 8 * MIB } else { 256 * MIB };
        let dir = self.work.join("img");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let full = dir.join("allocated.qcow2");
        self.prefilled(&full, size)?;
        // (label, write?, fresh image per run?, request size, step)
        let strided = 68 * KIB; // one 4 KiB request per 64 KiB cluster, no wrap
        let loads: [(&str, bool, bool, u64, u64); 6] = [
            (
                "64 KiB seq write, fresh (unallocated)",
                true,
                true,
                64 * KIB,
                64 * KIB,
            ),
            (
                "64 KiB seq write, allocated",
                true,
                false,
                64 * KIB,
                64 * KIB,
            ),
            (
                "4 KiB strided write, fresh (unallocated)",
                true,
                true,
                4 * KIB,
                strided,
            ),
            (
                "4 KiB strided write, allocated",
                true,
                false,
                4 * KIB,
                strided,
            ),
            ("64 KiB seq read", false, false, 64 * KIB, 64 * KIB),
            ("4 KiB strided read", false, false, 4 * KIB, strided),
        ];
        // --quick: two of the four cache/depth combinations (every load
        // still runs at both depths and with both cache modes).
        let combos: &[(&str, u64)] = if self.quick {
            &[("none", 1), ("writeback", 16)]
        } else {
            &[
                ("none", 1),
                ("none", 16),
                ("writeback", 1),
                ("writeback", 16),
            ]
        };
        for &(cache, depth) in combos {
            for (label, write, fresh, bs, step) in loads {
                // The last request ends before `size - bs`: qemu-img wraps
                // the offset modulo (size - bs), so neither tool wraps.
                let count = (size - bs) / step;
                let fresh_path = dir.join("fresh.qcow2");
                let args = |c: &mut Command, file: &Path| {
                    c.args(["bench", "-q", "-f", "qcow2", "-t", cache])
                        .arg("-d")
                        .arg(depth.to_string())
                        .arg("-c")
                        .arg(count.to_string())
                        .arg("-s")
                        .arg(bs.to_string())
                        .arg("-S")
                        .arg(step.to_string());
                    if write {
                        c.args(["-w", "--pattern=90"]);
                    }
                    c.arg(file);
                };
                let target = if fresh { &fresh_path } else { &full };
                let mut ours = || {
                    if fresh {
                        self.create_qcow2(&fresh_path, size)?;
                    }
                    let mut c = self.ours_img();
                    args(&mut c, target);
                    Ok(c)
                };
                let mut peer = || {
                    if fresh {
                        self.create_qcow2(&fresh_path, size)?;
                    }
                    let mut c = self.qemu_img();
                    args(&mut c, target);
                    Ok(c)
                };
                let name = format!("{label}, -t {cache}, -d {depth}");
                rows.push(self.alternate(
                    "1. Image I/O",
                    name,
                    count * bs,
                    &mut ours,
                    &mut peer,
                )?);
            }
        }
        Ok(())
    }

    /// Figure 2: `qemu-img bench` against our server and against qemu-nbd.
    fn nbd(&self, rows: &mut Vec<Row>) -> Result<(), String> {
        let size = if self.quick { 16 * MIB } else { 256 * MIB };
        let dir = self.work.join("nbd");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let ours_img = dir.join("ours.qcow2");
        let peer_img = dir.join("peer.qcow2");
        self.prefilled(&ours_img, size)?;
        self.prefilled(&peer_img, size)?;
        for transport in ["unix", "tcp"] {
            let (ours_uri, peer_uri, mut servers) =
                self.start_nbd_servers(&dir, transport, &ours_img, &peer_img)?;
            let result = (|| {
                for write in [false, true] {
                    for depth in [1u64, 16] {
                        let bs = 64 * KIB;
                        let count = (size - bs) / bs;
                        let args = |c: &mut Command, uri: &str| {
                            c.args(["bench", "-q", "-f", "raw"])
                                .arg("-d")
                                .arg(depth.to_string())
                                .arg("-c")
                                .arg(count.to_string())
                                .arg("-s")
                                .arg(bs.to_string());
                            if write {
                                c.args(["-w", "--pattern=90"]);
                            }
                            c.arg(uri);
                        };
                        let mut ours = || {
                            let mut c = self.qemu_img();
                            args(&mut c, &ours_uri);
                            Ok(c)
                        };
                        let mut peer = || {
                            let mut c = self.qemu_img();
                            args(&mut c, &peer_uri);
                            Ok(c)
                        };
                        let name = format!(
                            "{transport}, 64 KiB seq {}, -d {depth}",
                            if write { "write" } else { "read" }
                        );
                        rows.push(self.alternate(
                            "2. NBD (client: qemu-img bench)",
                            name,
                            count * bs,
                            &mut ours,
                            &mut peer,
                        )?);
                    }
                }
                Ok::<(), String>(())
            })();
            servers.stop();
            result?;
        }
        Ok(())
    }

    /// Starts `blockrep serve` (qcow2 node exported over QMP's
    /// nbd-server-start/nbd-server-add) and `qemu-nbd` on equal images.
    fn start_nbd_servers(
        &self,
        dir: &Path,
        transport: &str,
        ours_img: &Path,
        peer_img: &Path,
    ) -> Result<(String, String, Servers), String> {
        let qmp_path = dir.join(format!("serve-{transport}.qmp"));
        let mut servers =
            self.spawn_serve(&qmp_path, &dir.join(format!("serve-{transport}.log")))?;
        let setup = (|| {
            let mut q = Qmp::connect(&qmp_path)?;
            q.ok(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "disk",
                       "file": {"driver": "file", "filename": ours_img}}),
            )?;
            let (ours_uri, peer_uri, addr, peer_args): (String, String, Value, Vec<String>) =
                if transport == "unix" {
                    let os = dir.join("ours.sock");
                    let ps = dir.join("peer.sock");
                    (
                        format!("nbd+unix:///disk0?socket={}", os.display()),
                        format!("nbd+unix:///disk0?socket={}", ps.display()),
                        json!({"type": "unix", "data": {"path": os}}),
                        vec!["-k".into(), ps.display().to_string()],
                    )
                } else {
                    let (op, pp) = (free_port()?, free_port()?);
                    (
                        format!("nbd://127.0.0.1:{op}/disk0"),
                        format!("nbd://127.0.0.1:{pp}/disk0"),
                        json!({"type": "inet", "data": {"host": "127.0.0.1", "port": op.to_string()}}),
                        vec!["-b".into(), "127.0.0.1".into(), "-p".into(), pp.to_string()],
                    )
                };
            q.ok("nbd-server-start", json!({ "addr": addr }))?;
            q.ok(
                "nbd-server-add",
                json!({"device": "disk", "name": "disk0", "writable": true}),
            )?;
            let peer = Command::new("qemu-nbd")
                .args(["-f", "qcow2", "-x", "disk0", "-t", "--cache=writeback"])
                .args(&peer_args)
                .arg(peer_img)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("spawn qemu-nbd: {e}"))?;
            servers.children.push(peer);
            wait_nbd(&peer_uri)?;
            wait_nbd(&ours_uri)?;
            Ok((ours_uri, peer_uri, q))
        })();
        match setup {
            Ok((o, p, q)) => {
                servers.qmp = Some(q);
                Ok((o, p, servers))
            }
            Err(e) => {
                servers.stop();
                Err(e)
            }
        }
    }

    /// A backup job `job` (sync=none, as COLO's secondary) from `source`
    /// into a fresh qcow2 `hidden` disk of `size` bytes backed by it.
    fn start_backup(
        &self,
        q: &mut Qmp,
        hidden: &Path,
        size: u64,
        source: &str,
        job: &str,
    ) -> Result<(), String> {
        let _ = std::fs::remove_file(hidden);
        run_ok(
            self.qemu_img()
                .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
                .arg(hidden)
                .arg(size.to_string()),
        )?;
        q.ok(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "hidden",
                   "file": {"driver": "file", "filename": hidden},
                   "backing": source}),
        )?;
        q.ok(
            "blockdev-backup",
            json!({"device": source, "target": "hidden", "sync": "none", "job-id": job}),
        )?;
        Ok(())
    }

    /// A daemon (in `dir`) exporting a pre-filled qcow2 secondary disk of
    /// `size` bytes as node `node`, writable, over a unix socket as export
    /// `export`: the daemon, its QMP connection and the export's URI.
    fn serve_prefilled(
        &self,
        dir: &Path,
        size: u64,
        node: &str,
        export: &str,
    ) -> Result<(Servers, Qmp, String), String> {
        let sec = dir.join("secondary.qcow2");
        self.prefilled(&sec, size)?;
        let qmp_path = dir.join("serve.qmp");
        let mut servers = self.spawn_serve(&qmp_path, &dir.join("serve.log"))?;
        let sock = dir.join("nbd.sock");
        let uri = format!("nbd+unix:///{export}?socket={}", sock.display());
        let q = (|| {
            let mut q = Qmp::connect(&qmp_path)?;
            q.ok(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": node,
                       "file": {"driver": "file", "filename": sec}}),
            )?;
            q.ok(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": sock}}}),
            )?;
            q.ok(
                "nbd-server-add",
                json!({"device": node, "name": export, "writable": true}),
            )?;
            wait_nbd(&uri)?;
            Ok::<Qmp, String>(q)
        })();
        match q {
            Ok(q) => Ok((servers, q, uri)),
            Err(e) => {
                servers.stop();
                Err(e)
            }
        }
    }

    /// Starts `blockrep serve` on `qmp_path`, its stderr going to `log_path`;
    /// the returned `Servers` kills it when dropped.
    fn spawn_serve(&self, qmp_path: &Path, log_path: &Path) -> Result<Servers, String> {
        let log = std::fs::File::create(log_path).map_err(|e| e.to_string())?;
        let daemon = Command::new(&self.blockrep)
            .args(["serve", "--log-level", "warn", "--qmp"])
            .arg(qmp_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn blockrep serve: {e}"))?;
        Ok(Servers {
            children: vec![daemon],
            qmp: None,
        })
    }

    /// Figure 5: first writes to the secondary disk (exported over NBD by
    /// `blockrep serve`) with a fresh backup job (sync=none into a hidden
    /// disk backed by it, as COLO's secondary) vs the same writes with no job.
    fn cbw(&self, rows: &mut Vec<Row>) -> Result<(), String> {
        let size = if self.quick { 32 * MIB } else { 256 * MIB };
        let dir = self.work.join("cbw");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (mut servers, q, uri) = self.serve_prefilled(&dir, size, "sec", "disk0")?;
        let q = std::cell::RefCell::new(q);
        let job_up = std::cell::Cell::new(false);
        let copied_min = std::cell::Cell::new(0u64);
        let hidden = dir.join("hidden.qcow2");
        // Ends the previous run's job and removes its hidden disk.
        let clean = || -> Result<(), String> {
            if !job_up.get() {
                return Ok(());
            }
            let mut q = q.borrow_mut();
            q.ok("block-job-cancel", json!({"device": "cbw", "force": true}))?;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let jobs = q.ok("query-block-jobs", json!({}))?;
                if jobs.as_array().is_some_and(|a| a.is_empty()) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("backup job still listed after cancel: {jobs}"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            q.ok("blockdev-del", json!({"node-name": "hidden"}))?;
            job_up.set(false);
            // The figure is only meaningful if the job really copied every
            // cluster the bench wrote: count the hidden disk's data.
            let o = Command::new("qemu-img")
                .args(["map", "--output=json", "-f", "qcow2"])
                .arg(&hidden)
                .output()
                .map_err(|e| format!("qemu-img map: {e}"))?;
            let map: Value = serde_json::from_slice(&o.stdout)
                .map_err(|e| format!("qemu-img map output: {e}"))?;
            let copied: u64 = map
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|e| e["data"] == json!(true))
                        .filter_map(|e| e["length"].as_u64())
                        .sum()
                })
                .unwrap_or(0);
            let want = copied_min.get();
            if copied < want {
                return Err(format!(
                    "backup job copied {copied} bytes to the hidden disk, expected at least {want}"
                ));
            }
            Ok(())
        };
        let result = (|| {
            for depth in [1u64, 16] {
                let bs = 64 * KIB;
                let count = (size - bs) / bs;
                copied_min.set(count * bs);
                let bench = || {
                    let mut c = self.qemu_img();
                    c.args(["bench", "-q", "-f", "raw", "-w", "--pattern=90"])
                        .arg("-d")
                        .arg(depth.to_string())
                        .arg("-c")
                        .arg(count.to_string())
                        .arg("-s")
                        .arg(bs.to_string())
                        .arg(&uri);
                    c
                };
                let mut ours = || {
                    clean()?;
                    self.start_backup(&mut q.borrow_mut(), &hidden, size, "sec", "cbw")?;
                    job_up.set(true);
                    Ok(bench())
                };
                let mut peer = || {
                    clean()?;
                    Ok(bench())
                };
                rows.push(self.alternate(
                    "5. Copy-before-write (peer: same daemon, no job)",
                    format!("first 64 KiB writes over NBD (unix), -d {depth}, with backup sync=none vs without"),
                    count * bs,
                    &mut ours,
                    &mut peer,
                )?);
            }
            clean()
        })();
        drop(q);
        servers.stop();
        result
    }

    /// A secondary daemon as COLO's: `sec-disk` (qcow2) exported as
    /// "sec", replication node `top` over active -> hidden -> sec-disk
    /// exported as "disk0"; replication started (secondary mode). With
    /// `prefill` the secondary disk is fully allocated first (overwrites).
    fn start_secondary(
        &self,
        dir: &Path,
        size: u64,
        prefill: bool,
    ) -> Result<(Servers, String, String), String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        for f in ["active.qcow2", "hidden.qcow2"] {
            self.create_qcow2(&dir.join(f), size)?;
        }
        if prefill {
            self.prefilled(&dir.join("sec.qcow2"), size)?;
        } else {
            self.create_qcow2(&dir.join("sec.qcow2"), size)?;
        }
        let qmp_path = dir.join("serve.qmp");
        let mut servers = self.spawn_serve(&qmp_path, &dir.join("serve.log"))?;
        let sock = dir.join("nbd.sock");
        let sec_uri = format!("nbd+unix:///sec?socket={}", sock.display());
        let guest_uri = format!("nbd+unix:///disk0?socket={}", sock.display());
        let r = (|| {
            let mut q = Qmp::connect(&qmp_path)?;
            q.ok(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "sec-disk",
                       "file": {"driver": "file", "filename": dir.join("sec.qcow2")}}),
            )?;
            q.ok(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": sock}}}),
            )?;
            q.ok(
                "nbd-server-add",
                json!({"device": "sec-disk", "name": "sec", "writable": true}),
            )?;
            q.ok(
                "blockdev-add",
                json!({"driver": "replication", "node-name": "top", "mode": "secondary",
                       "top-id": "top",
                       "file": {"driver": "qcow2", "node-name": "active",
                                "file": {"driver": "file", "filename": dir.join("active.qcow2")},
                                "backing": {"driver": "qcow2", "node-name": "hidden",
                                            "file": {"driver": "file",
                                                     "filename": dir.join("hidden.qcow2")},
                                            "backing": "sec-disk"}}}),
            )?;
            q.ok(
                "nbd-server-add",
                json!({"device": "top", "name": "disk0", "writable": true}),
            )?;
            q.ok(
                "xen-set-replication",
                json!({"enable": true, "primary": false}),
            )?;
            Ok::<Qmp, String>(q)
        })();
        match r {
            Ok(q) => {
                servers.qmp = Some(q);
                Ok((servers, sec_uri, guest_uri))
            }
            Err(e) => {
                servers.stop();
                Err(e)
            }
        }
    }

    /// Writes `n` 64 KiB clusters `step` apart from `offset` through `uri`.
    fn dirty(&self, uri: &str, offset: u64, step: u64, n: u64, pattern: u8) -> Result<(), String> {
        run_ok(
            self.qemu_img()
                .args(["bench", "-q", "-f", "raw", "-w", "-d", "16", "-s", "65536"])
                .arg("-o")
                .arg(offset.to_string())
                .arg("-S")
                .arg(step.to_string())
                .arg("-c")
                .arg(n.to_string())
                .arg(format!("--pattern={pattern}"))
                .arg(uri),
        )
    }

    /// Figure 6: checkpoint pause on the secondary, by dirty set and disk size.
    fn checkpoint(&self, pauses: &mut Vec<Pause>) -> Result<(), String> {
        const GIB: u64 = 1024 * MIB;
        const TIB: u64 = 1024 * GIB;
        // (disk size, label, dirty clusters, recorded rounds, unrecorded
        // first round). At least 200 rounds where the targets are, so that
        // the p99 is a percentile and two stray rounds (a stall of the shared
        // machine) do not decide it: nearest rank of 200 is the 198th, the
        // third largest; 300 where rounds are cheap. 100,000 clusters write 6.1 GiB per round and the
        // checkpoint then flushes it: three recorded rounds, no warm-up, to
        // keep the full run inside its 30 minutes.
        let cases: &[(u64, &str, u64, usize, bool)] = if self.quick {
            &[(GIB, "1 GiB", 10, 5, true), (GIB, "1 GiB", 100, 5, true)]
        } else {
            &[
                (GIB, "1 GiB", 10, 300, true),
                (GIB, "1 GiB", 1000, 200, true),
                (GIB, "1 GiB", 16384, 5, true),
                (TIB, "1 TiB", 10, 300, true),
                (TIB, "1 TiB", 1000, 200, true),
                (TIB, "1 TiB", 16384, 5, true),
                (TIB, "1 TiB", 100_000, 3, false),
            ]
        };
        let cs = 64 * KIB;
        for &(size, label, n, rounds, warm) in cases {
            eprintln!("xtask bench: 6. checkpoint pause, {label}, {n} dirty clusters");
            let dir = self.work.join("ckpt");
            let _ = std::fs::remove_dir_all(&dir);
            let (mut servers, sec_uri, guest_uri) = self.start_secondary(&dir, size, false)?;
            // Half the clusters are forwarded primary writes (copies into
            // hidden), half guest writes (active), interleaved: both series
            // `step` apart, the guest's shifted by half a step. qemu-img
            // bench takes steps below 2 GiB.
            let (n_sec, n_guest) = (n / 2, n - n / 2);
            let step = ((size / n_guest.max(1)) / cs * cs).clamp(2 * cs, (2 << 30) - cs);
            let shift = (step / 2) / cs * cs;
            let r = (|| {
                let mut reported = Vec::new();
                let mut wall = Vec::new();
                for round in usize::from(!warm)..=rounds {
                    if n_sec > 0 {
                        self.dirty(&sec_uri, 0, step, n_sec, 0x21)?;
                    }
                    self.dirty(&guest_uri, shift, step, n_guest, 0x22)?;
                    let q = servers.qmp.as_mut().ok_or("no QMP")?;
                    let t = Instant::now();
                    q.ok("xen-colo-do-checkpoint", json!({}))?;
                    let w = t.elapsed().as_secs_f64() * 1e6;
                    let st = q.ok("x-blockrep-query-replication", json!({"node-name": "top"}))?;
                    let copied_ok = st[0]["clusters-copied-since-checkpoint"] == json!(0);
                    let us = st[0]["last-checkpoint-duration-us"]
                        .as_f64()
                        .ok_or_else(|| format!("no last-checkpoint-duration-us in {st}"))?;
                    if !copied_ok {
                        return Err(format!("checkpoint left copies counted: {st}"));
                    }
                    if round > 0 {
                        reported.push(us);
                        wall.push(w);
                    }
                }
                Ok::<_, String>((reported, wall))
            })();
            servers.stop();
            let _ = std::fs::remove_dir_all(&dir);
            let (reported, wall) = r?;
            pauses.push(Pause {
                disk: label.into(),
                dirty: n,
                reported,
                wall,
            });
        }
        Ok(())
    }

    /// Figure 7: failover (x-colo-lost-heartbeat until the replication node
    /// is DONE: active and hidden committed into the secondary disk) vs `dd`
    /// copying the same amount sequentially (conv=fsync).
    fn failover(&self, rows: &mut Vec<Row>) -> Result<(), String> {
        let sizes: &[u64] = if self.quick {
            &[16 * MIB]
        } else {
            &[64 * MIB, 1024 * MIB]
        };
        for &buffered in sizes {
            let name = format!(
                "{} MiB buffered (half guest writes in active, half copies in hidden), 2 GiB disk",
                buffered / MIB
            );
            eprintln!("xtask bench: 7. failover: {name}");
            let disk = 2048 * MIB;
            let dir = self.work.join("failover");
            let dd_src = self.work.join("dd.src");
            run_ok(
                Command::new("dd")
                    .arg("if=/dev/urandom")
                    .arg(format!("of={}", dd_src.display()))
                    .args(["bs=1M", "status=none"])
                    .arg(format!("count={}", buffered / MIB)),
            )?;
            let dd_dst = self.work.join("dd.dst");
            let mut dd_cmd = String::new();
            let (mut ours, mut peer) = (Vec::new(), Vec::new());
            for rep in 0..=self.reps {
                let _ = std::fs::remove_dir_all(&dir);
                let (mut servers, sec_uri, guest_uri) = self.start_secondary(&dir, disk, false)?;
                let r = (|| {
                    let n = buffered / 2 / (64 * KIB);
                    // Contiguous halves: copies in the first half, guest writes in the second.
                    run_ok(
                        self.qemu_img()
                            .args(["bench", "-q", "-f", "raw", "-w", "-d", "16", "-s", "65536"])
                            .arg("-c")
                            .arg(n.to_string())
                            .arg("--pattern=33")
                            .arg(&sec_uri),
                    )?;
                    run_ok(
                        self.qemu_img()
                            .args(["bench", "-q", "-f", "raw", "-w", "-d", "16", "-s", "65536"])
                            .arg("-o")
                            .arg((disk / 2).to_string())
                            .arg("-c")
                            .arg(n.to_string())
                            .arg("--pattern=34")
                            .arg(&guest_uri),
                    )?;
                    let q = servers.qmp.as_mut().ok_or("no QMP")?;
                    let t = Instant::now();
                    q.ok("x-colo-lost-heartbeat", json!({}))?;
                    let deadline = Instant::now() + Duration::from_secs(600);
                    loop {
                        let st =
                            q.ok("x-blockrep-query-replication", json!({"node-name": "top"}))?;
                        match st[0]["state"].as_str() {
                            Some("DONE") => break,
                            Some("FAILOVER") => {}
                            other => {
                                return Err(format!("failover ended in state {other:?}: {st}"))
                            }
                        }
                        if Instant::now() > deadline {
                            return Err("failover did not finish in 600 s".into());
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Ok::<f64, String>(t.elapsed().as_secs_f64())
                })();
                servers.stop();
                let to = r?;
                let _ = std::fs::remove_file(&dd_dst);
                let mut dd = Command::new("dd");
                dd.arg(format!("if={}", dd_src.display()))
                    .arg(format!("of={}", dd_dst.display()))
                    .args(["bs=1M", "conv=fsync", "status=none"]);
                dd_cmd = show(&dd);
                let tp = timed(&mut dd)?;
                if rep > 0 {
                    ours.push(to);
                    peer.push(tp);
                }
            }
            let _ = std::fs::remove_file(&dd_dst);
            let _ = std::fs::remove_file(&dd_src);
            rows.push(Row {
                figure: "7. Failover (peer: dd sequential copy of the same amount)",
                name,
                bytes: buffered,
                ours_cmd: "blockrep serve (secondary: replication over active/hidden qcow2 on a \
                    qcow2 secondary disk); buffered with qemu-img bench over NBD; timed: QMP \
                    x-colo-lost-heartbeat until x-blockrep-query-replication says DONE"
                    .into(),
                peer_cmd: dd_cmd,
                ours,
                peer,
                p99: None,
            });
        }
        Ok(())
    }

    /// Figure 3: `blockrep img commit` vs `qemu-img commit` of the same overlay.
    fn commit(&self, rows: &mut Vec<Row>) -> Result<(), String> {
        let size = if self.quick { 64 * MIB } else { 1024 * MIB };
        let dir = self.work.join("commit");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        for scattered in [false, true] {
            let tmpl = dir.join(if scattered { "tmpl-10pct" } else { "tmpl-full" });
            std::fs::create_dir_all(&tmpl).map_err(|e| e.to_string())?;
            self.create_qcow2(&tmpl.join("base.qcow2"), size)?;
            run_ok(
                self.qemu_img()
                    .current_dir(&tmpl)
                    .args([
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-o",
                        "cluster_size=65536",
                        "-b",
                        "base.qcow2",
                        "-F",
                        "qcow2",
                        "top.qcow2",
                    ])
                    .arg(size.to_string()),
            )?;
            let bytes = if scattered {
                let n = size / (640 * KIB);
                run_ok(
                    self.qemu_img()
                        .current_dir(&tmpl)
                        .args(["bench", "-q", "-w", "-f", "qcow2", "-s", "65536"])
                        .args(["-S", &(640 * KIB).to_string(), "-c", &n.to_string()])
                        .args(["--pattern=90", "top.qcow2"]),
                )?;
                n * 64 * KIB
            } else {
                run_ok(
                    Command::new("qemu-io")
                        .current_dir(&tmpl)
                        .args(["-f", "qcow2", "-c"])
                        .arg(format!("write -P 0x5a 0 {size}"))
                        .arg("top.qcow2"),
                )?;
                size
            };
            let run_dir = dir.join("run");
            let fresh = || -> Result<(), String> {
                let _ = std::fs::remove_dir_all(&run_dir);
                std::fs::create_dir_all(&run_dir).map_err(|e| e.to_string())?;
                for f in ["base.qcow2", "top.qcow2"] {
                    run_ok(
                        Command::new("cp")
                            .arg("--sparse=always")
                            .arg(tmpl.join(f))
                            .arg(run_dir.join(f)),
                    )?;
                }
                // Copies are not timed: let their dirty pages reach the disk first.
                run_ok(
                    Command::new("sync")
                        .arg("-f")
                        .arg(run_dir.join("top.qcow2")),
                )
            };
            let mut ours = || {
                fresh()?;
                let mut c = self.ours_img();
                c.current_dir(&run_dir).args(["commit", "-q", "top.qcow2"]);
                Ok(c)
            };
            let mut peer = || {
                fresh()?;
                let mut c = self.qemu_img();
                c.current_dir(&run_dir).args(["commit", "-q", "top.qcow2"]);
                Ok(c)
            };
            let name = format!(
                "{} MiB overlay, {} (fresh copy of the chain per run)",
                size / MIB,
                if scattered {
                    "10% scattered (every 10th 64 KiB cluster)"
                } else {
                    "fully written"
                }
            );
            rows.push(self.alternate("3. Commit", name, bytes, &mut ours, &mut peer)?);
        }
        Ok(())
    }
}

fn not_measured(missing: &mut Vec<Missing>, quick: bool, ran6: bool) {
    if !ran6 {
        return;
    }
    missing.push(Missing {
        figure: "6. Checkpoint pause",
        what: "1 GiB disk, 100,000 dirty 64 KiB clusters".into(),
        why: "not possible: a 1 GiB disk holds 16,384 clusters of 64 KiB; the 1 GiB \
              disk is measured fully dirty (16,384) instead, beside the same count on \
              the 1 TiB disk, and 100,000 is measured on the 1 TiB disk"
            .into(),
    });
    if quick {
        missing.push(Missing {
            figure: "6. Checkpoint pause",
            what: "1,000, 16,384 and 100,000 dirty clusters; the 1 TiB disk".into(),
            why: "skipped in --quick (100,000 clusters alone write 6.1 GiB per round); \
                  the full run measures them"
                .into(),
        });
    }
}

/// Text under a figure's heading, for figures whose method differs from
/// the general one.
fn figure_intro(fig: &str) -> Option<&'static str> {
    if fig == overhead::PRIMARY {
        Some(overhead::PRIMARY_INTRO)
    } else if fig == overhead::SECONDARY {
        Some(overhead::SECONDARY_INTRO)
    } else {
        None
    }
}

/// The servers of the NBD figure; killed (by their pid) when stopped.
struct Servers {
    children: Vec<Child>,
    qmp: Option<Qmp>,
}

impl Servers {
    /// The daemon (first child) is asked to quit over QMP and given 5 s;
    /// the others (qemu-nbd -t never exits by itself) are killed at once.
    fn stop(&mut self) {
        let quit_sent = match self.qmp.take() {
            Some(mut q) => q.exec("quit", json!({})).is_ok(),
            None => false,
        };
        for (i, c) in self.children.iter_mut().enumerate() {
            if i == 0 && quit_sent {
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// Waits until `qemu-img info` opens the NBD URI.
fn wait_nbd(uri: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ok = Command::new("qemu-img")
            .args(["info", "-f", "raw", uri])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("NBD server at {uri} did not come up in 20 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal QMP client (greeting, qmp_capabilities, commands).
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp, String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        // A checkpoint with 100,000 dirty clusters flushes GiBs first.
        s.set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(|e| e.to_string())?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer: w,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP: unexpected greeting {greeting}"));
        }
        q.ok("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        serde_json::from_str(&line).map_err(|e| format!("QMP: bad JSON '{line}': {e}"))
    }

    fn exec(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let req = json!({"execute": cmd, "arguments": args});
        writeln!(self.writer, "{req}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            return Ok(v);
        }
    }

    fn ok(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let v = self.exec(cmd, args.clone())?;
        match v.get("return") {
            Some(r) => Ok(r.clone()),
            None => Err(format!("QMP {cmd} {args}: {v}")),
        }
    }
}

/// Criterion results written since `since`: (id, median, low, high) in ns.
fn collect_criterion(dir: &Path, since: SystemTime) -> Vec<(String, f64, f64, f64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    if let Some(r) = read_estimate(&p, since) {
                        out.push(r);
                    }
                } else if p.file_name().map_or(true, |n| n != "report") {
                    stack.push(p);
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn read_estimate(new: &Path, since: SystemTime) -> Option<(String, f64, f64, f64)> {
    let est = new.join("estimates.json");
    let modified = std::fs::metadata(&est).ok()?.modified().ok()?;
    if modified < since {
        return None;
    }
    let e: Value = serde_json::from_str(&std::fs::read_to_string(&est).ok()?).ok()?;
    let b: Value =
        serde_json::from_str(&std::fs::read_to_string(new.join("benchmark.json")).ok()?).ok()?;
    let id = b.get("full_id")?.as_str()?.to_string();
    let m = e.get("median")?;
    let ci = m.get("confidence_interval")?;
    Some((
        id,
        m.get("point_estimate")?.as_f64()?,
        ci.get("lower_bound")?.as_f64()?,
        ci.get("upper_bound")?.as_f64()?,
    ))
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.3} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// Nearest-rank percentile (q in 0..=1).
fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return 0.0;
    }
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Throughputs in MiB/s of the runs of one side.
fn mibs(bytes: u64, secs: &[f64]) -> Vec<f64> {
    secs.iter()
        .map(|s| bytes as f64 / MIB as f64 / s.max(1e-9))
        .collect()
}

fn target_of(figure: &str) -> (f64, f64) {
    // (target, floor) of the ratio
    if figure == overhead::PRIMARY {
        (0.8, 0.8)
    } else if figure == overhead::SECONDARY {
        (0.9, 0.9)
    } else if figure.starts_with("3.") {
        (1.0, 1.0)
    } else if figure.starts_with("5.") {
        (0.45, 0.45)
    } else if figure.starts_with("7.") {
        (0.8, 0.8)
    } else {
        (1.0, 0.9)
    }
}

fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench{}`; do not edit by hand. Run started {}, took {:.0} s.\n",
        if r.quick { " --quick" } else { "" },
        r.started,
        r.elapsed.as_secs_f64()
    );
    if r.quick {
        let _ = writeln!(
            s,
            "**This is a `--quick` run (CI smoke): small images, criterion in its `--quick` \
             mode, image I/O at two of the four cache/depth combinations, fewer figure 4 and 6 \
             cases, no instruction-count guard. The figures are dominated by process \
             start-up and are not the full run's.**\n"
        );
    }
    let _ = writeln!(s, "## Machine and load\n");
    for v in &r.versions {
        let _ = writeln!(s, "- {v}");
    }
    let _ = writeln!(
        s,
        "- load average (1/5/15 min) at start: {}, at end: {}. The machine is shared with \
         other sessions compiling and testing; absolute times mean little, ratios of \
         alternating runs mean more.\n",
        r.load_start, r.load_end
    );
    let _ = writeln!(s, "## Method\n");
    let _ = writeln!(
        s,
        "Each row runs one unrecorded warm-up pair, then {} recorded pairs alternating \
         ours and the peer (ours, peer, ours, peer, ...) on the same files. A run is one \
         process, timed by wall clock from spawn to exit (so both sides pay open, final \
         flush and close). Throughput = bytes moved / time, in MiB/s; the table gives \
         the median with [min, max]; ratio = ours median / peer median (higher is better \
         for us). Preparation (creating fresh images, copying chains, `sync`) is not \
         timed. Images are qcow2 with 64 KiB clusters. \"Allocated\" rows overwrite an \
         image pre-filled with `qemu-io -c 'write -P 0x11 0 SIZE'`; \"fresh\" rows write \
         into a freshly created image before every run. `qemu-img bench` has no random \
         mode, so the 4 KiB rows are strided: a 68 KiB step puts one request in each \
         64 KiB cluster, in order, without wrapping (count = (size - request) / step, \
         so neither tool wraps its offset).\n",
        r.reps
    );
    let _ = writeln!(s, "## Side by side\n");
    let _ = writeln!(
        s,
        "Targets (issue 10): image I/O and NBD ratio >= 1.0, no row below 0.9; commit >= 1.0; \
         replication overhead: primary with/without >= 0.8, secondary rewrites with/without \
         the backup job >= 0.9; copy-before-write >= 0.45; failover >= 0.8 of dd.\n"
    );
    let mut fig = "";
    let mut misses = Vec::new();
    for (i, row) in r.rows.iter().enumerate() {
        let lat = r
            .rows
            .iter()
            .any(|x| x.figure == row.figure && x.p99.is_some());
        if row.figure != fig {
            fig = row.figure;
            let _ = writeln!(s, "### {fig}\n");
            if let Some(text) = figure_intro(fig) {
                let _ = writeln!(s, "{text}\n");
            }
            if lat {
                let _ = writeln!(
                    s,
                    "| row | ours MiB/s median [min, max] | peer MiB/s median [min, max] | ratio | target | ours p99 µs median [min, max] | peer p99 µs median [min, max] |"
                );
                let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
            } else {
                let _ = writeln!(
                    s,
                    "| row | ours MiB/s median [min, max] | peer MiB/s median [min, max] | ratio | target |"
                );
                let _ = writeln!(s, "| --- | --- | --- | --- | --- |");
            }
        }
        let o = mibs(row.bytes, &row.ours);
        let p = mibs(row.bytes, &row.peer);
        let (mo, mp) = (median(&o), median(&p));
        let ratio = mo / mp.max(1e-9);
        let (tgt, floor) = target_of(row.figure);
        let verdict = if ratio >= tgt {
            "met".to_string()
        } else if ratio >= floor {
            format!("below {tgt:.1}, above floor {floor:.1}")
        } else {
            "**missed**".to_string()
        };
        if ratio < tgt {
            misses.push((
                row.figure.to_string(),
                row.name.clone(),
                format!("ratio {ratio:.2}, target {tgt:.2}"),
            ));
        }
        let mm = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            format!("{:.1} [{lo:.1}, {hi:.1}]", median(v))
        };
        let lat_cols = match (&row.p99, lat) {
            (Some((ol, pl)), _) => format!(" {} | {} |", mm(ol), mm(pl)),
            (None, true) => " - | - |".to_string(),
            (None, false) => String::new(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {ratio:.2} | {verdict} |{lat_cols}",
            row.name,
            mm(&o),
            mm(&p)
        );
        if r.rows
            .get(i + 1)
            .map_or(true, |next| next.figure != row.figure)
        {
            let _ = writeln!(s);
        }
    }
    if !r.pauses.is_empty() {
        let _ = writeln!(s, "### 6. Checkpoint pause (secondary daemon)\n");
        let _ = writeln!(
            s,
            "Each round dirties N 64 KiB clusters in all: N/2 written through the \
             secondary disk's export (forwarded primary writes: N/2 copies into the hidden \
             disk) and N/2 through the guest's export (clusters in the active disk), \
             interleaved evenly over the disk, then runs `xen-colo-do-checkpoint` over QMP. \
             \"daemon\" is the daemon's own `last-checkpoint-duration-us`; \"QMP\" the \
             command's round trip seen by the client. Recorded rounds per case: {} (after \
             one unrecorded round, except at 100,000 clusters); with fewer than 100 rounds \
             the p99 is the largest sample. The checkpoint flushes what the round wrote \
             (the image files are opened with the host cache), so with large dirty sets the pause \
             can include writing that data back. \
             Targets: p99 < 1 ms at 1,000 dirty clusters; 1 TiB within 1.5x of 1 GiB.\n",
            r.pauses
                .iter()
                .map(|p| format!("{} / {}: {}", p.disk, p.dirty, p.reported.len()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(
            s,
            "| disk | dirty clusters | daemon p50 | daemon p99 | QMP p50 | QMP p99 | target |"
        );
        let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
        for p in &r.pauses {
            let p99 = |v: &[f64]| percentile(v, 0.99);
            let base = r
                .pauses
                .iter()
                .find(|x| x.disk == "1 GiB" && x.dirty == p.dirty)
                .map(|x| p99(&x.reported));
            let mut verdict = Vec::new();
            let pname = format!("{} / {} dirty clusters", p.disk, p.dirty);
            if p.dirty == 1000 {
                let ok = p99(&p.reported) < 1000.0;
                verdict.push(if ok {
                    "p99 < 1 ms: met".to_string()
                } else {
                    "p99 < 1 ms: **missed**".to_string()
                });
                if !ok {
                    misses.push((
                        "6. Checkpoint pause".to_string(),
                        pname.clone(),
                        format!("daemon p99 {:.0} µs, target < 1000 µs", p99(&p.reported)),
                    ));
                }
            }
            if p.disk != "1 GiB" {
                if let Some(b) = base {
                    let ratio = p99(&p.reported) / b.max(1.0);
                    verdict.push(format!(
                        "{ratio:.2}x the 1 GiB p99: {}",
                        if ratio <= 1.5 { "met" } else { "**missed**" }
                    ));
                    if ratio > 1.5 {
                        misses.push((
                            "6. Checkpoint pause".to_string(),
                            pname.clone(),
                            format!("{ratio:.2}x the 1 GiB p99, target <= 1.5x"),
                        ));
                    }
                }
            }
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {} |",
                p.disk,
                p.dirty,
                percentile(&p.reported, 0.5),
                p99(&p.reported),
                percentile(&p.wall, 0.5),
                p99(&p.wall),
                if verdict.is_empty() {
                    "-".to_string()
                } else {
                    verdict.join("; ")
                }
            );
        }
        let _ = writeln!(s, "\nRaw daemon figures (µs, in order):\n");
        for p in &r.pauses {
            let v: Vec<String> = p.reported.iter().map(|x| format!("{x:.0}")).collect();
            let _ = writeln!(s, "- {} / {}: {}", p.disk, p.dirty, v.join(", "));
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "### Rows not measured\n");
    let _ = writeln!(s, "| figure | what | why |");
    let _ = writeln!(s, "| --- | --- | --- |");
    for m in &r.missing {
        let _ = writeln!(s, "| {} | {} | {} |", m.figure, m.what, m.why);
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "### Rows below target\n");
    let notes = notes::parse(include_str!("bench/notes.md"));
    if misses.is_empty() {
        let _ = writeln!(s, "None of the measured rows.\n");
    } else {
        let _ = writeln!(
            s,
            "Each row's explanation comes from `xtask/src/bench/notes.md` (sections \
             `### FIGURE | ROW`), written by hand from the investigation it names.\n"
        );
        let mut shown = std::collections::HashSet::new();
        for (figure, name, what) in &misses {
            let _ = writeln!(s, "- **{figure} / {name}**: {what}");
            let found = notes.find(figure, name);
            if found.is_empty() {
                let _ = writeln!(
                    s,
                    "  - no note yet: add a `### {figure} | {name}` section to \
                     `xtask/src/bench/notes.md` (what limits it, what the profile \
                     showed, what was tried)."
                );
            }
            for body in found {
                if !shown.insert(body) {
                    let _ = writeln!(s, "  - (same note as above)");
                    continue;
                }
                for line in body.lines() {
                    if line.trim().is_empty() {
                        let _ = writeln!(s);
                    } else {
                        let _ = writeln!(s, "  {line}");
                    }
                }
            }
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "### Commands (last recorded run of each row)\n");
    let _ = writeln!(
        s,
        "Paths are under the bench work directory (`$CARGO_TARGET_DIR/xtask-bench`).\n"
    );
    for row in &r.rows {
        let _ = writeln!(
            s,
            "- {} / {}\n  - ours: `{}`\n  - peer: `{}`",
            row.figure, row.name, row.ours_cmd, row.peer_cmd
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "### Raw times (seconds, in run order)\n");
    for row in &r.rows {
        let f = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "- {} / {}: ours [{}]; peer [{}]",
            row.figure,
            row.name,
            f(&row.ours),
            f(&row.peer)
        );
        if let Some((ol, pl)) = &row.p99 {
            let g = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{x:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(s, "  - p99 µs: ours [{}]; peer [{}]", g(ol), g(pl));
        }
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "## Criterion benches (in-process, ours only)\n");
    let _ = writeln!(s, "{}\n", r.criterion_status);
    if !r.criterion.is_empty() {
        let _ = writeln!(s, "| bench | median | 95% CI of the median |");
        let _ = writeln!(s, "| --- | --- | --- |");
        for (id, m, lo, hi) in &r.criterion {
            let _ = writeln!(
                s,
                "| {id} | {} | {} .. {} |",
                fmt_ns(*m),
                fmt_ns(*lo),
                fmt_ns(*hi)
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "## Instruction-count regression guard\n");
    let _ = writeln!(
        s,
        "Not a timing: `cargo test -p perf-guard` (part of `cargo test --workspace`) counts \
         the instructions of the hot paths under `valgrind --tool=callgrind` and fails when \
         one grows more than 10% over `crates/perf-guard/baseline.txt`. See that crate's docs. \
         This run (`cargo test -p perf-guard --test guard -- --nocapture hot_path`), \
         instructions per operation:\n"
    );
    for l in &r.guard {
        let _ = writeln!(s, "- {l}");
    }
    if !notes.preface.is_empty() {
        let _ = writeln!(s, "\n## Notes\n\n{}", notes.preface);
    }
    s
}
