//! Graph helpers shared by the jobs.

use std::collections::HashSet;
use std::sync::Arc;

use block_graph::{Error as GError, ErrorKind as GKind, Graph, NodeRef, ReopenOpts, Role};

/// Takes a filter node this crate inserted out of the graph: its parents and
/// backends go back to its filtered child, then the node is removed; all
/// drained. Does nothing for an already removed node.
///
/// block-graph's `remove_filter` checks the parents' permissions on the child
/// against every user of the child, including the filter's own edge, whose
/// permissions pass its parents' needs through; with a parent that does not
/// share write (a format node such as `raw`) that check fails. Then the filter's
/// edge is detached first (inside the same drained section) and the parents are
/// moved with `replace_node`; on failure the edge is put back.
pub(crate) fn take_out_filter(graph: &Graph, filter: &NodeRef) -> Result<(), GError> {
    if filter.is_removed() {
        return Ok(());
    }
    match graph.remove_filter(filter) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() != GKind::PermissionDenied => return Err(e),
        Err(_) => {}
    }
    let role = filter.driver().filtered_child();
    let child = filter
        .filtered()
        .ok_or_else(|| GError::invalid(format!("'{}' has no filtered child", filter.name())))?;
    let _drained = graph.drain(&[filter.clone(), child.clone()]);
    graph.detach_child(filter, &role)?;
    if let Err(e) = graph.replace_node(filter, &child) {
        let _ = graph.attach_child(filter, role, &child);
        return Err(e);
    }
    graph.remove_node(filter.name())
}

/// `node` and the data children below it (`file`, `children.N`, not
/// `backing`) that are read-only: what must be reopened read-write before a
/// job writes into `node` (QEMU reopens the subtree the same way).
pub(crate) fn read_only_data_nodes(node: &NodeRef) -> Vec<NodeRef> {
    let mut out = Vec::new();
    let mut stack = vec![node.clone()];
    while let Some(n) = stack.pop() {
        if !n.is_read_only() {
            continue;
        }
        for (role, c) in n.children() {
            if matches!(role, Role::File | Role::Child(_)) {
                stack.push(c);
            }
        }
        out.push(n);
    }
    // children first: a format driver's reopen looks at its file child
    out.reverse();
    out
}

/// Reopen `nodes` with the given read-only flag, all or nothing.
pub(crate) fn set_read_only(
    graph: &Graph,
    nodes: &[NodeRef],
    read_only: bool,
) -> Result<(), GError> {
    let q: Vec<(NodeRef, ReopenOpts)> = nodes
        .iter()
        .map(|n| (n.clone(), ReopenOpts { read_only }))
        .collect();
    graph.reopen(&q)
}

/// True if writes into `from` reach `to`: `to` is `from` or lies below it
/// through child edges that carry writes (every role but `backing`, unless
/// `backing` is a filter's filtered child; a copy-before-write filter's
/// `target` edge counts).
pub(crate) fn writes_reach(from: &NodeRef, to: &NodeRef) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![from.clone()];
    while let Some(n) = stack.pop() {
        if Arc::ptr_eq(&n, to) {
            return true;
        }
        if !seen.insert(Arc::as_ptr(&n) as usize) {
            continue;
        }
        let filtered = n.is_filter().then(|| n.driver().filtered_child());
        for (role, c) in n.children() {
            if role != Role::Backing || filtered.as_ref() == Some(&role) {
                stack.push(c);
            }
        }
    }
    false
}
