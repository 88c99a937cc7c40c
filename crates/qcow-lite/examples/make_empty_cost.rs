//! make_empty of a MemStorage image with 10 allocated clusters spread over
//! the disk (10 L2 tables on 1 TiB, 2 on 1 GiB), `ROUNDS` times, for an
//! instruction count that a loaded machine cannot blur:
//! `valgrind --tool=callgrind --toggle-collect='*make_empty*' \
//!   target/release/examples/make_empty_cost 1TiB 100`
//! (or time it: it prints the mean wall time per make_empty).

use qcow_lite::{CreateOptions, MemStorage, Qcow2};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let mut args = std::env::args().skip(1);
    let size: u64 = match args.next().as_deref() {
        Some("1TiB") | None => 1 << 40,
        Some("1GiB") => 1 << 30,
        Some(other) => panic!("size must be 1GiB or 1TiB, not {other}"),
    };
    let rounds: u32 = args.next().map_or(100, |s| s.parse().expect("rounds"));
    let cs = 65536u64;
    let img = Qcow2::create(
        Arc::new(MemStorage::new()),
        &CreateOptions {
            size,
            cluster_size: cs,
            ..Default::default()
        },
    )
    .expect("create");
    let data = vec![0x5au8; cs as usize];
    let mut total = Duration::ZERO;
    for _ in 0..rounds {
        for i in 0..10u64 {
            let off = (size / 10) * i / cs * cs;
            img.write(off, &data, None).expect("write");
        }
        img.flush().expect("flush");
        let t = Instant::now();
        img.make_empty().expect("make_empty");
        total += t.elapsed();
    }
    println!(
        "make_empty, {} GiB, 10 clusters: {:.1} µs mean over {rounds}",
        size >> 30,
        total.as_secs_f64() * 1e6 / f64::from(rounds)
    );
}
