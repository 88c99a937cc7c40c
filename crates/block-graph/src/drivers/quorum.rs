//! `quorum`: N children, writes go to every child and succeed when at least
//! `vote-threshold` children succeed; reads with `read-pattern` `quorum` compare
//! the children and return the version at least `vote-threshold` agree on
//! (reporting the children that differ), or with `fifo` take the first child
//! that answers. Children can be added and removed at run time
//! (`Graph::blockdev_change_add` / `blockdev_change_del`, QEMU's
//! `x-blockdev-change`); removal below the threshold is refused.
//!
//! Unlike QEMU, overlapping writes in flight at the same time reach every child
//! in the same order: writes, write-zeroes and discards on a quorum node are
//! serialising requests, and each is applied to the children one after another.
//!
//! Options: `children` (list of definitions or node names), `vote-threshold`
//! (required, 1..=N), `read-pattern` (`quorum` default, `fifo`),
//! `rewrite-corrupted` (bool, `quorum` pattern only: write the winning version
//! back to children that differed), `blkverify` (only false), and our
//! `x-parallel-writes` (bool, default true, as QEMU's quorum issues its
//! children's writes together): write to all children at once (the child
//! that has been slowest lately on the calling thread, the others on
//! long-lived helper threads), so a
//! slow child (the primary's NBD link to the secondary) costs its own
//! latency, not the sum; `false` writes them one after another. The
//! one-order guarantee holds either way because overlapping writes are
//! serialised in the quorum node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fanout;
use crate::driver::{Driver, Role, WriteFlags, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};
use crate::graph::{GraphEvent, OpenContext};
use crate::node::{NestedScope, Node, NodeRef};
use parking_lot::Mutex;

/// What a [`QuorumReport`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuorumReportKind {
    /// A child failed a request (QEMU's `QUORUM_REPORT_BAD` with an error).
    ChildError,
    /// A child returned data different from the winning version (`QUORUM_REPORT_BAD`).
    Mismatch,
    /// Not enough children agreed or succeeded (`QUORUM_FAILURE`).
    Failure,
}

/// One report (QEMU emits these as events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuorumReport {
    /// What happened.
    pub kind: QuorumReportKind,
    /// The child's node name (None for failures of the whole quorum).
    pub child: Option<String>,
    /// Request offset.
    pub offset: u64,
    /// Request length.
    pub len: u64,
    /// The error message, if any.
    pub error: Option<String>,
}

/// A child request run on a fan-out thread: owns what it needs.
type RemoteOp = Arc<dyn Fn(&NodeRef) -> Result<()> + Send + Sync>;

/// The `quorum` driver.
pub struct Quorum {
    threshold: usize,
    fifo: bool,
    rewrite: bool,
    parallel: bool,
    reports: Mutex<Vec<QuorumReport>>,
    /// Recent request latency per child (node name, ns), for [`Quorum::fan_out`].
    latency: Mutex<Vec<(String, u64)>>,
}

fn kids(node: &Node) -> Vec<NodeRef> {
    let mut v: Vec<(u32, NodeRef)> = node
        .children()
        .into_iter()
        .filter_map(|(r, n)| match r {
            Role::Child(i) => Some((i, n)),
            _ => None,
        })
        .collect();
    v.sort_by_key(|(i, _)| *i);
    v.into_iter().map(|(_, n)| n).collect()
}

impl Quorum {
    /// Opens from options (see the module docs).
    pub fn open(ctx: &mut OpenContext<'_>) -> Result<Box<dyn Driver>> {
        let children = ctx.open_child_list("children")?;
        let o = ctx.options();
        let threshold = o.require_u64("vote-threshold")?;
        if threshold < 1 || threshold > children.len() as u64 {
            return Err(Error::invalid(format!(
                "driver 'quorum': option 'vote-threshold' must be between 1 and the number of children ({}), got {threshold}",
                children.len()
            )));
        }
        let fifo = o.take_enum("read-pattern", &["quorum", "fifo"])?.as_deref() == Some("fifo");
        let rewrite = o.take_bool("rewrite-corrupted")?.unwrap_or(false);
        let parallel = o.take_bool("x-parallel-writes")?.unwrap_or(true);
        if rewrite && fifo {
            return Err(Error::invalid(
                "driver 'quorum': 'rewrite-corrupted' needs read-pattern 'quorum'",
            ));
        }
        if o.take_bool("blkverify")?.unwrap_or(false) {
            return Err(Error::not_supported(
                "driver 'quorum': 'blkverify' is not supported",
            ));
        }
        let len = children[0].len();
        if let Some(c) = children.iter().find(|c| c.len() != len) {
            return Err(Error::invalid(format!(
                "driver 'quorum': children differ in length ('{}' has {}, '{}' has {len})",
                c.name(),
                c.len(),
                children[0].name()
            )));
        }
        Ok(Box::new(Quorum {
            threshold: threshold as usize,
            fifo,
            rewrite,
            parallel,
            reports: Mutex::new(Vec::new()),
            latency: Mutex::new(Vec::new()),
        }))
    }

