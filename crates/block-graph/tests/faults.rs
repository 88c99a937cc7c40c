//! Fault injection (blkdebug) and quorum behaviour under failures.

use block_graph::drivers::blkdebug::{BlkDebug, InjectRule, IoMask};
use block_graph::drivers::quorum::{Quorum, QuorumReportKind};
use block_graph::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn w(n: &Node, off: u64, data: &[u8]) -> Result<()> {
    n.write(off, data, WriteFlags::default())
}

fn r(n: &Node, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    n.read(off, &mut b).unwrap();
    b
}

fn dbg(g: &Graph, name: &str, rules: serde_json::Value) -> NodeRef {
    g.add_node(&json!({"driver": "blkdebug", "node-name": name,
        "image": {"driver": "memory", "node-name": format!("{name}-img"), "size": 1 << 20},
        "inject-error": rules}))
        .unwrap()
}

#[test]
fn each_event_fails_its_requests_with_kind_and_node() {
    let g = Graph::new();
    let n = dbg(&g, "d1", json!([{"event": "read_aio", "errno": 5}]));
    let mut b = [0u8; 8];
    let e = n.read(0, &mut b).unwrap_err();
    assert_eq!((e.kind(), e.node()), (ErrorKind::Io, Some("d1")));
    assert!(e.to_string().contains("injected"), "{e}");
    w(&n, 0, b"fine").unwrap();

    let n = dbg(&g, "d2", json!([{"event": "pwritev", "errno": "ENOSPC"}]));
    let e = w(&n, 0, b"x").unwrap_err();
    assert_eq!(
        (e.kind(), e.node(), e.errno()),
        (ErrorKind::NoSpace, Some("d2"), 28)
    );
    n.read(0, &mut b).unwrap();

    let n = dbg(&g, "d3", json!([{"event": "flush_to_disk", "errno": 5}]));
    assert_eq!(n.flush().unwrap_err().node(), Some("d3"));

    let n = dbg(&g, "d4", json!([{"event": "x-discard", "errno": 28}]));
    assert_eq!(n.discard(0, 4096).unwrap_err().kind(), ErrorKind::NoSpace);

    let n = dbg(&g, "d5", json!([{"event": "pwritev_zero", "errno": 5}]));
    assert_eq!(
        n.write_zeroes(0, 4096, ZeroFlags::default())
            .unwrap_err()
            .kind(),
        ErrorKind::Io
    );
    w(&n, 0, b"ok").unwrap();

    let n = dbg(
        &g,
        "d6",
        json!([{"event": "x-any", "iotype": ["write", "flush"], "errno": 1}]),
    );
    assert_eq!(
        w(&n, 0, b"x").unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    n.read(0, &mut b).unwrap();
    assert!(n.flush().is_err());
}

#[test]
fn sector_once_and_after() {
    let g = Graph::new();
    let n = dbg(
        &g,
        "s",
        json!([{"event": "read_aio", "sector": 8, "once": true}]),
    );
    let mut b = [0u8; 512];
    n.read(0, &mut b).unwrap();
    n.read(4608, &mut b).unwrap();
    assert!(
        n.read(4096 - 100, &mut b).is_err(),
        "request covering sector 8 fails"
    );
    n.read(4096, &mut b).unwrap();
    assert_eq!(n.driver_as::<BlkDebug>().unwrap().injected(), 1);

    let n = dbg(
        &g,
        "a",
        json!([{"event": "write_aio", "x-after": 3, "errno": 5}]),
    );
    for i in 0..3 {
        w(&n, i * 512, b"ok").unwrap();
    }
    assert!(w(&n, 0, b"no").is_err());
    assert!(w(&n, 0, b"no").is_err(), "not once: keeps failing");
    let d = n.driver_as::<BlkDebug>().unwrap();
    d.clear_rules();
    w(&n, 0, b"ok").unwrap();
    d.inject(
        InjectRule::new(IoMask::READ, libc::EIO)
            .range(1000, 10)
            .once(),
    );
    n.read(0, &mut b[..100]).unwrap();
    assert!(n.read(1005, &mut b[..1]).is_err());
    n.read(1005, &mut b[..1]).unwrap();
}

#[test]
fn errors_through_parents_keep_the_innermost_node_name() {
    let g = Graph::new();
    dbg(&g, "bottom", json!([{"event": "read_aio", "errno": 28}]));
    let top = g
        .add_node(&json!({"driver": "memory", "node-name": "top", "backing": "bottom"}))
        .unwrap();
    let mut b = [0u8; 16];
    let e = top.read(0, &mut b).unwrap_err();
    assert_eq!((e.kind(), e.node()), (ErrorKind::NoSpace, Some("bottom")));
    // Through a backend too.
    let be = g.new_backend(&top, PermPair::READ_WRITE).unwrap();
    let e = be.read(0, &mut b).unwrap_err();
    assert_eq!((e.kind(), e.node()), (ErrorKind::NoSpace, Some("bottom")));
    // A write into top copies the cluster from the backing: the failure surfaces and
    // nothing is allocated in top.
    let e = top.write(10, b"x", WriteFlags::default()).unwrap_err();
    assert_eq!(e.node(), Some("bottom"));
    assert!(
        !g.is_allocated_above(&top, Some(&g.node("bottom").unwrap()), 0, 512)
            .unwrap()
            .0
    );
}

#[test]
fn failed_write_never_reports_bytes_written() {
    let g = Graph::new();
    let n = dbg(&g, "f", json!([{"event": "write_aio", "errno": 5}]));
    let img = g.node("f-img").unwrap();
    assert!(w(&n, 0, &[9u8; 4096]).is_err());
    assert_eq!(n.stats().write.bytes, 0);
    assert_eq!(n.stats().write.errors, 1);
    assert_eq!(img.stats().write.ops, 0);
    assert_eq!(r(&img, 0, 4096), vec![0u8; 4096]);
}

fn quorum(
    g: &Graph,
    name: &str,
    threshold: u64,
    pattern: &str,
    children: serde_json::Value,
) -> NodeRef {
    g.add_node(
        &json!({"driver": "quorum", "node-name": name, "vote-threshold": threshold,
        "read-pattern": pattern, "children": children}),
    )
    .unwrap()
}

#[test]
fn quorum_threshold_one_survives_a_failing_child() {
    let g = Graph::new();
    let bad = dbg(&g, "bad", json!([{"event": "x-any", "errno": 5}]));
    let good = g
        .add_node(&json!({"driver": "memory", "node-name": "good", "size": 1 << 20}))
        .unwrap();
    let q = quorum(&g, "q", 1, "fifo", json!(["bad", "good"]));
    w(&q, 100, b"survives").unwrap();
    q.flush().unwrap();
    assert_eq!(r(&good, 100, 8), b"survives");
    assert_eq!(
        r(&q, 100, 8),
        b"survives",
        "fifo read falls through to the good child"
    );
    let reps = q.driver_as::<Quorum>().unwrap().take_reports();
    assert!(reps
        .iter()
        .any(|r| r.kind == QuorumReportKind::ChildError && r.child.as_deref() == Some("bad")));
    // The failing child is in use by 'q': a second writer is refused.
    let e = g
        .add_node(&json!({"driver": "quorum", "node-name": "qx", "vote-threshold": 1, "children": ["bad"]}))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    drop(bad);
    // Threshold 2 with a failing child: the write fails and names the quorum.
    dbg(&g, "bad2", json!([{"event": "x-any", "errno": 5}]));
    let q2 = g
        .add_node(
            &json!({"driver": "quorum", "node-name": "q2", "vote-threshold": 2,
            "children": ["bad2", {"driver": "memory", "size": 1 << 20}]}),
        )
        .unwrap();
    let e = w(&q2, 0, b"x").unwrap_err();
    assert_eq!((e.kind(), e.node()), (ErrorKind::Io, Some("q2")));
    assert!(e.to_string().contains("bad2"), "{e}");
    assert_eq!(q2.stats().write.bytes, 0);
}

#[test]
fn quorum_reads_vote_and_report_mismatches() {
    let g = Graph::new();
    for n in ["c0", "c1", "c2"] {
        g.add_node(&json!({"driver": "memory", "node-name": n, "size": 65536}))
            .unwrap();
    }
    let q = quorum(&g, "q", 2, "quorum", json!(["c0", "c1", "c2"]));
    w(&q, 0, b"same").unwrap();
    w(&g.node("c1").unwrap(), 0, b"DIFF").unwrap();
    assert_eq!(r(&q, 0, 4), b"same");
    let reps = q.driver_as::<Quorum>().unwrap().take_reports();
    assert_eq!(reps.len(), 1);
    assert_eq!(
        (reps[0].kind, reps[0].child.as_deref()),
        (QuorumReportKind::Mismatch, Some("c1"))
    );
    // Two versions each below the threshold: the read fails.
    w(&g.node("c2").unwrap(), 0, b"3rd!").unwrap();
    let mut b = [0u8; 4];
    let e = q.read(0, &mut b).unwrap_err();
    assert_eq!((e.kind(), e.node()), (ErrorKind::Io, Some("q")));
    assert!(e.to_string().contains("vote-threshold"), "{e}");
}

#[test]
fn quorum_rewrite_corrupted_repairs_the_odd_child() {
    let g = Graph::new();
    let q = g
        .add_node(&json!({"driver": "quorum", "node-name": "q", "vote-threshold": 2, "rewrite-corrupted": true,
            "children": [{"driver": "memory", "node-name": "a", "size": 4096},
                         {"driver": "memory", "node-name": "b", "size": 4096},
                         {"driver": "memory", "node-name": "c", "size": 4096}]}))
        .unwrap();
    w(&q, 0, b"good").unwrap();
    w(&g.node("b").unwrap(), 0, b"evil").unwrap();
    assert_eq!(r(&q, 0, 4), b"good");
    assert_eq!(r(&g.node("b").unwrap(), 0, 4), b"good");
}

#[test]
fn quorum_children_change_at_run_time() {
    let g = Graph::new();
    let q = quorum(
        &g,
        "q",
        1,
        "fifo",
        json!([{"driver": "memory", "node-name": "a", "size": 4096}]),
    );
    w(&q, 0, b"one").unwrap();
    let b = g
        .add_node(&json!({"driver": "memory", "node-name": "b", "size": 4096}))
        .unwrap();
    let short = g
        .add_node(&json!({"driver": "memory", "node-name": "s", "size": 512}))
        .unwrap();
    assert!(g
        .blockdev_change_add(&q, &short)
        .unwrap_err()
        .to_string()
        .contains("length"));
    let role = g.blockdev_change_add(&q, &b).unwrap();
    assert_eq!(role, Role::Child(1));
    assert_eq!(role.to_string(), "children.1");
    w(&q, 0, b"two").unwrap();
    assert_eq!(r(&b, 0, 3), b"two");
    g.blockdev_change_del(&q, &Role::parse("children.0"))
        .unwrap();
    assert_eq!(r(&q, 0, 3), b"two");
    let e = g.blockdev_change_del(&q, &Role::Child(1)).unwrap_err();
    assert!(e.to_string().contains("vote threshold"), "{e}");
    assert_eq!(q.children().len(), 1);
    assert_eq!(
        g.blockdev_change_del(&q, &Role::Child(7))
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    // Other drivers refuse.
    assert_eq!(
        g.blockdev_change_add(&b, &short).unwrap_err().kind(),
        ErrorKind::NotSupported
    );
}

#[test]
fn delays_and_holds() {
    let g = Graph::new();
    let n = g
        .add_node(&json!({"driver": "blkdebug", "node-name": "d", "image": {"driver": "null-co", "size": 4096},
            "x-delays": [{"iotype": "write", "us": 20000}]}))
        .unwrap();
    let t = Instant::now();
    w(&n, 0, b"x").unwrap();
    assert!(t.elapsed() >= Duration::from_millis(20));
    let ns = n.stats().write.nanos;
    assert!(
        (15_000_000..5_000_000_000).contains(&ns),
        "write time {ns} ns"
    );
    let t = Instant::now();
    let mut b = [0u8; 1];
    n.read(0, &mut b).unwrap();
    assert!(t.elapsed() < Duration::from_millis(20));
    let d = n.driver_as::<BlkDebug>().unwrap();
    d.clear_delays();
    let hold = d.hold(IoMask::READ, Some((100, 10)));
    n.read(0, &mut b).unwrap(); // outside the range
    let n2 = n.clone();
    let th = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        n2.read(105, &mut b).unwrap();
    });
    assert!(hold.wait_reached(1, Duration::from_secs(5)));
    assert_eq!(n.in_flight(), 1);
    hold.release();
    th.join().unwrap();
    assert_eq!(n.in_flight(), 0);
}

