//! A byte-rate limiter (token bucket with debt) that holds for tiny and huge limits.
//!
//! Tokens accrue at `speed` bytes per second up to a burst of 100 ms worth (at
//! least one byte). A request may always be dispatched when the bucket is not in
//! debt; it then takes its full size, possibly driving the bucket negative. The
//! next request waits until the debt is repaid. So a 1 byte/s limit with 64 KiB
//! chunks moves one chunk every 65536 s, and `u64::MAX` never waits, with no
//! overflow anywhere (all arithmetic is in `u128` nanobyte units).
//!
//! Catching up: while the job is rate-bound (it has had to wait for the limit
//! since it last went idle, or it has just started), time it then loses to a
//! late wake-up or a stall (a loaded machine, a slow request) is credited up
//! to one second's worth instead of the 100 ms burst, so the job catches up
//! and the rate over a window of seconds stays the set one. Time spent idle by
//! the job's own choice (waiting for work, paused) is not credited beyond the
//! burst: see [`RateLimit::mark_idle`].

use std::time::{Duration, Instant};

const SLICE_NS: u128 = 100_000_000;
/// How much lost time a rate-bound job may catch up.
const CATCH_UP_NS: u128 = 1_000_000_000;
const NS_PER_S: u128 = 1_000_000_000;

/// Token-bucket rate limiter. Not synchronised: one per job, owned by its thread.
#[derive(Debug)]
pub struct RateLimit {
    /// Bytes per second; 0 means unlimited.
    speed: u64,
    /// Balance in byte-nanoseconds-per-second units (bytes * 1e9), may be negative.
    balance: i128,
    last: Instant,
    /// Rate-bound since the last idle mark: lost time is credited (catch-up).
    limited: bool,
}

impl RateLimit {
    /// A limiter at `speed` bytes/s (0 = unlimited).
    pub fn new(speed: u64) -> Self {
        RateLimit {
            speed,
            balance: 0,
            last: Instant::now(),
            // a job wants to move data from the moment it is created: a late
            // start of its thread is caught up
            limited: true,
        }
    }

    /// Current limit in bytes/s (0 = unlimited).
    pub fn speed(&self) -> u64 {
        self.speed
    }

    /// Change the limit; debt already incurred stays (in bytes).
    pub fn set_speed(&mut self, speed: u64) {
        self.refill(Instant::now());
        self.speed = speed;
        self.clamp();
    }

    /// The job goes idle by its own choice (waits for work, parks paused):
    /// the time from now on is not lateness, so the balance is capped at the
    /// burst again until the job next has to wait for the limit.
    pub fn mark_idle(&mut self) {
        self.mark_idle_at(Instant::now());
    }

    fn mark_idle_at(&mut self, now: Instant) {
        self.refill(now);
        self.limited = false;
        self.clamp();
    }

    /// Whether the job is rate-bound (catching up lost time is allowed).
    pub fn is_limited(&self) -> bool {
        self.limited
    }

    fn cap(&self) -> i128 {
        // burst = speed * 100 ms (1 s while catching up), at least 1 byte,
        // expressed in bytes*1e9
        let window = if self.limited { CATCH_UP_NS } else { SLICE_NS };
        let burst_bytes = (self.speed as u128).saturating_mul(window) / NS_PER_S;
        (burst_bytes.max(1).saturating_mul(NS_PER_S)).min(i128::MAX as u128 / 4) as i128
    }

