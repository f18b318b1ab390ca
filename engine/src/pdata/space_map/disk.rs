//! The on-disk side of the space maps: reading them at open, writing them at commit.
//!
//! Layout (see `docs/format.md`): each space map has a 32-byte root in the superblock
//! (`nr_blocks`, `nr_allocated`, `bitmap_root`, `ref_count_root`), bitmap blocks of 2-bit
//! counts, index entries `(blocknr, nr_free, none_free_before)` for the bitmaps, and an
//! overflow b-tree of counts of 3 and more. The metadata space map indexes its bitmaps with a
//! single index block; the data space map with a b-tree keyed by bitmap number.
//!
//! Writing follows the shadowing rule: a bitmap or index committed in an earlier transaction is
//! never overwritten; a changed one moves to a new block. Moving the metadata space map's own
//! blocks changes metadata counts, which may change more bitmaps: `persist_metadata` repeats
//! until every changed bitmap has moved (each moves at most once, so it ends).

use std::collections::BTreeMap;

use super::{nr_bitmaps, Bitmap, SpaceMap, ENTRIES_PER_BITMAP, WORDS_PER_BITMAP};
use crate::block::{self, read_u32, read_u64, write_u32, write_u64, Block, BlockKind};
use crate::error::{Damage, Error, Result};
use crate::pdata::btree::{self, TreeType};
use crate::tm::{TransactionManager, ValueRefs};

/// Entries in the metadata space map's index block.
pub const MAX_METADATA_BITMAPS: usize = 255;
/// The most metadata blocks a pool can use: 255 bitmaps' worth.
pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP;

pub const REF_COUNT_TREE: TreeType = TreeType {
    value_size: 4,
    refs: ValueRefs::None,
};
pub const INDEX_TREE: TreeType = TreeType {
    value_size: 16,
    refs: ValueRefs::None,
};

/// The 32 bytes of a space map root kept in the superblock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmRoot {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    /// Metadata: the index block; data: the index tree's root.
    pub bitmap_root: u64,
    pub ref_count_root: u64,
}

impl SmRoot {
    pub fn decode(bytes: &[u8]) -> SmRoot {
        SmRoot {
            nr_blocks: read_u64(bytes, 0),
            nr_allocated: read_u64(bytes, 8),
            bitmap_root: read_u64(bytes, 16),
            ref_count_root: read_u64(bytes, 24),
        }
    }

    pub fn encode(&self, bytes: &mut [u8]) {
        write_u64(bytes, 0, self.nr_blocks);
        write_u64(bytes, 8, self.nr_allocated);
        write_u64(bytes, 16, self.bitmap_root);
        write_u64(bytes, 24, self.ref_count_root);
    }
}

/// One index entry: where a bitmap lives and hints for the allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexEntry {
    pub blocknr: u64,
    pub nr_free: u32,
    pub none_free_before: u32,
}

impl IndexEntry {
    pub fn decode(bytes: &[u8]) -> IndexEntry {
        IndexEntry {
            blocknr: read_u64(bytes, 0),
            nr_free: read_u32(bytes, 8),
            none_free_before: read_u32(bytes, 12),
        }
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0; 16];
        write_u64(&mut b, 0, self.blocknr);
        write_u32(&mut b, 8, self.nr_free);
        write_u32(&mut b, 12, self.none_free_before);
        b
    }

    /// The kernel's convention: `nr_free` counts all 16320 slots, even past the end.
    fn for_bitmap(blocknr: u64, bm: &Bitmap) -> IndexEntry {
        IndexEntry {
            blocknr,
            nr_free: ENTRIES_PER_BITMAP as u32 - bm.used(),
            none_free_before: bm.first_free(),
        }
    }
}

/// Where a space map's structures live on disk now.
#[derive(Clone, Debug, Default)]
pub struct SmLocations {
    pub bitmaps: Vec<u64>,
    pub bitmap_root: u64,
    pub ref_count_root: u64,
}

pub fn decode_bitmap(b: &Block) -> Bitmap {
    let mut words = Box::new([0u64; WORDS_PER_BITMAP]);
    for (i, w) in words.iter_mut().enumerate() {
        *w = read_u64(b, 16 + 8 * i);
    }
    Bitmap::from_words(words)
}

fn encode_bitmap(bm: &Bitmap) -> Box<Block> {
    let mut b = block::zeroed();
    for (i, w) in bm.words.iter().enumerate() {
        write_u64(&mut b[..], 16 + 8 * i, *w);
    }
    b
}

