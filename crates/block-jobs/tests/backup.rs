//! Backup job tests: copy-before-write (sync=none), checkpoints, read locks,
//! sync=full/top, cancel, argument checks, and the concurrent property test.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use block_graph::{Graph, NodeRef, PermPair, Role, WriteFlags, ZeroFlags};
use block_jobs::{
    BackupJob, BackupOptions, BackupSync, ErrorKind, JobEvent, JobManager, JobOptions, JobOutcome,
    JobStatus,
};
use common::{cases, mem, pattern, read_all};
use proptest::prelude::*;

const CS: u64 = 65536;

/// source "src" (filled with a pattern) and target "tgt" with backing "src".
fn setup(size: u64) -> (Graph, NodeRef, NodeRef) {
    let g = Graph::new();
    let src = mem(&g, "src", size, None);
    src.write(0, &pattern(1, 0, size as usize), WriteFlags::default())
        .unwrap();
    let tgt = mem(&g, "tgt", size, Some("src"));
    (g, src, tgt)
}

fn target_bytes_written(t: &NodeRef) -> u64 {
    let s = t.stats();
    s.write.bytes + s.write_zeroes.bytes
}

#[test]
fn sync_none_copies_once_per_checkpoint_and_cancel_removes_filter() {
    let (g, src, tgt) = setup(16 * CS);
    let be = g.new_backend(&src, PermPair::READ_WRITE).unwrap();
    let m = JobManager::new();
    let ev = m.subscribe();
    let orig = read_all(&src);
    let bk = BackupJob::start(
        &m,
        &g,
        &src,
        &tgt,
        BackupOptions {
            job: JobOptions::with_id("bk"),
            ..Default::default()
        },
    )
    .unwrap();
    let filter = bk.filter_node().clone();
    assert_eq!(filter.driver_name(), "copy-before-write");
    assert!(std::sync::Arc::ptr_eq(&be.node(), &filter));
    // the target is the filter's `target` child; its backing link stays on
    // the source (moving it would close a cycle through that edge: QEMU's
    // should_update_child)
    assert!(std::sync::Arc::ptr_eq(
        &filter.child(&Role::Named("target".into())).unwrap(),
        &tgt
    ));
    assert!(std::sync::Arc::ptr_eq(&tgt.backing().unwrap(), &src));

    be.write(3 * CS + 100, &[0xAA; 10], WriteFlags::default())
        .unwrap();
    be.write(3 * CS + 5000, &[0xBB; 10], WriteFlags::default())
        .unwrap();
    assert_eq!(bk.tracker().epoch_copies(), 1);
    assert_eq!(target_bytes_written(&tgt), CS);
    assert_eq!(read_all(&tgt), orig, "target chain shows the checkpoint");
    let mut now = orig.clone();
    now[(3 * CS + 100) as usize..(3 * CS + 110) as usize].fill(0xAA);
    now[(3 * CS + 5000) as usize..(3 * CS + 5010) as usize].fill(0xBB);
    assert_eq!(read_all(&src), now);

    // checkpoint: the secondary now equals the primary; hidden is emptied
    bk.checkpoint().unwrap();
    tgt.make_empty().unwrap();
    assert_eq!(bk.tracker().epoch_copies(), 0);
    be.write(3 * CS, &[0xCC; 1], WriteFlags::default()).unwrap();
    assert_eq!(bk.tracker().epoch_copies(), 1);
    assert_eq!(read_all(&tgt), now);
    assert_eq!(bk.tracker().total_copies(), 2);

    // write-zeroes and discard copy first too
    be.write_zeroes(7 * CS, 2 * CS, ZeroFlags::default())
        .unwrap();
    be.discard(12 * CS, CS).unwrap();
    assert_eq!(bk.tracker().epoch_copies(), 4);
    assert_eq!(read_all(&tgt), now);

    let t0 = std::time::Instant::now();
    while bk.job().status() == JobStatus::Created && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(bk.job().status(), JobStatus::Running);
    assert_eq!(m.list()[0].id.as_deref(), Some("bk"));
    bk.job().cancel(false).unwrap();
    assert!(matches!(bk.job().wait(), JobOutcome::Cancelled));
    assert!(filter.is_removed());
    assert!(std::sync::Arc::ptr_eq(&be.node(), &src));
    assert!(std::sync::Arc::ptr_eq(&tgt.backing().unwrap(), &src));
    assert!(!g.node_names().iter().any(|n| n == filter.name()));
    // after cancel writes no longer copy
    let before = target_bytes_written(&tgt);
    be.write(0, &[1; 512], WriteFlags::default()).unwrap();
    assert_eq!(target_bytes_written(&tgt), before);
    assert!(bk.checkpoint().is_err());
    let evs: Vec<_> = ev.try_iter().collect();
    assert!(evs
        .iter()
        .any(|e| matches!(e, JobEvent::Cancelled(i) if i.id.as_deref() == Some("bk"))));
    assert!(m.list().is_empty());
}

