//! `blockrep img` against `qemu-img` on the same images: info, check, map and
//! compare print the same; commit, convert and rebase produce images that
//! `qemu-img check` finds clean and that compare identical to qemu-img's.

mod img_common;

use img_common::{json, text, Dir, Raw};
use serde_json::Value;

/// A chain `top.qcow2 -> mid.qcow2 (4k clusters) -> base.raw` with data,
/// zero clusters and partial-cluster writes at each level.
fn make_chain(d: &Dir) {
    d.qi_ok(&["create", "-f", "raw", "base.raw", "4M"]);
    d.qio("raw", "base.raw", &["write -P 1 0 1M", "write -P 5 3M 64k"]);
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "mid.qcow2",
    ]);
    d.qio(
        "qcow2",
        "mid.qcow2",
        &[
            "write -P 2 512k 1M",
            "write -z 3M 8k",
            "write -P 7 2000k 3k",
        ],
    );
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    d.qio(
        "qcow2",
        "top.qcow2",
        &[
            "write -P 3 100k 300k",
            "write -z 600k 64k",
            "write -P 4 4000k 1k",
        ],
    );
}

#[test]
fn info_json_agrees() {
    let d = Dir::new();
    make_chain(&d);
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,cluster_size=512",
        "lazy.qcow2",
        "1M",
    ]);
    d.br_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "ours.qcow2",
        "1.5G",
    ]);
    d.br_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "ours.qcow2",
        "-F",
        "qcow2",
        "ours-top.qcow2",
    ]);
    // Images qcow-lite does not open for I/O still show in info.
    for (name, o) in [
        ("v2.qcow2", "compat=0.10"),
        ("xl2.qcow2", "extended_l2=on"),
        ("zstd.qcow2", "compression_type=zstd"),
        ("rc8.qcow2", "refcount_bits=8"),
    ] {
        d.qi_ok(&["create", "-f", "qcow2", "-o", o, name, "1M"]);
    }
    std::fs::create_dir(d.path("sub")).unwrap();
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "../mid.qcow2",
        "-F",
        "qcow2",
        "sub/deep.qcow2",
    ]);
    for img in [
        "top.qcow2",
        "mid.qcow2",
        "base.raw",
        "lazy.qcow2",
        "ours.qcow2",
        "ours-top.qcow2",
        "sub/deep.qcow2",
        "v2.qcow2",
        "xl2.qcow2",
        "zstd.qcow2",
        "rc8.qcow2",
    ] {
        let ours = json(&d.br_ok(&["info", "--output=json", img]));
        let qemu = json(&d.qi_ok(&["info", "--output=json", img]));
        assert_eq!(ours, qemu, "info --output=json {img}");
        let ours = json(&d.br_ok(&["info", "--output=json", "--backing-chain", img]));
        let qemu = json(&d.qi_ok(&["info", "--output=json", "--backing-chain", img]));
        assert_eq!(ours, qemu, "info --output=json --backing-chain {img}");
        let ours = d.br_ok(&["info", img]);
        let qemu = d.qi_ok(&["info", img]);
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&qemu.stdout),
            "human info {img}"
        );
    }
    // The fields the brief names are present.
    let v = json(&d.br_ok(&["info", "--output=json", "top.qcow2"]));
    for k in [
        "virtual-size",
        "filename",
        "format",
        "actual-size",
        "cluster-size",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
        "dirty-flag",
    ] {
        assert!(v.get(k).is_some(), "missing {k}");
    }
    assert_eq!(v["format-specific"]["type"], "qcow2");
    assert_eq!(v["format-specific"]["data"]["refcount-bits"], 16);
}

