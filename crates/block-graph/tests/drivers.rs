//! The simple drivers: file (incl. O_DIRECT, holes, reopen), raw windows,
//! null-co, memory details.

use block_graph::drivers::file::create_file;
use block_graph::drivers::memory::MemoryDriver;
use block_graph::*;
use serde_json::json;

fn r(n: &Node, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    n.read(off, &mut b).unwrap();
    b
}

fn w(n: &Node, off: u64, data: &[u8]) {
    n.write(off, data, WriteFlags::default()).unwrap()
}

#[test]
fn file_holes_zeroes_truncate_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.img");
    create_file(&p, 1 << 20).unwrap();
    let g = Graph::new();
    let f = g
        .add_node(&json!({"driver": "file", "node-name": "f", "filename": p.to_str().unwrap(), "read-only": true}))
        .unwrap();
    assert_eq!(
        f.write(0, b"x", WriteFlags::default()).unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
    let st = f.block_status(0, 1 << 20).unwrap();
    assert_eq!(
        (st.mapping, st.len),
        (Mapping::Zero, 1 << 20),
        "a new sparse file is one hole"
    );
    g.reopen(&[(f.clone(), ReopenOpts { read_only: false })])
        .unwrap();
    w(&f, 65536, &[5u8; 65536]);
    f.flush().unwrap();
    let st = f.block_status(0, 1 << 20).unwrap();
    assert_eq!((st.mapping, st.len), (Mapping::Zero, 65536));
    let st = f.block_status(65536, 1 << 20).unwrap();
    assert_eq!(st.mapping, Mapping::Data);
    assert!(st.len >= 4096 && st.len <= 65536 * 2, "{st:?}");
    f.write_zeroes(
        65536,
        4096,
        ZeroFlags {
            may_unmap: true,
            ..Default::default()
        },
    )
    .unwrap();
    f.write_zeroes(65536 + 4096, 4096, ZeroFlags::default())
        .unwrap();
    assert_eq!(r(&f, 65536, 8192), vec![0u8; 8192]);
    assert_eq!(r(&f, 65536 + 8192, 4), vec![5u8; 4]);
    f.truncate(2 << 20).unwrap();
    assert_eq!(f.len(), 2 << 20);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 << 20);
    // Reading past the old end reads zeros.
    assert_eq!(r(&f, (2 << 20) - 4, 4), vec![0u8; 4]);
    g.reopen(&[(f.clone(), ReopenOpts { read_only: true })])
        .unwrap();
    assert!(f.write(0, b"x", WriteFlags::default()).is_err());
    assert_eq!(r(&f, 65536 + 8192, 4), vec![5u8; 4]);
}

#[test]
fn file_o_direct_pads_and_aligns() {
    // tmpfs has no O_DIRECT; use the build directory, which is on a real file system.
    let base = std::env::var("CARGO_TARGET_TMPDIR")
        .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    let dir = tempfile::tempdir_in(base).unwrap();
    let p = dir.path().join("direct.img");
    create_file(&p, 1 << 20).unwrap();
    let g = Graph::new();
    let res = g.add_node(&json!({"driver": "file", "node-name": "d", "filename": p.to_str().unwrap(), "cache": {"direct": true}}));
    let f = match res {
        Ok(f) => f,
        Err(e) => {
            // The only acceptable failure is a clear "not supported" naming the option.
            assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
            assert!(e.to_string().contains("cache.direct"), "{e}");
            panic!("O_DIRECT is not supported where CARGO_TARGET_TMPDIR lives ({e}); run on a disk-backed file system");
        }
    };
    assert_eq!(f.request_alignment(), 4096);
    w(&f, 4095, b"abc");
    w(&f, 100_000, &[9u8; 10_000]);
    f.flush().unwrap();
    assert_eq!(r(&f, 4094, 5), [0, b'a', b'b', b'c', 0]);
    assert_eq!(r(&f, 99_999, 10_002)[1..10_001], vec![9u8; 10_000][..]);
    let raw = std::fs::read(&p).unwrap();
    assert_eq!(&raw[4095..4098], b"abc");
    let e = g
        .add_node(&json!({"driver": "file", "filename": p.to_str().unwrap(), "cache": {"direct": true, "bogus": 1}}))
        .unwrap_err();
    assert!(e.to_string().contains("'bogus'"), "{e}");
}