fn load_overflow(tm: &mut TransactionManager, root: u64) -> Result<BTreeMap<u64, u32>> {
    let mut overflow = BTreeMap::new();
    btree::for_each(tm, root, REF_COUNT_TREE, &mut |k, v| {
        overflow.insert(k, read_u32(v, 0));
        Ok(())
    })?;
    Ok(overflow)
}

fn load_bitmaps(tm: &TransactionManager, entries: &[IndexEntry]) -> Result<Vec<Bitmap>> {
    entries
        .iter()
        .map(|e| {
            if e.blocknr == 0 {
                return Err(Error::corrupt(0, Damage::PointerToSuperblock));
            }
            tm.read_raw(e.blocknr, BlockKind::Bitmap)
                .map(|b| decode_bitmap(&b))
        })
        .collect()
}

fn check_overflow(sm_name: &str, bitmaps: &[Bitmap], overflow: &BTreeMap<u64, u32>) -> Result<()> {
    for (&b, &count) in overflow {
        let bm = bitmaps.get((b / ENTRIES_PER_BITMAP) as usize);
        let v = bm.map(|bm| bm.get((b % ENTRIES_PER_BITMAP) as usize));
        if v != Some(3) || count < 3 {
            return Err(Error::corrupt(
                0,
                Damage::SpaceMap(format!(
                    "{sm_name} overflow entry for block {b} (count {count}) does not match its bitmap"
                )),
            ));
        }
    }
    Ok(())
}

/// Reads the metadata space map. `tm` must already bound reads by `root.nr_blocks`.
pub fn load_metadata(
    tm: &mut TransactionManager,
    root: &SmRoot,
) -> Result<(SpaceMap, SmLocations)> {
    let n = nr_bitmaps(root.nr_blocks);
    if n > MAX_METADATA_BITMAPS {
        return Err(Error::corrupt(
            0,
            Damage::BadSuperblock(format!(
                "metadata space map of {} blocks needs more than 255 bitmaps",
                root.nr_blocks
            )),
        ));
    }
    let index = tm.read_raw(root.bitmap_root, BlockKind::Index)?;
    let entries: Vec<IndexEntry> = (0..n)
        .map(|i| IndexEntry::decode(&index[16 + 16 * i..]))
        .collect();
    load_counts(tm, "metadata", root, &entries)
}

/// Reads the data space map.
pub fn load_data(tm: &mut TransactionManager, root: &SmRoot) -> Result<(SpaceMap, SmLocations)> {
    // Every data bitmap is a metadata block, and data block numbers have 40 bits: a root
    // claiming more is damaged (and must not make us allocate for it).
    let n = nr_bitmaps(root.nr_blocks);
    if root.nr_blocks > crate::units::MAX_DATA_BLOCKS || n as u64 > tm.meta_sm.nr_blocks() {
        return Err(Error::corrupt(
            0,
            Damage::SpaceMap(format!("data space map claims {} blocks", root.nr_blocks)),
        ));
    }
    let mut entries = Vec::with_capacity(n);
    btree::for_each(tm, root.bitmap_root, INDEX_TREE, &mut |k, v| {
        if k != entries.len() as u64 {
            return Err(Error::corrupt(
                root.bitmap_root,
                Damage::SpaceMap(format!(
                    "data space map index has bitmap {k} out of sequence"
                )),
            ));
        }
        entries.push(IndexEntry::decode(v));
        Ok(())
    })?;
    if entries.len() != n {
        return Err(Error::corrupt(
            root.bitmap_root,
            Damage::SpaceMap(format!(
                "data space map of {} blocks needs {n} bitmaps, its index has {}",
                root.nr_blocks,
                entries.len()
            )),
        ));
    }
    load_counts(tm, "data", root, &entries)
}

/// Reads the bitmaps an index names and the overflow tree, and checks they agree.
fn load_counts(
    tm: &mut TransactionManager,
    sm_name: &str,
    root: &SmRoot,
    entries: &[IndexEntry],
) -> Result<(SpaceMap, SmLocations)> {
    let bitmaps = load_bitmaps(tm, entries)?;
    let overflow = load_overflow(tm, root.ref_count_root)?;
    check_overflow(sm_name, &bitmaps, &overflow)?;
    let locations = SmLocations {
        bitmaps: entries.iter().map(|e| e.blocknr).collect(),
        bitmap_root: root.bitmap_root,
        ref_count_root: root.ref_count_root,
    };
    Ok((
        SpaceMap::from_parts(root.nr_blocks, bitmaps, overflow),
        locations,
    ))
}

