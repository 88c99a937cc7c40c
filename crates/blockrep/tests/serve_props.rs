//! Bad input, as a property test against one real daemon process: random
//! JSON values, malformed (but complete) JSON text, and random commands
//! with random argument values (QEMU's shapes and nonsense mixed). The
//! daemon never crashes or hangs, every request gets an answer, and every
//! command that failed left the graph (`query-named-block-nodes`) exactly
//! as it was. `PROPTEST_CASES=N` for more cases (default 32).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, Qmp};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};

const COMMANDS: &[&str] = &[
    "blockdev-add",
    "blockdev-del",
    "query-named-block-nodes",
    "query-block",
    "query-blockstats",
    "x-blockdev-change",
    "nbd-server-start",
    "nbd-server-add",
    "block-export-add",
    "nbd-server-remove",
    "nbd-server-stop",
    "blockdev-backup",
    "block-commit",
    "blockdev-mirror",
    "block-stream",
    "query-block-jobs",
    "block-job-cancel",
    "block-job-pause",
    "block-job-resume",
    "block-job-complete",
    "block-job-set-speed",
    "job-dismiss",
    "xen-set-replication",
    "query-xen-replication-status",
    "xen-colo-do-checkpoint",
    "x-colo-lost-heartbeat",
    "x-blockrep-query-replication",
    "query-version",
    "query-commands",
    "qmp_capabilities",
    "no-such-command",
];

const NODES: &[&str] = &["a", "b", "c", "d", "e", "q", "r", "#block1", "", "A B"];
const DRIVERS: &[&str] = &[
    "memory",
    "null-co",
    "raw",
    "file",
    "qcow2",
    "quorum",
    "blkdebug",
    "replication",
    "nbd",
    "vmdk",
];
const KEYS: &[&str] = &[
    "node-name",
    "driver",
    "size",
    "file",
    "backing",
    "children",
    "vote-threshold",
    "read-pattern",
    "image",
    "inject-error",
    "mode",
    "top-id",
    "server",
    "export",
    "device",
    "target",
    "sync",
    "job-id",
    "name",
    "writable",
    "id",
    "type",
    "addr",
    "parent",
    "child",
    "node",
    "enable",
    "primary",
    "failover",
    "speed",
    "force",
    "base",
    "base-node",
    "top",
    "flat",
    "query-nodes",
    "read-only",
    "auto-dismiss",
    "granularity",
    "bogus",
];

fn pick(v: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::sample::select(v).prop_map(|s| json!(s))
}

/// Any JSON value whose objects only use harmless keys.
fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        (-3i64..70_000_000).prop_map(|i| json!(i)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        pick(NODES),
        pick(DRIVERS),
        "[a-z\\-]{0,8}".prop_map(Value::String),
        ".{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop::sample::select(&["node-name", "driver", "size", "x", "data", "type"][..]),
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Value::Object(
                kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
            )),
        ]
    })
    .boxed()
}

