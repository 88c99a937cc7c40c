//! The daemon as a process: QMP on Unix and TCP at once, several clients,
//! events to every negotiated client, protocol errors before negotiation,
//! bad command-line arguments.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn tcp_port_from_log(d: &Daemon, dir: &std::path::Path) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = d.log(dir);
        if let Some(i) = log.find(" and tcp ") {
            let rest = &log[i + " and tcp ".len()..];
            let addr = rest.lines().next().unwrap();
            return addr.rsplit(':').next().unwrap().parse().unwrap();
        }
        assert!(Instant::now() < deadline, "no tcp address in log:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unix_and_tcp_clients_see_each_others_effects_and_events() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let qmp_path = dir.join("d.qmp");
    let log = std::fs::File::create(dir.join("d.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(["serve", "--qmp"])
        .arg(&qmp_path)
        .args(["--qmp-tcp", "127.0.0.1:0", "--log-level", "info"])
        .stderr(log)
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child: Some(child),
        qmp_path: qmp_path.clone(),
        name: "d".into(),
    };
    let port = tcp_port_from_log(&d, dir);

    // Before negotiation: only qmp_capabilities.
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let greeting: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    let mut send = |v: Value| -> Value {
        w.write_all(format!("{v}\n").as_bytes()).unwrap();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            let m: Value = serde_json::from_str(&l).unwrap();
            if m.get("event").is_none() {
                return m;
            }
        }
    };
    let e = send(json!({"execute": "query-block", "id": 1}));
    assert_eq!(e["error"]["class"], "CommandNotFound");
    assert_eq!(e["id"], 1);
    assert_eq!(
        send(json!({"execute": "qmp_capabilities"})),
        json!({"return": {}})
    );

    // A node added over Unix is seen over TCP.
    let mut u = d.qmp();
    u.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "m", "size": 1 << 20}),
    );
    u.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "t", "size": 1 << 20}),
    );
    let nodes = send(json!({"execute": "query-named-block-nodes", "id": "x"}));
    assert_eq!(nodes["id"], "x");
    let names: Vec<&str> = nodes["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["m", "t"]);
    // Unknown arguments and wrong types: errors, connection still usable.
    let e = send(json!({"execute": "blockdev-del", "arguments": {"node-name": 1}}));
    assert_eq!(
        e["error"]["desc"],
        "Invalid parameter type for 'node-name', expected: string"
    );
    let e = send(json!({"execute": "blockdev-del", "arguments": {"node-name": "m", "node": "m"}}));
    assert_eq!(e["error"]["desc"], "Parameter 'node' is unexpected");

    // A job started over TCP: both clients get its events.
    let mut u2 = d.qmp();
    assert_eq!(
        send(json!({"execute": "blockdev-backup", "arguments":
            {"job-id": "b", "device": "m", "target": "t", "sync": "full"}})),
        json!({"return": {}})
    );
    for q in [&mut u, &mut u2] {
        let ev = q.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(30), |d| {
            d["device"] == "b"
        });
        assert!(ev["timestamp"]["seconds"].as_u64().unwrap() > 0);
        q.wait_event("JOB_STATUS_CHANGE", Duration::from_secs(30), |d| {
            d["id"] == "b" && d["status"] == "null"
        });
    }
    drop(u2);
    u.ok("quit", json!({}));
    assert_eq!(d.wait(), Some(0));
    assert!(!qmp_path.exists());
}

#[test]
fn bad_command_lines_fail_with_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(["serve"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--qmp"));
    let out = Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(["serve", "--qmp", "/nonexistent-dir/x.qmp"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on /nonexistent-dir/x.qmp"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
