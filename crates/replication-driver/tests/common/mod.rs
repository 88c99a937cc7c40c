//! Shared test setups: a 64 MiB secondary disk filled with 0x11 and exported
//! (a backend standing in for the NBD export), the secondary stack over it,
//! and a guest backend on the filter.

#![allow(dead_code)]

use block_graph::{Backend, Graph, NodeRef, PermPair, WriteFlags};
use replication_core::{Registry, StateRegistry};
use replication_driver::{
    build_secondary_stack, register, Replication, SecondaryStack, SecondaryStackOptions,
};
use serde_json::{json, Value};

pub const MIB: u64 = 1 << 20;
pub const DISK: u64 = 64 * MIB;

pub struct Secondary {
    pub graph: Graph,
    pub registry: Registry,
    pub states: StateRegistry,
    pub stack: SecondaryStack,
    /// The NBD export of the secondary disk: "forwarded writes" go here.
    pub export: Backend,
    /// The secondary guest's device on the filter (the top).
    pub guest: Backend,
    pub repl: Replication,
}

/// Fills `[off, off+len)` of `node` with `byte` in 4 MiB writes.
pub fn fill(node: &NodeRef, off: u64, len: u64, byte: u8) {
    let chunk = vec![byte; (4 * MIB).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        node.write(off + done, &chunk[..n], WriteFlags::default())
            .unwrap();
        done += n as u64;
    }
}

/// Writes `byte` over a range through a backend.
pub fn bwrite(b: &Backend, off: u64, len: u64, byte: u8) {
    let chunk = vec![byte; (4 * MIB).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        b.write(off + done, &chunk[..n], WriteFlags::default())
            .unwrap();
        done += n as u64;
    }
}

/// Reads a range of a node and checks every byte is `byte`.
pub fn expect(node: &NodeRef, off: u64, len: u64, byte: u8) {
    let mut buf = vec![0u8; (4 * MIB).min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        node.read(off + done, &mut buf[..n]).unwrap();
        if let Some(i) = buf[..n].iter().position(|b| *b != byte) {
            panic!(
                "node '{}' at offset {}: expected {byte:#04x}, found {:#04x}",
                node.name(),
                off + done + i as u64,
                buf[i]
            );
        }
        done += n as u64;
    }
}

/// A graph with the replication driver registered.
pub fn graph() -> (Graph, Registry, StateRegistry) {
    let graph = Graph::new();
    let registry = Registry::new();
    let states = StateRegistry::new();
    register(&graph, &registry, Some(&states));
    (graph, registry, states)
}

/// The secondary disk definition: memory, or blkdebug over memory.
pub fn secondary_disk(graph: &Graph, size: u64, blkdebug: bool) -> NodeRef {
    let def: Value = if blkdebug {
        json!({"driver": "blkdebug", "node-name": "secondary-disk",
               "image": {"driver": "memory", "size": size}})
    } else {
        json!({"driver": "memory", "node-name": "secondary-disk", "size": size})
    };
    graph.add_node(&def).unwrap()
}

/// The usual secondary setup (not started).
pub fn secondary_with(size: u64, blkdebug: bool, opts: Option<SecondaryStackOptions>) -> Secondary {
    let (graph, registry, states) = graph();
    let disk = secondary_disk(&graph, size, blkdebug);
    fill(&disk, 0, size, 0x11);
    let export = graph
        .new_backend_named("nbd-export", &disk, PermPair::READ_WRITE)
        .unwrap();
    let opts = opts.unwrap_or_else(|| SecondaryStackOptions::memory("sec0", "secondary-disk"));
    let stack = build_secondary_stack(&graph, &opts).unwrap();
    let guest = graph
        .new_backend_named("guest", &stack.filter, PermPair::READ_WRITE)
        .unwrap();
    let repl = Replication::of(&stack.filter).unwrap();
    Secondary {
        graph,
        registry,
        states,
        stack,
        export,
        guest,
        repl,
    }
}

/// A `memory` node holding a fresh qcow2 image of `size` bytes, and the
/// `qcow2` definition opening it (without backing).
pub fn qcow2_in_memory(graph: &Graph, name: &str, size: u64) -> Value {
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

/// Secondary stack options with qcow2 active and hidden disks over memory.
pub fn qcow2_options(graph: &Graph, size: u64) -> SecondaryStackOptions {
    SecondaryStackOptions {
        filter_name: "sec0".into(),
        top_id: None,
        secondary_disk: "secondary-disk".into(),
        hidden: qcow2_in_memory(graph, "sec0-hidden", size),
        active: qcow2_in_memory(graph, "sec0-active", size),
    }
}

/// The secondary setup with qcow2 active and hidden disks.
pub fn secondary_qcow2(size: u64, blkdebug: bool) -> Secondary {
    let (graph, registry, states) = graph();
    qcow_lite::register(&graph);
    let disk = secondary_disk(&graph, size, blkdebug);
    fill(&disk, 0, size, 0x11);
    let export = graph
        .new_backend_named("nbd-export", &disk, PermPair::READ_WRITE)
        .unwrap();
    let opts = qcow2_options(&graph, size);
    let stack = build_secondary_stack(&graph, &opts).unwrap();
    let guest = graph
        .new_backend_named("guest", &stack.filter, PermPair::READ_WRITE)
        .unwrap();
    let repl = Replication::of(&stack.filter).unwrap();
    Secondary {
        graph,
        registry,
        states,
        stack,
        export,
        guest,
        repl,
    }
}

pub fn secondary() -> Secondary {
    secondary_with(DISK, false, None)
}

/// A qcow2 image (no backing) whose file is blkdebug (`{name}-file`) over
/// memory.
pub fn qcow2_over_blkdebug(graph: &Graph, name: &str, size: u64) -> Value {
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
    let mem = graph
        .add_node(
            &json!({"driver": "memory", "node-name": format!("{name}-mem"), "size": bytes.len()}),
        )
        .unwrap();
    mem.write(0, &bytes, WriteFlags::default()).unwrap();
    graph
        .add_node(
            &json!({"driver": "blkdebug", "node-name": format!("{name}-file"),
                          "image": format!("{name}-mem")}),
        )
        .unwrap();
    json!({"driver": "qcow2", "node-name": name, "file": format!("{name}-file")})
}

/// The secondary setup (not started) with qcow2 active ("sec0-active") and
/// hidden ("sec0-hidden") disks whose image files are blkdebug nodes
/// ("sec0-active-file", "sec0-hidden-file") over memory, over a memory
/// secondary disk filled with 0x11.
pub fn secondary_qcow2_blkdebug(size: u64) -> Secondary {
    let (graph, registry, states) = graph();
    qcow_lite::register(&graph);
    let disk = secondary_disk(&graph, size, false);
    fill(&disk, 0, size, 0x11);
    let export = graph
        .new_backend_named("nbd-export", &disk, PermPair::READ_WRITE)
        .unwrap();
    let opts = SecondaryStackOptions {
        filter_name: "sec0".into(),
        top_id: None,
        secondary_disk: "secondary-disk".into(),
        hidden: qcow2_over_blkdebug(&graph, "sec0-hidden", size),
        active: qcow2_over_blkdebug(&graph, "sec0-active", size),
    };
    let stack = build_secondary_stack(&graph, &opts).unwrap();
    let guest = graph
        .new_backend_named("guest", &stack.filter, PermPair::READ_WRITE)
        .unwrap();
    let repl = Replication::of(&stack.filter).unwrap();
    Secondary {
        graph,
        registry,
        states,
        stack,
        export,
        guest,
        repl,
    }
}
