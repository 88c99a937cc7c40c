//! Copy-before-write costs: rewrites of already-copied clusters with the
//! backup running vs without it, and the checkpoint re-arm on a 1 TiB source.

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::time::{Duration, Instant};

use block_graph::{Backend, Graph, PermPair, WriteFlags};
use block_jobs::{BackupJob, BackupOptions, JobManager};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::json;

const CS: u64 = 65536;
const SIZE: u64 = 64 << 20;

fn graph(size: u64) -> (Graph, Backend) {
    let g = Graph::new();
    let src = g
        .add_node(&json!({"driver": "memory", "node-name": "src", "size": size}))
        .unwrap();
    g.add_node(&json!({"driver": "memory", "node-name": "tgt", "size": size, "backing": "src"}))
        .unwrap();
    let be = g.new_backend(&src, PermPair::READ_WRITE).unwrap();
    (g, be)
}

/// Rewrites every cluster of the disk (64 KiB writes).
fn rewrite_all(be: &Backend, buf: &[u8]) {
    let mut off = 0;
    while off < SIZE {
        be.write(off, buf, WriteFlags::default()).unwrap();
        off += CS;
    }
}

fn rewrites(c: &mut Criterion) {
    let buf = vec![0x5au8; CS as usize];
    let mut grp = c.benchmark_group("rewrite_64MiB_in_64KiB_writes");
    grp.throughput(Throughput::Bytes(SIZE));
    grp.sample_size(20);
    {
        let (_g, be) = graph(SIZE);
        rewrite_all(&be, &buf);
        grp.bench_function("without_backup", |b| b.iter(|| rewrite_all(&be, &buf)));
    }
    {
        let (g, be) = graph(SIZE);
        let m = JobManager::new();
        let src = g.node("src").unwrap();
        let tgt = g.node("tgt").unwrap();
        let bk = BackupJob::start(&m, &g, &src, &tgt, BackupOptions::default()).unwrap();
        rewrite_all(&be, &buf); // every cluster copied once
        assert_eq!(bk.tracker().epoch_copies(), SIZE / CS);
        grp.bench_function("with_backup_sync_none", |b| {
            b.iter(|| rewrite_all(&be, &buf))
        });
        assert_eq!(bk.tracker().epoch_copies(), SIZE / CS, "no copy twice");
        bk.job().cancel(true).unwrap();
        bk.job().wait();
    }
    grp.finish();
}

fn checkpoint(c: &mut Criterion) {
    let size = 1u64 << 40;
    let (g, be) = graph(size);
    let m = JobManager::new();
    let src = g.node("src").unwrap();
    let tgt = g.node("tgt").unwrap();
    let bk = BackupJob::start(&m, &g, &src, &tgt, BackupOptions::default()).unwrap();
    let data = vec![1u8; 512];
    let mut grp = c.benchmark_group("checkpoint_rearm_1TiB");
    grp.bench_function("10_copied_clusters", |b| {
        b.iter_batched(
            || {
                for i in 0..10u64 {
                    be.write(i * (size / 10 / CS * CS), &data, WriteFlags::default())
                        .unwrap();
                }
                assert_eq!(bk.tracker().epoch_copies(), 10);
            },
            |()| bk.checkpoint().unwrap(),
            BatchSize::PerIteration,
        )
    });
    grp.finish();
    // one direct timing for the README, beside criterion's figure
    for i in 0..10u64 {
        be.write(i * (size / 10 / CS * CS), &data, WriteFlags::default())
            .unwrap();
    }
    let t = Instant::now();
    bk.checkpoint().unwrap();
    let d = t.elapsed();
    assert!(d < Duration::from_millis(1), "checkpoint took {d:?}");
    bk.job().cancel(true).unwrap();
    bk.job().wait();
}

criterion_group!(benches, rewrites, checkpoint);
criterion_main!(benches);
