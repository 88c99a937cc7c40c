//! The primary guest's state, shipped to the secondary at each checkpoint
//! through `replication-core`'s checkpoint state registry (QEMU's savevm
//! handlers): the workload generator's position and the blocks the primary
//! guest changed since the last checkpoint. The secondary side rolls its
//! own guest back to the last checkpoint, applies them, and continues from
//! the primary's position (diverging again, as a COLO secondary does).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use replication_core::{
    IterateStatus, LoadedSection, OpError, Pending, SectionKind, StateParticipant,
};

use super::rng::Rng;
use super::workload::{Generator, Guest, BLOCK};

/// Participant id in the checkpoint stream.
pub(crate) const STATE_ID: &str = "blockrep-demo-guest";
/// Participant version.
pub(crate) const STATE_VERSION: u32 = 1;
/// Bytes of block data per iterate section.
const CHUNK: u64 = 4 << 20;
/// Mixed into the shipped generator on the secondary: its guest diverges.
const DIVERGE: u64 = 0x5EC0_1DA7_A5EC_0DD5;

const HEADER_LEN: usize = 32;

/// Saving side: the primary guest.
pub(crate) struct PrimarySide {
    guest: Arc<Guest>,
    epoch: AtomicU64,
    /// Runs (offset, len) still to send in this checkpoint.
    runs: Mutex<Vec<(u64, u64)>>,
}

impl PrimarySide {
    pub(crate) fn new(guest: Arc<Guest>) -> Self {
        PrimarySide {
            guest,
            epoch: AtomicU64::new(0),
            runs: Mutex::new(Vec::new()),
        }
    }

    fn emit(&self, out: &mut Vec<u8>, budget: u64) -> bool {
        let st = self.guest.state.lock();
        let mut runs = self.runs.lock();
        let mut sent = 0;
        while let Some(&(off, len)) = runs.last() {
            if sent > 0 && sent + len > budget {
                break;
            }
            runs.pop();
            out.extend_from_slice(&off.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&st.model[off as usize..(off + len) as usize]);
            sent += len;
        }
        runs.is_empty()
    }
}

impl StateParticipant for PrimarySide {
    fn setup(&self, out: &mut Vec<u8>) -> Result<(), OpError> {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let mut st = self.guest.state.lock();
        let mut blocks = st.clear_dirty();
        blocks.sort_unstable();
        let size = st.model.len() as u64;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in blocks {
            let off = b * BLOCK;
            let len = BLOCK.min(size - off);
            match runs.last_mut() {
                Some((o, l)) if *o + *l == off && *l + len <= CHUNK => *l += len,
                _ => runs.push((off, len)),
            }
        }
        runs.reverse(); // popped from the end: lowest offsets first
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&st.gen.rng.0.to_be_bytes());
        out.extend_from_slice(&st.gen.ops.to_be_bytes());
        out.extend_from_slice(&(runs.len() as u64).to_be_bytes());
        *self.runs.lock() = runs;
        Ok(())
    }

    fn pending(&self) -> Pending {
        Pending {
            compatible: self.runs.lock().iter().map(|r| r.1).sum(),
            ..Pending::default()
        }
    }

    fn iterate(&self, out: &mut Vec<u8>) -> Result<IterateStatus, OpError> {
        Ok(if self.emit(out, CHUNK) {
            IterateStatus::Done
        } else {
            IterateStatus::More
        })
    }

    fn complete(&self, out: &mut Vec<u8>) -> Result<(), OpError> {
        let limit = u64::from(replication_core::MAX_SECTION_PAYLOAD) - 4096;
        if !self.emit(out, limit) {
            return Err(format!(
                "the primary guest changed more than the checkpoint stream carries; \
                 use a shorter --checkpoint-interval ({} bytes left)",
                self.pending().total()
            )
            .into());
        }
        Ok(())
    }

    fn load(&self, _section: &LoadedSection<'_>) -> Result<(), OpError> {
        Err("the primary side does not load checkpoints".into())
    }

    fn cleanup(&self) {
        self.runs.lock().clear();
    }
}

