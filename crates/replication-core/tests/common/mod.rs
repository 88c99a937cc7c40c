//! A scripted checkpoint participant shared by the savevm tests.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use replication_core::{
    IterateStatus, LoadedSection, OpError, Pending, SavePhase, SectionKind, StateParticipant,
};

/// What a participant saw on the load side: (kind, instance, version, payload).
pub type Loaded = (SectionKind, u32, u32, Vec<u8>);

/// Writes scripted payloads and records every section it loads.
#[derive(Default)]
pub struct Scripted {
    pub setup: Vec<u8>,
    pub parts: Mutex<VecDeque<Vec<u8>>>,
    pub complete: Vec<u8>,
    pub active: bool,
    pub fail: Option<SavePhase>,
    pub loaded: Mutex<Vec<Loaded>>,
    pub cleanups: AtomicUsize,
}

impl Scripted {
    pub fn new(setup: &[u8], parts: &[&[u8]], complete: &[u8]) -> Self {
        Scripted {
            setup: setup.to_vec(),
            parts: Mutex::new(parts.iter().map(|p| p.to_vec()).collect()),
            complete: complete.to_vec(),
            active: true,
            ..Default::default()
        }
    }

    pub fn sink() -> Self {
        Self::new(b"", &[], b"")
    }

    pub fn loaded(&self) -> Vec<Loaded> {
        self.loaded.lock().clone()
    }

    pub fn cleanups(&self) -> usize {
        self.cleanups.load(Ordering::SeqCst)
    }

    fn check(&self, phase: SavePhase) -> Result<(), OpError> {
        if self.fail == Some(phase) {
            return Err(format!("scripted failure in {phase}").into());
        }
        Ok(())
    }
}

impl StateParticipant for Scripted {
    fn is_active(&self) -> bool {
        self.active
    }
    fn setup(&self, out: &mut Vec<u8>) -> Result<(), OpError> {
        self.check(SavePhase::Setup)?;
        out.extend_from_slice(&self.setup);
        Ok(())
    }
    fn pending(&self) -> Pending {
        let parts = self.parts.lock();
        Pending {
            precopy_only: parts.len() as u64,
            compatible: parts.iter().map(|p| p.len() as u64).sum(),
            postcopy_only: 0,
        }
    }
    fn iterate(&self, out: &mut Vec<u8>) -> Result<IterateStatus, OpError> {
        self.check(SavePhase::Iterate)?;
        let mut parts = self.parts.lock();
        if let Some(p) = parts.pop_front() {
            out.extend_from_slice(&p);
        }
        Ok(if parts.is_empty() {
            IterateStatus::Done
        } else {
            IterateStatus::More
        })
    }
    fn complete(&self, out: &mut Vec<u8>) -> Result<(), OpError> {
        self.check(SavePhase::Complete)?;
        out.extend_from_slice(&self.complete);
        Ok(())
    }
    fn load(&self, s: &LoadedSection<'_>) -> Result<(), OpError> {
        self.check(SavePhase::Load)?;
        self.loaded
            .lock()
            .push((s.kind, s.instance, s.version, s.payload.to_vec()));
        Ok(())
    }
    fn cleanup(&self) {
        self.cleanups.fetch_add(1, Ordering::SeqCst);
    }
}
