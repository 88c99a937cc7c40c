//! Hostile and broken clients: exact protocol answers to bad requests, and a
//! property harness sending random and mutated bytes. The server must never panic,
//! never allocate more than the advertised maximum per request, close the bad
//! connection, and keep serving others.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nbd::protocol::*;
use nbd::{ExportOptions, MemExport, NbdClient, NbdServer, ServerAddr, ServerConfig};
use proptest::prelude::*;

/// Records the largest single allocation of the whole test process.
struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged, only recording sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from System with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LARGEST.fetch_max(n, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Largest allowed: a 32 MiB payload plus a reply header.
const ALLOC_LIMIT: usize = MAX_PAYLOAD as usize + 64;

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics of server threads (named `nbd-*`) from now on.
fn count_server_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |i| {
            if std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("nbd-"))
            {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            prev(i)
        }));
    });
}

fn server(dir: &std::path::Path) -> (NbdServer, std::path::PathBuf, Arc<MemExport>) {
    count_server_panics();
    let s = NbdServer::new(ServerConfig::default());
    let mem = Arc::new(MemExport::new(1 << 20));
    s.add_export("d", mem.clone(), ExportOptions::default())
        .unwrap();
    s.add_export(
        "ro",
        Arc::new(MemExport::new(4096)),
        ExportOptions {
            read_only: true,
            description: None,
        },
    )
    .unwrap();
    let sock = dir.join("h.sock");
    s.listen_unix(&sock).unwrap();
    (s, sock, mem)
}

struct Raw(UnixStream);

