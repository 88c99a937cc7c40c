//! The server over real sockets: greeting, several clients, events,
//! dispatcher serialisation, socket file handling, quit and shutdown.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::{demo_registry, Client, Probe};
use qmp::{ErrorKind, Server, ServerConfig, ShutdownReason};
use serde_json::{json, Value};

fn start(dir: &tempfile::TempDir) -> (Server, Arc<Probe>) {
    let probe = Arc::new(Probe::default());
    let path = dir.path().join("qmp.sock");
    let s = Server::start(demo_registry(Arc::clone(&probe)), ServerConfig::unix(&path)).unwrap();
    (s, probe)
}

#[test]
fn greeting_commands_errors_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = start(&dir);
    let path = server.unix_path().unwrap().to_path_buf();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let mut c = Client::connect(&path);
    let g = c.recv();
    assert_eq!(g["QMP"]["capabilities"], json!([]));
    assert_eq!(g["QMP"]["version"]["qemu"]["major"], 9);
    assert_eq!(
        c.cmd(json!({"execute": "x-add", "arguments": {"a": 1, "b": 2}, "id": 1})),
        json!({"error": {"class": "CommandNotFound", "desc": qmp::NEGOTIATION_EXPECTED}, "id": 1})
    );
    assert_eq!(
        c.cmd(json!({"execute": "qmp_capabilities"})),
        json!({"return": {}})
    );
    assert_eq!(
        c.cmd(json!({"execute": "x-add", "arguments": {"a": 1, "b": 2}, "id": "q"})),
        json!({"return": 3, "id": "q"})
    );
    assert_eq!(
        c.cmd(json!({"execute": "x-fail", "arguments": {"device": "d0"}})),
        json!({"error": {"class": "DeviceNotFound", "desc": "Device 'd0' not found"}})
    );
    // Malformed JSON, then a good command: connection still usable.
    c.send_raw(b"{\"execute\": ]\n");
    let e = c.recv();
    assert_eq!(e["error"]["class"], "GenericError");
    assert!(e["error"]["desc"]
        .as_str()
        .unwrap()
        .starts_with("JSON parse error, "));
    // Two requests in one write, split oddly, single quotes.
    c.send_raw(b"{'execute': 'x-add', 'arguments': {'a': 2, 'b': 2}, 'id': 1}{\"execute\"");
    assert_eq!(c.recv(), json!({"return": 4, "id": 1}));
    c.send_raw(b": \"x-add\", \"arguments\": {\"a\": 1, \"b\": \"x\"}, \"id\": 2}");
    assert_eq!(
        c.recv(),
        json!({"error": {"class": "GenericError",
            "desc": "Invalid parameter type for 'b', expected: integer"}, "id": 2})
    );
    // Non-ASCII arrives escaped.
    let r = c.cmd(json!({"execute": "x-echo", "arguments": {"value": "é"}}));
    assert_eq!(r["return"]["value"], "é");
    drop(c);
    let reason = server.join();
    assert_eq!(reason, ShutdownReason::Requested);
    assert!(!path.exists(), "socket file removed on shutdown");
}

#[test]
fn events_reach_every_negotiated_client_only() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = start(&dir);
    let path = server.unix_path().unwrap().to_path_buf();
    let mut a = Client::negotiated(&path);
    let mut b = Client::negotiated(&path);
    let mut unneg = Client::connect(&path);
    let _greeting = unneg.recv();

    let r =
        a.cmd(json!({"execute": "x-emit", "arguments": {"event": "TEST_EVENT", "data": {"n": 1}}}));
    // The event is emitted inside the handler, so it precedes the reply.
    let (ev, ret) = if r.get("event").is_some() {
        (r, a.recv())
    } else {
        (a.recv(), r)
    };
    assert_eq!(ret, json!({"return": {}}));
    assert_eq!(ev["event"], "TEST_EVENT");
    assert_eq!(ev["data"], json!({"n": 1}));
    let ts = &ev["timestamp"];
    assert!(ts["seconds"].as_i64().unwrap() > 1_600_000_000);
    assert!((0..1_000_000).contains(&ts["microseconds"].as_i64().unwrap()));
    assert_eq!(b.recv()["event"], "TEST_EVENT");

    // From another thread through the emitter.
    let em = server.events();
    std::thread::spawn(move || em.emit("FROM_THREAD", Value::Null))
        .join()
        .unwrap();
    let ev = b.recv();
    assert_eq!(ev["event"], "FROM_THREAD");
    assert!(ev.get("data").is_none());
    assert_eq!(a.recv()["event"], "FROM_THREAD");

    // The unnegotiated client got nothing: its next message is its reply.
    assert_eq!(
        unneg.cmd(json!({"execute": "qmp_capabilities", "id": 5})),
        json!({"return": {}, "id": 5})
    );
    server.events().emit("AFTER", json!({}));
    assert_eq!(unneg.recv()["event"], "AFTER");
}

