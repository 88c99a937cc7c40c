//! QEMU's `block_resize`, generic job commands (`query-jobs`, `job-*`),
//! `block-export-del` / `query-block-exports`, the job and export events,
//! and the graph after a secondary's failover, driven over the daemon's QMP
//! socket with QEMU's argument shapes. Exact return values, error classes
//! and descriptions (QEMU's wording), and event data.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(30);

fn node_info(q: &mut Qmp, name: &str) -> Option<Value> {
    q.ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == name)
        .cloned()
}

fn vsize(q: &mut Qmp, name: &str) -> u64 {
    node_info(q, name).unwrap()["image"]["virtual-size"]
        .as_u64()
        .unwrap()
}

fn names(q: &mut Qmp) -> Vec<String> {
    q.ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap().to_string())
        .collect()
}

fn files(q: &mut Qmp) -> Vec<String> {
    q.ok("query-named-block-nodes", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["file"].as_str().unwrap().to_string())
        .collect()
}

fn err_is(q: &mut Qmp, cmd: &str, args: Value, class: &str, desc: &str) {
    let (c, d) = q.err(cmd, args.clone());
    assert_eq!((c.as_str(), d.as_str()), (class, desc), "{cmd} {args}");
}

fn start_nbd(q: &mut Qmp, dir: &Path) {
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": dir.join("nbd.sock")}}}),
    );
}

fn job_status(q: &mut Qmp, id: &str) -> Option<String> {
    q.ok("query-jobs", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["id"] == id)
        .map(|j| j["status"].as_str().unwrap().to_string())
}

fn wait_status(q: &mut Qmp, id: &str, status: &str) {
    assert!(
        wait_until(T, || job_status(q, id).as_deref() == Some(status)),
        "job {id} never reached {status}: {:?}",
        q.ok("query-jobs", json!({}))
    );
}

