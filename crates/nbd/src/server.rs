//! The NBD server: fixed newstyle handshake, many exports, many clients, many
//! requests in flight per connection.
//!
//! Each connection gets one thread that negotiates and then reads requests, and a
//! small pool of worker threads that run them against the [`Export`] and write
//! replies (under a mutex) as they complete. A lone request is run by the
//! thread that read it while a worker takes over the reading (see
//! `Transmission`). Payload buffers are sized only after
//! the length was checked against [`MAX_PAYLOAD`], and the bytes in flight per
//! connection are bounded by a budget, so a hostile client cannot make the server
//! allocate more than that.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::{ErrorKind, NbdError, Result};
use crate::export::{Export, Extent};
use crate::protocol::*;

/// How [`NbdServer::remove_export`] treats connected clients (QEMU's `nbd-server-remove` modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveMode {
    /// Refuse with [`ErrorKind::Busy`] while clients are connected.
    Safe,
    /// Disconnect the clients, after their in-flight requests complete.
    Hard,
}

/// Tunables of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Worker threads per connection (requests run concurrently up to this many).
    pub workers_per_connection: usize,
    /// Payload bytes (READ and WRITE) a connection may hold in flight.
    pub inflight_bytes: u64,
    /// How long `stop`/hard removal let a connection answer its in-flight
    /// requests before shutting its socket down completely (a client that stops
    /// reading its replies would otherwise block the drain forever).
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers_per_connection: 4,
            inflight_bytes: 64 * 1024 * 1024,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Options of one export.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Refuse writes even if the export accepts them.
    pub read_only: bool,
    /// Human-readable description, shown by `nbdinfo --list`.
    pub description: Option<String>,
}

struct ExportEntry {
    name: String,
    export: Arc<dyn Export>,
    read_only: bool,
    description: Option<String>,
}

#[derive(Debug)]
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Sock {
    fn try_clone(&self) -> std::io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }
    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        };
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// Whether bytes (or the end of the stream) can be read from `fd` at once.
fn readable_now(fd: RawFd) -> bool {
    let mut b = 0u8;
    // SAFETY: `b` is a valid one-byte buffer for the duration of the call;
    // MSG_PEEK leaves the byte in the socket and MSG_DONTWAIT never sleeps.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    // 1: data; 0: end of stream; -1 with EAGAIN: nothing yet. Other errors
    // count as readable: the read that follows reports them.
    n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN)
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
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct ConnShared {
    /// Export the connection is transmitting on, once negotiated.
    export: Mutex<Option<String>>,
    /// A handle to stop the connection's reads (none for [`NbdServer::serve_io`]).
    sock: Option<Sock>,
}

struct ListenerHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

struct Inner {
    config: ServerConfig,
    exports: RwLock<BTreeMap<String, Arc<ExportEntry>>>,
    conns: Mutex<HashMap<u64, Arc<ConnShared>>>,
    conns_changed: Condvar,
    next_conn: AtomicU64,
    stopping: AtomicBool,
    listeners: Mutex<Vec<ListenerHandle>>,
}

/// An NBD server. Cheap to clone (a handle); [`NbdServer::stop`] ends it.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

impl Default for NbdServer {
    fn default() -> Self {
        NbdServer::new(ServerConfig::default())
    }
}

