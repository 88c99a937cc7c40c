//! Our client against our server: every command, pipelining, errors, export removal.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nbd::{ErrorKind, ExportOptions, Extent, MemExport, NbdClient, RemoveMode, ServerAddr};

#[test]
fn all_commands_over_unix_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(dir.path(), "disk0", 8 << 20);
    for addr in [
        ServerAddr::Unix(ts.sock.clone()),
        ServerAddr::Tcp("127.0.0.1".into(), ts.port),
    ] {
        let c = NbdClient::connect(addr, "disk0").unwrap();
        let info = c.info();
        assert_eq!(info.size, 8 << 20);
        assert!(info.structured);
        assert_eq!(info.base_allocation, Some(1));
        assert_eq!(
            (info.min_block, info.preferred_block, info.max_block),
            (1, 4096, 32 << 20)
        );
        let data = pattern(1, 300_000);
        c.write(12345, &data, false).unwrap();
        c.write(0, &[0xab; 4096], true).unwrap();
        c.flush().unwrap();
        let mut back = vec![0; data.len()];
        c.read(12345, &mut back).unwrap();
        assert_eq!(back, data);
        c.write_zeroes(16384, 65536, false, false, false).unwrap();
        c.read(16384, &mut back[..65536]).unwrap();
        assert!(back[..65536].iter().all(|&b| b == 0));
        c.trim(1 << 20, 1 << 20, false).unwrap();
        c.cache(0, 4096).unwrap();
        let ext = c.block_status(0, 8 << 20).unwrap();
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 8 << 20);
        let data_ = |len| Extent {
            len,
            hole: false,
            zero: false,
        };
        let hole = |len| Extent {
            len,
            hole: true,
            zero: true,
        };
        // [0,4K) written, [4K,12K) never, [12K,16K) written, [16K,80K) zeroed with
        // holes allowed, then written up to 312345 (block-rounded), then holes.
        assert_eq!(
            &ext[..5],
            &[
                data_(4096),
                hole(8192),
                data_(4096),
                hole(65536),
                data_(315392 - 81920)
            ]
        );
        // Past the end is refused locally; the server's answer is tested in hostile.rs.
        assert_eq!(
            c.read(8 << 20, &mut [0; 1]).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        // Reset for the next transport.
        c.write_zeroes(0, 8 << 20, false, false, false).unwrap();
    }
}

#[test]
fn many_threads_pipeline_over_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(dir.path(), "d", 16 << 20);
    let c = Arc::new(NbdClient::connect(ServerAddr::Unix(ts.sock.clone()), "d").unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..40u64 {
                    let off = (t * 40 + i) * 32768;
                    let d = pattern(t * 1000 + i, 32768);
                    c.write(off, &d, false).unwrap();
                    let mut b = vec![0; 32768];
                    c.read(off, &mut b).unwrap();
                    assert_eq!(b, d);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let snap = ts.mem.snapshot();
    for t in 0..8u64 {
        for i in 0..40u64 {
            let off = ((t * 40 + i) * 32768) as usize;
            assert_eq!(&snap[off..off + 32768], &pattern(t * 1000 + i, 32768)[..]);
        }
    }
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(dir.path(), "rw", 1 << 20);
    ts.server
        .add_export(
            "ro",
            Arc::new(MemExport::new(1 << 20)),
            ExportOptions {
                read_only: true,
                description: None,
            },
        )
        .unwrap();
    let c = NbdClient::connect(ServerAddr::Unix(ts.sock.clone()), "ro").unwrap();
    assert!(c.info().read_only());
    assert_eq!(
        c.write(0, &[1; 512], false).unwrap_err().kind,
        ErrorKind::PermissionDenied
    );
    assert_eq!(
        c.write_zeroes(0, 512, false, false, false)
            .unwrap_err()
            .kind,
        ErrorKind::PermissionDenied
    );
    assert_eq!(
        c.trim(0, 512, false).unwrap_err().kind,
        ErrorKind::PermissionDenied
    );
    let mut b = [9u8; 512];
    c.read(0, &mut b).unwrap();
    assert_eq!(b, [0; 512]);
}

#[test]
fn list_and_unknown_export_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(dir.path(), "a", 1 << 20);
    ts.server
        .add_export(
            "b",
            Arc::new(MemExport::new(4096)),
            ExportOptions {
                read_only: false,
                description: Some("second".into()),
            },
        )
        .unwrap();
    let l = nbd::list_exports(&ServerAddr::Unix(ts.sock.clone())).unwrap();
    assert_eq!(
        l,
        vec![("a".into(), "".into()), ("b".into(), "second".into())]
    );
    let e = NbdClient::connect(ServerAddr::Unix(ts.sock.clone()), "nope")
        .err()
        .unwrap();
    assert_eq!(e.kind, ErrorKind::UnknownExport);
    let dup = ts
        .server
        .add_export("a", Arc::new(MemExport::new(1)), ExportOptions::default());
    assert_eq!(dup.unwrap_err().kind, ErrorKind::InvalidName);
    let bad = ts.server.add_export(
        "x\0y",
        Arc::new(MemExport::new(1)),
        ExportOptions::default(),
    );
    assert_eq!(bad.unwrap_err().kind, ErrorKind::InvalidName);
}

