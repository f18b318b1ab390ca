//! The transaction manager: the only source of writable metadata blocks.
//!
//! Every block reachable from the committed superblock is immutable. To change one, a caller
//! `shadow`s it: a block allocated in this transaction with a single reference is changed in
//! place; anything else is copied to a fresh block, the old block loses a reference, and if it
//! was shared the copy's children gain one each (the copy now points at them too). Blocks
//! written in this transaction go to the device only at commit, or earlier when too many are
//! dirty (a spill): they are new blocks nobody committed points at, so writing them early is
//! safe. A spill changes where a block's bytes are, never whether it is writable: that is
//! `is_writable` (allocated in this transaction, one owner), and `shadow` and `write` bring a
//! spilled block back into memory.
//!
//! Commit order (the kernel's, and what makes a crash safe):
//! 1. write every dirty block except the superblock;
//! 2. flush;
//! 3. write the superblock;
//! 4. flush.
//!
//! Until step 4 returns, the previous superblock and everything it reaches are intact.

use std::collections::HashMap;
use std::sync::Arc;

use crate::block::{self, Block, BlockKind, BLOCK_SIZE};
use crate::error::{Damage, DeviceRole, Error, Result};
use crate::io::BlockDevice;
use crate::pdata::btree::node;
use crate::pdata::space_map::{CountError, SpaceMap};

/// What a tree's leaf values point at, so that sharing and freeing keep counts right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueRefs {
    /// Plain values (device details, index entries, reference counts).
    None,
    /// `block_time` values of a device's mapping tree: a data block each.
    DataBlock,
    /// Top-level mapping values: the root of a device's mapping tree each.
    Subtree,
}

/// Hashes block numbers with one multiplication: the caches are looked up several times per
/// IO, and SipHash's protection against chosen keys buys nothing for block numbers.
#[derive(Default, Clone, Copy)]
pub struct BlockHasher(u64);

impl std::hash::Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ self.0)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

type BlockMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<BlockHasher>>;

/// Clean blocks kept in memory by default: 128 MiB.
pub const DEFAULT_CACHE_BLOCKS: usize = 32 * 1024;
/// Dirty blocks kept in memory (256 MiB) before half of them are written out early.
const MAX_DIRTY_BLOCKS: usize = 64 * 1024;

struct Dirty {
    data: Arc<Block>,
    kind: BlockKind,
}

pub struct TransactionManager {
    dev: Arc<dyn BlockDevice>,
    cache: BlockMap<Arc<Block>>,
    cache_capacity: usize,
    dirty: BlockMap<Dirty>,
    /// `MAX_DIRTY_BLOCKS`; unit tests lower it to spill at a small scale.
    dirty_limit: usize,
    /// Metadata block reference counts.
    pub meta_sm: SpaceMap,
    /// Data block reference counts.
    pub data_sm: SpaceMap,
    /// Data blocks whose count dropped to zero in this transaction.
    freed_data: Vec<u64>,
}

impl TransactionManager {
    pub fn new(dev: Arc<dyn BlockDevice>, meta_sm: SpaceMap, data_sm: SpaceMap) -> Self {
        TransactionManager {
            dev,
            cache: BlockMap::default(),
            cache_capacity: DEFAULT_CACHE_BLOCKS,
            dirty: BlockMap::default(),
            dirty_limit: MAX_DIRTY_BLOCKS,
            meta_sm,
            data_sm,
            freed_data: Vec::new(),
        }
    }

    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    pub fn nr_dirty(&self) -> usize {
        self.dirty.len()
    }

    /// Spill once `limit` blocks are dirty instead of `MAX_DIRTY_BLOCKS`, so tests reach the
    /// spill with small trees and space maps.
    #[cfg(test)]
    pub(crate) fn set_dirty_limit(&mut self, limit: usize) {
        assert!(limit >= 2, "a spill writes out half the dirty blocks");
        self.dirty_limit = limit;
    }

    pub(crate) fn io_error(&self, offset: u64, source: std::io::Error) -> Error {
        Error::Io {
            role: DeviceRole::Metadata,
            device: self.dev.describe(),
            offset,
            source,
        }
    }

    /// Reads a block from the device, checking its checksum and location.
    pub fn read_raw(&self, location: u64, kind: BlockKind) -> Result<Box<Block>> {
        if location >= self.meta_sm.nr_blocks().max(1) && location != 0 {
            return Err(Error::corrupt(location, Damage::PointerPastEnd(location)));
        }
        let mut buf = block::zeroed();
        self.dev
            .read_at(&mut buf[..], location * BLOCK_SIZE as u64)
            .map_err(|e| self.io_error(location * BLOCK_SIZE as u64, e))?;
        block::verify(&buf, location, kind).map_err(|d| Error::corrupt(location, d))?;
        Ok(buf)
    }