#[test]
fn quorum_events_reach_subscribers() {
    let g = Graph::new();
    let rx = g.subscribe();
    for n in ["c0", "c1"] {
        g.add_node(&json!({"driver": "memory", "node-name": n, "size": 4096}))
            .unwrap();
    }
    let q = quorum(&g, "q", 1, "quorum", json!(["c0", "c1"]));
    w(&q, 0, b"ab").unwrap();
    w(&g.node("c1").unwrap(), 0, b"XY").unwrap();
    assert_eq!(r(&q, 0, 2), b"ab", "tie: the first child's version wins");
    let ev = rx.try_recv().unwrap();
    assert_eq!(
        ev,
        GraphEvent::QuorumReportBad {
            node: "q".into(),
            child: "c1".into(),
            offset: 0,
            len: 2,
            error: None
        }
    );
    assert!(rx.try_recv().is_err());
    let q2 = quorum(
        &g,
        "q2",
        2,
        "quorum",
        json!([{"driver": "memory", "node-name": "d0", "size": 4096},
        {"driver": "memory", "node-name": "d1", "size": 4096}]),
    );
    w(&g.node("d1").unwrap(), 0, b"Z").unwrap();
    let mut b = [0u8; 1];
    assert!(q2.read(0, &mut b).is_err());
    assert_eq!(
        rx.try_recv().unwrap(),
        GraphEvent::QuorumFailure {
            node: "q2".into(),
            offset: 0,
            len: 1
        }
    );
    g.remove_node("q2").unwrap();
    let removed: Vec<GraphEvent> = rx.try_iter().collect();
    assert!(
        removed.contains(&GraphEvent::NodeRemoved { node: "q2".into() }),
        "{removed:?}"
    );
    assert!(
        removed.contains(&GraphEvent::NodeRemoved { node: "d0".into() }),
        "{removed:?}"
    );
}

