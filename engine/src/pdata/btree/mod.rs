//! Copy-on-write b-trees in the kernel's layout (see [`node`]).
//!
//! Every function takes the root and returns the new root: changing a tree shadows the path
//! from the root down (see `tm`), so the root moves whenever the tree was committed or shared.
//!
//! Invariants kept by every change (the kernel's and `thin_check`'s rules):
//! - keys strictly increase within a node; each separator key in an internal node is at most
//!   the smallest key below it and greater than every key of the child before;
//! - every node but the root holds at least `max_entries / 3` entries;
//! - all leaves are at the same depth (the tree only grows and shrinks at the root).
//!
//! Insertion splits full nodes on the way down, so the parent of a split always has room.
//! Removal tops up the child it is about to enter (merging with or borrowing from a sibling)
//! so that it keeps its minimum after losing an entry.
//!
//! Values are opaque byte strings of the tree's value size. Replacing or removing a value
//! returns the old one: the caller drops what it referenced (a data block, a subtree).

pub mod node;
#[cfg(test)]
mod tests;

use crate::block::{Block, BlockKind};
use crate::error::{Damage, Error, Result};
use crate::tm::{TransactionManager, ValueRefs};
use node::{min_entries, Node, NodeMut, INTERNAL_NODE, INTERNAL_VALUE_SIZE, LEAF_NODE};

/// No real tree is deeper than this (a 4 KiB-node tree of depth 12 holds more than 2^64 keys).
pub const MAX_DEPTH: usize = 12;

/// What a tree holds: its leaf value size and what its values reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TreeType {
    pub value_size: u32,
    pub refs: ValueRefs,
}

/// Largest value of any dm-thin tree (device details).
pub const MAX_VALUE_SIZE: usize = 24;

/// A value copied out of a node.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Value {
    bytes: [u8; MAX_VALUE_SIZE],
    len: u8,
}