impl Raw {
    fn connect(sock: &std::path::Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw(s);
        let g: [u8; 18] = r.read_n();
        assert_eq!(
            decode_greeting(&g).unwrap(),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        r
    }
    fn read_n<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0; N];
        self.0.read_exact(&mut b).unwrap();
        b
    }
    fn read_vec(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.0.read_exact(&mut b).unwrap();
        b
    }
    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }
    fn option(&mut self, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut m = OptionHeader {
            option: opt,
            len: data.len() as u32,
        }
        .encode()
        .to_vec();
        m.extend_from_slice(data);
        self.send(&m);
        let mut out = Vec::new();
        loop {
            let h = OptionReplyHeader::decode(&self.read_n::<20>()).unwrap();
            assert_eq!(h.option, opt);
            let p = self.read_vec(h.len as usize);
            let t = h.reply_type;
            out.push((t, p));
            if t == REP_ACK || t & REP_FLAG_ERROR != 0 {
                return out;
            }
        }
    }
    fn go(&mut self, name: &str, structured: bool) {
        if structured {
            assert_eq!(self.option(OPT_STRUCTURED_REPLY, &[])[0].0, REP_ACK);
            let r = self.option(
                OPT_SET_META_CONTEXT,
                &encode_meta_request(name, &[BASE_ALLOCATION]),
            );
            assert_eq!(r[0].0, REP_META_CONTEXT);
        }
        let r = self.option(OPT_GO, &encode_info_request(name, &[]));
        assert_eq!(r.last().unwrap().0, REP_ACK, "{r:?}");
    }
    fn request(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        self.send(
            &Request {
                flags,
                cmd,
                cookie,
                offset,
                len,
            }
            .encode(),
        );
    }
    fn simple(&mut self) -> (u32, u64) {
        let b: [u8; 16] = self.read_n();
        assert_eq!(
            u32::from_be_bytes(b[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(b[4..8].try_into().unwrap()),
            u64::from_be_bytes(b[8..16].try_into().unwrap()),
        )
    }
    /// A structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let b: [u8; 20] = self.read_n();
        assert_eq!(
            u32::from_be_bytes(b[0..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap());
        let p = self.read_vec(len as usize);
        (
            u16::from_be_bytes(b[4..6].try_into().unwrap()),
            u16::from_be_bytes(b[6..8].try_into().unwrap()),
            u64::from_be_bytes(b[8..16].try_into().unwrap()),
            p,
        )
    }
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.0.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

#[test]
fn handshake_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (s, sock, _) = server(dir.path());
    let mut r = Raw::connect(&sock);
    // STARTTLS refused with the spec's NOTLS answer; the connection stays usable.
    assert_eq!(r.option(OPT_STARTTLS, &[])[0].0, REP_ERR_POLICY);
    assert_eq!(r.option(99, b"whatever")[0].0, REP_ERR_UNSUP);
    assert_eq!(r.option(OPT_EXTENDED_HEADERS, &[])[0].0, REP_ERR_UNSUP);
    assert_eq!(r.option(OPT_LIST, b"x")[0].0, REP_ERR_INVALID);
    assert_eq!(
        r.option(
            OPT_SET_META_CONTEXT,
            &encode_meta_request("d", &[BASE_ALLOCATION])
        )[0]
        .0,
        REP_ERR_INVALID
    );
    assert_eq!(
        r.option(OPT_GO, &encode_info_request("nope", &[]))[0].0,
        REP_ERR_UNKNOWN
    );
    assert_eq!(r.option(OPT_GO, b"\x00\x00\x10\x00")[0].0, REP_ERR_INVALID);
    let list = r.option(OPT_LIST, &[]);
    assert_eq!(list.len(), 3);
    assert_eq!(list[0], (REP_SERVER, b"\x00\x00\x00\x01d".to_vec()));
    // Oversized option: refused after being skipped, negotiation goes on.
    let mut big = OptionHeader {
        option: OPT_INFO,
        len: 100_000,
    }
    .encode()
    .to_vec();
    big.extend_from_slice(&vec![0u8; 100_000]);
    r.send(&big);
    let h = OptionReplyHeader::decode(&r.read_n::<20>()).unwrap();
    assert_eq!(h.reply_type, REP_ERR_TOO_BIG);
    r.read_vec(h.len as usize);
    let info = r.option(
        OPT_INFO,
        &encode_info_request("d", &[INFO_BLOCK_SIZE, INFO_NAME]),
    );
    assert_eq!(info[0].0, REP_INFO);
    assert_eq!(&info[0].1[..2], &INFO_EXPORT.to_be_bytes());
    assert_eq!(
        u64::from_be_bytes(info[0].1[2..10].try_into().unwrap()),
        1 << 20
    );
    let bs = info
        .iter()
        .find(|(t, p)| *t == REP_INFO && p[..2] == INFO_BLOCK_SIZE.to_be_bytes())
        .unwrap();
    assert_eq!(&bs.1[2..], &[0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0]);
    r.go("d", false);
    r.request(CMD_READ, 0, 7, 0, 512);
    assert_eq!(r.simple(), (0, 7));
    r.read_vec(512);
    r.request(CMD_DISC, 0, 8, 0, 0);
    assert!(r.closed());

    // Unknown client flags: dropped.
    let mut c = UnixStream::connect(&sock).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c.write_all(&0x80u32.to_be_bytes()).unwrap();
    assert!(Raw(c).closed());
    // EXPORT_NAME of an unknown export: dropped; of a known one: size + flags, no zeroes.
    let mut r = Raw::connect(&sock);
    let mut m = OptionHeader {
        option: OPT_EXPORT_NAME,
        len: 4,
    }
    .encode()
    .to_vec();
    m.extend_from_slice(b"nope");
    r.send(&m);
    assert!(r.closed());
    let mut r = Raw::connect(&sock);
    let mut m = OptionHeader {
        option: OPT_EXPORT_NAME,
        len: 1,
    }
    .encode()
    .to_vec();
    m.extend_from_slice(b"d");
    r.send(&m);
    let b: [u8; 10] = r.read_n();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 1 << 20);
    r.request(CMD_FLUSH, 0, 1, 0, 0);
    assert_eq!(r.simple(), (0, 1));
    s.stop();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

#[test]
fn transmission_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (s, sock, mem) = server(dir.path());
    let mut r = Raw::connect(&sock);
    r.go("d", false);
    let end = 1u64 << 20;
    r.request(CMD_READ, 0, 1, end - 10, 11);
    assert_eq!(r.simple(), (EINVAL, 1));
    r.request(CMD_WRITE, 0, 2, end - 10, 11);
    r.send(&[5; 11]);
    assert_eq!(r.simple(), (ENOSPC, 2));
    r.request(CMD_WRITE_ZEROES, 0, 3, end, 1);
    assert_eq!(r.simple(), (ENOSPC, 3));
    r.request(CMD_TRIM, 0, 4, u64::MAX - 1, 4);
    assert_eq!(r.simple(), (EINVAL, 4));
    r.request(CMD_READ, 0, 5, 0, MAX_PAYLOAD + 1);
    assert_eq!(r.simple(), (EINVAL, 5));
    r.request(CMD_BLOCK_STATUS, 0, 6, 0, 4096);
    assert_eq!(r.simple(), (EINVAL, 6), "no meta context negotiated");
    r.request(42, 0, 7, 0, 0);
    assert_eq!(r.simple(), (EINVAL, 7));
    r.request(CMD_READ, CMD_FLAG_DF, 8, 0, 1);
    assert_eq!(r.simple(), (EINVAL, 8), "DF needs structured replies");
    r.request(CMD_WRITE, CMD_FLAG_NO_HOLE, 9, 0, 1);
    r.send(&[1]);
    assert_eq!(r.simple(), (EINVAL, 9));
    // Still in sync after all of these.
    r.request(CMD_WRITE, CMD_FLAG_FUA, 10, 100, 3);
    r.send(b"abc");
    assert_eq!(r.simple(), (0, 10));
    assert_eq!(&mem.snapshot()[100..103], b"abc");
    // A write of exactly the maximum is accepted, and costs one buffer of that size.
    r.request(CMD_WRITE, 0, 12, 0, MAX_PAYLOAD);
    let mut big = vec![0x42u8; MAX_PAYLOAD as usize];
    r.send(&big);
    assert_eq!(
        r.simple(),
        (ENOSPC, 12),
        "1 MiB export: the 32 MiB write is past its end"
    );
    let s2 = NbdServer::new(ServerConfig::default());
    let mem2 = Arc::new(MemExport::new(MAX_PAYLOAD as u64));
    s2.add_export("big", mem2.clone(), ExportOptions::default())
        .unwrap();
    let sock2 = dir.path().join("big.sock");
    s2.listen_unix(&sock2).unwrap();
    let mut r2 = Raw::connect(&sock2);
    r2.go("big", false);
    r2.request(CMD_WRITE, 0, 1, 0, MAX_PAYLOAD);
    r2.send(&big);
    assert_eq!(r2.simple(), (0, 1));
    assert!(mem2.snapshot() == big);
    big.clear();
    s2.stop();
    assert!(
        LARGEST.load(Ordering::Relaxed) <= ALLOC_LIMIT,
        "largest allocation {} bytes",
        LARGEST.load(Ordering::Relaxed)
    );
    // A write larger than the maximum: refused, connection closed.
    r.request(CMD_WRITE, 0, 11, 0, MAX_PAYLOAD + 1);
    assert_eq!(r.simple(), (EINVAL, 11));
    assert!(r.closed());

    // Structured: errors come as error chunks, reads as one data chunk.
    let mut r = Raw::connect(&sock);
    r.go("d", true);
    r.request(CMD_READ, 0, 1, end, 1);
    let (f, t, c, p) = r.chunk();
    assert_eq!((f, t, c), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), EINVAL);
    r.request(CMD_READ, CMD_FLAG_DF, 2, 100, 3);
    let (f, t, c, p) = r.chunk();
    assert_eq!((f, t, c), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2));
    assert_eq!(&p[..8], &100u64.to_be_bytes());
    assert_eq!(&p[8..], b"abc");
    r.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 3, 0, 1 << 20);
    let (f, t, c, p) = r.chunk();
    assert_eq!((f, t, c), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 3));
    assert_eq!(p.len(), 12, "REQ_ONE gives exactly one extent");
    assert_eq!(&p[..4], &BASE_ALLOCATION_ID.to_be_bytes());
    assert_eq!(
        &p[4..12],
        &[0, 0, 0x10, 0, 0, 0, 0, 0],
        "first 4 KiB block holds data"
    );
    // Bad magic: the connection is closed.
    r.send(&[0u8; 28]);
    assert!(r.closed());

    // Read-only export.
    let mut r = Raw::connect(&sock);
    r.go("ro", false);
    r.request(CMD_WRITE, 0, 1, 0, 4);
    r.send(b"abcd");
    assert_eq!(r.simple(), (EPERM, 1));
    r.request(CMD_TRIM, 0, 2, 0, 4);
    assert_eq!(r.simple(), (EPERM, 2));
    s.stop();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