#[test]
fn create_matches_qemu() {
    let d = Dir::new();
    d.qi_ok(&["create", "-f", "raw", "b.raw", "3M"]);
    let cases: &[(&str, &[&str])] = &[
        ("plain", &["-f", "qcow2", "X", "64M"]),
        ("tera", &["-f", "qcow2", "X", "1T"]),
        ("frac", &["-f", "qcow2", "X", "1.5G"]),
        ("odd", &["-f", "qcow2", "X", "1000"]),
        (
            "opts",
            &[
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k,lazy_refcounts=on",
                "X",
                "10M",
            ],
        ),
        (
            "prealloc",
            &["-f", "qcow2", "-o", "preallocation=metadata", "X", "2M"],
        ),
        ("backing", &["-f", "qcow2", "-b", "b.raw", "-F", "raw", "X"]),
        ("raw", &["-f", "raw", "X", "512"]),
    ];
    for (name, args) in cases {
        let mut per = Vec::new();
        for tool in ["ours", "qemu"] {
            let file = format!("{name}-{tool}.img");
            let a: Vec<&str> = args
                .iter()
                .map(|s| if *s == "X" { file.as_str() } else { s })
                .collect();
            let mut full = vec!["create"];
            full.extend(a);
            if tool == "ours" {
                d.br_ok(&full);
            } else {
                d.qi_ok(&full);
            }
            let mut v = json(&d.qi_ok(&["info", "--output=json", &file]));
            let m = v.as_object_mut().unwrap();
            for k in ["filename", "actual-size", "children"] {
                m.remove(k);
            }
            per.push((file, v));
        }
        assert_eq!(per[0].1, per[1].1, "create {name}: qemu-img info differs");
        if args.contains(&"qcow2") {
            d.assert_clean(&per[0].0);
        }
        assert!(
            d.identical(&per[0].0, &per[1].0),
            "create {name}: contents differ"
        );
    }
}

/// `check --output=json` of both tools, with exit codes.
fn both_check(d: &Dir, args: &[&str]) -> ((Option<i32>, Value), (Option<i32>, Value)) {
    let mut a = vec!["check", "--output=json"];
    a.extend_from_slice(args);
    let o = d.br(&a);
    let q = d.qi(&a);
    ((o.status.code(), json(&o)), (q.status.code(), json(&q)))
}

