//! Graph helpers shared by the jobs.

use block_graph::{Error as GError, ErrorKind as GKind, Graph, NodeRef};

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
