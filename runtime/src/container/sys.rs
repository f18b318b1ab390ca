//! The container's syscalls: the one place in thinbox with `unsafe`.
//!
//! [`spawn_init`] clones the container's first process into new mount, PID, UTS and IPC
//! namespaces. The child makes the mounted thin its root the way runc does (`/proc`, a
//! minimal `/dev` on tmpfs with devpts and shm, a read-only `/sys`, the `/etc` files bind
//! mounted, `pivot_root` and a lazy unmount of the old root), takes the user and working
//! directory, and execs. [`spawn_exec`] starts another process inside a running container
//! (setns on `/proc/PID/ns/*`).
//!
//! Both report a failure before exec through a close-on-exec pipe: end of file means the
//! exec happened; bytes are the error. The callers clone while single-threaded (the output
//! pumps start afterwards), so the child may allocate.

#![allow(unsafe_code)]

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{clone, setns, CloneFlags};
use nix::sys::signal::{self, SigHandler, SigSet, Signal};
use nix::sys::stat::{mknod, Mode, SFlag};
use nix::unistd::{self, Gid, Pid, Uid};

use super::spec::ResolvedUser;

/// Stack for the cloned child (it execs soon; this is plenty).
const STACK_SIZE: usize = 1 << 20;

/// How a start failed before the exec: the exit code Docker gives such a failure (126: the
/// command cannot be run, 127: not found) and the message.
#[derive(Debug)]
pub struct StartError {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StartError {}

/// The process to exec.
pub struct Exec {
    pub args: Vec<CString>,
    pub env: Vec<CString>,
    /// The PATH to look `args[0]` up in (the container's, not thinbox's).
    pub path: String,
    pub cwd: PathBuf,
    pub user: ResolvedUser,
    /// Becomes the child's stdin, stdout, stderr.
    pub stdio: [RawFd; 3],
    /// Make stdin the controlling terminal (a pty slave).
    pub tty: bool,
    /// The capabilities kept ([`super::caps`]): bit N is capability N.
    pub caps: u64,
}

/// What the container's first process sets up before its exec.
pub struct InitConfig {
    /// The mounted thin (absolute path).
    pub rootfs: PathBuf,
    pub hostname: String,
    /// Files to bind mount over the rootfs: (host file, path under the rootfs).
    pub bind_files: Vec<(PathBuf, &'static str)>,
    /// The pty slave to bind over `/dev/console`.
    pub console: Option<PathBuf>,
    pub exec: Exec,
}

/// Runs `child` in a process cloned with `flags`; returns its pid once it has exec'd, or the
/// error it reported (after reaping it).
fn spawn(
    flags: CloneFlags,
    mut child: impl FnMut() -> anyhow::Result<Infallible>,
) -> anyhow::Result<Pid> {
    let (err_r, err_w) = unistd::pipe2(OFlag::O_CLOEXEC).context("failed to make a pipe")?;
    let mut stack = vec![0u8; STACK_SIZE];
    let err_fd = err_w.as_raw_fd();
    let callback = Box::new(move || -> isize {
        let Err(e) = child();
        let code = match e.downcast_ref::<StartError>() {
            Some(s) => s.code,
            None => 125,
        };
        // Safety: err_fd is the pipe's write end, open in this process (a copy of the
        // parent's descriptors); the File is forgotten, never closed twice.
        let mut pipe = unsafe { File::from_raw_fd(err_fd) };
        let _ = pipe.write_all(&[code]);
        let _ = pipe.write_all(format!("{e:#}").as_bytes());
        std::mem::forget(pipe);
        isize::from(code)
    });
    // Safety: the child runs on its own stack in a copy of this address space (no CLONE_VM),
    // and the callers clone while this process is single-threaded, so no lock is held by a
    // thread that does not exist in the child.
    let pid = unsafe { clone(callback, &mut stack, flags, Some(Signal::SIGCHLD as i32)) }
        .context("clone failed")?;
    drop(err_w);
    let mut report = Vec::new();
    File::from(err_r)
        .read_to_end(&mut report)
        .context("failed to read the child's report")?;
    if report.is_empty() {
        return Ok(pid);
    }
    let _ = nix::sys::wait::waitpid(pid, None);
    Err(StartError {
        code: report[0],
        message: String::from_utf8_lossy(&report[1..]).into_owned(),
    }
    .into())
}

/// Starts the container's first process in new mount, PID, UTS and IPC namespaces.
pub fn spawn_init(config: &InitConfig) -> anyhow::Result<Pid> {
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC;
    spawn(flags, || init_child(config))
}

/// Starts a process inside the namespaces of the container whose first process is `pid`.
pub fn spawn_exec(pid: u32, exec: &Exec) -> anyhow::Result<Pid> {
    let ns = |name: &str| -> anyhow::Result<File> {
        let path = format!("/proc/{pid}/ns/{name}");
        File::open(&path).with_context(|| format!("failed to open {path}"))
    };
    let (ipc, uts, pid_ns, mnt) = (ns("ipc")?, ns("uts")?, ns("pid")?, ns("mnt")?);
    // Our children are born in the container's PID namespace (we stay where we are).
    setns(pid_ns.as_fd(), CloneFlags::CLONE_NEWPID)
        .context("failed to join the container's PID namespace")?;
    spawn(CloneFlags::empty(), || {
        setns(ipc.as_fd(), CloneFlags::CLONE_NEWIPC).context("setns ipc")?;
        setns(uts.as_fd(), CloneFlags::CLONE_NEWUTS).context("setns uts")?;
        setns(mnt.as_fd(), CloneFlags::CLONE_NEWNS).context("setns mnt")?;
        exec_process(exec)
    })
}

fn init_child(c: &InitConfig) -> anyhow::Result<Infallible> {
    unistd::setsid().context("setsid")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("failed to make the mounts private")?;
    let r = &c.rootfs;
    let dir = |p: &Path, mode: u32| -> anyhow::Result<()> {
        if !p.is_dir() {
            fs::create_dir_all(p).with_context(|| format!("mkdir {}", p.display()))?;
            fs::set_permissions(p, fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    };
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;

    dir(&r.join("proc"), 0o555)?;
    mount(
        Some("proc"),
        &r.join("proc"),
        Some("proc"),
        nosuid_nodev_noexec,
        None::<&str>,
    )
    .context("failed to mount /proc")?;
    dir(&r.join("sys"), 0o555)?;
    // Read-only, as Docker has it; a kernel that refuses leaves it empty.
    let _ = mount(
        Some("sysfs"),
        &r.join("sys"),
        Some("sysfs"),
        nosuid_nodev_noexec | MsFlags::MS_RDONLY,
        None::<&str>,
    );

    let dev = r.join("dev");
    dir(&dev, 0o755)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .context("failed to mount /dev")?;
    nix::sys::stat::umask(Mode::empty());
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        mknod(
            &dev.join(name),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(major, minor),
        )
        .with_context(|| format!("mknod /dev/{name}"))?;
    }
    fs::create_dir(dev.join("pts"))?;
    mount(
        Some("devpts"),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .context("failed to mount /dev/pts")?;
    std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"))?;
    fs::create_dir(dev.join("shm"))?;
    mount(
        Some("shm"),
        &dev.join("shm"),
        Some("tmpfs"),
        nosuid_nodev_noexec,
        Some("mode=1777,size=65536k"),
    )
    .context("failed to mount /dev/shm")?;
    fs::create_dir(dev.join("mqueue"))?;
    let _ = mount(
        Some("mqueue"),
        &dev.join("mqueue"),
        Some("mqueue"),
        nosuid_nodev_noexec,
        None::<&str>,
    );
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, dev.join(link))?;
    }
    if let Some(console) = &c.console {
        File::create(dev.join("console"))?;
        mount(
            Some(console.as_path()),
            &dev.join("console"),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .context("failed to bind /dev/console")?;
    }
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));

