//! A cheap request clock for statistics. On x86_64 it reads the TSC (about a
//! third of the cost of `Instant::now()` in our VMs) and converts ticks to
//! nanoseconds with a ratio measured between a base point and the moment of
//! conversion (so it needs no calibration pause). Elsewhere it is `Instant`.

use std::sync::OnceLock;
use std::time::Instant;

struct Base {
    instant: Instant,
    ticks: u64,
}

static BASE: OnceLock<Base> = OnceLock::new();

fn base() -> &'static Base {
    BASE.get_or_init(|| Base {
        instant: Instant::now(),
        ticks: raw(),
    })
}

#[cfg(target_arch = "x86_64")]
fn raw() -> u64 {
    // SAFETY: RDTSC has no memory effects; it is available on every x86_64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
fn raw() -> u64 {
    base_instant().elapsed().as_nanos() as u64
}

#[cfg(not(target_arch = "x86_64"))]
fn base_instant() -> Instant {
    static I: OnceLock<Instant> = OnceLock::new();
    *I.get_or_init(Instant::now)
}

/// Current tick count.
#[inline]
pub(crate) fn ticks() -> u64 {
    raw()
}

/// Makes sure the base point exists (called when a node is created, so the
/// ratio has a long baseline by the time statistics are read).
pub(crate) fn init() {
    let _ = base();
}

/// Converts a tick count (a duration) to nanoseconds.
pub(crate) fn to_nanos(t: u64) -> u64 {
    if cfg!(not(target_arch = "x86_64")) {
        return t;
    }
    let b = base();
    let ns = b.instant.elapsed().as_nanos() as f64;
    let dt = raw().wrapping_sub(b.ticks) as f64;
    if dt <= 0.0 || ns <= 0.0 {
        return 0;
    }
    (t as f64 * ns / dt) as u64
}
