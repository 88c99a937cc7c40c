//! Our server with real clients: qemu-io, qemu-img, nbdinfo, nbdcopy.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use nbd::{Export, ExportOptions, FileExport, NbdServer, ServerConfig};

fn qemu_io(fmt: &str, url: &str, cmds: &[&str]) -> String {
    require_tool("qemu-io", "qemu-utils");
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(url);
    let out = run(&mut c);
    let s =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!s.contains("Pattern verification failed"), "{url}: {s}");
    assert!(!s.contains("failed"), "{url}: {s}");
    s
}

#[test]
fn qemu_io_patterns_over_unix_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(dir.path(), "disk0", 64 << 20);
    let s = qemu_io(
        "raw",
        &ts.unix_url("disk0"),
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -P 0x5c 1M 3M",
            "read -P 0x5c 1M 3M",
        ],
    );
    assert!(s.contains("read 65536/65536 bytes at offset 0"), "{s}");
    let s = qemu_io(
        "raw",
        &ts.tcp_url("disk0"),
        &[
            "read -P 0xab 0 64k",
            "write -z 8M 1M",
            "read -P 0 8M 1M",
            "aio_write -P 0x22 16M 64k",
            "aio_write -P 0x33 17M 64k",
            "aio_flush",
            "read -P 0x22 16M 64k",
            "read -P 0x33 17M 64k",
        ],
    );
    assert!(
        s.contains("read 65536/65536 bytes at offset 17825792"),
        "{s}"
    );
    let snap = ts.mem.snapshot();
    assert!(snap[..65536].iter().all(|&b| b == 0xab));
    assert!(snap[1 << 20..4 << 20].iter().all(|&b| b == 0x5c));
    assert!(snap[16 << 20..(16 << 20) + 65536]
        .iter()
        .all(|&b| b == 0x22));
}

fn qemu_io_unchecked(fmt: &str, url: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c.arg(url);
    let out = c.output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn qemu_io_sees_enospc_and_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(dir.path(), "d", 1 << 20);
    ts.server
        .add_export(
            "ro",
            Arc::new(nbd::MemExport::new(1 << 20)),
            ExportOptions {
                read_only: true,
                description: None,
            },
        )
        .unwrap();
    require_tool("qemu-io", "qemu-utils");
    // qemu-io checks bounds itself for raw; write through the protocol layer past the end.
    let s = qemu_io_unchecked("raw", &ts.unix_url("d"), &["write -P 1 1M 4k"]);
    assert!(
        s.contains("failed") || s.contains("out of bounds") || s.contains("Input/output"),
        "{s}"
    );
    let s = qemu_io_unchecked("raw", &ts.unix_url("ro"), &["write -P 1 0 4k"]);
    assert!(
        s.contains("write failed") || s.contains("read-only") || s.contains("Permission"),
        "{s}"
    );
    let s = qemu_io_unchecked("raw", &ts.unix_url("ro"), &["read -P 0 0 4k"]);
    assert!(
        s.contains("Permission denied"),
        "qemu-io opens a read-only export read-write: {s}"
    );
    let mut c = Command::new("qemu-io");
    c.args([
        "-r",
        "-f",
        "raw",
        "-c",
        "read -P 0 0 4k",
        &ts.unix_url("ro"),
    ]);
    let s = String::from_utf8_lossy(&run(&mut c).stdout).into_owned();
    assert!(s.contains("read 4096/4096"), "{s}");
}

/// A qcow2 image stored in a file, exported raw: qemu-io opens it with -f qcow2 over NBD.
#[test]
fn qcow2_image_through_our_export() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    // qcow2 grows: give the file room, qemu's NBD client cannot extend an export.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len(32 << 20).unwrap();
    drop(f);
    let server = NbdServer::new(ServerConfig::default());
    server
        .add_export(
            "q",
            Arc::new(FileExport::open(&img, false).unwrap()),
            ExportOptions::default(),
        )
        .unwrap();
    let sock = dir.path().join("s");
    server.listen_unix(&sock).unwrap();
    let port = server.listen_tcp(None, 0).unwrap().port();
    qemu_io(
        "qcow2",
        &format!("nbd+unix:///q?socket={}", sock.display()),
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 5M 300k",
            "read -P 0xab 0 64k",
            "read -P 0xcd 5M 300k",
        ],
    );
    qemu_io(
        "qcow2",
        &format!("nbd://127.0.0.1:{port}/q"),
        &[
            "read -P 0xab 0 64k",
            "read -P 0xcd 5M 300k",
            "read -P 0 1M 1M",
        ],
    );
    server.stop();
    let out = run(Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(&img));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["check-errors"], 0, "{v}");
}

