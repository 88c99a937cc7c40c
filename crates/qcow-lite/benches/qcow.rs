#![allow(missing_docs)] // criterion_group! generates undocumented items
//! qcow-lite benchmarks: make_empty cost (1 TiB vs 1 GiB), 64 KiB sequential
//! writes into fresh and allocated clusters, 4 KiB random writes, 64 KiB
//! reads, and metadata reads by pread vs memmap2. Beside them, the same
//! workloads through `qemu-img bench` on the same file system, printed in the
//! same run. Files live under `QCOW_BENCH_DIR` (default: the target dir).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qcow_lite::{CreateOptions, MemStorage, Qcow2, Rng};
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CS: u64 = 65536;

fn bench_dir() -> PathBuf {
    let d = std::env::var("QCOW_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target-bench-qcow")
        });
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn new_file(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap()
}

fn create_file_image(path: &Path, size: u64) -> Qcow2<File> {
    Qcow2::create(
        new_file(path),
        &CreateOptions {
            size,
            cluster_size: CS,
            ..Default::default()
        },
    )
    .unwrap()
}

fn fill_10_clusters<S: qcow_lite::Storage>(img: &Qcow2<S>, size: u64) {
    let data = vec![0x5au8; CS as usize];
    for i in 0..10u64 {
        // Spread over the disk: 10 different L2 tables on the 1 TiB image.
        let off = (size / 10) * i / CS * CS;
        img.write(off, &data, None).unwrap();
    }
    img.flush().unwrap();
}

fn make_empty(c: &mut Criterion) {
    let mut g = c.benchmark_group("make_empty_10_clusters");
    g.measurement_time(Duration::from_secs(4)).sample_size(30);
    let dir = bench_dir();
    for (name, size) in [("1GiB", 1u64 << 30), ("1TiB", 1u64 << 40)] {
        let img = create_file_image(&dir.join(format!("me-{name}.qcow2")), size);
        g.bench_function(format!("file/{name}"), |b| {
            b.iter_batched(
                || fill_10_clusters(&img, size),
                |_| img.make_empty().unwrap(),
                BatchSize::PerIteration,
            )
        });
        let mem = Qcow2::create(
            Arc::new(MemStorage::new()),
            &CreateOptions {
                size,
                cluster_size: CS,
                ..Default::default()
            },
        )
        .unwrap();
        g.bench_function(format!("mem/{name}"), |b| {
            b.iter_batched(
                || fill_10_clusters(&mem, size),
                |_| mem.make_empty().unwrap(),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// Number of 64 KiB writes per iteration batch in the write benches.
const SEQ_CLUSTERS: u64 = 1024; // 64 MiB

fn writes(c: &mut Criterion) {
    let dir = bench_dir();
    let mut g = c.benchmark_group("write");
    g.measurement_time(Duration::from_secs(5)).sample_size(10);
    let data = vec![0xa5u8; CS as usize];
    g.throughput(Throughput::Bytes(SEQ_CLUSTERS * CS));
    g.bench_function("seq_64k_fresh", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let img = create_file_image(&dir.join("seq-fresh.qcow2"), SEQ_CLUSTERS * CS);
                let t = Instant::now();
                for i in 0..SEQ_CLUSTERS {
                    img.write(i * CS, &data, None).unwrap();
                }
                total += t.elapsed();
                // Like `qemu-img bench` (no flush at the end), the flush is
                // not timed.
                img.flush().unwrap();
            }
            total
        })
    });
    let img = create_file_image(&dir.join("seq-alloc.qcow2"), SEQ_CLUSTERS * CS);
    for i in 0..SEQ_CLUSTERS {
        img.write(i * CS, &data, None).unwrap();
    }
    img.flush().unwrap();
    g.bench_function("seq_64k_allocated", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                for i in 0..SEQ_CLUSTERS {
                    img.write(i * CS, &data, None).unwrap();
                }
                total += t.elapsed();
                img.flush().unwrap();
            }
            total
        })
    });
    let n4k = 4096u64;
    g.throughput(Throughput::Bytes(n4k * 4096));
    let small = vec![0x3cu8; 4096];
    let mut rng = Rng::new(7);
    g.bench_function("rand_4k_allocated", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                for _ in 0..n4k {
                    let off = rng.below(SEQ_CLUSTERS * CS / 4096) * 4096;
                    img.write(off, &small, None).unwrap();
                }
                total += t.elapsed();
                img.flush().unwrap();
            }
            total
        })
    });
    g.throughput(Throughput::Bytes(SEQ_CLUSTERS * CS));
    let mut buf = vec![0u8; CS as usize];
    g.bench_function("read_64k_allocated", |b| {
        b.iter(|| {
            for i in 0..SEQ_CLUSTERS {
                img.read(i * CS, &mut buf, None).unwrap();
            }
            black_box(&buf);
        })
    });
    img.close().unwrap();
    g.finish();
}

