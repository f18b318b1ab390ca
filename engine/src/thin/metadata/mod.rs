//! dm-thin metadata: the superblock, the device details tree and the two-level mapping tree,
//! on top of the transaction manager and the space maps. The vocabulary is the kernel's
//! `dm-thin-metadata.c`; the pool (`thin::pool`) adds locking, modes and the data path.

pub mod details;
pub mod superblock;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::block::{self, Block, BlockKind, BLOCK_SIZE};
use crate::error::{Damage, Error, Result};
use crate::io::BlockDevice;
use crate::pdata::btree::{self, node::Node, MAPPING_TREE, TOP_TREE};
use crate::pdata::space_map::disk::{self, SmLocations, SmRoot, MAX_METADATA_BLOCKS};
use crate::pdata::space_map::SpaceMap;
use crate::tm::TransactionManager;
use crate::units::{DataBlockSize, ThinId, MAX_TIME};
pub use details::{BlockTime, DeviceDetails, DETAILS_TREE};
pub use superblock::Superblock;

/// The metadata of one pool, with the running transaction's changes.
pub struct Metadata {
    tm: TransactionManager,
    sb: Superblock,
    meta_loc: SmLocations,
    data_loc: SmLocations,
    details: BTreeMap<ThinId, DeviceDetails>,
    dirty_details: BTreeSet<ThinId>,
    /// The committed details of each device changed in this transaction (`None`: it did not
    /// exist), to put back on abort: commits then cost the changes, not the number of thins.
    details_undo: BTreeMap<ThinId, Option<DeviceDetails>>,
    /// Each device's mapping tree root, as the top-level tree holds it (see `device_root`).
    roots: std::collections::HashMap<ThinId, u64>,
    /// What the last commit wrote, to return to on abort.
    committed: Committed,
    changed: bool,
}

#[derive(Clone)]
struct Committed {
    sb: Superblock,
    meta_loc: SmLocations,
    data_loc: SmLocations,
}

/// Metadata blocks a device of `bytes` can hold, clamped to what the format can address.
pub fn metadata_blocks_for(bytes: u64) -> u64 {
    (bytes / BLOCK_SIZE as u64).min(MAX_METADATA_BLOCKS)
}

impl Metadata {
    /// Writes a new, empty pool. The data space map covers `nr_data_blocks`.
    pub fn format(
        dev: Arc<dyn BlockDevice>,
        data_block_size: DataBlockSize,
        nr_data_blocks: u64,
    ) -> Result<Metadata> {
        let nr_meta = metadata_blocks_for(dev.size());
        if nr_meta < 64 {
            return Err(Error::InvalidArgument(format!(
                "metadata device of {} bytes is too small (at least 256 KiB)",
                dev.size()
            )));
        }
        // Each bitmap of the data space map takes a metadata block, besides the index and
        // the pool's trees. Refused here, before the in-memory map is allocated: every
        // caller (create, restore, repair) passes a data size that may come from a user or
        // a damaged disk.
        let bitmaps = crate::pdata::space_map::nr_bitmaps(nr_data_blocks) as u64;
        if nr_data_blocks > crate::units::MAX_DATA_BLOCKS || bitmaps.saturating_add(8) > nr_meta {
            return Err(Error::InvalidArgument(format!(
                "{nr_data_blocks} data blocks need {bitmaps} space map blocks; the metadata \
                 device holds {nr_meta} blocks"
            )));
        }
        // An interrupted format must not leave an old superblock pointing into blocks we
        // are about to overwrite.
        let zero = block::zeroed();
        dev.write_at(&zero[..], 0)
            .and_then(|_| dev.sync())
            .map_err(|e| Error::Io {
                role: crate::error::DeviceRole::Metadata,
                device: dev.describe(),
                offset: 0,
                source: e,
            })?;
        let mut meta_sm = SpaceMap::new(nr_meta);
        meta_sm.set(0, 1).expect("block 0 exists");
        let mut tm = TransactionManager::new(dev, meta_sm, SpaceMap::new(nr_data_blocks));
        let data_mapping_root = btree::empty(&mut tm, 8)?;
        let device_details_root = btree::empty(&mut tm, 24)?;
        let data_loc = SmLocations {
            bitmaps: vec![],
            bitmap_root: btree::empty(&mut tm, 16)?,
            ref_count_root: btree::empty(&mut tm, 4)?,
        };
        let meta_loc = SmLocations {
            bitmaps: vec![],
            bitmap_root: 0,
            ref_count_root: btree::empty(&mut tm, 4)?,
        };
        let sb = Superblock {
            flags: 0,
            uuid: [0; 16],
            version: superblock::VERSION,
            time: 0,
            transaction_id: 0,
            held_root: 0,
            data_sm_root: SmRoot::default(),
            metadata_sm_root: SmRoot::default(),
            data_mapping_root,
            device_details_root,
            data_block_size: data_block_size.sectors(),
            metadata_nr_blocks: nr_meta,
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
        };
        let committed = Committed {
            sb: sb.clone(),
            meta_loc: meta_loc.clone(),
            data_loc: data_loc.clone(),
        };
        let mut md = Metadata {
            tm,
            sb,
            meta_loc,
            data_loc,
            details: BTreeMap::new(),
            dirty_details: BTreeSet::new(),
            details_undo: BTreeMap::new(),
            roots: Default::default(),
            committed,
            changed: true,
        };
        md.commit()?;
        Ok(md)
    }

