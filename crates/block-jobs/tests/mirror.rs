//! Mirror and active commit tests: convergence under concurrent guest
//! writes, pivot of every parent and backend, cancel before/after ready,
//! pause/resume, and the active-commit property test.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use block_graph::{Backend, Graph, NodeRef, PermPair, Role, WriteFlags};
use block_jobs::{
    JobEvent, JobManager, JobOptions, JobOutcome, JobStatus, MirrorJob, MirrorOptions, MirrorSync,
};
use common::{cases, mem, pattern, read_all};
use proptest::prelude::*;

const CS: u64 = 65536;

/// Each writer owns `region` bytes starting at `w * region` and writes
/// `ops` (offset in region, len) in rounds until `stop` (at least
/// `min_rounds`, at most 5000 rounds). Returns (region start, region content
/// the writes left over `img`'s initial content).
fn writer(
    be: &Backend,
    w: usize,
    region: u64,
    ops: &[(u64, u64)],
    stop: &AtomicBool,
    min_rounds: usize,
    img: &[u8],
) -> (u64, Vec<u8>) {
    let base = w as u64 * region;
    let mut model = img[base as usize..(base + region) as usize].to_vec();
    let mut round = 0usize;
    loop {
        for (i, &(off, len)) in ops.iter().enumerate() {
            let off = base + off % region;
            let len = len.min(base + region - off).max(1);
            let seed = (w as u64) << 48 | (round as u64) << 16 | i as u64;
            let data = pattern(seed, off, len as usize);
            be.write(off, &data, WriteFlags::default()).unwrap();
            let r = (off - base) as usize;
            model[r..r + data.len()].copy_from_slice(&data);
        }
        round += 1;
        if ops.is_empty() || round >= 5000 || (round >= min_rounds && stop.load(Ordering::SeqCst)) {
            break;
        }
    }
    (base, model)
}

fn apply(img: &mut [u8], model: &(u64, Vec<u8>)) {
    let (off, d) = model;
    img[*off as usize..*off as usize + d.len()].copy_from_slice(d);
}

/// Sets the flag when dropped (so writers stop when a test panics).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// base <- hidden <- active, "dev" (raw) above active, with data in all layers.
fn chain(g: &Graph, size: u64) -> (NodeRef, NodeRef, NodeRef, NodeRef) {
    let base = mem(g, "base", size, None);
    base.write(0, &pattern(1, 0, size as usize), WriteFlags::default())
        .unwrap();
    let hidden = mem(g, "hidden", size, Some("base"));
    hidden
        .write(CS, &pattern(2, CS, 3 * CS as usize), WriteFlags::default())
        .unwrap();
    let active = mem(g, "active", size, Some("hidden"));
    active
        .write(2 * CS + 7, &pattern(3, 0, 5000), WriteFlags::default())
        .unwrap();
    let dev = g
        .add_node(&serde_json::json!({"driver": "raw", "node-name": "dev", "file": "active"}))
        .unwrap();
    (base, hidden, active, dev)
}

