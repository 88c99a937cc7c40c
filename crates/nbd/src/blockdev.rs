//! Integration with `block-graph`: exporting a node (through a backend) from the
//! server, and the `nbd` client driver, registered under QEMU's driver name with
//! QEMU's options.
//!
//! ```json
//! {"driver": "nbd", "node-name": "remote",
//!  "server": {"type": "unix", "path": "/run/nbd.sock"},   // or {"type": "inet", "host": "127.0.0.1", "port": "10809"}
//!  "export": "disk0", "reconnect-delay": 5}
//! ```

use std::sync::Arc;
use std::time::Duration;

use block_graph::{
    BlockStatus, Driver, Graph, Mapping, Node, OpenContext, PermPair, Perms, WriteFlags, ZeroFlags,
};

use crate::client::{ClientConfig, NbdClient, ServerAddr};
use crate::error::{ErrorKind, NbdError, Result};
use crate::export::{Export, Extent};
use crate::server::{ExportOptions, NbdServer};

/// Most extents one BLOCK_STATUS answer collects from the graph (the client asks
/// again from where they end), so a reply's cost follows the allocation, not the size.
const MAX_EXTENTS: usize = 1024;

fn from_graph(e: block_graph::Error) -> NbdError {
    use block_graph::ErrorKind as G;
    let kind = match e.kind() {
        G::Io | G::Corrupt | G::NotFound | G::Busy | G::Cancelled => ErrorKind::Io,
        G::NoSpace => ErrorKind::NoSpace,
        G::PermissionDenied => ErrorKind::PermissionDenied,
        G::InvalidArgument | G::OutOfRange => ErrorKind::InvalidArgument,
        G::NotSupported => ErrorKind::NotSupported,
    };
    NbdError::new(kind, e.to_string())
}

fn to_graph(e: NbdError, node: &Node) -> block_graph::Error {
    use block_graph::ErrorKind as G;
    let kind = match e.kind {
        ErrorKind::PermissionDenied => G::PermissionDenied,
        ErrorKind::InvalidArgument | ErrorKind::Overflow => G::InvalidArgument,
        ErrorKind::NoSpace => G::NoSpace,
        ErrorKind::NotSupported => G::NotSupported,
        _ => G::Io,
    };
    block_graph::Error::new(kind, e.to_string()).with_node(node.name())
}

/// A block-graph [`block_graph::Backend`] exported over NBD: every request goes
/// through the node's door (bounds, permissions, drains, serialisation).
pub struct BackendExport {
    backend: block_graph::Backend,
    writable: bool,
}

impl BackendExport {
    /// Wraps a backend; it is exported writable only if it holds the write permission.
    pub fn new(backend: block_graph::Backend) -> BackendExport {
        let writable = backend.perms().perm.contains(Perms::WRITE);
        BackendExport { backend, writable }
    }

    /// The wrapped backend.
    pub fn backend(&self) -> &block_graph::Backend {
        &self.backend
    }
}

impl Export for BackendExport {
    fn size(&self) -> u64 {
        self.backend.len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.backend.read(offset, buf).map_err(from_graph)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.backend
            .write(offset, data, WriteFlags { fua })
            .map_err(from_graph)
    }

    fn flush(&self) -> Result<()> {
        self.backend.flush().map_err(from_graph)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        match self.backend.discard(offset, len) {
            // A hint: a node that cannot discard simply keeps its data.
            Err(e) if e.kind() == block_graph::ErrorKind::NotSupported => Ok(()),
            r => r.map_err(from_graph),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fast: bool) -> Result<()> {
        self.backend
            .write_zeroes(
                offset,
                len,
                ZeroFlags {
                    may_unmap: may_trim,
                    no_fallback: fast,
                    fua: false,
                },
            )
            .map_err(from_graph)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end && out.len() < MAX_EXTENTS {
            let st = self
                .backend
                .block_status_above(pos, end - pos)
                .map_err(from_graph)?;
            let l = st.len.min(end - pos);
            if l == 0 {
                return Err(NbdError::new(
                    ErrorKind::Io,
                    format!("block status at {pos} returned an empty run"),
                ));
            }
            let (hole, zero) = match st.mapping {
                Mapping::Unallocated => (true, true),
                Mapping::Zero => (false, true),
                Mapping::Data | Mapping::Child { .. } => (false, false),
            };
            match out.last_mut() {
                Some(x) if x.hole == hole && x.zero == zero => x.len += l,
                _ => out.push(Extent { len: l, hole, zero }),
            }
            pos += l;
        }
        Ok(out)
    }

    fn is_read_only(&self) -> bool {
        !self.writable || self.backend.node().is_read_only()
    }

    fn can_multi_conn(&self) -> bool {
        true
    }
}

/// Exports node `node_name` of `graph` under `export_name`: creates a backend on
/// the node (read-write unless `read_only`, refused on a permission conflict) and
/// adds it to the server.
pub fn export_node(
    server: &NbdServer,
    graph: &Graph,
    node_name: &str,
    export_name: &str,
    read_only: bool,
    description: Option<String>,
) -> Result<()> {
    crate::protocol::validate_export_name(export_name)?;
    let node = graph.node(node_name).map_err(from_graph)?;
    let perms = if read_only {
        PermPair::READ_ONLY
    } else {
        PermPair::READ_WRITE
    };
    let backend = graph
        .new_backend_named(&format!("nbd-export-{export_name}"), &node, perms)
        .map_err(from_graph)?;
    server.add_export(
        export_name,
        Arc::new(BackendExport::new(backend)),
        ExportOptions {
            read_only,
            description,
        },
    )
}

/// The `nbd` block driver: a node whose contents live on an NBD server.
pub struct NbdDriver {
    client: NbdClient,
}

impl NbdDriver {
    /// The connection this node uses.
    pub fn client(&self) -> &NbdClient {
        &self.client
    }