    fn clamp(&mut self) {
        let cap = self.cap();
        if self.balance > cap {
            self.balance = cap;
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        if self.speed == 0 {
            self.balance = 0;
            return;
        }
        // speed bytes/s * elapsed ns = bytes * 1e9 units
        let add = (self.speed as u128).saturating_mul(elapsed);
        let add = add.min(i128::MAX as u128 / 4) as i128;
        self.balance = self.balance.saturating_add(add);
        self.clamp();
    }

    /// How long to wait before `n` more bytes may be dispatched; zero means now.
    /// Does not consume anything.
    /// A non-zero answer marks the limiter rate-bound (see the module doc).
    pub fn delay(&mut self) -> Duration {
        self.delay_at(Instant::now())
    }

    fn delay_at(&mut self, now: Instant) -> Duration {
        if self.speed == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        if self.balance >= 0 {
            return Duration::ZERO;
        }
        self.limited = true;
        let debt = (-self.balance) as u128; // bytes * 1e9
                                            // seconds = debt / (speed * 1e9); ns = debt / speed
        let ns = debt.div_ceil(self.speed as u128);
        Duration::from_nanos(ns.min(u64::MAX as u128) as u64)
    }

    /// Record `n` bytes dispatched.
    pub fn consume(&mut self, n: u64) {
        self.consume_at(n, Instant::now());
    }

    fn consume_at(&mut self, n: u64, now: Instant) {
        if self.speed == 0 {
            return;
        }
        self.refill(now);
        let cost = (n as u128 * NS_PER_S).min(i128::MAX as u128 / 4) as i128;
        self.balance = self.balance.saturating_sub(cost).max(i128::MIN / 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive a limiter with a fake clock: the job dispatches `chunk` bytes
    /// whenever allowed, but every `stall_every`-th wake-up comes `late`
    /// late. Runs for at least `window`, until the job has to wait again
    /// (caught up); returns the rate in MiB/s over the time run.
    fn simulate(speed: u64, chunk: u64, stall_every: u32, late: Duration, window: Duration) -> f64 {
        let t0 = Instant::now();
        let mut r = RateLimit::new(speed);
        r.last = t0;
        let mut now = t0;
        let mut moved = 0u64;
        let mut wakeups = 0u32;
        loop {
            let d = r.delay_at(now);
            if d.is_zero() {
                r.consume_at(chunk, now);
                moved += chunk;
                continue;
            }
            if now >= t0 + window {
                let secs = (now - t0).as_secs_f64();
                return moved as f64 / secs / (1 << 20) as f64;
            }
            wakeups += 1;
            now += d;
            if stall_every > 0 && wakeups % stall_every == 0 {
                now += late;
            }
        }
    }

    #[test]
    fn late_wakeups_are_caught_up() {
        let speed = 10u64 << 20;
        let window = Duration::from_secs(3);
        // every 20th wake-up 400 ms late: the old 100 ms burst lost ~40%
        let rate = simulate(speed, 64 << 10, 20, Duration::from_millis(400), window);
        assert!((9.5..=10.5).contains(&rate), "rate {rate:.3} MiB/s");
        // no stalls: exact
        let rate = simulate(speed, 64 << 10, 0, Duration::ZERO, window);
        assert!((9.9..=10.1).contains(&rate), "rate {rate:.3} MiB/s");
    }

    #[test]
    fn idle_time_is_not_credited_beyond_the_burst() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10 << 20);
        r.last = t0;
        r.consume_at(1 << 20, t0);
        assert!(!r.delay_at(t0).is_zero());
        r.mark_idle_at(t0);
        // idle for 5 s: at most 100 ms (1 MiB) of credit
        let t1 = t0 + Duration::from_secs(5);
        assert!(r.delay_at(t1).is_zero());
        r.consume_at(1 << 20, t1);
        r.consume_at(1, t1);
        assert!(!r.delay_at(t1).is_zero());
    }

    #[test]
    fn unlimited_never_waits() {
        let mut r = RateLimit::new(0);
        for _ in 0..1000 {
            r.consume(u64::MAX);
            assert_eq!(r.delay(), Duration::ZERO);
        }
    }

    #[test]
    fn huge_limit_no_overflow() {
        let mut r = RateLimit::new(u64::MAX);
        r.consume(u64::MAX);
        let d = r.delay();
        assert!(
            d > Duration::from_millis(900) && d < Duration::from_millis(1001),
            "{d:?}"
        );
        let mut r = RateLimit::new(u64::MAX);
        r.consume(1 << 30);
        assert!(r.delay() < Duration::from_millis(1));
    }

    #[test]
    fn tiny_limit_waits_long() {
        let mut r = RateLimit::new(1);
        assert_eq!(r.delay(), Duration::ZERO);
        r.consume(65536);
        let d = r.delay();
        assert!(
            d > Duration::from_secs(65000) && d <= Duration::from_secs(65537),
            "{d:?}"
        );
    }

    #[test]
    fn debt_matches_rate() {
        let mut r = RateLimit::new(10 << 20);
        r.consume(10 << 20);
        let d = r.delay();
        assert!(
            d > Duration::from_millis(950) && d <= Duration::from_millis(1001),
            "{d:?}"
        );
        r.set_speed(20 << 20);
        let d = r.delay();
        assert!(
            d > Duration::from_millis(450) && d <= Duration::from_millis(501),
            "{d:?}"
        );
    }
}
