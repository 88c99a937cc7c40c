//! Two daemons in two processes, as in DESIGN.md's picture, set up entirely
//! over QMP; `qemu-io` is the guest on both sides through NBD exports.
//! The replication-driver issue's secondary-side scenarios, with forwarded
//! writes arriving over NBD from the primary's quorum; checkpoints; failover
//! after `kill -9` of the primary; the primary surviving the secondary's
//! loss. Every check is byte-exact (`qemu-io read -P`, `qemu-img compare`).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const MIB: usize = 1 << 20;
const SIZE: usize = 64 * MIB;

struct Pair {
    dir: PathBuf,
    sec: Daemon,
    pri: Daemon,
    s_nbd: PathBuf,
    p_nbd: PathBuf,
}

impl Pair {
    fn sec_guest(&self) -> String {
        nbd_uri(&self.s_nbd, "disk0")
    }
    fn sec_disk(&self) -> String {
        nbd_uri(&self.s_nbd, "sec-disk")
    }
    fn pri_guest(&self) -> String {
        nbd_uri(&self.p_nbd, "disk0")
    }
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The secondary's graph: secondary disk (raw file, exported to the
/// primary), active over hidden over it (qcow2), the replication filter on
/// top (exported to the secondary guest), replication started.
fn setup_secondary(dir: &Path, sec: &Daemon, s_nbd: &Path) {
    fill_file(&dir.join("sec.raw"), SIZE, 0x11);
    qemu_img_create("qcow2", &dir.join("active.qcow2"), "64M");
    qemu_img_create("qcow2", &dir.join("hidden.qcow2"), "64M");
    let mut q = sec.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "sec-disk",
               "file": {"driver": "file", "filename": dir.join("sec.raw")}}),
    );
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": s_nbd}}}),
    );
    q.ok(
        "nbd-server-add",
        json!({"device": "sec-disk", "name": "sec-disk", "writable": true}),
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
        "block-export-add",
        json!({"type": "nbd", "id": "guest", "node-name": "top", "name": "disk0",
               "writable": true}),
    );
    q.ok(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );
}

/// The primary's graph: quorum over the local disk, then (x-blockdev-change)
/// a replication(primary) child over an NBD client to the secondary disk;
/// the quorum exported to the primary guest; replication started.
fn setup_primary(dir: &Path, pri: &Daemon, p_nbd: &Path, s_nbd: &Path) {
    fill_file(&dir.join("pri.raw"), SIZE, 0x11);
    let mut q = pri.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "local",
               "file": {"driver": "file", "filename": dir.join("pri.raw")}}),
    );
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

/// The test directory (kept for inspection with BLOCKREP_TEST_KEEP=1).
fn pair() -> (Option<tempfile::TempDir>, Pair) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let tmp = if std::env::var_os("BLOCKREP_TEST_KEEP").is_some() {
        eprintln!("keeping {}", dir.display());
        let _ = tmp.keep();
        None
    } else {
        Some(tmp)
    };
    let s_nbd = dir.join("s-nbd.sock");
    let p_nbd = dir.join("p-nbd.sock");
    let sec = Daemon::start(&dir, "secondary");
    setup_secondary(&dir, &sec, &s_nbd);
    let pri = Daemon::start(&dir, "primary");
    setup_primary(&dir, &pri, &p_nbd, &s_nbd);
    (
        tmp,
        Pair {
            dir,
            sec,
            pri,
            s_nbd,
            p_nbd,
        },
    )
}

fn status(q: &mut Qmp, node: &str) -> Value {
    q.ok("x-blockrep-query-replication", json!({"node-name": node}))[0].clone()
}

fn checkpoint(p: &Pair) {
    p.pri.qmp().ok("xen-colo-do-checkpoint", json!({}));
    p.sec.qmp().ok("xen-colo-do-checkpoint", json!({}));
}

