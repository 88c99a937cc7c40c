//! Our client against a broken server: replies with a bad magic, for a cookie
//! never sent, cut in the middle, or errors. Every waiting caller gets an
//! answer (an error, never a hang), whichever caller was reading the socket,
//! and the client works again once the server does.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nbd::protocol::*;
use nbd::{ClientConfig, ErrorKind, NbdClient, ServerAddr};

const SIZE: u64 = 1 << 20;

/// How the fake server answers every request of one connection.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// A correct simple reply (errno 0).
    Good,
    /// A correct simple reply carrying this errno.
    Errno(u32),
    /// A reply whose magic is neither simple nor structured.
    BadMagic,
    /// A reply for a cookie the client never sent.
    UnknownCookie,
    /// Half a reply, then the connection is closed.
    CutShort,
    /// Nothing: the request is read and the connection closed once `n`
    /// requests wait (so several callers wait when it goes); later
    /// connections are [`Answer::Good`].
    CloseAfter(usize),
}

fn read_exact(s: &mut UnixStream, n: usize) -> Option<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).ok()?;
    Some(b)
}

/// Fixed newstyle negotiation: no structured replies, GO answered with the
/// export's size and flags.
fn negotiate(s: &mut UnixStream) -> Option<()> {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&g).ok()?;
    read_exact(s, 4)?;
    loop {
        let h = read_exact(s, 16)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        read_exact(s, len as usize)?;
        let reply = |s: &mut UnixStream, ty: u32, data: &[u8]| {
            let mut r = REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&opt.to_be_bytes());
            r.extend_from_slice(&ty.to_be_bytes());
            r.extend_from_slice(&(data.len() as u32).to_be_bytes());
            r.extend_from_slice(data);
            s.write_all(&r).ok()
        };
        if opt == OPT_GO {
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&SIZE.to_be_bytes());
            info.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
            reply(s, REP_INFO, &info)?;
            reply(s, REP_ACK, &[])?;
            return Some(());
        }
        reply(s, REP_ERR_UNSUP, &[])?;
    }
}

fn simple_reply(errno: u32, cookie: u64) -> Vec<u8> {
    let mut r = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&errno.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r
}

fn serve_conn(mut s: UnixStream, answer: Answer) -> Option<()> {
    negotiate(&mut s)?;
    let mut waiting = 0;
    loop {
        let h = read_exact(&mut s, 28)?;
        let cmd = u16::from_be_bytes(h[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[24..28].try_into().unwrap());
        if cmd == CMD_DISC {
            return None;
        }
        if cmd == CMD_WRITE {
            read_exact(&mut s, len as usize)?;
        }
        let data = |r: Vec<u8>| {
            let mut r = r;
            if cmd == CMD_READ {
                r.resize(r.len() + len as usize, 0x77);
            }
            r
        };
        match answer {
            Answer::Good => s.write_all(&data(simple_reply(0, cookie))).ok()?,
            Answer::Errno(e) => s.write_all(&simple_reply(e, cookie)).ok()?,
            Answer::BadMagic => {
                let mut r = simple_reply(0, cookie);
                r[0] ^= 0xff;
                s.write_all(&r).ok()?
            }
            Answer::UnknownCookie => s.write_all(&simple_reply(0, cookie ^ 0x5555)).ok()?,
            Answer::CutShort => {
                s.write_all(&simple_reply(0, cookie)[..9]).ok()?;
                return None;
            }
            Answer::CloseAfter(n) => {
                waiting += 1;
                if waiting >= n {
                    return None;
                }
            }
        }
    }
}

/// A fake server: each connection answers as `answer` says when it is
/// accepted. Returns its socket and a count of the connections it accepted.
fn fake_server(
    dir: &std::path::Path,
    answer: Arc<Mutex<Answer>>,
) -> (std::path::PathBuf, Arc<AtomicUsize>) {
    let sock = dir.join("fake.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let acc = accepted.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            acc.fetch_add(1, Ordering::SeqCst);
            let a = {
                let mut g = answer.lock().unwrap();
                let a = *g;
                // A server that hung up comes back working (one that never
                // answers a request would hold its caller forever, as with
                // QEMU's client: NBD has no request timeout).
                if matches!(a, Answer::CloseAfter(_)) {
                    *g = Answer::Good;
                }
                a
            };
            std::thread::spawn(move || serve_conn(s, a));
        }
    });
    (sock, accepted)
}

