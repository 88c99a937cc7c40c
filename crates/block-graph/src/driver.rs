//! The driver trait and the types requests use.
//!
//! # Writing a driver
//!
//! A driver is a `Send + Sync` value created by a factory registered with
//! [`crate::Graph::register_driver`]. The factory receives an
//! [`crate::OpenContext`]: it opens its children from the options
//! (`ctx.open_child("file", Role::File, true)`), parses its own options with the
//! typed `ctx.options().take_*` methods, and returns `Box<dyn Driver>`; leftover
//! options are refused by the graph.
//!
//! Every driver method receives the `&Node` it serves. Reach children only through
//! it, at request time (`node.child(&Role::File)`, `node.backing()`): edges change
//! at run time (replace, filters), so never keep a child `NodeRef` in the driver.
//! Requests to children go through the child's door (`child.read(...)`).
//!
//! The graph already checked bounds, permissions and alignment, counted the
//! request in flight and serialised it; the driver only moves bytes.
//!
//! A format driver can answer only [`Driver::block_status`] (where does a range
//! live: in a child at an offset, zero, or unallocated so ask the backing) and
//! implement `write`; the default [`Driver::read`] then reads through the mapping
//! with [`read_via_mapping`] and walks the backing chain.
//!
//! ```
//! use block_graph::{Driver, Graph, Node, OpenContext, Result, Role, WriteFlags};
//! use serde_json::json;
//!
//! /// A filter counting the writes that pass through it.
//! struct Counter(std::sync::atomic::AtomicU64);
//!
//! impl Driver for Counter {
//!     fn format_name(&self) -> &str { "counter" }
//!     fn length(&self, node: &Node) -> Result<u64> { Ok(node.file().map_or(0, |f| f.len())) }
//!     fn read(&self, node: &Node, off: u64, buf: &mut [u8]) -> Result<()> {
//!         node.file().expect("opened with a file child").read(off, buf)
//!     }
//!     fn write(&self, node: &Node, off: u64, buf: &[u8], f: WriteFlags) -> Result<()> {
//!         self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
//!         node.file().expect("opened with a file child").write(off, buf, f)
//!     }
//!     fn is_filter(&self) -> bool { true }
//! }
//!
//! let g = Graph::new();
//! g.register_driver("counter", |ctx: &mut OpenContext<'_>| {
//!     ctx.open_child("file", Role::File, true)?;
//!     Ok(Box::new(Counter(Default::default())))
//! });
//! let disk = g.add_node(&json!({"driver": "memory", "node-name": "disk", "size": 4096})).unwrap();
//! let guest = g.new_backend(&disk, block_graph::PermPair::READ_WRITE).unwrap();
//! // Put the filter above the disk: the backend now writes through it.
//! let f = g.add_node(&json!({"driver": "counter", "node-name": "cnt", "file": "disk"})).unwrap();
//! g.insert_filter_above(&disk, &f).unwrap();
//! guest.write(0, b"hi", WriteFlags::default()).unwrap();
//! assert_eq!(f.driver_as::<Counter>().unwrap().0.load(std::sync::atomic::Ordering::Relaxed), 1);
//! g.remove_filter(&f).unwrap();
//! ```

use crate::error::{Error, ErrorKind, Result};
use crate::node::Node;
use crate::perm::{PermPair, Perms};
use std::any::Any;
use std::fmt;

/// The role of a child edge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The protocol/storage child (`file`); for filters the filtered child.
    File,
    /// The backing (copy-on-write source) child.
    Backing,
    /// A numbered child (`children.N`, quorum).
    Child(u32),
    /// Any other named role (e.g. `target` of copy-before-write, or the
    /// replication filter's extra children).
    Named(String),
}