/// Metadata reads: one 64 KiB table out of 64, by pread or from a memmap2 map.
fn metadata_io(c: &mut Criterion) {
    let dir = bench_dir();
    let path = dir.join("meta.bin");
    let f = new_file(&path);
    f.write_all_at(&vec![1u8; 64 * CS as usize], 0).unwrap();
    f.sync_all().unwrap();
    let mut g = c.benchmark_group("metadata_table_read");
    g.measurement_time(Duration::from_secs(3));
    let mut buf = vec![0u8; CS as usize];
    let mut i = 0u64;
    g.bench_function("pread", |b| {
        b.iter(|| {
            i = (i + 17) % 64;
            f.read_exact_at(&mut buf, i * CS).unwrap();
            black_box(&buf);
        })
    });
    // SAFETY: the file is private to this benchmark and not resized while mapped.
    let map = unsafe { memmap2::Mmap::map(&f).unwrap() };
    g.bench_function("memmap2", |b| {
        b.iter(|| {
            i = (i + 17) % 64;
            let s = (i * CS) as usize;
            buf.copy_from_slice(&map[s..s + CS as usize]);
            black_box(&buf);
        })
    });
    g.finish();
    metadata_miss_e2e(c, &dir);
}

/// A read-only file storage whose whole-cluster reads at cluster offsets
/// (the engine's L2 table and refcount block reads) are copies from a
/// memmap2 map; other reads (guest data) stay positional.
struct MappedTables {
    file: File,
    map: memmap2::Mmap,
}

impl qcow_lite::Storage for MappedTables {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if buf.len() as u64 == CS && offset % CS == 0 && end <= self.map.len() as u64 {
            buf.copy_from_slice(&self.map[offset as usize..end as usize]);
            return Ok(());
        }
        qcow_lite::Storage::read_at(&self.file, buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only bench storage"))
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, _len: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("read-only bench storage"))
    }
}

/// Number of L2 tables the cache-miss workload spreads its data over.
const MISS_TABLES: u64 = 64;
/// Allocated clusters per L2 table in that workload.
const MISS_CLUSTERS: u64 = 4;

/// End to end: random 4 KiB reads over 64 L2 tables with a 2-table L2 cache
/// (nearly every read misses), table reads by pread or from a memmap2 map.
fn metadata_miss_e2e(c: &mut Criterion, dir: &Path) {
    let path = dir.join("meta-miss.qcow2");
    let per_table = CS / 8 * CS; // guest bytes one L2 table maps
    {
        let img = create_file_image(&path, MISS_TABLES * per_table);
        let data = vec![0x77u8; (MISS_CLUSTERS * CS) as usize];
        for t in 0..MISS_TABLES {
            img.write(t * per_table, &data, None).unwrap();
        }
        img.close().unwrap();
    }
    let opts = qcow_lite::OpenOptions {
        read_only: true,
        l2_cache_tables: 1, // the cache keeps at least 2
        ..Default::default()
    };
    let mut g = c.benchmark_group("metadata_miss_4k_random_read");
    g.measurement_time(Duration::from_secs(3));
    let mut run = |name: &str, read: &mut dyn FnMut(u64, &mut [u8])| {
        let mut rng = Rng::new(11);
        let mut buf = vec![0u8; 4096];
        g.bench_function(name, |b| {
            b.iter(|| {
                let t = rng.below(MISS_TABLES);
                let off = t * per_table + rng.below(MISS_CLUSTERS * CS / 4096) * 4096;
                read(off, &mut buf);
                black_box(&buf);
            })
        });
    };
    let by_pread = Qcow2::open_with(File::open(&path).unwrap(), opts).unwrap();
    run("pread", &mut |off, buf| {
        by_pread.read(off, buf, None).unwrap()
    });
    let f = File::open(&path).unwrap();
    // SAFETY: the image is private to this benchmark, opened read-only and
    // not resized while mapped.
    let map = unsafe { memmap2::Mmap::map(&f).unwrap() };
    let by_map = Qcow2::open_with(MappedTables { file: f, map }, opts).unwrap();
    run("memmap2", &mut |off, buf| {
        by_map.read(off, buf, None).unwrap()
    });
    g.finish();
}

