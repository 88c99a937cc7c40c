//! Crash consistency of the whole stack (issue 11): a primary and a
//! secondary daemon replicating over NBD (qcow2 local disk, qcow2 secondary,
//! active and hidden disks); a writer writes and flushes through the
//! primary's NBD export; one daemon, picked at random, is killed with
//! SIGKILL at a random point, then the other. Every image must then pass
//! `qemu-img check` (leaks are repaired with `blockrep img check -r leaks`,
//! then the check must be clean), and hold every write acknowledged before
//! the last flush that completed: the local disk always, the secondary disk
//! for the flushes completed before the secondary died. Each 512-byte sector
//! must hold one whole value that was written there (or the value before).
//!
//! `BLOCKREP_CRASH_RUNS=N` sets the number of runs (kill points), default 2;
//! `BLOCKREP_CRASH_SEED=S` replays one run (a failure prints its seed).
//! `cargo xtask crash --runs N` runs this in release mode.

mod common;
mod reliability_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nbd::{ClientConfig, NbdClient, ServerAddr};
use reliability_common::{check_image, qmp_setup};

const SIZE: u64 = 8 << 20;
const BLOCK: u64 = 4096;
const BLOCKS: usize = (SIZE / BLOCK) as usize;
const SECTOR: usize = 512;

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the writer did: per block, every value written with the sequence
/// number of the write; `flushed` is the sequence number at the start of
/// the last completed flush (every write below it was acknowledged).
struct Model {
    history: Vec<Vec<(u64, u8)>>,
    seq: u64,
    flushed: u64,
    flushes: u64,
    acked_writes: u64,
}

impl Model {
    /// Values sector data of `block` may hold if everything acknowledged
    /// before the flush that started at `flushed` is durable.
    fn allowed(&self, block: usize, flushed: u64) -> Vec<u8> {
        let h = &self.history[block];
        let mut v = vec![h
            .iter()
            .rev()
            .find(|(s, _)| *s < flushed)
            .map_or(0, |(_, b)| *b)];
        v.extend(h.iter().filter(|(s, _)| *s >= flushed).map(|(_, b)| *b));
        v
    }
}

/// Writes random 1..4-block runs of one value, flushing every few writes,
/// until a request fails or `stop` is set.
fn writer(client: NbdClient, model: Arc<Mutex<Model>>, stop: Arc<AtomicBool>, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut value: u8 = 0;
    while !stop.load(Ordering::Relaxed) {
        if rng.below(6) == 0 {
            let start = model.lock().unwrap().seq;
            if client.flush().is_err() {
                return;
            }
            let mut m = model.lock().unwrap();
            m.flushed = start;
            m.flushes += 1;
            continue;
        }
        value = value % 255 + 1;
        let n = 1 + rng.below(4) as usize;
        let b = rng.below((BLOCKS - n) as u64) as usize;
        {
            let mut m = model.lock().unwrap();
            let s = m.seq;
            m.seq += 1;
            for blk in b..b + n {
                m.history[blk].push((s, value));
            }
        }
        let data = vec![value; n * BLOCK as usize];
        if client.write(b as u64 * BLOCK, &data, false).is_err() {
            return;
        }
        model.lock().unwrap().acked_writes += 1;
    }
}

