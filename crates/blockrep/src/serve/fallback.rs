//! Drivers the daemon needs that the lower crates may not register yet:
//! `nbd` comes from `nbd::blockdev`; `qcow2` is registered here over
//! `qcow-lite`'s format engine unless a `qcow2` driver is already
//! registered. The image file is the node's `file` child; the backing is
//! the `backing` child (a name, a nested definition, `null` for none, or
//! absent: then opened from the image header, read-only, relative names
//! resolved against the image's directory).

use std::io;
use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use block_graph::{
    BlockStatus, Driver, Error, ErrorKind, Graph, Mapping, Node, NodeRef, OpenContext, ReopenOpts,
    Result, Role, WriteFlags, ZeroFlags,
};
use qcow_lite::{BackingRead, OpenOptions, Qcow2, Storage};
use serde_json::json;

/// Registers the drivers the graph lacks.
pub(crate) fn register_missing(g: &Graph) {
    let names = g.driver_names();
    if !names.iter().any(|n| n == "nbd") {
        nbd::blockdev::register(g);
    }
    if !names.iter().any(|n| n == "qcow2") {
        g.register_driver("qcow2", Qcow2Driver::open);
    }
}

/// The image file as `qcow-lite` storage: the `file` child node.
struct ChildStorage(NodeRef);

fn io_err(e: Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl Storage for ChildStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = self.0.len();
        let end = offset.saturating_add(buf.len() as u64);
        if end <= len {
            return self.0.read(offset, buf).map_err(io_err);
        }
        let inside = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[inside..].fill(0);
        if inside > 0 {
            self.0.read(offset, &mut buf[..inside]).map_err(io_err)?;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.0.len() {
            self.0.truncate(end).map_err(io_err)?;
        }
        self.0
            .write(offset, buf, WriteFlags::default())
            .map_err(io_err)
    }
    fn flush(&self) -> io::Result<()> {
        self.0.flush().map_err(io_err)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.truncate(len).map_err(io_err)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard(offset, len).map_err(io_err)
    }
}

/// The backing node as `qcow-lite`'s backing reader.
struct NodeBacking(NodeRef);

impl BackingRead for NodeBacking {
    fn backing_len(&self) -> u64 {
        self.0.len()
    }
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> qcow_lite::Result<()> {
        self.0.read(offset, buf).map_err(|e| {
            qcow_lite::Error::io(
                io::Error::from_raw_os_error(e.errno()),
                format!("backing read at {offset}: {e}"),
            )
        })
    }
}

type Image = Arc<Qcow2<ChildStorage>>;

/// The `qcow2` driver over `qcow-lite`. The image is reopened (read-only or
/// read-write) by swapping it under the lock.
struct Qcow2Driver {
    image: RwLock<Image>,
    file: NodeRef,
    pending: Mutex<Option<Image>>,
}

fn qerr(node: &str, e: qcow_lite::Error) -> Error {
    let kind = match e.kind() {
        qcow_lite::ErrorKind::Unsupported => ErrorKind::NotSupported,
        qcow_lite::ErrorKind::Corrupt => ErrorKind::Corrupt,
        qcow_lite::ErrorKind::ReadOnly => ErrorKind::PermissionDenied,
        qcow_lite::ErrorKind::OutOfRange => ErrorKind::OutOfRange,
        qcow_lite::ErrorKind::InvalidArgument => ErrorKind::InvalidArgument,
        qcow_lite::ErrorKind::InvalidImage => ErrorKind::InvalidArgument,
        _ => ErrorKind::Io,
    };
    Error::new(kind, e.to_string()).with_node(node)
}

impl Qcow2Driver {
    fn open(ctx: &mut OpenContext<'_>) -> Result<Box<dyn Driver>> {
        let name = ctx.node_name().to_string();
        let file = ctx
            .open_child("file", Role::File, true)?
            .ok_or_else(|| Error::invalid("driver 'qcow2' requires the option 'file'"))?;
        let o = ctx.options();
        let lazy = o.take_bool("lazy-refcounts")?;
        let image = Qcow2::open_with(
            ChildStorage(file.clone()),
            OpenOptions {
                read_only: ctx.read_only(),
                ..OpenOptions::default()
            },
        )
        .map_err(|e| qerr(&name, e))?;
        if lazy == Some(true) && !image.lazy_refcounts() {
            return Err(Error::not_supported(
                "driver 'qcow2': enabling lazy-refcounts at open is not supported",
            ));
        }
        match ctx.take_child("backing", Role::Backing)? {
            block_graph::ChildOption::Node(_) | block_graph::ChildOption::Null => {}
            block_graph::ChildOption::Absent => {
                if let Some(b) = image.backing_file() {
                    let path = match file.filename() {
                        Some(f) => block_graph::resolve_backing_path(Path::new(&f), &b),
                        None => Path::new(&b).to_path_buf(),
                    };
                    let fmt = image.backing_format().unwrap_or_else(|| "raw".into());
                    let def = json!({
                        "driver": fmt,
                        "read-only": true,
                        "file": {"driver": "file", "filename": path.to_string_lossy()},
                    });
                    ctx.open_definition(Role::Backing, &def)?;
                }
            }
        }
        Ok(Box::new(Qcow2Driver {
            image: RwLock::new(Arc::new(image)),
            file,
            pending: Mutex::new(None),
        }))
    }

