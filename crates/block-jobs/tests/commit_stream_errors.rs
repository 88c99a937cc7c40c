//! Plain commit, stream, and error policies with blkdebug-injected errors on
//! real jobs (backup, mirror, active commit, commit).

mod common;

use std::sync::Arc;
use std::time::Duration;

use block_graph::drivers::blkdebug::{BlkDebug, InjectRule, IoMask};
use block_graph::{Graph, NodeRef, PermPair, Role, WriteFlags};
use block_jobs::{
    BackupJob, BackupOptions, CommitJob, CommitOptions, ErrorAction, ErrorKind, IoOperation,
    JobEvent, JobManager, JobOptions, JobOutcome, JobStatus, MirrorJob, MirrorOptions, OnError,
    StreamJob,
};
use common::{mem, pattern, read_all};
use serde_json::json;

const CS: u64 = 65536;

fn dbg_over(g: &Graph, name: &str, image: &str) -> NodeRef {
    g.add_node(&json!({"driver": "blkdebug", "node-name": name, "image": image}))
        .unwrap()
}

fn blkdebug(n: &NodeRef) -> &BlkDebug {
    n.driver_as::<BlkDebug>().unwrap()
}

/// base <- mid <- top <- active, data in every layer.
fn four(g: &Graph, size: u64) -> [NodeRef; 4] {
    let base = mem(g, "base", size, None);
    base.write(0, &pattern(1, 0, size as usize), WriteFlags::default())
        .unwrap();
    let mid = mem(g, "mid", size, Some("base"));
    mid.write(
        CS,
        &pattern(2, CS, (2 * CS) as usize),
        WriteFlags::default(),
    )
    .unwrap();
    let top = mem(g, "top", size, Some("mid"));
    top.write(2 * CS + 5, &pattern(3, 0, 1000), WriteFlags::default())
        .unwrap();
    top.write(6 * CS, &[0; 4096], WriteFlags::default())
        .unwrap();
    let active = mem(g, "active", size, Some("top"));
    active
        .write(7 * CS, &pattern(4, 0, 100), WriteFlags::default())
        .unwrap();
    [base, mid, top, active]
}