/// The JOB_STATUS_CHANGE statuses of `id` seen so far, in order (events
/// are left in place).
fn statuses(q: &Qmp, id: &str) -> Vec<String> {
    q.events
        .iter()
        .filter(|e| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["id"] == id)
        .map(|e| {
            let d = e["data"].as_object().unwrap();
            assert_eq!(
                d.len(),
                2,
                "JOB_STATUS_CHANGE has exactly id and status: {e}"
            );
            d["status"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Waits for JOB_STATUS_CHANGE {id, status} without taking the earlier
/// events out of the list.
fn wait_job_event(q: &mut Qmp, id: &str, status: &str) {
    let ev = q.wait_event("JOB_STATUS_CHANGE", T, |d| {
        d["id"] == id && d["status"] == status
    });
    q.events.push(ev);
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

/// A memory node of `size` bytes exported (writable) as `name`, filled
/// with `byte` through NBD.
fn memory_filled(q: &mut Qmp, dir: &Path, name: &str, size: u64, byte: u8) {
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": name, "size": size}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": format!("fill-{name}"), "node-name": name,
               "writable": true}),
    );
    qemu_io(
        &nbd_uri(&dir.join("nbd.sock"), name),
        &[&format!("write -P {byte:#x} 0 {size}")],
    );
    // Hard: qemu-io's connection may still be closing on the server side.
    q.ok(
        "block-export-del",
        json!({"id": format!("fill-{name}"), "mode": "hard"}),
    );
    q.wait_event("BLOCK_EXPORT_DELETED", T, |d| {
        d == &json!({"id": format!("fill-{name}")})
    });
}

#[test]
fn block_resize_grows_and_shrinks_with_qemu_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, "d");
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": MIB}),
    );
    assert_eq!(
        q.ok("block_resize", json!({"node-name": "m", "size": 2 * MIB})),
        json!({})
    );
    assert_eq!(vsize(&mut q, "m"), 2 * MIB);
    assert_eq!(
        q.ok(
            "block_resize",
            json!({"node-name": "m", "size": 512 * 1024})
        ),
        json!({})
    );
    assert_eq!(vsize(&mut q, "m"), 512 * 1024);

    // A raw image file grows on disk.
    fill_file(&dir.join("a.raw"), MIB as usize, 0x11);
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r",
               "file": {"driver": "file", "filename": dir.join("a.raw")}}),
    );
    q.ok("block_resize", json!({"node-name": "r", "size": 4 * MIB}));
    assert_eq!(vsize(&mut q, "r"), 4 * MIB);
    assert_eq!(std::fs::metadata(dir.join("a.raw")).unwrap().len(), 4 * MIB);
    // Grown part reads as zeros, old data kept.
    start_nbd(&mut q, dir);
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "er", "node-name": "r", "writable": true}),
    );
    qemu_io(
        &nbd_uri(&dir.join("nbd.sock"), "r"),
        &["read -P 0x11 0 1M", "read -P 0 1M 3M"],
    );

    // A qcow2 image grows (virtual size, checked by qemu-img after close).
    qemu_img_create("qcow2", &dir.join("b.qcow2"), "64M");
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "qc",
               "file": {"driver": "file", "filename": dir.join("b.qcow2")}}),
    );
    q.ok(
        "block_resize",
        json!({"node-name": "qc", "size": 128 * MIB}),
    );
    assert_eq!(vsize(&mut q, "qc"), 128 * MIB);
    // Our qcow2 does not shrink: refused, size unchanged.
    let (class, desc) = q.err("block_resize", json!({"node-name": "qc", "size": 32 * MIB}));
    assert_eq!(class, "GenericError");
    assert!(
        desc.contains("shrinking") && desc.contains("not supported"),
        "{desc}"
    );
    assert_eq!(vsize(&mut q, "qc"), 128 * MIB);
    q.ok("blockdev-del", json!({"node-name": "qc"}));
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(dir.join("b.qcow2"))
        .output()
        .expect("qemu-img (install qemu-utils)");
    assert!(out.status.success());
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], 128 * MIB);
    qemu_img_check(&dir.join("b.qcow2"));

    // `device` names a block backend (our exports' ids), not a node.
    q.ok("block_resize", json!({"device": "er", "size": 5 * MIB}));
    assert_eq!(vsize(&mut q, "r"), 5 * MIB);

    // Errors, as QEMU words them; nothing changes.
    err_is(
        &mut q,
        "block_resize",
        json!({"node-name": "nope", "size": MIB}),
        "GenericError",
        "Cannot find device='' nor node-name='nope'",
    );
    err_is(
        &mut q,
        "block_resize",
        json!({"device": "nope", "size": MIB}),
        "GenericError",
        "Cannot find device='nope' nor node-name=''",
    );
    // An unknown device falls back to node-name, as QEMU; our daemon has no
    // guest devices, so `device` may also name a node (QEMU would refuse).
    q.ok(
        "block_resize",
        json!({"device": "nope", "node-name": "m", "size": 768 * 1024}),
    );
    assert_eq!(vsize(&mut q, "m"), 768 * 1024);
    q.ok("block_resize", json!({"device": "m", "size": 512 * 1024}));
    err_is(
        &mut q,
        "block_resize",
        json!({"size": MIB}),
        "GenericError",
        "Cannot find device='' nor node-name=''",
    );
    err_is(
        &mut q,
        "block_resize",
        json!({"node-name": "m", "size": -1}),
        "GenericError",
        "Parameter 'size' expects a >0 size",
    );
    let (class, _) = q.err("block_resize", json!({"node-name": "m"}));
    assert_eq!(class, "GenericError");
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "ro", "size": MIB, "read-only": true}),
    );
    err_is(
        &mut q,
        "block_resize",
        json!({"node-name": "ro", "size": 2 * MIB}),
        "GenericError",
        "Block node is read-only",
    );
    assert_eq!(vsize(&mut q, "ro"), MIB);
    // Huge sizes: refused by drivers that cannot (file: EFBIG), taken by
    // the sparse memory driver; never a crash.
    let (class, desc) = q.err("block_resize", json!({"node-name": "r", "size": i64::MAX}));
    assert_eq!(class, "GenericError");
    assert!(desc.contains("File too large"), "{desc}");
    assert_eq!(vsize(&mut q, "r"), 5 * MIB);
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "big", "size": MIB}),
    );
    q.ok(
        "block_resize",
        json!({"node-name": "big", "size": 1u64 << 50}),
    );
    assert_eq!(vsize(&mut q, "big"), 1u64 << 50);
    assert_eq!(vsize(&mut q, "m"), 512 * 1024);
}

