//! NBD (Network Block Device): the protocol, a server that exports block devices
//! to QEMU, libnbd and the Linux client, and a client with reconnect.
//!
//! * [`protocol`]: wire constants and message encoders/decoders.
//! * [`server`]: [`NbdServer`] serving [`Export`]s over TCP and Unix sockets.
//! * [`blockdev`]: exporting block-graph nodes, and the `nbd` block driver.
//! * [`client`]: [`NbdClient`], pipelining requests from many threads over one
//!   connection and reconnecting when it is lost.

pub mod blockdev;
pub mod client;
pub mod error;
pub mod export;
pub mod protocol;
pub mod server;

pub use client::{list_exports, ClientConfig, ExportInfo, NbdClient, ServerAddr};
pub use error::{ErrorKind, NbdError, Result};
pub use export::{Export, Extent, FileExport, MemExport};
pub use server::{ExportOptions, NbdServer, RemoveMode, ServerConfig};
