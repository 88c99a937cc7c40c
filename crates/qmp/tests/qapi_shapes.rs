//! The schema language on QEMU-shaped definitions: the subset of
//! `qapi/block-core.json`, `qapi/sockets.json`, `qapi/block-export.json`
//! and `qapi/migration.json` the daemon will need, written as QEMU writes
//! them, and requests as QEMU users send them (COLO setup), with QEMU's
//! error wording for nested members.

use std::sync::{Arc, Mutex};

use qmp::{Registry, Session};
use serde_json::{json, Value};

const SCHEMA: &str = r#"
{ 'enum': 'BlockdevDriver',
  'data': [ 'blkdebug', 'file', 'nbd', 'null-co', 'qcow2', 'quorum', 'raw', 'replication' ] }
{ 'enum': 'BlockdevDiscardOptions', 'data': [ 'ignore', 'unmap' ] }
{ 'enum': 'BlockdevDetectZeroesOptions', 'data': [ 'off', 'on', 'unmap' ] }
{ 'struct': 'BlockdevCacheOptions', 'data': { '*direct': 'bool', '*no-flush': 'bool' } }
{ 'union': 'BlockdevOptions',
  'base': { 'driver': 'BlockdevDriver', '*node-name': 'str',
            '*discard': 'BlockdevDiscardOptions', '*cache': 'BlockdevCacheOptions',
            '*read-only': 'bool', '*auto-read-only': 'bool', '*force-share': 'bool',
            '*detect-zeroes': 'BlockdevDetectZeroesOptions' },
  'discriminator': 'driver',
  'data': { 'blkdebug': 'BlockdevOptionsBlkdebug', 'file': 'BlockdevOptionsFile',
            'nbd': 'BlockdevOptionsNbd', 'null-co': 'BlockdevOptionsNull',
            'qcow2': 'BlockdevOptionsQcow2', 'quorum': 'BlockdevOptionsQuorum',
            'raw': 'BlockdevOptionsRaw', 'replication': 'BlockdevOptionsReplication' } }
{ 'alternate': 'BlockdevRef', 'data': { 'definition': 'BlockdevOptions', 'reference': 'str' } }
{ 'alternate': 'BlockdevRefOrNull',
  'data': { 'definition': 'BlockdevOptions', 'reference': 'str', 'null': 'null' } }
{ 'struct': 'BlockdevOptionsGenericFormat', 'data': { 'file': 'BlockdevRef' } }
{ 'struct': 'BlockdevOptionsGenericCOWFormat', 'base': 'BlockdevOptionsGenericFormat',
  'data': { '*backing': 'BlockdevRefOrNull' } }
{ 'struct': 'BlockdevOptionsQcow2', 'base': 'BlockdevOptionsGenericCOWFormat',
  'data': { '*lazy-refcounts': 'bool' } }
{ 'struct': 'BlockdevOptionsRaw', 'base': 'BlockdevOptionsGenericFormat',
  'data': { '*offset': 'int', '*size': 'int' } }
{ 'struct': 'BlockdevOptionsFile', 'data': { 'filename': 'str' } }
{ 'struct': 'BlockdevOptionsNull',
  'data': { '*size': 'int', '*latency-ns': 'uint64', '*read-zeroes': 'bool' } }
{ 'enum': 'BlkdebugEvent', 'prefix': 'BLKDBG',
  'data': [ 'read_aio', 'write_aio', 'flush_to_disk', 'pwritev', 'preadv' ] }
{ 'enum': 'BlkdebugIOType',
  'data': [ 'read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status' ] }
{ 'struct': 'BlkdebugInjectErrorOptions',
  'data': { 'event': 'BlkdebugEvent', '*state': 'int', '*iotype': 'BlkdebugIOType',
            '*errno': 'int', '*sector': 'int', '*once': 'bool', '*immediately': 'bool' } }
{ 'struct': 'BlockdevOptionsBlkdebug',
  'data': { 'image': 'BlockdevRef', '*align': 'int',
            '*inject-error': ['BlkdebugInjectErrorOptions'] } }
{ 'enum': 'QuorumReadPattern', 'data': [ 'quorum', 'fifo' ] }
{ 'struct': 'BlockdevOptionsQuorum',
  'data': { '*blkverify': 'bool', 'children': [ 'BlockdevRef' ], 'vote-threshold': 'int',
            '*rewrite-corrupted': 'bool', '*read-pattern': 'QuorumReadPattern' } }
{ 'enum': 'ReplicationMode', 'data': [ 'primary', 'secondary' ] }
{ 'struct': 'BlockdevOptionsReplication', 'base': 'BlockdevOptionsGenericFormat',
  'data': { 'mode': 'ReplicationMode', '*top-id': 'str' } }
{ 'enum': 'SocketAddressType', 'data': [ 'inet', 'unix', 'vsock', 'fd' ] }
{ 'struct': 'InetSocketAddressBase', 'data': { 'host': 'str', 'port': 'str' } }
{ 'struct': 'InetSocketAddress', 'base': 'InetSocketAddressBase',
  'data': { '*numeric': 'bool', '*to': 'uint16', '*ipv4': 'bool', '*ipv6': 'bool' } }
{ 'struct': 'UnixSocketAddress', 'data': { 'path': 'str', '*abstract': 'bool', '*tight': 'bool' } }
{ 'union': 'SocketAddress', 'base': { 'type': 'SocketAddressType' }, 'discriminator': 'type',
  'data': { 'inet': 'InetSocketAddress', 'unix': 'UnixSocketAddress' } }
{ 'struct': 'InetSocketAddressWrapper', 'data': { 'data': 'InetSocketAddress' } }
{ 'struct': 'UnixSocketAddressWrapper', 'data': { 'data': 'UnixSocketAddress' } }
{ 'union': 'SocketAddressLegacy', 'base': { 'type': 'SocketAddressType' },
  'discriminator': 'type',
  'data': { 'inet': 'InetSocketAddressWrapper', 'unix': 'UnixSocketAddressWrapper' } }
{ 'struct': 'BlockdevOptionsNbd',
  'data': { 'server': 'SocketAddress', '*export': 'str', '*reconnect-delay': 'uint32' } }
