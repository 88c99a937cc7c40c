//! A secondary checkpoint that cannot empty the active or the hidden disk
//! (blkdebug under their qcow2 images): the buffers are marked invalid,
//! secondary guest I/O fails instead of showing a mix of two checkpoints,
//! a retried checkpoint restores the normal view, and a failover from the
//! failed state yields exactly the checkpoint state.
//!
//! Layout (64 MiB, secondary disk 0x11): in the epoch before the failed
//! checkpoint the guest writes 0x33 to [0, 4) MiB and the primary forwards
//! 0x22 to [8, 12) MiB (the hidden disk keeps 0x11 copies there). The
//! checkpoint state C is then: 0x11 everywhere but 0x22 in [8, 12) MiB.
//! After the failed checkpoint the primary forwards 0x45 to [8, 9) MiB and
//! 0x44 to [16, 20) MiB.

mod common;

use std::sync::Arc;
use std::time::Duration;

use block_graph::drivers::blkdebug::{BlkDebug, InjectRule, IoMask};
use block_graph::{NodeRef, WriteFlags};
use common::*;
use replication_core::ReplicationMode;
use replication_driver::{ErrorKind, Replication, ReplicationState};
use serde_json::json;

/// Started secondary with qcow2 active ("sec0-active") and hidden
/// ("sec0-hidden") disks over blkdebug files, and the first epoch's data.
fn started() -> Secondary {
    let s = secondary_qcow2_blkdebug(DISK);
    s.registry.start_all(ReplicationMode::Secondary).unwrap();
    bwrite(&s.guest, 0, 4 * MIB, 0x33);
    bwrite(&s.export, 8 * MIB, 4 * MIB, 0x22);
    expect(&s.stack.filter, 0, 4 * MIB, 0x33);
    expect(&s.stack.filter, 8 * MIB, 4 * MIB, 0x11);
    s
}

fn bd(s: &Secondary, file: &str) -> Arc<block_graph::Node> {
    let n = s.graph.node(file).unwrap();
    assert!(n.driver_as::<BlkDebug>().is_some());
    n
}

fn inject(n: &NodeRef, mask: IoMask) {
    n.driver_as::<BlkDebug>()
        .unwrap()
        .inject(InjectRule::new(mask, 5));
}

fn clear(n: &NodeRef) {
    n.driver_as::<BlkDebug>().unwrap().clear_rules();
}

/// Checks the failed state: error names the disk, status and get_error say
/// the buffers are invalid, the guest's reads and writes fail.
fn assert_failed_checkpoint(s: &Secondary, disk: &str) {
    let e = s.repl.checkpoint().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BuffersInvalid, "{e}");
    assert!(e.to_string().contains(&format!("disk '{disk}'")), "{e}");
    assert_eq!(s.repl.state(), ReplicationState::Running);
    // The checkpoint's state is established (the epoch advances with the
    // primary's); only the buffers could not be emptied.
    assert_eq!(s.repl.status().checkpoint_epoch, 1);
    let why = s.repl.buffers_invalid().expect("buffers marked invalid");
    assert!(why.contains(disk), "{why}");
    assert_eq!(s.repl.status().buffers_invalid, Some(why.clone()));
    assert_eq!(
        s.repl.status().error,
        Some(format!("secondary buffers invalid: {why}"))
    );
    let e = s.repl.get_error().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BuffersInvalid, "{e}");
    let mut b = vec![0u8; 4096];
    for off in [0, 8 * MIB, 32 * MIB] {
        assert!(s.guest.read(off, &mut b).is_err(), "guest read at {off}");
    }
    assert!(s
        .guest
        .write(MIB, &[0x66; 4096], WriteFlags::default())
        .is_err());
}

/// The secondary disk as the checkpoint state C left it, plus what the
/// primary forwarded since (`after`).
fn expect_secondary_disk(node: &NodeRef, after: bool) {
    expect(node, 0, 8 * MIB, 0x11);
    if after {
        expect(node, 8 * MIB, MIB, 0x45);
    } else {
        expect(node, 8 * MIB, MIB, 0x22);
    }
    expect(node, 9 * MIB, 3 * MIB, 0x22);
    expect(node, 12 * MIB, 4 * MIB, 0x11);
    expect(node, 16 * MIB, 4 * MIB, if after { 0x44 } else { 0x11 });
    expect(node, 20 * MIB, DISK - 20 * MIB, 0x11);
}