fn sec_images(dir: &Path) {
    fill_file(&dir.join("sec.raw"), 64 * MIB as usize, 0x11);
    qemu_img_create("qcow2", &dir.join("active.qcow2"), "64M");
    qemu_img_create("qcow2", &dir.join("hidden.qcow2"), "64M");
}

/// The secondary stack with replication running. With `named_hidden` the
/// hidden disk is added by name first (monitor-owned, as QEMU's
/// `blockdev-add`), else it is defined inline.
fn secondary(dir: &Path, d: &Daemon, named_hidden: bool) -> Qmp {
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "sec-disk",
               "file": {"driver": "file", "filename": dir.join("sec.raw")}}),
    );
    start_nbd(&mut q, dir);
    q.ok(
        "nbd-server-add",
        json!({"device": "sec-disk", "writable": true}),
    );
    let hidden = json!({"driver": "qcow2", "node-name": "hidden",
                        "file": {"driver": "file", "filename": dir.join("hidden.qcow2")},
                        "backing": "sec-disk"});
    let hidden_ref = if named_hidden {
        q.ok("blockdev-add", hidden);
        json!("hidden")
    } else {
        hidden
    };
    q.ok(
        "blockdev-add",
        json!({"driver": "replication", "node-name": "top", "mode": "secondary",
               "top-id": "top",
               "file": {"driver": "qcow2", "node-name": "active",
                        "file": {"driver": "file", "filename": dir.join("active.qcow2")},
                        "backing": hidden_ref}}),
    );
    q.ok(
        "nbd-server-add",
        json!({"device": "top", "name": "disk0", "writable": true}),
    );
    q.ok(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );
    q
}

fn repl_state(q: &mut Qmp) -> String {
    q.ok("x-blockrep-query-replication", json!({"node-name": "top"}))[0]["state"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn block_resize_refused_on_a_replicating_top_allowed_after_failover() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    sec_images(dir);
    let d = Daemon::start(dir, "sec");
    let mut q = secondary(dir, &d, false);
    assert_eq!(repl_state(&mut q), "RUNNING");
    let before = q.ok("query-named-block-nodes", json!({}));
    let (class, desc) = q.err(
        "block_resize",
        json!({"node-name": "top", "size": 128 * MIB}),
    );
    assert_eq!(class, "GenericError");
    assert!(
        desc.starts_with("Device 'top' is in use: ")
            && desc.contains("in use by internal backup job"),
        "{desc}"
    );
    // Consistent with a job on the top.
    let (_, commit_desc) = q.err("block-commit", json!({"device": "top", "job-id": "c"}));
    assert!(
        commit_desc.contains("in use by internal backup job"),
        "{commit_desc}"
    );
    assert_eq!(q.ok("query-named-block-nodes", json!({})), before);

    q.ok("x-colo-lost-heartbeat", json!({}));
    assert!(wait_until(T, || repl_state(&mut q) == "DONE"));
    // The disk under the top now grows (the top's blocker is gone).
    assert_eq!(
        q.ok(
            "block_resize",
            json!({"node-name": "sec-disk", "size": 96 * MIB})
        ),
        json!({})
    );
    assert_eq!(vsize(&mut q, "sec-disk"), 96 * MIB);
    assert_eq!(
        std::fs::metadata(dir.join("sec.raw")).unwrap().len(),
        96 * MIB
    );
}

#[test]
fn failover_closes_inline_active_and_hidden_disks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    sec_images(dir);
    let d = Daemon::start(dir, "sec");
    let mut q = secondary(dir, &d, false);
    let guest = nbd_uri(&dir.join("nbd.sock"), "disk0");
    qemu_io(&guest, &["write -P 0x33 1M 64k"]);
    let n = names(&mut q);
    assert!(
        n.contains(&"active".into()) && n.contains(&"hidden".into()),
        "{n:?}"
    );
    // Replication's internal jobs (backup, failover commit) are never
    // listed and send no job events.
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));
    assert_eq!(q.ok("query-block-jobs", json!({})), json!([]));
    q.ok("x-colo-lost-heartbeat", json!({}));
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));
    assert!(wait_until(T, || repl_state(&mut q) == "DONE"));
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));
    assert!(
        !q.events.iter().any(|e| {
            let n = e["event"].as_str().unwrap();
            n == "JOB_STATUS_CHANGE" || n.starts_with("BLOCK_JOB_")
        }),
        "{:?}",
        q.events
    );
    // As QEMU: active left the chain, replication dropped the hidden disk;
    // both (and their protocol nodes) are closed.
    let n = names(&mut q);
    assert!(
        !n.contains(&"active".into()) && !n.contains(&"hidden".into()),
        "{n:?}"
    );
    let f = files(&mut q);
    assert!(
        !f.iter()
            .any(|f| f.contains("active.qcow2") || f.contains("hidden.qcow2")),
        "{f:?}"
    );
    let top = node_info(&mut q, "top").unwrap();
    assert_eq!(
        top["children"],
        json!([{"child": "file", "node-name": "sec-disk"}])
    );
    // The images are closed cleanly and can be opened again.
    qemu_img_check(&dir.join("hidden.qcow2"));
    qemu_img_check(&dir.join("active.qcow2"));
    qemu_io(&guest, &["read -P 0x33 1M 64k", "read -P 0x11 0 1M"]);
}