impl Value {
    pub fn new(v: &[u8]) -> Value {
        let mut bytes = [0; MAX_VALUE_SIZE];
        bytes[..v.len()].copy_from_slice(v);
        Value {
            bytes,
            len: v.len() as u8,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    pub fn as_u64(&self) -> u64 {
        u64::from_le_bytes(self.bytes[..8].try_into().expect("8 bytes"))
    }
}

/// Creates an empty tree (a single empty leaf) and returns its root.
pub fn empty(tm: &mut TransactionManager, value_size: u32) -> Result<u64> {
    let root = tm.new_block(BlockKind::Node)?;
    NodeMut::new(tm.write(root)?).init(LEAF_NODE, value_size);
    Ok(root)
}

fn check_leaf_value_size(location: u64, n: &Node<'_>, tt: TreeType) -> Result<()> {
    if n.is_leaf() && n.value_size() != tt.value_size as usize {
        return Err(Error::corrupt(
            location,
            Damage::ValueSizeMismatch {
                expected: tt.value_size,
                found: n.value_size() as u32,
            },
        ));
    }
    Ok(())
}

/// A descent that found `key` below `location` finds it there no more.
fn lost_path(location: u64, key: u64) -> Error {
    Error::corrupt(
        location,
        Damage::Other(format!("key {key} lies below the first key of this node")),
    )
}

/// Looks up `key`; returns its value.
pub fn lookup(
    tm: &mut TransactionManager,
    root: u64,
    key: u64,
    tt: TreeType,
) -> Result<Option<Value>> {
    let mut location = root;
    for _ in 0..MAX_DEPTH {
        let b = tm.read_node(location)?;
        let n = Node::new(&b);
        check_leaf_value_size(location, &n, tt)?;
        if n.is_leaf() {
            return Ok(n.search(key).ok().map(|i| Value::new(n.value(i))));
        }
        match n.lower_bound(key) {
            Some(i) => location = n.value_u64(i),
            None => return Ok(None),
        }
    }
    Err(Error::corrupt(root, Damage::TooDeep))
}

/// Inserts or replaces `key`. Returns the new root and the replaced value, if any.
pub fn insert(
    tm: &mut TransactionManager,
    root: u64,
    key: u64,
    value: &[u8],
    tt: TreeType,
) -> Result<(u64, Option<Value>)> {
    debug_assert_eq!(value.len(), tt.value_size as usize);
    let root = tm.shadow(root, tt.refs)?;
    if needs_split(tm, root, key, tt)? {
        split_beneath(tm, root)?;
    }
    let mut location = root;
    for _ in 0..MAX_DEPTH {
        let b = tm.read_node(location)?;
        let n = Node::new(&b);
        check_leaf_value_size(location, &n, tt)?;
        if n.is_leaf() {
            let found = n.search(key);
            let old = found.ok().map(|i| Value::new(n.value(i)));
            // Let go of the read copy so the write below changes the block without cloning it.
            drop(b);
            let mut w = NodeMut::new(tm.write(location)?);
            match found {
                Ok(i) => w.set_value(i, value),
                Err(i) => w.insert_at(i, key, value),
            }
            return Ok((root, old));
        }
        let i = match n.lower_bound(key) {
            Some(i) => i,
            None => {
                // A key below every separator: lower the first one, as the kernel does.
                NodeMut::new(tm.write(location)?).set_key(0, key);
                0
            }
        };
        let child = n.value_u64(i);
        let mut child_new = tm.shadow(child, tt.refs)?;
        if child_new != child {
            NodeMut::new(tm.write(location)?).set_value_u64(i, child_new);
        }
        if needs_split(tm, child_new, key, tt)? {
            let right = split_child(tm, location, i, child_new)?;
            let right_key = Node::new(&*tm.read_node(right)?).key(0);
            if key >= right_key {
                child_new = right;
            }
        }
        location = child_new;
    }
    Err(Error::corrupt(root, Damage::TooDeep))
}

/// A full node must be split before an insert descends into it, unless it is a leaf that
/// already holds the key (an overwrite needs no room).
fn needs_split(tm: &mut TransactionManager, location: u64, key: u64, tt: TreeType) -> Result<bool> {
    let b = tm.read_node(location)?;
    let n = Node::new(&b);
    check_leaf_value_size(location, &n, tt)?;
    Ok(n.is_full() && !(n.is_leaf() && n.search(key).is_ok()))
}

/// Splits a full root into two children; the root keeps its location and becomes internal.
fn split_beneath(tm: &mut TransactionManager, root: u64) -> Result<()> {
    let old: Block = *tm.read_node(root)?;
    let n = Node::new(&old);
    let (flags, vs) = (n.flags(), n.value_size() as u32);
    let nr = n.nr_entries();
    let half = nr / 2;
    let mut children = [0u64; 2];
    for (slot, range) in [(0, 0..half), (1, half..nr)] {
        let c = tm.new_block(BlockKind::Node)?;
        let mut w = NodeMut::new(tm.write(c)?);
        w.init(flags, vs);
        w.append_from(&n, range);
        children[slot] = c;
    }
    let mut w = NodeMut::new(tm.write(root)?);
    w.init(INTERNAL_NODE, INTERNAL_VALUE_SIZE);
    w.insert_at(0, n.key(0), &children[0].to_le_bytes());
    w.insert_at(1, n.key(half), &children[1].to_le_bytes());
    Ok(())
}

/// Splits child `i` of `parent` (already shadowed) in two; returns the new right node.
fn split_child(tm: &mut TransactionManager, parent: u64, i: usize, child: u64) -> Result<u64> {
    let old: Block = *tm.read_node(child)?;
    let n = Node::new(&old);
    let nr = n.nr_entries();
    let half = nr / 2;
    let right = tm.new_block(BlockKind::Node)?;
    {
        let mut w = NodeMut::new(tm.write(right)?);
        w.init(n.flags(), n.value_size() as u32);
        w.append_from(&n, half..nr);
    }
    NodeMut::new(tm.write(child)?).retain(0..half);
    NodeMut::new(tm.write(parent)?).insert_at(i + 1, n.key(half), &right.to_le_bytes());
    Ok(right)
}

/// Removes `key`. Returns the new root and the removed value (`None` if it was absent).
pub fn remove(
    tm: &mut TransactionManager,
    root: u64,
    key: u64,
    tt: TreeType,
) -> Result<(u64, Option<Value>)> {
    // Look first: a removal of an absent key changes nothing (and shadows nothing).
    if lookup(tm, root, key, tt)?.is_none() {
        return Ok((root, None));
    }
    let mut root = tm.shadow(root, tt.refs)?;
    let mut location = root;
    let mut removed = None;
    for _ in 0..MAX_DEPTH {
        let b = tm.read_node(location)?;
        let n = Node::new(&b);
        if n.is_leaf() {
            check_leaf_value_size(location, &n, tt)?;
            if let Ok(i) = n.search(key) {
                removed = Some(Value::new(n.value(i)));
                NodeMut::new(tm.write(location)?).remove_at(i);
            }
            break;
        }
        let Some(i) = n.lower_bound(key) else { break };
        rebalance_child(tm, location, i, tt)?;
        let b = tm.read_node(location)?;
        let n = Node::new(&b);
        // Rebalancing never changes a node's first key, so the key still has a child here,
        // unless damaged space maps handed out a block of this path again.
        let Some(i) = n.lower_bound(key) else {
            return Err(lost_path(location, key));
        };
        let child = n.value_u64(i);
        let child_new = tm.shadow(child, tt.refs)?;
        if child_new != child {
            NodeMut::new(tm.write(location)?).set_value_u64(i, child_new);
        }
        location = child_new;
    }
    // A root left with a single child hands its place to that child.
    loop {
        let b = tm.read_node(root)?;
        let n = Node::new(&b);
        if !(n.is_internal() && n.nr_entries() == 1) {
            break;
        }
        let child = n.value_u64(0);
        tm.dec(root)?;
        root = child;
    }
    Ok((root, removed))
}

/// Makes child `i` of `parent` hold more than its minimum, by merging it with a sibling or
/// moving entries over from one. `parent` is writable.
fn rebalance_child(tm: &mut TransactionManager, parent: u64, i: usize, tt: TreeType) -> Result<()> {
    let pb = tm.read_node(parent)?;
    let p = Node::new(&pb);
    let nr_children = p.nr_entries();
    let child = tm.read_node(p.value_u64(i))?;
    let cn = Node::new(&child);
    if cn.nr_entries() > min_entries(cn.max_entries() as u32) as usize || nr_children < 2 {
        return Ok(());
    }
    let (left_i, right_i) = if i + 1 < nr_children {
        (i, i + 1)
    } else {
        (i - 1, i)
    };
    check_siblings(tm, parent, &p, left_i, tt)?;
    let left = shadow_child(tm, parent, left_i, tt)?;
    let right = shadow_child(tm, parent, right_i, tt)?;
    let lb: Block = *tm.read_node(left)?;
    let rb: Block = *tm.read_node(right)?;
    let (l, r) = (Node::new(&lb), Node::new(&rb));
    let total = l.nr_entries() + r.nr_entries();
    if total <= l.max_entries() {
        NodeMut::new(tm.write(left)?).append_from(&r, 0..r.nr_entries());
        NodeMut::new(tm.write(parent)?).remove_at(right_i);
        // Its entries moved to `left` with their references; the node itself goes.
        tm.dec(right)?;
    } else {
        let keep = total / 2;
        let mut all = Vec::with_capacity(total);
        all.extend((0..l.nr_entries()).map(|j| (l.key(j), Value::new(l.value(j)))));
        all.extend((0..r.nr_entries()).map(|j| (r.key(j), Value::new(r.value(j)))));
        for (location, entries) in [(left, &all[..keep]), (right, &all[keep..])] {
            let mut w = NodeMut::new(tm.write(location)?);
            w.init(l.flags(), l.value_size() as u32);
            for (j, (k, v)) in entries.iter().enumerate() {
                w.insert_at(j, *k, v.as_bytes());
            }
        }
        NodeMut::new(tm.write(parent)?).set_key(right_i, all[keep].0);
    }
    Ok(())
}

/// Checks that children `left_i` and `left_i + 1` of `parent` may be merged or share out
/// their entries: two distinct nodes of one kind, every key of the left one below the
/// separator and every key of the right one at or above it. Merging trusts this. On damaged
/// metadata that breaks it (a parent listing one child twice, whose shadow copies would be
/// merged into a node holding every key twice; children whose keys overlap) the merged node
/// would have keys out of order, and a commit would write it.
fn check_siblings(
    tm: &mut TransactionManager,
    parent: u64,
    p: &Node<'_>,
    left_i: usize,
    tt: TreeType,
) -> Result<()> {
    let (left, right) = (p.value_u64(left_i), p.value_u64(left_i + 1));
    if left == right {
        return Err(Error::corrupt(parent, Damage::UnexpectedSharing));
    }
    let lb = tm.read_node(left)?;
    let rb = tm.read_node(right)?;
    let (l, r) = (Node::new(&lb), Node::new(&rb));
    if l.flags() != r.flags() || l.value_size() != r.value_size() {
        return Err(Error::corrupt(right, Damage::UnevenDepth));
    }
    check_leaf_value_size(left, &l, tt)?;
    let (low, separator) = (p.key(left_i), p.key(left_i + 1));
    let high = match left_i + 2 {
        next if next < p.nr_entries() => p.key(next),
        _ => u64::MAX,
    };
    if let Some(last) = l.nr_entries().checked_sub(1).map(|j| l.key(j)) {
        if last >= separator {
            let damage = Damage::KeyOutsideParentRange {
                key: last,
                low,
                high: separator,
            };
            return Err(Error::corrupt(left, damage));
        }
    }
    if r.nr_entries() > 0 && r.key(0) < separator {
        let damage = Damage::KeyOutsideParentRange {
            key: r.key(0),
            low: separator,
            high,
        };
        return Err(Error::corrupt(right, damage));
    }
    Ok(())
}

fn shadow_child(tm: &mut TransactionManager, parent: u64, i: usize, tt: TreeType) -> Result<u64> {
    let child = Node::new(&*tm.read_node(parent)?).value_u64(i);
    let new = tm.shadow(child, tt.refs)?;
    if new != child {
        NodeMut::new(tm.write(parent)?).set_value_u64(i, new);
    }
    Ok(new)
}

/// Shadows the path to `key`, which must be present, and returns the new root and the
/// writable leaf holding it with the entry's index. Used to rewrite a value in place.
pub fn shadow_path(
    tm: &mut TransactionManager,
    root: u64,
    key: u64,
    tt: TreeType,
) -> Result<(u64, Option<(u64, usize)>)> {
    if lookup(tm, root, key, tt)?.is_none() {
        return Ok((root, None));
    }
    let root = tm.shadow(root, tt.refs)?;
    let mut location = root;
    for _ in 0..MAX_DEPTH {
        let b = tm.read_node(location)?;
        let n = Node::new(&b);
        if n.is_leaf() {
            check_leaf_value_size(location, &n, tt)?;
            return Ok((root, n.search(key).ok().map(|i| (location, i))));
        }
        // The lookup above went this way; only damaged space maps (a block of this path
        // handed out again) can change the node under it.
        let Some(i) = n.lower_bound(key) else {
            return Err(lost_path(location, key));
        };
        location = shadow_child(tm, location, i, tt)?;
    }
    Err(Error::corrupt(root, Damage::TooDeep))
}

/// Drops one reference to a tree. If it was the last, every node goes and so do the
/// references held by its values (data blocks, subtrees), as the kernel's `dm_btree_del`.
pub fn del(tm: &mut TransactionManager, root: u64, tt: TreeType) -> Result<()> {
    del_at(tm, root, tt, 0)
}

fn del_at(tm: &mut TransactionManager, location: u64, tt: TreeType, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::corrupt(location, Damage::TooDeep));
    }
    if tm.meta_count(location)? > 1 {
        tm.dec(location)?;
        return Ok(());
    }
    let b = tm.read_node(location)?;
    let n = Node::new(&b);
    if n.is_internal() {
        for i in 0..n.nr_entries() {
            del_at(tm, n.value_u64(i), tt, depth + 1)?;
        }
    } else {
        check_leaf_value_size(location, &n, tt)?;
        for i in 0..n.nr_entries() {
            drop_value(tm, tt.refs, n.value_u64_or_zero(i))?;
        }
    }
    tm.dec(location)?;
    Ok(())
}

