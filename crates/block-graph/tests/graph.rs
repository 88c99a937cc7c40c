//! Graph rules: names, removal, cycles, bounds, permissions, op blockers,
//! reopen, replace, filters, alignment padding, serialising guards, drains, stats.

use block_graph::drivers::blkdebug::{BlkDebug, IoMask};
use block_graph::*;
use parking_lot::Mutex;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn mem(g: &Graph, name: &str, size: u64) -> NodeRef {
    g.add_node(&json!({"driver": "memory", "node-name": name, "size": size}))
        .unwrap()
}

fn w(n: &Node, off: u64, data: &[u8]) {
    n.write(off, data, WriteFlags::default()).unwrap()
}

fn r(n: &Node, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    n.read(off, &mut b).unwrap();
    b
}

/// A minimal driver written the way other crates would: stores bytes, has a
/// 512-byte alignment and records every request it sees.
struct Recorder {
    data: Mutex<Vec<u8>>,
    log: Log,
}

impl Driver for Recorder {
    fn format_name(&self) -> &str {
        "recorder"
    }
    fn length(&self, _node: &Node) -> Result<u64> {
        Ok(self.data.lock().len() as u64)
    }
    fn read(&self, _node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.log.lock().push(('r', offset, buf.len() as u64));
        let d = self.data.lock();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, _node: &Node, offset: u64, buf: &[u8], _f: WriteFlags) -> Result<()> {
        self.log.lock().push(('w', offset, buf.len() as u64));
        self.data.lock()[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn request_alignment(&self) -> u64 {
        512
    }
}

type Log = Arc<Mutex<Vec<(char, u64, u64)>>>;

fn recorder_graph() -> (Graph, Log) {
    let g = Graph::new();
    let log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    g.register_driver("recorder", move |ctx| {
        let size = ctx.options().require_u64("size")?;
        Ok(Box::new(Recorder {
            data: Mutex::new(vec![0u8; size as usize]),
            log: l2.clone(),
        }))
    });
    (g, log)
}

#[test]
fn generated_names_and_lookup() {
    let g = Graph::new();
    let n = g
        .add_node(&json!({"driver": "null-co", "size": 4096}))
        .unwrap();
    assert!(n.name().starts_with("#block"), "{}", n.name());
    assert!(Arc::ptr_eq(&g.node(n.name()).unwrap(), &n));
    let top = g
        .add_node(&json!({"driver": "raw", "node-name": "top", "file": {"driver": "null-co", "size": 8192}}))
        .unwrap();
    let f = top.file().unwrap();
    assert!(f.name().starts_with("#block") && f.is_implicit());
    assert_eq!(top.len(), 8192);
    assert_eq!(f.parents().len(), 1);
    assert_eq!(g.nodes().len(), 3);
    assert_eq!(g.node("nope").unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(r(&n, 0, 16), vec![0u8; 16]);
}

#[test]
fn remove_node_refused_while_used_and_requests_after_removal_fail() {
    let g = Graph::new();
    let base = mem(&g, "base", 65536);
    let _top = g
        .add_node(&json!({"driver": "memory", "node-name": "top", "backing": "base"}))
        .unwrap();
    let e = g.remove_node("base").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(e.to_string().contains("node 'top' (as 'backing')"), "{e}");
    g.remove_node("top").unwrap();
    assert!(base.parents().is_empty());
    let be = g
        .new_backend_named("disk0", &base, PermPair::READ_WRITE)
        .unwrap();
    assert!(g.has_backend(&base));
    let e = g.remove_node("base").unwrap_err();
    assert!(e.to_string().contains("backend 'disk0'"), "{e}");
    drop(be);
    assert!(!g.has_backend(&base));
    g.remove_node("base").unwrap();
    let mut b = [0u8; 1];
    let e = base.read(0, &mut b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert_eq!(e.node(), Some("base"));
    assert!(e.to_string().contains("removed"), "{e}");
    assert_eq!(
        base.write(0, &[1], WriteFlags::default())
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        g.remove_node("base").unwrap_err().kind(),
        ErrorKind::NotFound
    );
}

#[test]
fn implicit_children_go_with_their_parent_and_cannot_be_removed_alone() {
    let g = Graph::new();
    let top = g
        .add_node(&json!({"driver": "memory", "node-name": "top",
            "backing": {"driver": "memory", "node-name": "hid", "size": 4096}}))
        .unwrap();
    assert!(
        top.backing().unwrap().is_read_only(),
        "backing definitions default to read-only"
    );
    let e = g.remove_node("hid").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("implicitly"), "{e}");
    g.remove_node("top").unwrap();
    assert!(g.node_names().is_empty(), "{:?}", g.node_names());
}

#[test]
fn failed_add_leaves_nothing_behind() {
    let g = Graph::new();
    let e = g
        .add_node(&json!({"driver": "raw", "node-name": "top",
            "file": {"driver": "memory", "node-name": "inner", "size": 4096}, "bogus": 1}))
        .unwrap_err();
    assert!(e.to_string().contains("'bogus'"), "{e}");
    assert!(g.node_names().is_empty(), "{:?}", g.node_names());
    // The name is free again.
    g.add_node(&json!({"driver": "memory", "node-name": "inner", "size": 1}))
        .unwrap();
}

#[test]
fn cycles_are_refused_and_change_nothing() {
    let g = Graph::new();
    let a = mem(&g, "a", 4096);
    let e = g.attach_child(&a, Role::Backing, &a).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(e.to_string().contains("cycle"), "{e}");
    let b = g
        .add_node(&json!({"driver": "memory", "node-name": "b", "backing": "a"}))
        .unwrap();
    let e = g.attach_child(&a, Role::Backing, &b).unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    assert!(a.backing().is_none());
    assert!(Arc::ptr_eq(&b.backing().unwrap(), &a));
    // A driver without backing support refuses a backing child.
    let n = g
        .add_node(&json!({"driver": "null-co", "node-name": "n", "size": 4096}))
        .unwrap();
    assert_eq!(
        g.attach_child(&n, Role::Backing, &a).unwrap_err().kind(),
        ErrorKind::NotSupported
    );
}

#[test]
fn attach_detach_and_chain_depth_cap() {
    let g = Graph::new();
    let base = mem(&g, "base", 4096);
    w(&base, 0, b"base");
    let top = mem(&g, "top", 4096);
    assert_eq!(r(&top, 0, 4), vec![0; 4]);
    g.attach_child(&top, Role::Backing, &base).unwrap();
    assert_eq!(r(&top, 0, 4), b"base");
    let d = g.detach_child(&top, &Role::Backing).unwrap();
    assert!(Arc::ptr_eq(&d, &base));
    assert!(base.parents().is_empty());
    assert_eq!(r(&top, 0, 4), vec![0; 4]);
    // Build a chain up to the cap; one more is refused.
    let mut cur = mem(&g, "c0", 512);
    for i in 1..MAX_BACKING_DEPTH {
        let n = mem(&g, &format!("c{i}"), 512);
        g.attach_child(&n, Role::Backing, &cur).unwrap();
        cur = n;
    }
    assert_eq!(g.backing_chain(&cur).len(), MAX_BACKING_DEPTH);
    let extra = mem(&g, "extra", 512);
    let e = g.attach_child(&extra, Role::Backing, &cur).unwrap_err();
    assert!(e.to_string().contains("deeper"), "{e}");
    // Nested definitions deeper than the cap are refused too.
    let mut def = json!({"driver": "memory", "size": 512});
    for _ in 0..MAX_BACKING_DEPTH + 1 {
        def = json!({"driver": "memory", "backing": def});
    }
    let before = g.node_names().len();
    assert_eq!(
        g.add_node(&def).unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    assert_eq!(g.node_names().len(), before);
}

#[test]
fn out_of_range_requests_name_node_offset_length_size() {
    let g = Graph::new();
    let n = mem(&g, "disk", 4096);
    let mut b = [0u8; 2];
    let e = n.read(4095, &mut b).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OutOfRange);
    let s = e.to_string();
    assert!(
        s.contains("'disk'") && s.contains("4095") && s.contains("length 2") && s.contains("4096"),
        "{s}"
    );
    assert_eq!(
        n.write(u64::MAX, &b, WriteFlags::default())
            .unwrap_err()
            .kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        n.discard(4000, 100).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        n.block_status(4096, 1).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    assert_eq!(
        n.stats().write.ops,
        0,
        "refused requests never reach the driver"
    );
}

#[test]
fn read_only_nodes_refuse_writes() {
    let g = Graph::new();
    let n = g
        .add_node(&json!({"driver": "memory", "node-name": "ro", "size": 4096, "read-only": true}))
        .unwrap();
    assert!(n.is_read_only());
    for e in [
        n.write(0, &[1], WriteFlags::default()).unwrap_err(),
        n.discard(0, 512).unwrap_err(),
        n.write_zeroes(0, 512, ZeroFlags::default()).unwrap_err(),
        n.truncate(8192).unwrap_err(),
        n.make_empty().unwrap_err(),
    ] {
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert_eq!(e.node(), Some("ro"));
    }
    assert_eq!(r(&n, 0, 4), vec![0; 4]);
}

#[test]
fn op_blockers() {
    let g = Graph::new();
    let n = mem(&g, "n", 4096);
    n.check_op(BlockOp::CommitSource).unwrap();
    let guard = n.block_all("node is used by replication");
    let e = n.check_op(BlockOp::CommitSource).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert!(e.to_string().contains("node is used by replication"), "{e}");
    guard.unblock(BlockOp::DataplaneStart);
    n.check_op(BlockOp::DataplaneStart).unwrap();
    let one = n.block_op(BlockOp::Stream, "streaming");
    drop(guard);
    n.check_op(BlockOp::CommitSource).unwrap();
    assert!(n
        .check_op(BlockOp::Stream)
        .unwrap_err()
        .to_string()
        .contains("streaming"));
    drop(one);
    for op in BlockOp::ALL {
        n.check_op(op).unwrap();
    }
    // blockdev-del respects the drive-del blocker.
    let _b = n.block_op(BlockOp::DriveDel, "in use by a job");
    assert_eq!(g.remove_node("n").unwrap_err().kind(), ErrorKind::Busy);
}

#[test]
fn blocked_resize_refuses_truncate() {
    let g = Graph::new();
    let n = mem(&g, "n", 4096);
    w(&n, 0, b"keep");
    let guard = n.block_op(BlockOp::Resize, "resize blocked by replication");
    let e = n.truncate(8192).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Busy);
    assert_eq!(e.node(), Some("n"));
    assert!(
        e.to_string().contains("resize blocked by replication"),
        "{e}"
    );
    assert_eq!(n.len(), 4096, "a refused truncate changes nothing");
    // Also through a backend, and with block_all.
    let be = g.new_backend(&n, PermPair::READ_WRITE).unwrap();
    assert_eq!(be.truncate(2048).unwrap_err().kind(), ErrorKind::Busy);
    drop(guard);
    let all = n.block_all("everything blocked");
    assert!(n
        .truncate(2048)
        .unwrap_err()
        .to_string()
        .contains("everything blocked"));
    all.unblock(BlockOp::Resize);
    n.truncate(8192).unwrap();
    assert_eq!(n.len(), 8192);
    let mut buf = [0u8; 4];
    n.read(0, &mut buf).unwrap();
    assert_eq!(&buf, b"keep");
}

#[test]
fn permission_conflicts_name_the_users() {
    let g = Graph::new();
    mem(&g, "f", 4096);
    g.add_node(&json!({"driver": "raw", "node-name": "r1", "file": "f"}))
        .unwrap();
    let e = g
        .add_node(&json!({"driver": "raw", "node-name": "r2", "file": "f"}))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert!(e.to_string().contains("node 'r1' (as 'file')"), "{e}");
    assert!(g.node("r2").is_err());
    // A read-only second user is fine (the writer shares consistent read).
    g.add_node(&json!({"driver": "raw", "node-name": "r3", "file": "f", "read-only": true}))
        .unwrap();
    // A writable node over a read-only file is refused.
    mem(&g, "rof", 4096);
    let rof = g.node("rof").unwrap();
    g.reopen(&[(rof.clone(), ReopenOpts { read_only: true })])
        .unwrap();
    let e = g
        .add_node(&json!({"driver": "raw", "node-name": "r4", "file": "rof"}))
        .unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    // A backend asking for write on a read-only node is refused.
    let e = g.new_backend(&rof, PermPair::READ_WRITE).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    // A backend that does not share write conflicts with a writer.
    let f = g.node("f").unwrap();
    let e = g
        .new_backend_named(
            "excl",
            &f,
            PermPair {
                perm: Perms::CONSISTENT_READ,
                shared: Perms::CONSISTENT_READ,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("node 'r1' (as 'file')"), "{e}");
    // A read-only backend cannot write.
    let ro = g.new_backend(&f, PermPair::READ_ONLY).unwrap();
    assert_eq!(
        ro.write(0, &[1], WriteFlags::default()).unwrap_err().kind(),
        ErrorKind::PermissionDenied
    );
}

#[test]
fn reopen_is_all_or_nothing() {
    let g = Graph::new();
    let a = mem(&g, "a", 4096);
    let b = mem(&g, "b", 4096);
    let _be = g
        .new_backend_named("guest", &b, PermPair::READ_WRITE)
        .unwrap();
    let e = g
        .reopen(&[
            (a.clone(), ReopenOpts { read_only: true }),
            (b.clone(), ReopenOpts { read_only: true }),
        ])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert!(e.to_string().contains("backend 'guest'"), "{e}");
    assert!(!a.is_read_only() && !b.is_read_only());
    g.reopen(&[(a.clone(), ReopenOpts { read_only: true })])
        .unwrap();
    assert!(a.is_read_only());
    // A node over a read-only child can become writable only with the child.
    let top = g
        .add_node(&json!({"driver": "raw", "node-name": "top", "file": "a", "read-only": true}))
        .unwrap();
    let e = g
        .reopen(&[(top.clone(), ReopenOpts { read_only: false })])
        .unwrap_err();
    assert!(e.to_string().contains("child 'file'"), "{e}");
    assert!(top.is_read_only());
    g.reopen(&[
        (top.clone(), ReopenOpts { read_only: false }),
        (a.clone(), ReopenOpts { read_only: false }),
    ])
    .unwrap();
    w(&top, 0, b"ok");
    assert_eq!(r(&a, 0, 2), b"ok");
    // Now the writer on 'a' prevents making 'a' read-only alone.
    let e = g
        .reopen(&[(a.clone(), ReopenOpts { read_only: true })])
        .unwrap_err();
    assert!(e.to_string().contains("node 'top' (as 'file')"), "{e}");
    g.reopen(&[
        (top.clone(), ReopenOpts { read_only: true }),
        (a.clone(), ReopenOpts { read_only: true }),
    ])
    .unwrap();
    assert!(a.is_read_only() && top.is_read_only());
}

#[test]
fn replace_node_moves_parents_and_backends() {
    let g = Graph::new();
    let base = mem(&g, "base", 4096);
    let mid = mem(&g, "mid", 4096);
    w(&base, 0, b"B");
    w(&mid, 0, b"M");
    let top = g
        .add_node(&json!({"driver": "memory", "node-name": "top", "backing": "mid"}))
        .unwrap();
    let be = g.new_backend(&mid, PermPair::READ_WRITE).unwrap();
    assert_eq!(r(&top, 0, 1), b"M");
    g.replace_node(&mid, &base).unwrap();
    assert!(Arc::ptr_eq(&top.backing().unwrap(), &base));
    assert!(Arc::ptr_eq(&be.node(), &base));
    assert!(mid.parents().is_empty() && !mid.has_backend());
    assert!(base.has_backend());
    assert_eq!(r(&top, 0, 1), b"B");
    let mut b = [0u8; 1];
    be.read(0, &mut b).unwrap();
    assert_eq!(&b, b"B");
    // top -> base; c -> top. Moving top's edge to c would make top -> c -> top:
    // like QEMU's should_update_child, that edge stays where it is.
    let c = g
        .add_node(&json!({"driver": "memory", "node-name": "c", "backing": "top"}))
        .unwrap();
    g.replace_node(&base, &c).unwrap();
    assert!(Arc::ptr_eq(&top.backing().unwrap(), &base));
    assert!(Arc::ptr_eq(&be.node(), &c), "the backend (no cycle) moved");
}

#[test]
fn filters_are_inserted_and_removed_without_parents_noticing() {
    let g = Graph::new();
    let disk = mem(&g, "disk", 65536);
    w(&disk, 0, b"data");
    let top = g
        .add_node(&json!({"driver": "memory", "node-name": "top", "backing": "disk"}))
        .unwrap();
    let be = g
        .new_backend_named("exp", &disk, PermPair::READ_WRITE)
        .unwrap();
    let f = g
        .add_node(&json!({"driver": "blkdebug", "node-name": "flt", "image": "disk"}))
        .unwrap();
    // Not a filter / wrong child are refused.
    assert!(g.insert_filter_above(&disk, &top).is_err());
    g.insert_filter_above(&disk, &f).unwrap();
    assert!(Arc::ptr_eq(&top.backing().unwrap(), &f));
    assert!(Arc::ptr_eq(&be.node(), &f));
    assert!(Arc::ptr_eq(&f.file().unwrap(), &disk));
    assert_eq!(disk.parents().len(), 1);
    assert_eq!(r(&top, 0, 4), b"data");
    let mut b = [0u8; 4];
    be.read(0, &mut b).unwrap();
    assert_eq!(&b, b"data");
    assert!(f.stats().read.ops >= 2);
    assert_eq!(g.backing_chain(&top).len(), 3);
    assert!(!g.is_allocated_above(&top, Some(&disk), 0, 4).unwrap().0);
    assert!(g.is_allocated_above(&top, None, 0, 4).unwrap().0);
    // Hold writes in the filter: the parent sees nothing but the filter working.
    f.driver_as::<BlkDebug>()
        .unwrap()
        .inject(drivers::blkdebug::InjectRule::new(IoMask::WRITE, 28).once());
    let e = be.write(0, b"x", WriteFlags::default()).unwrap_err();
    assert_eq!((e.kind(), e.node()), (ErrorKind::NoSpace, Some("flt")));
    g.remove_filter(&f).unwrap();
    assert!(Arc::ptr_eq(&top.backing().unwrap(), &disk));
    assert!(Arc::ptr_eq(&be.node(), &disk));
    assert!(f.is_removed());
    assert!(g.node("flt").is_err());
    be.write(0, b"X", WriteFlags::default()).unwrap();
    assert_eq!(r(&top, 0, 4), b"Xata");
}

#[test]
fn unaligned_requests_are_padded_for_the_driver() {
    let (g, log) = recorder_graph();
    let n = g
        .add_node(&json!({"driver": "recorder", "node-name": "rec", "size": 4096}))
        .unwrap();
    assert_eq!(n.request_alignment(), 512);
    w(&n, 0, &[0xaa; 1024]);
    log.lock().clear();
    w(&n, 510, b"xyz");
    let l = log.lock().clone();
    assert!(
        l.iter().all(|(_, o, len)| o % 512 == 0 && len % 512 == 0),
        "{l:?}"
    );
    assert_eq!(r(&n, 508, 7), [0xaa, 0xaa, b'x', b'y', b'z', 0xaa, 0xaa]);
    // A write inside one block reads that block once.
    log.lock().clear();
    w(&n, 1030, b"q");
    assert_eq!(log.lock().clone(), vec![('r', 1024, 512), ('w', 1024, 512)]);
    assert_eq!(r(&n, 1029, 3), [0, b'q', 0]);
    // Discard and write-zeroes: the driver has neither; zeroes fall back to writes.
    assert_eq!(
        n.discard(0, 512).unwrap_err().kind(),
        ErrorKind::NotSupported
    );
    n.write_zeroes(100, 1000, ZeroFlags::default()).unwrap();
    assert_eq!(r(&n, 99, 1002)[1..1001], vec![0u8; 1000][..]);
    assert_eq!(r(&n, 99, 1)[0], 0xaa);
    let e = n
        .write_zeroes(
            0,
            512,
            ZeroFlags {
                no_fallback: true,
                ..Default::default()
            },
        )
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotSupported);
    assert!(e.to_string().contains("recorder"), "{e}");
    assert_eq!(
        n.truncate(8192).unwrap_err().kind(),
        ErrorKind::NotSupported
    );
    assert_eq!(n.make_empty().unwrap_err().kind(), ErrorKind::NotSupported);
    assert!(!n.supports_make_empty(), "the default says no make_empty");
}

#[test]
fn serialise_guard_holds_other_threads_but_not_its_owner() {
    let g = Graph::new();
    let n = mem(&g, "n", 65536);
    let guard = n.serialise(0, 4096);
    w(&n, 0, b"owner"); // same thread passes
    let done = Arc::new(AtomicBool::new(false));
    let (n2, d2) = (n.clone(), done.clone());
    let t = std::thread::spawn(move || {
        n2.write(1000, b"other", WriteFlags::default()).unwrap();
        d2.store(true, Ordering::SeqCst);
    });
    let (n3, d3) = (n.clone(), Arc::new(AtomicBool::new(false)));
    let d3c = d3.clone();
    let t2 = std::thread::spawn(move || {
        n3.write(8192, b"free", WriteFlags::default()).unwrap();
        d3c.store(true, Ordering::SeqCst);
    });
    t2.join().unwrap();
    assert!(d3.load(Ordering::SeqCst), "non-overlapping write passes");
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !done.load(Ordering::SeqCst),
        "overlapping write waits for the guard"
    );
    drop(guard);
    t.join().unwrap();
    assert_eq!(r(&n, 1000, 5), b"other");
    assert_eq!(r(&n, 0, 5), b"owner");
}

#[test]
fn serialise_guard_waits_for_earlier_requests() {
    let g = Graph::new();
    let disk = mem(&g, "disk", 65536);
    let f = g
        .add_node(&json!({"driver": "blkdebug", "node-name": "f", "image": "disk"}))
        .unwrap();
    let hold = f.driver_as::<BlkDebug>().unwrap().hold(IoMask::WRITE, None);
    let f2 = f.clone();
    let t = std::thread::spawn(move || f2.write(0, b"first", WriteFlags::default()).unwrap());
    assert!(hold.wait_reached(1, Duration::from_secs(5)));
    let got = Arc::new(AtomicBool::new(false));
    let (f3, g3) = (f.clone(), got.clone());
    let t2 = std::thread::spawn(move || {
        let _s = f3.serialise(0, 512);
        g3.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !got.load(Ordering::SeqCst),
        "guard waits for the in-flight write"
    );
    hold.release();
    t.join().unwrap();
    t2.join().unwrap();
    assert!(got.load(Ordering::SeqCst));
    assert_eq!(r(&disk, 0, 5), b"first");
}

#[test]
fn drain_waits_for_in_flight_and_holds_new_requests() {
    let g = Graph::new();
    let disk = mem(&g, "disk", 65536);
    let f = g
        .add_node(&json!({"driver": "blkdebug", "node-name": "f", "image": "disk"}))
        .unwrap();
    let be = Arc::new(g.new_backend(&f, PermPair::READ_WRITE).unwrap());
    let hold = f.driver_as::<BlkDebug>().unwrap().hold(IoMask::WRITE, None);
    let b2 = be.clone();
    let t = std::thread::spawn(move || b2.write(0, b"inflight", WriteFlags::default()).unwrap());
    assert!(hold.wait_reached(1, Duration::from_secs(5)));
    // Draining the *child* must wait for the parent's in-flight request.
    let drained = Arc::new(AtomicBool::new(false));
    let (g2, d2, disk2) = (g.clone(), drained.clone(), disk.clone());
    let (tx, rx) = crossbeam_channel::bounded::<()>(0);
    let td = std::thread::spawn(move || {
        let guard = g2.drain(std::slice::from_ref(&disk2));
        d2.store(true, Ordering::SeqCst);
        assert!(disk2.is_drained());
        assert_eq!(disk2.in_flight(), 0);
        // The draining thread itself may do I/O.
        disk2.write(100, b"owner", WriteFlags::default()).unwrap();
        rx.recv().unwrap();
        drop(guard);
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !drained.load(Ordering::SeqCst),
        "drain waits for the held request"
    );
    hold.release();
    t.join().unwrap();
    while !drained.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(f.is_drained(), "parents are drained too");
    // New requests from elsewhere are held until the section ends.
    let done = Arc::new(AtomicBool::new(false));
    let (b3, d3) = (be.clone(), done.clone());
    let t3 = std::thread::spawn(move || {
        b3.write(200, b"later", WriteFlags::default()).unwrap();
        d3.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(!done.load(Ordering::SeqCst), "request held while drained");
    tx.send(()).unwrap();
    td.join().unwrap();
    t3.join().unwrap();
    assert!(!disk.is_drained() && !f.is_drained());
    assert_eq!(r(&disk, 0, 8), b"inflight");
    assert_eq!(r(&disk, 100, 5), b"owner");
    assert_eq!(r(&disk, 200, 5), b"later");
    // Nested sections.
    let g1 = g.drain(std::slice::from_ref(&disk));
    let g2 = g.drain(std::slice::from_ref(&disk));
    drop(g1);
    assert!(disk.is_drained());
    drop(g2);
    assert!(!disk.is_drained());
}

#[test]
fn statistics_count_ops_bytes_errors() {
    let g = Graph::new();
    let n = mem(&g, "n", 65536);
    w(&n, 0, &[1; 4096]);
    r(&n, 0, 512);
    r(&n, 0, 512);
    n.flush().unwrap();
    n.discard(0, 4096).unwrap();
    n.write_zeroes(0, 4096, ZeroFlags::default()).unwrap();
    n.block_status(0, 4096).unwrap();
    let s = n.stats();
    assert_eq!((s.write.ops, s.write.bytes, s.write.errors), (1, 4096, 0));
    assert_eq!((s.read.ops, s.read.bytes), (2, 1024));
    assert_eq!(s.flush.ops, 1);
    assert_eq!((s.discard.ops, s.discard.bytes), (1, 4096));
    assert_eq!((s.write_zeroes.ops, s.write_zeroes.bytes), (1, 4096));
    assert_eq!(s.block_status.ops, 1);
    let f = g
        .add_node(
            &json!({"driver": "blkdebug", "node-name": "f", "image": "n",
        "inject-error": [{"event": "read_aio", "errno": 5}]}),
        )
        .unwrap();
    let mut b = [0u8; 10];
    assert!(f.read(0, &mut b).is_err());
    let s = f.stats();
    assert_eq!((s.read.ops, s.read.errors, s.read.bytes), (1, 1, 0));
}

#[test]
fn bad_options_are_refused_with_clear_errors() {
    let g = Graph::new();
    let cases = [
        (json!({"driver": "nope"}), "unknown driver 'nope'"),
        (json!({"size": 1}), "requires the option 'driver'"),
        (json!({"driver": "memory"}), "requires the option 'size'"),
        (
            json!({"driver": "memory", "size": 1, "x": 1}),
            "does not support the option 'x'",
        ),
        (json!({"driver": "memory", "size": "big"}), "option 'size'"),
        (json!({"driver": "memory", "size": -1}), "option 'size'"),
        (
            json!({"driver": "memory", "size": 1, "read-only": 3}),
            "option 'read-only'",
        ),
        (
            json!({"driver": "memory", "size": 1, "node-name": "0bad"}),
            "invalid node-name",
        ),
        (json!({"driver": "raw"}), "requires the option 'file'"),
        (
            json!({"driver": "raw", "file": "missing"}),
            "no node named 'missing'",
        ),
        (
            json!({"driver": "raw", "file": 5}),
            "node name or a node definition",
        ),
        (json!({"driver": "file"}), "requires the option 'filename'"),
        (
            json!({"driver": "file", "filename": "/nonexistent/x.img"}),
            "cannot open",
        ),
        (
            json!({"driver": "quorum", "children": [{"driver": "null-co"}], "vote-threshold": 2}),
            "vote-threshold",
        ),
        (
            json!({"driver": "quorum", "children": [{"driver": "null-co"}], "vote-threshold": 1, "read-pattern": "lifo"}),
            "'quorum', 'fifo'",
        ),
        (
            json!({"driver": "blkdebug", "image": {"driver": "null-co"}, "inject-error": [{"event": "bogus"}]}),
            "event 'bogus'",
        ),
        (
            json!({"driver": "blkdebug", "image": {"driver": "null-co"}, "inject-error": [{"event": "read_aio", "errno": "EWHAT"}]}),
            "EWHAT",
        ),
        (
            json!({"driver": "memory", "size": 1, "cluster-size": 3}),
            "cluster-size",
        ),
        (json!("memory"), "must be an object"),
    ];
    for (opts, want) in cases {
        let e = g.add_node(&opts).unwrap_err();
        assert!(e.to_string().contains(want), "{opts}: {e}");
        assert!(
            g.node_names().is_empty(),
            "{opts} left {:?}",
            g.node_names()
        );
    }
}

#[test]
fn backend_requests_and_block_status_above() {
    let g = Graph::new();
    let base = g.add_node(&json!({"driver": "memory", "node-name": "base", "size": 1 << 20, "cluster-size": 4096})).unwrap();
    w(&base, 0, &[1; 4096]);
    base.write_zeroes(4096, 4096, ZeroFlags::default()).unwrap();
    let top = g.add_node(&json!({"driver": "memory", "node-name": "top", "backing": "base", "cluster-size": 4096})).unwrap();
    w(&top, 8192, &[2; 4096]);
    let be = g.new_backend(&top, PermPair::READ_WRITE).unwrap();
    assert_eq!(be.len(), 1 << 20);
    let st = be.block_status_above(0, 1 << 20).unwrap();
    assert_eq!((st.mapping, st.len), (Mapping::Data, 4096));
    let st = be.block_status_above(4096, 1 << 20).unwrap_err();
    assert_eq!(st.kind(), ErrorKind::OutOfRange);
    let st = g.block_status_above(&top, None, 4096, 8192).unwrap();
    assert_eq!((st.mapping, st.len), (Mapping::Zero, 4096));
    let st = g.block_status_above(&top, None, 8192, 8192).unwrap();
    assert_eq!((st.mapping, st.len), (Mapping::Data, 4096));
    let st = g.block_status_above(&top, None, 12288, 65536).unwrap();
    assert_eq!((st.mapping, st.len), (Mapping::Unallocated, 65536));
    be.write(12288, b"x", WriteFlags::default()).unwrap();
    be.truncate(2 << 20).unwrap();
    assert_eq!(top.len(), 2 << 20);
}

/// A filter with an extra `target` child it writes to (the shape of
/// copy-before-write).
struct TargetFilter;

impl Driver for TargetFilter {
    fn format_name(&self) -> &str {
        "tfilter"
    }
    fn length(&self, node: &Node) -> Result<u64> {
        Ok(node.file().map(|f| f.len()).unwrap_or(0))
    }
    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
        node.file().unwrap().read(offset, buf)
    }
    fn write(&self, node: &Node, offset: u64, buf: &[u8], f: WriteFlags) -> Result<()> {
        let src = node.file().unwrap();
        let mut old = vec![0u8; buf.len()];
        src.read(offset, &mut old)?;
        node.child(&Role::Named("target".into()))
            .unwrap()
            .write(offset, &old, f)?;
        src.write(offset, buf, f)
    }
    fn is_filter(&self) -> bool {
        true
    }
}

#[test]
fn cbw_shaped_filter_insertion_keeps_the_cyclic_backing_edge() {
    let g = Graph::new();
    g.register_driver("tfilter", |ctx| {
        ctx.open_child("file", Role::File, true)?;
        ctx.open_child("target", Role::Named("target".into()), true)?;
        Ok(Box::new(TargetFilter))
    });
    let secondary = mem(&g, "secondary", 65536);
    w(&secondary, 0, b"old!");
    let hidden = g
        .add_node(&json!({"driver": "memory", "node-name": "hidden", "backing": "secondary"}))
        .unwrap();
    let active = g
        .add_node(&json!({"driver": "memory", "node-name": "active", "backing": "hidden"}))
        .unwrap();
    // A format parent that does not share write on the secondary disk's other side.
    let exp = g
        .new_backend_named("nbd-export", &secondary, PermPair::READ_WRITE)
        .unwrap();
    let f = g
        .add_node(&json!({"driver": "tfilter", "node-name": "cbw", "file": "secondary", "target": "hidden"}))
        .unwrap();
    g.insert_filter_above(&secondary, &f).unwrap();
    assert!(
        Arc::ptr_eq(&exp.node(), &f),
        "the export now writes through the filter"
    );
    assert!(
        Arc::ptr_eq(&hidden.backing().unwrap(), &secondary),
        "hidden keeps its backing edge"
    );
    exp.write(0, b"new!", WriteFlags::default()).unwrap();
    assert_eq!(r(&secondary, 0, 4), b"new!");
    assert_eq!(
        r(&active, 0, 4),
        b"old!",
        "the secondary guest still sees the checkpoint"
    );
    g.remove_filter(&f).unwrap();
    assert!(Arc::ptr_eq(&exp.node(), &secondary));
}

#[test]
fn filters_pass_their_users_permissions_through() {
    let g = Graph::new();
    let disk = mem(&g, "disk", 4096);
    // A format node writing to disk, sharing no write.
    g.add_node(&json!({"driver": "raw", "node-name": "fmt", "file": "disk"}))
        .unwrap();
    // Inserting a filter above disk does not conflict with fmt (it takes fmt's place).
    let f = g
        .add_node(&json!({"driver": "blkdebug", "node-name": "f", "image": "disk"}))
        .unwrap();
    g.insert_filter_above(&disk, &f).unwrap();
    // But a second writer on the filter conflicts with fmt, which is now above it.
    let e = g
        .new_backend_named("w2", &f, PermPair::READ_WRITE)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert!(e.to_string().contains("node 'fmt'"), "{e}");
    // A writer on a filter over a read-only node is refused, naming the filter.
    let ro = g
        .add_node(&json!({"driver": "memory", "node-name": "ro", "size": 4096, "read-only": true}))
        .unwrap();
    let f2 = g
        .add_node(&json!({"driver": "blkdebug", "node-name": "f2", "image": "ro"}))
        .unwrap();
    let e = g.new_backend(&f2, PermPair::READ_WRITE).unwrap_err();
    assert!(e.to_string().contains("through filter 'f2'"), "{e}");
    assert_eq!(e.node(), Some("ro"));
    // And a node below a writing filter cannot be made read-only.
    let b = g
        .new_backend_named("guest", &f, PermPair::READ_ONLY)
        .unwrap();
    drop(b);
    let e = g
        .reopen(&[(disk.clone(), ReopenOpts { read_only: true })])
        .unwrap_err();
    assert!(e.to_string().contains("node 'f'"), "{e}");
    let _ = ro;
}

/// A driver whose reopen can be told to fail, recording the hook calls.
struct Flaky {
    fail: bool,
    log: Log,
}

impl Driver for Flaky {
    fn format_name(&self) -> &str {
        "flaky"
    }
    fn length(&self, _node: &Node) -> Result<u64> {
        Ok(4096)
    }
    fn read(&self, _node: &Node, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn reopen_prepare(&self, node: &Node, _opts: &ReopenOpts) -> Result<()> {
        self.log.lock().push(('p', node.name().len() as u64, 0));
        if self.fail {
            return Err(Error::new(ErrorKind::Io, "cannot reopen"));
        }
        Ok(())
    }
    fn reopen_commit(&self, node: &Node, _opts: &ReopenOpts) {
        self.log.lock().push(('c', node.name().len() as u64, 0));
    }
    fn reopen_abort(&self, node: &Node, _opts: &ReopenOpts) {
        self.log.lock().push(('a', node.name().len() as u64, 0));
    }
}

#[test]
fn reopen_aborts_every_prepared_node_when_one_fails() {
    let g = Graph::new();
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    g.register_driver("flaky", move |ctx| {
        let fail = ctx.options().take_bool("fail")?.unwrap_or(false);
        Ok(Box::new(Flaky {
            fail,
            log: l2.clone(),
        }))
    });
    // Names of length 1, 2, 3 identify the nodes in the log.
    let a = g
        .add_node(&json!({"driver": "flaky", "node-name": "a"}))
        .unwrap();
    let b = g
        .add_node(&json!({"driver": "flaky", "node-name": "bb"}))
        .unwrap();
    let c = g
        .add_node(&json!({"driver": "flaky", "node-name": "ccc", "fail": true}))
        .unwrap();
    let ro = ReopenOpts { read_only: true };
    let e = g
        .reopen(&[(a.clone(), ro), (b.clone(), ro), (c.clone(), ro)])
        .unwrap_err();
    assert_eq!((e.kind(), e.node()), (ErrorKind::Io, Some("ccc")));
    assert_eq!(
        log.lock()
            .iter()
            .map(|(k, n, _)| (*k, *n))
            .collect::<Vec<_>>(),
        vec![('p', 1), ('p', 2), ('p', 3), ('a', 2), ('a', 1)]
    );
    assert!(!a.is_read_only() && !b.is_read_only() && !c.is_read_only());
    log.lock().clear();
    g.reopen(&[(a.clone(), ro), (b.clone(), ro)]).unwrap();
    assert_eq!(
        log.lock()
            .iter()
            .map(|(k, n, _)| (*k, *n))
            .collect::<Vec<_>>(),
        vec![('p', 1), ('p', 2), ('c', 1), ('c', 2)]
    );
    assert!(a.is_read_only() && b.is_read_only());
}

#[test]
fn make_empty_waits_for_in_flight_writes_and_holds_new_ones() {
    let g = Graph::new();
    let disk = mem(&g, "disk", 65536);
    let f = g
        .add_node(&json!({"driver": "blkdebug", "node-name": "f", "image": "disk"}))
        .unwrap();
    let hold = f.driver_as::<BlkDebug>().unwrap().hold(IoMask::WRITE, None);
    let f2 = f.clone();
    let t = std::thread::spawn(move || f2.write(0, b"in flight", WriteFlags::default()).unwrap());
    assert!(hold.wait_reached(1, Duration::from_secs(5)));
    let emptied = Arc::new(AtomicBool::new(false));
    let (f3, e3) = (f.clone(), emptied.clone());
    let t2 = std::thread::spawn(move || {
        f3.make_empty().unwrap();
        e3.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !emptied.load(Ordering::SeqCst),
        "make_empty waits for the in-flight write"
    );
    hold.release();
    t.join().unwrap();
    t2.join().unwrap();
    assert_eq!(
        r(&disk, 0, 9),
        vec![0u8; 9],
        "the write landed before make_empty"
    );
}

#[test]
fn nested_scope_lets_helper_threads_serve_an_admitted_request() {
    // A parent request admitted before a drain may finish its child I/O from a
    // helper thread inside a NestedScope; the drain waits for it instead of
    // deadlocking.
    let g = Graph::new();
    let disk = mem(&g, "disk", 65536);
    let f = g
        .add_node(&json!({"driver": "blkdebug", "node-name": "f", "image": "disk"}))
        .unwrap();
    let hold = f.driver_as::<BlkDebug>().unwrap().hold(IoMask::READ, None);
    let f2 = f.clone();
    let t = std::thread::spawn(move || {
        let mut b = [0u8; 4];
        f2.read(0, &mut b).unwrap();
    });
    assert!(hold.wait_reached(1, Duration::from_secs(5)));
    let (g2, d2) = (g.clone(), disk.clone());
    let drainer = std::thread::spawn(move || {
        let _d = g2.drain(std::slice::from_ref(&d2));
    });
    std::thread::sleep(Duration::from_millis(20));
    let d3 = disk.clone();
    let helper = std::thread::spawn(move || {
        let _n = NestedScope::enter();
        d3.write(8, b"helper", WriteFlags::default()).unwrap();
    });
    helper.join().unwrap();
    hold.release();
    t.join().unwrap();
    drainer.join().unwrap();
    assert_eq!(r(&disk, 8, 6), b"helper");
}

#[test]
fn each_permission_conflict_is_named_and_a_refused_replace_changes_nothing() {
    let g = Graph::new();
    let n = mem(&g, "n", 4096);
    let only = |p: Perms| PermPair {
        perm: p,
        shared: Perms::NONE,
    };
    for (p, name) in [
        (Perms::CONSISTENT_READ, "consistent read"),
        (Perms::WRITE, "write"),
        (Perms::WRITE_UNCHANGED, "write unchanged"),
        (Perms::RESIZE, "resize"),
        (Perms::GRAPH_MOD, "change children"),
    ] {
        let first = g.new_backend_named("first", &n, only(p)).unwrap();
        let e = g
            .new_backend_named(
                "second",
                &n,
                PermPair {
                    perm: p,
                    shared: Perms::ALL,
                },
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        let s = e.to_string();
        assert!(
            s.contains(&format!("'{name}'")) && s.contains("backend 'first'"),
            "{s}"
        );
        drop(first);
    }
    // Replace refused on a conflict: nothing moves.
    let old = mem(&g, "old", 4096);
    let new = mem(&g, "new", 4096);
    g.add_node(&json!({"driver": "raw", "node-name": "fmt", "file": "new"}))
        .unwrap();
    let be = g
        .new_backend_named("guest", &old, PermPair::READ_WRITE)
        .unwrap();
    let e = g.replace_node(&old, &new).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
    assert!(e.to_string().contains("backend 'guest'"), "{e}");
    assert!(Arc::ptr_eq(&be.node(), &old));
    assert!(old.has_backend() && !new.has_backend());
}

/// A filter whose close records that it ran (and whether its file child was
/// still attached then).
struct CloseFlag {
    closed: Arc<AtomicBool>,
    had_child: Arc<AtomicBool>,
    lock_free: Arc<AtomicBool>,
}

impl Driver for CloseFlag {
    fn format_name(&self) -> &str {
        "closeflag"
    }
    fn length(&self, node: &Node) -> Result<u64> {
        Ok(node.file().map_or(0, |f| f.len()))
    }
    fn read(&self, node: &Node, off: u64, buf: &mut [u8]) -> Result<()> {
        node.file().expect("file child").read(off, buf)
    }
    fn is_filter(&self) -> bool {
        true
    }
    fn close(&self, node: &Node) {
        self.had_child
            .store(node.file().is_some(), Ordering::SeqCst);
        if let Some(g) = node.graph() {
            // A graph change on another thread (it needs the graph lock) must
            // be able to finish while close waits for it.
            let (tx, rx) = crossbeam_channel::bounded(1);
            let name = format!("{}-probe", node.name());
            std::thread::spawn(move || {
                let r = g.add_node(&json!({"driver": "null-co", "node-name": name, "size": 512}));
                let _ = tx.send(r.is_ok());
            });
            let ok = rx.recv_timeout(Duration::from_secs(5)) == Ok(true);
            self.lock_free.store(ok, Ordering::SeqCst);
        }
        self.closed.store(true, Ordering::SeqCst);
    }
}

type Flags = (Arc<AtomicBool>, Arc<AtomicBool>, Arc<AtomicBool>);

/// A graph with the `closeflag` driver; flags: closed, had_child, lock_free.
fn closeflag_graph() -> (Graph, Flags) {
    let g = Graph::new();
    let flags: Flags = Default::default();
    let f2 = flags.clone();
    g.register_driver("closeflag", move |ctx| {
        ctx.open_child("file", Role::File, true)?;
        Ok(Box::new(CloseFlag {
            closed: f2.0.clone(),
            had_child: f2.1.clone(),
            lock_free: f2.2.clone(),
        }))
    });
    (g, flags)
}

#[test]
fn remove_closes_before_detaching_children_and_outside_the_graph_lock() {
    let (g, (closed, had_child, lock_free)) = closeflag_graph();
    let disk = mem(&g, "disk", 4096);
    g.add_node(&json!({"driver": "closeflag", "node-name": "top", "file": "disk"}))
        .unwrap();
    g.remove_node("top").unwrap();
    assert!(closed.load(Ordering::SeqCst));
    assert!(
        had_child.load(Ordering::SeqCst),
        "children are attached during close"
    );
    assert!(
        lock_free.load(Ordering::SeqCst),
        "close ran without the graph lock"
    );
    assert!(disk.parents().is_empty(), "then the children are detached");
    assert!(g.node("top").is_err());
    g.node("top-probe").unwrap();
    // The same for a filter taken out with remove_filter.
    let be = g.new_backend(&disk, PermPair::READ_WRITE).unwrap();
    let f = g
        .add_node(&json!({"driver": "closeflag", "node-name": "flt", "file": "disk"}))
        .unwrap();
    g.insert_filter_above(&disk, &f).unwrap();
    closed.store(false, Ordering::SeqCst);
    had_child.store(false, Ordering::SeqCst);
    lock_free.store(false, Ordering::SeqCst);
    g.remove_filter(&f).unwrap();
    assert!(closed.load(Ordering::SeqCst) && f.is_removed());
    assert!(had_child.load(Ordering::SeqCst));
    assert!(lock_free.load(Ordering::SeqCst));
    assert!(Arc::ptr_eq(&be.node(), &disk));
    assert!(disk.parents().is_empty());
}

#[test]
fn a_held_blocker_does_not_keep_its_node_alive() {
    let (g, (closed, _, _)) = closeflag_graph();
    mem(&g, "disk", 4096);
    let top = g
        .add_node(&json!({"driver": "closeflag", "node-name": "top", "file": "disk"}))
        .unwrap();
    let guard = top.block_all("top node of replication");
    assert!(Arc::ptr_eq(&guard.node().unwrap(), &top));
    assert!(top.is_op_blocked(BlockOp::Resize));
    let weak = Arc::downgrade(&top);
    drop(top);
    assert!(
        !closed.load(Ordering::SeqCst),
        "the graph still holds the node"
    );
    drop(g);
    assert!(
        closed.load(Ordering::SeqCst),
        "dropping the graph closes the node even with a blocker held"
    );
    assert!(weak.upgrade().is_none());
    assert!(guard.node().is_none());
    // Unblocking or dropping the guard of a node that is gone does nothing.
    guard.unblock(BlockOp::Resize);
    drop(guard);
}
