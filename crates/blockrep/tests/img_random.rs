//! Randomised chains (seeded; `BLOCKREP_IMG_CASES` sets how many, default 4):
//! random cluster sizes, writes, zero writes and discards at every level,
//! then `map`, `check`, `compare`, `convert`, `commit` and `rebase` of
//! `blockrep img` must agree with `qemu-img` on the same images.

mod img_common;

use img_common::{json, text, Dir};

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const SIZE: u64 = 4 << 20;

fn random_ops(rng: &mut Lcg, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let off = rng.below(SIZE / 512) * 512;
            let len = (rng.below(64) + 1) * 512 * if rng.below(4) == 0 { 32 } else { 1 };
            let len = len.min(SIZE - off);
            match rng.below(6) {
                0 => format!("write -z {off} {len}"),
                1 => format!("discard {off} {len}"),
                p => format!("write -P {} {off} {len}", p * 17 + rng.below(10)),
            }
        })
        .collect()
}

fn build(d: &Dir, seed: u64, sub: &str) {
    let mut rng = Lcg(seed.wrapping_mul(0x9e37_79b9) + 1);
    let cs = |r: &mut Lcg| format!("cluster_size={}", 512u64 << r.below(8));
    let p = |f: &str| format!("{sub}/{f}");
    std::fs::create_dir(d.path(sub)).unwrap();
    let base_raw = rng.below(2) == 0;
    if base_raw {
        d.qi_ok(&["create", "-f", "raw", &p("base.img"), "4M"]);
        d.qio("raw", &p("base.img"), &random_ops(&mut rng, 6));
    } else {
        d.qi_ok(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            &cs(&mut rng),
            &p("base.img"),
            "4M",
        ]);
        d.qio("qcow2", &p("base.img"), &random_ops(&mut rng, 6));
    }
    let bfmt = if base_raw { "raw" } else { "qcow2" };
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &cs(&mut rng),
        "-b",
        "base.img",
        "-F",
        bfmt,
        &p("mid.qcow2"),
    ]);
    d.qio("qcow2", &p("mid.qcow2"), &random_ops(&mut rng, 8));
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &cs(&mut rng),
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        &p("top.qcow2"),
    ]);
    d.qio("qcow2", &p("top.qcow2"), &random_ops(&mut rng, 8));
}

fn agree_json(d: &Dir, args: &[&str]) {
    let o = d.br(args);
    let q = d.qi(args);
    assert_eq!(
        (o.status.code(), json(&o)),
        (q.status.code(), json(&q)),
        "{args:?}"
    );
}

fn agree(d: &Dir, args: &[&str]) {
    let o = d.br(args);
    let q = d.qi(args);
    assert_eq!(
        (o.status.code(), String::from_utf8_lossy(&o.stdout)),
        (q.status.code(), String::from_utf8_lossy(&q.stdout)),
        "{args:?}\nours: {}\nqemu: {}",
        text(&o),
        text(&q)
    );
}

#[test]
fn random_chains_agree_with_qemu_img() {
    let cases: u64 = std::env::var("BLOCKREP_IMG_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    // BLOCKREP_IMG_SEED=N runs that seed alone (to replay a failure).
    let seeds: Vec<u64> = match std::env::var("BLOCKREP_IMG_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => vec![s],
        None => (0..cases).collect(),
    };
    for seed in seeds {
        let d = Dir::new();
        eprintln!("seed {seed}: {}", d.tmp.path().display());
        for sub in ["ours", "qemu"] {
            build(&d, seed, sub);
        }
        let ctx = format!("seed {seed}");
        for img in ["ours/top.qcow2", "ours/mid.qcow2", "ours/base.img"] {
            let o = json(&d.br_ok(&["map", "--output=json", img]));
            let q = json(&d.qi_ok(&["map", "--output=json", img]));
            assert_eq!(o, q, "{ctx}: map {img}");
        }
        agree_json(&d, &["check", "--output=json", "ours/top.qcow2"]);
        agree_json(&d, &["check", "--output=json", "ours/mid.qcow2"]);
        agree(&d, &["compare", "ours/top.qcow2", "ours/mid.qcow2"]);
        agree(&d, &["compare", "ours/mid.qcow2", "ours/base.img"]);
        agree(&d, &["compare", "-s", "ours/top.qcow2", "qemu/top.qcow2"]);
        // convert, then rebase top onto base, then commit: results as qemu-img's.
        d.br_ok(&[
            "convert",
            "-O",
            "qcow2",
            "ours/top.qcow2",
            "ours/flat.qcow2",
        ]);
        d.qi_ok(&[
            "convert",
            "-O",
            "qcow2",
            "qemu/top.qcow2",
            "qemu/flat.qcow2",
        ]);
        let bfmt = if json(&d.qi_ok(&["info", "--output=json", "ours/base.img"]))["format"] == "raw"
        {
            "raw"
        } else {
            "qcow2"
        };
        d.br_ok(&["rebase", "-b", "base.img", "-F", bfmt, "ours/top.qcow2"]);
        d.qi_ok(&["rebase", "-b", "base.img", "-F", bfmt, "qemu/top.qcow2"]);
        for f in ["flat.qcow2", "top.qcow2"] {
            d.assert_clean(&format!("ours/{f}"));
            assert!(
                d.identical(&format!("ours/{f}"), &format!("qemu/{f}")),
                "{ctx}: {f}"
            );
        }
        assert!(
            d.identical("ours/top.qcow2", "ours/flat.qcow2"),
            "{ctx}: rebase changed contents"
        );
        d.br_ok(&["commit", "ours/top.qcow2"]);
        d.qi_ok(&["commit", "qemu/top.qcow2"]);
        for f in ["top.qcow2", "base.img"] {
            assert!(
                d.identical(&format!("ours/{f}"), &format!("qemu/{f}")),
                "{ctx}: commit {f}"
            );
        }
        d.assert_clean("ours/top.qcow2");
        assert!(
            d.identical("ours/base.img", "ours/flat.qcow2"),
            "{ctx}: commit lost data"
        );
    }
}
