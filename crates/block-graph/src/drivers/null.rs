//! `null-co`: reads zeros, drops writes (for benchmarks). Options: `size`
//! (default 1 GiB), `read-zeroes` (default true; false leaves read buffers
//! untouched, like QEMU), `latency-ns` (sleep per request, default 0).

use crate::driver::{BlockStatus, Driver, Mapping, WriteFlags, ZeroFlags};
use crate::error::Result;
use crate::graph::OpenContext;
use crate::node::Node;
use std::time::Duration;

/// The `null-co` driver.
pub struct NullDriver {
    size: u64,
    read_zeroes: bool,
    latency: Duration,
}

impl NullDriver {
    /// Opens from options.
    pub fn open(ctx: &mut OpenContext<'_>) -> Result<Box<dyn Driver>> {
        let o = ctx.options();
        let size = o.take_u64("size")?.unwrap_or(1 << 30);
        let read_zeroes = o.take_bool("read-zeroes")?.unwrap_or(true);
        let latency = Duration::from_nanos(o.take_u64("latency-ns")?.unwrap_or(0));
        Ok(Box::new(NullDriver {
            size,
            read_zeroes,
            latency,
        }))
    }

    fn lat(&self) {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
    }
}

impl Driver for NullDriver {
    fn format_name(&self) -> &str {
        "null-co"
    }
    fn length(&self, _node: &Node) -> Result<u64> {
        Ok(self.size)
    }
    fn read(&self, _node: &Node, _offset: u64, buf: &mut [u8]) -> Result<()> {
        self.lat();
        if self.read_zeroes {
            buf.fill(0);
        }
        Ok(())
    }
    fn write(&self, _node: &Node, _offset: u64, _buf: &[u8], _flags: WriteFlags) -> Result<()> {
        self.lat();
        Ok(())
    }
    fn flush(&self, _node: &Node) -> Result<()> {
        self.lat();
        Ok(())
    }
    fn discard(&self, _node: &Node, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _node: &Node, _o: u64, _l: u64, _f: ZeroFlags) -> Result<()> {
        self.lat();
        Ok(())
    }
    fn block_status(&self, _node: &Node, _offset: u64, len: u64) -> Result<BlockStatus> {
        let mapping = if self.read_zeroes {
            Mapping::Zero
        } else {
            Mapping::Data
        };
        Ok(BlockStatus { mapping, len })
    }
}