impl Role {
    /// Parses `file`, `backing`, `children.N` or any other name.
    pub fn parse(s: &str) -> Role {
        match s {
            "file" => Role::File,
            "backing" => Role::Backing,
            _ => match s
                .strip_prefix("children.")
                .and_then(|n| n.parse::<u32>().ok())
            {
                Some(n) => Role::Child(n),
                None => Role::Named(s.to_string()),
            },
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::File => f.write_str("file"),
            Role::Backing => f.write_str("backing"),
            Role::Child(n) => write!(f, "children.{n}"),
            Role::Named(s) => f.write_str(s),
        }
    }
}

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is durable when the write returns.
    pub fua: bool,
}

impl WriteFlags {
    /// FUA write.
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The range may be deallocated as long as it reads back as zeros.
    pub may_unmap: bool,
    /// Fail with NotSupported instead of falling back to writing zero buffers.
    pub no_fallback: bool,
    /// Force unit access.
    pub fua: bool,
}

/// Where a range of a node lives, as answered by [`Driver::block_status`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Mapping {
    /// Allocated in this node; the driver holds the data itself (read via the driver).
    Data,
    /// Allocated in this node; the data is in child `role` at `offset`.
    Child {
        /// The child holding the data.
        role: Role,
        /// Offset in that child.
        offset: u64,
    },
    /// Allocated in this node, reads as zeros.
    Zero,
    /// Not allocated in this node: the content is the backing's (zeros without one).
    Unallocated,
}

impl Mapping {
    /// True for everything but [`Mapping::Unallocated`].
    pub fn is_allocated(&self) -> bool {
        !matches!(self, Mapping::Unallocated)
    }
}

/// A mapping and the length of the run it covers (at least 1 byte, at most what
/// was asked).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlockStatus {
    /// Where the run lives.
    pub mapping: Mapping,
    /// Length of the run in bytes.
    pub len: u64,
}

/// What a reopen changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReopenOpts {
    /// The new read-only flag.
    pub read_only: bool,
}

/// Gives `&dyn Any` for any driver (blanket-implemented; lets
/// `Node::driver_as` downcast without trait upcasting).
pub trait AsAny {
    /// `self` as `&dyn Any`.
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The interface every block driver implements. See the module docs.
///
/// Optional capabilities default to a clear [`ErrorKind::NotSupported`] error.
pub trait Driver: AsAny + Send + Sync + 'static {
    /// The driver name (`"memory"`, `"qcow2"`, ...).
    fn format_name(&self) -> &str;

    /// The node's length in bytes (asked at open and after truncate; the node caches it).
    fn length(&self, node: &Node) -> Result<u64>;

