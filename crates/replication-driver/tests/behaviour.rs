//! The issue's acceptance items beyond QEMU's own cases.

mod common;

use std::sync::Arc;
use std::time::Duration;

use block_graph::drivers::blkdebug::{BlkDebug, InjectRule, IoMask};
use block_graph::{BlockOp, ErrorKind as BlockErrorKind, Graph, Mapping, PermPair, WriteFlags};
use block_jobs::{BackupJob, BackupOptions, JobManager, MirrorJob, MirrorOptions};
use common::*;
use replication_core::ReplicationMode;
use replication_driver::{ErrorKind, Replication, ReplicationState, HIDDEN_ROLE, SECONDARY_ROLE};
use serde_json::json;

const CLUSTER: u64 = 64 * 1024;

fn blkdebug(g: &Graph, name: &str) -> Arc<block_graph::Node> {
    let n = g.node(name).unwrap();
    assert!(n.driver_as::<BlkDebug>().is_some());
    n
}

#[test]
fn open_options_are_checked() {
    let (g, _r, _s) = graph();
    g.add_node(&json!({"driver": "memory", "node-name": "d", "size": MIB}))
        .unwrap();
    let e = g
        .add_node(&json!({"driver": "replication", "node-name": "r", "mode": "primary", "top-id": "x", "file": "d"}))
        .unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::InvalidArgument);
    assert_eq!(
        e.context_str(),
        "The primary side does not support option top-id"
    );
    let e = g
        .add_node(
            &json!({"driver": "replication", "node-name": "r", "mode": "secondary", "file": "d"}),
        )
        .unwrap_err();
    assert!(e.to_string().contains("Missing the option top-id"), "{e}");
    for bad in [json!("tertiary"), json!(1), json!("Primary")] {
        let e = g
            .add_node(&json!({"driver": "replication", "node-name": "r", "mode": bad, "file": "d"}))
            .unwrap_err();
        let m = e.to_string();
        assert!(m.contains("primary") && m.contains("secondary"), "{m}");
    }
    let e = g
        .add_node(&json!({"driver": "replication", "node-name": "r", "file": "d"}))
        .unwrap_err();
    assert!(e.to_string().contains("Missing the option mode"), "{e}");
    let e = g
        .add_node(&json!({"driver": "replication", "node-name": "r", "mode": "primary", "file": "d", "bogus": 1}))
        .unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
    assert!(g.node("r").is_err());
}

#[test]
fn registers_with_registry_and_unregisters_on_removal() {
    let (g, registry, states) = graph();
    g.add_node(&json!({"driver": "memory", "node-name": "d", "size": MIB}))
        .unwrap();
    g.add_node(
        &json!({"driver": "replication", "node-name": "p0", "mode": "primary", "file": "d"}),
    )
    .unwrap();
    assert_eq!(registry.names(), ["p0"]);
    assert_eq!(states.participants().len(), 1);
    // A refused open leaves no member behind.
    let _ = g.add_node(&json!({"driver": "replication", "node-name": "p1", "mode": "primary", "file": "d", "x": 1}));
    assert_eq!(registry.names(), ["p0"]);
    g.remove_node("p0").unwrap();
    assert!(registry.is_empty());
    assert!(states.participants().is_empty());
}

#[test]
fn partial_cluster_copy_before_write() {
    let s = secondary();
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    let off = 5 * CLUSTER + 1024;
    s.export
        .write(off, &[0x22; 512], WriteFlags::default())
        .unwrap();
    expect(&s.stack.filter, 5 * CLUSTER, CLUSTER, 0x11);
    expect(&s.stack.secondary, off, 512, 0x22);
    expect(&s.stack.secondary, 5 * CLUSTER, 1024, 0x11);
    // The whole cluster was saved in the hidden disk, nothing else.
    let st = s.stack.hidden.block_status(5 * CLUSTER, CLUSTER).unwrap();
    assert!(st.mapping.is_allocated());
    assert_eq!(st.len, CLUSTER);
    assert_eq!(
        s.stack
            .hidden
            .block_status(6 * CLUSTER, CLUSTER)
            .unwrap()
            .mapping,
        Mapping::Unallocated
    );
    // A second forwarded write does not overwrite the saved copy.
    s.export
        .write(off, &[0x44; 512], WriteFlags::default())
        .unwrap();
    expect(&s.stack.filter, 5 * CLUSTER, CLUSTER, 0x11);
    expect(&s.stack.secondary, off, 512, 0x44);
    assert_eq!(s.repl.status().clusters_copied_since_checkpoint, 1);
    s.registry.checkpoint_all().unwrap();
    expect(&s.stack.filter, off, 512, 0x44);
    expect(&s.stack.filter, 5 * CLUSTER, 1024, 0x11);
}

