//! `cargo xtask crash [--runs N] [--seed S]`: the whole-stack crash test
//! (`crates/blockrep/tests/reliability_crash.rs`) with N kill points
//! (default 200): two daemons replicating, a writer writing and flushing
//! through the primary's NBD export, kill -9 of either daemon at a random
//! point, then every image checked (`qemu-img check`, leaks repaired by
//! `blockrep img check -r leaks`) and compared with what was acknowledged
//! before the last completed flush. A failure prints the seed that replays
//! it (`--seed S`).

use std::path::Path;
use std::process::Command;

const DEFAULT_RUNS: u64 = 200;

/// Runs the task.
pub fn run(root: &Path, rest: &[String]) -> Result<(), String> {
    let mut runs = DEFAULT_RUNS;
    let mut seed = None;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| format!("crash: {a} needs a value"))?;
        let n: u64 = v
            .parse()
            .map_err(|_| format!("crash: {a} needs a number, got '{v}'"))?;
        match a.as_str() {
            "--runs" if n > 0 => runs = n,
            "--seed" => seed = Some(n),
            _ => {
                return Err(format!(
                    "crash: unexpected option '{a} {v}' (expected [--runs N] [--seed S])"
                ))
            }
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "test",
        "-p",
        "blockrep",
        "--test",
        "reliability_crash",
        "--",
        "--nocapture",
    ])
    .env("BLOCKREP_CRASH_RUNS", runs.to_string())
    .current_dir(root);
    if let Some(s) = seed {
        cmd.env("BLOCKREP_CRASH_SEED", s.to_string());
    }
    let status = cmd
        .status()
        .map_err(|e| format!("crash: could not run cargo test: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "crash: the crash test failed ({status}); its output names the seed"
        ))
    }
}
