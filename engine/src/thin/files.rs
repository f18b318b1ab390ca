//! Pools on named devices: a directory holding `metadata` and `data` files (sparse, like
//! Docker's loop-lvm), any two paths naming regular files, loop devices or raw block
//! devices, or one such device split into a metadata region and a data region
//! ([`SplitLayout`]). Opening for writing takes the pool's ownership lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::block;
use crate::error::{DeviceRole, Error, Result};
use crate::io::lock::{lock_exclusive, LockError};
use crate::io::{BlockDevice, FileDevice, OpenMode, RegionDevice};
use crate::pdata::space_map::disk::MAX_METADATA_BLOCKS;
use crate::thin::metadata::superblock::Superblock;
use crate::thin::pool::{Pool, PoolOptions};
use crate::units::{format_size, DataBlockSize, METADATA_BLOCK_SIZE};

/// How a pool's metadata and data lie on its devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// Two devices or files: `metadata` and `data`.
    #[default]
    Separate,
    /// One device (`metadata` and `data` both name it): the metadata region at its start,
    /// the data region after it, as [`SplitLayout`] describes.
    Split,
}

/// Where a pool's two devices are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPaths {
    pub metadata: PathBuf,
    pub data: PathBuf,
    pub layout: Layout,
}

impl PoolPaths {
    /// `DIR/metadata` and `DIR/data`.
    pub fn in_dir(dir: &Path) -> PoolPaths {
        PoolPaths {
            metadata: dir.join("metadata"),
            data: dir.join("data"),
            layout: Layout::Separate,
        }
    }

    /// Two named devices or files.
    pub fn separate(metadata: &Path, data: &Path) -> PoolPaths {
        PoolPaths {
            metadata: metadata.to_path_buf(),
            data: data.to_path_buf(),
            layout: Layout::Separate,
        }
    }

    /// One device holding both regions ([`SplitLayout`]).
    pub fn split(device: &Path) -> PoolPaths {
        PoolPaths {
            metadata: device.to_path_buf(),
            data: device.to_path_buf(),
            layout: Layout::Split,
        }
    }

    /// Whether metadata and data share one device.
    pub fn is_split(&self) -> bool {
        self.layout == Layout::Split
    }
}

/// A split device's (metadata region, data region).
pub type Regions = (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>);

/// The two regions of a device that holds a whole pool.
///
/// The metadata region is the first `metadata_len` bytes; the data region starts at the
/// first data-block boundary at or after its end and holds whole data blocks only. Nothing
/// but the pool's superblock records the split: `metadata_len` is the metadata space map's
/// `nr_blocks` (× 4 KiB), which format sets to the region's size and which only a metadata
/// resize changes, and a resize is refused on a split device (the data region follows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitLayout {
    /// Bytes of metadata from the start of the device (whole 4 KiB blocks).
    pub metadata_len: u64,
    /// Where the data region starts, a multiple of the data block size.
    pub data_offset: u64,
    /// Bytes of the data region, whole data blocks.
    pub data_len: u64,
}

impl SplitLayout {
    /// The regions for a new pool: `metadata_size` bytes of metadata, the rest data.
    ///
    /// Fails when `metadata_size` is not whole 4 KiB blocks, is smaller than the 256 KiB a
    /// pool needs or larger than dm-thin metadata can address, or leaves no data block.
    pub fn plan(
        device: &str,
        device_size: u64,
        metadata_size: u64,
        block_size: DataBlockSize,
    ) -> Result<SplitLayout> {
        if !metadata_size.is_multiple_of(METADATA_BLOCK_SIZE) {
            return Err(Error::InvalidArgument(format!(
                "metadata size {metadata_size} for {device} is not a multiple of 4 KiB"
            )));
        }
        let nr_blocks = metadata_size / METADATA_BLOCK_SIZE;
        if nr_blocks < 64 {
            return Err(Error::InvalidArgument(format!(
                "metadata size {} for {device} is too small (at least 256 KiB)",
                format_size(metadata_size)
            )));
        }
        if nr_blocks > MAX_METADATA_BLOCKS {
            return Err(Error::InvalidArgument(format!(
                "metadata size {} for {device} is more than dm-thin metadata can address ({})",
                format_size(metadata_size),
                format_size(MAX_METADATA_BLOCKS * METADATA_BLOCK_SIZE)
            )));
        }
        Self::from_metadata_blocks(device, device_size, nr_blocks, block_size)
    }