#[test]
fn plain_commit_drops_intermediates() {
    let g = Graph::new();
    let size = 8 * CS;
    let [base, mid, top, active] = four(&g, size);
    let be = g.new_backend(&active, PermPair::READ_WRITE).unwrap();
    let expect_top = read_all(&top);
    let expect_active = read_all(&active);
    let m = JobManager::new();
    let cj = CommitJob::start(
        &m,
        &g,
        &top,
        &base,
        CommitOptions {
            job: JobOptions::with_id("commit1"),
            ..Default::default()
        },
    )
    .unwrap();
    // the guest writes to the active layer meanwhile
    be.write(0, &[9; 10], WriteFlags::default()).unwrap();
    assert!(cj.job().wait().is_ok());
    assert!(read_all(&base) == expect_top, "base holds what top read");
    assert!(Arc::ptr_eq(&active.backing().unwrap(), &base));
    let mut e = expect_active.clone();
    e[..10].fill(9);
    assert!(read_all(&active) == e);
    let _ = mid;
    // an explicit backing name on a driver that cannot record it fails and
    // leaves the graph as it was
    let g = Graph::new();
    let [base, _mid, top, active] = four(&g, size);
    let cj = CommitJob::start(
        &m,
        &g,
        &top,
        &base,
        CommitOptions {
            backing_file: Some("base.qcow2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    match cj.job().wait() {
        JobOutcome::Failed(e) => {
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            assert!(e.to_string().contains("backing file"), "{e}");
        }
        o => panic!("{o:?}"),
    }
    assert!(Arc::ptr_eq(&active.backing().unwrap(), &top));
}

#[test]
fn plain_commit_checks() {
    let g = Graph::new();
    let [base, _mid, top, active] = four(&g, 8 * CS);
    let m = JobManager::new();
    let e = CommitJob::start(&m, &g, &active, &base, CommitOptions::default()).unwrap_err();
    assert!(e.to_string().contains("active layer"), "{e}");
    let e = CommitJob::start(&m, &g, &base, &top, CommitOptions::default()).unwrap_err();
    assert!(e.to_string().contains("not in the backing chain"), "{e}");
}

#[test]
fn stream_copies_chain_and_drops_backing() {
    let g = Graph::new();
    let size = 8 * CS;
    let [base, mid, top, active] = four(&g, size);
    let be = g.new_backend(&active, PermPair::READ_WRITE).unwrap();
    let expect = read_all(&active);
    let m = JobManager::new();
    // stream down to mid: top and base stay below... stream active <- (top, mid) above base
    let sj = StreamJob::start(&m, &g, &active, Some(&base), CommitOptions::default()).unwrap();
    be.write(3 * CS, &[8; 10], WriteFlags::default()).unwrap();
    assert!(sj.job().wait().is_ok());
    assert!(Arc::ptr_eq(&active.backing().unwrap(), &base));
    let mut e = expect.clone();
    e[(3 * CS) as usize..(3 * CS + 10) as usize].fill(8);
    assert!(read_all(&active) == e);
    let _ = (mid, top);
    // full stream: no backing at all afterwards
    let sj = StreamJob::start(&m, &g, &active, None, CommitOptions::default()).unwrap();
    assert!(sj.job().wait().is_ok());
    assert!(active.backing().is_none());
    assert!(read_all(&active) == e);
}

#[test]
fn backup_failed_copy_fails_write_and_keeps_source() {
    let g = Graph::new();
    let size = 8 * CS;
    let src = mem(&g, "src", size, None);
    src.write(0, &pattern(1, 0, size as usize), WriteFlags::default())
        .unwrap();
    mem(&g, "hidmem", size, Some("src"));
    let tgt = dbg_over(&g, "tgt", "hidmem");
    let be = g.new_backend(&src, PermPair::READ_WRITE).unwrap();
    let orig = read_all(&src);
    let m = JobManager::new();
    let bk = BackupJob::start(&m, &g, &src, &tgt, BackupOptions::default()).unwrap();
    blkdebug(&tgt).inject(InjectRule::new(IoMask::WRITE, 5).range(2 * CS, CS));
    let e = be
        .write(2 * CS + 10, &[7; 100], WriteFlags::default())
        .unwrap_err();
    assert_eq!(e.errno(), 5, "{e}");
    assert!(
        read_all(&src) == orig,
        "source unchanged after a failed copy"
    );
    assert!(!bk.tracker().is_copied(2));
    blkdebug(&tgt).clear_rules();
    be.write(2 * CS + 10, &[7; 100], WriteFlags::default())
        .unwrap();
    assert!(read_all(&tgt) == orig);
    assert_eq!(bk.tracker().epoch_copies(), 1);
    bk.job().cancel(true).unwrap();
    bk.job().wait();
}

#[test]
fn mirror_target_error_stop_then_resume() {
    let g = Graph::new();
    let size = 16 * CS;
    let src = mem(&g, "src", size, None);
    src.write(0, &pattern(3, 0, size as usize), WriteFlags::default())
        .unwrap();
    mem(&g, "dstmem", size, None);
    let dst = dbg_over(&g, "dst", "dstmem");
    blkdebug(&dst).inject(InjectRule::new(IoMask::WRITE, 5).range(5 * CS, CS).once());
    let m = JobManager::new();
    let ev = m.subscribe();
    let mj = MirrorJob::start(
        &m,
        &g,
        &src,
        &dst,
        MirrorOptions {
            job: JobOptions {
                on_target_error: OnError::Stop,
                ..JobOptions::with_id("mstop")
            },
            ..Default::default()
        },
    )
    .unwrap();
    assert!(mj.job().wait_paused(Duration::from_secs(10)));
    assert_eq!(mj.job().status(), JobStatus::Paused);
    let evs: Vec<_> = ev.try_iter().collect();
    assert!(evs.iter().any(|e| matches!(e, JobEvent::Error { operation: IoOperation::Write, action: ErrorAction::Stop, id } if id.as_deref() == Some("mstop"))));
    mj.job().resume().unwrap();
    assert!(mj.job().wait_ready(Duration::from_secs(10)));
    mj.job().complete().unwrap();
    assert!(mj.job().wait().is_ok());
    assert!(read_all(&dst) == read_all(&src));
}

#[test]
fn mirror_source_error_ignore_and_report() {
    let g = Graph::new();
    let size = 16 * CS;
    mem(&g, "srcmem", size, None);
    let src = dbg_over(&g, "src", "srcmem");
    src.write(0, &pattern(3, 0, size as usize), WriteFlags::default())
        .unwrap();
    let dst = mem(&g, "dst", size, None);
    let m = JobManager::new();
    let ev = m.subscribe();
    blkdebug(&src).inject(InjectRule::new(IoMask::READ, 5).range(3 * CS, CS).once());
    let mj = MirrorJob::start(
        &m,
        &g,
        &src,
        &dst,
        MirrorOptions {
            job: JobOptions {
                on_source_error: OnError::Ignore,
                ..JobOptions::with_id("mign")
            },
            ..Default::default()
        },
    )
    .unwrap();
    assert!(mj.job().wait_ready(Duration::from_secs(10)));
    mj.job().complete().unwrap();
    assert!(mj.job().wait().is_ok());
    assert!(
        read_all(&dst) == read_all(&src),
        "the failed chunk was retried"
    );
    let evs: Vec<_> = ev.try_iter().collect();
    assert!(evs.iter().any(|e| matches!(
        e,
        JobEvent::Error {
            operation: IoOperation::Read,
            action: ErrorAction::Ignore,
            ..
        }
    )));

    // report: the job fails, the graph is as it was
    let dst2 = mem(&g, "dst2", size, None);
    let be = g.new_backend(&src, PermPair::READ_WRITE).unwrap();
    blkdebug(&src).inject(InjectRule::new(IoMask::READ, 5).range(3 * CS, CS));
    let mj = MirrorJob::start(
        &m,
        &g,
        &src,
        &dst2,
        MirrorOptions {
            job: JobOptions::with_id("mrep"),
            ..Default::default()
        },
    )
    .unwrap();
    match mj.job().wait() {
        JobOutcome::Failed(e) => assert_eq!(e.errno(), Some(5)),
        o => panic!("{o:?}"),
    }
    blkdebug(&src).clear_rules();
    assert!(Arc::ptr_eq(&be.node(), &src));
    assert!(!g.node_names().iter().any(|n| n.starts_with('#')));
    let evs: Vec<_> = ev.try_iter().collect();
    assert!(evs.iter().any(|e| matches!(e, JobEvent::Completed { error: Some(_), info } if info.id.as_deref() == Some("mrep"))));
}

#[test]
fn active_commit_failure_leaves_graph() {
    let g = Graph::new();
    let size = 8 * CS;
    mem(&g, "basemem", size, None);
    let base = dbg_over(&g, "base", "basemem");
    let hidden = mem(&g, "hidden", size, Some("base"));
    hidden
        .write(0, &pattern(2, 0, size as usize), WriteFlags::default())
        .unwrap();
    let active = mem(&g, "active", size, Some("hidden"));
    let dev = g
        .add_node(&json!({"driver": "raw", "node-name": "dev", "file": "active"}))
        .unwrap();
    let be = g.new_backend(&dev, PermPair::READ_WRITE).unwrap();
    let before = read_all(&active);
    blkdebug(&base)
        .inject(InjectRule::new(IoMask::WRITE | IoMask::WRITE_ZEROES, 28).range(4 * CS, CS));
    let m = JobManager::new();
    let mj = MirrorJob::start_active_commit(
        &m,
        &g,
        &active,
        &base,
        MirrorOptions {
            auto_complete: true,
            ..Default::default()
        },
    )
    .unwrap();
    match mj.job().wait() {
        JobOutcome::Failed(e) => {
            assert_eq!(e.errno(), Some(28));
            assert!(e.to_string().contains("base"), "error names the node: {e}");
        }
        o => panic!("{o:?}"),
    }
    assert!(Arc::ptr_eq(&dev.file().unwrap(), &active));
    assert!(Arc::ptr_eq(&active.backing().unwrap(), &hidden));
    assert!(Arc::ptr_eq(&be.node(), &dev));
    assert!(read_all(&active) == before);
    assert!(!g.node_names().iter().any(|n| n.starts_with('#')));
    // with enospc policy the same error pauses the job; resume after the
    // space came back completes it
    let mj = MirrorJob::start_active_commit(
        &m,
        &g,
        &active,
        &base,
        MirrorOptions {
            auto_complete: true,
            job: JobOptions {
                on_target_error: OnError::Enospc,
                ..JobOptions::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    assert!(mj.job().wait_paused(Duration::from_secs(10)));
    blkdebug(&base).clear_rules();
    mj.job().resume().unwrap();
    assert!(mj.job().wait().is_ok());
    assert!(Arc::ptr_eq(&dev.file().unwrap(), &base));
    assert!(read_all(&base) == before);
    let _ = Role::File;
}