impl NbdServer {
    /// A server with no exports and no listeners.
    pub fn new(config: ServerConfig) -> NbdServer {
        NbdServer {
            inner: Arc::new(Inner {
                config,
                exports: RwLock::new(BTreeMap::new()),
                conns: Mutex::new(HashMap::new()),
                conns_changed: Condvar::new(),
                next_conn: AtomicU64::new(1),
                stopping: AtomicBool::new(false),
                listeners: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Adds an export under `name`; the name must be valid and unused.
    pub fn add_export(
        &self,
        name: &str,
        export: Arc<dyn Export>,
        options: ExportOptions,
    ) -> Result<()> {
        validate_export_name(name)?;
        if let Some(d) = &options.description {
            validate_export_name(d)
                .map_err(|e| NbdError::new(ErrorKind::Config, format!("description: {e}")))?;
        }
        let mut exports = self.inner.exports.write();
        if exports.contains_key(name) {
            return Err(NbdError::new(
                ErrorKind::InvalidName,
                format!("export {name:?} already exists"),
            ));
        }
        let read_only = options.read_only || export.is_read_only();
        exports.insert(
            name.to_owned(),
            Arc::new(ExportEntry {
                name: name.to_owned(),
                export,
                read_only,
                description: options.description,
            }),
        );
        Ok(())
    }

    /// Removes an export. `Safe` refuses while clients use it; `Hard` disconnects them
    /// once their in-flight requests are answered, and returns after they are gone.
    pub fn remove_export(&self, name: &str, mode: RemoveMode) -> Result<()> {
        let mut conns = self.inner.conns.lock();
        let users: Vec<Arc<ConnShared>> = conns
            .values()
            .filter(|c| c.export.lock().as_deref() == Some(name))
            .cloned()
            .collect();
        if mode == RemoveMode::Safe && !users.is_empty() {
            return Err(NbdError::new(
                ErrorKind::Busy,
                format!("export {name:?} has {} connected clients", users.len()),
            ));
        }
        if self.inner.exports.write().remove(name).is_none() {
            return Err(NbdError::new(
                ErrorKind::UnknownExport,
                format!("no export named {name:?}"),
            ));
        }
        for c in &users {
            if let Some(s) = &c.sock {
                s.shutdown(Shutdown::Read);
            }
        }
        // Drain: wait until every connection of this export has answered and gone.
        self.inner
            .wait_gone(&mut conns, |c| c.export.lock().as_deref() == Some(name));
        Ok(())
    }

    /// Names of the exports, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.inner.exports.read().keys().cloned().collect()
    }

    /// Number of open connections, all or those transmitting on `export`.
    pub fn connection_count(&self, export: Option<&str>) -> usize {
        let conns = self.inner.conns.lock();
        match export {
            None => conns.len(),
            Some(n) => conns
                .values()
                .filter(|c| c.export.lock().as_deref() == Some(n))
                .count(),
        }
    }

    /// Listens on TCP. `host` defaults to 127.0.0.1; port 0 picks a free port.
    /// Returns the bound address.
    pub fn listen_tcp(&self, host: Option<&str>, port: u16) -> Result<SocketAddr> {
        let host = host.unwrap_or("127.0.0.1");
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| NbdError::io(format!("resolve {host}:{port}"), e))?
            .collect();
        let listener = TcpListener::bind(&addrs[..])
            .map_err(|e| NbdError::io(format!("bind {host}:{port}"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| NbdError::io("local_addr", e))?;
        let fd = listener.as_raw_fd();
        self.spawn_listener(fd, None, move || {
            listener.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Sock::Tcp(s)
            })
        })?;
        Ok(local)
    }

    /// Listens on a Unix socket at `path` (mode 0600). A stale socket file is replaced.
    pub fn listen_unix(&self, path: &Path) -> Result<()> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                let _ = std::fs::remove_file(path);
            }
        }
        let listener = bind_unix_0600(path)?;
        let fd = listener.as_raw_fd();
        self.spawn_listener(fd, Some(path.to_owned()), move || {
            listener.accept().map(|(s, _)| Sock::Unix(s))
        })
    }

    fn spawn_listener<F>(&self, fd: i32, unix_path: Option<PathBuf>, accept: F) -> Result<()>
    where
        F: Fn() -> std::io::Result<Sock> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let server = self.clone();
        let thread = std::thread::Builder::new()
            .name("nbd-listen".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd, owned by this frame; fd stays open
                    // because `accept` (which owns the listener) lives in this closure.
                    let r = unsafe { libc::poll(&mut pfd, 1, 100) };
                    if r <= 0 {
                        continue;
                    }
                    match accept() {
                        Ok(sock) => server.spawn_connection(sock),
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
            .map_err(|e| NbdError::io("spawn listener thread", e))?;
        self.inner.listeners.lock().push(ListenerHandle {
            stop,
            thread: Some(thread),
            unix_path,
        });
        Ok(())
    }

    fn spawn_connection(&self, sock: Sock) {
        if self.inner.stopping.load(Ordering::Acquire) {
            return;
        }
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let (rd, wr, ctl) = match (sock.try_clone(), sock.try_clone()) {
            (Ok(a), Ok(b)) => (a, b, sock),
            _ => return,
        };
        let shared = Arc::new(ConnShared {
            export: Mutex::new(None),
            sock: Some(ctl),
        });
        self.inner.conns.lock().insert(id, shared.clone());
        let inner = self.inner.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                let fd = rd.as_raw_fd();
                let _ = inner.serve(&shared, rd, wr, Some(fd));
                if let Some(s) = &shared.sock {
                    s.shutdown(Shutdown::Both);
                }
                inner.conn_done(id);
            });
        if spawned.is_err() {
            self.inner.conn_done(id);
        }
    }

    /// Serves one connection over an arbitrary byte stream until it ends, in the
    /// calling thread. For tests and fuzzing; sockets are served by the listeners.
    pub fn serve_io<R: Read + Send, W: Write + Send>(&self, reader: R, writer: W) -> Result<()> {
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(ConnShared {
            export: Mutex::new(None),
            sock: None,
        });
        self.inner.conns.lock().insert(id, shared.clone());
        let r = self.inner.serve(&shared, reader, writer, None);
        self.inner.conn_done(id);
        r
    }

    /// Stops the server: no new connections, every client disconnected after its
    /// in-flight requests are answered, then every export removed. Returns when all
    /// connections are gone.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        let listeners: Vec<ListenerHandle> = std::mem::take(&mut *self.inner.listeners.lock());
        for mut l in listeners {
            l.stop.store(true, Ordering::Release);
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
            if let Some(p) = &l.unix_path {
                let _ = std::fs::remove_file(p);
            }
        }
        let mut conns = self.inner.conns.lock();
        for c in conns.values() {
            if let Some(s) = &c.sock {
                s.shutdown(Shutdown::Read);
            }
        }
        self.inner.wait_gone(&mut conns, |_| true);
        drop(conns);
        // As QEMU's nbd-server-stop: the exports go too (releasing their backends).
        self.inner.exports.write().clear();
    }
}

