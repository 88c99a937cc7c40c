//! A read-only view of a qcow2 file's header and L1/L2 tables, and the one
//! header rewrite the tools need (changing the backing file, for `rebase`).
//!
//! `qcow-lite` keeps its header and tables private; `info`, `check` and `map`
//! need a few more facts than its API gives (dirty and corrupt bits,
//! preallocated zero clusters, host offsets), so we read them here. This is
//! only ever done on a file no `Qcow2` handle is writing.

use super::ImgError;
use std::fs::File;
use std::os::unix::fs::FileExt;

const MAGIC: u32 = 0x5146_49FB;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;

/// The header fields the tools print or use.
#[derive(Debug, Clone)]
pub struct QHeader {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Where the L1 table is.
    pub l1_table_offset: u64,
    /// Where the refcount table is.
    pub refcount_table_offset: u64,
    /// Its length in clusters.
    pub refcount_table_clusters: u32,
    /// Incompatible feature bits (0: dirty, 1: corrupt, 4: extended L2).
    pub incompatible: u64,
    /// Compatible feature bits (0: lazy refcounts).
    pub compatible: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the fixed header (extensions follow).
    pub header_length: u32,
    /// 0: zlib, 1: zstd.
    pub compression_type: u8,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
    /// Backing format from the header extension.
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]))
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

fn read_exact_at(f: &File, buf: &mut [u8], off: u64, what: &str) -> Result<(), ImgError> {
    // Short files read as zeros past their end, as qcow2 allows.
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImgError::io(format!("read {what}"), e)),
        }
    }
    Ok(())
}

/// True when the file starts with the qcow2 magic.
pub fn is_qcow2(f: &File) -> Result<bool, ImgError> {
    let mut m = [0u8; 4];
    let n = f
        .read_at(&mut m, 0)
        .map_err(|e| ImgError::io("probe format", e))?;
    Ok(n == 4 && be32(&m, 0) == MAGIC)
}

