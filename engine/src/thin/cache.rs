//! A cache of recent mappings for the read path, read without the metadata mutex.
//!
//! A read from the page cache costs well under a microsecond; a b-tree walk under the
//! metadata lock would add a third to it. Entries map (thin, virtual block) to a data block.
//!
//! Why it is never stale:
//! - a mapping changes only under the block's stripe lock held for writing (provisioning,
//!   copy-on-write, discard), and whoever changes it invalidates the entry before letting go;
//!   readers hold the same stripe for reading, so a reader never races a change of its block;
//! - changes that are not per block (an aborted transaction, a deleted thin whose id may come
//!   back) clear everything and bump the epoch, under the metadata lock; a reader that looked
//!   a mapping up before such a clear inserts it only if the epoch it saw, also under the
//!   metadata lock, is still current.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::tm::BlockHasher;
use crate::units::ThinId;

const SHARDS: usize = 64;
/// Entries per shard before the shard starts over (64 × 16384 × ~24 bytes ≈ 25 MiB at most).
const SHARD_CAPACITY: usize = 16_384;

type Shard = HashMap<(u32, u64), u64, BuildHasherDefault<BlockHasher>>;

pub(crate) struct MappingCache {
    shards: Vec<RwLock<Shard>>,
    epoch: AtomicU64,
}

impl MappingCache {
    pub(crate) fn new() -> MappingCache {
        MappingCache {
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::default())).collect(),
            epoch: AtomicU64::new(0),
        }
    }

    fn shard(&self, id: ThinId, vblock: u64) -> &RwLock<Shard> {
        let h = (id.get() ^ vblock.rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        &self.shards[(h >> 58) as usize % SHARDS]
    }

    fn key(id: ThinId, vblock: u64) -> (u32, u64) {
        (id.get() as u32, vblock)
    }

    /// The data block `vblock` of `id` maps to, if cached.
    pub(crate) fn get(&self, id: ThinId, vblock: u64) -> Option<u64> {
        self.shard(id, vblock)
            .read()
            .get(&Self::key(id, vblock))
            .copied()
    }

    /// The epoch to pass to `insert`; read it under the metadata lock, with the lookup.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Caches a mapping looked up at `epoch` (dropped if the cache was cleared since).
    pub(crate) fn insert(&self, id: ThinId, vblock: u64, block: u64, epoch: u64) {
        let mut shard = self.shard(id, vblock).write();
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if shard.len() >= SHARD_CAPACITY {
            shard.clear();
        }
        shard.insert(Self::key(id, vblock), block);
    }

    /// Forgets one mapping (the caller holds the block's stripe for writing).
    pub(crate) fn invalidate(&self, id: ThinId, vblock: u64) {
        self.shard(id, vblock)
            .write()
            .remove(&Self::key(id, vblock));
    }

    /// Forgets everything (the caller holds the metadata lock).
    pub(crate) fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for shard in &self.shards {
            shard.write().clear();
        }
    }
}
