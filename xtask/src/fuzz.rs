//! `cargo xtask fuzz [--minutes N] [--target NAME]...`: runs every
//! `cargo fuzz` target of the root `fuzz/` package for N minutes each, one
//! after the other, under `nice`, and prints one line per target (seconds
//! run, executions, corpus units, result).
//!
//! New corpus units go to `fuzz/work/corpus/<target>` (not committed; the
//! committed seeds in `fuzz/corpus/<target>` are read too), crash inputs to
//! `fuzz/work/artifacts/<target>/`, libFuzzer's log to
//! `fuzz/work/<target>.log`. Needs `cargo install cargo-fuzz` and a nightly
//! toolchain (`rustup toolchain install nightly`); without a nightly, the
//! stable compiler is used with `RUSTC_BOOTSTRAP=1`.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const DEFAULT_MINUTES: u64 = 10;

/// Options of the task.
struct Opts {
    minutes: u64,
    targets: Vec<String>,
}

fn parse(rest: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        minutes: DEFAULT_MINUTES,
        targets: Vec::new(),
    };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--minutes" => {
                let v = it.next().ok_or("--minutes needs a number")?;
                o.minutes = v
                    .parse()
                    .ok()
                    .filter(|m| *m > 0)
                    .ok_or_else(|| format!("--minutes needs a positive number, got '{v}'"))?;
            }
            "--target" => o
                .targets
                .push(it.next().ok_or("--target needs a name")?.clone()),
            other => {
                return Err(format!(
                    "fuzz: unexpected option '{other}' (expected [--minutes N] [--target NAME]...)"
                ))
            }
        }
    }
    Ok(o)
}

/// The targets: the file stems of `fuzz/fuzz_targets/*.rs`, sorted.
pub fn targets(root: &Path) -> Result<Vec<String>, String> {
    let dir = root.join("fuzz/fuzz_targets");
    let mut v: Vec<String> = fs::read_dir(&dir)
        .map_err(|e| format!("fuzz: reading {}: {e}", dir.display()))?
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "rs").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Whether `cargo +nightly` works here.
fn have_nightly() -> bool {
    Command::new("cargo")
        .args(["+nightly", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One `stat::NAME: VALUE` line of libFuzzer's final stats.
fn stat(log: &str, name: &str) -> Option<u64> {
    let key = format!("stat::{name}:");
    log.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&key)?.trim().parse().ok())
}

/// Runs the task.
pub fn run(root: &Path, rest: &[String]) -> Result<(), String> {
    let o = parse(rest)?;
    let ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        return Err(
            "fuzz: `cargo fuzz` is missing: install it with `cargo install cargo-fuzz`".into(),
        );
    }
    let all = targets(root)?;
    let chosen = if o.targets.is_empty() {
        all.clone()
    } else {
        for t in &o.targets {
            if !all.contains(t) {
                return Err(format!(
                    "fuzz: unknown target '{t}' (targets: {})",
                    all.join(", ")
                ));
            }
        }
        o.targets.clone()
    };
    let nightly = have_nightly();
    let work = root.join("fuzz/work");
    let mut failed = Vec::new();
    let mut lines = Vec::new();
    for t in &chosen {
        let corpus = work.join("corpus").join(t);
        let artifacts = work.join("artifacts").join(t);
        fs::create_dir_all(&corpus).map_err(|e| format!("fuzz: {}: {e}", corpus.display()))?;
        fs::create_dir_all(&artifacts)
            .map_err(|e| format!("fuzz: {}: {e}", artifacts.display()))?;
        let log_path = work.join(format!("{t}.log"));
        let log = fs::File::create(&log_path)
            .map_err(|e| format!("fuzz: {}: {e}", log_path.display()))?;
        let mut cmd = Command::new("nice");
        cmd.args(["-n", "10", "cargo"]);
        if nightly {
            cmd.arg("+nightly");
        } else {
            cmd.env("RUSTC_BOOTSTRAP", "1");
        }
        // Always fuzz/target: the instrumented build differs from every other.
        cmd.env_remove("CARGO_TARGET_DIR");
        cmd.args(["fuzz", "run", "--fuzz-dir", "fuzz", t])
            .arg(&corpus)
            .arg(root.join("fuzz/corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={}", o.minutes * 60))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args([
                "-rss_limit_mb=2048",
                "-timeout=30",
                "-print_final_stats=1",
                // Connection threads of the NBD server may outlive an input; glibc's
                // thread-exit bookkeeping then shows up as a 32-byte "leak".
                "-detect_leaks=0",
            ])
            .current_dir(root)
            .stdout(log.try_clone().map_err(|e| format!("fuzz: {e}"))?)
            .stderr(log);
        eprintln!(
            "xtask fuzz: {t}: {} min, log {}",
            o.minutes,
            log_path.display()
        );
        let start = Instant::now();
        let status = cmd
            .status()
            .map_err(|e| format!("fuzz: could not run cargo fuzz: {e}"))?;
        let secs = start.elapsed().as_secs();
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let execs = stat(&text, "number_of_executed_units").unwrap_or(0);
        let units = fs::read_dir(&corpus).map_or(0, |d| d.count());
        let result = if status.success() {
            "no crash".to_string()
        } else {
            failed.push(t.clone());
            format!("FAILED ({status}); crash inputs in {}", artifacts.display())
        };
        let line = format!(
            "{t}: {secs} s (incl. build), {execs} executions, {units} new corpus units: {result}"
        );
        eprintln!("xtask fuzz: {line}");
        lines.push(line);
    }
    eprintln!("xtask fuzz: summary\n  {}", lines.join("\n  "));
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzz: targets failed: {}", failed.join(", ")))
    }
}
