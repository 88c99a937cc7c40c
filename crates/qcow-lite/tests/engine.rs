//! Engine behaviour: grow (with L1 relocation), check and repair, dirty-bit
//! repair on open, small caches (eviction paths), metadata preallocation,
//! many threads at once.

mod common;

use common::*;
use qcow_lite::{
    CrashStorage, CreateOptions, Mapping, MemStorage, OpenOptions, Preallocation, Qcow2, Rng,
    Storage,
};
use std::fs::OpenOptions as FsOpen;
use std::sync::Arc;

fn file(path: &std::path::Path) -> std::fs::File {
    FsOpen::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

#[test]
fn grow_relocates_l1_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.qcow2");
    let img = Qcow2::create(
        file(&p),
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 512,
            ..Default::default()
        },
    )
    .unwrap();
    img.write(1000, &[3u8; 5000], None).unwrap();
    img.grow(4 << 20).unwrap();
    assert!(img.grow(1 << 20).is_err(), "shrinking is refused");
    assert!(
        img.grow((4 << 20) + 1).is_err(),
        "size not a multiple of 512"
    );
    img.write((4 << 20) - 700, &[4u8; 700], None).unwrap();
    let all = read_all(&img, None);
    let mut want = vec![0u8; 4 << 20];
    want[1000..6000].fill(3);
    want[(4 << 20) - 700..].fill(4);
    assert_eq!(first_diff(&all, &want), None);
    assert!(img.check().unwrap().is_clean());
    img.close().unwrap();
    drop(img);
    assert_qemu_check_clean(&p);
    let (_, out, _) = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(4 << 20));
    std::fs::write(dir.path().join("g.raw"), &want).unwrap();
    assert_qemu_compare(&p, &dir.path().join("g.raw"));
}

fn image_bytes(lazy: bool) -> (Arc<MemStorage>, Qcow2<Arc<MemStorage>>) {
    let st = Arc::new(MemStorage::new());
    let img = Qcow2::create(
        st.clone(),
        &CreateOptions {
            size: 4 << 20,
            cluster_size: 4096,
            lazy_refcounts: lazy,
            ..Default::default()
        },
    )
    .unwrap();
    (st, img)
}