#[test]
fn guest_data_wins_until_checkpoint() {
    let s = secondary();
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    bwrite(&s.guest, 3 * MIB, MIB, 0x33);
    bwrite(&s.export, 3 * MIB, MIB, 0x22);
    expect(&s.stack.filter, 3 * MIB, MIB, 0x33);
    expect(&s.stack.secondary, 3 * MIB, MIB, 0x22);
    // Overlapping partially: the guest part stays, the rest is the checkpoint.
    bwrite(&s.export, 2 * MIB + MIB / 2, MIB, 0x55);
    expect(&s.stack.filter, 2 * MIB, MIB, 0x11);
    expect(&s.stack.filter, 3 * MIB, MIB, 0x33);
    s.registry.checkpoint_all().unwrap();
    expect(&s.stack.filter, 2 * MIB, MIB / 2, 0x11);
    expect(&s.stack.filter, 2 * MIB + MIB / 2, MIB, 0x55);
    expect(&s.stack.filter, 3 * MIB + MIB / 2, MIB / 2, 0x22);
}

#[test]
fn stale_buffers_are_discarded_at_start() {
    let s = secondary();
    fill(&s.stack.active, 0, 4 * MIB, 0xaa);
    fill(&s.stack.hidden, 8 * MIB, 4 * MIB, 0xbb);
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    expect(&s.stack.filter, 0, DISK, 0x11);
    assert_eq!(
        s.stack.active.block_status(0, DISK).unwrap().mapping,
        Mapping::Unallocated
    );
}

fn assert_unstarted(s: &Secondary) {
    assert_eq!(s.repl.state(), ReplicationState::None);
    assert_eq!(s.stack.filter.children().len(), 1, "no extra children");
    for op in BlockOp::ALL {
        s.stack.filter.check_op(op).unwrap();
    }
    let parents: Vec<String> = s
        .stack
        .secondary
        .parents()
        .iter()
        .map(|(p, _)| p.name().to_string())
        .collect();
    assert_eq!(parents, ["sec0-hidden"], "no backup filter");
    let mut buf = [0u8; 512];
    assert!(s.guest.read(0, &mut buf).is_err());
}

#[test]
fn start_validation_errors_leave_the_node_unstarted() {
    // Started twice.
    let s = secondary_with(4 * MIB, false, None);
    s.repl.start(ReplicationMode::Secondary).unwrap();
    let e = s.repl.start(ReplicationMode::Secondary).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyStarted);
    assert!(e.to_string().contains("running or done"), "{e}");
    assert_eq!(s.repl.state(), ReplicationState::Running);

    // Wrong mode.
    let s = secondary_with(4 * MIB, false, None);
    let e = s.repl.start(ReplicationMode::Primary).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ModeMismatch);
    assert!(
        e.to_string().contains("needs secondary, but got primary"),
        "{e}"
    );
    assert_unstarted(&s);
    s.repl.start(ReplicationMode::Secondary).unwrap();
    expect(&s.stack.filter, 0, 4 * MIB, 0x11);
}

