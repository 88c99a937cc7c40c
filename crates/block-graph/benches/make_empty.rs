//! `make_empty` of a `memory` node holding 1,000 dirty 64 KiB clusters (a COLO
//! checkpoint of the active or hidden disk), and a whole checkpoint period
//! (rewrite the 1,000 clusters, then make_empty), so a cost moved from
//! make_empty into the following writes shows up too.
#![allow(missing_docs)] // criterion_group! generates an undocumented pub fn

use block_graph::{Graph, NodeRef, WriteFlags};
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;
use std::time::{Duration, Instant};

const CLUSTERS: u64 = 1000;
const CS: u64 = 64 * 1024;

fn setup() -> (Graph, NodeRef) {
    let g = Graph::new();
    let n = g
        .add_node(&json!({"driver": "memory", "node-name": "active", "size": 1u64 << 30}))
        .unwrap();
    (g, n)
}

/// Dirties `CLUSTERS` clusters, spread over the disk.
fn dirty(n: &NodeRef, data: &[u8]) {
    for i in 0..CLUSTERS {
        n.write(i * 2 * CS, data, WriteFlags::default()).unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let data = vec![0x5au8; CS as usize];
    let (_g, n) = setup();
    let mut grp = c.benchmark_group("memory");
    grp.sample_size(20);
    grp.bench_function("make_empty-1000x64k", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                dirty(&n, &data);
                let t0 = Instant::now();
                n.make_empty().unwrap();
                t += t0.elapsed();
            }
            t
        })
    });
    grp.bench_function("dirty+make_empty-1000x64k", |b| {
        b.iter(|| {
            dirty(&n, &data);
            n.make_empty().unwrap();
        })
    });
    grp.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
