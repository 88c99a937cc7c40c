//! Op blockers of jobs (QEMU's `block_job_add_bdrv`): every job blocks every
//! operation on each node it uses, so a second job on any of them is refused
//! with kind `Busy` and QEMU's message naming the node and the job type; the
//! blockers go when the job ends. Also the mirror's refusal of a target in
//! the source's subtree.

mod common;

use std::time::Duration;

use block_graph::{BlockOp, Graph, NodeRef, WriteFlags};
use block_jobs::{
    BackupJob, BackupOptions, BackupSync, CommitJob, CommitOptions, ErrorKind, Job, JobError,
    JobManager, JobOptions, JobOutcome, JobStatus, MirrorJob, MirrorOptions, StreamJob,
};
use common::{mem, pattern};
use serde_json::json;

const CS: u64 = 65536;
/// 4 MiB: four of the copy jobs' 1 MiB chunks, so a job limited to 1 byte/s
/// has a second chunk to wait for and cannot complete before the test
/// cancels it, however slowly the test thread runs (with all data in one
/// chunk a commit or stream once did, on a loaded machine).
const SIZE: u64 = 64 * CS;

/// Waits (20 s at most) for `job` to end, expecting `outcome`.
fn assert_ends(job: &Job, outcome: JobOutcome) {
    let got = job.wait_timeout(Duration::from_secs(20));
    assert!(
        matches!(
            (&got, &outcome),
            (Some(JobOutcome::Completed), JobOutcome::Completed)
                | (Some(JobOutcome::Cancelled), JobOutcome::Cancelled)
        ),
        "job ended with {got:?}, expected {outcome:?}"
    );
}

fn busy(node: &str, job: &str) -> String {
    format!("Node '{node}' is busy: block device is in use by block job: {job}")
}

fn assert_busy(e: JobError, node: &str, job: &str) {
    assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
    assert_eq!(e.context(), busy(node, job));
}

fn backup(m: &JobManager, g: &Graph, src: &NodeRef, tgt: &NodeRef, id: &str) -> BackupJob {
    BackupJob::start(
        m,
        g,
        src,
        tgt,
        BackupOptions {
            sync: BackupSync::None,
            cluster_size: None,
            job: JobOptions {
                auto_dismiss: false,
                ..JobOptions::with_id(id)
            },
        },
    )
    .unwrap()
}

fn try_backup(
    m: &JobManager,
    g: &Graph,
    src: &NodeRef,
    tgt: &NodeRef,
    id: &str,
) -> Result<BackupJob, JobError> {
    BackupJob::start(
        m,
        g,
        src,
        tgt,
        BackupOptions {
            job: JobOptions::with_id(id),
            ..Default::default()
        },
    )
}

fn mirror_opts(id: &str) -> MirrorOptions {
    MirrorOptions {
        job: JobOptions::with_id(id),
        ..Default::default()
    }
}

fn commit_opts(id: &str) -> CommitOptions {
    CommitOptions {
        backing_file: None,
        job: JobOptions::with_id(id),
    }
}

/// Cancels a job that does not dismiss itself, waits, dismisses.
fn cancel_and_dismiss(j: &Job) {
    j.cancel(true).unwrap();
    assert_ends(j, JobOutcome::Cancelled);
    assert_eq!(j.status(), JobStatus::Concluded);
    j.dismiss().unwrap();
    assert_eq!(j.status(), JobStatus::Null);
}

/// Every op but dataplane start is blocked on `n` by a job of `job`.
fn assert_all_blocked(n: &NodeRef, job: &str) {
    for op in BlockOp::ALL {
        let r = n.check_op(op);
        if op == BlockOp::DataplaneStart {
            r.unwrap();
        } else {
            let e = r.unwrap_err();
            assert_eq!(e.kind(), block_graph::ErrorKind::Busy);
            assert!(
                e.to_string()
                    .ends_with(&format!("block device is in use by block job: {job}")),
                "{op:?} on '{}': {e}",
                n.name()
            );
        }
    }
}

fn assert_free(n: &NodeRef) {
    for op in BlockOp::ALL {
        n.check_op(op).unwrap();
    }
}