/// Releases what a value references.
pub fn drop_value(tm: &mut TransactionManager, refs: ValueRefs, value: u64) -> Result<()> {
    match refs {
        ValueRefs::None => Ok(()),
        ValueRefs::DataBlock => tm.data_dec(value >> 24).map(|_| ()),
        ValueRefs::Subtree => del(tm, value, MAPPING_TREE),
    }
}

/// A device's mapping tree: virtual block → block_time.
pub const MAPPING_TREE: TreeType = TreeType {
    value_size: 8,
    refs: ValueRefs::DataBlock,
};
/// The top level of the mapping tree: device id → mapping tree root.
pub const TOP_TREE: TreeType = TreeType {
    value_size: 8,
    refs: ValueRefs::Subtree,
};

/// Calls `f(key, value)` for every entry in key order. Stops at the first error.
pub fn for_each(
    tm: &mut TransactionManager,
    root: u64,
    tt: TreeType,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    // A tree has at most as many nodes as the device has blocks: a walk that visits more is
    // going round a damaged structure (a node listed many times), however shallow.
    let mut budget = tm.meta_sm.nr_blocks();
    walk_at(tm, root, tt, 0, &mut budget, f)
}

fn walk_at(
    tm: &mut TransactionManager,
    location: u64,
    tt: TreeType,
    depth: usize,
    budget: &mut u64,
    f: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::corrupt(location, Damage::TooDeep));
    }
    if *budget == 0 {
        return Err(Error::corrupt(location, Damage::UnexpectedSharing));
    }
    *budget -= 1;
    let b = tm.read_node(location)?;
    let n = Node::new(&b);
    if n.is_internal() {
        for i in 0..n.nr_entries() {
            walk_at(tm, n.value_u64(i), tt, depth + 1, budget, f)?;
        }
        return Ok(());
    }
    check_leaf_value_size(location, &n, tt)?;
    for i in 0..n.nr_entries() {
        f(n.key(i), n.value(i))?;
    }
    Ok(())
}