#[test]
fn parallel_quorum_writes_survive_a_failing_child_and_a_drain() {
    let g = Graph::new();
    dbg(&g, "bad", json!([{"event": "x-any", "errno": 28}]));
    let good = g
        .add_node(&json!({"driver": "blkdebug", "node-name": "slow", "x-delays": [{"iotype": "write", "us": 30000}],
            "image": {"driver": "memory", "node-name": "good", "size": 1 << 20}}))
        .unwrap();
    let q = g
        .add_node(&json!({"driver": "quorum", "node-name": "q", "vote-threshold": 1, "read-pattern": "fifo",
            "x-parallel-writes": true, "children": ["bad", "slow"]}))
        .unwrap();
    let q2 = q.clone();
    let t = std::thread::spawn(move || w(&q2, 0, b"parallel"));
    std::thread::sleep(Duration::from_millis(5));
    // Draining a child waits for the quorum's in-flight write, whose child
    // requests run on helper threads.
    let d = g.drain(std::slice::from_ref(&good));
    assert_eq!(q.in_flight(), 0);
    drop(d);
    t.join().unwrap().unwrap();
    assert_eq!(r(&g.node("good").unwrap(), 0, 8), b"parallel");
    let e = g.node("bad").unwrap();
    assert_eq!(e.stats().write.errors, 1);
}
