//! Model-based property test with threads: forwarded writes (the primary's
//! NBD writes to the exported secondary disk) and the secondary guest's reads
//! and writes run concurrently; checkpoints come between epochs (both guests
//! paused, as COLO does); in the last epoch the primary dies after a random
//! number of forwarded writes and the failover starts while the guest keeps
//! going. Every guest read must equal the model (last checkpoint state plus
//! the guest's own writes since); after the failover the secondary disk must
//! equal that model exactly.
//!
//! Cases: `PROPTEST_CASES` (default 2 here; `cargo xtask proptest` runs many,
//! capped as [`cases`] says).

mod common;

use std::time::Duration;

use block_graph::{Backend, WriteFlags};
use common::*;
use proptest::prelude::*;
use replication_core::ReplicationMode;
use replication_driver::ReplicationState;

const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
enum GuestOp {
    Read { off: u64, len: u64 },
    Write { off: u64, len: u64, seed: u8 },
}

#[derive(Debug, Clone)]
struct Fwd {
    off: u64,
    len: u64,
    seed: u8,
}

#[derive(Debug, Clone)]
struct Epoch {
    fwd: Vec<Fwd>,
    guest: Vec<GuestOp>,
}

#[derive(Debug, Clone)]
struct Case {
    epochs: Vec<Epoch>,
    /// Forwarded writes of the last epoch that happen before the primary dies.
    last_fwd: Vec<Fwd>,
    /// Guest operations of the last epoch (concurrent with the failover).
    last_guest: Vec<GuestOp>,
    delay_us: u64,
    qcow2: bool,
}

/// A range: mostly in a hot 4 MiB window (so ranges collide), sometimes
/// anywhere on the 64 MiB disk.
fn range() -> impl Strategy<Value = (u64, u64)> {
    let hot = (0..(4 * MIB / SECTOR), 1..=256u64);
    let any = (0..(DISK / SECTOR), 1..=256u64);
    prop_oneof![4 => hot, 1 => any].prop_map(|(s, n)| {
        let off = s * SECTOR;
        (off, (n * SECTOR).min(DISK - off))
    })
}

fn guest_op() -> impl Strategy<Value = GuestOp> {
    prop_oneof![
        range().prop_map(|(off, len)| GuestOp::Read { off, len }),
        (range(), 1..=255u8).prop_map(|((off, len), seed)| GuestOp::Write { off, len, seed }),
    ]
}

fn fwd() -> impl Strategy<Value = Fwd> {
    (range(), 1..=255u8).prop_map(|((off, len), seed)| Fwd { off, len, seed })
}

fn epoch() -> impl Strategy<Value = Epoch> {
    (
        prop::collection::vec(fwd(), 0..12),
        prop::collection::vec(guest_op(), 0..12),
    )
        .prop_map(|(fwd, guest)| Epoch { fwd, guest })
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(epoch(), 0..4),
        prop::collection::vec(fwd(), 0..12),
        prop::collection::vec(guest_op(), 1..16),
        0..2000u64,
        any::<bool>(),
    )
        .prop_map(|(epochs, last_fwd, last_guest, delay_us, qcow2)| Case {
            epochs,
            last_fwd,
            last_guest,
            delay_us,
            qcow2,
        })
}

/// Bytes written by an op: distinct per seed and per 512-byte sector.
fn pattern(seed: u8, off: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ (((off + i) / SECTOR) as u8).wrapping_mul(31))
        .collect()
}

fn forward(export: &Backend, model: &mut [u8], ops: &[Fwd]) -> Result<(), String> {
    for f in ops {
        let data = pattern(f.seed, f.off, f.len);
        export
            .write(f.off, &data, WriteFlags::default())
            .map_err(|e| format!("forwarded write {f:?}: {e}"))?;
        model[f.off as usize..(f.off + f.len) as usize].copy_from_slice(&data);
    }
    Ok(())
}

