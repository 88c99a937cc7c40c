//! Overhead of the one door per 4 KiB request on the memory driver, against
//! calling the driver directly.
//!
//! `door/*` and `direct/*` time each path alone. `overhead/*` interleaves them
//! in batches of 32 requests and reports (door time - direct time) per request,
//! which stays meaningful when other processes load the machine.
#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use block_graph::{Graph, NodeRef, WriteFlags};
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use std::hint::black_box;
use std::time::{Duration, Instant};

const BLOCKS: u64 = 256;
const BATCH: u64 = 32;

fn setup() -> NodeRef {
    let g = Graph::new();
    let n = g
        .add_node(&json!({"driver": "memory", "node-name": "m", "size": 64u64 << 20, "cluster-size": 4096}))
        .unwrap();
    let data = vec![0xa5u8; 4096];
    for i in 0..BLOCKS {
        n.write(i * 4096, &data, WriteFlags::default()).unwrap();
    }
    n
}

/// Runs `iters` requests each way in alternating batches (alternating which
/// side goes first, so neither profits from the other's warm caches) and
/// returns the door's extra time.
fn paired(iters: u64, mut door: impl FnMut(u64), direct: &mut dyn FnMut(u64)) -> Duration {
    let (mut td, mut tx) = (Duration::ZERO, Duration::ZERO);
    let mut done = 0;
    let mut round = 0u64;
    while done < iters {
        let offs: Vec<u64> = (0..BATCH)
            .map(|k| black_box(((done + k) % BLOCKS) * 4096))
            .collect();
        for side in 0..2 {
            let t = Instant::now();
            if (side + round) % 2 == 0 {
                offs.iter().for_each(|&o| door(o));
                td += t.elapsed();
            } else {
                offs.iter().for_each(|&o| direct(o));
                tx += t.elapsed();
            }
        }
        done += BATCH;
        round += 1;
    }
    td.saturating_sub(tx).max(Duration::from_nanos(1))
}

fn bench(c: &mut Criterion) {
    let n = setup();
    let data = vec![0xa5u8; 4096];
    let mut buf = vec![0u8; 4096];
    let mut i = 0u64;
    c.bench_function("door/read-4k", |b| {
        b.iter(|| {
            i = (i + 1) % BLOCKS;
            n.read(black_box(i * 4096), &mut buf).unwrap();
        })
    });
    c.bench_function("direct/read-4k", |b| {
        b.iter(|| {
            i = (i + 1) % BLOCKS;
            n.driver().read(&n, black_box(i * 4096), &mut buf).unwrap();
        })
    });
    c.bench_function("door/write-4k", |b| {
        b.iter(|| {
            i = (i + 1) % BLOCKS;
            n.write(black_box(i * 4096), &data, WriteFlags::default())
                .unwrap();
        })
    });
    c.bench_function("direct/write-4k", |b| {
        b.iter(|| {
            i = (i + 1) % BLOCKS;
            n.driver()
                .write(&n, black_box(i * 4096), &data, WriteFlags::default())
                .unwrap();
        })
    });
    c.bench_function("overhead/read-4k", |b| {
        b.iter_custom(|iters| {
            paired(iters, |off| n.read(off, &mut buf).unwrap(), &mut |off| {
                let mut b2 = [0u8; 4096];
                n.driver().read(&n, off, &mut b2).unwrap();
                black_box(&b2);
            })
        })
    });
    c.bench_function("overhead/write-4k", |b| {
        b.iter_custom(|iters| {
            paired(
                iters,
                |off| n.write(off, &data, WriteFlags::default()).unwrap(),
                &mut |off| {
                    n.driver()
                        .write(&n, off, &data, WriteFlags::default())
                        .unwrap()
                },
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
