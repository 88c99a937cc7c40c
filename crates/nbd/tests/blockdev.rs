//! block-graph integration: exporting nodes, and the `nbd` driver.

mod common;

use std::process::Command;

use block_graph::{Graph, PermPair, WriteFlags};
use common::*;
use nbd::blockdev::{export_node, register};
use nbd::{NbdServer, ServerConfig};
use serde_json::json;

fn server(dir: &std::path::Path) -> (NbdServer, std::path::PathBuf, u16) {
    let s = NbdServer::new(ServerConfig::default());
    let sock = dir.join("s.sock");
    s.listen_unix(&sock).unwrap();
    let port = s.listen_tcp(None, 0).unwrap().port();
    (s, sock, port)
}

#[test]
fn export_memory_node_with_backing_to_qemu_io_and_nbdinfo() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let g = Graph::new();
    let base = g
        .add_node(&json!({"driver": "memory", "node-name": "base", "size": 4 << 20}))
        .unwrap();
    base.write(0, &[0x11; 65536], WriteFlags::default())
        .unwrap();
    g.add_node(&json!({"driver": "memory", "node-name": "top", "backing": "base"}))
        .unwrap();
    let (s, sock, port) = server(dir.path());
    export_node(&s, &g, "top", "disk0", false, None).unwrap();
    let unix = format!("nbd+unix:///disk0?socket={}", sock.display());
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0x11 0 64k",
        "-c",
        "write -P 0xab 1M 64k",
        "-c",
        "read -P 0xab 1M 64k",
        &unix,
    ]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("verification failed"));
    run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read -P 0xab 1M 64k",
        "-c",
        "read -P 0 2M 64k",
        &format!("nbd://127.0.0.1:{port}/disk0"),
    ]));
    // The write landed in the top node, the base is untouched.
    let top = g.node("top").unwrap();
    let mut b = vec![0; 65536];
    top.read(1 << 20, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0xab));
    base.read(1 << 20, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // nbdinfo's map follows the chain: data where base or top has it.
    let out = run(Command::new("nbdinfo").args(["--map", "--json", &unix]));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let map: Vec<(u64, u64, u64)> = v
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
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.2 == 0)
        .map(|e| (e.0, e.1))
        .collect();
    let covered: u64 = map.iter().map(|e| e.1).sum();
    assert_eq!(covered, 4 << 20);
    assert!(data.iter().any(|&(o, l)| o == 0 && l >= 65536), "{map:?}");
    assert!(
        data.iter()
            .any(|&(o, l)| o <= 1 << 20 && o + l >= (1 << 20) + 65536),
        "{map:?}"
    );
    assert!(map.iter().any(|e| e.2 & 1 == 1), "expected holes: {map:?}");

    // A second export of the same node read-only; the backend holds no write permission.
    export_node(&s, &g, "top", "ro", true, Some("read-only view".into())).unwrap();
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 1 0 4k",
            &format!("nbd+unix:///ro?socket={}", sock.display()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // Unknown node.
    let e = export_node(&s, &g, "nope", "x", false, None).unwrap_err();
    assert_eq!(e.kind, nbd::ErrorKind::Io, "{e}");
    s.stop();
}

#[test]
fn nbd_driver_against_our_server_and_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    // Remote side: our server exporting a memory node of another graph.
    let remote = Graph::new();
    remote
        .add_node(&json!({"driver": "memory", "node-name": "disk", "size": 8 << 20}))
        .unwrap();
    let (s, sock, port) = server(dir.path());
    export_node(&s, &remote, "disk", "disk0", false, None).unwrap();

    let g = Graph::new();
    register(&g);
    assert!(g.driver_names().contains(&"nbd".to_string()));
    let n = g
        .add_node(&json!({
            "driver": "nbd", "node-name": "r1",
            "server": {"type": "unix", "path": sock.to_str().unwrap()},
            "export": "disk0", "reconnect-delay": 2
        }))
        .unwrap();
    assert_eq!(n.len(), 8 << 20);
    let be = g.new_backend(&n, PermPair::READ_WRITE).unwrap();
    let d = pattern(5, 200_000);
    be.write(4096, &d, WriteFlags::default()).unwrap();
    be.flush().unwrap();
    let mut b = vec![0; d.len()];
    remote.node("disk").unwrap().read(4096, &mut b).unwrap();
    assert_eq!(b, d);
    be.write_zeroes(
        4096,
        12288,
        block_graph::ZeroFlags {
            may_unmap: true,
            no_fallback: false,
            fua: false,
        },
    )
    .unwrap();
    be.read(0, &mut b[..16384]).unwrap();
    assert!(b[..16384].iter().all(|&x| x == 0));
    let st = be.block_status(1 << 20, 4 << 20).unwrap();
    assert!(st.len > 0);
    be.discard(0, 4096).unwrap();

    // TCP, port as QEMU's string.
    let n2 = g
        .add_node(&json!({
            "driver": "nbd", "node-name": "r2", "read-only": true,
            "server": {"type": "inet", "host": "127.0.0.1", "port": port.to_string()},
            "export": "disk0"
        }))
        .unwrap();
    let mut c = vec![0; 1000];
    n2.read(12288 + 4096, &mut c).unwrap();
    assert_eq!(c, d[12288..13288]);

    // Against qemu-nbd.
    require_tool("qemu-nbd", "qemu-utils");
    let img = dir.path().join("q.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let qsock = dir.path().join("q.sock");
    let _q = ChildGuard(
        Command::new("qemu-nbd")
            .args(["-t", "-f", "raw", "-x", "e", "-k", qsock.to_str().unwrap()])
            .arg(&img)
            .spawn()
            .unwrap(),
    );
    wait_for_path(&qsock);
    let n3 = g
        .add_node(&json!({
            "driver": "nbd", "node-name": "r3",
            "server": {"type": "unix", "path": qsock.to_str().unwrap()}, "export": "e"
        }))
        .unwrap();
    n3.write(65536, &d[..65536], WriteFlags { fua: true })
        .unwrap();
    let mut b = vec![0; 65536];
    n3.read(65536, &mut b).unwrap();
    assert_eq!(b, d[..65536]);
    g.remove_node("r3").unwrap();
    assert_eq!(&std::fs::read(&img).unwrap()[65536..131072], &d[..65536]);
    drop(be);
    s.stop();
}

