//! `blockrep demo --fault KIND`: short runs on a small disk with a blkdebug
//! fault on the NBD link or the secondary disk, or the link dropped, and
//! the outcome the fault matrix (docs/reliability.md) names, as reported
//! by the demo's summary.

use std::process::{Command, Output};

use serde_json::Value;

fn demo(extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args([
            "demo",
            "--duration",
            "1500ms",
            "--disk-size",
            "4M",
            "--checkpoint-interval",
            "150",
            "--max-io",
            "64K",
        ])
        .args(extra)
        .output()
        .expect("run blockrep demo")
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn passed_json(extra: &[&str]) -> Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let out = demo(&args);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let s: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}): {}", describe(&out)));
    assert_eq!(s["verification"]["result"], "passed", "{s:#}");
    s
}

fn verified(s: &Value) -> Vec<String> {
    s["fault"]["verified"]
        .as_array()
        .unwrap_or_else(|| panic!("no fault.verified: {s:#}"))
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn link_write_fault_then_failover() {
    // 64 failing sectors in the hot 512 KiB: the first forwarded write
    // covering one comes within milliseconds.
    let s = passed_json(&[
        "--seed",
        "11",
        "--fault",
        "link-write",
        "--fault-errno",
        "ENOSPC",
        "--fault-sectors",
        "64",
    ]);
    let f = &s["fault"];
    assert_eq!(f["kind"], "link-write", "{s:#}");
    assert_eq!(f["errno"], "ENOSPC", "{s:#}");
    assert_eq!(f["broken"], true, "{s:#}");
    assert_eq!(f["failover_failed"], false, "{s:#}");
    assert!(
        f["outcome"]
            .as_str()
            .unwrap()
            .starts_with("replication error reported by the primary before"),
        "{s:#}"
    );
    let v = verified(&s);
    assert!(
        v.iter()
            .any(|l| l.ends_with("primary status error + RUNNING, secondary clean + RUNNING")),
        "{v:?}"
    );
    assert!(
        v.iter().any(|l| l.ends_with(
            "primary disk and view = every acknowledged write; \
             secondary guest view = last checkpoint + its writes"
        )),
        "{v:?}"
    );
    // The primary guest went on writing without error; the failover
    // (secondary unaffected) still yields last checkpoint + its writes.
    assert!(s["primary"]["writes"].as_u64().unwrap() > 0, "{s:#}");
    assert!(s["failover"].is_object(), "{s:#}");
}

#[test]
fn secondary_write_fault_fails_the_failover_and_keeps_the_view() {
    let out = demo(&[
        "--seed",
        "12",
        "--fault",
        "secondary-write",
        "--fault-sectors",
        "64",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    for line in [
        "  fault                 secondary-write EIO on writes covering sectors [",
        "  fault outcome         the failover commit hit it: FAILOVER_FAILED, error reported on the secondary",
        "  fault verified        secondary: state FAILOVER_FAILED, error reported",
        "  fault verified        secondary guest view = last checkpoint + its writes after the failed failover",
        "  verification          PASSED (",
        "failover failed as the fault matrix says, secondary guest view = last checkpoint + ",
    ] {
        assert!(table.contains(line), "missing {line:?} in:\n{table}");
    }
}

#[test]
fn link_drop_without_kill() {
    let s = passed_json(&["--seed", "13", "--fault", "link-drop", "--no-kill"]);
    let f = &s["fault"];
    assert_eq!(f["kind"], "link-drop", "{s:#}");
    assert_eq!(f["errno"], Value::Null, "{s:#}");
    assert_eq!(f["broken"], true, "{s:#}");
    assert_eq!(s["failover"], Value::Null, "{s:#}");
    let v = verified(&s);
    assert!(
        v.iter()
            .any(|l| l.starts_with("at the end: primary disk and view")),
        "{v:?}"
    );
}

#[test]
fn unknown_fault_is_a_usage_error() {
    let out = demo(&["--fault", "disk-on-fire"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("link-write") && err.contains("link-drop"),
        "{err}"
    );
}
