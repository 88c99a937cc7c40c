//! NBD wire format: constants, and encoders/decoders for every message we send or receive.
//!
//! Everything is big-endian. Decoders work on fixed-size arrays or on option payloads
//! that the caller has already bounded (see [`MAX_OPTION_LEN`]), so no function here
//! ever sizes a buffer from an untrusted length.

use crate::error::{NbdError, Result};

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes of the greeting, and the magic of every option header.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: enter transmission with an export name (no error possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: export information without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Option: export information, then enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: 64-bit extended headers (not supported here).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: acknowledged, final.
pub const REP_ACK: u32 = 1;
/// Option reply: one export in a LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: one information item of INFO/GO.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Error bit of option replies.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option reply error: unsupported option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option reply error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option reply error: malformed option.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option reply error: not possible on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option reply error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option reply error: unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option reply error: server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option reply error: block size negotiation required.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option reply error: request too big.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Info item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info item: canonical name.
pub const INFO_NAME: u16 = 1;
/// Info item: description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the other flags are meaningful.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: read-only export.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: FLUSH supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: FUA supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational media.
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: TRIM supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: WRITE_ZEROES supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: DF supported.
pub const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flush/FUA visible across connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: RESIZE supported.
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
/// Transmission flag: CACHE supported.
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: FAST_ZERO supported.
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const CMD_TRIM: u16 = 4;
/// Command: cache (prefetch hint).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: WRITE_ZEROES must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: READ must not fragment.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: BLOCK_STATUS wants one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: WRITE_ZEROES must fail fast rather than be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Reply flag: last chunk.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk: nothing (only with DONE).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk: u64 offset + data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk: u64 offset + u32 hole size.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk: u32 context id + extent descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk: u32 error + u16 message length + message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Chunk: as ERROR, plus u64 offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Extent flag of `base:allocation`: unallocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// Extent flag of `base:allocation`: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// Error value: operation not permitted.
pub const EPERM: u32 = 1;
/// Error value: I/O error.
pub const EIO: u32 = 5;
/// Error value: out of memory.
pub const ENOMEM: u32 = 12;
/// Error value: invalid argument.
pub const EINVAL: u32 = 22;
/// Error value: no space.
pub const ENOSPC: u32 = 28;
/// Error value: value too large.
pub const EOVERFLOW: u32 = 75;
/// Error value: not supported.
pub const ENOTSUP: u32 = 95;
/// Error value: shutting down.
pub const ESHUTDOWN: u32 = 108;

/// The metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The id we give `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest READ/WRITE payload we accept or send (32 MiB, as qemu-nbd advertises).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Smallest block size we advertise.
pub const MIN_BLOCK: u32 = 1;
/// Preferred block size we advertise.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Longest string (export name, description, error message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Longest option payload we read; larger options are refused with ERR_TOO_BIG.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest structured chunk payload the client accepts for non-data chunks.
pub const MAX_CHUNK_META: u32 = 16 * 1024 * 1024;

/// Checks an export name: at most 4096 bytes of UTF-8 without NUL.
pub fn validate_export_name(name: &str) -> Result<()> {
    if name.len() > MAX_STRING {
        return Err(NbdError::new(
            crate::ErrorKind::InvalidName,
            format!(
                "export name is {} bytes, more than {MAX_STRING}",
                name.len()
            ),
        ));
    }
    if name.contains('\0') {
        return Err(NbdError::new(
            crate::ErrorKind::InvalidName,
            format!("export name {name:?} contains NUL"),
        ));
    }
    Ok(())
}

/// Decodes a string from the wire: length checked, UTF-8 and NUL-free.
pub fn decode_string(bytes: &[u8], what: &str) -> Result<String> {
    if bytes.len() > MAX_STRING {
        return Err(NbdError::protocol(format!(
            "{what} is {} bytes, more than {MAX_STRING}",
            bytes.len()
        )));
    }
    let s = std::str::from_utf8(bytes)
        .map_err(|_| NbdError::protocol(format!("{what} is not UTF-8")))?;
    if s.contains('\0') {
        return Err(NbdError::protocol(format!("{what} contains NUL")));
    }
    Ok(s.to_owned())
}

/// A bounds-checked reader over an option or chunk payload.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf, pos: 0 }
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes, or a protocol error if the payload is shorter.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(NbdError::protocol(format!(
                "payload truncated: need {n} bytes at {}, have {}",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next big-endian u16.
    pub fn u16(&mut self) -> Result<u16> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// The next big-endian u32.
    pub fn u32(&mut self) -> Result<u32> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// The next big-endian u64.
    pub fn u64(&mut self) -> Result<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A u32-length-prefixed string.
    pub fn string32(&mut self, what: &str) -> Result<String> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(NbdError::protocol(format!(
                "{what} length {n} exceeds {MAX_STRING}"
            )));
        }
        decode_string(self.bytes(n)?, what)
    }

    /// Fails unless the whole payload was consumed.
    pub fn finish(&self, what: &str) -> Result<()> {
        if self.remaining() != 0 {
            return Err(NbdError::protocol(format!(
                "{what}: {} trailing bytes",
                self.remaining()
            )));
        }
        Ok(())
    }
}

/// The server's 18-byte greeting.
pub fn encode_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Decodes the greeting; returns the handshake flags.
pub fn decode_greeting(b: &[u8; 18]) -> Result<u16> {
    let magic = u64::from_be_bytes(b[0..8].try_into().unwrap_or_default());
    let opt = u64::from_be_bytes(b[8..16].try_into().unwrap_or_default());
    if magic != NBDMAGIC {
        return Err(NbdError::protocol(format!(
            "bad server magic {magic:#x}, not an NBD server"
        )));
    }
    if opt != IHAVEOPT {
        return Err(NbdError::protocol(format!(
            "server speaks oldstyle or unknown negotiation ({opt:#x})"
        )));
    }
    Ok(u16::from_be_bytes([b[16], b[17]]))
}

/// An option request header (16 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Payload length that follows.
    pub len: u32,
}