impl QHeader {
    /// Read the header of a qcow2 file (`name` for messages).
    pub fn read(f: &File, name: &str) -> Result<QHeader, ImgError> {
        let mut b = vec![0u8; 104];
        read_exact_at(f, &mut b, 0, name)?;
        if be32(&b, 0) != MAGIC {
            return Err(ImgError::image(format!(
                "'{name}' is not a qcow2 image (bad magic)"
            )));
        }
        let version = be32(&b, 4);
        let cluster_bits = be32(&b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(ImgError::image(format!(
                "'{name}': invalid cluster_bits {cluster_bits}"
            )));
        }
        let cs = 1usize << cluster_bits;
        let mut c0 = vec![0u8; cs];
        read_exact_at(f, &mut c0, 0, name)?;
        let (header_length, refcount_order, incompatible, compatible) = if version >= 3 {
            (be32(&c0, 100), be32(&c0, 96), be64(&c0, 72), be64(&c0, 80))
        } else {
            (72, 4, 0, 0)
        };
        if header_length < 72 || header_length as usize > cs {
            return Err(ImgError::image(format!(
                "'{name}': invalid header length {header_length}"
            )));
        }
        let compression_type = if header_length > 104 { c0[104] } else { 0 };
        let bf_off = be64(&c0, 8) as usize;
        let bf_len = be32(&c0, 16) as usize;
        let backing_file = if bf_off != 0 && bf_len != 0 {
            if bf_off + bf_len > cs || bf_len > 1023 {
                return Err(ImgError::image(format!(
                    "'{name}': backing file name lies outside the first cluster"
                )));
            }
            Some(String::from_utf8_lossy(&c0[bf_off..bf_off + bf_len]).into_owned())
        } else {
            None
        };
        let mut backing_format = None;
        if version >= 3 {
            for (ty, data) in extensions(&c0, header_length as usize) {
                if ty == EXT_BACKING_FORMAT {
                    backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
            }
        }
        Ok(QHeader {
            version,
            cluster_bits,
            size: be64(&c0, 24),
            l1_size: be32(&c0, 36),
            l1_table_offset: be64(&c0, 40),
            refcount_table_offset: be64(&c0, 48),
            refcount_table_clusters: be32(&c0, 56),
            incompatible,
            compatible,
            refcount_order,
            header_length,
            compression_type,
            backing_file,
            backing_format,
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

/// The header extensions after `start`: (type, data) until the end marker.
fn extensions(c0: &[u8], start: usize) -> Vec<(u32, &[u8])> {
    let mut out = Vec::new();
    let mut p = start;
    while p + 8 <= c0.len() {
        let ty = be32(c0, p);
        let len = be32(c0, p + 4) as usize;
        if ty == 0 {
            break;
        }
        let end = p + 8 + len;
        if end > c0.len() {
            break;
        }
        out.push((ty, &c0[p + 8..end]));
        p = p + 8 + len.div_ceil(8) * 8;
    }
    out
}

/// How many of the host clusters `0..end` have a non-zero refcount,
/// counting no further than `cap` (16-bit refcounts only; None otherwise).
pub fn count_used_clusters(f: &File, h: &QHeader, end: u64, cap: u64) -> Option<u64> {
    if h.refcount_order != 4 {
        return None;
    }
    let cs = h.cluster_size();
    let rt_len = h.refcount_table_clusters as u64 * cs;
    if rt_len > 8 << 20 {
        return None;
    }
    let mut rt = vec![0u8; rt_len as usize];
    read_exact_at(f, &mut rt, h.refcount_table_offset, "refcount table").ok()?;
    let per_block = cs / 2;
    let mut blk = vec![0u8; cs as usize];
    let mut count = 0u64;
    for i in 0..rt.len() / 8 {
        let first = i as u64 * per_block;
        if first >= end || count >= cap {
            break;
        }
        let off = be64(&rt, i * 8) & !0x1ff;
        if off == 0 {
            continue;
        }
        read_exact_at(f, &mut blk, off, "refcount block").ok()?;
        for j in 0..per_block.min(end - first) as usize {
            if count >= cap {
                break;
            }
            if blk[j * 2] != 0 || blk[j * 2 + 1] != 0 {
                count += 1;
            }
        }
    }
    Some(count)
}

/// Rewrite the backing file name and format of a closed qcow2 image. Other
/// header extensions are kept; everything must fit in the first cluster.
pub fn set_backing(
    f: &File,
    name: &str,
    backing: Option<&str>,
    format: Option<&str>,
) -> Result<(), ImgError> {
    let h = QHeader::read(f, name)?;
    if h.version < 3 {
        return Err(ImgError::image(format!(
            "'{name}': qcow2 version {} images are not supported",
            h.version
        )));
    }
    let cs = h.cluster_size() as usize;
    let mut c0 = vec![0u8; cs];
    read_exact_at(f, &mut c0, 0, name)?;
    let hl = h.header_length as usize;
    let old_end = {
        // End of the old header area: past the extensions and the old name.
        let mut p = hl;
        for (_, d) in extensions(&c0, hl) {
            p += 8 + d.len().div_ceil(8) * 8;
        }
        p += 8;
        let bf_end = be64(&c0, 8) as usize + be32(&c0, 16) as usize;
        p.max(bf_end).min(cs)
    };
    let mut out = c0[..hl].to_vec();
    for (ty, d) in extensions(&c0, hl) {
        if ty == EXT_BACKING_FORMAT {
            continue;
        }
        push_ext(&mut out, ty, d);
    }
    if let (Some(_), Some(fmt)) = (backing, format) {
        push_ext(&mut out, EXT_BACKING_FORMAT, fmt.as_bytes());
    }
    out.extend_from_slice(&[0u8; 8]);
    let (bf_off, bf_len) = match backing {
        Some(b) => {
            if b.is_empty() || b.len() > 1023 {
                return Err(ImgError::usage(
                    "backing file name must have 1 to 1023 bytes",
                ));
            }
            let off = out.len();
            out.extend_from_slice(b.as_bytes());
            (off as u64, b.len() as u32)
        }
        None => (0, 0),
    };
    if out.len() > cs {
        return Err(ImgError::image(format!(
            "'{name}': the header and backing file name do not fit in one cluster"
        )));
    }
    out[8..16].copy_from_slice(&bf_off.to_be_bytes());
    out[16..20].copy_from_slice(&bf_len.to_be_bytes());
    if out.len() < old_end {
        out.resize(old_end, 0);
    }
    f.write_all_at(&out, 0)
        .map_err(|e| ImgError::io(format!("write header of '{name}'"), e))?;
    f.sync_all()
        .map_err(|e| ImgError::io(format!("flush '{name}'"), e))
}

fn push_ext(out: &mut Vec<u8>, ty: u32, d: &[u8]) {
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&(d.len() as u32).to_be_bytes());
    out.extend_from_slice(d);
    out.resize(out.len().div_ceil(8) * 8, 0);
}

/// What one guest cluster of a qcow2 image is, from its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// No entry: read from the backing file.
    Unallocated,
    /// Zero flag without a host cluster.
    ZeroPlain,
    /// Zero flag with a preallocated host cluster.
    ZeroAlloc(u64),
    /// Data at this host offset.
    Normal(u64),
    /// A compressed cluster.
    Compressed,
}

/// Read-only access to the L1/L2 tables of a qcow2 file (one L2 table cached).
/// It sees the tables as they were on disk when it was made (and as later read).
pub struct L2Walker {
    f: File,
    name: String,
    cluster_bits: u32,
    l1: Vec<u64>,
    cached: Option<(u64, Vec<u64>)>,
}

impl L2Walker {
    /// Load the L1 table of `h` from `f`.
    pub fn new(f: File, h: &QHeader, name: &str) -> Result<Self, ImgError> {
        if h.l1_size as u64 * 8 > 32 << 20 {
            return Err(ImgError::image(format!(
                "'{name}': L1 table of {} entries is too large",
                h.l1_size
            )));
        }
        let mut b = vec![0u8; h.l1_size as usize * 8];
        read_exact_at(&f, &mut b, h.l1_table_offset, name)?;
        let l1 = b.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(L2Walker {
            f,
            name: name.to_string(),
            cluster_bits: h.cluster_bits,
            l1,
            cached: None,
        })
    }

    fn l2_entries(&self) -> u64 {
        1 << (self.cluster_bits - 3)
    }

    /// Host offset of the L2 table of L1 entry `i` (0 when unallocated).
    pub fn l2_offset(&self, i: u64) -> u64 {
        self.l1.get(i as usize).map_or(0, |e| e & OFFSET_MASK)
    }

    /// Number of L1 entries.
    pub fn l1_len(&self) -> u64 {
        self.l1.len() as u64
    }

    /// The L2 table of L1 entry `i` (None when unallocated).
    pub fn l2_table(&mut self, i: u64) -> Result<Option<&[u64]>, ImgError> {
        let Some(e) = self.l1.get(i as usize) else {
            return Ok(None);
        };
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if self.cached.as_ref().map(|c| c.0) != Some(off) {
            let mut b = vec![0u8; 1 << self.cluster_bits];
            read_exact_at(&self.f, &mut b, off, &self.name)?;
            let t = b.chunks_exact(8).map(|c| be64(c, 0)).collect();
            self.cached = Some((off, t));
        }
        Ok(self.cached.as_ref().map(|c| c.1.as_slice()))
    }

    /// Decode an L2 entry.
    pub fn decode(raw: u64) -> ClusterKind {
        if raw & COMPRESSED != 0 {
            return ClusterKind::Compressed;
        }
        let off = raw & OFFSET_MASK;
        if raw & ZERO != 0 {
            if off == 0 {
                ClusterKind::ZeroPlain
            } else {
                ClusterKind::ZeroAlloc(off)
            }
        } else if off == 0 {
            ClusterKind::Unallocated
        } else {
            ClusterKind::Normal(off)
        }
    }

    /// The kind of guest cluster `cl`.
    pub fn cluster(&mut self, cl: u64) -> Result<ClusterKind, ImgError> {
        let per = self.l2_entries();
        let (i, j) = (cl / per, cl % per);
        Ok(match self.l2_table(i)? {
            None => ClusterKind::Unallocated,
            Some(t) => Self::decode(t[j as usize]),
        })
    }

    /// Kind of the cluster at guest `offset` and how many bytes from `offset`
    /// (up to `len`) continue it: same kind, contiguous host offsets.
    pub fn run(&mut self, offset: u64, len: u64) -> Result<(ClusterKind, u64), ImgError> {
        let cs = 1u64 << self.cluster_bits;
        let per = self.l2_entries();
        let first_cl = offset >> self.cluster_bits;
        let first = self.cluster(first_cl)?;
        let end = offset + len;
        let mut pos = (first_cl + 1) * cs;
        let mut cl = first_cl + 1;
        while pos < end {
            if matches!(first, ClusterKind::Unallocated)
                && self.l1.get((cl / per) as usize).map(|e| e & OFFSET_MASK) == Some(0)
            {
                // A whole unallocated L2 range.
                let next = (cl / per + 1) * per;
                pos = next * cs;
                cl = next;
                continue;
            }
            let k = self.cluster(cl)?;
            let delta = (cl - first_cl) * cs;
            let same = match (first, k) {
                (ClusterKind::Normal(a), ClusterKind::Normal(b)) => b == a + delta,
                (ClusterKind::ZeroAlloc(a), ClusterKind::ZeroAlloc(b)) => b == a + delta,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            pos += cs;
            cl += 1;
        }
        Ok((first, pos.min(end) - offset))
    }
}
