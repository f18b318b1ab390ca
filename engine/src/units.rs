//! Units in types: every number that names a place or a size on one of the pool's devices
//! says which device and which unit it is in, so a metadata block is never used as a data
//! block and a byte offset never as a sector.

use std::fmt;

/// Bytes in one metadata block: fixed by the dm-thin format.
pub const METADATA_BLOCK_SIZE: u64 = 4096;
/// Bytes in one sector, the kernel's unit for sizes in tables and the superblock.
pub const SECTOR_SIZE: u64 = 512;

/// The smallest data block the kernel accepts (64 KiB); every data block size is a multiple.
pub const MIN_DATA_BLOCK_SECTORS: u32 = 128;
/// The largest data block the kernel accepts (1 GiB).
pub const MAX_DATA_BLOCK_SECTORS: u32 = 2_097_152;

/// Largest thin device id the kernel's pool messages accept (24 bits).
pub const MAX_THIN_ID: u64 = (1 << 24) - 1;
/// Mapping times are stored in 24 bits of the block_time value.
pub const MAX_TIME: u32 = (1 << 24) - 1;
/// Data block numbers are stored in 40 bits of the block_time value.
pub const MAX_DATA_BLOCKS: u64 = 1 << 40;

macro_rules! newtype_u64 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

newtype_u64!(
    /// A block of the metadata device (4096 bytes); 0 is the superblock.
    MetaBlock
);
newtype_u64!(
    /// A block of the data device, `data_block_size` sectors long.
    DataBlock
);
newtype_u64!(
    /// A block of a thin device's virtual address space, the same size as a data block.
    VBlock
);
newtype_u64!(
    /// The pool's userspace transaction id (`set_transaction_id`).
    TransactionId
);
newtype_u64!(
    /// A length or offset in 512-byte sectors.
    Sectors
);
newtype_u64!(
    /// A length or offset in bytes.
    Bytes
);

/// A thin device id: chosen by the pool's user, at most 24 bits as the kernel requires.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ThinId(u32);

impl ThinId {
    /// Builds an id, refusing values the kernel would refuse (more than 24 bits).
    pub fn new(id: u64) -> Option<ThinId> {
        (id <= MAX_THIN_ID).then_some(ThinId(id as u32))
    }

    pub fn get(self) -> u64 {
        u64::from(self.0)
    }
}

impl fmt::Debug for ThinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ThinId({})", self.0)
    }
}

impl fmt::Display for ThinId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Bytes {
    pub fn sectors_floor(self) -> Sectors {
        Sectors(self.0 / SECTOR_SIZE)
    }
}

impl Sectors {
    pub fn bytes(self) -> Bytes {
        Bytes(self.0 * SECTOR_SIZE)
    }
}

/// Data block size, kept in sectors as the superblock stores it. Always a multiple of
/// 128 sectors between 64 KiB and 1 GiB (the kernel's rule).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DataBlockSize(u32);

impl DataBlockSize {
    pub const DEFAULT: DataBlockSize = DataBlockSize(MIN_DATA_BLOCK_SECTORS);

    pub fn from_sectors(sectors: u32) -> Option<DataBlockSize> {
        let ok = (MIN_DATA_BLOCK_SECTORS..=MAX_DATA_BLOCK_SECTORS).contains(&sectors)
            && sectors.is_multiple_of(MIN_DATA_BLOCK_SECTORS);
        ok.then_some(DataBlockSize(sectors))
    }

    pub fn from_bytes(bytes: u64) -> Option<DataBlockSize> {
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        u32::try_from(bytes / SECTOR_SIZE)
            .ok()
            .and_then(Self::from_sectors)
    }

    pub fn sectors(self) -> u32 {
        self.0
    }

    pub fn bytes(self) -> u64 {
        u64::from(self.0) * SECTOR_SIZE
    }

    /// The block a byte offset falls in and the offset within it. Shifts and masks for the
    /// usual power-of-two sizes: a 64-bit division costs more than the rest of a cached read.
    #[inline]
    pub fn split(self, offset: u64) -> (u64, u64) {
        let bytes = self.bytes();
        if bytes.is_power_of_two() {
            (offset >> bytes.trailing_zeros(), offset & (bytes - 1))
        } else {
            (offset / bytes, offset % bytes)
        }
    }
}

/// The pool's snapshot clock, 24 bits in mappings.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default)]
pub struct SnapTime(pub u32);

/// Parses a size such as `100G`, `64k`, `512` (bytes), `2T`; binary units.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = digits.parse().ok()?;
    let shift = match unit.to_ascii_lowercase().trim_end_matches(['b', 'i']) {
        "" => 0,
        "s" => return n.checked_mul(SECTOR_SIZE),
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return None,
    };
    n.checked_mul(1u64 << shift)
}

/// Formats bytes the way people read them: `64KiB`, `1.5GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{}{}", value as u64, UNITS[unit])
    } else {
        format!("{:.1}{}", value, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("100G"), Some(100 << 30));
        assert_eq!(parse_size("2T"), Some(2 << 40));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("8s"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999999999T"), None);
    }

    #[test]
    fn data_block_sizes_follow_the_kernel_rule() {
        assert!(DataBlockSize::from_bytes(64 << 10).is_some());
        assert!(DataBlockSize::from_bytes(1 << 30).is_some());
        assert!(DataBlockSize::from_bytes(96 << 10).is_none());
        assert!(DataBlockSize::from_bytes(2 << 30).is_none());
        assert!(DataBlockSize::from_bytes(32 << 10).is_none());
    }

    #[test]
    fn split_agrees_with_division() {
        for kib in [64u64, 192, 1024] {
            let bs = DataBlockSize::from_bytes(kib << 10).unwrap();
            for offset in [0, 1, 65535, 65536, 196_607, 196_608, u64::MAX - 7] {
                let b = bs.bytes();
                assert_eq!(
                    bs.split(offset),
                    (offset / b, offset % b),
                    "{kib}K at {offset}"
                );
            }
        }
    }

    #[test]
    fn thin_ids_are_24_bits() {
        assert!(ThinId::new(MAX_THIN_ID).is_some());
        assert!(ThinId::new(MAX_THIN_ID + 1).is_none());
    }
}