    fn img(&self) -> Image {
        self.image.read().clone()
    }

    fn backing(node: &Node) -> Option<NodeBacking> {
        node.backing().map(NodeBacking)
    }
}

impl Driver for Qcow2Driver {
    fn format_name(&self) -> &str {
        "qcow2"
    }
    fn length(&self, _node: &Node) -> Result<u64> {
        Ok(self.img().size())
    }
    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
        let b = Self::backing(node);
        self.img()
            .read(offset, buf, b.as_ref().map(|b| b as &dyn BackingRead))
            .map_err(|e| qerr(node.name(), e))
    }
    fn write(&self, node: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let b = Self::backing(node);
        self.img()
            .write(offset, buf, b.as_ref().map(|b| b as &dyn BackingRead))
            .map_err(|e| qerr(node.name(), e))?;
        if flags.fua {
            self.img().flush().map_err(|e| qerr(node.name(), e))?;
        }
        Ok(())
    }
    fn flush(&self, node: &Node) -> Result<()> {
        self.img().flush().map_err(|e| qerr(node.name(), e))
    }
    fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.img()
            .discard(offset, len)
            .map_err(|e| qerr(node.name(), e))
    }
    fn write_zeroes(&self, node: &Node, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let b = Self::backing(node);
        self.img()
            .write_zeroes(
                offset,
                len,
                flags.may_unmap,
                b.as_ref().map(|b| b as &dyn BackingRead),
            )
            .map_err(|e| qerr(node.name(), e))
    }
    fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<BlockStatus> {
        let (m, run) = self
            .img()
            .map(offset, len)
            .map_err(|e| qerr(node.name(), e))?;
        let mapping = match m {
            qcow_lite::Mapping::Data { host_offset } => Mapping::Child {
                role: Role::File,
                offset: host_offset,
            },
            qcow_lite::Mapping::Zero => Mapping::Zero,
            qcow_lite::Mapping::Unallocated => Mapping::Unallocated,
        };
        Ok(BlockStatus {
            mapping,
            len: run.clamp(1, len.max(1)),
        })
    }
    fn truncate(&self, node: &Node, len: u64) -> Result<()> {
        if len < self.img().size() {
            return Err(
                Error::not_supported("qcow2: shrinking is not supported").with_node(node.name())
            );
        }
        self.img().grow(len).map_err(|e| qerr(node.name(), e))
    }
    fn make_empty(&self, node: &Node) -> Result<()> {
        self.img().make_empty().map_err(|e| qerr(node.name(), e))
    }
    fn close(&self, node: &Node) {
        if !self.img().is_read_only() {
            if let Err(e) = self.img().close() {
                super::log::log_at!(Warn, "closing qcow2 node '{}': {e}", node.name());
            }
        }
    }
    fn accepts_child(&self, role: &Role) -> bool {
        *role == Role::Backing
    }
    fn reopen_prepare(&self, node: &Node, opts: &ReopenOpts) -> Result<()> {
        let cur = self.img();
        if cur.is_read_only() == opts.read_only {
            return Ok(());
        }
        cur.flush().map_err(|e| qerr(node.name(), e))?;
        let new = Qcow2::open_with(
            ChildStorage(self.file.clone()),
            OpenOptions {
                read_only: opts.read_only,
                ..OpenOptions::default()
            },
        )
        .map_err(|e| qerr(node.name(), e))?;
        *self.pending.lock() = Some(Arc::new(new));
        Ok(())
    }
    fn reopen_commit(&self, node: &Node, _opts: &ReopenOpts) {
        if let Some(new) = self.pending.lock().take() {
            let old = std::mem::replace(&mut *self.image.write(), new);
            if !old.is_read_only() {
                if let Err(e) = old.close() {
                    super::log::log_at!(Warn, "reopening qcow2 node '{}': {e}", node.name());
                }
            }
        }
    }
    fn reopen_abort(&self, _node: &Node, _opts: &ReopenOpts) {
        self.pending.lock().take();
    }
}