impl OptionHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes a header; a wrong magic is a protocol error.
    pub fn decode(b: &[u8; 16]) -> Result<OptionHeader> {
        let mut c = Cursor::new(b);
        let magic = c.u64()?;
        if magic != IHAVEOPT {
            return Err(NbdError::protocol(format!("bad option magic {magic:#x}")));
        }
        Ok(OptionHeader {
            option: c.u32()?,
            len: c.u32()?,
        })
    }
}

/// An option reply header (20 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// Option being answered.
    pub option: u32,
    /// Reply type (`REP_*`).
    pub reply_type: u32,
    /// Payload length that follows.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.reply_type.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes a header; a wrong magic is a protocol error.
    pub fn decode(b: &[u8; 20]) -> Result<OptionReplyHeader> {
        let mut c = Cursor::new(b);
        let magic = c.u64()?;
        if magic != REPLY_MAGIC {
            return Err(NbdError::protocol(format!(
                "bad option reply magic {magic:#x}"
            )));
        }
        Ok(OptionReplyHeader {
            option: c.u32()?,
            reply_type: c.u32()?,
            len: c.u32()?,
        })
    }
}

/// Payload of INFO/GO: export name and the info items requested.
pub fn encode_info_request(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + name.len() + 2 * infos.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// Parses the payload of INFO/GO.
pub fn decode_info_request(data: &[u8]) -> Result<(String, Vec<u16>)> {
    let mut c = Cursor::new(data);
    let name = c.string32("export name")?;
    let n = c.u16()? as usize;
    if c.remaining() != 2 * n {
        return Err(NbdError::protocol(format!(
            "INFO/GO lists {n} items but carries {} bytes",
            c.remaining()
        )));
    }
    let mut infos = Vec::with_capacity(n);
    for _ in 0..n {
        infos.push(c.u16()?);
    }
    Ok((name, infos))
}

/// Payload of LIST_META_CONTEXT / SET_META_CONTEXT.
pub fn encode_meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Parses the payload of LIST_META_CONTEXT / SET_META_CONTEXT.
pub fn decode_meta_request(data: &[u8]) -> Result<(String, Vec<String>)> {
    let mut c = Cursor::new(data);
    let name = c.string32("export name")?;
    let n = c.u32()? as usize;
    // Each query needs at least its 4-byte length: bound n before allocating.
    if n > c.remaining() / 4 {
        return Err(NbdError::protocol(format!(
            "meta context request claims {n} queries in {} bytes",
            c.remaining()
        )));
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(c.string32("meta context query")?);
    }
    c.finish("meta context request")?;
    Ok((name, queries))
}

/// A transmission request (28-byte header; WRITE data follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub cmd: u16,
    /// Cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl Request {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Decodes a header; a wrong magic is a protocol error.
    pub fn decode(b: &[u8; 28]) -> Result<Request> {
        let mut c = Cursor::new(b);
        let magic = c.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(NbdError::protocol(format!("bad request magic {magic:#x}")));
        }
        Ok(Request {
            flags: c.u16()?,
            cmd: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            len: c.u32()?,
        })
    }
}