    /// Opens the metadata on `dev`.
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Metadata> {
        let mut b = block::zeroed();
        dev.read_at(&mut b[..], 0).map_err(|e| Error::Io {
            role: crate::error::DeviceRole::Metadata,
            device: dev.describe(),
            offset: 0,
            source: e,
        })?;
        let sb = Superblock::read(&b, 0)?;
        let dev_blocks = dev.size() / BLOCK_SIZE as u64;
        if sb.metadata_sm_root.nr_blocks > dev_blocks {
            return Err(Error::corrupt(
                0,
                Damage::BadSuperblock(format!(
                    "metadata space map has {} blocks but the device only {dev_blocks}",
                    sb.metadata_sm_root.nr_blocks
                )),
            ));
        }
        let mut tm = TransactionManager::new(
            dev,
            SpaceMap::new(sb.metadata_sm_root.nr_blocks),
            SpaceMap::new(0),
        );
        let (meta_sm, meta_loc) = disk::load_metadata(&mut tm, &sb.metadata_sm_root)?;
        tm.meta_sm = meta_sm;
        let (data_sm, data_loc) = disk::load_data(&mut tm, &sb.data_sm_root)?;
        tm.data_sm = data_sm;
        let mut details = BTreeMap::new();
        btree::for_each(
            &mut tm,
            sb.device_details_root,
            DETAILS_TREE,
            &mut |k, v| {
                let id = ThinId::new(k).ok_or(Error::corrupt(
                    sb.device_details_root,
                    Damage::Other(format!("device id {k} is beyond 24 bits")),
                ))?;
                details.insert(id, DeviceDetails::decode(v));
                Ok(())
            },
        )?;
        let committed = Committed {
            sb: sb.clone(),
            meta_loc: meta_loc.clone(),
            data_loc: data_loc.clone(),
        };
        Ok(Metadata {
            tm,
            sb,
            meta_loc,
            data_loc,
            details,
            dirty_details: BTreeSet::new(),
            details_undo: BTreeMap::new(),
            roots: Default::default(),
            committed,
            changed: false,
        })
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn data_block_size(&self) -> DataBlockSize {
        DataBlockSize::from_sectors(self.sb.data_block_size).expect("checked at open")
    }

    pub fn tm(&self) -> &TransactionManager {
        &self.tm
    }

    /// Whether anything changed since the last commit.
    pub fn has_changes(&self) -> bool {
        self.changed
    }

    /// Records a device's committed details before its first change in this transaction.
    fn remember(&mut self, id: ThinId) {
        if !self.details_undo.contains_key(&id) {
            let old = self.details.get(&id).copied();
            self.details_undo.insert(id, old);
        }
    }

    pub fn devices(&self) -> impl Iterator<Item = (ThinId, &DeviceDetails)> {
        self.details.iter().map(|(k, v)| (*k, v))
    }

    pub fn device(&self, id: ThinId) -> Result<&DeviceDetails> {
        self.details.get(&id).ok_or(Error::NoSuchThin(id))
    }

    pub fn exists(&self, id: ThinId) -> bool {
        self.details.contains_key(&id)
    }

    /// The root of a device's mapping tree. Cached: every IO needs it, and it changes only
    /// through this type (`with_device_tree`, create, snapshot, delete, abort).
    fn device_root(&mut self, id: ThinId) -> Result<u64> {
        if !self.exists(id) {
            // A handle to a thin whose creation a failure rolled back: not damage.
            return Err(Error::NoSuchThin(id));
        }
        if let Some(&root) = self.roots.get(&id) {
            return Ok(root);
        }
        let root = btree::lookup(&mut self.tm, self.sb.data_mapping_root, id.get(), TOP_TREE)?
            .map(|v| v.as_u64())
            .ok_or_else(|| {
                Error::corrupt(
                    self.sb.data_mapping_root,
                    Damage::Other(format!(
                        "device {id} is in the details tree but has no mapping tree"
                    )),
                )
            })?;
        self.roots.insert(id, root);
        Ok(root)
    }

    // ---- pool messages -------------------------------------------------------------------

    pub fn create_thin(&mut self, id: ThinId) -> Result<()> {
        if self.exists(id) {
            return Err(Error::ThinExists(id));
        }
        let root = btree::empty(&mut self.tm, 8)?;
        self.sb.data_mapping_root = btree::insert(
            &mut self.tm,
            self.sb.data_mapping_root,
            id.get(),
            &root.to_le_bytes(),
            TOP_TREE,
        )?
        .0;
        let d = DeviceDetails {
            mapped_blocks: 0,
            transaction_id: self.sb.transaction_id,
            creation_time: self.sb.time,
            snapshotted_time: self.sb.time,
        };
        self.remember(id);
        self.details.insert(id, d);
        self.dirty_details.insert(id);
        self.changed = true;
        Ok(())
    }

    /// Creates `id` as a snapshot of `origin` in constant time: the new device shares the
    /// origin's whole mapping tree (one more reference on its root).
    pub fn create_snap(&mut self, id: ThinId, origin: ThinId) -> Result<()> {
        if self.exists(id) {
            return Err(Error::ThinExists(id));
        }
        let origin_details = *self.device(origin)?;
        if self.sb.time >= MAX_TIME {
            return Err(Error::TimeExhausted);
        }
        let root = self.device_root(origin)?;
        self.tm.inc(root)?;
        self.sb.data_mapping_root = btree::insert(
            &mut self.tm,
            self.sb.data_mapping_root,
            id.get(),
            &root.to_le_bytes(),
            TOP_TREE,
        )?
        .0;
        self.sb.time += 1;
        let time = self.sb.time;
        self.remember(id);
        self.remember(origin);
        self.details.insert(
            id,
            DeviceDetails {
                mapped_blocks: origin_details.mapped_blocks,
                transaction_id: self.sb.transaction_id,
                creation_time: time,
                snapshotted_time: time,
            },
        );
        self.details
            .get_mut(&origin)
            .expect("checked")
            .snapshotted_time = time;
        self.dirty_details.insert(id);
        self.dirty_details.insert(origin);
        self.changed = true;
        Ok(())
    }

    /// Deletes a device; its blocks that nobody else maps become free.
    pub fn delete(&mut self, id: ThinId) -> Result<()> {
        if !self.exists(id) {
            return Err(Error::NoSuchThin(id));
        }
        self.roots.remove(&id);
        let (root, old) =
            btree::remove(&mut self.tm, self.sb.data_mapping_root, id.get(), TOP_TREE)?;
        self.sb.data_mapping_root = root;
        if let Some(subtree) = old {
            btree::del(&mut self.tm, subtree.as_u64(), MAPPING_TREE)?;
        }
        self.sb.device_details_root = btree::remove(
            &mut self.tm,
            self.sb.device_details_root,
            id.get(),
            DETAILS_TREE,
        )?
        .0;
        self.remember(id);
        self.details.remove(&id);
        self.dirty_details.remove(&id);
        self.changed = true;
        Ok(())
    }

    pub fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()> {
        if self.sb.transaction_id != old {
            return Err(Error::TransactionIdMismatch {
                expected: old,
                actual: self.sb.transaction_id,
            });
        }
        self.sb.transaction_id = new;
        self.changed = true;
        Ok(())
    }

    /// Takes the metadata snapshot: commits, then keeps a copy of the superblock whose trees
    /// stay readable (held) until released.
    pub fn reserve_metadata_snap(&mut self) -> Result<()> {
        if self.sb.held_root != 0 {
            return Err(Error::MetadataSnapExists);
        }
        self.commit()?;
        let copy_at = self.tm.new_block(BlockKind::Superblock)?;
        let mut copy = self.sb.clone();
        copy.data_sm_root = SmRoot::default();
        copy.metadata_sm_root = SmRoot::default();
        copy.held_root = 0;
        self.tm
            .put_block(copy_at, copy.encode(), BlockKind::Superblock);
        self.tm.inc(self.sb.data_mapping_root)?;
        self.tm.inc(self.sb.device_details_root)?;
        self.sb.held_root = copy_at;
        self.changed = true;
        self.commit()
    }

    /// Releases the metadata snapshot and everything only it kept alive.
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        let held = self.sb.held_root;
        if held == 0 {
            return Err(Error::NoMetadataSnap);
        }
        let b = self.tm.read_raw(held, BlockKind::Superblock)?;
        let copy = Superblock::read(&b, held)?;
        btree::del(&mut self.tm, copy.data_mapping_root, TOP_TREE)?;
        btree::del(&mut self.tm, copy.device_details_root, DETAILS_TREE)?;
        self.tm.dec(held)?;
        self.sb.held_root = 0;
        self.changed = true;
        self.commit()
    }