#[test]
fn read_lock_holds_off_copy_before_write() {
    let (g, src, tgt) = setup(8 * CS);
    let be = g.new_backend(&src, PermPair::READ_WRITE).unwrap();
    let m = JobManager::new();
    let orig = read_all(&src);
    let bk = BackupJob::start(&m, &g, &src, &tgt, BackupOptions::default()).unwrap();
    assert!(m.list().is_empty(), "internal job hidden");
    let guard = bk.read_lock(2 * CS, 10);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            be.write(2 * CS, &[9; 100], WriteFlags::default()).unwrap();
            done.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !done.load(Ordering::SeqCst),
            "the guest write waits for the reader"
        );
        let mut b = vec![0u8; CS as usize];
        tgt.read(2 * CS, &mut b).unwrap();
        assert_eq!(b, orig[(2 * CS) as usize..(3 * CS) as usize]);
        drop(guard);
    });
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(read_all(&tgt), orig);
    bk.job().cancel(true).unwrap();
    bk.job().wait();
}

#[test]
fn start_checks() {
    let g = Graph::new();
    let src = mem(&g, "src", 4 * CS, None);
    let short = mem(&g, "short", 2 * CS, None);
    let m = JobManager::new();
    let e = BackupJob::start(&m, &g, &src, &short, BackupOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("length"), "{e}");
    let ro = g
        .add_node(&serde_json::json!({"driver": "memory", "node-name": "ro", "size": 4 * CS, "read-only": true}))
        .unwrap();
    let e = BackupJob::start(&m, &g, &src, &ro, BackupOptions::default()).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    // nothing left behind
    assert_eq!(g.node_names(), vec!["ro", "short", "src"]);
    assert!(src.parents().is_empty());
}

#[test]
fn sync_full_is_point_in_time_under_writes() {
    let size = 64 * CS;
    let (g, src, _) = setup(size);
    let tgt = mem(&g, "full", size, None);
    let be = g.new_backend(&src, PermPair::READ_WRITE).unwrap();
    let m = JobManager::new();
    let orig = read_all(&src);
    let bk = BackupJob::start(
        &m,
        &g,
        &src,
        &tgt,
        BackupOptions {
            sync: BackupSync::Full,
            job: JobOptions {
                speed: 8 << 20,
                ..JobOptions::with_id("full")
            },
            ..Default::default()
        },
    )
    .unwrap();
    // the guest keeps writing while the backup runs
    for i in 0..64u64 {
        be.write((i * 7 % 64) * CS + 11, &[0xEE; 4096], WriteFlags::default())
            .unwrap();
    }
    assert!(bk.job().wait().is_ok());
    assert_eq!(read_all(&tgt), orig);
    assert_eq!(bk.tracker().total_copies(), 64, "each cluster exactly once");
    assert!(std::sync::Arc::ptr_eq(&be.node(), &src));
    assert_eq!(bk.job().progress(), (size, size));
}

