//! Every error a user can cause in `blockrep img` prints one clear line on
//! stderr and exits non-zero, without a panic.

mod img_common;

use img_common::{text, Dir};

/// Run `blockrep img ARGS`; it must fail with one stderr line containing `want`.
fn fails(d: &Dir, args: &[&str], want: &str) -> i32 {
    let o = d.br(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let code = o.status.code().unwrap_or(-1);
    assert!(
        code != 0 && code != 101,
        "{args:?} should fail cleanly: {}",
        text(&o)
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?} panicked: {err}"
    );
    assert_eq!(
        err.lines().count(),
        1,
        "{args:?}: want one line on stderr: {err:?}"
    );
    assert!(
        err.to_lowercase().contains(&want.to_lowercase()),
        "{args:?}: {err:?} does not say {want:?}"
    );
    code
}

#[test]
fn user_errors_are_one_line_and_non_zero() {
    let d = Dir::new();
    d.qi_ok(&["create", "-f", "raw", "r.raw", "1M"]);
    d.qi_ok(&["create", "-f", "qcow2", "q.qcow2", "1M"]);
    std::fs::write(d.path("garbage.qcow2"), b"QFI\xfbnot really a qcow2 header").unwrap();
    // Missing files.
    for verb in [
        &["info", "nope.qcow2"][..],
        &["check", "nope.qcow2"],
        &["map", "nope.qcow2"],
        &["commit", "nope.qcow2"],
        &["convert", "nope.qcow2", "out.qcow2"],
        &["rebase", "-b", "", "nope.qcow2"],
        &["bench", "-c", "1", "nope.qcow2"],
    ] {
        fails(&d, verb, "nope.qcow2");
    }
    assert_eq!(
        fails(&d, &["compare", "nope.qcow2", "q.qcow2"], "nope.qcow2"),
        2
    );
    // Wrong format.
    fails(&d, &["info", "-f", "qcow2", "r.raw"], "not in qcow2 format");
    fails(&d, &["map", "-f", "vmdk", "r.raw"], "vmdk");
    fails(&d, &["info", "garbage.qcow2"], "garbage.qcow2");
    fails(
        &d,
        &[
            "create", "-f", "qcow2", "-b", "r.raw", "-F", "qcow2", "x.qcow2",
        ],
        "not in qcow2 format",
    );
    fails(
        &d,
        &["create", "-f", "qcow2", "-b", "r.raw", "y.qcow2"],
        "backing format",
    );
    fails(
        &d,
        &[
            "create", "-f", "raw", "-b", "q.qcow2", "-F", "qcow2", "z.raw",
        ],
        "backing",
    );
    // Bad sizes and options.
    for s in ["12X", "-5", "1.5", "abc", "99999999E"] {
        fails(&d, &["create", "-f", "qcow2", "s.qcow2", s], "size");
    }
    fails(&d, &["create", "-f", "qcow2", "s.qcow2"], "size");
    fails(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "s.qcow2",
            "1M",
        ],
        "cluster size",
    );
    fails(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "s.qcow2",
            "1M",
        ],
        "compat",
    );
    fails(
        &d,
        &["create", "-f", "qcow2", "-o", "bogus=1", "s.qcow2", "1M"],
        "bogus",
    );
    fails(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full",
            "s.qcow2",
            "1M",
        ],
        "preallocation",
    );
    fails(
        &d,
        &["bench", "-c", "1", "-s", "4M", "q.qcow2"],
        "do not fit",
    );
    // Backing loops, made with qemu-img -u.
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "loop-b.qcow2",
        "-F",
        "qcow2",
        "-u",
        "loop-a.qcow2",
        "1M",
    ]);
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "loop-a.qcow2",
        "-F",
        "qcow2",
        "-u",
        "loop-b.qcow2",
        "1M",
    ]);
    fails(&d, &["map", "loop-a.qcow2"], "loop");
    fails(&d, &["commit", "loop-a.qcow2"], "loop");
    fails(
        &d,
        &["convert", "-O", "raw", "loop-a.qcow2", "o.raw"],
        "loop",
    );
    fails(&d, &["info", "--backing-chain", "loop-a.qcow2"], "loop");
    assert_eq!(
        fails(&d, &["compare", "loop-a.qcow2", "q.qcow2"], "loop"),
        2
    );
    fails(
        &d,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
            "1M",
        ],
        "same filename",
    );
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "q.qcow2",
        "-F",
        "qcow2",
        "over.qcow2",
    ]);
    fails(
        &d,
        &["rebase", "-b", "over.qcow2", "-F", "qcow2", "q.qcow2"],
        "loop",
    );
    // Verbs that need something the image lacks.
    fails(&d, &["commit", "q.qcow2"], "backing file");
    fails(&d, &["commit", "-b", "r.raw", "over.qcow2"], "Did not find");
    fails(
        &d,
        &["rebase", "-b", "q.qcow2", "-F", "qcow2", "r.raw"],
        "backing files",
    );
    assert_eq!(
        fails(&d, &["check", "r.raw"], "does not support checks"),
        63
    );
    // Features qcow-lite does not handle are named.
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on",
        "xl2.qcow2",
        "1M",
    ]);
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=8",
        "rc8.qcow2",
        "1M",
    ]);
    fails(&d, &["map", "xl2.qcow2"], "extended L2");
    fails(&d, &["check", "rc8.qcow2"], "refcount_bits=8");
    fails(
        &d,
        &["convert", "-c", "-O", "qcow2", "q.qcow2", "c.qcow2"],
        "compress",
    );
    // Nothing was changed by the failures.
    d.assert_clean("q.qcow2");
    let v: serde_json::Value =
        serde_json::from_slice(&d.qi_ok(&["info", "--output=json", "q.qcow2"]).stdout).unwrap();
    assert!(v.get("backing-filename").is_none());
}