#[test]
fn check_agrees_on_clean_leaking_and_corrupt_images() {
    let d = Dir::new();
    make_chain(&d);
    d.br_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "pre.qcow2",
        "1M",
    ]);
    // Clean images, ours and QEMU's.
    for img in ["top.qcow2", "mid.qcow2", "pre.qcow2"] {
        let (ours, qemu) = both_check(&d, &[img]);
        assert_eq!(ours, qemu, "check {img}");
        assert_eq!(ours.0, Some(0));
    }
    // A leak: one extra cluster with refcount 1.
    d.cp("top.qcow2", "leak.qcow2");
    let mut r = Raw::load(&d.path("leak.qcow2"));
    r.add_leak();
    r.save();
    let (ours, qemu) = both_check(&d, &["leak.qcow2"]);
    assert_eq!(ours, qemu, "check of a leaking image");
    assert_eq!(ours.0, Some(3));
    assert_eq!(ours.1["leaks"], 1);
    // A corruption: a data cluster's refcount dropped to 0.
    d.cp("top.qcow2", "corrupt.qcow2");
    let mut r = Raw::load(&d.path("corrupt.qcow2"));
    let host = r.l2_get(r.l2_entry0() + 8) & 0x00ff_ffff_ffff_fe00; // guest cluster 1 (100k..)
    assert!(host != 0, "guest cluster 1 should be allocated");
    r.set_refcount(host / r.cluster_size(), 0);
    r.save();
    let (ours, qemu) = both_check(&d, &["corrupt.qcow2"]);
    assert_eq!(ours, qemu, "check of a corrupt image (refcount)");
    assert_eq!(ours.0, Some(2));
    // A corruption in an L2 entry: an unaligned host offset.
    d.cp("top.qcow2", "badl2.qcow2");
    let mut r = Raw::load(&d.path("badl2.qcow2"));
    let e = r.l2_entry0() + 8;
    let v = r.l2_get(e);
    r.l2_set(e, v | 0x200);
    r.save();
    let (ours, qemu) = both_check(&d, &["badl2.qcow2"]);
    // Both call it corrupt. The counts differ: QEMU still counts the
    // misaligned entry's references (so the cluster it spans into is
    // "referenced twice"), qcow-lite drops them (so the old cluster leaks).
    assert_eq!(
        ours.0, qemu.0,
        "check of a corrupt L2 entry: ours {ours:?} qemu {qemu:?}"
    );
    assert_eq!(ours.0, Some(2));
    for k in [
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
        "fragmented-clusters",
    ] {
        assert_eq!(ours.1[k], qemu.1[k], "check of a corrupt L2 entry: {k}");
    }
    // A dirty image (lazy refcounts, writer killed): refcounts never written.
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        "dirty.qcow2",
        "4M",
    ]);
    let o = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 3 0 300k",
            "-c",
            "sigraise 9",
            "dirty.qcow2",
        ])
        .current_dir(d.tmp.path())
        .output()
        .expect("qemu-io");
    assert!(!o.status.success(), "qemu-io should have been killed");
    let ours = json(&d.br_ok(&["info", "--output=json", "dirty.qcow2"]));
    let qemu = json(&d.qi_ok(&["info", "--output=json", "dirty.qcow2"]));
    assert_eq!(ours, qemu, "info of a dirty image");
    assert_eq!(ours["dirty-flag"], true);
    let (ours, qemu) = both_check(&d, &["dirty.qcow2"]);
    assert_eq!(ours, qemu, "check of a dirty image");
    d.cp("dirty.qcow2", "ours-dirty.qcow2");
    let o = d.br(&["check", "-r", "all", "ours-dirty.qcow2"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    d.assert_clean("ours-dirty.qcow2");
    d.qio(
        "qcow2",
        "ours-dirty.qcow2",
        &["read -P 3 0 300k", "read -P 0 300k 3796k"],
    );
    // Human output exit codes agree too.
    for img in ["leak.qcow2", "corrupt.qcow2"] {
        let o = d.br(&["check", img]);
        let q = d.qi(&["check", img]);
        assert_eq!(
            o.status.code(),
            q.status.code(),
            "{}\n{}",
            text(&o),
            text(&q)
        );
    }
    // Repairs: -r leaks on the leak, -r all on the corruption; both tools end clean.
    for (img, mode) in [("leak.qcow2", "leaks"), ("corrupt.qcow2", "all")] {
        let ours = format!("ours-{img}");
        let qemu = format!("qemu-{img}");
        d.cp(img, &ours);
        d.cp(img, &qemu);
        let o = d.br(&["check", "-r", mode, "--output=json", &ours]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "blockrep check -r {mode}: {}",
            text(&o)
        );
        d.qi(&["check", "-r", mode, &qemu]);
        d.assert_clean(&ours);
        d.assert_clean(&qemu);
        assert!(d.identical(&ours, &qemu));
    }
    // -r leaks cannot repair an image with corruptions: both fail (exit 1)
    // and leave it as it was.
    for tool in ["ours", "qemu"] {
        let f = format!("{tool}-leaks-on-corrupt.qcow2");
        d.cp("corrupt.qcow2", &f);
        let o = if tool == "ours" {
            d.br(&["check", "-r", "leaks", &f])
        } else {
            d.qi(&["check", "-r", "leaks", &f])
        };
        assert_eq!(o.status.code(), Some(1), "{tool}: {}", text(&o));
        assert_eq!(d.qi(&["check", &f]).status.code(), Some(2));
    }
    // A raw image has no checks: exit 63 like qemu-img.
    let o = d.br(&["check", "base.raw"]);
    assert_eq!(o.status.code(), Some(63), "{}", text(&o));
}

#[test]
fn map_agrees() {
    let d = Dir::new();
    make_chain(&d);
    d.br_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "pre-ours.qcow2",
        "1M",
    ]);
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        "pre-qemu.qcow2",
        "1M",
    ]);
    d.qio("qcow2", "pre-qemu.qcow2", &["write -P 1 64k 64k"]);
    d.br_ok(&["create", "-f", "qcow2", "empty.qcow2", "1M"]);
    for img in [
        "top.qcow2",
        "mid.qcow2",
        "base.raw",
        "pre-ours.qcow2",
        "pre-qemu.qcow2",
        "empty.qcow2",
    ] {
        let ours = json(&d.br_ok(&["map", "--output=json", img]));
        let qemu = json(&d.qi_ok(&["map", "--output=json", img]));
        assert_eq!(ours, qemu, "map --output=json {img}");
        let ours = d.br_ok(&["map", img]);
        let qemu = d.qi_ok(&["map", img]);
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&qemu.stdout),
            "human map {img}"
        );
    }
    let a = [
        "map",
        "--output=json",
        "--start-offset=96k",
        "--max-length=1M",
        "top.qcow2",
    ];
    assert_eq!(json(&d.br_ok(&a)), json(&d.qi_ok(&a)), "map with a window");
}

