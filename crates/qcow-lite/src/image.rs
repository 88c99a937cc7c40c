//! The qcow2 image: mapping, reads, writes with copy-on-write, zeroing,
//! discard, make_empty, grow, flush with ordered metadata writes, check and repair.

use crate::cache::TableCache;
use crate::error::{corrupt, invalid, unsupported, Error, ErrorKind, Result};
use crate::header::{self, be64, Header};
use crate::storage::Storage;
use parking_lot::Mutex;
use roaring::{RoaringBitmap, RoaringTreemap};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const L1_RESERVED: u64 = !(OFFSET_MASK | COPIED);
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const RT_RESERVED: u64 = 0x1ff;
/// How many in-use clusters an allocation skips before calling the image corrupt
/// (refcounts past the end of the file are a corruption; this bounds the scan).
const ALLOC_SCAN_LIMIT: u64 = 1 << 20;
/// make_empty truncates the file only when more than this many bytes would be
/// cut: smaller tails stay as free clusters (a truncate on ext4 with online
/// discard costs ~340 µs, more than the rest of a small make_empty).
pub const MAKE_EMPTY_KEEP_TAIL: u64 = 8 << 20;
/// Clusters dropped by make_empty wait until nothing on the disk references
/// them before reuse (the next flush). Without flushes between them (a guest
/// that never flushes) the file would grow by every round's clusters: once
/// more than this many from earlier rounds wait, make_empty makes the empty
/// L1 table durable (one small `RWF_DSYNC` write, not a flush) and reuses
/// them. 4,096 clusters: 256 MiB at 64 KiB, so a file stays well inside
/// the span of its refcount blocks (a new block costs a flush).
pub const MAKE_EMPTY_QUARANTINE_MAX: u64 = 4096;

/// The image file grows in steps (a quarter of its length, at least
/// `GROW_MIN_CLUSTERS` clusters, at most [`GROW_MAX`] bytes) rather than one
/// cluster at a time: under block-graph every extension is a truncate of
/// the `file` node, and a truncate per fresh cluster cut O_DIRECT writes on
/// ext4 to a fraction (see the README). The zeros past the last cluster
/// are holes; a clean close and a refcount rebuild cut them off.
pub const GROW_MIN_CLUSTERS: u64 = 16;
/// Largest growth step of the image file in bytes (see [`GROW_MIN_CLUSTERS`]).
pub const GROW_MAX: u64 = 64 << 20;

/// Options for [`Qcow2::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size: a power of two from 512 B to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Backing file name stored in the header (resolved by the opener).
    pub backing_file: Option<String>,
    /// Backing format stored in the backing-format extension ("raw", "qcow2").
    pub backing_format: Option<String>,
    /// Set the lazy-refcounts compatible bit: refcounts reach the disk only on close.
    pub lazy_refcounts: bool,
    /// Preallocate L2 tables and (zero-flagged) data clusters.
    pub preallocation: Preallocation,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            backing_file: None,
            backing_format: None,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
        }
    }
}

/// Preallocation modes of [`CreateOptions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Allocate on write.
    #[default]
    Off,
    /// Allocate every L2 table and data cluster at create time; data clusters
    /// carry the zero flag so they read as zeros.
    Metadata,
}

/// Options for [`Qcow2::open_with`].
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Refuse every change to the image.
    pub read_only: bool,
    /// How many L2 tables the cache holds.
    pub l2_cache_tables: usize,
    /// How many refcount blocks the cache holds.
    pub refcount_cache_tables: usize,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: false,
            l2_cache_tables: 64,
            refcount_cache_tables: 16,
        }
    }
}

/// Where a range of the virtual disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Stored in this image at `host_offset` of the image file (contiguous for the run).
    Data {
        /// Byte offset in the image file of the run's first byte.
        host_offset: u64,
    },
    /// Reads as zeros (zero flag), without asking the backing file.
    Zero,
    /// Not allocated here: read from the backing file, or zeros without one.
    Unallocated,
}

/// Read access to a backing image, for reads of unallocated ranges and for
/// copy-on-write. Bytes past `backing_len` read as zeros.
pub trait BackingRead: Send + Sync {
    /// Length of the backing image in bytes.
    fn backing_len(&self) -> u64;
    /// Read `buf.len()` bytes at `offset` (the caller keeps it below `backing_len`).
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// A raw image (any [`Storage`]) used as a backing file.
#[derive(Debug)]
pub struct RawBacking<S>(pub S);

impl<S: Storage> BackingRead for RawBacking<S> {
    fn backing_len(&self) -> u64 {
        self.0.len().unwrap_or(0)
    }
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0
            .read_at(buf, offset)
            .map_err(|e| Error::io(e, format!("backing read at {offset}")))
    }
}

/// A qcow2 image together with its own backing, used as the backing of another image.
pub struct Chain<'a, S: Storage>(pub &'a Qcow2<S>, pub Option<&'a dyn BackingRead>);

impl<S: Storage> BackingRead for Chain<'_, S> {
    fn backing_len(&self) -> u64 {
        self.0.size()
    }
    fn read_backing(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read(offset, buf, self.1)
    }
}

/// What [`Qcow2::check`] found. A clean image has no leaks and no corruptions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Clusters whose stored refcount is above their number of references.
    pub leaks: u64,
    /// Referenced clusters whose refcount is too low, bad entries, overlaps...
    pub corruptions: u64,
    /// Clusters referenced more than once (overlapping metadata or data).
    pub overlaps: u64,
    /// L1/L2 entries whose COPIED flag disagrees with the refcount.
    pub copied_flag_errors: u64,
    /// Human-readable findings, capped at 100.
    pub messages: Vec<String>,
    /// Clusters in use (refcount above zero).
    pub allocated_clusters: u64,
    /// End of the last cluster in use.
    pub image_end_offset: u64,
}

impl CheckReport {
    /// No leaks and no corruptions.
    pub fn is_clean(&self) -> bool {
        self.leaks == 0 && self.corruptions == 0
    }
    fn note(&mut self, msg: String) {
        if self.messages.len() < 100 {
            self.messages.push(msg);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Unalloc,
    /// Zero flag; the host cluster when preallocated.
    Zero(Option<u64>, bool),
    /// Data at host offset, COPIED flag.
    Data(u64, bool),
    Compressed,
}

struct Meta {
    h: Header,
    l1: Vec<u64>,
    l1_dirty: bool,
    l1_used: RoaringBitmap,
    l2: TableCache,
    rt: Vec<u64>,
    rt_dirty: bool,
    rb: TableCache,
    header_dirty: bool,
    /// First cluster index past everything allocated (we allocate here when the free set is empty).
    end_cluster: u64,
    /// End of the bytes that may be nonzero: the file length at open, then
    /// raised by every write (a fresh cluster at or past it reads as zeros).
    file_len: u64,
    /// Length of the storage as we set it (>= file_len; the bytes between
    /// are zeros from our own extension).
    phys_len: u64,
    /// Clusters with refcount 0 below end_cluster whose freeing is durable.
    free: RoaringTreemap,
    /// Clusters to decrement once the metadata dropping them is durable.
    pending_decref: Vec<u64>,
    /// Clusters a make_empty dropped (refcount already 0 in the cache) whose
    /// dropping is not durable yet: not reused before the next flush, which
    /// then frees them and shrinks the file (see [`Qcow2::make_empty`]).
    quarantine: RoaringTreemap,
    /// Guest clusters whose newly placed host cluster is being written
    /// outside the lock and is not in their L2 entry yet. Other requests on
    /// these clusters, and whole-image changes, wait for `alloc_done`.
    allocating: std::collections::HashSet<u64>,
    /// Guest clusters with data being written into their existing host
    /// cluster outside the lock (count per cluster). Discards, zero-writes
    /// and whole-image changes wait for them, so a host cluster is never
    /// freed, and perhaps reused for other data, under a write in flight.
    in_place: std::collections::HashMap<u64, u32>,
    dirty_on_disk: bool,
}

/// A qcow2 version 3 image over a [`Storage`].
///
/// All methods take `&self`; metadata sits under one lock, and reads and
/// writes into already-allocated clusters do their data I/O outside it.
pub struct Qcow2<S: Storage> {
    storage: Counted<S>,
    meta: Mutex<Meta>,
    /// Signalled when clusters leave `Meta::allocating` or `Meta::in_place`.
    alloc_done: parking_lot::Condvar,
    read_only: bool,
    cluster_bits: u32,
    lazy: bool,
    /// [`MAKE_EMPTY_QUARANTINE_MAX`], lowered by crash tests.
    quarantine_max: std::sync::atomic::AtomicU64,
}

impl<S: Storage> std::fmt::Debug for Qcow2<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("size", &self.size())
            .field("cluster_size", &self.cluster_size())
            .field("read_only", &self.read_only)
            .finish()
    }
}

fn io_err(what: &str, off: u64) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(e, format!("{what} at offset {off:#x}"))
}

impl<S: Storage> Qcow2<S> {
    // ---------------------------------------------------------------- create / open

