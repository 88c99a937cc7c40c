//! # qcow-lite: a strict subset of qcow2 version 3
//!
//! Images that QEMU's `qemu-img` and `qemu-io` open, check and compare, and
//! QEMU's images that we open: version 3 only, 16-bit refcounts,
//! cluster sizes 512 B to 2 MiB, backing file name and format in the header.
//!
//! ## What is refused
//! Opening fails with [`ErrorKind::Unsupported`] and a message naming the
//! feature for: version 2 images, encryption, external data files, extended
//! L2 entries, zstd compression type, unknown incompatible feature bits.
//! Images with internal snapshots open read-only only (writing them is
//! refused), so shared clusters (refcount > 1) are never written into.
//! Compressed clusters are not supported: reading or writing one fails
//! with an `Unsupported` error naming the guest offset; the rest of such an
//! image reads normally. Unknown header extensions are kept; autoclear bits
//! are cleared on a read-write open, as the spec asks.
//!
//! ## Crash consistency
//! We use the **dirty bit with a refcount rebuild on open**, plus **ordered
//! metadata writes** so that a crash never leaves a reference to data that
//! did not reach the disk:
//!
//! * Before the first metadata write of a read-write session the dirty bit
//!   (incompatible bit 0) is written and flushed. [`Qcow2::close`] writes
//!   exact refcounts and clears it. Opening a dirty image read-write rebuilds
//!   the refcounts from the L1/L2 tables (a repair); it is never refused.
//! * Metadata lives in write-back caches and reaches the disk in
//!   [`Qcow2::flush`] in this order, with a real storage flush between the
//!   steps: guest data → refcount blocks (increments) and table → header →
//!   L2 tables → L1 table → refcount decrements. So an L2 entry is never
//!   durable before the data it points to, and a refcount never drops
//!   before the entry dropping the cluster is durable.
//! * Without lazy refcounts, refcounts on disk are exact after every flush
//!   (a crash leaves leaks at worst, which the rebuild removes). With lazy
//!   refcounts (compatible bit 0), refcount blocks reach the disk only on
//!   close or eviction; the rebuild on open makes them exact again.
//! * A cluster freed by a discard, zero write or copy-on-write is reused only
//!   after the metadata that freed it is durable.
//! * [`Qcow2::make_empty`] clears the L1 entries and flushes once (the freed
//!   clusters may then be reused); the refcount decrements reach the disk at
//!   the next flush. It clears only the allocated L1 entries (a roaring
//!   bitmap of L1 indexes) and reads no L2 table: every cluster with a
//!   nonzero refcount that is not header, L1 or refcount metadata is freed
//!   (a writable image has no internal snapshots). It truncates the file
//!   when more than [`MAKE_EMPTY_KEEP_TAIL`] bytes would be cut (smaller
//!   tails stay as free clusters).
//! * The file grows in steps ([`GROW_MIN_CLUSTERS`], [`GROW_MAX`]); the
//!   engine keeps the end of what it wrote apart from the file length (the
//!   bytes between are zeros), and a clean close or a refcount rebuild cuts
//!   the file back to its last cluster.
//!
//! ## Metadata I/O
//! L2 tables and refcount blocks sit in bounded write-back caches
//! ([`OpenOptions`]) read and written with positional I/O. memmap2 wins a
//! hot 64 KiB table micro-read (3.0-3.8 µs vs 6-9 µs) but not end to end:
//! random 4 KiB reads that miss a 2-table L2 cache took 6.2 µs with pread
//! table reads and 8.0 µs with the tables copied from a map (12.1 vs 13.0 µs
//! in a second run; see the README). Positional I/O is kept: the block-graph
//! child storage cannot be mapped, and a mapped file that is truncated (by
//! us or another process) turns errors into SIGBUS.
//!
//! ## block-graph
//! [`register`] adds the `qcow2` driver ([`Qcow2Driver`]): a `file` child
//! holds the image, a `backing` child (any driver) the backing, opened from
//! the header name resolved against the image's directory when not given.
//!
//! ## Layout of the crate
//! [`Storage`] is where bytes live (a file, memory, a block-graph child, or
//! the crash-simulating [`CrashStorage`]); [`Qcow2`] is the format engine;
//! [`Mapping`] answers where a guest range lives, so a generic layer can
//! move bytes and walk backing chains.

mod cache;
mod chain;
pub mod driver;
mod error;
pub mod fuzzing;
mod header;
mod image;
pub mod storage;

pub use chain::{open_chain, resolve_backing, ImageChain, MAX_CHAIN_DEPTH};
pub use driver::{register, Qcow2Driver};
pub use error::{Error, ErrorKind, Result};
pub use image::{
    BackingRead, Chain, CheckReport, CreateOptions, Mapping, OpenOptions, Preallocation, Qcow2,
    RawBacking, GROW_MAX, GROW_MIN_CLUSTERS, MAKE_EMPTY_KEEP_TAIL, MAKE_EMPTY_QUARANTINE_MAX,
};
pub use storage::{CrashStorage, MemStorage, Rng, Storage};
