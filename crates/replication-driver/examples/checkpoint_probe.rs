//! Times single secondary checkpoints with 1,000 dirty 64 KiB clusters
//! (1,000 forwarded writes copied into the hidden disk and 1,000 guest
//! clusters in the active disk) on a 1 GiB memory-backed stack.
//!
//! `cargo run --release -p replication-driver --example checkpoint_probe`

use std::time::Instant;

use block_graph::{Graph, PermPair, WriteFlags};
use replication_core::{Registry, ReplicationMode};
use replication_driver::{build_secondary_stack, register, SecondaryStackOptions};
use serde_json::json;

fn main() {
    let size = 1u64 << 30;
    let cluster = 65536u64;
    let graph = Graph::new();
    let registry = Registry::new();
    register(&graph, &registry, None);
    let disk = graph
        .add_node(&json!({"driver": "memory", "node-name": "secondary-disk", "size": size}))
        .expect("secondary disk");
    let export = graph
        .new_backend(&disk, PermPair::READ_WRITE)
        .expect("export");
    let opts = SecondaryStackOptions::memory("sec0", "secondary-disk");
    let stack = build_secondary_stack(&graph, &opts).expect("stack");
    let guest = graph
        .new_backend(&stack.filter, PermPair::READ_WRITE)
        .expect("guest");
    registry
        .start_all(ReplicationMode::Secondary)
        .expect("start");
    for round in 0..5u8 {
        let data = vec![round + 1; cluster as usize];
        for i in 0..1000u64 {
            export
                .write(i * 14 * cluster, &data, WriteFlags::default())
                .expect("forwarded write");
            guest
                .write((i * 14 + 7) * cluster, &data, WriteFlags::default())
                .expect("guest write");
        }
        let t = Instant::now();
        registry.checkpoint_all().expect("checkpoint");
        println!("checkpoint {round}: {:?}", t.elapsed());
    }
}
