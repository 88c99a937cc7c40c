//! NBD server targets: one client connection fed from the input
//! (`NbdServer::serve_io`). The exports are wrapped in [`Bounded`], which
//! panics if a request reaches the export beyond its size: the server
//! promises to check bounds before any export call.

use std::sync::Arc;

use nbd::protocol::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, OPT_GO, OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY, REQUEST_MAGIC,
};
use nbd::{Export, ExportOptions, Extent, MemExport, NbdServer, ServerConfig};

use crate::Bytes;

/// Size of the writable export "d".
pub const DISK_SIZE: u64 = 1 << 20;
/// Size of the read-only export "ro" (not a multiple of 4 KiB on purpose).
pub const RO_SIZE: u64 = 4096 + 512;

/// An export that asserts every call stays inside it.
pub struct Bounded {
    name: &'static str,
    inner: MemExport,
    read_only: bool,
}

impl Bounded {
    /// A memory export of `size` bytes named `name` (for the panic message).
    pub fn new(name: &'static str, size: u64, read_only: bool) -> Self {
        Bounded {
            name,
            inner: MemExport::new(size),
            read_only,
        }
    }

    fn check(&self, what: &str, offset: u64, len: u64) {
        let size = self.inner.size();
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= size),
            "NBD server let {what} at {offset}+{len} reach export '{}' of {size} bytes",
            self.name
        );
    }
}

impl Export for Bounded {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> nbd::Result<()> {
        self.check("a read", offset, buf.len() as u64);
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> nbd::Result<()> {
        assert!(
            !self.read_only,
            "a write reached read-only export '{}'",
            self.name
        );
        self.check("a write", offset, data.len() as u64);
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> nbd::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> nbd::Result<()> {
        assert!(
            !self.read_only,
            "a trim reached read-only export '{}'",
            self.name
        );
        self.check("a trim", offset, len);
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fast: bool) -> nbd::Result<()> {
        assert!(
            !self.read_only,
            "a write-zeroes reached read-only export '{}'",
            self.name
        );
        self.check("a write-zeroes", offset, len);
        self.inner.write_zeroes(offset, len, may_trim, fast)
    }
    fn block_status(&self, offset: u64, len: u64) -> nbd::Result<Vec<Extent>> {
        self.check("a block-status", offset, len);
        self.inner.block_status(offset, len)
    }
    fn cache(&self, offset: u64, len: u64) -> nbd::Result<()> {
        self.check("a cache", offset, len);
        self.inner.cache(offset, len)
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// A fresh server with a writable export "d" and a read-only export "ro".
pub fn new_server() -> NbdServer {
    let s = NbdServer::new(ServerConfig {
        workers_per_connection: 2,
        inflight_bytes: 4 << 20,
        ..ServerConfig::default()
    });
    s.add_export(
        "d",
        Arc::new(Bounded::new("d", DISK_SIZE, false)),
        ExportOptions::default(),
    )
    .expect("add export d");
    s.add_export(
        "ro",
        Arc::new(Bounded::new("ro", RO_SIZE, true)),
        ExportOptions {
            read_only: true,
            description: Some("read-only".into()),
        },
    )
    .expect("add export ro");
    s
}

/// The input as the whole client side of a connection, from the first byte
/// of the handshake.
pub fn server(data: &[u8]) {
    let s = new_server();
    let _ = s.serve_io(data, std::io::sink());
}

fn option(out: &mut Vec<u8>, opt: u32, payload: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The client's side of a valid handshake that ends in transmission on
/// `export`, with structured replies and `base:allocation` if asked.
pub fn handshake(export: &str, structured: bool) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    if structured {
        option(&mut out, OPT_STRUCTURED_REPLY, &[]);
        let mut meta = Vec::new();
        meta.extend_from_slice(&(export.len() as u32).to_be_bytes());
        meta.extend_from_slice(export.as_bytes());
        meta.extend_from_slice(&1u32.to_be_bytes());
        let ctx = b"base:allocation";
        meta.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
        meta.extend_from_slice(ctx);
        option(&mut out, OPT_SET_META_CONTEXT, &meta);
    }
    let mut go = Vec::new();
    go.extend_from_slice(&(export.len() as u32).to_be_bytes());
    go.extend_from_slice(export.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut out, OPT_GO, &go);
    out
}

/// Offsets and lengths near the edges of the exports and of the integers.
const EDGES: [u64; 12] = [
    0,
    1,
    511,
    4096,
    RO_SIZE - 1,
    RO_SIZE,
    DISK_SIZE - 4096,
    DISK_SIZE - 1,
    DISK_SIZE,
    DISK_SIZE + 1,
    u64::MAX - 511,
    u64::MAX,
];

/// A valid handshake (export and structured replies chosen by byte 0), then
/// requests built from the input: each record `type, flags, offset, length`
/// with offsets and lengths either raw or picked from the edges, and a write
/// payload of up to 4 KiB; byte 0 bit 2 sends the rest raw instead.
pub fn transmission(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mode = b.u8();
    let export = if mode & 1 == 0 { "d" } else { "ro" };
    let mut wire = handshake(export, mode & 2 != 0);
    if mode & 4 != 0 {
        wire.extend_from_slice(b.rest());
    } else {
        let mut handle = 0u64;
        let mut n = 0;
        while !b.is_empty() && n < 64 {
            n += 1;
            let ty = b.u8();
            let flags = b.u8();
            let sel = b.u8();
            let offset = if sel & 0x0f < 12 {
                EDGES[(sel & 0x0f) as usize]
            } else {
                b.u64()
            };
            let len: u32 = if sel >> 4 < 12 {
                EDGES[(sel >> 4) as usize] as u32
            } else {
                b.u32()
            };
            handle += 1;
            wire.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            wire.extend_from_slice(&u16::from(flags).to_be_bytes());
            wire.extend_from_slice(&u16::from(ty % 12).to_be_bytes());
            wire.extend_from_slice(&handle.to_be_bytes());
            wire.extend_from_slice(&offset.to_be_bytes());
            wire.extend_from_slice(&len.to_be_bytes());
            if ty % 12 == 1 {
                // NBD_CMD_WRITE: its payload (possibly short: the stream ends).
                let want = (len as usize).min(4096);
                wire.extend_from_slice(b.take(want));
            }
        }
    }
    let s = new_server();
    let _ = s.serve_io(&wire[..], std::io::sink());
}
