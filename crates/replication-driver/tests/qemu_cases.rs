//! QEMU's tests/unit/test-replication.c cases, with the correct expectations.

mod common;

use std::sync::Arc;
use std::time::Duration;

use block_graph::{BlockOp, ErrorKind as BlockErrorKind, PermPair, WriteFlags};
use common::*;
use replication_core::ReplicationMode;
use replication_driver::{
    build_primary_stack, ErrorKind, PrimaryStackOptions, Replication, ReplicationState,
};
use serde_json::json;

// ------------------------------------------------------------------ primary

fn primary() -> (
    block_graph::Graph,
    replication_core::Registry,
    Replication,
    block_graph::NodeRef,
) {
    let (graph, registry, _states) = graph();
    graph
        .add_node(&json!({"driver": "memory", "node-name": "remote", "size": DISK}))
        .unwrap();
    let filter = graph
        .add_node(&json!({"driver": "replication", "node-name": "prim0", "mode": "primary", "file": "remote"}))
        .unwrap();
    let repl = Replication::of(&filter).unwrap();
    (graph, registry, repl, filter)
}

#[test]
fn primary_read_write_before_and_after_start() {
    let (_g, registry, repl, filter) = primary();
    let mut buf = vec![0u8; 4096];
    let e = filter.read(0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::Io);
    let e = filter.write(0, &buf, WriteFlags::default()).unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::Io);

    registry.start_all(ReplicationMode::Primary).unwrap();
    assert_eq!(repl.state(), ReplicationState::Running);
    let e = filter.read(0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::Io);
    filter
        .write(0, &[0x22; 4096], WriteFlags::default())
        .unwrap();
    expect(&filter.file().unwrap(), 0, 4096, 0x22);
    assert_eq!(repl.status().bytes_forwarded, 4096);
}

#[test]
fn primary_stop_checkpoint_get_error() {
    let (_g, registry, repl, _filter) = primary();
    // Before start: get_error is "not running", checkpoint is a no-op.
    let e = repl.get_error().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotRunning);
    repl.checkpoint().unwrap();
    registry.start_all(ReplicationMode::Primary).unwrap();
    registry.checkpoint_all().unwrap();
    registry.get_error_all().unwrap();
    registry.stop_all(true).unwrap();
    assert_eq!(repl.state(), ReplicationState::Done);
    registry.checkpoint_all().unwrap();
    registry.get_error_all().unwrap();
}

#[test]
fn primary_failing_child_records_error_and_guest_never_sees_it() {
    let (graph, registry, _states) = graph();
    graph
        .add_node(&json!({"driver": "memory", "node-name": "local", "size": DISK}))
        .unwrap();
    let stack = build_primary_stack(
        &graph,
        &PrimaryStackOptions {
            quorum_name: "colo-disk0".into(),
            filter_name: "prim0".into(),
            local_disk: "local".into(),
            child: json!({"driver": "blkdebug", "node-name": "nbd-stand-in",
                          "image": {"driver": "memory", "size": DISK}}),
        },
    )
    .unwrap();
    let guest = graph
        .new_backend_named("guest", &stack.quorum, PermPair::READ_WRITE)
        .unwrap();
    let repl = Replication::of(&stack.filter).unwrap();
    registry.start_all(ReplicationMode::Primary).unwrap();
    bwrite(&guest, 0, MIB, 0x44);
    registry.get_error_all().unwrap();

    let bd = graph.node("nbd-stand-in").unwrap();
    bd.driver_as::<block_graph::drivers::blkdebug::BlkDebug>()
        .unwrap()
        .inject(block_graph::drivers::blkdebug::InjectRule::new(
            block_graph::drivers::blkdebug::IoMask::WRITE,
            5,
        ));
    for i in 0..16u64 {
        guest
            .write(i * MIB, &vec![0x55; MIB as usize], WriteFlags::default())
            .unwrap();
    }
    expect(&stack.local, 0, 16 * MIB, 0x55);
    let err = registry.get_error_all().unwrap_err();
    assert!(err.to_string().contains("I/O error occurred"), "{err}");
    assert_eq!(err.member(), Some("prim0"));
    let st = repl.status();
    assert_eq!(st.forward_errors, 16);
    assert_eq!(st.bytes_forwarded, MIB);
    // The remote copy kept only what reached it.
    expect(&graph.node("nbd-stand-in").unwrap(), 0, MIB, 0x44);
    expect(&graph.node("nbd-stand-in").unwrap(), MIB, MIB, 0x00);
    // The primary keeps working after stop; reads of the quorum come from local.
    registry.stop_all(false).unwrap();
    let mut b = vec![0u8; 4096];
    guest.read(0, &mut b).unwrap();
    assert_eq!(b, vec![0x55; 4096]);
}

