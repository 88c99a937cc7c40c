//! The `copy-before-write` filter driver: before a write, write-zeroes or
//! discard reaches a source cluster not yet copied since the last checkpoint,
//! the cluster's old contents are copied to the target.
//!
//! Options (`Graph::add_node`): `file` (the source, filtered child),
//! `target` (the target: a node name or definition, attached as the child
//! edge in role `target`, as QEMU's node has `file` and `target` children),
//! `cluster-size` (copy unit, power of two, default 64 KiB).
//!
//! Because the target is a child edge, the filter reaches the target's
//! subtree, so `insert_filter_above(source, filter)` leaves in place every
//! edge from the target's side onto the source (block-graph's
//! `replace_node` skips edges that would close a cycle, as QEMU's
//! `should_update_child`): in the replication setup the hidden disk's backing
//! edge stays on the secondary disk, and a target that has the source as a
//! child (a quorum over it) keeps its edge, so a copy into the target never
//! comes back through the filter and waits for itself.

use std::ops::Range;
use std::sync::Arc;

use block_graph::{
    Driver, Error as GError, ErrorKind as GKind, Node, NodeRef, OpenContext, Role, WriteFlags,
    ZeroFlags,
};

use crate::copy::CopyTracker;
use crate::job::IoOperation;

/// Driver name used in `add_node`.
pub const CBW_DRIVER: &str = "copy-before-write";

/// Largest buffer one copy step uses.
const COPY_CHUNK: u64 = 1 << 20;

/// The `copy-before-write` driver. Get its tracker with
/// `node.driver_as::<CopyBeforeWrite>().unwrap().tracker()`.
pub struct CopyBeforeWrite {
    target: NodeRef,
    tracker: Arc<CopyTracker>,
}

impl std::fmt::Debug for CopyBeforeWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyBeforeWrite")
            .field("target", &self.target.name())
            .field("tracker", &self.tracker)
            .finish()
    }
}

impl CopyBeforeWrite {
    /// Opens from options (see the module docs).
    pub fn open(ctx: &mut OpenContext<'_>) -> block_graph::Result<Box<dyn Driver>> {
        let source = ctx
            .open_child("file", Role::File, true)?
            .ok_or_else(|| GError::invalid("copy-before-write: option 'file' is required"))?;
        let cs = ctx.options().take_u64("cluster-size")?.unwrap_or(65536);
        if !cs.is_power_of_two() || !(512..=(64 << 20)).contains(&cs) {
            return Err(GError::invalid(format!(
                "copy-before-write: option 'cluster-size' must be a power of two in 512..64 MiB, got {cs}"
            )));
        }
        let target = ctx
            .open_child("target", target_role(), true)?
            .ok_or_else(|| GError::invalid("copy-before-write: option 'target' is required"))?;
        if target.len() != source.len() {
            return Err(GError::invalid(format!(
                "copy-before-write: source '{}' has length {} but target '{}' has length {}",
                source.name(),
                source.len(),
                target.name(),
                target.len()
            )));
        }
        if target.is_read_only() {
            return Err(GError::new(
                GKind::PermissionDenied,
                format!("copy-before-write: target '{}' is read-only", target.name()),
            ));
        }
        Ok(Box::new(CopyBeforeWrite {
            tracker: Arc::new(CopyTracker::new(source.len(), cs)),
            target,
        }))
    }

    /// The per-cluster copy state shared with the backup job.
    pub fn tracker(&self) -> &Arc<CopyTracker> {
        &self.tracker
    }

    /// The target node given at open (copies go through the `target` edge).
    pub fn target(&self) -> &NodeRef {
        &self.target
    }

    fn target_of(&self, node: &Node) -> NodeRef {
        node.child(&target_role())
            .unwrap_or_else(|| self.target.clone())
    }

    fn source(node: &Node) -> block_graph::Result<NodeRef> {
        node.file().ok_or_else(|| {
            GError::new(GKind::NotFound, "copy-before-write has no file child")
                .with_node(node.name())
        })
    }

    fn before_write(&self, node: &Node, offset: u64, len: u64) -> block_graph::Result<()> {
        let src = Self::source(node)?;
        self.tracker
            .ensure_copied(offset, len, |r| copy_range(&src, &self.target_of(node), r))
            .map_err(|e| e.context("copy-before-write"))
    }
}

/// The role of the target edge.
fn target_role() -> Role {
    Role::Named("target".to_string())
}

/// Copies `r` from `src` to `dst` in bounded steps; all-zero steps become
/// write-zeroes (without unmap: the target then reads zeros, not its backing).
pub(crate) fn copy_range(src: &Node, dst: &Node, r: Range<u64>) -> block_graph::Result<()> {
    copy_range_op(src, dst, r).map_err(|(_, e)| e)
}

/// Like [`copy_range`], telling which side failed.
pub(crate) fn copy_range_op(
    src: &Node,
    dst: &Node,
    r: Range<u64>,
) -> Result<(), (IoOperation, GError)> {
    let mut off = r.start;
    let mut buf = vec![0u8; COPY_CHUNK.min(r.end - r.start) as usize];
    while off < r.end {
        let n = COPY_CHUNK.min(r.end - off) as usize;
        let b = &mut buf[..n];
        src.read(off, b).map_err(|e| (IoOperation::Read, e))?;
        let w = if b.iter().all(|&x| x == 0) {
            dst.write_zeroes(off, n as u64, ZeroFlags::default())
        } else {
            dst.write(off, b, WriteFlags::default())
        };
        w.map_err(|e| (IoOperation::Write, e))?;
        off += n as u64;
    }
    Ok(())
}

impl Driver for CopyBeforeWrite {
    fn format_name(&self) -> &str {
        CBW_DRIVER
    }

    fn length(&self, node: &Node) -> block_graph::Result<u64> {
        Ok(Self::source(node)?.len())
    }

    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> block_graph::Result<()> {
        Self::source(node)?.read(offset, buf)
    }

    fn write(
        &self,
        node: &Node,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> block_graph::Result<()> {
        self.before_write(node, offset, buf.len() as u64)?;
        Self::source(node)?.write(offset, buf, flags)
    }

    fn flush(&self, node: &Node) -> block_graph::Result<()> {
        Self::source(node)?.flush()
    }

    fn discard(&self, node: &Node, offset: u64, len: u64) -> block_graph::Result<()> {
        self.before_write(node, offset, len)?;
        Self::source(node)?.discard(offset, len)
    }

    fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> block_graph::Result<()> {
        self.before_write(node, offset, len)?;
        Self::source(node)?.write_zeroes(offset, len, flags)
    }

    fn is_filter(&self) -> bool {
        true
    }

    /// The filtered child may be re-attached at run time (rollback of a
    /// failed filter removal).
    fn accepts_child(&self, role: &Role) -> bool {
        *role == Role::File
    }
}