#[test]
fn start_validation_chain_errors() {
    let (g, _r, _s) = graph();
    // Active disk without backing.
    g.add_node(&json!({"driver": "memory", "node-name": "a1", "size": MIB}))
        .unwrap();
    let f = g
        .add_node(&json!({"driver": "replication", "node-name": "f1", "mode": "secondary", "top-id": "f1", "file": "a1"}))
        .unwrap();
    let e = Replication::of(&f)
        .unwrap()
        .start(ReplicationMode::Secondary)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadChain);
    assert!(
        e.to_string()
            .contains("Active disk 'a1' doesn't have backing file"),
        "{e}"
    );

    // Hidden disk without backing.
    g.add_node(&json!({"driver": "memory", "node-name": "h2", "size": MIB}))
        .unwrap();
    g.add_node(&json!({"driver": "memory", "node-name": "a2", "backing": "h2"}))
        .unwrap();
    let f = g
        .add_node(&json!({"driver": "replication", "node-name": "f2", "mode": "secondary", "top-id": "f2", "file": "a2"}))
        .unwrap();
    let e = Replication::of(&f)
        .unwrap()
        .start(ReplicationMode::Secondary)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Hidden disk 'h2' doesn't have backing file"),
        "{e}"
    );

    // Secondary disk without backend.
    g.add_node(&json!({"driver": "memory", "node-name": "s3", "size": MIB}))
        .unwrap();
    g.add_node(&json!({"driver": "memory", "node-name": "h3", "backing": "s3"}))
        .unwrap();
    g.add_node(&json!({"driver": "memory", "node-name": "a3", "backing": "h3"}))
        .unwrap();
    let f = g
        .add_node(&json!({"driver": "replication", "node-name": "f3", "mode": "secondary", "top-id": "f3", "file": "a3"}))
        .unwrap();
    let r = Replication::of(&f).unwrap();
    let e = r.start(ReplicationMode::Secondary).unwrap_err();
    assert!(
        e.to_string()
            .contains("The secondary disk 's3' doesn't have block backend"),
        "{e}"
    );
    assert_eq!(r.state(), ReplicationState::None);

    // Unequal lengths.
    g.add_node(&json!({"driver": "memory", "node-name": "s4", "size": MIB}))
        .unwrap();
    let _b4 = g
        .new_backend(&g.node("s4").unwrap(), PermPair::READ_WRITE)
        .unwrap();
    g.add_node(&json!({"driver": "memory", "node-name": "h4", "backing": "s4"}))
        .unwrap();
    g.add_node(&json!({"driver": "memory", "node-name": "a4", "backing": "h4", "size": 2 * MIB}))
        .unwrap();
    let f = g
        .add_node(&json!({"driver": "replication", "node-name": "f4", "mode": "secondary", "top-id": "f4", "file": "a4"}))
        .unwrap();
    let r = Replication::of(&f).unwrap();
    let e = r.start(ReplicationMode::Secondary).unwrap_err();
    assert!(e.to_string().contains("length are not the same"), "{e}");
    assert!(e.to_string().contains("'a4' 2097152"), "{e}");
    assert_eq!(r.state(), ReplicationState::None);

    // make_empty unsupported (raw active disk).
    g.add_node(&json!({"driver": "memory", "node-name": "s5", "size": MIB}))
        .unwrap();
    let _b5 = g
        .new_backend(&g.node("s5").unwrap(), PermPair::READ_WRITE)
        .unwrap();
    g.add_node(&json!({"driver": "memory", "node-name": "h5", "backing": "s5"}))
        .unwrap();
    g.add_node(&json!({"driver": "memory", "node-name": "a5", "backing": "h5"}))
        .unwrap();
    g.add_node(&json!({"driver": "raw", "node-name": "raw5", "file": "a5"}))
        .unwrap();
    let f = g
        .add_node(&json!({"driver": "replication", "node-name": "f5", "mode": "secondary", "top-id": "f5", "file": "raw5"}))
        .unwrap();
    let e = Replication::of(&f)
        .unwrap()
        .start(ReplicationMode::Secondary)
        .unwrap_err();
    // raw has no backing, so the chain check fires first.
    assert_eq!(e.kind(), ErrorKind::BadChain);
}

/// A full chain whose filter has the given top-id; the hidden disk starts
/// read-only so the test can see the flag restored.
fn chain_with_top(top_id: &str) -> Secondary {
    let mut o = replication_driver::SecondaryStackOptions::memory("sec0", "secondary-disk");
    o.top_id = Some(top_id.to_string());
    o.hidden = json!({"driver": "memory", "node-name": "sec0-hidden", "read-only": true});
    secondary_with(4 * MIB, false, Some(o))
}

