//! The superblock (metadata block 0). Layout in `docs/format.md`.

use crate::block::{self, read_u32, read_u64, write_u32, write_u64, Block, BlockKind};
use crate::error::{Damage, Error, Result};
use crate::pdata::space_map::disk::{SmRoot, MAX_METADATA_BLOCKS};

pub const MAGIC: u64 = 27_022_010;
/// Version 2: the kernel honours NEEDS_CHECK. The layout is the same as version 1.
pub const VERSION: u32 = 2;
pub const FLAG_NEEDS_CHECK: u32 = 1;
const METADATA_BLOCK_SECTORS: u32 = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub flags: u32,
    pub uuid: [u8; 16],
    pub version: u32,
    pub time: u32,
    pub transaction_id: u64,
    pub held_root: u64,
    pub data_sm_root: SmRoot,
    pub metadata_sm_root: SmRoot,
    pub data_mapping_root: u64,
    pub device_details_root: u64,
    pub data_block_size: u32,
    pub metadata_nr_blocks: u64,
    pub compat_flags: u32,
    pub compat_ro_flags: u32,
    pub incompat_flags: u32,
}

impl Superblock {
    pub fn needs_check(&self) -> bool {
        self.flags & FLAG_NEEDS_CHECK != 0
    }

    /// Decodes block 0 without judging it (the checker and dump want to see bad fields).
    pub fn decode(b: &Block) -> Superblock {
        let mut uuid = [0; 16];
        uuid.copy_from_slice(&b[16..32]);
        Superblock {
            flags: read_u32(b, 4),
            uuid,
            version: read_u32(b, 40),
            time: read_u32(b, 44),
            transaction_id: read_u64(b, 48),
            held_root: read_u64(b, 56),
            data_sm_root: SmRoot::decode(&b[64..96]),
            metadata_sm_root: SmRoot::decode(&b[192..224]),
            data_mapping_root: read_u64(b, 320),
            device_details_root: read_u64(b, 328),
            data_block_size: read_u32(b, 336),
            metadata_nr_blocks: read_u64(b, 344),
            compat_flags: read_u32(b, 352),
            compat_ro_flags: read_u32(b, 356),
            incompat_flags: read_u32(b, 360),
        }
    }

    /// Reads and checks a superblock (or a held copy at `location`).
    pub fn read(b: &Block, location: u64) -> Result<Superblock> {
        block::verify(b, location, BlockKind::Superblock)
            .map_err(|d| Error::corrupt(location, d))?;
        let magic = read_u64(b, 32);
        if magic != MAGIC {
            return Err(Error::corrupt(location, Damage::BadMagic(magic)));
        }
        let sb = Superblock::decode(b);
        let bad = |what: String| Err(Error::corrupt(location, Damage::BadSuperblock(what)));
        if sb.incompat_flags != 0 || sb.compat_ro_flags != 0 {
            return Err(Error::corrupt(
                location,
                Damage::UnsupportedFeatures {
                    incompat: sb.incompat_flags,
                    compat_ro: sb.compat_ro_flags,
                },
            ));
        }
        if read_u32(b, 340) != METADATA_BLOCK_SECTORS {
            return bad(format!(
                "metadata block size {} sectors (must be 8)",
                read_u32(b, 340)
            ));
        }
        if location == 0 {
            if crate::units::DataBlockSize::from_sectors(sb.data_block_size).is_none() {
                return bad(format!("data block size {} sectors", sb.data_block_size));
            }
            if sb.metadata_sm_root.nr_blocks > MAX_METADATA_BLOCKS {
                return bad(format!(
                    "metadata space map of {} blocks",
                    sb.metadata_sm_root.nr_blocks
                ));
            }
            if sb.time > crate::units::MAX_TIME {
                return bad(format!("time {} beyond 24 bits", sb.time));
            }
        }
        Ok(sb)
    }

    /// Encodes into a block (the checksum is added when the block is sealed).
    pub fn encode(&self) -> Box<Block> {
        let mut b = block::zeroed();
        write_u32(&mut b[..], 4, self.flags);
        b[16..32].copy_from_slice(&self.uuid);
        write_u64(&mut b[..], 32, MAGIC);
        write_u32(&mut b[..], 40, self.version);
        write_u32(&mut b[..], 44, self.time);
        write_u64(&mut b[..], 48, self.transaction_id);
        write_u64(&mut b[..], 56, self.held_root);
        self.data_sm_root.encode(&mut b[64..96]);
        self.metadata_sm_root.encode(&mut b[192..224]);
        write_u64(&mut b[..], 320, self.data_mapping_root);
        write_u64(&mut b[..], 328, self.device_details_root);
        write_u32(&mut b[..], 336, self.data_block_size);
        write_u32(&mut b[..], 340, METADATA_BLOCK_SECTORS);
        write_u64(&mut b[..], 344, self.metadata_nr_blocks);
        write_u32(&mut b[..], 352, self.compat_flags);
        write_u32(&mut b[..], 356, self.compat_ro_flags);
        write_u32(&mut b[..], 360, self.incompat_flags);
        b
    }
}

/// Clears NEEDS_CHECK on an offline metadata device (after a check found it clean), changing
/// only the flags and the checksum, as `thin_check --clear-needs-check-flag` does.
pub fn clear_needs_check(dev: &dyn crate::io::BlockDevice) -> Result<()> {
    let io = |e| Error::Io {
        role: crate::error::DeviceRole::Metadata,
        device: dev.describe(),
        offset: 0,
        source: e,
    };
    let mut b = block::zeroed();
    dev.read_at(&mut b[..], 0).map_err(io)?;
    let sb = Superblock::read(&b, 0)?;
    if !sb.needs_check() {
        return Ok(());
    }
    write_u32(&mut b[..], 4, sb.flags & !FLAG_NEEDS_CHECK);
    block::seal(&mut b, 0, BlockKind::Superblock);
    dev.write_at(&b[..], 0).map_err(io)?;
    dev.sync().map_err(io)
}
