//! `blockrep demo`: the whole system on embedded defaults, nothing to
//! prepare. In a temporary directory it creates the images, starts a
//! secondary and a primary daemon (`blockrep serve`, two processes) joined
//! over NBD on Unix sockets, builds DESIGN.md's graphs over QMP with QEMU's
//! COLO command sequence, and runs a guest on each side through its NBD
//! export. It plays the COLO manager: every checkpoint interval it parks
//! both guests, ships the primary guest's state to the secondary through
//! `replication-core`'s checkpoint state registry, checkpoints the primary
//! then the secondary (`xen-colo-do-checkpoint`), checks that both disks are
//! identical, and resumes. At a random moment it kills the primary daemon
//! with SIGKILL and fails the secondary over (`x-colo-lost-heartbeat`),
//! then checks byte for byte that the secondary disk is the last checkpoint
//! plus the secondary guest's own writes since (`--no-kill`: a clean stop,
//! `xen-set-replication enable=false` on both, instead).
//!
//! The seed fixes the workload (operations, sizes, offsets, data, initial
//! disk contents, the kill moment); where the checkpoints fall between
//! operations depends on timing.
//!
//! Exit status: 0 when every verification passed, 1 when one failed (the
//! first differing offset and both values are printed), 2 when the demo
//! could not run.

mod daemons;
mod error;
mod fault;
mod progress;
mod rng;
mod state;
mod summary;
mod workload;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::{NbdClient, ServerAddr};
use parking_lot::Mutex;
use replication_core::StateRegistry;
use serde_json::json;

use daemons::{names, DaemonProc, Files, Qmp};
pub(crate) use error::DemoError;
use fault::{Fault, FaultSummary};
pub use fault::{FaultErrno, FaultKind};
use progress::{human, Progress};
use rng::Rng;
use state::{PrimarySide, SecondarySide, STATE_ID, STATE_VERSION};
use summary::{Difference, FailoverSummary, GuestSummary, PauseSummary, Summary, Verification};
use workload::{first_difference, Gate, Guest, GuestState, Mix, WorkerEnd};

/// Arguments of `blockrep demo`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// How long the guests run (e.g. 20s, 500ms, 2m; a bare number is seconds).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Virtual disk size (suffixes K, M, G: binary multiples).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub disk_size: u64,
    /// Milliseconds between checkpoints.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    pub checkpoint_interval: u64,
    /// Guest operation weights.
    #[arg(long, default_value = "write=60,read=35,flush=5", value_parser = Mix::parse)]
    pub mix: Mix,
    /// Largest guest I/O (sizes run from 512 B to this).
    #[arg(long, default_value = "256K", value_parser = parse_size)]
    pub max_io: u64,
    /// Seed of the whole workload (printed at start; random if not given).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep the directory (images, daemon logs) and print its path.
    #[arg(long)]
    pub keep: bool,
    /// No failover: stop replication cleanly on both sides at the end.
    #[arg(long)]
    pub no_kill: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Inject a fault (blkdebug on the NBD link or the secondary disk, or
    /// the NBD link dropped) and check the outcome docs/reliability.md's
    /// fault matrix names: the primary guest sees no error, the primary
    /// reports the replication error, its disk holds every acknowledged
    /// write, the secondary guest's view is intact; no checkpoint after it;
    /// a secondary-disk fault hitting the failover commit ends in
    /// FAILOVER_FAILED with the secondary guest's view intact.
    #[arg(long, value_enum, value_name = "KIND")]
    pub fault: Option<FaultKind>,
    /// errno of an injected I/O fault.
    #[arg(long, value_enum, default_value = "EIO", value_name = "ERRNO")]
    pub fault_errno: FaultErrno,
    /// Write faults: how many 512-byte sectors fail every write covering
    /// them (seeded places in the hot eighth of the disk, where half the
    /// guests' I/O goes; random 1 to 16 from the seed if not given). Flush
    /// faults fail every flush; link-drop happens at a seeded moment.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub fault_sectors: Option<u64>,
    /// (tests) Corrupt one byte of the secondary disk before the final
    /// verification, which must then fail.
    #[arg(long, hide = true)]
    pub corrupt_secondary_for_test: bool,
}

/// Runs the demo; see the module documentation for the exit status.
pub fn run(args: Args) -> ExitCode {
    match Demo::run(&args) {
        Ok(s) => {
            if args.json {
                match serde_json::to_string_pretty(&s) {
                    Ok(t) => println!("{t}"),
                    Err(e) => eprintln!("blockrep demo: cannot print the summary: {e}"),
                }
            } else {
                print!("{}", s.table());
            }
            let ctx = fault_context(&args, Some(s.seed));
            if s.verification.result == "passed" {
                ExitCode::SUCCESS
            } else {
                if let Some(d) = &s.verification.first_difference {
                    eprintln!("blockrep demo: verification FAILED{ctx}: {d}");
                } else if let Some(e) = &s.verification.error {
                    eprintln!("blockrep demo: verification FAILED{ctx}: {e}");
                }
                ExitCode::from(1)
            }
        }
        Err(e) => {
            let ctx = fault_context(&args, None);
            eprintln!("blockrep demo: error{ctx}: {e}");
            ExitCode::from(2)
        }
    }
}

/// ` (seed S, fault F)` when a fault was injected (empty otherwise: the
/// messages of a run without a fault stay as they were).
fn fault_context(a: &Args, seed: Option<u64>) -> String {
    let Some(k) = a.fault else {
        return String::new();
    };
    let seed = seed
        .or(a.seed)
        .map_or("printed at start".into(), |s| s.to_string());
    let after = a
        .fault_sectors
        .map_or(String::new(), |n| format!(" --fault-sectors {n}"));
    format!(
        " (seed {seed}, fault --fault {} --fault-errno {}{after})",
        k.name(),
        a.fault_errno.name()
    )
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" | "KiB" => 10,
        "m" | "M" | "MiB" => 20,
        "g" | "G" | "GiB" => 30,
        "t" | "T" | "TiB" => 40,
        _ => return Err(format!("invalid size '{s}' (examples: 512, 64K, 64M, 1G)")),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("invalid size '{s}' (examples: 512, 64K, 64M, 1G)"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("invalid duration '{s}' (examples: 20s, 500ms, 2m)");
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 || v * mult > 86_400.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * mult))
}

