//! Cost of the replication filter's operations (figures in the crate README):
//! * a secondary checkpoint with 1,000 dirty 64 KiB clusters (forwarded
//!   writes copied to the hidden disk, and as many guest writes in the
//!   active disk), memory and qcow2 active/hidden disks;
//! * the same with 10 dirty clusters on a 1 TiB virtual disk;
//! * failover (stop(failover=true) until the commit is done) with 64 MiB of
//!   buffered data (32 MiB of guest writes in active, 32 MiB of copies in
//!   hidden).

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::time::Duration;

use block_graph::{Backend, Graph, PermPair, WriteFlags};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use replication_core::{Registry, ReplicationMode};
use replication_driver::{
    build_secondary_stack, register, Replication, SecondaryStack, SecondaryStackOptions,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 64 * 1024;

struct Setup {
    _graph: Graph,
    registry: Registry,
    stack: SecondaryStack,
    export: Backend,
    guest: Backend,
    repl: Replication,
}

fn qcow2_def(graph: &Graph, name: &str, size: u64) -> Value {
    let img = qcow_lite::Qcow2::create(
        qcow_lite::storage::MemStorage::new(),
        &qcow_lite::CreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    img.close().unwrap();
    let bytes = img.storage().to_vec();
    let file = graph
        .add_node(
            &json!({"driver": "memory", "node-name": format!("{name}-file"), "size": bytes.len()}),
        )
        .unwrap();
    file.write(0, &bytes, WriteFlags::default()).unwrap();
    json!({"driver": "qcow2", "node-name": name, "file": format!("{name}-file")})
}

fn setup(size: u64, qcow2: bool) -> Setup {
    let graph = Graph::new();
    let registry = Registry::new();
    register(&graph, &registry, None);
    qcow_lite::register(&graph);
    let disk = graph
        .add_node(&json!({"driver": "memory", "node-name": "secondary-disk", "size": size}))
        .unwrap();
    let export = graph.new_backend(&disk, PermPair::READ_WRITE).unwrap();
    let mut opts = SecondaryStackOptions::memory("sec0", "secondary-disk");
    if qcow2 {
        opts.hidden = qcow2_def(&graph, "sec0-hidden", size);
        opts.active = qcow2_def(&graph, "sec0-active", size);
    }
    let stack = build_secondary_stack(&graph, &opts).unwrap();
    let guest = graph
        .new_backend(&stack.filter, PermPair::READ_WRITE)
        .unwrap();
    let repl = Replication::of(&stack.filter).unwrap();
    registry.start_all(ReplicationMode::Secondary).unwrap();
    Setup {
        _graph: graph,
        registry,
        stack,
        export,
        guest,
        repl,
    }
}

/// `n` forwarded writes and `n` guest writes of one cluster each, spread
/// over the disk (every 7th cluster, wrapping), then checkpoint-ready.
fn dirty(s: &Setup, n: u64, size: u64) {
    let data = vec![0x5a; CLUSTER as usize];
    let nb = size / CLUSTER;
    let stride = (nb / (2 * n)).max(1);
    for i in 0..n {
        let c = (2 * i * stride) % nb;
        s.export
            .write(c * CLUSTER, &data, WriteFlags::default())
            .unwrap();
        let c = (2 * i * stride + stride) % nb;
        s.guest
            .write(c * CLUSTER, &data, WriteFlags::default())
            .unwrap();
    }
    assert_eq!(s.repl.status().clusters_copied_since_checkpoint, n);
}

fn checkpoint(c: &mut Criterion) {
    let mut g = c.benchmark_group("secondary_checkpoint");
    g.sample_size(30);
    g.measurement_time(Duration::from_secs(5));
    for (label, size, n) in [
        ("1000_dirty_clusters_1GiB", 1u64 << 30, 1000u64),
        ("10_dirty_clusters_1TiB", 1u64 << 40, 10u64),
    ] {
        for qcow2 in [false, true] {
            let s = setup(size, qcow2);
            let name = format!("{label}/{}", if qcow2 { "qcow2" } else { "memory" });
            g.bench_function(&name, |b| {
                b.iter_batched(
                    || dirty(&s, n, size),
                    |()| s.registry.checkpoint_all().unwrap(),
                    BatchSize::PerIteration,
                )
            });
            let _ = s.stack.active.len();
        }
    }
    g.finish();
}

fn failover(c: &mut Criterion) {
    let mut g = c.benchmark_group("failover");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    for qcow2 in [false, true] {
        let name = format!("64MiB_buffered/{}", if qcow2 { "qcow2" } else { "memory" });
        g.bench_function(&name, |b| {
            b.iter_batched(
                || {
                    let size = 64 * MIB;
                    let s = setup(size, qcow2);
                    let data = vec![0x33; MIB as usize];
                    for i in 0..32 {
                        s.guest
                            .write(i * MIB, &data, WriteFlags::default())
                            .unwrap();
                        s.export
                            .write((32 + i) * MIB, &data, WriteFlags::default())
                            .unwrap();
                    }
                    s
                },
                |s| {
                    s.registry.stop_all(true).unwrap();
                    assert!(s.repl.wait_failover(Duration::from_secs(600)));
                    s
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, checkpoint, failover);
criterion_main!(benches);