#[test]
fn client_vanishing_loses_nothing_received() {
    let dir = tempfile::tempdir().unwrap();
    let (s, sock, mem) = server(dir.path());
    let mut r = Raw::connect(&sock);
    r.go("d", false);
    // Ten writes acknowledged, ten more sent whose replies are never read.
    for i in 0..20u64 {
        r.request(CMD_WRITE, 0, i, i * 4096, 4096);
        r.send(&pattern(i, 4096));
        if i < 10 {
            assert_eq!(r.simple(), (0, i));
        }
    }
    // Half a request, then gone without reading a single reply.
    r.request(CMD_WRITE, 0, 99, 200 * 4096, 4096);
    r.send(&[0xee; 100]);
    drop(r);
    let t = std::time::Instant::now();
    while s.connection_count(None) > 0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    let snap = mem.snapshot();
    for i in 0..10u64 {
        let o = (i * 4096) as usize;
        assert!(
            snap[o..o + 4096] == pattern(i, 4096)[..],
            "acknowledged write {i} lost"
        );
    }
    // Unacknowledged ones may or may not have landed, but never torn.
    for i in 10..20u64 {
        let o = (i * 4096) as usize;
        let block = &snap[o..o + 4096];
        assert!(
            block == &pattern(i, 4096)[..] || block.iter().all(|&b| b == 0),
            "write {i} torn"
        );
    }
    assert!(
        snap[200 * 4096..201 * 4096].iter().all(|&b| b == 0),
        "partial write applied"
    );
    s.stop();
}

