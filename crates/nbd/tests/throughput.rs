//! `qemu-img bench` as a client of our server.
//!
//! By default a short smoke run (64 KiB sequential reads and writes at queue depth
//! 16, Unix and TCP) checks the tool works against us. With `NBD_BENCH=1` it runs
//! `bench.sh` (release build, our server and qemu-nbd on the same image, 3 rounds)
//! and asserts our medians are at least 0.9x qemu-nbd's in every configuration.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use nbd::{ExportOptions, FileExport, NbdServer, ServerConfig};

#[test]
fn qemu_img_bench_smoke() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let s = NbdServer::new(ServerConfig::default());
    s.add_export(
        "b",
        Arc::new(FileExport::open(&img, false).unwrap()),
        ExportOptions::default(),
    )
    .unwrap();
    let sock = dir.path().join("b.sock");
    s.listen_unix(&sock).unwrap();
    let port = s.listen_tcp(None, 0).unwrap().port();
    for url in [
        format!("nbd+unix:///b?socket={}", sock.display()),
        format!("nbd://127.0.0.1:{port}/b"),
    ] {
        for w in [true, false] {
            let mut c = Command::new("qemu-img");
            c.args(["bench", "-f", "raw", "-c", "256", "-d", "16", "-s", "64k"]);
            if w {
                c.args(["-w", "--pattern=0x5a"]);
            }
            let out = run(c.arg(&url));
            let o = String::from_utf8_lossy(&out.stdout);
            assert!(o.contains("Run completed"), "{o}");
        }
    }
    s.stop();
    // 256 x 64 KiB from offset 0 = the first 16 MiB, written with 0x5a.
    let data = std::fs::read(&img).unwrap();
    assert!(data[..16 << 20].iter().all(|&b| b == 0x5a));
    assert!(data[16 << 20..].iter().all(|&b| b == 0));
}

#[test]
fn compare_with_qemu_nbd_when_asked() {
    if std::env::var_os("NBD_BENCH").is_none() {
        return; // Opt-in: a minute of benchmarking. See crates/nbd/README.md.
    }
    require_tool("qemu-nbd", "qemu-utils");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = std::env::temp_dir().join("nbd-bench-target");
    let out = run(Command::new("bash")
        .arg(root.join("crates/nbd/bench.sh"))
        .args(["4096", "3"])
        .current_dir(&root)
        .env("CARGO_TARGET_DIR", &target));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{text}");
    let table = text.split("median of").nth(1).expect("no median table");
    let mut rows = 0;
    for line in table.lines().skip(2) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 6 {
            continue;
        }
        rows += 1;
        let ratio: f64 = f[5].parse().unwrap();
        assert!(ratio >= 0.9, "ours below qemu-nbd: {line}\n{text}");
    }
    assert_eq!(rows, 8, "{text}");
}
