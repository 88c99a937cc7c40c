//! The replication filter's checkpoint state: a checkpoint epoch both sides
//! agree on, shipped in the checkpoint stream of replication-core's
//! [`StateRegistry`](replication_core::StateRegistry).
//!
//! The primary's filter writes one section per checkpoint (its epoch: the
//! number of checkpoints completed since start, and its node-name for
//! messages). The secondary's filter loads it and refuses a stream whose
//! epoch differs from its own: then a checkpoint was lost or doubled on one
//! side, and the secondary disk no longer matches the primary's.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use replication_core::{LoadedSection, OpError, ReplicationMode, SectionKind, StateParticipant};

use crate::driver::Shared;
use crate::state::ReplicationState;

/// The participant id the filter registers under (instance ids are chosen
/// in open order, so the n-th replication node of one host pairs with the
/// n-th of the other).
pub const STATE_ID: &str = "block-replication";
/// The section version written.
pub const STATE_VERSION: u32 = 1;

/// Encodes a section payload: epoch (u64 LE), name length (u16 LE), name.
pub fn encode_epoch(epoch: u64, name: &str) -> Vec<u8> {
    let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(10 + name.len());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    out
}

/// Decodes a section payload written by [`encode_epoch`].
pub fn decode_epoch(payload: &[u8]) -> Result<(u64, String), String> {
    if payload.len() < 10 {
        return Err(format!(
            "replication state section of {} bytes is shorter than 10",
            payload.len()
        ));
    }
    let epoch = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    let n = u16::from_le_bytes(payload[8..10].try_into().expect("2 bytes")) as usize;
    if payload.len() != 10 + n {
        return Err(format!(
            "replication state section: name length {n} does not match {} payload bytes",
            payload.len()
        ));
    }
    let name = String::from_utf8_lossy(&payload[10..]).into_owned();
    Ok((epoch, name))
}

pub(crate) struct EpochParticipant {
    shared: Weak<Shared>,
}

impl EpochParticipant {
    pub(crate) fn new(shared: &Arc<Shared>) -> EpochParticipant {
        EpochParticipant {
            shared: Arc::downgrade(shared),
        }
    }
}

impl StateParticipant for EpochParticipant {
    fn is_active(&self) -> bool {
        self.shared.upgrade().is_some_and(|s| {
            s.mode == ReplicationMode::Primary && s.state() == ReplicationState::Running
        })
    }

    fn complete(&self, out: &mut Vec<u8>) -> Result<(), OpError> {
        let s = self
            .shared
            .upgrade()
            .ok_or("the replication node is gone")?;
        out.extend_from_slice(&encode_epoch(s.epoch.load(Ordering::Acquire), &s.name));
        Ok(())
    }

    fn load(&self, section: &LoadedSection<'_>) -> Result<(), OpError> {
        if section.kind != SectionKind::Complete {
            // Only the complete section carries the epoch.
            return Ok(());
        }
        let s = self
            .shared
            .upgrade()
            .ok_or("the replication node is gone")?;
        let (epoch, peer) = decode_epoch(section.payload)?;
        if s.mode != ReplicationMode::Secondary {
            return Err(format!(
                "replication node '{}' is a primary and cannot load the state of '{peer}'",
                s.name
            )
            .into());
        }
        if s.state() != ReplicationState::Running {
            return Err(format!(
                "replication node '{}' is not running (state {}) and cannot load a checkpoint",
                s.name,
                s.state()
            )
            .into());
        }
        let mine = s.epoch.load(Ordering::Acquire);
        if epoch != mine {
            return Err(format!(
                "checkpoint epoch mismatch: primary '{peer}' is at {epoch}, secondary '{}' at {mine}",
                s.name
            )
            .into());
        }
        Ok(())
    }
}