/// The guest-visible contents of a qcow2 image (converted by qemu-img).
fn contents(path: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("contents.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(path)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    v
}

fn verify(data: &[u8], model: &Model, flushed: u64, what: &str) -> Result<(), String> {
    for blk in 0..BLOCKS {
        let allowed = model.allowed(blk, flushed);
        let base = blk * BLOCK as usize;
        for s in 0..BLOCK as usize / SECTOR {
            let sec = &data[base + s * SECTOR..base + (s + 1) * SECTOR];
            let v = sec[0];
            if sec.iter().any(|b| *b != v) || !allowed.contains(&v) {
                return Err(format!(
                    "{what}: block {blk} sector {s} holds {:?}.., allowed {allowed:?}",
                    &sec[..8]
                ));
            }
        }
    }
    Ok(())
}

/// What one run recorded.
struct RunReport {
    killed_first: &'static str,
    acked_writes: u64,
    flushes: u64,
    /// Images that needed `-r leaks` before checking clean.
    repaired: u64,
}

fn one_run(seed: u64, dir: &Path) -> Result<RunReport, String> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let s_nbd = dir.join("s.sock");
    let p_nbd = dir.join("p.sock");
    let mut sec = Daemon::start(dir, "secondary");
    let mut pri = Daemon::start(dir, "primary");
    qmp_setup(dir, "8M", &sec, &pri, &s_nbd, &p_nbd);
    let client = NbdClient::connect_with(ClientConfig {
        addr: ServerAddr::Unix(p_nbd.clone()),
        export: "disk0".into(),
        reconnect_delay: Duration::ZERO,
    })
    .map_err(|e| format!("connect to the primary: {e}"))?;
    let model = Arc::new(Mutex::new(Model {
        history: vec![Vec::new(); BLOCKS],
        seq: 0,
        flushed: 0,
        flushes: 0,
        acked_writes: 0,
    }));
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (m, s) = (model.clone(), stop.clone());
        std::thread::spawn(move || writer(client, m, s, seed))
    };
    std::thread::sleep(Duration::from_millis(50 + rng.below(700)));
    let primary_first = rng.below(2) == 0;
    // Flushes completed before the secondary dies reached the secondary disk.
    let sec_flushed;
    if primary_first {
        pri.kill9();
        sec_flushed = model.lock().unwrap().flushed;
        std::thread::sleep(Duration::from_millis(rng.below(100)));
        sec.kill9();
    } else {
        sec_flushed = model.lock().unwrap().flushed;
        sec.kill9();
        // The primary's guest keeps writing (it never sees the loss).
        std::thread::sleep(Duration::from_millis(50 + rng.below(300)));
        pri.kill9();
    }
    stop.store(true, Ordering::Relaxed);
    w.join().map_err(|_| "writer panicked".to_string())?;
    let m = model.lock().unwrap();
    let mut repaired = 0;
    for img in ["local", "sec", "active", "hidden"] {
        repaired += u64::from(check_image(&dir.join(format!("{img}.qcow2")))?);
    }
    verify(
        &contents(&dir.join("local.qcow2"), dir),
        &m,
        m.flushed,
        "local disk",
    )?;
    verify(
        &contents(&dir.join("sec.qcow2"), dir),
        &m,
        sec_flushed,
        "secondary disk",
    )?;
    Ok(RunReport {
        killed_first: if primary_first {
            "primary"
        } else {
            "secondary"
        },
        acked_writes: m.acked_writes,
        flushes: m.flushes,
        repaired,
    })
}

#[test]
fn kill9_of_either_daemon_loses_no_flushed_write() {
    let runs: u64 = std::env::var("BLOCKREP_CRASH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let seeds: Vec<u64> = match std::env::var("BLOCKREP_CRASH_SEED") {
        Ok(s) => vec![s.parse().expect("BLOCKREP_CRASH_SEED is a number")],
        Err(_) => {
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            (0..runs).map(|i| base.wrapping_add(i * 7919)).collect()
        }
    };
    let start = Instant::now();
    let (mut pri_first, mut writes, mut flushes, mut repaired) = (0, 0, 0, 0);
    for (i, seed) in seeds.iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        let dir: PathBuf = tmp.path().to_path_buf();
        match one_run(*seed, &dir) {
            Ok(r) => {
                pri_first += u64::from(r.killed_first == "primary");
                writes += r.acked_writes;
                flushes += r.flushes;
                repaired += r.repaired;
                eprintln!(
                    "crash run {}/{}: seed {seed}: killed {} first; {} writes, {} flushes acknowledged; ok",
                    i + 1,
                    seeds.len(),
                    r.killed_first,
                    r.acked_writes,
                    r.flushes
                );
            }
            Err(e) => {
                let _ = tmp.keep();
                panic!(
                    "crash run {} failed: {e}\nreplay with BLOCKREP_CRASH_SEED={seed} (files kept in {})",
                    i + 1,
                    dir.display()
                );
            }
        }
    }
    eprintln!(
        "crash: {} kill points ({} primary first, {} secondary first), {writes} writes and {flushes} flushes acknowledged, nothing lost, {repaired} images needed leak repair, in {:.0} s",
        seeds.len(),
        pri_first,
        seeds.len() as u64 - pri_first,
        start.elapsed().as_secs_f64()
    );
}
