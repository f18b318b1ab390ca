//! Space maps: one reference count per block of a device.
//!
//! [`SpaceMap`] is the in-memory, authoritative map of the running transaction. It keeps its
//! bitmaps in the on-disk encoding (2 bits per block, counts of 3 and more in an overflow map)
//! so persisting a bitmap is a copy, and it keeps the last committed bitmaps beside the current
//! ones (copy-on-write through `Arc`), which gives two things for free: which bitmaps changed
//! in this transaction, and the allocation rule that a block must be free in both the committed
//! and the current map (a block freed in this transaction is still reachable from the committed
//! superblock, so it must not be reused before the commit).
//!
//! `disk` reads and writes the on-disk structures (bitmaps, metadata index block, data index
//! tree, overflow trees).

pub(crate) mod disk;

use std::collections::BTreeMap;
use std::sync::Arc;

/// Blocks covered by one bitmap block: (4096 - 16) bytes × 4 entries per byte.
pub const ENTRIES_PER_BITMAP: u64 = 16_320;
/// 64-bit words in a bitmap block.
pub const WORDS_PER_BITMAP: usize = 510;
const EVEN_BITS: u64 = 0x5555_5555_5555_5555;

/// One bitmap's worth of 2-bit counts, in the on-disk bit order: entry `j` of a word keeps its
/// high bit at bit `2j` and its low bit at bit `2j + 1`.
#[derive(Clone, PartialEq, Eq)]
pub struct Bitmap {
    pub(crate) words: Box<[u64; WORDS_PER_BITMAP]>,
    /// Entries whose count is not zero.
    used: u32,
}

impl Bitmap {
    fn empty() -> Bitmap {
        Bitmap {
            words: Box::new([0; WORDS_PER_BITMAP]),
            used: 0,
        }
    }

    pub(crate) fn from_words(words: Box<[u64; WORDS_PER_BITMAP]>) -> Bitmap {
        let used = words.iter().map(|w| nonzero_mask(*w).count_ones()).sum();
        Bitmap { words, used }
    }

    pub(crate) fn get(&self, entry: usize) -> u32 {
        let w = self.words[entry / 32];
        let j = (entry % 32) * 2;
        ((((w >> j) & 1) << 1) | ((w >> (j + 1)) & 1)) as u32
    }

    fn set(&mut self, entry: usize, value: u32) {
        debug_assert!(value < 4);
        let old = self.get(entry);
        let w = &mut self.words[entry / 32];
        let j = (entry % 32) * 2;
        *w &= !(0b11 << j);
        *w |= u64::from(value >> 1) << j | u64::from(value & 1) << (j + 1);
        match (old == 0, value == 0) {
            (true, false) => self.used += 1,
            (false, true) => self.used -= 1,
            _ => {}
        }
    }

    /// Entries with a non-zero count.
    pub fn used(&self) -> u32 {
        self.used
    }

    /// The first entry whose count is zero, or `ENTRIES_PER_BITMAP` if none.
    pub fn first_free(&self) -> u32 {
        for (i, w) in self.words.iter().enumerate() {
            let free = !nonzero_mask(*w) & EVEN_BITS;
            if free != 0 {
                return (i * 32) as u32 + free.trailing_zeros() / 2;
            }
        }
        ENTRIES_PER_BITMAP as u32
    }
}

/// Bit `2j` set iff entry `j` of the word is not zero.
fn nonzero_mask(w: u64) -> u64 {
    (w | (w >> 1)) & EVEN_BITS
}

/// Errors of reference counting: each means the metadata is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CountError {
    /// A block past the end of the map.
    OutOfRange(u64),
    /// A decrement of a block that is already free.
    Underflow(u64),
    /// An increment of a block whose count is already `u32::MAX`: no pool holds that many
    /// references to one block, so the count on disk is damaged.
    Overflow(u64),
}

impl std::fmt::Display for CountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CountError::OutOfRange(b) => write!(f, "block {b} is past the end of the space map"),
            CountError::Underflow(b) => write!(f, "reference count of free block {b} decremented"),
            CountError::Overflow(b) => {
                write!(f, "reference count of block {b} is already the largest")
            }
        }
    }
}

/// The reference counts of one device's blocks for the running transaction.
#[derive(Clone)]
pub struct SpaceMap {
    nr_blocks: u64,
    bitmaps: Vec<Arc<Bitmap>>,
    committed: Vec<Arc<Bitmap>>,
    overflow: BTreeMap<u64, u32>,
    committed_overflow: BTreeMap<u64, u32>,
    nr_allocated: u64,
    /// Where the next allocation search starts.
    cursor: u64,
}