#[test]
fn forwarded_writes_checkpoint_and_failover_after_kill9() {
    let (_tmp, mut p) = pair();
    let (sg, sd, pg) = (p.sec_guest(), p.sec_disk(), p.pri_guest());

    // Start: the secondary guest sees the secondary disk.
    qemu_io(&sg, &["read -P 0x11 0 64M"]);
    let mut sq = p.sec.qmp();
    let s0 = status(&mut sq, "top");
    assert_eq!(s0["state"], "RUNNING", "{s0}");
    assert_eq!(s0["mode"], "secondary");

    // A primary guest write is forwarded: the secondary disk has it, the
    // secondary guest still sees the checkpoint.
    qemu_io(&pg, &["write -P 0x22 32M 32M", "read -P 0x22 32M 32M"]);
    qemu_io(&sd, &["read -P 0x22 32M 32M"]);
    qemu_io(&sg, &["read -P 0x11 32M 32M"]);
    let mut pq = p.pri.qmp();
    let ps = status(&mut pq, "rep-p");
    assert_eq!(ps["bytes-forwarded"], json!(32 * MIB), "{ps}");
    assert_eq!(ps["error"], false);
    assert_eq!(
        pq.ok("query-xen-replication-status", json!({})),
        json!({"error": false})
    );
    let s1 = status(&mut sq, "top");
    assert_eq!(
        s1["clusters-copied-since-checkpoint"],
        json!(32 * MIB / 65536),
        "{s1}"
    );

    // The secondary guest's own writes stay on its side.
    qemu_io(&sg, &["write -P 0x33 0 32M", "read -P 0x33 0 32M"]);
    qemu_io(&sd, &["read -P 0x11 0 32M"]);

    // Partial-cluster copy-before-write: a 512-byte forwarded write inside a
    // cluster; the rest of the cluster keeps its checkpoint contents, and a
    // second forwarded write there does not overwrite the saved copy.
    qemu_io(&pg, &["write -P 0x44 40M 512", "write -P 0x45 40M 512"]);
    qemu_io(&sg, &["read -P 0x11 40M 64k"]);
    qemu_io(
        &sd,
        &["read -P 0x45 40M 512", "read -P 0x22 41943552 65024"],
    );

    // The guest's own data wins over a later forwarded write.
    qemu_io(&sg, &["write -P 0x77 10M 1M"]);
    qemu_io(&pg, &["write -P 0x88 10M 1M"]);
    qemu_io(&sg, &["read -P 0x77 10M 1M"]);

    // Checkpoint: the secondary guest's writes are dropped, the disks agree.
    let epoch = status(&mut sq, "top")["checkpoints"].as_u64().unwrap();
    checkpoint(&p);
    let s2 = status(&mut sq, "top");
    assert_eq!(s2["checkpoints"].as_u64().unwrap(), epoch + 1, "{s2}");
    assert_eq!(s2["clusters-copied-since-checkpoint"], 0);
    assert!(
        s2["last-checkpoint"]["seconds"].as_u64().unwrap() > 0,
        "{s2}"
    );
    assert!(s2.get("last-checkpoint-duration-us").is_some(), "{s2}");
    qemu_io(
        &sg,
        &[
            "read -P 0x11 0 10M",
            "read -P 0x88 10M 1M",
            "read -P 0x11 11M 21M",
            "read -P 0x22 32M 8M",
            "read -P 0x45 40M 512",
            "read -P 0x22 41943552 25165312",
        ],
    );
    qemu_io(
        &pg,
        &[
            "read -P 0x11 0 10M",
            "read -P 0x88 10M 1M",
            "read -P 0x45 40M 512",
        ],
    );

    // After the checkpoint: the secondary guest writes, the primary forwards
    // writes that must be lost at failover.
    qemu_io(&sg, &["write -P 0x99 0 1M"]);
    qemu_io(&pg, &["write -P 0x55 48M 1M", "write -P 0x56 0 512"]);

    // The primary dies; the secondary fails over.
    p.pri.kill9();
    sq.ok("x-colo-lost-heartbeat", json!({}));
    assert!(
        wait_until(Duration::from_secs(30), || status(&mut sq, "top")["state"]
            == "DONE"),
        "failover did not finish: {}",
        status(&mut sq, "top")
    );
    let s3 = status(&mut sq, "top");
    assert_eq!(s3["error"], false, "{s3}");
    assert!(s3.get("failover-duration-us").is_some(), "{s3}");
    assert_eq!(
        sq.ok("query-xen-replication-status", json!({})),
        json!({"error": false})
    );
    // Last checkpoint plus the secondary guest's own writes since.
    qemu_io(
        &sg,
        &[
            "read -P 0x99 0 1M",
            "read -P 0x11 1M 9M",
            "read -P 0x88 10M 1M",
            "read -P 0x11 11M 21M",
            "read -P 0x22 32M 8M",
            "read -P 0x45 40M 512",
            "read -P 0x22 41943552 25165312",
        ],
    );
    // The survivor keeps serving its guest.
    qemu_io(&sg, &["write -P 0xaa 60M 1M", "read -P 0xaa 60M 1M"]);
    // Start (either mode), checkpoint and stop are accepted after the
    // failover and change nothing, so the survivor can join a new pair.
    sq.ok(
        "xen-set-replication",
        json!({"enable": true, "primary": true}),
    );
    sq.ok("xen-colo-do-checkpoint", json!({}));
    sq.ok(
        "xen-set-replication",
        json!({"enable": false, "primary": false}),
    );
    assert_eq!(status(&mut sq, "top")["state"], "DONE");
    qemu_io(
        &sg,
        &[
            "read -P 0x99 0 1M",
            "read -P 0xaa 60M 1M",
            "read -P 0x22 32M 8M",
        ],
    );

    // Clean shutdown; the secondary disk holds exactly the expected bytes.
    drop(sq);
    p.sec.qmp().ok("quit", json!({}));
    assert_eq!(p.sec.wait(), Some(0), "{}", p.sec.log(&p.dir));
    let mut want = vec![0x11u8; SIZE];
    want[..MIB].fill(0x99);
    want[10 * MIB..11 * MIB].fill(0x88);
    want[32 * MIB..].fill(0x22);
    want[40 * MIB..40 * MIB + 512].fill(0x45);
    want[60 * MIB..61 * MIB].fill(0xaa);
    std::fs::write(p.file("want.raw"), &want).unwrap();
    let (same, text) = qemu_img_compare(
        "raw",
        p.file("sec.raw").to_str().unwrap(),
        "raw",
        p.file("want.raw").to_str().unwrap(),
    );
    assert!(same, "secondary disk differs: {text}");
    qemu_img_check(&p.file("active.qcow2"));
    qemu_img_check(&p.file("hidden.qcow2"));
}