    /// A b-tree node, checked (checksum, location, header) the first time it is read.
    pub fn read_node(&mut self, location: u64) -> Result<Arc<Block>> {
        if location == 0 {
            return Err(Error::corrupt(location, Damage::PointerToSuperblock));
        }
        if let Some(d) = self.dirty.get(&location) {
            if d.kind != BlockKind::Node {
                // Damaged space maps called a live node free, and it was handed out again
                // for a bitmap or an index in this transaction.
                return Err(Error::corrupt(location, Damage::UnexpectedSharing));
            }
            return Ok(d.data.clone());
        }
        if let Some(b) = self.cache.get(&location) {
            return Ok(b.clone());
        }
        let buf = self.read_raw(location, BlockKind::Node)?;
        node::validate_header(&buf).map_err(|d| Error::corrupt(location, d))?;
        let b: Arc<Block> = Arc::from(buf);
        self.cache_insert(location, b.clone());
        Ok(b)
    }

    fn cache_insert(&mut self, location: u64, b: Arc<Block>) {
        if self.cache.len() >= self.cache_capacity {
            // Drop an eighth of the cache; HashMap order is effectively random, which is a
            // fair approximation of LRU for tree blocks at this size.
            let victims: Vec<u64> = self
                .cache
                .keys()
                .take(self.cache_capacity / 8 + 1)
                .copied()
                .collect();
            for v in victims {
                self.cache.remove(&v);
            }
        }
        self.cache.insert(location, b);
    }

    fn sm_error(&self, e: CountError) -> Error {
        match e {
            CountError::OutOfRange(b) => Error::corrupt(b, Damage::PointerPastEnd(b)),
            CountError::Underflow(b) => Error::corrupt(
                b,
                Damage::SpaceMap(format!(
                    "reference count of free block {b} dropped below zero"
                )),
            ),
            CountError::Overflow(b) => Error::corrupt(
                b,
                Damage::SpaceMap(format!(
                    "reference count of block {b} would pass {}",
                    u32::MAX
                )),
            ),
        }
    }

    /// Allocates a zeroed metadata block of `kind`, writable in this transaction.
    pub fn new_block(&mut self, kind: BlockKind) -> Result<u64> {
        // Before the new block joins the dirty set: it has no contents yet, so writing it out
        // would only cost a write and a read back.
        self.spill_if_needed()?;
        let location = self.meta_sm.alloc().ok_or(Error::NoMetadataSpace)?;
        self.dirty.insert(
            location,
            Dirty {
                data: Arc::from(block::zeroed()),
                kind,
            },
        );
        self.cache.remove(&location);
        Ok(location)
    }

    /// Whether `location` may be changed in place: allocated in this transaction, one owner.
    pub fn is_writable(&self, location: u64) -> bool {
        self.meta_sm.committed_count(location) == 0 && self.meta_sm.count(location) == Ok(1)
    }

    /// Makes a node writable (see the module doc); returns its (possibly new) location.
    pub fn shadow(&mut self, location: u64, refs: ValueRefs) -> Result<u64> {
        if self.is_writable(location) {
            self.reclaim(location)?;
            return Ok(location);
        }
        let old = self.read_node(location)?;
        let old_count = self.meta_sm.count(location).map_err(|e| self.sm_error(e))?;
        let copy = self.new_block(BlockKind::Node)?;
        *self.write(copy)? = *old;
        self.dec(location)?;
        if old_count > 1 {
            self.inc_children(&old, refs)?;
        }
        Ok(copy)
    }

    /// Adds a reference to everything a node points at.
    fn inc_children(&mut self, node_bytes: &Block, refs: ValueRefs) -> Result<()> {
        let n = node::Node::new(node_bytes);
        if n.is_internal() {
            for i in 0..n.nr_entries() {
                self.inc(n.value_u64(i))?;
            }
        } else {
            for i in 0..n.nr_entries() {
                self.inc_value(refs, n.value_u64_or_zero(i))?;
            }
        }
        Ok(())
    }

