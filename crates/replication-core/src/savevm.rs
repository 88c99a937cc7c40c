//! The checkpoint state registry (QEMU's `register_savevm_live` /
//! `unregister_savevm`) and its stream format.
//!
//! # Stream format (all integers big-endian)
//!
//! ```text
//! header   : magic "BLKRCKPT" (8) | format version u32 (= FORMAT_VERSION)
//! section* : tag "SECT" (4) | kind u8 (1 setup, 2 iterate, 3 complete) | id length u8
//!            | instance u32 | version u32 | payload length u32
//!            | header crc32 u32 (over the 18 bytes before it)
//!            | id bytes (UTF-8) | payload | body crc32 u32 (over id and payload)
//! trailer  : tag "DONE" (4) | section count u32
//!            | stream crc32 u32 (over every byte from the magic to the count)
//! ```
//!
//! Every field that steers parsing (tags, lengths) sits in a fixed-size block
//! that is checked before it is used: tags are compared directly ("SECT" and
//! "DONE" differ in every byte, so one bad byte cannot turn one into the
//! other), lengths are covered by the header crc and bounded by
//! [`MAX_ID_LEN`] and [`MAX_SECTION_PAYLOAD`]. So any truncation and any
//! single-byte corruption is detected deterministically, not by luck.
//!
//! Loading is two-phase: the whole stream is read and verified, and every
//! section is matched to a registered participant with a version it
//! supports, before any participant's `load` is called. A corrupt stream
//! therefore changes nothing.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::{Error, OpError, SavePhase};

/// First bytes of every checkpoint stream.
pub const MAGIC: [u8; 8] = *b"BLKRCKPT";
/// The stream format version written and accepted.
pub const FORMAT_VERSION: u32 = 1;
/// Longest participant id in bytes (QEMU's `idstr` is 256 bytes with NUL).
pub const MAX_ID_LEN: usize = 255;
/// Largest payload of one section (16 MiB); larger sections are refused on
/// both save and load, so a length field never causes a huge allocation.
pub const MAX_SECTION_PAYLOAD: u32 = 16 << 20;
/// Largest total payload a stream may carry (256 MiB), because loading
/// buffers the whole stream before dispatching it.
pub const MAX_STREAM_BYTES: u64 = 256 << 20;
/// Default bound on iterate rounds per checkpoint; after it, `complete`
/// sends whatever is left (so a participant that never reports done cannot
/// make a checkpoint run forever).
pub const DEFAULT_MAX_ITERATE_ROUNDS: u32 = 64;

const SECTION_TAG: [u8; 4] = *b"SECT";
const END_TAG: [u8; 4] = *b"DONE";
const SECTION_HEADER_LEN: usize = 22;

/// Which handler wrote a section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SectionKind {
    /// Written by [`StateParticipant::setup`] (QEMU's section start).
    Setup,
    /// Written by [`StateParticipant::iterate`] (QEMU's section part).
    Iterate,
    /// Written by [`StateParticipant::complete`] (QEMU's section end).
    Complete,
}

impl SectionKind {
    fn code(self) -> u8 {
        match self {
            SectionKind::Setup => 1,
            SectionKind::Iterate => 2,
            SectionKind::Complete => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(SectionKind::Setup),
            2 => Some(SectionKind::Iterate),
            3 => Some(SectionKind::Complete),
            _ => None,
        }
    }
}

/// How much state a participant still has to send, split as QEMU's
/// `save_live_pending` splits it. The sum is the whole amount pending.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    /// Data that must go in the precopy phase or with the guest stopped
    /// (before the target starts).
    pub precopy_only: u64,
    /// Data that may go in any phase.
    pub compatible: u64,
    /// Data that must go in the postcopy phase or with the guest stopped
    /// (after the source stops).
    pub postcopy_only: u64,
}

impl Pending {
    /// The whole amount pending (saturating).
    pub fn total(&self) -> u64 {
        self.precopy_only
            .saturating_add(self.compatible)
            .saturating_add(self.postcopy_only)
    }
}