    // ---- mappings ------------------------------------------------------------------------

    /// The mapping of virtual block `v` of device `id`.
    pub fn lookup(&mut self, id: ThinId, v: u64) -> Result<Option<BlockTime>> {
        let root = self.device_root(id)?;
        let found = btree::lookup(&mut self.tm, root, v, MAPPING_TREE)?;
        found
            .map(|x| self.checked_mapping(root, x.as_u64()))
            .transpose()
    }

    /// Decodes a mapping, refusing one that names a block past the data device: the data
    /// path would read or write someone else's bytes (or nothing at all) there.
    fn checked_mapping(&self, root: u64, value: u64) -> Result<BlockTime> {
        let bt = BlockTime::decode(value);
        if bt.block >= self.nr_data_blocks() {
            return Err(Error::corrupt(root, Damage::DataBlockPastEnd(bt.block)));
        }
        Ok(bt)
    }

    /// Mappings of device `id` in `[begin, end)`, at most `limit`.
    pub fn lookup_range(
        &mut self,
        id: ThinId,
        begin: u64,
        end: u64,
        limit: usize,
    ) -> Result<Vec<(u64, BlockTime)>> {
        let root = self.device_root(id)?;
        btree::range_u64(&mut self.tm, root, begin, end, limit, MAPPING_TREE)?
            .into_iter()
            .map(|(k, v)| Ok((k, self.checked_mapping(root, v)?)))
            .collect::<Result<Vec<_>>>()
    }

