//! Graph commands: `blockdev-add`, `blockdev-del`, `x-blockdev-change`,
//! `block_resize` and the queries `query-named-block-nodes`, `query-block`,
//! `query-blockstats`.

use block_graph::{BlockOp, ErrorKind, Graph, Node, NodeRef, PermPair, Perms, Role};
use qmp::{Args, QmpError};
use serde_json::{json, Map, Value};

use super::log::log_at;
use super::Daemon;

/// A GenericError from anything printable.
pub(crate) fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

/// QEMU's lookup of a `device` argument (a backend or a node-name):
/// DeviceNotFound "Cannot find device='x' nor node-name='x'".
pub(crate) fn lookup_device(d: &Daemon, name: &str) -> Result<NodeRef, QmpError> {
    d.graph.node(name).map_err(|_| {
        QmpError::device_not_found(format!(
            "Cannot find device='{name}' nor node-name='{name}'"
        ))
    })
}

/// QEMU's `bdrv_lookup_bs(device, node_name)`: `device` names a backend
/// (our exports' ids, as `query-block` lists them), `node-name` a node;
/// neither found is a GenericError "Cannot find device='x' nor node-name='y'".
/// Our daemon has no guest devices, so, as its other `device` arguments, a
/// `device` that names no backend may name a node (QEMU would refuse).
fn lookup_bs(
    d: &Daemon,
    device: Option<&str>,
    node_name: Option<&str>,
) -> Result<NodeRef, QmpError> {
    if let Some(dev) = device {
        if let Some(n) = d
            .graph
            .nodes()
            .into_iter()
            .find(|n| n.backend_names().iter().any(|b| b == dev))
        {
            return Ok(n);
        }
        if let Ok(n) = d.graph.node(dev) {
            return Ok(n);
        }
    }
    if let Some(name) = node_name {
        if let Ok(n) = d.graph.node(name) {
            return Ok(n);
        }
    }
    Err(QmpError::generic(format!(
        "Cannot find device='{}' nor node-name='{}'",
        device.unwrap_or(""),
        node_name.unwrap_or("")
    )))
}

/// `block_resize` (`device` or `node-name`, `size` in bytes): QEMU's order
/// of checks (lookup, size, the resize op blocker, then a user taking the
/// resize permission), then the node's truncate (grow; shrink where the
/// driver supports it). While replication runs on a top node the blocker
/// refuses it, with the same message as a job on that node.
pub(crate) fn block_resize(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let node = lookup_bs(d, a.opt_str("device"), a.opt_str("node-name"))?;
    let size = a.i64("size")?;
    if size < 0 {
        return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
    }
    // QEMU: "Device 'x' is in use"; the blocker's reason is added (on a
    // replicating top: "Block device is in use by internal backup job").
    node.check_op(BlockOp::Resize).map_err(|e| {
        QmpError::generic(format!(
            "Device '{}' is in use: {}",
            a.opt_str("device").unwrap_or(node.name()),
            e.context_str()
        ))
    })?;
    if node.is_read_only() {
        // QEMU's permission check on a user taking resize.
        return Err(QmpError::generic("Block node is read-only"));
    }
    let user = d
        .graph
        .new_backend(
            &node,
            PermPair {
                perm: Perms::RESIZE,
                shared: Perms::ALL,
            },
        )
        .map_err(generic)?;
    let old = node.len();
    user.truncate(size as u64).map_err(|e| match e.kind() {
        ErrorKind::NotSupported => {
            QmpError::generic(format!("Image format driver does not support resize ({e})"))
        }
        _ => generic(e),
    })?;
    log_at!(
        Info,
        "node '{}' resized from {old} to {} bytes",
        node.name(),
        node.len()
    );
    Ok(json!({}))
}

/// Drops base options whose value is the default and that our graph does
/// not take (`detect-zeroes: off`, `force-share: false`, `cache` on
/// drivers other than `file`), in every nested definition.
fn normalise(v: &mut Value) {
    let Value::Object(m) = v else { return };
    if m.get("detect-zeroes").and_then(Value::as_str) == Some("off") {
        m.remove("detect-zeroes");
    }
    if m.get("force-share") == Some(&Value::Bool(false)) {
        m.remove("force-share");
    }
    if m.get("driver").and_then(Value::as_str) != Some("file") {
        if let Some(Value::Object(c)) = m.get("cache") {
            if c.values().all(|x| x == &Value::Bool(false)) {
                m.remove("cache");
            }
        }
    }
    for key in ["file", "backing", "image"] {
        if let Some(c) = m.get_mut(key) {
            normalise(c);
        }
    }
    if let Some(Value::Array(a)) = m.get_mut("children") {
        for c in a {
            normalise(c);
        }
    }
}