#[test]
fn raw_window_and_null() {
    let g = Graph::new();
    let m = g
        .add_node(&json!({"driver": "memory", "node-name": "m", "size": 65536}))
        .unwrap();
    let raw = g
        .add_node(
            &json!({"driver": "raw", "node-name": "r", "file": "m", "offset": 4096, "size": 8192}),
        )
        .unwrap();
    assert_eq!(raw.len(), 8192);
    w(&raw, 0, b"window");
    assert_eq!(r(&m, 4096, 6), b"window");
    assert_eq!(
        raw.read(8190, &mut [0u8; 4]).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    let st = raw.block_status(10, 100).unwrap();
    assert_eq!(
        st.mapping,
        Mapping::Child {
            role: Role::File,
            offset: 4106
        }
    );
    assert_eq!(raw.truncate(1).unwrap_err().kind(), ErrorKind::NotSupported);
    let e = g.add_node(&json!({"driver": "raw", "file": {"driver": "memory", "size": 100}, "offset": 50, "size": 51})).unwrap_err();
    assert!(e.to_string().contains("beyond the end"), "{e}");
    let n = g
        .add_node(&json!({"driver": "null-co", "node-name": "n"}))
        .unwrap();
    assert_eq!(n.len(), 1 << 30);
    w(&n, 0, b"dropped");
    assert_eq!(r(&n, 0, 7), vec![0u8; 7]);
    assert_eq!(n.block_status(0, 4096).unwrap().mapping, Mapping::Zero);
}

#[test]
fn memory_block_status_make_empty_truncate() {
    let g = Graph::new();
    let base = g
        .add_node(
            &json!({"driver": "memory", "node-name": "b", "size": 1 << 20, "cluster-size": 4096}),
        )
        .unwrap();
    w(&base, 0, &[1u8; 100]);
    let top = g
        .add_node(
            &json!({"driver": "memory", "node-name": "t", "backing": "b", "cluster-size": 4096}),
        )
        .unwrap();
    assert_eq!(top.len(), 1 << 20, "size defaults to the backing's");
    w(&top, 8192, &[2u8; 8192]);
    top.write_zeroes(16384, 4096, ZeroFlags::default()).unwrap();
    let st = |o, l| {
        let s = top.block_status(o, l).unwrap();
        (s.mapping, s.len)
    };
    assert_eq!(st(0, 1 << 20), (Mapping::Unallocated, 8192));
    assert_eq!(st(8192, 1 << 20), (Mapping::Data, 8192));
    assert_eq!(st(16384, 1 << 20), (Mapping::Zero, 4096));
    assert_eq!(
        st(20480, 1 << 20),
        (Mapping::Unallocated, (1 << 20) - 20480)
    );
    assert_eq!(st(100, 50), (Mapping::Unallocated, 50));
    // Discard over the backing leaves zeros (not the backing's data).
    top.discard(0, 4096).unwrap();
    assert_eq!(r(&top, 0, 100), vec![0u8; 100]);
    assert_eq!(st(0, 4096), (Mapping::Zero, 4096));
    // make_empty: everything comes from the backing again; cost follows allocation.
    let md = top.driver_as::<MemoryDriver>().unwrap();
    assert!(top.supports_make_empty());
    assert!(md.supports_make_empty());
    assert_eq!(md.allocated_clusters(), 4);
    top.make_empty().unwrap();
    assert_eq!(md.allocated_clusters(), 0);
    assert_eq!(r(&top, 0, 100), vec![1u8; 100]);
    // Truncate shrink then grow: the regrown area reads zeros, not backing data.
    w(&top, 0, &[3u8; 10]);
    top.truncate(5).unwrap();
    top.truncate(1 << 20).unwrap();
    assert_eq!(r(&top, 0, 12), [3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r(&top, 4096, 4), vec![0u8; 4]);
    // A 1 TiB memory node is cheap.
    let big = g
        .add_node(&json!({"driver": "memory", "node-name": "big", "size": 1u64 << 40}))
        .unwrap();
    w(&big, (1u64 << 40) - 10, b"end");
    big.make_empty().unwrap();
    assert_eq!(big.block_status(0, 1 << 40).unwrap().len, 1 << 40);
}

#[test]
fn memory_make_empty_reuses_buffers_without_leaking_old_data() {
    let g = Graph::new();
    let base = g
        .add_node(
            &json!({"driver": "memory", "node-name": "b", "size": 1 << 20, "cluster-size": 4096}),
        )
        .unwrap();
    w(&base, 0, &[7u8; 1 << 20]);
    let top = g
        .add_node(
            &json!({"driver": "memory", "node-name": "t", "backing": "b", "cluster-size": 4096}),
        )
        .unwrap();
    let plain = g
        .add_node(
            &json!({"driver": "memory", "node-name": "p", "size": 1 << 20, "cluster-size": 4096}),
        )
        .unwrap();
    for n in [&top, &plain] {
        w(n, 0, &[0xeeu8; 64 * 4096]);
        let md = n.driver_as::<MemoryDriver>().unwrap();
        n.make_empty().unwrap();
        assert_eq!(md.allocated_clusters(), 0);
        assert_eq!(md.pooled_bytes(), 64 * 4096, "dropped buffers are kept");
        // Partial writes into recycled buffers: the rest of the cluster is
        // the backing's data (top) or zeros (plain), never the old 0xee.
        w(n, 10, b"abc");
        w(n, 4096 + 4000, &[1u8; 200]);
        let rest = if std::sync::Arc::ptr_eq(n, &top) {
            7u8
        } else {
            0u8
        };
        let got = r(n, 0, 3 * 4096);
        let mut want = vec![rest; 3 * 4096];
        want[10..13].copy_from_slice(b"abc");
        want[4096 + 4000..4096 + 4200].fill(1);
        assert_eq!(got, want);
        // A full-cluster write and write-zeroes over recycled buffers.
        w(n, 8192, &[2u8; 4096]);
        n.write_zeroes(16384 + 100, 50, ZeroFlags::default())
            .unwrap();
        assert_eq!(r(n, 8192, 4096), vec![2u8; 4096]);
        let z = r(n, 16384, 4096);
        assert!(z[..100].iter().all(|&b| b == rest) && z[100..150].iter().all(|&b| b == 0));
        assert!(z[150..].iter().all(|&b| b == rest));
        assert!(
            md.pooled_bytes() < 64 * 4096,
            "writes took buffers from the pool"
        );
        // Truncate recycles too; the regrown area reads zeros.
        n.truncate(4096).unwrap();
        n.truncate(1 << 20).unwrap();
        assert_eq!(r(n, 4096, 8192), vec![0u8; 8192]);
    }
}

#[test]
fn memory_make_empty_beyond_the_pool_bound() {
    use block_graph::drivers::memory::FREE_POOL_BYTES;
    let cs = 16u64 << 20;
    let g = Graph::new();
    let n = g
        .add_node(
            &json!({"driver": "memory", "node-name": "m", "size": 6 * cs, "cluster-size": cs}),
        )
        .unwrap();
    let data = vec![0x3cu8; cs as usize];
    for i in 0..6 {
        w(&n, i * cs, &data);
    }
    let md = n.driver_as::<MemoryDriver>().unwrap();
    n.make_empty().unwrap();
    assert_eq!(md.allocated_clusters(), 0);
    assert_eq!(
        md.pooled_bytes(),
        FREE_POOL_BYTES,
        "the rest went to the free thread"
    );
    assert_eq!(r(&n, 5 * cs + 7, 4), vec![0u8; 4]);
    w(&n, cs, b"x");
    assert_eq!(r(&n, cs, 2), [b'x', 0]);
}

#[test]
fn reading_past_a_shorter_backing_reads_zeros() {
    let g = Graph::new();
    let base = g
        .add_node(&json!({"driver": "memory", "node-name": "b", "size": 4096}))
        .unwrap();
    w(&base, 0, &[7u8; 4096]);
    let top = g
        .add_node(&json!({"driver": "memory", "node-name": "t", "backing": "b", "size": 16384, "cluster-size": 8192}))
        .unwrap();
    let got = r(&top, 4000, 200);
    assert_eq!(&got[..96], &[7u8; 96][..]);
    assert_eq!(&got[96..], &[0u8; 104][..]);
    // A partial write into the cluster straddling the backing's end copies what exists.
    w(&top, 5000, b"x");
    let got = r(&top, 0, 8192);
    assert_eq!(&got[..4096], &[7u8; 4096][..]);
    assert_eq!(got[5000], b'x');
    assert!(got[4096..5000].iter().all(|&b| b == 0));
}