#[test]
fn start_validation_top_id() {
    // Unknown node.
    let s = chain_with_top("nosuch");
    let e = s.repl.start(ReplicationMode::Secondary).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TopId);
    assert!(
        e.to_string().contains("top-id 'nosuch': no such node"),
        "{e}"
    );
    assert_unstarted(&s);
    assert!(s.stack.hidden.is_read_only(), "read-only flag restored");

    // Not a root node: the active disk has the filter as parent.
    let s = chain_with_top("sec0-active");
    let e = s.repl.start(ReplicationMode::Secondary).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TopId);
    assert!(e.to_string().contains("is not a root node"), "{e}");
    assert_unstarted(&s);
    assert!(s.stack.hidden.is_read_only());

    // A root node that does not reach the filter.
    let s = chain_with_top("other");
    s.graph
        .add_node(&json!({"driver": "memory", "node-name": "other", "size": 4 * MIB}))
        .unwrap();
    let e = s.repl.start(ReplicationMode::Secondary).unwrap_err();
    assert!(
        e.to_string()
            .contains("does not reach the replication node"),
        "{e}"
    );
    assert_unstarted(&s);

    // A root node above the filter (with a backend) is fine; hidden becomes writable.
    let s = chain_with_top("top0");
    drop(s.guest);
    let s = Secondary {
        guest: s
            .graph
            .new_backend(
                &s.graph
                    .add_node(&json!({"driver": "raw", "node-name": "top0", "file": "sec0"}))
                    .unwrap(),
                PermPair::READ_WRITE,
            )
            .unwrap(),
        ..s
    };
    s.repl.start(ReplicationMode::Secondary).unwrap();
    assert!(!s.stack.hidden.is_read_only());
    let top = s.graph.node("top0").unwrap();
    assert!(top.check_op(BlockOp::Resize).is_err());
    assert!(s
        .stack
        .filter
        .child(&block_graph::Role::Named(HIDDEN_ROLE.into()))
        .is_some());
    assert!(s
        .stack
        .filter
        .child(&block_graph::Role::Named(SECONDARY_ROLE.into()))
        .is_some());
    s.repl.stop(false).unwrap();
    assert!(s.stack.hidden.is_read_only(), "restored at stop");
    top.check_op(BlockOp::Resize).unwrap();
    assert_eq!(s.stack.filter.children().len(), 1);
}

#[test]
fn user_jobs_and_resize_on_top_refused_while_running() {
    let s = secondary_with(4 * MIB, false, None);
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    let jobs = JobManager::new();
    let top = &s.stack.filter;
    let target = s
        .graph
        .add_node(&json!({"driver": "memory", "node-name": "bk", "size": 4 * MIB}))
        .unwrap();
    let e = BackupJob::start(&jobs, &s.graph, top, &target, BackupOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains("in use by internal backup job"),
        "{e}"
    );
    let e = MirrorJob::start_active_commit(
        &jobs,
        &s.graph,
        top,
        &s.stack.secondary,
        MirrorOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("in use by internal backup job"),
        "{e}"
    );
    for op in [
        BlockOp::Stream,
        BlockOp::Resize,
        BlockOp::CommitSource,
        BlockOp::BackupSource,
    ] {
        let e = top.check_op(op).unwrap_err();
        assert_eq!(e.kind(), BlockErrorKind::Busy);
        assert!(
            e.to_string().contains("in use by internal backup job"),
            "{e}"
        );
    }
    s.registry.stop_all(true).unwrap();
    assert!(s.repl.wait_failover(Duration::from_secs(30)));
    assert_eq!(s.repl.state(), ReplicationState::Done);
    for op in [
        BlockOp::Stream,
        BlockOp::Resize,
        BlockOp::CommitSource,
        BlockOp::BackupSource,
    ] {
        top.check_op(op).unwrap();
    }
    let b = BackupJob::start(&jobs, &s.graph, top, &target, BackupOptions::default()).unwrap();
    b.job().cancel(true).unwrap();
    b.job().wait();
}