    /// Create a new image on `storage` (which should be empty) and open it read-write.
    pub fn create(storage: S, opts: &CreateOptions) -> Result<Self> {
        let cs = opts.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("cluster size {cs} must be a power of two from 512 to 2 MiB"),
            ));
        }
        let cb = cs.trailing_zeros();
        if opts.size % 512 != 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("virtual size {} is not a multiple of 512", opts.size),
            ));
        }
        if opts.size > header::MAX_VIRTUAL_SIZE {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("virtual size {} too large", opts.size),
            ));
        }
        let l1_entries = header::l1_entries_for(opts.size, cb);
        if l1_entries * 8 > header::MAX_L1_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("virtual size {} needs too large an L1 table", opts.size),
            ));
        }
        if let Some(b) = &opts.backing_file {
            if b.is_empty() || b.len() > 1023 {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "backing file name must have 1..=1023 bytes",
                ));
            }
        }
        if opts.backing_format.is_some() && opts.backing_file.is_none() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "backing format given without a backing file",
            ));
        }
        let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
        let l1_off = cs;
        let backing = opts
            .backing_file
            .as_deref()
            .map(|b| (b, opts.backing_format.as_deref()));
        // The refcount table is placed by the rebuild below; point the
        // header at the L1 cluster for now (it is rewritten before use).
        let hdr = header::build_header(
            cb,
            opts.size,
            l1_entries as u32,
            l1_off,
            l1_off,
            1,
            opts.lazy_refcounts,
            backing,
        );
        if hdr.len() as u64 > cs {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "header and backing name do not fit in one cluster",
            ));
        }
        storage.set_len(0).map_err(io_err("truncate", 0))?;
        storage
            .write_at(&hdr, 0)
            .map_err(io_err("header write", 0))?;
        let zeros = vec![0u8; (l1_clusters * cs) as usize];
        storage
            .write_at(&zeros, l1_off)
            .map_err(io_err("L1 write", l1_off))?;
        let h = Header::parse(&hdr)?;
        let img = Self::from_parts(storage, h, OpenOptions::default(), true)?;
        {
            let mut m = img.meta.lock();
            // Build refcounts for header + L1 from scratch.
            img.rebuild_refcounts(&mut m, &mut CheckReport::default())?;
        }
        if opts.preallocation == Preallocation::Metadata {
            img.preallocate()?;
        }
        img.close()?;
        Ok(img)
    }

    /// Open an existing image; read-write opens repair a dirty image.
    pub fn open(storage: S, read_only: bool) -> Result<Self> {
        Self::open_with(
            storage,
            OpenOptions {
                read_only,
                ..Default::default()
            },
        )
    }

    /// Open with explicit options (cache sizes).
    pub fn open_with(storage: S, opts: OpenOptions) -> Result<Self> {
        let mut first = vec![0u8; 104];
        storage
            .read_at(&mut first, 0)
            .map_err(io_err("header read", 0))?;
        if header::be32(&first, 0) != header::MAGIC {
            return Err(invalid("bad magic: not a qcow2 image"));
        }
        let cb = header::be32(&first, 20);
        if !(9..=21).contains(&cb) {
            return Err(invalid(format!("cluster_bits {cb} outside 9..=21")));
        }
        let mut buf = vec![0u8; 1usize << cb];
        storage
            .read_at(&mut buf, 0)
            .map_err(io_err("header read", 0))?;
        let h = Header::parse(&buf)?;
        let img = Self::from_parts(storage, h, opts, false)?;
        if !img.read_only {
            let mut m = img.meta.lock();
            if m.h.autoclear != 0 {
                m.h.autoclear = 0;
                img.write_header(&mut m)?;
                img.sflush()?;
            }
            if m.h.incompatible & header::INCOMPAT_DIRTY != 0 {
                m.dirty_on_disk = true;
                img.repair_locked(&mut m)?;
                img.clear_dirty(&mut m)?;
            }
        }
        Ok(img)
    }

    fn from_parts(storage: S, h: Header, opts: OpenOptions, creating: bool) -> Result<Self> {
        let cs = h.cluster_size();
        let read_only = opts.read_only;
        if !read_only {
            if h.incompatible & header::INCOMPAT_CORRUPT != 0 {
                return Err(corrupt(
                    "image is marked corrupt (incompatible bit 1): open read-only",
                ));
            }
            if h.nb_snapshots > 0 {
                return Err(unsupported(
                    "internal snapshots: such images can only be opened read-only",
                ));
            }
            if h.refcount_order != 4 {
                return Err(unsupported(format!(
                    "refcount_order {} (only 4, 16-bit refcounts, is writable)",
                    h.refcount_order
                )));
            }
        }
        let file_len = storage.len().map_err(io_err("length", 0))?;
        let l1_bytes = h.l1_size as u64 * 8;
        if l1_bytes > 0 && h.l1_table_offset + l1_bytes > file_len {
            return Err(invalid(format!(
                "L1 table at {:#x} ({} entries) lies past the end of the file",
                h.l1_table_offset, h.l1_size
            )));
        }
        if !creating
            && h.refcount_table_offset + (h.refcount_table_clusters as u64 * cs)
                > file_len.div_ceil(cs) * cs
        {
            return Err(invalid(format!(
                "refcount table at {:#x} lies past the end of the file",
                h.refcount_table_offset
            )));
        }
        let mut l1b = vec![0u8; h.l1_size as usize * 8];
        storage
            .read_at(&mut l1b, h.l1_table_offset)
            .map_err(io_err("L1 read", h.l1_table_offset))?;
        let l1: Vec<u64> = l1b.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let rt_bytes = h.refcount_table_clusters as u64 * cs;
        let mut rtb = vec![0u8; if creating { 0 } else { rt_bytes as usize }];
        storage
            .read_at(&mut rtb, h.refcount_table_offset)
            .map_err(io_err("refcount table read", h.refcount_table_offset))?;
        let rt: Vec<u64> = rtb.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let l1_end = h.l1_table_offset + ((h.l1_size as u64 * 8).div_ceil(cs) * cs);
        let rt_end = h.refcount_table_offset + rt_bytes;
        let end = file_len
            .max(cs)
            .max(l1_end)
            .max(if creating { 0 } else { rt_end })
            .div_ceil(cs);
        let mut l1_used = RoaringBitmap::new();
        for (i, e) in l1.iter().enumerate() {
            if e & OFFSET_MASK != 0 {
                l1_used.insert(i as u32);
            }
        }
        let lazy = h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0;
        let dirty_on_disk = h.incompatible & header::INCOMPAT_DIRTY != 0;
        Ok(Qcow2 {
            // A new image's header and tables were written straight to the
            // storage: its first flush must reach it.
            storage: Counted::new(storage, creating),
            alloc_done: parking_lot::Condvar::new(),
            read_only,
            cluster_bits: h.cluster_bits,
            lazy,
            quarantine_max: std::sync::atomic::AtomicU64::new(MAKE_EMPTY_QUARANTINE_MAX),
            meta: Mutex::new(Meta {
                h,
                l1,
                l1_dirty: false,
                l1_used,
                l2: TableCache::new(opts.l2_cache_tables),
                rt,
                rt_dirty: false,
                rb: TableCache::new(opts.refcount_cache_tables),
                header_dirty: false,
                end_cluster: end,
                file_len,
                phys_len: file_len,
                free: RoaringTreemap::new(),
                pending_decref: Vec::new(),
                quarantine: RoaringTreemap::new(),
                allocating: std::collections::HashSet::new(),
                in_place: std::collections::HashMap::new(),
                dirty_on_disk,
            }),
        })
    }

    // ---------------------------------------------------------------- accessors

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.meta.lock().h.size
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// The backing file name from the header.
    pub fn backing_file(&self) -> Option<String> {
        self.meta.lock().h.backing_file.clone()
    }
    /// The backing format from the header extension.
    pub fn backing_format(&self) -> Option<String> {
        self.meta.lock().h.backing_format.clone()
    }
    /// Whether the lazy-refcounts bit is set.
    pub fn lazy_refcounts(&self) -> bool {
        self.lazy
    }
    /// The storage under the image.
    pub fn storage(&self) -> &S {
        &self.storage.inner
    }
    /// Number of L2 tables currently allocated (the set make_empty visits).
    pub fn allocated_l2_tables(&self) -> u64 {
        self.meta.lock().l1_used.len()
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }
    fn l2_entries(&self) -> u64 {
        self.cs() / 8
    }
    fn rb_entries(&self) -> u64 {
        self.cs() / 2
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::new(ErrorKind::ReadOnly, "image opened read-only"))
        } else {
            Ok(())
        }
    }

    fn check_range(&self, m: &Meta, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= m.h.size => Ok(()),
            _ => Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "request offset {offset} length {len} past virtual size {}",
                    m.h.size
                ),
            )),
        }
    }

    fn sflush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io(e, "flush of the image file"))
    }

    fn swrite(&self, m: &mut Meta, buf: &[u8], off: u64, what: &str) -> Result<()> {
        let end = off + buf.len() as u64;
        if end > m.phys_len {
            self.grow_file(m, end)?;
        }
        self.storage.write_at(buf, off).map_err(io_err(what, off))?;
        m.file_len = m.file_len.max(end);
        Ok(())
    }

    /// Extend the storage to cover `end`, one growth step at a time (see
    /// [`GROW_MIN_CLUSTERS`]). The new bytes read as zeros; `file_len` is unchanged.
    fn grow_file(&self, m: &mut Meta, end: u64) -> Result<()> {
        // Never cut what a direct data write past our length added.
        let cur = self.storage.len().map_err(io_err("length", end))?;
        if cur >= end {
            m.phys_len = cur;
            return Ok(());
        }
        m.phys_len = m.phys_len.max(cur);
        let cs = self.cs();
        let step = (m.phys_len / 4).clamp(GROW_MIN_CLUSTERS * cs, GROW_MAX);
        let target = end.max(m.phys_len + step).div_ceil(cs) * cs;
        if self.storage.set_len(target).is_err() {
            // A storage with a size limit may refuse the step, not the need.
            self.storage.set_len(end).map_err(io_err("extend", end))?;
            m.phys_len = end;
        } else {
            m.phys_len = target;
        }
        Ok(())
    }

    /// Cut the storage to `len` bytes (nothing live lies past it).
    fn shrink_file(&self, m: &mut Meta, len: u64) -> Result<()> {
        self.storage.set_len(len).map_err(io_err("truncate", len))?;
        m.phys_len = len;
        m.file_len = m.file_len.min(len);
        Ok(())
    }

    // ---------------------------------------------------------------- entries

    fn host_ok(&self, m: &Meta, off: u64, what: &str) -> Result<u64> {
        if off % self.cs() != 0 {
            return Err(corrupt(format!("{what} {off:#x} not cluster-aligned")));
        }
        if off == 0 || off >> self.cluster_bits >= m.end_cluster {
            return Err(corrupt(format!("{what} {off:#x} outside the image file")));
        }
        // Never let a table entry point into the L1 or refcount table (QEMU's
        // metadata overlap check, for the fixed structures).
        let cs = self.cs();
        let l1_end = m.h.l1_table_offset + (m.l1.len() as u64 * 8).div_ceil(cs) * cs;
        let rt_end = m.h.refcount_table_offset + m.h.refcount_table_clusters as u64 * cs;
        if (m.h.l1_table_offset..l1_end).contains(&off)
            || (m.h.refcount_table_offset..rt_end).contains(&off)
        {
            return Err(corrupt(format!(
                "{what} {off:#x} overlaps the L1 or refcount table"
            )));
        }
        Ok(off)
    }

    fn l1_decode(&self, m: &Meta, idx: u64) -> Result<Option<u64>> {
        let Some(&e) = m.l1.get(idx as usize) else {
            return Ok(None);
        };
        if e & L1_RESERVED != 0 {
            return Err(corrupt(format!(
                "L1 entry {idx} has reserved bits set: {e:#x}"
            )));
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        self.host_ok(m, off, "L2 table offset").map(Some)
    }

    fn decode_l2(&self, m: &Meta, e: u64, vofs: u64) -> Result<Entry> {
        if e & COMPRESSED != 0 {
            return Ok(Entry::Compressed);
        }
        if e & L2_RESERVED != 0 {
            return Err(corrupt(format!(
                "L2 entry for guest offset {vofs} has reserved bits set: {e:#x}"
            )));
        }
        let off = e & OFFSET_MASK;
        let copied = e & COPIED != 0;
        if e & ZERO != 0 {
            if off == 0 {
                return Ok(Entry::Zero(None, copied));
            }
            let off = self.host_ok(m, off, "data cluster")?;
            return Ok(Entry::Zero(Some(off), copied));
        }
        if off == 0 {
            return Ok(Entry::Unalloc);
        }
        Ok(Entry::Data(self.host_ok(m, off, "data cluster")?, copied))
    }

    fn read_cluster(&self, off: u64, what: &str) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.cs() as usize];
        self.storage
            .read_at(&mut v, off)
            .map_err(io_err(what, off))?;
        Ok(v)
    }

    /// Make sure the L2 table at `off` is cached (evicting if needed).
    fn l2_load(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.l2.contains(off) {
            return Ok(());
        }
        self.l2_make_room(m, off)?;
        let mut data = m.l2.buffer(self.cs() as usize);
        self.storage
            .read_at(&mut data, off)
            .map_err(io_err("L2 table read", off))?;
        m.l2.insert(off, data, false);
        Ok(())
    }

    fn l2_make_room(&self, m: &mut Meta, keep: u64) -> Result<()> {
        if !m.l2.is_full() || m.l2.evict_clean(keep) {
            return Ok(());
        }
        // Every cached table is dirty: their data and refcounts must be
        // durable before the tables may reach the disk. Once they are, every
        // dirty table may be written: all of them go, so that the next
        // tables find clean ones to evict instead of each paying this sync
        // (writes spread over a large disk, a new table each, cost one
        // `fdatasync` per write when only one table was written here).
        self.write_refcounts_ordered(m)?;
        // That storage flush also made every earlier make_empty's cleared L1
        // entries durable: the clusters they dropped may be reused now
        // rather than grow the file (only a whole flush cuts and punches the
        // file, see `reclaim_quarantine`).
        if !m.quarantine.is_empty() {
            let q = std::mem::take(&mut m.quarantine);
            m.free |= q;
        }
        for off in m.l2.dirty_offsets() {
            if off == keep {
                continue;
            }
            let Some(data) = m.l2.peek_mut(off).map(|e| e.data.clone()) else {
                continue;
            };
            self.swrite(m, &data, off, "L2 table write")?;
            // Clean only once written: a failed write leaves it to retry.
            if let Some(e) = m.l2.peek_mut(off) {
                e.dirty = false;
            }
        }
        m.l2.evict_clean(keep);
        Ok(())
    }

    fn l2_get(&self, m: &mut Meta, l2_off: u64, idx: u64) -> Result<u64> {
        self.l2_load(m, l2_off)?;
        let e = m.l2.get(l2_off).ok_or_else(|| corrupt("L2 cache miss"))?;
        Ok(be64(&e.data, idx as usize * 8))
    }

    fn l2_set(&self, m: &mut Meta, l2_off: u64, idx: u64, v: u64) -> Result<()> {
        self.l2_load(m, l2_off)?;
        let e = m.l2.get(l2_off).ok_or_else(|| corrupt("L2 cache miss"))?;
        let i = idx as usize * 8;
        e.data[i..i + 8].copy_from_slice(&v.to_be_bytes());
        e.dirty = true;
        Ok(())
    }

    /// The L2 entry of guest offset `vofs`.
    fn entry(&self, m: &mut Meta, vofs: u64) -> Result<Entry> {
        let cl = vofs >> self.cluster_bits;
        let l1i = cl / self.l2_entries();
        let Some(l2_off) = self.l1_decode(m, l1i)? else {
            return Ok(Entry::Unalloc);
        };
        let raw = self.l2_get(m, l2_off, cl % self.l2_entries())?;
        self.decode_l2(m, raw, vofs)
    }

    // ---------------------------------------------------------------- refcounts

    fn rb_load(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.rb.contains(off) {
            return Ok(());
        }
        self.rb_make_room(m, off)?;
        let data = self.read_cluster(off, "refcount block read")?;
        m.rb.insert(off, data, false);
        Ok(())
    }

    fn rt_block(&self, m: &Meta, rti: u64) -> Result<Option<u64>> {
        let Some(&e) = m.rt.get(rti as usize) else {
            return Ok(None);
        };
        if e & RT_RESERVED != 0 {
            return Err(corrupt(format!(
                "refcount table entry {rti} has reserved bits set: {e:#x}"
            )));
        }
        if e == 0 {
            return Ok(None);
        }
        self.host_ok(m, e, "refcount block offset").map(Some)
    }

    fn rc_get(&self, m: &mut Meta, cluster: u64) -> Result<u64> {
        let per = self.rb_entries();
        let Some(b) = self.rt_block(m, cluster / per)? else {
            return Ok(0);
        };
        self.rb_load(m, b)?;
        let e = m.rb.get(b).ok_or_else(|| corrupt("refcount cache miss"))?;
        let i = (cluster % per) as usize * 2;
        Ok(u16::from_be_bytes([e.data[i], e.data[i + 1]]) as u64)
    }

    fn rc_set(&self, m: &mut Meta, cluster: u64, v: u64) -> Result<()> {
        let per = self.rb_entries();
        let rti = cluster / per;
        let b = match self.rt_block(m, rti)? {
            Some(b) => b,
            None => self.new_refblock(m, rti)?,
        };
        self.rb_load(m, b)?;
        let e = m.rb.get(b).ok_or_else(|| corrupt("refcount cache miss"))?;
        let i = (cluster % per) as usize * 2;
        let v = v.min(u16::MAX as u64) as u16;
        e.data[i..i + 2].copy_from_slice(&v.to_be_bytes());
        e.dirty = true;
        Ok(())
    }

    /// Allocate a refcount block for table entry `rti`, growing the table if needed.
    fn new_refblock(&self, m: &mut Meta, rti: u64) -> Result<u64> {
        if rti as usize >= m.rt.len() {
            self.grow_reftable(m, rti + 1)?;
        }
        let c = self.take_raw(m);
        let off = c << self.cluster_bits;
        self.rb_make_room(m, u64::MAX)?;
        m.rb.insert(off, vec![0u8; self.cs() as usize], true);
        m.rt[rti as usize] = off;
        m.rt_dirty = true;
        self.rc_set(m, c, 1)?;
        Ok(off)
    }

    /// Refcount blocks hold increments (a leak at worst if written early)
    /// and decrements made after the freeing metadata was durable, so a dirty
    /// block may be written at any time once the dirty bit is on disk.
    fn rb_make_room(&self, m: &mut Meta, keep: u64) -> Result<()> {
        if m.rb.is_full() && !m.rb.evict_clean(keep) {
            self.ensure_dirty(m)?;
            for o in m.rb.dirty_offsets() {
                let data = match m.rb.get(o) {
                    Some(e) => {
                        e.dirty = false;
                        e.data.clone()
                    }
                    None => continue,
                };
                self.swrite(m, &data, o, "refcount block write")?;
            }
            m.rb.evict_clean(keep);
        }
        Ok(())
    }

    /// Move the refcount table to a larger place at the end of the file.
    fn grow_reftable(&self, m: &mut Meta, min_entries: u64) -> Result<()> {
        let cs = self.cs();
        let entries = min_entries.max(m.rt.len() as u64 * 2);
        let clusters = (entries * 8).div_ceil(cs);
        if clusters * cs > header::MAX_REFTABLE_BYTES.max(cs) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "refcount table would exceed 8 MiB: image file too large",
            ));
        }
        let start = m.end_cluster;
        m.end_cluster += clusters;
        let old_off = m.h.refcount_table_offset;
        let old_clusters = m.h.refcount_table_clusters as u64;
        m.rt.resize((clusters * cs / 8) as usize, 0);
        m.h.refcount_table_offset = start << self.cluster_bits;
        m.h.refcount_table_clusters = clusters as u32;
        m.rt_dirty = true;
        m.header_dirty = true;
        for c in start..start + clusters {
            self.rc_set(m, c, 1)?;
        }
        for c in 0..old_clusters {
            m.pending_decref.push((old_off >> self.cluster_bits) + c);
        }
        Ok(())
    }

    /// Take the next cluster at the end of the file without touching refcounts.
    fn take_raw(&self, m: &mut Meta) -> u64 {
        let c = m.end_cluster;
        m.end_cluster += 1;
        c
    }

    /// Allocate one cluster (refcount set to 1); reuses durably freed clusters first.
    fn alloc_cluster(&self, m: &mut Meta) -> Result<u64> {
        for _ in 0..ALLOC_SCAN_LIMIT {
            let c = match m.free.min() {
                Some(c) => {
                    m.free.remove(c);
                    c
                }
                None => self.take_raw(m),
            };
            if self.rc_get(m, c)? == 0 {
                self.rc_set(m, c, 1)?;
                return Ok(c);
            }
        }
        Err(corrupt(format!(
            "no free cluster found after {ALLOC_SCAN_LIMIT} clusters with nonzero refcounts"
        )))
    }

    /// Allocate `n` contiguous clusters at the end of the file.
    fn alloc_contiguous(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let first = m.end_cluster;
        'outer: loop {
            let start = m.end_cluster;
            if start - first > ALLOC_SCAN_LIMIT {
                return Err(corrupt(format!(
                    "no {n} free clusters found after {ALLOC_SCAN_LIMIT} in use"
                )));
            }
            for c in start..start + n {
                if self.rc_get(m, c)? != 0 {
                    m.end_cluster = c + 1;
                    continue 'outer;
                }
            }
            m.end_cluster = start + n;
            for c in start..start + n {
                self.rc_set(m, c, 1)?;
            }
            return Ok(start);
        }
    }

    // ---------------------------------------------------------------- ordered flush

    fn write_header(&self, m: &mut Meta) -> Result<()> {
        m.h.sync_raw();
        let raw = m.h.raw.clone();
        self.swrite(m, &raw, 0, "header write")?;
        m.header_dirty = false;
        Ok(())
    }

    fn ensure_dirty(&self, m: &mut Meta) -> Result<()> {
        if m.dirty_on_disk {
            return Ok(());
        }
        m.h.incompatible |= header::INCOMPAT_DIRTY;
        let v = m.h.incompatible.to_be_bytes();
        self.swrite(m, &v, header::OFF_INCOMPAT as u64, "header write")?;
        self.sflush()?;
        m.dirty_on_disk = true;
        Ok(())
    }

    fn clear_dirty(&self, m: &mut Meta) -> Result<()> {
        m.h.incompatible &= !header::INCOMPAT_DIRTY;
        let v = m.h.incompatible.to_be_bytes();
        self.swrite(m, &v, header::OFF_INCOMPAT as u64, "header write")?;
        self.sflush()?;
        m.dirty_on_disk = false;
        Ok(())
    }

    /// Data durable, then refcount blocks and table, then the header when it
    /// points somewhere new. After this, L2 tables may be written.
    fn write_refcounts_ordered(&self, m: &mut Meta) -> Result<()> {
        if m.dirty_on_disk {
            self.sflush()?;
        } else {
            // Its flush after the dirty bit also covers the data written
            // before it: one storage flush instead of two.
            self.ensure_dirty(m)?;
        }

        if !self.lazy || m.header_dirty || m.rt_dirty {
            self.write_refcounts(m)?;
        }
        Ok(())
    }

    fn write_refcounts(&self, m: &mut Meta) -> Result<()> {
        self.write_refcounts_with(m, true)
    }

    /// Refcount blocks, then the table, then the header; with `sync`, a
    /// storage flush after each step that wrote something.
    fn write_refcounts_with(&self, m: &mut Meta, sync: bool) -> Result<()> {
        let mut wrote = false;
        for o in m.rb.dirty_offsets() {
            let data = match m.rb.get(o) {
                Some(e) => {
                    e.dirty = false;
                    e.data.clone()
                }
                None => continue,
            };
            self.swrite(m, &data, o, "refcount block write")?;
            wrote = true;
        }
        if m.rt_dirty {
            let mut b = Vec::with_capacity(m.rt.len() * 8);
            for e in &m.rt {
                b.extend_from_slice(&e.to_be_bytes());
            }
            let off = m.h.refcount_table_offset;
            self.swrite(m, &b, off, "refcount table write")?;
            m.rt_dirty = false;
            wrote = true;
        }
        if wrote && sync {
            self.sflush()?;
        }
        if m.header_dirty {
            self.write_header(m)?;
            if sync {
                self.sflush()?;
            }
        }
        Ok(())
    }

    fn has_changes(m: &Meta) -> bool {
        m.l1_dirty
            || m.rt_dirty
            || m.header_dirty
            || !m.pending_decref.is_empty()
            || m.l2.has_dirty()
            || m.rb.has_dirty()
    }

    /// The ordered metadata flush: data, refcount increments, L2 tables, L1
    /// table, then the decrements of clusters those tables dropped.
    fn flush_locked(&self, m: &mut Meta, force_refcounts: bool) -> Result<()> {
        self.flush_ordered(m, force_refcounts)?;
        // Everything written so far is durable: what a make_empty dropped
        // may now be reused, and the file shrink it deferred can happen.
        self.reclaim_quarantine(m, true)
    }

    fn flush_ordered(&self, m: &mut Meta, force_refcounts: bool) -> Result<()> {
        if !Self::has_changes(m) {
            return self.sflush();
        }
        self.write_refcounts_ordered(m)?;
        let mut wrote = false;
        for off in m.l2.dirty_offsets() {
            let data = match m.l2.get(off) {
                Some(e) => {
                    e.dirty = false;
                    e.data.clone()
                }
                None => continue,
            };
            self.swrite(m, &data, off, "L2 table write")?;
            wrote = true;
        }
        if wrote {
            self.sflush()?;
        }
        if m.l1_dirty {
            self.write_l1(m)?;
            self.sflush()?;
        }
        if !m.pending_decref.is_empty() {
            let list = std::mem::take(&mut m.pending_decref);
            let mut freed = Vec::new();
            for c in list {
                let rc = self.rc_get(m, c)?;
                if rc > 0 {
                    self.rc_set(m, c, rc - 1)?;
                    if rc == 1 {
                        freed.push(c);
                    }
                }
            }
            if !self.lazy || force_refcounts {
                self.write_refcounts(m)?;
            }
            for c in freed {
                m.free.insert(c);
            }
        }
        if force_refcounts {
            self.write_refcounts(m)?;
        }
        Ok(())
    }

    fn write_l1(&self, m: &mut Meta) -> Result<()> {
        let cs = self.cs();
        let bytes = (m.l1.len() as u64 * 8).div_ceil(cs) * cs;
        let mut b = vec![0u8; bytes as usize];
        for (i, e) in m.l1.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        let off = m.h.l1_table_offset;
        self.swrite(m, &b, off, "L1 table write")?;
        m.l1_dirty = false;
        Ok(())
    }

    /// Hand every metadata change held in this process's caches (refcounts,
    /// L2 and L1 tables, header) to the storage, in the flush's order but
    /// without asking the storage to make anything durable.
    ///
    /// What it buys: once it returns, a kill of this process loses nothing
    /// (the operating system holds the bytes), at the cost of writing tables,
    /// not of syncing data. What it does not: power-loss safety. Until the
    /// next [`Qcow2::flush`], a power loss may keep a table that points at a
    /// cluster whose data did not reach the disk; the structure stays valid
    /// (the dirty bit is set, so the next open rebuilds the refcounts) but
    /// such a cluster may read stale bytes. Use it where that is acceptable:
    /// replication's active and hidden disks before a failover commit, whose
    /// contents do not survive a power loss of the secondary anyway.
    /// Clusters freed since the last flush stay unavailable until a flush.
    pub fn write_back(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.meta.lock();
        if !(m.l1_dirty || m.rt_dirty || m.header_dirty || m.l2.has_dirty() || m.rb.has_dirty()) {
            return Ok(());
        }
        self.ensure_dirty(&mut m)?;
        self.write_refcounts_with(&mut m, false)?;
        for off in m.l2.dirty_offsets() {
            let data = match m.l2.get(off) {
                Some(e) => {
                    e.dirty = false;
                    e.data.clone()
                }
                None => continue,
            };
            self.swrite(&mut m, &data, off, "L2 table write")?;
        }
        if m.l1_dirty {
            self.write_l1(&mut m)?;
        }
        Ok(())
    }

    /// Make every completed write durable (data and metadata, in a crash-safe order).
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.meta.lock();
        self.flush_locked(&mut m, false)
    }

    /// Flush, write exact refcounts and clear the dirty bit: the image is then
    /// clean for QEMU's `qemu-img check`. The image stays usable.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.meta.lock();
        self.wait_allocations(&mut m);
        self.flush_locked(&mut m, true)?;
        // The file ends at its last cluster in use: cut the growth step's
        // zeros and free clusters at the end (refcounts are exact and
        // durable after the flush above, nothing references them).
        let mut last = m.end_cluster;
        while last > 1 && m.free.contains(last - 1) && self.rc_get(&mut m, last - 1)? == 0 {
            last -= 1;
        }
        if m.phys_len > last << self.cluster_bits {
            self.shrink_file(&mut m, last << self.cluster_bits)?;
            m.free.remove_range(last..);
            m.end_cluster = last;
        }
        if m.dirty_on_disk || m.h.incompatible & header::INCOMPAT_DIRTY != 0 {
            self.clear_dirty(&mut m)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- map and read

    /// Where the range at `offset` (up to `len` bytes) lives: the kind of the
    /// first cluster and how many bytes from `offset` share it (contiguous on
    /// the host for data).
    pub fn map(&self, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        let mut m = self.meta.lock();
        self.check_range(&m, offset, len)?;
        self.map_locked(&mut m, offset, len)
    }

    fn map_locked(&self, m: &mut Meta, offset: u64, len: u64) -> Result<(Mapping, u64)> {
        let cs = self.cs();
        let mut pos = offset;
        let end = offset + len;
        let mut first: Option<Mapping> = None;
        while pos < end {
            let in_cl = pos % cs;
            let n = (cs - in_cl).min(end - pos);
            let cl = pos >> self.cluster_bits;
            let l1i = cl / self.l2_entries();
            let (kind, span) = if self.l1_decode(m, l1i)?.is_none() {
                // The whole L2 range is unallocated.
                let l2_end = (l1i + 1) * self.l2_entries() * cs;
                (Mapping::Unallocated, l2_end.min(end) - pos)
            } else {
                let k = match self.entry(m, pos)? {
                    Entry::Unalloc => Mapping::Unallocated,
                    Entry::Zero(..) => Mapping::Zero,
                    Entry::Data(h, _) => Mapping::Data {
                        host_offset: h + in_cl,
                    },
                    Entry::Compressed => {
                        return Err(unsupported(format!(
                            "compressed cluster at guest offset {pos}"
                        )))
                    }
                };
                (k, n)
            };
            match first {
                None => first = Some(kind),
                Some(f) => {
                    let same = match (f, kind) {
                        (Mapping::Data { host_offset: a }, Mapping::Data { host_offset: b }) => {
                            b == a + (pos - offset)
                        }
                        (a, b) => a == b,
                    };
                    if !same {
                        break;
                    }
                }
            }
            pos += span;
        }
        Ok((first.unwrap_or(Mapping::Unallocated), pos.min(end) - offset))
    }

    /// Read `buf.len()` bytes at `offset`; unallocated ranges come from `backing` (or zeros).
    pub fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        backing: Option<&dyn BackingRead>,
    ) -> Result<()> {
        let len = buf.len() as u64;
        let mut done = 0u64;
        while done < len {
            let (kind, run) = self.map(offset + done, len - done)?;
            let run = run.max(1).min(len - done);
            let b = &mut buf[done as usize..(done + run) as usize];
            match kind {
                Mapping::Data { host_offset } => self
                    .storage
                    .read_at(b, host_offset)
                    .map_err(io_err("data read", host_offset))?,
                Mapping::Zero => b.fill(0),
                Mapping::Unallocated => read_backing(backing, offset + done, b)?,
            }
            done += run;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- write

    /// Write `buf` at `offset`. Newly allocated clusters get the bytes the
    /// write does not cover from the old cluster, the backing, or zeros.
    ///
    /// Clusters whose host clusters follow each other (already allocated in
    /// place, or whole clusters allocated in a row) are written with one
    /// positional write per contiguous host run; their L2 entries are set
    /// only after that write succeeded, as for a single cluster.
    pub fn write(&self, offset: u64, buf: &[u8], backing: Option<&dyn BackingRead>) -> Result<()> {
        self.check_writable()?;
        let mut m = self.meta.lock();
        self.check_range(&m, offset, buf.len() as u64)?;
        let mut run = Run::default();
        let r = self.write_locked(&mut m, offset, buf, backing, &mut run);
        if r.is_err() {
            // Clusters placed but never written stay allocated (a leak the
            // next check repairs) and must not block later requests.
            self.release_placed(&mut m, &std::mem::take(&mut run.pending));
            self.release_in_place(&mut m, &std::mem::take(&mut run.in_place));
        }
        r
    }

    fn write_locked(
        &self,
        m: &mut parking_lot::MutexGuard<'_, Meta>,
        offset: u64,
        buf: &[u8],
        backing: Option<&dyn BackingRead>,
        run: &mut Run,
    ) -> Result<()> {
        let cs = self.cs();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cl = pos % cs;
            let n = ((cs - in_cl) as usize).min(buf.len() - done);
            let cl = pos >> self.cluster_bits;
            let l1i = cl / self.l2_entries();
            if m.allocating.contains(&cl) {
                // Another write is placing this cluster: write out ours so
                // far (holding nothing while waiting), then look again.
                self.run_flush(m, run, buf)?;
                while m.allocating.contains(&cl) {
                    self.alloc_done.wait(m);
                }
                continue;
            }
            // A run stays inside one L2 table, which every cluster of the run
            // has already loaded: nothing below can evict it (and so write it
            // out) before the run's data is on disk.
            if run.len > 0 && run.l1i != l1i {
                self.run_flush(m, run, buf)?;
            }
            let old = self.entry(m, pos)?;
            let (host, pending) = match old {
                Entry::Data(h, true) => (h + in_cl, None),
                Entry::Compressed => (0, None),
                _ if n as u64 == cs => {
                    let l2_off = self.ensure_l2(m, cl)?;
                    let (target, decref) = match old {
                        Entry::Zero(Some(h), true) => (h, None),
                        _ => {
                            let h = self.alloc_cluster(m)? << self.cluster_bits;
                            let dec = match old {
                                Entry::Data(o, false) | Entry::Zero(Some(o), false) => Some(o),
                                _ => None,
                            };
                            (h, dec)
                        }
                    };
                    let idx = cl % self.l2_entries();
                    m.allocating.insert(cl);
                    let placed = Placed {
                        cl,
                        l2_off,
                        idx,
                        host: target,
                        decref,
                    };
                    (target, Some(placed))
                }
                _ => (0, None),
            };
            let in_place = matches!(old, Entry::Data(_, true));
            if in_place {
                // Registered before anything below can drop the lock.
                *m.in_place.entry(cl).or_insert(0) += 1;
            }
            let batchable = in_place || pending.is_some();
            if !batchable {
                // Partial cluster needing copy-on-write, or an error to report.
                if run.len > 0 {
                    // Writing the run out drops the lock: another write may
                    // have started placing this cluster meanwhile, so look
                    // at it again from the top.
                    self.run_flush(m, run, buf)?;
                    continue;
                }
                self.write_slow(m, pos, &buf[done..done + n], backing)?;
                done += n;
                continue;
            }
            if run.len > 0 && run.host + run.len as u64 != host {
                if let Err(e) = self.run_flush(m, run, buf) {
                    // This cluster is not in `run` yet: release it here.
                    if let Some(p) = &pending {
                        self.release_placed(m, std::slice::from_ref(p));
                    }
                    if in_place {
                        self.release_in_place(m, &[cl]);
                    }
                    return Err(e);
                }
            }
            if run.len == 0 {
                run.host = host;
                run.buf_off = done;
                run.l1i = l1i;
            }
            run.len += n;
            if let Some(p) = pending {
                run.pending.push(p);
            }
            if in_place {
                run.in_place.push(cl);
            }
            done += n;
        }
        self.run_flush(m, run, buf)
    }

    /// Write the data of `run` with one positional write, then point the L2
    /// entries of its newly placed clusters at it.
    fn run_flush(
        &self,
        m: &mut parking_lot::MutexGuard<'_, Meta>,
        run: &mut Run,
        buf: &[u8],
    ) -> Result<()> {
        if run.len == 0 {
            return Ok(());
        }
        let data = &buf[run.buf_off..run.buf_off + run.len];
        let host = run.host;
        run.len = 0;
        let in_place = std::mem::take(&mut run.in_place);
        if run.pending.is_empty() {
            // In place only: no metadata change; data I/O outside the lock.
            let r = parking_lot::MutexGuard::unlocked(m, || {
                self.storage
                    .write_at(data, host)
                    .map_err(io_err("data write", host))
            });
            self.release_in_place(m, &in_place);
            return r;
        }
        // Fresh clusters: reserved (refcount set, in `allocating`), so the
        // data write runs outside the lock too and writes into fresh space
        // proceed side by side; their L2 entries are set after it.
        let pending = std::mem::take(&mut run.pending);
        let r = self.place_run(m, data, host, &pending);
        self.release_placed(m, &pending);
        self.release_in_place(m, &in_place);
        r
    }

    fn place_run(
        &self,
        m: &mut parking_lot::MutexGuard<'_, Meta>,
        data: &[u8],
        host: u64,
        pending: &[Placed],
    ) -> Result<()> {
        let end = host + data.len() as u64;
        if end > m.phys_len {
            self.grow_file(m, end)?;
        }
        parking_lot::MutexGuard::unlocked(m, || {
            self.storage
                .write_at(data, host)
                .map_err(io_err("data write", host))
        })?;
        m.file_len = m.file_len.max(end);
        for p in pending {
            self.l2_set(m, p.l2_off, p.idx, p.host | COPIED)?;
            if let Some(o) = p.decref {
                m.pending_decref.push(o >> self.cluster_bits);
            }
        }
        Ok(())
    }

    /// The clusters of `placed` are settled (linked, or abandoned on error):
    /// wake the requests waiting for them.
    fn release_placed(&self, m: &mut Meta, placed: &[Placed]) {
        if placed.is_empty() {
            return;
        }
        for p in placed {
            m.allocating.remove(&p.cl);
        }
        self.alloc_done.notify_all();
    }

    /// In-place writes into `clusters` are done: wake those waiting.
    fn release_in_place(&self, m: &mut Meta, clusters: &[u64]) {
        if clusters.is_empty() {
            return;
        }
        for c in clusters {
            if let Some(n) = m.in_place.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    m.in_place.remove(c);
                }
            }
        }
        self.alloc_done.notify_all();
    }

    /// Waits until no write is placing a cluster or writing into one
    /// outside the lock (whole-image changes).
    fn wait_allocations(&self, m: &mut parking_lot::MutexGuard<'_, Meta>) {
        while !m.allocating.is_empty() || !m.in_place.is_empty() {
            self.alloc_done.wait(m);
        }
    }

    /// Waits until no write is placing or writing into a cluster of guest
    /// clusters `first..=last`.
    fn wait_allocations_in(
        &self,
        m: &mut parking_lot::MutexGuard<'_, Meta>,
        first: u64,
        last: u64,
    ) {
        while m.allocating.iter().any(|c| (first..=last).contains(c))
            || m.in_place.keys().any(|c| (first..=last).contains(c))
        {
            self.alloc_done.wait(m);
        }
    }

    /// Ensure the L2 table for guest cluster `cl` exists; returns its offset.
    fn ensure_l2(&self, m: &mut Meta, cl: u64) -> Result<u64> {
        let l1i = cl / self.l2_entries();
        if let Some(off) = self.l1_decode(m, l1i)? {
            if m.l1[l1i as usize] & COPIED == 0 {
                return Err(unsupported(format!(
                    "L2 table {off:#x} is shared (snapshot): refusing to write into it"
                )));
            }
            return Ok(off);
        }
        let c = self.alloc_cluster(m)?;
        let off = c << self.cluster_bits;
        self.l2_make_room(m, off)?;
        let mut table = m.l2.buffer(self.cs() as usize);
        table.fill(0);
        m.l2.insert(off, table, true);
        m.l1[l1i as usize] = off | COPIED;
        m.l1_dirty = true;
        m.l1_used.insert(l1i as u32);
        Ok(off)
    }

    fn write_slow(
        &self,
        m: &mut Meta,
        pos: u64,
        chunk: &[u8],
        backing: Option<&dyn BackingRead>,
    ) -> Result<()> {
        let cs = self.cs();
        let in_cl = pos % cs;
        let base = pos - in_cl;
        let cl = pos >> self.cluster_bits;
        let old = self.entry(m, pos)?;
        if let Entry::Data(h, true) = old {
            return self
                .storage
                .write_at(chunk, h + in_cl)
                .map_err(io_err("data write", h + in_cl));
        }
        let l2_off = self.ensure_l2(m, cl)?;
        let full = chunk.len() as u64 == cs;
        let (target, fresh, decref) = match old {
            Entry::Zero(Some(h), true) => (h, false, None),
            Entry::Compressed => {
                return Err(unsupported(format!(
                    "compressed cluster at guest offset {base}: writing into it"
                )))
            }
            _ => {
                let c = self.alloc_cluster(m)?;
                let h = c << self.cluster_bits;
                let dec = match old {
                    Entry::Data(o, false) | Entry::Zero(Some(o), false) => Some(o),
                    _ => None,
                };
                (h, h >= m.file_len, dec)
            }
        };
        if full {
            self.swrite(m, chunk, target, "data write")?;
        } else {
            let mut cbuf = vec![0u8; cs as usize];
            let need_fill = match old {
                Entry::Data(o, _) => {
                    self.storage
                        .read_at(&mut cbuf, o)
                        .map_err(io_err("copy-on-write read", o))?;
                    true
                }
                Entry::Unalloc if backing.is_some() => {
                    read_backing(backing, base, &mut cbuf)?;
                    true
                }
                _ => !fresh,
            };
            cbuf[in_cl as usize..in_cl as usize + chunk.len()].copy_from_slice(chunk);
            if need_fill {
                self.swrite(m, &cbuf, target, "data write")?;
            } else {
                // Fresh cluster past the end of the file: it reads as zeros
                // already. Extend the file over the whole cluster so that
                // the file's own block status sees no end inside it.
                self.swrite(m, chunk, target + in_cl, "data write")?;
                if m.phys_len < target + cs {
                    self.grow_file(m, target + cs)?;
                }
                m.file_len = m.file_len.max(target + cs);
            }
        }
        self.l2_set(m, l2_off, cl % self.l2_entries(), target | COPIED)?;
        if let Some(o) = decref {
            m.pending_decref.push(o >> self.cluster_bits);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- zero / discard

    /// Make `len` bytes at `offset` read as zeros. Whole clusters get the zero
    /// flag (their host cluster released when `may_unmap`); partial clusters
    /// are written with zeros (copy-on-write from `backing` where needed).
    pub fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        backing: Option<&dyn BackingRead>,
    ) -> Result<()> {
        self.zero_or_discard(offset, len, Some(may_unmap), backing)
    }

    /// Release whole clusters in the range: they read as zeros afterwards
    /// (as in QEMU). Partial clusters are left as they are (a discard is a hint).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_or_discard(offset, len, None, None)
    }

    fn zero_or_discard(
        &self,
        offset: u64,
        len: u64,
        zero: Option<bool>,
        backing: Option<&dyn BackingRead>,
    ) -> Result<()> {
        self.check_writable()?;
        let cs = self.cs();
        let mut m = self.meta.lock();
        self.check_range(&m, offset, len)?;
        if len > 0 {
            // Ordered after the writes placing these clusters: the entries
            // they are about to set would otherwise undo this request's.
            self.wait_allocations_in(&mut m, offset / cs, (offset + len - 1) / cs);
        }
        let has_backing = m.h.backing_file.is_some() || backing.is_some();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let in_cl = pos % cs;
            let n = (cs - in_cl).min(end - pos);
            // The last cluster of the disk counts as whole when the range
            // reaches the virtual end.
            let whole = in_cl == 0 && (n == cs || pos + n == m.h.size);
            let old = self.entry(&mut m, pos)?;
            if old == Entry::Compressed {
                return Err(unsupported(format!(
                    "compressed cluster at guest offset {pos}"
                )));
            }
            if !whole {
                if zero.is_some() {
                    let reads_zero = match old {
                        Entry::Zero(..) => true,
                        Entry::Unalloc => !has_backing,
                        _ => false,
                    };
                    if !reads_zero {
                        let zeros = vec![0u8; n as usize];
                        self.write_slow(&mut m, pos, &zeros, backing)?;
                    }
                }
                pos += n;
                continue;
            }
            let cl = pos >> self.cluster_bits;
            let new = match (zero, old) {
                (Some(false), Entry::Data(h, true) | Entry::Zero(Some(h), true)) => {
                    h | COPIED | ZERO
                }
                _ if has_backing => ZERO,
                _ => 0,
            };
            let old_host = match old {
                Entry::Data(h, _) | Entry::Zero(Some(h), _) => Some(h),
                _ => None,
            };
            let unchanged = match old {
                Entry::Unalloc => new == 0,
                Entry::Zero(None, _) => new == ZERO,
                _ => false,
            };
            if !unchanged {
                let l2_off = self.ensure_l2(&mut m, cl)?;
                self.l2_set(&mut m, l2_off, cl % self.l2_entries(), new)?;
                if let Some(h) = old_host {
                    if new & OFFSET_MASK != h {
                        m.pending_decref.push(h >> self.cluster_bits);
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- make_empty / grow

    /// Drop every allocation: the image then reads from its backing (or as
    /// zeros) everywhere. No L2 table is read: the clusters to free are those
    /// with a nonzero refcount that are not header, L1 or refcount metadata
    /// (a writable image has no internal snapshots, so once the L1 entries
    /// are cleared nothing else references them). Costs O(allocated L2
    /// tables) writes plus a scan of the refcounts of the file's clusters
    /// (runs of zeros skipped 4 entries at a time). No storage flush: like
    /// any discard it is durable after the next [`Qcow2::flush`], which also
    /// truncates the file (or punches holes) so it stays small; until then
    /// the dropped clusters are not reused.
    pub fn make_empty(&self) -> Result<()> {
        self.check_writable()?;
        let mut m = self.meta.lock();
        // Clusters being placed hold a refcount that this would drop.
        self.wait_allocations(&mut m);
        // A refcount table or header change since the last flush must reach
        // the disk in order first (rare: the image grew its tables).
        if m.header_dirty || m.rt_dirty {
            self.flush_locked(&mut m, true)?;
        }
        self.ensure_dirty(&mut m)?;
        // 1. Clear the L1 entries, in the storage but without a sync: a
        // power loss before the next flush leaves each entry either as it
        // was (its tables and data are intact: nothing dropped is reused
        // before that flush) or cleared, so the image reads, per L1 range,
        // as before or as empty, as any unflushed discard may. No sync means
        // the checkpoint does not wait for the guest data still in the page
        // cache to be written, only to be dropped.
        let used: Vec<u32> = m.l1_used.iter().collect();
        if used.len() > 64 {
            for &i in &used {
                m.l1[i as usize] = 0;
            }
            // Only the 4 KiB pages holding used entries: on a 1 TiB disk
            // the table's cluster is 64 KiB of which 16 KiB are entries.
            let (lo, hi) = (used[0] as u64, *used.last().unwrap_or(&used[0]) as u64 + 1);
            let first = lo * 8 / 4096 * 4096;
            let end = (hi * 8).div_ceil(4096) * 4096;
            let mut b = vec![0u8; (end - first) as usize];
            for (j, e) in b.chunks_exact_mut(8).enumerate() {
                let i = first as usize / 8 + j;
                if let Some(v) = m.l1.get(i) {
                    e.copy_from_slice(&v.to_be_bytes());
                }
            }
            let off = m.h.l1_table_offset + first;
            self.swrite(&mut m, &b, off, "L1 table write")?;
        } else {
            for &i in &used {
                m.l1[i as usize] = 0;
                let off = m.h.l1_table_offset + i as u64 * 8;
                self.swrite(&mut m, &[0u8; 8], off, "L1 entry write")?;
            }
        }
        m.l1_used.clear();
        m.l1_dirty = false;
        // 2. Every cached L2 table (dirty ones included: never written, now
        // unreferenced) goes; every cluster but the header, L1 and refcount
        // structures gets refcount 0 in the cache (written at the next
        // flush; the dirty bit covers a crash before it), pending decrements
        // included.
        m.l2.clear();
        let keep = self.metadata_clusters(&m)?;
        let freed = self.drop_refcounts_except(&mut m, &keep)?;
        m.pending_decref.clear();
        // 3. Not reused, punched or cut off before the next flush has made
        // the cleared entries durable (`reclaim_quarantine`).
        // 4. Bounded: when clusters of earlier rounds still wait (no flush
        // since: a guest that never flushes, on a disk small enough that
        // the L2 cache never needs room), make the now empty L1 table
        // durable, or the file would grow without end. That one write is
        // all a reuse needs (nothing on the disk references a dropped
        // cluster any more) and, unlike a flush, it does not write back the
        // dropped clusters' data still in the page cache (about a second
        // for 2 GiB). The file keeps its size: the clusters are reused in
        // place. This round's own clusters alone never force it.
        let waiting = m.quarantine.len();
        m.quarantine |= freed;
        let max = self
            .quarantine_max
            .load(std::sync::atomic::Ordering::Relaxed);
        if waiting > max {
            self.write_l1_durable(&mut m)?;
            self.reclaim_quarantine(&mut m, false)?;
        }
        Ok(())
    }

    /// Sets the bound of [`MAKE_EMPTY_QUARANTINE_MAX`] for this image: crash
    /// tests lower it so that short schedules reach it.
    #[doc(hidden)]
    pub fn set_make_empty_quarantine_max(&self, clusters: u64) {
        self.quarantine_max
            .store(clusters, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes the whole L1 table and makes that write durable, without a
    /// flush of the rest (see [`Storage::write_durable`]).
    fn write_l1_durable(&self, m: &mut Meta) -> Result<()> {
        let mut b = vec![0u8; m.l1.len() * 8];
        for (i, e) in m.l1.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        let off = m.h.l1_table_offset;
        let end = off + b.len() as u64;
        if end > m.phys_len {
            self.grow_file(m, end)?;
        }
        self.storage
            .write_durable(&b, off)
            .map_err(io_err("L1 table write", off))?;
        m.file_len = m.file_len.max(end);
        m.l1_dirty = false;
        Ok(())
    }

    /// After a completed flush (or make_empty's durable empty L1 table):
    /// clusters a make_empty dropped become free. With `release_space`, a
    /// free tail longer than `MAKE_EMPTY_KEEP_TAIL` is cut off the file and
    /// the dropped clusters below the new end are punched out, so the file
    /// stays small; make_empty skips that (punching out 2 GiB took 0.5 s,
    /// a checkpoint's pause): its clusters are reused in place, and a
    /// later flush cuts off a free tail. Nothing references these
    /// clusters on the disk any more, so neither needs a flush of its own.
    fn reclaim_quarantine(&self, m: &mut Meta, release_space: bool) -> Result<()> {
        if m.quarantine.is_empty() {
            return Ok(());
        }
        let dropped = std::mem::take(&mut m.quarantine);
        m.free |= &dropped;
        if !release_space {
            return Ok(());
        }
        let cs = self.cs();
        let cur_end = m.end_cluster;
        let mut new_end = cur_end;
        while new_end > 1 && m.free.contains(new_end - 1) {
            new_end -= 1;
        }
        if cur_end > new_end && (cur_end - new_end) * cs > MAKE_EMPTY_KEEP_TAIL {
            m.free.remove_range(new_end..);
            self.shrink_file(m, new_end << self.cluster_bits)?;
            m.end_cluster = new_end;
        } else {
            // A small tail stays as free clusters for the next writes: a
            // truncate costs more than the space (see MAKE_EMPTY_KEEP_TAIL).
            new_end = cur_end;
        }
        // Holes, one per run of dropped clusters below the end.
        let mut run: Option<(u64, u64)> = None;
        for c in dropped.iter().take_while(|&c| c < new_end) {
            run = match run {
                Some((s, e)) if e == c => Some((s, c + 1)),
                Some((s, e)) => {
                    let _ = self
                        .storage
                        .discard(s << self.cluster_bits, (e - s) << self.cluster_bits);
                    Some((c, c + 1))
                }
                None => Some((c, c + 1)),
            };
        }
        if let Some((s, e)) = run {
            let _ = self
                .storage
                .discard(s << self.cluster_bits, (e - s) << self.cluster_bits);
        }
        Ok(())
    }

    /// The clusters of the header, the L1 table, the refcount table and
    /// the refcount blocks.
    fn metadata_clusters(&self, m: &Meta) -> Result<RoaringTreemap> {
        let cs = self.cs();
        let mut keep = RoaringTreemap::new();
        keep.insert(0);
        let l1 = m.h.l1_table_offset >> self.cluster_bits;
        let l1c = (m.l1.len() as u64 * 8).div_ceil(cs);
        keep.insert_range(l1..l1 + l1c);
        let rt = m.h.refcount_table_offset >> self.cluster_bits;
        keep.insert_range(rt..rt + m.h.refcount_table_clusters as u64);
        for (rti, _) in m.rt.iter().enumerate().filter(|(_, &e)| e != 0) {
            if let Some(b) = self.rt_block(m, rti as u64)? {
                keep.insert(b >> self.cluster_bits);
            }
        }
        Ok(keep)
    }

    /// Set the refcount of every cluster below `end_cluster` that is not in
    /// `keep` to 0; returns the clusters whose refcount was nonzero.
    fn drop_refcounts_except(&self, m: &mut Meta, keep: &RoaringTreemap) -> Result<RoaringTreemap> {
        let per = self.rb_entries();
        let end = m.end_cluster;
        // Clusters come in increasing order: `keep` is walked alongside and
        // the freed ones are gathered in a vector, then built into a set in
        // one go (one lookup or push per cluster in the roaring sets cost
        // 100-250 ns each: 2 ms for 8,192 clusters).
        let mut keep = keep.iter().peekable();
        let mut freed = Vec::new();
        for rti in 0..m.rt.len() as u64 {
            let first = rti * per;
            if first >= end {
                break;
            }
            let Some(b) = self.rt_block(m, rti)? else {
                continue;
            };
            self.rb_load(m, b)?;
            let e = m.rb.get(b).ok_or_else(|| corrupt("refcount cache miss"))?;
            let n = (end - first).min(per) as usize;
            let mut changed = false;
            // 8 bytes = 4 refcounts at a time; most words are zero.
            for (w, word) in e.data[..n.div_ceil(4) * 8].chunks_exact_mut(8).enumerate() {
                if word == [0u8; 8] {
                    continue;
                }
                for k in 0..4 {
                    let idx = w * 4 + k;
                    let c = first + idx as u64;
                    if idx >= n || word[k * 2..k * 2 + 2] == [0, 0] {
                        continue;
                    }
                    while keep.next_if(|&k| k < c).is_some() {}
                    if keep.peek() == Some(&c) {
                        continue;
                    }
                    word[k * 2..k * 2 + 2].copy_from_slice(&[0, 0]);
                    freed.push(c);
                    changed = true;
                }
            }
            if changed {
                e.dirty = true;
            }
        }
        RoaringTreemap::from_sorted_iter(freed).map_err(|_| corrupt("refcount walk out of order"))
    }

    /// Record a new backing file name and format in the header (or none),
    /// e.g. after a commit or stream job changed the chain.
    ///
    /// Crash-safe: the new name is written into free bytes of cluster 0 and
    /// flushed, then the header and extensions pointing at it are written in
    /// one sector and flushed, so a power loss leaves either the old or the
    /// new backing. (Only when the header and its extensions, without the
    /// optional feature-name table, exceed 512 bytes, or cluster 0 has no free
    /// room for the name, is the header write not a single sector.)
    pub fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.check_writable()?;
        let mut m = self.meta.lock();
        self.flush_locked(&mut m, false)?;
        m.h.sync_raw();
        let up =
            m.h.backing_update(name, format)
                .map_err(|e| Error::new(ErrorKind::InvalidArgument, e.context().to_string()))?;
        let mut raw = m.h.raw.clone();
        let name_end = up.name.as_ref().map_or(0, |(o, n)| *o as usize + n.len());
        raw.resize(raw.len().max(up.prefix.len()).max(name_end), 0);
        if let Some((off, bytes)) = &up.name {
            raw[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
        }
        raw[..up.prefix.len()].copy_from_slice(&up.prefix);
        let mut padded = raw;
        padded.resize(self.cs() as usize, 0);
        let parsed = Header::parse(&padded)?;
        if let Some((off, bytes)) = &up.name {
            self.swrite(&mut m, bytes, *off, "backing name write")?;
            self.sflush()?;
        }
        self.swrite(&mut m, &up.prefix, 0, "header write")?;
        self.sflush()?;
        m.h.backing_file = parsed.backing_file;
        m.h.backing_format = parsed.backing_format;
        m.h.backing_file_offset = parsed.backing_file_offset;
        m.h.backing_file_size = parsed.backing_file_size;
        m.h.raw = parsed.raw;
        Ok(())
    }

    /// Grow the virtual size to `new_size` (shrinking is refused).
    pub fn grow(&self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        let mut m = self.meta.lock();
        if new_size < m.h.size {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("shrinking from {} to {new_size} is not supported", m.h.size),
            ));
        }
        if new_size % 512 != 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("virtual size {new_size} is not a multiple of 512"),
            ));
        }
        if new_size > header::MAX_VIRTUAL_SIZE {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("virtual size {new_size} too large"),
            ));
        }
        let cs = self.cs();
        let need = header::l1_entries_for(new_size, self.cluster_bits);
        if need * 8 > header::MAX_L1_BYTES {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("virtual size {new_size} needs too large an L1 table"),
            ));
        }
        self.wait_allocations(&mut m);
        self.flush_locked(&mut m, true)?;
        self.ensure_dirty(&mut m)?;
        let old_len = m.l1.len() as u64;
        let old_clusters = (old_len * 8).div_ceil(cs).max(1);
        if need > old_len {
            if need * 8 > old_clusters * cs {
                let n = (need * 8).div_ceil(cs);
                let start = self.alloc_contiguous(&mut m, n)?;
                let old_off = m.h.l1_table_offset;
                m.l1.resize(need as usize, 0);
                m.h.l1_table_offset = start << self.cluster_bits;
                self.write_l1(&mut m)?;
                self.write_refcounts(&mut m)?;
                self.sflush()?;
                for c in 0..old_clusters {
                    m.pending_decref.push((old_off >> self.cluster_bits) + c);
                }
            } else {
                m.l1.resize(need as usize, 0);
                self.write_l1(&mut m)?;
                self.sflush()?;
            }
            m.h.l1_size = need as u32;
        }
        m.h.size = new_size;
        self.write_header(&mut m)?;
        self.sflush()?;
        self.flush_locked(&mut m, true)
    }

    fn preallocate(&self) -> Result<()> {
        let mut m = self.meta.lock();
        let cs = self.cs();
        let clusters = m.h.size.div_ceil(cs);
        for cl in 0..clusters {
            let l2_off = self.ensure_l2(&mut m, cl)?;
            let c = self.alloc_cluster(&mut m)?;
            let h = c << self.cluster_bits;
            self.l2_set(&mut m, l2_off, cl % self.l2_entries(), h | COPIED | ZERO)?;
        }
        let end = m.end_cluster << self.cluster_bits;
        if m.phys_len < end {
            self.grow_file(&mut m, end)?;
        }
        m.file_len = m.file_len.max(end);
        self.flush_locked(&mut m, true)
    }

    // ---------------------------------------------------------------- check / repair

    /// Count the references of every cluster; `fix` clears invalid entries and
    /// sets COPIED flags from the counted references.
    fn collect_refs(
        &self,
        m: &mut Meta,
        report: &mut CheckReport,
        with_refcount_structs: bool,
        fix: bool,
    ) -> Result<HashMap<u64, u32>> {
        let cs = self.cs();
        let mut refs: HashMap<u64, u32> = HashMap::new();
        let add = |refs: &mut HashMap<u64, u32>, c: u64| *refs.entry(c).or_insert(0) += 1;
        let mut visited: HashSet<u64> = HashSet::new();
        add(&mut refs, 0);
        let l1c = (m.l1.len() as u64 * 8).div_ceil(cs);
        for c in 0..l1c {
            add(&mut refs, (m.h.l1_table_offset >> self.cluster_bits) + c);
        }
        if with_refcount_structs {
            for c in 0..m.h.refcount_table_clusters as u64 {
                add(
                    &mut refs,
                    (m.h.refcount_table_offset >> self.cluster_bits) + c,
                );
            }
            for rti in 0..m.rt.len() as u64 {
                match self.rt_block(m, rti) {
                    Ok(Some(b)) => add(&mut refs, b >> self.cluster_bits),
                    Ok(None) => {}
                    Err(e) => {
                        report.corruptions += 1;
                        report.note(e.to_string());
                    }
                }
            }
        }
        for l1i in 0..m.l1.len() as u64 {
            let l2_off = match self.l1_decode(m, l1i) {
                Ok(Some(o)) => o,
                Ok(None) => continue,
                Err(e) => {
                    report.corruptions += 1;
                    report.note(e.to_string());
                    if fix {
                        m.l1[l1i as usize] = 0;
                        m.l1_dirty = true;
                        m.l1_used.remove(l1i as u32);
                    }
                    continue;
                }
            };
            add(&mut refs, l2_off >> self.cluster_bits);
            if !visited.insert(l2_off) {
                // Shared by two L1 entries: counted (an overlap), walked once.
                continue;
            }
            self.l2_load(m, l2_off)?;
            for j in 0..self.l2_entries() {
                let raw = self.l2_get(m, l2_off, j)?;
                let vofs = (l1i * self.l2_entries() + j) * cs;
                match self.decode_l2(m, raw, vofs) {
                    Ok(Entry::Data(h, _)) | Ok(Entry::Zero(Some(h), _)) => {
                        add(&mut refs, h >> self.cluster_bits)
                    }
                    Ok(Entry::Compressed) => {
                        report.corruptions += 1;
                        report.note(format!(
                            "compressed cluster at guest offset {vofs} (compression is unsupported)"
                        ));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        report.corruptions += 1;
                        report.note(e.to_string());
                        if fix {
                            self.l2_set(m, l2_off, j, 0)?;
                        }
                    }
                }
            }
        }
        Ok(refs)
    }

    /// Check the image: refcounts against references, COPIED flags, entries.
    pub fn check(&self) -> Result<CheckReport> {
        let mut m = self.meta.lock();
        // A cluster being placed is allocated but not yet referenced.
        self.wait_allocations(&mut m);
        if !self.read_only {
            self.flush_locked(&mut m, true)?;
        }
        self.check_locked(&mut m)
    }

    fn check_locked(&self, m: &mut Meta) -> Result<CheckReport> {
        if m.h.nb_snapshots > 0 {
            return Err(unsupported("check of images with internal snapshots"));
        }
        let mut report = CheckReport::default();
        let refs = self.collect_refs(m, &mut report, true, false)?;
        let max_ref = refs.keys().copied().max().unwrap_or(0);
        let n = m.end_cluster.max(max_ref + 1);
        let mut last_used = 0u64;
        for c in 0..n {
            let stored = match self.rc_get(m, c) {
                Ok(v) => v,
                Err(e) => {
                    report.corruptions += 1;
                    report.note(e.to_string());
                    0
                }
            };
            let r = refs.get(&c).copied().unwrap_or(0) as u64;
            if stored > 0 {
                report.allocated_clusters += 1;
                last_used = c + 1;
            }
            if r > 1 {
                report.overlaps += 1;
                report.corruptions += 1;
                report.note(format!("cluster {c} referenced {r} times"));
            }
            if stored > r {
                report.leaks += 1;
                report.note(format!(
                    "Leaked cluster {c} refcount={stored} reference={r}"
                ));
            } else if stored < r {
                report.corruptions += 1;
                report.note(format!("ERROR cluster {c} refcount={stored} reference={r}"));
            }
        }
        report.image_end_offset = last_used << self.cluster_bits;
        // COPIED flags.
        let mut visited: HashSet<u64> = HashSet::new();
        for l1i in 0..m.l1.len() as u64 {
            let Ok(Some(l2_off)) = self.l1_decode(m, l1i) else {
                continue;
            };
            if !visited.insert(l2_off) {
                continue;
            }
            let rc = self.rc_get(m, l2_off >> self.cluster_bits).unwrap_or(0);
            if (m.l1[l1i as usize] & COPIED != 0) != (rc == 1) {
                report.copied_flag_errors += 1;
                report.corruptions += 1;
                report.note(format!(
                    "OFLAG_COPIED L2 cluster: l1_index={l1i} refcount={rc}"
                ));
            }
            for j in 0..self.l2_entries() {
                let raw = self.l2_get(m, l2_off, j)?;
                if raw & COMPRESSED != 0 || raw & ZERO != 0 && raw & OFFSET_MASK == 0 {
                    continue;
                }
                let h = raw & OFFSET_MASK;
                if h == 0 || raw & L2_RESERVED != 0 {
                    continue;
                }
                let rc = self.rc_get(m, h >> self.cluster_bits).unwrap_or(0);
                if (raw & COPIED != 0) != (rc == 1) {
                    report.copied_flag_errors += 1;
                    report.corruptions += 1;
                    report.note(format!(
                        "OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}"
                    ));
                }
            }
        }
        Ok(report)
    }

    /// Repair the image: clear invalid entries, fix COPIED flags, rebuild
    /// refcounts from the references. Returns what was found before repair.
    pub fn repair(&self) -> Result<CheckReport> {
        self.check_writable()?;
        let mut m = self.meta.lock();
        self.wait_allocations(&mut m);
        self.flush_locked(&mut m, true)?;
        let before = self.check_locked(&mut m)?;
        self.repair_locked(&mut m)?;
        self.flush_locked(&mut m, true)?;
        self.clear_dirty(&mut m)?;
        Ok(before)
    }

    fn repair_locked(&self, m: &mut Meta) -> Result<()> {
        let mut report = CheckReport::default();
        self.rebuild_refcounts(m, &mut report)
    }

    /// Rebuild the refcount table and blocks from scratch after the last referenced cluster.
    fn rebuild_refcounts(&self, m: &mut Meta, report: &mut CheckReport) -> Result<()> {
        self.ensure_dirty(m)?;
        let cs = self.cs();
        m.rb.clear();
        m.pending_decref.clear();
        let refs = self.collect_refs(m, report, false, true)?;
        // Fix COPIED flags from the counted references.
        let mut visited: HashSet<u64> = HashSet::new();
        for l1i in 0..m.l1.len() {
            let e = m.l1[l1i];
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let r = refs.get(&(off >> self.cluster_bits)).copied().unwrap_or(0);
            let want = if r == 1 { off | COPIED } else { off };
            if want != e {
                m.l1[l1i] = want;
                m.l1_dirty = true;
            }
            if !visited.insert(off) {
                continue;
            }
            for j in 0..self.l2_entries() {
                let raw = self.l2_get(m, off, j)?;
                let h = raw & OFFSET_MASK;
                if raw & COMPRESSED != 0 || h == 0 {
                    continue;
                }
                let r = refs.get(&(h >> self.cluster_bits)).copied().unwrap_or(0);
                let want = if r == 1 { raw | COPIED } else { raw & !COPIED };
                if want != raw {
                    self.l2_set(m, off, j, want)?;
                }
            }
        }
        // L2 tables and L1 first (the dirty bit is set: order is free here).
        for off in m.l2.dirty_offsets() {
            let data = match m.l2.get(off) {
                Some(e) => {
                    e.dirty = false;
                    e.data.clone()
                }
                None => continue,
            };
            self.swrite(m, &data, off, "L2 table write")?;
        }
        if m.l1_dirty {
            self.write_l1(m)?;
        }
        let p = refs.keys().copied().max().unwrap_or(0) + 1;
        let per = self.rb_entries();
        let (mut t, mut b) = (1u64, 1u64);
        loop {
            let total = p + t + b;
            let nb = total.div_ceil(per);
            let nt = (nb * 8).div_ceil(cs);
            if nb <= b && nt <= t {
                break;
            }
            b = b.max(nb);
            t = t.max(nt);
        }
        if t * cs > header::MAX_REFTABLE_BYTES.max(cs) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "refcount table would exceed 8 MiB: image file too large",
            ));
        }
        let total = p + t + b;
        let mut rt = vec![0u64; (t * cs / 8) as usize];
        for i in 0..b {
            let boff = (p + t + i) << self.cluster_bits;
            rt[i as usize] = boff;
            let mut blk = vec![0u8; cs as usize];
            for k in 0..per {
                let c = i * per + k;
                if c >= total {
                    break;
                }
                let v = if c >= p {
                    1
                } else {
                    refs.get(&c).copied().unwrap_or(0).min(u16::MAX as u32)
                };
                if v != 0 {
                    blk[k as usize * 2..k as usize * 2 + 2]
                        .copy_from_slice(&(v as u16).to_be_bytes());
                }
            }
            self.swrite(m, &blk, boff, "refcount block write")?;
        }
        let mut tb = Vec::with_capacity(rt.len() * 8);
        for e in &rt {
            tb.extend_from_slice(&e.to_be_bytes());
        }
        self.swrite(m, &tb, p << self.cluster_bits, "refcount table write")?;
        self.sflush()?;
        m.h.refcount_table_offset = p << self.cluster_bits;
        m.h.refcount_table_clusters = t as u32;
        self.write_header(m)?;
        self.sflush()?;
        let total_bytes = total << self.cluster_bits;
        if m.phys_len > total_bytes {
            self.shrink_file(m, total_bytes)?;
            self.sflush()?;
        }
        m.rt = rt;
        m.rt_dirty = false;
        m.end_cluster = total;
        m.free = RoaringTreemap::new();
        for c in 1..p {
            if !refs.contains_key(&c) {
                m.free.insert(c);
            }
        }
        Ok(())
    }
}

