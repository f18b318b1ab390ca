//! Raw metadata block access for the tools. Blocks are read straight from the device, one at
//! a time and without a cache, and judged here by the format's rules; the transaction
//! manager is not used because it stops at the first damage and the tools must see past it.

use std::io;

use crate::block::{self, Block, BlockKind, BLOCK_SIZE};
use crate::error::Damage;
use crate::io::BlockDevice;
use crate::pdata::btree::node::{self, Node};

/// Whole metadata blocks on `dev`.
pub(super) fn device_blocks(dev: &dyn BlockDevice) -> u64 {
    dev.size() / BLOCK_SIZE as u64
}

/// Byte offset of metadata block `loc`, or `None` when it cannot be addressed at all.
pub(super) fn offset(loc: u64) -> Option<u64> {
    loc.checked_mul(BLOCK_SIZE as u64)
}

/// Reads metadata block `loc`. Precondition: `loc` passed [`check_pointer`].
pub(super) fn read_block(dev: &dyn BlockDevice, loc: u64) -> io::Result<Box<Block>> {
    let mut b = block::zeroed();
    let at =
        offset(loc).ok_or_else(|| io::Error::other(format!("block {loc} is not addressable")))?;
    dev.read_at(&mut b[..], at)?;
    Ok(b)
}

/// Judges a pointer to a metadata block before it is followed: block 0 is the superblock,
/// which nothing may point at, and `end` is the first block past the usable device.
pub(super) fn check_pointer(loc: u64, end: u64) -> Result<(), Damage> {
    if loc == 0 {
        Err(Damage::PointerToSuperblock)
    } else if loc >= end {
        Err(Damage::PointerPastEnd(loc))
    } else {
        Ok(())
    }
}

/// Checks a b-tree node read from `loc`: checksum and location, the header rules of
/// [`node::validate_header`] (which also order the keys), and for a leaf that its values
/// are `leaf_value_size` bytes. `Ok` means every key and value of the node can be read.
pub(super) fn validate_node(b: &Block, loc: u64, leaf_value_size: u32) -> Result<(), Damage> {
    block::verify(b, loc, BlockKind::Node)?;
    node::validate_header(b)?;
    let n = Node::new(b);
    if n.is_leaf() && n.value_size() != leaf_value_size as usize {
        return Err(Damage::ValueSizeMismatch {
            expected: leaf_value_size,
            found: n.value_size() as u32,
        });
    }
    Ok(())
}
