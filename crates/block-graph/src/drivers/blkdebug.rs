//! `blkdebug`: fault injection, delays and hold points, a filter above its
//! `image` child.
//!
//! QEMU options: `image` (the child), `align`, and `inject-error`: a list of
//! `{"event": .., "iotype": .., "errno": .., "sector": .., "once": .., "immediately": ..}`.
//! Events `read_aio`/`preadv` arm the rule for reads, `write_aio`/`pwritev` for
//! writes, `pwritev_zero` for write-zeroes, `flush_to_disk`/`flush_to_os` for
//! flushes; our extensions `x-discard`, `x-block-status` and `x-any`. `iotype`
//! (a string or list of `read`, `write`, `write-zeroes`, `discard`, `flush`,
//! `block-status`) narrows a rule further. `errno` is a number or a name
//! (`EIO`=5, `ENOSPC`=28, ...; default EIO). `sector` (512-byte units, -1 = any)
//! limits the rule to requests covering it. `once` removes the rule after it
//! fires. Our extension `x-after`: the rule lets that many matching requests
//! pass before it fires.
//!
//! Our extension `x-delays`: a list of `{"iotype": .., "us": N, "random": bool}`
//! delaying matching requests by N microseconds (or a random 0..=N); `x-seed`
//! seeds the random delays.
//!
//! At run time, `node.driver_as::<BlkDebug>()` gives [`BlkDebug`]: inject rules,
//! set delays, and put hold points ([`BlkDebug::hold`]) that park matching
//! requests until released, for deterministic race tests.

use crate::driver::{BlockStatus, Driver, Mapping, Role, WriteFlags, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};
use crate::graph::OpenContext;
use crate::node::{Node, NodeRef};
use crate::options::OptionMap;
use parking_lot::{Condvar, Mutex};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A set of request types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoMask(pub u8);

impl IoMask {
    /// Reads.
    pub const READ: IoMask = IoMask(1);
    /// Writes.
    pub const WRITE: IoMask = IoMask(2);
    /// Write-zeroes.
    pub const WRITE_ZEROES: IoMask = IoMask(4);
    /// Discards.
    pub const DISCARD: IoMask = IoMask(8);
    /// Flushes.
    pub const FLUSH: IoMask = IoMask(16);
    /// Block status.
    pub const BLOCK_STATUS: IoMask = IoMask(32);
    /// Every request type.
    pub const ALL: IoMask = IoMask(63);

    fn hits(self, other: IoMask) -> bool {
        self.0 & other.0 != 0
    }

    fn parse_name(s: &str) -> Option<IoMask> {
        Some(match s {
            "read" => IoMask::READ,
            "write" => IoMask::WRITE,
            "write-zeroes" => IoMask::WRITE_ZEROES,
            "discard" => IoMask::DISCARD,
            "flush" => IoMask::FLUSH,
            "block-status" => IoMask::BLOCK_STATUS,
            _ => return None,
        })
    }
}

impl std::ops::BitOr for IoMask {
    type Output = IoMask;
    fn bitor(self, r: IoMask) -> IoMask {
        IoMask(self.0 | r.0)
    }
}

/// An error injection rule.
#[derive(Debug, Clone)]
pub struct InjectRule {
    /// Request types it applies to.
    pub iotypes: IoMask,
    /// The errno to fail with (positive).
    pub errno: i32,
    /// Only requests overlapping `[start, end)` (None: any).
    pub range: Option<(u64, u64)>,
    /// Remove the rule after it fires once.
    pub once: bool,
    /// Let this many matching requests pass before firing.
    pub after: u64,
}

impl InjectRule {
    /// A rule failing every request of `iotypes` with `errno`.
    pub fn new(iotypes: IoMask, errno: i32) -> InjectRule {
        InjectRule {
            iotypes,
            errno,
            range: None,
            once: false,
            after: 0,
        }
    }

    /// Limits the rule to requests overlapping `[offset, offset+len)`.
    pub fn range(mut self, offset: u64, len: u64) -> InjectRule {
        self.range = Some((offset, offset.saturating_add(len)));
        self
    }

    /// Fires once.
    pub fn once(mut self) -> InjectRule {
        self.once = true;
        self
    }

