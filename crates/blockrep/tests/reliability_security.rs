//! Security basics of the daemon (issue 11): QMP and NBD listen on Unix
//! sockets of mode 0600, or on loopback TCP, and on nothing else unless told;
//! export names and node names from the network are validated; no request
//! reaches beyond its export.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use common::*;
use serde_json::json;

/// TCP sockets in LISTEN state held by process `pid`: (local address as in
/// /proc/net/tcp*, e.g. "0100007F:1F90").
fn tcp_listeners(pid: u32) -> Vec<String> {
    let mut inodes = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("read the daemon's fds") {
        let Ok(target) = std::fs::read_link(e.unwrap().path()) else {
            continue;
        };
        let t = target.to_string_lossy().to_string();
        if let Some(ino) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
            inodes.push(ino.to_string());
        }
    }
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                out.push(f[1].to_string());
            }
        }
    }
    out
}

fn assert_socket_0600(path: &Path) {
    let m = std::fs::symlink_metadata(path).unwrap();
    assert!(
        m.file_type().is_socket(),
        "{} is not a socket",
        path.display()
    );
    assert_eq!(
        m.permissions().mode() & 0o777,
        0o600,
        "{} has mode {:o}",
        path.display(),
        m.permissions().mode() & 0o777
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn sockets_are_unix_0600_or_loopback_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, "d");
    let pid = d.child.as_ref().unwrap().id();
    assert_socket_0600(&d.qmp_path);
    assert_eq!(
        tcp_listeners(pid),
        Vec::<String>::new(),
        "no TCP unless told"
    );

    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m0", "size": 1 << 20}),
    );
    let sock = dir.join("nbd.sock");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    assert_socket_0600(&sock);
    assert_eq!(tcp_listeners(pid), Vec::<String>::new());
    q.ok("nbd-server-stop", json!({}));

    // inet needs a host (as in QEMU): nothing is bound without one.
    let port = free_port();
    let (_, desc) = q.err(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"port": port.to_string()}}}),
    );
    assert!(desc.contains("host"), "{desc}");
    assert_eq!(tcp_listeners(pid), Vec::<String>::new());
    // Told loopback, it binds loopback only.
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}}}),
    );
    assert_eq!(
        tcp_listeners(pid),
        vec![format!("0100007F:{port:04X}")],
        "NBD on 127.0.0.1 must bind 127.0.0.1 only"
    );
    q.ok("nbd-server-stop", json!({}));
    assert_eq!(tcp_listeners(pid), Vec::<String>::new());
}

#[test]
fn qmp_tcp_is_only_where_told() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let port = free_port();
    let qmp_path = dir.join("t.qmp");
    let log = std::fs::File::create(dir.join("t.log")).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(["serve", "--qmp"])
        .arg(&qmp_path)
        .arg("--qmp-tcp")
        .arg(format!("127.0.0.1:{port}"))
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    let ok = wait_until(std::time::Duration::from_secs(20), || {
        !tcp_listeners(pid).is_empty() && qmp_path.exists()
    });
    let l = tcp_listeners(pid);
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "daemon did not listen on QMP TCP");
    assert_eq!(l, vec![format!("0100007F:{port:04X}")]);
}

#[test]
fn names_from_the_network_are_validated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, "d");
    let mut q = d.qmp();
    let long = "n".repeat(32);
    for bad in ["", "1abc", "a/b", "a b", "#gen", "ä", long.as_str()] {
        let (class, desc) = q.err(
            "blockdev-add",
            json!({"driver": "memory", "node-name": bad, "size": 4096}),
        );
        assert_eq!(class, "GenericError", "{bad:?}: {desc}");
        assert!(desc.contains("node-name"), "{bad:?}: {desc}");
    }
    assert_eq!(
        q.ok("query-named-block-nodes", json!({})),
        json!([]),
        "a refused blockdev-add leaves no node"
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m0", "size": 1 << 20}),
    );
    let sock = dir.join("nbd.sock");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    let huge = "x".repeat(4097);
    for bad in [huge.as_str(), "a\u{0}b"] {
        let (class, desc) = q.err(
            "nbd-server-add",
            json!({"device": "m0", "name": bad, "writable": true}),
        );
        assert_eq!(class, "GenericError", "{desc}");
    }
    // A device name that is no node.
    let (class, _) = q.err("nbd-server-add", json!({"device": "../m0", "name": "e"}));
    assert_eq!(class, "DeviceNotFound");
    // A client asking for an export name that is not exported gets nothing.
    q.ok(
        "nbd-server-add",
        json!({"device": "m0", "name": "disk0", "writable": true}),
    );
    for name in ["disk1", "m0", "disk0%00"] {
        let out = qemu_io_fails(&nbd_uri(&sock, name), &["read 0 512"]);
        assert!(!out.contains("read 512/512"), "{name}: {out}");
    }
}

#[test]
fn no_request_reaches_beyond_its_export() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let d = Daemon::start(dir, "d");
    let mut q = d.qmp();
    // Two nodes side by side in one file: the export of the first must never
    // touch the second.
    let raw = dir.join("two.raw");
    fill_file(&raw, 2 << 20, 0x11);
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "first", "offset": 0, "size": 1 << 20,
               "file": {"driver": "file", "filename": raw, "node-name": "f"}}),
    );
    let sock = dir.join("nbd.sock");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    q.ok(
        "nbd-server-add",
        json!({"device": "first", "name": "disk0", "writable": true}),
    );
    let uri = nbd_uri(&sock, "disk0");
    qemu_io(&uri, &["write -P 0x22 0 1M"]);
    for cmd in [
        "write -P 0x33 1M 512",
        "write -P 0x33 1048064 1024",
        "read 1M 512",
        "write -z 1048064 4096",
        "discard 1048064 4096",
    ] {
        qemu_io_fails(&uri, &[cmd]);
    }
    let bytes = std::fs::read(&raw).unwrap();
    assert!(bytes[..1 << 20].iter().all(|b| *b == 0x22));
    assert!(
        bytes[1 << 20..].iter().all(|b| *b == 0x11),
        "a request reached beyond the export"
    );
}
