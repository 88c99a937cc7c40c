//! The NBD link between the primary and the secondary delayed, dropped and
//! resumed during replication (issue 11, network faults), in one process
//! (see `common`): the primary's guest never sees the link's trouble, and
//! its status and the disks say exactly what happened.

mod common;

use std::time::{Duration, Instant};

use block_graph::drivers::blkdebug::{BlkDebug, IoMask};
use block_graph::WriteFlags;
use common::*;
use nbd::RemoveMode;

fn expect(node: &block_graph::NodeRef, off: u64, len: u64, byte: u8) {
    let mut b = vec![0u8; len as usize];
    node.read(off, &mut b).unwrap();
    assert!(
        b.iter().all(|x| *x == byte),
        "{} at {off}: expected {byte:#04x}",
        node.name()
    );
}

#[test]
fn delayed_link_slows_but_loses_nothing() {
    let p = pair();
    let link = p.pri.graph.node("nbd-link").unwrap();
    link.driver_as::<BlkDebug>().unwrap().add_delay(
        IoMask::WRITE | IoMask::FLUSH,
        Duration::from_millis(30),
        false,
    );
    let t = Instant::now();
    for i in 0..8u64 {
        p.pri
            .guest
            .write(i * CHUNK, &[0x22; CHUNK as usize], WriteFlags::default())
            .unwrap();
    }
    p.pri.guest.flush().unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(8 * 30),
        "the delay applied"
    );
    p.pri.registry.checkpoint_all().unwrap();
    p.sec.registry.checkpoint_all().unwrap();
    p.pri.registry.get_error_all().unwrap();
    p.sec.registry.get_error_all().unwrap();
    expect(&p.secondary, 0, 8 * CHUNK, 0x22);
    expect(&p.sec_filter, 0, 8 * CHUNK, 0x22);
    assert_eq!(p.pri.repl.status().forward_errors, 0);
}

#[test]
fn dropped_link_resumed_within_reconnect_delay_loses_nothing() {
    let p = pair_with(Duration::from_secs(10));
    p.pri
        .guest
        .write(0, &[0x22; CHUNK as usize], WriteFlags::default())
        .unwrap();
    // The export goes away: its connection is closed.
    p._server
        .remove_export("sec-disk", RemoveMode::Hard)
        .unwrap();
    std::thread::scope(|sc| {
        let g = &p.pri.guest;
        let writer = sc.spawn(move || {
            let t = Instant::now();
            g.write(CHUNK, &[0x33; CHUNK as usize], WriteFlags::default())
                .and_then(|()| g.flush())
                .map(|()| t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        // ... and comes back; the client reconnects and the held write goes through.
        nbd::blockdev::export_node(
            &p._server,
            &p.sec.graph,
            "secondary-disk",
            "sec-disk",
            false,
            None,
        )
        .unwrap();
        let took = writer.join().unwrap().unwrap();
        assert!(
            took >= Duration::from_millis(250),
            "the write waited for the link: {took:?}"
        );
    });
    p.pri.registry.get_error_all().unwrap();
    assert_eq!(p.pri.repl.status().forward_errors, 0);
    expect(&p.secondary, 0, CHUNK, 0x22);
    expect(&p.secondary, CHUNK, CHUNK, 0x33);
    p.pri.registry.checkpoint_all().unwrap();
    p.sec.registry.checkpoint_all().unwrap();
    expect(&p.sec_filter, 0, CHUNK, 0x22);
    expect(&p.sec_filter, CHUNK, CHUNK, 0x33);
}

#[test]
fn dropped_link_not_resumed_is_recorded_and_the_guest_goes_on() {
    let p = pair();
    p._server
        .remove_export("sec-disk", RemoveMode::Hard)
        .unwrap();
    p.pri
        .guest
        .write(0, &[0x44; CHUNK as usize], WriteFlags::default())
        .unwrap();
    p.pri.guest.flush().unwrap();
    let mut b = vec![0u8; CHUNK as usize];
    p.pri.guest.read(0, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0x44));
    let e = p.pri.registry.get_error_all().unwrap_err();
    assert!(e.to_string().contains("rep-p"), "{e}");
    assert!(p.pri.repl.status().forward_errors >= 1);
    assert_eq!(p.pri.repl.state().as_str(), "RUNNING");
    expect(&p.local, 0, CHUNK, 0x44);
    expect(&p.secondary, 0, CHUNK, 0x11);
    // The secondary, untouched, still serves its guest from the checkpoint.
    expect(&p.sec_filter, 0, CHUNK, 0x11);
    p.sec.registry.get_error_all().unwrap();
}