/// What the handshake settled.
struct Session {
    entry: Arc<ExportEntry>,
    structured: bool,
    base_allocation: bool,
}

/// Work for a connection's threads.
enum Job {
    /// Take over reading requests.
    Read,
    /// Answer a request (a WRITE's payload in `data`).
    Request { req: Request, data: Vec<u8> },
}

enum Outcome {
    Done,
    Data(Vec<u8>),
    Extents(Vec<Extent>),
}

// The per-request hand-offs below use std's futex-based Mutex/Condvar and wake a
// thread only when one waits: spinning-and-yielding primitives (crossbeam's
// channel, parking_lot's spin phase) cost sched_yield storms on busy CPUs.

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Bytes reserved by requests in flight on one connection.
struct Budget {
    /// (bytes in use, reader waiting)
    used: std::sync::Mutex<(u64, bool)>,
    freed: std::sync::Condvar,
    limit: u64,
}

impl Budget {
    fn take(&self, n: u64) {
        let mut u = lock(&self.used);
        while u.0 > 0 && u.0 + n > self.limit {
            u.1 = true;
            u = self
                .freed
                .wait(u)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        u.0 += n;
    }
    fn give(&self, n: u64) {
        let mut u = lock(&self.used);
        u.0 -= n;
        if u.1 {
            u.1 = false;
            self.freed.notify_one();
        }
    }
}

#[derive(Default)]
struct QueueState {
    jobs: std::collections::VecDeque<Job>,
    closed: bool,
    idle_workers: usize,
    sender_waiting: bool,
}

/// The bounded queue from a connection's reader to its workers.
struct JobQueue {
    state: std::sync::Mutex<QueueState>,
    ready: std::sync::Condvar,
    space: std::sync::Condvar,
    cap: usize,
}

impl JobQueue {
    fn new(cap: usize) -> JobQueue {
        JobQueue {
            state: std::sync::Mutex::new(QueueState::default()),
            ready: std::sync::Condvar::new(),
            space: std::sync::Condvar::new(),
            cap,
        }
    }

    /// Queues a job, waiting for room; false once closed.
    fn push(&self, job: Job) -> bool {
        let mut st = lock(&self.state);
        while st.jobs.len() >= self.cap && !st.closed {
            st.sender_waiting = true;
            st = self
                .space
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if st.closed {
            return false;
        }
        st.jobs.push_back(job);
        if st.idle_workers > 0 {
            self.ready.notify_one();
        }
        true
    }

    /// The next job; None once closed and empty.
    fn pop(&self) -> Option<Job> {
        let mut st = lock(&self.state);
        loop {
            if let Some(j) = st.jobs.pop_front() {
                if st.sender_waiting {
                    st.sender_waiting = false;
                    self.space.notify_one();
                }
                return Some(j);
            }
            if st.closed {
                return None;
            }
            st.idle_workers += 1;
            st = self
                .ready
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            st.idle_workers -= 1;
        }
    }

    /// No more jobs: workers finish what is queued and stop.
    fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
        self.space.notify_all();
    }
}

fn read_array<const N: usize, R: Read>(r: &mut R) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> NbdError + '_ {
    move |e| NbdError::io(what.to_owned(), e)
}

fn send_opt_reply<W: Write>(w: &mut W, option: u32, reply_type: u32, data: &[u8]) -> Result<()> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(
        &OptionReplyHeader {
            option,
            reply_type,
            len: data.len() as u32,
        }
        .encode(),
    );
    buf.extend_from_slice(data);
    w.write_all(&buf).map_err(io_err("send option reply"))
}

fn send_opt_error<W: Write>(w: &mut W, option: u32, err: u32, msg: &str) -> Result<()> {
    send_opt_reply(w, option, err, truncate_str(msg, MAX_STRING).as_bytes())
}