/// What an iterate call reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IterateStatus {
    /// More iterate rounds would send more state.
    More,
    /// Nothing is left for iterate; only `complete` remains.
    Done,
}

/// One section handed to [`StateParticipant::load`].
#[derive(Debug, Clone, Copy)]
pub struct LoadedSection<'a> {
    /// Which handler wrote it.
    pub kind: SectionKind,
    /// The instance id it was written for.
    pub instance: u32,
    /// The version of the writer (never newer than the local participant's).
    pub version: u32,
    /// The bytes the handler wrote.
    pub payload: &'a [u8],
}

/// A participant in checkpoints: QEMU's `SaveVMHandlers`.
///
/// On the saving side a checkpoint calls `setup` once, `iterate` while it
/// reports [`IterateStatus::More`] and [`pending`](Self::pending) is non-zero
/// (bounded by the registry's iterate round limit), `complete` once, and
/// `cleanup` always (also after an error). Each of setup/iterate/complete
/// writes one section with what it appended to `out`. On the loading side
/// `load` receives those sections in order.
pub trait StateParticipant: Send + Sync {
    /// Whether this participant takes part in the next checkpoint
    /// (QEMU's `is_active`). Inactive ones write nothing.
    fn is_active(&self) -> bool {
        true
    }

    /// Begin a checkpoint; may append initial state to `out`.
    fn setup(&self, out: &mut Vec<u8>) -> Result<(), OpError> {
        let _ = out;
        Ok(())
    }

    /// How much state is left to send.
    fn pending(&self) -> Pending {
        Pending::default()
    }

    /// Send a part of the remaining state.
    fn iterate(&self, out: &mut Vec<u8>) -> Result<IterateStatus, OpError> {
        let _ = out;
        Ok(IterateStatus::Done)
    }

    /// Send the rest of the state (guest stopped).
    fn complete(&self, out: &mut Vec<u8>) -> Result<(), OpError>;

    /// Apply one section received from the other side.
    fn load(&self, section: &LoadedSection<'_>) -> Result<(), OpError>;

    /// Release what setup took; called after every checkpoint attempt that
    /// called setup, successful or not.
    fn cleanup(&self) {}
}

struct Entry {
    key: u64,
    id: String,
    instance: u32,
    version: u32,
    participant: Arc<dyn StateParticipant>,
}

struct Inner {
    entries: Mutex<Vec<Entry>>,
    next_key: AtomicU64,
    max_rounds: AtomicU32,
}

impl Inner {
    fn remove(&self, key: u64) -> bool {
        let removed = {
            let mut entries = self.entries.lock();
            entries
                .iter()
                .position(|e| e.key == key)
                .map(|pos| entries.remove(pos))
        };
        removed.is_some()
    }
}

/// The registry of checkpoint state participants. Cheap to clone; clones
/// share participants. See the module documentation for the stream format.
#[derive(Clone)]
pub struct StateRegistry {
    inner: Arc<Inner>,
}

impl Default for StateRegistry {
    fn default() -> Self {
        StateRegistry {
            inner: Arc::new(Inner {
                entries: Mutex::new(Vec::new()),
                next_key: AtomicU64::new(0),
                max_rounds: AtomicU32::new(DEFAULT_MAX_ITERATE_ROUNDS),
            }),
        }
    }
}

impl std::fmt::Debug for StateRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateRegistry")
            .field("participants", &self.participants())
            .finish()
    }
}

/// Keeps a participant registered; dropping it (or calling
/// [`remove`](StateHandle::remove)) unregisters it (QEMU's
/// `unregister_savevm`).
#[must_use = "dropping the handle unregisters the participant at once"]
pub struct StateHandle {
    registry: Weak<Inner>,
    key: u64,
    id: String,
    instance: u32,
}

impl std::fmt::Debug for StateHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateHandle")
            .field("id", &self.id)
            .field("instance", &self.instance)
            .finish()
    }
}

