//! The FUSE export: thin devices served as regular files in a FUSE mount of our own, so a
//! loop device (with direct IO) on top gives the kernel a block device without device-mapper.
//!
//! This speaks the FUSE low-level protocol over `/dev/fuse` directly (no libfuse, no
//! fusermount: we are root and call `mount(2)`), because the cost that matters is CPU per
//! request. Worker threads each read requests from their own cloned `/dev/fuse` fd into a
//! buffer of their own and write each reply with one `write`; READ and WRITE data moves
//! between the kernel's buffer and the pool with no copy of ours. Files open with
//! `FOPEN_DIRECT_IO` (the pool is the one copy of the data: no page cache) and
//! `FOPEN_PARALLEL_DIRECT_WRITES`.
//!
//! The directory is flat and owned by root: files are published with [`FuseExport::add`] and
//! withdrawn with [`FuseExport::remove`]; nothing can be created, renamed or unlinked through
//! the mount. A file behaves like a block device of fixed size: reads stop at its end, a
//! write starting at or past its end fails with EFBIG (one crossing it is cut short), and a
//! size change (truncate) fails with EPERM. Errors map to errnos: ENOSPC for a full pool
//! (data or metadata), EROFS for a read-only export or pool, EIO for anything else and for
//! handles still open on a removed file.

mod proto;
mod server;

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::mount::{MntFlags, MsFlags};
use parking_lot::RwLock;

use crate::error::{Error, Result};
use crate::thin::device::Thin;
use server::{InitState, Node, Shared, Worker};

/// How long [`FuseExport::mount`] waits for the kernel's INIT before giving up.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `Drop` waits for the workers after a lazy unmount before leaving them to finish
/// on their own (they end when the kernel lets go of the mount, e.g. once a loop device on
/// one of its files is detached).
const DROP_JOIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How a mount is served.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Worker threads, each with its own `/dev/fuse` fd and buffers (about 2 MiB each).
    /// Requests in flight at once are at most this many; at least 1.
    pub workers: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { workers: 8 }
    }
}

/// One FUSE mount: a flat directory of thin files served by worker threads.
///
/// Dropping it unmounts lazily (`MNT_DETACH`) and never panics, so a failing test leaves no
/// mount behind; [`FuseExport::unmount`] is the orderly way.
pub struct FuseExport {
    mountpoint: PathBuf,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    mounted: bool,
}

fn os_err(what: String, e: impl Into<std::io::Error>) -> Error {
    Error::ActivationIo {
        what,
        source: e.into(),
    }
}

/// `FUSE_DEV_IOC_CLONE`: `_IOR(229, 0, uint32_t)` in `include/uapi/linux/fuse.h`.
const FUSE_DEV_IOC_CLONE: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_read!(229, 0, std::mem::size_of::<u32>());

