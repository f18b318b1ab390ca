//! `ls`: what each thin device maps, and how much of it no other device shares, as
//! `thin_ls` 0.9.0 counts it.
//!
//! A data block is *exclusive* to a device when exactly one mapping among all the devices of
//! the chosen superblock names it; a device's exclusive count is how many of its mappings name
//! such blocks, and its shared count is its details' `mapped_blocks` minus that (so a device
//! mapping one block twice would count it as shared, as `thin_ls` does). Devices are walked
//! one by one; a subtree two snapshots share counts once for each of them.

use std::collections::HashMap;

use crate::block::read_u64;
use crate::error::Error;
use crate::io::BlockDevice;
use crate::thin::metadata::{BlockTime, DeviceDetails, Superblock};

use super::walk::{missing_mapping, MetadataRoot, Reader, TreeKind};

/// One device as [`ls`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThinUsage {
    /// The device's id.
    pub thin_id: u64,
    /// Its details-tree record (`mapped_blocks`, `transaction_id`, times).
    pub details: DeviceDetails,
    /// Mappings naming a data block no other mapping names.
    pub exclusive_blocks: u64,
    /// The highest mapped virtual block, `None` when nothing is mapped.
    pub highest_mapped: Option<u64>,
}

impl ThinUsage {
    /// `mapped_blocks - exclusive_blocks` (never below zero, even for damaged details).
    pub fn shared_blocks(&self) -> u64 {
        self.details
            .mapped_blocks
            .saturating_sub(self.exclusive_blocks)
    }
}

/// What [`ls`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    /// The superblock whose trees were read (the held copy for a metadata snapshot).
    pub superblock: Superblock,
    /// Every device of that superblock, in id order.
    pub thins: Vec<ThinUsage>,
}

/// Lists the devices of the trees under `root` with their exclusive and shared counts.
///
/// * `Err(NoMetadataSnap)`: a held snapshot was asked for and none is held;
/// * `Err(Corrupt | Io)`: the trees cannot be read (a device listed in the details tree but
///   missing from the mapping tree is damage too). Never a panic on damaged input.
pub fn ls(dev: &dyn BlockDevice, root: MetadataRoot) -> Result<Listing, Error> {
    let mut reader = Reader::new(dev);
    let (sb, sb_loc) = reader.chosen_superblock(root)?;
    let details = reader.details(sb_loc, &sb)?;
    let roots = reader.mapping_roots(sb_loc, &sb)?;

    let mut trees = Vec::with_capacity(details.len());
    for (dev_id, d) in &details {
        let &(leaf, root) = roots
            .get(dev_id)
            .ok_or_else(|| missing_mapping(&sb, *dev_id))?;
        trees.push((*dev_id, *d, leaf, root));
    }

    // Pass 1: how many mappings name each data block (saturating at "more than one").
    let mut counts = BlockCounts::default();
    let mut highest = Vec::with_capacity(trees.len());
    for &(_, _, leaf, root) in &trees {
        let mut top = None;
        reader.walk(leaf, root, TreeKind::Mapping, None, &mut |_, vblock, v| {
            counts.inc(BlockTime::decode(read_u64(v, 0)).block);
            top = Some(vblock);
            Ok::<(), Error>(())
        })?;
        highest.push(top);
    }

    // Pass 2: each device's mappings of blocks named once.
    let mut thins = Vec::with_capacity(trees.len());
    for (&(thin_id, details, leaf, root), highest_mapped) in trees.iter().zip(highest) {
        let mut exclusive_blocks = 0;
        reader.walk(leaf, root, TreeKind::Mapping, None, &mut |_, _, v| {
            if counts.is_once(BlockTime::decode(read_u64(v, 0)).block) {
                exclusive_blocks += 1;
            }
            Ok::<(), Error>(())
        })?;
        thins.push(ThinUsage {
            thin_id,
            details,
            exclusive_blocks,
            highest_mapped,
        });
    }
    Ok(Listing {
        superblock: sb,
        thins,
    })
}

/// Blocks per chunk of [`BlockCounts`]: 2 bits each in 4 KiB.
const CHUNK_BLOCKS: u64 = 4096 * 4;

/// "Named once" / "named more than once" per data block, 2 bits a block in chunks allocated
/// as mappings reach them: memory follows the mappings read, never a size read from disk.
#[derive(Default)]
struct BlockCounts {
    chunks: HashMap<u64, Box<[u8; 4096]>>,
}

impl BlockCounts {
    fn slot(block: u64) -> (u64, usize, u32) {
        let within = block % CHUNK_BLOCKS;
        (
            block / CHUNK_BLOCKS,
            (within / 4) as usize,
            (within % 4) as u32 * 2,
        )
    }

    fn get(&self, block: u64) -> u8 {
        let (chunk, byte, shift) = Self::slot(block);
        self.chunks
            .get(&chunk)
            .map_or(0, |c| (c[byte] >> shift) & 3)
    }

    fn inc(&mut self, block: u64) {
        let (chunk, byte, shift) = Self::slot(block);
        let c = self
            .chunks
            .entry(chunk)
            .or_insert_with(|| Box::new([0; 4096]));
        let n = (c[byte] >> shift) & 3;
        if n < 2 {
            c[byte] = (c[byte] & !(3 << shift)) | ((n + 1) << shift);
        }
    }

    fn is_once(&self, block: u64) -> bool {
        self.get(block) == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_counts_saturate_at_two_and_keep_neighbours_apart() {
        let mut c = BlockCounts::default();
        for b in [
            0,
            1,
            1,
            5,
            5,
            5,
            CHUNK_BLOCKS - 1,
            CHUNK_BLOCKS,
            u64::MAX >> 24,
        ] {
            c.inc(b);
        }
        assert!(c.is_once(0));
        assert!(!c.is_once(1) && c.get(1) == 2);
        assert_eq!(c.get(5), 2);
        assert_eq!(c.get(2), 0);
        assert!(c.is_once(CHUNK_BLOCKS - 1) && c.is_once(CHUNK_BLOCKS));
        assert!(c.is_once(u64::MAX >> 24));
        assert_eq!(c.chunks.len(), 3);
    }
}