impl StateHandle {
    /// The participant id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The instance id, as given or as chosen for "next free".
    pub fn instance(&self) -> u32 {
        self.instance
    }

    /// Unregister now. Returns whether it was still registered.
    pub fn remove(self) -> bool {
        self.remove_inner()
    }

    fn remove_inner(&self) -> bool {
        self.registry
            .upgrade()
            .is_some_and(|inner| inner.remove(self.key))
    }
}

impl Drop for StateHandle {
    fn drop(&mut self) {
        self.remove_inner();
    }
}

type Snapshot = Vec<(String, u32, u32, Arc<dyn StateParticipant>)>;

struct ParsedSection {
    kind: SectionKind,
    id: String,
    instance: u32,
    version: u32,
    payload: Vec<u8>,
}

impl StateRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bound the iterate rounds of one checkpoint (at least 0; 0 means
    /// setup then complete).
    pub fn set_max_iterate_rounds(&self, rounds: u32) {
        self.inner.max_rounds.store(rounds, Ordering::Relaxed);
    }

    /// Register `participant` under (`id`, `instance`, `version`) (QEMU's
    /// `register_savevm_live`). `instance: None` picks the next free
    /// instance for `id` (one more than the highest registered, from 0), as
    /// QEMU does for instance id -1. The same (id, instance) twice is an
    /// error.
    pub fn register(
        &self,
        id: &str,
        instance: Option<u32>,
        version: u32,
        participant: Arc<dyn StateParticipant>,
    ) -> Result<StateHandle, Error> {
        if id.is_empty() {
            return Err(Error::InvalidId {
                id: id.into(),
                reason: "empty",
            });
        }
        if id.len() > MAX_ID_LEN {
            return Err(Error::InvalidId {
                id: id.into(),
                reason: "longer than 255 bytes",
            });
        }
        let mut entries = self.inner.entries.lock();
        let instance = match instance {
            Some(i) => {
                if entries.iter().any(|e| e.id == id && e.instance == i) {
                    return Err(Error::DuplicateParticipant {
                        id: id.into(),
                        instance: i,
                    });
                }
                i
            }
            None => match entries
                .iter()
                .filter(|e| e.id == id)
                .map(|e| e.instance)
                .max()
            {
                None => 0,
                Some(max) => max
                    .checked_add(1)
                    .ok_or_else(|| Error::InstancesExhausted { id: id.into() })?,
            },
        };
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        entries.push(Entry {
            key,
            id: id.into(),
            instance,
            version,
            participant,
        });
        Ok(StateHandle {
            registry: Arc::downgrade(&self.inner),
            key,
            id: id.into(),
            instance,
        })
    }

    /// (id, instance, version) of every participant, in registration order.
    pub fn participants(&self) -> Vec<(String, u32, u32)> {
        self.inner
            .entries
            .lock()
            .iter()
            .map(|e| (e.id.clone(), e.instance, e.version))
            .collect()
    }

    /// The sum of every active participant's pending state.
    pub fn pending(&self) -> Pending {
        self.snapshot().iter().filter(|(.., p)| p.is_active()).fold(
            Pending::default(),
            |acc, (.., p)| {
                let p = p.pending();
                Pending {
                    precopy_only: acc.precopy_only.saturating_add(p.precopy_only),
                    compatible: acc.compatible.saturating_add(p.compatible),
                    postcopy_only: acc.postcopy_only.saturating_add(p.postcopy_only),
                }
            },
        )
    }

    fn snapshot(&self) -> Snapshot {
        self.inner
            .entries
            .lock()
            .iter()
            .map(|e| {
                (
                    e.id.clone(),
                    e.instance,
                    e.version,
                    Arc::clone(&e.participant),
                )
            })
            .collect()
    }

    /// Write one checkpoint of every active participant into `w`, in
    /// registration order. Returns the number of sections written.
    pub fn save<W: Write>(&self, w: &mut W) -> Result<u32, Error> {
        let active: Snapshot = self
            .snapshot()
            .into_iter()
            .filter(|(.., p)| p.is_active())
            .collect();
        let mut out = StreamWriter::new(w);
        let mut set_up = 0;
        let result = self.save_inner(&active, &mut out, &mut set_up);
        for (.., p) in &active[..set_up] {
            p.cleanup();
        }
        result
    }

    fn save_inner<W: Write>(
        &self,
        active: &Snapshot,
        out: &mut StreamWriter<'_, W>,
        set_up: &mut usize,
    ) -> Result<u32, Error> {
        let mut header = Vec::with_capacity(12);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.write(&header, "stream header")?;

        let fail =
            |id: &str, instance: u32, phase: SavePhase, source: OpError| Error::Participant {
                id: id.into(),
                instance,
                phase,
                source,
            };
        let mut buf = Vec::new();
        for (id, instance, version, p) in active {
            buf.clear();
            *set_up += 1;
            p.setup(&mut buf)
                .map_err(|e| fail(id, *instance, SavePhase::Setup, e))?;
            out.section(SectionKind::Setup, id, *instance, *version, &buf)?;
        }
        let mut done = vec![false; active.len()];
        for _ in 0..self.inner.max_rounds.load(Ordering::Relaxed) {
            let mut called = false;
            for (i, (id, instance, version, p)) in active.iter().enumerate() {
                if done[i] {
                    continue;
                }
                if p.pending().total() == 0 {
                    done[i] = true;
                    continue;
                }
                buf.clear();
                let status = p
                    .iterate(&mut buf)
                    .map_err(|e| fail(id, *instance, SavePhase::Iterate, e))?;
                out.section(SectionKind::Iterate, id, *instance, *version, &buf)?;
                called = true;
                if status == IterateStatus::Done {
                    done[i] = true;
                }
            }
            if !called {
                break;
            }
        }
        for (id, instance, version, p) in active {
            buf.clear();
            p.complete(&mut buf)
                .map_err(|e| fail(id, *instance, SavePhase::Complete, e))?;
            out.section(SectionKind::Complete, id, *instance, *version, &buf)?;
        }
        out.trailer()
    }

    /// Read one checkpoint from `r` and hand every section to its
    /// participant, in stream order. Nothing is dispatched unless the whole
    /// stream is intact and every section names a registered (id, instance)
    /// at a version not newer than the registered one. Returns the number of
    /// sections loaded. Reads exactly up to the end of the checkpoint, so
    /// more data may follow on the same reader.
    pub fn load<R: Read>(&self, r: &mut R) -> Result<u32, Error> {
        let sections = parse_stream(r)?;
        let snapshot = self.snapshot();
        let mut targets = Vec::with_capacity(sections.len());
        for s in &sections {
            let Some((.., version, p)) = snapshot
                .iter()
                .find(|(id, instance, ..)| *id == s.id && *instance == s.instance)
            else {
                return Err(Error::UnknownSection {
                    id: s.id.clone(),
                    instance: s.instance,
                });
            };
            if s.version > *version {
                return Err(Error::NewerVersion {
                    id: s.id.clone(),
                    instance: s.instance,
                    stream_version: s.version,
                    supported: *version,
                });
            }
            targets.push(p);
        }
        for (s, p) in sections.iter().zip(targets) {
            let section = LoadedSection {
                kind: s.kind,
                instance: s.instance,
                version: s.version,
                payload: &s.payload,
            };
            p.load(&section).map_err(|source| Error::Participant {
                id: s.id.clone(),
                instance: s.instance,
                phase: SavePhase::Load,
                source,
            })?;
        }
        Ok(sections.len() as u32)
    }
}