#[test]
fn failover_keeps_a_hidden_disk_added_by_name_until_blockdev_del() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    sec_images(dir);
    let d = Daemon::start(dir, "sec");
    let mut q = secondary(dir, &d, true);
    // Failover through xen-set-replication this time.
    q.ok(
        "xen-set-replication",
        json!({"enable": false, "primary": false, "failover": true}),
    );
    assert!(wait_until(T, || repl_state(&mut q) == "DONE"));
    // Give the daemon's release step time to (wrongly) act.
    std::thread::sleep(Duration::from_millis(300));
    let n = names(&mut q);
    assert!(!n.contains(&"active".into()), "{n:?}");
    assert!(n.contains(&"hidden".into()), "{n:?}");
    assert_eq!(
        q.ok("blockdev-del", json!({"node-name": "hidden"})),
        json!({})
    );
    assert!(!names(&mut q).contains(&"hidden".into()));
    qemu_img_check(&dir.join("hidden.qcow2"));
}

#[test]
fn query_jobs_and_job_verbs_on_a_running_backup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, "d");
    let mut q = d.qmp();
    start_nbd(&mut q, dir);
    memory_filled(&mut q, dir, "src", 8 * MIB, 0x5a);
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "tgt", "size": 8 * MIB}),
    );
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));
    // 64 KiB/s: 8 MiB take two minutes, the job stays running.
    q.ok(
        "blockdev-backup",
        json!({"job-id": "j0", "device": "src", "target": "tgt", "sync": "full",
               "speed": 65536}),
    );
    wait_status(&mut q, "j0", "running");
    let jobs = q.ok("query-jobs", json!({}));
    let j = &jobs.as_array().unwrap()[0];
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    assert_eq!(
        keys(j),
        ["current-progress", "id", "status", "total-progress", "type"]
    );
    assert_eq!(
        (&j["id"], &j["type"], &j["status"], &j["total-progress"]),
        (
            &json!("j0"),
            &json!("backup"),
            &json!("running"),
            &json!(8 * MIB)
        )
    );
    assert!(j["current-progress"].as_u64().unwrap() < 8 * MIB);
    let bj = q.ok("query-block-jobs", json!({}));
    assert_eq!(bj[0]["device"], "j0");
    assert_eq!(bj[0]["auto-dismiss"], true);
    assert_eq!(bj[0]["auto-finalize"], true);

    // Verbs the state does not accept, with QEMU's words.
    for verb in ["complete", "finalize", "dismiss"] {
        err_is(
            &mut q,
            &format!("job-{verb}"),
            json!({"id": "j0"}),
            "GenericError",
            &format!("Job 'j0' in state 'running' cannot accept command verb '{verb}'"),
        );
    }
    err_is(
        &mut q,
        "job-resume",
        json!({"id": "j0"}),
        "GenericError",
        "Can't resume a job that was not paused",
    );
    // Pause / resume.
    assert_eq!(q.ok("job-pause", json!({"id": "j0"})), json!({}));
    wait_status(&mut q, "j0", "paused");
    err_is(
        &mut q,
        "job-pause",
        json!({"id": "j0"}),
        "GenericError",
        "Job is already paused",
    );
    err_is(
        &mut q,
        "block-job-pause",
        json!({"device": "j0"}),
        "GenericError",
        "Job is already paused",
    );
    err_is(
        &mut q,
        "block-job-cancel",
        json!({"device": "j0"}),
        "GenericError",
        "The block job for device 'j0' is currently paused",
    );
    let progress = q.ok("query-jobs", json!({}))[0]["current-progress"].clone();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        q.ok("query-jobs", json!({}))[0]["current-progress"],
        progress
    );
    assert_eq!(q.ok("job-resume", json!({"id": "j0"})), json!({}));
    wait_status(&mut q, "j0", "running");
    // Cancel (always forced, as QEMU's job-cancel).
    assert_eq!(q.ok("job-cancel", json!({"id": "j0"})), json!({}));
    let ev = q.wait_event("BLOCK_JOB_CANCELLED", T, |d| d["device"] == "j0");
    let data = &ev["data"];
    assert_eq!(keys(data), ["device", "len", "offset", "speed", "type"]);
    assert_eq!(
        (&data["type"], &data["len"], &data["speed"]),
        (&json!("backup"), &json!(8 * MIB), &json!(65536))
    );
    assert!(data["offset"].as_u64().unwrap() < 8 * MIB);
    wait_job_event(&mut q, "j0", "null");
    assert_eq!(
        statuses(&q, "j0"),
        [
            "created",
            "running",
            "paused",
            "running",
            "aborting",
            "concluded",
            "null"
        ]
    );
    assert!(
        !q.events.iter().any(|e| e["event"] == "BLOCK_JOB_COMPLETED"),
        "{:?}",
        q.events
    );
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));

    // Unknown ids.
    for verb in [
        "job-pause",
        "job-resume",
        "job-cancel",
        "job-complete",
        "job-finalize",
        "job-dismiss",
    ] {
        err_is(
            &mut q,
            verb,
            json!({"id": "j0"}),
            "GenericError",
            "Job not found",
        );
    }
    err_is(
        &mut q,
        "block-job-pause",
        json!({"device": "j0"}),
        "DeviceNotActive",
        "Block job 'j0' not found",
    );
}