fn check_args(a: &Args) -> Result<(), DemoError> {
    let bad = |m: String| Err(DemoError::Usage(m));
    if a.disk_size < 1 << 20 || a.disk_size % 512 != 0 || a.disk_size > 4 << 30 {
        return bad(format!(
            "--disk-size {} must be a multiple of 512 from 1 MiB to 4 GiB \
             (the demo keeps the guests' disks in memory as its model)",
            a.disk_size
        ));
    }
    if a.max_io < 512 || a.max_io % 512 != 0 || a.max_io > (32 << 20) || a.max_io > a.disk_size {
        return bad(format!(
            "--max-io {} must be a multiple of 512 from 512 B to 32 MiB and at most the disk size",
            a.max_io
        ));
    }
    if a.checkpoint_interval < 10 {
        return bad("--checkpoint-interval must be at least 10 ms".into());
    }
    Ok(())
}

/// The run's directory, removed at the end unless kept.
struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    fn create(keep: bool) -> Result<WorkDir, DemoError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path =
            std::env::temp_dir().join(format!("blockrep-demo-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| DemoError::io("creating directory", &path, e))?;
        Ok(WorkDir { path, keep })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut r = Rng(t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32));
    r.next_u64() >> 16 // short enough to type
}

/// First difference between a file and the expected bytes.
fn compare_file(path: &Path, want: &[u8], what: &str) -> Result<Option<Difference>, DemoError> {
    let f = File::open(path).map_err(|e| DemoError::io("opening", path, e))?;
    let len = f
        .metadata()
        .map_err(|e| DemoError::io("reading the size of", path, e))?
        .len();
    if len != want.len() as u64 {
        return Ok(Some(Difference {
            what: format!("{what} (size {len}, expected {})", want.len()),
            offset: len.min(want.len() as u64),
            expected: 0,
            found: 0,
        }));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0usize;
    while off < want.len() {
        let n = buf.len().min(want.len() - off);
        f.read_exact_at(&mut buf[..n], off as u64)
            .map_err(|e| DemoError::io("reading", path, e))?;
        if let Some(i) = first_difference(&want[off..off + n], &buf[..n]) {
            return Ok(Some(Difference {
                what: what.into(),
                offset: (off + i) as u64,
                expected: want[off + i],
                found: buf[i],
            }));
        }
        off += n;
    }
    Ok(None)
}

/// First difference between what a guest reads through its export and
/// the expected bytes, over the given 4 KiB blocks (all when `None`).
fn compare_view(
    g: &Guest,
    want: &[u8],
    blocks: Option<&[u64]>,
    what: &str,
) -> Result<Option<Difference>, DemoError> {
    let size = want.len() as u64;
    let ranges: Vec<(u64, u64)> = match blocks {
        Some(blocks) => {
            // Sorted blocks, merged into runs of up to 1 MiB.
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for &b in blocks {
                let off = b * workload::BLOCK;
                let len = workload::BLOCK.min(size - off);
                match runs.last_mut() {
                    Some((o, l)) if *o + *l == off && *l + len <= 1 << 20 => *l += len,
                    _ => runs.push((off, len)),
                }
            }
            runs
        }
        None => (0..size.div_ceil(1 << 20))
            .map(|i| (i << 20, (1u64 << 20).min(size - (i << 20))))
            .collect(),
    };
    let mut buf = vec![0u8; 1 << 20];
    for (off, len) in ranges {
        let data = &mut buf[..len as usize];
        g.client.read(off, data).map_err(|source| DemoError::Nbd {
            side: g.side,
            op: "read",
            offset: off,
            len,
            source,
        })?;
        let exp = &want[off as usize..(off + len) as usize];
        if let Some(i) = first_difference(exp, data) {
            return Ok(Some(Difference {
                what: what.into(),
                offset: off + i as u64,
                expected: exp[i],
                found: data[i],
            }));
        }
    }
    Ok(None)
}

/// Everything a run holds.
struct Demo<'a> {
    args: &'a Args,
    seed: u64,
    files: Files,
    progress: Progress,
    primary: DaemonProc,
    secondary: DaemonProc,
    pq: Option<Qmp>,
    sq: Option<Qmp>,
    pg: Arc<Guest>,
    sg: Arc<Guest>,
    gate: Arc<Gate>,
    workers: Vec<std::thread::JoinHandle<WorkerEnd>>,
    pri_states: StateRegistry,
    sec_states: StateRegistry,
    sec_side: Arc<SecondarySide>,
    /// The injected fault, if any.
    fault: Option<Fault>,
    /// The secondary's NBD export was removed (link-drop).
    link_dropped: bool,
    /// The primary reported a replication error: no more checkpoints.
    broken: bool,
    /// The secondary's failover ended in FAILOVER_FAILED.
    failover_failed: bool,
    /// `x-colo-lost-heartbeat` was sent.
    failover_begun: bool,
    /// What the fault did, and what was verified about it.
    fault_outcome: Option<String>,
    fault_verified: Vec<String>,
    // Figures.
    /// The checkpoint stream buffer, reused (no fresh pages per checkpoint).
    stream: Vec<u8>,
    pauses: Vec<Duration>,
    verify_times: Vec<Duration>,
    shipped: u64,
    forwarded: u64,
    copied: u64,
    checks: u64,
    sec_writes_at_checkpoint: u64,
    failure: Option<Difference>,
    failure_text: Option<String>,
}

