//! The socket side: Unix and TCP listeners, a reader and a writer thread per
//! client, one dispatcher lock, events, shutdown.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use parking_lot::{Condvar, Mutex};
use serde_json::json;

use crate::error::Error;
use crate::events::{channel_sink, Event, EventEmitter};
use crate::json::to_wire;
use crate::registry::Registry;
use crate::session::Session;

/// Messages queued per client before its reader stops reading (responses)
/// or the client is disconnected (events it does not read).
pub const CLIENT_QUEUE: usize = 4096;
/// A client that does not read its output for this long is disconnected.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Stack of client threads: 1024-deep JSON is parsed and checked recursively.
const CLIENT_STACK: usize = 16 << 20;

/// Where the server listens.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Unix socket path (created mode 0600; a stale socket file is replaced;
    /// removed on shutdown).
    pub unix: Option<PathBuf>,
    /// TCP address, e.g. `127.0.0.1:4444` (port 0 picks a free port).
    pub tcp: Option<SocketAddr>,
    /// Connections beyond this many are closed at once.
    pub max_clients: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            unix: None,
            tcp: None,
            max_clients: 64,
        }
    }
}

impl ServerConfig {
    /// Listen on a Unix socket.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        ServerConfig {
            unix: Some(path.into()),
            ..Self::default()
        }
    }

    /// Also listen on TCP.
    pub fn with_tcp(mut self, addr: SocketAddr) -> Self {
        self.tcp = Some(addr);
        self
    }
}

/// Why the server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// A client executed `quit`.
    Quit,
    /// [`ShutdownHandle::shutdown`] was called (e.g. on SIGTERM).
    Requested,
}

enum Out {
    Msg(String),
    Event(Arc<Event>),
    Close,
}

impl From<Arc<Event>> for Out {
    fn from(e: Arc<Event>) -> Self {
        Out::Event(e)
    }
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> std::io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn prepare(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
            Stream::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

struct ClientCtl {
    tx: Sender<Out>,
    stream: Stream,
}

struct Shared {
    registry: Arc<Registry>,
    stop: AtomicBool,
    reason: Mutex<Option<ShutdownReason>>,
    stopped: Condvar,
    clients: Mutex<HashMap<u64, ClientCtl>>,
    client_threads: Mutex<Vec<JoinHandle<()>>>,
    next_client: AtomicU64,
    max_clients: usize,
}

impl Shared {
    /// Starts an orderly shutdown once: SHUTDOWN event, queued output
    /// flushed, connections closed, listeners stopped.
    fn begin_shutdown(&self, reason: ShutdownReason) {
        {
            let mut r = self.reason.lock();
            if r.is_some() {
                return;
            }
            *r = Some(reason);
        }
        let why = match reason {
            ShutdownReason::Quit => "host-qmp-quit",
            ShutdownReason::Requested => "host-signal",
        };
        self.registry
            .events()
            .emit("SHUTDOWN", json!({"guest": false, "reason": why}));
        self.stop.store(true, Ordering::SeqCst);
        for c in self.clients.lock().values() {
            if let Err(TrySendError::Full(_)) = c.tx.try_send(Out::Close) {
                c.stream.shutdown();
            }
        }
        self.stopped.notify_all();
    }
}

/// A clonable handle to stop a running server or wait for it to stop
/// (for a signal-handling thread, or a handler).
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("reason", &*self.shared.reason.lock())
            .finish()
    }
}

impl ShutdownHandle {
    /// Asks the server to stop (idempotent): clients get a SHUTDOWN event
    /// and are disconnected, listeners close.
    pub fn shutdown(&self) {
        self.shared.begin_shutdown(ShutdownReason::Requested);
    }

    /// Blocks until the server begins to stop, and says why.
    pub fn wait(&self) -> ShutdownReason {
        let mut r = self.shared.reason.lock();
        loop {
            if let Some(reason) = *r {
                return reason;
            }
            self.shared.stopped.wait(&mut r);
        }
    }

    /// Like [`ShutdownHandle::wait`] with a time limit; `None` on timeout.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ShutdownReason> {
        let mut r = self.shared.reason.lock();
        if r.is_none() {
            self.shared.stopped.wait_for(&mut r, timeout);
        }
        *r
    }

    /// Number of connected clients.
    pub fn clients(&self) -> usize {
        self.shared.clients.lock().len()
    }
}

/// A running QMP server. Dropping it shuts it down and waits for its
/// threads; the Unix socket file is removed.
pub struct Server {
    handle: ShutdownHandle,
    threads: Vec<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
    tcp_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("unix_path", &self.unix_path)
            .field("tcp_addr", &self.tcp_addr)
            .finish()
    }
}

