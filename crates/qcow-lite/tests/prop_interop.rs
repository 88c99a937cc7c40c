//! Property test with QEMU's tools as the oracle: random operations on our
//! image and on a raw model; after close, `qemu-img check` is clean,
//! `qemu-img compare` says identical and `qemu-img map` agrees with ours.
//! Default 24 cases; `PROPTEST_CASES` for more.

mod common;

use common::*;
use proptest::prelude::*;
use qcow_lite::{CreateOptions, Qcow2};
use std::fs::OpenOptions;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24)
}

fn op_strategy() -> impl Strategy<Value = (u8, f64, u64, bool, u8)> {
    (0u8..10, 0.0f64..1.0, 1u64..200_000, any::<bool>(), 1u8..255)
}

fn to_op(size: u64, cs: u64, (k, f, len, flag, seed): (u8, f64, u64, bool, u8)) -> Op {
    let (off, len) = if flag {
        let c = ((size / cs) as f64 * f) as u64;
        let n = (len % 4 + 1).min(size / cs - c);
        (c * cs, n.max(1) * cs)
    } else {
        let off = ((size - 1) as f64 * f) as u64;
        (off, len.min(size - off).max(1))
    };
    match k {
        0..=4 => Op::Write { off, len, seed },
        5 | 6 => Op::Zero {
            off,
            len,
            unmap: seed % 2 == 0,
        },
        7 | 8 => Op::Discard { off, len },
        _ => Op::Flush,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn prop_ops_agree_with_qemu(
        cs_bits in prop::sample::select(vec![9u32, 12, 16]),
        clusters in 16u64..200,
        lazy in any::<bool>(),
        raw_ops in proptest::collection::vec(op_strategy(), 1..40),
    ) {
        let cs = 1u64 << cs_bits;
        let size = clusters * cs.min(16384) + 123 * 512;
        let dir = tempfile::tempdir().unwrap();
        let ip = dir.path().join("p.qcow2");
        let rp = dir.path().join("p.raw");
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&ip).unwrap();
        let img = Qcow2::create(f, &CreateOptions { size, cluster_size: cs, lazy_refcounts: lazy, ..Default::default() }).unwrap();
        let mut model = vec![0u8; size as usize];
        for r in raw_ops {
            let op = to_op(size, cs, r);
            image_apply(&img, &op, None).unwrap();
            model_apply(&mut model, &op, cs);
        }
        img.close().unwrap();
        prop_assert_eq!(first_diff(&read_all(&img, None), &model), None);
        let ours = our_map(&img);
        drop(img);
        std::fs::write(&rp, &model).unwrap();
        assert_qemu_check_clean(&ip);
        assert_qemu_compare(&ip, &rp);
        prop_assert_eq!(ours, qemu_map(&ip, cs, size));
    }
}
