//! The b-tree node format shared by every dm-thin tree.
//!
//! ```text
//! 0   csum        u32   (salt 121107)
//! 4   flags       u32   1 = internal, 2 = leaf
//! 8   blocknr     u64
//! 16  nr_entries  u32
//! 20  max_entries u32   3 * floor(floor(4064 / (8 + value_size)) / 3)
//! 24  value_size  u32   8 in every internal node
//! 28  padding     u32
//! 32  keys        u64 × max_entries
//! ..  values      value_size × max_entries
//! ```

use crate::block::{read_u32, read_u64, write_u32, write_u64, Block, BLOCK_SIZE};
use crate::error::Damage;

pub const HEADER_SIZE: usize = 32;
pub const INTERNAL_NODE: u32 = 1;
pub const LEAF_NODE: u32 = 2;
/// The value size of internal nodes (child block numbers).
pub const INTERNAL_VALUE_SIZE: u32 = 8;

/// Capacity of a node whose values are `value_size` bytes.
pub const fn max_entries(value_size: u32) -> u32 {
    let per = (BLOCK_SIZE as u32 - HEADER_SIZE as u32) / (8 + value_size);
    3 * (per / 3)
}

/// Entries every node but a root must hold.
pub const fn min_entries(max_entries: u32) -> u32 {
    max_entries / 3
}

/// Checks the header of a node read from disk, and that its keys are strictly increasing.
pub fn validate_header(b: &Block) -> Result<(), Damage> {
    let flags = read_u32(b, 4);
    if flags != INTERNAL_NODE && flags != LEAF_NODE {
        return Err(Damage::BadNodeFlags(flags));
    }
    let nr = read_u32(b, 16);
    let max = read_u32(b, 20);
    let value_size = read_u32(b, 24);
    if value_size == 0
        || value_size > 1024
        || max == 0
        || !max.is_multiple_of(3)
        || max != max_entries(value_size)
    {
        return Err(Damage::BadMaxEntries(max));
    }
    if flags == INTERNAL_NODE && value_size != INTERNAL_VALUE_SIZE {
        return Err(Damage::ValueSizeMismatch {
            expected: INTERNAL_VALUE_SIZE,
            found: value_size,
        });
    }
    if nr > max {
        return Err(Damage::TooManyEntries { nr, max });
    }
    let n = Node::new(b);
    for i in 1..n.nr_entries() {
        if n.key(i - 1) >= n.key(i) {
            return Err(Damage::KeysOutOfOrder);
        }
    }
    Ok(())
}

/// A read-only view of a node whose header was validated.
#[derive(Clone, Copy)]
pub struct Node<'a> {
    b: &'a Block,
}

impl<'a> Node<'a> {
    pub fn new(b: &'a Block) -> Node<'a> {
        Node { b }
    }

    pub fn flags(&self) -> u32 {
        read_u32(self.b, 4)
    }

    pub fn is_internal(&self) -> bool {
        self.flags() == INTERNAL_NODE
    }

    pub fn is_leaf(&self) -> bool {
        self.flags() == LEAF_NODE
    }

    pub fn nr_entries(&self) -> usize {
        read_u32(self.b, 16) as usize
    }

    pub fn max_entries(&self) -> usize {
        read_u32(self.b, 20) as usize
    }

    pub fn value_size(&self) -> usize {
        read_u32(self.b, 24) as usize
    }

    pub fn is_full(&self) -> bool {
        self.nr_entries() >= self.max_entries()
    }

    pub fn key(&self, i: usize) -> u64 {
        read_u64(self.b, HEADER_SIZE + 8 * i)
    }

    fn value_offset(&self, i: usize) -> usize {
        HEADER_SIZE + 8 * self.max_entries() + self.value_size() * i
    }

    pub fn value(&self, i: usize) -> &'a [u8] {
        let at = self.value_offset(i);
        &self.b[at..at + self.value_size()]
    }

    /// An 8-byte value (child pointer or block_time).
    pub fn value_u64(&self, i: usize) -> u64 {
        read_u64(self.b, self.value_offset(i))
    }

    /// The first 8 bytes of a value, or 0 for smaller values.
    pub fn value_u64_or_zero(&self, i: usize) -> u64 {
        if self.value_size() >= 8 {
            self.value_u64(i)
        } else {
            0
        }
    }