struct UnixOwner {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl UnixOwner {
    /// Removes the socket file if it is still the one we created.
    fn unlink(&self) {
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if md.dev() == self.dev && md.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn bind_unix(path: &Path) -> Result<(UnixListener, UnixOwner), Error> {
    let ctx = |what: &str| format!("QMP socket {path:?}: {what}");
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(Error::AddressInUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path)
                .map_err(|e| Error::socket(ctx("removing stale socket"), e))?;
        }
        Ok(_) => {
            return Err(Error::socket(
                ctx("exists and is not a socket"),
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::socket(ctx("stat"), e)),
    }
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(Error::socket(
            ctx("path is empty, too long for a Unix socket or contains NUL"),
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(Error::socket(
            ctx("socket"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd is a fresh descriptor we own exclusively.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // On Linux the mode of an unbound socket's inode becomes the mode of
    // the file bind() creates, so no other user can ever connect, whatever
    // the umask; the chmod after bind covers other systems.
    // SAFETY: fchmod on a valid descriptor.
    unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a valid sockaddr_un and len does not exceed its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::socket(ctx("bind"), std::io::Error::last_os_error()));
    }
    let md =
        std::fs::symlink_metadata(path).map_err(|e| Error::socket(ctx("stat after bind"), e))?;
    let owner = UnixOwner {
        path: path.to_path_buf(),
        dev: md.dev(),
        ino: md.ino(),
    };
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        owner.unlink();
        return Err(Error::socket(ctx("chmod 0600"), e));
    }
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } != 0 {
        let e = std::io::Error::last_os_error();
        owner.unlink();
        return Err(Error::socket(ctx("listen"), e));
    }
    let l = UnixListener::from(fd);
    // Accept only after poll; a connection reset in between must not block.
    if let Err(e) = l.set_nonblocking(true) {
        owner.unlink();
        return Err(Error::socket(ctx("nonblocking"), e));
    }
    Ok((l, owner))
}

/// Waits up to `ms` for the listener to become readable.
fn poll_readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    rc > 0
}

impl Server {
    /// Binds the configured sockets and starts serving `registry`.
    /// Takes a `Registry` or an `Arc<Registry>` (to keep using it in-process,
    /// e.g. with [`Registry::execute`]).
    pub fn start(
        registry: impl Into<Arc<Registry>>,
        config: ServerConfig,
    ) -> Result<Server, Error> {
        if config.unix.is_none() && config.tcp.is_none() {
            return Err(Error::socket(
                "QMP server: no --qmp socket configured",
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        }
        let tcp = match config.tcp {
            Some(a) => {
                let l = TcpListener::bind(a)
                    .map_err(|e| Error::socket(format!("QMP TCP {a}: bind"), e))?;
                l.set_nonblocking(true)
                    .map_err(|e| Error::socket(format!("QMP TCP {a}: nonblocking"), e))?;
                Some(l)
            }
            None => None,
        };
        let tcp_addr = match &tcp {
            Some(l) => Some(
                l.local_addr()
                    .map_err(|e| Error::socket("QMP TCP: local_addr", e))?,
            ),
            None => None,
        };
        let unix = match &config.unix {
            Some(p) => Some(bind_unix(p)?),
            None => None,
        };
        let shared = Arc::new(Shared {
            registry: registry.into(),
            stop: AtomicBool::new(false),
            reason: Mutex::new(None),
            stopped: Condvar::new(),
            clients: Mutex::new(HashMap::new()),
            client_threads: Mutex::new(Vec::new()),
            next_client: AtomicU64::new(0),
            max_clients: config.max_clients,
        });
        let mut threads = Vec::new();
        if let Some((l, owner)) = unix {
            let sh = Arc::clone(&shared);
            let t = std::thread::Builder::new()
                .name("qmp-accept-unix".to_string())
                .spawn(move || {
                    accept_loop(&sh, l.as_raw_fd(), || {
                        l.accept().map(|(s, _)| Stream::Unix(s))
                    });
                    owner.unlink();
                })
                .map_err(|e| Error::socket("spawning the QMP accept thread", e))?;
            threads.push(t);
        }
        if let Some(l) = tcp {
            let sh = Arc::clone(&shared);
            let t = std::thread::Builder::new()
                .name("qmp-accept-tcp".to_string())
                .spawn(move || {
                    accept_loop(&sh, l.as_raw_fd(), || {
                        l.accept().map(|(s, _)| Stream::Tcp(s))
                    });
                })
                .map_err(|e| Error::socket("spawning the QMP accept thread", e))?;
            threads.push(t);
        }
        Ok(Server {
            handle: ShutdownHandle { shared },
            threads,
            unix_path: config.unix,
            tcp_addr,
        })
    }

    /// The Unix socket path, if any.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    /// The bound TCP address (with the real port when 0 was asked), if any.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The event emitter: events go to every negotiated client.
    pub fn events(&self) -> EventEmitter {
        self.handle.shared.registry.events()
    }

    /// A handle to stop or wait for this server from elsewhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Asks the server to stop (see [`ShutdownHandle::shutdown`]).
    pub fn shutdown(&self) {
        self.handle.shutdown();
    }

    /// Blocks until a client runs `quit` or shutdown is requested.
    pub fn wait(&self) -> ShutdownReason {
        self.handle.wait()
    }

    /// Stops the server (if not stopping yet) and waits until every thread
    /// has finished and the socket file is gone.
    pub fn join(mut self) -> ShutdownReason {
        self.stop_and_join();
        self.handle
            .shared
            .reason
            .lock()
            .unwrap_or(ShutdownReason::Requested)
    }

    fn stop_and_join(&mut self) {
        self.handle.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        loop {
            let batch: Vec<_> = self.handle.shared.client_threads.lock().drain(..).collect();
            if batch.is_empty() {
                break;
            }
            for t in batch {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn accept_loop(shared: &Arc<Shared>, fd: i32, accept: impl Fn() -> std::io::Result<Stream>) {
    while !shared.stop.load(Ordering::SeqCst) {
        if !poll_readable(fd, 100) {
            continue;
        }
        let stream = match accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => {
                // E.g. out of descriptors: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if shared.clients.lock().len() >= shared.max_clients || stream.prepare().is_err() {
            stream.shutdown();
            continue;
        }
        let id = shared.next_client.fetch_add(1, Ordering::SeqCst);
        let sh = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("qmp-client-{id}"))
            .stack_size(CLIENT_STACK)
            .spawn(move || serve_client(&sh, id, stream));
        if let Ok(t) = spawned {
            let mut threads = shared.client_threads.lock();
            threads.retain(|t| !t.is_finished());
            threads.push(t);
        }
    }
}

fn writer_loop(mut stream: Stream, rx: crossbeam_channel::Receiver<Out>) {
    for out in rx {
        let line = match out {
            Out::Msg(s) => s,
            Out::Event(e) => to_wire(&e.to_json()),
            Out::Close => break,
        };
        if stream
            .write_all(line.as_bytes())
            .and_then(|()| stream.flush())
            .is_err()
        {
            break;
        }
    }
    stream.shutdown();
}

fn serve_client(shared: &Arc<Shared>, id: u64, mut stream: Stream) {
    let (tx, rx) = crossbeam_channel::bounded::<Out>(CLIENT_QUEUE);
    let (Ok(wstream), Ok(cstream)) = (stream.try_clone(), stream.try_clone()) else {
        stream.shutdown();
        return;
    };
    let Ok(writer) = std::thread::Builder::new()
        .name(format!("qmp-client-{id}-out"))
        .spawn(move || writer_loop(wstream, rx))
    else {
        stream.shutdown();
        return;
    };
    {
        let mut clients = shared.clients.lock();
        // Registered under the clients lock, so a concurrent shutdown either
        // sees this client or we see its stop flag.
        if shared.stop.load(Ordering::SeqCst) {
            drop(clients);
            stream.shutdown();
            drop(tx);
            let _ = writer.join();
            return;
        }
        clients.insert(
            id,
            ClientCtl {
                tx: tx.clone(),
                stream: cstream,
            },
        );
    }
    let mut session = Session::new(Arc::clone(&shared.registry));
    let events = shared.registry.events();
    let mut sub = None;
    let _ = tx.send(Out::Msg(to_wire(&session.greeting())));
    let mut buf = vec![0u8; 64 * 1024];
    // Shuts the connection if the client falls too far behind on events.
    let mut kick = stream.try_clone().ok();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut alive = true;
        session.feed_each(&buf[..n], |reply, negotiated| {
            let msg = Out::Msg(to_wire(&reply));
            if negotiated && sub.is_none() {
                let Some(k) = kick.take() else {
                    alive = false;
                    return false;
                };
                let mut queued = false;
                let sink = channel_sink(tx.clone(), move || k.shutdown());
                // Reply queued and subscription added as one step for emit().
                sub = Some(events.add_after(|| queued = tx.try_send(msg).is_ok(), sink));
                alive = queued;
            } else {
                alive = tx.send(msg).is_ok();
            }
            alive
        });
        if !alive {
            break;
        }
        if session.quit_requested() {
            shared.begin_shutdown(ShutdownReason::Quit);
            break;
        }
    }
    if let Some(s) = sub {
        events.remove(s);
    }
    let _ = tx.send(Out::Close);
    drop(tx);
    let _ = writer.join();
    stream.shutdown();
    shared.clients.lock().remove(&id);
}