    for (source, target) in &c.bind_files {
        let target = r.join(target);
        if let Some(parent) = target.parent() {
            dir(parent, 0o755)?;
        }
        // A dangling symlink (resolv.conf often is one) is replaced by a file.
        if fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink())
            && !target.exists()
        {
            fs::remove_file(&target)?;
        }
        if !target.exists() {
            File::create(&target).with_context(|| format!("create {}", target.display()))?;
        }
        mount(
            Some(source.as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("failed to bind {}", target.display()))?;
    }
    unistd::sethostname(&c.hostname).context("sethostname")?;

    unistd::chdir(r).context("chdir to the rootfs")?;
    unistd::pivot_root(".", ".").context("pivot_root")?;
    umount2(".", MntFlags::MNT_DETACH).context("failed to detach the old root")?;
    unistd::chdir("/")?;
    exec_process(&c.exec)
}

/// `args[0]` as a path: itself when it holds a slash, else the first executable file of
/// that name in `path`.
fn look_up(name: &str, path: &str) -> Result<PathBuf, StartError> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(name);
        if fs::metadata(&candidate)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return Ok(candidate);
        }
    }
    Err(StartError {
        code: 127,
        message: format!("exec: \"{name}\": executable file not found in $PATH"),
    })
}

fn exec_process(e: &Exec) -> anyhow::Result<Infallible> {
    // Safety: restoring the default disposition of SIGPIPE (Rust's runtime ignores it, and an
    // ignored signal stays ignored across exec) installs no handler.
    unsafe { signal::signal(Signal::SIGPIPE, SigHandler::SigDfl) }.context("signal")?;
    SigSet::empty()
        .thread_set_mask()
        .context("failed to unblock signals")?;
    for (target, &fd) in e.stdio.iter().enumerate() {
        if fd != target as RawFd {
            // Safety: both are open descriptors of this process; dup2 takes no pointers.
            if unsafe { nix::libc::dup2(fd, target as RawFd) } < 0 {
                return Err(std::io::Error::last_os_error()).context("dup2");
            }
        }
    }
    if e.tty {
        // Safety: TIOCSCTTY takes an int argument, no pointer.
        if unsafe { nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) } < 0 {
            return Err(std::io::Error::last_os_error()).context("TIOCSCTTY");
        }
    }
    // Nothing else of ours leaks into the container.
    // Safety: close_range takes integers; marking descriptors close-on-exec frees nothing.
    unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            3u32,
            u32::MAX,
            nix::libc::CLOSE_RANGE_CLOEXEC,
        )
    };

    let cwd = &e.cwd;
    if !cwd.is_dir() {
        // Docker creates a missing working directory.
        let _ = fs::create_dir_all(cwd);
    }
    unistd::chdir(cwd).map_err(|err| StartError {
        code: 126,
        message: format!("chdir to cwd (\"{}\") failed: {err}", cwd.display()),
    })?;
    let name = e.args[0].to_string_lossy().into_owned();
    let program = look_up(&name, &e.path)?;
    let groups: Vec<Gid> = e
        .user
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    drop_bounding_caps(e.caps)?;
    unistd::setgroups(&groups).context("setgroups")?;
    unistd::setgid(Gid::from_raw(e.user.gid)).context("setgid")?;
    unistd::setuid(Uid::from_raw(e.user.uid)).context("setuid")?;
    // Root keeps the container's capabilities, any other user none; nothing inheritable
    // or ambient either way (so no exec of a file with inheritable file capabilities gains
    // them).
    limit_caps(if e.user.uid == 0 { e.caps } else { 0 })?;
    let program = CString::new(program.as_os_str().as_bytes())?;
    let err = unistd::execve(&program, &e.args, &e.env).unwrap_err();
    Err(StartError {
        code: if err == nix::errno::Errno::ENOENT {
            127
        } else {
            126
        },
        message: format!("exec {name}: {err}"),
    }
    .into())
}

