//! `blockrep demo` end to end: two daemons, guests, checkpoints, a SIGKILL
//! failover or a clean stop, and the byte-exact verification. Short runs
//! on a small disk; several seeds; the failure path through the hidden
//! `--corrupt-secondary-for-test` flag.

use std::process::{Command, Output};

use serde_json::Value;

fn demo(extra: &[&str]) -> (Output, Option<Value>) {
    let out = Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args([
            "demo",
            "--json",
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
        .expect("run blockrep demo");
    let json = serde_json::from_slice(&out.stdout).ok();
    (out, json)
}

fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn passed(extra: &[&str]) -> Value {
    let (out, json) = demo(extra);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let s = json.unwrap_or_else(|| panic!("no JSON summary: {}", describe(&out)));
    assert_eq!(s["verification"]["result"], "passed", "{s:#}");
    assert_eq!(s["verification"]["first_difference"], Value::Null, "{s:#}");
    let seed = extra[extra.iter().position(|a| *a == "--seed").unwrap() + 1];
    assert_eq!(s["seed"].to_string(), seed);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("seed {seed} (replay with --seed {seed})")),
        "{stderr}"
    );
    assert!(s["primary"]["writes"].as_u64().unwrap() > 0, "{s:#}");
    assert!(s["secondary"]["writes"].as_u64().unwrap() > 0, "{s:#}");
    assert!(s["bytes_forwarded"].as_u64().unwrap() > 0, "{s:#}");
    let ckpts = s["checkpoints"].as_u64().unwrap();
    assert_eq!(
        s["verification"]["checkpoints_verified"].as_u64(),
        Some(ckpts)
    );
    assert!(
        s["checkpoint_pause"]["max_ms"].as_f64().unwrap()
            >= s["checkpoint_pause"]["p50_ms"].as_f64().unwrap()
    );
    s
}

#[test]
fn failover_after_sigkill_verifies_with_several_seeds() {
    for seed in ["1", "2", "3"] {
        let s = passed(&["--seed", seed]);
        assert_eq!(s["mode"], "failover", "{s:#}");
        let f = &s["failover"];
        assert!(f["failover_ms"].as_f64().unwrap() > 0.0, "{s:#}");
        assert!(
            f["failover_ms"].as_f64() >= f["lost_heartbeat_to_done_ms"].as_f64(),
            "{s:#}"
        );
        let killed = f["killed_at_s"].as_f64().unwrap();
        assert!(killed >= 0.5, "kill moment {killed} before 35% of the run");
    }
}

#[test]
fn clean_stop_without_kill_verifies() {
    for seed in ["5", "6"] {
        let s = passed(&["--seed", seed, "--no-kill", "--mix", "write=70,read=30"]);
        assert_eq!(s["mode"], "clean-stop", "{s:#}");
        assert_eq!(s["failover"], Value::Null, "{s:#}");
        assert_eq!(s["primary"]["flushes"], 0, "{s:#}");
        assert!(s["checkpoints"].as_u64().unwrap() >= 1, "{s:#}");
    }
}

#[test]
fn corrupted_secondary_fails_with_the_first_differing_offset() {
    for extra in [&["--seed", "7"][..], &["--seed", "8", "--no-kill"][..]] {
        let mut args = extra.to_vec();
        args.push("--corrupt-secondary-for-test");
        let (out, json) = demo(&args);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        let s = json.unwrap_or_else(|| panic!("no JSON summary: {}", describe(&out)));
        assert_eq!(s["verification"]["result"], "failed", "{s:#}");
        let d = &s["verification"]["first_difference"];
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said = stderr
            .lines()
            .find_map(|l| {
                l.strip_prefix("blockrep demo: (test) corrupted the secondary disk at offset ")
            })
            .unwrap_or_else(|| panic!("no corruption line: {stderr}"));
        assert_eq!(d["offset"].to_string(), said, "{s:#}");
        assert_eq!(
            d["found"].as_u64().unwrap(),
            d["expected"].as_u64().unwrap() ^ 0xff,
            "{s:#}"
        );
        assert!(
            d["what"].as_str().unwrap().contains("secondary disk"),
            "{s:#}"
        );
        let line = format!(
            "verification FAILED: {}: first difference at offset {said} ",
            d["what"].as_str().unwrap()
        );
        assert!(stderr.contains(&line), "{stderr}");
    }
}

#[test]
fn bad_arguments_print_one_line_and_exit_nonzero() {
    for (args, want) in [
        (&["--disk-size", "12Q"][..], "invalid size '12Q'"),
        (
            &["--disk-size", "1000"][..],
            "--disk-size 1000 must be a multiple of 512",
        ),
        (&["--mix", "write=0"][..], "non-zero weight"),
        (&["--duration", "soon"][..], "invalid duration 'soon'"),
        (&["--checkpoint-interval", "1"][..], "at least 10 ms"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_blockrep"))
            .arg("demo")
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