#[test]
fn compare_agrees() {
    let d = Dir::new();
    make_chain(&d);
    d.qi_ok(&["convert", "-O", "raw", "top.qcow2", "flat.raw"]);
    d.qi_ok(&["convert", "-O", "qcow2", "top.qcow2", "flat.qcow2"]);
    d.cp("flat.raw", "diff.raw");
    d.qio("raw", "diff.raw", &["write -P 9 1000005 1"]);
    d.cp("flat.qcow2", "diff.qcow2");
    d.qio("qcow2", "diff.qcow2", &["write -P 9 3500007 1"]);
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "flat.qcow2",
        "-F",
        "qcow2",
        "longer.qcow2",
        "6M",
    ]);
    d.cp("longer.qcow2", "longer-dirty.qcow2");
    d.qio("qcow2", "longer-dirty.qcow2", &["write -P 1 5000001 1"]);
    let pairs: &[(&[&str], &str, &str)] = &[
        (&[], "top.qcow2", "flat.raw"),
        (&[], "top.qcow2", "flat.qcow2"),
        (&[], "top.qcow2", "diff.raw"),
        (&[], "diff.qcow2", "top.qcow2"),
        (&[], "top.qcow2", "mid.qcow2"),
        (&[], "mid.qcow2", "base.raw"),
        (&[], "longer.qcow2", "flat.raw"),
        (&[], "flat.raw", "longer-dirty.qcow2"),
        (&["-s"], "longer.qcow2", "flat.raw"),
        (&["-s"], "top.qcow2", "flat.qcow2"),
        (&["-s"], "flat.qcow2", "flat.qcow2"),
    ];
    for (flags, a, b) in pairs {
        let mut args = vec!["compare"];
        args.extend_from_slice(flags);
        args.push(a);
        args.push(b);
        let o = d.br(&args);
        let q = d.qi(&args);
        assert_eq!(
            (o.status.code(), String::from_utf8_lossy(&o.stdout)),
            (q.status.code(), String::from_utf8_lossy(&q.stdout)),
            "compare {flags:?} {a} {b}"
        );
    }
    // An error: exit 2 like qemu-img.
    let o = d.br(&["compare", "top.qcow2", "missing.qcow2"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// Set up the same chain in `ours/` and `qemu/`.
fn two_chains(d: &Dir) {
    make_chain(d);
    for sub in ["ours", "qemu"] {
        std::fs::create_dir(d.path(sub)).unwrap();
        for f in ["base.raw", "mid.qcow2", "top.qcow2"] {
            d.cp(f, &format!("{sub}/{f}"));
        }
    }
}

fn assert_same_results(d: &Dir, files: &[&str]) {
    for f in files {
        let (o, q) = (format!("ours/{f}"), format!("qemu/{f}"));
        if f.ends_with(".qcow2") {
            d.assert_clean(&o);
        }
        assert!(d.identical(&o, &q), "{f}: ours differs from qemu-img's");
    }
}

#[test]
fn commit_matches_qemu() {
    // Default: into the immediate backing file, then empty the image.
    let d = Dir::new();
    two_chains(&d);
    let o = d.br_ok(&["commit", "ours/top.qcow2"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "Image committed.\n");
    d.qi_ok(&["commit", "qemu/top.qcow2"]);
    assert_same_results(&d, &["top.qcow2", "mid.qcow2", "base.raw"]);
    let m = json(&d.qi_ok(&["map", "--output=json", "ours/top.qcow2"]));
    assert!(
        m.as_array().unwrap().iter().all(|e| e["depth"] != 0),
        "top not emptied: {m}"
    );
    // -d keeps the image; -b commits two levels down into the raw base.
    let d = Dir::new();
    two_chains(&d);
    d.br_ok(&["commit", "-d", "ours/top.qcow2"]);
    d.qi_ok(&["commit", "-d", "qemu/top.qcow2"]);
    assert_same_results(&d, &["top.qcow2", "mid.qcow2", "base.raw"]);
    let d = Dir::new();
    two_chains(&d);
    d.br_ok(&["commit", "-b", "base.raw", "ours/top.qcow2"]);
    d.qi_ok(&["commit", "-b", "base.raw", "qemu/top.qcow2"]);
    assert_same_results(&d, &["top.qcow2", "base.raw"]);
    assert!(d.identical("ours/top.qcow2", "ours/base.raw"));
}

#[test]
fn convert_matches_qemu() {
    let d = Dir::new();
    two_chains(&d);
    let cases: &[&[&str]] = &[
        &["-O", "qcow2", "top.qcow2", "out.qcow2"],
        &["-O", "raw", "top.qcow2", "out.raw"],
        &[
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "base.raw",
            "out4k.qcow2",
        ],
        &[
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata,lazy_refcounts=on",
            "mid.qcow2",
            "outpre.qcow2",
        ],
    ];
    for args in cases {
        for sub in ["ours", "qemu"] {
            let a: Vec<String> = args
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if i >= args.len() - 2 {
                        format!("{sub}/{s}")
                    } else {
                        s.to_string()
                    }
                })
                .collect();
            let mut full = vec!["convert"];
            full.extend(a.iter().map(|s| s.as_str()));
            if sub == "ours" {
                d.br_ok(&full);
            } else {
                d.qi_ok(&full);
            }
        }
        let out = args[args.len() - 1];
        assert_same_results(&d, &[out]);
        let oi = json(&d.qi_ok(&["info", "--output=json", &format!("ours/{out}")]));
        let qi = json(&d.qi_ok(&["info", "--output=json", &format!("qemu/{out}")]));
        for k in ["virtual-size", "format", "cluster-size", "format-specific"] {
            assert_eq!(oi[k], qi[k], "convert {args:?}: {k}");
        }
    }
}

#[test]
fn rebase_matches_qemu() {
    let d = Dir::new();
    two_chains(&d);
    for sub in ["ours", "qemu"] {
        d.qi_ok(&["create", "-f", "qcow2", &format!("{sub}/other.qcow2"), "4M"]);
        d.qio(
            "qcow2",
            &format!("{sub}/other.qcow2"),
            &["write -P 8 0 2M", "write -P 6 3M 4k"],
        );
        d.cp(&format!("{sub}/top.qcow2"), &format!("{sub}/none.qcow2"));
        d.cp(&format!("{sub}/top.qcow2"), &format!("{sub}/unsafe.qcow2"));
    }
    let runs: &[&[&str]] = &[
        &["rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"],
        &["rebase", "-b", "", "none.qcow2"],
        &[
            "rebase",
            "-u",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "unsafe.qcow2",
        ],
    ];
    for args in runs {
        for sub in ["ours", "qemu"] {
            let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let last = a.len() - 1;
            a[last] = format!("{sub}/{}", a[last]);
            let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
            if sub == "ours" {
                d.br_ok(&a);
            } else {
                d.qi_ok(&a);
            }
        }
        let img = args[args.len() - 1];
        assert_same_results(&d, &[img]);
        let oi = json(&d.qi_ok(&["info", "--output=json", &format!("ours/{img}")]));
        let qi = json(&d.qi_ok(&["info", "--output=json", &format!("qemu/{img}")]));
        for k in [
            "backing-filename",
            "backing-filename-format",
            "virtual-size",
        ] {
            assert_eq!(oi[k], qi[k], "rebase {args:?}: {k}");
        }
    }
    // Safe rebase keeps what the image reads.
    assert!(d.identical("ours/top.qcow2", "top.qcow2"));
    assert!(d.identical("ours/none.qcow2", "top.qcow2"));
}

#[test]
fn bench_runs_like_qemu_img_bench() {
    let d = Dir::new();
    d.br_ok(&["create", "-f", "qcow2", "b.qcow2", "16M"]);
    let o = d.br_ok(&[
        "bench",
        "-c",
        "2000",
        "-d",
        "4",
        "-s",
        "4k",
        "-w",
        "--pattern",
        "7",
        "b.qcow2",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.starts_with("Sending 2000 write requests, 4096 bytes each, 4 in parallel (starting at offset 0, step size 4096)\n"),
        "{out}"
    );
    assert!(
        out.lines().last().unwrap().starts_with("Run completed in "),
        "{out}"
    );
    assert!(out.trim_end().ends_with(" seconds."), "{out}");
    d.assert_clean("b.qcow2");
    // 2000 requests of 4 KiB from offset 0: the first 8000 KiB hold the pattern.
    d.qio(
        "qcow2",
        "b.qcow2",
        &["read -P 7 0 8000k", "read -P 0 8000k 8384k"],
    );
    let o = d.br_ok(&[
        "bench", "-c", "500", "-d", "2", "-o", "1M", "-S", "8k", "-f", "qcow2", "b.qcow2",
    ]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("500 read requests"));
    d.assert_clean("b.qcow2");
}

#[test]
fn commit_into_shorter_base_and_rebase_onto_shorter_or_lower_backing() {
    let d = Dir::new();
    for sub in ["ours", "qemu"] {
        std::fs::create_dir(d.path(sub)).unwrap();
        let p = |f: &str| format!("{sub}/{f}");
        d.qi_ok(&["create", "-f", "qcow2", &p("small.qcow2"), "2M"]);
        d.qio("qcow2", &p("small.qcow2"), &["write -P 1 0 2M"]);
        d.qi_ok(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "small.qcow2",
            "-F",
            "qcow2",
            &p("big.qcow2"),
            "4M",
        ]);
        d.qio(
            "qcow2",
            &p("big.qcow2"),
            &["write -P 2 1536k 1M", "write -P 4 3M 512"],
        );
        d.qi_ok(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            &p("short.qcow2"),
            "1M",
        ]);
        d.qio("qcow2", &p("short.qcow2"), &["write -P 9 0 1M"]);
        d.cp(&p("big.qcow2"), &p("onto-short.qcow2"));
        d.cp(&p("big.qcow2"), &p("onto-nothing.qcow2"));
        d.qi_ok(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            "big.qcow2",
            "-F",
            "qcow2",
            &p("top.qcow2"),
        ]);
        d.qio("qcow2", &p("top.qcow2"), &["write -P 6 1000k 100k"]);
    }
    let runs: &[&[&str]] = &[
        &[
            "rebase",
            "-b",
            "short.qcow2",
            "-F",
            "qcow2",
            "onto-short.qcow2",
        ],
        &["rebase", "-b", "", "onto-nothing.qcow2"],
        // Drop the middle layer: top now reads big's data from itself.
        &["rebase", "-b", "small.qcow2", "-F", "qcow2", "top.qcow2"],
        // Then commit big (4M) into small (2M): the base grows.
        &["commit", "big.qcow2"],
    ];
    for args in runs {
        for sub in ["ours", "qemu"] {
            let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let last = a.len() - 1;
            a[last] = format!("{sub}/{}", a[last]);
            let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
            if sub == "ours" {
                d.br_ok(&a);
            } else {
                d.qi_ok(&a);
            }
        }
    }
    assert_same_results(
        &d,
        &[
            "onto-short.qcow2",
            "onto-nothing.qcow2",
            "top.qcow2",
            "big.qcow2",
            "small.qcow2",
        ],
    );
    let v = json(&d.qi_ok(&["info", "--output=json", "ours/small.qcow2"]));
    assert_eq!(v["virtual-size"], 4 << 20, "commit grows the base");
}