/// Contiguous host bytes [`Qcow2::write`] gathers before writing them at once.
#[derive(Default)]
struct Run {
    /// Host offset of the first byte.
    host: u64,
    /// Offset of the first byte in the caller's buffer.
    buf_off: usize,
    /// Bytes gathered.
    len: usize,
    /// L1 index of the one L2 table the run's clusters share.
    l1i: u64,
    /// The clusters newly placed, linked once the data is written.
    pending: Vec<Placed>,
    /// Guest clusters written in place (their `Meta::in_place` counts).
    in_place: Vec<u64>,
}

/// A guest cluster given a new host cluster by a write in progress.
struct Placed {
    /// Guest cluster index (its entry in `Meta::allocating`).
    cl: u64,
    /// The L2 table and entry index to point at `host`.
    l2_off: u64,
    idx: u64,
    /// Host offset of the new cluster.
    host: u64,
    /// The cluster it replaces, released once the change is durable.
    decref: Option<u64>,
}

fn read_backing(backing: Option<&dyn BackingRead>, offset: u64, buf: &mut [u8]) -> Result<()> {
    let Some(b) = backing else {
        buf.fill(0);
        return Ok(());
    };
    let blen = b.backing_len();
    let avail = blen.saturating_sub(offset).min(buf.len() as u64) as usize;
    if avail > 0 {
        b.read_backing(offset, &mut buf[..avail])?;
    }
    buf[avail..].fill(0);
    Ok(())
}

