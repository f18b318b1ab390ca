//! A cache of recent mappings for the data path, read without any lock.
//!
//! A 4 KiB read from the page cache costs well under 1 µs; a b-tree walk under the metadata
//! lock would add a third to it, and even a locked hash map costs a few percent (two atomic
//! read-modify-writes and a cache miss or two). So each open thin has a [`MappingTable`]: a
//! three-level radix table of `AtomicU64` entries indexed by virtual block, allocated lazily,
//! where a hit is three dependent loads and no write to shared memory.
//!
//! An entry holds the data block plus one, tagged with the low 24 bits of its table's epoch;
//! 0 means "not cached". One more bit says the mapping is the thin's own: made after the
//! thin's latest snapshot, so a write may go to the block in place without asking the
//! metadata (the write path's fast path).
//!
//! Why it is never stale:
//! - a mapping changes only under the block's stripe lock held for writing (provisioning,
//!   copy-on-write, discard), and whoever changes it invalidates or replaces the entry before
//!   letting go; a read that looks a block up in the metadata holds the same stripe for
//!   reading, so its insert never races a change of the block;
//! - changes that are not per block (an aborted transaction, a deleted thin whose id may come
//!   back) bump every table's epoch under the metadata lock ([`MappingCache::clear`]), which
//!   makes every entry's tag wrong at once; whoever looked a mapping up before such a bump
//!   tags its insert with the epoch it read under the metadata lock, so the insert is born
//!   stale. When a table's 24-bit tag wraps, the table is zeroed as well, so a tag can never
//!   match again by coming around;
//! - a mapping stops being the thin's own only when the thin is snapshotted, which bumps that
//!   thin's table the same way, with the thin's writes held off (so no write is between its
//!   check of the entry and its data write meanwhile).
//!
//! Reads of a cached block take no lock at all, so they may race a write or a discard of the
//! same block, and read the old bytes or the new ones, as on any block device. The stripe lock
//! would guard one more thing: that the block read is not freed, reused by another thin and
//! rewritten between the lookup and the read. So whoever frees a block of a thin counts it in the thin's table
//! ([`MappingTable::freed`], under the block's stripe and the metadata lock, before anyone
//! can allocate the block again), and a lock-free read that saw the count move while it read
//! ([`MappingTable::frees`] before, [`MappingTable::unchanged_since`] after) reads again under
//! the stripe. The count sits beside the epoch, in a line every lookup touches anyway.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use parking_lot::Mutex;

use crate::units::ThinId;

/// Entries per leaf and per middle node; the top node has `TOP` entries.
const FANOUT_BITS: u32 = 10;
const FANOUT: usize = 1 << FANOUT_BITS;
const TOP_BITS: u32 = 8;
const TOP: usize = 1 << TOP_BITS;
/// Virtual blocks past this are not cached (2^28 blocks: 16 TiB at 64 KiB).
const MAX_VBLOCK: u64 = 1 << (TOP_BITS + 2 * FANOUT_BITS);

/// Leaves (8 KiB each, 1024 mappings) all tables of a pool may hold: 32 MiB, 4M mappings.
/// Past it, reads of blocks in new leaves go to the b-tree.
const MAX_LEAVES: usize = 4096;

const TAG_BITS: u32 = 24;
const TAG_SHIFT: u32 = 64 - TAG_BITS;
/// Set when the mapping is the thin's own (see the module's docs).
const OWN: u64 = 1 << (TAG_SHIFT - 1);
/// Data blocks at or past this are not cached (2^39: far past any data device's blocks).
const BLOCK_MASK: u64 = OWN - 1;

type Leaf = Box<[AtomicU64]>;
type Middle = Box<[OnceLock<Leaf>]>;

/// The pool-wide part: the memory budget and the open thins' tables (to make them all
/// stale at once). Lock order: the metadata lock, then `tables`.
pub(crate) struct MappingCache {
    leaves: AtomicUsize,
    tables: Mutex<Vec<Weak<MappingTable>>>,
}

impl MappingCache {
    pub(crate) fn new() -> MappingCache {
        MappingCache {
            leaves: AtomicUsize::new(0),
            tables: Mutex::new(Vec::new()),
        }
    }

    /// A new, empty table for a thin being opened.
    pub(crate) fn new_table(&self, thin: ThinId) -> Arc<MappingTable> {
        let table = Arc::new(MappingTable::new(thin));
        let mut tables = self.tables.lock();
        tables.retain(|t| t.strong_count() > 0);
        tables.push(Arc::downgrade(&table));
        table
    }

    /// Makes every cached mapping of every open thin stale (the caller holds the metadata
    /// lock).
    pub(crate) fn clear(&self) {
        for table in self.tables.lock().iter().filter_map(Weak::upgrade) {
            table.clear();
        }
    }

    /// Makes the cached mappings of one thin stale, in every table it has (the caller holds
    /// the metadata lock).
    pub(crate) fn clear_thin(&self, thin: ThinId) {
        let tables = self.tables.lock();
        for table in tables.iter().filter_map(Weak::upgrade) {
            if table.thin == thin {
                table.clear();
            }
        }
    }
}