#[test]
fn qemu_img_convert_and_compare_from_export() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(dir.path(), "src", 8 << 20);
    let data = pattern(7, 3 << 20);
    ts.mem.write(1 << 20, &data, false).unwrap();
    let out = dir.path().join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &ts.unix_url("src")])
        .arg(&out));
    assert_eq!(std::fs::read(&out).unwrap(), ts.mem.snapshot());
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &ts.tcp_url("src")])
        .arg(&out));
    // A one-byte difference is found.
    let mut bytes = std::fs::read(&out).unwrap();
    bytes[(2 << 20) + 17] ^= 0xff;
    std::fs::write(&out, &bytes).unwrap();
    let st = Command::new("qemu-img")
        .args([
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            &ts.tcp_url("src"),
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert_eq!(
        st.code(),
        Some(1),
        "qemu-img compare must report the difference"
    );
    // convert to qcow2 from the export, then compare against it.
    let q = dir.path().join("out.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", &ts.unix_url("src")])
        .arg(&q));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2", &ts.unix_url("src")])
        .arg(&q));
}

#[test]
fn nbdinfo_agrees_with_our_block_status() {
    require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(dir.path(), "d0", 4 << 20);
    ts.server
        .add_export(
            "second",
            Arc::new(nbd::MemExport::new(12345)),
            ExportOptions {
                read_only: true,
                description: Some("two".into()),
            },
        )
        .unwrap();
    ts.mem.write(0, &[1; 10000], false).unwrap();
    ts.mem.write(1 << 20, &[2; 8192], false).unwrap();
    ts.mem.write(3 << 20, &[3; 1], false).unwrap();

    let out = run(Command::new("nbdinfo").args(["--json", &ts.unix_url("d0")]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["protocol"], "newstyle-fixed");
    assert_eq!(v["structured"], true);
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "d0");
    assert_eq!(e["export-size"], 4 << 20);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert_eq!(e["contexts"][0], "base:allocation");

    let out = run(Command::new("nbdinfo").args([
        "--list",
        "--json",
        &format!("nbd://127.0.0.1:{}", ts.port),
    ]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ex = v["exports"].as_array().unwrap();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0]["export-name"], "d0");
    assert_eq!(ex[1]["export-name"], "second");
    assert_eq!(ex[1]["export-size"], 12345);
    assert_eq!(ex[1]["is_read_only"], true);
    assert_eq!(ex[1]["description"], "two");

    let out = run(Command::new("nbdinfo").args(["--map", "--json", &ts.unix_url("d0")]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ours = Vec::new();
    let mut off = 0;
    for x in ts.mem.block_status(0, 4 << 20).unwrap() {
        let t = (x.hole as u64) | ((x.zero as u64) << 1);
        ours.push((off, x.len, t));
        off += x.len;
    }
    let theirs: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(theirs, ours);
    assert_eq!(ours.len(), 6, "{ours:?}");
}

#[test]
fn nbdcopy_copies_byte_exactly() {
    require_tool("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(dir.path(), "d", 48 << 20);
    let data = pattern(42, 5 << 20);
    ts.mem.write(3 << 20, &data, false).unwrap();
    ts.mem.write(40 << 20, &data[..123457], false).unwrap();
    let out = dir.path().join("copy.raw");
    run(Command::new("nbdcopy").arg(ts.unix_url("d")).arg(&out));
    assert_eq!(std::fs::read(&out).unwrap(), ts.mem.snapshot());
    // And back into a second export of ours over TCP, with several connections.
    let dst = Arc::new(nbd::MemExport::new(48 << 20));
    ts.server
        .add_export("dst", dst.clone(), ExportOptions::default())
        .unwrap();
    run(Command::new("nbdcopy")
        .args(["--connections=4"])
        .arg(&out)
        .arg(ts.tcp_url("dst")));
    assert_eq!(dst.snapshot(), ts.mem.snapshot());
}
