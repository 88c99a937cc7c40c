//! The serve_props hang, replayed over QMP: a backup `j1` of `b` into the
//! quorum `q` that has `b` as its child (speed-limited, so it still runs),
//! a mirror `j2` of `e` into `q`, then `x-blockdev-change` adding `r` to `q`
//! (a drained section over the jobs' nodes). Before the fixes the backup
//! waited for its own copy through its copy-before-write filter, and the
//! x-blockdev-change never returned. Every reply must come (the QMP socket
//! read times out after 60 s: the test then fails instead of hanging), both
//! jobs must finish without error.
//!
//! As in QEMU, `j2` is refused while `j1` runs (every job blocks every
//! operation on the nodes it uses: "Node 'q' is busy: block device is in
//! use by block job: backup"); so `r` is attached while `j1` copies into
//! `q`, and `j2` runs once `j1` completed, with `s` attached during its run.

mod common;

use std::time::Duration;

use common::{Daemon, Qmp};
use serde_json::{json, Value};

fn completed(q: &mut Qmp, job: &str) -> Value {
    let ev = q.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60), |d| {
        d["device"] == job
    });
    assert!(ev["data"].get("error").is_none(), "{job} failed: {ev}");
    ev
}

fn run_round(round: u32) {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), "cycle");
    let mut q = d.qmp();
    for (name, opts) in [
        ("a", json!({"driver": "memory", "size": 4 << 20})),
        ("b", json!({"driver": "memory", "size": 4 << 20})),
        ("c", json!({"driver": "memory", "backing": "a"})),
        (
            "q",
            json!({"driver": "quorum", "vote-threshold": 1, "children": ["b"]}),
        ),
        (
            "r",
            json!({"driver": "quorum", "vote-threshold": 1,
                   "children": [{"driver": "memory", "size": 4 << 20}]}),
        ),
        (
            "s",
            json!({"driver": "quorum", "vote-threshold": 1,
                   "children": [{"driver": "memory", "size": 4 << 20}]}),
        ),
        (
            "e",
            json!({"driver": "quorum", "vote-threshold": 1,
                   "children": [{"driver": "memory", "size": 4 << 20}]}),
        ),
    ] {
        let mut o = opts;
        o["node-name"] = json!(name);
        q.ok("blockdev-add", o);
    }
    // 4 MiB at 2 MiB/s: j1 still copies while j2 starts and r is attached
    q.ok(
        "blockdev-backup",
        json!({"device": "b", "job-id": "j1", "sync": "full", "target": "q",
               "speed": 2 << 20}),
    );
    let mirror = json!({"device": "e", "job-id": "j2", "sync": "full", "target": "q"});
    assert_eq!(
        q.err("blockdev-mirror", mirror.clone()),
        (
            "GenericError".to_string(),
            "Node 'q' is busy: block device is in use by block job: backup".to_string()
        )
    );
    std::thread::sleep(Duration::from_millis(50 * u64::from(round)));
    q.ok("x-blockdev-change", json!({"node": "r", "parent": "q"}));
    completed(&mut q, "j1");
    q.ok("blockdev-mirror", mirror);
    std::thread::sleep(Duration::from_millis(5 * u64::from(round)));
    q.ok("x-blockdev-change", json!({"node": "s", "parent": "q"}));
    let kids: Vec<Value> = q
        .ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == "q")
        .cloned()
        .collect();
    assert_eq!(kids.len(), 1, "{kids:?}");
    q.wait_event("BLOCK_JOB_READY", Duration::from_secs(60), |d| {
        d["device"] == "j2"
    });
    q.ok("job-complete", json!({"id": "j2"}));
    completed(&mut q, "j2");
    assert_eq!(q.ok("query-block-jobs", json!({})), json!([]));
    // and the graph still drains: s and r come out of q again
    for i in [2, 1] {
        q.ok(
            "x-blockdev-change",
            json!({"child": format!("children.{i}"), "parent": "q"}),
        );
    }
}

#[test]
fn backup_into_parent_quorum_mirror_and_blockdev_change_answer() {
    for round in 0..3 {
        run_round(round);
    }
}
