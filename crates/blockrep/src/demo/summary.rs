//! The end-of-run summary: a table for people, JSON (`--json`) for tools.

use std::time::Duration;

use serde::Serialize;

use super::fault::FaultSummary;
use super::progress::human;

/// What one guest did.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct GuestSummary {
    pub(crate) writes: u64,
    pub(crate) reads: u64,
    pub(crate) flushes: u64,
    pub(crate) bytes_written: u64,
    pub(crate) bytes_read: u64,
}

/// Checkpoint pause (guests parked to checkpoints done) statistics.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct PauseSummary {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

impl PauseSummary {
    /// Nearest-rank percentiles.
    pub(crate) fn of(samples: &[Duration]) -> PauseSummary {
        if samples.is_empty() {
            return PauseSummary::default();
        }
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p / 100.0 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        PauseSummary {
            p50_ms: rank(50.0),
            p99_ms: rank(99.0),
            max_ms: v[v.len() - 1],
        }
    }
}

/// The failover, when the primary was killed.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct FailoverSummary {
    /// When the primary daemon got SIGKILL, seconds after the guests started.
    pub(crate) killed_at_s: f64,
    /// SIGKILL to the secondary's replication state DONE (commit finished).
    pub(crate) failover_ms: f64,
    /// `x-colo-lost-heartbeat` to DONE.
    pub(crate) lost_heartbeat_to_done_ms: f64,
    /// The daemon's own measure of its failover (stop with failover to DONE).
    pub(crate) daemon_failover_ms: Option<f64>,
    /// Writes of the secondary guest after the last checkpoint.
    pub(crate) secondary_writes_since_checkpoint: u64,
}

/// The first difference a verification found.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Difference {
    /// What was compared with what.
    pub(crate) what: String,
    /// First differing byte offset.
    pub(crate) offset: u64,
    /// The byte expected (the model, or the first disk).
    pub(crate) expected: u8,
    /// The byte found.
    pub(crate) found: u8,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: first difference at offset {} ({:#x}): expected {:#04x}, found {:#04x}",
            self.what, self.offset, self.offset, self.expected, self.found
        )
    }
}

/// The result of every verification.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Verification {
    /// `passed` or `failed`.
    pub(crate) result: &'static str,
    /// Checkpoints whose disks were compared (all of them).
    pub(crate) checkpoints_verified: u64,
    /// Comparisons done (whole disks, guest views, models).
    pub(crate) checks: u64,
    /// The first failure, if any.
    pub(crate) first_difference: Option<Difference>,
    /// Anything else that failed (an error reading back).
    pub(crate) error: Option<String>,
}

/// Everything the demo reports.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    pub(crate) seed: u64,
    pub(crate) mode: &'static str,
    pub(crate) duration_s: f64,
    pub(crate) elapsed_s: f64,
    pub(crate) disk_size: u64,
    pub(crate) checkpoint_interval_ms: u64,
    pub(crate) mix: String,
    pub(crate) max_io: u64,
    pub(crate) primary: GuestSummary,
    pub(crate) secondary: GuestSummary,
    pub(crate) bytes_forwarded: u64,
    pub(crate) checkpoints: u64,
    pub(crate) state_shipped_bytes: u64,
    pub(crate) checkpoint_pause: PauseSummary,
    /// The demo's own byte-for-byte check after each checkpoint (guests
    /// still parked; not part of the checkpoint pause).
    pub(crate) checkpoint_verify: PauseSummary,
    pub(crate) clusters_copied_before_write: u64,
    pub(crate) failover: Option<FailoverSummary>,
    /// The injected fault (`--fault`), absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fault: Option<FaultSummary>,
    pub(crate) verification: Verification,
    pub(crate) directory: Option<String>,
}