#[test]
fn sync_top_copies_only_top_layer() {
    let g = Graph::new();
    let base = mem(&g, "base", 16 * CS, None);
    base.write(0, &pattern(5, 0, (16 * CS) as usize), WriteFlags::default())
        .unwrap();
    let top = mem(&g, "top", 16 * CS, Some("base"));
    top.write(2 * CS, &[1; 100], WriteFlags::default()).unwrap();
    top.write(9 * CS, &vec![2; 2 * CS as usize], WriteFlags::default())
        .unwrap();
    let tgt = mem(&g, "tgt", 16 * CS, None);
    let m = JobManager::new();
    let bk = BackupJob::start(
        &m,
        &g,
        &top,
        &tgt,
        BackupOptions {
            sync: BackupSync::Top,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(bk.job().wait().is_ok());
    assert_eq!(bk.tracker().total_copies(), 3);
    let t = read_all(&tgt);
    let s = read_all(&top);
    for c in 0..16u64 {
        let r = (c * CS) as usize..((c + 1) * CS) as usize;
        if [2, 9, 10].contains(&c) {
            assert_eq!(t[r.clone()], s[r], "cluster {c}");
        } else {
            assert!(t[r].iter().all(|&b| b == 0), "cluster {c} not copied");
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
}

const PSIZE: u64 = 16 * CS;

fn op() -> impl Strategy<Value = Op> {
    let range = (0..PSIZE).prop_flat_map(|off| (Just(off), 1..=(PSIZE - off).min(3 * CS)));
    prop_oneof![
        6 => (range.clone(), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        1 => range.clone().prop_map(|(off, len)| Op::Zero { off, len }),
        1 => range.prop_map(|(off, len)| Op::Discard { off, len }),
    ]
}

fn op_range(o: &Op) -> (u64, u64) {
    match *o {
        Op::Write { off, len, .. } | Op::Zero { off, len } | Op::Discard { off, len } => (off, len),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(12), ..ProptestConfig::default() })]

    /// Concurrent guest writes (3 threads) and a concurrent reader of the
    /// target chain under the read lock, with checkpoints between epochs: the
    /// target chain always reads as the source did at the last checkpoint, and
    /// each touched cluster is copied exactly once per epoch (counted by the
    /// tracker and, independently, by the bytes the target node received).
    #[test]
    fn target_chain_is_last_checkpoint(epochs in prop::collection::vec(prop::collection::vec(prop::collection::vec(op(), 0..10), 3), 1..5)) {
        let (g, src, tgt) = setup(PSIZE);
        let be = g.new_backend(&src, PermPair::READ_WRITE).unwrap();
        let m = JobManager::new();
        let bk = BackupJob::start(&m, &g, &src, &tgt, BackupOptions::default()).unwrap();
        let mut snapshot = read_all(&src);
        for epoch in &epochs {
            let written_before = target_bytes_written(&tgt);
            let stop = AtomicBool::new(false);
            let bad_reads = AtomicU64::new(0);
            let reads = AtomicU64::new(0);
            std::thread::scope(|s| {
                let mut ws = Vec::new();
                for ops in epoch {
                    let be = &be;
                    ws.push(s.spawn(move || {
                        for o in ops {
                            match *o {
                                Op::Write { off, len, seed } => be.write(off, &pattern(seed, off, len as usize), WriteFlags::default()).unwrap(),
                                Op::Zero { off, len } => be.write_zeroes(off, len, ZeroFlags::default()).unwrap(),
                                Op::Discard { off, len } => be.discard(off, len).unwrap(),
                            }
                        }
                    }));
                }
                let (stop, bad_reads, reads, snapshot, bk, tgt) = (&stop, &bad_reads, &reads, &snapshot, &bk, &tgt);
                s.spawn(move || {
                    let mut x: u64 = 12345;
                    loop {
                        let last = stop.load(Ordering::SeqCst);
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let off = (x >> 33) % PSIZE;
                        let len = 1 + (x >> 13) % (PSIZE - off).min(2 * CS);
                        let mut b = vec![0u8; len as usize];
                        {
                            let _g = bk.read_lock(off, len);
                            tgt.read(off, &mut b).unwrap();
                        }
                        reads.fetch_add(1, Ordering::Relaxed);
                        if b[..] != snapshot[off as usize..(off + len) as usize] {
                            bad_reads.fetch_add(1, Ordering::SeqCst);
                        }
                        if last {
                            break;
                        }
                    }
                });
                for w in ws {
                    w.join().unwrap();
                }
                stop.store(true, Ordering::SeqCst);
            });
            prop_assert_eq!(bad_reads.load(Ordering::SeqCst), 0, "a reader saw a half-copied or overwritten cluster");
            prop_assert!(reads.load(Ordering::SeqCst) > 0);
            prop_assert!(read_all(&tgt) == snapshot, "target chain differs from the last checkpoint");
            let touched: BTreeSet<u64> = epoch.iter().flatten().flat_map(|o| {
                let (off, len) = op_range(o);
                off / CS..(off + len).div_ceil(CS)
            }).collect();
            prop_assert_eq!(bk.tracker().epoch_copies(), touched.len() as u64);
            prop_assert_eq!(target_bytes_written(&tgt) - written_before, touched.len() as u64 * CS);
            // checkpoint
            snapshot = read_all(&src);
            bk.checkpoint().unwrap();
            tgt.make_empty().unwrap();
            prop_assert!(read_all(&tgt) == snapshot);
        }
        bk.job().cancel(true).unwrap();
        prop_assert!(matches!(bk.job().wait(), JobOutcome::Cancelled));
        prop_assert!(tgt.child(&Role::Backing).map(|b| std::sync::Arc::ptr_eq(&b, &src)).unwrap_or(false));
    }
}

/// The target is the filter's `target` child edge, so a target that has the
/// source as its own child (a quorum over it) keeps that edge: a write into
/// the target does not come back through the filter and wait for its own
/// copy (it used to hang).
#[test]
fn target_over_its_source_keeps_its_edge_and_does_not_hang() {
    let g = Graph::new();
    let b = mem(&g, "b", 4 * CS, None);
    b.write(0, &pattern(5, 0, (4 * CS) as usize), WriteFlags::default())
        .unwrap();
    let q = g
        .add_node(&serde_json::json!({"driver": "quorum", "node-name": "q",
            "children": ["b"], "vote-threshold": 1}))
        .unwrap();
    let m = JobManager::new();
    let bk = BackupJob::start(&m, &g, &b, &q, BackupOptions::default()).unwrap();
    let filter = bk.filter_node().clone();
    assert!(std::sync::Arc::ptr_eq(
        &filter.child(&Role::Named("target".into())).unwrap(),
        &q
    ));
    let (_, kid) = q.children().into_iter().next().unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&kid, &b),
        "q's child is '{}'",
        kid.name()
    );
    let (tx, rx) = crossbeam_channel::bounded(1);
    let q2 = q.clone();
    std::thread::spawn(move || {
        let _ = tx.send(q2.write(CS, &[9u8; 4096], WriteFlags::default()));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a write into the target hung");
    r.unwrap();
    let mut b_now = vec![0u8; 4096];
    b.read(CS, &mut b_now).unwrap();
    assert_eq!(b_now, vec![9u8; 4096]);
    bk.job().cancel(true).unwrap();
    assert!(matches!(bk.job().wait(), JobOutcome::Cancelled));
    assert!(g.node_names().iter().all(|n| n != filter.name()));
}