impl Demo<'_> {
    fn run(args: &Args) -> Result<Summary, DemoError> {
        check_args(args)?;
        let seed = args.seed.unwrap_or_else(random_seed);
        eprintln!("blockrep demo: seed {seed} (replay with --seed {seed})");
        let t_start = Instant::now();
        let dir = WorkDir::create(args.keep)?;
        let mut progress = Progress::new();
        let files = Files::new(&dir.path);
        progress.phase(&format!(
            "creating images in {}: two {} raw disks, active and hidden qcow2",
            dir.path.display(),
            human(args.disk_size)
        ));
        let base = create_images(&files, args.disk_size, seed)?;

        progress.phase("starting the secondary and the primary daemon (blockrep serve)");
        let mut secondary = DaemonProc::spawn(&dir.path, "secondary")?;
        let mut sq = secondary.connect()?;
        let mut primary = DaemonProc::spawn(&dir.path, "primary")?;
        let mut pq = primary.connect()?;
        progress.phase(&format!(
            "building the graphs over QMP (secondary pid {}, primary pid {})",
            secondary.pid().unwrap_or(0),
            primary.pid().unwrap_or(0)
        ));
        let fault = args.fault.map(|kind| {
            let mut r = Rng(seed ^ 0xFA17);
            let n = args.fault_sectors.unwrap_or_else(|| 1 + r.below(16));
            let hot = (args.disk_size / 8).max(512) / 512;
            let mut sectors: Vec<u64> = (0..n).map(|_| r.below(hot)).collect();
            sectors.sort_unstable();
            sectors.dedup();
            Fault {
                kind,
                errno: args.fault_errno,
                sectors: if kind.is_write() { sectors } else { Vec::new() },
            }
        });
        if let Some(f) = &fault {
            progress.phase(&format!("fault injection: {}", f.describe()));
        }
        daemons::build_secondary(&mut sq, &files, fault.as_ref())?;
        daemons::build_primary(&mut pq, &files, fault.as_ref())?;

        let connect = |side: &'static str, sock: &Path| {
            NbdClient::connect(ServerAddr::Unix(sock.to_path_buf()), names::GUEST_EXPORT).map_err(
                |source| DemoError::Nbd {
                    side,
                    op: "connect",
                    offset: 0,
                    len: 0,
                    source,
                },
            )
        };
        let mut gen_seed = Rng(seed ^ 0x6E57);
        let pg = Arc::new(Guest {
            side: "primary",
            client: connect("primary", &files.primary_nbd)?,
            state: Mutex::new(GuestState::new(gen_seed.next_u64(), base.clone())),
            stats: Default::default(),
            dying: Default::default(),
        });
        let sg = Arc::new(Guest {
            side: "secondary",
            client: connect("secondary", &files.secondary_nbd)?,
            state: Mutex::new(GuestState::new(gen_seed.next_u64(), base)),
            stats: Default::default(),
            dying: Default::default(),
        });
        let pri_states = StateRegistry::new();
        let sec_states = StateRegistry::new();
        let sec_side = Arc::new(SecondarySide::new(Arc::clone(&sg)));
        let _h1 = pri_states
            .register(
                STATE_ID,
                Some(0),
                STATE_VERSION,
                Arc::new(PrimarySide::new(Arc::clone(&pg))),
            )
            .map_err(|source| DemoError::State { epoch: 0, source })?;
        let _h2 = sec_states
            .register(STATE_ID, Some(0), STATE_VERSION, sec_side.clone())
            .map_err(|source| DemoError::State { epoch: 0, source })?;

        let mut d = Demo {
            args,
            seed,
            files,
            progress,
            primary,
            secondary,
            pq: Some(pq),
            sq: Some(sq),
            pg,
            sg,
            gate: Arc::new(Gate::default()),
            workers: Vec::new(),
            pri_states,
            sec_states,
            sec_side,
            fault,
            link_dropped: false,
            broken: false,
            failover_failed: false,
            failover_begun: false,
            fault_outcome: None,
            fault_verified: Vec::new(),
            stream: Vec::new(),
            pauses: Vec::new(),
            verify_times: Vec::new(),
            shipped: 0,
            forwarded: 0,
            copied: 0,
            checks: 0,
            sec_writes_at_checkpoint: 0,
            failure: None,
            failure_text: None,
        };
        let result = d.main();
        if result.is_err() {
            // Daemons first: a guest blocked on a hung daemon then gets EOF.
            d.primary.kill9();
            d.secondary.kill9();
            d.pg.dying.store(true, Ordering::SeqCst);
            d.sg.dying.store(true, Ordering::SeqCst);
            d.gate.stop();
            for w in d.workers.drain(..) {
                let _ = w.join();
            }
            for p in [&d.primary, &d.secondary] {
                let tail = p.log_tail(15);
                if !tail.is_empty() {
                    eprintln!("--- last lines of the {} daemon's log ---\n{tail}", p.side);
                }
            }
        }
        let (failover, elapsed_guests, error) = match result {
            Ok((f, e)) => (f, e, None),
            Err(e) if d.failure.is_some() => (None, Duration::ZERO, Some(e.to_string())),
            Err(e) => return Err(e),
        };
        let stats = |g: &Guest| GuestSummary {
            writes: g.stats.writes.load(Ordering::Relaxed),
            reads: g.stats.reads.load(Ordering::Relaxed),
            flushes: g.stats.flushes.load(Ordering::Relaxed),
            bytes_written: g.stats.bytes_written.load(Ordering::Relaxed),
            bytes_read: g.stats.bytes_read.load(Ordering::Relaxed),
        };
        let error = error.or(d.failure_text.clone());
        let passed = d.failure.is_none() && error.is_none();
        let summary = Summary {
            seed: d.seed,
            mode: if args.no_kill {
                "clean-stop"
            } else {
                "failover"
            },
            duration_s: elapsed_guests.as_secs_f64(),
            elapsed_s: t_start.elapsed().as_secs_f64(),
            disk_size: args.disk_size,
            checkpoint_interval_ms: args.checkpoint_interval,
            mix: args.mix.to_string(),
            max_io: args.max_io,
            primary: stats(&d.pg),
            secondary: stats(&d.sg),
            bytes_forwarded: d.forwarded,
            checkpoints: d.sec_side.epoch(),
            state_shipped_bytes: d.shipped,
            checkpoint_pause: PauseSummary::of(&d.pauses),
            checkpoint_verify: PauseSummary::of(&d.verify_times),
            clusters_copied_before_write: d.copied,
            failover,
            fault: d.fault.clone().map(|f| FaultSummary {
                kind: f.kind,
                errno: (f.kind != FaultKind::LinkDrop).then_some(f.errno),
                sectors: f.sectors,
                outcome: d.fault_outcome.clone().unwrap_or_else(|| {
                    "not hit (no error reported; the run went as without it)".into()
                }),
                verified: d.fault_verified.clone(),
                broken: d.broken,
                failover_failed: d.failover_failed,
            }),
            verification: Verification {
                result: if passed { "passed" } else { "failed" },
                checkpoints_verified: d.pauses.len() as u64,
                checks: d.checks,
                first_difference: d.failure.clone(),
                error,
            },
            directory: args.keep.then(|| dir.path.display().to_string()),
        };
        Ok(summary)
    }

    fn pq(&mut self) -> Result<&mut Qmp, DemoError> {
        self.pq.as_mut().ok_or(DemoError::Replication {
            side: "primary",
            reason: "the primary is gone".into(),
        })
    }

    fn sq(&mut self) -> Result<&mut Qmp, DemoError> {
        self.sq.as_mut().ok_or(DemoError::Replication {
            side: "secondary",
            reason: "the secondary has stopped".into(),
        })
    }

    /// Records a verification failure (the first one is kept).
    fn check(&mut self, diff: Option<Difference>) -> bool {
        self.checks += 1;
        if let Some(d) = diff {
            if self.failure.is_none() {
                self.failure = Some(d);
            }
            return false;
        }
        true
    }

    /// Ends of workers that stopped by themselves (a read mismatch or an
    /// I/O error); a mismatch is a verification failure.
    fn reap_workers(&mut self, all: bool) -> Result<(), DemoError> {
        let mut i = 0;
        while i < self.workers.len() {
            if all || self.workers[i].is_finished() {
                let end = self.workers.remove(i).join();
                match end {
                    Ok(WorkerEnd::Stopped) => {}
                    Ok(WorkerEnd::Mismatch(m)) => {
                        self.check(Some(Difference {
                            what: format!("{} guest read vs its model", m.side),
                            offset: m.offset,
                            expected: m.expected,
                            found: m.found,
                        }));
                    }
                    Ok(WorkerEnd::Error(e)) => {
                        if !self.expected_guest_error(&e) {
                            return Err(e);
                        }
                    }
                    Err(_) => {
                        return Err(DemoError::Replication {
                            side: "demo",
                            reason: "a guest thread panicked".into(),
                        })
                    }
                }
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// The run after the graphs are built: guests, checkpoints, then the
    /// failover or the clean stop, and the final verification. Returns
    /// the failover figures and how long the guests ran.
    fn main(&mut self) -> Result<(Option<FailoverSummary>, Duration), DemoError> {
        let a = self.args;
        for g in [&self.pg, &self.sg] {
            self.workers.push(workload::spawn_worker(
                Arc::clone(g),
                Arc::clone(&self.gate),
                a.mix,
                a.max_io,
            ));
        }
        let start = Instant::now();
        let end = start + a.duration;
        let interval = Duration::from_millis(a.checkpoint_interval);
        let kill_at = (!a.no_kill).then(|| {
            let mut r = Rng(self.seed ^ 0x4B11);
            let frac = 0.35 + 0.5 * (r.below(1000) as f64 / 1000.0);
            start + a.duration.mul_f64(frac)
        });
        self.progress.phase(&format!(
            "guests running through NBD for {:.1} s, checkpoint every {} ms{}",
            a.duration.as_secs_f64(),
            a.checkpoint_interval,
            match kill_at {
                Some(k) => format!(
                    ", primary to be killed at {:.2} s",
                    (k - start).as_secs_f64()
                ),
                None => ", no kill".into(),
            }
        ));
        // link-drop: at a seeded moment before the kill (or the end).
        let drop_at = self
            .fault
            .as_ref()
            .filter(|f| f.kind == FaultKind::LinkDrop)
            .map(|_| {
                let mut r = Rng(self.seed ^ 0xD209);
                let frac = 0.1 + 0.8 * (r.below(1000) as f64 / 1000.0);
                start + (kill_at.unwrap_or(end) - start).mul_f64(frac)
            });
        let mut next = start + interval;
        loop {
            self.reap_workers(false)?;
            if self.failure.is_some() || self.failure_text.is_some() {
                break;
            }
            let now = Instant::now();
            if kill_at.is_some_and(|k| now >= k) || now >= end {
                break;
            }
            if !self.link_dropped && drop_at.is_some_and(|t| now >= t) {
                self.drop_link()?;
            }
            if now >= next && !self.broken {
                self.checkpoint(true)?;
                next = (next + interval).max(Instant::now());
            }
            let status = format!(
                "checkpoints {}  primary wrote {}  secondary wrote {}",
                self.sec_side.epoch(),
                human(self.pg.stats.bytes_written.load(Ordering::Relaxed)),
                human(self.sg.stats.bytes_written.load(Ordering::Relaxed)),
            );
            self.progress.bar(now - start, a.duration, &status);
            let wake = [
                (!self.broken).then_some(next),
                drop_at.filter(|_| !self.link_dropped),
                kill_at,
                Some(end),
                Some(now + Duration::from_millis(100)),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now);
            std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        }
        self.progress.done();
        if self.failure.is_some() || self.failure_text.is_some() {
            self.gate.stop();
            self.reap_workers(true)?;
            return Ok((None, start.elapsed()));
        }
        if a.no_kill {
            if self.broken {
                self.broken_stop()?;
            } else {
                self.clean_stop()?;
            }
            Ok((None, start.elapsed()))
        } else {
            let f = self.failover(start, end)?;
            Ok((Some(f), start.elapsed()))
        }
    }

    /// One COLO checkpoint, guests parked throughout; with `resume` the
    /// guests go on afterwards.
    fn checkpoint(&mut self, resume: bool) -> Result<(), DemoError> {
        let t0 = Instant::now();
        self.gate.pause();
        let t_parked = Instant::now();
        let epoch = self.sec_side.epoch() + 1;
        // With a fault, the status comes first (DESIGN: whoever drives
        // checkpoints checks it before each one): after a forwarding error
        // the disks differ and no checkpoint may be taken.
        if self.fault.is_some() && self.fault_check(&format!("before checkpoint {epoch}"))? {
            if resume {
                self.gate.resume();
            }
            return Ok(());
        }
        let mut touched = self.pg.state.lock().dirty.clone();
        touched.extend_from_slice(&self.sg.state.lock().dirty);
        touched.sort_unstable();
        touched.dedup();
        // Ship the primary guest's state to the secondary.
        let mut stream = std::mem::take(&mut self.stream);
        stream.clear();
        self.pri_states
            .save(&mut stream)
            .map_err(|source| DemoError::State { epoch, source })?;
        self.sec_states
            .load(&mut stream.as_slice())
            .map_err(|source| DemoError::State { epoch, source })?;
        self.shipped += stream.len() as u64;
        let stream_len = stream.len();
        self.stream = stream;
        let t_shipped = Instant::now();
        self.pq()?.run("xen-colo-do-checkpoint", json!({}))?;
        let t1 = Instant::now();
        // Figures of the interval that ends (not part of the pause).
        let ps = self.pq()?.replication_status(names::PRIMARY_REPLICATION)?;
        let ss = self.sq()?.replication_status(names::SECONDARY_TOP)?;
        for (side, s) in [("primary", &ps), ("secondary", &ss)] {
            if s["error"] != false || s["state"] != "RUNNING" {
                return Err(DemoError::Replication {
                    side,
                    reason: format!("replication is not healthy at checkpoint {epoch}: {s}"),
                });
            }
        }
        self.forwarded = ps["bytes-forwarded"].as_u64().unwrap_or(self.forwarded);
        // Guests parked: every byte the primary guest wrote was forwarded.
        let written = self.pg.stats.bytes_written.load(Ordering::Relaxed);
        self.checks += 1;
        if self.forwarded != written && self.failure_text.is_none() {
            self.failure_text = Some(format!(
                "checkpoint {epoch}: the primary forwarded {} bytes but its guest wrote {written}",
                self.forwarded
            ));
        }
        self.copied += ss["clusters-copied-since-checkpoint"].as_u64().unwrap_or(0);
        let t2 = Instant::now();
        self.sq()?.run("xen-colo-do-checkpoint", json!({}))?;
        let t3 = Instant::now();
        self.pauses.push((t1 - t0) + (t3 - t2));

        // Both disks identical, and equal to what the guests must see.
        let want = std::mem::take(&mut self.pg.state.lock().model);
        let checks = (|| {
            let sec = self.sg.state.lock();
            let sec_model = &sec.model;
            let d = first_difference(&want, sec_model).map(|i| Difference {
                what: format!("checkpoint {epoch}: secondary guest state (shipped) vs primary"),
                offset: i as u64,
                expected: want[i],
                found: sec_model[i],
            });
            Ok::<_, DemoError>([
                d,
                compare_file(
                    &self.files.primary_disk,
                    &want,
                    &format!("checkpoint {epoch}: primary disk vs primary guest model"),
                )?,
                compare_file(
                    &self.files.secondary_disk,
                    &want,
                    &format!("checkpoint {epoch}: secondary disk vs primary disk"),
                )?,
                compare_view(
                    &self.sg,
                    &want,
                    Some(&touched),
                    &format!("checkpoint {epoch}: secondary guest view vs primary disk"),
                )?,
                compare_view(
                    &self.pg,
                    &want,
                    Some(&touched),
                    &format!("checkpoint {epoch}: primary guest view vs its model"),
                )?,
            ])
        })();
        self.pg.state.lock().model = want;
        for c in checks? {
            self.check(c);
        }
        self.sec_writes_at_checkpoint = self.sg.stats.writes.load(Ordering::Relaxed);
        self.verify_times.push(t3.elapsed());
        if std::env::var_os("BLOCKREP_DEMO_TRACE").is_some() {
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            eprintln!(
                "checkpoint {epoch}: park {:.2} ms, ship {} B {:.2} ms, primary {:.2} ms, \
                 status {:.2} ms, secondary {:.2} ms, verify {:.2} ms",
                ms(t0, t_parked),
                stream_len,
                ms(t_parked, t_shipped),
                ms(t_shipped, t1),
                ms(t1, t2),
                ms(t2, t3),
                ms(t3, Instant::now())
            );
        }
        if resume {
            self.gate.resume();
        }
        Ok(())
    }

    /// SIGKILL the primary daemon, fail the secondary over, let its guest
    /// run on, then verify the secondary disk.
    fn failover(&mut self, start: Instant, end: Instant) -> Result<FailoverSummary, DemoError> {
        if self.fault.is_some() && !self.broken {
            // A fault hit since the last checkpoint: its outcome, guests parked.
            self.gate.pause();
            let r = self.fault_check("before the kill");
            self.gate.resume();
            r?;
        }
        if let Ok(s) = self.pq()?.replication_status(names::PRIMARY_REPLICATION) {
            self.forwarded = s["bytes-forwarded"].as_u64().unwrap_or(self.forwarded);
        }
        self.pg.dying.store(true, Ordering::SeqCst);
        let killed_at = start.elapsed();
        self.progress.phase(&format!(
            "killing the primary daemon (SIGKILL, pid {}) after {} checkpoints",
            self.primary.pid().unwrap_or(0),
            self.sec_side.epoch()
        ));
        let t_kill = Instant::now();
        self.primary.kill9();
        self.pq = None;
        // QEMU's COLO-FT.txt secondary failover: stop serving the primary,
        // then x-colo-lost-heartbeat.
        if !self.link_dropped {
            self.sq()?.run(
                "nbd-server-remove",
                json!({"name": names::SECONDARY_DISK, "mode": "hard"}),
            )?;
        }
        let ss = self.sq()?.replication_status(names::SECONDARY_TOP)?;
        self.copied += ss["clusters-copied-since-checkpoint"].as_u64().unwrap_or(0);
        // The secondary guest keeps running through the failover commit.
        let t_lh = Instant::now();
        self.failover_begun = true;
        self.sq()?.run("x-colo-lost-heartbeat", json!({}))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            let s = self.sq()?.replication_status(names::SECONDARY_TOP)?;
            match s["state"].as_str() {
                Some("DONE") => break s,
                // The fault matrix: a write or flush fault on the secondary
                // disk hitting the commit fails the failover, error reported.
                Some("FAILOVER_FAILED")
                    if self
                        .fault
                        .as_ref()
                        .is_some_and(|f| f.kind.on_secondary_disk()) =>
                {
                    self.failover_failed = true;
                    break s;
                }
                Some("FAILOVER") if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                _ => {
                    return Err(DemoError::Replication {
                        side: "secondary",
                        reason: format!("failover did not finish: {s}"),
                    })
                }
            }
        };
        let t_done = Instant::now();
        let st = self.sq()?.run("query-xen-replication-status", json!({}))?;
        if self.failover_failed {
            self.checks += 1;
            if (status["error"] != true || st["error"] != true) && self.failure_text.is_none() {
                self.failure_text = Some(format!(
                    "failover FAILOVER_FAILED without the error reported: {st} {status}"
                ));
            }
            self.fault_outcome = Some(format!(
                "the failover commit hit it: FAILOVER_FAILED, error reported on the secondary{}",
                if self.broken {
                    " (after a replication error on the primary)"
                } else {
                    ""
                }
            ));
            self.fault_verified
                .push("secondary: state FAILOVER_FAILED, error reported (status and query-xen-replication-status)".into());
        } else if st["error"] != false || status["error"] != false {
            return Err(DemoError::Replication {
                side: "secondary",
                reason: format!("error after failover: {st} {status}"),
            });
        }
        self.progress.phase(&format!(
            "secondary {} in {:.1} ms; its guest runs on",
            if self.failover_failed {
                "failover FAILED (FAILOVER_FAILED, as the fault matrix says)"
            } else {
                "took over"
            },
            (t_done - t_kill).as_secs_f64() * 1e3
        ));
        let until = end.max(t_done + Duration::from_millis(500));
        while Instant::now() < until {
            self.reap_workers(false)?;
            if self.failure.is_some() {
                break;
            }
            let status = format!(
                "failed over; secondary alone, wrote {}",
                human(self.sg.stats.bytes_written.load(Ordering::Relaxed))
            );
            self.progress.bar(start.elapsed(), until - start, &status);
            std::thread::sleep(
                until
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50)),
            );
        }
        self.progress.done();
        self.gate.stop();
        self.reap_workers(true)?;
        let since = self.sg.stats.writes.load(Ordering::Relaxed) - self.sec_writes_at_checkpoint;

        self.progress.phase(if self.failover_failed {
            "verifying: secondary guest view = last checkpoint + the secondary guest's writes since"
        } else {
            "verifying: secondary disk = last checkpoint + the secondary guest's writes since"
        });
        let want = std::mem::take(&mut self.sg.state.lock().model);
        let r = self.final_checks_failover(&want);
        self.sg.state.lock().model = want;
        r?;
        Ok(FailoverSummary {
            killed_at_s: killed_at.as_secs_f64(),
            failover_ms: (t_done - t_kill).as_secs_f64() * 1e3,
            lost_heartbeat_to_done_ms: (t_done - t_lh).as_secs_f64() * 1e3,
            daemon_failover_ms: status["failover-duration-us"]
                .as_u64()
                .map(|us| us as f64 / 1e3),
            secondary_writes_since_checkpoint: since,
        })
    }

    fn final_checks_failover(&mut self, want: &[u8]) -> Result<(), DemoError> {
        let v = compare_view(
            &self.sg,
            want,
            None,
            "after failover: secondary guest view vs last checkpoint + its writes",
        )?;
        self.check(v);
        self.sg.client.close();
        if let Some(sq) = self.sq.take() {
            self.secondary.quit(sq)?;
        }
        if self.args.corrupt_secondary_for_test {
            self.corrupt_secondary()?;
        }
        if self.failover_failed {
            // The commit stopped part way: the secondary disk is not the
            // guest's view (that one was checked above).
            self.fault_verified.push(
                "secondary guest view = last checkpoint + its writes after the failed failover"
                    .into(),
            );
        } else {
            let v = compare_file(
                &self.files.secondary_disk,
                want,
                "after failover: secondary disk vs last checkpoint + secondary guest writes",
            )?;
            self.check(v);
        }
        self.check_images()
    }

    /// A last checkpoint, then `xen-set-replication enable=false` on both,
    /// and both disks checked against the last checkpoint.
    fn clean_stop(&mut self) -> Result<(), DemoError> {
        self.progress
            .phase("last checkpoint, then xen-set-replication enable=false on both");
        self.checkpoint(false)?;
        if self.broken {
            return self.broken_stop();
        }
        self.pq()?.run(
            "xen-set-replication",
            json!({"enable": false, "primary": true}),
        )?;
        self.sq()?.run(
            "xen-set-replication",
            json!({"enable": false, "primary": false}),
        )?;
        let ss = self.sq()?.replication_status(names::SECONDARY_TOP)?;
        if ss["state"] != "DONE" || ss["error"] != false {
            return Err(DemoError::Replication {
                side: "secondary",
                reason: format!("after a clean stop: {ss}"),
            });
        }
        self.gate.stop();
        self.reap_workers(true)?;
        self.progress
            .phase("verifying: both disks equal the last checkpoint");
        let want = std::mem::take(&mut self.pg.state.lock().model);
        let r = self.final_checks_clean(&want);
        self.pg.state.lock().model = want;
        r
    }

    fn final_checks_clean(&mut self, want: &[u8]) -> Result<(), DemoError> {
        let v = compare_view(
            &self.sg,
            want,
            None,
            "after the stop: secondary guest view vs last checkpoint",
        )?;
        self.check(v);
        let v = compare_view(
            &self.pg,
            want,
            None,
            "after the stop: primary guest view vs last checkpoint",
        )?;
        self.check(v);
        self.pg.client.close();
        self.sg.client.close();
        if let Some(pq) = self.pq.take() {
            self.primary.quit(pq)?;
        }
        if let Some(sq) = self.sq.take() {
            self.secondary.quit(sq)?;
        }
        if self.args.corrupt_secondary_for_test {
            self.corrupt_secondary()?;
        }
        let v = compare_file(
            &self.files.primary_disk,
            want,
            "after the stop: primary disk vs last checkpoint",
        )?;
        self.check(v);
        let v = compare_file(
            &self.files.secondary_disk,
            want,
            "after the stop: secondary disk vs last checkpoint",
        )?;
        self.check(v);
        self.check_images()
    }

    /// With a fault armed and guests parked: when the primary reports a
    /// replication error, checks what the fault matrix promises (primary
    /// RUNNING with the error, secondary RUNNING and clean; the primary
    /// disk and view hold every acknowledged write; the secondary guest's
    /// view is intact) and marks replication broken. True when broken.
    fn fault_check(&mut self, when: &str) -> Result<bool, DemoError> {
        if self.broken {
            return Ok(true);
        }
        let ps = self.pq()?.replication_status(names::PRIMARY_REPLICATION)?;
        if ps["error"] != true {
            return Ok(false);
        }
        self.broken = true;
        let ss = self.sq()?.replication_status(names::SECONDARY_TOP)?;
        let f = self.fault.as_ref().map_or("?", |f| f.kind.name());
        self.fault_outcome = Some(format!(
            "replication error reported by the primary {when}; no checkpoint after it"
        ));
        self.progress.phase(&format!(
            "fault {f}: the primary reports a replication error {when}; verifying, then no more checkpoints"
        ));
        self.checks += 1;
        if ps["state"] != "RUNNING" || ss["state"] != "RUNNING" || ss["error"] != false {
            self.failure_text.get_or_insert(format!(
                "fault {f} {when}: expected primary RUNNING with the error and secondary                  RUNNING without one; primary {ps}, secondary {ss}"
            ));
        }
        self.fault_verified.push(format!(
            "{when}: primary status error + RUNNING, secondary clean + RUNNING"
        ));
        self.verify_sides(when)?;
        Ok(true)
    }

    /// Guests parked: the primary disk and the primary guest's view equal
    /// its model (every acknowledged write), the secondary guest's view
    /// equals its model (last checkpoint + its own writes).
    fn verify_sides(&mut self, when: &str) -> Result<(), DemoError> {
        let pwant = std::mem::take(&mut self.pg.state.lock().model);
        let r = (|| {
            Ok::<_, DemoError>([
                compare_file(
                    &self.files.primary_disk,
                    &pwant,
                    &format!("{when}: primary disk vs every acknowledged primary write"),
                )?,
                compare_view(
                    &self.pg,
                    &pwant,
                    None,
                    &format!("{when}: primary guest view vs its model"),
                )?,
            ])
        })();
        self.pg.state.lock().model = pwant;
        for c in r? {
            self.check(c);
        }
        let swant = std::mem::take(&mut self.sg.state.lock().model);
        let r = compare_view(
            &self.sg,
            &swant,
            None,
            &format!("{when}: secondary guest view vs last checkpoint + its writes"),
        );
        self.sg.state.lock().model = swant;
        self.check(r?);
        self.fault_verified.push(format!(
            "{when}: primary disk and view = every acknowledged write; secondary guest view = last checkpoint + its writes"
        ));
        Ok(())
    }

    /// After the failover the secondary disk is the secondary guest's own
    /// disk: with a fault on it, a guest write covering a failing sector
    /// (secondary-write) or a guest flush (secondary-flush) fails with the
    /// fault's errno, and nothing of it reaches the model. That guest then
    /// stops; the final checks go on. True when `e` is that error.
    fn expected_guest_error(&mut self, e: &DemoError) -> bool {
        let Some(f) = self.fault.as_ref().filter(|f| f.kind.on_secondary_disk()) else {
            return false;
        };
        let DemoError::Nbd {
            side: "secondary",
            op,
            offset,
            len,
            source,
        } = e
        else {
            return false;
        };
        let errno_ok = source.kind()
            == match f.errno {
                FaultErrno::Eio => nbd::ErrorKind::Io,
                FaultErrno::Enospc => nbd::ErrorKind::NoSpace,
            };
        let covers = f
            .sectors
            .iter()
            .any(|s| s * 512 < offset + len && *offset < (s + 1) * 512);
        let expected = self.failover_begun
            && !self.failover_failed
            && errno_ok
            && match f.kind {
                FaultKind::SecondaryWrite => *op == "write" && covers,
                _ => *op == "flush",
            };
        if expected {
            self.checks += 1;
            self.fault_verified.push(format!(
                "after the failover the secondary guest's {op} at offset {offset} length {len} \
                 failed with {} (its disk's fault); that guest stopped",
                f.errno.name()
            ));
            self.fault_outcome.get_or_insert_with(|| {
                "hit after the failover: the secondary guest's own disk failed its I/O \
                 (the guest saw the error)"
                    .into()
            });
        }
        expected
    }

    /// link-drop: the secondary removes its NBD export (and the primary's
    /// connection with it), for good.
    fn drop_link(&mut self) -> Result<(), DemoError> {
        self.progress
            .phase("fault link-drop: the secondary removes its NBD export (hard)");
        self.sq()?.run(
            "nbd-server-remove",
            json!({"name": names::SECONDARY_DISK, "mode": "hard"}),
        )?;
        self.link_dropped = true;
        Ok(())
    }

    /// `--no-kill` after a replication error: guests stopped, both sides
    /// verified, both daemons quit, the primary disk checked once more.
    fn broken_stop(&mut self) -> Result<(), DemoError> {
        self.progress
            .phase("replication broken by the fault: stopping the guests, verifying both sides");
        self.gate.pause();
        let ps = self.pq()?.replication_status(names::PRIMARY_REPLICATION)?;
        self.checks += 1;
        if (ps["error"] != true || ps["state"] != "RUNNING") && self.failure_text.is_none() {
            self.failure_text = Some(format!(
                "at the end: the primary no longer reports the replication error: {ps}"
            ));
        }
        self.forwarded = ps["bytes-forwarded"].as_u64().unwrap_or(self.forwarded);
        self.verify_sides("at the end")?;
        self.gate.stop();
        self.reap_workers(true)?;
        self.pg.client.close();
        self.sg.client.close();
        if let Some(pq) = self.pq.take() {
            self.primary.quit(pq)?;
        }
        if let Some(sq) = self.sq.take() {
            self.secondary.quit(sq)?;
        }
        let want = std::mem::take(&mut self.pg.state.lock().model);
        let v = compare_file(
            &self.files.primary_disk,
            &want,
            "after quit: primary disk vs every acknowledged primary write",
        );
        self.pg.state.lock().model = want;
        self.check(v?);
        self.check_images()
    }

    /// The active and hidden images, closed by the daemon: qcow2 check
    /// finds no leak and no corruption.
    fn check_images(&mut self) -> Result<(), DemoError> {
        for p in [self.files.active.clone(), self.files.hidden.clone()] {
            let file = File::open(&p).map_err(|e| DemoError::io("opening", &p, e))?;
            let report = qcow_lite::Qcow2::open(file, true)
                .and_then(|img| img.check())
                .map_err(|source| DemoError::Image {
                    path: p.clone(),
                    source,
                })?;
            self.checks += 1;
            if !report.is_clean() && self.failure_text.is_none() {
                self.failure_text = Some(format!(
                    "image check of {}: {} leaks, {} corruptions ({})",
                    p.display(),
                    report.leaks,
                    report.corruptions,
                    report.messages.join("; ")
                ));
            }
        }
        Ok(())
    }

    /// Flips one byte of the secondary disk (at a seeded offset).
    fn corrupt_secondary(&mut self) -> Result<(), DemoError> {
        let p = &self.files.secondary_disk;
        let off = Rng(self.seed ^ 0xBAD).below(self.args.disk_size);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .map_err(|e| DemoError::io("opening", p, e))?;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, off)
            .map_err(|e| DemoError::io("reading", p, e))?;
        b[0] ^= 0xff;
        f.write_all_at(&b, off)
            .map_err(|e| DemoError::io("writing", p, e))?;
        eprintln!("blockrep demo: (test) corrupted the secondary disk at offset {off}");
        Ok(())
    }
}