#[test]
fn convert_over_a_backing_file_into_an_existing_image_and_fully_allocated() {
    let d = Dir::new();
    two_chains(&d);
    for sub in ["ours", "qemu"] {
        // -n: an existing raw image full of a pattern.
        d.qi_ok(&["create", "-f", "raw", &format!("{sub}/existing.raw"), "5M"]);
        d.qio("raw", &format!("{sub}/existing.raw"), &["write -P 13 0 5M"]);
    }
    let runs: &[&[&str]] = &[
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "over.qcow2",
        ],
        &["convert", "-n", "-O", "raw", "top.qcow2", "existing.raw"],
        &["convert", "-S", "0", "-O", "raw", "mid.qcow2", "full.raw"],
        &[
            "convert",
            "-S",
            "64k",
            "-O",
            "qcow2",
            "mid.qcow2",
            "s64.qcow2",
        ],
    ];
    for args in runs {
        for sub in ["ours", "qemu"] {
            let n = args.len();
            let a: Vec<String> = args
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    if i >= n - 2 {
                        format!("{sub}/{s}")
                    } else {
                        s.to_string()
                    }
                })
                .collect();
            let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
            if sub == "ours" {
                d.br_ok(&a);
            } else {
                d.qi_ok(&a);
            }
        }
        let out = args[args.len() - 1];
        assert_same_results(&d, &[out]);
    }
    // -B: the output holds only top's own data and reads like top.
    assert!(d.identical("ours/over.qcow2", "ours/top.qcow2"));
    let oi = json(&d.qi_ok(&["info", "--output=json", "ours/over.qcow2"]));
    let qi = json(&d.qi_ok(&["info", "--output=json", "qemu/over.qcow2"]));
    for k in [
        "backing-filename",
        "backing-filename-format",
        "virtual-size",
    ] {
        assert_eq!(oi[k], qi[k], "convert -B: {k}");
    }
    let om = json(&d.qi_ok(&["map", "--output=json", "ours/over.qcow2"]));
    let qm = json(&d.qi_ok(&["map", "--output=json", "qemu/over.qcow2"]));
    let present = |m: &serde_json::Value| -> Vec<(u64, u64, bool)> {
        m.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["depth"] == 0)
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["zero"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        present(&om),
        present(&qm),
        "convert -B: what the output holds itself"
    );
    // -n kept the tail of the existing image past the input's end.
    d.qio("raw", "ours/existing.raw", &["read -P 13 4M 1M"]);
    // -S 0: every byte allocated in both outputs.
    let om = json(&d.br_ok(&["map", "--output=json", "ours/full.raw"]));
    let qm = json(&d.qi_ok(&["map", "--output=json", "qemu/full.raw"]));
    assert_eq!(om, qm, "convert -S 0: allocation");
}