/// Drops every capability not in `keep` from the bounding set (while still root: that takes
/// CAP_SETPCAP), so that nothing run later, setuid files included, can regain it.
fn drop_bounding_caps(keep: u64) -> anyhow::Result<()> {
    for cap in 0..64u64 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // Safety: prctl with integer arguments only.
        let r = unsafe { nix::libc::prctl(nix::libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(nix::libc::EINVAL) {
                // Past the kernel's last capability.
                break;
            }
            return Err(err).context("failed to drop a capability from the bounding set");
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// _LINUX_CAPABILITY_VERSION_3: 64-bit sets in two halves.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// Sets the effective and permitted capabilities to `keep` (what of it this process has),
/// and empties the inheritable and ambient sets.
fn limit_caps(keep: u64) -> anyhow::Result<()> {
    // Safety: prctl with integer arguments only.
    let cleared = unsafe {
        nix::libc::prctl(
            nix::libc::PR_CAP_AMBIENT,
            nix::libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if cleared < 0 {
        return Err(std::io::Error::last_os_error())
            .context("failed to clear ambient capabilities");
    }
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // Safety: capget writes two CapData (the version-3 layout) into `data`.
    if unsafe { nix::libc::syscall(nix::libc::SYS_capget, &mut header, data.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error()).context("capget");
    }
    let have = u64::from(data[0].permitted) | u64::from(data[1].permitted) << 32;
    let mask = keep & have;
    for (half, d) in data.iter_mut().enumerate() {
        let bits = (mask >> (32 * half)) as u32;
        *d = CapData {
            effective: bits,
            permitted: bits,
            inheritable: 0,
        };
    }
    // Safety: capset reads the header and two CapData.
    if unsafe { nix::libc::syscall(nix::libc::SYS_capset, &mut header, data.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error()).context("capset");
    }
    Ok(())
}

/// A pty pair for `-t`, sized like the terminal on `like` when that is one.
pub fn open_pty(like: BorrowedFd<'_>) -> anyhow::Result<(OwnedFd, OwnedFd, PathBuf)> {
    let mut size = nix::libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // Safety: TIOCGWINSZ writes a winsize into the struct we own; on failure it is untouched.
    unsafe { nix::libc::ioctl(like.as_raw_fd(), nix::libc::TIOCGWINSZ, &mut size) };
    let pty = nix::pty::openpty(Some(&size), None).context("openpty failed")?;
    let slave_path = fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd()))
        .context("failed to name the pty")?;
    for fd in [&pty.master, &pty.slave] {
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )?;
    }
    Ok((pty.master, pty.slave, slave_path))
}

/// Signals thinbox forwards to the container while it waits for it.
pub fn forwarded_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

/// Blocks the forwarded signals in this thread (and the threads it starts later), so that a
/// forwarding thread can `sigwait` for them.
pub fn block_forwarded_signals() -> anyhow::Result<()> {
    forwarded_signals()
        .thread_block()
        .map_err(|e| anyhow!("failed to block signals: {e}"))
}

/// Points descriptor `target` (0, 1, 2) at `fd`.
pub fn redirect(fd: BorrowedFd<'_>, target: RawFd) -> anyhow::Result<()> {
    // Safety: both are open descriptors of this process; dup2 takes no pointers.
    if unsafe { nix::libc::dup2(fd.as_raw_fd(), target) } < 0 {
        return Err(std::io::Error::last_os_error()).context("dup2");
    }
    Ok(())
}

// The kernel's filesystem freeze (`FIFREEZE`/`FITHAW` from linux/fs.h, what `fsfreeze` calls):
// a commit freezes a running container's filesystem around its snapshot. Called directly,
// no process is started while the container's writers are held, so a thaw cannot fail for
// want of a fork.
nix::ioctl_readwrite!(fs_freeze, b'X', 119, nix::libc::c_int);
nix::ioctl_readwrite!(fs_thaw, b'X', 120, nix::libc::c_int);

/// Freezes the filesystem mounted at `mountpoint`: dirty data and the journal are written,
/// and writers wait until [`thaw_fs`].
pub fn freeze_fs(mountpoint: &Path) -> anyhow::Result<()> {
    let dir = File::open(mountpoint)
        .with_context(|| format!("failed to open {}", mountpoint.display()))?;
    let mut unused: nix::libc::c_int = 0;
    // Safety: FIFREEZE takes an int argument the kernel ignores; `unused` outlives the call.
    unsafe { fs_freeze(dir.as_raw_fd(), &mut unused) }.with_context(|| {
        format!(
            "failed to freeze the filesystem at {}",
            mountpoint.display()
        )
    })?;
    Ok(())
}

/// Thaws the filesystem mounted at `mountpoint`. `Ok(false)`: it was not frozen.
pub fn thaw_fs(mountpoint: &Path) -> std::io::Result<bool> {
    let dir = File::open(mountpoint)?;
    let mut unused: nix::libc::c_int = 0;
    // Safety: as for FIFREEZE.
    match unsafe { fs_thaw(dir.as_raw_fd(), &mut unused) } {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EINVAL) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