/// base <- mid <- top <- active, data in every layer.
fn chain(g: &Graph) -> [NodeRef; 4] {
    let base = mem(g, "base", SIZE, None);
    base.write(0, &pattern(1, 0, SIZE as usize), WriteFlags::default())
        .unwrap();
    let mid = mem(g, "mid", SIZE, Some("base"));
    for off in [CS, SIZE - CS] {
        mid.write(off, &pattern(2, off, CS as usize), WriteFlags::default())
            .unwrap();
    }
    let top = mem(g, "top", SIZE, Some("mid"));
    top.write(3 * CS, &pattern(3, 0, 100), WriteFlags::default())
        .unwrap();
    let active = mem(g, "active", SIZE, Some("top"));
    [base, mid, top, active]
}

#[test]
fn two_backups_into_one_target() {
    let g = Graph::new();
    let m = JobManager::new();
    let s1 = mem(&g, "s1", SIZE, None);
    let s2 = mem(&g, "s2", SIZE, None);
    let tgt = mem(&g, "tgt", SIZE, None);
    let b1 = backup(&m, &g, &s1, &tgt, "b1");
    let names = g.node_names();
    let e = try_backup(&m, &g, &s2, &tgt, "b2").unwrap_err();
    assert_busy(e, "tgt", "backup");
    // nothing of the refused job is left: no filter, no job, s2 unblocked
    assert_eq!(g.node_names(), names);
    assert_eq!(m.all().len(), 1);
    assert_free(&s2);
    assert_all_blocked(&s1, "backup");
    assert_all_blocked(&tgt, "backup");
    // the check the QMP layer runs before block-commit / block-stream
    assert_busy(
        block_jobs::check_op_free(&tgt, BlockOp::CommitSource).unwrap_err(),
        "tgt",
        "backup",
    );
    block_jobs::check_op_free(&tgt, BlockOp::DataplaneStart).unwrap();
    // a node that is blocked cannot be deleted either
    let e = g.remove_node("tgt").unwrap_err();
    assert_eq!(e.kind(), block_graph::ErrorKind::Busy);

    cancel_and_dismiss(b1.job());
    assert_free(&s1);
    assert_free(&tgt);
    let b2 = try_backup(&m, &g, &s2, &tgt, "b2").unwrap();
    assert_all_blocked(&tgt, "backup");
    b2.job().cancel(true).unwrap();
    assert!(matches!(b2.job().wait(), JobOutcome::Cancelled));
    assert_free(&tgt);
    assert_free(&s2);
}

#[test]
fn mirror_into_a_backups_target() {
    let g = Graph::new();
    let m = JobManager::new();
    let s1 = mem(&g, "s1", SIZE, None);
    let s2 = mem(&g, "s2", SIZE, None);
    let tgt = mem(&g, "tgt", SIZE, None);
    let b1 = backup(&m, &g, &s1, &tgt, "b1");
    let names = g.node_names();
    let e = MirrorJob::start(&m, &g, &s2, &tgt, mirror_opts("m1")).unwrap_err();
    assert_busy(e, "tgt", "backup");
    // nor can a mirror read the backup's source
    let other = mem(&g, "other", SIZE, None);
    let e = MirrorJob::start(&m, &g, &s1, &other, mirror_opts("m1")).unwrap_err();
    assert_busy(e, "s1", "backup");
    assert_eq!(g.node_names().len(), names.len() + 1);
    assert_free(&s2);
    assert_free(&other);

    cancel_and_dismiss(b1.job());
    let mj = MirrorJob::start(&m, &g, &s2, &tgt, mirror_opts("m1")).unwrap();
    assert_all_blocked(&s2, "mirror");
    assert_all_blocked(&tgt, "mirror");
    // and now the backup is the one refused, naming the mirror
    let e = try_backup(&m, &g, &s1, &tgt, "b1").unwrap_err();
    assert_busy(e, "tgt", "mirror");
    assert!(mj.job().wait_ready(Duration::from_secs(20)));
    mj.job().cancel(false).unwrap();
    assert_ends(mj.job(), JobOutcome::Completed);
    assert_free(&s2);
    assert_free(&tgt);
}