/// A simple reply header (16 bytes; READ data follows on success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Error value, 0 for success.
    pub error: u32,
    /// Cookie of the request.
    pub cookie: u64,
}

impl SimpleReply {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.error.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b
    }
}

/// A structured reply chunk header (20 bytes; payload follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Reply flags (`REPLY_FLAG_DONE`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub chunk_type: u16,
    /// Cookie of the request.
    pub cookie: u64,
    /// Payload length.
    pub len: u32,
}

impl ChunkHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.chunk_type.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A reply as the client first sees it: the magic decides which form follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple(SimpleReply),
    /// A structured chunk.
    Chunk(ChunkHeader),
}

/// Encodes an error chunk payload (u32 error, u16 message length, message).
pub fn encode_error_payload(errno: u32, msg: &str) -> Vec<u8> {
    let msg = truncate_str(msg, MAX_STRING);
    let mut v = Vec::with_capacity(6 + msg.len());
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg.as_bytes());
    v
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            cookie: 0x1122_3344_5566_7788,
            offset: 1 << 40,
            len: 65536,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&b).unwrap(), r);
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(
            Request::decode(&bad).unwrap_err().kind,
            crate::ErrorKind::Protocol
        );
    }

    #[test]
    fn greeting_bytes() {
        let g = encode_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
        assert_eq!(decode_greeting(&g).unwrap(), 3);
    }

    #[test]
    fn info_request_round_trip_and_bounds() {
        let p = encode_info_request("disk0", &[INFO_BLOCK_SIZE, INFO_NAME]);
        let (n, i) = decode_info_request(&p).unwrap();
        assert_eq!(n, "disk0");
        assert_eq!(i, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        // Name length larger than the payload.
        let mut bad = p.clone();
        bad[0..4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(decode_info_request(&bad).is_err());
        // Count not matching.
        let mut bad = p;
        let l = bad.len();
        bad[l - 5] = 9;
        assert!(decode_info_request(&bad).is_err());
    }

    #[test]
    fn meta_request_round_trip_and_bounds() {
        let p = encode_meta_request("x", &["base:allocation", "qemu:"]);
        let (n, q) = decode_meta_request(&p).unwrap();
        assert_eq!(n, "x");
        assert_eq!(q, vec!["base:allocation".to_owned(), "qemu:".to_owned()]);
        let mut bad = p.clone();
        bad[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_meta_request(&bad).is_err());
    }

    #[test]
    fn names_validated() {
        assert!(validate_export_name("disk0").is_ok());
        assert!(validate_export_name("").is_ok());
        assert!(validate_export_name("a\0b").is_err());
        assert!(validate_export_name(&"x".repeat(4097)).is_err());
        assert!(decode_string(&[0xff, 0xfe], "name").is_err());
    }

    #[test]
    fn error_payload_truncates_on_char_boundary() {
        let long = "é".repeat(3000);
        let p = encode_error_payload(EIO, &long);
        let l = u16::from_be_bytes([p[4], p[5]]) as usize;
        assert!(l <= MAX_STRING);
        assert!(std::str::from_utf8(&p[6..]).is_ok());
    }
}