/// Reads and drops `n` bytes with a small buffer.
fn discard<R: Read>(r: &mut R, mut n: u64) -> Result<()> {
    let mut buf = [0u8; 4096];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k])
            .map_err(io_err("discard option payload"))?;
        n -= k as u64;
    }
    Ok(())
}

impl Inner {
    /// Waits until no connection matching `pred` is left; after the configured
    /// drain timeout the stragglers' sockets are shut down completely.
    fn wait_gone(
        &self,
        conns: &mut parking_lot::MutexGuard<'_, HashMap<u64, Arc<ConnShared>>>,
        pred: impl Fn(&ConnShared) -> bool,
    ) {
        let deadline = std::time::Instant::now() + self.config.drain_timeout;
        let mut forced = false;
        while conns.values().any(|c| pred(c)) {
            if forced {
                self.conns_changed.wait(conns);
            } else if self.conns_changed.wait_until(conns, deadline).timed_out() {
                forced = true;
                for c in conns.values().filter(|c| pred(c)) {
                    if let Some(s) = &c.sock {
                        s.shutdown(Shutdown::Both);
                    }
                }
            }
        }
    }

    fn conn_done(&self, id: u64) {
        self.conns.lock().remove(&id);
        self.conns_changed.notify_all();
    }

    fn lookup(&self, name: &str) -> Option<Arc<ExportEntry>> {
        self.exports.read().get(name).cloned()
    }