    /// Adds a reference for one leaf value.
    pub fn inc_value(&mut self, refs: ValueRefs, value: u64) -> Result<()> {
        match refs {
            ValueRefs::None => Ok(()),
            ValueRefs::DataBlock => self.data_inc(value >> 24).map(|_| ()),
            ValueRefs::Subtree => self.inc(value).map(|_| ()),
        }
    }

    /// Puts a writable node that a spill wrote out back into the dirty set (a no-op for a
    /// block already there). Any `new_block` may spill, so a block made writable a moment
    /// before may be on the device by the time its caller writes to it.
    fn reclaim(&mut self, location: u64) -> Result<()> {
        if self.dirty.contains_key(&location) || !self.is_writable(location) {
            return Ok(());
        }
        // The spill left the block in the cache; taking it from there (rather than sharing
        // it) lets the write that follows change it without a copy.
        let data = match self.cache.remove(&location) {
            Some(b) => b,
            None => {
                let buf = self.read_raw(location, BlockKind::Node)?;
                node::validate_header(&buf).map_err(|d| Error::corrupt(location, d))?;
                Arc::from(buf)
            }
        };
        self.dirty.insert(
            location,
            Dirty {
                data,
                kind: BlockKind::Node,
            },
        );
        Ok(())
    }

    /// The writable bytes of a node made writable by `new_block` or `shadow` (and not shared
    /// or freed since), in memory or written out early by a spill. On damaged metadata (a
    /// structure that reaches back into itself, or shares blocks between trees) an operation
    /// may move or free a block it made writable a moment before: that is reported as damage
    /// instead of trusted.
    pub fn write(&mut self, location: u64) -> Result<&mut Block> {
        self.reclaim(location)?;
        match self.dirty.get_mut(&location) {
            Some(d) => Ok(Arc::make_mut(&mut d.data)),
            None => Err(Error::corrupt(location, Damage::UnexpectedSharing)),
        }
    }

    pub fn inc(&mut self, location: u64) -> Result<u32> {
        self.meta_sm.inc(location).map_err(|e| self.sm_error(e))
    }

    /// Drops a reference to a metadata block; a block that becomes free leaves the caches.
    pub fn dec(&mut self, location: u64) -> Result<u32> {
        let c = self.meta_sm.dec(location).map_err(|e| self.sm_error(e))?;
        if c == 0 {
            self.dirty.remove(&location);
            self.cache.remove(&location);
        }
        Ok(c)
    }

    pub fn meta_count(&self, location: u64) -> Result<u32> {
        self.meta_sm.count(location).map_err(|e| self.sm_error(e))
    }

    pub fn data_inc(&mut self, block: u64) -> Result<u32> {
        self.data_sm.inc(block).map_err(data_sm_error)
    }

    pub fn data_dec(&mut self, block: u64) -> Result<u32> {
        let c = self.data_sm.dec(block).map_err(data_sm_error)?;
        if c == 0 {
            self.freed_data.push(block);
        }
        Ok(c)
    }

