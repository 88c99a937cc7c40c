//! Hostile images: mutated headers and tables never make us panic, hang or
//! allocate by an unchecked field. `PROPTEST_CASES` sets the number of cases
//! (default 64).

use proptest::prelude::*;
use qcow_lite::{fuzzing, CreateOptions, ErrorKind, MemStorage, Qcow2};
use std::sync::{Arc, OnceLock};

fn base_images() -> &'static Vec<Vec<u8>> {
    static IMGS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    IMGS.get_or_init(|| {
        let mut v = Vec::new();
        for (cs, size, lazy, backing) in [
            (512u64, 300 * 1024u64, false, None),
            (4096, 3 << 20, true, Some("base.raw")),
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
            .unwrap();
            for i in 0..20u64 {
                let off = (i * 7919 * cs / 3) % (size - 2 * cs);
                img.write(off, &vec![i as u8 + 1; cs as usize + 100], None)
                    .unwrap();
            }
            img.write_zeroes(size - cs, cs, false, None).unwrap();
            img.close().unwrap();
            drop(img);
            v.push(st.to_vec());
        }
        v
    })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}

const SPECIAL: [u64; 8] = [
    0,
    1,
    0x200,
    u64::MAX,
    1 << 62,
    1 << 63,
    0x00ff_ffff_ffff_fe00,
    0x7fff_ffff,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn prop_mutated_images_never_panic(
        which in 0..2usize,
        muts in proptest::collection::vec((any::<u32>(), any::<u8>(), 0u8..5, any::<u64>()), 1..10),
    ) {
        let mut img = base_images()[which].clone();
        let len = img.len();
        for (pos, byte, kind, val) in muts {
            let pos = pos as usize;
            match kind {
                0 => img[pos % len] = byte,
                1 => {
                    let o = (pos % (len / 8)) * 8;
                    img[o..o + 8].copy_from_slice(&val.to_be_bytes());
                }
                2 => img[pos % 112] = byte,
                3 => {
                    let o = (pos % 14) * 8;
                    img[o..o + 8].copy_from_slice(&SPECIAL[val as usize % SPECIAL.len()].to_be_bytes());
                }
                _ => {
                    // A table entry (8-byte aligned, past the header) set to a special value.
                    let o = (pos % (len / 8)) * 8;
                    img[o..o + 8].copy_from_slice(&SPECIAL[val as usize % SPECIAL.len()].to_be_bytes());
                }
            }
        }
        fuzzing::exercise(&img);
    }
}

#[test]
fn truncated_images_are_refused_or_read() {
    let base = &base_images()[0];
    for cut in (0..base.len()).step_by(97) {
        fuzzing::exercise(&base[..cut]);
    }
}

fn refused(bytes: Vec<u8>, read_only: bool) -> qcow_lite::Error {
    Qcow2::open(MemStorage::from_vec(bytes), read_only).unwrap_err()
}

fn patched(off: usize, val: &[u8]) -> Vec<u8> {
    let mut b = base_images()[0].clone();
    b[off..off + val.len()].copy_from_slice(val);
    b
}

#[test]
fn unsupported_features_are_named() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (patched(32, &1u32.to_be_bytes()), "encryption"),
        (
            patched(72, &(1u64 << 2).to_be_bytes()),
            "external data file",
        ),
        (patched(72, &(1u64 << 4).to_be_bytes()), "extended L2"),
        (
            patched(72, &(1u64 << 20).to_be_bytes()),
            "unknown incompatible feature bits 0x100000",
        ),
        (patched(4, &2u32.to_be_bytes()), "version 2"),
    ];
    for (bytes, what) in cases {
        for ro in [true, false] {
            let e = refused(bytes.clone(), ro);
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
            assert!(e.to_string().contains(what), "{e} should name {what}");
        }
    }
    // Internal snapshots: read-only only.
    let b = patched(60, &1u32.to_be_bytes());
    let e = refused(b.clone(), false);
    assert!(e.to_string().contains("internal snapshots"), "{e}");
    Qcow2::open(MemStorage::from_vec(b), true).unwrap();
}

#[test]
fn bad_magic_and_bad_cluster_bits() {
    assert_eq!(
        refused(patched(0, b"XXXX"), true).kind(),
        ErrorKind::InvalidImage
    );
    assert_eq!(
        refused(patched(20, &22u32.to_be_bytes()), true).kind(),
        ErrorKind::InvalidImage
    );
    assert_eq!(
        refused(patched(20, &8u32.to_be_bytes()), true).kind(),
        ErrorKind::InvalidImage
    );
    assert_eq!(refused(Vec::new(), true).kind(), ErrorKind::InvalidImage);
}
