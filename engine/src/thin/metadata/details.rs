//! Device details (24-byte values of the details tree) and mapping values (block_time).

use crate::block::{read_u32, read_u64, write_u32, write_u64};
use crate::pdata::btree::TreeType;
use crate::tm::ValueRefs;

pub const DETAILS_TREE: TreeType = TreeType {
    value_size: 24,
    refs: ValueRefs::None,
};

/// What the details tree records of one thin device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
pub struct DeviceDetails {
    /// Mappings the device has (kept exact: `thin_ls` reports it).
    pub mapped_blocks: u64,
    /// The pool's transaction id when the device was created.
    pub transaction_id: u64,
    /// The pool's time when the device was created.
    pub creation_time: u32,
    /// The pool's time at the latest snapshot of this device (or its creation).
    pub snapshotted_time: u32,
}

impl DeviceDetails {
    pub fn decode(v: &[u8]) -> DeviceDetails {
        DeviceDetails {
            mapped_blocks: read_u64(v, 0),
            transaction_id: read_u64(v, 8),
            creation_time: read_u32(v, 16),
            snapshotted_time: read_u32(v, 20),
        }
    }

    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0; 24];
        write_u64(&mut b, 0, self.mapped_blocks);
        write_u64(&mut b, 8, self.transaction_id);
        write_u32(&mut b, 16, self.creation_time);
        write_u32(&mut b, 20, self.snapshotted_time);
        b
    }
}

/// A mapping value: data block in the high 40 bits, the time it was written in the low 24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockTime {
    pub block: u64,
    pub time: u32,
}

impl BlockTime {
    pub fn decode(v: u64) -> BlockTime {
        BlockTime {
            block: v >> 24,
            time: (v & 0xFF_FFFF) as u32,
        }
    }

    pub fn encode(self) -> u64 {
        debug_assert!(self.block < crate::units::MAX_DATA_BLOCKS);
        debug_assert!(self.time <= crate::units::MAX_TIME);
        (self.block << 24) | u64::from(self.time)
    }
}
