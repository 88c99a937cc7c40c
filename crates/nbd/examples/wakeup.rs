//! What waking a sleeping thread costs on this machine: a one-byte ping-pong
//! between two threads over a Unix socketpair, first with blocking reads (each
//! round trip wakes the other thread twice), then with both threads polling
//! non-blocking sockets (no sleep, no wake-up). The difference is what the
//! server saves by running a lone request on the thread that read it.
//!
//! `cargo run --release -p nbd --example wakeup [ROUNDS]`

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

fn read_byte(s: &mut UnixStream, buf: &mut [u8; 1]) -> bool {
    loop {
        match s.read(buf) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Round-trip times in ns, sorted.
fn ping_pong(rounds: usize, polling: bool) -> Vec<u64> {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    a.set_nonblocking(polling).expect("nonblocking");
    b.set_nonblocking(polling).expect("nonblocking");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 1];
        while read_byte(&mut b, &mut buf) {
            if b.write_all(&buf).is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; 1];
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        a.write_all(&buf).expect("write");
        assert!(read_byte(&mut a, &mut buf), "echo thread gone");
        times.push(t.elapsed().as_nanos() as u64);
    }
    drop(a);
    let _ = echo.join();
    times.sort_unstable();
    times
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    for (name, polling) in [("blocking (sleep + wake-up)", false), ("polling", true)] {
        let t = ping_pong(rounds, polling);
        let pct = |q: f64| t[((q * t.len() as f64) as usize).min(t.len() - 1)] as f64 / 1000.0;
        println!(
            "{name}: round trip p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs ({rounds} rounds)",
            pct(0.5),
            pct(0.9),
            pct(0.99)
        );
    }
}
