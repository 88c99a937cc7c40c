//! A tiny leveled logger to stderr (one line per message, with a UTC
//! timestamp and the level), set once from `--log-level`.

use std::io::Write;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Log levels, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Level {
    /// Nothing is logged.
    Off = 0,
    /// Failures of the daemon itself.
    Error = 1,
    /// Failed commands, lost peers.
    Warn = 2,
    /// Start, stop, graph changes, jobs, replication.
    Info = 3,
    /// Every QMP command.
    Debug = 4,
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Sets the level for the rest of the process.
pub fn set_level(l: Level) {
    LEVEL.store(l as u8, Ordering::Relaxed);
}

/// True if messages at `l` are written.
pub fn enabled(l: Level) -> bool {
    l != Level::Off && l as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Writes one message at level `l` (use the macros).
pub fn write(l: Level, msg: std::fmt::Arguments<'_>) {
    if !enabled(l) {
        return;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let name = match l {
        Level::Off => "off",
        Level::Error => "error",
        Level::Warn => "warn",
        Level::Info => "info",
        Level::Debug => "debug",
    };
    let line = format!(
        "[{}.{:06} blockrep {name}] {msg}\n",
        now.as_secs(),
        now.subsec_micros()
    );
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

macro_rules! log_at {
    ($lvl:ident, $($arg:tt)*) => {
        $crate::serve::log::write($crate::serve::log::Level::$lvl, format_args!($($arg)*))
    };
}
pub(crate) use log_at;
