//! [`Backend`]: a user's handle on a node (what a guest device or an NBD export holds).

use crate::driver::{BlockStatus, WriteFlags, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};
use crate::node::{NestedScope, NodeRef};
use crate::perm::{PermPair, Perms};
use parking_lot::{Condvar, Mutex, RwLock};
use std::sync::Arc;
use std::thread::ThreadId;

#[derive(Default)]
struct Gate {
    quiesce: u32,
    owners: Vec<ThreadId>,
    in_flight: u64,
    waiters: u32,
}

pub(crate) struct BackendInner {
    pub(crate) id: u64,
    pub(crate) name: String,
    pub(crate) node: RwLock<NodeRef>,
    pub(crate) perms: PermPair,
    gate: Mutex<Gate>,
    cv: Condvar,
}

impl BackendInner {
    pub(crate) fn new(id: u64, name: String, node: NodeRef, perms: PermPair) -> BackendInner {
        BackendInner {
            id,
            name,
            node: RwLock::new(node),
            perms,
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
        }
    }

    pub(crate) fn drain_begin(&self, owner: ThreadId) {
        let mut g = self.gate.lock();
        g.quiesce += 1;
        g.owners.push(owner);
    }

    pub(crate) fn drain_wait(&self) {
        let mut g = self.gate.lock();
        while g.in_flight > 0 {
            g.waiters += 1;
            self.cv.wait(&mut g);
            g.waiters -= 1;
        }
    }

    pub(crate) fn drain_end(&self, owner: ThreadId) {
        let mut g = self.gate.lock();
        g.quiesce -= 1;
        if let Some(i) = g.owners.iter().position(|t| *t == owner) {
            g.owners.swap_remove(i);
        }
        if g.waiters > 0 {
            self.cv.notify_all();
        }
    }

    fn enter(&self) -> InFlight<'_> {
        let mut g = self.gate.lock();
        if g.quiesce > 0 {
            let me = std::thread::current().id();
            while g.quiesce > 0 && !g.owners.contains(&me) {
                g.waiters += 1;
                self.cv.wait(&mut g);
                g.waiters -= 1;
            }
        }
        g.in_flight += 1;
        InFlight(self)
    }
}

struct InFlight<'a>(&'a BackendInner);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut g = self.0.gate.lock();
        g.in_flight -= 1;
        if g.waiters > 0 {
            self.0.cv.notify_all();
        }
    }
}

/// A user's handle on a node, created with [`crate::Graph::new_backend`]. It
/// holds permissions on the node (checked against the node's other users when
/// created), follows the node when `Graph::replace_node` or a filter insertion
/// moves its users, and takes part in drained sections (requests are held at the
/// backend while its node is drained). Dropping it detaches it.
pub struct Backend {
    pub(crate) inner: Arc<BackendInner>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl Backend {
    /// The backend's name (given, or generated `#backendN`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The node this backend currently points at.
    pub fn node(&self) -> NodeRef {
        self.inner.node.read().clone()
    }

    /// The permissions this backend holds.
    pub fn perms(&self) -> PermPair {
        self.inner.perms
    }

    /// Length of the current node.
    pub fn len(&self) -> u64 {
        self.node().len()
    }

    /// True if the node has length 0.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn need(&self, p: Perms, what: &str) -> Result<()> {
        if self.inner.perms.perm.contains(p) {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "backend '{}' did not take the '{p}' permission needed for {what}",
                    self.inner.name
                ),
            )
            .with_node(self.node().name()))
        }
    }

    fn run<T>(&self, f: impl FnOnce(&NodeRef) -> Result<T>) -> Result<T> {
        let _g = self.inner.enter();
        let node = self.node();
        let _n = NestedScope::enter();
        f(&node)
    }

    /// Reads through the node's door.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.run(|n| n.read(offset, buf))
    }

    /// Writes through the node's door (needs the write permission).
    pub fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.need(Perms::WRITE, "write")?;
        self.run(|n| n.write(offset, buf, flags))
    }

    /// Flushes the node.
    pub fn flush(&self) -> Result<()> {
        self.run(|n| n.flush())
    }

    /// Discards a range (needs the write permission).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.need(Perms::WRITE, "discard")?;
        self.run(|n| n.discard(offset, len))
    }

    /// Writes zeros (needs the write permission).
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.need(Perms::WRITE, "write_zeroes")?;
        self.run(|n| n.write_zeroes(offset, len, flags))
    }

    /// Block status of the node itself.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.run(|n| n.block_status(offset, len))
    }

    /// Block status resolved through the backing chain (see `Graph::block_status_above`).
    pub fn block_status_above(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.run(|n| crate::graph::block_status_above(n, None, offset, len))
    }

    /// Resizes the node (needs the resize permission).
    pub fn truncate(&self, len: u64) -> Result<()> {
        self.need(Perms::RESIZE, "truncate")?;
        self.run(|n| n.truncate(len))
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let graph = self.node().graph.upgrade();
        let _l = graph.as_ref().map(|g| g.lock.lock());
        let node = self.node();
        node.backends.lock().retain(|b| b.id != self.inner.id);
    }
}