#[test]
fn mirror_ready_standby_complete_and_manual_dismiss() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, "d");
    let mut q = d.qmp();
    start_nbd(&mut q, dir);
    memory_filled(&mut q, dir, "src", 4 * MIB, 0x6b);
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "tgt", "size": 4 * MIB}),
    );
    q.ok(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "src", "target": "tgt", "sync": "full",
               "auto-dismiss": false}),
    );
    let ev = q.wait_event("BLOCK_JOB_READY", T, |d| d["device"] == "m0");
    let data = &ev["data"];
    assert_eq!(keys(data), ["device", "len", "offset", "speed", "type"]);
    assert_eq!(
        (&data["type"], &data["speed"]),
        (&json!("mirror"), &json!(0))
    );
    assert_eq!(data["len"], data["offset"]);
    wait_status(&mut q, "m0", "ready");
    let bj = q.ok("query-block-jobs", json!({}));
    let b = &bj[0];
    assert_eq!(
        keys(b),
        [
            "actively-synced",
            "auto-dismiss",
            "auto-finalize",
            "busy",
            "device",
            "io-status",
            "len",
            "offset",
            "paused",
            "ready",
            "speed",
            "status",
            "type"
        ]
    );
    assert_eq!(
        (
            &b["auto-dismiss"],
            &b["actively-synced"],
            &b["ready"],
            &b["status"]
        ),
        (&json!(false), &json!(false), &json!(true), &json!("ready"))
    );
    err_is(
        &mut q,
        "job-finalize",
        json!({"id": "m0"}),
        "GenericError",
        "Job 'm0' in state 'ready' cannot accept command verb 'finalize'",
    );
    // Paused while ready: standby, where QEMU (6.2+) accepts complete; the
    // job completes once resumed.
    q.ok("job-pause", json!({"id": "m0"}));
    wait_status(&mut q, "m0", "standby");
    assert_eq!(q.ok("job-complete", json!({"id": "m0"})), json!({}));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(job_status(&mut q, "m0").as_deref(), Some("standby"));
    assert!(!q.events.iter().any(|e| e["event"] == "BLOCK_JOB_COMPLETED"));
    q.ok("job-resume", json!({"id": "m0"}));
    let ev = q.wait_event("BLOCK_JOB_COMPLETED", T, |d| d["device"] == "m0");
    let data = &ev["data"];
    assert_eq!(keys(data), ["device", "len", "offset", "speed", "type"]);
    assert_eq!(data["len"], data["offset"]);
    wait_job_event(&mut q, "m0", "concluded");
    assert_eq!(
        statuses(&q, "m0"),
        [
            "created",
            "running",
            "ready",
            "standby",
            "ready",
            "waiting",
            "pending",
            "concluded"
        ]
    );
    let jobs = q.ok("query-jobs", json!({}));
    let j = &jobs[0];
    assert_eq!(
        keys(j),
        ["current-progress", "id", "status", "total-progress", "type"]
    );
    assert_eq!(
        (&j["id"], &j["type"], &j["status"]),
        (&json!("m0"), &json!("mirror"), &json!("concluded"))
    );
    assert_eq!(j["current-progress"], j["total-progress"]);
    for verb in ["pause", "resume", "cancel", "complete", "finalize"] {
        let (c, d) = q.err(&format!("job-{verb}"), json!({"id": "m0"}));
        assert_eq!(c, "GenericError");
        assert!(
            d == format!("Job 'm0' in state 'concluded' cannot accept command verb '{verb}'")
                || (verb == "resume" && d == "Can't resume a job that was not paused"),
            "{verb}: {d}"
        );
    }
    assert_eq!(q.ok("job-dismiss", json!({"id": "m0"})), json!({}));
    wait_job_event(&mut q, "m0", "null");
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));
    err_is(
        &mut q,
        "job-dismiss",
        json!({"id": "m0"}),
        "GenericError",
        "Job not found",
    );
    // The target holds the data.
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "t", "node-name": "tgt", "writable": true}),
    );
    qemu_io(
        &nbd_uri(&dir.join("nbd.sock"), "tgt"),
        &["read -P 0x6b 0 4M"],
    );
}

