//! The qcow2 header: parsing with every field validated, and writing.

use crate::error::{invalid, unsupported, Result};

pub(crate) const MAGIC: u32 = 0x5146_49FB;
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
pub(crate) const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;
pub(crate) const EXT_CRYPTO: u32 = 0x0537_BE77;

/// QEMU's limits: 32 MiB of L1 table, 8 MiB of refcount table.
/// The sector whose writes are assumed atomic (as `storage::CRASH_SECTOR`).
const SECTOR: usize = 512;

/// The writes of a backing-file change (see [`Header::backing_update`]).
#[derive(Debug)]
pub struct BackingUpdate {
    /// Header, extensions and end marker, written at offset 0 last.
    pub prefix: Vec<u8>,
    /// The new name and its offset in cluster 0, written (and flushed) first.
    pub name: Option<(u64, Vec<u8>)>,
}

pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU refuses images larger than this many bytes of virtual size (2^55 - 1... we use 2^61).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 1 << 61;

// Byte offsets of the fields we patch.
pub(crate) const OFF_SIZE: usize = 24;
pub(crate) const OFF_L1_SIZE: usize = 36;
pub(crate) const OFF_L1_OFFSET: usize = 40;
pub(crate) const OFF_RT_OFFSET: usize = 48;
pub(crate) const OFF_RT_CLUSTERS: usize = 56;
pub(crate) const OFF_INCOMPAT: usize = 72;
pub(crate) const OFF_AUTOCLEAR: usize = 88;

/// A parsed and validated header, with the raw bytes of cluster 0 that hold
/// it (kept so that unknown extensions survive our rewrites).
#[derive(Debug, Clone)]
#[allow(dead_code)] // every field is parsed; some are only kept for debugging
pub(crate) struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Bytes of the header area (header, extensions, backing name), to patch and rewrite.
    pub raw: Vec<u8>,
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Entries of one L1 table needed to map `size` bytes with `cluster_bits`.
pub(crate) fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    let per_l2 = 1u64 << (cluster_bits + cluster_bits - 3);
    size.div_ceil(per_l2)
}

