//! Random sequences of `block_resize`, the generic job commands, exports
//! and their removal (valid and nonsense arguments mixed) against one
//! daemon: every request is answered with a known error class or a return,
//! a failed command leaves the graph (`query-named-block-nodes`) and the
//! exports (`query-block-exports`) as they were, and `query-jobs` /
//! `query-block-exports` always have QEMU's member sets. The daemon quits
//! cleanly at the end. `PROPTEST_CASES=N` for more cases (default 24).
//! Sizes stay small (jobs on huge nodes would run for minutes); huge and
//! odd sizes are covered by `serve_jobs_api.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, Qmp};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Value};

const NODES: &[&str] = &["a", "b", "c", "nope", ""];
const JOBS: &[&str] = &["j0", "j1", "nope", ""];
const EXPORTS: &[&str] = &["e0", "e1", "a", "nope"];

fn node() -> impl Strategy<Value = &'static str> {
    prop::sample::select(NODES)
}

fn job() -> impl Strategy<Value = &'static str> {
    prop::sample::select(JOBS)
}

fn export() -> impl Strategy<Value = &'static str> {
    prop::sample::select(EXPORTS)
}

fn size() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(-1)),
        Just(json!(512)),
        Just(json!(1 << 20)),
        Just(json!(2 << 20)),
        Just(json!(3 << 20)),
        Just(json!(8 << 20)),
        Just(json!(-(1i64 << 40))),
        Just(json!("1M")),
        Just(json!(1.5)),
    ]
}

fn command(sock: PathBuf) -> BoxedStrategy<(String, Value)> {
    let c = |n: &str, a: Value| (n.to_string(), a);
    let sock2 = sock.clone();
    prop_oneof![
        (node(), size())
            .prop_map(move |(n, s)| c("block_resize", json!({"node-name": n, "size": s}))),
        (export(), size())
            .prop_map(move |(n, s)| c("block_resize", json!({"device": n, "size": s}))),
        size().prop_map(move |s| c("block_resize", json!({"size": s}))),
        (
            job(),
            prop::sample::select(
                &[
                    "job-pause",
                    "job-resume",
                    "job-cancel",
                    "job-complete",
                    "job-finalize",
                    "job-dismiss",
                ][..]
            )
        )
            .prop_map(move |(j, v)| c(v, json!({"id": j}))),
        (job(), node(), node(), any::<bool>()).prop_map(move |(j, s, t, ad)| c(
            "blockdev-backup",
            json!({"job-id": j, "device": s, "target": t, "sync": "full", "auto-dismiss": ad})
        )),
        (job(), node(), node(), any::<bool>()).prop_map(move |(j, s, t, ad)| c(
            "blockdev-mirror",
            json!({"job-id": j, "device": s, "target": t, "sync": "full", "auto-dismiss": ad})
        )),
        (export(), node(), any::<bool>()).prop_map(move |(e, n, w)| c(
            "block-export-add",
            json!({"type": "nbd", "id": e, "node-name": n, "writable": w})
        )),
        (
            export(),
            prop::sample::select(&["safe", "hard", "soft"][..]),
            any::<bool>()
        )
            .prop_map(move |(e, m, with_mode)| {
                if with_mode {
                    c("block-export-del", json!({"id": e, "mode": m}))
                } else {
                    c("block-export-del", json!({"id": e}))
                }
            }),
        node().prop_map(move |n| c("nbd-server-add", json!({"device": n}))),
        export().prop_map(move |e| c("nbd-server-remove", json!({"name": e}))),
        Just(c("nbd-server-stop", json!({}))),
        Just(c(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock2}}})
        )),
        Just(c("query-jobs", json!({}))),
        Just(c("query-block-exports", json!({}))),
        Just(c("job-pause", json!({}))),
        Just(c("block-export-del", json!({"mode": "hard"}))),
    ]
    .boxed()
}