#[test]
fn handlers_are_serialised_across_clients() {
    let dir = tempfile::tempdir().unwrap();
    let (server, probe) = start(&dir);
    let path = server.unix_path().unwrap().to_path_buf();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut c = Client::negotiated(&path);
                for j in 0..5 {
                    let r = c.cmd(json!({"execute": "x-echo",
                        "arguments": {"value": [i, j], "sleep-ms": 2}, "id": j}));
                    assert_eq!(r, json!({"return": {"value": [i, j]}, "id": j}));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(probe.calls.load(Ordering::SeqCst), 20);
    assert_eq!(
        probe.max_seen.load(Ordering::SeqCst),
        1,
        "handlers overlapped"
    );
}

#[test]
fn quit_replies_emits_shutdown_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = start(&dir);
    let path = server.unix_path().unwrap().to_path_buf();
    let mut other = Client::negotiated(&path);
    let mut c = Client::negotiated(&path);
    assert_eq!(
        c.cmd(json!({"execute": "quit", "id": 9})),
        json!({"return": {}, "id": 9})
    );
    let ev = c.recv();
    assert_eq!(ev["event"], "SHUTDOWN");
    assert_eq!(
        ev["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert!(c.try_recv().is_none(), "connection closed after quit");
    assert_eq!(other.recv()["event"], "SHUTDOWN");
    assert!(other.try_recv().is_none());
    assert_eq!(server.wait(), ShutdownReason::Quit);
    assert_eq!(server.join(), ShutdownReason::Quit);
    assert!(!path.exists());
}

#[test]
fn shutdown_handle_from_another_thread() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = start(&dir);
    let path = server.unix_path().unwrap().to_path_buf();
    let mut c = Client::negotiated(&path);
    let h = server.shutdown_handle();
    assert_eq!(h.wait_timeout(Duration::from_millis(10)), None);
    std::thread::spawn(move || h.shutdown());
    assert_eq!(server.wait(), ShutdownReason::Requested);
    assert_eq!(c.recv()["data"]["reason"], "host-signal");
    assert!(c.try_recv().is_none());
    server.join();
    assert!(!path.exists());
    assert!(UnixStream::connect(&path).is_err());
}

#[test]
fn stale_socket_replaced_live_socket_refused_file_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    // Stale: a socket file nobody listens on.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let probe = Arc::new(Probe::default());
    let s = Server::start(demo_registry(Arc::clone(&probe)), ServerConfig::unix(&path)).unwrap();
    let _ = Client::negotiated(&path);
    // Live: a second server on the same path is refused, the first survives.
    let e =
        Server::start(demo_registry(Arc::clone(&probe)), ServerConfig::unix(&path)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AddressInUse);
    let _ = Client::negotiated(&path);
    s.join();
    // A regular file is never deleted.
    std::fs::write(&path, b"precious").unwrap();
    let e = Server::start(demo_registry(probe), ServerConfig::unix(&path)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Socket);
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn tcp_listener_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let cfg = ServerConfig::unix(dir.path().join("q.sock"))
        .with_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let server = Server::start(demo_registry(probe), cfg).unwrap();
    let addr = server.tcp_addr().unwrap();
    assert_ne!(addr.port(), 0);
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.starts_with("{\"QMP\": {"), "{line}");
    w.write_all(b"{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"x-add\", \"arguments\": {\"a\": 40, \"b\": 2}}\n")
        .unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "{\"return\": {}}\r\n");
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "{\"return\": 42}\r\n");
    server.join();
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn client_limit_closes_extra_connections() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let cfg = ServerConfig {
        max_clients: 1,
        ..ServerConfig::unix(&path)
    };
    let server = Server::start(demo_registry(Arc::new(Probe::default())), cfg).unwrap();
    let mut first = Client::negotiated(&path);
    let mut second = Client::connect(&path);
    assert!(
        second.try_recv().is_none(),
        "extra client closed without greeting"
    );
    assert_eq!(
        first.cmd(json!({"execute": "x-add", "arguments": {"a": 1, "b": 1}})),
        json!({"return": 2})
    );
    drop(first);
    // Once the first client is gone a new one is served.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.shutdown_handle().clients() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = Client::negotiated(&path);
}

