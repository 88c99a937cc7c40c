//! A byte-rate limiter (token bucket with debt) that holds for tiny and huge limits.
//!
//! Tokens accrue at `speed` bytes per second up to a burst of 100 ms worth (at
//! least one byte). A request may always be dispatched when the bucket is not in
//! debt; it then takes its full size, possibly driving the bucket negative. The
//! next request waits until the debt is repaid. So a 1 byte/s limit with 64 KiB
//! chunks moves one chunk every 65536 s, and `u64::MAX` never waits, with no
//! overflow anywhere (all arithmetic is in `u128` nanobyte units).

use std::time::{Duration, Instant};

const SLICE_NS: u128 = 100_000_000;
const NS_PER_S: u128 = 1_000_000_000;

/// Token-bucket rate limiter. Not synchronised: one per job, owned by its thread.
#[derive(Debug)]
pub struct RateLimit {
    /// Bytes per second; 0 means unlimited.
    speed: u64,
    /// Balance in byte-nanoseconds-per-second units (bytes * 1e9), may be negative.
    balance: i128,
    last: Instant,
}

impl RateLimit {
    /// A limiter at `speed` bytes/s (0 = unlimited).
    pub fn new(speed: u64) -> Self {
        RateLimit {
            speed,
            balance: 0,
            last: Instant::now(),
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

    fn cap(&self) -> i128 {
        // burst = speed * 100 ms, at least 1 byte, expressed in bytes*1e9
        let burst_bytes = (self.speed as u128 * SLICE_NS / NS_PER_S).max(1);
        (burst_bytes * NS_PER_S).min(i128::MAX as u128 / 4) as i128
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
    pub fn delay(&mut self) -> Duration {
        if self.speed == 0 {
            return Duration::ZERO;
        }
        self.refill(Instant::now());
        if self.balance >= 0 {
            return Duration::ZERO;
        }
        let debt = (-self.balance) as u128; // bytes * 1e9
                                            // seconds = debt / (speed * 1e9); ns = debt / speed
        let ns = debt.div_ceil(self.speed as u128);
        Duration::from_nanos(ns.min(u64::MAX as u128) as u64)
    }

    /// Record `n` bytes dispatched.
    pub fn consume(&mut self, n: u64) {
        if self.speed == 0 {
            return;
        }
        self.refill(Instant::now());
        let cost = (n as u128 * NS_PER_S).min(i128::MAX as u128 / 4) as i128;
        self.balance = self.balance.saturating_sub(cost).max(i128::MIN / 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