struct Staged {
    header: Option<(u64, u64, u64, u64)>,
    runs: Vec<(u64, Vec<u8>)>,
}

/// Loading side: the secondary guest and the disk contents of the last
/// checkpoint (what a rollback returns to).
pub(crate) struct SecondarySide {
    guest: Arc<Guest>,
    base: Mutex<Vec<u8>>,
    epoch: AtomicU64,
    staged: Mutex<Staged>,
}

impl SecondarySide {
    pub(crate) fn new(guest: Arc<Guest>) -> Self {
        let base = guest.state.lock().model.clone();
        SecondarySide {
            guest,
            base: Mutex::new(base),
            epoch: AtomicU64::new(0),
            staged: Mutex::new(Staged {
                header: None,
                runs: Vec::new(),
            }),
        }
    }

    /// The checkpoint number last loaded.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn parse_runs(&self, mut p: &[u8], staged: &mut Staged) -> Result<(), OpError> {
        let size = self.base.lock().len() as u64;
        while !p.is_empty() {
            if p.len() < 16 {
                return Err(format!("truncated run header ({} bytes)", p.len()).into());
            }
            let off = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
            let len = u64::from_be_bytes(p[8..16].try_into().unwrap_or_default());
            p = &p[16..];
            if len > p.len() as u64 || off.checked_add(len).map_or(true, |e| e > size) {
                return Err(format!("bad run at offset {off} length {len}").into());
            }
            staged.runs.push((off, p[..len as usize].to_vec()));
            p = &p[len as usize..];
        }
        Ok(())
    }

    fn apply(&self, staged: &mut Staged) -> Result<(), OpError> {
        let (epoch, rng, ops, nruns) = staged
            .header
            .take()
            .ok_or("checkpoint data without its setup section")?;
        if staged.runs.len() as u64 != nruns {
            return Err(format!("{} runs received, {nruns} announced", staged.runs.len()).into());
        }
        let want = self.epoch() + 1;
        if epoch != want {
            return Err(format!("checkpoint {epoch} received, expected {want}").into());
        }
        let mut st = self.guest.state.lock();
        let mut base = self.base.lock();
        // Roll the secondary guest back to the last checkpoint...
        for b in st.clear_dirty() {
            let o = (b * BLOCK) as usize;
            let e = (o + BLOCK as usize).min(base.len());
            st.model[o..e].copy_from_slice(&base[o..e]);
        }
        // ...then take the primary's changes: the new checkpoint.
        for (off, data) in staged.runs.drain(..) {
            let o = off as usize;
            base[o..o + data.len()].copy_from_slice(&data);
            st.model[o..o + data.len()].copy_from_slice(&data);
        }
        st.gen = Generator {
            rng: Rng(rng ^ DIVERGE),
            ops,
        };
        self.epoch.store(epoch, Ordering::SeqCst);
        Ok(())
    }
}

impl StateParticipant for SecondarySide {
    fn complete(&self, _out: &mut Vec<u8>) -> Result<(), OpError> {
        Err("the secondary side does not save checkpoints".into())
    }

    fn load(&self, s: &LoadedSection<'_>) -> Result<(), OpError> {
        let mut staged = self.staged.lock();
        match s.kind {
            SectionKind::Setup => {
                if s.payload.len() != HEADER_LEN {
                    return Err(format!("setup section of {} bytes", s.payload.len()).into());
                }
                let f = |i: usize| {
                    u64::from_be_bytes(s.payload[i * 8..i * 8 + 8].try_into().unwrap_or_default())
                };
                staged.header = Some((f(0), f(1), f(2), f(3)));
                staged.runs.clear();
                Ok(())
            }
            SectionKind::Iterate => self.parse_runs(s.payload, &mut staged),
            SectionKind::Complete => {
                self.parse_runs(s.payload, &mut staged)?;
                self.apply(&mut staged)
            }
        }
    }
}
