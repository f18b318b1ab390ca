//! `trim`: gives the data blocks a pool does not use back to the data device, as
//! `thin_trim` does: every run of blocks the data space map counts as free is discarded
//! (a hole punched in a data file, `BLKDISCARD` on a block device).
//!
//! A wrong space map would make this discard live data, so the metadata is checked first
//! (the full [`super::check`], data reference counts included) and trim refuses anything
//! but clean metadata, or metadata that needs checking. The pool must be offline: the
//! caller holds its ownership lock.

use std::sync::Arc;

use crate::error::{DeviceRole, Error};
use crate::io::BlockDevice;
use crate::thin::metadata::Metadata;

use super::check::{check, CheckOptions};

/// What a trim discarded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrimReport {
    /// Data blocks in the pool.
    pub nr_data_blocks: u64,
    /// Free data blocks, all discarded.
    pub nr_free_blocks: u64,
    /// Runs of free blocks, one discard each.
    pub nr_ranges: u64,
    /// Bytes discarded.
    pub bytes: u64,
}

/// Why a trim refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum TrimError {
    /// The metadata is damaged: its space map cannot be trusted.
    #[error("the metadata is damaged ({nr_errors} errors, first: {first}); run check and repair")]
    Damaged { nr_errors: u64, first: String },
    /// The data device is smaller than the pool's data space.
    #[error("the data device ({size} bytes) is smaller than the pool ({needed} bytes)")]
    DataTooSmall { size: u64, needed: u64 },
    /// The superblock's data space (blocks × block size) does not fit in 64 bits, so no
    /// data device can hold it.
    #[error(
        "the pool's data space ({nr_data_blocks} blocks of {block_size} bytes) is larger \
         than any device"
    )]
    DataTooLarge {
        nr_data_blocks: u64,
        block_size: u64,
    },
    /// Reading the metadata or discarding failed.
    #[error(transparent)]
    Pool(#[from] Error),
}

/// Discards every free data block of the pool whose metadata is `meta` on `data`.
/// `progress(done, all)` counts data blocks examined.
///
/// On `Err` some ranges may already have been discarded (all of them free).
pub fn trim(
    meta: Arc<dyn BlockDevice>,
    data: &dyn BlockDevice,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TrimReport, TrimError> {
    let report = check(&*meta, &CheckOptions::default());
    if !report.is_clean() || report.needs_check {
        let first = report
            .errors()
            .next()
            .map_or_else(|| "needs_check is set".to_string(), |f| f.to_string());
        return Err(TrimError::Damaged {
            nr_errors: report.nr_errors(),
            first,
        });
    }
    let md = Metadata::open(meta)?;
    let bs = md.data_block_size().bytes();
    let nr = md.nr_data_blocks();
    // Once this fits, so does every discard's `start * bs` and `(end - start) * bs` below
    // (`end <= nr`).
    let needed = data_space_bytes(nr, bs)?;
    if data.size() < needed {
        return Err(TrimError::DataTooSmall {
            size: data.size(),
            needed,
        });
    }
    let mut out = TrimReport {
        nr_data_blocks: nr,
        ..TrimReport::default()
    };
    let discard = |start: u64, end: u64, out: &mut TrimReport| -> Result<(), TrimError> {
        let (offset, len) = (start * bs, (end - start) * bs);
        data.discard(offset, len).map_err(|source| Error::Io {
            role: DeviceRole::Data,
            device: data.describe(),
            offset,
            source,
        })?;
        out.nr_ranges += 1;
        out.nr_free_blocks += end - start;
        out.bytes += len;
        Ok(())
    };
    let mut run: Option<u64> = None;
    for b in 0..nr {
        let free = md.data_block_count(b) == 0;
        match (free, run) {
            (true, None) => run = Some(b),
            (false, Some(start)) => {
                discard(start, b, &mut out)?;
                run = None;
            }
            _ => {}
        }
        if b % 16384 == 0 {
            progress(b, nr);
        }
    }
    if let Some(start) = run {
        discard(start, nr, &mut out)?;
    }
    data.sync().map_err(|source| Error::Io {
        role: DeviceRole::Data,
        device: data.describe(),
        offset: 0,
        source,
    })?;
    progress(nr, nr);
    Ok(out)
}

/// Bytes of `nr` data blocks of `bs` bytes. Both come from the superblock, and check bounds
/// them only separately (40-bit block numbers, 1 GiB blocks): nothing there refuses a pool
/// of 2^34 or more 1 GiB blocks whose metadata device (4.1 GiB or more) holds the million
/// bitmaps that takes, and its size overflows 64 bits.
fn data_space_bytes(nr: u64, bs: u64) -> Result<u64, TrimError> {
    nr.checked_mul(bs).ok_or(TrimError::DataTooLarge {
        nr_data_blocks: nr,
        block_size: bs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{MAX_DATA_BLOCKS, MAX_DATA_BLOCK_SECTORS, SECTOR_SIZE};

    #[test]
    fn a_data_space_past_64_bits_is_refused_not_wrapped() {
        let gib = u64::from(MAX_DATA_BLOCK_SECTORS) * SECTOR_SIZE;
        assert_eq!(
            data_space_bytes((1 << 34) - 1, gib).unwrap(),
            u64::MAX - gib + 1
        );
        for nr in [1 << 34, MAX_DATA_BLOCKS] {
            let err = data_space_bytes(nr, gib).unwrap_err();
            assert!(matches!(err, TrimError::DataTooLarge { .. }), "{err}");
        }
    }
}