// ---------------------------------------------------------------- secondary

#[test]
fn secondary_read_write_fail_before_start() {
    let s = secondary();
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        s.guest.read(0, &mut buf).unwrap_err().kind(),
        BlockErrorKind::Io
    );
    assert_eq!(
        s.guest
            .write(0, &buf, WriteFlags::default())
            .unwrap_err()
            .kind(),
        BlockErrorKind::Io
    );
    assert_eq!(s.repl.state(), ReplicationState::None);
    let e = s.repl.checkpoint().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotRunning);
    assert_eq!(
        s.repl.get_error().unwrap_err().kind(),
        ErrorKind::NotRunning
    );
}

/// start, forwarded 0x22 to [32, 64) MiB, top write 0x33 to [0, 32) MiB.
fn started_with_writes() -> Secondary {
    started_with_writes_on(secondary())
}

fn started_with_writes_on(s: Secondary) -> Secondary {
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    assert_eq!(s.repl.state(), ReplicationState::Running);
    expect(&s.stack.filter, 0, DISK, 0x11);

    bwrite(&s.export, 32 * MIB, 32 * MIB, 0x22);
    expect(&s.stack.filter, 32 * MIB, 32 * MIB, 0x11);
    expect(&s.stack.secondary, 32 * MIB, 32 * MIB, 0x22);

    bwrite(&s.guest, 0, 32 * MIB, 0x33);
    expect(&s.stack.filter, 0, 32 * MIB, 0x33);
    expect(&s.stack.secondary, 0, 32 * MIB, 0x11);
    assert_eq!(s.repl.status().clusters_copied_since_checkpoint, 512);
    assert_eq!(s.repl.status().bytes_forwarded, 32 * MIB);
    s
}

#[test]
fn secondary_start_forwarded_and_guest_writes() {
    let s = started_with_writes();
    s.registry.get_error_all().unwrap();
}

#[test]
fn secondary_checkpoint_drops_buffers() {
    let s = started_with_writes();
    s.registry.checkpoint_all().unwrap();
    expect(&s.stack.filter, 0, 32 * MIB, 0x11);
    expect(&s.stack.filter, 32 * MIB, 32 * MIB, 0x22);
    let st = s.repl.status();
    assert_eq!(st.checkpoint_epoch, 1);
    assert_eq!(st.clusters_copied_since_checkpoint, 0);
    assert!(st.last_checkpoint_at.is_some());
    // A new epoch: the next forwarded write copies again.
    bwrite(&s.export, 0, MIB, 0x44);
    expect(&s.stack.filter, 0, MIB, 0x11);
    assert_eq!(s.repl.status().clusters_copied_since_checkpoint, 16);
}