    /// The vote threshold.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Reports so far (oldest first).
    pub fn reports(&self) -> Vec<QuorumReport> {
        self.reports.lock().clone()
    }

    /// Returns and clears the reports.
    pub fn take_reports(&self) -> Vec<QuorumReport> {
        std::mem::take(&mut *self.reports.lock())
    }

    fn report(
        &self,
        node: &Node,
        kind: QuorumReportKind,
        child: Option<&str>,
        offset: u64,
        len: u64,
        err: Option<&Error>,
    ) {
        let rep = QuorumReport {
            kind,
            child: child.map(str::to_string),
            offset,
            len,
            error: err.map(|e| e.to_string()),
        };
        if let Some(g) = node.graph() {
            g.emit(match kind {
                QuorumReportKind::Failure => GraphEvent::QuorumFailure {
                    node: node.name().to_string(),
                    offset,
                    len,
                },
                _ => GraphEvent::QuorumReportBad {
                    node: node.name().to_string(),
                    child: rep.child.clone().unwrap_or_default(),
                    offset,
                    len,
                    error: rep.error.clone(),
                },
            });
        }
        let mut r = self.reports.lock();
        if r.len() >= 1024 {
            r.remove(0);
        }
        r.push(rep);
    }

    /// Runs the request on every child; succeeds if at least threshold do.
    /// `op` serves one child on the calling thread (and every child when
    /// they are written one after another); with `x-parallel-writes` the
    /// others get `remote()`, an owned copy of the request, on the fan-out
    /// helper threads, all at once.
    fn all(
        &self,
        node: &Node,
        what: &str,
        offset: u64,
        len: u64,
        op: impl Fn(&NodeRef) -> Result<()>,
        remote: impl FnOnce() -> RemoteOp,
    ) -> Result<()> {
        let kids = kids(node);
        let results: Vec<Result<()>> = if self.parallel && kids.len() > 1 {
            self.fan_out(&kids, op, remote())
        } else {
            kids.iter().map(op).collect()
        };
        let mut ok = 0;
        let mut errors: Vec<(String, Error)> = Vec::new();
        for (k, r) in kids.iter().zip(results) {
            match r {
                Ok(()) => ok += 1,
                Err(e) => errors.push((k.name().to_string(), e)),
            }
        }
        if ok >= self.threshold {
            for (name, e) in &errors {
                self.report(
                    node,
                    QuorumReportKind::ChildError,
                    Some(name),
                    offset,
                    len,
                    Some(e),
                );
            }
            return Ok(());
        }
        let kind = errors
            .first()
            .map(|(_, e)| e.kind())
            .unwrap_or(ErrorKind::Io);
        let detail: Vec<String> = errors.iter().map(|(_, e)| e.to_string()).collect();
        let err = Error::new(
            kind,
            format!(
                "quorum {what}: only {ok} of {} children succeeded (vote-threshold {}): {}",
                kids.len(),
                self.threshold,
                detail.join("; ")
            ),
        )
        .with_node(node.name());
        self.report(
            node,
            QuorumReportKind::Failure,
            None,
            offset,
            len,
            Some(&err),
        );
        Err(err)
    }
}

