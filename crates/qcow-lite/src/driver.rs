//! The `qcow2` driver of block-graph: the image lives on the `file` child, the
//! backing is the `backing` child (any driver). Registered with [`register`].
//!
//! Options (`blockdev-add` shape): `file` (required), `backing` (a node name, a
//! definition, or `null` for none; when absent, the name in the image header
//! is resolved against the image's directory and opened read-only with the
//! header's backing format, probed when missing), `l2-cache-size` and
//! `refcount-cache-size` (bytes, as in QEMU).

use crate::error::{Error as QError, ErrorKind as QKind};
use crate::image::{BackingRead, Mapping as QMapping, OpenOptions, Qcow2};
use crate::storage::Storage;
use block_graph::{
    BlockStatus, Driver, Error, ErrorKind, Graph, Mapping, Node, NodeRef, OpenContext, ReopenOpts,
    Result, Role, WriteFlags, ZeroFlags,
};
use parking_lot::{Mutex, RwLock};
use serde_json::json;
use std::io;
use std::sync::{Arc, Weak};

/// Register the `qcow2` driver with `graph`.
pub fn register(graph: &Graph) {
    graph.register_driver("qcow2", Qcow2Driver::open);
}

/// A [`Storage`] over the `file` child of a qcow2 node. The child is looked up
/// again at every request of the node (edges change at run time) and only a
/// weak reference is kept between requests.
#[derive(Debug, Default)]
pub struct ChildStorage {
    file: RwLock<Weak<Node>>,
}

impl ChildStorage {
    fn bind(&self, file: &NodeRef) {
        let same = std::ptr::eq(self.file.read().as_ptr(), Arc::as_ptr(file));
        if !same {
            *self.file.write() = Arc::downgrade(file);
        }
    }

    fn node(&self) -> io::Result<NodeRef> {
        self.file
            .read()
            .upgrade()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "qcow2: 'file' child is gone"))
    }
}

fn to_io(e: Error) -> io::Error {
    let kind = match e.kind() {
        ErrorKind::PermissionDenied => io::ErrorKind::PermissionDenied,
        ErrorKind::NotSupported => io::ErrorKind::Unsupported,
        ErrorKind::InvalidArgument | ErrorKind::OutOfRange => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl Storage for ChildStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let f = self.node()?;
        let len = f.len();
        let avail = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        if avail > 0 {
            f.read(offset, &mut buf[..avail]).map_err(to_io)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let f = self.node()?;
        let end = offset + buf.len() as u64;
        if end > f.len() {
            f.truncate(end).map_err(to_io)?;
        }
        f.write(offset, buf, WriteFlags::default()).map_err(to_io)
    }
    fn flush(&self) -> io::Result<()> {
        self.node()?.flush().map_err(to_io)
    }
    /// A FUA write: the child makes this write durable (the file driver
    /// with `RWF_DSYNC`); a child that cannot is written and flushed.
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let f = self.node()?;
        let end = offset + buf.len() as u64;
        if end > f.len() {
            f.truncate(end).map_err(to_io)?;
        }
        match f.write(offset, buf, WriteFlags { fua: true }) {
            // A child without FUA (an NBD server that does not offer it).
            Err(e) if e.kind() == ErrorKind::NotSupported => {
                f.write(offset, buf, WriteFlags::default()).map_err(to_io)?;
                f.flush().map_err(to_io)
            }
            r => r.map_err(to_io),
        }
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.node()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.node()?.truncate(len).map_err(to_io)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let f = self.node()?;
        let end = (offset + len).min(f.len());
        if end <= offset {
            return Ok(());
        }
        f.discard(offset, end - offset).map_err(to_io)
    }
}

/// The backing child seen as a [`BackingRead`] (for one request).
struct NodeBacking(NodeRef);

impl BackingRead for NodeBacking {
    fn backing_len(&self) -> u64 {
        self.0.len()
    }
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> crate::Result<()> {
        self.0
            .read(offset, buf)
            .map_err(|e| QError::io(to_io(e), format!("backing read at {offset}")))
    }
}

fn conv(e: QError, node: &str) -> Error {
    let kind = match e.kind() {
        QKind::Io => ErrorKind::Io,
        QKind::InvalidImage | QKind::Corrupt => ErrorKind::Corrupt,
        QKind::Unsupported => ErrorKind::NotSupported,
        QKind::ReadOnly => ErrorKind::PermissionDenied,
        QKind::OutOfRange => ErrorKind::OutOfRange,
        QKind::InvalidArgument => ErrorKind::InvalidArgument,
    };
    Error::new(kind, e.to_string()).with_node(node)
}

/// The `qcow2` block driver.
pub struct Qcow2Driver {
    storage: Arc<ChildStorage>,
    img: RwLock<Arc<Qcow2<Arc<ChildStorage>>>>,
    cache: OpenOptions,
    /// Set by a reopen to read-write; the image is reopened writable at the next write.
    want_rw: Mutex<bool>,
    /// The read-only image prepared by a reopen to read-only.
    pending: Mutex<Option<Arc<Qcow2<Arc<ChildStorage>>>>>,
}