    fn transmission_flags(entry: &ExportEntry, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_SEND_CACHE
            | TFLAG_SEND_FAST_ZERO;
        if structured {
            f |= TFLAG_SEND_DF;
        }
        if entry.read_only {
            f |= TFLAG_READ_ONLY;
        }
        if entry.export.can_multi_conn() {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        f
    }

    /// Binds the connection to an export under the connections lock, so that a
    /// concurrent safe removal either sees this client or makes the lookup fail.
    fn attach(&self, conn: &ConnShared, name: &str) -> Option<Arc<ExportEntry>> {
        let _conns = self.conns.lock();
        let entry = self.lookup(name)?;
        *conn.export.lock() = Some(name.to_owned());
        Some(entry)
    }

    fn serve<R: Read + Send, W: Write + Send>(
        &self,
        conn: &ConnShared,
        reader: R,
        mut writer: W,
        fd: Option<RawFd>,
    ) -> Result<()> {
        let mut reader = BufReader::with_capacity(128 * 1024, reader);
        let Some(session) = self.handshake(conn, &mut reader, &mut writer)? else {
            return Ok(());
        };
        self.transmission(session, reader, writer, fd)
    }

    fn handshake<R: Read, W: Write>(
        &self,
        conn: &ConnShared,
        r: &mut R,
        w: &mut W,
    ) -> Result<Option<Session>> {
        w.write_all(&encode_greeting())
            .map_err(io_err("send greeting"))?;
        let cflags =
            u32::from_be_bytes(read_array::<4, _>(r).map_err(io_err("read client flags"))?);
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(NbdError::protocol(format!(
                "unknown client flags {cflags:#x}"
            )));
        }
        let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        let mut structured = false;
        // (export name, base:allocation selected)
        let mut meta: Option<(String, bool)> = None;
        loop {
            let hdr =
                OptionHeader::decode(&read_array::<16, _>(r).map_err(io_err("read option"))?)?;
            let opt = hdr.option;
            if hdr.len > MAX_OPTION_LEN {
                if opt == OPT_EXPORT_NAME {
                    return Err(NbdError::protocol(format!(
                        "EXPORT_NAME of {} bytes",
                        hdr.len
                    )));
                }
                discard(r, hdr.len as u64)?;
                send_opt_error(w, opt, REP_ERR_TOO_BIG, "option too long")?;
                continue;
            }
            let mut data = vec![0u8; hdr.len as usize];
            r.read_exact(&mut data)
                .map_err(io_err("read option data"))?;
            match opt {
                OPT_EXPORT_NAME => {
                    let name = decode_string(&data, "export name")?;
                    let Some(entry) = (!self.stopping.load(Ordering::Acquire))
                        .then(|| self.attach(conn, &name))
                        .flatten()
                    else {
                        return Err(NbdError::new(
                            ErrorKind::UnknownExport,
                            format!("client asked for export {name:?}"),
                        ));
                    };
                    let mut reply = Vec::with_capacity(134);
                    reply.extend_from_slice(&entry.export.size().to_be_bytes());
                    reply.extend_from_slice(
                        &Self::transmission_flags(&entry, structured).to_be_bytes(),
                    );
                    if !no_zeroes {
                        reply.extend_from_slice(&[0u8; 124]);
                    }
                    w.write_all(&reply).map_err(io_err("send export info"))?;
                    let base_allocation = matches!(&meta, Some((n, true)) if *n == name);
                    return Ok(Some(Session {
                        entry,
                        structured,
                        base_allocation,
                    }));
                }
                OPT_ABORT => {
                    let _ = send_opt_reply(w, opt, REP_ACK, &[]);
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        send_opt_error(w, opt, REP_ERR_INVALID, "LIST takes no data")?;
                        continue;
                    }
                    let entries: Vec<Arc<ExportEntry>> =
                        self.exports.read().values().cloned().collect();
                    for e in entries {
                        let mut p = Vec::new();
                        p.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                        p.extend_from_slice(e.name.as_bytes());
                        if let Some(d) = &e.description {
                            p.extend_from_slice(d.as_bytes());
                        }
                        send_opt_reply(w, opt, REP_SERVER, &p)?;
                    }
                    send_opt_reply(w, opt, REP_ACK, &[])?;
                }
                OPT_STARTTLS => {
                    send_opt_error(
                        w,
                        opt,
                        REP_ERR_POLICY,
                        "TLS is not configured on this server",
                    )?;
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        send_opt_error(w, opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")?;
                        continue;
                    }
                    structured = true;
                    send_opt_reply(w, opt, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    let (name, infos) = match decode_info_request(&data) {
                        Ok(v) => v,
                        Err(e) => {
                            send_opt_error(w, opt, REP_ERR_INVALID, &e.to_string())?;
                            continue;
                        }
                    };
                    if self.stopping.load(Ordering::Acquire) {
                        send_opt_error(w, opt, REP_ERR_SHUTDOWN, "server is shutting down")?;
                        continue;
                    }
                    let entry = if opt == OPT_GO {
                        self.attach(conn, &name)
                    } else {
                        self.lookup(&name)
                    };
                    let Some(entry) = entry else {
                        send_opt_error(
                            w,
                            opt,
                            REP_ERR_UNKNOWN,
                            &format!("unknown export {name:?}"),
                        )?;
                        continue;
                    };
                    let mut p = Vec::with_capacity(12);
                    p.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    p.extend_from_slice(&entry.export.size().to_be_bytes());
                    p.extend_from_slice(
                        &Self::transmission_flags(&entry, structured).to_be_bytes(),
                    );
                    send_opt_reply(w, opt, REP_INFO, &p)?;
                    if infos.contains(&INFO_NAME) {
                        let mut p = INFO_NAME.to_be_bytes().to_vec();
                        p.extend_from_slice(entry.name.as_bytes());
                        send_opt_reply(w, opt, REP_INFO, &p)?;
                    }
                    if let (true, Some(d)) = (infos.contains(&INFO_DESCRIPTION), &entry.description)
                    {
                        let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
                        p.extend_from_slice(d.as_bytes());
                        send_opt_reply(w, opt, REP_INFO, &p)?;
                    }
                    let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    p.extend_from_slice(&MIN_BLOCK.to_be_bytes());
                    p.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                    p.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    send_opt_reply(w, opt, REP_INFO, &p)?;
                    send_opt_reply(w, opt, REP_ACK, &[])?;
                    if opt == OPT_GO {
                        let base_allocation = matches!(&meta, Some((n, true)) if *n == name);
                        return Ok(Some(Session {
                            entry,
                            structured,
                            base_allocation,
                        }));
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    if opt == OPT_SET_META_CONTEXT && !structured {
                        send_opt_error(
                            w,
                            opt,
                            REP_ERR_INVALID,
                            "structured replies not negotiated",
                        )?;
                        continue;
                    }
                    let (name, queries) = match decode_meta_request(&data) {
                        Ok(v) => v,
                        Err(e) => {
                            send_opt_error(w, opt, REP_ERR_INVALID, &e.to_string())?;
                            continue;
                        }
                    };
                    if self.lookup(&name).is_none() {
                        send_opt_error(
                            w,
                            opt,
                            REP_ERR_UNKNOWN,
                            &format!("unknown export {name:?}"),
                        )?;
                        continue;
                    }
                    let selected = if opt == OPT_LIST_META_CONTEXT {
                        queries.is_empty()
                            || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
                    } else {
                        queries.iter().any(|q| q == BASE_ALLOCATION)
                    };
                    if selected {
                        let id = if opt == OPT_SET_META_CONTEXT {
                            BASE_ALLOCATION_ID
                        } else {
                            0
                        };
                        let mut p = id.to_be_bytes().to_vec();
                        p.extend_from_slice(BASE_ALLOCATION.as_bytes());
                        send_opt_reply(w, opt, REP_META_CONTEXT, &p)?;
                    }
                    if opt == OPT_SET_META_CONTEXT {
                        meta = Some((name, selected));
                    }
                    send_opt_reply(w, opt, REP_ACK, &[])?;
                }
                _ => {
                    send_opt_error(
                        w,
                        opt,
                        REP_ERR_UNSUP,
                        &format!("option {opt} not supported"),
                    )?;
                }
            }
        }
    }

    fn transmission<R: Read + Send, W: Write + Send>(
        &self,
        session: Session,
        r: BufReader<R>,
        w: W,
        fd: Option<RawFd>,
    ) -> Result<()> {
        let workers = self.config.workers_per_connection.max(1);
        let conn = Transmission {
            session,
            reader: std::sync::Mutex::new(r),
            fd,
            writer: std::sync::Mutex::new(w),
            broken: AtomicBool::new(false),
            budget: Budget {
                used: std::sync::Mutex::new((0, false)),
                freed: std::sync::Condvar::new(),
                limit: self.config.inflight_bytes.max(MAX_PAYLOAD as u64),
            },
            queue: JobQueue::new(workers * 4),
            queued: AtomicUsize::new(0),
            end: std::sync::Mutex::new(None),
        };
        let conn = &conn;
        std::thread::scope(|scope| {
            for i in 0..workers {
                let spawned = std::thread::Builder::new()
                    .name(format!("nbd-worker-{i}"))
                    .spawn_scoped(scope, move || conn.work());
                if let Err(e) = spawned {
                    conn.finish(Err(NbdError::io("spawn worker thread", e)));
                    return;
                }
            }
            conn.read_requests();
            conn.work();
        });
        let end = lock(&conn.end).take();
        end.unwrap_or(Ok(()))
    }
}

/// One connection in transmission. The thread holding `reader` reads
/// requests and queues them for the workers; a lone request (none queued, no
/// more input) it runs itself instead of waking a worker for it, after handing
/// the reading on to a worker through the queue ([`Job::Read`]), so a request
/// that takes long never stops the connection's other requests.
struct Transmission<R, W> {
    session: Session,
    reader: std::sync::Mutex<BufReader<R>>,
    /// The socket under `reader`, when there is one to look at for more input.
    fd: Option<RawFd>,
    writer: std::sync::Mutex<W>,
    /// A reply could not be written: the connection is over.
    broken: AtomicBool,
    budget: Budget,
    queue: JobQueue,
    /// Requests handed to the workers and not answered yet.
    queued: AtomicUsize,
    /// How the connection ended (the first reason wins).
    end: std::sync::Mutex<Option<Result<()>>>,
}

impl<R: Read, W: Write> Transmission<R, W> {
    /// Records why the connection ends and lets the workers finish.
    fn finish(&self, why: Result<()>) {
        lock(&self.end).get_or_insert(why);
        self.queue.close();
    }

