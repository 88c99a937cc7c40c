//! Fresh-image 64 KiB sequential writes, for profiling and for comparing with
//! `qemu-img bench -f qcow2 -w -t writeback -d 1 -s 65536 -c N img` on a fresh
//! image: `cargo run --release -p qcow-lite --example seq_fresh -- PATH [N] [ROUNDS]`.
//! Prints MiB/s per round (the final flush untimed, as `qemu-img bench`).
//! `SEQ_FRESH_PAUSE_MS=n` waits n ms between creating and writing.

use qcow_lite::{CreateOptions, Qcow2};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: seq_fresh PATH [N] [ROUNDS]");
    let n: u64 = args.next().map_or(1024, |s| s.parse().expect("N"));
    let rounds: u32 = args.next().map_or(5, |s| s.parse().expect("ROUNDS"));
    let cs = 65536u64;
    let data = vec![0xa5u8; cs as usize];
    for r in 0..rounds {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        let img = Qcow2::create(
            f,
            &CreateOptions {
                size: n * cs,
                cluster_size: cs,
                ..Default::default()
            },
        )
        .expect("create");
        // `SEQ_FRESH_PAUSE_MS`: wait after creating (the QEMU side has a
        // process start between `qemu-img create` and `qemu-img bench`).
        if let Some(ms) = std::env::var("SEQ_FRESH_PAUSE_MS")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        let t = Instant::now();
        for i in 0..n {
            img.write(i * cs, &data, None).expect("write");
        }
        let el = t.elapsed();
        img.close().expect("close");
        println!(
            "round {r}: {n} x 64 KiB in {:.3} s = {:.1} MiB/s",
            el.as_secs_f64(),
            (n * cs) as f64 / 1048576.0 / el.as_secs_f64()
        );
    }
}
