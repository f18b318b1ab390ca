//! A cleanly unmounted ext4 file system's journal log, given back to the pool.
//!
//! Once ext4 is unmounted cleanly its journal is empty: the journal superblock says so
//! (`s_start == 0`) and the next mount starts a new log over whatever the log blocks hold,
//! never reading them first. In a thin those blocks are still mapped, though, so a frozen
//! image layer keeps its whole journal (up to 1 GiB, 64 MiB on a 10 GiB file system), and
//! every snapshot of it (a container, the next layer) copies each 64 KiB journal chunk it
//! logs into: a read of the old chunk for bytes nobody will read. Discarding the log's whole
//! pool blocks makes them read as zeros, which jbd2 takes for the end of the log as it does
//! any block without its magic, and turns those copies into plain provisioning.
//!
//! Only what is certain is discarded: an internal journal mapped by extents, in a file
//! system that needs no recovery, whose journal superblock says the log is empty; the pool
//! block holding the journal superblock is kept, and so is any block the log shares with
//! something else. Everything is read through [`PoolControl`]; the caller makes sure the
//! file system is not mounted.
//!
//! The journal superblock's block is the one a snapshot's first journal commit writes
//! before anything else; [`own_ext4_journal_superblock`] copies it into a new snapshot
//! ahead of time, so that commit does not wait for the copy.

use std::ops::Range;

use crate::activate::PoolControl;
use crate::error::Error;
use crate::units::{ThinId, SECTOR_SIZE};

const EXT4_SUPERBLOCK_OFFSET: u64 = 1024;
const EXT4_MAGIC: u16 = 0xef53;
const COMPAT_HAS_JOURNAL: u32 = 0x4;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_64BIT: u32 = 0x80;
const INODE_FLAG_EXTENTS: u32 = 0x0008_0000;
const EXTENT_MAGIC: u16 = 0xf30a;
/// ext4's own limit on an extent tree's depth.
const MAX_EXTENT_DEPTH: u16 = 5;
/// Extent-tree blocks read at most: a 1 GiB journal in extents of one block would need
/// about 800.
const MAX_EXTENT_NODES: usize = 4096;
const JBD2_MAGIC: u32 = 0xc03b_3998;
const JBD2_SUPERBLOCK_V1: u32 = 3;
const JBD2_SUPERBLOCK_V2: u32 = 4;

/// Reads the device: `read(offset, buf)` fills `buf` from byte `offset`.
pub type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), Error> + 'a;

/// What [`trim_ext4_journal`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JournalTrim {
    /// The log's whole pool blocks were discarded.
    Trimmed {
        /// Bytes of the journal's log (the journal less its superblock).
        log_bytes: u64,
        /// Bytes discarded: the log's pool blocks that hold nothing else.
        discarded: u64,
    },
    /// Nothing was touched.
    Skipped(SkipReason),
}

/// Why a journal was left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// No ext4 superblock (another file system, or none).
    NotExt4,
    /// No journal, or one on another device.
    NoInternalJournal,
    /// The file system was not unmounted cleanly: the log may hold what recovery needs.
    NeedsRecovery,
    /// The journal inode maps its blocks the ext3 way, not by extents.
    NotExtentMapped,
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SkipReason::NotExt4 => "not an ext4 file system",
            SkipReason::NoInternalJournal => "no internal journal",
            SkipReason::NeedsRecovery => "the journal needs recovery",
            SkipReason::NotExtentMapped => "the journal is not mapped by extents",
        })
    }
}

/// Why a journal could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file system's structures do not add up; nothing was discarded.
    #[error("unexpected ext4 journal layout: {0}")]
    Malformed(String),
    /// The pool refused or failed.
    #[error(transparent)]
    Pool(#[from] Error),
}

/// Where a clean ext4 file system's journal log lies, in bytes of the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalLog {
    /// The journal superblock's bytes (kept).
    pub superblock: Range<u64>,
    /// The log's bytes, in journal order (an extent each).
    pub log: Vec<Range<u64>>,
}