impl SpaceMap {
    /// An all-free map of `nr_blocks`.
    pub fn new(nr_blocks: u64) -> SpaceMap {
        let n = nr_bitmaps(nr_blocks);
        let bitmaps: Vec<_> = (0..n).map(|_| Arc::new(Bitmap::empty())).collect();
        SpaceMap {
            nr_blocks,
            committed: bitmaps.clone(),
            bitmaps,
            overflow: BTreeMap::new(),
            committed_overflow: BTreeMap::new(),
            nr_allocated: 0,
            cursor: 0,
        }
    }

    /// A map built from bitmaps and an overflow map read from disk, taken as committed.
    pub(crate) fn from_parts(
        nr_blocks: u64,
        bitmaps: Vec<Bitmap>,
        overflow: BTreeMap<u64, u32>,
    ) -> SpaceMap {
        let bitmaps: Vec<_> = bitmaps.into_iter().map(Arc::new).collect();
        let nr_allocated = bitmaps.iter().map(|b| u64::from(b.used)).sum();
        SpaceMap {
            nr_blocks,
            committed: bitmaps.clone(),
            bitmaps,
            committed_overflow: overflow.clone(),
            overflow,
            nr_allocated,
            cursor: 0,
        }
    }

    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    /// Blocks whose count is not zero.
    pub fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }

    pub fn nr_free(&self) -> u64 {
        // Saturating: damaged bitmaps may mark blocks past the end.
        self.nr_blocks.saturating_sub(self.nr_allocated)
    }

    pub fn count(&self, block: u64) -> Result<u32, CountError> {
        if block >= self.nr_blocks {
            return Err(CountError::OutOfRange(block));
        }
        Ok(Self::count_in(&self.bitmaps, &self.overflow, block))
    }

    /// The count the block had at the last commit.
    pub fn committed_count(&self, block: u64) -> u32 {
        if block >= self.nr_blocks {
            return 0;
        }
        Self::count_in(&self.committed, &self.committed_overflow, block)
    }

    fn count_in(bitmaps: &[Arc<Bitmap>], overflow: &BTreeMap<u64, u32>, block: u64) -> u32 {
        let (i, e) = split(block);
        match bitmaps.get(i).map_or(0, |b| b.get(e)) {
            3 => overflow.get(&block).copied().unwrap_or(3),
            v => v,
        }
    }

    pub fn set(&mut self, block: u64, count: u32) -> Result<(), CountError> {
        if block >= self.nr_blocks {
            return Err(CountError::OutOfRange(block));
        }
        let (i, e) = split(block);
        let bitmap = Arc::make_mut(&mut self.bitmaps[i]);
        let old = bitmap.get(e);
        bitmap.set(e, count.min(3));
        if count >= 3 {
            self.overflow.insert(block, count);
        } else if old == 3 {
            self.overflow.remove(&block);
        }
        match (old == 0, count == 0) {
            (true, false) => self.nr_allocated += 1,
            (false, true) => self.nr_allocated -= 1,
            _ => {}
        }
        Ok(())
    }

    /// Adds one reference; returns the new count.
    pub fn inc(&mut self, block: u64) -> Result<u32, CountError> {
        let c = self.count(block)?;
        let c = c.checked_add(1).ok_or(CountError::Overflow(block))?;
        self.set(block, c)?;
        Ok(c)
    }

    /// Drops one reference; returns the new count (0 means the block is free).
    pub fn dec(&mut self, block: u64) -> Result<u32, CountError> {
        let c = self.count(block)?;
        if c == 0 {
            return Err(CountError::Underflow(block));
        }
        self.set(block, c - 1)?;
        Ok(c - 1)
    }

    /// Finds a block free in both the committed and the current map, gives it count 1 and
    /// returns it; `None` when the device is full.
    pub fn alloc(&mut self) -> Option<u64> {
        let block = self.next_free(self.cursor).or_else(|| self.next_free(0))?;
        self.set(block, 1).expect("found block is in range");
        self.cursor = block + 1;
        Some(block)
    }

    /// Restarts allocation from the start of the device, as the kernel's metadata allocator
    /// does after each commit (keeps metadata compact).
    pub fn reset_cursor(&mut self) {
        self.cursor = 0;
    }

    /// One past the `n`-th lowest block that is free in both the committed and the current
    /// map: the blocks `alloc` hands out first after a commit lie below it. 0 when `n` is 0,
    /// `nr_blocks` when fewer than `n` blocks are free.
    pub fn end_of_lowest_free(&self, n: u64) -> u64 {
        let mut left = n;
        if left == 0 {
            return 0;
        }
        for (i, bitmap) in self.bitmaps.iter().enumerate() {
            let base = i as u64 * ENTRIES_PER_BITMAP;
            let entries = ENTRIES_PER_BITMAP.min(self.nr_blocks.saturating_sub(base));
            // An unchanged bitmap (the usual case right after a commit) is skipped whole by
            // its count; a changed one is counted entry by entry against both maps.
            let unchanged = self
                .committed
                .get(i)
                .is_some_and(|c| Arc::ptr_eq(c, bitmap));
            if unchanged && entries == ENTRIES_PER_BITMAP {
                let free = entries.saturating_sub(u64::from(bitmap.used));
                if free < left {
                    left -= free;
                    continue;
                }
            }
            let mut block = base;
            while let Some(b) = self.next_free(block) {
                if b >= base + entries {
                    break;
                }
                left -= 1;
                if left == 0 {
                    return b + 1;
                }
                block = b + 1;
            }
        }
        self.nr_blocks
    }

    /// The lowest block at or past `start` that is free in both the committed and the
    /// current map.
    pub fn next_free(&self, start: u64) -> Option<u64> {
        if start >= self.nr_blocks {
            return None;
        }
        let (first_bitmap, _) = split(start);
        for i in first_bitmap..self.bitmaps.len() {
            if self.bitmaps[i].used as u64 >= ENTRIES_PER_BITMAP {
                continue;
            }
            let base = i as u64 * ENTRIES_PER_BITMAP;
            let first_word = if i == first_bitmap {
                (start - base) as usize / 32
            } else {
                0
            };
            for w in first_word..WORDS_PER_BITMAP {
                let busy = nonzero_mask(self.bitmaps[i].words[w])
                    | nonzero_mask(self.committed.get(i).map_or(0, |b| b.words[w]));
                let mut free = !busy & EVEN_BITS;
                while free != 0 {
                    let entry = free.trailing_zeros() as u64 / 2;
                    let block = base + w as u64 * 32 + entry;
                    if block >= self.nr_blocks {
                        return None;
                    }
                    if block >= start {
                        return Some(block);
                    }
                    free &= free - 1;
                }
            }
        }
        None
    }

    /// Grows the map to `nr_blocks` (new blocks are free). Shrinking is refused.
    pub fn extend(&mut self, nr_blocks: u64) {
        assert!(nr_blocks >= self.nr_blocks, "space maps never shrink");
        self.nr_blocks = nr_blocks;
        while self.bitmaps.len() < nr_bitmaps(nr_blocks) {
            self.bitmaps.push(Arc::new(Bitmap::empty()));
        }
    }

    /// Takes the current counts as committed.
    pub fn commit(&mut self) {
        self.committed = self.bitmaps.clone();
        self.committed_overflow = self.overflow.clone();
        self.cursor = 0;
    }

    /// Throws away every change since the last commit.
    pub fn rollback(&mut self) {
        self.bitmaps.truncate(self.committed.len());
        self.bitmaps.clone_from_slice(&self.committed);
        self.overflow = self.committed_overflow.clone();
        self.nr_allocated = self.bitmaps.iter().map(|b| u64::from(b.used)).sum();
        self.cursor = 0;
    }

    pub fn nr_bitmaps(&self) -> usize {
        self.bitmaps.len()
    }

    pub(crate) fn bitmap(&self, i: usize) -> &Bitmap {
        &self.bitmaps[i]
    }

    /// Whether bitmap `i` changed since the last commit (or is new).
    pub(crate) fn bitmap_dirty(&self, i: usize) -> bool {
        self.committed
            .get(i)
            .is_none_or(|c| !Arc::ptr_eq(c, &self.bitmaps[i]) && **c != *self.bitmaps[i])
    }

    pub(crate) fn overflow(&self) -> &BTreeMap<u64, u32> {
        &self.overflow
    }

    pub(crate) fn committed_overflow(&self) -> &BTreeMap<u64, u32> {
        &self.committed_overflow
    }

    /// Every non-zero count, in block order, as `(block, count)`.
    pub fn iter_counts(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.bitmaps.iter().enumerate().flat_map(move |(i, bm)| {
            let base = i as u64 * ENTRIES_PER_BITMAP;
            bm.words.iter().enumerate().flat_map(move |(w, word)| {
                let mut mask = nonzero_mask(*word);
                std::iter::from_fn(move || {
                    if mask == 0 {
                        return None;
                    }
                    let entry = mask.trailing_zeros() as u64 / 2;
                    mask &= mask - 1;
                    let block = base + w as u64 * 32 + entry;
                    Some((block, self.count(block).unwrap_or(0)))
                })
            })
        })
    }
}

pub fn nr_bitmaps(nr_blocks: u64) -> usize {
    nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize
}

fn split(block: u64) -> (usize, usize) {
    (
        (block / ENTRIES_PER_BITMAP) as usize,
        (block % ENTRIES_PER_BITMAP) as usize,
    )
}

#[cfg(test)]
mod tests;