impl Quorum {
    /// One request on every child at once. The child that has been slowest
    /// lately runs on the calling thread: the others have usually answered
    /// by the time it returns, so the caller rarely sleeps waiting for a
    /// helper (on the primary that child is the NBD link to the secondary).
    fn fan_out(
        &self,
        kids: &[NodeRef],
        op: impl Fn(&NodeRef) -> Result<()>,
        rop: RemoteOp,
    ) -> Vec<Result<()>> {
        let inline = self.slowest(kids);
        let done = Arc::new(Collect::new(kids.len()));
        for (i, k) in kids.iter().enumerate() {
            if i == inline {
                continue;
            }
            let (k, rop, done2) = (k.clone(), rop.clone(), done.clone());
            let job = Box::new(move || {
                // Part of the quorum request already admitted.
                let _n = NestedScope::enter();
                let t = Instant::now();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rop(&k)))
                    .unwrap_or_else(|_| {
                        Err(Error::new(ErrorKind::Io, "quorum child request panicked"))
                    });
                done2.put(i, r, t.elapsed());
            });
            if let Err(e) = fanout::run(job) {
                done.put(
                    i,
                    Err(Error::new(
                        ErrorKind::Io,
                        format!("cannot start a thread for the quorum child request: {e}"),
                    )),
                    Duration::ZERO,
                );
            }
        }
        let t = Instant::now();
        let first = op(&kids[inline]);
        done.put(inline, first, t.elapsed());
        let (results, took) = done.wait();
        self.note_latencies(kids, &took);
        results
    }

    /// Index of the child with the highest recent request latency (0 if
    /// none is known).
    fn slowest(&self, kids: &[NodeRef]) -> usize {
        let lat = self.latency.lock();
        let mut best = (0, 0u64);
        for (i, k) in kids.iter().enumerate() {
            if let Some((_, l)) = lat.iter().find(|(n, _)| n == k.name()) {
                if *l > best.1 {
                    best = (i, *l);
                }
            }
        }
        best.0
    }

    /// Folds this request's per-child times into the moving averages
    /// (weight 1/8), dropping children no longer attached.
    fn note_latencies(&self, kids: &[NodeRef], took: &[Duration]) {
        let mut lat = self.latency.lock();
        lat.retain(|(n, _)| kids.iter().any(|k| k.name() == n));
        for (k, t) in kids.iter().zip(took) {
            let ns = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
            match lat.iter_mut().find(|(n, _)| n == k.name()) {
                Some((_, l)) => *l = *l - *l / 8 + ns / 8,
                None => lat.push((k.name().to_string(), ns)),
            }
        }
    }
}

/// Per child: its result and how long it took; and how many have answered.
type Answers = (Vec<Option<Result<()>>>, Vec<Duration>, usize);

/// The answers of one fanned-out request, filled in by whichever thread ran
/// each child.
struct Collect {
    state: std::sync::Mutex<Answers>,
    cv: std::sync::Condvar,
}

impl Collect {
    fn new(n: usize) -> Collect {
        Collect {
            state: std::sync::Mutex::new((
                (0..n).map(|_| None).collect(),
                vec![Duration::ZERO; n],
                0,
            )),
            cv: std::sync::Condvar::new(),
        }
    }

    fn put(&self, i: usize, r: Result<()>, took: Duration) {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.0[i] = Some(r);
        st.1[i] = took;
        st.2 += 1;
        drop(st);
        self.cv.notify_one();
    }

    /// Waits until every child has answered (a job that could not start
    /// answered at dispatch; a job that ran always answers, panics caught).
    fn wait(&self) -> (Vec<Result<()>>, Vec<Duration>) {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while st.2 < st.0.len() {
            st = self
                .cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        let results = std::mem::take(&mut st.0)
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(Error::new(ErrorKind::Io, "quorum child request lost")))
            })
            .collect();
        (results, std::mem::take(&mut st.1))
    }
}

impl Driver for Quorum {
    fn format_name(&self) -> &str {
        "quorum"
    }

