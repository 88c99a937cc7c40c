//! The NBD client: one connection shared by many threads, requests pipelined and
//! matched to replies by cookie, and reconnection when the connection is lost.
//!
//! The receive side is a role, not a thread: a caller waiting for a reply reads
//! the socket itself while no other caller does, decoding simple and structured
//! replies and handing each finished one to its caller; when its own reply has
//! come it passes the role to another waiting caller. A lone request (a caller
//! at queue depth 1) is thus answered without waking a second thread. A watcher
//! thread sleeps until the peer hangs up: it lets the replies already sent reach
//! their callers, fails every other pending request with an internal
//! "disconnected" error, which callers turn into a retry on the next connection,
//! and reconnects. Callers
//! wait at most `reconnect_delay` (counted from the loss) for a new connection and
//! then fail with `EIO`. A write is acknowledged to its caller only after the server
//! acknowledged it, so nothing acknowledged is lost by a reconnect: unacknowledged
//! requests are simply sent again.

use std::collections::HashMap;
use std::io::{BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{ErrorKind, NbdError, Result};
use crate::export::Extent;
use crate::protocol::*;

/// How many times one request is sent again after losing its connection.
const MAX_RESENDS: u32 = 5;

/// How long the handshake may take before the attempt is abandoned.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp(String, u16),
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ServerAddr::Tcp(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// How to connect, and how long to hold requests while reconnecting.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server address.
    pub addr: ServerAddr,
    /// Export name.
    pub export: String,
    /// How long requests wait for a lost connection to come back before failing with EIO
    /// (QEMU's `reconnect-delay`; 0 fails them at once, reconnection still goes on).
    pub reconnect_delay: Duration,
}

/// What the server told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TFLAG_*`).
    pub flags: u16,
    /// Minimum block size.
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Maximum payload per READ/WRITE (capped at 32 MiB).
    pub max_block: u32,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Context id of `base:allocation`, if negotiated.
    pub base_allocation: Option<u32>,
}

impl ExportInfo {
    /// The export refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }
    fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }
}

#[derive(Debug)]
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn connect(addr: &ServerAddr) -> std::io::Result<Sock> {
        Ok(match addr {
            ServerAddr::Unix(p) => Sock::Unix(UnixStream::connect(p)?),
            ServerAddr::Tcp(h, port) => {
                let s = TcpStream::connect((h.as_str(), *port))?;
                s.set_nodelay(true)?;
                Sock::Tcp(s)
            }
        })
    }
    fn try_clone(&self) -> std::io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }
    fn shutdown(&self) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Both),
            Sock::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(bufs),
            Sock::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

enum ReplyData {
    None,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

struct Pending {
    req: Request,
    buf: Vec<u8>,
    covered: u64,
    extents: Vec<Extent>,
    error: Option<NbdError>,
    slot: Arc<ReplySlot>,
}

impl Drop for Pending {
    /// A request dropped unanswered (its connection went away) fails, so its
    /// caller never waits forever; a delivered reply is not replaced.
    fn drop(&mut self) {
        self.slot.send(Err(NbdError::new(
            ErrorKind::Disconnected,
            "connection lost",
        )));
    }
}

/// Where one request's reply is handed to its caller by whoever read it, and
/// where a caller is told that the receive side is free to take.
/// std's futex-based Mutex/Condvar (as in the server): a spin-and-yield
/// channel cost sched_yield calls on every reply on a busy 2-core machine.
#[derive(Default)]
struct ReplySlot {
    state: std::sync::Mutex<SlotState>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct SlotState {
    reply: Option<Result<ReplyData>>,
    /// The receive side was released while this request waited.
    nudged: bool,
}

impl ReplySlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Delivers `r` unless a reply was delivered already.
    fn send(&self, r: Result<ReplyData>) {
        let mut g = self.lock();
        if g.reply.is_none() {
            g.reply = Some(r);
            drop(g);
            self.ready.notify_one();
        }
    }

    /// Tells the waiting caller the receive side is free.
    fn nudge(&self) {
        self.lock().nudged = true;
        self.ready.notify_one();
    }

    fn has_reply(&self) -> bool {
        self.lock().reply.is_some()
    }

    /// The reply, if it came.
    fn take(&self) -> Option<Result<ReplyData>> {
        self.lock().reply.take()
    }