    /// `Ok(i)` if key `k` is entry `i`, else `Err(i)` where it would be inserted.
    pub fn search(&self, k: u64) -> Result<usize, usize> {
        let (mut lo, mut hi) = (0, self.nr_entries());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.key(mid).cmp(&k) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    /// The largest `i` with `key(i) <= k`, as the kernel's `lower_bound`.
    pub fn lower_bound(&self, k: u64) -> Option<usize> {
        match self.search(k) {
            Ok(i) => Some(i),
            Err(0) => None,
            Err(i) => Some(i - 1),
        }
    }
}

/// A writable view of a node.
pub struct NodeMut<'a> {
    b: &'a mut Block,
}

impl<'a> NodeMut<'a> {
    pub fn new(b: &'a mut Block) -> NodeMut<'a> {
        NodeMut { b }
    }

    pub fn view(&self) -> Node<'_> {
        Node { b: self.b }
    }

    /// Formats an empty node.
    pub fn init(&mut self, flags: u32, value_size: u32) {
        self.b.fill(0);
        write_u32(self.b, 4, flags);
        write_u32(self.b, 20, max_entries(value_size));
        write_u32(self.b, 24, value_size);
    }

    pub fn set_nr_entries(&mut self, n: usize) {
        write_u32(self.b, 16, n as u32);
    }

    pub fn set_key(&mut self, i: usize, k: u64) {
        write_u64(self.b, HEADER_SIZE + 8 * i, k);
    }

    pub fn set_value(&mut self, i: usize, v: &[u8]) {
        let at = self.view().value_offset(i);
        let vs = self.view().value_size();
        self.b[at..at + vs].copy_from_slice(v);
    }

    pub fn set_value_u64(&mut self, i: usize, v: u64) {
        let at = self.view().value_offset(i);
        write_u64(self.b, at, v);
    }

    /// Inserts an entry at `i`, shifting the later ones up. The node must not be full.
    pub fn insert_at(&mut self, i: usize, k: u64, v: &[u8]) {
        let n = self.view().nr_entries();
        debug_assert!(n < self.view().max_entries());
        let vs = self.view().value_size();
        let keys = HEADER_SIZE;
        self.b
            .copy_within(keys + 8 * i..keys + 8 * n, keys + 8 * (i + 1));
        let vals = self.view().value_offset(0);
        self.b
            .copy_within(vals + vs * i..vals + vs * n, vals + vs * (i + 1));
        self.set_nr_entries(n + 1);
        self.set_key(i, k);
        self.set_value(i, v);
    }

    /// Removes entry `i`, shifting the later ones down; the freed slot is zeroed.
    pub fn remove_at(&mut self, i: usize) {
        let n = self.view().nr_entries();
        let vs = self.view().value_size();
        let keys = HEADER_SIZE;
        self.b
            .copy_within(keys + 8 * (i + 1)..keys + 8 * n, keys + 8 * i);
        let vals = self.view().value_offset(0);
        self.b
            .copy_within(vals + vs * (i + 1)..vals + vs * n, vals + vs * i);
        self.b[keys + 8 * (n - 1)..keys + 8 * n].fill(0);
        self.b[vals + vs * (n - 1)..vals + vs * n].fill(0);
        self.set_nr_entries(n - 1);
    }

    /// Appends entries `range` of `src` (same value size) at the end of this node.
    pub fn append_from(&mut self, src: &Node<'_>, range: std::ops::Range<usize>) {
        let n = self.view().nr_entries();
        let len = range.len();
        debug_assert!(n + len <= self.view().max_entries());
        for (j, i) in range.enumerate() {
            self.set_key(n + j, src.key(i));
            self.set_value(n + j, src.value(i));
        }
        self.set_nr_entries(n + len);
    }

    /// Keeps only entries `range`, moved to the front; the rest is zeroed.
    pub fn retain(&mut self, range: std::ops::Range<usize>) {
        let n = self.view().nr_entries();
        let vs = self.view().value_size();
        let keys = HEADER_SIZE;
        let vals = self.view().value_offset(0);
        let len = range.len();
        self.b
            .copy_within(keys + 8 * range.start..keys + 8 * range.end, keys);
        self.b
            .copy_within(vals + vs * range.start..vals + vs * range.end, vals);
        self.b[keys + 8 * len..keys + 8 * n].fill(0);
        self.b[vals + vs * len..vals + vs * n].fill(0);
        self.set_nr_entries(len);
    }
}