    /// Fires only after `n` matching requests passed.
    pub fn after(mut self, n: u64) -> InjectRule {
        self.after = n;
        self
    }
}

struct RuleState {
    rule: InjectRule,
    seen: u64,
}

#[derive(Debug, Clone, Copy)]
struct DelayRule {
    iotypes: IoMask,
    max: Duration,
    random: bool,
}

struct HoldState {
    iotypes: IoMask,
    range: Option<(u64, u64)>,
    inner: Mutex<(u64, bool)>,
    cv: Condvar,
}

/// A hold point: matching requests park inside the node until [`Hold::release`]
/// (or drop). Parked requests are in flight (drains wait for them).
pub struct Hold {
    st: Arc<HoldState>,
    owner: Arc<Mutex<Vec<Arc<HoldState>>>>,
}

impl Hold {
    /// How many requests reached this hold so far.
    pub fn reached(&self) -> u64 {
        self.st.inner.lock().0
    }

    /// Waits until at least `n` requests reached the hold; false on timeout.
    pub fn wait_reached(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.st.inner.lock();
        while g.0 < n {
            if self.st.cv.wait_until(&mut g, deadline).timed_out() {
                return g.0 >= n;
            }
        }
        true
    }

    /// Lets every parked and future matching request through; the hold is removed.
    pub fn release(&self) {
        self.owner.lock().retain(|h| !Arc::ptr_eq(h, &self.st));
        let mut g = self.st.inner.lock();
        g.1 = true;
        self.st.cv.notify_all();
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

/// The `blkdebug` driver (see the module docs).
pub struct BlkDebug {
    align: u64,
    rules: Mutex<Vec<RuleState>>,
    delays: Mutex<Vec<DelayRule>>,
    holds: Arc<Mutex<Vec<Arc<HoldState>>>>,
    rng: AtomicU64,
    fired: AtomicU64,
}

fn errno_by_name(s: &str) -> Option<i32> {
    Some(match s {
        "EIO" => libc::EIO,
        "ENOSPC" => libc::ENOSPC,
        "EPERM" => libc::EPERM,
        "EACCES" => libc::EACCES,
        "EINVAL" => libc::EINVAL,
        "ENOTSUP" | "EOPNOTSUPP" => libc::ENOTSUP,
        "ENOENT" => libc::ENOENT,
        "EBUSY" => libc::EBUSY,
        "ECANCELED" => libc::ECANCELED,
        "EROFS" => libc::EROFS,
        "EDQUOT" => libc::EDQUOT,
        "EFBIG" => libc::EFBIG,
        "EUCLEAN" => libc::EUCLEAN,
        _ => return None,
    })
}

fn parse_iotypes(o: &mut OptionMap, key: &str) -> Result<Option<IoMask>> {
    let v = match o.take_value(key) {
        None => return Ok(None),
        Some(v) => v,
    };
    let names: Vec<Value> = match v {
        Value::String(_) => vec![v],
        Value::Array(a) => a,
        other => {
            return Err(Error::invalid(format!(
                "driver '{}': option '{key}' expects a string or a list, got {other}",
                o.driver()
            )))
        }
    };
    let mut m = IoMask(0);
    for n in names {
        let s = n.as_str().unwrap_or("");
        m = m | IoMask::parse_name(s).ok_or_else(|| {
            Error::invalid(format!(
                "driver '{}': option '{key}': unknown I/O type {n} (use read, write, write-zeroes, discard, flush, block-status)",
                o.driver()
            ))
        })?;
    }
    Ok(Some(m))
}

fn parse_rule(v: &Value, i: usize) -> Result<InjectRule> {
    let mut o = OptionMap::from_value(format!("blkdebug' option 'inject-error.{i}"), v)?;
    let event = o.require_str("event")?;
    let ev = match event.as_str() {
        "read_aio" | "preadv" => IoMask::READ,
        "write_aio" | "pwritev" => IoMask::WRITE,
        "pwritev_zero" => IoMask::WRITE_ZEROES,
        "flush_to_disk" | "flush_to_os" => IoMask::FLUSH,
        "x-discard" => IoMask::DISCARD,
        "x-block-status" => IoMask::BLOCK_STATUS,
        "x-any" => IoMask::ALL,
        other => {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!("driver 'blkdebug': event '{other}' is not supported (use read_aio, preadv, write_aio, pwritev, pwritev_zero, flush_to_disk, flush_to_os, x-discard, x-block-status, x-any)"),
            ))
        }
    };
    let iotypes = match parse_iotypes(&mut o, "iotype")? {
        Some(m) => IoMask(ev.0 & m.0),
        None => ev,
    };
    let errno = match o.take_value("errno") {
        None => libc::EIO,
        Some(Value::Number(n)) if n.as_i64().is_some_and(|e| e != 0 && e.abs() < 4096) => {
            n.as_i64().unwrap_or(5).abs() as i32
        }
        Some(Value::String(s)) => errno_by_name(&s).ok_or_else(|| {
            Error::invalid(format!("driver 'blkdebug': unknown errno name '{s}'"))
        })?,
        Some(other) => {
            return Err(Error::invalid(format!(
                "driver 'blkdebug': option 'errno' expects a positive errno number or name, got {other}"
            )))
        }
    };
    let sector = o.take_i64("sector")?.unwrap_or(-1);
    let once = o.take_bool("once")?.unwrap_or(false);
    o.take_bool("immediately")?;
    if let Some(st) = o.take_i64("state")? {
        if st != 1 {
            return Err(Error::not_supported(
                "driver 'blkdebug': only state 1 is supported",
            ));
        }
    }
    let after = o.take_u64("x-after")?.unwrap_or(0);
    o.finish()?;
    let mut r = InjectRule {
        iotypes,
        errno,
        range: None,
        once,
        after,
    };
    if sector >= 0 {
        r = r.range(sector as u64 * 512, 512);
    }
    Ok(r)
}