fn client(sock: &std::path::Path) -> Arc<NbdClient> {
    Arc::new(
        NbdClient::connect_with(ClientConfig {
            addr: ServerAddr::Unix(sock.to_owned()),
            export: "x".into(),
            reconnect_delay: Duration::ZERO,
        })
        .unwrap(),
    )
}

/// Runs `n` writes at once from their own threads; each result within 20 s.
fn writes_at_once(c: &Arc<NbdClient>, n: u64) -> Vec<nbd::Result<()>> {
    let (tx, rx) = mpsc::channel();
    for i in 0..n {
        let (c, tx) = (c.clone(), tx.clone());
        std::thread::spawn(move || {
            let _ = tx.send(c.write(i * 4096, &[i as u8; 4096], false));
        });
    }
    (0..n)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(20))
                .expect("a caller got no answer: the client hangs")
        })
        .collect()
}

/// Once the server behaves again: a write goes through within a few tries
/// (the first may still meet a connection accepted while it was broken).
fn recovers(c: &NbdClient, what: &str) {
    for _ in 0..100 {
        if c.write(0, &[1; 4096], false).is_ok() {
            let mut back = vec![0u8; 4096];
            c.read(0, &mut back).unwrap();
            assert_eq!(back, vec![0x77; 4096]);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}: the client never worked again");
}

#[test]
fn broken_replies_fail_every_waiting_caller_and_the_client_recovers() {
    for broken in [Answer::BadMagic, Answer::UnknownCookie, Answer::CutShort] {
        let dir = tempfile::tempdir().unwrap();
        let answer = Arc::new(Mutex::new(broken));
        let (sock, accepted) = fake_server(dir.path(), answer.clone());
        let c = client(&sock);
        // Every connection is broken: resending cannot help.
        for r in writes_at_once(&c, 4) {
            let e = r.expect_err("a broken reply must fail the write");
            assert_eq!(e.kind, ErrorKind::Io, "{broken:?}: {e}");
        }
        *answer.lock().unwrap() = Answer::Good;
        recovers(&c, &format!("{broken:?}"));
        assert!(accepted.load(Ordering::SeqCst) >= 2, "{broken:?}");
        c.close();
    }
}

#[test]
fn a_server_hanging_up_with_requests_waiting_answers_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let answer = Arc::new(Mutex::new(Answer::CloseAfter(4)));
    let (sock, _accepted) = fake_server(dir.path(), answer.clone());
    let c = client(&sock);
    // Each caller is answered: EIO, or success when its write was sent
    // again on a connection that came back in time (reconnect-delay 0).
    for r in writes_at_once(&c, 4) {
        if let Err(e) = r {
            assert_eq!(e.kind, ErrorKind::Io, "{e}");
        }
    }
    recovers(&c, "hang-up");
    c.close();
}

#[test]
fn error_replies_fail_only_their_request() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, accepted) = fake_server(dir.path(), Arc::new(Mutex::new(Answer::Errno(ENOSPC))));
    let c = client(&sock);
    for r in writes_at_once(&c, 4) {
        assert_eq!(r.unwrap_err().kind, ErrorKind::NoSpace);
    }
    let e = c.write(0, &[0; 512], false).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NoSpace);
    // The connection stayed up: no reconnect happened.
    assert!(c.is_connected());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(c.reconnect_count(), 0);
    c.close();
}