    /// Rewrites the top-level entry of `id` after its mapping tree's root moved. The top-level
    /// path is shadowed first, so a shared top-level leaf takes its references before the
    /// subtree is changed (the kernel's order).
    fn with_device_tree<T>(
        &mut self,
        id: ThinId,
        f: impl FnOnce(&mut TransactionManager, u64) -> Result<(u64, T)>,
    ) -> Result<T> {
        let (top, leaf) =
            btree::shadow_path(&mut self.tm, self.sb.data_mapping_root, id.get(), TOP_TREE)?;
        self.sb.data_mapping_root = top;
        let (leaf, i) = leaf.ok_or_else(|| {
            Error::corrupt(
                top,
                Damage::Other(format!("device {id} has no mapping tree")),
            )
        })?;
        let root = Node::new(&*self.tm.read_node(leaf)?).value_u64(i);
        let (new_root, out) = f(&mut self.tm, root)?;
        if new_root != root {
            btree::node::NodeMut::new(self.tm.write(leaf)?).set_value_u64(i, new_root);
            self.roots.insert(id, new_root);
        }
        Ok(out)
    }

    /// Maps `v` of `id` to `bt` (a data block the caller allocated and filled). A replaced
    /// mapping loses its reference to its data block.
    pub fn insert(&mut self, id: ThinId, v: u64, bt: BlockTime) -> Result<()> {
        if !self.exists(id) {
            return Err(Error::NoSuchThin(id));
        }
        let value = bt.encode().to_le_bytes();
        let old = self.with_device_tree(id, |tm, root| {
            btree::insert(tm, root, v, &value, MAPPING_TREE)
        })?;
        match old {
            None => {
                self.remember(id);
                // Saturating, as `remove` is: the count is a statistic read from disk, and a
                // damaged one must not stop writes.
                let details = self.details.get_mut(&id).expect("exists");
                details.mapped_blocks = details.mapped_blocks.saturating_add(1);
            }
            Some(old) => {
                let old = BlockTime::decode(old.as_u64());
                if old.block != bt.block {
                    self.tm.data_dec(old.block)?;
                }
            }
        }
        self.dirty_details.insert(id);
        self.changed = true;
        Ok(())
    }

