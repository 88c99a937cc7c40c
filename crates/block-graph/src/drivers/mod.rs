//! The built-in drivers.

pub mod blkdebug;
mod fanout;
pub mod file;
pub mod memory;
pub mod null;
pub mod quorum;
pub mod raw;

use crate::graph::Graph;

pub(crate) fn register_builtin(g: &Graph) {
    g.register_driver("file", file::FileDriver::open);
    g.register_driver("raw", raw::RawDriver::open);
    g.register_driver("null-co", null::NullDriver::open);
    g.register_driver("memory", memory::MemoryDriver::open);
    g.register_driver("blkdebug", blkdebug::BlkDebug::open);
    g.register_driver("quorum", quorum::Quorum::open);
}
