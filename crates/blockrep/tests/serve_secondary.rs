//! More of the replication-driver issue's secondary-side scenarios, driven
//! entirely over QMP on a secondary daemon; `qemu-io` plays the secondary
//! guest (export `disk0`) and the primary's forwarded writes (export
//! `sec-disk`, as the primary's NBD client writes). Byte-exact checks.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const MIB: usize = 1 << 20;
const SIZE: usize = 64 * MIB;

fn images(dir: &Path) {
    fill_file(&dir.join("sec.raw"), SIZE, 0x11);
    qemu_img_create("qcow2", &dir.join("active.qcow2"), "64M");
    qemu_img_create("qcow2", &dir.join("hidden.qcow2"), "64M");
}

/// The secondary stack over `sec_disk` (a blockdev definition named
/// `sec-disk`), exported; replication not started.
fn secondary(dir: &Path, d: &Daemon, sec_disk: Value) -> Qmp {
    let mut q = d.qmp();
    q.ok("blockdev-add", sec_disk);
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": dir.join("nbd.sock")}}}),
    );
    q.ok(
        "nbd-server-add",
        json!({"device": "sec-disk", "writable": true}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "replication", "node-name": "top", "mode": "secondary",
               "top-id": "top",
               "file": {"driver": "qcow2", "node-name": "active",
                        "file": {"driver": "file", "filename": dir.join("active.qcow2")},
                        "backing": {"driver": "qcow2", "node-name": "hidden",
                                    "file": {"driver": "file",
                                             "filename": dir.join("hidden.qcow2")},
                                    "backing": "sec-disk"}}}),
    );
    q.ok(
        "nbd-server-add",
        json!({"device": "top", "name": "disk0", "writable": true}),
    );
    q
}

fn raw_disk(dir: &Path) -> Value {
    json!({"driver": "raw", "node-name": "sec-disk",
           "file": {"driver": "file", "filename": dir.join("sec.raw")}})
}

fn state(q: &mut Qmp) -> Value {
    q.ok("x-blockrep-query-replication", json!({"node-name": "top"}))[0].clone()
}

#[test]
fn stale_buffers_are_discarded_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    images(dir);
    // Leftovers of an earlier run in active and hidden.
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(dir.join("active.qcow2"))
        .args(["-c", "write -P 0x5a 0 1M"])
        .output()
        .expect("qemu-io");
    assert!(out.status.success());
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(dir.join("hidden.qcow2"))
        .args(["-c", "write -P 0x5b 2M 1M"])
        .output()
        .expect("qemu-io");
    assert!(out.status.success());
    let d = Daemon::start(dir, "sec");
    let mut q = secondary(dir, &d, raw_disk(dir));
    let guest = nbd_uri(&dir.join("nbd.sock"), "disk0");
    // Before start every request fails.
    qemu_io_fails(&guest, &["read 0 4k"]);
    q.ok(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );
    qemu_io(&guest, &["read -P 0x11 0 4M"]);
}

