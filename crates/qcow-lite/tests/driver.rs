//! The `qcow2` driver in a block-graph: file child, backing child (from the
//! header, resolved against the image's directory, or given as a node), reads
//! through the generic layer, COW, block status, make_empty, reopen, close.

mod common;

use block_graph::{Graph, Mapping, ReopenOpts, WriteFlags, ZeroFlags};
use common::*;
use qcow_lite::{CreateOptions, Qcow2};
use serde_json::json;
use std::fs::OpenOptions;

fn graph() -> Graph {
    let g = Graph::new();
    qcow_lite::register(&g);
    g
}

fn create(path: &std::path::Path, size: u64, cs: u64, backing: Option<(&str, &str)>) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    Qcow2::create(
        f,
        &CreateOptions {
            size,
            cluster_size: cs,
            backing_file: backing.map(|b| b.0.to_string()),
            backing_format: backing.map(|b| b.1.to_string()),
            ..Default::default()
        },
    )
    .unwrap();
}

#[test]
fn backing_from_header_cow_make_empty_and_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let base = dir.path().join("base.raw");
    let mut base_data = vec![0u8; size as usize];
    for (i, b) in base_data.iter_mut().enumerate() {
        *b = (i / 4096) as u8 | 0x80;
    }
    std::fs::write(&base, &base_data).unwrap();
    let top = dir.path().join("top.qcow2");
    create(&top, size, 65536, Some(("base.raw", "raw")));

    let g = graph();
    let n = g
        .add_node(&json!({"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": top.to_str().unwrap()}}))
        .unwrap();
    assert!(n.backing().is_some(), "backing opened from the header");
    let mut buf = vec![0u8; 8192];
    n.read(65536 * 3 + 100, &mut buf).unwrap();
    assert_eq!(buf, base_data[65536 * 3 + 100..65536 * 3 + 100 + 8192]);
    // A partial-cluster write copies the rest of the cluster from the backing.
    n.write(65536 + 1000, &[0xee; 3000], WriteFlags::default())
        .unwrap();
    let mut model = base_data.clone();
    model[65536 + 1000..65536 + 4000].fill(0xee);
    let mut all = vec![0u8; size as usize];
    n.read(0, &mut all).unwrap();
    assert_eq!(first_diff(&all, &model), None);
    let st = n.block_status(65536, 65536).unwrap();
    assert!(matches!(st.mapping, Mapping::Child { .. }), "{st:?}");
    assert_eq!(
        n.block_status(0, 65536).unwrap().mapping,
        Mapping::Unallocated
    );
    n.write_zeroes(
        131072,
        65536,
        ZeroFlags {
            may_unmap: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        n.block_status(131072, 65536).unwrap().mapping,
        Mapping::Zero
    );
    n.flush().unwrap();
    // make_empty: everything reads from the backing again.
    n.make_empty().unwrap();
    n.read(0, &mut all).unwrap();
    assert_eq!(first_diff(&all, &base_data), None);
    n.write(0, &[1; 512], WriteFlags::FUA).unwrap();
    drop(n);
    g.remove_node("top").unwrap();
    assert_qemu_check_clean(&top);
    model = base_data.clone();
    model[..512].fill(1);
    std::fs::write(dir.path().join("expect.raw"), &model).unwrap();
    assert_qemu_compare(&top, &dir.path().join("expect.raw"));
}

#[test]
fn backing_given_as_node_of_any_driver() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("act.qcow2");
    create(&top, 1 << 20, 4096, None);
    let g = graph();
    let base = g
        .add_node(&json!({"driver": "memory", "node-name": "hidden", "size": 1 << 20}))
        .unwrap();
    base.write(0, &[7u8; 65536], WriteFlags::default()).unwrap();
    let n = g
        .add_node(
            &json!({"driver": "qcow2", "node-name": "active", "backing": "hidden",
            "file": {"driver": "file", "filename": top.to_str().unwrap()}}),
        )
        .unwrap();
    let mut b = vec![0u8; 100];
    n.read(4000, &mut b).unwrap();
    assert_eq!(b, vec![7u8; 100]);
    n.write(4090, &[9u8; 10], WriteFlags::default()).unwrap();
    n.read(4000, &mut b).unwrap();
    let mut want = vec![7u8; 100];
    want[90..100].fill(9);
    assert_eq!(b, want);
    // Discard reads back as zeros even with a backing given only as a node.
    n.discard(8192, 4096 + 100).unwrap();
    let mut z = vec![1u8; 4196];
    n.read(8192, &mut z).unwrap();
    assert_eq!(z, vec![0u8; 4196]);
    // Read-only and back: writes refused, then allowed again.
    g.reopen(&[(n.clone(), ReopenOpts { read_only: true })])
        .unwrap();
    assert!(n.write(0, &[1], WriteFlags::default()).is_err());
    g.reopen(&[(n.clone(), ReopenOpts { read_only: false })])
        .unwrap();
    n.write(0, &[1], WriteFlags::default()).unwrap();
    drop(n);
    g.remove_node("active").unwrap();
    assert_qemu_check_clean(&top);
}

