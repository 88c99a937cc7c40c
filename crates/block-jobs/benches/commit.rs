//! Plain commit of a fully written overlay into its base (qcow2 images made
//! by qemu-img, opened with qcow-lite), beside `qemu-img commit -d` of the
//! same chain, in the same run. Size: `BENCH_COMMIT_MIB` (default 1024).

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

fn commit(c: &mut Criterion) {
    let mib: u64 = std::env::var("BENCH_COMMIT_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir().unwrap();
    make_chain(dir.path(), mib);
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
    let out = Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(dir.path().join("base.qcow2"))
        .arg(dir.path().join("top.qcow2"))
        .status()
        .unwrap();
    assert!(out.success(), "qemu-img compare base top differs");
}

criterion_group!(benches, commit);
criterion_main!(benches);
