//! The fault matrix of issue 11: blkdebug EIO and ENOSPC on read, write and
//! flush, on each of the local disk, the NBD link, the secondary disk, the
//! hidden disk and the active disk, at each phase (running, checkpoint,
//! failover), in one process: the primary's graph (quorum over the local
//! disk and replication(primary) over the NBD client) and the secondary's
//! graph (replication(secondary) over qcow2 active and hidden disks over the
//! secondary disk, which an NBD server exports to the primary), connected
//! over a Unix socket. The faulty node is a blkdebug node: over `memory` for
//! the local and secondary disks, over the NBD client for the link, under
//! the qcow2 active and hidden disks (their image files).
//!
//! Checkpoint rows go on after what they record: the secondary guest writes,
//! then a failover must leave exactly the checkpoint state plus that write if
//! it was acknowledged (after a failed checkpoint too: see
//! `replication-driver`'s "Failed secondary checkpoint").
//!
//! Each row runs the same script and records what it saw as one line
//! (`Outcome::line`); the expected line of every row is in
//! `fault_matrix.expected` (the table of `docs/reliability.md` explains it).
//! `RELIABILITY_MATRIX_PRINT=1` prints the observed lines instead of
//! comparing, to review a change of behaviour.

use std::sync::Arc;
use std::time::Duration;

use block_graph::drivers::blkdebug::{BlkDebug, InjectRule, IoMask};
use block_graph::{Backend, NodeRef, WriteFlags};

mod common;

use common::*;

/// Where the fault is injected.
#[derive(Clone, Copy, Debug)]
enum Disk {
    Local,
    NbdLink,
    Secondary,
    Hidden,
    Active,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Read,
    Write,
    Flush,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Running,
    Checkpoint,
    Failover,
}

fn blkdebug_node(p: &Pair, d: Disk) -> Arc<block_graph::Node> {
    let (g, name) = match d {
        Disk::Local => (&p.pri.graph, "local"),
        Disk::NbdLink => (&p.pri.graph, "nbd-link"),
        Disk::Secondary => (&p.sec.graph, "secondary-disk"),
        Disk::Hidden => (&p.sec.graph, "hidden-file"),
        Disk::Active => (&p.sec.graph, "active-file"),
    };
    g.node(name).unwrap()
}

fn res<T, E>(r: &Result<T, E>) -> &'static str {
    if r.is_ok() {
        "ok"
    } else {
        "ERR"
    }
}

/// The first byte of a range if every byte equals it, else "mixed".
fn content(node: &NodeRef, off: u64) -> String {
    let mut b = vec![0u8; CHUNK as usize];
    match node.read(off, &mut b) {
        Err(_) => "ERR".into(),
        Ok(()) if b.iter().all(|x| *x == b[0]) => format!("{:02x}", b[0]),
        Ok(()) => "mixed".into(),
    }
}

fn run(d: Disk, op: Op, errno: i32, phase: Phase) -> String {
    let p = pair();
    let w =
        |b: &Backend, off: u64, v: u8| b.write(off, &[v; CHUNK as usize], WriteFlags::default());
    // Before the fault: primary 0x22 at 0, secondary guest 0x33 at 1 MiB.
    w(&p.pri.guest, 0, 0x22).unwrap();
    w(&p.sec.guest, MIB, 0x33).unwrap();
    p.pri.guest.flush().unwrap();
    p.sec.guest.flush().unwrap();
    let mask = match op {
        Op::Read => IoMask::READ,
        Op::Write => IoMask::WRITE | IoMask::WRITE_ZEROES,
        Op::Flush => IoMask::FLUSH,
    };
    let bd = blkdebug_node(&p, d);
    bd.driver_as::<BlkDebug>()
        .unwrap()
        .inject(InjectRule::new(mask, errno));
    let mut line = Vec::new();
    match phase {
        Phase::Running => {
            let pw = w(&p.pri.guest, 2 * MIB, 0x44);
            let pf = p.pri.guest.flush();
            let mut buf = vec![0u8; CHUNK as usize];
            let pr = p.pri.guest.read(0, &mut buf);
            let sw = w(&p.sec.guest, 3 * MIB, 0x55);
            let sf = p.sec.guest.flush();
            let sr = p.sec.guest.read(MIB + MIB / 2, &mut buf);
            line.push(format!(
                "pguest w/f/r {}/{}/{} sguest w/f/r {}/{}/{}",
                res(&pw),
                res(&pf),
                res(&pr),
                res(&sw),
                res(&sf),
                res(&sr)
            ));
        }
        Phase::Checkpoint => {
            w(&p.pri.guest, 2 * MIB, 0x44).unwrap();
            let pc = p.pri.registry.checkpoint_all();
            let sc = p.sec.registry.checkpoint_all();
            // The secondary guest runs on after the checkpoint.
            let sw = w(&p.sec.guest, 3 * MIB, 0x55);
            line.push(format!(
                "checkpoint p/s {}/{} sguest w {}",
                res(&pc),
                res(&sc),
                res(&sw)
            ));
        }
        Phase::Failover => {
            w(&p.pri.guest, 2 * MIB, 0x44).unwrap();
            let st = p.sec.registry.stop_all(true);
            let done = p.sec.repl.wait_failover(Duration::from_secs(30));
            line.push(format!(
                "failover {} finished {}",
                res(&st),
                if done { "yes" } else { "NO" }
            ));
        }
    }
    bd.driver_as::<BlkDebug>().unwrap().clear_rules();
    line.push(format!(
        "error p/s {}/{} state p/s {}/{}",
        res(&p.pri.registry.get_error_all()),
        res(&p.sec.registry.get_error_all()),
        p.pri.repl.state().as_str(),
        p.sec.repl.state().as_str(),
    ));
    // Data: primary's writes at 0 and 2 MiB on the local and secondary
    // disks; the secondary guest's view at 1 MiB (its write) and 2 MiB.
    line.push(format!(
        "local {}/{} secdisk {}/{} sguest {}/{}",
        content(&p.local, 0),
        content(&p.local, 2 * MIB),
        content(&p.secondary, 0),
        content(&p.secondary, 2 * MIB),
        content(&p.sec_filter, MIB),
        content(&p.sec_filter, 2 * MIB),
    ));
    if let Phase::Checkpoint = phase {
        // Failover after the checkpoint, failed or not: the secondary must
        // end with exactly the checkpoint state (the primary's data at 0 and
        // 2 MiB, the checkpoint's 0x11 at 1 MiB where the secondary guest's
        // earlier write was dropped with the buffers) plus the guest's write
        // at 3 MiB if, and only if, it was acknowledged; never a mix.
        let st = p.sec.registry.stop_all(true);
        let done = p.sec.repl.wait_failover(Duration::from_secs(30));
        line.push(format!(
            "then failover {} finished {} error {} state {}; secdisk {}/{}/{}/{} sguest {}/{}/{}",
            res(&st),
            if done { "yes" } else { "NO" },
            res(&p.sec.registry.get_error_all()),
            p.sec.repl.state().as_str(),
            content(&p.secondary, 0),
            content(&p.secondary, MIB),
            content(&p.secondary, 2 * MIB),
            content(&p.secondary, 3 * MIB),
            content(&p.sec_filter, MIB),
            content(&p.sec_filter, 2 * MIB),
            content(&p.sec_filter, 3 * MIB),
        ));
    }
    line.join("; ")
}