/// `blockdev-add`.
pub(crate) fn blockdev_add(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    if a.opt_str("node-name").is_none() {
        return Err(QmpError::generic(
            "'node-name' must be specified for the root node",
        ));
    }
    let mut opts = a.to_value();
    normalise(&mut opts);
    let node = d.graph.add_node(&opts).map_err(generic)?;
    log_at!(
        Info,
        "added node '{}' (driver {}, {} bytes)",
        node.name(),
        node.driver_name(),
        node.len()
    );
    Ok(json!({}))
}

/// `blockdev-del`.
pub(crate) fn blockdev_del(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let name = a.str("node-name")?;
    let node = d
        .graph
        .node(name)
        .map_err(|_| QmpError::generic(format!("Failed to find node with node-name='{name}'")))?;
    if node.is_implicit() {
        return Err(QmpError::generic(format!(
            "Node {name} is not owned by the monitor"
        )));
    }
    d.graph
        .remove_node(name)
        .map_err(|e| QmpError::generic(format!("Node '{name}' is busy: {}", e.context_str())))?;
    log_at!(Info, "deleted node '{name}'");
    Ok(json!({}))
}

/// `x-blockdev-change`: add `node` as a new child of `parent`, or remove
/// its child named `child` (quorum).
pub(crate) fn x_blockdev_change(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let parent_name = a.str("parent")?;
    let parent = lookup_device(d, parent_name)?;
    match (a.opt_str("child"), a.opt_str("node")) {
        (Some(_), Some(_)) => Err(QmpError::generic(
            "The parameters child and node are in conflict",
        )),
        (None, None) => Err(QmpError::generic("Either child or node must be specified")),
        (None, Some(n)) => {
            let child = d
                .graph
                .node(n)
                .map_err(|_| QmpError::generic(format!("Node '{n}' not found")))?;
            let role = d
                .graph
                .blockdev_change_add(&parent, &child)
                .map_err(generic)?;
            log_at!(
                Info,
                "x-blockdev-change: '{n}' added to '{parent_name}' as {role}"
            );
            Ok(json!({}))
        }
        (Some(c), None) => {
            let role = Role::parse(c);
            if parent.child(&role).is_none() {
                return Err(QmpError::generic(format!(
                    "Node '{parent_name}' does not have child '{c}'"
                )));
            }
            d.graph
                .blockdev_change_del(&parent, &role)
                .map_err(generic)?;
            log_at!(
                Info,
                "x-blockdev-change: child '{c}' removed from '{parent_name}'"
            );
            Ok(json!({}))
        }
    }
}

fn file_string(n: &Node) -> String {
    n.filename()
        .unwrap_or_else(|| format!("json:{{\"driver\": \"{}\"}}", n.driver_name()))
}

fn image_info(n: &NodeRef, depth: usize) -> Value {
    let mut m = Map::new();
    m.insert("filename".into(), json!(file_string(n)));
    m.insert("format".into(), json!(n.driver_name()));
    m.insert("virtual-size".into(), json!(n.len()));
    m.insert("dirty-flag".into(), json!(false));
    if let Some(b) = n.backing() {
        m.insert("backing-filename".into(), json!(file_string(&b)));
        if depth < 16 {
            m.insert("backing-image".into(), image_info(&b, depth + 1));
        }
    }
    Value::Object(m)
}

/// QEMU's `BlockDeviceInfo` for one node (plus `children`, as QEMU 9 has).
pub(crate) fn device_info(g: &Graph, n: &NodeRef) -> Value {
    let depth = g.backing_chain(n).len().saturating_sub(1);
    let children: Vec<Value> = n
        .children()
        .iter()
        .map(|(r, c)| json!({"child": r.to_string(), "node-name": c.name()}))
        .collect();
    let mut m = json!({
        "file": file_string(n),
        "node-name": n.name(),
        "ro": n.is_read_only(),
        "drv": n.driver_name(),
        "encrypted": false,
        "detect_zeroes": "off",
        "backing_file_depth": depth,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {"writeback": true, "direct": false, "no-flush": false},
        "image": image_info(n, 0),
        "children": children,
    });
    if let Some(b) = n.backing() {
        m["backing_file"] = json!(file_string(&b));
    }
    m
}

