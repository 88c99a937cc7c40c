//! Shared by the reliability tests: a replication pair of two daemons over
//! qcow2 images (local, secondary, active, hidden) set up over QMP, and an
//! image check that repairs leaks with our tool first.

#![allow(dead_code)] // each test file uses a different subset

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::common::{qemu_img_create, Daemon};

/// Creates the four qcow2 images of `size` (e.g. "64M") in `dir` and sets
/// up the secondary (secondary disk exported as "sec-disk" on `s_nbd`,
/// replication node "top" over active over hidden over it, exported to the
/// secondary guest as "disk0") and the primary (quorum "colo-disk0" over
/// the local disk and replication "rep-p" over an NBD client, exported as
/// "disk0" on `p_nbd`), both started.
pub fn qmp_setup(dir: &Path, size: &str, sec: &Daemon, pri: &Daemon, s_nbd: &Path, p_nbd: &Path) {
    for img in ["local", "sec", "active", "hidden"] {
        qemu_img_create("qcow2", &dir.join(format!("{img}.qcow2")), size);
    }
    let qcow2 = |name: &str, file: &str| {
        json!({"driver": "qcow2", "node-name": name,
               "file": {"driver": "file", "filename": dir.join(file)}})
    };
    let mut q = sec.qmp();
    q.ok("blockdev-add", qcow2("sec-disk", "sec.qcow2"));
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": s_nbd}}}),
    );
    q.ok(
        "nbd-server-add",
        json!({"device": "sec-disk", "name": "sec-disk", "writable": true}),
    );
    let mut hidden = qcow2("hidden", "hidden.qcow2");
    hidden["backing"] = json!("sec-disk");
    let mut active = qcow2("active", "active.qcow2");
    active["backing"] = hidden;
    q.ok(
        "blockdev-add",
        json!({"driver": "replication", "node-name": "top", "mode": "secondary",
               "top-id": "top", "file": active}),
    );
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "guest", "node-name": "top", "name": "disk0",
               "writable": true}),
    );
    q.ok(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );
    let mut q = pri.qmp();
    q.ok("blockdev-add", qcow2("local", "local.qcow2"));
    q.ok(
        "blockdev-add",
        json!({"driver": "quorum", "node-name": "colo-disk0", "vote-threshold": 1,
               "read-pattern": "fifo", "children": ["local"]}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "replication", "node-name": "rep-p", "mode": "primary",
               "file": {"driver": "nbd", "node-name": "nbd-client", "export": "sec-disk",
                        "server": {"type": "unix", "path": s_nbd},
                        "reconnect-delay": 0}}),
    );
    q.ok(
        "x-blockdev-change",
        json!({"parent": "colo-disk0", "node": "rep-p"}),
    );
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": p_nbd}}}),
    );
    q.ok(
        "nbd-server-add",
        json!({"device": "colo-disk0", "name": "disk0", "writable": true}),
    );
    q.ok(
        "xen-set-replication",
        json!({"enable": true, "primary": true}),
    );
}

/// `qemu-img check`; leaked clusters are repaired with
/// `blockrep img check -r leaks`, after which the check must be clean.
/// Returns whether a repair was needed.
pub fn check_image(path: &Path) -> Result<bool, String> {
    let check = || {
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2", "--output=json"])
            .arg(path)
            .output()
            .expect("qemu-img check (install qemu-utils)")
    };
    let out = check();
    match out.status.code() {
        Some(0) => return Ok(false),
        Some(3) => {} // leaked clusters only
        _ => {
            return Err(format!(
                "qemu-img check {}: {}{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }
    let r = Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(["img", "check", "-r", "leaks", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("run blockrep img check");
    let out = check();
    if out.status.code() != Some(0) {
        return Err(format!(
            "{} not clean after `blockrep img check -r leaks` ({}): {}",
            path.display(),
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    Ok(true)
}
