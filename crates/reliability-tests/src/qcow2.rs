//! qcow2 targets: arbitrary bytes as an image, and a valid image whose
//! header and tables (L1, L2, refcount table and blocks) are patched by the
//! input, which reaches deeper than random headers do.

use std::sync::{Arc, OnceLock};

use qcow_lite::{fuzzing, CreateOptions, MemStorage, Qcow2};

use crate::Bytes;

/// Arbitrary bytes opened as an image and used every way the engine allows
/// (open read-only and read-write, read, map, write, zero, discard, check,
/// repair, make_empty, grow, close): `qcow_lite::fuzzing::exercise`.
pub fn image(data: &[u8]) {
    fuzzing::exercise(data);
}

/// Values that make table entries and header fields interesting.
const SPECIAL: [u64; 10] = [
    0,
    1,
    0x200,
    0x1_0000,
    u64::MAX,
    1 << 62,
    1 << 63,
    0x00ff_ffff_ffff_fe00,
    0x7fff_ffff,
    0x8000_0000_0001_0000,
];

/// Two small valid images (512-byte clusters with data, zero and unallocated
/// clusters; 4 KiB clusters with lazy refcounts and a backing name).
pub fn base_images() -> &'static [Vec<u8>] {
    static IMGS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    IMGS.get_or_init(|| {
        let mut v = Vec::new();
        for (cs, size, lazy, backing) in [
            (512u64, 64 * 1024u64, false, None),
            (4096, 1 << 20, true, Some("base.raw")),
        ] {
            let st = Arc::new(MemStorage::new());
            let img = Qcow2::create(
                st.clone(),
                &CreateOptions {
                    size,
                    cluster_size: cs,
                    lazy_refcounts: lazy,
                    backing_file: backing.map(String::from),
                    backing_format: backing.map(|_| "raw".to_string()),
                    ..Default::default()
                },
            )
            .expect("create a base image in memory");
            for i in 0..12u64 {
                let off = (i * 7919 * cs / 3) % (size - 2 * cs);
                img.write(off, &vec![i as u8 + 1; cs as usize + 100], None)
                    .expect("write to a base image");
            }
            img.write_zeroes(size - cs, cs, false, None)
                .expect("zero a cluster of a base image");
            img.close().expect("close a base image");
            drop(img);
            v.push(st.to_vec());
        }
        v
    })
}

/// A valid image patched by the input: byte 0 picks the base image, then
/// each 6-byte record `kind, position u32, value` overwrites a byte, an
/// aligned 8-byte table entry, or a header field (with a special value or
/// the next 8 input bytes), and the result is exercised as in [`image`].
pub fn tables(data: &[u8]) {
    let mut b = Bytes::new(data);
    let bases = base_images();
    let mut img = bases[b.u8() as usize % bases.len()].clone();
    let len = img.len();
    let mut patches = 0;
    while !b.is_empty() && patches < 64 {
        patches += 1;
        let kind = b.u8();
        let pos = b.u32() as usize;
        let val = b.u8();
        match kind % 6 {
            0 => img[pos % len] = val,
            1 => {
                let o = (pos % (len / 8)) * 8;
                img[o..o + 8].copy_from_slice(&SPECIAL[val as usize % SPECIAL.len()].to_be_bytes());
            }
            2 => {
                let o = (pos % (len / 8)) * 8;
                img[o..o + 8].copy_from_slice(&b.u64().to_be_bytes());
            }
            3 => img[pos % 112] = val,
            4 => {
                let o = (pos % 14) * 8;
                img[o..o + 8].copy_from_slice(&SPECIAL[val as usize % SPECIAL.len()].to_be_bytes());
            }
            _ => {
                // Truncate or extend the file.
                let new_len = (pos % (len + 4096)).max(1);
                img.resize(new_len, val);
                return fuzzing::exercise(&img);
            }
        }
    }
    fuzzing::exercise(&img);
}