    /// Data blocks freed since this was last called (they are free on disk once the
    /// transaction that freed them commits).
    pub fn take_freed_data(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.freed_data)
    }

    /// Writes a non-node block built at commit time (bitmap, index).
    pub fn put_block(&mut self, location: u64, data: Box<Block>, kind: BlockKind) {
        self.cache.remove(&location);
        self.dirty.insert(
            location,
            Dirty {
                data: Arc::from(data),
                kind,
            },
        );
    }

    /// Writes out the lower half (by location) of the dirty blocks once `dirty_limit` are
    /// dirty, so that memory stays bounded and each spill is paid for by `dirty_limit / 2`
    /// allocations. The lowest locations make long runs of neighbours for `write_out`.
    ///
    /// Every kind of block goes: a pool growing its data space map by millions of blocks
    /// dirties one bitmap per 16320 of them, far more than it dirties nodes. A node stays
    /// writable (see `reclaim`); a bitmap, index or superblock copy is never changed in
    /// place, only replaced whole by `put_block` (space map placeholders from `new_block`
    /// are written as zeroes and replaced later, which costs a write and is still correct).
    fn spill_if_needed(&mut self) -> Result<()> {
        if self.dirty.len() < self.dirty_limit {
            return Ok(());
        }
        let mut victims: Vec<u64> = self.dirty.keys().copied().collect();
        let half = self.dirty_limit / 2;
        victims.select_nth_unstable(half);
        victims.truncate(half);
        let mut blocks: Vec<(u64, Dirty)> = victims
            .into_iter()
            .map(|l| (l, self.dirty.remove(&l).expect("listed")))
            .collect();
        tracing::trace!(nr_blocks = blocks.len(), "spill dirty metadata");
        self.write_out(&mut blocks)?;
        for (l, d) in blocks {
            // Only nodes are read through the cache.
            if d.kind == BlockKind::Node {
                self.cache_insert(l, d.data);
            }
        }
        Ok(())
    }

    /// Seals and writes blocks, merging neighbours into larger writes.
    fn write_out(&mut self, blocks: &mut [(u64, Dirty)]) -> Result<()> {
        blocks.sort_unstable_by_key(|(l, _)| *l);
        let mut run: Vec<u8> = Vec::with_capacity(64 * BLOCK_SIZE);
        let mut run_start = 0u64;
        let mut next = u64::MAX;
        for (location, d) in blocks.iter_mut() {
            let data = Arc::make_mut(&mut d.data);
            block::seal(data, *location, d.kind);
            if *location != next || run.len() >= 256 * BLOCK_SIZE {
                self.flush_run(run_start, &run)?;
                run.clear();
                run_start = *location;
            }
            run.extend_from_slice(&data[..]);
            next = *location + 1;
        }
        self.flush_run(run_start, &run)
    }

    fn flush_run(&self, start: u64, run: &[u8]) -> Result<()> {
        if run.is_empty() {
            return Ok(());
        }
        let offset = start * BLOCK_SIZE as u64;
        self.dev
            .write_at(run, offset)
            .map_err(|e| self.io_error(offset, e))
    }

    /// Writes every dirty block, flushes, writes the superblock, flushes (see the module doc).
    /// On success the current space maps become the committed ones.
    pub fn commit(&mut self, superblock: &mut Block) -> Result<()> {
        self.commit_with(superblock, || Ok(()))
    }

    /// [`Self::commit`], running `before_flush` once the blocks are written and their
    /// writeback started, before they are flushed. The pool makes its data durable there:
    /// the superblock must come after it, the other blocks need not (no committed superblock
    /// reaches them), and on a pool made of files the host's file system then commits the
    /// allocations of both files in one journal transaction (about a tenth of a commit here).
    pub fn commit_with(
        &mut self,
        superblock: &mut Block,
        before_flush: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        // Step 1 and 2: everything but the superblock, then a flush.
        let mut blocks: Vec<(u64, Dirty)> = self.dirty.drain().collect();
        self.write_out(&mut blocks)?;
        if let Err(e) = self.dev.start_writeback() {
            // Only a hint: the flush below reports whatever really went wrong.
            tracing::debug!(error = %e, "metadata writeback could not be started");
        }
        before_flush()?;
        self.dev.sync().map_err(|e| self.io_error(0, e))?;
        // Step 3 and 4: the superblock flips the pool to the new transaction.
        block::seal(superblock, 0, BlockKind::Superblock);
        self.dev
            .write_at(&superblock[..], 0)
            .map_err(|e| self.io_error(0, e))?;
        self.dev.sync().map_err(|e| self.io_error(0, e))?;
        for (l, d) in blocks {
            if d.kind == BlockKind::Node {
                self.cache_insert(l, d.data);
            }
        }
        self.meta_sm.commit();
        self.data_sm.commit();
        Ok(())
    }

    /// Forgets every change since the last commit.
    pub fn rollback(&mut self) {
        for (l, _) in self.dirty.drain() {
            self.cache.remove(&l);
        }
        self.meta_sm.rollback();
        self.data_sm.rollback();
        self.freed_data.clear();
    }

    /// Writes a superblock in place without the rest of a commit (used to set needs_check
    /// after a failure, when nothing else may be trusted).
    pub fn write_superblock_only(&self, superblock: &mut Block) -> Result<()> {
        block::seal(superblock, 0, BlockKind::Superblock);
        self.dev
            .write_at(&superblock[..], 0)
            .map_err(|e| self.io_error(0, e))?;
        self.dev.sync().map_err(|e| self.io_error(0, e))
    }
}

fn data_sm_error(e: CountError) -> Error {
    match e {
        CountError::OutOfRange(b) => Error::corrupt(0, Damage::DataBlockPastEnd(b)),
        CountError::Underflow(b) => Error::corrupt(
            0,
            Damage::SpaceMap(format!(
                "reference count of free data block {b} dropped below zero"
            )),
        ),
        CountError::Overflow(b) => Error::corrupt(
            0,
            Damage::SpaceMap(format!(
                "reference count of data block {b} would pass {}",
                u32::MAX
            )),
        ),
    }
}

#[cfg(test)]
mod tests;
