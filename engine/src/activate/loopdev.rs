//! Loop devices: a file (here, a thin served over FUSE) seen by the kernel as a block device.
//!
//! Attaching uses `LOOP_CTL_GET_FREE` and `LOOP_CONFIGURE` (one ioctl sets the file, the
//! flags and the block size, so no half-configured device is ever visible). Detaching uses
//! `LOOP_CLR_FD`, whose kernel semantics shape this API: the kernel never refuses it, it
//! marks the device "autoclear" and detaches when its last opener closes. So
//! [`LoopDevice::detach`] asks first whether anyone uses the device ([`LoopDevice::users`])
//! and refuses with a clear "busy" error, while [`LoopDevice::detach_deferred`] is the kernel's
//! lazy detach as it is: the device goes away when the filesystem on it is unmounted (Docker's
//! deferred removal).

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

const LOOP_CONTROL: &str = "/dev/loop-control";

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    fn zeroed() -> LoopInfo64 {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }
}

#[allow(unsafe_code)]
mod ioctls {
    use super::{LoopConfig, LoopInfo64};
    nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
    nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
    nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
    nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);
}

/// How to attach.
#[derive(Clone, Copy, Debug)]
pub struct LoopOptions {
    /// Direct IO on the backing file (no second page cache). Falls back to buffered IO, with a
    /// warning, when the backing file cannot do it.
    pub direct_io: bool,
    pub read_only: bool,
    /// Logical block size: 512, 1024, 2048 or 4096.
    pub block_size: u32,
}

impl Default for LoopOptions {
    fn default() -> LoopOptions {
        LoopOptions {
            direct_io: true,
            read_only: false,
            block_size: 512,
        }
    }
}

/// An attached loop device, `/dev/loopN`. Dropping it does not detach: a loop device outlives
/// the process that made it, as the kernel intends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopDevice {
    number: u32,
}

/// Who keeps a block device busy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum User {
    /// A filesystem is mounted from it.
    Mounted(PathBuf),
    /// A process has it open.
    Process { pid: u32, command: String },
    /// Someone holds it exclusively (another device stacked on it, or an exclusive opener).
    Holder(String),
}

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            User::Mounted(at) => write!(f, "mounted on {}", at.display()),
            User::Process { pid, command } => write!(f, "open by pid {pid} ({command})"),
            User::Holder(h) => write!(f, "held by {h}"),
        }
    }
}

fn loop_error(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::Activation(format!("{what}: {e}"))
}

