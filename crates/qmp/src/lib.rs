//! QMP, the QEMU Machine Protocol, as a server library.
//!
//! The wire protocol of QEMU's monitor (`docs/interop/qmp-spec.rst` in
//! QEMU), independent of what the commands do: greeting, capabilities
//! negotiation, requests with `id` echo, QEMU's error classes and wording,
//! argument checking against a QAPI-style schema before any handler runs,
//! timestamped events broadcast to negotiated clients, and a server on a
//! Unix socket (and optionally TCP) with one thread per client and one
//! dispatcher lock, so handlers run one at a time as in QEMU's main loop.
//! QEMU's own Python library (`qemu.qmp`) drives it.
//!
//! ```no_run
//! use qmp::{Registry, Server, ServerConfig, QmpError};
//! use serde_json::json;
//!
//! let mut reg = Registry::new();
//! reg.define("{'enum': 'ReplicationMode', 'data': ['primary', 'secondary']}")?;
//! let events = reg.events();
//! reg.register(
//!     "nbd-server-add",
//!     "{'device': 'str', '*name': 'str', '*writable': 'bool'}",
//!     move |args| {
//!         let device = args.str("device")?;
//!         if device != "disk0" {
//!             return Err(QmpError::device_not_found(format!("Can't find node '{device}'")));
//!         }
//!         events.emit("BLOCK_EXPORT_ADDED", json!({"id": device}));
//!         Ok(json!({}))
//!     },
//! )?;
//! let server = Server::start(reg, ServerConfig::unix("/run/blockrep/qmp.sock"))?;
//! let reason = server.wait(); // a client ran `quit`, or shutdown() was called
//! server.join();
//! # let _ = reason;
//! # Ok::<(), qmp::Error>(())
//! ```
//!
//! Also: [`Registry::execute`] runs a command in-process with the same
//! checks; [`Session`] is the protocol without sockets; [`Client`] is a
//! blocking client for tests and tools.
//!
//! Versions: the greeting reports QEMU 9.2.0 (the QEMU whose command shapes
//! are followed) and `package` "blockrep VERSION"; see [`VersionInfo`].

mod client;
mod error;
mod events;
pub mod json;
mod registry;
mod schema;
mod server;
mod session;

pub use client::Client;
pub use error::{Error, ErrorClass, ErrorKind, QmpError};
pub use events::{Event, EventEmitter, SUBSCRIBER_QUEUE};
pub use registry::{Args, Handler, Registry, VersionInfo};
pub use schema::Schema;
pub use server::{
    Server, ServerConfig, ShutdownHandle, ShutdownReason, CLIENT_QUEUE, WRITE_TIMEOUT,
};
pub use session::{error_response, Session, NEGOTIATION_DONE, NEGOTIATION_EXPECTED};