    /// Sleeps until the reply comes or the caller is nudged.
    fn wait(&self) {
        let mut g = self.lock();
        while g.reply.is_none() && !g.nudged {
            g = self
                .ready
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        g.nudged = false;
    }
}

struct Conn {
    info: ExportInfo,
    writer: Mutex<Sock>,
    ctl: Sock,
    /// The receive side: whoever holds it reads replies for every caller.
    rx: Mutex<BufReader<Sock>>,
    /// Pending requests by cookie; `None` once the connection died.
    pending: Mutex<Option<HashMap<u64, Pending>>>,
}

impl Conn {
    fn kill(&self) {
        self.ctl.shutdown();
    }

    /// Ends the connection: the watcher wakes, every pending request fails
    /// with "disconnected" (`Pending`'s drop) and is sent again by its caller.
    fn fail(&self) {
        self.kill();
        let map = self.pending.lock().take();
        drop(map);
    }

    /// Reads replies for everyone until `slot` has its reply; the caller holds `rx`.
    fn read_until(&self, rx: &mut BufReader<Sock>, slot: &ReplySlot) -> Result<()> {
        while !slot.has_reply() {
            read_reply(self, &mut *rx)?;
        }
        Ok(())
    }

    /// After releasing the receive side: if requests still wait, one of them
    /// takes it over (a caller that sent after the release takes it itself).
    fn pass_receive_side(&self) {
        let g = self.pending.lock();
        if let Some(p) = g.as_ref().and_then(|m| m.values().next()) {
            p.slot.nudge();
        }
    }
}

enum State {
    Connected(Arc<Conn>),
    Reconnecting { since: Instant },
    Closed(String),
}

struct Inner {
    config: ClientConfig,
    state: Mutex<State>,
    changed: Condvar,
    next_cookie: AtomicU64,
    closing: AtomicBool,
    reconnects: AtomicU64,
}

/// An NBD client connection, usable from many threads at once.
pub struct NbdClient {
    inner: Arc<Inner>,
    info: ExportInfo,
    watcher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn read_array<const N: usize, R: Read>(r: &mut R) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn net(ctx: &str) -> impl FnOnce(std::io::Error) -> NbdError + '_ {
    move |e| NbdError::new(ErrorKind::Disconnected, ctx.to_owned()).with_source(e)
}

impl NbdError {
    fn with_source(mut self, e: std::io::Error) -> NbdError {
        self.source = Some(e);
        self
    }
}

/// One option exchange: sends `opt` with `data`, calls `each` for every non-ACK
/// reply, returns Ok(None) on ACK or Ok(Some(error type, message)) on an error reply.
fn option<S: Read + Write>(
    s: &mut S,
    opt: u32,
    data: &[u8],
    mut each: impl FnMut(u32, &[u8]) -> Result<()>,
) -> Result<Option<(u32, String)>> {
    let mut msg = OptionHeader {
        option: opt,
        len: data.len() as u32,
    }
    .encode()
    .to_vec();
    msg.extend_from_slice(data);
    s.write_all(&msg).map_err(net("send option"))?;
    loop {
        let h =
            OptionReplyHeader::decode(&read_array::<20, _>(s).map_err(net("read option reply"))?)?;
        if h.option != opt {
            return Err(NbdError::protocol(format!(
                "reply for option {} while waiting for {opt}",
                h.option
            )));
        }
        if h.len > MAX_OPTION_LEN {
            return Err(NbdError::protocol(format!(
                "option reply of {} bytes",
                h.len
            )));
        }
        let mut p = vec![0u8; h.len as usize];
        s.read_exact(&mut p).map_err(net("read option reply"))?;
        if h.reply_type == REP_ACK {
            return Ok(None);
        }
        if h.reply_type & REP_FLAG_ERROR != 0 {
            let m = String::from_utf8_lossy(&p[..p.len().min(MAX_STRING)]).into_owned();
            return Ok(Some((h.reply_type, m)));
        }
        each(h.reply_type, &p)?;
    }
}

/// Connects and negotiates; returns the socket (in transmission phase) and the info.
fn negotiate(config: &ClientConfig) -> Result<(Sock, ExportInfo)> {
    let where_ = format!("NBD server {} export {:?}", config.addr, config.export);
    let mut s = Sock::connect(&config.addr).map_err(|e| {
        NbdError::new(ErrorKind::Disconnected, format!("connect to {where_}")).with_source(e)
    })?;
    // A server that accepts but never negotiates (e.g. qemu-nbd busy with another
    // client) must not hang us forever.
    s.set_read_timeout(Some(NEGOTIATION_TIMEOUT))
        .map_err(net("set timeout"))?;
    let g = read_array::<18, _>(&mut s).map_err(net("read greeting"))?;
    let hflags = decode_greeting(&g)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::protocol(format!(
            "{where_} does not speak fixed newstyle"
        )));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&cflags.to_be_bytes())
        .map_err(net("send flags"))?;