    /// The regions of the pool on `dev`, from the superblock at its start.
    ///
    /// Fails when the device holds no intact superblock (the split is unknown then: repair
    /// the metadata region first) or is too small for what the superblock says.
    pub fn read(dev: &dyn BlockDevice) -> Result<SplitLayout> {
        let mut b = block::zeroed();
        let io = |e| Error::Io {
            role: DeviceRole::Metadata,
            device: dev.describe(),
            offset: 0,
            source: e,
        };
        if dev.size() < METADATA_BLOCK_SIZE {
            return Err(Error::InvalidArgument(format!(
                "{} is too small to hold a pool ({} bytes)",
                dev.describe(),
                dev.size()
            )));
        }
        dev.read_at(&mut b[..], 0).map_err(io)?;
        let sb = Superblock::read(&b, 0).map_err(|e| {
            Error::InvalidArgument(format!(
                "{} holds no intact pool superblock, so where its metadata ends and its data \
                 begins is unknown ({e})",
                dev.describe()
            ))
        })?;
        let block_size = DataBlockSize::from_sectors(sb.data_block_size).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: superblock has data block size {} sectors",
                dev.describe(),
                sb.data_block_size
            ))
        })?;
        Self::from_metadata_blocks(
            &dev.describe(),
            dev.size(),
            sb.metadata_sm_root.nr_blocks,
            block_size,
        )
    }

    fn from_metadata_blocks(
        device: &str,
        device_size: u64,
        nr_metadata_blocks: u64,
        block_size: DataBlockSize,
    ) -> Result<SplitLayout> {
        let metadata_len = nr_metadata_blocks * METADATA_BLOCK_SIZE;
        let data_offset = metadata_len.next_multiple_of(block_size.bytes());
        let data_len =
            device_size.saturating_sub(data_offset) / block_size.bytes() * block_size.bytes();
        if data_len == 0 {
            return Err(Error::InvalidArgument(format!(
                "{device} ({}) has no room for a data block of {} after {} of metadata",
                format_size(device_size),
                format_size(block_size.bytes()),
                format_size(metadata_len)
            )));
        }
        Ok(SplitLayout {
            metadata_len,
            data_offset,
            data_len,
        })
    }

    /// The two regions of `dev` as devices: (metadata, data). The data region may grow
    /// with the device; the metadata region never grows.
    pub fn regions(&self, dev: Arc<dyn BlockDevice>) -> Result<Regions> {
        let err = |e: std::io::Error| Error::InvalidArgument(e.to_string());
        let meta = RegionDevice::new(dev.clone(), 0, self.metadata_len, false, "metadata region")
            .map_err(err)?;
        let data = RegionDevice::new(dev, self.data_offset, self.data_len, true, "data region")
            .map_err(err)?;
        Ok((Arc::new(meta), Arc::new(data)))
    }
}

/// Sizes for a new pool's files (ignored for block devices, whose size is their own). On a
/// split device `metadata_size` is always the metadata region's size, and a missing file is
/// made with room for both regions.
#[derive(Clone, Copy, Debug)]
pub struct NewPool {
    pub data_size: u64,
    pub metadata_size: u64,
    pub block_size: DataBlockSize,
    /// Format over an existing pool (its thins are lost). Without it, a metadata device that
    /// holds a pool is refused.
    pub overwrite: bool,
}

impl NewPool {
    pub fn new(data_size: u64, metadata_size: u64, block_size: DataBlockSize) -> NewPool {
        NewPool {
            data_size,
            metadata_size,
            block_size,
            overwrite: false,
        }
    }
}

/// Whether a device starts with a dm-thin superblock (its magic, whatever else is damaged).
fn holds_pool(dev: &FileDevice) -> Result<bool> {
    let mut head = [0u8; 40];
    if dev.size() < head.len() as u64 {
        return Ok(false);
    }
    dev.read_at(&mut head, 0)
        .map_err(|e| io_err(DeviceRole::Metadata, dev.path(), e))?;
    Ok(head[32..40] == crate::thin::metadata::superblock::MAGIC.to_le_bytes())
}

fn io_err(role: DeviceRole, path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        role,
        device: path.display().to_string(),
        offset: 0,
        source: e,
    }
}

fn open_device(role: DeviceRole, path: &Path, mode: OpenMode) -> Result<Arc<FileDevice>> {
    FileDevice::open(path, mode).map(Arc::new).map_err(|e| {
        if e.kind() == std::io::ErrorKind::ResourceBusy {
            Error::Busy {
                what: format!("{role} {}", path.display()),
                holder: "device is busy (open exclusively elsewhere)".into(),
            }
        } else {
            io_err(role, path, e)
        }
    })
}

/// Opens a device for writing, creating a sparse file of `size` when the path is missing.
fn open_or_create(role: DeviceRole, path: &Path, size: u64) -> Result<Arc<FileDevice>> {
    if path.exists() {
        open_device(role, path, OpenMode::ReadWrite)
    } else {
        FileDevice::create(path, size)
            .map(Arc::new)
            .map_err(|e| io_err(role, path, e))
    }
}

