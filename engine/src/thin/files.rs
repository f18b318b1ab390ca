//! Pools on named devices: a directory holding `metadata` and `data` files (sparse, like
//! Docker's loop-lvm), or any two paths naming regular files, loop devices or raw block
//! devices. Opening for writing takes the pool's ownership lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{DeviceRole, Error, Result};
use crate::io::lock::{lock_exclusive, LockError};
use crate::io::{BlockDevice, FileDevice, OpenMode};
use crate::thin::pool::{Pool, PoolOptions};
use crate::units::DataBlockSize;

/// Where a pool's two devices are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPaths {
    pub metadata: PathBuf,
    pub data: PathBuf,
}

impl PoolPaths {
    /// `DIR/metadata` and `DIR/data`.
    pub fn in_dir(dir: &Path) -> PoolPaths {
        PoolPaths {
            metadata: dir.join("metadata"),
            data: dir.join("data"),
        }
    }
}

/// Sizes for a new pool's files (ignored for block devices, whose size is their own).
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
/// and block devices are used at their own size (their old contents are lost).
pub fn create(paths: &PoolPaths, new: NewPool, options: PoolOptions) -> Result<Arc<Pool>> {
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

/// Opens an existing pool; for writing it becomes the pool's one owner.
pub fn open(paths: &PoolPaths, options: PoolOptions) -> Result<Arc<Pool>> {
    let mode = if options.read_only {
        OpenMode::ReadOnly
    } else {
        OpenMode::ReadWrite
    };
    let meta = open_device(DeviceRole::Metadata, &paths.metadata, mode)?;
    if !options.read_only {
        take_ownership(&meta)?;
    }
    let data = open_device(DeviceRole::Data, &paths.data, mode)?;
    let meta: Arc<dyn BlockDevice> = meta;
    let data: Arc<dyn BlockDevice> = data;
    Pool::open(meta, data, options)
}