impl Summary {
    /// The table printed at the end of a run.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| out.push_str(&format!("  {k:<22}{v}\n"));
        let g = |s: &GuestSummary| {
            format!(
                "{} writes ({}), {} reads ({}), {} flushes",
                s.writes,
                human(s.bytes_written),
                s.reads,
                human(s.bytes_read),
                s.flushes
            )
        };
        row(
            "seed",
            format!("{} (replay: --seed {})", self.seed, self.seed),
        );
        row(
            "run",
            format!(
                "{:.1} s of guests, disk {}, checkpoint every {} ms, mix {}, I/O up to {}",
                self.duration_s,
                human(self.disk_size),
                self.checkpoint_interval_ms,
                self.mix,
                human(self.max_io)
            ),
        );
        row("primary guest", g(&self.primary));
        row("secondary guest", g(&self.secondary));
        row(
            "bytes forwarded",
            format!(
                "{} (primary to secondary over NBD)",
                human(self.bytes_forwarded)
            ),
        );
        row(
            "checkpoints",
            format!(
                "{} (guest state shipped: {})",
                self.checkpoints,
                human(self.state_shipped_bytes)
            ),
        );
        row(
            "checkpoint pause",
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                self.checkpoint_pause.p50_ms,
                self.checkpoint_pause.p99_ms,
                self.checkpoint_pause.max_ms
            ),
        );
        row(
            "verify per checkpoint",
            format!(
                "p50 {:.2} ms, max {:.2} ms (the demo's full-disk comparison, guests parked)",
                self.checkpoint_verify.p50_ms, self.checkpoint_verify.max_ms
            ),
        );
        row(
            "copied before write",
            format!(
                "{} clusters (secondary disk to hidden disk)",
                self.clusters_copied_before_write
            ),
        );
        match &self.failover {
            Some(f) => row(
                "failover",
                format!(
                    "primary killed (SIGKILL) at {:.2} s; secondary took over in {:.1} ms \
                     (lost-heartbeat to commit done {:.1} ms{})",
                    f.killed_at_s,
                    f.failover_ms,
                    f.lost_heartbeat_to_done_ms,
                    f.daemon_failover_ms
                        .map(|d| format!(", daemon's commit {d:.1} ms"))
                        .unwrap_or_default()
                ),
            ),
            None if self.fault.as_ref().is_some_and(|f| f.broken) => row(
                "failover",
                "none (--no-kill: replication broken by the fault; both daemons quit)".into(),
            ),
            None => row(
                "failover",
                "none (--no-kill: replication stopped cleanly on both)".into(),
            ),
        }
        if let Some(f) = &self.fault {
            row(
                "fault",
                format!(
                    "{}{}{}",
                    f.kind_name(),
                    f.errno
                        .map(|e| format!(" {}", e.name()))
                        .unwrap_or_default(),
                    if f.sectors.is_empty() {
                        String::new()
                    } else {
                        format!(" on writes covering sectors {:?}", f.sectors)
                    }
                ),
            );
            row("fault outcome", f.outcome.clone());
            for v in &f.verified {
                row("fault verified", v.clone());
            }
        }
        let v = &self.verification;
        let verdict = if v.result == "passed" {
            format!(
                "PASSED ({} checks; every one of {} checkpoints left both disks identical{})",
                v.checks,
                v.checkpoints_verified,
                match (&self.failover, &self.fault) {
                    (Some(f), Some(fs)) if fs.failover_failed => format!(
                        "; failover failed as the fault matrix says, secondary guest view = \
                         last checkpoint + {} secondary guest writes",
                        f.secondary_writes_since_checkpoint
                    ),
                    (Some(f), _) => format!(
                        "; secondary disk = last checkpoint + {} secondary guest writes",
                        f.secondary_writes_since_checkpoint
                    ),
                    (None, Some(fs)) if fs.broken => {
                        "; primary disk = every acknowledged primary write, \
                         secondary guest view = last checkpoint + its writes"
                            .into()
                    }
                    (None, _) => "; both disks equal the last checkpoint".into(),
                }
            )
        } else if let Some(d) = &v.first_difference {
            format!("FAILED: {d}")
        } else {
            format!("FAILED: {}", v.error.as_deref().unwrap_or("unknown"))
        };
        row("verification", verdict);
        if let Some(d) = &self.directory {
            row("directory", d.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        let p = PauseSummary::of(&ms(&[5, 1, 4, 2, 3]));
        assert_eq!((p.p50_ms, p.p99_ms, p.max_ms), (3.0, 5.0, 5.0));
        let v: Vec<u64> = (1..=200).collect();
        let p = PauseSummary::of(&ms(&v));
        assert_eq!((p.p50_ms, p.p99_ms, p.max_ms), (100.0, 198.0, 200.0));
        let p = PauseSummary::of(&[]);
        assert_eq!(p.max_ms, 0.0);
    }

    #[test]
    fn difference_names_offset_and_both_values() {
        let d = Difference {
            what: "secondary disk vs model".into(),
            offset: 4097,
            expected: 0xab,
            found: 0x01,
        };
        assert_eq!(
            d.to_string(),
            "secondary disk vs model: first difference at offset 4097 (0x1001): expected 0xab, found 0x01"
        );
    }
}