    /// Reads `buf.len()` bytes at `offset`. Default: read through
    /// [`Driver::block_status`] with [`read_via_mapping`].
    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
        read_via_mapping(node, offset, buf)
    }

    /// Writes `buf` at `offset`.
    fn write(&self, node: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let _ = (offset, buf, flags);
        Err(not_supported(node, "write"))
    }

    /// Makes everything written so far durable. Default: flush every child.
    fn flush(&self, node: &Node) -> Result<()> {
        for (_, child) in node.children() {
            child.flush()?;
        }
        Ok(())
    }

    /// Hands metadata this driver caches in process memory to its children,
    /// without asking for durability (see [`Node::write_back`]). The node
    /// then does the same for every child. Default: nothing cached, nothing to do.
    fn write_back(&self, node: &Node) -> Result<()> {
        let _ = node;
        Ok(())
    }

    /// Discards a range (afterwards it reads as zeros). Default: not supported.
    fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(not_supported(node, "discard"))
    }

    /// Writes zeros efficiently. Default: not supported (the node then falls back
    /// to writing zero buffers unless `no_fallback`).
    fn write_zeroes(&self, node: &Node, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let _ = (offset, len, flags);
        Err(not_supported(node, "write_zeroes"))
    }

    /// Where `[offset, offset+len)` lives, for a run starting at `offset`.
    /// Default: a filter maps to its file child at the same offset; anything else
    /// reports the whole range as [`Mapping::Data`].
    fn block_status(&self, node: &Node, offset: u64, len: u64) -> Result<BlockStatus> {
        let _ = node;
        if self.is_filter() {
            Ok(BlockStatus {
                mapping: Mapping::Child {
                    role: Role::File,
                    offset,
                },
                len,
            })
        } else {
            Ok(BlockStatus {
                mapping: Mapping::Data,
                len,
            })
        }
    }

    /// Changes the length. Default: not supported.
    fn truncate(&self, node: &Node, len: u64) -> Result<()> {
        let _ = len;
        Err(not_supported(node, "truncate"))
    }

    /// Drops all content of this layer (COLO checkpoint). Default: not supported.
    fn make_empty(&self, node: &Node) -> Result<()> {
        Err(not_supported(node, "make_empty"))
    }

    /// True if [`Driver::make_empty`] is implemented, so a caller (the
    /// replication filter checking its active and hidden disks) can ask before
    /// relying on it. Default: false; override together with `make_empty`.
    fn supports_make_empty(&self) -> bool {
        false
    }

    /// True if this node passes data through to its [`Driver::filtered_child`] unchanged.
    fn is_filter(&self) -> bool {
        false
    }

    /// The role of the filtered child for filters (default [`Role::File`]).
    fn filtered_child(&self) -> Role {
        Role::File
    }

    /// Minimum alignment of offsets and lengths the driver accepts (power of two).
    fn request_alignment(&self) -> u64 {
        1
    }

    /// When true, writes, write-zeroes and discards on this node are serialising
    /// requests: overlapping ones run one at a time in arrival order (quorum uses
    /// this so all children see overlapping writes in one order).
    fn serialise_writes(&self) -> bool {
        false
    }

    /// The host file name behind this node, if it has one (used to resolve
    /// relative backing file names). Default: none; `Node::filename` then asks the
    /// file child.
    fn filename(&self) -> Option<String> {
        None
    }

    /// Called once when the node is removed or dropped. On
    /// `Graph::remove_node`/`remove_filter` it runs after the node was drained
    /// and marked removed, with its children still attached and without the
    /// graph lock held (unless the remover holds it); see `Graph::remove_node`.
    fn close(&self, node: &Node) {
        let _ = node;
    }

    /// What this node takes and shares on its child `role` when the node is
    /// read-only or not. Default: see [`default_child_perms`].
    fn child_perms(&self, role: &Role, read_only: bool) -> PermPair {
        default_child_perms(self.is_filter(), role, read_only)
    }

    /// Whether a child with this role may be attached at run time with
    /// `Graph::attach_child` (e.g. a format with backing support accepts
    /// [`Role::Backing`]). Default: no.
    fn accepts_child(&self, role: &Role) -> bool {
        let _ = role;
        false
    }

    /// `x-blockdev-change` add: validate `child` and choose its role. Default: not supported.
    fn prepare_add_child(&self, node: &Node, child: &Node) -> Result<Role> {
        let _ = child;
        Err(not_supported(node, "adding a child"))
    }

    /// `x-blockdev-change` remove: validate removing child `role`. Default: not supported.
    fn prepare_remove_child(&self, node: &Node, role: &Role) -> Result<()> {
        let _ = role;
        Err(not_supported(node, "removing a child"))
    }

    /// First phase of a reopen: check and prepare the change; nothing visible yet.
    fn reopen_prepare(&self, node: &Node, opts: &ReopenOpts) -> Result<()> {
        let _ = (node, opts);
        Ok(())
    }

    /// Second phase of a reopen: make the prepared change take effect (cannot fail).
    fn reopen_commit(&self, node: &Node, opts: &ReopenOpts) {
        let _ = (node, opts);
    }

    /// Undo a prepared reopen.
    fn reopen_abort(&self, node: &Node, opts: &ReopenOpts) {
        let _ = (node, opts);
    }

    /// Rewrite the backing file name recorded in the image (after commit/stream).
    /// Default: not supported.
    fn change_backing_file(
        &self,
        node: &Node,
        backing_file: Option<&str>,
        backing_fmt: Option<&str>,
    ) -> Result<()> {
        let _ = (backing_file, backing_fmt);
        Err(not_supported(node, "changing the backing file name"))
    }
}