#[test]
fn failed_job_reports_the_error_as_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, "d");
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "src",
               "image": {"driver": "memory", "size": 4 * MIB},
               "inject-error": [{"event": "read_aio", "iotype": "read", "errno": 5}]}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "tgt", "size": 4 * MIB}),
    );
    q.ok(
        "blockdev-backup",
        json!({"job-id": "b0", "device": "src", "target": "tgt", "sync": "full",
               "auto-dismiss": false}),
    );
    let ev = q.wait_event("BLOCK_JOB_ERROR", T, |d| d["device"] == "b0");
    assert_eq!(
        ev["data"],
        json!({"device": "b0", "operation": "read", "action": "report"})
    );
    let ev = q.wait_event("BLOCK_JOB_COMPLETED", T, |d| d["device"] == "b0");
    let data = &ev["data"];
    assert_eq!(
        keys(data),
        ["device", "error", "len", "offset", "speed", "type"]
    );
    assert_eq!(
        (&data["type"], &data["error"]),
        (&json!("backup"), &json!("Input/output error"))
    );
    wait_job_event(&mut q, "b0", "concluded");
    assert_eq!(
        statuses(&q, "b0"),
        ["created", "running", "aborting", "concluded"]
    );
    let jobs = q.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "concluded");
    assert_eq!(jobs[0]["error"], "Input/output error");
    assert_eq!(
        q.ok("query-block-jobs", json!({}))[0]["error"],
        "Input/output error"
    );
    q.ok("job-dismiss", json!({"id": "b0"}));
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));
}