impl LoopDevice {
    /// Attaches `backing` to a free loop device.
    pub fn attach(backing: &Path, options: LoopOptions) -> Result<LoopDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .open(backing)
            .map_err(|e| loop_error(format_args!("failed to open {}", backing.display()), e))?;
        match Self::attach_file(&file, backing, options) {
            Err(Error::Activation(msg)) if options.direct_io && msg.contains("EINVAL") => {
                tracing::warn!(
                    backing = %backing.display(),
                    "the backing file refuses direct IO; attaching with buffered IO"
                );
                let buffered = LoopOptions {
                    direct_io: false,
                    ..options
                };
                Self::attach_file(&file, backing, buffered)
            }
            other => other,
        }
    }

    fn attach_file(file: &File, backing: &Path, options: LoopOptions) -> Result<LoopDevice> {
        let control = File::open(LOOP_CONTROL)
            .map_err(|e| loop_error(format_args!("failed to open {LOOP_CONTROL}"), e))?;
        let mut info = LoopInfo64::zeroed();
        info.lo_flags = if options.read_only {
            LO_FLAGS_READ_ONLY
        } else {
            0
        } | if options.direct_io {
            LO_FLAGS_DIRECT_IO
        } else {
            0
        };
        let name = backing.as_os_str().as_encoded_bytes();
        let n = name.len().min(63);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        let config = LoopConfig {
            fd: file.as_raw_fd() as u32,
            block_size: options.block_size,
            info,
            reserved: [0; 8],
        };
        // Another process may take the free device between the two ioctls: try again.
        for _ in 0..16 {
            // SAFETY: the ioctl takes no argument and returns a device number.
            #[allow(unsafe_code)]
            let number = unsafe { ioctls::loop_ctl_get_free(control.as_raw_fd()) }
                .map_err(|e| loop_error("no free loop device (LOOP_CTL_GET_FREE)", e))?;
            let dev = LoopDevice {
                number: number as u32,
            };
            // Opened for writing: the kernel makes the device read-only otherwise.
            let node = match open_node(&dev.path(), !options.read_only, false) {
                Ok(node) => node,
                Err(e) => return Err(loop_error(format_args!("{}", dev.path().display()), e)),
            };
            // SAFETY: `config` is a valid loop_config that outlives the call.
            #[allow(unsafe_code)]
            let configured = unsafe { ioctls::loop_configure(node.as_raw_fd(), &config) };
            match configured {
                Ok(_) => {
                    tracing::debug!(device = %dev.path().display(), backing = %backing.display(), "loop attached");
                    return Ok(dev);
                }
                Err(nix::errno::Errno::EBUSY) => continue,
                Err(e) => {
                    return Err(loop_error(
                        format_args!(
                            "failed to attach {} to {} (LOOP_CONFIGURE, {:?})",
                            backing.display(),
                            dev.path().display(),
                            e
                        ),
                        e.desc(),
                    ))
                }
            }
        }
        Err(Error::Activation(
            "failed to find a free loop device: others kept taking them".to_string(),
        ))
    }

    /// The device `/dev/loopN` names, if it is a loop device.
    pub fn from_path(path: &Path) -> Option<LoopDevice> {
        let name = path.file_name()?.to_str()?;
        let number = name.strip_prefix("loop")?.parse().ok()?;
        Some(LoopDevice { number })
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/loop{}", self.number))
    }

    fn sys_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/block/loop{}", self.number))
    }

    /// The file behind the device, or None when nothing is attached.
    pub fn backing_file(&self) -> Option<PathBuf> {
        let text = fs::read_to_string(self.sys_dir().join("loop/backing_file")).ok()?;
        let text = text.trim_end_matches('\n');
        let text = text.strip_suffix(" (deleted)").unwrap_or(text);
        Some(PathBuf::from(text))
    }

    /// Whether the device will detach on its last close.
    pub fn autoclear(&self) -> bool {
        fs::read_to_string(self.sys_dir().join("loop/autoclear")).is_ok_and(|t| t.trim() == "1")
    }

    /// Every loop device attached to `backing` (compared as paths).
    pub fn find_by_backing(backing: &Path) -> Vec<LoopDevice> {
        Self::all()
            .into_iter()
            .filter(|d| d.backing_file().as_deref() == Some(backing))
            .collect()
    }

    /// Every attached loop device.
    pub fn all() -> Vec<LoopDevice> {
        let Ok(entries) = fs::read_dir("/sys/block") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| LoopDevice::from_path(Path::new(&e.file_name())))
            .filter(|d| d.backing_file().is_some())
            .collect()
    }

    /// The device number (major, minor) from sysfs.
    fn dev_numbers(&self) -> Option<(u32, u32)> {
        let text = fs::read_to_string(self.sys_dir().join("dev")).ok()?;
        let (major, minor) = text.trim().split_once(':')?;
        Some((major.parse().ok()?, minor.parse().ok()?))
    }

    /// Who uses the device: mounts, holders, exclusive openers and processes with it open.
    /// Empty means detaching now cannot break anyone.
    pub fn users(&self) -> Vec<User> {
        let mut users = Vec::new();
        let numbers = self.dev_numbers();
        if let (Some((major, minor)), Ok(mountinfo)) =
            (numbers, fs::read_to_string("/proc/self/mountinfo"))
        {
            users.extend(
                mounts_of(&mountinfo, major, minor)
                    .into_iter()
                    .map(User::Mounted),
            );
        }
        if let Ok(holders) = fs::read_dir(self.sys_dir().join("holders")) {
            for h in holders.flatten() {
                users.push(User::Holder(h.file_name().to_string_lossy().into_owned()));
            }
        }
        let path = self.path();
        if users.is_empty() {
            // A mount in another mount namespace is invisible in our mountinfo, but it holds
            // the device exclusively, so an exclusive open tells.
            if let Err(e) = open_node(&path, false, true) {
                if e.raw_os_error() == Some(nix::errno::Errno::EBUSY as i32) {
                    users.push(User::Holder(
                        "an exclusive opener (a mount in another namespace?)".to_string(),
                    ));
                }
            }
        }
        if let Some((major, minor)) = numbers {
            users.extend(processes_with_open(&path, major, minor));
        }
        users
    }

    /// Detaches now, or fails with [`Error::Busy`] naming who uses the device.
    pub fn detach(&self) -> Result<()> {
        let users = self.users();
        if !users.is_empty() {
            return Err(Error::Busy {
                what: self.path().display().to_string(),
                holder: users
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        self.clear()?;
        // The kernel detaches when our descriptor closes; wait for it to be seen.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.backing_file().is_some() {
            if Instant::now() > deadline {
                return Err(Error::Busy {
                    what: self.path().display().to_string(),
                    holder: "a user who opened it while it was being detached".to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Detaches when the last user closes the device (at once when there is none).
    pub fn detach_deferred(&self) -> Result<()> {
        self.clear()
    }

    fn clear(&self) -> Result<()> {
        let node = open_node(&self.path(), false, false)
            .map_err(|e| loop_error(format_args!("failed to open {}", self.path().display()), e))?;
        // SAFETY: LOOP_CLR_FD takes no argument.
        #[allow(unsafe_code)]
        let cleared = unsafe { ioctls::loop_clr_fd(node.as_raw_fd()) };
        match cleared {
            Ok(_) | Err(nix::errno::Errno::ENXIO) => Ok(()),
            Err(e) => Err(loop_error(
                format_args!("failed to detach {} (LOOP_CLR_FD)", self.path().display()),
                e.desc(),
            )),
        }
    }

    /// The flags the kernel holds for the device (LOOP_GET_STATUS64), for diagnostics.
    pub fn direct_io(&self) -> Option<bool> {
        let node = open_node(&self.path(), false, false).ok()?;
        let mut info = LoopInfo64::zeroed();
        // SAFETY: `info` is a valid, writable loop_info64.
        #[allow(unsafe_code)]
        let got = unsafe { ioctls::loop_get_status64(node.as_raw_fd(), &mut info) };
        got.ok()?;
        Some(info.lo_flags & LO_FLAGS_DIRECT_IO != 0)
    }
}

/// Opens a device node without blocking on it, for writing too when `write`; `exclusive`
/// adds O_EXCL (for block devices: fail with EBUSY when mounted or claimed).
fn open_node(path: &Path, write: bool, exclusive: bool) -> std::io::Result<File> {
    let mut flags = nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK;
    if exclusive {
        flags |= nix::fcntl::OFlag::O_EXCL;
    }
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags.bits())
        .open(path)
}

/// Every mount point in this mount namespace.
pub(crate) fn mount_points() -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|point| PathBuf::from(unescape_mountinfo(point)))
        .collect()
}

/// Mount points in `mountinfo` whose source is the device `major:minor`.
fn mounts_of(mountinfo: &str, major: u32, minor: u32) -> Vec<PathBuf> {
    let dev = format!("{major}:{minor}");
    mountinfo
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _id = fields.next()?;
            let _parent = fields.next()?;
            let numbers = fields.next()?;
            let _root = fields.next()?;
            let point = fields.next()?;
            (numbers == dev).then(|| PathBuf::from(unescape_mountinfo(point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        {
            let code = u8::from_str_radix(&field[i + 1..i + 4], 8).unwrap_or(b'?');
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Processes (other than this one) with the block device open.
fn processes_with_open(path: &Path, major: u32, minor: u32) -> Vec<User> {
    let me = std::process::id();
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let rdev = nix::sys::stat::makedev(u64::from(major), u64::from(minor));
    let mut users = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            let Ok(target) = fs::read_link(fd.path()) else {
                return false;
            };
            if target == path {
                return true;
            }
            // A node of the same device under another name.
            target.starts_with("/dev")
                && fs::metadata(&target)
                    .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == rdev)
        });
        if holds {
            let command = fs::read_to_string(p.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default();
            users.push(User::Process { pid, command });
        }
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_name_their_mount_points() {
        let info = "36 35 98:0 /mnt1 /mnt/my\\040disk rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 7:3 / /srv/a rw - ext4 /dev/loop3 rw\n\
                    38 35 7:30 / /srv/b rw - ext4 /dev/loop30 rw\n";
        assert_eq!(mounts_of(info, 7, 3), vec![PathBuf::from("/srv/a")]);
        assert_eq!(mounts_of(info, 98, 0), vec![PathBuf::from("/mnt/my disk")]);
        assert!(mounts_of(info, 7, 4).is_empty());
    }

    #[test]
    fn loop_paths_parse() {
        assert_eq!(
            LoopDevice::from_path(Path::new("/dev/loop12")).map(|d| d.path()),
            Some(PathBuf::from("/dev/loop12"))
        );
        assert_eq!(LoopDevice::from_path(Path::new("/dev/sda")), None);
        assert_eq!(LoopDevice::from_path(Path::new("/dev/loop-control")), None);
    }
}