/// `query-named-block-nodes` (every node, sorted by name; `flat` accepted).
pub(crate) fn query_named_block_nodes(d: &Daemon, _a: &Args) -> Result<Value, QmpError> {
    let list: Vec<Value> = d
        .graph
        .nodes()
        .iter()
        .filter(|n| !n.is_removed())
        .map(|n| device_info(&d.graph, n))
        .collect();
    Ok(Value::Array(list))
}

/// `query-block`: one entry per backend (our NBD exports).
pub(crate) fn query_block(d: &Daemon) -> Result<Value, QmpError> {
    let mut out = Vec::new();
    for n in d.graph.nodes() {
        for b in n.backend_names() {
            out.push(json!({
                "device": b,
                "locked": false,
                "removable": false,
                "tray_open": false,
                "io-status": "ok",
                "inserted": device_info(&d.graph, &n),
            }));
        }
    }
    Ok(Value::Array(out))
}

fn stats_of(n: &Node) -> Value {
    let s = n.stats();
    let ok = |o: block_graph::OpStats| o.ops.saturating_sub(o.errors);
    json!({
        "rd_bytes": s.read.bytes,
        "wr_bytes": s.write.bytes,
        "zone_append_bytes": 0,
        "unmap_bytes": s.discard.bytes,
        "rd_operations": ok(s.read),
        "wr_operations": ok(s.write),
        "zone_append_operations": 0,
        "flush_operations": ok(s.flush),
        "unmap_operations": ok(s.discard),
        "rd_total_time_ns": s.read.nanos,
        "wr_total_time_ns": s.write.nanos,
        "zone_append_total_time_ns": 0,
        "flush_total_time_ns": s.flush.nanos,
        "unmap_total_time_ns": s.discard.nanos,
        "rd_merged": 0, "wr_merged": 0, "zone_append_merged": 0, "unmap_merged": 0,
        "failed_rd_operations": s.read.errors,
        "failed_wr_operations": s.write.errors,
        "failed_zone_append_operations": 0,
        "failed_flush_operations": s.flush.errors,
        "failed_unmap_operations": s.discard.errors,
        "invalid_rd_operations": 0, "invalid_wr_operations": 0,
        "invalid_zone_append_operations": 0,
        "invalid_flush_operations": 0, "invalid_unmap_operations": 0,
        "account_invalid": false,
        "account_failed": true,
        "timed_stats": [],
    })
}

fn block_stats(n: &NodeRef, depth: usize) -> Value {
    let mut m = json!({"node-name": n.name(), "stats": stats_of(n)});
    if depth < 16 {
        if let Some(f) = n.file() {
            m["parent"] = block_stats(&f, depth + 1);
        }
        if let Some(b) = n.backing() {
            m["backing"] = block_stats(&b, depth + 1);
        }
    }
    m
}

/// `query-blockstats`: per backend, or per node with `query-nodes: true`.
pub(crate) fn query_blockstats(d: &Daemon, a: &Args) -> Result<Value, QmpError> {
    let mut out = Vec::new();
    if a.opt_bool("query-nodes").unwrap_or(false) {
        for n in d.graph.nodes() {
            out.push(block_stats(&n, 0));
        }
    } else {
        for n in d.graph.nodes() {
            for b in n.backend_names() {
                let mut v = block_stats(&n, 0);
                v["device"] = json!(b);
                out.push(v);
            }
        }
    }
    Ok(Value::Array(out))
}

/// Closes every node, roots first (images flushed and closed cleanly).
pub(crate) fn close_all(g: &Graph) {
    for _ in 0..64 {
        let roots: Vec<NodeRef> = g
            .nodes()
            .into_iter()
            .filter(|n| !n.is_implicit() && n.parents().is_empty() && !n.has_backend())
            .collect();
        if roots.is_empty() {
            break;
        }
        for n in roots {
            if let Err(e) = g.remove_node(n.name()) {
                log_at!(Warn, "closing node '{}': {e}", n.name());
            }
        }
    }
    let left = g.node_names();
    if !left.is_empty() {
        // E.g. the hidden disk left behind by a failover: flushed here,
        // closed when the graph is dropped.
        log_at!(
            Info,
            "nodes closed with the graph at exit: {}",
            left.join(", ")
        );
        for n in g.nodes() {
            let _ = n.flush();
        }
    }
}
