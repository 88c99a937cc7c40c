//! Fuzz target functions for the whole project, and (under `tests/`) the
//! reliability tests: fault matrix and corpus replay.
//!
//! Each target is a plain function taking arbitrary bytes. The `cargo fuzz`
//! package at the repository root (`fuzz/`) calls them from libFuzzer, and
//! `tests/fuzz_replay.rs` calls them on every file of the committed corpus
//! (`fuzz/corpus/<target>/*`) in the default test suite, so a crash found by
//! fuzzing stays fixed once its input is committed. A target returns on any
//! input; it panics only when the code under test broke a promise (a panic
//! of its own, an out-of-bounds request reaching an export, a corrupted
//! checkpoint stream that was accepted, a reply of the wrong shape).

mod daemon_schema;
pub mod nbd_server;
pub mod qcow2;
pub mod qmp_session;
pub mod state_stream;

/// A target: its name (also the corpus directory and the `cargo fuzz` binary
/// name) and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every fuzz target, in the order `cargo xtask fuzz` runs them.
pub const TARGETS: &[Target] = &[
    ("qcow2_image", qcow2::image),
    ("qcow2_tables", qcow2::tables),
    ("nbd_server", nbd_server::server),
    ("nbd_transmission", nbd_server::transmission),
    ("qmp_session", qmp_session::session),
    ("state_stream", state_stream::stream),
];

/// Takes bytes from the front of a fuzz input; past the end it yields zeroes.
pub(crate) struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Bytes { data }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub(crate) fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub(crate) fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub(crate) fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        self.take(self.data.len())
    }
}
