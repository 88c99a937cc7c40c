//! Figure 4, replication overhead.
//!
//! * Primary: a guest (our release-built NBD writer, `blockrep img bench
//!   --latency`, one process per run) writes through the primary daemon's
//!   export of the guest-visible quorum node. "With": the replication(primary)
//!   node over an NBD client to a secondary daemon is a second quorum child
//!   and replication is started (every write is forwarded over loopback NBD
//!   and waited for). "Without": the same daemon, same quorum over the same
//!   local disk, with the replication child removed (as before COLO starts).
//!   The two alternate on the same daemons, attaching and detaching the
//!   replication child between runs (not timed).
//! * Secondary: rewrites of already-copied clusters on the secondary disk
//!   (exported over NBD as the primary's forwarded writes reach it) with a
//!   backup sync=none job into a hidden disk running (one untimed pass
//!   copies every cluster first), vs the same two passes with no job.
//!
//! Throughput and latency come from the writer itself (its time runs from
//! the first request to the end of the final flush; connecting and closing
//! are outside), p99 is per request.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{show, wait_nbd, Harness, Missing, Qmp, Row, Servers, KIB, MIB};

/// Figure name of the primary rows (its target is 0.8).
pub(super) const PRIMARY: &str =
    "4. Replication overhead, primary (peer: same daemon, no replication)";
/// Figure name of the secondary rows (its target is 0.9).
pub(super) const SECONDARY: &str =
    "4. Replication overhead, secondary rewrites (peer: same daemon, no backup job)";

/// Method of the primary rows, printed under the figure's heading.
pub(super) const PRIMARY_INTRO: &str = "The guest is `blockrep img bench -w --latency` (release \
build, our NBD client) writing to the primary daemon's NBD export (unix socket) of the \
guest-visible quorum node over a pre-filled local qcow2 disk. Ours (\"with\"): a \
replication(primary) node over an NBD client to a secondary daemon (replication running, \
secondary disk pre-filled, over loopback unix-socket NBD) is the quorum's second child, so \
every write is forwarded and waited for. Peer (\"without\"): the same daemon, same quorum over \
the same local disk, the replication child detached (`xen-set-replication` off, \
`x-blockdev-change` child removed, `blockdev-del`): the state before COLO starts. Runs \
alternate on the same daemons; attaching and detaching are not timed. Throughput and p99 \
are the writer's own: from the first request to the end of its final flush, and the p99 of \
its per-request latencies (nearest rank). Each quorum configuration has its own primary \
daemon with the quorum's default, `x-parallel-writes: true` (children written at once, as \
QEMU's quorum does). Target: ratio >= 0.8.";

/// Method of the secondary rows, printed under the figure's heading.
pub(super) const SECONDARY_INTRO: &str = "The secondary disk (pre-filled qcow2) exported by a \
daemon over NBD (unix socket), where the primary's forwarded writes arrive. Ours: a backup \
sync=none job (`blockdev-backup`, as replication's secondary starts) into a fresh hidden \
qcow2 backed by the secondary disk; one untimed pass writes every cluster of the region \
(each first write copies it into the hidden disk), then the timed pass rewrites them \
(already copied: no copy). Peer: the same two passes with no job. Writer and timing as \
above. Target: ratio >= 0.9.";

/// One writer run: (seconds through the final flush, p99 latency in µs).
fn run_writer(cmd: &mut Command) -> Result<(f64, f64), String> {
    let o = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}{}",
            show(cmd),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("{}: no JSON line in its output: {text}", show(cmd)))?;
    let v: Value = serde_json::from_str(line).map_err(|e| format!("writer JSON '{line}': {e}"))?;
    let secs = v["seconds"]
        .as_f64()
        .ok_or_else(|| format!("writer JSON without seconds: {line}"))?;
    let p99 = v["latency-us"]["p99"]
        .as_f64()
        .ok_or_else(|| format!("writer JSON without latency-us.p99: {line}"))?;
    Ok((secs, p99))
}