#[test]
fn failover_failure_keeps_the_guest_view_and_routes_writes() {
    let s = secondary_with(DISK, true, None);
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    bwrite(&s.guest, 0, 16 * MIB, 0x33);
    bwrite(&s.export, 32 * MIB, 16 * MIB, 0x22);
    let bd = blkdebug(&s.graph, "secondary-disk");
    bd.driver_as::<BlkDebug>()
        .unwrap()
        .inject(InjectRule::new(IoMask::WRITE | IoMask::WRITE_ZEROES, 5).range(40 * MIB, MIB));
    s.registry.stop_all(true).unwrap();
    assert!(s.repl.wait_failover(Duration::from_secs(60)));
    assert_eq!(s.repl.state(), ReplicationState::FailoverFailed);
    let e = s.registry.get_error_all().unwrap_err();
    assert!(e.to_string().contains("I/O error occurred"), "{e}");
    assert!(s
        .repl
        .status()
        .error
        .unwrap()
        .contains("failover commit failed"));
    // The guest still sees its view: its writes over the checkpoint state.
    expect(&s.stack.filter, 0, 16 * MIB, 0x33);
    expect(&s.stack.filter, 16 * MIB, 48 * MIB, 0x11);
    // Active and hidden are still in the path.
    assert!(Arc::ptr_eq(
        &s.stack.filter.file().unwrap(),
        &s.stack.active
    ));
    // A write where active/hidden hold data goes to the active disk.
    bwrite(&s.guest, 4 * MIB, CLUSTER, 0x55);
    expect(&s.stack.filter, 4 * MIB, CLUSTER, 0x55);
    let mut b = vec![0u8; CLUSTER as usize];
    s.stack.secondary.read(4 * MIB, &mut b).unwrap();
    assert!(
        b.iter().all(|x| *x != 0x55),
        "must not reach the secondary disk"
    );
    bwrite(&s.guest, 40 * MIB, CLUSTER, 0x56);
    expect(&s.stack.filter, 40 * MIB, CLUSTER, 0x56);
    // Elsewhere it goes straight to the secondary disk.
    bd.driver_as::<BlkDebug>().unwrap().clear_rules();
    bwrite(&s.guest, 20 * MIB, 2 * CLUSTER, 0x66);
    expect(&s.stack.secondary, 20 * MIB, 2 * CLUSTER, 0x66);
    expect(&s.stack.filter, 20 * MIB, 2 * CLUSTER, 0x66);
    assert_eq!(
        s.stack
            .active
            .block_status(20 * MIB, 2 * CLUSTER)
            .unwrap()
            .mapping,
        Mapping::Unallocated
    );
    // A straddling write splits.
    bwrite(&s.guest, 16 * MIB - CLUSTER, 2 * CLUSTER, 0x77);
    expect(&s.stack.filter, 16 * MIB - CLUSTER, 2 * CLUSTER, 0x77);
    expect(&s.stack.secondary, 16 * MIB, CLUSTER, 0x77);
    // Checkpoints and stops are refused or harmless; the top stays blocked.
    assert!(s.repl.checkpoint().is_err());
    assert!(s.stack.filter.check_op(BlockOp::Resize).is_err());
}

#[test]
fn copy_before_write_error_fails_the_forwarded_write() {
    let s = secondary_with(4 * MIB, true, None);
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    let bd = blkdebug(&s.graph, "secondary-disk");
    // The old data cannot be read: the copy fails, so must the write.
    bd.driver_as::<BlkDebug>()
        .unwrap()
        .inject(InjectRule::new(IoMask::READ, 5).range(MIB, CLUSTER).once());
    let e = s
        .export
        .write(MIB, &[0x22; 4096], WriteFlags::default())
        .unwrap_err();
    assert_eq!(e.kind(), BlockErrorKind::Io);
    expect(&s.stack.secondary, MIB, CLUSTER, 0x11);
    expect(&s.stack.filter, MIB, CLUSTER, 0x11);
    // Retried, it copies and lands.
    s.export
        .write(MIB, &[0x22; 4096], WriteFlags::default())
        .unwrap();
    expect(&s.stack.filter, MIB, CLUSTER, 0x11);
    expect(&s.stack.secondary, MIB, 4096, 0x22);
    // The replication itself is healthy.
    s.registry.get_error_all().unwrap();
}