#[test]
fn primary_keeps_serving_when_secondary_vanishes() {
    let (_tmp, mut p) = pair();
    let pg = p.pri_guest();
    qemu_io(&pg, &["write -P 0x21 0 1M"]);
    let mut pq = p.pri.qmp();
    assert_eq!(
        pq.ok("query-xen-replication-status", json!({})),
        json!({"error": false})
    );

    p.sec.kill9();
    // Every guest write still succeeds and lands on the local disk.
    qemu_io(
        &pg,
        &[
            "write -P 0x66 1M 1M",
            "read -P 0x66 1M 1M",
            "read -P 0x21 0 1M",
        ],
    );
    qemu_io(&pg, &["write -P 0x67 8M 64k", "read -P 0x67 8M 64k"]);
    let st = pq.ok("query-xen-replication-status", json!({}));
    assert_eq!(st["error"], true, "{st}");
    assert!(st["desc"].as_str().unwrap().contains("rep-p"), "{st}");
    let rs = status(&mut pq, "rep-p");
    assert_eq!(rs["error"], true, "{rs}");
    assert!(rs["forward-errors"].as_u64().unwrap() >= 1, "{rs}");
    assert_eq!(rs["state"], "RUNNING");

    drop(pq);
    p.pri.qmp().ok("quit", json!({}));
    assert_eq!(p.pri.wait(), Some(0), "{}", p.pri.log(&p.dir));
    let mut want = vec![0x11u8; SIZE];
    want[..MIB].fill(0x21);
    want[MIB..2 * MIB].fill(0x66);
    want[8 * MIB..8 * MIB + 65536].fill(0x67);
    std::fs::write(p.file("want.raw"), &want).unwrap();
    let (same, text) = qemu_img_compare(
        "raw",
        p.file("pri.raw").to_str().unwrap(),
        "raw",
        p.file("want.raw").to_str().unwrap(),
    );
    assert!(same, "primary disk differs: {text}");
}

#[test]
fn sigterm_stops_cleanly_and_images_pass_check() {
    let (_tmp, mut p) = pair();
    qemu_io(&p.pri_guest(), &["write -P 0x31 0 2M"]);
    qemu_io(&p.sec_guest(), &["write -P 0x32 4M 2M"]);
    checkpoint(&p);
    assert_eq!(p.pri.signal_and_wait(libc::SIGTERM), Some(0));
    assert_eq!(p.sec.signal_and_wait(libc::SIGINT), Some(0));
    assert!(!p.file("secondary.qmp").exists(), "QMP socket left behind");
    qemu_img_check(&p.file("active.qcow2"));
    qemu_img_check(&p.file("hidden.qcow2"));
    let (same, text) = qemu_img_compare(
        "raw",
        p.file("sec.raw").to_str().unwrap(),
        "raw",
        p.file("pri.raw").to_str().unwrap(),
    );
    assert!(same, "after a checkpoint the disks must agree: {text}");
}