impl Header {
    /// Parse `buf` (the start of the file, at least 104 bytes, at most one cluster).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < 104 {
            return Err(invalid("file too short for a qcow2 header"));
        }
        if be32(buf, 0) != MAGIC {
            return Err(invalid("bad magic: not a qcow2 image"));
        }
        let version = be32(buf, 4);
        if version == 2 {
            return Err(unsupported("qcow2 version 2 (compat=0.10) images"));
        }
        if version != 3 {
            return Err(unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits {cluster_bits} outside 9..=21"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let header_length = be32(buf, 100);
        if header_length < 104 || header_length % 8 != 0 || header_length as u64 > cs {
            return Err(invalid(format!("bad header_length {header_length}")));
        }
        let h_len = (cs as usize).min(buf.len());
        if (header_length as usize) > h_len {
            return Err(invalid("header_length past the data read"));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: be64(buf, 72),
            compatible: be64(buf, 80),
            autoclear: be64(buf, 88),
            refcount_order: be32(buf, 96),
            header_length,
            backing_file: None,
            backing_format: None,
            raw: Vec::new(),
        };
        if be32(buf, 32) != 0 {
            return Err(unsupported("encryption (crypt_method != 0)"));
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        if h.incompatible & !known != 0 {
            return Err(unsupported(format!(
                "unknown incompatible feature bits {:#x}",
                h.incompatible & !known
            )));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported("external data file"));
        }
        if h.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported("extended L2 entries (subclusters)"));
        }
        if h.incompatible & INCOMPAT_COMPRESSION != 0 {
            let ct = if header_length >= 105 { buf[104] } else { 0 };
            if ct != 0 {
                return Err(unsupported(format!(
                    "compression type {ct} (zstd) in the header"
                )));
            }
        }
        if h.refcount_order > 6 {
            return Err(invalid(format!("refcount_order {}", h.refcount_order)));
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(invalid(format!("virtual size {} too large", h.size)));
        }
        if h.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(invalid(format!("L1 size {} too large", h.l1_size)));
        }
        if (h.l1_size as u64) < l1_entries_for(h.size, cluster_bits) {
            return Err(invalid(format!(
                "L1 table ({} entries) too small for virtual size {}",
                h.l1_size, h.size
            )));
        }
        if h.l1_table_offset % cs != 0 || (h.l1_size > 0 && h.l1_table_offset == 0) {
            return Err(invalid(format!(
                "L1 table offset {:#x} not cluster-aligned",
                h.l1_table_offset
            )));
        }
        if h.l1_table_offset.checked_add(MAX_L1_BYTES).is_none() {
            return Err(invalid("L1 table offset too large"));
        }
        if h.refcount_table_offset % cs != 0 || h.refcount_table_offset == 0 {
            return Err(invalid(format!(
                "refcount table offset {:#x} invalid",
                h.refcount_table_offset
            )));
        }
        if h.refcount_table_clusters == 0
            || h.refcount_table_clusters as u64 * cs > MAX_REFTABLE_BYTES.max(cs)
        {
            return Err(invalid(format!(
                "refcount_table_clusters {} invalid",
                h.refcount_table_clusters
            )));
        }
        if h.refcount_table_offset
            .checked_add(MAX_REFTABLE_BYTES)
            .is_none()
        {
            return Err(invalid("refcount table offset too large"));
        }
        if h.nb_snapshots > 65536 {
            return Err(invalid("too many snapshots"));
        }
        // Header extensions: type, length, data padded to 8; type 0 ends them.
        let mut pos = header_length as usize;
        let mut raw_end = pos;
        loop {
            if pos + 8 > h_len {
                break;
            }
            let ty = be32(buf, pos);
            let len = be32(buf, pos + 4) as usize;
            if ty == EXT_END {
                raw_end = pos + 8;
                break;
            }
            let data_start = pos + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= h_len)
                .ok_or_else(|| invalid(format!("header extension {ty:#x} overruns cluster 0")))?;
            let data = &buf[data_start..data_end];
            match ty {
                EXT_BACKING_FORMAT => {
                    h.backing_format = Some(
                        String::from_utf8(data.to_vec())
                            .map_err(|_| invalid("backing format is not UTF-8"))?,
                    );
                }
                EXT_DATA_FILE => return Err(unsupported("external data file")),
                EXT_CRYPTO => return Err(unsupported("encryption (crypto header)")),
                _ => {}
            }
            pos = data_start + len.div_ceil(8) * 8;
            raw_end = pos.min(h_len);
        }
        if h.backing_file_offset != 0 {
            let sz = h.backing_file_size as u64;
            if sz == 0 || sz > 1023 {
                return Err(invalid(format!("backing file name length {sz}")));
            }
            let end = h
                .backing_file_offset
                .checked_add(sz)
                .filter(|&e| e <= h_len as u64)
                .ok_or_else(|| invalid("backing file name outside cluster 0"))?;
            let name = &buf[h.backing_file_offset as usize..end as usize];
            h.backing_file = Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| invalid("backing file name is not UTF-8"))?,
            );
            raw_end = raw_end.max(end as usize);
        }
        h.raw = buf[..raw_end.max(header_length as usize)].to_vec();
        Ok(h)
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Store a u64 field into the raw header bytes.
    pub fn put64(&mut self, off: usize, v: u64) {
        self.raw[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }
    /// Store a u32 field into the raw header bytes.
    pub fn put32(&mut self, off: usize, v: u32) {
        self.raw[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    /// The cluster-0 writes that record a new backing name and format (or
    /// none), laid out for a crash-safe update: the name goes where no byte
    /// of the current header, extensions or name lives, so it can be written
    /// and flushed first; then `prefix` (header, extensions, end marker,
    /// pointing at the new name) is the commit. When the prefix fits in one
    /// 512-byte sector that commit is a single sector write (the feature-name
    /// table, optional and informational, is left out when that makes it
    /// fit).
    pub fn backing_update(&self, name: Option<&str>, fmt: Option<&str>) -> Result<BackingUpdate> {
        let hl = self.header_length as usize;
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut pos = hl;
        let mut old_prefix_end = hl;
        while pos + 8 <= self.raw.len() {
            let ty = be32(&self.raw, pos);
            let len = be32(&self.raw, pos + 4) as usize;
            if ty == EXT_END {
                old_prefix_end = pos + 8;
                break;
            }
            if pos + 8 + len > self.raw.len() {
                break;
            }
            if ty != EXT_BACKING_FORMAT {
                exts.push((ty, self.raw[pos + 8..pos + 8 + len].to_vec()));
            }
            pos += 8 + len.div_ceil(8) * 8;
            old_prefix_end = pos;
        }
        if let (Some(_), Some(f)) = (name, fmt) {
            exts.insert(0, (EXT_BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        let build = |skip_table: bool| {
            let mut b = self.raw[..hl].to_vec();
            for (ty, data) in &exts {
                if skip_table && *ty == EXT_FEATURE_TABLE {
                    continue;
                }
                b.extend_from_slice(&ty.to_be_bytes());
                b.extend_from_slice(&(data.len() as u32).to_be_bytes());
                b.extend_from_slice(data);
                while b.len() % 8 != 0 {
                    b.push(0);
                }
            }
            b.extend_from_slice(&[0u8; 8]);
            b
        };
        let mut prefix = build(false);
        if prefix.len() > SECTOR {
            let smaller = build(true);
            if smaller.len() <= SECTOR {
                prefix = smaller;
            }
        }
        let cs = self.cluster_size() as usize;
        let name = match name {
            Some(n) => {
                if n.is_empty() || n.len() > 1023 {
                    return Err(invalid("backing file name must have 1..=1023 bytes"));
                }
                let len = n.len();
                let (old_off, old_end) = match self.backing_file_offset {
                    0 => (0, 0),
                    o => (o as usize, o as usize + self.backing_file_size as usize),
                };
                let mut at = prefix.len().max(old_prefix_end).next_multiple_of(8);
                if at < old_end && at + len > old_off {
                    at = old_end.next_multiple_of(8);
                }
                if at + len > cs {
                    // No free room: write it compactly, not crash-safely.
                    at = prefix.len();
                }
                Some((at as u64, n.as_bytes().to_vec()))
            }
            None => None,
        };
        let (off, size) = name.as_ref().map_or((0, 0), |(o, n)| (*o, n.len() as u32));
        prefix[8..16].copy_from_slice(&off.to_be_bytes());
        prefix[16..20].copy_from_slice(&size.to_be_bytes());
        if prefix.len() > cs || off as usize + size as usize > cs {
            return Err(invalid(
                "header extensions and backing name do not fit in cluster 0",
            ));
        }
        Ok(BackingUpdate { prefix, name })
    }

    /// Copy the parsed fields we may change into the raw bytes.
    pub fn sync_raw(&mut self) {
        self.put64(OFF_SIZE, self.size);
        self.put32(OFF_L1_SIZE, self.l1_size);
        self.put64(OFF_L1_OFFSET, self.l1_table_offset);
        self.put64(OFF_RT_OFFSET, self.refcount_table_offset);
        self.put32(OFF_RT_CLUSTERS, self.refcount_table_clusters);
        self.put64(OFF_INCOMPAT, self.incompatible);
        self.put64(OFF_AUTOCLEAR, self.autoclear);
    }
}

fn feature_entry(out: &mut Vec<u8>, ty: u8, bit: u8, name: &str) {
    out.push(ty);
    out.push(bit);
    let mut n = [0u8; 46];
    n[..name.len()].copy_from_slice(name.as_bytes());
    out.extend_from_slice(&n);
}

/// Build the bytes of a fresh header (cluster 0) the way QEMU 10 lays it out.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_header(
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    rt_offset: u64,
    rt_clusters: u32,
    lazy: bool,
    backing: Option<(&str, Option<&str>)>,
) -> Vec<u8> {
    let mut b = vec![0u8; 112];
    b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    b[24..32].copy_from_slice(&size.to_be_bytes());
    b[36..40].copy_from_slice(&l1_size.to_be_bytes());
    b[40..48].copy_from_slice(&l1_offset.to_be_bytes());
    b[48..56].copy_from_slice(&rt_offset.to_be_bytes());
    b[56..60].copy_from_slice(&rt_clusters.to_be_bytes());
    let compat = if lazy { COMPAT_LAZY_REFCOUNTS } else { 0 };
    b[80..88].copy_from_slice(&compat.to_be_bytes());
    b[96..100].copy_from_slice(&4u32.to_be_bytes());
    b[100..104].copy_from_slice(&112u32.to_be_bytes());
    // Extensions: backing format, feature-name table, end.
    if let Some((_, Some(fmt))) = backing {
        b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b.extend_from_slice(&(fmt.len() as u32).to_be_bytes());
        b.extend_from_slice(fmt.as_bytes());
        while b.len() % 8 != 0 {
            b.push(0);
        }
    }
    let mut ft = Vec::new();
    feature_entry(&mut ft, 0, 0, "dirty bit");
    feature_entry(&mut ft, 0, 1, "corrupt bit");
    feature_entry(&mut ft, 0, 2, "external data file");
    feature_entry(&mut ft, 0, 3, "compression type");
    feature_entry(&mut ft, 0, 4, "extended L2 entries");
    feature_entry(&mut ft, 1, 0, "lazy refcounts");
    feature_entry(&mut ft, 2, 0, "bitmaps");
    feature_entry(&mut ft, 2, 1, "raw external data");
    // The feature-name table is optional: like QEMU, leave it out when it
    // would not fit in cluster 0 with the rest.
    let name_len = backing.map_or(0, |(n, _)| n.len());
    if b.len() + 8 + ft.len() + 8 + name_len <= 1usize << cluster_bits {
        b.extend_from_slice(&EXT_FEATURE_TABLE.to_be_bytes());
        b.extend_from_slice(&(ft.len() as u32).to_be_bytes());
        b.extend_from_slice(&ft);
    }
    b.extend_from_slice(&[0u8; 8]);
    if let Some((name, _)) = backing {
        let off = b.len() as u64;
        b[8..16].copy_from_slice(&off.to_be_bytes());
        b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        b.extend_from_slice(name.as_bytes());
    }
    b
}
