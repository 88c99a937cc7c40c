//! A bounded write-back cache of metadata tables (L2 tables, refcount blocks),
//! keyed by host offset, evicting the least recently used clean table.

use std::collections::HashMap;

#[derive(Debug)]
pub(crate) struct CacheEntry {
    pub data: Vec<u8>,
    pub dirty: bool,
    last_use: u64,
}

#[derive(Debug)]
pub(crate) struct TableCache {
    capacity: usize,
    map: HashMap<u64, CacheEntry>,
    tick: u64,
    /// Buffers of dropped tables, handed out again by [`TableCache::buffer`]:
    /// a make_empty that drops hundreds of tables would otherwise free tens
    /// of MiB inside the checkpoint (the allocator returns it to the kernel
    /// with one `madvise` per run, 30-150 µs each) and fault it back in on
    /// the next writes.
    spare: Vec<Vec<u8>>,
}

impl TableCache {
    pub fn new(capacity: usize) -> Self {
        TableCache {
            capacity: capacity.max(2),
            map: HashMap::new(),
            tick: 0,
            spare: Vec::new(),
        }
    }

    /// A buffer of `len` bytes for a table about to be inserted; its
    /// contents are stale: the caller fills all of it.
    pub fn buffer(&mut self, len: usize) -> Vec<u8> {
        match self.spare.pop() {
            Some(b) if b.len() == len => b,
            _ => vec![0u8; len],
        }
    }

    fn recycle(&mut self, data: Vec<u8>) {
        if self.spare.len() < self.capacity {
            self.spare.push(data);
        }
    }

    pub fn is_full(&self) -> bool {
        self.map.len() >= self.capacity
    }

    pub fn contains(&self, off: u64) -> bool {
        self.map.contains_key(&off)
    }

    pub fn get(&mut self, off: u64) -> Option<&mut CacheEntry> {
        self.tick += 1;
        let t = self.tick;
        let e = self.map.get_mut(&off)?;
        e.last_use = t;
        Some(e)
    }

    /// The entry at `off`, without counting it as a use.
    pub fn peek_mut(&mut self, off: u64) -> Option<&mut CacheEntry> {
        self.map.get_mut(&off)
    }

    pub fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) {
        self.tick += 1;
        self.map.insert(
            off,
            CacheEntry {
                data,
                dirty,
                last_use: self.tick,
            },
        );
    }

    /// Evict the least recently used clean entry, except `keep`. Returns false
    /// when every entry is dirty.
    pub fn evict_clean(&mut self, keep: u64) -> bool {
        let victim = self
            .map
            .iter()
            .filter(|(k, e)| !e.dirty && **k != keep)
            .min_by_key(|(_, e)| e.last_use)
            .map(|(k, _)| *k);
        match victim {
            Some(k) => {
                if let Some(e) = self.map.remove(&k) {
                    self.recycle(e.data);
                }
                true
            }
            None => false,
        }
    }

    pub fn has_dirty(&self) -> bool {
        self.map.values().any(|e| e.dirty)
    }

    /// Offsets of dirty entries, sorted.
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, e)| e.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Drops every entry, keeping their buffers for reuse.
    pub fn clear(&mut self) {
        let entries: Vec<CacheEntry> = self.map.drain().map(|(_, e)| e).collect();
        for e in entries {
            self.recycle(e.data);
        }
    }
}
