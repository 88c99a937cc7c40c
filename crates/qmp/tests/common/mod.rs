//! Shared helpers for the socket tests: a demo registry and a line client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use qmp::{QmpError, Registry};
use serde_json::{json, Value};

/// In-flight counter used to prove handlers never overlap.
#[derive(Default)]
pub struct Probe {
    pub in_flight: AtomicUsize,
    pub max_seen: AtomicUsize,
    pub calls: AtomicUsize,
}

/// A registry with a few dummy commands:
/// - `x-echo {'value': 'any', '*sleep-ms': 'uint32'}` returns `{"value": ...}`
/// - `x-emit {'event': 'str', '*data': 'any'}` emits an event
/// - `x-fail {'device': 'str'}` fails with DeviceNotFound
/// - `x-add {'a': 'int', 'b': 'int'}` returns a + b
pub fn demo_registry(probe: Arc<Probe>) -> Registry {
    let mut r = Registry::new();
    let p = Arc::clone(&probe);
    r.register(
        "x-echo",
        "{'value': 'any', '*sleep-ms': 'uint32'}",
        move |a| {
            let now = p.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            p.max_seen.fetch_max(now, Ordering::SeqCst);
            p.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(ms) = a.opt_u64("sleep-ms") {
                std::thread::sleep(Duration::from_millis(ms));
            }
            p.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(json!({"value": a.get("value").cloned().unwrap_or(Value::Null)}))
        },
    )
    .unwrap();
    let ev = r.events();
    r.register("x-emit", "{'event': 'str', '*data': 'any'}", move |a| {
        ev.emit(
            a.str("event")?,
            a.get("data").cloned().unwrap_or(Value::Null),
        );
        Ok(json!({}))
    })
    .unwrap();
    r.register("x-fail", "{'device': 'str'}", |a| {
        Err(QmpError::device_not_found(format!(
            "Device '{}' not found",
            a.str("device")?
        )))
    })
    .unwrap();
    r.register("x-add", "{'a': 'int', 'b': 'int'}", |a| {
        Ok(json!(a.i64("a")?.wrapping_add(a.i64("b")?)))
    })
    .unwrap();
    r
}

/// A blocking line-oriented client.
pub struct Client {
    pub w: UnixStream,
    pub r: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).expect("connect to QMP socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }

    /// Next message; panics on timeout or EOF.
    pub fn recv(&mut self) -> Value {
        self.try_recv().expect("a QMP message before EOF")
    }

    /// Next message, or None at EOF.
    pub fn try_recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).expect("read within 10 s");
        if n == 0 {
            return None;
        }
        assert!(line.ends_with("\r\n"), "QMP lines end in CRLF: {line:?}");
        assert!(line.is_ascii(), "QMP output is ASCII: {line:?}");
        Some(serde_json::from_str(line.trim_end()).expect("server sends valid JSON"))
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    pub fn cmd(&mut self, v: Value) -> Value {
        self.send_raw(v.to_string().as_bytes());
        self.recv()
    }

    /// Reads the greeting and negotiates.
    pub fn negotiated(path: &Path) -> Client {
        let mut c = Client::connect(path);
        let g = c.recv();
        assert!(g.get("QMP").is_some(), "greeting: {g}");
        assert_eq!(
            c.cmd(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        c
    }
}
