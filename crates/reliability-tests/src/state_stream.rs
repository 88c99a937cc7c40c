//! Checkpoint state stream target (`replication_core::StateRegistry`).
//!
//! Three checks per input: the raw bytes loaded as a stream (nothing is
//! dispatched unless the load succeeds); a stream built from the input with
//! valid checksums, loaded (accepted exactly when every section names a
//! registered participant at a version it supports, and then each
//! participant sees exactly its sections); and that stream with one byte
//! changed, which must be refused with nothing dispatched (the format
//! promises to detect any single-byte corruption).

use std::sync::Arc;

use parking_lot::Mutex;
use replication_core::OpError;
use replication_core::{LoadedSection, SectionKind, StateHandle, StateParticipant, StateRegistry};

use crate::Bytes;

/// One loaded section: kind code, instance, version, payload.
type Loaded = (u8, u32, u32, Vec<u8>);

/// A participant that records what it loads.
#[derive(Default)]
struct Recorder {
    loaded: Mutex<Vec<Loaded>>,
}

impl StateParticipant for Recorder {
    fn complete(&self, _out: &mut Vec<u8>) -> Result<(), OpError> {
        Ok(())
    }
    fn load(&self, s: &LoadedSection<'_>) -> Result<(), OpError> {
        let kind = match s.kind {
            SectionKind::Setup => 1,
            SectionKind::Iterate => 2,
            SectionKind::Complete => 3,
        };
        self.loaded
            .lock()
            .push((kind, s.instance, s.version, s.payload.to_vec()));
        Ok(())
    }
}

/// The participants of the loading side: (id, instance, version).
const PARTICIPANTS: [(&str, u32, u32); 3] = [("ram", 0, 2), ("block", 0, 1), ("block", 1, 1)];

/// The loading side; the handles keep the participants registered.
struct Receiver {
    reg: StateRegistry,
    recs: Vec<Arc<Recorder>>,
    _handles: Vec<StateHandle>,
}

fn receiver() -> Receiver {
    let reg = StateRegistry::new();
    let mut recs = Vec::new();
    let mut handles = Vec::new();
    for (id, inst, ver) in PARTICIPANTS {
        let r = Arc::new(Recorder::default());
        handles.push(
            reg.register(id, Some(inst), ver, r.clone())
                .expect("register a participant"),
        );
        recs.push(r);
    }
    Receiver {
        reg,
        recs,
        _handles: handles,
    }
}

fn nothing_loaded(recs: &[Arc<Recorder>]) -> bool {
    recs.iter().all(|r| r.loaded.lock().is_empty())
}

/// One section as the encoder writes it.
struct Section {
    kind: u8,
    id: Vec<u8>,
    instance: u32,
    version: u32,
    payload: Vec<u8>,
}

/// Encodes sections in the stream format (see `replication_core::savevm`),
/// with correct checksums.
fn encode(sections: &[Section]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(b"BLKRCKPT");
    out.extend_from_slice(&1u32.to_be_bytes());
    for s in sections {
        let start = out.len();
        out.extend_from_slice(b"SECT");
        out.push(s.kind);
        out.push(s.id.len() as u8);
        out.extend_from_slice(&s.instance.to_be_bytes());
        out.extend_from_slice(&s.version.to_be_bytes());
        out.extend_from_slice(&(s.payload.len() as u32).to_be_bytes());
        let hcrc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&hcrc.to_be_bytes());
        let body = out.len();
        out.extend_from_slice(&s.id);
        out.extend_from_slice(&s.payload);
        let bcrc = crc32fast::hash(&out[body..]);
        out.extend_from_slice(&bcrc.to_be_bytes());
    }
    out.extend_from_slice(b"DONE");
    out.extend_from_slice(&(sections.len() as u32).to_be_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// See the module documentation.
pub fn stream(data: &[u8]) {
    // 1. Raw bytes.
    let Receiver {
        reg,
        recs,
        _handles,
    } = receiver();
    match reg.load(&mut &data[..]) {
        Ok(n) => {
            let total: usize = recs.iter().map(|r| r.loaded.lock().len()).sum();
            assert_eq!(total, n as usize, "sections dispatched vs reported");
        }
        Err(_) => assert!(
            nothing_loaded(&recs),
            "a refused stream was partly dispatched"
        ),
    }

    // 2. A well-formed stream built from the input.
    let mut b = Bytes::new(data);
    let flip_at = b.u16();
    let flip_xor = b.u8().max(1);
    let mut sections = Vec::new();
    while !b.is_empty() && sections.len() < 16 {
        let sel = b.u8();
        let kind = match sel & 3 {
            0 => b.u8(), // any kind byte, valid or not
            k => k,
        };
        let (id, instance) = match (sel >> 2) & 7 {
            p @ 0..=2 => {
                let (id, inst, _) = PARTICIPANTS[p as usize];
                (id.as_bytes().to_vec(), inst)
            }
            3 => (b"ram".to_vec(), u32::from(b.u8())),
            4 => {
                let n = usize::from(b.u8() % 8);
                (b.take(n).to_vec(), 0)
            }
            _ => (b"block".to_vec(), 1),
        };
        let version = u32::from(sel >> 5);
        let plen = usize::from(b.u8());
        let payload = b.take(plen).to_vec();
        sections.push(Section {
            kind,
            id,
            instance,
            version,
            payload,
        });
    }
    let wire = encode(&sections);
    let should_load = sections.iter().all(|s| {
        (1..=3).contains(&s.kind)
            && PARTICIPANTS.iter().any(|(id, inst, ver)| {
                id.as_bytes() == s.id.as_slice() && *inst == s.instance && s.version <= *ver
            })
    });
    let Receiver {
        reg,
        recs,
        _handles,
    } = receiver();
    let res = reg.load(&mut &wire[..]);
    if should_load {
        let n = res.unwrap_or_else(|e| panic!("a valid stream was refused: {e}"));
        assert_eq!(n as usize, sections.len());
        for (r, (id, inst, _)) in recs.iter().zip(PARTICIPANTS) {
            let want: Vec<_> = sections
                .iter()
                .filter(|s| s.id == id.as_bytes() && s.instance == inst)
                .map(|s| (s.kind, s.instance, s.version, s.payload.clone()))
                .collect();
            assert_eq!(*r.loaded.lock(), want, "sections of {id}/{inst}");
        }
    } else {
        assert!(
            res.is_err(),
            "a stream with an unknown or invalid section was accepted"
        );
        assert!(
            nothing_loaded(&recs),
            "a refused stream was partly dispatched"
        );
    }

    // 3. One byte changed.
    let mut bad = wire.clone();
    let at = usize::from(flip_at) % bad.len();
    bad[at] ^= flip_xor;
    let Receiver {
        reg,
        recs,
        _handles,
    } = receiver();
    let res = reg.load(&mut &bad[..]);
    assert!(
        res.is_err(),
        "a stream with byte {at} of {} changed (xor {flip_xor:#x}) was accepted",
        bad.len()
    );
    assert!(
        nothing_loaded(&recs),
        "a corrupted stream was partly dispatched"
    );
}
