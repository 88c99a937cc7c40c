//! Helpers shared by the integration tests: QEMU tools as oracles, a byte model.
#![allow(dead_code)]

use qcow_lite::{Mapping, Qcow2, Rng, Storage};
use std::path::Path;
use std::process::Command;

/// Run a QEMU tool, failing with a clear message when it is missing.
pub fn tool(name: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(name).args(args).output().unwrap_or_else(|e| {
        panic!(
            "qcow-lite tests need `{name}` ({e}): install the Debian package `qemu-utils` \
             (apt-get install qemu-utils)"
        )
    });
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn qemu_img(args: &[&str]) -> (i32, String, String) {
    tool("qemu-img", args)
}

pub fn qemu_io(args: &[&str]) -> (i32, String, String) {
    tool("qemu-io", args)
}

/// `qemu-img check --output=json`, asserting no errors, leaks or corruptions.
pub fn assert_qemu_check_clean(path: &Path) {
    let p = path.to_str().unwrap();
    let (code, out, err) = qemu_img(&["check", "--output=json", "-f", "qcow2", p]);
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("qemu-img check output not JSON ({e}): {out} {err}"));
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    assert_eq!(
        (code, get("check-errors"), get("leaks"), get("corruptions")),
        (0, 0, 0, 0),
        "qemu-img check of {p}: {out} {err}"
    );
}

/// `qemu-img compare` of a qcow2 image against a raw file: must be identical.
pub fn assert_qemu_compare(img: &Path, raw: &Path) {
    let (code, out, err) = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "qemu-img compare: {out} {err}");
}

/// Per-cluster kind from `qemu-img map --output=json`: Some(host) data, None zero/unallocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum K {
    Data(u64),
    Zero,
    Unalloc,
}

pub fn qemu_map(img: &Path, cs: u64, size: u64) -> Vec<K> {
    let (code, out, err) =
        qemu_img(&["map", "--output=json", "-f", "qcow2", img.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img map: {out} {err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut res = vec![K::Unalloc; size.div_ceil(cs) as usize];
    for e in v.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let depth = e["depth"].as_u64().unwrap_or(0);
        let present = e["present"].as_bool().unwrap_or(true);
        let data = e["data"].as_bool().unwrap();
        let zero = e["zero"].as_bool().unwrap();
        let off = e.get("offset").and_then(|o| o.as_u64());
        // The kind of each cluster is that of the extent holding its first
        // byte (QEMU splits clusters where the file itself has holes).
        let mut p = start.div_ceil(cs) * cs;
        while p < start + len {
            let k = if depth > 0 || !present {
                K::Unalloc
            } else if data {
                K::Data(off.unwrap() + (p - start))
            } else if zero {
                K::Zero
            } else {
                K::Unalloc
            };
            res[(p / cs) as usize] = k;
            p += cs;
        }
    }
    res
}

pub fn our_map<S: Storage>(img: &Qcow2<S>) -> Vec<K> {
    let cs = img.cluster_size();
    let size = img.size();
    let mut res = Vec::new();
    let mut p = 0;
    while p < size {
        let (m, _) = img.map(p, (cs).min(size - p)).unwrap();
        res.push(match m {
            Mapping::Data { host_offset } => K::Data(host_offset),
            Mapping::Zero => K::Zero,
            Mapping::Unallocated => K::Unalloc,
        });
        p += cs;
    }
    res
}

/// One guest operation for the model tests.
#[derive(Debug, Clone)]
pub enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

pub fn pattern(off: u64, len: u64, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((off + i) as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

pub fn random_op(rng: &mut Rng, size: u64, cs: u64) -> Op {
    let kind = rng.below(10);
    let aligned = rng.below(2) == 0;
    let (off, len) = if aligned {
        let ncl = size / cs;
        let c = rng.below(ncl);
        let n = 1 + rng.below(4.min(ncl - c));
        (c * cs, n * cs)
    } else {
        let off = rng.below(size - 1);
        let len = 1 + rng.below((3 * cs).min(size - off));
        (off, len)
    };
    match kind {
        0..=5 => Op::Write {
            off,
            len,
            seed: rng.below(250) as u8 + 1,
        },
        6 | 7 => Op::Zero {
            off,
            len,
            unmap: rng.below(2) == 0,
        },
        8 => Op::Discard { off, len },
        _ => Op::Flush,
    }
}

/// Apply `op` to the byte model (the raw image), with QEMU's discard semantics:
/// whole clusters read as zeros, partial ones keep their data.
pub fn model_apply(model: &mut [u8], op: &Op, cs: u64) {
    let size = model.len() as u64;
    match *op {
        Op::Write { off, len, seed } => {
            model[off as usize..(off + len) as usize].copy_from_slice(&pattern(off, len, seed));
        }
        Op::Zero { off, len, .. } => model[off as usize..(off + len) as usize].fill(0),
        Op::Discard { off, len } => {
            let mut p = off;
            while p < off + len {
                let in_cl = p % cs;
                let n = (cs - in_cl).min(off + len - p);
                if in_cl == 0 && (n == cs || p + n == size) {
                    model[p as usize..(p + n) as usize].fill(0);
                }
                p += n;
            }
        }
        Op::Flush => {}
    }
}

pub fn image_apply<S: Storage>(
    img: &Qcow2<S>,
    op: &Op,
    backing: Option<&dyn qcow_lite::BackingRead>,
) -> qcow_lite::Result<()> {
    match *op {
        Op::Write { off, len, seed } => img.write(off, &pattern(off, len, seed), backing),
        Op::Zero { off, len, unmap } => img.write_zeroes(off, len, unmap, backing),
        Op::Discard { off, len } => img.discard(off, len),
        Op::Flush => img.flush(),
    }
}

pub fn read_all<S: Storage>(
    img: &Qcow2<S>,
    backing: Option<&dyn qcow_lite::BackingRead>,
) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read(0, &mut buf, backing).unwrap();
    buf
}

/// First differing offset, for readable assertion messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// A storage that counts `set_len` calls (truncates and extensions) and
/// flushes.
#[derive(Default)]
pub struct CountingStorage {
    pub inner: qcow_lite::MemStorage,
    pub set_lens: std::sync::atomic::AtomicU64,
    pub flushes: std::sync::atomic::AtomicU64,
}

impl Storage for CountingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.set_lens
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.set_len(len)
    }
}
