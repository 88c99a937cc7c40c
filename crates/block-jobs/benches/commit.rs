//! Plain commit of a fully written overlay into its base (qcow2 images made
//! by qemu-img, opened with qcow-lite), beside `qemu-img commit -d` of the
//! same chain, in the same run: into a fresh (unallocated) base, with a fresh
//! copy of the chain per iteration, and overwriting an allocated base. Size:
//! `BENCH_COMMIT_MIB` (default 1024).

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use block_graph::Graph;
use block_jobs::{CommitJob, CommitOptions, JobManager};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use serde_json::json;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} not found ({e}): install qemu-utils"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_chain(dir: &Path, mib: u64) {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let size = format!("{mib}M");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &p("base.qcow2"), &size],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &p("base.qcow2"),
            "-F",
            "qcow2",
            &p("top.qcow2"),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            &format!("write -P 0x5a 0 {size}"),
            &p("top.qcow2"),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &p("top.qcow2"),
            "-F",
            "qcow2",
            &p("active.qcow2"),
        ],
    );
}

fn ours_once(dir: &Path) -> Duration {
    let g = Graph::new();
    qcow_lite::register(&g);
    let f = |n: &str| json!({"driver": "file", "filename": dir.join(n)});
    g.add_node(&json!({
        "driver": "qcow2", "node-name": "active", "file": f("active.qcow2"),
        "backing": {
            "driver": "qcow2", "node-name": "top", "read-only": true, "file": f("top.qcow2"),
            "backing": {"driver": "qcow2", "node-name": "base", "read-only": true, "file": f("base.qcow2"), "backing": null}
        }
    }))
    .unwrap();
    let top = g.node("top").unwrap();
    let base = g.node("base").unwrap();
    let m = JobManager::new();
    let t = Instant::now();
    let j = CommitJob::start(&m, &g, &top, &base, CommitOptions::default()).unwrap();
    let o = j.job().wait();
    assert!(o.is_ok(), "commit failed: {o:?}");
    t.elapsed()
}

fn qemu_once(dir: &Path) -> Duration {
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let t = Instant::now();
    run(
        "qemu-img",
        &[
            "commit",
            "-q",
            "-d",
            "-b",
            &p("base.qcow2"),
            &p("top.qcow2"),
        ],
    );
    t.elapsed()
}

/// Copies the chain in `from` to `to` (sparse, synced), untimed.
fn fresh_copy(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for f in ["base.qcow2", "top.qcow2", "active.qcow2"] {
        run(
            "cp",
            &[
                "--sparse=always",
                from.join(f).to_str().unwrap(),
                to.join(f).to_str().unwrap(),
            ],
        );
    }
    // the chain records absolute backing names: point the copies at each other
    let p = |n: &str| to.join(n).to_str().unwrap().to_string();
    for (img, backing) in [("top.qcow2", "base.qcow2"), ("active.qcow2", "top.qcow2")] {
        run(
            "qemu-img",
            &["rebase", "-u", "-b", &p(backing), "-F", "qcow2", &p(img)],
        );
    }
    run("sync", &["-f", &p("top.qcow2")]);
}

fn compare_base_top(dir: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(dir.join("base.qcow2"))
        .arg(dir.join("top.qcow2"))
        .status()
        .unwrap();
    assert!(out.success(), "qemu-img compare base top differs");
}

fn commit(c: &mut Criterion) {
    let mib: u64 = std::env::var("BENCH_COMMIT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir().unwrap();
    make_chain(dir.path(), mib);
    // Fresh base (every cluster allocated by the commit, as `qemu-img commit`
    // of a new overlay does): a fresh copy of the chain per iteration.
    let tmpl = dir.path().join("tmpl");
    std::fs::create_dir_all(&tmpl).unwrap();
    for f in ["base.qcow2", "top.qcow2", "active.qcow2"] {
        std::fs::copy(dir.path().join(f), tmpl.join(f)).unwrap();
    }
    let fresh = dir.path().join("fresh");
    let mut grp = c.benchmark_group(format!("plain_commit_{mib}MiB_fully_written_fresh_base"));
    grp.throughput(Throughput::Bytes(mib << 20));
    grp.sample_size(10);
    grp.warm_up_time(Duration::from_millis(1));
    grp.measurement_time(Duration::from_secs(1));
    grp.bench_function("block_jobs_commit", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    fresh_copy(&tmpl, &fresh);
                    ours_once(&fresh)
                })
                .sum()
        })
    });
    // (absent when a filter skipped the group)
    if fresh.exists() {
        compare_base_top(&fresh);
    }
    grp.bench_function("qemu_img_commit", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    fresh_copy(&tmpl, &fresh);
                    qemu_once(&fresh)
                })
                .sum()
        })
    });
    grp.finish();
    // Overwriting: after the first iteration base is allocated.
    let mut grp = c.benchmark_group(format!("plain_commit_{mib}MiB_fully_written"));
    grp.throughput(Throughput::Bytes(mib << 20));
    grp.sample_size(10);
    grp.warm_up_time(Duration::from_millis(1));
    grp.measurement_time(Duration::from_secs(1));
    grp.bench_function("block_jobs_commit", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| ours_once(dir.path())).sum())
    });
    grp.bench_function("qemu_img_commit", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| qemu_once(dir.path())).sum())
    });
    grp.finish();
    // the committed base reads as the overlay did
    compare_base_top(dir.path());
}

criterion_group!(benches, commit);
criterion_main!(benches);
