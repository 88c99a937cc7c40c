//! Cost of one command: dispatch in-process (parse, check, run, encode) and
//! a full round trip over a Unix socket.

// criterion_group! generates an undocumented pub fn.
#![allow(missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use qmp::{json::to_wire, Registry, Server, ServerConfig, Session};
use serde_json::json;

fn registry() -> Registry {
    let mut r = Registry::new();
    r.define("{'enum': 'Mode', 'data': ['primary', 'secondary']}")
        .unwrap();
    r.register(
        "x-set",
        "{'node-name': 'str', 'mode': 'Mode', '*speed': 'uint64', '*children': ['str']}",
        |a| Ok(json!({"node": a.str("node-name")?})),
    )
    .unwrap();
    r
}

const REQ: &[u8] = br#"{"execute": "x-set", "arguments": {"node-name": "disk0", "mode": "secondary", "speed": 1048576, "children": ["a", "b"]}, "id": 42}"#;

fn bench(c: &mut Criterion) {
    let mut s = Session::new(Arc::new(registry()));
    let mut out = Vec::new();
    s.feed(b"{\"execute\": \"qmp_capabilities\"}", &mut out);
    c.bench_function("session_dispatch", |b| {
        b.iter(|| {
            out.clear();
            s.feed(REQ, &mut out);
            to_wire(&out[0])
        })
    });

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.qmp");
    let server = Server::start(registry(), ServerConfig::unix(&path)).unwrap();
    let sock = UnixStream::connect(&path).unwrap();
    let mut w = sock.try_clone().unwrap();
    let mut r = BufReader::new(sock);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    w.write_all(b"{\"execute\": \"qmp_capabilities\"}").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    c.bench_function("unix_socket_round_trip", |b| {
        b.iter(|| {
            w.write_all(REQ).unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
        })
    });
    drop((w, r));
    server.join();
}

criterion_group!(benches, bench);
criterion_main!(benches);