/// One open thin's cached mappings.
pub(crate) struct MappingTable {
    thin: ThinId,
    /// Entries carry its low bits; bumped under the metadata lock.
    epoch: AtomicU64,
    /// Data blocks of this thin freed so far (see the module's docs).
    frees: AtomicU64,
    top: Box<[OnceLock<Middle>]>,
}

fn split(vblock: u64) -> Option<(usize, usize, usize)> {
    (vblock < MAX_VBLOCK).then(|| {
        let mask = FANOUT as u64 - 1;
        (
            (vblock >> (2 * FANOUT_BITS)) as usize,
            ((vblock >> FANOUT_BITS) & mask) as usize,
            (vblock & mask) as usize,
        )
    })
}

fn tag(epoch: u64) -> u64 {
    epoch & ((1 << TAG_BITS) - 1)
}

impl MappingTable {
    fn new(thin: ThinId) -> MappingTable {
        MappingTable {
            thin,
            epoch: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            top: (0..TOP).map(|_| OnceLock::new()).collect(),
        }
    }

    /// The epoch to pass to `insert`; read it under the metadata lock, with the lookup.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Makes every entry stale (the caller holds the metadata lock).
    pub(crate) fn clear(&self) {
        // An aborted transaction frees the blocks it allocated: count that too.
        self.freed();
        let new = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        if tag(new) == 0 {
            // The tag came around: an old entry could match again, so none may survive.
            self.zero();
        }
    }

    /// Counts a freed data block of this thin. Call it after the entry is invalidated and
    /// before the metadata lock is let go (so before the block can be allocated again).
    pub(crate) fn freed(&self) {
        self.frees.fetch_add(1, Ordering::Release);
    }

    /// The free count, read before a lock-free read of a cached block.
    pub(crate) fn frees(&self) -> u64 {
        self.frees.load(Ordering::Acquire)
    }

    /// Whether no block of this thin was freed since `frees` was read: then a block read in
    /// between held what the cached mapping named.
    pub(crate) fn unchanged_since(&self, frees: u64) -> bool {
        // The read's loads (the data, in the kernel) before the count's.
        std::sync::atomic::fence(Ordering::Acquire);
        self.frees.load(Ordering::Relaxed) == frees
    }

    fn entry(&self, vblock: u64) -> Option<&AtomicU64> {
        let (t, m, l) = split(vblock)?;
        Some(&self.top[t].get()?[m].get()?[l])
    }

    /// The current entry for `vblock`, if any.
    fn current(&self, vblock: u64) -> Option<u64> {
        let entry = self.entry(vblock)?.load(Ordering::Acquire);
        (entry != 0 && entry >> TAG_SHIFT == tag(self.epoch())).then_some(entry)
    }

    /// The data block `vblock` maps to, if cached and current.
    pub(crate) fn get(&self, vblock: u64) -> Option<u64> {
        self.current(vblock).map(|entry| (entry & BLOCK_MASK) - 1)
    }

    /// The data block `vblock` maps to, if cached, current and the thin's own: a write may go
    /// there in place.
    pub(crate) fn get_own(&self, vblock: u64) -> Option<u64> {
        self.current(vblock)
            .filter(|entry| entry & OWN != 0)
            .map(|entry| (entry & BLOCK_MASK) - 1)
    }

