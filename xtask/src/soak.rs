//! `cargo xtask soak [--minutes N] [--seed S]`: loops `blockrep demo` with
//! random seeds, durations, checkpoint intervals, I/O mixes and sizes, with
//! and without the failover kill (the demo kills the primary with SIGKILL
//! at a random point and verifies the secondary's view byte for byte), and
//! in 5 runs of 6 a random fault (`blockrep demo --fault`: a blkdebug EIO or
//! ENOSPC on the NBD link's writes or flushes or on the secondary disk's,
//! or the NBD link dropped; the demo checks the fault matrix's outcome),
//! until N minutes (default 30) have passed. The first failing run stops it
//! and prints the command (with its seed) that replays it.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DEFAULT_MINUTES: u64 = 30;

/// `blockrep demo --fault` kinds.
const FAULTS: [&str; 5] = [
    "link-write",
    "link-flush",
    "secondary-write",
    "secondary-flush",
    "link-drop",
];

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// The fault outcome class from the demo's `fault outcome` summary line.
fn outcome_class(stdout: &str) -> &'static str {
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("fault outcome"))
        .unwrap_or("");
    if line.contains("FAILOVER_FAILED") {
        "failover failed (FAILOVER_FAILED)"
    } else if line.contains("after the failover") {
        "secondary guest's disk error after the failover"
    } else if line.contains("replication error") {
        "replication error reported"
    } else {
        "not hit"
    }
}

/// Runs the task.
pub fn run(root: &Path, rest: &[String]) -> Result<(), String> {
    let mut minutes = DEFAULT_MINUTES;
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| format!("soak: {a} needs a value"))?;
        let n: u64 = v
            .parse()
            .map_err(|_| format!("soak: {a} needs a number, got '{v}'"))?;
        match a.as_str() {
            "--minutes" if n > 0 => minutes = n,
            "--seed" => seed = n,
            _ => {
                return Err(format!(
                    "soak: unexpected option '{a} {v}' (expected [--minutes N] [--seed S])"
                ))
            }
        }
    }
    eprintln!("xtask soak: {minutes} min, soak seed {seed}");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let st = Command::new(&cargo)
        .args(["build", "--release", "-p", "blockrep"])
        .current_dir(root)
        .status()
        .map_err(|e| format!("soak: cargo build: {e}"))?;
    if !st.success() {
        return Err("soak: building blockrep failed".into());
    }
    let target = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), Into::into);
    let bin = Path::new(&target).join("release/blockrep");
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(minutes * 60);
    let mut n = 0u64;
    let mut failovers = 0u64;
    // (fault kind, outcome) -> runs.
    let mut faults: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    while Instant::now() < deadline {
        n += 1;
        let demo_seed = rng.below(u64::MAX);
        let secs = 3 + rng.below(10);
        let interval = [50, 100, 200, 500, 1000][rng.below(5) as usize];
        let w = 20 + rng.below(70);
        let r = rng.below(100 - w);
        let mix = format!("write={w},read={r},flush={}", 100 - w - r + 1);
        let max_io = ["4K", "64K", "256K", "1M"][rng.below(4) as usize];
        let size = ["16M", "64M", "256M"][rng.below(3) as usize];
        let kill = rng.below(4) != 0;
        let fault = rng.below(6).checked_sub(1).map(|i| FAULTS[i as usize]);
        let errno = ["EIO", "ENOSPC"][rng.below(2) as usize];
        let sectors = [1, 2, 4, 16, 64][rng.below(5) as usize];
        let mut args = vec![
            "demo".to_string(),
            "--seed".into(),
            demo_seed.to_string(),
            "--duration".into(),
            format!("{secs}s"),
            "--checkpoint-interval".into(),
            interval.to_string(),
            "--mix".into(),
            mix,
            "--max-io".into(),
            max_io.into(),
            "--disk-size".into(),
            size.into(),
        ];
        if !kill {
            args.push("--no-kill".into());
        }
        if let Some(f) = fault {
            args.extend(["--fault".into(), f.to_string()]);
            if f != "link-drop" {
                args.extend(["--fault-errno".into(), errno.to_string()]);
            }
            if f.ends_with("-write") {
                args.extend(["--fault-sectors".into(), sectors.to_string()]);
            }
        }
        let replay = format!("{} {}", bin.display(), args.join(" "));
        let out = Command::new(&bin)
            .args(&args)
            .output()
            .map_err(|e| format!("soak: running {replay}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "soak: run {n} failed ({}) after {:.1} min; replay with:\n  {replay}\n--- stdout\n{}\n--- stderr\n{}",
                out.status,
                started.elapsed().as_secs_f64() / 60.0,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        failovers += u64::from(kill);
        let outcome = match fault {
            Some(f) => {
                let o = outcome_class(&String::from_utf8_lossy(&out.stdout));
                *faults.entry((f.to_string(), o)).or_default() += 1;
                format!(" [fault {f}: {o}]")
            }
            None => String::new(),
        };
        eprintln!("xtask soak: run {n} ok{outcome}: {replay}");
    }
    let with_fault: u64 = faults.values().sum();
    eprintln!(
        "xtask soak: {n} demo runs ({failovers} with a failover kill, {with_fault} with a fault) \
         passed in {minutes} min"
    );
    for ((f, o), c) in &faults {
        eprintln!("xtask soak:   fault {f:<16} {o:<50} {c} runs");
    }
    Ok(())
}
