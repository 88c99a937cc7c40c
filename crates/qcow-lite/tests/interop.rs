//! Interop with QEMU's tools as the oracle: our images checked, compared and
//! mapped by qemu-img; QEMU's images (written by qemu-io) read and written by us.

mod common;

use common::*;
use qcow_lite::{open_chain, CreateOptions, Qcow2, Rng};
use std::fs::{File, OpenOptions};
use std::path::Path;

fn rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap()
}

/// Ours → QEMU: create, random ops, close; check clean, compare identical, map agrees.
fn ours_to_qemu(cs: u64, size: u64, nops: usize, seed: u64, lazy: bool) {
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("a.qcow2");
    let raw_path = dir.path().join("a.raw");
    let img = Qcow2::create(
        rw(&img_path),
        &CreateOptions {
            size,
            cluster_size: cs,
            lazy_refcounts: lazy,
            ..Default::default()
        },
    )
    .unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng::new(seed);
    for _ in 0..nops {
        let op = random_op(&mut rng, size, cs);
        image_apply(&img, &op, None).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        model_apply(&mut model, &op, cs);
    }
    assert_eq!(
        first_diff(&read_all(&img, None), &model),
        None,
        "our read-back"
    );
    let report = img.check().unwrap();
    assert!(report.is_clean(), "our check: {report:?}");
    img.close().unwrap();
    let ours = our_map(&img);
    drop(img);
    std::fs::write(&raw_path, &model).unwrap();
    assert_qemu_check_clean(&img_path);
    assert_qemu_compare(&img_path, &raw_path);
    let theirs = qemu_map(&img_path, cs, size);
    assert_eq!(ours, theirs, "qemu-img map disagrees with our map");
}

#[test]
fn ours_to_qemu_64k() {
    ours_to_qemu(65536, 8 << 20, 200, 1, false);
}

#[test]
fn ours_to_qemu_4k_lazy() {
    ours_to_qemu(4096, (3 << 20) + 4096 * 3, 300, 2, true);
}

#[test]
fn ours_to_qemu_512_many_refblocks() {
    // 512-byte clusters: one refcount block covers 128 KiB of file, so the
    // refcount table has to grow and move.
    ours_to_qemu(512, 2 << 20, 300, 3, false);
}

#[test]
fn fresh_image_matches_qemu_layout_rules() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.qcow2");
    let img = Qcow2::create(
        rw(&p),
        &CreateOptions {
            size: 1 << 30,
            ..Default::default()
        },
    )
    .unwrap();
    drop(img);
    assert_qemu_check_clean(&p);
    let (code, out, err) = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(1 << 30));
    assert_eq!(v["cluster-size"].as_u64(), Some(65536));
    assert_eq!(v["format-specific"]["data"]["compat"].as_str(), Some("1.1"));
}

fn qemu_io_ops(path: &Path, fmt: &str, cmds: &[String]) {
    let mut args: Vec<&str> = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(path.to_str().unwrap());
    let (code, out, err) = qemu_io(&args);
    assert_eq!(code, 0, "qemu-io {args:?}: {out} {err}");
    assert!(!out.contains("failed"), "qemu-io {args:?}: {out}");
}

/// QEMU → ours: qemu-img create (+ backing), qemu-io writes; we read back
/// what `qemu-img convert` says; then our writes, and QEMU checks and compares.
fn qemu_to_ours(cs: u64, backing: &str, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let u = cs.max(1 << 20);
    let size: u64 = 6 * u;
    let top = dir.path().join("top.qcow2");
    let sz = size.to_string();
    let csopt = format!("cluster_size={cs}");
    match backing {
        "none" => {
            let (c, o, e) = qemu_img(&[
                "create",
                "-f",
                "qcow2",
                "-o",
                &csopt,
                top.to_str().unwrap(),
                &sz,
            ]);
            assert_eq!(c, 0, "{o}{e}");
        }
        fmt => {
            let base = dir.path().join(format!("base.{fmt}"));
            let mut args = vec!["create", "-f", fmt];
            if fmt == "qcow2" {
                args.extend(["-o", "cluster_size=65536"]);
            }
            let bp = base.to_str().unwrap().to_string();
            args.push(&bp);
            args.push(&sz);
            let (c, o, e) = qemu_img(&args);
            assert_eq!(c, 0, "{o}{e}");
            qemu_io_ops(
                &base,
                fmt,
                &[
                    "write -P 0x11 0 3M".into(),
                    format!("write -P 0x22 {} 1M", 4 << 20),
                    "write -P 0x33 1000 5000".into(),
                ],
            );
            // Relative backing name: resolved against the image's directory.
            let bname = format!("base.{fmt}");
            let (c, o, e) = qemu_img(&[
                "create",
                "-f",
                "qcow2",
                "-o",
                &csopt,
                "-b",
                &bname,
                "-F",
                fmt,
                top.to_str().unwrap(),
                &sz,
            ]);
            assert_eq!(c, 0, "{o}{e}");
        }
    }
    qemu_io_ops(
        &top,
        "qcow2",
        &[
            format!("write -P 0x5a {} 70000", cs / 2),
            format!("write -P 0x6b {} {}", 2 * u, 3 * cs),
            format!("write -z {} {}", 2 * u + cs, cs),
            format!("write -z {} {}", 5 * u, cs),
            format!("discard {} {}", 2 * u, cs),
            "write -P 0x7c 4095 3".into(),
        ],
    );
    let expect_path = dir.path().join("expect.raw");
    let (c, o, e) = qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().unwrap(),
        expect_path.to_str().unwrap(),
    ]);
    assert_eq!(c, 0, "{o}{e}");
    let mut model = std::fs::read(&expect_path).unwrap();
    {
        let chain = open_chain(&top, true).unwrap();
        let mut got = vec![0u8; size as usize];
        chain.read(0, &mut got).unwrap();
        assert_eq!(
            first_diff(&got, &model),
            None,
            "read of QEMU's image (cs {cs}, backing {backing})"
        );
    }
    // Our writes into QEMU's image.
    let chain = open_chain(&top, false).unwrap();
    let mut rng = Rng::new(seed);
    for _ in 0..60 {
        let op = random_op(&mut rng, size, cs);
        image_apply(&chain.image, &op, chain.backing.as_deref())
            .unwrap_or_else(|e| panic!("{op:?}: {e}"));
        model_apply(&mut model, &op, cs);
    }
    let mut got = vec![0u8; size as usize];
    chain.read(0, &mut got).unwrap();
    assert_eq!(first_diff(&got, &model), None, "our read after our writes");
    chain.close().unwrap();
    drop(chain);
    std::fs::write(&expect_path, &model).unwrap();
    assert_qemu_check_clean(&top);
    assert_qemu_compare(&top, &expect_path);
}

#[test]
fn qemu_to_ours_4k() {
    for b in ["none", "raw", "qcow2"] {
        qemu_to_ours(4096, b, 10);
    }
}

#[test]
fn qemu_to_ours_64k() {
    for b in ["none", "raw", "qcow2"] {
        qemu_to_ours(65536, b, 11);
    }
}

#[test]
fn qemu_to_ours_2m() {
    for b in ["none", "raw", "qcow2"] {
        qemu_to_ours(2 << 20, b, 12);
    }
}