#[test]
fn huge_and_hostile_input_does_not_kill_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = start(&dir);
    let path = server.unix_path().unwrap().to_path_buf();
    let mut c = Client::negotiated(&path);
    // Control byte resets a half-sent request; one error, then normal service.
    c.send_raw(b"{\"execute\": \"x-add\", \"argu\x01\n");
    assert_eq!(
        c.recv(),
        json!({"error": {"class": "GenericError", "desc": "JSON parse error, stray '\\x01'"}})
    );
    // Deep nesting beyond QEMU's limit.
    let deep = format!("{}{}", "[".repeat(2000), "]".repeat(2000));
    c.send_raw(deep.as_bytes());
    assert_eq!(
        c.recv(),
        json!({"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}})
    );
    // 1024 deep is fine (and not an object).
    let ok = format!("{}{}", "[".repeat(1024), "]".repeat(1024));
    c.send_raw(ok.as_bytes());
    assert_eq!(
        c.recv(),
        json!({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}})
    );
    assert_eq!(
        c.cmd(json!({"execute": "x-add", "arguments": {"a": 1, "b": 1}})),
        json!({"return": 2})
    );
    // Hang up mid-object: server keeps serving others.
    c.send_raw(b"{\"execute\": \"x-add\", \"arguments\": {\"a\"");
    drop(c);
    let mut d = Client::negotiated(&path);
    assert_eq!(
        d.cmd(json!({"execute": "x-add", "arguments": {"a": 2, "b": 1}})),
        json!({"return": 3})
    );
}

#[test]
fn panicking_handler_is_an_error_not_a_dead_server() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let mut reg = demo_registry(Arc::new(Probe::default()));
    reg.register("x-boom", "", |_| panic!("handler bug"))
        .unwrap();
    let server = Server::start(reg, ServerConfig::unix(&path)).unwrap();
    let mut c = Client::negotiated(&path);
    assert_eq!(
        c.cmd(json!({"execute": "x-boom", "id": 1})),
        json!({"error": {"class": "GenericError",
            "desc": "internal error: command x-boom failed unexpectedly"}, "id": 1})
    );
    // Same connection, other clients, and the dispatcher lock all still work.
    assert_eq!(
        c.cmd(json!({"execute": "x-add", "arguments": {"a": 1, "b": 1}})),
        json!({"return": 2})
    );
    let mut d = Client::negotiated(&path);
    assert_eq!(
        d.cmd(json!({"execute": "x-add", "arguments": {"a": 2, "b": 2}})),
        json!({"return": 4})
    );
    server.join();
}

#[test]
fn rust_client_executes_and_collects_events() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let cfg = ServerConfig::unix(dir.path().join("c.sock"))
        .with_tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let server = Server::start(demo_registry(probe), cfg).unwrap();
    let mut c = qmp::Client::connect_unix(server.unix_path().unwrap()).unwrap();
    assert_eq!(c.greeting()["QMP"]["version"]["qemu"]["major"], 9);
    assert_eq!(
        c.execute("x-add", json!({"a": 2, "b": 3})).unwrap(),
        json!(5)
    );
    match c.execute("x-fail", json!({"device": "d9"})).unwrap_err() {
        qmp::Error::Command { name, error } => {
            assert_eq!(name, "x-fail");
            assert_eq!(error.class, qmp::ErrorClass::DeviceNotFound);
            assert_eq!(error.desc, "Device 'd9' not found");
        }
        other => panic!("unexpected {other}"),
    }
    // Events that arrive during a command are kept in order.
    c.execute("x-emit", json!({"event": "ONE"})).unwrap();
    c.execute("x-emit", json!({"event": "TWO", "data": {"n": 2}}))
        .unwrap();
    assert_eq!(
        c.wait_event("TWO", Duration::from_secs(5)).unwrap()["data"]["n"],
        2
    );
    let rest = c.events();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["event"], "ONE");
    let mut t = qmp::Client::connect_tcp(server.tcp_addr().unwrap()).unwrap();
    server.events().emit("BOTH", Value::Null);
    assert_eq!(
        t.wait_event("BOTH", Duration::from_secs(5)).unwrap()["event"],
        "BOTH"
    );
    assert_eq!(
        c.wait_event("BOTH", Duration::from_secs(5)).unwrap()["event"],
        "BOTH"
    );
    let e = t
        .wait_event("NEVER", Duration::from_millis(50))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    c.execute("quit", Value::Null).unwrap();
    assert_eq!(server.join(), ShutdownReason::Quit);
}
