use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};

use super::{check_range, BlockDevice};

/// How a [`FileDevice`] is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    ReadOnly,
    ReadWrite,
}

/// A regular file (sparse) or a block device (loop or raw disk).
///
/// Block devices are opened with `O_EXCL`, so the kernel refuses a second exclusive opener
/// (a mounted filesystem, another pool); their size comes from the kernel. Both are opened
/// with `O_NOATIME` where the caller may (the file's owner, or `CAP_FOWNER`): a pool's files
/// have no use for access times, and checking whether one is due cost up to 7 % of a cached
/// 4 KiB read here.
pub struct FileDevice {
    file: File,
    path: PathBuf,
    is_block_device: bool,
    /// Read on every IO (a plain load); changed only by `grow`/`reset_file`, one at a time.
    size: std::sync::atomic::AtomicU64,
    resizing: parking_lot::Mutex<()>,
}

nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blk_discard, nix::request_code_none!(0x12, 119), [u64; 2]);

impl FileDevice {
    /// Creates a sparse regular file of `size` bytes. Fails if the path exists.
    pub fn create(path: &Path, size: u64) -> io::Result<FileDevice> {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create_new(true);
        // Whoever creates the file owns it, so O_NOATIME is always allowed here.
        let file = options.custom_flags(nix::libc::O_NOATIME).open(path)?;
        file.set_len(size)?;
        Self::from_file(file, path, false)
    }

    /// Opens an existing regular file or block device.
    pub fn open(path: &Path, mode: OpenMode) -> io::Result<FileDevice> {
        let meta = std::fs::metadata(path)?;
        let is_block_device = meta.file_type().is_block_device();
        let mut options = OpenOptions::new();
        options.read(true).write(mode == OpenMode::ReadWrite);
        let exclusive = if is_block_device && mode == OpenMode::ReadWrite {
            nix::libc::O_EXCL
        } else {
            0
        };
        let file = match options
            .custom_flags(exclusive | nix::libc::O_NOATIME)
            .open(path)
        {
            // Neither the owner nor CAP_FOWNER: O_NOATIME is not ours to ask for.
            Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => {
                options.custom_flags(exclusive).open(path)
            }
            r => r,
        }
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::EBUSY) {
                io::Error::new(io::ErrorKind::ResourceBusy, "device is busy")
            } else {
                e
            }
        })?;
        if !is_block_device && !meta.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or a block device",
            ));
        }
        Self::from_file(file, path, is_block_device)
    }

    fn from_file(file: File, path: &Path, is_block_device: bool) -> io::Result<FileDevice> {
        let size = if is_block_device {
            block_device_size(&file)?
        } else {
            file.metadata()?.len()
        };
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            is_block_device,
            size: std::sync::atomic::AtomicU64::new(size),
            resizing: parking_lot::Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Empties a regular file and gives it a new size (sparse); a block device is left as it
    /// is. For formatting over an old pool.
    pub fn reset_file(&self, size: u64) -> io::Result<()> {
        if self.is_block_device {
            return Ok(());
        }
        let _resizing = self.resizing.lock();
        self.file.set_len(0)?;
        self.file.set_len(size)?;
        self.file.sync_all()?;
        self.size.store(size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// The open file, for locking.
    pub fn file(&self) -> &File {
        &self.file
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut size = 0u64;
    // Safety: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`.
    #[allow(unsafe_code)]
    unsafe { blk_get_size64(file.as_raw_fd(), &mut size) }.map_err(io::Error::from)?;
    Ok(size)
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, buf.len())?;
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        // fdatasync: the size of a pool file only changes through `grow`, which syncs itself.
        self.file.sync_data()
    }

    fn start_writeback(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // Safety: sync_file_range only reads its scalar arguments.
        #[allow(unsafe_code)]
        let r = unsafe {
            nix::libc::sync_file_range(
                self.file.as_raw_fd(),
                0,
                0,
                nix::libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size(), offset, len as usize)?;
        if self.is_block_device {
            use std::os::fd::AsRawFd;
            let range = [offset, len];
            // Safety: BLKDISCARD reads two u64 (offset, length) through the pointer.
            #[allow(unsafe_code)]
            let result = unsafe { blk_discard(self.file.as_raw_fd(), &range) };
            return match result {
                Ok(_) => Ok(()),
                // A device without discard support keeps the old bytes, which the contract allows.
                Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&self.file),
            flags,
            offset as i64,
            len as i64,
        ) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn grow(&self, new_size: u64) -> io::Result<()> {
        let _resizing = self.resizing.lock();
        if new_size <= self.size() {
            return Ok(());
        }
        if self.is_block_device {
            let actual = block_device_size(&self.file)?;
            if actual < new_size {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("block device is {actual} bytes, smaller than {new_size}"),
                ));
            }
        } else {
            self.file.set_len(new_size)?;
            self.file.sync_all()?;
        }
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