/// A new `/dev/fuse` fd attached to the same connection as `session`, with its own queue of
/// requests being processed, so workers do not contend on one fd.
#[allow(unsafe_code)]
fn clone_fd(session: &OwnedFd) -> std::io::Result<OwnedFd> {
    let fd: OwnedFd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?
        .into();
    let mut source = session.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the fd to clone) through the pointer, which
    // points at a live local u32 for the whole call; both fds are open and owned here.
    let rc = unsafe {
        nix::libc::ioctl(
            fd.as_raw_fd(),
            FUSE_DEV_IOC_CLONE,
            std::ptr::addr_of_mut!(source),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

fn check_empty_dir(mountpoint: &Path) -> Result<()> {
    let mut entries = std::fs::read_dir(mountpoint).map_err(|e| {
        os_err(
            format!(
                "mount point {} is not a readable directory",
                mountpoint.display()
            ),
            e,
        )
    })?;
    if entries.next().is_some() {
        return Err(Error::InvalidArgument(format!(
            "mount point {} is not empty",
            mountpoint.display()
        )));
    }
    Ok(())
}

/// A file name the directory can hold: one path component, not `.` or `..`.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 255
        || name.contains(['/', '\0'])
    {
        return Err(Error::InvalidArgument(format!(
            "{name:?} is not a valid file name for a fuse export"
        )));
    }
    Ok(())
}

impl FuseExport {
    /// Mounts an empty directory at `mountpoint` (which must exist and be empty) served by
    /// `options.workers` threads, and returns once the kernel has finished INIT.
    ///
    /// Needs root (`mount(2)`) and `/dev/fuse`. Errors: `InvalidArgument` for a mount point
    /// that is not an empty directory; `Activation` when a system call fails or INIT does
    /// not complete (nothing stays mounted then).
    pub fn mount(mountpoint: &Path, options: ExportOptions) -> Result<FuseExport> {
        check_empty_dir(mountpoint)?;
        let mountpoint = mountpoint
            .canonicalize()
            .map_err(|e| os_err(format!("failed to resolve {}", mountpoint.display()), e))?;
        let session: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .map_err(|e| os_err("failed to open /dev/fuse".into(), e))?
            .into();
        let data = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions,\
             max_read={}",
            session.as_raw_fd(),
            proto::MAX_WRITE
        );
        nix::mount::mount(
            Some("thinbox"),
            &mountpoint,
            Some("fuse"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
        .map_err(|e| {
            os_err(
                format!("failed to mount fuse at {}", mountpoint.display()),
                e,
            )
        })?;
        // From here on Drop unmounts whatever goes wrong.
        let mut export = FuseExport {
            mountpoint,
            shared: Arc::new(Shared::new()),
            workers: Vec::new(),
            mounted: true,
        };
        let session = Arc::new(session);
        for i in 0..options.workers.max(1) {
            let fd = if i == 0 {
                session.clone()
            } else {
                match clone_fd(&session) {
                    Ok(fd) => Arc::new(fd),
                    Err(e) => {
                        tracing::debug!(error = %e, "FUSE_DEV_IOC_CLONE failed; sharing one fd");
                        session.clone()
                    }
                }
            };
            let worker = Worker::new(fd, export.shared.clone());
            let handle = std::thread::Builder::new()
                .name(format!("fuse-{i}"))
                .spawn(move || worker.run())
                .map_err(|e| os_err("failed to start a fuse worker".into(), e))?;
            export.workers.push(handle);
        }
        drop(session);
        export.wait_for_init()?;
        tracing::debug!(mountpoint = %export.mountpoint.display(), workers = export.workers.len(), "fuse export mounted");
        Ok(export)
    }

    fn wait_for_init(&self) -> Result<()> {
        let deadline = Instant::now() + INIT_TIMEOUT;
        let mut state = self.shared.init.lock();
        loop {
            match &*state {
                InitState::Done => return Ok(()),
                InitState::Failed(why) => {
                    return Err(os_err(
                        format!("fuse init failed at {}: {why}", self.mountpoint.display()),
                        std::io::ErrorKind::Other,
                    ))
                }
                InitState::Pending => {}
            }
            if self
                .shared
                .init_done
                .wait_until(&mut state, deadline)
                .timed_out()
            {
                return Err(os_err(
                    format!(
                        "no fuse init at {} in {INIT_TIMEOUT:?}",
                        self.mountpoint.display()
                    ),
                    std::io::ErrorKind::TimedOut,
                ));
            }
        }
    }

    /// Where the directory is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Publishes `thin` as the file `name` (one path component, e.g. "7") of `size` bytes,
    /// mode 0600, or 0400 and refusing writes with EROFS when `read_only`. Returns its path.
    ///
    /// Errors: `InvalidArgument` if the name is not a valid file name or is already
    /// published (the thin is dropped then).
    pub fn add(&self, name: &str, thin: Thin, size: u64, read_only: bool) -> Result<PathBuf> {
        check_name(name)?;
        let mut files = self.shared.files.write();
        if files.names.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "{name} is already published at {}",
                self.mountpoint.display()
            )));
        }
        let ino = self.shared.next_ino.fetch_add(1, Ordering::Relaxed);
        let node = Arc::new(Node {
            ino,
            name: name.to_owned(),
            size,
            read_only,
            thin: RwLock::new(Some(thin)),
            open: AtomicUsize::new(0),
            lookups: AtomicU64::new(0),
            removed: AtomicBool::new(false),
        });
        files.names.insert(name.to_owned(), node.clone());
        files.nodes.insert(ino, node);
        tracing::debug!(name, ino, size, read_only, "fuse export add");
        Ok(self.mountpoint.join(name))
    }

    /// Withdraws the file `name`: lookups stop finding it at once, and requests on handles
    /// still open fail with EIO. Waits for requests in progress on it, then hands the thin
    /// back (for the caller to flush and drop).
    ///
    /// Errors: `InvalidArgument` if no file has that name.
    pub fn remove(&self, name: &str) -> Result<Thin> {
        let node = {
            let mut files = self.shared.files.write();
            let Some(node) = files.names.remove(name) else {
                return Err(Error::InvalidArgument(format!(
                    "{name} is not published at {}",
                    self.mountpoint.display()
                )));
            };
            node.removed.store(true, Ordering::Release);
            if node.lookups.load(Ordering::Acquire) == 0 {
                files.nodes.remove(&node.ino);
            }
            node
        };
        let thin = node.thin.write().take();
        tracing::debug!(
            name,
            ino = node.ino,
            open = node.open.load(Ordering::Relaxed),
            "fuse export remove"
        );
        // Only `remove` takes the thin out, and the name was published until just now.
        Ok(thin.expect("a published file holds its thin"))
    }

    /// How many open handles (OPENs not yet RELEASEd) the file `name` has; `None` if no file
    /// has that name. A loop device on the file holds one.
    ///
    /// The kernel sends RELEASE in the background once the last reference to an open file
    /// goes (for a plain FUSE mount it does not wait for it), so the count can lag a
    /// `close(2)` or a loop detach by a moment: a caller deciding "busy" right after one
    /// should poll briefly.
    pub fn open_handles(&self, name: &str) -> Option<usize> {
        let files = self.shared.files.read();
        files
            .names
            .get(name)
            .map(|n| n.open.load(Ordering::Acquire))
    }

    /// Names of the published files, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.shared.files.read().names.keys().cloned().collect();
        names.sort();
        names
    }

    /// Unmounts (the kernel ends the connection) and joins the workers.
    ///
    /// Errors: `Busy` while something holds a file or the directory open (a loop device, a
    /// shell's working directory); the export is then detached lazily as `Drop` does, and its
    /// files keep being served until the last holder lets go.
    pub fn unmount(mut self) -> Result<()> {
        match nix::mount::umount2(&self.mountpoint, MntFlags::empty()) {
            Ok(()) => {}
            Err(nix::errno::Errno::EBUSY) => {
                return Err(Error::Busy {
                    what: format!("fuse export {}", self.mountpoint.display()),
                    holder: "a file or the directory is open (a loop device?)".into(),
                })
            }
            Err(e) => {
                return Err(os_err(
                    format!("failed to unmount {}", self.mountpoint.display()),
                    e,
                ))
            }
        }
        self.mounted = false;
        for handle in self.workers.drain(..) {
            if handle.join().is_err() {
                tracing::error!("a fuse worker panicked");
            }
        }
        tracing::debug!(mountpoint = %self.mountpoint.display(), "fuse export unmounted");
        Ok(())
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = nix::mount::umount2(&self.mountpoint, MntFlags::MNT_DETACH) {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "lazy unmount failed");
            }
        }
        let deadline = Instant::now() + DROP_JOIN_TIMEOUT;
        while self.workers.iter().any(|w| !w.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for handle in self.workers.drain(..) {
            if handle.is_finished() {
                let _ = handle.join();
            } else {
                tracing::debug!(mountpoint = %self.mountpoint.display(), "fuse worker left running until the kernel lets go of the mount");
            }
        }
    }
}