/// The NotSupported error naming the node, its driver and the operation.
pub fn not_supported(node: &Node, what: &str) -> Error {
    Error::new(
        ErrorKind::NotSupported,
        format!("driver '{}' does not support {what}", node.driver_name()),
    )
    .with_node(node.name())
}

/// The default permissions on a child, after QEMU's defaults:
/// * [`Role::Backing`]: takes consistent read, shares everything;
/// * [`Role::Named`] children (e.g. a copy-before-write `target`): take read
///   (+ write and resize when writable), share everything;
/// * other children of filters (the filtered `file`): take consistent read,
///   share everything; the graph adds what the filter's own users take on its
///   filtered child (filters pass their users' permissions through, so
///   inserting one above a node never conflicts with the parents it takes over);
/// * data children (`file`, `children.N`) of non-filters: take read (+ write and
///   resize when writable), share consistent read, write-unchanged and graph-mod,
///   and also write and resize when read-only.
pub fn default_child_perms(is_filter: bool, role: &Role, read_only: bool) -> PermPair {
    let rw = if read_only {
        Perms::NONE
    } else {
        Perms::WRITE | Perms::RESIZE
    };
    match role {
        Role::Backing => PermPair {
            perm: Perms::CONSISTENT_READ,
            shared: Perms::ALL,
        },
        Role::Named(_) => PermPair {
            perm: Perms::CONSISTENT_READ | rw,
            shared: Perms::ALL,
        },
        _ if is_filter => PermPair {
            perm: Perms::CONSISTENT_READ,
            shared: Perms::ALL,
        },
        _ => {
            let mut shared = Perms::CONSISTENT_READ | Perms::WRITE_UNCHANGED | Perms::GRAPH_MOD;
            if read_only {
                shared = shared | Perms::WRITE | Perms::RESIZE;
            }
            PermPair {
                perm: Perms::CONSISTENT_READ | rw,
                shared,
            }
        }
    }
}

/// Reads through the driver's mapping: data in a child is read from that child,
/// zero runs are zero-filled, unallocated runs come from the backing chain
/// ([`read_backing`]). A [`Mapping::Data`] answer is an error here: a driver that
/// holds data itself must implement [`Driver::read`].
pub fn read_via_mapping(node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let off = offset + done as u64;
        let want = (buf.len() - done) as u64;
        let st = node.driver().block_status(node, off, want)?;
        if st.len == 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("block status at offset {off} returned an empty run"),
            )
            .with_node(node.name()));
        }
        let n = st.len.min(want) as usize;
        let part = &mut buf[done..done + n];
        match st.mapping {
            Mapping::Child { role, offset: coff } => {
                let child = node.child(&role).ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!("mapping names missing child '{role}'"),
                    )
                    .with_node(node.name())
                })?;
                child.read(coff, part)?;
            }
            Mapping::Zero => part.fill(0),
            Mapping::Unallocated => read_backing(node, off, part)?,
            Mapping::Data => {
                return Err(Error::new(
                    ErrorKind::NotSupported,
                    format!(
                        "driver '{}' maps data to itself but does not implement read",
                        node.driver_name()
                    ),
                )
                .with_node(node.name()))
            }
        }
        done += n;
    }
    Ok(())
}

/// Reads `buf` at `offset` from the node's backing child; bytes past the end of a
/// shorter backing, or everything when there is no backing, read as zeros.
pub fn read_backing(node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
    match node.backing() {
        None => {
            buf.fill(0);
            Ok(())
        }
        Some(b) => {
            let blen = b.len();
            let avail = blen.saturating_sub(offset).min(buf.len() as u64) as usize;
            if avail > 0 {
                b.read(offset, &mut buf[..avail])?;
            }
            buf[avail..].fill(0);
            Ok(())
        }
    }
}
