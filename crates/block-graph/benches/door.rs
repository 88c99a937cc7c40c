//! Overhead of the one door per 4 KiB request on the memory driver, against
//! calling the driver directly.
#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use block_graph::{Graph, WriteFlags};
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let g = Graph::new();
    let n = g
        .add_node(&json!({"driver": "memory", "node-name": "m", "size": 64u64 << 20, "cluster-size": 4096}))
        .unwrap();
    let data = vec![0xa5u8; 4096];
    for i in 0..256u64 {
        n.write(i * 4096, &data, WriteFlags::default()).unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let mut i = 0u64;
    c.bench_function("door/read-4k", |b| {
        b.iter(|| {
            i = (i + 1) % 256;
            n.read(black_box(i * 4096), &mut buf).unwrap();
        })
    });
    c.bench_function("direct/read-4k", |b| {
        b.iter(|| {
            i = (i + 1) % 256;
            n.driver().read(&n, black_box(i * 4096), &mut buf).unwrap();
        })
    });
    c.bench_function("door/write-4k", |b| {
        b.iter(|| {
            i = (i + 1) % 256;
            n.write(black_box(i * 4096), &data, WriteFlags::default())
                .unwrap();
        })
    });
    c.bench_function("direct/write-4k", |b| {
        b.iter(|| {
            i = (i + 1) % 256;
            n.driver()
                .write(&n, black_box(i * 4096), &data, WriteFlags::default())
                .unwrap();
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
