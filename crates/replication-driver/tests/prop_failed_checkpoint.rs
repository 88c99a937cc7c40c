//! Model-based property test of failed secondary checkpoints: qcow2 active
//! and hidden disks over blkdebug files; each epoch runs forwarded writes
//! and secondary guest I/O concurrently, then a checkpoint during which the
//! active or the hidden image file may fail every write. The model: after
//! any checkpoint, failed or not, the checkpoint state is the primary's
//! disk; after a failed one (error kind BuffersInvalid) every secondary
//! guest read and write must fail until a checkpoint succeeds; after a
//! successful one guest reads equal the checkpoint state plus the guest's
//! own writes. The last epoch ends with a failover: the secondary disk must
//! then equal the model exactly (the checkpoint state plus the guest writes
//! that were acknowledged; the primary's writes since are dropped).
//!
//! Cases: `PROPTEST_CASES` (default 2 here), capped like `prop_model.rs`.

mod common;

use std::time::Duration;

use block_graph::drivers::blkdebug::{BlkDebug, InjectRule, IoMask};
use block_graph::{Backend, WriteFlags};
use common::*;
use proptest::prelude::*;
use replication_core::ReplicationMode;
use replication_driver::{ErrorKind, ReplicationState};

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

#[derive(Debug, Clone, Copy)]
enum Fault {
    None,
    Active,
    Hidden,
}

#[derive(Debug, Clone)]
struct Epoch {
    fwd: Vec<Fwd>,
    guest: Vec<GuestOp>,
    /// Fault armed during the checkpoint that ends this epoch.
    fault: Fault,
}

#[derive(Debug, Clone)]
struct Case {
    epochs: Vec<Epoch>,
    last_fwd: Vec<Fwd>,
    last_guest: Vec<GuestOp>,
}

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

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![Just(Fault::None), Just(Fault::Active), Just(Fault::Hidden)]
}

fn epoch() -> impl Strategy<Value = Epoch> {
    (
        prop::collection::vec(fwd(), 0..10),
        prop::collection::vec(guest_op(), 0..10),
        fault(),
    )
        .prop_map(|(fwd, guest, fault)| Epoch { fwd, guest, fault })
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(epoch(), 1..5),
        prop::collection::vec(fwd(), 0..10),
        prop::collection::vec(guest_op(), 1..12),
    )
        .prop_map(|(epochs, last_fwd, last_guest)| Case {
            epochs,
            last_fwd,
            last_guest,
        })
}

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

/// Guest I/O; with `invalid` every request must fail and the view stays.
fn guest(g: &Backend, view: &mut [u8], ops: &[GuestOp], invalid: bool) -> Result<(), String> {
    for op in ops {
        match *op {
            GuestOp::Read { off, len } => {
                let mut buf = vec![0u8; len as usize];
                let r = g.read(off, &mut buf);
                if invalid {
                    if r.is_ok() {
                        return Err(format!("guest read {op:?} passed with invalid buffers"));
                    }
                    continue;
                }
                r.map_err(|e| format!("guest read {op:?}: {e}"))?;
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
                let r = g.write(off, &data, WriteFlags::default());
                if invalid {
                    if r.is_ok() {
                        return Err(format!("guest write {op:?} passed with invalid buffers"));
                    }
                    continue;
                }
                r.map_err(|e| format!("guest write {op:?}: {e}"))?;
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
    let s = secondary_qcow2_blkdebug(DISK);
    let mut primary = vec![0x11u8; DISK as usize];
    let mut view = primary.clone();
    let mut invalid = false;
    s.registry
        .start_all(ReplicationMode::Secondary)
        .map_err(|e| e.to_string())?;
    for ep in &c.epochs {
        let (a, b) = std::thread::scope(|sc| {
            let p = &mut primary;
            let v = &mut view;
            let f = sc.spawn(|| forward(&s.export, p, &ep.fwd));
            let g = sc.spawn(|| guest(&s.guest, v, &ep.guest, invalid));
            (f.join().unwrap(), g.join().unwrap())
        });
        a?;
        b?;
        let file = match ep.fault {
            Fault::None => None,
            Fault::Active => Some(s.graph.node("sec0-active-file").unwrap()),
            Fault::Hidden => Some(s.graph.node("sec0-hidden-file").unwrap()),
        };
        if let Some(f) = &file {
            f.driver_as::<BlkDebug>()
                .unwrap()
                .inject(InjectRule::new(IoMask::WRITE, 5));
        }
        let r = s.repl.checkpoint();
        if let Some(f) = &file {
            f.driver_as::<BlkDebug>().unwrap().clear_rules();
        }
        match (r, ep.fault) {
            (Ok(()), _) => invalid = false,
            (Err(e), Fault::None) => return Err(format!("checkpoint without fault: {e}")),
            // A disk with nothing to drop may empty without writing.
            (Err(e), _) if e.kind() == ErrorKind::BuffersInvalid => invalid = true,
            (Err(e), _) => return Err(format!("failed checkpoint of the wrong kind: {e}")),
        }
        if invalid != s.repl.buffers_invalid().is_some() {
            return Err(format!(
                "buffers_invalid {:?}, model {invalid}",
                s.repl.buffers_invalid()
            ));
        }
        view.copy_from_slice(&primary);
    }
    // Last epoch: the primary dies after its writes, then the failover.
    if invalid {
        // Guest I/O fails until the (synchronous) failover is done.
        let (a, b) = std::thread::scope(|sc| {
            let p = &mut primary;
            let v = &mut view;
            let f = sc.spawn(|| forward(&s.export, p, &c.last_fwd));
            let g = sc.spawn(|| guest(&s.guest, v, &c.last_guest, true));
            (f.join().unwrap(), g.join().unwrap())
        });
        a?;
        b?;
        s.registry.stop_all(true).map_err(|e| e.to_string())?;
        guest(&s.guest, &mut view, &c.last_guest, false)?;
    } else {
        let (a, b, fo) = std::thread::scope(|sc| {
            let p = &mut primary;
            let v = &mut view;
            let f = sc.spawn(|| forward(&s.export, p, &c.last_fwd));
            let g = sc.spawn(|| guest(&s.guest, v, &c.last_guest, false));
            let a = f.join().unwrap();
            let fo = s.registry.stop_all(true).map_err(|e| e.to_string());
            (a, g.join().unwrap(), fo)
        });
        a?;
        b?;
        fo?;
    }
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

fn cases() -> u32 {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
    env("PROPTEST_CASES")
        .unwrap_or(2)
        .min(env("REPLICATION_PROP_MAX_CASES").unwrap_or(250))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 64, ..ProptestConfig::default() })]

    #[test]
    fn prop_failed_checkpoints_match_model(c in case()) {
        if let Err(e) = run(&c) {
            prop_assert!(false, "{}", e);
        }
    }
}