/// The image's storage, with a count of the changes made through it so that
/// a flush with nothing changed since the last one skips the storage's
/// flush (QEMU's write generation). On a file that is no small thing: an
/// `fdatasync` with nothing to write still flushes the device's cache and
/// waits behind whatever else the device is doing.
///
/// The count is bumped after a change completes (or fails), and a flush
/// records the count it read before it started: a change still in flight
/// when a flush starts is not promised by that flush, and the next flush
/// sees it. Only changes made through this image count, which is enough:
/// the image caches its metadata, so nothing else may write its storage.
struct Counted<S> {
    inner: S,
    changes: AtomicU64,
    flushed: AtomicU64,
}

impl<S: Storage> Counted<S> {
    fn new(inner: S, unflushed: bool) -> Self {
        Counted {
            inner,
            changes: AtomicU64::new(u64::from(unflushed)),
            flushed: AtomicU64::new(0),
        }
    }

    fn changed<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        self.changes.fetch_add(1, Ordering::AcqRel);
        r
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.changed(self.inner.write_at(buf, offset))
    }
    /// A durable write that succeeded leaves nothing for a flush to do.
    fn write_durable(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let r = self.inner.write_durable(buf, offset);
        if r.is_ok() {
            r
        } else {
            self.changed(r)
        }
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.changed(self.inner.set_len(len))
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.changed(self.inner.discard(offset, len))
    }
    fn flush(&self) -> std::io::Result<()> {
        let now = self.changes.load(Ordering::Acquire);
        if self.flushed.load(Ordering::Acquire) == now {
            return Ok(());
        }
        self.inner.flush()?;
        self.flushed.fetch_max(now, Ordering::AcqRel);
        Ok(())
    }
}