#[test]
fn backup_job_ending_unexpectedly_is_an_error() {
    let s = secondary_with(4 * MIB, false, None);
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    let job = s.repl.backup_job().unwrap();
    assert!(job.is_internal());
    job.cancel(true).unwrap();
    job.wait();
    // The watcher records the error and undoes start (blockers, children).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // The buffers are marked invalid first; the error is recorded once the
    // clean-up is done.
    while !s
        .repl
        .get_error()
        .is_err_and(|e| e.to_string().contains("cancelled unexpectedly"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = s.repl.get_error().unwrap_err();
    assert!(e.to_string().contains("cancelled unexpectedly"), "{e}");
    for op in BlockOp::ALL {
        s.stack.filter.check_op(op).unwrap();
    }
    assert_eq!(s.stack.filter.children().len(), 1);
    let e = s.repl.checkpoint().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BackupCancelled);
    assert!(e
        .to_string()
        .contains("Backup job was cancelled unexpectedly"));
}

#[test]
fn close_while_running_stops_without_failover() {
    let s = secondary_with(4 * MIB, false, None);
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    bwrite(&s.export, 0, MIB, 0x22);
    bwrite(&s.guest, 2 * MIB, MIB, 0x33);
    let repl = s.repl.clone();
    drop(s.guest);
    s.graph.remove_node("sec0").unwrap();
    assert_eq!(repl.state(), ReplicationState::Done);
    assert!(s.registry.is_empty());
    // No failover: the secondary disk keeps the primary's data only.
    expect(&s.stack.secondary, 0, MIB, 0x22);
    expect(&s.stack.secondary, MIB, 3 * MIB, 0x11);
    let parents: Vec<String> = s
        .stack
        .secondary
        .parents()
        .iter()
        .map(|(p, _)| p.name().to_string())
        .collect();
    assert_eq!(parents, ["sec0-hidden"]);
}

#[test]
fn close_during_failover_cancels_the_commit_and_waits() {
    let s = secondary_with(DISK, true, None);
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    bwrite(&s.guest, 0, 32 * MIB, 0x33);
    let bd = blkdebug(&s.graph, "secondary-disk");
    bd.driver_as::<BlkDebug>()
        .unwrap()
        .add_delay(IoMask::WRITE, Duration::from_millis(200), false);
    s.registry.stop_all(true).unwrap();
    assert_eq!(s.repl.state(), ReplicationState::Failover);
    // A healthy failover in progress is not an error.
    s.registry.get_error_all().unwrap();
    let repl = s.repl.clone();
    drop(s.guest);
    s.graph.remove_node("sec0").unwrap();
    // When close returns the commit has stopped writing.
    let writes = s.stack.secondary.stats().write.ops;
    assert!(repl.wait_failover(Duration::from_secs(30)));
    assert_eq!(s.stack.secondary.stats().write.ops, writes);
    assert_eq!(repl.state(), ReplicationState::FailoverFailed);
    assert!(repl.status().error.unwrap().contains("cancelled"));
    // The secondary disk was not switched under anyone: its parent is hidden.
    let parents: Vec<String> = s
        .stack
        .secondary
        .parents()
        .iter()
        .map(|(p, _)| p.name().to_string())
        .collect();
    assert_eq!(parents, ["sec0-hidden"]);
}

#[test]
fn checkpoint_epoch_travels_in_the_state_stream() {
    let s = secondary_with(4 * MIB, false, None);
    let (pg, pr, ps) = graph();
    pg.add_node(&json!({"driver": "memory", "node-name": "remote", "size": 4 * MIB}))
        .unwrap();
    let pf = pg
        .add_node(&json!({"driver": "replication", "node-name": "prim0", "mode": "primary", "file": "remote"}))
        .unwrap();
    let prim = Replication::of(&pf).unwrap();
    pr.start_all(ReplicationMode::Primary).unwrap();
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    for epoch in 0..3u64 {
        let mut stream = Vec::new();
        // setup (empty) and complete sections.
        assert_eq!(ps.save(&mut stream).unwrap(), 2);
        assert_eq!(s.states.load(&mut stream.as_slice()).unwrap(), 2);
        pr.checkpoint_all().unwrap();
        s.registry.checkpoint_all().unwrap();
        assert_eq!(prim.status().checkpoint_epoch, epoch + 1);
        assert_eq!(s.repl.status().checkpoint_epoch, epoch + 1);
    }
    // One side checkpointed once more: the next stream is refused.
    s.registry.checkpoint_all().unwrap();
    let mut stream = Vec::new();
    ps.save(&mut stream).unwrap();
    let e = s.states.load(&mut stream.as_slice()).unwrap_err();
    assert!(
        e.to_string()
            .contains("checkpoint epoch mismatch: primary 'prim0' is at 3, secondary 'sec0' at 4"),
        "{e}"
    );
    // The secondary saves nothing.
    let mut out = Vec::new();
    s.states.save(&mut out).unwrap();
    let mut nothing = Vec::new();
    let (_g2, _r2, empty) = graph();
    empty.save(&mut nothing).unwrap();
    assert_eq!(out, nothing);
}