#[test]
fn remove_export_safe_refuses_hard_drains() {
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(dir.path(), "d", 4 << 20);
    let c = Arc::new(NbdClient::connect(ServerAddr::Unix(ts.sock.clone()), "d").unwrap());
    c.write(0, &[7; 4096], false).unwrap();
    assert_eq!(ts.server.connection_count(Some("d")), 1);
    let e = ts.server.remove_export("d", RemoveMode::Safe).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Busy);
    // A writer keeps going while the export is removed hard: every write it saw
    // acknowledged must be in the export afterwards.
    let c2 = c.clone();
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for i in 0..1000u64 {
            match c2.write(i * 4096, &pattern(i, 4096), false) {
                Ok(()) => acked.push(i),
                Err(e) => {
                    assert_eq!(e.kind, ErrorKind::Io, "{e}");
                    break;
                }
            }
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(20));
    ts.server.remove_export("d", RemoveMode::Hard).unwrap();
    assert_eq!(ts.server.connection_count(Some("d")), 0);
    let acked = writer.join().unwrap();
    let snap = ts.mem.snapshot();
    for i in acked {
        let o = (i * 4096) as usize;
        assert_eq!(
            &snap[o..o + 4096],
            &pattern(i, 4096)[..],
            "acknowledged write {i} lost"
        );
    }
    assert!(ts.server.export_names().is_empty());
    assert_eq!(
        ts.server
            .remove_export("d", RemoveMode::Safe)
            .unwrap_err()
            .kind,
        ErrorKind::UnknownExport
    );
}

#[test]
fn stop_disconnects_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ts = TestServer::start(dir.path(), "d", 1 << 20);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&ts.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "Unix socket mode");
    let c = NbdClient::connect(ServerAddr::Tcp("127.0.0.1".into(), ts.port), "d").unwrap();
    c.write(0, &[1; 512], false).unwrap();
    ts.server.stop();
    assert!(ts.server.export_names().is_empty());
    assert_eq!(ts.server.connection_count(None), 0);
    assert_eq!(
        c.write(0, &[1; 512], false).unwrap_err().kind,
        ErrorKind::Io
    );
    assert!(!ts.sock.exists());
}

/// A minimal old-fashioned server (fixed newstyle but no NO_ZEROES, every option
/// unsupported, EXPORT_NAME only, simple replies): the client falls back to
/// EXPORT_NAME, reads the 124 zero bytes, and works without structured replies.
#[test]
fn client_falls_back_to_export_name_and_simple_replies() {
    use nbd::protocol::*;
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut g = Vec::new();
        g.extend_from_slice(&NBDMAGIC.to_be_bytes());
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
        s.write_all(&g).unwrap();
        let mut f = [0u8; 4];
        s.read_exact(&mut f).unwrap();
        assert_eq!(
            u32::from_be_bytes(f),
            FLAG_C_FIXED_NEWSTYLE,
            "no NO_ZEROES offered"
        );
        let mut seen = Vec::new();
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let h = OptionHeader::decode(&h).unwrap();
            let mut d = vec![0; h.len as usize];
            s.read_exact(&mut d).unwrap();
            seen.push(h.option);
            if h.option == OPT_EXPORT_NAME {
                assert_eq!(d, b"old");
                let mut r = (1u64 << 20).to_be_bytes().to_vec();
                r.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
                r.extend_from_slice(&[0u8; 124]);
                s.write_all(&r).unwrap();
                break;
            }
            let rep = OptionReplyHeader {
                option: h.option,
                reply_type: REP_ERR_UNSUP,
                len: 0,
            };
            s.write_all(&rep.encode()).unwrap();
        }
        assert_eq!(seen, vec![OPT_STRUCTURED_REPLY, OPT_GO, OPT_EXPORT_NAME]);
        loop {
            let mut h = [0u8; 28];
            if s.read_exact(&mut h).is_err() {
                return;
            }
            let r = Request::decode(&h).unwrap();
            match r.cmd {
                CMD_READ => {
                    let mut rep = SimpleReply {
                        error: 0,
                        cookie: r.cookie,
                    }
                    .encode()
                    .to_vec();
                    rep.extend((0..r.len).map(|i| (r.offset + i as u64) as u8));
                    s.write_all(&rep).unwrap();
                }
                CMD_FLUSH => s
                    .write_all(
                        &SimpleReply {
                            error: 0,
                            cookie: r.cookie,
                        }
                        .encode(),
                    )
                    .unwrap(),
                CMD_DISC => return,
                CMD_WRITE => {
                    let mut d = vec![0u8; r.len as usize];
                    s.read_exact(&mut d).unwrap();
                    let rep = SimpleReply {
                        error: EPERM,
                        cookie: r.cookie,
                    };
                    s.write_all(&rep.encode()).unwrap();
                }
                _ => s
                    .write_all(
                        &SimpleReply {
                            error: EPERM,
                            cookie: r.cookie,
                        }
                        .encode(),
                    )
                    .unwrap(),
            }
        }
    });
    let c = NbdClient::connect(ServerAddr::Unix(path), "old").unwrap();
    let info = c.info();
    assert!(!info.structured);
    assert_eq!(info.base_allocation, None);
    assert_eq!(info.size, 1 << 20);
    let mut b = vec![0u8; 70000];
    c.read(1000, &mut b).unwrap();
    assert!(b.iter().enumerate().all(|(i, &x)| x == (1000 + i) as u8));
    c.flush().unwrap();
    // No FUA, no zeroes, no trim advertised: refused locally.
    assert_eq!(
        c.write(0, &[1], true).unwrap_err().kind,
        ErrorKind::NotSupported
    );
    assert_eq!(
        c.trim(0, 1, false).unwrap_err().kind,
        ErrorKind::NotSupported
    );
    assert_eq!(
        c.write(0, &[1], false).unwrap_err().kind,
        ErrorKind::PermissionDenied
    );
    // Without a context every extent is data.
    assert_eq!(
        c.block_status(0, 4096).unwrap(),
        vec![Extent {
            len: 4096,
            hole: false,
            zero: false
        }]
    );
    drop(c);
    server.join().unwrap();
}
