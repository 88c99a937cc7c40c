//! Op blockers of jobs, as QEMU's `block_job_add_bdrv`: a job blocks every
//! operation (all but dataplane start) on each node it uses (backup: source
//! and target; mirror: source and target; commit and active commit: top,
//! every intermediate node and base; stream: top and every node down to,
//! excluding, base) until the job's driver is dropped, which happens when it
//! ends, before it is seen concluded. So a second job on any of those nodes
//! is refused with QEMU's message,
//! `Node 'x' is busy: block device is in use by block job: backup`.
//!
//! Filter nodes in a chain (a job's own `copy-before-write` or `mirror-top`
//! node) are not blocked: the job owning one removes it when it ends, and a
//! blocked node cannot be removed.

use std::sync::Arc;

use block_graph::{BlockOp, BlockerGuard, ErrorKind as GKind, NodeRef};
use parking_lot::Mutex;

use crate::error::{ErrorKind, JobError, Result};
use crate::job::JobType;

/// Makes "check every node, then block every node" one step against other
/// job starts in this process (QEMU runs both under its big lock).
static CLAIM: Mutex<()> = Mutex::new(());

/// The reason a job's blockers give (QEMU's text).
pub(crate) fn job_blocker_reason(job_type: JobType) -> String {
    format!("block device is in use by block job: {job_type}")
}

/// QEMU's `bdrv_op_is_blocked`: fails if `op` is blocked on `node`, with
/// kind [`ErrorKind::Busy`] and context `Node 'x' is busy: <the blocker's
/// reason>` (e.g. `block device is in use by block job: backup`). For
/// callers (the QMP layer) that check a node before they start a job.
pub fn check_op_free(node: &NodeRef, op: BlockOp) -> Result<()> {
    node.check_op(op).map_err(|e| {
        if e.kind() != GKind::Busy {
            return JobError::from(e);
        }
        // block-graph's context is "operation '<op>' is blocked: <reason>"
        let ctx = e.context_str();
        let reason = ctx.split_once(" is blocked: ").map_or(ctx, |(_, r)| r);
        JobError::new(
            ErrorKind::Busy,
            format!("Node '{}' is busy: {reason}", node.name()),
        )
    })
}

/// Checks that no blocker forbids the given operation on each node, then
/// blocks every operation but [`BlockOp::DataplaneStart`] on each of them
/// (each node once) for a job of `job_type`. The blockers last as long as the
/// returned guards. All or nothing: on error nothing is blocked.
pub(crate) fn claim_nodes(
    job_type: JobType,
    uses: &[(&NodeRef, BlockOp)],
) -> Result<Vec<BlockerGuard>> {
    let _l = CLAIM.lock();
    for (node, op) in uses {
        check_op_free(node, *op)?;
    }
    let reason = job_blocker_reason(job_type);
    let mut guards: Vec<BlockerGuard> = Vec::with_capacity(uses.len());
    for (node, _) in uses {
        if guards
            .iter()
            .any(|g| g.node().is_some_and(|n| Arc::ptr_eq(&n, node)))
        {
            continue;
        }
        let g = node.block_all(reason.clone());
        g.unblock(BlockOp::DataplaneStart);
        guards.push(g);
    }
    Ok(guards)
}

/// The nodes strictly between `top` and `bottom` in `top`'s backing chain
/// (down to the end of the chain when `bottom` is None), without filters.
pub(crate) fn intermediates(
    graph: &block_graph::Graph,
    top: &NodeRef,
    bottom: Option<&NodeRef>,
) -> Vec<NodeRef> {
    graph
        .backing_chain(top)
        .into_iter()
        .skip(1)
        .take_while(|n| !bottom.is_some_and(|b| Arc::ptr_eq(n, b)))
        .filter(|n| !n.is_filter())
        .collect()
}