    /// Unmaps `v` of `id`. Returns the data block it used and whether that became free.
    pub fn remove(&mut self, id: ThinId, v: u64) -> Result<Option<(u64, bool)>> {
        if !self.exists(id) {
            return Err(Error::NoSuchThin(id));
        }
        let old = self.with_device_tree(id, |tm, root| btree::remove(tm, root, v, MAPPING_TREE))?;
        let Some(old) = old else { return Ok(None) };
        let old = BlockTime::decode(old.as_u64());
        let count = self.tm.data_dec(old.block)?;
        self.remember(id);
        let d = self.details.get_mut(&id).expect("exists");
        d.mapped_blocks = d.mapped_blocks.saturating_sub(1);
        self.dirty_details.insert(id);
        self.changed = true;
        Ok(Some((old.block, count == 0)))
    }

    /// Allocates a free data block (count 1), or `None` when the data device is full.
    pub fn alloc_data_block(&mut self) -> Option<u64> {
        let b = self.tm.data_sm.alloc()?;
        self.changed = true;
        Some(b)
    }

    /// Gives back a data block allocated but never mapped.
    pub fn free_data_block(&mut self, b: u64) -> Result<()> {
        self.tm.data_dec(b).map(|_| ())
    }

    /// Data blocks freed by committed transactions since the last call.
    pub fn take_freed_data_blocks(&mut self) -> Vec<u64> {
        if self.changed {
            // Blocks freed in the running transaction are not free on disk yet.
            return Vec::new();
        }
        self.tm.take_freed_data()
    }

    pub fn data_block_count(&self, b: u64) -> u32 {
        self.tm.data_sm.count(b).unwrap_or(0)
    }

    pub fn time(&self) -> u32 {
        self.sb.time
    }

    /// For `tools::restore`, which rebuilds a pool from a dump: sets the pool time.
    pub(crate) fn restore_time(&mut self, time: u32) -> Result<()> {
        if time > MAX_TIME {
            return Err(Error::InvalidArgument(format!(
                "time {time} beyond 24 bits"
            )));
        }
        self.sb.time = time;
        self.changed = true;
        Ok(())
    }

    /// For `tools::restore`: sets a device's transaction id and times as given
    /// (`mapped_blocks` stays what the device's mappings made it).
    pub(crate) fn restore_details(&mut self, id: ThinId, d: DeviceDetails) -> Result<()> {
        self.remember(id);
        let cur = self.details.get_mut(&id).ok_or(Error::NoSuchThin(id))?;
        *cur = DeviceDetails {
            mapped_blocks: cur.mapped_blocks,
            ..d
        };
        self.dirty_details.insert(id);
        self.changed = true;
        Ok(())
    }

    /// For `tools::restore`: adds one reference to data block `b`, for a mapping about to be
    /// inserted (as `alloc_data_block` does for a new block).
    pub(crate) fn reference_data_block(&mut self, b: u64) -> Result<()> {
        self.tm.data_inc(b)?;
        self.changed = true;
        Ok(())
    }

    pub fn set_needs_check(&mut self) {
        self.sb.flags |= superblock::FLAG_NEEDS_CHECK;
        self.changed = true;
    }

    // ---- sizes ---------------------------------------------------------------------------

    pub fn nr_data_blocks(&self) -> u64 {
        self.tm.data_sm.nr_blocks()
    }

    /// One past the `n`-th lowest free data block (see `SpaceMap::end_of_lowest_free`).
    pub fn end_of_lowest_free_data(&self, n: u64) -> u64 {
        self.tm.data_sm.end_of_lowest_free(n)
    }

    /// The lowest free data block at or past `start`.
    pub fn next_free_data_block(&self, start: u64) -> Option<u64> {
        self.tm.data_sm.next_free(start)
    }

    pub fn free_data_blocks(&self) -> u64 {
        self.tm.data_sm.nr_free()
    }

    pub fn nr_metadata_blocks(&self) -> u64 {
        self.tm.meta_sm.nr_blocks()
    }

