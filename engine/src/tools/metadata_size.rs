//! `metadata_size`: how much metadata a pool needs, by the estimate `thin_metadata_size`
//! 0.9.0 makes (same inputs, same figure).
//!
//! The estimate counts 4 KiB metadata blocks: one for the superblock, one mapping-tree leaf
//! per 126 data blocks (a leaf holds at most 252 mappings; the estimate assumes leaves are
//! half full, as b-tree nodes are on average) and one block per thin device:
//!
//! ```text
//! blocks = 1 + (2 * pool_sectors / block_sectors) / 252 + max_thins     (integer division)
//! ```
//!
//! It leaves out the space maps, internal nodes and the details tree; they are small next to
//! the leaves of a fully provisioned pool, and the kernel and the tools have always sized
//! pools by this figure, so we keep it rather than give admins a second number.

/// 4 KiB metadata blocks in 512-byte sectors.
const SECTORS_PER_METADATA_BLOCK: u64 = 8;
/// Entries of a full mapping-tree leaf (value size 8: see `docs/format.md`).
const MAPPINGS_PER_LEAF: u64 = 252;

/// Why no estimate can be made; the messages are `thin_metadata_size`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("block size required")]
    NoBlockSize,
    #[error("pool size required")]
    NoPoolSize,
    #[error("max thins required")]
    NoMaxThins,
    #[error("block size must be a power of 2 sectors")]
    BlockSizeNotPowerOfTwo,
    #[error("pool size must be larger than block size")]
    PoolNotLargerThanBlock,
    #[error("the estimate does not fit in 64 bits")]
    TooLarge,
}

/// The estimated metadata size, in 512-byte sectors, for a pool of `pool_sectors` with data
/// blocks of `block_sectors` and at most `max_thins` thin devices and snapshots in all.
///
/// `Err` exactly where `thin_metadata_size` refuses (zero inputs, a block size that is not a
/// power of two, a pool no larger than one block), and `TooLarge` where its arithmetic would
/// overflow.
pub fn estimate_sectors(
    block_sectors: u64,
    pool_sectors: u64,
    max_thins: u64,
) -> Result<u64, SizeError> {
    if block_sectors == 0 {
        return Err(SizeError::NoBlockSize);
    }
    if pool_sectors == 0 {
        return Err(SizeError::NoPoolSize);
    }
    if max_thins == 0 {
        return Err(SizeError::NoMaxThins);
    }
    if !block_sectors.is_power_of_two() {
        return Err(SizeError::BlockSizeNotPowerOfTwo);
    }
    if pool_sectors <= block_sectors {
        return Err(SizeError::PoolNotLargerThanBlock);
    }
    let leaves =
        pool_sectors.checked_mul(2).ok_or(SizeError::TooLarge)? / block_sectors / MAPPINGS_PER_LEAF;
    leaves
        .checked_add(1)
        .and_then(|b| b.checked_add(max_thins))
        .and_then(|b| b.checked_mul(SECTORS_PER_METADATA_BLOCK))
        .ok_or(SizeError::TooLarge)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terabyte_of_64k_blocks_for_1000_thins() {
        // thin_metadata_size -b 64k -s 1t -m 1000: 1073224 sectors.
        assert_eq!(estimate_sectors(128, 1 << 31, 1000), Ok(1_073_224));
    }

    #[test]
    fn bad_inputs_are_refused_in_the_tools_order() {
        assert_eq!(estimate_sectors(0, 0, 0), Err(SizeError::NoBlockSize));
        assert_eq!(estimate_sectors(128, 0, 0), Err(SizeError::NoPoolSize));
        assert_eq!(estimate_sectors(128, 256, 0), Err(SizeError::NoMaxThins));
        assert_eq!(
            estimate_sectors(96, 256, 1),
            Err(SizeError::BlockSizeNotPowerOfTwo)
        );
        assert_eq!(
            estimate_sectors(128, 128, 1),
            Err(SizeError::PoolNotLargerThanBlock)
        );
        assert_eq!(estimate_sectors(1, u64::MAX, 1), Err(SizeError::TooLarge));
    }
}