#[test]
fn qemu_image_with_qcow2_backing_through_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.qcow2");
    let top = dir.path().join("t.qcow2");
    let (c, o, e) = qemu_img(&["create", "-f", "qcow2", base.to_str().unwrap(), "2M"]);
    assert_eq!(c, 0, "{o}{e}");
    let (c, o, e) = qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x42 0 1M",
        base.to_str().unwrap(),
    ]);
    assert_eq!(c, 0, "{o}{e}");
    let (c, o, e) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        "2M",
    ]);
    assert_eq!(c, 0, "{o}{e}");
    let (c, o, e) = qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x43 512k 4k",
        top.to_str().unwrap(),
    ]);
    assert_eq!(c, 0, "{o}{e}");
    let g = graph();
    let n = g
        .add_node(
            &json!({"driver": "qcow2", "node-name": "t", "read-only": true,
            "file": {"driver": "file", "filename": top.to_str().unwrap(), "read-only": true}}),
        )
        .unwrap();
    let mut all = vec![0u8; 2 << 20];
    n.read(0, &mut all).unwrap();
    let mut want = vec![0u8; 2 << 20];
    want[..1 << 20].fill(0x42);
    want[512 << 10..(512 << 10) + 4096].fill(0x43);
    assert_eq!(first_diff(&all, &want), None);
    assert_eq!(g.backing_chain(&n).len(), 2);
}

#[test]
fn missing_backing_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("x.qcow2");
    create(&top, 1 << 20, 65536, Some(("nope.raw", "raw")));
    let g = graph();
    let e = g
        .add_node(&json!({"driver": "qcow2", "node-name": "x",
            "file": {"driver": "file", "filename": top.to_str().unwrap()}}))
        .unwrap_err();
    assert!(e.to_string().contains("nope.raw"), "{e}");
    assert!(
        g.node_names().is_empty(),
        "nothing left behind: {:?}",
        g.node_names()
    );
}

/// Many threads writing at the same moment right after a reopen to read-write
/// must all see the writable image (the switch is lazy, at the first write,
/// and a thread that lost the race used to keep the stale read-only image).
#[test]
fn concurrent_writes_right_after_reopen_read_write() {
    let dir = tempfile::tempdir().unwrap();
    let top = dir.path().join("race.qcow2");
    let cs = 65536u64;
    let threads = 8u64;
    create(&top, threads * cs, cs, None);
    let g = graph();
    let n = g
        .add_node(&json!({"driver": "qcow2", "node-name": "race",
            "file": {"driver": "file", "filename": top.to_str().unwrap()}}))
        .unwrap();
    for round in 0..40u8 {
        g.reopen(&[(n.clone(), ReopenOpts { read_only: true })])
            .unwrap();
        g.reopen(&[(n.clone(), ReopenOpts { read_only: false })])
            .unwrap();
        let barrier = std::sync::Barrier::new(threads as usize);
        std::thread::scope(|s| {
            for t in 0..threads {
                let (n, barrier) = (&n, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    n.write(
                        t * cs + 512,
                        &[round ^ t as u8; 4096],
                        WriteFlags::default(),
                    )
                    .unwrap_or_else(|e| panic!("round {round} thread {t}: {e}"));
                });
            }
        });
        for t in 0..threads {
            let mut b = vec![0u8; 4096];
            n.read(t * cs + 512, &mut b).unwrap();
            assert_eq!(b, vec![round ^ t as u8; 4096], "round {round} thread {t}");
        }
    }
    drop(n);
    g.remove_node("race").unwrap();
    assert_qemu_check_clean(&top);
}

/// `Driver::change_backing_file` on a qcow2 node (what a commit job with a
/// `backing_file` option calls) rewrites the header; `qemu-img info` and a
/// new graph read the new name and format back.
#[test]
fn change_backing_file_through_the_driver_is_read_by_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1u64 << 20;
    std::fs::write(dir.path().join("old.raw"), vec![1u8; size as usize]).unwrap();
    std::fs::write(dir.path().join("new.raw"), vec![2u8; size as usize]).unwrap();
    let top = dir.path().join("top.qcow2");
    create(&top, size, 65536, Some(("old.raw", "raw")));
    let g = graph();
    let n = g
        .add_node(&json!({"driver": "qcow2", "node-name": "top",
            "file": {"driver": "file", "filename": top.to_str().unwrap()}}))
        .unwrap();
    n.driver()
        .change_backing_file(&n, Some("new.raw"), Some("raw"))
        .unwrap();
    drop(n);
    g.remove_node("top").unwrap();
    let (c, out, err) = qemu_img(&["info", "--output=json", top.to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["backing-filename"].as_str(), Some("new.raw"), "{out}");
    assert_eq!(v["backing-filename-format"].as_str(), Some("raw"), "{out}");
    assert_qemu_check_clean(&top);
    let n = g
        .add_node(&json!({"driver": "qcow2", "node-name": "top2",
            "file": {"driver": "file", "filename": top.to_str().unwrap()}}))
        .unwrap();
    let mut b = [0u8; 16];
    n.read(4096, &mut b).unwrap();
    assert_eq!(b, [2u8; 16], "reads come from the new backing");
}