    let structured = option(&mut s, OPT_STRUCTURED_REPLY, &[], |_, _| Ok(()))?.is_none();
    let mut base_allocation = None;
    if structured {
        let q = encode_meta_request(&config.export, &[BASE_ALLOCATION]);
        let r = option(&mut s, OPT_SET_META_CONTEXT, &q, |t, p| {
            if t == REP_META_CONTEXT && p.len() >= 4 {
                let mut c = Cursor::new(p);
                let id = c.u32()?;
                if c.bytes(c.remaining())? == BASE_ALLOCATION.as_bytes() {
                    base_allocation = Some(id);
                }
            }
            Ok(())
        })?;
        if r.is_some() {
            base_allocation = None;
        }
    }
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_block: MAX_PAYLOAD,
        structured,
        base_allocation,
    };
    let mut got_export = false;
    let go = encode_info_request(&config.export, &[INFO_BLOCK_SIZE]);
    let r = option(&mut s, OPT_GO, &go, |t, p| {
        if t != REP_INFO {
            return Ok(());
        }
        let mut c = Cursor::new(p);
        match c.u16()? {
            INFO_EXPORT => {
                info.size = c.u64()?;
                info.flags = c.u16()?;
                got_export = true;
            }
            INFO_BLOCK_SIZE => {
                info.min_block = c.u32()?.max(1);
                info.preferred_block = c.u32()?;
                info.max_block = c.u32()?.clamp(info.min_block, MAX_PAYLOAD);
            }
            _ => {}
        }
        Ok(())
    })?;
    match r {
        None if got_export => {}
        None => {
            return Err(NbdError::protocol(format!(
                "{where_}: GO acknowledged without export information"
            )))
        }
        Some((REP_ERR_UNSUP, _)) => {
            // Old server: EXPORT_NAME, which can't fail politely.
            let mut msg = OptionHeader {
                option: OPT_EXPORT_NAME,
                len: config.export.len() as u32,
            }
            .encode()
            .to_vec();
            msg.extend_from_slice(config.export.as_bytes());
            s.write_all(&msg).map_err(net("send EXPORT_NAME"))?;
            let b = read_array::<10, _>(&mut s).map_err(|e| {
                NbdError::new(
                    ErrorKind::UnknownExport,
                    format!("{where_}: server closed on EXPORT_NAME"),
                )
                .with_source(e)
            })?;
            let mut c = Cursor::new(&b);
            info.size = c.u64()?;
            info.flags = c.u16()?;
            if !no_zeroes {
                read_array::<124, _>(&mut s).map_err(net("read padding"))?;
            }
        }
        Some((REP_ERR_UNKNOWN, m)) => {
            return Err(NbdError::new(
                ErrorKind::UnknownExport,
                format!("{where_}: {m}"),
            ))
        }
        Some((t, m)) => {
            return Err(NbdError::new(
                ErrorKind::Protocol,
                format!("{where_}: GO refused ({t:#x}): {m}"),
            ))
        }
    }
    s.set_read_timeout(None).map_err(net("clear timeout"))?;
    Ok((s, info))
}

