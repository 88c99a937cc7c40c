//! The two-daemon set-up over TCP on loopback (NBD `inet` addresses on both
//! servers, the primary's NBD client on `inet`), as the demo runs it:
//! forwarding, a checkpoint, `kill -9` of the primary, failover, byte-exact.

mod common;

use std::net::TcpListener;
use std::time::Duration;

use common::*;
use serde_json::json;

const MIB: usize = 1 << 20;
const SIZE: usize = 16 * MIB;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn inet(port: u16) -> serde_json::Value {
    json!({"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}})
}

#[test]
fn replication_over_tcp_loopback_with_failover() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    fill_file(&dir.join("sec.raw"), SIZE, 0x11);
    fill_file(&dir.join("pri.raw"), SIZE, 0x11);
    qemu_img_create("qcow2", &dir.join("active.qcow2"), "16M");
    qemu_img_create("qcow2", &dir.join("hidden.qcow2"), "16M");
    let (sp, pp) = (free_port(), free_port());

    let mut sec = Daemon::start(dir, "secondary");
    let mut sq = sec.qmp();
    sq.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "sec-disk",
               "file": {"driver": "file", "filename": dir.join("sec.raw")}}),
    );
    sq.ok("nbd-server-start", json!({"addr": inet(sp)}));
    sq.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "e0", "node-name": "sec-disk", "name": "sec-disk",
               "writable": true}),
    );
    sq.ok(
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
    sq.ok(
        "nbd-server-add",
        json!({"device": "top", "name": "disk0", "writable": true}),
    );
    sq.ok(
        "xen-set-replication",
        json!({"enable": true, "primary": false}),
    );

    let mut pri = Daemon::start(dir, "primary");
    let mut pq = pri.qmp();
    pq.ok(
        "blockdev-add",
        json!({"driver": "quorum", "node-name": "colo-disk0", "vote-threshold": 1,
               "read-pattern": "fifo",
               "children": [
                   {"driver": "raw", "node-name": "local",
                    "file": {"driver": "file", "filename": dir.join("pri.raw")}},
                   {"driver": "replication", "node-name": "rep0", "mode": "primary",
                    "file": {"driver": "nbd", "export": "sec-disk", "reconnect-delay": 0,
                             "server": {"type": "inet", "host": "127.0.0.1",
                                        "port": sp.to_string()}}}]}),
    );
    pq.ok("nbd-server-start", json!({"addr": inet(pp)}));
    pq.ok(
        "nbd-server-add",
        json!({"device": "colo-disk0", "name": "disk0", "writable": true}),
    );
    pq.ok(
        "xen-set-replication",
        json!({"enable": true, "primary": true}),
    );

    let pg = format!("nbd://127.0.0.1:{pp}/disk0");
    let sg = format!("nbd://127.0.0.1:{sp}/disk0");
    let sd = format!("nbd://127.0.0.1:{sp}/sec-disk");
    qemu_io(&pg, &["write -P 0x22 0 4M"]);
    qemu_io(&sd, &["read -P 0x22 0 4M"]);
    qemu_io(&sg, &["read -P 0x11 0 4M", "write -P 0x44 12M 1M"]);
    pq.ok("xen-colo-do-checkpoint", json!({}));
    sq.ok("xen-colo-do-checkpoint", json!({}));
    qemu_io(&sg, &["read -P 0x22 0 4M", "read -P 0x11 12M 1M"]);
    qemu_io(&sg, &["write -P 0x33 8M 1M"]);
    qemu_io(&pg, &["write -P 0x55 2M 1M"]);

    pri.kill9();
    drop(pq);
    sq.ok("x-colo-lost-heartbeat", json!({}));
    assert!(wait_until(Duration::from_secs(30), || {
        sq.ok("x-blockrep-query-replication", json!({}))[0]["state"] == "DONE"
    }));
    qemu_io(
        &sg,
        &[
            "read -P 0x22 0 4M",
            "read -P 0x33 8M 1M",
            "read -P 0x11 9M 7M",
        ],
    );
    sq.ok("quit", json!({}));
    assert_eq!(sec.wait(), Some(0), "{}", sec.log(dir));
    let mut want = vec![0x11u8; SIZE];
    want[..4 * MIB].fill(0x22);
    want[8 * MIB..9 * MIB].fill(0x33);
    std::fs::write(dir.join("want.raw"), &want).unwrap();
    let (same, text) = qemu_img_compare(
        "raw",
        dir.join("sec.raw").to_str().unwrap(),
        "raw",
        dir.join("want.raw").to_str().unwrap(),
    );
    assert!(same, "{text}");
}