"#;

/// A registry with QEMU-shaped commands whose handlers record their args.
fn registry(seen: Seen) -> Registry {
    let mut r = Registry::new();
    r.define(SCHEMA).unwrap();
    let cmds = [
        ("blockdev-add", "'BlockdevOptions'"),
        ("blockdev-del", "{ 'node-name': 'str' }"),
        (
            "nbd-server-start",
            "{ 'addr': 'SocketAddressLegacy', '*tls-creds': 'str', '*tls-authz': 'str', '*max-connections': 'uint32' }",
        ),
        (
            "nbd-server-add",
            "{ 'device': 'str', '*name': 'str', '*description': 'str', '*writable': 'bool', '*bitmap': 'str' }",
        ),
        (
            "xen-set-replication",
            "{ 'enable': 'bool', 'primary': 'bool', '*failover': 'bool' }",
        ),
        ("x-blockdev-change", "{ 'parent': 'str', '*child': 'str', '*node': 'str' }"),
    ];
    for (name, args) in cmds {
        let seen = Arc::clone(&seen);
        let n = name.to_string();
        r.register(name, args, move |a| {
            seen.lock().unwrap().push((n.clone(), a.to_value()));
            Ok(json!({}))
        })
        .unwrap();
    }
    r
}

fn run(s: &mut Session, req: Value) -> Value {
    let mut out = Vec::new();
    s.feed(req.to_string().as_bytes(), &mut out);
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

/// Commands the handlers saw, with their arguments.
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

fn setup() -> (Session, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut s = Session::new(Arc::new(registry(Arc::clone(&seen))));
    assert_eq!(
        run(&mut s, json!({"execute": "qmp_capabilities"})),
        json!({"return": {}})
    );
    (s, seen)
}

#[test]
fn colo_style_requests_are_accepted() {
    let (mut s, seen) = setup();
    let ok = [
        json!({"execute": "blockdev-add", "arguments": {
            "driver": "replication", "node-name": "rep", "mode": "secondary", "top-id": "top",
            "file": {"driver": "qcow2", "node-name": "active",
                "file": {"driver": "file", "filename": "/tmp/active.qcow2"},
                "backing": {"driver": "qcow2", "node-name": "hidden",
                    "file": {"driver": "file", "filename": "/tmp/hidden.qcow2"},
                    "backing": "secondary-disk"}}}}),
        json!({"execute": "blockdev-add", "arguments": {
            "driver": "quorum", "node-name": "colo-disk0", "vote-threshold": 1,
            "read-pattern": "fifo",
            "children": ["local", {"driver": "replication", "mode": "primary",
                "file": {"driver": "nbd", "export": "disk0",
                    "server": {"type": "inet", "host": "127.0.0.1", "port": "9999"}}}]}}),
        json!({"execute": "blockdev-add", "arguments": {
            "driver": "blkdebug", "node-name": "flaky",
            "image": {"driver": "null-co", "size": 1048576, "read-zeroes": true},
            "inject-error": [{"event": "pwritev", "iotype": "write", "errno": 5,
                              "sector": 0, "once": true}]}}),
        json!({"execute": "blockdev-add", "arguments": {
            "driver": "qcow2", "node-name": "top", "file": "f", "backing": null}}),
        json!({"execute": "nbd-server-start", "arguments": {
            "addr": {"type": "unix", "data": {"path": "/tmp/nbd.sock"}}}}),
        json!({"execute": "nbd-server-start", "arguments": {
            "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}}}}),
        json!({"execute": "nbd-server-add", "arguments": {"device": "disk0", "writable": true}}),
        json!({"execute": "xen-set-replication", "arguments": {"enable": false, "primary": false, "failover": true}}),
        json!({"execute": "x-blockdev-change", "arguments": {"parent": "colo-disk0", "child": "children.1"}}),
    ];
    for req in &ok {
        assert_eq!(run(&mut s, req.clone()), json!({"return": {}}), "{req}");
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), ok.len());
    assert_eq!(seen[0].1["file"]["backing"]["backing"], "secondary-disk");
}

#[test]
fn nested_errors_name_the_member_as_qemu_does() {
    let (mut s, seen) = setup();
    let bad = [
        (
            json!({"driver": "qcow2", "file": {"driver": "file"}}),
            "Parameter 'file.filename' is missing",
        ),
        (
            json!({"driver": "qcow2", "file": {"driver": "file", "filename": "x", "nope": 1}}),
            "Parameter 'file.nope' is unexpected",
        ),
        (
            json!({"driver": "qcow2", "file": 7}),
            "Invalid parameter type for 'file', expected: BlockdevRef",
        ),
        (
            json!({"driver": "qcow2", "file": "f", "backing": 7}),
            "Invalid parameter type for 'backing', expected: BlockdevRefOrNull",
        ),
        (
            json!({"driver": "vmdk", "file": "f"}),
            "Parameter 'driver' does not accept value 'vmdk'",
        ),
        (
            json!({"driver": "replication", "mode": "tertiary", "file": "f"}),
            "Parameter 'mode' does not accept value 'tertiary'",
        ),
        (
            json!({"driver": "quorum", "vote-threshold": 1, "children": ["a", {"driver": "file"}]}),
            "Parameter 'children[1].filename' is missing",
        ),
        (
            json!({"driver": "blkdebug", "image": "n", "inject-error": [{"event": "bogus"}]}),
            "Parameter 'inject-error[0].event' does not accept value 'bogus'",
        ),
        (
            json!({"driver": "nbd", "server": {"type": "inet", "host": "h", "port": 10809}}),
            "Invalid parameter type for 'server.port', expected: string",
        ),
        (
            json!({"driver": "null-co", "size": "1M"}),
            "Invalid parameter type for 'size', expected: integer",
        ),
        (json!({"node-name": "x"}), "Parameter 'driver' is missing"),
    ];
    for (args, desc) in bad {
        let r = run(
            &mut s,
            json!({"execute": "blockdev-add", "arguments": args, "id": 1}),
        );
        assert_eq!(
            r,
            json!({"error": {"class": "GenericError", "desc": desc}, "id": 1}),
            "{args}"
        );
    }
    let r = run(
        &mut s,
        json!({"execute": "nbd-server-start",
        "arguments": {"addr": {"type": "unix", "data": {"path": 5}}}}),
    );
    assert_eq!(
        r["error"]["desc"],
        "Invalid parameter type for 'addr.data.path', expected: string"
    );
    let r = run(
        &mut s,
        json!({"execute": "xen-set-replication", "arguments": {"enable": true}}),
    );
    assert_eq!(r["error"]["desc"], "Parameter 'primary' is missing");
    assert!(
        seen.lock().unwrap().is_empty(),
        "no handler ran on bad arguments"
    );
}

#[test]
fn deeply_nested_definitions_are_checked_by_the_server() {
    // QEMU's nesting limit is 1024; a blockdev-add nested that deep is
    // parsed and checked (recursively) on the server's client threads,
    // whose stack is sized for it, and the server survives.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.qmp");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server =
        qmp::Server::start(registry(Arc::clone(&seen)), qmp::ServerConfig::unix(&path)).unwrap();
    let sock = std::os::unix::net::UnixStream::connect(&path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut w = sock.try_clone().unwrap();
    let mut r = std::io::BufReader::new(sock);
    let mut recv = || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut r, &mut line).unwrap();
        serde_json::from_str::<Value>(&line).unwrap()
    };
    let _greeting = recv();
    let mut send = |s: &str| std::io::Write::write_all(&mut w, s.as_bytes()).unwrap();
    send("{\"execute\": \"qmp_capabilities\"}");
    assert_eq!(recv(), json!({"return": {}}));
    // request (1) > 1022 nested raw nodes (the first is `arguments`) >
    // the file node: depth 1024, QEMU's limit.
    let nested = |levels: usize, leaf_driver: &str| {
        format!(
            "{{\"execute\": \"blockdev-add\", \"arguments\": {}{{\"driver\": \"{leaf_driver}\", \"filename\": \"/x\"}}{}}}",
            "{\"driver\": \"raw\", \"file\": ".repeat(levels),
            "}".repeat(levels)
        )
    };
    send(&nested(1022, "file"));
    assert_eq!(recv(), json!({"return": {}}));
    send(&nested(1022, "bogus"));
    let e = recv();
    let desc = e["error"]["desc"].as_str().unwrap();
    assert!(
        desc.ends_with(".file.driver' does not accept value 'bogus'"),
        "{desc}"
    );
    send(&nested(1023, "file"));
    assert_eq!(
        recv(),
        json!({"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}})
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
    server.join();
}

fn valid_args(cmd: &str) -> Value {
    match cmd {
        "blockdev-add" => json!({
            "driver": "replication", "node-name": "rep", "mode": "secondary", "top-id": "top",
            "file": {"driver": "qcow2", "file": {"driver": "file", "filename": "/a"},
                "backing": {"driver": "quorum", "vote-threshold": 1,
                    "children": ["x", {"driver": "blkdebug", "image": "y",
                        "inject-error": [{"event": "pwritev", "once": true}]}]}}}),
        "nbd-server-start" => json!({"addr": {"type": "unix", "data": {"path": "/s"}}}),
        "xen-set-replication" => json!({"enable": true, "primary": false}),
        _ => json!({"parent": "q", "node": "n"}),
    }
}

fn count_objects(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(count_objects).sum::<usize>(),
        Value::Array(a) => a.iter().map(count_objects).sum(),
        _ => 0,
    }
}

fn nth_object<'a>(
    v: &'a mut Value,
    n: &mut usize,
) -> Option<&'a mut serde_json::Map<String, Value>> {
    match v {
        Value::Object(m) => {
            if *n == 0 {
                return Some(m);
            }
            *n -= 1;
            m.values_mut().find_map(|c| nth_object(c, n))
        }
        Value::Array(a) => a.iter_mut().find_map(|c| nth_object(c, n)),
        _ => None,
    }
}

/// Changes the `node`-th object (pre-order, modulo their count): op 0
/// removes a member, 1 sets member `key` to `val`, 2 changes nothing.
fn mutate_one(v: &mut Value, node: usize, op: u8, key: &str, val: Value) {
    let count = count_objects(v);
    if count == 0 {
        return;
    }
    let mut n = node % count;
    let Some(m) = nth_object(v, &mut n) else {
        return;
    };
    match op {
        0 => {
            let k = m.keys().nth(node % m.len().max(1)).cloned();
            if let Some(k) = k {
                m.remove(&k);
            }
        }
        1 => {
            m.insert(key.to_string(), val);
        }
        _ => {}
    }
}

fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let key = prop_oneof![
        Just("driver".to_string()),
        Just("file".to_string()),
        Just("backing".to_string()),
        Just("filename".to_string()),
        Just("children".to_string()),
        Just("vote-threshold".to_string()),
        Just("mode".to_string()),
        Just("node-name".to_string()),
        Just("type".to_string()),
        Just("data".to_string()),
        Just("path".to_string()),
        Just("image".to_string()),
        Just("inject-error".to_string()),
        Just("event".to_string()),
        "[a-z-]{1,6}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        prop_oneof![
            Just("file"),
            Just("qcow2"),
            Just("raw"),
            Just("quorum"),
            Just("replication"),
            Just("nbd"),
            Just("blkdebug"),
            Just("null-co"),
            Just("unix"),
            Just("inet"),
            Just("secondary"),
            Just("pwritev"),
            Just("x")
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(5, 48, 5, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest::proptest! {
    /// Random nested arguments to QEMU-shaped commands: one reply each, the
    /// handler runs only when the checker accepted, and a rejection never
    /// reaches the handler.
    #[test]
    fn random_arguments_to_qemu_shaped_commands(
        cmd in proptest::sample::select(vec!["blockdev-add", "nbd-server-start", "xen-set-replication", "x-blockdev-change"]),
        random in arb_json(),
        template in 0usize..4,
        mutate in proptest::option::of((0usize..64, 0u8..3, "[a-z-]{1,6}", arb_json())),
    ) {
        // Half the cases start from a valid request and change one thing
        // somewhere inside it (or nothing), so both outcomes are exercised.
        let args = if template == 0 {
            random
        } else {
            let mut v = valid_args(cmd);
            if let Some((node, op, key, val)) = mutate {
                mutate_one(&mut v, node, op, &key, val);
            }
            v
        };
        let (mut s, seen) = setup();
        let req = json!({"execute": cmd, "arguments": args, "id": 7});
        let mut out = Vec::new();
        s.feed(req.to_string().as_bytes(), &mut out);
        proptest::prop_assert_eq!(out.len(), 1);
        let r = &out[0];
        proptest::prop_assert_eq!(&r["id"], &json!(7));
        let ran = seen.lock().unwrap().len();
        if r.get("return").is_some() {
            proptest::prop_assert_eq!(ran, 1);
        } else {
            proptest::prop_assert_eq!(ran, 0);
            proptest::prop_assert_eq!(&r["error"]["class"], &json!("GenericError"), "{}", r);
        }
    }
}