#[test]
fn nbd_driver_option_errors() {
    let g = Graph::new();
    register(&g);
    let e = g
        .add_node(&json!({"driver": "nbd", "node-name": "a"}))
        .unwrap_err();
    assert!(e.to_string().contains("server"), "{e}");
    let e = g
        .add_node(
            &json!({"driver": "nbd", "node-name": "a", "server": {"type": "vsock", "cid": 3}}),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("'unix'") && e.to_string().contains("'inet'"),
        "{e}"
    );
    let e = g
        .add_node(&json!({"driver": "nbd", "node-name": "a", "server": {"type": "inet", "host": "127.0.0.1", "port": "x"}}))
        .unwrap_err();
    assert!(e.to_string().contains("port"), "{e}");
    let e = g
        .add_node(&json!({"driver": "nbd", "node-name": "a", "server": {"type": "unix", "path": "/nonexistent/s"}, "bogus": 1}))
        .unwrap_err();
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = g
        .add_node(&json!({"driver": "nbd", "node-name": "a", "server": {"type": "unix", "path": "/nonexistent/s"}}))
        .unwrap_err();
    assert_eq!(e.kind(), block_graph::ErrorKind::Io, "{e}");
}

/// Raw-file and qcow2 nodes (qcow-lite's driver over a `file` node) exported and
/// driven by qemu-io over Unix and TCP; the qcow2 image passes `qemu-img check`
/// and compares equal to what the clients wrote.
#[test]
fn export_raw_and_qcow2_nodes() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("qemu-img", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("d.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let q = dir.path().join("d.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("8M"));
    let g = Graph::new();
    qcow_lite::register(&g);
    g.add_node(
        &json!({"driver": "file", "node-name": "rawnode", "filename": raw.to_str().unwrap()}),
    )
    .unwrap();
    g.add_node(&json!({"driver": "qcow2", "node-name": "qnode",
        "file": {"driver": "file", "filename": q.to_str().unwrap()}}))
        .unwrap();
    let (s, sock, port) = server(dir.path());
    export_node(&s, &g, "rawnode", "raw", false, None).unwrap();
    export_node(&s, &g, "qnode", "qcow", false, None).unwrap();
    for name in ["raw", "qcow"] {
        let unix = format!("nbd+unix:///{name}?socket={}", sock.display());
        let tcp = format!("nbd://127.0.0.1:{port}/{name}");
        let out = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "write -P 0xcd 3M 200k",
            "-c",
            "write -z 3M 4k",
            "-c",
            "read -P 0xab 0 64k",
            &unix,
        ]));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("verification failed"));
        let out = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "read -P 0 3M 4k",
            "-c",
            "read -P 0xcd 3076k 196k",
            "-c",
            "read -P 0 5M 1M",
            &tcp,
        ]));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("verification failed"));
        // Block status: the untouched tail of the disk is reported as a hole/zero.
        let out = run(Command::new("nbdinfo").args(["--map", "--json", &unix]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let last = v.as_array().unwrap().last().unwrap().clone();
        assert_eq!(
            last["offset"].as_u64().unwrap() + last["length"].as_u64().unwrap(),
            8 << 20
        );
        assert!(last["type"].as_u64().unwrap() & 2 == 2, "{name}: {v}");
        let first = &v[0];
        assert_eq!(
            (first["offset"].as_u64(), first["type"].as_u64()),
            (Some(0), Some(0)),
            "{name}: {v}"
        );
    }
    s.stop();
    g.remove_node("qnode").unwrap();
    g.remove_node("rawnode").unwrap();
    drop(g);
    let out = run(Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(&q));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["check-errors"], 0, "{v}");
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&q)
        .arg(&raw));
}
