//! Fault injection for `blockrep demo --fault KIND`: a `blkdebug` node put
//! into one of the graphs (or the secondary's NBD export dropped), and what
//! the run then expects, from the fault matrix of `docs/reliability.md`
//! (`crates/reliability-tests/tests/fault_matrix.expected`):
//!
//! * a failed forwarded write or flush (on the NBD link, or on the secondary
//!   disk under the secondary's NBD export), or the link dropped for good:
//!   the primary guest sees no error, the primary's status reports the error
//!   (state stays RUNNING), the secondary's status stays clean, the primary
//!   disk holds every acknowledged write and the secondary guest's view is
//!   untouched (last checkpoint plus its own writes). No checkpoint is taken
//!   after it (the disks differ; the caller must check the status first).
//! * a write or flush fault on the secondary disk that hits the failover
//!   commit: FAILOVER_FAILED with the error on the secondary, whose guest
//!   view stays the last checkpoint plus its own writes.
//!
//! The moment comes from the workload: a write fault fails every write
//! covering one of a few seeded 512-byte sectors (blkdebug `sector`) in the
//! hot eighth of the disk where half the guests' I/O goes, so it first fires
//! when a write happens to cover one (possibly never); a flush fault fails
//! every flush from the first forwarded one on; the link drop happens at a
//! seeded moment.

use serde::Serialize;
use serde_json::{json, Value};

/// Where and what to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Forwarded writes fail on the primary's NBD link (blkdebug over the
    /// NBD client under the replication filter).
    LinkWrite,
    /// Forwarded flushes fail on the primary's NBD link.
    LinkFlush,
    /// Writes to the secondary disk fail (blkdebug over its file): the
    /// primary's forwarded writes, or the failover commit.
    SecondaryWrite,
    /// Flushes of the secondary disk fail: the primary's forwarded flushes,
    /// or the failover commit's.
    SecondaryFlush,
    /// The secondary drops the NBD connection for good (`nbd-server-remove
    /// mode=hard`; the primary's client has `reconnect-delay` 0).
    LinkDrop,
}

impl FaultKind {
    /// The kebab-case name (as on the command line).
    pub(crate) fn name(self) -> &'static str {
        match self {
            FaultKind::LinkWrite => "link-write",
            FaultKind::LinkFlush => "link-flush",
            FaultKind::SecondaryWrite => "secondary-write",
            FaultKind::SecondaryFlush => "secondary-flush",
            FaultKind::LinkDrop => "link-drop",
        }
    }

    /// Write faults (the others fail flushes, or drop the link).
    pub(crate) fn is_write(self) -> bool {
        matches!(self, FaultKind::LinkWrite | FaultKind::SecondaryWrite)
    }

    /// Faults on the secondary disk (which the failover commit writes).
    pub(crate) fn on_secondary_disk(self) -> bool {
        matches!(self, FaultKind::SecondaryWrite | FaultKind::SecondaryFlush)
    }

    fn event(self) -> Option<&'static str> {
        match self {
            FaultKind::LinkWrite | FaultKind::SecondaryWrite => Some("write_aio"),
            FaultKind::LinkFlush | FaultKind::SecondaryFlush => Some("flush_to_disk"),
            FaultKind::LinkDrop => None,
        }
    }
}

/// The errno a blkdebug fault fails requests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum FaultErrno {
    /// errno 5.
    #[value(name = "EIO")]
    #[serde(rename = "EIO")]
    Eio,
    /// errno 28.
    #[value(name = "ENOSPC")]
    #[serde(rename = "ENOSPC")]
    Enospc,
}

impl FaultErrno {
    /// The errno number (the schema takes an integer).
    fn number(self) -> i32 {
        match self {
            FaultErrno::Eio => libc::EIO,
            FaultErrno::Enospc => libc::ENOSPC,
        }
    }

    /// `EIO` or `ENOSPC`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            FaultErrno::Eio => "EIO",
            FaultErrno::Enospc => "ENOSPC",
        }
    }
}

/// A fault of one run.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    pub(crate) kind: FaultKind,
    pub(crate) errno: FaultErrno,
    /// Write faults: the sectors (512-byte units) whose writes fail.
    pub(crate) sectors: Vec<u64>,
}

impl Fault {
    /// `{"driver": "blkdebug", ...}` over `image`, when this fault is a
    /// blkdebug rule on `place`; `image` unchanged otherwise.
    pub(crate) fn wrap(this: Option<&Fault>, place: Place, image: Value) -> Value {
        let Some(f) = this else { return image };
        let on = match f.kind {
            FaultKind::LinkWrite | FaultKind::LinkFlush => Place::Link,
            FaultKind::SecondaryWrite | FaultKind::SecondaryFlush => Place::SecondaryDisk,
            FaultKind::LinkDrop => return image,
        };
        let Some(event) = f.kind.event().filter(|_| on == place) else {
            return image;
        };
        let rules: Vec<Value> = if f.kind.is_write() {
            f.sectors
                .iter()
                .map(|s| json!({"event": event, "errno": f.errno.number(), "sector": s}))
                .collect()
        } else {
            vec![json!({"event": event, "errno": f.errno.number()})]
        };
        json!({
            "driver": "blkdebug",
            "node-name": format!("fault-{}", f.kind.name()),
            "image": image,
            "inject-error": rules,
        })
    }

    /// One line for the summary.
    pub(crate) fn describe(&self) -> String {
        match self.kind {
            FaultKind::LinkDrop => "link-drop (secondary removes its NBD export, hard)".into(),
            k if k.is_write() => format!(
                "{} {}: writes covering sector{} {:?} fail",
                k.name(),
                self.errno.name(),
                if self.sectors.len() == 1 { "" } else { "s" },
                self.sectors
            ),
            k => format!("{} {}: every flush fails", k.name(), self.errno.name()),
        }
    }
}

/// Where a blkdebug node can go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Between the primary's replication filter and its NBD client.
    Link,
    /// Between the secondary disk (raw) and its file.
    SecondaryDisk,
}

/// What the fault did, for the summary.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FaultSummary {
    pub(crate) kind: FaultKind,
    pub(crate) errno: Option<FaultErrno>,
    /// Write faults: the failing sectors.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) sectors: Vec<u64>,
    /// `not hit`, `replication error at checkpoint N`, `failover failed`.
    pub(crate) outcome: String,
    /// What was verified about it.
    pub(crate) verified: Vec<String>,
    /// The primary reported a replication error (no checkpoint after it).
    pub(crate) broken: bool,
    /// The failover ended in FAILOVER_FAILED.
    pub(crate) failover_failed: bool,
}

impl FaultSummary {
    /// The kind's command-line name.
    pub(crate) fn kind_name(&self) -> &'static str {
        self.kind.name()
    }
}