/// A valid session script, for mutation.
fn valid_session() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
    v.extend_from_slice(
        &OptionHeader {
            option: OPT_STRUCTURED_REPLY,
            len: 0,
        }
        .encode(),
    );
    let m = encode_meta_request("d", &[BASE_ALLOCATION]);
    v.extend_from_slice(
        &OptionHeader {
            option: OPT_SET_META_CONTEXT,
            len: m.len() as u32,
        }
        .encode(),
    );
    v.extend_from_slice(&m);
    let g = encode_info_request("d", &[INFO_BLOCK_SIZE]);
    v.extend_from_slice(
        &OptionHeader {
            option: OPT_GO,
            len: g.len() as u32,
        }
        .encode(),
    );
    v.extend_from_slice(&g);
    let reqs = [
        (CMD_WRITE, 0u16, 4096u64, 16u32),
        (CMD_READ, 0, 0, 8192),
        (CMD_BLOCK_STATUS, 0, 0, 1 << 20),
        (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 4096),
        (CMD_TRIM, 0, 8192, 4096),
        (CMD_CACHE, 0, 0, 4096),
        (CMD_FLUSH, 0, 0, 0),
        (CMD_READ, CMD_FLAG_DF, 100, 10),
    ];
    for (i, (cmd, flags, offset, len)) in reqs.into_iter().enumerate() {
        v.extend_from_slice(
            &Request {
                flags,
                cmd,
                cookie: i as u64,
                offset,
                len,
            }
            .encode(),
        );
        if cmd == CMD_WRITE {
            v.resize(v.len() + len as usize, 0x5a);
        }
    }
    v
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Big(usize, u32),
    Cut(usize),
    Insert(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(p, x)| Mutation::Flip(p, x)),
        (
            any::<usize>(),
            prop_oneof![
                Just(u32::MAX),
                Just(MAX_PAYLOAD + 1),
                Just(MAX_PAYLOAD),
                any::<u32>()
            ]
        )
            .prop_map(|(p, x)| Mutation::Big(p, x)),
        any::<usize>().prop_map(Mutation::Cut),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..40)
        )
            .prop_map(|(p, x)| Mutation::Insert(p, x)),
    ]
}

fn apply(mut v: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        if v.is_empty() {
            break;
        }
        match m {
            Mutation::Flip(p, x) => {
                let l = v.len();
                v[p % l] ^= x;
            }
            Mutation::Big(p, x) => {
                let p = p % v.len();
                let end = (p + 4).min(v.len());
                v[p..end].copy_from_slice(&x.to_be_bytes()[..end - p]);
            }
            Mutation::Cut(p) => {
                let l = v.len();
                v.truncate(p % l);
            }
            Mutation::Insert(p, b) => {
                let p = p % v.len();
                v.splice(p..p, b.iter().copied());
            }
        }
    }
    v
}

