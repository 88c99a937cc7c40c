//! # block-graph
//!
//! The block layer every other crate stands on, after QEMU's: a [`Graph`] of
//! named [`Node`]s with typed child roles ([`Role`]), each opened by a [`Driver`]
//! from options in `blockdev-add` shape; one door for every request (bounds,
//! permissions, in-flight counting, drained sections, serialising tracked
//! requests, alignment padding, statistics); graph changes at run time
//! (attach, detach, replace, filter insertion, reopen) inside drained sections;
//! [`Backend`]s as users' handles; and the generic drivers `file`, `raw`,
//! `null-co`, `memory`, `blkdebug`, `quorum`.
//!
//! ```
//! use block_graph::{Graph, WriteFlags};
//! use serde_json::json;
//!
//! let g = Graph::new();
//! let base = g.add_node(&json!({"driver": "memory", "node-name": "base", "size": 1 << 20})).unwrap();
//! base.write(0, &[1u8; 512], WriteFlags::default()).unwrap();
//! let top = g.add_node(&json!({"driver": "memory", "node-name": "top", "backing": "base"})).unwrap();
//! let mut buf = [0u8; 512];
//! top.read(0, &mut buf).unwrap();
//! assert_eq!(buf, [1u8; 512]);
//! assert_eq!(g.is_allocated_above(&top, None, 0, 512).unwrap(), (true, 512));
//! assert_eq!(g.is_allocated_above(&top, Some(&base), 0, 512).unwrap(), (false, 512));
//! ```

pub mod backend;
mod clock;
pub mod driver;
pub mod drivers;
pub mod error;
pub mod graph;
pub mod node;
pub mod options;
pub mod perm;

pub use backend::Backend;
pub use driver::{
    default_child_perms, not_supported, read_backing, read_via_mapping, BlockStatus, Driver,
    Mapping, ReopenOpts, Role, WriteFlags, ZeroFlags,
};
pub use error::{Error, ErrorKind, Result};
pub use graph::{
    ChildOption, DrainGuard, DrainListener, DrainListenerGuard, DriverFactory, Graph, GraphEvent,
    OpenContext,
};
pub use node::{BlockerGuard, IoKind, NestedScope, Node, NodeRef, NodeStats, OpStats, SerialGuard};
pub use options::{resolve_backing_path, validate_node_name, OptionMap, MAX_BACKING_DEPTH};
pub use perm::{BlockOp, PermPair, Perms};
