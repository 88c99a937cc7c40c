//! `raw`: pass-through to the `file` child, optionally restricted to a window
//! (`offset`, `size`).

use crate::driver::{BlockStatus, Driver, Mapping, Role, WriteFlags, ZeroFlags};
use crate::error::{Error, ErrorKind, Result};
use crate::graph::OpenContext;
use crate::node::{Node, NodeRef};

/// The `raw` driver.
pub struct RawDriver {
    offset: u64,
    size: Option<u64>,
}

fn file(node: &Node) -> Result<NodeRef> {
    node.file().ok_or_else(|| {
        Error::new(ErrorKind::NotFound, "raw node has no 'file' child").with_node(node.name())
    })
}

impl RawDriver {
    /// Opens from options: `file` (required), `offset` (default 0), `size`
    /// (default: the rest of the file).
    pub fn open(ctx: &mut OpenContext<'_>) -> Result<Box<dyn Driver>> {
        let f = ctx
            .open_child("file", Role::File, true)?
            .ok_or_else(|| Error::invalid("driver 'raw' requires the option 'file'"))?;
        let o = ctx.options();
        let offset = o.take_u64("offset")?.unwrap_or(0);
        let size = o.take_u64("size")?;
        let flen = f.len();
        let end = offset.checked_add(size.unwrap_or(0));
        if offset > flen || end.map_or(true, |e| e > flen) {
            return Err(Error::invalid(format!(
                "driver 'raw': offset {offset} + size {} is beyond the end of '{}' ({flen})",
                size.unwrap_or(0),
                f.name()
            )));
        }
        Ok(Box::new(RawDriver { offset, size }))
    }
}

impl Driver for RawDriver {
    fn format_name(&self) -> &str {
        "raw"
    }
    fn length(&self, node: &Node) -> Result<u64> {
        match self.size {
            Some(s) => Ok(s),
            None => Ok(file(node)?.len().saturating_sub(self.offset)),
        }
    }
    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> Result<()> {
        file(node)?.read(self.offset + offset, buf)
    }
    fn write(&self, node: &Node, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        file(node)?.write(self.offset + offset, buf, flags)
    }
    fn flush(&self, node: &Node) -> Result<()> {
        file(node)?.flush()
    }
    fn discard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        file(node)?.discard(self.offset + offset, len)
    }
    fn write_zeroes(&self, node: &Node, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        file(node)?.write_zeroes(self.offset + offset, len, flags)
    }
    fn block_status(&self, _node: &Node, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            mapping: Mapping::Child {
                role: Role::File,
                offset: self.offset + offset,
            },
            len,
        })
    }
    fn truncate(&self, node: &Node, len: u64) -> Result<()> {
        if self.offset != 0 || self.size.is_some() {
            return Err(crate::driver::not_supported(
                node,
                "truncate with 'offset' or 'size'",
            ));
        }
        file(node)?.truncate(len)
    }
}