/// Values for a key: QEMU-shaped most of the time, anything sometimes.
/// Paths stay inside the test directory, hosts on loopback.
fn value_for(key: &'static str, dir: PathBuf) -> BoxedStrategy<Value> {
    let d = dir.clone();
    let filename = prop_oneof![
        Just(json!(dir.join("f.raw"))),
        Just(json!(dir.join("f.qcow2"))),
        Just(json!(dir.join("missing"))),
        Just(json!("/")),
    ];
    let sock = (0u8..3).prop_map(move |i| json!(d.join(format!("s{i}.sock"))));
    match key {
        "node-name" | "device" | "target" | "parent" | "node" | "top-id" | "base-node"
        | "job-id" | "id" => prop_oneof![4 => pick(NODES), 1 => any_json()].boxed(),
        "driver" => prop_oneof![4 => pick(DRIVERS), 1 => any_json()].boxed(),
        "size" | "speed" | "vote-threshold" | "granularity" => prop_oneof![
            Just(json!(4 << 20)),
            Just(json!(0)),
            Just(json!(-1)),
            Just(json!(u64::MAX)),
            (0u64..1 << 24).prop_map(|i| json!(i)),
            any_json()
        ]
        .boxed(),
        "sync" => prop_oneof![
            pick(&["full", "top", "none", "incremental", "bitmap", "x"]),
            any_json()
        ]
        .boxed(),
        "mode" => prop_oneof![
            pick(&["primary", "secondary", "safe", "hard", "x"]),
            any_json()
        ]
        .boxed(),
        "child" => {
            prop_oneof![pick(&["children.0", "children.1", "file", "x"]), any_json()].boxed()
        }
        "file" | "backing" | "image" => prop_oneof![
            pick(NODES),
            (pick(DRIVERS), filename).prop_map(|(d, f)| json!({"driver": d, "filename": f})),
            (pick(DRIVERS), 0u64..1 << 23).prop_map(|(d, s)| json!({"driver": d, "size": s})),
            Just(Value::Null),
            any_json()
        ]
        .boxed(),
        "children" => prop_oneof![
            prop::collection::vec(value_for("file", dir), 0..4).prop_map(Value::Array),
            any_json()
        ]
        .boxed(),
        "addr" => prop_oneof![
            sock.clone()
                .prop_map(|p| json!({"type": "unix", "data": {"path": p}})),
            Just(json!({"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}})),
            Just(json!({"type": "inet", "data": {"host": "127.0.0.1", "port": "x"}})),
            Just(json!({"type": "vsock", "data": {"cid": "1", "port": "2"}})),
            Just(json!({"type": "unix", "data": {}})),
            Just(json!({"type": "unix", "path": "/x"})),
        ]
        .boxed(),
        "server" => prop_oneof![
            sock.prop_map(|p| json!({"type": "unix", "path": p})),
            Just(json!({"type": "inet", "host": "127.0.0.1", "port": "1"})),
            Just(json!({"type": "fd", "str": "3"})),
            Just(json!({"type": "unix"})),
        ]
        .boxed(),
        "inject-error" => prop_oneof![
            Just(json!([{"event": "pwritev", "iotype": "write", "errno": 5, "once": true}])),
            Just(json!([{"event": "read_aio", "sector": 0}])),
            Just(json!([{"event": "bogus"}])),
            any_json()
        ]
        .boxed(),
        "type" => prop_oneof![pick(&["nbd", "fuse", "unix", "x"]), any_json()].boxed(),
        _ => prop_oneof![any::<bool>().prop_map(Value::Bool), any_json()].boxed(),
    }
}

#[derive(Debug, Clone)]
enum Action {
    /// A random JSON value sent as a request.
    Value(Value),
    /// Complete but malformed JSON text.
    Malformed(&'static str),
    /// A command with random arguments.
    Command(&'static str, Value),
}

const MALFORMED: &[&str] = &[
    "{\"execute\": \"query-block\",}",
    "{\"execute\" \"query-block\"}",
    "{\"execute\": nope}",
    "{,}",
    "[1, 2,]",
    "{\"execute\": \"query-block\", \"arguments\": {\"a\": 1,}}",
    "{'execute': 'blockdev-add', 'arguments': {'driver': 'memory', 'node-name': 'x', 'size': -}}",
];

fn action(dir: PathBuf) -> impl Strategy<Value = Action> {
    let dir2 = dir.clone();
    let args = prop::collection::vec(prop::sample::select(KEYS), 0..7).prop_flat_map(move |keys| {
        let d = dir.clone();
        let strategies: Vec<_> = keys
            .into_iter()
            .map(|k| value_for(k, d.clone()).prop_map(move |v| (k, v)))
            .collect();
        strategies.prop_map(|kv| {
            let m: Map<String, Value> = kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            Value::Object(m)
        })
    });
    prop_oneof![
        1 => any_json().prop_map(Action::Value),
        1 => prop::sample::select(MALFORMED).prop_map(Action::Malformed),
        5 => (prop::sample::select(COMMANDS), args).prop_map(|(c, a)| Action::Command(c, a)),
        6 => well_formed(dir2),
    ]
}

/// Well-formed commands on the test's nodes and jobs (most of them can
/// succeed in some state of the graph), so the graph keeps changing.
fn well_formed(dir: PathBuf) -> BoxedStrategy<Action> {
    let node = || prop::sample::select(&["a", "b", "c", "d", "e", "q", "r"][..]);
    let job = || prop::sample::select(&["j1", "j2"][..]);
    let sock = dir.join("nbd.sock");
    let c = |name: &'static str, v: Value| Action::Command(name, v);
    prop_oneof![
        (node(), 1u64..8).prop_map(move |(n, m)| c(
            "blockdev-add",
            json!({"driver": "memory", "node-name": n, "size": m << 20})
        )),
        (node(), node()).prop_map(move |(n, b)| c(
            "blockdev-add",
            json!({"driver": "memory", "node-name": n, "backing": b})
        )),
        node().prop_map(move |n| c(
            "blockdev-add",
            json!({"driver": "replication", "node-name": n, "mode": "primary",
                   "file": {"driver": "null-co", "size": 4 << 20}})
        )),
        node().prop_map(move |n| c(
            "blockdev-add",
            json!({"driver": "quorum", "node-name": n, "vote-threshold": 1,
                   "children": [{"driver": "memory", "size": 4 << 20}]})
        )),
        node().prop_map(move |n| c("blockdev-del", json!({"node-name": n}))),
        (node(), node())
            .prop_map(move |(p, n)| c("x-blockdev-change", json!({"parent": p, "node": n}))),
        (node(), 0u8..3).prop_map(move |(p, i)| c(
            "x-blockdev-change",
            json!({"parent": p, "child": format!("children.{i}")})
        )),
        Just(c(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}})
        )),
        Just(c("nbd-server-stop", json!({}))),
        (node(), any::<bool>())
            .prop_map(move |(n, w)| c("nbd-server-add", json!({"device": n, "writable": w}))),
        (node(), any::<bool>()).prop_map(move |(n, h)| c(
            "nbd-server-remove",
            json!({"name": n, "mode": if h { "hard" } else { "safe" }})
        )),
        (
            job(),
            node(),
            node(),
            prop::sample::select(&["full", "top", "none"][..])
        )
            .prop_map(move |(j, s, t, y)| c(
                "blockdev-backup",
                json!({"job-id": j, "device": s, "target": t, "sync": y})
            )),
        (job(), node(), node()).prop_map(move |(j, s, t)| c(
            "blockdev-mirror",
            json!({"job-id": j, "device": s, "target": t, "sync": "full"})
        )),
        (job(), node())
            .prop_map(move |(j, n)| c("block-commit", json!({"job-id": j, "device": n}))),
        (job(), node())
            .prop_map(move |(j, n)| c("block-stream", json!({"job-id": j, "device": n}))),
        (
            job(),
            prop::sample::select(
                &[
                    "block-job-cancel",
                    "block-job-pause",
                    "block-job-resume",
                    "block-job-complete"
                ][..]
            )
        )
            .prop_map(move |(j, v)| c(v, json!({"device": j}))),
        job().prop_map(move |j| c(
            "block-job-set-speed",
            json!({"device": j, "speed": 1 << 20})
        )),
        job().prop_map(move |j| c("job-dismiss", json!({"id": j}))),
        (
            any::<bool>(),
            any::<bool>(),
            prop::option::of(any::<bool>())
        )
            .prop_map(move |(e, p, f)| {
                let mut a = json!({"enable": e, "primary": p});
                if let Some(f) = f {
                    a["failover"] = json!(f);
                }
                c("xen-set-replication", a)
            }),
        Just(c("xen-colo-do-checkpoint", json!({}))),
        Just(c("x-colo-lost-heartbeat", json!({}))),
        Just(c("query-xen-replication-status", json!({}))),
        Just(c("x-blockrep-query-replication", json!({}))),
        Just(c("query-block-jobs", json!({}))),
        Just(c("query-blockstats", json!({"query-nodes": true}))),
    ]
    .boxed()
}

fn nodes(q: &mut Qmp) -> Value {
    q.ok("query-named-block-nodes", json!({}))
}

/// Waits until no job is in a state where it may still change the graph
/// by itself (a started commit or stream about to pivot).
fn settle(q: &mut Qmp) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let jobs = q.ok("query-block-jobs", json!({}));
        let busy = jobs.as_array().unwrap().iter().any(|j| {
            let st = j["status"].as_str().unwrap_or("");
            matches!(st, "created" | "waiting" | "pending" | "aborting")
                || (st == "running" && j["offset"] != j["len"])
                || (st == "running" && j["type"] != "backup")
        });
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Commands that succeeded and failed, for the summary line.
#[derive(Default)]
struct Counts {
    ok: u64,
    failed: u64,
}

fn run_action(
    q: &mut Qmp,
    a: &Action,
    seq: &mut u64,
    counts: &mut Counts,
) -> Result<(), TestCaseError> {
    match a {
        Action::Value(v) => {
            let r = q.raw(v.clone());
            prop_assert!(r.get("error").is_some() || r.get("return").is_some(), "{r}");
        }
        Action::Malformed(text) => {
            // Then a sync request with an id: at least one error before it.
            *seq += 1;
            q.writer_send(text);
            let r = q.raw(json!({"execute": "query-version", "id": *seq}));
            let mut errors = 0;
            let mut r = r;
            while r.get("id") != Some(&json!(*seq)) {
                prop_assert!(r.get("error").is_some(), "{r}");
                errors += 1;
                r = q.next_reply().expect("reply");
            }
            prop_assert!(errors >= 1, "no error for malformed input {text:?}");
        }
        Action::Command(c, args) => {
            let before = nodes(q);
            let r = q.raw(json!({"execute": c, "arguments": args}));
            if let Some(e) = r.get("error") {
                prop_assert!(
                    matches!(
                        e["class"].as_str(),
                        Some(
                            "GenericError"
                                | "CommandNotFound"
                                | "DeviceNotFound"
                                | "DeviceNotActive"
                        )
                    ),
                    "{r}"
                );
                counts.failed += 1;
                let after = nodes(q);
                prop_assert_eq!(before, after, "failed {} {} changed the graph", c, args);
            } else {
                prop_assert!(r.get("return").is_some(), "{r}");
                counts.ok += 1;
                settle(q);
            }
        }
    }
    Ok(())
}

fn setup(dir: &Path) -> Daemon {
    std::fs::write(dir.join("f.raw"), vec![0u8; 4 << 20]).unwrap();
    common::qemu_img_create("qcow2", &dir.join("f.qcow2"), "4M");
    let d = Daemon::start(dir, "props");
    let mut q = d.qmp();
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "a", "size": 4 << 20}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "b", "size": 4 << 20}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "memory", "node-name": "c", "backing": "a"}),
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "quorum", "node-name": "q", "vote-threshold": 1, "children": ["b"]}),
    );
    d
}

#[test]
fn prop_random_qmp_input_never_breaks_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut daemon = setup(&dir);
    let q = std::cell::RefCell::new(daemon.qmp());
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let seq = std::cell::Cell::new(0u64);
    let counts = std::cell::RefCell::new(Counts::default());
    let strategy = prop::collection::vec(action(dir.clone()), 1..12);
    let result = runner.run(&strategy, |actions| {
        let mut q = q.borrow_mut();
        let mut n = seq.get();
        for a in &actions {
            run_action(&mut q, a, &mut n, &mut counts.borrow_mut())?;
        }
        seq.set(n);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\ndaemon log tail:\n{}", tail(&daemon.log(&dir)));
    }
    let c = counts.into_inner();
    eprintln!("commands: {} succeeded, {} failed", c.ok, c.failed);
    assert!(c.ok > 0 && c.failed > 0);
    // Still alive and answering; then a clean quit.
    let mut q = q.into_inner();
    assert!(q.ok("query-version", json!({})).get("qemu").is_some());
    drop(q);
    daemon.qmp().ok("quit", json!({}));
    assert_eq!(daemon.wait(), Some(0), "{}", tail(&daemon.log(&dir)));
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