fn forward_after_failed_checkpoint(s: &Secondary) {
    bwrite(&s.export, 8 * MIB, MIB, 0x45);
    bwrite(&s.export, 16 * MIB, 4 * MIB, 0x44);
}

fn retry_succeeds(s: &Secondary) {
    let before = s.repl.status().checkpoint_epoch;
    s.repl.checkpoint().unwrap();
    assert_eq!(s.repl.buffers_invalid(), None);
    s.repl.get_error().unwrap();
    assert_eq!(s.repl.status().error, None);
    assert_eq!(s.repl.status().checkpoint_epoch, before + 1);
    // The view is exactly the secondary disk (all forwarded writes).
    expect_secondary_disk(&s.stack.secondary, true);
    expect_secondary_disk(&s.stack.filter, true);
    // Guest I/O works again and stays off the secondary disk.
    bwrite(&s.guest, 24 * MIB, MIB, 0x66);
    expect(&s.stack.filter, 24 * MIB, MIB, 0x66);
    expect(&s.stack.secondary, 24 * MIB, MIB, 0x11);
}

fn failover_yields_checkpoint_state(s: &Secondary) {
    s.repl.stop(true).unwrap();
    assert!(s.repl.wait_failover(Duration::from_secs(30)));
    assert_eq!(s.repl.state(), ReplicationState::Done);
    assert_eq!(s.repl.buffers_invalid(), None);
    s.repl.get_error().unwrap();
    // Nothing of active or hidden was committed; the primary's writes since
    // the checkpoint are undone: exactly C.
    assert!(Arc::ptr_eq(
        &s.stack.filter.file().unwrap(),
        &s.stack.secondary
    ));
    expect_secondary_disk(&s.stack.secondary, false);
    expect_secondary_disk(&s.stack.filter, false);
    // The promoted disk takes the guest's writes.
    bwrite(&s.guest, 24 * MIB, MIB, 0x66);
    expect(&s.stack.secondary, 24 * MIB, MIB, 0x66);
    // The survivor accepts start/checkpoint/stop as no-ops.
    s.repl.checkpoint().unwrap();
    s.repl.stop(false).unwrap();
    expect(&s.stack.secondary, 24 * MIB, MIB, 0x66);
}

#[test]
fn checkpoint_failing_on_active_then_retry_succeeds() {
    let s = started();
    let a = bd(&s, "sec0-active-file");
    inject(&a, IoMask::WRITE);
    assert_failed_checkpoint(&s, "sec0-active");
    forward_after_failed_checkpoint(&s);
    // Still failing: still invalid, still refusing guest I/O.
    assert!(s.repl.checkpoint().is_err());
    assert!(s.repl.buffers_invalid().is_some());
    clear(&a);
    retry_succeeds(&s);
}

#[test]
fn checkpoint_failing_on_active_then_failover_yields_checkpoint_state() {
    let s = started();
    let a = bd(&s, "sec0-active-file");
    inject(&a, IoMask::WRITE | IoMask::FLUSH);
    assert_failed_checkpoint(&s, "sec0-active");
    forward_after_failed_checkpoint(&s);
    expect_secondary_disk(&s.stack.secondary, true);
    // The active disk keeps failing: the failover does not need it.
    failover_yields_checkpoint_state(&s);
}

#[test]
fn checkpoint_failing_on_hidden_then_retry_succeeds() {
    let s = started();
    let h = bd(&s, "sec0-hidden-file");
    inject(&h, IoMask::WRITE);
    assert_failed_checkpoint(&s, "sec0-hidden");
    // A forwarded write cannot be copied before write: it fails and the
    // secondary disk keeps the checkpoint state.
    assert!(s
        .export
        .write(30 * MIB, &[0x77; 4096], WriteFlags::default())
        .is_err());
    expect(&s.stack.secondary, 30 * MIB, MIB, 0x11);
    clear(&h);
    forward_after_failed_checkpoint(&s);
    retry_succeeds(&s);
}

#[test]
fn checkpoint_failing_on_hidden_then_failover_yields_checkpoint_state() {
    let s = started();
    let h = bd(&s, "sec0-hidden-file");
    inject(&h, IoMask::WRITE);
    assert_failed_checkpoint(&s, "sec0-hidden");
    clear(&h);
    // The hidden disk still holds the earlier epoch's 0x11 copies of
    // [8, 12) MiB; the copy state was reset, so the forwarded writes copy
    // the checkpoint contents again.
    forward_after_failed_checkpoint(&s);
    failover_yields_checkpoint_state(&s);
}