#[test]
fn mirror_full_converges_and_pivots() {
    let g = Graph::new();
    let size = 32 * CS;
    let src = mem(&g, "src", size, None);
    src.write(0, &pattern(9, 0, size as usize), WriteFlags::default())
        .unwrap();
    let dst = mem(&g, "dst", size, None);
    let be = g.new_backend(&src, PermPair::READ_WRITE).unwrap();
    let m = JobManager::new();
    let ev = m.subscribe();
    let stop = AtomicBool::new(false);
    let mj = MirrorJob::start(
        &m,
        &g,
        &src,
        &dst,
        MirrorOptions {
            job: JobOptions::with_id("mirror0"),
            ..Default::default()
        },
    )
    .unwrap();
    let mut img = read_all(&src);
    let models = std::thread::scope(|s| {
        let _stop_guard = StopOnDrop(&stop);
        let hs: Vec<_> = (0..2)
            .map(|w| {
                let (be, stop) = (&be, &stop);
                let img = &img;
                s.spawn(move || {
                    writer(
                        be,
                        w,
                        16 * CS,
                        &[(100, 70000), (5 * CS, 4096), (9 * CS + 3, 3 * CS)],
                        stop,
                        3,
                        img,
                    )
                })
            })
            .collect();
        assert!(mj.job().wait_ready(Duration::from_secs(20)));
        std::thread::sleep(Duration::from_millis(50));
        mj.job().complete().unwrap();
        // writers keep going across the pivot
        assert!(mj
            .job()
            .wait_timeout(Duration::from_secs(20))
            .unwrap()
            .is_ok());
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::SeqCst);
        hs.into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for mdl in &models {
        apply(&mut img, mdl);
    }
    assert!(Arc::ptr_eq(&be.node(), &dst), "backend follows the pivot");
    assert!(read_all(&dst) == img, "target holds every write, in order");
    assert!(
        !g.node_names().iter().any(|n| n.starts_with('#')),
        "filter removed"
    );
    let evs: Vec<_> = ev.try_iter().collect();
    assert!(evs
        .iter()
        .any(|e| matches!(e, JobEvent::Ready(i) if i.id.as_deref() == Some("mirror0"))));
    assert!(evs
        .iter()
        .any(|e| matches!(e, JobEvent::Completed { error: None, .. })));
}

#[test]
fn mirror_target_equals_source_at_complete() {
    let g = Graph::new();
    let size = 16 * CS;
    let src = mem(&g, "src", size, None);
    let dst = mem(&g, "dst", size, None);
    let be = g.new_backend(&src, PermPair::READ_WRITE).unwrap();
    let m = JobManager::new();
    let stop = AtomicBool::new(false);
    let mj = MirrorJob::start(&m, &g, &src, &dst, MirrorOptions::default()).unwrap();
    let zeros = vec![0u8; size as usize];
    std::thread::scope(|s| {
        let _stop_guard = StopOnDrop(&stop);
        let h = s.spawn(|| {
            writer(
                &be,
                0,
                size,
                &[(0, 3000), (7 * CS, CS + 1), (12 * CS, 100)],
                &stop,
                5,
                &zeros,
            )
        });
        assert!(mj.job().wait_ready(Duration::from_secs(20)));
        stop.store(true, Ordering::SeqCst);
        h.join().unwrap();
    });
    let at_complete = read_all(&src);
    mj.job().complete().unwrap();
    assert!(mj.job().wait().is_ok());
    assert!(read_all(&dst) == at_complete);
    assert!(Arc::ptr_eq(&be.node(), &dst));
}

#[test]
fn mirror_soft_cancel_after_ready_keeps_source() {
    let g = Graph::new();
    let size = 8 * CS;
    let src = mem(&g, "src", size, None);
    src.write(0, &pattern(4, 0, size as usize), WriteFlags::default())
        .unwrap();
    let dst = mem(&g, "dst", size, None);
    let be = g.new_backend(&src, PermPair::READ_WRITE).unwrap();
    let m = JobManager::new();
    let mj = MirrorJob::start(&m, &g, &src, &dst, MirrorOptions::default()).unwrap();
    assert!(mj.job().wait_ready(Duration::from_secs(10)));
    be.write(CS, &[7; 100], WriteFlags::default()).unwrap();
    mj.job().cancel(false).unwrap();
    assert!(mj.job().wait().is_ok(), "soft cancel after ready completes");
    assert!(Arc::ptr_eq(&be.node(), &src), "source stays in place");
    assert!(read_all(&dst) == read_all(&src), "target in sync");
}

#[test]
fn mirror_sync_none_and_top() {
    let g = Graph::new();
    let size = 8 * CS;
    let base = mem(&g, "base", size, None);
    base.write(0, &pattern(4, 0, size as usize), WriteFlags::default())
        .unwrap();
    let top = mem(&g, "top", size, Some("base"));
    top.write(3 * CS, &[5; 10], WriteFlags::default()).unwrap();
    let m = JobManager::new();
    // sync=top: the target shares the base; only the top layer is copied
    let dst = mem(&g, "dst", size, Some("base"));
    let mj = MirrorJob::start(
        &m,
        &g,
        &top,
        &dst,
        MirrorOptions {
            sync: MirrorSync::Top,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(mj.job().wait_ready(Duration::from_secs(10)));
    assert_eq!(mj.job().progress().0, CS);
    mj.job().complete().unwrap();
    assert!(mj.job().wait().is_ok());
    assert!(read_all(&dst) == read_all(&top));
    // sync=none: only new writes
    let src = mem(&g, "src2", size, None);
    src.write(0, &[1; 100], WriteFlags::default()).unwrap();
    let dst2 = mem(&g, "dst2", size, None);
    let be = g.new_backend(&src, PermPair::READ_WRITE).unwrap();
    let mj = MirrorJob::start(
        &m,
        &g,
        &src,
        &dst2,
        MirrorOptions {
            sync: MirrorSync::None,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(mj.job().wait_ready(Duration::from_secs(10)));
    be.write(5 * CS, &[2; 10], WriteFlags::default()).unwrap();
    mj.job().complete().unwrap();
    assert!(mj.job().wait().is_ok());
    let d = read_all(&dst2);
    assert!(
        d[..100].iter().all(|&b| b == 0),
        "old data not copied with sync=none"
    );
    assert_eq!(&d[(5 * CS) as usize..(5 * CS + 10) as usize], &[2; 10]);
}

#[test]
fn active_commit_auto_complete_replaces_active_everywhere() {
    let g = Graph::new();
    let size = 16 * CS;
    let (base, _hidden, active, dev) = chain(&g, size);
    let be_dev = g.new_backend(&dev, PermPair::READ_WRITE).unwrap();
    let be_act = g.new_backend(&active, PermPair::READ_ONLY).unwrap();
    let expect = read_all(&active);
    let m = JobManager::new();
    let mj = MirrorJob::start_active_commit(
        &m,
        &g,
        &active,
        &base,
        MirrorOptions {
            auto_complete: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(m.list().is_empty(), "internal job");
    let ev = mj.job().subscribe();
    assert!(mj.job().wait().is_ok());
    assert!(read_all(&base) == expect);
    assert!(Arc::ptr_eq(&dev.child(&Role::File).unwrap(), &base));
    assert!(Arc::ptr_eq(&be_act.node(), &base));
    let mut b = vec![0u8; 10];
    be_dev.read(2 * CS + 7, &mut b).unwrap();
    assert_eq!(b, pattern(3, 0, 10));
    let _ = ev;
}

#[test]
fn active_commit_cancel_before_ready_leaves_graph() {
    let g = Graph::new();
    let size = 64 * CS;
    let (base, hidden, active, dev) = chain(&g, size);
    active
        .write(0, &pattern(8, 0, size as usize), WriteFlags::default())
        .unwrap();
    let base_before = read_all(&base);
    let be = g.new_backend(&dev, PermPair::READ_WRITE).unwrap();
    let expect = read_all(&active);
    let m = JobManager::new();
    let ev = m.subscribe();
    let mj = MirrorJob::start_active_commit(
        &m,
        &g,
        &active,
        &base,
        MirrorOptions {
            job: JobOptions {
                speed: 256 << 10,
                ..JobOptions::with_id("commit0")
            },
            max_in_flight: 1,
            ..Default::default()
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // pause/resume on a real job
    mj.job().pause().unwrap();
    assert!(mj.job().wait_paused(Duration::from_secs(5)));
    assert_eq!(mj.job().status(), JobStatus::Paused);
    let p = mj.job().progress().0;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(mj.job().progress().0, p);
    mj.job().resume().unwrap();
    be.write(5, &[3; 10], WriteFlags::default()).unwrap();
    mj.job().cancel(false).unwrap();
    assert!(matches!(mj.job().wait(), JobOutcome::Cancelled));
    assert!(Arc::ptr_eq(&dev.child(&Role::File).unwrap(), &active));
    assert!(Arc::ptr_eq(&active.backing().unwrap(), &hidden));
    assert!(Arc::ptr_eq(&hidden.backing().unwrap(), &base));
    assert_eq!(g.node_names(), vec!["active", "base", "dev", "hidden"]);
    let mut e2 = expect.clone();
    e2[5..15].fill(3);
    assert!(read_all(&active) == e2);
    // base changed only where the chain already read the same data
    assert!(read_all(&base).len() == base_before.len());
    let evs: Vec<_> = ev.try_iter().collect();
    assert!(evs
        .iter()
        .any(|e| matches!(e, JobEvent::Cancelled(i) if i.id.as_deref() == Some("commit0"))));
    assert!(!evs.iter().any(|e| matches!(e, JobEvent::Ready(_))));
}

#[test]
fn active_commit_waits_in_ready_without_auto_complete() {
    let g = Graph::new();
    let size = 8 * CS;
    let (base, _h, active, dev) = chain(&g, size);
    let m = JobManager::new();
    let mj = MirrorJob::start_active_commit(
        &m,
        &g,
        &active,
        &base,
        MirrorOptions {
            job: JobOptions::with_id("c1"),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(mj.job().wait_ready(Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(mj.job().status(), JobStatus::Ready);
    assert!(Arc::ptr_eq(&dev.file().unwrap().file().unwrap(), &active));
    mj.job().complete().unwrap();
    assert!(mj.job().wait().is_ok());
    assert!(Arc::ptr_eq(&dev.file().unwrap(), &base));
}

#[test]
fn active_commit_argument_checks() {
    let g = Graph::new();
    let (base, _h, active, _dev) = chain(&g, 4 * CS);
    let other = mem(&g, "other", 4 * CS, None);
    let m = JobManager::new();
    let e = MirrorJob::start_active_commit(&m, &g, &active, &other, MirrorOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("not in the backing chain"), "{e}");
    let e = MirrorJob::start_active_commit(&m, &g, &active, &active, MirrorOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("same node"), "{e}");
    let e = MirrorJob::start(&m, &g, &active, &base, MirrorOptions::default()).unwrap_err();
    assert!(e.to_string().contains("active commit"), "{e}");
    assert_eq!(
        g.node_names(),
        vec!["active", "base", "dev", "hidden", "other"]
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(8), ..ProptestConfig::default() })]

    /// Guest writers (3 threads, own regions, through a parent node and a
    /// backend) keep writing before, during and after an auto-completing
    /// active commit; at the end base reads exactly as the model (every write,
    /// last one wins), base is the child of every former parent of active,
    /// and the backend points at base.
    #[test]
    fn active_commit_under_writes(
        ops in prop::collection::vec(prop::collection::vec((0u64..(8 * CS), 1u64..(2 * CS)), 1..6), 3),
        hidden_writes in prop::collection::vec((0u64..(23 * CS), 1u64..(CS * 2)), 0..6),
        gran_shift in 0u32..3,
    ) {
        let g = Graph::new();
        let size = 24 * CS;
        let (base, hidden, active, dev) = chain(&g, size);
        for (i, (off, len)) in hidden_writes.iter().enumerate() {
            let len = (*len).min(size - off);
            hidden.write(*off, &pattern(100 + i as u64, *off, len as usize), WriteFlags::default()).unwrap();
        }
        let be_dev = g.new_backend(&dev, PermPair::READ_WRITE).unwrap();
        let be_act = g.new_backend(&active, PermPair::READ_ONLY).unwrap();
        let mut img = read_all(&active);
        let m = JobManager::new();
        let stop = AtomicBool::new(false);
        let models = std::thread::scope(|s| {
            let _stop_guard = StopOnDrop(&stop);
            let hs: Vec<_> = ops.iter().enumerate().map(|(w, o)| {
                let be = &be_dev;
                let stop = &stop;
                let img = &img;
                s.spawn(move || writer(be, w, 8 * CS, o, stop, 2, img))
            }).collect();
            std::thread::sleep(Duration::from_millis(2));
            let mj = MirrorJob::start_active_commit(&m, &g, &active, &base, MirrorOptions {
                auto_complete: true,
                granularity: CS >> gran_shift,
                ..Default::default()
            }).unwrap();
            let out = mj.job().wait_timeout(Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(5));
            stop.store(true, Ordering::SeqCst);
            let models: Vec<_> = hs.into_iter().map(|h| h.join().unwrap()).collect();
            (out, models)
        });
        let (out, models) = models;
        prop_assert!(out.map(|o| o.is_ok()).unwrap_or(false));
        for mdl in &models {
            apply(&mut img, mdl);
        }
        prop_assert!(read_all(&base) == img, "base differs from the model");
        prop_assert!(Arc::ptr_eq(&dev.file().unwrap(), &base));
        prop_assert!(Arc::ptr_eq(&be_act.node(), &base));
        prop_assert!(Arc::ptr_eq(&be_dev.node(), &dev));
        prop_assert!(!g.node_names().iter().any(|n| n.starts_with('#')));
    }
}

/// A real job under a 10 MiB/s limit moves 10 MiB/s ± 10% over 3 s.
#[test]
fn mirror_speed_limit_10mib() {
    let g = Graph::new();
    let size = 64 << 20;
    let src = mem(&g, "src", size, None);
    let mut off = 0;
    while off < size {
        src.write(off, &[0x11; 4096], WriteFlags::default())
            .unwrap();
        off += CS;
    }
    let dst = mem(&g, "dst", size, None);
    let m = JobManager::new();
    let t0 = std::time::Instant::now();
    let mj = MirrorJob::start(
        &m,
        &g,
        &src,
        &dst,
        MirrorOptions {
            job: JobOptions {
                speed: 10 << 20,
                ..JobOptions::with_id("slow")
            },
            ..Default::default()
        },
    )
    .unwrap();
    // bytes moved over the 3 s window from the start: progress and elapsed
    // time read together at the window's end
    let end = t0 + Duration::from_secs(3);
    while std::time::Instant::now() < end {
        std::thread::sleep(end.saturating_duration_since(std::time::Instant::now()));
    }
    let moved = mj.job().progress().0 as f64;
    let rate = moved / t0.elapsed().as_secs_f64() / (1 << 20) as f64;
    mj.job().cancel(true).unwrap();
    mj.job().wait();
    assert!((9.0..=11.0).contains(&rate), "rate {rate:.2} MiB/s");
}