/// Lists the exports of a server: (name, description).
pub fn list_exports(addr: &ServerAddr) -> Result<Vec<(String, String)>> {
    let mut s = Sock::connect(addr).map_err(|e| {
        NbdError::new(ErrorKind::Disconnected, format!("connect to {addr}")).with_source(e)
    })?;
    let g = read_array::<18, _>(&mut s).map_err(net("read greeting"))?;
    let hflags = decode_greeting(&g)?;
    let cflags = FLAG_C_FIXED_NEWSTYLE
        | if hflags & FLAG_NO_ZEROES != 0 {
            FLAG_C_NO_ZEROES
        } else {
            0
        };
    s.write_all(&cflags.to_be_bytes())
        .map_err(net("send flags"))?;
    let mut out = Vec::new();
    let r = option(&mut s, OPT_LIST, &[], |t, p| {
        if t == REP_SERVER {
            let mut c = Cursor::new(p);
            let name = c.string32("export name")?;
            let desc = decode_string(c.bytes(c.remaining())?, "description")?;
            out.push((name, desc));
        }
        Ok(())
    })?;
    let _ = option(&mut s, OPT_ABORT, &[], |_, _| Ok(()));
    if let Some((t, m)) = r {
        return Err(NbdError::protocol(format!("LIST refused ({t:#x}): {m}")));
    }
    Ok(out)
}

impl NbdClient {
    /// Connects to `export` at `addr` with no reconnect delay.
    pub fn connect(addr: ServerAddr, export: &str) -> Result<NbdClient> {
        NbdClient::connect_with(ClientConfig {
            addr,
            export: export.to_owned(),
            reconnect_delay: Duration::ZERO,
        })
    }

    /// Connects with full configuration. The first connection must succeed.
    pub fn connect_with(config: ClientConfig) -> Result<NbdClient> {
        validate_export_name(&config.export)?;
        let (sock, info) = negotiate(&config)?;
        let conn = Arc::new(make_conn(sock, info)?);
        let inner = Arc::new(Inner {
            config,
            state: Mutex::new(State::Connected(conn.clone())),
            changed: Condvar::new(),
            next_cookie: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
        });
        let inner2 = inner.clone();
        let watcher = std::thread::Builder::new()
            .name("nbd-client-watch".into())
            .spawn(move || watch_loop(inner2, conn))
            .map_err(|e| NbdError::io("spawn watcher thread", e))?;
        Ok(NbdClient {
            inner,
            info,
            watcher: Mutex::new(Some(watcher)),
        })
    }