fn take_ownership(meta: &FileDevice) -> Result<()> {
    lock_exclusive(meta.file()).map_err(|e| match e {
        LockError::Held(holder) => Error::Busy {
            what: format!("pool metadata {}", meta.path().display()),
            holder,
        },
        LockError::Io(e) => io_err(DeviceRole::Metadata, meta.path(), e),
    })
}

/// Formats a new pool. Missing files are created sparse at the given sizes; existing files
/// and block devices are used at their own size (their old contents are lost). A split
/// device gets `metadata_size` bytes of metadata and the rest as data (a missing file is
/// created with room for both).
pub fn create(paths: &PoolPaths, new: NewPool, options: PoolOptions) -> Result<Arc<Pool>> {
    if paths.is_split() {
        return create_split(&paths.metadata, new, options);
    }
    refuse_one_device_twice(paths)?;
    let meta = open_or_create(DeviceRole::Metadata, &paths.metadata, new.metadata_size)?;
    take_ownership(&meta)?;
    if holds_pool(&meta)? {
        if !new.overwrite {
            return Err(Error::InvalidArgument(format!(
                "{} already holds a pool (overwrite it to lose its thins)",
                paths.metadata.display()
            )));
        }
        // Regular files start over at the sizes asked for, so nothing old survives in them.
        meta.reset_file(new.metadata_size)
            .map_err(|e| io_err(DeviceRole::Metadata, &paths.metadata, e))?;
        if let Ok(data) = open_device(DeviceRole::Data, &paths.data, OpenMode::ReadWrite) {
            data.reset_file(new.data_size)
                .map_err(|e| io_err(DeviceRole::Data, &paths.data, e))?;
        }
    }
    let data = open_or_create(DeviceRole::Data, &paths.data, new.data_size)?;
    let meta: Arc<dyn BlockDevice> = meta;
    let data: Arc<dyn BlockDevice> = data;
    Pool::format(meta, data, new.block_size, options)
}

fn create_split(path: &Path, new: NewPool, options: PoolOptions) -> Result<Arc<Pool>> {
    let metadata_region = new.metadata_size.next_multiple_of(new.block_size.bytes());
    let file_size = metadata_region.checked_add(new.data_size).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "metadata size {} and data size {} for {} overflow",
            new.metadata_size,
            new.data_size,
            path.display()
        ))
    })?;
    if !path.exists() {
        // Refuse bad sizes before a file is made.
        SplitLayout::plan(
            &path.display().to_string(),
            file_size,
            new.metadata_size,
            new.block_size,
        )?;
    }
    // The device is opened once and both regions share it: a block device is opened
    // O_EXCL, which a second open would be refused.
    let dev = open_or_create(DeviceRole::Metadata, path, file_size)?;
    take_ownership(&dev)?;
    if holds_pool(&dev)? {
        if !new.overwrite {
            return Err(Error::InvalidArgument(format!(
                "{} already holds a pool (overwrite it to lose its thins)",
                path.display()
            )));
        }
        dev.reset_file(file_size)
            .map_err(|e| io_err(DeviceRole::Metadata, path, e))?;
    }
    let layout = SplitLayout::plan(
        &path.display().to_string(),
        dev.size(),
        new.metadata_size,
        new.block_size,
    )?;
    tracing::debug!(
        device = %path.display(),
        metadata_len = layout.metadata_len,
        data_offset = layout.data_offset,
        data_len = layout.data_len,
        "split device"
    );
    let (meta, data) = layout.regions(dev)?;
    Pool::format(meta, data, new.block_size, options)
}

/// Opens the two regions of the split device at `path` (the device once, shared by both),
/// taking the pool's ownership lock unless `mode` is read-only.
pub fn open_split_regions(path: &Path, mode: OpenMode) -> Result<(Regions, SplitLayout)> {
    let dev = open_device(DeviceRole::Metadata, path, mode)?;
    if mode == OpenMode::ReadWrite {
        take_ownership(&dev)?;
    }
    let dev: Arc<dyn BlockDevice> = dev;
    let layout = SplitLayout::read(&*dev)?;
    Ok((layout.regions(dev)?, layout))
}

/// Opens an existing pool; for writing it becomes the pool's one owner.
pub fn open(paths: &PoolPaths, options: PoolOptions) -> Result<Arc<Pool>> {
    let mode = if options.read_only {
        OpenMode::ReadOnly
    } else {
        OpenMode::ReadWrite
    };
    if paths.is_split() {
        let ((meta, data), _) = open_split_regions(&paths.metadata, mode)?;
        return Pool::open(meta, data, options);
    }
    refuse_one_device_twice(paths)?;
    let meta = open_device(DeviceRole::Metadata, &paths.metadata, mode)?;
    if !options.read_only {
        take_ownership(&meta)?;
    }
    let data = open_device(DeviceRole::Data, &paths.data, mode)?;
    let meta: Arc<dyn BlockDevice> = meta;
    let data: Arc<dyn BlockDevice> = data;
    Pool::open(meta, data, options)
}