struct StreamWriter<'a, W: Write> {
    w: &'a mut W,
    offset: u64,
    crc: crc32fast::Hasher,
    sections: u32,
    payload_total: u64,
}

impl<'a, W: Write> StreamWriter<'a, W> {
    fn new(w: &'a mut W) -> Self {
        StreamWriter {
            w,
            offset: 0,
            crc: crc32fast::Hasher::new(),
            sections: 0,
            payload_total: 0,
        }
    }

    fn write(&mut self, bytes: &[u8], what: &'static str) -> Result<(), Error> {
        self.w.write_all(bytes).map_err(|source| Error::Io {
            offset: self.offset,
            what,
            source,
        })?;
        self.crc.update(bytes);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn section(
        &mut self,
        kind: SectionKind,
        id: &str,
        instance: u32,
        version: u32,
        payload: &[u8],
    ) -> Result<(), Error> {
        let too_large = |what, len: u64, max: u64, offset| Error::TooLarge {
            offset,
            what,
            len,
            max,
        };
        if payload.len() as u64 > u64::from(MAX_SECTION_PAYLOAD) {
            return Err(too_large(
                "section payload",
                payload.len() as u64,
                u64::from(MAX_SECTION_PAYLOAD),
                self.offset,
            ));
        }
        self.payload_total += payload.len() as u64;
        if self.payload_total > MAX_STREAM_BYTES {
            return Err(too_large(
                "stream payload",
                self.payload_total,
                MAX_STREAM_BYTES,
                self.offset,
            ));
        }
        let mut frame = Vec::with_capacity(SECTION_HEADER_LEN + id.len() + payload.len() + 4);
        frame.extend_from_slice(&SECTION_TAG);
        frame.push(kind.code());
        frame.push(id.len() as u8);
        frame.extend_from_slice(&instance.to_be_bytes());
        frame.extend_from_slice(&version.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        let header_crc = crc32fast::hash(&frame);
        frame.extend_from_slice(&header_crc.to_be_bytes());
        frame.extend_from_slice(id.as_bytes());
        frame.extend_from_slice(payload);
        let body_crc = crc32fast::hash(&frame[SECTION_HEADER_LEN..]);
        frame.extend_from_slice(&body_crc.to_be_bytes());
        self.write(&frame, "section")?;
        self.sections += 1;
        Ok(())
    }

    fn trailer(&mut self) -> Result<u32, Error> {
        let mut t = Vec::with_capacity(12);
        t.extend_from_slice(&END_TAG);
        t.extend_from_slice(&self.sections.to_be_bytes());
        self.write(&t, "end marker")?;
        let crc = self.crc.clone().finalize();
        self.write(&crc.to_be_bytes(), "stream checksum")?;
        let offset = self.offset;
        self.w.flush().map_err(|source| Error::Io {
            offset,
            what: "flushing",
            source,
        })?;
        Ok(self.sections)
    }
}

/// A reader that counts bytes and checksums everything it reads.
struct StreamReader<'a, R: Read> {
    r: &'a mut R,
    offset: u64,
    crc: crc32fast::Hasher,
}

impl<R: Read> Read for StreamReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.crc.update(&buf[..n]);
        self.offset += n as u64;
        Ok(n)
    }
}