#[test]
fn block_export_del_and_query_block_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, "d");
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": MIB}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m2", "size": MIB}),
    );
    assert_eq!(q.ok("query-block-exports", json!({})), json!([]));
    err_is(
        &mut q,
        "block-export-del",
        json!({"id": "e0"}),
        "GenericError",
        "Export 'e0' is not found",
    );
    start_nbd(&mut q, dir);
    q.ok("nbd-server-add", json!({"device": "m2"}));
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "m", "name": "disk",
               "writable": true}),
    );
    // In creation order, as QEMU lists them.
    assert_eq!(
        q.ok("query-block-exports", json!({})),
        json!([
            {"id": "m2", "type": "nbd", "node-name": "m2", "shutting-down": false},
            {"id": "e0", "type": "nbd", "node-name": "m", "shutting-down": false}
        ])
    );
    // Safe mode refuses while a client is connected.
    let client = nbd::client::NbdClient::connect(
        nbd::client::ServerAddr::Unix(dir.join("nbd.sock")),
        "disk",
    )
    .unwrap();
    client.write(0, &[0x77; 4096], false).unwrap();
    err_is(
        &mut q,
        "block-export-del",
        json!({"id": "e0"}),
        "GenericError",
        "export 'e0' still in use",
    );
    err_is(
        &mut q,
        "block-export-del",
        json!({"id": "e0", "mode": "safe"}),
        "GenericError",
        "export 'e0' still in use",
    );
    assert_eq!(
        q.ok("query-block-exports", json!({}))
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(!q
        .events
        .iter()
        .any(|e| e["event"] == "BLOCK_EXPORT_DELETED"));
    // Hard mode disconnects the client.
    assert_eq!(
        q.ok("block-export-del", json!({"id": "e0", "mode": "hard"})),
        json!({})
    );
    let ev = q.wait_event("BLOCK_EXPORT_DELETED", T, |_| true);
    assert_eq!(ev["data"], json!({"id": "e0"}));
    let mut buf = [0u8; 512];
    assert!(client.read(0, &mut buf).is_err());
    drop(client);
    assert_eq!(
        q.ok("query-block-exports", json!({})),
        json!([{"id": "m2", "type": "nbd", "node-name": "m2", "shutting-down": false}])
    );
    err_is(
        &mut q,
        "block-export-del",
        json!({"id": "e0"}),
        "GenericError",
        "Export 'e0' is not found",
    );
    let (class, _) = q.err("block-export-del", json!({"id": "m2", "mode": "soft"}));
    assert_eq!(class, "GenericError");
    // The id is free again; the node kept the client's write.
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "m", "writable": true}),
    );
    qemu_io(
        &nbd_uri(&dir.join("nbd.sock"), "m"),
        &["read -P 0x77 0 4k", "read -P 0 4k 1020k"],
    );
    // nbd-server-remove and nbd-server-stop delete exports too.
    q.ok("nbd-server-remove", json!({"name": "m2"}));
    let ev = q.wait_event("BLOCK_EXPORT_DELETED", T, |_| true);
    assert_eq!(ev["data"], json!({"id": "m2"}));
    q.ok("nbd-server-stop", json!({}));
    let ev = q.wait_event("BLOCK_EXPORT_DELETED", T, |_| true);
    assert_eq!(ev["data"], json!({"id": "e0"}));
    assert_eq!(q.ok("query-block-exports", json!({})), json!([]));
    // The nodes have no users left.
    q.ok("blockdev-del", json!({"node-name": "m"}));
    q.ok("blockdev-del", json!({"node-name": "m2"}));
}

#[test]
fn new_commands_are_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(tmp.path(), "d");
    let mut q = d.qmp();
    let cmds: Vec<String> = q
        .ok("query-commands", json!({}))
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    for c in [
        "block_resize",
        "query-jobs",
        "job-pause",
        "job-resume",
        "job-cancel",
        "job-complete",
        "job-finalize",
        "job-dismiss",
        "block-export-del",
        "query-block-exports",
    ] {
        assert!(cmds.contains(&c.to_string()), "{c} missing from {cmds:?}");
    }
}
