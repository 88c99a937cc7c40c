//! Building the two stacks of a replication pair from options, so callers
//! (the daemon, tests, benches) do not repeat graph plumbing.
//!
//! Secondary: `filter(replication, secondary) -> active -> hidden -> secondary disk`.
//! Primary: `quorum(vote-threshold=1, read-pattern=fifo) -> [local disk, replication(primary) -> child]`.

use block_graph::{Graph, NodeRef};
use serde_json::{json, Value};

use crate::error::{Error, ErrorKind, Result};

/// Options of the secondary stack.
#[derive(Debug, Clone)]
pub struct SecondaryStackOptions {
    /// node-name of the replication filter.
    pub filter_name: String,
    /// `top-id`: the root node the guest uses; `None` means the filter itself.
    pub top_id: Option<String>,
    /// node-name of the existing secondary disk (it needs a backend, the NBD
    /// export, before start).
    pub secondary_disk: String,
    /// Definition of the hidden disk in `blockdev-add` shape (driver,
    /// node-name, file, ...), without `backing`: it gets the secondary disk.
    pub hidden: Value,
    /// Definition of the active disk, without `backing`: it gets the hidden disk.
    pub active: Value,
}

impl SecondaryStackOptions {
    /// Active and hidden disks as `memory` nodes named `<filter>-active` and
    /// `<filter>-hidden` (sized from the secondary disk).
    pub fn memory(filter_name: &str, secondary_disk: &str) -> SecondaryStackOptions {
        SecondaryStackOptions {
            filter_name: filter_name.to_string(),
            top_id: None,
            secondary_disk: secondary_disk.to_string(),
            hidden: json!({"driver": "memory", "node-name": format!("{filter_name}-hidden")}),
            active: json!({"driver": "memory", "node-name": format!("{filter_name}-active")}),
        }
    }
}

/// The nodes of a secondary stack.
#[derive(Debug, Clone)]
pub struct SecondaryStack {
    /// The replication filter (mode=secondary).
    pub filter: NodeRef,
    /// The active disk (the filter's file child).
    pub active: NodeRef,
    /// The hidden disk (the active disk's backing).
    pub hidden: NodeRef,
    /// The secondary disk (the hidden disk's backing).
    pub secondary: NodeRef,
}

fn with(mut def: Value, key: &str, v: Value, what: &str, filter: &str) -> Result<Value> {
    match def.as_object_mut() {
        Some(m) => {
            if m.contains_key(key) {
                return Err(Error::new(
                    ErrorKind::InvalidOption,
                    filter,
                    format!("the {what} definition must not set '{key}': the stack sets it"),
                ));
            }
            m.insert(key.to_string(), v);
            Ok(def)
        }
        None => Err(Error::new(
            ErrorKind::InvalidOption,
            filter,
            format!("the {what} definition must be a JSON object, got {def}"),
        )),
    }
}

fn undo(graph: &Graph, nodes: &[NodeRef]) {
    for n in nodes.iter().rev() {
        let _ = graph.remove_node(n.name());
    }
}

/// Builds the secondary stack over an existing secondary disk. On error
/// nothing is left behind.
pub fn build_secondary_stack(graph: &Graph, o: &SecondaryStackOptions) -> Result<SecondaryStack> {
    let f = &o.filter_name;
    let secondary = graph
        .node(&o.secondary_disk)
        .map_err(|e| Error::graph(f, "secondary disk", e))?;
    let hidden_def = with(
        o.hidden.clone(),
        "backing",
        json!(o.secondary_disk),
        "hidden disk",
        f,
    )?;
    let hidden = graph
        .add_node(&hidden_def)
        .map_err(|e| Error::graph(f, "cannot create the hidden disk", e))?;
    let active_def = with(
        o.active.clone(),
        "backing",
        json!(hidden.name()),
        "active disk",
        f,
    )?;
    let active = match graph.add_node(&active_def) {
        Ok(a) => a,
        Err(e) => {
            undo(graph, &[hidden]);
            return Err(Error::graph(f, "cannot create the active disk", e));
        }
    };
    let filter = match graph.add_node(&json!({
        "driver": "replication",
        "node-name": f,
        "mode": "secondary",
        "top-id": o.top_id.clone().unwrap_or_else(|| f.clone()),
        "file": active.name(),
    })) {
        Ok(n) => n,
        Err(e) => {
            undo(graph, &[hidden, active]);
            return Err(Error::graph(f, "cannot create the replication filter", e));
        }
    };
    Ok(SecondaryStack {
        filter,
        active,
        hidden,
        secondary,
    })
}

/// Options of the primary stack.
#[derive(Debug, Clone)]
pub struct PrimaryStackOptions {
    /// node-name of the quorum node (the guest's disk).
    pub quorum_name: String,
    /// node-name of the replication filter (mode=primary).
    pub filter_name: String,
    /// node-name of the existing local disk (quorum child 0).
    pub local_disk: String,
    /// The filter's child: a node-name (string) or a definition (e.g. the NBD
    /// client to the secondary).
    pub child: Value,
}

/// The nodes of a primary stack.
#[derive(Debug, Clone)]
pub struct PrimaryStack {
    /// The quorum node (vote-threshold=1, read-pattern=fifo).
    pub quorum: NodeRef,
    /// The replication filter (mode=primary).
    pub filter: NodeRef,
    /// The local disk.
    pub local: NodeRef,
}

/// Builds the primary stack. On error nothing is left behind.
pub fn build_primary_stack(graph: &Graph, o: &PrimaryStackOptions) -> Result<PrimaryStack> {
    let f = &o.filter_name;
    let local = graph
        .node(&o.local_disk)
        .map_err(|e| Error::graph(f, "local disk", e))?;
    let filter = graph
        .add_node(&json!({
            "driver": "replication",
            "node-name": f,
            "mode": "primary",
            "file": o.child,
        }))
        .map_err(|e| Error::graph(f, "cannot create the replication filter", e))?;
    let quorum = match graph.add_node(&json!({
        "driver": "quorum",
        "node-name": o.quorum_name,
        "vote-threshold": 1,
        "read-pattern": "fifo",
        "children": [o.local_disk, f],
    })) {
        Ok(q) => q,
        Err(e) => {
            undo(graph, &[filter]);
            return Err(Error::graph(f, "cannot create the quorum node", e));
        }
    };
    Ok(PrimaryStack {
        quorum,
        filter,
        local,
    })
}