    pub fn free_metadata_blocks(&self) -> u64 {
        self.tm.meta_sm.nr_free()
    }

    /// Grows the data space map to `nr_blocks`.
    pub fn resize_data(&mut self, nr_blocks: u64) -> Result<()> {
        let current = self.nr_data_blocks();
        if nr_blocks < current {
            return Err(Error::InvalidArgument(format!(
                "the data device cannot shrink ({current} blocks to {nr_blocks})"
            )));
        }
        if nr_blocks > crate::units::MAX_DATA_BLOCKS {
            return Err(Error::InvalidArgument("more than 2^40 data blocks".into()));
        }
        if nr_blocks > current {
            self.tm.data_sm.extend(nr_blocks);
            self.changed = true;
        }
        Ok(())
    }

    /// Grows the metadata space map to cover a device now `dev_bytes` long.
    pub fn resize_metadata(&mut self, dev_bytes: u64) -> Result<()> {
        let nr_blocks = metadata_blocks_for(dev_bytes);
        let current = self.nr_metadata_blocks();
        if nr_blocks < current {
            return Err(Error::InvalidArgument(format!(
                "the metadata device cannot shrink ({current} blocks to {nr_blocks})"
            )));
        }
        if nr_blocks > current {
            self.tm.meta_sm.extend(nr_blocks);
            self.sb.metadata_nr_blocks = nr_blocks;
            self.changed = true;
        }
        Ok(())
    }

    // ---- transactions --------------------------------------------------------------------

    /// Makes every change since the last commit durable (the superblock is written last).
    pub fn commit(&mut self) -> Result<()> {
        self.commit_with(|| Ok(()))
    }

    /// [`Self::commit`], running `before_flush` after the metadata blocks are written and
    /// before they are flushed and the superblock is written (see
    /// [`TransactionManager::commit_with`]); it runs even when nothing changed.
    pub fn commit_with(&mut self, before_flush: impl FnOnce() -> Result<()>) -> Result<()> {
        if !self.changed && self.tm.nr_dirty() == 0 {
            return before_flush();
        }
        for id in std::mem::take(&mut self.dirty_details) {
            let d = self.details[&id].encode();
            self.sb.device_details_root = btree::insert(
                &mut self.tm,
                self.sb.device_details_root,
                id.get(),
                &d,
                DETAILS_TREE,
            )?
            .0;
        }
        self.sb.data_sm_root = disk::persist_data(&mut self.tm, &mut self.data_loc)?;
        self.sb.metadata_sm_root = disk::persist_metadata(&mut self.tm, &mut self.meta_loc)?;
        self.sb.metadata_nr_blocks = self.sb.metadata_sm_root.nr_blocks;
        let mut sb_block: Box<Block> = self.sb.encode();
        self.tm.commit_with(&mut sb_block, before_flush)?;
        tracing::debug!(
            transaction_id = self.sb.transaction_id,
            metadata_used = self.tm.meta_sm.nr_allocated(),
            data_used = self.tm.data_sm.nr_allocated(),
            "commit"
        );
        self.committed = Committed {
            sb: self.sb.clone(),
            meta_loc: self.meta_loc.clone(),
            data_loc: self.data_loc.clone(),
        };
        self.details_undo.clear();
        self.changed = false;
        Ok(())
    }

    /// Throws away every change since the last commit.
    pub fn abort(&mut self) {
        self.tm.rollback();
        self.sb = self.committed.sb.clone();
        self.meta_loc = self.committed.meta_loc.clone();
        self.data_loc = self.committed.data_loc.clone();
        for (id, old) in std::mem::take(&mut self.details_undo) {
            match old {
                Some(d) => self.details.insert(id, d),
                None => self.details.remove(&id),
            };
        }
        self.dirty_details.clear();
        self.roots.clear();
        self.changed = false;
    }

    /// Sets NEEDS_CHECK in the committed superblock, touching nothing else on disk. The flag
    /// is set in memory first, so the pool reports it even when the write fails (as the
    /// kernel's `dm_pool_metadata_set_needs_check` does).
    pub fn persist_needs_check(&mut self) -> Result<()> {
        self.committed.sb.flags |= superblock::FLAG_NEEDS_CHECK;
        self.sb.flags |= superblock::FLAG_NEEDS_CHECK;
        let mut b = self.committed.sb.encode();
        self.tm.write_superblock_only(&mut b)
    }
}

#[cfg(test)]
mod tests;