#[test]
fn commit_whose_base_or_intermediate_is_a_backups_target() {
    let g = Graph::new();
    let m = JobManager::new();
    let [base, mid, top, active] = chain(&g);
    let src = mem(&g, "src", SIZE, None);

    let b1 = backup(&m, &g, &src, &base, "b1");
    let e = CommitJob::start(&m, &g, &top, &base, commit_opts("c1")).unwrap_err();
    assert_busy(e, "base", "backup");
    let e = MirrorJob::start_active_commit(&m, &g, &active, &base, mirror_opts("c1")).unwrap_err();
    assert_busy(e, "base", "backup");
    // streaming down to base does not touch base: accepted
    cancel_and_dismiss(b1.job());

    // the backup's target is between top and base
    let b2 = backup(&m, &g, &src, &mid, "b2");
    let e = CommitJob::start(&m, &g, &top, &base, commit_opts("c1")).unwrap_err();
    assert_busy(e, "mid", "backup");
    let e = MirrorJob::start_active_commit(&m, &g, &active, &base, mirror_opts("c1")).unwrap_err();
    assert_busy(e, "mid", "backup");
    let e = StreamJob::start(&m, &g, &active, Some(&base), commit_opts("s1")).unwrap_err();
    assert_busy(e, "mid", "backup");
    // refused starts left every other node free
    for n in [&base, &top, &active] {
        assert_free(n);
    }
    assert_eq!(m.all().len(), 1);
    cancel_and_dismiss(b2.job());

    // accepted now; the commit blocks top, mid and base for its run
    let c = CommitJob::start(
        &m,
        &g,
        &top,
        &base,
        CommitOptions {
            backing_file: None,
            job: JobOptions {
                speed: 1,
                ..JobOptions::with_id("c1")
            },
        },
    )
    .unwrap();
    for n in [&top, &mid, &base] {
        assert_all_blocked(n, "commit");
    }
    assert_free(&active);
    let e = try_backup(&m, &g, &src, &mid, "b3").unwrap_err();
    assert_busy(e, "mid", "commit");
    c.job().cancel(true).unwrap();
    assert_ends(c.job(), JobOutcome::Cancelled);
    for n in [&top, &mid, &base, &active] {
        assert_free(n);
    }
}

#[test]
fn second_job_on_the_same_source() {
    let g = Graph::new();
    let m = JobManager::new();
    let src = mem(&g, "src", SIZE, None);
    let t1 = mem(&g, "t1", SIZE, None);
    let t2 = mem(&g, "t2", SIZE, None);
    let b1 = backup(&m, &g, &src, &t1, "b1");
    let e = try_backup(&m, &g, &src, &t2, "b2").unwrap_err();
    assert_busy(e, "src", "backup");
    let e = MirrorJob::start(&m, &g, &src, &t2, mirror_opts("m1")).unwrap_err();
    assert_busy(e, "src", "backup");
    // the target of the running job cannot be a source either
    let e = try_backup(&m, &g, &t1, &t2, "b2").unwrap_err();
    assert_busy(e, "t1", "backup");
    assert_free(&t2);

    cancel_and_dismiss(b1.job());
    let b2 = try_backup(&m, &g, &src, &t2, "b2").unwrap();
    assert_all_blocked(&src, "backup");
    assert_free(&t1);
    b2.job().cancel(true).unwrap();
    assert!(matches!(b2.job().wait(), JobOutcome::Cancelled));
}

#[test]
fn active_commit_blocks_its_chain_and_names_commit() {
    let g = Graph::new();
    let m = JobManager::new();
    let [base, mid, top, active] = chain(&g);
    let other = mem(&g, "other", SIZE, None);
    let ac = MirrorJob::start_active_commit(&m, &g, &active, &base, mirror_opts("ac")).unwrap();
    for n in [&active, &top, &mid, &base] {
        assert_all_blocked(n, "commit");
    }
    let e = try_backup(&m, &g, &top, &other, "b1").unwrap_err();
    assert_busy(e, "top", "commit");
    let e = StreamJob::start(&m, &g, &top, Some(&base), commit_opts("s1")).unwrap_err();
    assert_busy(e, "top", "commit");
    assert!(ac.job().wait_ready(Duration::from_secs(20)));
    ac.job().cancel(true).unwrap();
    assert_ends(ac.job(), JobOutcome::Cancelled);
    for n in [&active, &top, &mid, &base, &other] {
        assert_free(n);
    }
}