#[test]
fn failover_from_failed_checkpoint_that_cannot_read_hidden_can_be_retried() {
    let s = started();
    let h = bd(&s, "sec0-hidden-file");
    inject(&h, IoMask::WRITE);
    assert_failed_checkpoint(&s, "sec0-hidden");
    clear(&h);
    forward_after_failed_checkpoint(&s);
    inject(&h, IoMask::READ);
    let e = s.repl.stop(true).unwrap_err();
    assert!(e.to_string().contains("failover"), "{e}");
    assert_eq!(s.repl.state(), ReplicationState::Running);
    assert!(s.repl.buffers_invalid().is_some());
    let mut b = vec![0u8; 4096];
    assert!(s.guest.read(0, &mut b).is_err());
    clear(&h);
    failover_yields_checkpoint_state(&s);
}

#[test]
fn stop_without_failover_failing_to_empty_takes_the_buffers_out_of_the_path() {
    let s = started();
    let a = bd(&s, "sec0-active-file");
    inject(&a, IoMask::WRITE);
    let e = s.repl.stop(false).unwrap_err();
    assert!(e.to_string().contains("sec0-active"), "{e}");
    assert_eq!(s.repl.state(), ReplicationState::Done);
    assert_eq!(s.repl.buffers_invalid(), None);
    // What a successful stop gives: the secondary disk as it is.
    assert!(Arc::ptr_eq(
        &s.stack.filter.file().unwrap(),
        &s.stack.secondary
    ));
    expect(&s.stack.filter, 0, 8 * MIB, 0x11);
    expect(&s.stack.filter, 8 * MIB, 4 * MIB, 0x22);
    expect(&s.stack.filter, 12 * MIB, DISK - 12 * MIB, 0x11);
    assert!(s.repl.status().error.unwrap().contains("out of the path"));
}

#[test]
fn backup_job_gone_refuses_failover_and_guest_io() {
    let s = started();
    let job = s.repl.backup_job().unwrap();
    job.cancel(true).unwrap();
    job.wait();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.repl.buffers_invalid().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(s.repl.buffers_invalid().is_some());
    let mut b = vec![0u8; 4096];
    assert!(s.guest.read(0, &mut b).is_err());
    let e = s.repl.checkpoint().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BackupCancelled);
    let e = s.repl.stop(true).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BuffersInvalid, "{e}");
    assert_eq!(s.repl.state(), ReplicationState::Running);
    // The way out: stop without failover keeps the secondary disk as is.
    s.repl.stop(false).unwrap();
    assert_eq!(s.repl.state(), ReplicationState::Done);
    expect(&s.stack.filter, 0, 8 * MIB, 0x11);
    expect(&s.stack.filter, 8 * MIB, 4 * MIB, 0x22);
}

#[test]
fn failed_checkpoint_keeps_the_epoch_in_step_with_the_primary() {
    let s = started();
    let (pg, pr, ps) = graph();
    pg.add_node(&json!({"driver": "memory", "node-name": "remote", "size": DISK}))
        .unwrap();
    let pf = pg
        .add_node(&json!({"driver": "replication", "node-name": "prim0", "mode": "primary", "file": "remote"}))
        .unwrap();
    let prim = Replication::of(&pf).unwrap();
    pr.start_all(ReplicationMode::Primary).unwrap();
    let ship = || {
        let mut stream = Vec::new();
        ps.save(&mut stream).unwrap();
        s.states.load(&mut stream.as_slice()).unwrap();
    };
    let h = bd(&s, "sec0-hidden-file");
    ship();
    pr.checkpoint_all().unwrap();
    inject(&h, IoMask::WRITE);
    assert_eq!(
        s.repl.checkpoint().unwrap_err().kind(),
        ErrorKind::BuffersInvalid
    );
    assert_eq!(prim.status().checkpoint_epoch, 1);
    assert_eq!(s.repl.status().checkpoint_epoch, 1);
    clear(&h);
    // The next checkpoint of the pair: the stream loads, the retry clears.
    ship();
    pr.checkpoint_all().unwrap();
    s.repl.checkpoint().unwrap();
    assert_eq!(s.repl.buffers_invalid(), None);
    assert_eq!(prim.status().checkpoint_epoch, 2);
    assert_eq!(s.repl.status().checkpoint_epoch, 2);
    ship();
}