    /// What the server said about the export at the first connection.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// How many times the connection was re-established.
    pub fn reconnect_count(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Whether a connection is up right now.
    pub fn is_connected(&self) -> bool {
        matches!(*self.inner.state.lock(), State::Connected(_))
    }

    fn wait_connected(&self) -> Result<Arc<Conn>> {
        let mut st = self.inner.state.lock();
        loop {
            match &*st {
                State::Connected(c) => return Ok(c.clone()),
                State::Closed(why) => {
                    return Err(NbdError::new(
                        ErrorKind::Io,
                        format!("NBD client closed: {why}"),
                    ))
                }
                State::Reconnecting { since } => {
                    let deadline = *since + self.inner.config.reconnect_delay;
                    if Instant::now() >= deadline {
                        return Err(NbdError::new(
                            ErrorKind::Io,
                            format!(
                                "connection to {} lost and not restored within reconnect-delay {:?}",
                                self.inner.config.addr, self.inner.config.reconnect_delay
                            ),
                        ));
                    }
                    self.inner.changed.wait_until(&mut st, deadline);
                }
            }
        }
    }

    /// Sends one request (retrying across reconnects) and waits for its reply.
    fn call(&self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Result<ReplyData> {
        let mut lost = 0;
        loop {
            let conn = self.wait_connected()?;
            let cookie = self.inner.next_cookie.fetch_add(1, Ordering::Relaxed);
            let req = Request {
                flags,
                cmd,
                cookie,
                offset,
                len,
            };
            let slot = Arc::new(ReplySlot::default());
            {
                let mut p = conn.pending.lock();
                let Some(map) = p.as_mut() else {
                    drop(p);
                    self.mark_lost(&conn);
                    continue;
                };
                map.insert(
                    cookie,
                    Pending {
                        req,
                        buf: if cmd == CMD_READ {
                            vec![0u8; len as usize]
                        } else {
                            Vec::new()
                        },
                        covered: 0,
                        extents: Vec::new(),
                        error: None,
                        slot: slot.clone(),
                    },
                );
            }
            let sent = {
                let mut w = conn.writer.lock();
                send_request(&mut w, &req.encode(), data)
            };
            if sent.is_err() {
                // Whoever reads next sees the dead socket and fails our entry.
                conn.kill();
            }
            match Self::wait_reply(&conn, &slot) {
                Ok(r) => return Ok(r),
                Err(e) if e.kind == ErrorKind::Disconnected => {
                    // Sent again on the next connection; a server that drops every
                    // connection while this request is in flight makes it fail.
                    lost += 1;
                    if lost >= MAX_RESENDS {
                        return Err(NbdError::new(
                            ErrorKind::Io,
                            format!("cmd {cmd} offset {offset} length {len}: connection lost {lost} times while in flight"),
                        ));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for the reply to a sent request, reading the socket itself
    /// while no other caller does.
    fn wait_reply(conn: &Conn, slot: &ReplySlot) -> Result<ReplyData> {
        loop {
            if let Some(r) = slot.take() {
                return r;
            }
            match conn.rx.try_lock() {
                Some(mut rx) => {
                    let r = conn.read_until(&mut rx, slot);
                    drop(rx);
                    if r.is_err() {
                        conn.fail();
                    }
                    conn.pass_receive_side();
                }
                None => slot.wait(),
            }
        }
    }

    fn mark_lost(&self, conn: &Arc<Conn>) {
        // Let the watcher thread move the state on; wait briefly for it.
        let mut st = self.inner.state.lock();
        if let State::Connected(c) = &*st {
            if Arc::ptr_eq(c, conn) {
                self.inner
                    .changed
                    .wait_for(&mut st, Duration::from_millis(10));
            }
        }
    }

    fn range_check(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.checked_add(len).is_some_and(|e| e <= self.info.size) {
            return Err(NbdError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "offset {offset} length {len} beyond the end of export {:?} ({} bytes)",
                    self.inner.config.export, self.info.size
                ),
            ));
        }
        Ok(())
    }

    fn need(&self, flag: u16, what: &str) -> Result<()> {
        if self.info.has(flag) {
            Ok(())
        } else {
            Err(NbdError::new(
                ErrorKind::NotSupported,
                format!("server does not support {what}"),
            ))
        }
    }

    /// Reads `buf.len()` bytes at `offset`, split at the server's maximum block size.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.range_check(offset, buf.len() as u64)?;
        let max = self.info.max_block as usize;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            match self.call(CMD_READ, 0, offset + done as u64, n as u32, &[])? {
                ReplyData::Data(d) => buf[done..done + n].copy_from_slice(&d),
                _ => return Err(NbdError::protocol("READ answered without data")),
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset`; `fua` makes it durable before returning.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.range_check(offset, data.len() as u64)?;
        let flags = if fua {
            self.need(TFLAG_SEND_FUA, "FUA")?;
            CMD_FLAG_FUA
        } else {
            0
        };
        let max = self.info.max_block as usize;
        for (i, chunk) in data.chunks(max).enumerate() {
            let off = offset + (i * max) as u64;
            self.call(CMD_WRITE, flags, off, chunk.len() as u32, chunk)?;
        }
        Ok(())
    }

    /// Flushes the server's caches.
    pub fn flush(&self) -> Result<()> {
        self.need(TFLAG_SEND_FLUSH, "FLUSH")?;
        self.call(CMD_FLUSH, 0, 0, 0, &[]).map(|_| ())
    }

    fn ranged(&self, cmd: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        self.range_check(offset, len)?;
        const STEP: u64 = 1 << 30;
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(STEP);
            self.call(cmd, flags, pos, n as u32, &[])?;
            pos += n;
        }
        Ok(())
    }

    /// Discards a range (a hint).
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.need(TFLAG_SEND_TRIM, "TRIM")?;
        self.ranged(CMD_TRIM, if fua { CMD_FLAG_FUA } else { 0 }, offset, len)
    }

    /// Zeroes a range. `no_hole`: keep it allocated; `fast`: fail with ENOTSUP
    /// rather than be slow.
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fast: bool,
        fua: bool,
    ) -> Result<()> {
        self.need(TFLAG_SEND_WRITE_ZEROES, "WRITE_ZEROES")?;
        let mut flags = 0;
        if no_hole {
            flags |= CMD_FLAG_NO_HOLE;
        }
        if fast {
            self.need(TFLAG_SEND_FAST_ZERO, "FAST_ZERO")?;
            flags |= CMD_FLAG_FAST_ZERO;
        }
        if fua {
            flags |= CMD_FLAG_FUA;
        }
        self.ranged(CMD_WRITE_ZEROES, flags, offset, len)
    }

    /// Prefetch hint.
    pub fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.need(TFLAG_SEND_CACHE, "CACHE")?;
        self.ranged(CMD_CACHE, 0, offset, len)
    }

    /// The `base:allocation` extents from `offset`, covering at most `len` bytes
    /// (possibly fewer: ask again from where they end).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.range_check(offset, len)?;
        if self.info.base_allocation.is_none() {
            // No context: everything is data, as the protocol's default.
            return Ok(vec![Extent {
                len,
                hole: false,
                zero: false,
            }]);
        }
        let n = len.min(u32::MAX as u64 & !0xfff).max(len.min(1));
        match self.call(CMD_BLOCK_STATUS, 0, offset, n as u32, &[])? {
            ReplyData::Extents(e) if !e.is_empty() => Ok(e),
            _ => Err(NbdError::protocol("BLOCK_STATUS answered without extents")),
        }
    }

    /// Disconnects politely (DISC) and stops reconnecting; later requests fail with EIO.
    pub fn close(&self) {
        if self.inner.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        let prev = std::mem::replace(
            &mut *self.inner.state.lock(),
            State::Closed("closed by user".into()),
        );
        self.inner.changed.notify_all();
        if let State::Connected(c) = prev {
            let req = Request {
                flags: 0,
                cmd: CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            };
            let _ = c.writer.lock().write_all(&req.encode());
            c.kill();
        }
        let watcher = self.watcher.lock().take();
        if let Some(t) = watcher {
            let _ = t.join();
        }
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.close();
    }
}

/// Sends a request header and its payload in as few system calls as the
/// socket takes (one, usually): a header sent alone wakes the server for a
/// partial request.
fn send_request(w: &mut Sock, header: &[u8], data: &[u8]) -> std::io::Result<()> {
    let total = header.len() + data.len();
    let mut sent = 0;
    while sent < total {
        let r = if sent < header.len() {
            w.write_vectored(&[IoSlice::new(&header[sent..]), IoSlice::new(data)])
        } else {
            w.write(&data[sent - header.len()..])
        };
        match r {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn make_conn(sock: Sock, info: ExportInfo) -> Result<Conn> {
    let w = sock.try_clone().map_err(net("clone socket"))?;
    let ctl = sock.try_clone().map_err(net("clone socket"))?;
    Ok(Conn {
        info,
        writer: Mutex::new(w),
        ctl,
        rx: Mutex::new(BufReader::with_capacity(256 * 1024, sock)),
        pending: Mutex::new(Some(HashMap::new())),
    })
}

/// Sleeps until the socket's peer hangs up or the socket is shut down (not
/// on data: replies are read by the callers waiting for them).
fn wait_hangup(s: &Sock) {
    use std::os::fd::AsRawFd;
    let fd = match s {
        Sock::Tcp(t) => t.as_raw_fd(),
        Sock::Unix(u) => u.as_raw_fd(),
    };
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd for the duration of the call, and
        // the count passed is 1. POLLERR and POLLHUP are always reported.
        let n = unsafe { libc::poll(&mut p, 1, -1) };
        if n > 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

fn watch_loop(inner: Arc<Inner>, mut conn: Arc<Conn>) {
    loop {
        wait_hangup(&conn.ctl);
        {
            // Replies the server sent before hanging up still reach their
            // callers; a caller reading right now finishes first.
            let mut rx = conn.rx.lock();
            while conn.pending.lock().is_some() && read_reply(&conn, &mut *rx).is_ok() {}
        }
        conn.fail();
        {
            let mut st = inner.state.lock();
            if inner.closing.load(Ordering::Acquire) {
                return;
            }
            *st = State::Reconnecting {
                since: Instant::now(),
            };
            inner.changed.notify_all();
        }
        let mut backoff = Duration::from_millis(20);
        loop {
            if inner.closing.load(Ordering::Acquire) {
                return;
            }
            match negotiate(&inner.config) {
                Ok((sock, info)) if info.size == conn.info.size => {
                    if let Ok(c) = make_conn(sock, info) {
                        conn = Arc::new(c);
                        let mut st = inner.state.lock();
                        if inner.closing.load(Ordering::Acquire) {
                            conn.kill();
                            return;
                        }
                        *st = State::Connected(conn.clone());
                        inner.reconnects.fetch_add(1, Ordering::Relaxed);
                        inner.changed.notify_all();
                        break;
                    }
                }
                Ok((_, info)) => {
                    let mut st = inner.state.lock();
                    *st = State::Closed(format!(
                        "export size changed from {} to {} across reconnect",
                        conn.info.size, info.size
                    ));
                    inner.changed.notify_all();
                    return;
                }
                Err(_) => {}
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

fn complete(conn: &Conn, cookie: u64) {
    let p = conn.pending.lock().as_mut().and_then(|m| m.remove(&cookie));
    if let Some(mut p) = p {
        let r = match p.error.take() {
            Some(e) => Err(e),
            None => match p.req.cmd {
                CMD_READ if p.covered != p.req.len as u64 && conn.info.structured => {
                    Err(NbdError::protocol(format!(
                        "READ at {} of {} bytes: reply covered {} bytes",
                        p.req.offset, p.req.len, p.covered
                    )))
                }
                CMD_READ => Ok(ReplyData::Data(std::mem::take(&mut p.buf))),
                CMD_BLOCK_STATUS => Ok(ReplyData::Extents(std::mem::take(&mut p.extents))),
                _ => Ok(ReplyData::None),
            },
        };
        p.slot.send(r);
    }
}

/// Runs `f` on the pending request `cookie`, or fails if there is none.
fn with_pending<T>(
    conn: &Conn,
    cookie: u64,
    f: impl FnOnce(&mut Pending) -> Result<T>,
) -> Result<T> {
    let mut g = conn.pending.lock();
    let p = g
        .as_mut()
        .and_then(|m| m.get_mut(&cookie))
        .ok_or_else(|| NbdError::protocol(format!("reply for unknown cookie {cookie:#x}")))?;
    f(p)
}

/// Where a READ reply chunk covering `off`+`len` starts in the request's
/// buffer; a chunk outside the request is a protocol error.
fn chunk_start(req: &Request, off: u64, len: u64, what: &str) -> Result<u64> {
    off.checked_sub(req.offset)
        .filter(|s| s + len <= req.len as u64)
        .ok_or_else(|| {
            NbdError::protocol(format!(
                "{what} chunk at {off}+{len} outside READ {}+{}",
                req.offset, req.len
            ))
        })
}

/// Reads one reply message (a simple reply or one structured chunk) and
/// completes its request when it is the last.
fn read_reply<R: Read>(conn: &Conn, mut r: R) -> Result<()> {
    let magic = u32::from_be_bytes(read_array::<4, _>(&mut r).map_err(net("read reply"))?);
    match magic {
        SIMPLE_REPLY_MAGIC => {
            let b = read_array::<12, _>(&mut r).map_err(net("read reply"))?;
            let errno = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let cookie = u64::from_be_bytes(b[4..12].try_into().unwrap_or_default());
            let (cmd, len) = with_pending(conn, cookie, |p| Ok((p.req.cmd, p.req.len)))?;
            if errno != 0 {
                with_pending(conn, cookie, |p| {
                    p.error = Some(NbdError::new(
                        ErrorKind::from_errno(errno),
                        format!(
                            "server error {errno} on cmd {} offset {} length {}",
                            p.req.cmd, p.req.offset, p.req.len
                        ),
                    ));
                    Ok(())
                })?;
            } else if cmd == CMD_READ {
                if conn.info.structured {
                    return Err(NbdError::protocol(
                        "simple reply with data to a READ after structured replies",
                    ));
                }
                // Read outside the lock into a buffer we own, then put it back.
                let mut buf = with_pending(conn, cookie, |p| Ok(std::mem::take(&mut p.buf)))?;
                buf.resize(len as usize, 0);
                r.read_exact(&mut buf).map_err(net("read data"))?;
                with_pending(conn, cookie, |p| {
                    p.buf = buf;
                    p.covered = len as u64;
                    Ok(())
                })?;
            }
            complete(conn, cookie);
        }
        STRUCTURED_REPLY_MAGIC => {
            let b = read_array::<16, _>(&mut r).map_err(net("read chunk"))?;
            let mut c = Cursor::new(&b);
            let flags = c.u16()?;
            let ctype = c.u16()?;
            let cookie = c.u64()?;
            let plen = c.u32()?;
            let req = with_pending(conn, cookie, |p| Ok(p.req))?;
            match ctype {
                REPLY_TYPE_NONE if plen == 0 => {}
                REPLY_TYPE_OFFSET_DATA if req.cmd == CMD_READ && plen > 8 => {
                    let off =
                        u64::from_be_bytes(read_array::<8, _>(&mut r).map_err(net("read chunk"))?);
                    let dlen = (plen - 8) as u64;
                    let start = chunk_start(&req, off, dlen, "data")?;
                    let mut buf = with_pending(conn, cookie, |p| Ok(std::mem::take(&mut p.buf)))?;
                    let res = r.read_exact(&mut buf[start as usize..(start + dlen) as usize]);
                    with_pending(conn, cookie, |p| {
                        p.buf = buf;
                        p.covered += dlen;
                        Ok(())
                    })?;
                    res.map_err(net("read data"))?;
                }
                REPLY_TYPE_OFFSET_HOLE if req.cmd == CMD_READ && plen == 12 => {
                    let b = read_array::<12, _>(&mut r).map_err(net("read chunk"))?;
                    let off = u64::from_be_bytes(b[0..8].try_into().unwrap_or_default());
                    let hlen = u32::from_be_bytes([b[8], b[9], b[10], b[11]]) as u64;
                    let start = chunk_start(&req, off, hlen, "hole")?;
                    with_pending(conn, cookie, |p| {
                        p.buf[start as usize..(start + hlen) as usize].fill(0);
                        p.covered += hlen;
                        Ok(())
                    })?;
                }
                REPLY_TYPE_BLOCK_STATUS
                    if req.cmd == CMD_BLOCK_STATUS
                        && (12..=MAX_CHUNK_META).contains(&plen)
                        && (plen - 4) % 8 == 0 =>
                {
                    let mut p = vec![0u8; plen as usize];
                    r.read_exact(&mut p).map_err(net("read chunk"))?;
                    let mut c = Cursor::new(&p);
                    let id = c.u32()?;
                    let mut ext = Vec::with_capacity(c.remaining() / 8);
                    while c.remaining() > 0 {
                        let l = c.u32()? as u64;
                        let f = c.u32()?;
                        if l == 0 {
                            return Err(NbdError::protocol("zero-length extent"));
                        }
                        ext.push(Extent {
                            len: l,
                            hole: f & STATE_HOLE != 0,
                            zero: f & STATE_ZERO != 0,
                        });
                    }
                    if Some(id) == conn.info.base_allocation {
                        with_pending(conn, cookie, |p| {
                            p.extents.extend(ext);
                            Ok(())
                        })?;
                    }
                }
                t if t & 0x8000 != 0 && (6..=MAX_STRING as u32 + 14).contains(&plen) => {
                    let mut p = vec![0u8; plen as usize];
                    r.read_exact(&mut p).map_err(net("read chunk"))?;
                    let mut c = Cursor::new(&p);
                    let errno = c.u32()?;
                    let mlen = c.u16()? as usize;
                    let msg =
                        String::from_utf8_lossy(c.bytes(mlen.min(c.remaining()))?).into_owned();
                    with_pending(conn, cookie, |p| {
                        if p.error.is_none() {
                            p.error = Some(NbdError::new(
                                ErrorKind::from_errno(errno),
                                format!(
                                    "server error {errno} on cmd {} offset {} length {}: {msg}",
                                    req.cmd, req.offset, req.len
                                ),
                            ));
                        }
                        Ok(())
                    })?;
                }
                _ => {
                    return Err(NbdError::protocol(format!(
                        "unexpected chunk type {ctype} length {plen} for cmd {}",
                        req.cmd
                    )))
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                complete(conn, cookie);
            }
        }
        other => return Err(NbdError::protocol(format!("bad reply magic {other:#x}"))),
    }
    Ok(())
}