    /// Runs queued work until the connection ends.
    fn work(&self) {
        while let Some(job) = self.queue.pop() {
            match job {
                Job::Read => self.read_requests(),
                Job::Request { req, data } => {
                    self.answer(&req, data);
                    self.queued.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Executes one request and writes its reply.
    fn answer(&self, req: &Request, data: Vec<u8>) {
        let reserved = payload_reservation(req);
        let outcome = execute(&self.session, req, &data);
        drop(data);
        if send_reply(&self.session, req, outcome, &self.writer).is_err() {
            self.broken.store(true, Ordering::Release);
            self.finish(Err(NbdError::new(
                ErrorKind::Disconnected,
                "reply write failed",
            )));
        }
        self.budget.give(reserved);
    }

    /// Reads requests while this thread holds the reading role.
    fn read_requests(&self) {
        let mut r = lock(&self.reader);
        loop {
            match self.read_one(&mut r) {
                Ok(Some((req, data))) => {
                    let lone = self.fd.is_some_and(|fd| {
                        self.queued.load(Ordering::Acquire) == 0
                            && r.buffer().is_empty()
                            && !readable_now(fd)
                    });
                    if lone && self.queue.push(Job::Read) {
                        // Waking a sleeping worker costs more than a small
                        // request: the worker takes over the reading while
                        // this thread, already running, answers the request.
                        drop(r);
                        self.answer(&req, data);
                        return;
                    }
                    self.queued.fetch_add(1, Ordering::AcqRel);
                    if !self.queue.push(Job::Request { req, data }) {
                        self.queued.fetch_sub(1, Ordering::AcqRel);
                        self.budget.give(payload_reservation(&req));
                        return;
                    }
                }
                Ok(None) => return self.finish(Ok(())),
                Err(e) => return self.finish(Err(e)),
            }
        }
    }

    /// Reads the next request with its payload (its bytes reserved in the
    /// budget); None when the client ended the connection.
    fn read_one(&self, r: &mut BufReader<R>) -> Result<Option<(Request, Vec<u8>)>> {
        if self.broken.load(Ordering::Acquire) {
            return Err(NbdError::new(ErrorKind::Disconnected, "reply write failed"));
        }
        let mut hdr = [0u8; 28];
        match r.read(&mut hdr[..1]) {
            Ok(0) => return Ok(None), // client gone between requests
            Ok(_) => {}
            Err(e) => return Err(NbdError::io("read request", e)),
        }
        r.read_exact(&mut hdr[1..])
            .map_err(io_err("read request"))?;
        let req = Request::decode(&hdr)?;
        match req.cmd {
            CMD_DISC => return Ok(None),
            CMD_WRITE if req.len > MAX_PAYLOAD => {
                let _ = send_reply(
                    &self.session,
                    &req,
                    Err(NbdError::new(
                        ErrorKind::InvalidArgument,
                        "write larger than 32 MiB",
                    )),
                    &self.writer,
                );
                return Err(NbdError::protocol(format!(
                    "WRITE of {} bytes exceeds the advertised maximum",
                    req.len
                )));
            }
            _ => {}
        }
        let reserve = payload_reservation(&req);
        self.budget.take(reserve);
        let mut data = Vec::new();
        if req.cmd == CMD_WRITE {
            // Length checked above; read_to_end fills the capacity without
            // zeroing it first.
            data.reserve_exact(req.len as usize);
            let got = r.by_ref().take(req.len as u64).read_to_end(&mut data);
            if got.is_err() || data.len() != req.len as usize {
                self.budget.give(reserve);
                return Err(NbdError::new(
                    ErrorKind::Disconnected,
                    format!("client gone during {} byte write payload", req.len),
                ));
            }
        }
        Ok(Some((req, data)))
    }
}

fn payload_reservation(req: &Request) -> u64 {
    match req.cmd {
        CMD_READ | CMD_WRITE if req.len <= MAX_PAYLOAD => req.len as u64,
        _ => 0,
    }
}

fn check(cond: bool, kind: ErrorKind, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(NbdError::new(kind, msg()))
    }
}

fn execute(s: &Session, req: &Request, data: &[u8]) -> Result<Outcome> {
    let e = &s.entry;
    let size = e.export.size();
    let (off, len) = (req.offset, req.len as u64);
    let allowed = match req.cmd {
        CMD_READ => CMD_FLAG_FUA | if s.structured { CMD_FLAG_DF } else { 0 },
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE | CMD_FLAG_FUA,
        CMD_FLUSH | CMD_CACHE => CMD_FLAG_FUA,
        other => {
            return Err(NbdError::new(
                ErrorKind::InvalidArgument,
                format!("unknown command {other}"),
            ))
        }
    };
    let ctx = || {
        format!(
            "export {:?} cmd {} offset {off} length {len}",
            e.name, req.cmd
        )
    };
    check(
        req.flags & !allowed == 0,
        ErrorKind::InvalidArgument,
        || format!("{}: flags {:#x} not allowed", ctx(), req.flags),
    )?;
    let in_range = off.checked_add(len).is_some_and(|end| end <= size);
    let writes = matches!(req.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes {
        check(!e.read_only, ErrorKind::PermissionDenied, || {
            format!("{}: export is read-only", ctx())
        })?;
    }
    if req.cmd != CMD_FLUSH {
        let kind = if matches!(req.cmd, CMD_WRITE | CMD_WRITE_ZEROES) {
            ErrorKind::NoSpace
        } else {
            ErrorKind::InvalidArgument
        };
        check(in_range, kind, || format!("{}: beyond end {size}", ctx()))?;
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    match req.cmd {
        CMD_READ => {
            check(req.len <= MAX_PAYLOAD, ErrorKind::InvalidArgument, || {
                format!("{}: read larger than 32 MiB", ctx())
            })?;
            // The header room is filled in by send_reply, saving a copy.
            let hdr = if s.structured { 28 } else { 16 };
            let mut buf = vec![0u8; hdr + req.len as usize];
            e.export.read(off, &mut buf[hdr..])?;
            Ok(Outcome::Data(buf))
        }
        CMD_WRITE => {
            e.export.write(off, data, fua)?;
            Ok(Outcome::Done)
        }
        CMD_FLUSH => {
            e.export.flush()?;
            Ok(Outcome::Done)
        }
        CMD_TRIM => {
            if len > 0 {
                e.export.trim(off, len)?;
            }
            if fua {
                e.export.flush()?;
            }
            Ok(Outcome::Done)
        }
        CMD_WRITE_ZEROES => {
            if len > 0 {
                e.export.write_zeroes(
                    off,
                    len,
                    req.flags & CMD_FLAG_NO_HOLE == 0,
                    req.flags & CMD_FLAG_FAST_ZERO != 0,
                )?;
            }
            if fua {
                e.export.flush()?;
            }
            Ok(Outcome::Done)
        }
        CMD_CACHE => {
            if len > 0 {
                e.export.cache(off, len)?;
            }
            Ok(Outcome::Done)
        }
        CMD_BLOCK_STATUS => {
            check(s.base_allocation, ErrorKind::InvalidArgument, || {
                format!("{}: no metadata context negotiated", ctx())
            })?;
            check(len > 0, ErrorKind::InvalidArgument, || {
                format!("{}: zero length", ctx())
            })?;
            let raw = e.export.block_status(off, len)?;
            let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
                1
            } else {
                65536
            };
            let mut out = Vec::new();
            let mut covered = 0u64;
            for x in raw {
                if covered >= len || out.len() >= max {
                    break;
                }
                if x.len == 0 {
                    continue;
                }
                let l = x.len.min(len - covered);
                covered += l;
                out.push(Extent { len: l, ..x });
            }
            check(!out.is_empty(), ErrorKind::Io, || {
                format!("{}: export returned no extents", ctx())
            })?;
            Ok(Outcome::Extents(out))
        }
        _ => Err(NbdError::new(ErrorKind::InvalidArgument, ctx())),
    }
}

fn send_reply<W: Write>(
    s: &Session,
    req: &Request,
    outcome: Result<Outcome>,
    writer: &std::sync::Mutex<W>,
) -> std::io::Result<()> {
    let cookie = req.cookie;
    let buf = match outcome {
        Ok(Outcome::Data(mut buf)) => {
            let dlen = buf.len() - if s.structured { 28 } else { 16 };
            if s.structured {
                let (t, l) = if dlen == 0 {
                    (REPLY_TYPE_NONE, 0)
                } else {
                    (REPLY_TYPE_OFFSET_DATA, 8 + dlen as u32)
                };
                let h = ChunkHeader {
                    flags: REPLY_FLAG_DONE,
                    chunk_type: t,
                    cookie,
                    len: l,
                }
                .encode();
                buf[..20].copy_from_slice(&h);
                buf[20..28].copy_from_slice(&req.offset.to_be_bytes());
                if dlen == 0 {
                    buf.truncate(20);
                }
            } else {
                buf[..16].copy_from_slice(&SimpleReply { error: 0, cookie }.encode());
            }
            buf
        }
        Ok(Outcome::Extents(ext)) => {
            let mut p = Vec::with_capacity(20 + 4 + 8 * ext.len());
            p.extend_from_slice(
                &ChunkHeader {
                    flags: REPLY_FLAG_DONE,
                    chunk_type: REPLY_TYPE_BLOCK_STATUS,
                    cookie,
                    len: 4 + 8 * ext.len() as u32,
                }
                .encode(),
            );
            p.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
            for x in ext {
                p.extend_from_slice(&(x.len as u32).to_be_bytes());
                let f = if x.hole { STATE_HOLE } else { 0 } | if x.zero { STATE_ZERO } else { 0 };
                p.extend_from_slice(&f.to_be_bytes());
            }
            p
        }
        Ok(Outcome::Done) => SimpleReply { error: 0, cookie }.encode().to_vec(),
        Err(err) => {
            if s.structured {
                let payload = encode_error_payload(err.kind.to_errno(), &err.to_string());
                let mut p = ChunkHeader {
                    flags: REPLY_FLAG_DONE,
                    chunk_type: REPLY_TYPE_ERROR,
                    cookie,
                    len: payload.len() as u32,
                }
                .encode()
                .to_vec();
                p.extend_from_slice(&payload);
                p
            } else {
                SimpleReply {
                    error: err.kind.to_errno(),
                    cookie,
                }
                .encode()
                .to_vec()
            }
        }
    };
    lock(writer).write_all(&buf)
}

/// Binds a Unix socket that is never reachable with a mode wider than 0600:
/// it is bound inside a fresh private (0700) directory beside `path`,
/// chmodded there, then renamed into place. A file already at `path` is an
/// error, never replaced.
fn bind_unix_0600(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    static NEXT: AtomicU64 = AtomicU64::new(0);

    let in_use = |what: &str| {
        NbdError::io(
            format!("bind {}", path.display()),
            std::io::Error::new(std::io::ErrorKind::AddrInUse, what.to_string()),
        )
    };
    if std::fs::symlink_metadata(path).is_ok() {
        return Err(in_use("a file already exists there"));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = parent.join(format!(".nbd-bind-{}-{n}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| NbdError::io(format!("create {}", dir.display()), e))?;
    let tmp = dir.join("sock");
    let result = (|| {
        let listener = UnixListener::bind(&tmp)
            .map_err(|e| NbdError::io(format!("bind {}", path.display()), e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| NbdError::io(format!("chmod {}", path.display()), e))?;
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(in_use("a file appeared there while binding"));
        }
        std::fs::rename(&tmp, path)
            .map_err(|e| NbdError::io(format!("rename into {}", path.display()), e))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    result
}