/// Mutated copies of a small two-level chain: every verb ends with a clear
/// exit (no panic, no signal), and a failure says so in one line.
#[test]
fn hostile_images_never_panic() {
    let d = Dir::new();
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "base.qcow2",
        "1M",
    ]);
    d.qio(
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 100k", "write -z 200k 8k"],
    );
    d.qi_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "seed.qcow2",
    ]);
    d.qio("qcow2", "seed.qcow2", &["write -P 2 50k 100k"]);
    let seed = std::fs::read(d.path("seed.qcow2")).unwrap();
    let base = std::fs::read(d.path("base.qcow2")).unwrap();
    let cases: u64 = std::env::var("BLOCKREP_IMG_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
        * 8;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let verbs: &[&[&str]] = &[
        &["info", "--output=json", "m.qcow2"],
        &["info", "--backing-chain", "m.qcow2"],
        &["map", "--output=json", "m.qcow2"],
        &["check", "--output=json", "m.qcow2"],
        &["compare", "m.qcow2", "seed.qcow2"],
        &["convert", "-O", "raw", "m.qcow2", "o.raw"],
        &["commit", "m.qcow2"],
        &["rebase", "-b", "", "m.qcow2"],
        &["check", "-r", "all", "m.qcow2"],
        &["bench", "-c", "50", "-d", "2", "-w", "m.qcow2"],
    ];
    for case in 0..cases {
        let mut m = seed.clone();
        for _ in 0..1 + next(6) {
            // Mostly the header and the first metadata clusters.
            let span = [120, 6 * 4096, m.len()][next(3)];
            let at = next(span.min(m.len()));
            if next(2) == 0 {
                m[at] ^= 1 << next(8);
            } else {
                m[at] = next(256) as u8;
            }
        }
        for v in verbs {
            std::fs::write(d.path("m.qcow2"), &m).unwrap();
            std::fs::write(d.path("base.qcow2"), &base).unwrap();
            let o = d.br(v);
            let err = String::from_utf8_lossy(&o.stderr);
            let code = o.status.code();
            assert!(
                code.is_some() && code != Some(101) && !err.contains("panicked"),
                "case {case} {v:?}: {}",
                text(&o)
            );
            let expected_failure = v[0] == "check" || (v[0] == "compare" && code == Some(1));
            if code != Some(0) && !expected_failure {
                assert_eq!(
                    err.trim().lines().count(),
                    1,
                    "case {case} {v:?}: {}",
                    text(&o)
                );
            }
        }
    }
}
