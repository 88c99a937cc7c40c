//! Test helpers: spawn `blockrep serve` daemons, talk QMP to them, run
//! `qemu-io` / `qemu-img` and check their results.

#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A running daemon, killed on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub qmp_path: PathBuf,
    pub name: String,
}

impl Daemon {
    /// Starts `blockrep serve --qmp DIR/NAME.qmp`, waits for its socket.
    pub fn start(dir: &Path, name: &str) -> Daemon {
        let qmp_path = dir.join(format!("{name}.qmp"));
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_blockrep"))
            .args(["serve", "--qmp"])
            .arg(&qmp_path)
            .args(["--log-level", "debug"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn blockrep serve");
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&qmp_path).is_err() {
            assert!(Instant::now() < deadline, "daemon {name} did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon {
            child: Some(child),
            qmp_path,
            name: name.into(),
        }
    }

    /// A negotiated QMP connection.
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_path)
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal and waits for exit; returns the exit status code.
    pub fn signal_and_wait(&mut self, sig: i32) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on the pid of a child we own and have not reaped.
        unsafe { libc::kill(c.id() as i32, sig) };
        wait_exit(&mut c)
    }

    /// Waits for the daemon to exit by itself (after `quit`).
    pub fn wait(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        wait_exit(&mut c)
    }

    /// The daemon's stderr so far.
    pub fn log(&self, dir: &Path) -> String {
        std::fs::read_to_string(dir.join(format!("{}.log", self.name))).unwrap_or_default()
    }
}

fn wait_exit(c: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(st)) = c.try_wait() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("daemon did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A QMP client connection (events are collected while waiting for replies).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pub events: Vec<Value>,
    pub greeting: Value,
}

impl Qmp {
    /// Connects and negotiates.
    pub fn connect(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).expect("connect QMP");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            events: Vec::new(),
            greeting: Value::Null,
        };
        q.greeting = q.read_msg().expect("greeting");
        assert!(q.greeting.get("QMP").is_some(), "{}", q.greeting);
        assert_eq!(
            q.raw(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        q
    }

    fn read_msg(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("QMP output is JSON")),
        }
    }

    /// Sends a request and returns the reply (events are stored).
    pub fn raw(&mut self, req: Value) -> Value {
        self.send_text(&req.to_string())
    }

    /// Sends raw text and returns the next reply.
    pub fn send_text(&mut self, text: &str) -> Value {
        self.writer_send(text);
        self.next_reply().expect("a reply")
    }

    /// Sends raw text (and a newline) without waiting for a reply.
    /// One write: the daemon acts on a request as soon as its JSON value is
    /// complete, and after `quit` it closes the connection, so a separate
    /// newline write could meet a closed socket.
    pub fn writer_send(&mut self, text: &str) {
        self.writer
            .write_all(format!("{text}\n").as_bytes())
            .unwrap();
    }

    /// The next non-event message.
    pub fn next_reply(&mut self) -> Option<Value> {
        loop {
            let m = self.read_msg()?;
            if m.get("event").is_some() {
                self.events.push(m);
            } else {
                return Some(m);
            }
        }
    }

    /// Executes a command; `Ok(return)` or `Err(error object)`.
    pub fn exec(&mut self, cmd: &str, args: Value) -> Result<Value, Value> {
        let r = self.raw(json!({"execute": cmd, "arguments": args}));
        if let Some(v) = r.get("return") {
            Ok(v.clone())
        } else {
            Err(r["error"].clone())
        }
    }

    /// Executes a command that must succeed.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        match self.exec(cmd, args.clone()) {
            Ok(v) => v,
            Err(e) => panic!("{cmd} {args} failed: {e}"),
        }
    }

    /// Executes a command that must fail; returns (class, desc).
    pub fn err(&mut self, cmd: &str, args: Value) -> (String, String) {
        match self.exec(cmd, args.clone()) {
            Ok(v) => panic!("{cmd} {args} unexpectedly succeeded: {v}"),
            Err(e) => (
                e["class"].as_str().unwrap_or("").to_string(),
                e["desc"].as_str().unwrap_or("").to_string(),
            ),
        }
    }

    /// Waits for an event named `name` (matching `pred`), up to `timeout`.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["event"] == name && pred(&e["data"]))
            {
                return self.events.remove(i);
            }
            assert!(
                Instant::now() < deadline,
                "no {name} event; have {:?}",
                self.events
            );
            self.writer
                .set_read_timeout(Some(
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(10)),
                ))
                .unwrap();
            if let Some(m) = self.read_msg() {
                if m.get("event").is_some() {
                    self.events.push(m);
                }
            }
            self.writer
                .set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
        }
    }
}

/// Polls `f` until it returns true, up to `timeout`.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

fn tool(name: &str) -> Command {
    if Command::new(name).arg("--version").output().is_err() {
        panic!("{name} not found: install QEMU's tools (apt-get install qemu-utils)");
    }
    Command::new(name)
}

/// Runs `qemu-io -f raw URI -c CMD...`; panics on failure (qemu-io prints
/// pattern mismatches and errors, and exits 0 on them, so its output is
/// checked too).
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.contains("failed:"),
        "qemu-io {uri} {cmds:?} failed:\n{text}"
    );
    text
}

/// Like [`qemu_io`] but expects a failure; returns the output.
pub fn qemu_io_fails(uri: &str, cmds: &[&str]) -> String {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success()
            || text.contains("Pattern verification failed")
            || text.contains("failed:"),
        "qemu-io {uri} {cmds:?} unexpectedly passed:\n{text}"
    );
    text
}

/// `qemu-img create -f FMT PATH SIZE`.
pub fn qemu_img_create(fmt: &str, path: &Path, size: &str) {
    let out = tool("qemu-img")
        .args(["create", "-q", "-f", fmt])
        .arg(path)
        .arg(size)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare -f F1 -F F2 A B`; true if identical.
pub fn qemu_img_compare(fa: &str, a: &str, fb: &str, b: &str) -> (bool, String) {
    let out = tool("qemu-img")
        .args(["compare", "-f", fa, "-F", fb, a, b])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => (true, text),
        Some(1) => (false, text),
        _ => panic!("qemu-img compare {a} {b} failed: {text}"),
    }
}

/// `qemu-img check` (qcow2): panics unless clean.
pub fn qemu_img_check(path: &Path) {
    let out = tool("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The NBD URI of export `name` on Unix socket `sock`.
pub fn nbd_uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Fills a file with a byte pattern.
pub fn fill_file(path: &Path, size: usize, byte: u8) {
    std::fs::write(path, vec![byte; size]).unwrap();
}
