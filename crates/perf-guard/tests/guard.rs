//! The regression guard: callgrind instruction counts of the hot paths
//! against `baseline.txt`. Fails when a count grows by more than 10%.
//! `PERF_GUARD_BLESS=1` records the current counts for this profile instead.

use std::path::{Path, PathBuf};

use perf_guard::{
    check_valgrind, compare, measure, parse_baseline, profile, render_baseline, Entry, HotPath,
    Verdict, ITERS, TOLERANCE,
};

fn baseline_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("baseline.txt")
}

#[test]
fn hot_path_instruction_counts_within_baseline() {
    check_valgrind().unwrap();
    let probe = Path::new(env!("CARGO_BIN_EXE_perf-guard-probe"));
    let out = tempfile::tempdir().unwrap();
    let bpath = baseline_path();
    let text = std::fs::read_to_string(&bpath).unwrap_or_default();
    let mut baseline = parse_baseline(&text, &bpath).unwrap();
    let bless = std::env::var_os("PERF_GUARD_BLESS").is_some_and(|v| v == "1");
    let prof = profile();

    let mut report = Vec::new();
    let mut failures = Vec::new();
    let counts = measure(probe, &HotPath::ALL, ITERS, out.path()).unwrap();
    for (path, per_op) in HotPath::ALL.into_iter().zip(counts) {
        assert!(per_op > 0, "{path}: zero instructions per operation");
        if bless {
            baseline.retain(|e| !(e.profile == prof && e.path == path.name()));
            baseline.push(Entry {
                profile: prof.into(),
                path: path.name().into(),
                per_op,
            });
            report.push(format!("{prof} {path}: {per_op} (recorded)"));
            continue;
        }
        match compare(&baseline, prof, path.name(), per_op) {
            Verdict::Ok(r) => report.push(format!("{prof} {path}: {per_op} ({r:.3}x baseline)")),
            Verdict::Regressed(r) => failures.push(format!(
                "{prof} {path}: {per_op} instructions per op, {r:.3}x the baseline (limit {:.2}x)",
                1.0 + TOLERANCE
            )),
            Verdict::Missing => failures.push(format!(
                "{prof} {path}: {per_op} instructions per op, no baseline entry \
                 (record with PERF_GUARD_BLESS=1 cargo test -p perf-guard{})",
                if prof == "release" { " --release" } else { "" }
            )),
        }
    }
    for r in &report {
        eprintln!("perf-guard: {r}");
    }
    if bless {
        baseline.sort_by(|a, b| (&a.profile, &a.path).cmp(&(&b.profile, &b.path)));
        std::fs::write(&bpath, render_baseline(&baseline)).unwrap();
        eprintln!("perf-guard: baseline written to {}", bpath.display());
    }
    assert!(
        failures.is_empty(),
        "instruction counts grew past the baseline ({}); if intended, re-record with \
         PERF_GUARD_BLESS=1 and commit baseline.txt with the change:\n{}",
        bpath.display(),
        failures.join("\n")
    );
}

#[test]
fn compare_flags_growth_over_ten_percent_only() {
    let b = vec![Entry {
        profile: "debug".into(),
        path: "x".into(),
        per_op: 1000,
    }];
    assert_eq!(compare(&b, "debug", "x", 1100), Verdict::Ok(1.1));
    assert!(matches!(
        compare(&b, "debug", "x", 1101),
        Verdict::Regressed(_)
    ));
    assert!(matches!(compare(&b, "debug", "x", 500), Verdict::Ok(_)));
    assert_eq!(compare(&b, "release", "x", 1000), Verdict::Missing);
    assert_eq!(compare(&b, "debug", "y", 1000), Verdict::Missing);
}

#[test]
fn baseline_round_trips_and_rejects_garbage() {
    let e = vec![Entry {
        profile: "debug".into(),
        path: "door-write-4k".into(),
        per_op: 12345,
    }];
    let p = Path::new("baseline.txt");
    assert_eq!(parse_baseline(&render_baseline(&e), p).unwrap(), e);
    assert!(parse_baseline("debug door 12x\n", p).is_err());
    assert!(parse_baseline("debug door\n", p).is_err());
}

#[test]
fn callgrind_totals_line_is_parsed() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("cg.out");
    std::fs::write(
        &f,
        "version: 1\nevents: Ir\nsummary: 777\nfl=x\n0 3\ntotals: 4242\n",
    )
    .unwrap();
    assert_eq!(perf_guard::parse_callgrind_total(&f).unwrap(), 4242);
    std::fs::write(&f, "events: Ir\n").unwrap();
    assert!(perf_guard::parse_callgrind_total(&f).is_err());
}