    /// Caches a mapping looked up at `epoch` (born stale if the table's epoch moved since);
    /// `own` says it was made after the thin's latest snapshot.
    pub(crate) fn insert(
        &self,
        cache: &MappingCache,
        vblock: u64,
        block: u64,
        own: bool,
        epoch: u64,
    ) {
        if block >= BLOCK_MASK {
            return;
        }
        let Some((t, m, l)) = split(vblock) else {
            return;
        };
        let middle = self.top[t].get_or_init(|| (0..FANOUT).map(|_| OnceLock::new()).collect());
        let leaf = match middle[m].get() {
            Some(leaf) => leaf,
            None => {
                if cache.leaves.fetch_add(1, Ordering::Relaxed) >= MAX_LEAVES {
                    cache.leaves.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                let mut fresh = Some((0..FANOUT).map(|_| AtomicU64::new(0)).collect());
                let leaf = middle[m].get_or_init(|| fresh.take().expect("taken once"));
                if fresh.is_some() {
                    // Another reader allocated it first; ours was never counted twice.
                    cache.leaves.fetch_sub(1, Ordering::Relaxed);
                }
                leaf
            }
        };
        let own = if own { OWN } else { 0 };
        leaf[l].store(
            (tag(epoch) << TAG_SHIFT) | own | (block + 1),
            Ordering::Release,
        );
    }

    /// Forgets one mapping (the caller holds the block's stripe for writing).
    pub(crate) fn invalidate(&self, vblock: u64) {
        if let Some(entry) = self.entry(vblock) {
            entry.store(0, Ordering::Release);
        }
    }

    /// Forgets everything (after the epoch's tag wrapped around).
    fn zero(&self) {
        for middle in self.top.iter().filter_map(OnceLock::get) {
            for leaf in middle.iter().filter_map(OnceLock::get) {
                for entry in leaf.iter() {
                    entry.store(0, Ordering::Release);
                }
            }
        }
    }

    /// Gives the leaves back to the pool's budget (the thin's last handle closed).
    pub(crate) fn release(&self, cache: &MappingCache) {
        let leaves = self
            .top
            .iter()
            .filter_map(OnceLock::get)
            .map(|middle| middle.iter().filter(|l| l.get().is_some()).count())
            .sum::<usize>();
        cache.leaves.fetch_sub(leaves, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ThinId {
        ThinId::new(n).expect("small")
    }

    #[test]
    fn hits_misses_invalidation_and_epochs() {
        let cache = MappingCache::new();
        let table = cache.new_table(id(1));
        assert_eq!(table.get(7), None);
        table.insert(&cache, 7, 1234, false, table.epoch());
        table.insert(&cache, MAX_VBLOCK - 1, 0, true, table.epoch());
        assert_eq!(table.get(7), Some(1234));
        assert_eq!(table.get_own(7), None, "shared with a snapshot");
        assert_eq!(table.get(MAX_VBLOCK - 1), Some(0));
        assert_eq!(table.get_own(MAX_VBLOCK - 1), Some(0));
        assert_eq!(table.get(8), None);
        table.invalidate(7);
        assert_eq!(table.get(7), None);

        // An insert looked up before a clear is born stale; one after it is current.
        let before = table.epoch();
        cache.clear();
        table.insert(&cache, 9, 5, true, before);
        assert_eq!(table.get(9), None);
        assert_eq!(table.get(MAX_VBLOCK - 1), None, "clear staled it");
        table.insert(&cache, 9, 5, true, table.epoch());
        assert_eq!(table.get(9), Some(5));
        assert_eq!(table.get_own(9), Some(5));
        // The largest block that fits beside the flag keeps it apart.
        table.insert(&cache, 11, BLOCK_MASK - 1, false, table.epoch());
        assert_eq!(table.get(11), Some(BLOCK_MASK - 1));
        assert_eq!(table.get_own(11), None);

        // Out of range: never cached, never a panic.
        table.insert(&cache, MAX_VBLOCK, 1, false, table.epoch());
        assert_eq!(table.get(MAX_VBLOCK), None);
        table.insert(&cache, 10, BLOCK_MASK, true, table.epoch());
        assert_eq!(table.get(10), None);
    }

    #[test]
    fn one_table_goes_stale_alone() {
        // A snapshot of one thin stales that thin's entries and leaves the others' alone.
        let cache = MappingCache::new();
        let (origin, other) = (cache.new_table(id(1)), cache.new_table(id(2)));
        let second = cache.new_table(id(1));
        origin.insert(&cache, 1, 10, true, origin.epoch());
        second.insert(&cache, 1, 10, true, second.epoch());
        other.insert(&cache, 1, 20, true, other.epoch());
        cache.clear_thin(id(1));
        assert_eq!(origin.get_own(1), None);
        assert_eq!(second.get_own(1), None);
        assert_eq!(other.get_own(1), Some(20));
        cache.clear();
        assert_eq!(other.get(1), None);
    }

    #[test]
    fn frees_tell_a_lock_free_read_to_look_again() {
        let cache = MappingCache::new();
        let table = cache.new_table(id(1));
        let before = table.frees();
        assert!(table.unchanged_since(before));
        table.freed();
        assert!(!table.unchanged_since(before));
        // Making the table stale counts too (an abort frees what its transaction took).
        let before = table.frees();
        cache.clear();
        assert!(!table.unchanged_since(before));
    }

    #[test]
    fn the_tag_wrapping_around_zeroes_the_table() {
        let cache = MappingCache::new();
        let table = cache.new_table(id(1));
        table.epoch.store((1 << TAG_BITS) - 2, Ordering::Relaxed);
        // Tagged 0: without zeroing it would match again once the tag comes around.
        table.insert(&cache, 1, 2, true, 0);
        cache.clear();
        cache.clear();
        assert_eq!(tag(table.epoch()), 0);
        assert_eq!(table.get(1), None);
    }

    #[test]
    fn the_leaf_budget_bounds_memory() {
        let cache = MappingCache::new();
        let table = cache.new_table(id(1));
        for i in 0..(MAX_LEAVES as u64 + 10) {
            table.insert(&cache, i * FANOUT as u64, i, false, table.epoch());
        }
        assert_eq!(cache.leaves.load(Ordering::Relaxed), MAX_LEAVES);
        assert_eq!(table.get((MAX_LEAVES as u64 + 5) * FANOUT as u64), None);
        table.release(&cache);
        assert_eq!(cache.leaves.load(Ordering::Relaxed), 0);
    }
}