#[test]
fn start_validation_errors_leave_the_node_unstarted_and_the_graph_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    images(dir);
    qemu_img_create("qcow2", &dir.join("small.qcow2"), "32M");
    let d = Daemon::start(dir, "sec");
    let mut q = d.qmp();
    q.ok("blockdev-add", raw_disk(dir));
    // No backend on the secondary disk yet (it must be exported).
    q.ok(
        "blockdev-add",
        json!({"driver": "replication", "node-name": "top", "mode": "secondary",
               "top-id": "top",
               "file": {"driver": "qcow2", "node-name": "active",
                        "file": {"driver": "file", "filename": dir.join("active.qcow2")},
                        "backing": {"driver": "qcow2", "node-name": "hidden",
                                    "file": {"driver": "file",
                                             "filename": dir.join("hidden.qcow2")},
                                    "backing": "sec-disk"}}}),
    );
    let before = q.ok("query-named-block-nodes", json!({}));
    let (class, desc) = q.err(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );
    assert_eq!(class, "GenericError");
    assert!(desc.contains("top"), "{desc}");
    assert_eq!(state(&mut q)["state"], "NONE");
    assert_eq!(q.ok("query-named-block-nodes", json!({})), before);

    // Wrong mode.
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": dir.join("nbd.sock")}}}),
    );
    q.ok(
        "nbd-server-add",
        json!({"device": "sec-disk", "writable": true}),
    );
    let before = q.ok("query-named-block-nodes", json!({}));
    let (_, desc) = q.err(
        "xen-set-replication",
        json!({"enable": true, "primary": true}),
    );
    assert!(desc.contains("mode") || desc.contains("primary"), "{desc}");
    assert_eq!(state(&mut q)["state"], "NONE");
    assert_eq!(q.ok("query-named-block-nodes", json!({})), before);

    // Unknown top-id, and unequal lengths, on other nodes of their own.
    q.ok("blockdev-del", json!({"node-name": "top"}));
    q.ok(
        "blockdev-add",
        json!({"driver": "replication", "node-name": "top", "mode": "secondary",
               "top-id": "nope",
               "file": {"driver": "qcow2", "node-name": "active",
                        "file": {"driver": "file", "filename": dir.join("active.qcow2")},
                        "backing": {"driver": "qcow2", "node-name": "hidden",
                                    "file": {"driver": "file",
                                             "filename": dir.join("hidden.qcow2")},
                                    "backing": "sec-disk"}}}),
    );
    let (_, desc) = q.err(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );
    assert!(desc.contains("nope"), "{desc}");
    assert_eq!(state(&mut q)["state"], "NONE");
    q.ok("blockdev-del", json!({"node-name": "top"}));
    q.ok(
        "blockdev-add",
        json!({"driver": "replication", "node-name": "top", "mode": "secondary",
               "top-id": "top",
               "file": {"driver": "qcow2", "node-name": "active",
                        "file": {"driver": "file", "filename": dir.join("small.qcow2")},
                        "backing": {"driver": "qcow2", "node-name": "hidden",
                                    "file": {"driver": "file",
                                             "filename": dir.join("hidden.qcow2")},
                                    "backing": "sec-disk"}}}),
    );
    let before = q.ok("query-named-block-nodes", json!({}));
    let (_, desc) = q.err(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );
    assert!(desc.contains("length") || desc.contains("size"), "{desc}");
    assert_eq!(state(&mut q)["state"], "NONE");
    assert_eq!(q.ok("query-named-block-nodes", json!({})), before);
    // The graph still works: fix it up and start.
    q.ok("blockdev-del", json!({"node-name": "top"}));
    q.ok(
        "blockdev-add",
        json!({"driver": "replication", "node-name": "top", "mode": "secondary",
               "top-id": "top",
               "file": {"driver": "qcow2", "node-name": "active",
                        "file": {"driver": "file", "filename": dir.join("active.qcow2")},
                        "backing": {"driver": "qcow2", "node-name": "hidden",
                                    "file": {"driver": "file",
                                             "filename": dir.join("hidden.qcow2")},
                                    "backing": "sec-disk"}}}),
    );
    q.ok(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );
    assert_eq!(state(&mut q)["state"], "RUNNING");
    // Started twice: refused, still running.
    q.err(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );
    assert_eq!(state(&mut q)["state"], "RUNNING");
    // While running, jobs on the top node are refused, naming replication.
    for (cmd, args) in [
        ("block-commit", json!({"device": "top", "job-id": "j1"})),
        ("block-stream", json!({"device": "top", "job-id": "j2"})),
        (
            "blockdev-backup",
            json!({"device": "top", "target": "sec-disk", "sync": "full", "job-id": "j3"}),
        ),
    ] {
        let before = q.ok("query-named-block-nodes", json!({}));
        let (class, desc) = q.err(cmd, args);
        assert_eq!(class, "GenericError");
        assert!(
            desc.contains("replication") || desc.contains("in use"),
            "{cmd}: {desc}"
        );
        assert_eq!(q.ok("query-named-block-nodes", json!({})), before, "{cmd}");
    }
    assert_eq!(q.ok("query-block-jobs", json!({})), json!([]));
}

#[test]
fn failed_failover_keeps_the_guest_view_and_routes_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    images(dir);
    let d = Daemon::start(dir, "sec");
    // The secondary disk fails every write to sector 2048 (offset 1 MiB).
    let disk = json!({"driver": "blkdebug", "node-name": "sec-disk",
        "image": {"driver": "raw", "file": {"driver": "file", "filename": dir.join("sec.raw")}},
        "inject-error": [{"event": "pwritev", "iotype": "write", "errno": 5, "sector": 2048}]});
    let mut q = secondary(dir, &d, disk);
    q.ok(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );
    let guest = nbd_uri(&dir.join("nbd.sock"), "disk0");
    let fwd = nbd_uri(&dir.join("nbd.sock"), "sec-disk");
    qemu_io(&fwd, &["write -P 0x22 32M 1M"]);
    qemu_io(&guest, &["write -P 0x33 1M 64k", "read -P 0x11 32M 1M"]);

    q.ok("x-colo-lost-heartbeat", json!({}));
    assert!(
        wait_until(Duration::from_secs(30), || {
            state(&mut q)["state"] == "FAILOVER_FAILED"
        }),
        "{}",
        state(&mut q)
    );
    let st = state(&mut q);
    assert_eq!(st["error"], true, "{st}");
    let rs = q.ok("query-xen-replication-status", json!({}));
    assert_eq!(rs["error"], true, "{rs}");
    // The secondary guest's view is intact.
    qemu_io(
        &guest,
        &[
            "read -P 0x33 1M 64k",
            "read -P 0x11 0 1M",
            "read -P 0x11 32M 1M",
        ],
    );
    // New writes: where active/hidden hold the range they go to the active
    // disk; elsewhere straight to the secondary disk.
    qemu_io(&guest, &["write -P 0x44 1M 4k", "write -P 0x55 10M 64k"]);
    qemu_io(
        &guest,
        &[
            "read -P 0x44 1M 4k",
            "read -P 0x33 1052672 61440",
            "read -P 0x55 10M 64k",
        ],
    );
    qemu_io(&fwd, &["read -P 0x55 10M 64k", "read -P 0x11 1M 64k"]);
}