/// Creates both raw disks with the same seeded contents (the pair starts
/// in sync, as COLO requires) and the empty active and hidden qcow2
/// images; returns the initial contents.
fn create_images(f: &Files, size: u64, seed: u64) -> Result<Vec<u8>, DemoError> {
    let mut base = vec![0u8; size as usize];
    let mut r = Rng(seed ^ 0xD15C);
    // Data in every other MiB, zeros (holes) between.
    for (i, chunk) in base.chunks_mut(1 << 20).enumerate() {
        if i % 2 == 0 {
            r.fill(chunk);
        }
    }
    for p in [&f.primary_disk, &f.secondary_disk] {
        std::fs::write(p, &base).map_err(|e| DemoError::io("writing", p, e))?;
    }
    for p in [&f.active, &f.hidden] {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(p)
            .map_err(|e| DemoError::io("creating", p, e))?;
        let img = qcow_lite::Qcow2::create(
            file,
            &qcow_lite::CreateOptions {
                size,
                ..Default::default()
            },
        )
        .map_err(|source| DemoError::Image {
            path: p.clone(),
            source,
        })?;
        img.close().map_err(|source| DemoError::Image {
            path: p.clone(),
            source,
        })?;
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("12Q")
            .unwrap_err()
            .contains("invalid size '12Q'"));
        assert!(parse_size("").is_err());
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