fn qemu_img_bench(args: &[&str]) -> String {
    match Command::new("qemu-img").arg("bench").args(args).output() {
        Ok(o) => {
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.lines()
                .filter(|l| l.starts_with("Run completed"))
                .collect::<Vec<_>>()
                .join(" ")
        }
        Err(e) => panic!("qcow-lite bench needs qemu-img ({e}): install qemu-utils"),
    }
}

/// The same workloads through `qemu-img bench`, printed beside criterion's figures.
fn qemu_side(_c: &mut Criterion) {
    let dir = bench_dir();
    let img = dir.join("qemu-bench.qcow2");
    let p = img.to_str().unwrap();
    let size = (SEQ_CLUSTERS * CS).to_string();
    let n = SEQ_CLUSTERS.to_string();
    let mk = || {
        let o = Command::new("qemu-img")
            .args([
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=65536",
                p,
                &size,
            ])
            .output()
            .expect("qemu-img create (install qemu-utils)");
        assert!(o.status.success());
    };
    println!("\n== qemu-img bench on {} ==", dir.display());
    for cache in ["writeback", "none"] {
        mk();
        let cmd = [
            "-f", "qcow2", "-w", "-t", cache, "-d", "1", "-s", "65536", "-c", &n, p,
        ];
        let t = Instant::now();
        let r = qemu_img_bench(&cmd);
        println!(
            "qemu-img bench {} : {r} (wall {:?}, {:.1} MiB/s) [seq 64k fresh]",
            cmd.join(" "),
            t.elapsed(),
            (SEQ_CLUSTERS * CS) as f64 / 1048576.0 / t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let r = qemu_img_bench(&cmd);
        println!(
            "qemu-img bench {} : {r} ({:.1} MiB/s) [seq 64k allocated]",
            cmd.join(" "),
            (SEQ_CLUSTERS * CS) as f64 / 1048576.0 / t.elapsed().as_secs_f64()
        );
        let cmd4 = [
            "-f", "qcow2", "-w", "-t", cache, "-d", "1", "-s", "4096", "-S", "1052672", "-c",
            "4096", p,
        ];
        let t = Instant::now();
        let r = qemu_img_bench(&cmd4);
        println!(
            "qemu-img bench {} : {r} ({:.1} MiB/s) [4k strided writes, allocated]",
            cmd4.join(" "),
            (4096 * 4096) as f64 / 1048576.0 / t.elapsed().as_secs_f64()
        );
        let cmdr = [
            "-f", "qcow2", "-t", cache, "-d", "1", "-s", "65536", "-c", &n, p,
        ];
        let t = Instant::now();
        let r = qemu_img_bench(&cmdr);
        println!(
            "qemu-img bench {} : {r} ({:.1} MiB/s) [read 64k allocated]",
            cmdr.join(" "),
            (SEQ_CLUSTERS * CS) as f64 / 1048576.0 / t.elapsed().as_secs_f64()
        );
    }
}

criterion_group!(benches, qemu_side, make_empty, writes, metadata_io);
criterion_main!(benches);