#[test]
fn secondary_checkpoint_and_failover_with_qcow2_active_and_hidden() {
    let s = started_with_writes_on(secondary_qcow2(DISK, false));
    assert_eq!(s.stack.active.driver_name(), "qcow2");
    s.registry.checkpoint_all().unwrap();
    expect(&s.stack.filter, 0, 32 * MIB, 0x11);
    expect(&s.stack.filter, 32 * MIB, 32 * MIB, 0x22);
    bwrite(&s.export, 0, 16 * MIB, 0x44);
    bwrite(&s.guest, 8 * MIB, 16 * MIB, 0x55);
    s.registry.stop_all(true).unwrap();
    assert!(s.repl.wait_failover(Duration::from_secs(60)));
    assert_eq!(s.repl.state(), ReplicationState::Done);
    expect(&s.stack.secondary, 0, 8 * MIB, 0x11);
    expect(&s.stack.secondary, 8 * MIB, 16 * MIB, 0x55);
    expect(&s.stack.secondary, 24 * MIB, 8 * MIB, 0x11);
    expect(&s.stack.secondary, 32 * MIB, 32 * MIB, 0x22);
    expect(&s.stack.filter, 8 * MIB, 16 * MIB, 0x55);
    s.registry.get_error_all().unwrap();
}

#[test]
fn secondary_failover_commits_checkpoint_state_plus_guest_writes() {
    let s = started_with_writes();
    s.registry.stop_all(true).unwrap();
    assert!(s.repl.wait_failover(Duration::from_secs(60)));
    assert_eq!(s.repl.state(), ReplicationState::Done);
    expect(&s.stack.filter, 0, 32 * MIB, 0x33);
    expect(&s.stack.filter, 32 * MIB, 32 * MIB, 0x11);
    expect(&s.stack.secondary, 0, 32 * MIB, 0x33);
    expect(&s.stack.secondary, 32 * MIB, 32 * MIB, 0x11);
    // Active and hidden are out of the path.
    let chain = s.graph.backing_chain(&s.stack.filter);
    let names: Vec<&str> = chain.iter().map(|n| n.name()).collect();
    assert_eq!(names, ["sec0", "secondary-disk"]);
    assert!(Arc::ptr_eq(
        &s.stack.filter.file().unwrap(),
        &s.stack.secondary
    ));
    assert_eq!(s.stack.filter.children().len(), 1);
    // The status is fine.
    s.registry.get_error_all().unwrap();
    assert_eq!(s.repl.status().error, None);
    assert!(s.repl.status().failover_duration.is_some());
    // The survivor accepts start(primary), checkpoint and stop, changing nothing.
    s.registry.start_all(ReplicationMode::Primary).unwrap();
    s.registry.checkpoint_all().unwrap();
    s.registry.stop_all(false).unwrap();
    s.registry.stop_all(true).unwrap();
    assert_eq!(s.repl.state(), ReplicationState::Done);
    expect(&s.stack.filter, 0, 32 * MIB, 0x33);
    expect(&s.stack.filter, 32 * MIB, 32 * MIB, 0x11);
    // The guest keeps writing, now straight to the secondary disk.
    bwrite(&s.guest, 0, MIB, 0x77);
    expect(&s.stack.secondary, 0, MIB, 0x77);
    // Op blockers lifted.
    for op in BlockOp::ALL {
        s.stack.filter.check_op(op).unwrap();
    }
}

#[test]
fn secondary_stop_without_failover_drops_buffers() {
    let s = started_with_writes();
    s.registry.stop_all(false).unwrap();
    assert_eq!(s.repl.state(), ReplicationState::Done);
    s.registry.get_error_all().unwrap();
    // The secondary disk is the primary's disk; buffers are gone.
    expect(&s.stack.secondary, 0, 32 * MIB, 0x11);
    expect(&s.stack.secondary, 32 * MIB, 32 * MIB, 0x22);
    expect(&s.stack.filter, 0, 32 * MIB, 0x11);
    expect(&s.stack.filter, 32 * MIB, 32 * MIB, 0x22);
    // The backup filter is gone: the secondary disk's only parent is hidden.
    let parents: Vec<String> = s
        .stack
        .secondary
        .parents()
        .iter()
        .map(|(p, _)| p.name().to_string())
        .collect();
    assert_eq!(parents, ["sec0-hidden"]);
    for op in BlockOp::ALL {
        s.stack.filter.check_op(op).unwrap();
    }
    // DONE: start, checkpoint, stop are accepted and do nothing.
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    s.registry.checkpoint_all().unwrap();
    s.registry.stop_all(true).unwrap();
    assert_eq!(s.repl.state(), ReplicationState::Done);
}