/// Finds the journal log of the ext4 file system on a device of `device_len` bytes, read
/// with `read(offset, buf)`. `Ok(Err(reason))`: there is no log that may be discarded.
pub fn ext4_journal_log(
    device_len: u64,
    read: &mut ReadAt<'_>,
) -> Result<Result<JournalLog, SkipReason>, JournalError> {
    let mut sb = [0u8; 1024];
    if device_len < EXT4_SUPERBLOCK_OFFSET + 1024 {
        return Ok(Err(SkipReason::NotExt4));
    }
    read(EXT4_SUPERBLOCK_OFFSET, &mut sb)?;
    if le16(&sb, 0x38) != EXT4_MAGIC {
        return Ok(Err(SkipReason::NotExt4));
    }
    let (compat, incompat) = (le32(&sb, 0x5c), le32(&sb, 0x60));
    let journal_inode = le32(&sb, 0xe0);
    if compat & COMPAT_HAS_JOURNAL == 0
        || incompat & INCOMPAT_JOURNAL_DEV != 0
        || journal_inode == 0
        || le32(&sb, 0xe4) != 0
    {
        return Ok(Err(SkipReason::NoInternalJournal));
    }
    if incompat & INCOMPAT_RECOVER != 0 {
        return Ok(Err(SkipReason::NeedsRecovery));
    }
    let log_block_size = le32(&sb, 0x18);
    if log_block_size > 6 {
        return Err(malformed(format!("block size 1024 << {log_block_size}")));
    }
    let bs = 1024u64 << log_block_size;
    let blocks_in_device = device_len / bs;
    let inodes_per_group = le32(&sb, 0x28);
    let inode_size = match le32(&sb, 0x4c) {
        0 => 128,
        _ => u64::from(le16(&sb, 0x58)),
    };
    if inodes_per_group == 0 || !(128..=bs).contains(&inode_size) {
        return Err(malformed(format!(
            "{inodes_per_group} inodes per group of {inode_size} bytes"
        )));
    }
    let desc_size = match incompat & INCOMPAT_64BIT {
        0 => 32,
        _ => u64::from(le16(&sb, 0xfe)).max(32),
    };
    // The journal inode's group descriptor, then the inode.
    let group = u64::from((journal_inode - 1) / inodes_per_group);
    let index = u64::from((journal_inode - 1) % inodes_per_group);
    let gdt_block = u64::from(le32(&sb, 0x14)) + 1;
    let desc_at = gdt_block * bs + group * desc_size;
    let mut desc = vec![0u8; desc_size as usize];
    read_within(read, device_len, desc_at, &mut desc)?;
    let mut table = u64::from(le32(&desc, 0x8));
    if desc_size >= 64 {
        table |= u64::from(le32(&desc, 0x28)) << 32;
    }
    let mut inode = vec![0u8; inode_size as usize];
    read_within(
        read,
        device_len,
        byte_of(table, bs)?.saturating_add(index * inode_size),
        &mut inode,
    )?;
    if le32(&inode, 0x20) & INODE_FLAG_EXTENTS == 0 {
        return Ok(Err(SkipReason::NotExtentMapped));
    }
    let mut extents = Vec::new();
    let mut budget = MAX_EXTENT_NODES;
    walk_extents(
        &mut ExtentWalk {
            read,
            device_len,
            bs,
            budget: &mut budget,
        },
        &inode[0x28..0x28 + 60],
        None,
        &mut extents,
    )?;
    extents.sort_unstable_by_key(|e| e.logical);
    let first = extents
        .first()
        .filter(|e| e.logical == 0)
        .ok_or_else(|| malformed("no extent maps the journal superblock"))?;
    // The journal superblock: big-endian, in the journal's block 0.
    let mut jsb = [0u8; 1024];
    let jsb_at = byte_of(first.physical, bs)?;
    read_within(read, device_len, jsb_at, &mut jsb)?;
    let blocktype = be32(&jsb, 0x4);
    if be32(&jsb, 0x0) != JBD2_MAGIC
        || !(blocktype == JBD2_SUPERBLOCK_V1 || blocktype == JBD2_SUPERBLOCK_V2)
    {
        return Err(malformed(
            "no journal superblock in the journal's first block",
        ));
    }
    let (j_bs, maxlen, log_first, start) = (
        u64::from(be32(&jsb, 0xc)),
        u64::from(be32(&jsb, 0x10)),
        u64::from(be32(&jsb, 0x14)),
        be32(&jsb, 0x1c),
    );
    if j_bs != bs {
        return Err(malformed(format!(
            "journal block size {j_bs}, file system {bs}"
        )));
    }
    if start != 0 {
        return Ok(Err(SkipReason::NeedsRecovery));
    }
    if log_first == 0 || log_first > maxlen {
        return Err(malformed(format!("log from block {log_first} of {maxlen}")));
    }
    // The extents must map the journal once each, all of it: anything else is damage, and
    // a discard must never follow a damaged map onto someone else's blocks.
    if extents
        .windows(2)
        .any(|w| w[0].logical + w[0].len > w[1].logical)
    {
        return Err(malformed("journal extents overlap"));
    }
    let mapped: u64 = extents.iter().map(|e| e.len).sum();
    if mapped < maxlen {
        return Err(malformed(format!(
            "the journal's {maxlen} blocks, {mapped} of them mapped"
        )));
    }
    let mut log = Vec::new();
    for e in &extents {
        // The part of the extent inside [log_first, maxlen).
        let lo = e.logical.max(log_first);
        let hi = (e.logical + e.len).min(maxlen);
        if lo >= hi {
            continue;
        }
        let physical = e.physical + (lo - e.logical);
        if physical
            .checked_add(hi - lo)
            .is_none_or(|end| end > blocks_in_device)
        {
            return Err(malformed(format!(
                "journal blocks past the end of the device at {physical}"
            )));
        }
        log.push(physical * bs..(physical + hi - lo) * bs);
    }
    // Nor may the log's blocks overlap each other or the journal superblock.
    let superblock = jsb_at..jsb_at + bs;
    let mut by_place: Vec<&Range<u64>> = log.iter().chain([&superblock]).collect();
    by_place.sort_unstable_by_key(|r| r.start);
    if by_place.windows(2).any(|w| w[0].end > w[1].start) {
        return Err(malformed("journal blocks mapped twice"));
    }
    Ok(Ok(JournalLog { superblock, log }))
}

