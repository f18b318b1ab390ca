//! Checksummed 4 KiB metadata blocks: the salted CRC-32C every block carries and the rule
//! that every block knows its own location.

use crate::error::Damage;

/// Bytes in a metadata block.
pub const BLOCK_SIZE: usize = 4096;

/// One metadata block's bytes.
pub type Block = [u8; BLOCK_SIZE];

/// A zero-filled block on the heap.
pub fn zeroed() -> Box<Block> {
    Box::new([0; BLOCK_SIZE])
}

/// The kinds of checksummed blocks, each with its own checksum salt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Superblock,
    Node,
    Bitmap,
    Index,
}

impl BlockKind {
    pub const fn salt(self) -> u32 {
        match self {
            BlockKind::Superblock => 160_774,
            BlockKind::Node => 121_107,
            BlockKind::Bitmap => 240_779,
            BlockKind::Index => 160_478,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            BlockKind::Superblock => "superblock",
            BlockKind::Node => "btree node",
            BlockKind::Bitmap => "space map bitmap",
            BlockKind::Index => "space map index",
        }
    }

    /// Which kind a block's stored checksum says it is, if any.
    pub fn identify(block: &Block) -> Option<BlockKind> {
        let raw = crc_register(block);
        let stored = read_u32(block, 0);
        [
            BlockKind::Superblock,
            BlockKind::Node,
            BlockKind::Bitmap,
            BlockKind::Index,
        ]
        .into_iter()
        .find(|k| raw ^ k.salt() == stored)
    }
}

/// The kernel's checksum register: CRC-32C over bytes 4.. with initial value !0 and no final
/// inversion (the standard CRC-32C inverts at the end, so invert it back).
fn crc_register(block: &Block) -> u32 {
    !crc32c::crc32c(&block[4..])
}

/// The checksum a block of `kind` must store.
pub fn checksum(block: &Block, kind: BlockKind) -> u32 {
    crc_register(block) ^ kind.salt()
}

/// Stamps the block's location and checksum. Call last, after every other byte is final.
pub fn seal(block: &mut Block, location: u64, kind: BlockKind) {
    block[8..16].copy_from_slice(&location.to_le_bytes());
    let csum = checksum(block, kind);
    block[0..4].copy_from_slice(&csum.to_le_bytes());
}

/// Verifies checksum and location of a block read from `location`.
pub fn verify(block: &Block, location: u64, kind: BlockKind) -> Result<(), Damage> {
    let stored = read_u32(block, 0);
    let computed = checksum(block, kind);
    if stored != computed {
        return Err(Damage::BadChecksum {
            kind: kind.name(),
            stored,
            computed,
        });
    }
    let found = read_u64(block, 8);
    if found != location {
        return Err(Damage::WrongLocation {
            kind: kind.name(),
            found,
        });
    }
    Ok(())
}

pub fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

pub fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

pub fn write_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

pub fn write_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnoli() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn seal_then_verify_and_identify() {
        let mut b = zeroed();
        b[100] = 42;
        seal(&mut b, 17, BlockKind::Bitmap);
        assert_eq!(verify(&b, 17, BlockKind::Bitmap), Ok(()));
        assert!(matches!(
            verify(&b, 18, BlockKind::Bitmap),
            Err(Damage::WrongLocation { .. })
        ));
        assert!(matches!(
            verify(&b, 17, BlockKind::Node),
            Err(Damage::BadChecksum { .. })
        ));
        assert_eq!(BlockKind::identify(&b), Some(BlockKind::Bitmap));
        b[200] = 1;
        assert_eq!(BlockKind::identify(&b), None);
    }
}