/// A side of a latency row: prepares (untimed) and returns the writer command.
type LatSide<'a> = dyn FnMut() -> Result<Command, String> + 'a;

impl Harness {
    /// The guest-side writer: `count` sequential `bs` writes at depth `depth`.
    fn writer(&self, uri: &str, bs: u64, depth: u64, count: u64, pattern: u8) -> Command {
        let mut c = self.ours_img();
        c.args(["bench", "-q", "-f", "raw", "-w", "--latency"])
            .arg(format!("--pattern={pattern}"))
            .arg("-d")
            .arg(depth.to_string())
            .arg("-c")
            .arg(count.to_string())
            .arg("-s")
            .arg(bs.to_string())
            .arg(uri);
        c
    }

    /// Like `alternate`, but times with the writer's own figures and keeps
    /// each run's p99.
    fn alternate_lat(
        &self,
        figure: &'static str,
        name: String,
        bytes: u64,
        ours: &mut LatSide<'_>,
        peer: &mut LatSide<'_>,
    ) -> Result<Row, String> {
        eprintln!("xtask bench: {figure}: {name}");
        let (mut o, mut p, mut ol, mut pl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut ours_cmd, mut peer_cmd) = (String::new(), String::new());
        for rep in 0..=self.reps {
            let mut c = ours()?;
            ours_cmd = show(&c);
            let (to, lo) = run_writer(&mut c)?;
            let mut c = peer()?;
            peer_cmd = show(&c);
            let (tp, lp) = run_writer(&mut c)?;
            if rep > 0 {
                o.push(to);
                p.push(tp);
                ol.push(lo);
                pl.push(lp);
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
            p99: Some((ol, pl)),
        })
    }

    /// Figure 4 (both parts).
    pub(super) fn overhead(&self, rows: &mut Vec<Row>) -> Result<(), String> {
        let r = self.overhead_primary(rows);
        let s = self.overhead_secondary(rows);
        r.and(s)
    }

    fn overhead_primary(&self, rows: &mut Vec<Row>) -> Result<(), String> {
        let size = if self.quick { 32 * MIB } else { 256 * MIB };
        let dir = self.work.join("overhead");
        let _ = std::fs::remove_dir_all(&dir);
        let (mut sec, sec_uri, _guest) = self.start_secondary(&dir.join("sec"), size, true)?;
        let mut result = Ok(());
        // The quorum's default: children written at once (x-parallel-writes,
        // as QEMU's quorum); `false` (one after another) is not measured.
        for parallel in [true] {
            result = self.overhead_primary_with(rows, &dir, size, &mut sec, &sec_uri, parallel);
            if let Err(e) = &result {
                if parallel && e.contains("'x-parallel-writes' is unexpected") {
                    // The daemon's QMP schema does not take the option (yet).
                    self.missing.borrow_mut().push(Missing {
                        figure: "4. Replication overhead",
                        what: "primary with quorum x-parallel-writes=true".into(),
                        why: "not measurable through `blockrep serve`: its QMP schema \
                              refuses quorum's `x-parallel-writes` (block-graph's quorum \
                              has it, off by default)"
                            .into(),
                    });
                    result = Ok(());
                }
                break;
            }
        }
        sec.stop();
        result
    }