/// Discards the whole pool blocks of the journal log of the ext4 file system on thin `id`,
/// which must not be mounted (see the module doc). Commits.
pub fn trim_ext4_journal(
    pool: &mut dyn PoolControl,
    id: ThinId,
) -> Result<JournalTrim, JournalError> {
    let size = pool.size_of(id)?;
    let block = data_block_bytes(pool)?;
    let log = match ext4_journal_log(size, &mut |offset, buf| pool.read(id, offset, buf))? {
        Ok(log) => log,
        Err(reason) => return Ok(JournalTrim::Skipped(reason)),
    };
    let ranges = whole_blocks(&log.log, block);
    let mut discarded = 0;
    for r in &ranges {
        pool.discard(id, r.start, r.end - r.start)?;
        discarded += r.end - r.start;
    }
    Ok(JournalTrim::Trimmed {
        log_bytes: log.log.iter().map(|r| r.end - r.start).sum(),
        discarded,
    })
}

/// Gives thin `id` (a new snapshot, not active) its own copy of the pool block that holds
/// its ext4's journal superblock, when the file system has a clean internal journal; the
/// bytes owned, or `None` when there is no such journal (nothing is written then).
///
/// Why: mounting a file system whose log is empty leaves the journal superblock alone
/// until the first commit (jbd2 marks the journal flushed instead), so in a snapshot that
/// first commit, typically a container's first `fsync`, would copy the block, with a cold
/// read of the shared one, while the caller waits. Copying the block at creation takes
/// that off the first write: in an A/B of 12 rounds the cold first 4 KiB write + fsync
/// into a 1 GiB file shared with the image took 2.82 ms instead of 3.24 (medians). The cost
/// is a 64 KiB read and a whole-block write now, and no space that the first commit would
/// not have taken anyway.
pub fn own_ext4_journal_superblock(
    pool: &mut dyn PoolControl,
    id: ThinId,
) -> Result<Option<Range<u64>>, JournalError> {
    let size = pool.size_of(id)?;
    let block = data_block_bytes(pool)?;
    let log = match ext4_journal_log(size, &mut |offset, buf| pool.read(id, offset, buf))? {
        Ok(log) => log,
        Err(_) => return Ok(None),
    };
    let start = log.superblock.start / block * block;
    let end = start.saturating_add(block).min(size);
    let len = usize::try_from(end - start)
        .map_err(|_| malformed(format!("a pool block of {block} bytes")))?;
    let mut bytes = vec![0u8; len];
    pool.read(id, start, &mut bytes)?;
    pool.write(id, start, &bytes)?;
    Ok(Some(start..end))
}

/// The pool's data block size in bytes (never 0).
fn data_block_bytes(pool: &mut dyn PoolControl) -> Result<u64, JournalError> {
    match u64::from(pool.status()?.status.data_block_sectors) * SECTOR_SIZE {
        0 => Err(JournalError::Pool(Error::InvalidArgument(
            "the pool reports a data block size of 0".into(),
        ))),
        block => Ok(block),
    }
}

