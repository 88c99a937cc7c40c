//! Power-loss tests: thousands of random schedules over the crash-simulating
//! storage. After a crash at a random storage operation (and a random subset
//! of the unflushed writes surviving, torn at 512-byte sectors), reopening
//! repairs the image; every byte reads as either its value at the last
//! completed flush or a value written after it; the image passes our check
//! and `qemu-img check`.
//!
//! `CRASH_SCHEDULES` sets the number of schedules (default 500, about 9 s of
//! CPU in a debug build, to keep the project's CI short; the big runs are
//! `CRASH_SCHEDULES=2000` and more, in release).

mod common;

use common::*;
use qcow_lite::{BackingRead, CrashStorage, CreateOptions, MemStorage, Qcow2, RawBacking, Rng};
use std::sync::Arc;

/// Per byte: the value at the last completed flush and the values written since.
struct Model {
    cur: Vec<u8>,
    durable: Vec<u8>,
    since_flush: Vec<Vec<u8>>,
    touched: Vec<usize>,
    /// A make_empty ran since the last flush: the backing's bytes (zeros
    /// without one) are possible anywhere.
    emptied: bool,
    base: Vec<u8>,
}

impl Model {
    fn new(base: Vec<u8>) -> Self {
        let size = base.len();
        Model {
            cur: base.clone(),
            durable: base.clone(),
            since_flush: vec![Vec::new(); size],
            touched: Vec::new(),
            emptied: false,
            base,
        }
    }
    /// Record the current values of `range` as possible after a crash.
    fn record(&mut self, range: std::ops::Range<usize>) {
        for i in range {
            let v = &mut self.since_flush[i];
            if v.is_empty() {
                self.touched.push(i);
            }
            if !v.contains(&self.cur[i]) {
                v.push(self.cur[i]);
            }
        }
    }
    fn flushed(&mut self) {
        self.durable.copy_from_slice(&self.cur);
        for &i in &self.touched {
            self.since_flush[i].clear();
        }
        self.touched.clear();
        self.emptied = false;
    }
    fn allowed(&self, i: usize, v: u8) -> bool {
        v == self.durable[i]
            || (self.emptied && v == self.base[i])
            || self.since_flush[i].contains(&v)
    }
}

fn op_range(op: &Op) -> std::ops::Range<usize> {
    match *op {
        Op::Write { off, len, .. } | Op::Zero { off, len, .. } | Op::Discard { off, len } => {
            off as usize..(off + len) as usize
        }
        Op::Flush => 0..0,
    }
}

fn run_schedule(seed: u64, qemu_check: bool) {
    let mut rng = Rng::new(seed);
    let cs = [512u64, 1024, 4096][rng.below(3) as usize];
    let size = cs * (32 + rng.below(64));
    let lazy = rng.below(2) == 0;
    // Half of the schedules run over a raw backing file (copy-on-write from it).
    let with_backing = rng.below(2) == 0;
    let base: Vec<u8> = if with_backing {
        (0..size).map(|i| (i / 512) as u8 | 0x80).collect()
    } else {
        vec![0; size as usize]
    };
    let backing_store = RawBacking(MemStorage::from_vec(base.clone()));
    let backing: Option<&dyn BackingRead> = if with_backing {
        Some(&backing_store)
    } else {
        None
    };
    let st = Arc::new(CrashStorage::new(Vec::new()));
    let img = Qcow2::create(
        st.clone(),
        &CreateOptions {
            size,
            cluster_size: cs,
            lazy_refcounts: lazy,
            backing_file: with_backing.then(|| "base.raw".to_string()),
            backing_format: with_backing.then(|| "raw".to_string()),
            ..Default::default()
        },
    )
    .unwrap();
    let mut model = Model::new(base.clone());
    // Half of the schedules lower make_empty's quarantine bound to a few
    // clusters and empty more often, so that make_empty frees the clusters
    // of earlier rounds after a durable L1 write (no flush) many times.
    let small_quarantine = rng.below(2) == 0;
    if small_quarantine {
        img.set_make_empty_quarantine_max(rng.below(8));
    }
    let empty_one_in = if small_quarantine { 6 } else { 25 };
    st.fail_after(Some(rng.below(300)));
    let nops = 5 + rng.below(40);
    for _ in 0..nops {
        let r = if rng.below(empty_one_in) == 0 {
            model.cur.copy_from_slice(&model.base);
            model.emptied = true;
            img.make_empty()
        } else {
            let op = random_op(&mut rng, size, cs);
            model_apply(&mut model.cur, &op, cs);
            model.record(op_range(&op));
            let r = image_apply(&img, &op, backing);
            if r.is_ok() && matches!(op, Op::Flush) {
                model.flushed();
            }
            r
        };
        if r.is_err() {
            break;
        }
    }
    drop(img);
    let keep = rng.below(3) != 0;
    let bytes = if keep {
        st.crash(Some(&mut rng))
    } else {
        st.crash(None)
    };
    let ctx = format!(
        "seed {seed} cs {cs} size {size} lazy {lazy} backing {with_backing} \
         small quarantine {small_quarantine}"
    );
    let mem = Arc::new(MemStorage::from_vec(bytes));
    let img = Qcow2::open(mem.clone(), false).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
    let got = read_all(&img, backing);
    for (i, &v) in got.iter().enumerate() {
        if !model.allowed(i, v) {
            panic!(
                "{ctx}: byte {i} reads {v:#x}; flushed value {:#x}, later writes {:?}",
                model.durable[i], model.since_flush[i]
            );
        }
    }
    let report = img.check().unwrap();
    assert!(
        report.is_clean(),
        "{ctx}: our check after repair: {report:?}"
    );
    img.close().unwrap();
    drop(img);
    if qemu_check {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.qcow2");
        std::fs::write(&p, mem.to_vec()).unwrap();
        std::fs::write(dir.path().join("base.raw"), &base).unwrap();
        assert_qemu_check_clean(&p);
    }
}

#[test]
fn crash_schedules() {
    let n: u64 = std::env::var("CRASH_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    for seed in 0..n {
        run_schedule(seed, seed % 50 == 0);
    }
}
