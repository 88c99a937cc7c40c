//! Basic graph, memory, file and bad-input tests.
use block_graph::*;
use serde_json::json;

fn mem(g: &Graph, name: &str, size: u64) -> NodeRef {
    g.add_node(&json!({"driver": "memory", "node-name": name, "size": size}))
        .unwrap()
}

#[test]
fn memory_read_write_and_chain() {
    let g = Graph::new();
    let base = mem(&g, "base", 1 << 20);
    base.write(100, b"hello", WriteFlags::default()).unwrap();
    let top = g
        .add_node(&json!({"driver": "memory", "node-name": "top", "backing": "base", "cluster-size": 512}))
        .unwrap();
    assert!(top.backing().is_some());
    top.write(102, b"XY", WriteFlags::default()).unwrap();
    let mut b = [0u8; 7];
    top.read(99, &mut b).unwrap();
    assert_eq!(&b, b"\0heXYo\0");
    base.read(99, &mut b).unwrap();
    assert_eq!(&b, b"\0hello\0");
    assert_eq!(
        g.is_allocated_above(&top, None, 0, 4096).unwrap(),
        (true, 512)
    );
    assert_eq!(
        g.is_allocated_above(&top, Some(&base), 0, 4096).unwrap(),
        (true, 512)
    );
    assert_eq!(
        g.is_allocated_above(&top, Some(&base), 512, 4096).unwrap(),
        (false, 4096)
    );
    assert_eq!(g.backing_chain(&top).len(), 2);
    assert!(g.reaches(&top, &base));
    assert!(!g.reaches(&base, &top));
}

#[test]
fn file_driver_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.img");
    block_graph::drivers::file::create_file(&p, 1 << 20).unwrap();
    let g = Graph::new();
    let n = g
        .add_node(&json!({"driver": "raw", "node-name": "d", "file": {"driver": "file", "filename": p.to_str().unwrap()}}))
        .unwrap();
    assert_eq!(n.len(), 1 << 20);
    n.write(4096, &[7u8; 4096], WriteFlags::FUA).unwrap();
    n.flush().unwrap();
    let mut b = vec![0u8; 4096];
    n.read(4096, &mut b).unwrap();
    assert_eq!(b, vec![7u8; 4096]);
    n.discard(4096, 4096).unwrap();
    n.read(4096, &mut b).unwrap();
    assert_eq!(b, vec![0u8; 4096]);
    assert_eq!(n.filename().as_deref(), p.to_str());
}

#[test]
fn bad_input() {
    let g = Graph::new();
    let e = g.add_node(&json!({"driver": "nope"})).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    let e = g.add_node(&json!({"driver": "memory"})).unwrap_err();
    assert!(e.to_string().contains("'size'"), "{e}");
    let e = g
        .add_node(&json!({"driver": "memory", "size": 1, "bogus": 2}))
        .unwrap_err();
    assert!(e.to_string().contains("'bogus'"), "{e}");
    let e = g
        .add_node(&json!({"driver": "memory", "size": "x"}))
        .unwrap_err();
    assert!(e.to_string().contains("'size'"), "{e}");
    mem(&g, "a", 4096);
    let e = g
        .add_node(&json!({"driver": "memory", "node-name": "a", "size": 1}))
        .unwrap_err();
    assert!(e.to_string().contains("duplicate"), "{e}");
    assert_eq!(g.node_names(), vec!["a".to_string()]);
}