#[test]
fn stream_blocks_top_and_the_nodes_above_base_only() {
    let g = Graph::new();
    let m = JobManager::new();
    let [base, mid, top, _active] = chain(&g);
    let src = mem(&g, "src", SIZE, None);
    let st = StreamJob::start(
        &m,
        &g,
        &top,
        Some(&base),
        CommitOptions {
            backing_file: None,
            job: JobOptions {
                speed: 1,
                ..JobOptions::with_id("s1")
            },
        },
    )
    .unwrap();
    assert_all_blocked(&top, "stream");
    assert_all_blocked(&mid, "stream");
    assert_free(&base);
    let e = try_backup(&m, &g, &src, &mid, "b1").unwrap_err();
    assert_busy(e, "mid", "stream");
    st.job().cancel(true).unwrap();
    assert_ends(st.job(), JobOutcome::Cancelled);
    assert_free(&top);
    assert_free(&mid);
}

/// Another user's blocker (replication blocks its top node this way) gives
/// the same message with that user's reason.
#[test]
fn foreign_blocker_reason_is_reported() {
    let g = Graph::new();
    let m = JobManager::new();
    let src = mem(&g, "src", SIZE, None);
    let tgt = mem(&g, "tgt", SIZE, None);
    let guard = tgt.block_op(
        BlockOp::BackupTarget,
        "Block device is in use by internal backup job",
    );
    let e = try_backup(&m, &g, &src, &tgt, "b1").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert_eq!(
        e.context(),
        "Node 'tgt' is busy: Block device is in use by internal backup job"
    );
    assert_free(&src);
    drop(guard);
    let b = try_backup(&m, &g, &src, &tgt, "b1").unwrap();
    b.job().cancel(true).unwrap();
    b.job().wait();
}

/// A mirror whose target lies in the source's subtree (a child, or further
/// down its chain) or writes into the source would form a cycle: refused at
/// start, before anything changes; an active commit's base must be in the
/// backing chain.
#[test]
fn mirror_target_in_source_subtree_is_refused() {
    let g = Graph::new();
    let m = JobManager::new();
    let [base, mid, _top, active] = chain(&g);
    let dev = g
        .add_node(&json!({"driver": "raw", "node-name": "dev", "file": "active"}))
        .unwrap();
    let names = g.node_names();
    for (src, tgt) in [(&dev, &active), (&dev, &mid), (&active, &base)] {
        let e = MirrorJob::start(&m, &g, src, tgt, mirror_opts("m1")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert_eq!(
            e.context(),
            format!(
                "mirror: target '{}' is part of the source '{}' (use active commit)",
                tgt.name(),
                src.name()
            )
        );
    }
    let e = MirrorJob::start(&m, &g, &dev, &dev, mirror_opts("m1")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    // a quorum over the source as the target writes into the source
    let other = mem(&g, "other", SIZE, None);
    let q = g
        .add_node(
            &json!({"driver": "quorum", "node-name": "q", "vote-threshold": 1,
            "children": ["other", "mid"]}),
        )
        .unwrap();
    let e = MirrorJob::start(&m, &g, &mid, &q, mirror_opts("m1")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(
        e.context(),
        "mirror: target 'q' writes into the source 'mid'"
    );
    // active commit: base not in the backing chain (it is below through `file`)
    let e = MirrorJob::start_active_commit(&m, &g, &dev, &active, mirror_opts("m1")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(
        e.context(),
        "commit: 'active' is not in the backing chain of 'dev'"
    );
    let mut want = names.clone();
    want.extend(["other".to_string(), "q".to_string()]);
    want.sort();
    assert_eq!(g.node_names(), want);
    assert!(m.all().is_empty());
    for n in [&dev, &active, &mid, &base, &other, &q] {
        assert_free(n);
    }
}
