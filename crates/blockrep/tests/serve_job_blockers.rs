//! Job op blockers over QMP (QEMU's `block_job_add_bdrv`): a running job
//! blocks every operation on the nodes it uses, so a second job into (or
//! from) one of them is refused with QEMU's GenericError "Node 'x' is busy:
//! block device is in use by block job: backup"; once the first job is gone
//! the same command is accepted.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn job_ids(q: &mut Qmp) -> Vec<String> {
    q.ok("query-jobs", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

fn busy(node: &str, job: &str) -> Value {
    json!({"class": "GenericError",
           "desc": format!("Node '{node}' is busy: block device is in use by block job: {job}")})
}

#[test]
fn second_backup_into_the_same_target_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, "d");
    let mut q = d.qmp();
    for n in ["s1", "s2", "tgt", "other"] {
        q.ok(
            "blockdev-add",
            json!({"driver": "memory", "node-name": n, "size": 4 * MIB}),
        );
    }
    q.ok(
        "blockdev-backup",
        json!({"job-id": "b1", "device": "s1", "target": "tgt", "sync": "none"}),
    );

    // the raw reply: {"error": {"class": "GenericError", "desc": ...}}
    let r = q.raw(json!({"execute": "blockdev-backup",
        "arguments": {"job-id": "b2", "device": "s2", "target": "tgt", "sync": "full"}}));
    assert_eq!(r["error"], busy("tgt", "backup"), "{r}");
    assert!(r.get("return").is_none(), "{r}");
    // a mirror into the backup's target, a backup from its source
    assert_eq!(
        q.exec(
            "blockdev-mirror",
            json!({"job-id": "m1", "device": "s2", "target": "tgt", "sync": "full"})
        )
        .unwrap_err(),
        busy("tgt", "backup")
    );
    assert_eq!(
        q.exec(
            "blockdev-backup",
            json!({"job-id": "b2", "device": "s1", "target": "other", "sync": "full"})
        )
        .unwrap_err(),
        busy("s1", "backup")
    );
    assert_eq!(job_ids(&mut q), ["b1"]);

    // gone once the first job is cancelled (and dismissed: auto-dismiss)
    q.ok("job-cancel", json!({"id": "b1"}));
    q.wait_event("BLOCK_JOB_CANCELLED", T, |d| d["device"] == "b1");
    assert!(
        wait_until(T, || job_ids(&mut q).is_empty()),
        "b1 still listed"
    );
    q.ok(
        "blockdev-backup",
        json!({"job-id": "b2", "device": "s2", "target": "tgt", "sync": "full"}),
    );
    let ev = q.wait_event("BLOCK_JOB_COMPLETED", T, |d| d["device"] == "b2");
    assert!(ev["data"].get("error").is_none(), "{ev}");
    assert!(
        wait_until(T, || job_ids(&mut q).is_empty()),
        "b2 still listed"
    );
    // and the target is free again
    q.ok(
        "blockdev-backup",
        json!({"job-id": "b3", "device": "s1", "target": "tgt", "sync": "full"}),
    );
    q.wait_event("BLOCK_JOB_COMPLETED", T, |d| d["device"] == "b3");
}