impl std::fmt::Debug for Qcow2Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Driver").finish_non_exhaustive()
    }
}

fn probe_format(file: &NodeRef) -> String {
    let mut magic = [0u8; 4];
    if file.len() >= 4 && file.read(0, &mut magic).is_ok() && magic == *b"QFI\xfb" {
        "qcow2".into()
    } else {
        "raw".into()
    }
}

impl Qcow2Driver {
    /// Open from options (see the module docs).
    pub fn open(ctx: &mut OpenContext<'_>) -> Result<Box<dyn Driver>> {
        let file = ctx
            .open_child("file", Role::File, true)?
            .ok_or_else(|| Error::invalid("driver 'qcow2' requires the option 'file'"))?;
        let backing_opt = ctx.take_child("backing", Role::Backing)?;
        let read_only = ctx.read_only();
        let o = ctx.options();
        let l2_bytes = o.take_u64("l2-cache-size")?;
        let rc_bytes = o.take_u64("refcount-cache-size")?;
        let storage = Arc::new(ChildStorage::default());
        storage.bind(&file);
        let name = ctx.node_name().to_string();
        // Cluster size is needed to turn cache bytes into tables: peek first.
        let probe = Qcow2::open(storage.clone(), true).map_err(|e| conv(e, &name))?;
        let cs = probe.cluster_size();
        let defaults = OpenOptions::default();
        let cache = OpenOptions {
            read_only,
            l2_cache_tables: l2_bytes
                .map_or(defaults.l2_cache_tables, |b| (b / cs).max(2) as usize),
            refcount_cache_tables: rc_bytes
                .map_or(defaults.refcount_cache_tables, |b| (b / cs).max(2) as usize),
        };
        let (bname, bfmt) = (probe.backing_file(), probe.backing_format());
        drop(probe);
        let img = Qcow2::open_with(storage.clone(), cache).map_err(|e| conv(e, &name))?;
        if let block_graph::ChildOption::Absent = backing_opt {
            if let Some(bname) = bname {
                let image_path = file.filename().ok_or_else(|| {
                    Error::invalid(format!(
                        "image names backing file '{bname}' but its file has no file name to resolve it against; give 'backing'"
                    ))
                    .with_node(&name)
                })?;
                let path =
                    block_graph::resolve_backing_path(std::path::Path::new(&image_path), &bname);
                let path_s = path.to_string_lossy().into_owned();
                let fmt = match bfmt {
                    Some(f) => f,
                    None => {
                        // Probe through a temporary file node definition.
                        let def = json!({"driver": "file", "filename": path_s, "read-only": true});
                        let g = ctx.graph().clone();
                        let tmp = g.add_node(&def).map_err(|e| e.context("backing probe"))?;
                        let f = probe_format(&tmp);
                        let _ = g.remove_node(tmp.name());
                        f
                    }
                };
                let def = json!({
                    "driver": fmt,
                    "read-only": true,
                    "file": {"driver": "file", "filename": path_s, "read-only": true},
                });
                ctx.open_definition(Role::Backing, &def)
                    .map_err(|e| e.context(format!("opening backing file '{bname}'")))?;
            }
        }
        Ok(Box::new(Qcow2Driver {
            storage,
            img: RwLock::new(Arc::new(img)),
            cache,
            want_rw: Mutex::new(false),
            pending: Mutex::new(None),
        }))
    }

    /// The image engine currently serving the node (for checks and tests).
    pub fn image(&self) -> Arc<Qcow2<Arc<ChildStorage>>> {
        self.img.read().clone()
    }

    fn enter(&self, node: &Node) -> Result<Arc<Qcow2<Arc<ChildStorage>>>> {
        let f = node.file().ok_or_else(|| {
            Error::new(ErrorKind::NotFound, "qcow2 node has no 'file' child").with_node(node.name())
        })?;
        self.storage.bind(&f);
        Ok(self.img.read().clone())
    }

    /// The image for a request that changes it: reopens writable after a reopen to read-write.
    ///
    /// The switch is lazy and done once, under `want_rw`: the image is read
    /// again under that lock, so a writer that queued behind the one doing the
    /// switch gets the new writable image, not the read-only one it saw first.
    fn enter_rw(&self, node: &Node) -> Result<Arc<Qcow2<Arc<ChildStorage>>>> {
        let img = self.enter(node)?;
        if !img.is_read_only() {
            return Ok(img);
        }
        let mut want = self.want_rw.lock();
        let cur = self.img.read().clone();
        if !*want || !cur.is_read_only() {
            return Ok(cur);
        }
        let opts = OpenOptions {
            read_only: false,
            ..self.cache
        };
        let rw = Arc::new(
            Qcow2::open_with(self.storage.clone(), opts).map_err(|e| conv(e, node.name()))?,
        );
        *self.img.write() = rw.clone();
        *want = false;
        Ok(rw)
    }
}