    /// Parses QEMU's options (`server`, `export`, `reconnect-delay`) and connects.
    pub fn open(ctx: &mut OpenContext<'_>) -> block_graph::Result<Box<dyn Driver>> {
        let read_only = ctx.read_only();
        let node_name = ctx.node_name().to_owned();
        let o = ctx.options();
        let mut server = o
            .take_object("server")?
            .ok_or_else(|| o.missing("server"))?;
        let export = o.take_str("export")?.unwrap_or_default();
        let delay = o.take_u64("reconnect-delay")?.unwrap_or(0);
        let ty = server
            .take_enum("type", &["unix", "inet"])?
            .ok_or_else(|| server.missing("type"))?;
        let addr = if ty == "unix" {
            ServerAddr::Unix(server.require_str("path")?.into())
        } else {
            let host = server.require_str("host")?;
            // QEMU's InetSocketAddress has the port as a string; accept a number too.
            let port = match server.take_value("port") {
                Some(serde_json::Value::String(s)) => s.parse::<u16>().ok(),
                Some(serde_json::Value::Number(n)) => {
                    n.as_u64().and_then(|n| u16::try_from(n).ok())
                }
                _ => None,
            }
            .ok_or_else(|| {
                block_graph::Error::invalid(
                    "driver 'nbd': server.port must be a port number (string or integer)",
                )
            })?;
            ServerAddr::Tcp(host, port)
        };
        server.finish()?;
        // Refuse unknown options before connecting, so the error names them.
        if let Some(k) = o.remaining_keys().first() {
            return Err(block_graph::Error::invalid(format!(
                "driver 'nbd' does not support the option '{k}'"
            )));
        }
        let client = NbdClient::connect_with(ClientConfig {
            addr,
            export,
            reconnect_delay: Duration::from_secs(delay),
        })
        .map_err(|e| {
            let kind = if e.kind == ErrorKind::UnknownExport {
                block_graph::ErrorKind::NotFound
            } else {
                block_graph::ErrorKind::Io
            };
            block_graph::Error::new(kind, e.to_string()).with_node(node_name.clone())
        })?;
        if !read_only && client.info().read_only() {
            return Err(block_graph::Error::new(
                block_graph::ErrorKind::PermissionDenied,
                "NBD export is read-only; open the node with read-only=true",
            )
            .with_node(node_name));
        }
        Ok(Box::new(NbdDriver { client }))
    }
}

/// Registers the `nbd` driver with `graph`.
pub fn register(graph: &Graph) {
    graph.register_driver("nbd", NbdDriver::open);
}

impl Driver for NbdDriver {
    fn format_name(&self) -> &str {
        "nbd"
    }

    fn length(&self, _node: &Node) -> block_graph::Result<u64> {
        Ok(self.client.size())
    }

    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> block_graph::Result<()> {
        self.client.read(offset, buf).map_err(|e| to_graph(e, node))
    }

    fn write(
        &self,
        node: &Node,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> block_graph::Result<()> {
        self.client
            .write(offset, buf, flags.fua)
            .map_err(|e| to_graph(e, node))
    }

    fn flush(&self, node: &Node) -> block_graph::Result<()> {
        self.client.flush().map_err(|e| to_graph(e, node))
    }

    fn discard(&self, node: &Node, offset: u64, len: u64) -> block_graph::Result<()> {
        self.client
            .trim(offset, len, false)
            .map_err(|e| to_graph(e, node))
    }

    fn write_zeroes(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> block_graph::Result<()> {
        self.client
            .write_zeroes(offset, len, !flags.may_unmap, flags.no_fallback, flags.fua)
            .map_err(|e| to_graph(e, node))
    }

    fn block_status(&self, node: &Node, offset: u64, len: u64) -> block_graph::Result<BlockStatus> {
        let ext = self
            .client
            .block_status(offset, len)
            .map_err(|e| to_graph(e, node))?;
        let first = ext[0];
        let mapping = if first.zero {
            Mapping::Zero
        } else {
            Mapping::Data
        };
        Ok(BlockStatus {
            mapping,
            len: first.len.min(len),
        })
    }

    fn request_alignment(&self) -> u64 {
        self.client.info().min_block.max(1) as u64
    }

    fn close(&self, _node: &Node) {
        self.client.close();
    }
}