#[test]
fn check_finds_a_leak_and_repair_fixes_it() {
    let (st, img) = image_bytes(false);
    img.write(0, &[1u8; 8192], None).unwrap();
    img.close().unwrap();
    let end = st.len().unwrap();
    drop(img);
    // Give an unreferenced cluster past the end a refcount of 1: a leak.
    let bytes = st.to_vec();
    let h = |o: usize| u64::from_be_bytes(bytes[o..o + 8].try_into().unwrap());
    let rt = h(48) as usize;
    let rb = h(rt) as usize;
    let leak_cluster = (end / 4096) as usize;
    let mut b = bytes.clone();
    b[rb + leak_cluster * 2..rb + leak_cluster * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    b.resize(((leak_cluster + 1) * 4096).max(b.len()), 0);
    let ro = Qcow2::open(MemStorage::from_vec(b.clone()), true).unwrap();
    let r = ro.check().unwrap();
    assert_eq!((r.leaks, r.corruptions), (1, 0), "{r:?}");
    let rw = Qcow2::open(MemStorage::from_vec(b), false).unwrap();
    let before = rw.repair().unwrap();
    assert_eq!(before.leaks, 1);
    let after = rw.check().unwrap();
    assert!(after.is_clean(), "{after:?}");
    let mut buf = vec![0u8; 8192];
    rw.read(0, &mut buf, None).unwrap();
    assert_eq!(buf, vec![1u8; 8192]);
}

#[test]
fn check_finds_a_corruption() {
    let (st, img) = image_bytes(false);
    img.write(0, &[1u8; 4096], None).unwrap();
    img.close().unwrap();
    let l2_host = match img.map(0, 4096).unwrap().0 {
        Mapping::Data { host_offset } => host_offset,
        m => panic!("{m:?}"),
    };
    drop(img);
    let mut b = st.to_vec();
    let h = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let rb = h(&b, h(&b, 48) as usize) as usize;
    let c = (l2_host / 4096) as usize;
    b[rb + c * 2..rb + c * 2 + 2].copy_from_slice(&0u16.to_be_bytes());
    let r = Qcow2::open(MemStorage::from_vec(b.clone()), true)
        .unwrap()
        .check()
        .unwrap();
    assert!(r.corruptions >= 1, "{r:?}");
    // A dirty image is repaired on a read-write open, never refused.
    let d = h(&b, 72) | 1;
    b[72..80].copy_from_slice(&d.to_be_bytes());
    let rw = Qcow2::open(MemStorage::from_vec(b), false).unwrap();
    assert!(rw.check().unwrap().is_clean());
}

#[test]
fn lazy_image_left_dirty_is_repaired_by_us_and_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.qcow2");
    let img = Qcow2::create(
        file(&p),
        &CreateOptions {
            size: 8 << 20,
            cluster_size: 4096,
            lazy_refcounts: true,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..50u64 {
        img.write(i * 40_000, &[i as u8 + 1; 3000], None).unwrap();
    }
    img.flush().unwrap();
    drop(img); // no close: dirty bit set, refcounts stale on disk
    let (c, o, _) = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
    assert_eq!(c, 0);
    assert!(o.contains("\"corrupt\": false"), "{o}");
    let img = Qcow2::open(file(&p), false).unwrap();
    assert!(img.check().unwrap().is_clean());
    for i in 0..50u64 {
        let mut b = vec![0u8; 3000];
        img.read(i * 40_000, &mut b, None).unwrap();
        assert_eq!(b, vec![i as u8 + 1; 3000]);
    }
    img.close().unwrap();
    drop(img);
    assert_qemu_check_clean(&p);
}

#[test]
fn tiny_caches_exercise_eviction() {
    let st = Arc::new(MemStorage::new());
    Qcow2::create(
        st.clone(),
        &CreateOptions {
            size: 16 << 20,
            cluster_size: 512,
            ..Default::default()
        },
    )
    .unwrap();
    let img = Qcow2::open_with(
        st.clone(),
        OpenOptions {
            read_only: false,
            l2_cache_tables: 2,
            refcount_cache_tables: 2,
        },
    )
    .unwrap();
    let mut model = vec![0u8; 16 << 20];
    let mut rng = Rng::new(99);
    for _ in 0..400 {
        let op = random_op(&mut rng, 16 << 20, 512);
        image_apply(&img, &op, None).unwrap();
        model_apply(&mut model, &op, 512);
    }
    assert_eq!(first_diff(&read_all(&img, None), &model), None);
    let r = img.check().unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn metadata_preallocation() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.qcow2");
    let img = Qcow2::create(
        file(&p),
        &CreateOptions {
            size: 2 << 20,
            cluster_size: 65536,
            preallocation: Preallocation::Metadata,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(img.map(0, 2 << 20).unwrap(), (Mapping::Zero, 2 << 20));
    img.write(70000, &[5u8; 100], None).unwrap();
    assert!(matches!(
        img.map(65536, 65536).unwrap().0,
        Mapping::Data { .. }
    ));
    img.close().unwrap();
    drop(img);
    assert_qemu_check_clean(&p);
}

#[test]
fn many_threads_write_and_read_their_own_ranges() {
    let st = Arc::new(MemStorage::new());
    let img = Arc::new(
        Qcow2::create(
            st,
            &CreateOptions {
                size: 64 << 20,
                cluster_size: 4096,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let base = t * (8 << 20);
                let mut rng = Rng::new(t);
                let mut model = vec![0u8; 8 << 20];
                for i in 0..300u64 {
                    let off = rng.below((8 << 20) - 10_000);
                    let len = 1 + rng.below(9000);
                    let v = (i % 250) as u8 + 1;
                    img.write(base + off, &vec![v; len as usize], None).unwrap();
                    model[off as usize..(off + len) as usize].fill(v);
                    if i % 50 == 0 {
                        img.flush().unwrap();
                    }
                }
                let mut got = vec![0u8; 8 << 20];
                img.read(base, &mut got, None).unwrap();
                assert_eq!(first_diff(&got, &model), None, "thread {t}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(img.check().unwrap().is_clean());
}

#[test]
fn create_rejects_bad_arguments() {
    for (size, cs) in [
        (1 << 20, 1000u64),
        (1 << 20, 256),
        (1 << 20, 4 << 20),
        (1000, 65536),
    ] {
        let e = Qcow2::create(
            MemStorage::new(),
            &CreateOptions {
                size,
                cluster_size: cs,
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), qcow_lite::ErrorKind::InvalidArgument, "{e}");
    }
}

#[test]
fn read_only_image_refuses_writes() {
    let st = Arc::new(MemStorage::new());
    Qcow2::create(
        st.clone(),
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let img = Qcow2::open(st, true).unwrap();
    assert_eq!(
        img.write(0, &[1], None).unwrap_err().kind(),
        qcow_lite::ErrorKind::ReadOnly
    );
    assert_eq!(
        img.make_empty().unwrap_err().kind(),
        qcow_lite::ErrorKind::ReadOnly
    );
    assert_eq!(
        img.read(1 << 20, &mut [0u8; 1], None).unwrap_err().kind(),
        qcow_lite::ErrorKind::OutOfRange
    );
}

#[test]
fn set_backing_file_rewrites_the_header_for_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    std::fs::write(dir.path().join("new-base.raw"), vec![9u8; 1 << 20]).unwrap();
    let img = Qcow2::create(
        file(&p),
        &CreateOptions {
            size: 1 << 20,
            backing_file: Some("old.raw".into()),
            backing_format: Some("raw".into()),
            ..Default::default()
        },
    )
    .unwrap();
    img.set_backing_file(Some("new-base.raw"), Some("raw"))
        .unwrap();
    assert_eq!(img.backing_file().as_deref(), Some("new-base.raw"));
    img.close().unwrap();
    drop(img);
    let (c, out, err) = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["backing-filename"].as_str(), Some("new-base.raw"));
    assert_eq!(v["backing-filename-format"].as_str(), Some("raw"));
    assert_qemu_check_clean(&p);
    let img = Qcow2::open(file(&p), false).unwrap();
    img.set_backing_file(None, None).unwrap();
    drop(img);
    let (_, out, _) = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
    assert!(!out.contains("backing-filename"), "{out}");
}

#[test]
fn unknown_extensions_survive_and_autoclear_bits_are_cleared() {
    let st = Arc::new(MemStorage::new());
    let img = Qcow2::create(
        st.clone(),
        &CreateOptions {
            size: 1 << 20,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    drop(img);
    let mut b = st.to_vec();
    // Insert an unknown extension (type 0x12345678, 8 bytes) first in the list.
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    ext.extend_from_slice(&8u32.to_be_bytes());
    ext.extend_from_slice(b"UNKNOWN!");
    let tail: Vec<u8> = b[112..4096 - 16].to_vec();
    b[112..128].copy_from_slice(&ext);
    b[128..4096].copy_from_slice(&tail);
    b[88..96].copy_from_slice(&3u64.to_be_bytes()); // autoclear bits
    let st = Arc::new(MemStorage::from_vec(b));
    let img = Qcow2::open(st.clone(), false).unwrap();
    img.write(0, &[1u8; 10000], None).unwrap();
    img.grow(4 << 20).unwrap(); // rewrites the header
    img.close().unwrap();
    drop(img);
    let out = st.to_vec();
    assert_eq!(&out[112..128], &ext[..], "unknown extension kept in place");
    assert_eq!(
        u64::from_be_bytes(out[88..96].try_into().unwrap()),
        0,
        "autoclear cleared"
    );
    let img = Qcow2::open(st, true).unwrap();
    assert_eq!(img.size(), 4 << 20);
    assert!(img.check().unwrap().is_clean());
}

/// A power loss at any point of `set_backing_file` (every operation count,
/// random subsets of the unflushed sectors kept) leaves the old or the new
/// backing name and format, never a mix, and a clean image.
#[test]
fn set_backing_file_is_crash_safe() {
    let st = Arc::new(MemStorage::new());
    let img = Qcow2::create(
        st.clone(),
        &CreateOptions {
            size: 1 << 20,
            backing_file: Some("old-base.raw".into()),
            backing_format: Some("raw".into()),
            ..Default::default()
        },
    )
    .unwrap();
    img.close().unwrap();
    drop(img);
    let base = st.to_vec();
    let changes: [(Option<&str>, Option<&str>); 3] = [
        (
            Some("a-much-longer-new-backing-file-name.qcow2"),
            Some("qcow2"),
        ),
        (Some("n.raw"), None),
        (None, None),
    ];
    let old = (Some("old-base.raw".to_string()), Some("raw".to_string()));
    let mut rng = Rng::new(7);
    let mut seen_new = 0;
    for (name, fmt) in changes {
        let new = (name.map(String::from), fmt.map(String::from));
        for n in 0..12u64 {
            for _ in 0..20 {
                let cs = Arc::new(CrashStorage::new(base.clone()));
                let img = Qcow2::open(cs.clone(), false).unwrap();
                cs.fail_after(Some(n));
                let done = img.set_backing_file(name, fmt).is_ok();
                drop(img);
                let after = MemStorage::from_vec(cs.crash(Some(&mut rng)));
                let img = Qcow2::open(after, false).unwrap();
                let got = (img.backing_file(), img.backing_format());
                assert!(got == old || got == new, "after {n} ops: {got:?}");
                if done {
                    // Flushed before returning: must be the new one.
                    assert_eq!(got, new, "after {n} ops");
                }
                if got == new {
                    seen_new += 1;
                }
                assert!(img.check().unwrap().is_clean());
            }
        }
    }
    assert!(seen_new > 0);
}