fn image(node: &Node) -> Result<NodeRef> {
    node.file().ok_or_else(|| {
        Error::new(ErrorKind::NotFound, "blkdebug node has no 'image' child").with_node(node.name())
    })
}

fn overlaps(range: Option<(u64, u64)>, off: u64, len: u64) -> bool {
    match range {
        None => true,
        Some((s, e)) => off < e && s < off.saturating_add(len.max(1)),
    }
}

impl BlkDebug {
    /// Opens from options (see the module docs).
    pub fn open(ctx: &mut OpenContext<'_>) -> Result<Box<dyn Driver>> {
        ctx.open_child("image", Role::File, true)?;
        let o = ctx.options();
        let align = o.take_u64("align")?.unwrap_or(1);
        if !align.is_power_of_two() {
            return Err(Error::invalid(format!(
                "driver 'blkdebug': option 'align' must be a power of two, got {align}"
            )));
        }
        let mut rules = Vec::new();
        for (i, v) in o
            .take_list("inject-error")?
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            rules.push(RuleState {
                rule: parse_rule(v, i)?,
                seen: 0,
            });
        }
        let mut delays = Vec::new();
        for (i, v) in o
            .take_list("x-delays")?
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let mut d = OptionMap::from_value(format!("blkdebug' option 'x-delays.{i}"), v)?;
            let iotypes = parse_iotypes(&mut d, "iotype")?.unwrap_or(IoMask::ALL);
            let us = d.require_u64("us")?;
            let random = d.take_bool("random")?.unwrap_or(false);
            d.finish()?;
            delays.push(DelayRule {
                iotypes,
                max: Duration::from_micros(us),
                random,
            });
        }
        static SEQ: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed = match o.take_u64("x-seed")? {
            Some(s) => s,
            None => SEQ.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) ^ now,
        };
        Ok(Box::new(BlkDebug {
            align,
            rules: Mutex::new(rules),
            delays: Mutex::new(delays),
            holds: Arc::new(Mutex::new(Vec::new())),
            rng: AtomicU64::new(seed | 1),
            fired: AtomicU64::new(0),
        }))
    }

    /// Adds an injection rule.
    pub fn inject(&self, rule: InjectRule) {
        self.rules.lock().push(RuleState { rule, seen: 0 });
    }

    /// Removes every injection rule.
    pub fn clear_rules(&self) {
        self.rules.lock().clear();
    }

    /// How many errors were injected so far.
    pub fn injected(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }

    /// Delays matching requests by `delay` (or a random 0..=delay).
    pub fn add_delay(&self, iotypes: IoMask, delay: Duration, random: bool) {
        self.delays.lock().push(DelayRule {
            iotypes,
            max: delay,
            random,
        });
    }

    /// Removes every delay.
    pub fn clear_delays(&self) {
        self.delays.lock().clear();
    }

    /// Parks matching requests (overlapping `range` if given) until the returned
    /// hold is released or dropped.
    pub fn hold(&self, iotypes: IoMask, range: Option<(u64, u64)>) -> Hold {
        let st = Arc::new(HoldState {
            iotypes,
            range: range.map(|(o, l)| (o, o.saturating_add(l))),
            inner: Mutex::new((0, false)),
            cv: Condvar::new(),
        });
        self.holds.lock().push(st.clone());
        Hold {
            st,
            owner: self.holds.clone(),
        }
    }

    fn rand(&self) -> u64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x
    }

    fn check(&self, node: &Node, t: IoMask, off: u64, len: u64) -> Result<()> {
        let delays: Vec<DelayRule> = self
            .delays
            .lock()
            .iter()
            .filter(|d| d.iotypes.hits(t))
            .copied()
            .collect();
        for d in delays {
            let ns = d.max.as_nanos() as u64;
            let ns = if d.random && ns > 0 {
                self.rand() % (ns + 1)
            } else {
                ns
            };
            std::thread::sleep(Duration::from_nanos(ns));
        }
        let holds: Vec<Arc<HoldState>> = self
            .holds
            .lock()
            .iter()
            .filter(|h| h.iotypes.hits(t) && overlaps(h.range, off, len))
            .cloned()
            .collect();
        for h in holds {
            let mut g = h.inner.lock();
            g.0 += 1;
            h.cv.notify_all();
            while !g.1 {
                h.cv.wait(&mut g);
            }
        }
        let mut rules = self.rules.lock();
        let mut fire = None;
        for (i, r) in rules.iter_mut().enumerate() {
            if r.rule.iotypes.hits(t) && overlaps(r.rule.range, off, len) {
                r.seen += 1;
                if r.seen > r.rule.after {
                    fire = Some((i, r.rule.errno, r.rule.once));
                    break;
                }
            }
        }
        if let Some((i, errno, once)) = fire {
            if once {
                rules.remove(i);
            }
            self.fired.fetch_add(1, Ordering::Relaxed);
            return Err(Error::from_errno(
                errno,
                format!("blkdebug: injected error at offset {off} length {len}"),
            )
            .with_node(node.name()));
        }
        Ok(())
    }
}