/// The pool blocks of `block` bytes that lie wholly inside `ranges` (adjacent ranges
/// joined first), as sorted, disjoint byte ranges.
fn whole_blocks(ranges: &[Range<u64>], block: u64) -> Vec<Range<u64>> {
    let mut sorted = ranges.to_vec();
    sorted.sort_unstable_by_key(|r| r.start);
    let mut joined: Vec<Range<u64>> = Vec::new();
    for r in sorted {
        match joined.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => joined.push(r),
        }
    }
    joined
        .into_iter()
        .filter_map(|r| {
            let (start, end) = (r.start.div_ceil(block) * block, r.end / block * block);
            (start < end).then_some(start..end)
        })
        .collect()
}

/// One extent of the journal inode, in file system blocks.
#[derive(Clone, Copy, Debug)]
struct Extent {
    logical: u64,
    len: u64,
    physical: u64,
}

/// What walking the journal inode's extent tree needs.
struct ExtentWalk<'a> {
    read: &'a mut ReadAt<'a>,
    device_len: u64,
    bs: u64,
    /// Tree blocks that may still be read: a damaged tree cannot make the walk endless.
    budget: &'a mut usize,
}

/// Collects the leaf extents under the extent-tree node `node` (the inode's 60 bytes at
/// the root, a whole block below it). `depth`: what the parent said this node's depth is.
fn walk_extents(
    walk: &mut ExtentWalk<'_>,
    node: &[u8],
    depth: Option<u16>,
    out: &mut Vec<Extent>,
) -> Result<(), JournalError> {
    if le16(node, 0) != EXTENT_MAGIC {
        return Err(malformed("an extent-tree node without its magic"));
    }
    let (entries, node_depth) = (usize::from(le16(node, 2)), le16(node, 6));
    if node_depth > MAX_EXTENT_DEPTH || depth.is_some_and(|d| d != node_depth) {
        return Err(malformed(format!(
            "an extent-tree node of depth {node_depth}"
        )));
    }
    if 12 + entries * 12 > node.len() {
        return Err(malformed(format!(
            "an extent-tree node with {entries} entries"
        )));
    }
    for i in 0..entries {
        let e = &node[12 + i * 12..24 + i * 12];
        if node_depth == 0 {
            let raw_len = u64::from(le16(e, 4));
            // Above 32768: an unwritten extent of (len - 32768) blocks.
            let len = if raw_len > 32768 {
                raw_len - 32768
            } else {
                raw_len
            };
            let physical = u64::from(le32(e, 8)) | u64::from(le16(e, 6)) << 32;
            out.push(Extent {
                logical: u64::from(le32(e, 0)),
                len,
                physical,
            });
        } else {
            if *walk.budget == 0 {
                return Err(malformed("an extent tree of too many blocks"));
            }
            *walk.budget -= 1;
            let child = u64::from(le32(e, 4)) | u64::from(le16(e, 8)) << 32;
            let mut buf = vec![0u8; walk.bs as usize];
            read_within(
                walk.read,
                walk.device_len,
                byte_of(child, walk.bs)?,
                &mut buf,
            )?;
            walk_extents(walk, &buf, Some(node_depth - 1), out)?;
        }
    }
    Ok(())
}

fn read_within(
    read: &mut ReadAt<'_>,
    device_len: u64,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), JournalError> {
    if offset
        .checked_add(buf.len() as u64)
        .is_none_or(|end| end > device_len)
    {
        return Err(malformed(format!(
            "a structure at byte {offset}, past the end of the device"
        )));
    }
    Ok(read(offset, buf)?)
}

/// Block `block`'s first byte; a block number this large is damage.
fn byte_of(block: u64, bs: u64) -> Result<u64, JournalError> {
    block
        .checked_mul(bs)
        .ok_or_else(|| malformed(format!("block {block}")))
}

fn malformed(what: impl Into<String>) -> JournalError {
    JournalError::Malformed(what.into())
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_blocks_keep_only_blocks_inside_the_log() {
        let k = 4096;
        // The log starts one fs block into a pool block (the journal superblock's).
        let ranges = [k..64 * k, 64 * k..70 * k];
        assert_eq!(whole_blocks(&ranges, 16 * k), vec![16 * k..64 * k]);
        assert_eq!(whole_blocks(&[k..15 * k, 17 * k..31 * k], 16 * k), vec![]);
    }
}