fn expected(key: &str) -> String {
    let text = include_str!("fault_matrix.expected");
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(" => "))
        .unwrap_or_else(|| panic!("no expected line for {key} in fault_matrix.expected"))
        .to_string()
}

fn row(d: Disk, op: Op, phase: Phase) {
    for (errno, ename) in [(5, "EIO"), (28, "ENOSPC")] {
        let key = format!("{d:?} {op:?} {ename} {phase:?}");
        let got = run(d, op, errno, phase);
        if std::env::var_os("RELIABILITY_MATRIX_PRINT").is_some() {
            println!("{key} => {got}");
        } else {
            assert_eq!(got, expected(&key), "row {key}");
        }
    }
}

macro_rules! rows {
    ($($name:ident: $d:ident $op:ident $phase:ident;)*) => {
        $(
            #[test]
            fn $name() {
                row(Disk::$d, Op::$op, Phase::$phase);
            }
        )*
    };
}

rows! {
    local_read_running: Local Read Running;
    local_write_running: Local Write Running;
    local_flush_running: Local Flush Running;
    local_read_checkpoint: Local Read Checkpoint;
    local_write_checkpoint: Local Write Checkpoint;
    local_flush_checkpoint: Local Flush Checkpoint;
    local_read_failover: Local Read Failover;
    local_write_failover: Local Write Failover;
    local_flush_failover: Local Flush Failover;
    nbd_read_running: NbdLink Read Running;
    nbd_write_running: NbdLink Write Running;
    nbd_flush_running: NbdLink Flush Running;
    nbd_read_checkpoint: NbdLink Read Checkpoint;
    nbd_write_checkpoint: NbdLink Write Checkpoint;
    nbd_flush_checkpoint: NbdLink Flush Checkpoint;
    nbd_read_failover: NbdLink Read Failover;
    nbd_write_failover: NbdLink Write Failover;
    nbd_flush_failover: NbdLink Flush Failover;
    secondary_read_running: Secondary Read Running;
    secondary_write_running: Secondary Write Running;
    secondary_flush_running: Secondary Flush Running;
    secondary_read_checkpoint: Secondary Read Checkpoint;
    secondary_write_checkpoint: Secondary Write Checkpoint;
    secondary_flush_checkpoint: Secondary Flush Checkpoint;
    secondary_read_failover: Secondary Read Failover;
    secondary_write_failover: Secondary Write Failover;
    secondary_flush_failover: Secondary Flush Failover;
    hidden_read_running: Hidden Read Running;
    hidden_write_running: Hidden Write Running;
    hidden_flush_running: Hidden Flush Running;
    hidden_read_checkpoint: Hidden Read Checkpoint;
    hidden_write_checkpoint: Hidden Write Checkpoint;
    hidden_flush_checkpoint: Hidden Flush Checkpoint;
    hidden_read_failover: Hidden Read Failover;
    hidden_write_failover: Hidden Write Failover;
    hidden_flush_failover: Hidden Flush Failover;
    active_read_running: Active Read Running;
    active_write_running: Active Write Running;
    active_flush_running: Active Flush Running;
    active_read_checkpoint: Active Read Checkpoint;
    active_write_checkpoint: Active Write Checkpoint;
    active_flush_checkpoint: Active Flush Checkpoint;
    active_read_failover: Active Read Failover;
    active_write_failover: Active Write Failover;
    active_flush_failover: Active Flush Failover;
}