/// Entries with keys in `[begin, end)`, in order, at most `limit` of them, for a tree of
/// 8-byte values (mapping trees: the read path's hot loop, so no per-value copies).
pub fn range_u64(
    tm: &mut TransactionManager,
    root: u64,
    begin: u64,
    end: u64,
    limit: usize,
    tt: TreeType,
) -> Result<Vec<(u64, u64)>> {
    debug_assert_eq!(tt.value_size, 8);
    let expected = end.saturating_sub(begin).min(limit as u64).min(1024) as usize;
    let mut range = Range {
        begin,
        end,
        limit,
        tt,
        // As in `for_each`: a damaged tree whose internal nodes list one child many times
        // would otherwise be walked once per path to it, exponentially in its depth.
        budget: tm.meta_sm.nr_blocks(),
        out: Vec::with_capacity(expected),
    };
    range.walk(tm, root, 0)?;
    Ok(range.out)
}

/// One `range_u64` walk: what it looks for, what it may still read, what it found.
struct Range {
    begin: u64,
    end: u64,
    limit: usize,
    tt: TreeType,
    budget: u64,
    out: Vec<(u64, u64)>,
}

impl Range {
    fn walk(&mut self, tm: &mut TransactionManager, location: u64, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(Error::corrupt(location, Damage::TooDeep));
        }
        if self.budget == 0 {
            return Err(Error::corrupt(location, Damage::UnexpectedSharing));
        }
        self.budget -= 1;
        let b = tm.read_node(location)?;
        let n = Node::new(&b);
        if n.is_leaf() {
            check_leaf_value_size(location, &n, self.tt)?;
            let start = match n.search(self.begin) {
                Ok(i) | Err(i) => i,
            };
            for i in start..n.nr_entries() {
                if n.key(i) >= self.end || self.out.len() >= self.limit {
                    break;
                }
                self.out.push((n.key(i), n.value_u64(i)));
            }
            return Ok(());
        }
        let first = n.lower_bound(self.begin).unwrap_or(0);
        for i in first..n.nr_entries() {
            if n.key(i) >= self.end || self.out.len() >= self.limit {
                break;
            }
            self.walk(tm, n.value_u64(i), depth + 1)?;
        }
        Ok(())
    }
}