    /// The primary rows for one quorum configuration, against the running
    /// secondary `sec`.
    fn overhead_primary_with(
        &self,
        rows: &mut Vec<Row>,
        dir: &Path,
        size: u64,
        sec: &mut Servers,
        sec_uri: &str,
        parallel: bool,
    ) -> Result<(), String> {
        let sec_sock = sec_uri
            .split_once("socket=")
            .map(|(_, s)| s.to_string())
            .ok_or("no socket in the secondary's URI")?;
        let tag = if parallel { "par" } else { "ser" };
        let pri_img = dir.join(format!("pri-{tag}.qcow2"));
        self.prefilled(&pri_img, size)?;
        let qmp_path = dir.join(format!("pri-{tag}.qmp"));
        let mut pri = self.spawn_serve(&qmp_path, &dir.join(format!("pri-{tag}.log")))?;
        let sock = dir.join(format!("pri-{tag}-nbd.sock"));
        let uri = format!("nbd+unix:///disk0?socket={}", sock.display());
        let setup = (|| {
            let mut q = Qmp::connect(&qmp_path)?;
            q.ok(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": "local",
                       "file": {"driver": "file", "filename": pri_img}}),
            )?;
            let mut quorum = json!({"driver": "quorum", "node-name": "colo-disk0",
                                    "vote-threshold": 1, "read-pattern": "fifo",
                                    "children": ["local"]});
            if parallel {
                quorum["x-parallel-writes"] = json!(true);
            }
            q.ok("blockdev-add", quorum)?;
            q.ok(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": sock}}}),
            )?;
            q.ok(
                "nbd-server-add",
                json!({"device": "colo-disk0", "name": "disk0", "writable": true}),
            )?;
            wait_nbd(&uri)?;
            Ok::<Qmp, String>(q)
        })();
        let q = match setup {
            Ok(q) => RefCell::new(q),
            Err(e) => {
                pri.stop();
                return Err(e);
            }
        };
        let sec_q = RefCell::new(sec.qmp.take());
        let attached = Cell::new(false);
        // Bytes the primary had forwarded when the current "with" run began,
        // and the run's size.
        let forwarded_at = Cell::new(None::<(u64, u64)>);
        let forwarded = |q: &mut Qmp| -> Result<u64, String> {
            let st = q.ok("x-blockrep-query-replication", json!({"node-name": "rep0"}))?;
            st[0]["bytes-forwarded"]
                .as_u64()
                .ok_or_else(|| format!("no bytes-forwarded in {st}"))
        };
        let detach = || -> Result<(), String> {
            if !attached.get() {
                return Ok(());
            }
            let mut q = q.borrow_mut();
            // The run must really have gone through replication.
            if let Some((before, want)) = forwarded_at.take() {
                let now = forwarded(&mut q)?;
                if now < before + want {
                    return Err(format!(
                        "the primary forwarded {} bytes during a run of {want}",
                        now - before
                    ));
                }
            }
            q.ok(
                "xen-set-replication",
                json!({"enable": false, "primary": true}),
            )?;
            q.ok(
                "x-blockdev-change",
                json!({"parent": "colo-disk0", "child": "children.1"}),
            )?;
            q.ok("blockdev-del", json!({"node-name": "rep0"}))?;
            attached.set(false);
            Ok(())
        };
        let attach = |checkpoint: bool, bytes: u64| -> Result<(), String> {
            detach()?;
            let mut q = q.borrow_mut();
            q.ok(
                "blockdev-add",
                json!({"driver": "replication", "node-name": "rep0", "mode": "primary",
                       "file": {"driver": "nbd", "export": "sec",
                                "server": {"type": "unix", "path": sec_sock},
                                "reconnect-delay": 0}}),
            )?;
            q.ok(
                "x-blockdev-change",
                json!({"parent": "colo-disk0", "node": "rep0"}),
            )?;
            q.ok(
                "xen-set-replication",
                json!({"enable": true, "primary": true}),
            )?;
            attached.set(true);
            if checkpoint {
                q.ok("xen-colo-do-checkpoint", json!({}))?;
                let mut sq = sec_q.borrow_mut();
                let sq = sq.as_mut().ok_or("no secondary QMP")?;
                sq.ok("xen-colo-do-checkpoint", json!({}))?;
            }
            forwarded_at.set(Some((forwarded(&mut q)?, bytes)));
            Ok(())
        };
        // (request size, depth, checkpoint before each replicated run)
        let cases: &[(u64, u64, bool)] = if self.quick {
            &[(64 * KIB, 1, false), (64 * KIB, 16, false)]
        } else {
            &[
                (64 * KIB, 1, false),
                (64 * KIB, 16, false),
                (4 * KIB, 1, false),
                (64 * KIB, 1, true),
            ]
        };
        let result = (|| {
            for &(bs, depth, ckpt) in cases {
                // 4 KiB rows write a quarter of the disk (4 KiB requests cost
                // per request, not per byte).
                let region = if bs < 64 * KIB { size / 4 } else { size };
                let count = region / bs;
                let mut ours = || {
                    attach(ckpt, count * bs)?;
                    Ok(self.writer(&uri, bs, depth, count, 0x41))
                };
                let mut peer = || {
                    detach()?;
                    Ok(self.writer(&uri, bs, depth, count, 0x42))
                };
                let name = format!(
                    "quorum {}, {} KiB seq writes, -d {depth}, {} MiB, {}",
                    if parallel {
                        "default (x-parallel-writes=true)"
                    } else {
                        "x-parallel-writes=false"
                    },
                    bs / KIB,
                    region / MIB,
                    if ckpt {
                        "checkpoint before each replicated run (each forwarded write \
                         copies a cluster on the secondary)"
                    } else {
                        "secondary clusters already copied since the last checkpoint"
                    }
                );
                rows.push(self.alternate_lat(PRIMARY, name, count * bs, &mut ours, &mut peer)?);
            }
            detach()
        })();
        drop(q);
        sec.qmp = sec_q.into_inner();
        pri.stop();
        let _ = std::fs::remove_file(&pri_img);
        result
    }

    fn overhead_secondary(&self, rows: &mut Vec<Row>) -> Result<(), String> {
        let size = if self.quick { 32 * MIB } else { 256 * MIB };
        let dir = self.work.join("rewrite");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (mut servers, q, uri) = self.serve_prefilled(&dir, size, "sec-disk", "sec")?;
        let q = RefCell::new(q);
        let hidden = dir.join("hidden.qcow2");
        let job_up = Cell::new(false);
        let stop_job = || -> Result<(), String> {
            if !job_up.get() {
                return Ok(());
            }
            let mut q = q.borrow_mut();
            let jobs = q.ok("query-block-jobs", json!({}))?;
            if !jobs
                .as_array()
                .is_some_and(|a| a.iter().any(|j| j["device"] == json!("rw")))
            {
                return Err(format!("the backup job was gone after the run: {jobs}"));
            }
            q.ok("block-job-cancel", json!({"device": "rw", "force": true}))?;
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
            Ok(())
        };
        let cases: &[(u64, u64)] = if self.quick {
            &[(64 * KIB, 1), (64 * KIB, 16)]
        } else {
            &[(64 * KIB, 1), (64 * KIB, 16), (4 * KIB, 1)]
        };
        let result = (|| {
            for &(bs, depth) in cases {
                let region = if bs < 64 * KIB { size / 4 } else { size };
                let count = region / bs;
                let first_pass = |pattern: u8| {
                    let mut c = self.writer(&uri, bs, depth, count, pattern);
                    run_writer(&mut c).map(|_| ())
                };
                let mut ours = || {
                    stop_job()?;
                    self.start_backup(&mut q.borrow_mut(), &hidden, size, "sec-disk", "rw")?;
                    job_up.set(true);
                    // Untimed: every cluster of the region is copied once.
                    first_pass(0x51)?;
                    Ok(self.writer(&uri, bs, depth, count, 0x52))
                };
                let mut peer = || {
                    stop_job()?;
                    first_pass(0x53)?;
                    Ok(self.writer(&uri, bs, depth, count, 0x54))
                };
                let name = format!(
                    "{} KiB rewrites over NBD (unix), -d {depth}, {} MiB, with backup \
                     sync=none (clusters already copied) vs without",
                    bs / KIB,
                    region / MIB
                );
                rows.push(self.alternate_lat(SECONDARY, name, count * bs, &mut ours, &mut peer)?);
            }
            stop_job()
        })();
        drop(q);
        servers.stop();
        result
    }
}