impl Driver for BlkDebug {
    fn format_name(&self) -> &str {
        "blkdebug"
    }
    fn length(&self, node: &Node) -> Result<u64> {
        Ok(image(node)?.len())
    }
    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(node, IoMask::READ, offset, buf.len() as u64)?;
        image(node)?.read(offset, buf)
    }
    fn write(&self, node: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.check(node, IoMask::WRITE, offset, buf.len() as u64)?;
        image(node)?.write(offset, buf, flags)
    }
    fn flush(&self, node: &Node) -> Result<()> {
        self.check(node, IoMask::FLUSH, 0, 0)?;
        image(node)?.flush()
    }
    fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.check(node, IoMask::DISCARD, offset, len)?;
        image(node)?.discard(offset, len)
    }
    fn write_zeroes(&self, node: &Node, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check(node, IoMask::WRITE_ZEROES, offset, len)?;
        image(node)?.write_zeroes(offset, len, flags)
    }
    fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check(node, IoMask::BLOCK_STATUS, offset, len)?;
        Ok(BlockStatus {
            mapping: Mapping::Child {
                role: Role::File,
                offset,
            },
            len,
        })
    }
    fn truncate(&self, node: &Node, len: u64) -> Result<()> {
        image(node)?.truncate(len)
    }
    fn make_empty(&self, node: &Node) -> Result<()> {
        image(node)?.make_empty()
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn request_alignment(&self) -> u64 {
        self.align
    }
}