fn guest(g: &Backend, view: &mut [u8], ops: &[GuestOp]) -> Result<(), String> {
    for op in ops {
        match *op {
            GuestOp::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                g.read(off, &mut buf)
                    .map_err(|e| format!("guest read {op:?}: {e}"))?;
                let want = &view[off as usize..(off + len) as usize];
                if let Some(i) = buf.iter().zip(want).position(|(a, b)| a != b) {
                    return Err(format!(
                        "guest read {op:?}: byte at {} is {:#04x}, model says {:#04x}",
                        off + i as u64,
                        buf[i],
                        want[i]
                    ));
                }
            }
            GuestOp::Write { off, len, seed } => {
                let data = pattern(seed, off, len);
                g.write(off, &data, WriteFlags::default())
                    .map_err(|e| format!("guest write {op:?}: {e}"))?;
                view[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
    }
    Ok(())
}

fn compare(node: &block_graph::NodeRef, model: &[u8]) -> Result<(), String> {
    let mut buf = vec![0u8; (4 * MIB) as usize];
    let mut off = 0usize;
    while off < model.len() {
        let n = buf.len().min(model.len() - off);
        node.read(off as u64, &mut buf[..n])
            .map_err(|e| e.to_string())?;
        if let Some(i) = buf[..n]
            .iter()
            .zip(&model[off..off + n])
            .position(|(a, b)| a != b)
        {
            return Err(format!(
                "node '{}' at {}: {:#04x}, model {:#04x}",
                node.name(),
                off + i,
                buf[i],
                model[off + i]
            ));
        }
        off += n;
    }
    Ok(())
}

fn run(c: &Case) -> Result<(), String> {
    let s = if c.qcow2 {
        secondary_qcow2(DISK, false)
    } else {
        secondary()
    };
    let mut primary = vec![0x11u8; DISK as usize];
    let mut view = primary.clone();
    s.registry
        .start_all(ReplicationMode::Secondary)
        .map_err(|e| e.to_string())?;
    for ep in &c.epochs {
        let (a, b) = std::thread::scope(|sc| {
            let p = &mut primary;
            let v = &mut view;
            let f = sc.spawn(|| forward(&s.export, p, &ep.fwd));
            let g = sc.spawn(|| guest(&s.guest, v, &ep.guest));
            (f.join().unwrap(), g.join().unwrap())
        });
        a?;
        b?;
        s.registry.checkpoint_all().map_err(|e| e.to_string())?;
        view.copy_from_slice(&primary);
    }
    // Last epoch: the primary dies after its writes; failover while the
    // guest keeps going.
    let (a, b, fo) = std::thread::scope(|sc| {
        let p = &mut primary;
        let v = &mut view;
        let f = sc.spawn(|| forward(&s.export, p, &c.last_fwd));
        let g = sc.spawn(|| guest(&s.guest, v, &c.last_guest));
        let a = f.join().unwrap();
        std::thread::sleep(Duration::from_micros(c.delay_us));
        let fo = s.registry.stop_all(true).map_err(|e| e.to_string());
        (a, g.join().unwrap(), fo)
    });
    a?;
    b?;
    fo?;
    if !s.repl.wait_failover(Duration::from_secs(120)) {
        return Err("failover did not finish in 120 s".into());
    }
    if s.repl.state() != ReplicationState::Done {
        return Err(format!(
            "state {} after failover: {:?}",
            s.repl.state(),
            s.repl.status().error
        ));
    }
    s.registry.get_error_all().map_err(|e| e.to_string())?;
    compare(&s.stack.secondary, &view)?;
    compare(&s.stack.filter, &view)
}

/// `PROPTEST_CASES` (default 2), capped at `REPLICATION_PROP_MAX_CASES`
/// (default 250): each case builds and compares a pair of 64 MiB disks
/// (about a second in release on the shared CI machine), so
/// `cargo xtask proptest`'s 2,000 cases would take most of the CI budget.
fn cases() -> u32 {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
    env("PROPTEST_CASES")
        .unwrap_or(2)
        .min(env("REPLICATION_PROP_MAX_CASES").unwrap_or(250))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn prop_concurrent_replication_matches_model(c in case()) {
        if let Err(e) = run(&c) {
            prop_assert!(false, "{}", e);
        }
    }
}