fn backing_of(node: &Node) -> Option<NodeBacking> {
    node.backing().map(NodeBacking)
}

impl Driver for Qcow2Driver {
    fn format_name(&self) -> &str {
        "qcow2"
    }

    fn length(&self, node: &Node) -> Result<u64> {
        Ok(self.enter(node)?.size())
    }

    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
        let img = self.enter(node)?;
        let b = backing_of(node);
        img.read(offset, buf, b.as_ref().map(|b| b as &dyn BackingRead))
            .map_err(|e| conv(e, node.name()))
    }

    fn write(&self, node: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let img = self.enter_rw(node)?;
        let b = backing_of(node);
        img.write(offset, buf, b.as_ref().map(|b| b as &dyn BackingRead))
            .map_err(|e| conv(e, node.name()))?;
        if flags.fua {
            img.flush().map_err(|e| conv(e, node.name()))?;
        }
        Ok(())
    }

    fn flush(&self, node: &Node) -> Result<()> {
        self.enter(node)?.flush().map_err(|e| conv(e, node.name()))
    }

    fn write_back(&self, node: &Node) -> Result<()> {
        self.enter(node)?
            .write_back()
            .map_err(|e| conv(e, node.name()))
    }

    /// block-graph's discard must read back as zeros afterwards (partial
    /// clusters included, and with a backing given only as a node), so it is
    /// an unmapping zero write here.
    fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        let img = self.enter_rw(node)?;
        let b = backing_of(node);
        img.write_zeroes(offset, len, true, b.as_ref().map(|b| b as &dyn BackingRead))
            .map_err(|e| conv(e, node.name()))
    }

    fn write_zeroes(&self, node: &Node, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let img = self.enter_rw(node)?;
        let b = backing_of(node);
        img.write_zeroes(
            offset,
            len,
            flags.may_unmap,
            b.as_ref().map(|b| b as &dyn BackingRead),
        )
        .map_err(|e| conv(e, node.name()))?;
        if flags.fua {
            img.flush().map_err(|e| conv(e, node.name()))?;
        }
        Ok(())
    }

    fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<BlockStatus> {
        let (m, run) = self
            .enter(node)?
            .map(offset, len)
            .map_err(|e| conv(e, node.name()))?;
        let mapping = match m {
            QMapping::Data { host_offset } => Mapping::Child {
                role: Role::File,
                offset: host_offset,
            },
            QMapping::Zero => Mapping::Zero,
            QMapping::Unallocated => Mapping::Unallocated,
        };
        Ok(BlockStatus {
            mapping,
            len: run.max(1),
        })
    }

    fn truncate(&self, node: &Node, len: u64) -> Result<()> {
        self.enter_rw(node)?
            .grow(len)
            .map_err(|e| conv(e, node.name()))
    }

    fn make_empty(&self, node: &Node) -> Result<()> {
        self.enter_rw(node)?
            .make_empty()
            .map_err(|e| conv(e, node.name()))
    }

    fn supports_make_empty(&self) -> bool {
        true
    }

    fn close(&self, node: &Node) {
        if let Some(f) = node.file() {
            self.storage.bind(&f);
        }
        // Errors cannot be reported from here; an unclean image is repaired on
        // its next read-write open.
        let _ = self.img.read().close();
    }

    fn accepts_child(&self, role: &Role) -> bool {
        *role == Role::Backing
    }

    fn change_backing_file(
        &self,
        node: &Node,
        backing_file: Option<&str>,
        backing_fmt: Option<&str>,
    ) -> Result<()> {
        self.enter_rw(node)?
            .set_backing_file(backing_file, backing_fmt)
            .map_err(|e| conv(e, node.name()))
    }

    fn reopen_prepare(&self, node: &Node, opts: &ReopenOpts) -> Result<()> {
        let img = self.enter(node)?;
        if opts.read_only && !img.is_read_only() {
            img.close().map_err(|e| conv(e, node.name()))?;
            let ro = Qcow2::open_with(
                self.storage.clone(),
                OpenOptions {
                    read_only: true,
                    ..self.cache
                },
            )
            .map_err(|e| conv(e, node.name()))?;
            *self.pending.lock() = Some(Arc::new(ro));
        }
        Ok(())
    }

    fn reopen_commit(&self, _node: &Node, opts: &ReopenOpts) {
        if opts.read_only {
            if let Some(ro) = self.pending.lock().take() {
                *self.img.write() = ro;
            }
            *self.want_rw.lock() = false;
        } else {
            *self.want_rw.lock() = true;
        }
    }

    fn reopen_abort(&self, _node: &Node, _opts: &ReopenOpts) {
        self.pending.lock().take();
    }
}
