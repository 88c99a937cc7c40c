//! Our client against real servers: qemu-nbd (raw and qcow2, TCP and Unix) and
//! nbdkit's memory plugin; reconnect across a qemu-nbd restart.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbd::{ClientConfig, ErrorKind, NbdClient, ServerAddr};

fn qemu_nbd(args: &[&str], img: &Path) -> ChildGuard {
    require_tool("qemu-nbd", "qemu-utils");
    ChildGuard(
        Command::new("qemu-nbd")
            .args(args)
            .arg(img)
            .spawn()
            .expect("spawn qemu-nbd"),
    )
}

/// Random writes (several threads), zeroes, trims; reads verified against a model.
fn exercise(c: &NbdClient, seed: u64, initial: Vec<u8>) -> Vec<u8> {
    let size = c.size() as usize;
    assert_eq!(initial.len(), size);
    let model = Arc::new(parking_lot::Mutex::new(initial));
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let model = model.clone();
            s.spawn(move || {
                let mut x = seed ^ (t + 1).wrapping_mul(0x2545_F491_4F6C_DD1D);
                for i in 0..60u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Each thread owns a quarter of the disk so the model stays exact.
                    let quarter = size / 4;
                    let len = 1 + (x % 200_000) as usize;
                    let off = t as usize * quarter + (x >> 20) as usize % (quarter - len);
                    let d = pattern(x ^ i, len);
                    c.write(off as u64, &d, i % 7 == 0).unwrap();
                    model.lock()[off..off + len].copy_from_slice(&d);
                    if i % 10 == 3 {
                        let zl = len.min(70_000);
                        c.write_zeroes(off as u64, zl as u64, i % 20 == 3, false, false)
                            .unwrap();
                        model.lock()[off..off + zl].fill(0);
                    }
                    let mut b = vec![0; len];
                    c.read(off as u64, &mut b).unwrap();
                    assert_eq!(
                        b,
                        model.lock()[off..off + len],
                        "thread {t} op {i} at {off}+{len}"
                    );
                }
            });
        }
    });
    c.flush().unwrap();
    let model = model.lock().clone();
    let mut all = vec![0u8; size];
    c.read(0, &mut all).unwrap();
    assert!(all == model, "whole-disk read differs from the model");
    // Block status covers the disk contiguously.
    let mut off = 0;
    while off < c.size() {
        let e = c.block_status(off, c.size() - off).unwrap();
        let l: u64 = e.iter().map(|x| x.len).sum();
        assert!(l > 0 && off + l <= c.size());
        off += l;
    }
    model
}

#[test]
fn qemu_nbd_raw_unix_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sock = dir.path().join("q.sock");
    let model = {
        let _q = qemu_nbd(
            &[
                "-t",
                "--persistent",
                "-f",
                "raw",
                "-x",
                "exp",
                "-k",
                sock.to_str().unwrap(),
            ],
            &img,
        );
        wait_for_path(&sock);
        let c = NbdClient::connect(ServerAddr::Unix(sock.clone()), "exp").unwrap();
        assert!(c.info().structured);
        assert!(c.info().base_allocation.is_some());
        exercise(&c, 1, vec![0; 16 << 20])
    };
    assert!(
        std::fs::read(&img).unwrap() == model,
        "image file differs from the model"
    );
    let port = free_port();
    let _q = qemu_nbd(
        &[
            "-t",
            "-f",
            "raw",
            "-x",
            "exp",
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ],
        &img,
    );
    wait_for_port(port);
    let c = NbdClient::connect(ServerAddr::Tcp("127.0.0.1".into(), port), "exp").unwrap();
    let mut all = vec![0u8; 16 << 20];
    c.read(0, &mut all).unwrap();
    assert!(all == model);
    exercise(&c, 2, model);
}