fn state(q: &mut Qmp) -> (Value, Value) {
    (
        q.ok("query-named-block-nodes", json!({})),
        q.ok("query-block-exports", json!({})),
    )
}

/// Waits until no job is in a state where it may still change the graph
/// by itself (small nodes: copies end within milliseconds).
fn settle(q: &mut Qmp) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let jobs = q.ok("query-jobs", json!({}));
        let busy = jobs.as_array().unwrap().iter().any(|j| {
            matches!(
                j["status"].as_str().unwrap_or(""),
                "created" | "running" | "waiting" | "pending" | "aborting"
            )
        });
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "jobs still busy after 10 s: {}",
        q.ok("query-block-jobs", json!({}))
    );
}

fn check_shapes(q: &mut Qmp) -> Result<(), TestCaseError> {
    for j in q.ok("query-jobs", json!({})).as_array().unwrap() {
        let mut k: Vec<&str> = j.as_object().unwrap().keys().map(|s| s.as_str()).collect();
        k.sort();
        k.retain(|x| *x != "error");
        prop_assert_eq!(
            k,
            vec!["current-progress", "id", "status", "total-progress", "type"]
        );
    }
    for e in q.ok("query-block-exports", json!({})).as_array().unwrap() {
        let mut k: Vec<&str> = e.as_object().unwrap().keys().map(|s| s.as_str()).collect();
        k.sort();
        prop_assert_eq!(k, vec!["id", "node-name", "shutting-down", "type"]);
    }
    Ok(())
}

fn run(
    q: &mut Qmp,
    cmd: &str,
    args: &Value,
    ok: &mut u64,
    failed: &mut u64,
) -> Result<(), TestCaseError> {
    let before = state(q);
    let r = q.raw(json!({"execute": cmd, "arguments": args}));
    if let Some(e) = r.get("error") {
        prop_assert!(
            matches!(
                e["class"].as_str(),
                Some("GenericError" | "DeviceNotFound" | "DeviceNotActive")
            ),
            "{}",
            r
        );
        *failed += 1;
        let after = state(q);
        prop_assert_eq!(before, after, "failed {} {} changed the state", cmd, args);
    } else {
        prop_assert!(r.get("return").is_some(), "{}", r);
        *ok += 1;
        settle(q);
    }
    check_shapes(q)
}

fn setup(dir: &Path) -> Daemon {
    let d = Daemon::start(dir, "props");
    let mut q = d.qmp();
    for n in ["a", "b", "c"] {
        q.ok(
            "blockdev-add",
            json!({"driver": "memory", "node-name": n, "size": 1 << 20}),
        );
    }
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": dir.join("nbd.sock")}}}),
    );
    d
}

#[test]
fn prop_resize_jobs_and_exports_never_break_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut daemon = setup(&dir);
    let q = std::cell::RefCell::new(daemon.qmp());
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let counts = std::cell::RefCell::new((0u64, 0u64));
    let strategy = prop::collection::vec(command(dir.join("nbd.sock")), 1..12);
    let result = runner.run(&strategy, |cmds| {
        let mut q = q.borrow_mut();
        let mut c = counts.borrow_mut();
        let (ok, failed) = &mut *c;
        for (cmd, args) in &cmds {
            run(&mut q, cmd, args, ok, failed)?;
        }
        Ok(())
    });
    if let Err(e) = result {
        let log = daemon.log(&dir);
        let lines: Vec<&str> = log.lines().collect();
        panic!(
            "{e}\ndaemon log tail:\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    let (ok, failed) = counts.into_inner();
    eprintln!("commands: {ok} succeeded, {failed} failed");
    assert!(ok > 0 && failed > 0);
    let mut q = q.into_inner();
    assert!(q.ok("query-version", json!({})).get("qemu").is_some());
    drop(q);
    daemon.qmp().ok("quit", json!({}));
    assert_eq!(daemon.wait(), Some(0));
}