/// Refuses separate metadata and data paths that name one file or device: the data would
/// overwrite the metadata. One device for both is a split device ([`PoolPaths::split`]).
fn refuse_one_device_twice(paths: &PoolPaths) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let (Ok(m), Ok(d)) = (
        std::fs::metadata(&paths.metadata),
        std::fs::metadata(&paths.data),
    ) else {
        return Ok(());
    };
    let both_block = m.file_type().is_block_device() && d.file_type().is_block_device();
    if (m.dev(), m.ino()) == (d.dev(), d.ino()) || (both_block && m.rdev() == d.rdev()) {
        return Err(Error::InvalidArgument(format!(
            "metadata {} and data {} are the same device; to keep both on one device, split \
             it (dmtool --device)",
            paths.metadata.display(),
            paths.data.display()
        )));
    }
    Ok(())
}

/// The metadata on `dev` as far as its pool's metadata space map reaches, for the offline
/// tools: `dev` itself, unless it starts with an intact superblock whose metadata space map
/// covers less than all of `dev`; then only the blocks it covers (`true` says so). Nothing
/// past them is metadata: on a split device it is the data region, which a tool that scans
/// or formats the whole device would misread or destroy.
pub fn metadata_extent(dev: Arc<dyn BlockDevice>) -> (Arc<dyn BlockDevice>, bool) {
    let mut b = block::zeroed();
    if dev.size() < METADATA_BLOCK_SIZE || dev.read_at(&mut b[..], 0).is_err() {
        return (dev, false);
    }
    let Ok(sb) = Superblock::read(&b, 0) else {
        return (dev, false);
    };
    let len = sb
        .metadata_sm_root
        .nr_blocks
        .saturating_mul(METADATA_BLOCK_SIZE);
    if len == 0 || len >= dev.size() {
        return (dev, false);
    }
    match RegionDevice::new(dev.clone(), 0, len, false, "metadata region") {
        Ok(region) => (Arc::new(region), true),
        Err(_) => (dev, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemDevice;
    use crate::units::ThinId;

    const MIB: u64 = 1 << 20;

    #[test]
    fn split_layout_comes_back_from_the_superblock() {
        let bs = DataBlockSize::from_bytes(128 * 1024).unwrap();
        // 1 MiB + 4 KiB of metadata: the data region starts at the next 128 KiB boundary.
        let plan = SplitLayout::plan("dev", 16 * MIB, MIB + 4096, bs).unwrap();
        assert_eq!(plan.metadata_len, MIB + 4096);
        assert_eq!(plan.data_offset, MIB + 128 * 1024);
        assert_eq!(plan.data_len, 16 * MIB - plan.data_offset);
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(16 * MIB + 1000));
        let (meta, data) = plan.regions(dev.clone()).unwrap();
        let pool = Pool::format(meta, data, bs, PoolOptions::default()).unwrap();
        pool.create_thin(ThinId::new(1).unwrap()).unwrap();
        pool.commit().unwrap();
        drop(pool);
        let read = SplitLayout::read(&*dev).unwrap();
        assert_eq!(read, plan);
        let (extent, cut) = metadata_extent(dev.clone());
        assert!(cut);
        assert_eq!(extent.size(), plan.metadata_len);
    }

    #[test]
    fn split_sizes_that_cannot_work_are_refused() {
        let bs = DataBlockSize::DEFAULT;
        for (size, meta) in [
            (16 * MIB, MIB + 1),
            (16 * MIB, 128 * 1024),
            (16 * MIB, 16 * MIB),
            (u64::MAX, MAX_METADATA_BLOCKS * 4096 + 4096),
        ] {
            let err = SplitLayout::plan("/dev/x", size, meta, bs).unwrap_err();
            assert!(err.to_string().contains("/dev/x"), "{err}");
        }
    }

    #[test]
    fn one_file_named_as_both_devices_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk");
        std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let paths = PoolPaths::separate(&file, &link);
        let new = NewPool::new(MIB, MIB, DataBlockSize::DEFAULT);
        let refused = |result: Result<Arc<Pool>>| match result {
            Ok(_) => panic!("one file as both devices was taken"),
            Err(e) => assert!(e.to_string().contains("are the same device"), "{e}"),
        };
        refused(create(&paths, new, PoolOptions::default()));
        refused(open(&paths, PoolOptions::default()));
    }

    #[test]
    fn a_device_without_a_superblock_has_no_known_split() {
        let dev = MemDevice::new(16 * MIB);
        let err = SplitLayout::read(&dev).unwrap_err();
        assert!(
            err.to_string().contains("no intact pool superblock"),
            "{err}"
        );
    }
}