#[test]
fn qemu_nbd_qcow2_unix_and_tcp() {
    require_tool("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    let sock = dir.path().join("q.sock");
    let model = {
        let _q = qemu_nbd(
            &["-t", "-f", "qcow2", "-x", "e", "-k", sock.to_str().unwrap()],
            &img,
        );
        wait_for_path(&sock);
        let c = NbdClient::connect(ServerAddr::Unix(sock.clone()), "e").unwrap();
        exercise(&c, 3, vec![0; 16 << 20])
    };
    let port = free_port();
    {
        let _q = qemu_nbd(
            &[
                "-t",
                "-f",
                "qcow2",
                "-x",
                "e",
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ],
            &img,
        );
        wait_for_port(port);
        let c = NbdClient::connect(ServerAddr::Tcp("127.0.0.1".into(), port), "e").unwrap();
        let mut all = vec![0u8; 16 << 20];
        c.read(0, &mut all).unwrap();
        assert!(all == model);
    }
    let raw = dir.path().join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    assert!(std::fs::read(&raw).unwrap() == model);
    let out = run(Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(&img));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["check-errors"], 0);
}

#[test]
fn nbdkit_memory() {
    require_tool("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("k.sock");
    let _k = ChildGuard(
        Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(&sock)
            .args(["memory", "64M"])
            .spawn()
            .expect("spawn nbdkit"),
    );
    wait_for_path(&sock);
    let c = NbdClient::connect(ServerAddr::Unix(sock.clone()), "").unwrap();
    assert_eq!(c.size(), 64 << 20);
    exercise(&c, 4, vec![0; 64 << 20]);
    // nbdkit memory reports trimmed/zeroed areas as holes.
    c.write(0, &[1; 65536], false).unwrap();
    c.trim(0, 65536, false).unwrap();
    let e = c.block_status(0, 65536).unwrap();
    assert!(e[0].zero, "{e:?}");
}

/// Kills and restarts qemu-nbd under a stream of writes: the writes are held and
/// complete, and every acknowledged write is in the image. Then kills it for good:
/// writes fail with EIO once reconnect-delay has passed.
#[test]
fn reconnect_across_qemu_nbd_restart() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let sock = dir.path().join("q.sock");
    let args = ["-t", "-f", "raw", "-x", "exp", "-k", sock.to_str().unwrap()];
    let mut q = Some(qemu_nbd(&args, &img));
    wait_for_path(&sock);
    let c = Arc::new(
        NbdClient::connect_with(ClientConfig {
            addr: ServerAddr::Unix(sock.clone()),
            export: "exp".into(),
            reconnect_delay: Duration::from_secs(10),
        })
        .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut acked = 0u64;
                for i in 0..512u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let block = i * 4 + t;
                    c.write(block * 4096, &pattern(block, 4096), false)
                        .unwrap_or_else(|e| panic!("write {block} failed across restart: {e}"));
                    acked = i + 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(150));
    drop(q.take()); // SIGKILL
    std::thread::sleep(Duration::from_millis(400));
    assert!(!c.is_connected());
    q = Some(qemu_nbd(&args, &img));
    let acked: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    assert!(c.reconnect_count() >= 1, "client never reconnected");
    c.flush().unwrap();
    let bytes = std::fs::read(&img).unwrap();
    for (t, &n) in acked.iter().enumerate() {
        assert!(n > 0);
        for i in 0..n {
            let block = i * 4 + t as u64;
            let o = (block * 4096) as usize;
            assert!(
                bytes[o..o + 4096] == pattern(block, 4096)[..],
                "acknowledged write {block} lost"
            );
        }
    }

    // Now the server goes away for good: requests wait reconnect-delay, then EIO.
    // (qemu-nbd serves one client at a time by default: close the first.)
    drop(c);
    let c2 = NbdClient::connect_with(ClientConfig {
        addr: ServerAddr::Unix(sock.clone()),
        export: "exp".into(),
        reconnect_delay: Duration::from_millis(800),
    })
    .unwrap();
    c2.write(0, &[9; 512], false).unwrap();
    drop(q.take());
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let e = c2.write(4096, &[9; 512], false).unwrap_err();
    let waited = t0.elapsed();
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(5),
        "waited {waited:?}"
    );
    // After the delay, new requests fail at once.
    let t0 = Instant::now();
    assert_eq!(c2.read(0, &mut [0; 512]).unwrap_err().kind, ErrorKind::Io);
    assert!(t0.elapsed() < Duration::from_millis(200));
    assert_eq!(&std::fs::read(&img).unwrap()[..512], &[9; 512][..]);
}