/// Sends `bytes` as a client would, then half-closes; the server must close the
/// connection (it can't wait for more) within the timeout.
fn hostile_session(sock: &std::path::Path, bytes: &[u8]) {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut reader = c.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut b = [0u8; 65536];
        loop {
            match reader.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    });
    let _ = c.write_all(bytes);
    let _ = c.shutdown(std::net::Shutdown::Write);
    assert!(drain.join().unwrap(), "server did not close the connection");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
    ))]

    #[test]
    fn random_and_mutated_bytes(
        random in proptest::collection::vec(any::<u8>(), 0..600),
        muts in proptest::collection::vec(mutation(), 1..6),
    ) {
        static SERVER: std::sync::OnceLock<(NbdServer, std::path::PathBuf, tempfile::TempDir)> = std::sync::OnceLock::new();
        let (s, sock, _) = SERVER.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let (s, sock, _) = server(dir.path());
            (s, sock, dir)
        });
        hostile_session(sock, &random);
        hostile_session(sock, &apply(valid_session(), &muts));
        // The server still serves a well-behaved client, exactly.
        let c = NbdClient::connect(ServerAddr::Unix(sock.clone()), "d").unwrap();
        c.write(65536, b"still here", false).unwrap();
        let mut b = [0u8; 10];
        c.read(65536, &mut b).unwrap();
        prop_assert_eq!(&b, b"still here");
        drop(c);
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0);
        prop_assert!(LARGEST.load(Ordering::Relaxed) <= ALLOC_LIMIT, "allocation of {} bytes", LARGEST.load(Ordering::Relaxed));
        let _ = s;
    }
}

/// The same through `serve_io`, the entry point the fuzz target uses.
#[test]
fn serve_io_on_mutated_input() {
    let s = NbdServer::new(ServerConfig::default());
    s.add_export(
        "d",
        Arc::new(MemExport::new(1 << 20)),
        ExportOptions::default(),
    )
    .unwrap();
    let base = valid_session();
    let r = s.serve_io(&base[..], std::io::sink());
    assert!(r.is_ok() || r.is_err());
    for cut in (0..base.len()).step_by(7) {
        let _ = s.serve_io(&base[..cut], std::io::sink());
    }
    count_server_panics();
    let mut out = Vec::new();
    s.serve_io(&base[..], &mut out).unwrap();
    // The full valid session ends at EOF after its last request; it got the greeting
    // and replies to everything.
    assert_eq!(&out[..8], b"NBDMAGIC");
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

/// A client that sends requests but never reads a reply blocks its connection's
/// writes; stop() still returns (after the drain timeout) and other clients were
/// served meanwhile.
#[test]
fn stop_with_a_client_that_never_reads() {
    count_server_panics();
    let dir = tempfile::tempdir().unwrap();
    let s = NbdServer::new(ServerConfig {
        drain_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    });
    s.add_export(
        "d",
        Arc::new(MemExport::new(4 << 20)),
        ExportOptions::default(),
    )
    .unwrap();
    let sock = dir.path().join("n.sock");
    s.listen_unix(&sock).unwrap();
    let mut r = Raw::connect(&sock);
    r.go("d", false);
    for i in 0..64u64 {
        r.request(CMD_READ, 0, i, 0, 4 << 20);
    }
    std::thread::sleep(Duration::from_millis(200));
    let c = NbdClient::connect(ServerAddr::Unix(sock.clone()), "d").unwrap();
    c.write(0, b"ok", false).unwrap();
    drop(c);
    let t = std::time::Instant::now();
    s.stop();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );
    assert_eq!(s.connection_count(None), 0);
    drop(r);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0);
}

/// Reads at offset 0 take 300 ms; everything else is immediate.
struct SlowAtZero(MemExport);

impl nbd::Export for SlowAtZero {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> nbd::Result<()> {
        if offset == 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        self.0.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> nbd::Result<()> {
        self.0.write(offset, data, fua)
    }
    fn flush(&self) -> nbd::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, o: u64, l: u64, t: bool, f: bool) -> nbd::Result<()> {
        self.0.write_zeroes(o, l, t, f)
    }
}

/// Replies come back as requests complete, not in request order.
#[test]
fn replies_in_completion_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = NbdServer::new(ServerConfig::default());
    s.add_export(
        "d",
        Arc::new(SlowAtZero(MemExport::new(1 << 20))),
        ExportOptions::default(),
    )
    .unwrap();
    let sock = dir.path().join("o.sock");
    s.listen_unix(&sock).unwrap();
    let mut r = Raw::connect(&sock);
    r.go("d", false);
    r.request(CMD_READ, 0, 1, 0, 512);
    r.request(CMD_READ, 0, 2, 4096, 512);
    r.request(CMD_FLUSH, 0, 3, 0, 0);
    let mut order = Vec::new();
    for _ in 0..3 {
        let (err, cookie) = r.simple();
        assert_eq!(err, 0);
        if cookie != 3 {
            r.read_vec(512);
        }
        order.push(cookie);
    }
    assert_eq!(
        order[2], 1,
        "the slow read must be answered last: {order:?}"
    );
    s.stop();
}
