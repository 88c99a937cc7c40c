//! The in-process replication pair shared by the fault matrix and the link
//! tests: the primary's graph (quorum over the local disk and
//! replication(primary) over blkdebug over the NBD client) and the
//! secondary's graph (replication(secondary) over qcow2 active and hidden
//! disks, each over a blkdebug image file, over the blkdebug secondary disk,
//! which an NBD server exports to the primary), on a Unix socket.

#![allow(dead_code)] // each test file uses a different subset

use std::path::PathBuf;
use std::time::Duration;

use block_graph::{Backend, Graph, NodeRef, PermPair, WriteFlags};
use nbd::NbdServer;
use replication_core::{Registry, ReplicationMode, StateRegistry};
use replication_driver::{
    build_primary_stack, build_secondary_stack, PrimaryStackOptions, Replication,
    SecondaryStackOptions,
};
use serde_json::json;

pub const MIB: u64 = 1 << 20;
pub const SIZE: u64 = 4 * MIB;
pub const CHUNK: u64 = 64 * 1024;

pub struct Side {
    pub graph: Graph,
    pub registry: Registry,
    pub _states: StateRegistry,
    pub guest: Backend,
    pub repl: Replication,
}

pub struct Pair {
    pub _tmp: tempfile::TempDir,
    pub sock: PathBuf,
    pub pri: Side,
    pub sec: Side,
    pub _server: NbdServer,
    pub local: NodeRef,
    pub secondary: NodeRef,
    pub sec_filter: NodeRef,
}

pub fn side_graph() -> (Graph, Registry, StateRegistry) {
    let graph = Graph::new();
    let registry = Registry::new();
    let states = StateRegistry::new();
    replication_driver::register(&graph, &registry, Some(&states));
    qcow_lite::register(&graph);
    nbd::blockdev::register(&graph);
    (graph, registry, states)
}

pub fn fill(node: &NodeRef, byte: u8) {
    node.write(0, &vec![byte; SIZE as usize], WriteFlags::default())
        .unwrap();
}

/// A qcow2 disk (no backing set) whose image file is blkdebug over memory.
pub fn qcow2_over_blkdebug(g: &Graph, name: &str) -> serde_json::Value {
    let img = qcow_lite::Qcow2::create(
        qcow_lite::storage::MemStorage::new(),
        &qcow_lite::CreateOptions {
            size: SIZE,
            ..Default::default()
        },
    )
    .unwrap();
    img.close().unwrap();
    let bytes = img.storage().to_vec();
    let mem = g
        .add_node(
            &json!({"driver": "memory", "node-name": format!("{name}-mem"), "size": bytes.len()}),
        )
        .unwrap();
    mem.write(0, &bytes, WriteFlags::default()).unwrap();
    g.add_node(
        &json!({"driver": "blkdebug", "node-name": format!("{name}-file"),
                      "image": format!("{name}-mem")}),
    )
    .unwrap();
    json!({"driver": "qcow2", "node-name": name, "file": format!("{name}-file")})
}

/// A started pair; the NBD client waits up to `reconnect_delay` for a lost
/// connection to come back.
pub fn pair_with(reconnect_delay: Duration) -> Pair {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("s.sock");
    // Secondary.
    let (g2, r2, s2) = side_graph();
    g2.add_node(&json!({"driver": "blkdebug", "node-name": "secondary-disk",
                        "image": {"driver": "memory", "node-name": "secondary-mem", "size": SIZE}}))
        .unwrap();
    let secondary = g2.node("secondary-disk").unwrap();
    fill(&secondary, 0x11);
    let server = NbdServer::default();
    server.listen_unix(&sock).unwrap();
    nbd::blockdev::export_node(&server, &g2, "secondary-disk", "sec-disk", false, None).unwrap();
    let opts = SecondaryStackOptions {
        filter_name: "sec0".into(),
        top_id: None,
        secondary_disk: "secondary-disk".into(),
        hidden: qcow2_over_blkdebug(&g2, "hidden"),
        active: qcow2_over_blkdebug(&g2, "active"),
    };
    let stack = build_secondary_stack(&g2, &opts).unwrap();
    let sguest = g2
        .new_backend_named("sec-guest", &stack.filter, PermPair::READ_WRITE)
        .unwrap();
    let srepl = Replication::of(&stack.filter).unwrap();
    r2.start_all(ReplicationMode::Secondary).unwrap();
    // Primary.
    let (g1, r1, s1) = side_graph();
    g1.add_node(&json!({"driver": "blkdebug", "node-name": "local",
                        "image": {"driver": "memory", "node-name": "local-mem", "size": SIZE}}))
        .unwrap();
    let local = g1.node("local").unwrap();
    fill(&local, 0x11);
    g1.add_node(&json!({"driver": "blkdebug", "node-name": "nbd-link",
                        "image": {"driver": "nbd", "node-name": "nbd-client", "export": "sec-disk",
                                  "server": {"type": "unix", "path": sock},
                                  "reconnect-delay": reconnect_delay.as_secs()}}))
        .unwrap();
    let pstack = build_primary_stack(
        &g1,
        &PrimaryStackOptions {
            quorum_name: "colo-disk0".into(),
            filter_name: "rep-p".into(),
            local_disk: "local".into(),
            child: json!("nbd-link"),
        },
    )
    .unwrap();
    let pguest = g1
        .new_backend_named("pri-guest", &pstack.quorum, PermPair::READ_WRITE)
        .unwrap();
    let prepl = Replication::of(&pstack.filter).unwrap();
    r1.start_all(ReplicationMode::Primary).unwrap();
    Pair {
        _tmp: tmp,
        sock,
        pri: Side {
            graph: g1,
            registry: r1,
            _states: s1,
            guest: pguest,
            repl: prepl,
        },
        sec: Side {
            graph: g2,
            registry: r2,
            _states: s2,
            guest: sguest,
            repl: srepl,
        },
        _server: server,
        local,
        secondary,
        sec_filter: stack.filter,
    }
}

/// A started pair whose NBD client fails requests at once when the link is lost.
pub fn pair() -> Pair {
    pair_with(Duration::ZERO)
}
