//! A small blocking QMP client, for tests and tools that drive a QMP
//! server (ours or QEMU's) from Rust: connect, negotiate, execute, events.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, ErrorClass, QmpError};
use crate::json::MAX_MESSAGE_SIZE;

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(t),
            Conn::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

/// A connected, negotiated QMP client. Events that arrive while waiting
/// for a reply are queued for [`Client::events`] / [`Client::wait_event`].
pub struct Client {
    reader: BufReader<Conn>,
    writer: Box<dyn Write + Send>,
    greeting: Value,
    events: VecDeque<Value>,
    next_id: u64,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("greeting", &self.greeting)
            .field("queued_events", &self.events.len())
            .finish()
    }
}

fn io_err(ctx: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::socket(ctx.to_string(), e)
}

fn protocol(reason: impl Into<String>) -> Error {
    Error::Protocol {
        reason: reason.into(),
    }
}

impl Client {
    /// Connects to a Unix socket, reads the greeting and negotiates.
    pub fn connect_unix(path: &Path) -> Result<Client, Error> {
        let ctx = format!("QMP client: connect {path:?}");
        let s = UnixStream::connect(path).map_err(io_err(&ctx))?;
        let w = s.try_clone().map_err(io_err(&ctx))?;
        Self::start(Conn::Unix(s), Box::new(w))
    }

    /// Connects over TCP, reads the greeting and negotiates.
    pub fn connect_tcp(addr: SocketAddr) -> Result<Client, Error> {
        let ctx = format!("QMP client: connect {addr}");
        let s = TcpStream::connect(addr).map_err(io_err(&ctx))?;
        let w = s.try_clone().map_err(io_err(&ctx))?;
        Self::start(Conn::Tcp(s), Box::new(w))
    }

    fn start(conn: Conn, writer: Box<dyn Write + Send>) -> Result<Client, Error> {
        let mut c = Client {
            reader: BufReader::new(conn),
            writer,
            greeting: Value::Null,
            events: VecDeque::new(),
            next_id: 0,
            timeout: Duration::from_secs(60),
        };
        let deadline = Instant::now() + c.timeout;
        let g = c.read_message(deadline)?;
        if !g.get("QMP").is_some_and(Value::is_object) {
            return Err(protocol(format!("expected a QMP greeting, got {g}")));
        }
        c.greeting = g;
        c.execute("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    /// How long [`Client::execute`] waits for a reply (default 60 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The server's greeting, `{"QMP": {"version": ..., "capabilities": ...}}`.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    fn read_message(&mut self, deadline: Instant) -> Result<Value, Error> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(protocol("timed out waiting for the server"));
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(io_err("QMP client: set timeout"))?;
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(MAX_MESSAGE_SIZE as u64 + 2)
            .read_line(&mut line)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    protocol("timed out waiting for the server")
                }
                _ => Error::socket("QMP client: read", e),
            })?;
        if n == 0 {
            return Err(protocol("the server closed the connection"));
        }
        if !line.ends_with('\n') {
            return Err(protocol("message too long or cut short"));
        }
        serde_json::from_str(line.trim_end())
            .map_err(|e| protocol(format!("bad JSON from server: {e}")))
    }

    /// Sends a raw message (anything, even invalid) without waiting.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.writer
            .write_all(bytes)
            .and_then(|()| self.writer.flush())
            .map_err(io_err("QMP client: write"))
    }

    /// Runs `name` with `arguments` (an object, or `null` for none) and
    /// returns its `return` value; a server error is [`Error::Command`].
    pub fn execute(&mut self, name: &str, arguments: Value) -> Result<Value, Error> {
        self.next_id += 1;
        let id = json!(format!("rs-{}", self.next_id));
        let mut req = json!({"execute": name, "id": id});
        if !arguments.is_null() {
            req["arguments"] = arguments;
        }
        self.send_raw(req.to_string().as_bytes())?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let mut msg = self.read_message(deadline)?;
            if msg.get("event").is_some() {
                self.events.push_back(msg);
                continue;
            }
            if msg.get("id") != Some(&id) {
                return Err(protocol(format!(
                    "reply does not match request {id}: {msg}"
                )));
            }
            if let Some(r) = msg.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = msg.get("error") {
                let class = ErrorClass::from_name(e["class"].as_str().unwrap_or(""));
                let desc = e["desc"].as_str().unwrap_or("").to_string();
                return Err(Error::Command {
                    name: name.to_string(),
                    error: QmpError::new(class, desc),
                });
            }
            return Err(protocol(format!(
                "reply has neither return nor error: {msg}"
            )));
        }
    }

    /// Events received so far (and not yet taken), oldest first.
    pub fn events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Waits up to `timeout` for an event named `name` and returns it;
    /// other events stay queued in order.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, Error> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i).unwrap_or(Value::Null));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let msg = self.read_message(deadline).map_err(|e| match e {
                Error::Protocol { reason } => {
                    protocol(format!("waiting for event {name}: {reason}"))
                }
                other => other,
            })?;
            if msg.get("event").is_none() {
                return Err(protocol(format!(
                    "unexpected reply while waiting for {name}: {msg}"
                )));
            }
            if msg["event"] == name {
                return Ok(msg);
            }
            self.events.push_back(msg);
        }
    }
}