    fn length(&self, node: &Node) -> Result<u64> {
        kids(node).first().map(|c| c.len()).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, "quorum has no children").with_node(node.name())
        })
    }

    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
        let kids = kids(node);
        let len = buf.len() as u64;
        if self.fifo {
            let mut last = None;
            for k in &kids {
                match k.read(offset, buf) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        self.report(
                            node,
                            QuorumReportKind::ChildError,
                            Some(k.name()),
                            offset,
                            len,
                            Some(&e),
                        );
                        last = Some(e);
                    }
                }
            }
            let e = last.unwrap_or_else(|| Error::new(ErrorKind::Io, "quorum has no children"));
            return Err(Error::new(
                e.kind(),
                format!("quorum read: every child failed, last: {e}"),
            )
            .with_node(node.name()));
        }
        // Quorum pattern: read all, vote.
        let mut versions: Vec<(Vec<u8>, Vec<usize>)> = Vec::new();
        let mut errors = 0;
        let mut first_err: Option<Error> = None;
        for (i, k) in kids.iter().enumerate() {
            let mut b = vec![0u8; buf.len()];
            match k.read(offset, &mut b) {
                Ok(()) => match versions.iter_mut().find(|(v, _)| *v == b) {
                    Some((_, who)) => who.push(i),
                    None => versions.push((b, vec![i])),
                },
                Err(e) => {
                    errors += 1;
                    self.report(
                        node,
                        QuorumReportKind::ChildError,
                        Some(k.name()),
                        offset,
                        len,
                        Some(&e),
                    );
                    first_err.get_or_insert(e);
                }
            }
        }
        let best = versions
            .iter()
            .enumerate()
            .max_by(|a, b| a.1 .1.len().cmp(&b.1 .1.len()).then(b.0.cmp(&a.0)));
        match best {
            Some((wi, (data, who))) if who.len() >= self.threshold => {
                buf.copy_from_slice(data);
                for (vi, (_, others)) in versions.iter().enumerate() {
                    if vi == wi {
                        continue;
                    }
                    for &i in others {
                        self.report(
                            node,
                            QuorumReportKind::Mismatch,
                            Some(kids[i].name()),
                            offset,
                            len,
                            None,
                        );
                        if self.rewrite {
                            let _ = kids[i].write(offset, buf, WriteFlags::default());
                        }
                    }
                }
                Ok(())
            }
            _ => {
                let kind = if versions.is_empty() {
                    first_err
                        .as_ref()
                        .map(|e| e.kind())
                        .unwrap_or(ErrorKind::Io)
                } else {
                    ErrorKind::Io
                };
                let err = Error::new(
                    kind,
                    format!(
                        "quorum read: no version reached vote-threshold {} ({} versions, {errors} errors{})",
                        self.threshold,
                        versions.len(),
                        first_err.map(|e| format!(", first: {e}")).unwrap_or_default()
                    ),
                )
                .with_node(node.name());
                self.report(
                    node,
                    QuorumReportKind::Failure,
                    None,
                    offset,
                    len,
                    Some(&err),
                );
                Err(err)
            }
        }
    }

    fn write(&self, node: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.all(
            node,
            "write",
            offset,
            buf.len() as u64,
            |k| k.write(offset, buf, flags),
            || {
                let data: Arc<[u8]> = Arc::from(buf);
                Arc::new(move |k: &NodeRef| k.write(offset, &data, flags))
            },
        )
    }

    fn flush(&self, node: &Node) -> Result<()> {
        self.all(
            node,
            "flush",
            0,
            0,
            |k| k.flush(),
            || Arc::new(|k| k.flush()),
        )
    }

    fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.all(
            node,
            "discard",
            offset,
            len,
            |k| k.discard(offset, len),
            || Arc::new(move |k| k.discard(offset, len)),
        )
    }

    fn write_zeroes(&self, node: &Node, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.all(
            node,
            "write_zeroes",
            offset,
            len,
            |k| k.write_zeroes(offset, len, flags),
            || Arc::new(move |k| k.write_zeroes(offset, len, flags)),
        )
    }

    fn serialise_writes(&self) -> bool {
        true
    }

    fn prepare_add_child(&self, node: &Node, child: &Node) -> Result<Role> {
        if child.len() != node.len() {
            return Err(Error::invalid(format!(
                "cannot add '{}' to quorum: its length {} differs from {}",
                child.name(),
                child.len(),
                node.len()
            ))
            .with_node(node.name()));
        }
        let next = node
            .children()
            .iter()
            .filter_map(|(r, _)| match r {
                Role::Child(i) => Some(i + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        Ok(Role::Child(next))
    }

    fn prepare_remove_child(&self, node: &Node, role: &Role) -> Result<()> {
        if !matches!(role, Role::Child(_)) {
            return Err(
                Error::invalid(format!("quorum has no child role '{role}'")).with_node(node.name())
            );
        }
        let n = kids(node).len();
        if n - 1 < self.threshold {
            return Err(Error::invalid(format!(
                "cannot remove '{role}': the number of children cannot be lower than the vote threshold {}",
                self.threshold
            ))
            .with_node(node.name()));
        }
        Ok(())
    }
}
