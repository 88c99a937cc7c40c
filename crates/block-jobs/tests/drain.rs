//! Jobs pause inside drained sections covering their nodes: `paused` (a
//! ready job: `standby`) with the same events as a user pause, no job request
//! in flight or completing while drained, back to running/ready afterwards.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use block_graph::{Graph, NodeRef, WriteFlags};
use block_jobs::{
    CommitJob, CommitOptions, JobEvent, JobManager, JobOptions, JobStatus, MirrorJob, MirrorOptions,
};
use common::{mem, pattern, read_all};

const MIB: u64 = 1 << 20;

fn statuses(rx: &crossbeam_channel::Receiver<JobEvent>) -> Vec<JobStatus> {
    rx.try_iter()
        .filter_map(|e| match e {
            JobEvent::StatusChange { status, .. } => Some(status),
            _ => None,
        })
        .collect()
}

/// Requests completed on a node so far (every kind).
fn ops(n: &NodeRef) -> u64 {
    let s = n.stats();
    s.read.ops + s.write.ops + s.write_zeroes.ops + s.flush.ops + s.block_status.ops
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Holds a drained section for a while and checks the job does nothing.
fn assert_quiet_while_drained(nodes: &[&NodeRef], job_progress: impl Fn() -> u64) {
    let before: Vec<u64> = nodes.iter().map(|n| ops(n)).collect();
    let p = job_progress();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(20));
        for n in nodes {
            assert_eq!(n.in_flight(), 0, "a request in flight on '{}'", n.name());
        }
    }
    let after: Vec<u64> = nodes.iter().map(|n| ops(n)).collect();
    assert_eq!(before, after, "requests completed while drained");
    assert_eq!(p, job_progress(), "the job progressed while drained");
}

#[test]
fn commit_pauses_in_drained_section() {
    let g = Graph::new();
    let size = 8 * MIB;
    let base = mem(&g, "base", size, None);
    let top = mem(&g, "top", size, Some("base"));
    top.write(0, &pattern(7, 0, size as usize), WriteFlags::default())
        .unwrap();
    let active = mem(&g, "active", size, Some("top"));
    let expect = read_all(&top);
    let m = JobManager::new();
    let rx = m.subscribe();
    // 8 MiB/s: about a second of copying, 1 MiB chunks
    let cj = CommitJob::start(
        &m,
        &g,
        &top,
        &base,
        CommitOptions {
            job: JobOptions {
                speed: 8 * MIB,
                ..JobOptions::with_id("c1")
            },
            ..Default::default()
        },
    )
    .unwrap();
    let job = cj.job().clone();
    wait_for("progress", || job.progress().0 > 0);
    assert_eq!(job.status(), JobStatus::Running);
    {
        // the overlay drained: its subtree (top, base) is covered
        let d = g.drain(std::slice::from_ref(&active));
        assert_eq!(job.status(), JobStatus::Paused, "paused when drain returns");
        assert!(job.info().paused);
        assert!(job.progress().0 < size, "the job was still copying");
        assert_quiet_while_drained(&[&top, &base, &active], || job.progress().0);
        // nested section: still paused, one resume when both end
        let d2 = g.drain(std::slice::from_ref(&base));
        drop(d2);
        assert_eq!(job.status(), JobStatus::Paused);
        // the drain pause is not a user pause
        assert!(job.resume().is_err());
        drop(d);
    }
    wait_for("running again", || job.status() != JobStatus::Paused);
    assert!(job.wait().is_ok());
    assert!(read_all(&base) == expect, "base holds what top read");
    assert!(Arc::ptr_eq(&active.backing().unwrap(), &base));
    use JobStatus::*;
    assert_eq!(
        statuses(&rx),
        vec![Created, Running, Paused, Running, Waiting, Pending, Concluded, Null]
    );
}

#[test]
fn ready_mirror_goes_standby_in_drained_section() {
    let g = Graph::new();
    let size = 4 * MIB;
    let src = mem(&g, "src", size, None);
    src.write(0, &pattern(3, 0, MIB as usize), WriteFlags::default())
        .unwrap();
    let dst = mem(&g, "dst", size, None);
    let other = mem(&g, "other", size, None);
    let m = JobManager::new();
    let rx = m.subscribe();
    let mj = MirrorJob::start(
        &m,
        &g,
        &src,
        &dst,
        MirrorOptions {
            job: JobOptions::with_id("m1"),
            ..Default::default()
        },
    )
    .unwrap();
    let job = mj.job().clone();
    assert!(job.wait_ready(Duration::from_secs(10)));
    wait_for("ready", || job.status() == JobStatus::Ready);
    // an unrelated node: no pause
    drop(g.drain(std::slice::from_ref(&other)));
    assert_eq!(job.status(), JobStatus::Ready);
    {
        let _d = g.drain(std::slice::from_ref(&dst));
        assert_eq!(job.status(), JobStatus::Standby);
        assert_quiet_while_drained(&[&src, &dst], || job.progress().0);
    }
    wait_for("ready again", || job.status() == JobStatus::Ready);
    job.complete().unwrap();
    assert!(job.wait().is_ok());
    assert!(read_all(&dst) == read_all(&src));
    use JobStatus::*;
    assert_eq!(
        statuses(&rx),
        vec![Created, Running, Ready, Standby, Ready, Waiting, Pending, Concluded, Null]
    );
}