/// Brings an overflow tree in line with the in-memory overflow map.
fn persist_overflow(
    tm: &mut TransactionManager,
    mut root: u64,
    current: &BTreeMap<u64, u32>,
    committed: &BTreeMap<u64, u32>,
) -> Result<u64> {
    for (&b, &count) in current {
        if committed.get(&b) != Some(&count) {
            root = btree::insert(tm, root, b, &count.to_le_bytes(), REF_COUNT_TREE)?.0;
        }
    }
    for &b in committed.keys() {
        if !current.contains_key(&b) {
            root = btree::remove(tm, root, b, REF_COUNT_TREE)?.0;
        }
    }
    Ok(root)
}

/// Writes the data space map's changes; returns its new root.
pub fn persist_data(tm: &mut TransactionManager, loc: &mut SmLocations) -> Result<SmRoot> {
    let current = tm.data_sm.overflow().clone();
    let committed = tm.data_sm.committed_overflow().clone();
    loc.ref_count_root = persist_overflow(tm, loc.ref_count_root, &current, &committed)?;
    for i in 0..tm.data_sm.nr_bitmaps() {
        if i < loc.bitmaps.len() && !tm.data_sm.bitmap_dirty(i) {
            continue;
        }
        let new = tm.new_block(BlockKind::Bitmap)?;
        if let Some(&old) = loc.bitmaps.get(i) {
            tm.dec(old)?;
            loc.bitmaps[i] = new;
        } else {
            loc.bitmaps.push(new);
        }
        let bm = tm.data_sm.bitmap(i);
        let entry = IndexEntry::for_bitmap(new, bm);
        let data = encode_bitmap(bm);
        tm.put_block(new, data, BlockKind::Bitmap);
        loc.bitmap_root =
            btree::insert(tm, loc.bitmap_root, i as u64, &entry.encode(), INDEX_TREE)?.0;
    }
    Ok(SmRoot {
        nr_blocks: tm.data_sm.nr_blocks(),
        nr_allocated: tm.data_sm.nr_allocated(),
        bitmap_root: loc.bitmap_root,
        ref_count_root: loc.ref_count_root,
    })
}

/// Writes the metadata space map's changes; call last in a commit, after every other change
/// to metadata. Returns its new root.
pub fn persist_metadata(tm: &mut TransactionManager, loc: &mut SmLocations) -> Result<SmRoot> {
    let current = tm.meta_sm.overflow().clone();
    let committed = tm.meta_sm.committed_overflow().clone();
    loc.ref_count_root = persist_overflow(tm, loc.ref_count_root, &current, &committed)?;
    // Moving our own blocks below only changes counts between 0 and 1, so the overflow tree
    // written above stays right.
    let new_index = tm.new_block(BlockKind::Index)?;
    if loc.bitmap_root != 0 {
        tm.dec(loc.bitmap_root)?;
    }
    loc.bitmap_root = new_index;
    let mut moved = vec![false; tm.meta_sm.nr_bitmaps()];
    loop {
        let mut changed = false;
        for (i, moved) in moved.iter_mut().enumerate() {
            let is_new = i >= loc.bitmaps.len();
            if *moved || !(is_new || tm.meta_sm.bitmap_dirty(i)) {
                continue;
            }
            let new = tm.new_block(BlockKind::Bitmap)?;
            if is_new {
                loc.bitmaps.push(new);
            } else {
                tm.dec(loc.bitmaps[i])?;
                loc.bitmaps[i] = new;
            }
            *moved = true;
            changed = true;
        }
        if !changed {
            break;
        }
    }
    // Every count is final now: fill in the moved bitmaps and the index.
    let mut index = block::zeroed();
    for i in 0..tm.meta_sm.nr_bitmaps() {
        let bm = tm.meta_sm.bitmap(i);
        let entry = IndexEntry::for_bitmap(loc.bitmaps[i], bm);
        index[16 + 16 * i..32 + 16 * i].copy_from_slice(&entry.encode());
        if moved[i] {
            let data = encode_bitmap(bm);
            tm.put_block(loc.bitmaps[i], data, BlockKind::Bitmap);
        }
    }
    tm.put_block(new_index, index, BlockKind::Index);
    Ok(SmRoot {
        nr_blocks: tm.meta_sm.nr_blocks(),
        nr_allocated: tm.meta_sm.nr_allocated(),
        bitmap_root: loc.bitmap_root,
        ref_count_root: loc.ref_count_root,
    })
}
