//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nbd::{Export, ExportOptions, MemExport, NbdServer, ServerConfig};

/// Fails (never skips) when a peer tool is missing, naming the Debian package.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` not found in PATH: install the Debian package `{package}` (apt-get install -y {package})"
    );
}

/// Runs a command, panicking with its output unless it succeeds.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server on a Unix socket in `dir` and on TCP 127.0.0.1, with one memory export.
pub struct TestServer {
    pub server: NbdServer,
    pub sock: PathBuf,
    pub port: u16,
    pub mem: Arc<MemExport>,
}

impl TestServer {
    pub fn start(dir: &Path, name: &str, size: u64) -> TestServer {
        let server = NbdServer::new(ServerConfig::default());
        let mem = Arc::new(MemExport::new(size));
        server
            .add_export(name, mem.clone(), ExportOptions::default())
            .unwrap();
        let sock = dir.join("nbd.sock");
        server.listen_unix(&sock).unwrap();
        let port = server.listen_tcp(None, 0).unwrap().port();
        TestServer {
            server,
            sock,
            port,
            mem,
        }
    }
    pub fn unix_url(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }
    pub fn tcp_url(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.stop();
    }
}

/// A child process killed (by its pid) on drop.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `path` exists (a Unix socket a peer creates).
pub fn wait_for_path(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until a TCP port accepts connections.
pub fn wait_for_port(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A memory export whose writes at the gated offsets wait until their gate opens.
pub struct Gates {
    mem: MemExport,
    /// offset -> (a write is waiting, the gate is open)
    gates: Mutex<HashMap<u64, (bool, bool)>>,
    changed: Condvar,
}

impl Gates {
    pub fn new(size: u64, offsets: &[u64]) -> Gates {
        Gates {
            mem: MemExport::new(size),
            gates: Mutex::new(offsets.iter().map(|&o| (o, (false, false))).collect()),
            changed: Condvar::new(),
        }
    }
    pub fn wait_entered(&self, offset: u64) {
        let g = self.gates.lock().unwrap();
        let (_g, t) = self
            .changed
            .wait_timeout_while(g, Duration::from_secs(10), |g| !g[&offset].0)
            .unwrap();
        assert!(
            !t.timed_out(),
            "the write at {offset} never reached the export"
        );
    }
    pub fn open(&self, offset: u64) {
        self.gates.lock().unwrap().get_mut(&offset).unwrap().1 = true;
        self.changed.notify_all();
    }
}

impl Export for Gates {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> nbd::Result<()> {
        self.mem.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> nbd::Result<()> {
        let mut g = self.gates.lock().unwrap();
        if let Some(s) = g.get_mut(&offset) {
            s.0 = true;
            self.changed.notify_all();
            while !g[&offset].1 {
                g = self.changed.wait(g).unwrap();
            }
        }
        drop(g);
        self.mem.write(offset, data, fua)
    }
    fn flush(&self) -> nbd::Result<()> {
        self.mem.flush()
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fast: bool) -> nbd::Result<()> {
        self.mem.write_zeroes(offset, len, may_trim, fast)
    }
}