impl<R: Read> StreamReader<'_, R> {
    fn exact<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Error> {
        let mut buf = [0u8; N];
        let start = self.offset;
        let mut filled = 0;
        while filled < N {
            match self.read(&mut buf[filled..]) {
                Ok(0) => {
                    return Err(Error::Truncated {
                        offset: start,
                        what,
                    })
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(Error::Io {
                        offset: start,
                        what,
                        source,
                    })
                }
            }
        }
        Ok(buf)
    }

    fn vec(&mut self, len: usize, what: &'static str) -> Result<Vec<u8>, Error> {
        let start = self.offset;
        // Grows with the data actually received, never from the length alone.
        let mut buf = Vec::with_capacity(len.min(64 << 10));
        self.by_ref()
            .take(len as u64)
            .read_to_end(&mut buf)
            .map_err(|source| Error::Io {
                offset: start,
                what,
                source,
            })?;
        if buf.len() < len {
            return Err(Error::Truncated {
                offset: start + buf.len() as u64,
                what,
            });
        }
        Ok(buf)
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn parse_stream<R: Read>(r: &mut R) -> Result<Vec<ParsedSection>, Error> {
    let mut rd = StreamReader {
        r,
        offset: 0,
        crc: crc32fast::Hasher::new(),
    };
    let corrupt = |offset, detail: String| Error::Corrupt { offset, detail };
    let magic: [u8; 8] = rd.exact("magic")?;
    if magic != MAGIC {
        return Err(corrupt(0, format!("bad magic {magic:02x?}")));
    }
    let version = u32::from_be_bytes(rd.exact("format version")?);
    if version != FORMAT_VERSION {
        return Err(corrupt(
            8,
            format!("unsupported format version {version} (expected {FORMAT_VERSION})"),
        ));
    }
    let mut sections = Vec::new();
    let mut total: u64 = 0;
    loop {
        let at = rd.offset;
        let tag: [u8; 4] = rd.exact("section tag")?;
        if tag == END_TAG {
            let count = u32::from_be_bytes(rd.exact("section count")?);
            let expected = rd.crc.clone().finalize();
            let stored = u32::from_be_bytes(rd.exact("stream checksum")?);
            if stored != expected {
                return Err(corrupt(
                    rd.offset - 4,
                    format!("stream checksum {stored:#010x} != computed {expected:#010x}"),
                ));
            }
            if count as usize != sections.len() {
                return Err(corrupt(
                    at + 4,
                    format!(
                        "trailer counts {count} sections, stream has {}",
                        sections.len()
                    ),
                ));
            }
            return Ok(sections);
        }
        if tag != SECTION_TAG {
            return Err(corrupt(at, format!("bad section tag {tag:02x?}")));
        }
        let rest: [u8; SECTION_HEADER_LEN - 4] = rd.exact("section header")?;
        let mut fixed = [0u8; SECTION_HEADER_LEN - 4];
        fixed[..4].copy_from_slice(&tag);
        fixed[4..].copy_from_slice(&rest[..SECTION_HEADER_LEN - 8]);
        let stored = be32(&rest[SECTION_HEADER_LEN - 8..]);
        let computed = crc32fast::hash(&fixed);
        if stored != computed {
            return Err(corrupt(
                at,
                format!("section header checksum {stored:#010x} != computed {computed:#010x}"),
            ));
        }
        let kind = SectionKind::from_code(rest[0])
            .ok_or_else(|| corrupt(at + 4, format!("unknown section kind {}", rest[0])))?;
        let id_len = usize::from(rest[1]);
        if id_len == 0 {
            return Err(corrupt(at + 5, "empty section id".into()));
        }
        let instance = be32(&rest[2..6]);
        let version = be32(&rest[6..10]);
        let payload_len = be32(&rest[10..14]);
        if payload_len > MAX_SECTION_PAYLOAD {
            return Err(Error::TooLarge {
                offset: at + 14,
                what: "section payload",
                len: payload_len.into(),
                max: MAX_SECTION_PAYLOAD.into(),
            });
        }
        total += u64::from(payload_len);
        if total > MAX_STREAM_BYTES {
            return Err(Error::TooLarge {
                offset: at + 14,
                what: "stream payload",
                len: total,
                max: MAX_STREAM_BYTES,
            });
        }
        let body_at = rd.offset;
        let body = rd.vec(id_len + payload_len as usize, "section body")?;
        let stored = u32::from_be_bytes(rd.exact("section checksum")?);
        let computed = crc32fast::hash(&body);
        if stored != computed {
            return Err(corrupt(
                body_at,
                format!("section body checksum {stored:#010x} != computed {computed:#010x}"),
            ));
        }
        let id = std::str::from_utf8(&body[..id_len])
            .map_err(|_| corrupt(body_at, "section id is not UTF-8".into()))?
            .to_string();
        sections.push(ParsedSection {
            kind,
            id,
            instance,
            version,
            payload: body[id_len..].to_vec(),
        });
    }
}
