//! Privileged plumbing for the copy-on-write comparison (`benches/cow.rs`): commands, mounts
//! and loop devices that undo themselves on drop, cache drops, and the host-space probes.
//!
//! Every guard here cleans up in `Drop`, so a failing or panicking bench leaves no mount and
//! no loop device behind. Teardown errors are reported on stderr and never panic.

use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use engine::activate::loopdev::{LoopDevice, LoopOptions};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

/// Runs a command to completion; its stdout on success, both outputs in the error.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Wall time of a command run to completion (process start included).
pub fn run_timed(cmd: &mut Command) -> Result<Duration> {
    let start = Instant::now();
    run(cmd)?;
    Ok(start.elapsed())
}

/// The first line of `prog --version` (or of `args`), for the context header.
pub fn version(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(if args.is_empty() {
            &["--version"]
        } else {
            args
        })
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "not installed".into())
}

/// Whether `prog` can be started.
pub fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Writes back every dirty page, then drops the whole page cache, dentries and inodes
/// (`drop_caches` = 3): the "cold" state of perf-anchors.md. Needs root.
pub fn drop_caches() -> Result<()> {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3\n").context("failed to drop the page cache")
}

/// Waits out the disk's own background work before a cold measurement. `sync` returns once
/// the guest's writes are done, but a virtual disk keeps absorbing them on its host: for
/// seconds after a system wrote gigabytes (a 4 GiB copy-up), every flush there waits behind
/// them, and whichever system the rotation puts next would pay for its predecessor. After a
/// system deleted gigabytes, the host file system's journal is busy freeing them, and on a
/// file system mounted with `discard` (this project's machine) the disk under it goes on
/// working through the discards: for about 5 s after a 4 GiB file is deleted and synced,
/// one read or flush in five or ten takes 1–8 ms instead of 0.3 (measured with this probe's
/// two halves every 0.1 s; remounted without `discard`, nothing shows).
///
/// A probe is a 4 KiB overwrite + `fsync` of a file of its own (the mtime makes it a journal
/// commit as well as a flush) and a 64 KiB `O_DIRECT` read at a random place of another (the
/// cold first writes read). The disk is settled when the probes stay quiet for
/// [`Self::QUIET_WINDOW`]: those slow operations come in bursts, so a couple of quiet probes in
/// a row prove nothing.
pub struct DiskSettle {
    flush_probe: fs::File,
    read_probe: fs::File,
    read_buf: Vec<u8>,
    rng: SmallRng,
    quiet_flush: Duration,
    quiet_read: Duration,
}

const READ_PROBE_SIZE: u64 = 64 << 20;
const READ_PROBE_LEN: usize = 64 << 10;
const DIRECT_ALIGN: usize = 4096;

impl DiskSettle {
    /// How long the probes must stay quiet.
    pub const QUIET_WINDOW: Duration = Duration::from_millis(500);
    /// The pause between probes inside the window.
    const PROBE_GAP: Duration = Duration::from_millis(20);

    /// Makes the probe files in `dir` and measures their quiet latencies (the median of 15
    /// probes each): call it on a quiet disk, before the systems are built.
    ///
    /// The probes are spaced as [`Self::wait`] spaces them. Back to back, this project's disk
    /// answered the flush in 0.12 ms where 20 ms apart it took 0.42–0.49 ms; quiet figures
    /// measured back to back made thresholds that half of the spaced probes failed, and then
    /// no wait ended before its limit.
    pub fn new(dir: &Path) -> Result<DiskSettle> {
        use std::os::unix::fs::OpenOptionsExt;
        let open = |name: &str, direct: bool| -> Result<fs::File> {
            let path = dir.join(name);
            let mut o = fs::OpenOptions::new();
            o.read(true).write(true).create(true).truncate(!direct);
            if direct {
                o.custom_flags(nix::libc::O_DIRECT);
            }
            let f = o
                .open(&path)
                .with_context(|| format!("failed to open {}", path.display()))?;
            // Unlinked at once: nothing to clean up, whatever happens.
            let _ = fs::remove_file(&path);
            Ok(f)
        };
        let read_path = dir.join("settle-read-probe");
        fill_file(&read_path, READ_PROBE_SIZE, 0x5e771e)?;
        let mut me = DiskSettle {
            flush_probe: open("settle-probe", false)?,
            read_probe: open("settle-read-probe", true)?,
            read_buf: vec![0u8; READ_PROBE_LEN + DIRECT_ALIGN],
            rng: SmallRng::seed_from_u64(0x5e771e),
            quiet_flush: Duration::ZERO,
            quiet_read: Duration::ZERO,
        };
        let mut flushes = Vec::new();
        let mut reads = Vec::new();
        for _ in 0..15 {
            let (f, r) = me.probe()?;
            flushes.push(f);
            reads.push(r);
            std::thread::sleep(Self::PROBE_GAP);
        }
        flushes.sort_unstable();
        reads.sort_unstable();
        me.quiet_flush = flushes[flushes.len() / 2];
        me.quiet_read = reads[reads.len() / 2];
        Ok(me)
    }

    /// One probe: (flush latency, read latency).
    fn probe(&mut self) -> Result<(Duration, Duration)> {
        let start = Instant::now();
        self.flush_probe.write_all_at(&[0x5a; 4096], 0)?;
        self.flush_probe.sync_all()?;
        let flushed = start.elapsed();
        // O_DIRECT wants an aligned buffer: the aligned window of a slightly larger one.
        let skip = self.read_buf.as_ptr().align_offset(DIRECT_ALIGN);
        let buf = &mut self.read_buf[skip..skip + READ_PROBE_LEN];
        let blocks = READ_PROBE_SIZE / READ_PROBE_LEN as u64;
        let offset = self.rng.next_u64() % blocks * READ_PROBE_LEN as u64;
        let start = Instant::now();
        self.read_probe.read_exact_at(buf, offset)?;
        Ok((flushed, start.elapsed()))
    }

    /// Whether a latency is back to its quiet one: at most twice it, or 0.3 ms above it.
    fn is_quiet(took: Duration, quiet: Duration) -> bool {
        took <= (quiet * 2).max(quiet + Duration::from_micros(300))
    }

    /// Probes until both halves of the probe have stayed quiet for [`Self::QUIET_WINDOW`]
    /// (any slow probe starts the window again), for at most `limit`; returns the time waited,
    /// or an error once the run is interrupted.
    pub fn wait(&mut self, limit: Duration) -> Result<Duration> {
        let start = Instant::now();
        let mut quiet_since = Instant::now();
        while start.elapsed() < limit {
            // A disk that never settles must not hold off a Ctrl-C for the whole limit.
            check_interrupted()?;
            let (flushed, read) = self.probe()?;
            if !(Self::is_quiet(flushed, self.quiet_flush) && Self::is_quiet(read, self.quiet_read))
            {
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= Self::QUIET_WINDOW {
                break;
            }
            std::thread::sleep(Self::PROBE_GAP);
        }
        Ok(start.elapsed())
    }

    /// The flush probe's quiet latency measured at the start.
    pub fn quiet(&self) -> Duration {
        self.quiet_flush
    }

    /// The read probe's quiet latency measured at the start.
    pub fn quiet_read(&self) -> Duration {
        self.quiet_read
    }
}

/// `syncfs` on the filesystem holding `path`.
pub fn syncfs(path: &Path) {
    if let Ok(f) = fs::File::open(path) {
        let _ = nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f));
    }
}

/// Bytes the filesystem holding `path` has in use (total − free, from statvfs).
pub fn fs_used(path: &Path) -> Result<u64> {
    let s =
        nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    Ok((s.blocks() - s.blocks_free()) * s.fragment_size())
}

/// Bytes free for an unprivileged writer on the filesystem holding `path`.
pub fn fs_free(path: &Path) -> Result<u64> {
    let s =
        nix::sys::statvfs::statvfs(path).with_context(|| format!("statvfs {}", path.display()))?;
    Ok(s.blocks_available() * s.fragment_size())
}

/// Bytes allocated on the host for `path` (`st_blocks` × 512), summed over a directory tree.
pub fn allocated(path: &Path) -> u64 {
    let Ok(md) = fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = md.blocks() * 512;
    if md.is_dir() {
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                total += allocated(&e.path());
            }
        }
    }
    total
}

/// Creates `path` holding `size` bytes of incompressible data (written in 1 MiB chunks from
/// a seeded generator), fsynced.
pub fn fill_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let f = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

thread_local! {
    static LAST_WRITE: std::cell::Cell<Option<[Duration; 3]>> = const { std::cell::Cell::new(None) };
}

/// The timed probe of perf-anchors.md §2: `open(O_WRONLY)` → `pwrite` 4 KiB at `offset` →
/// `fsync` → `close`. On overlayfs the copy-up happens inside the open, so it is counted.
/// The three parts (open, pwrite, fsync + close) are kept for [`take_write_parts`].
pub fn write4k_fsync(path: &Path, offset: u64, byte: u8) -> Result<Duration> {
    let buf = [byte; 4096];
    let start = Instant::now();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let opened = Instant::now();
    f.write_all_at(&buf, offset)?;
    let written = Instant::now();
    f.sync_all()?;
    drop(f);
    let done = Instant::now();
    LAST_WRITE.with(|c| c.set(Some([opened - start, written - opened, done - written])));
    Ok(done - start)
}

/// The parts of this thread's last [`write4k_fsync`] (open, pwrite, fsync + close), once.
pub fn take_write_parts() -> Option<[Duration; 3]> {
    LAST_WRITE.with(|c| c.take())
}

/// A mount that is unmounted (lazily if busy) when dropped.
pub struct Mount {
    target: PathBuf,
}

impl Mount {
    /// `mount [-t fstype] [-o options] source target`, with `cwd` as the working directory
    /// (overlay mounts use relative layer paths to keep their options short).
    pub fn new(
        fstype: Option<&str>,
        source: &str,
        target: &Path,
        options: Option<&str>,
        cwd: Option<&Path>,
    ) -> Result<Mount> {
        fs::create_dir_all(target)?;
        let mut cmd = Command::new("mount");
        if let Some(t) = fstype {
            cmd.args(["-t", t]);
        }
        if let Some(o) = options {
            cmd.args(["-o", o]);
        }
        cmd.arg(source).arg(target);
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        run(&mut cmd)?;
        Ok(Mount {
            target: target.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        use nix::mount::{umount2, MntFlags};
        if umount2(&self.target, MntFlags::empty()).is_err() {
            // Busy (a straggling process): detach it now, the kernel finishes later.
            if let Err(e) = umount2(&self.target, MntFlags::MNT_DETACH) {
                eprintln!(
                    "cow bench: failed to unmount {}: {e}",
                    self.target.display()
                );
            }
        }
    }
}

/// A loop device over a file, detached when dropped.
pub struct Loop {
    dev: Option<LoopDevice>,
}

impl Loop {
    /// Direct IO on, as perf-anchors.md §3b attached its btrfs and xfs images.
    pub fn attach(file: &Path) -> Result<Loop> {
        let dev = LoopDevice::attach(file, LoopOptions::default())
            .with_context(|| format!("failed to attach {} to a loop device", file.display()))?;
        Ok(Loop { dev: Some(dev) })
    }

    pub fn path(&self) -> PathBuf {
        self.dev.as_ref().expect("attached").path()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            for _ in 0..50 {
                if dev.detach().is_ok() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Err(e) = dev.detach_deferred() {
                eprintln!("cow bench: failed to detach {}: {e}", dev.path().display());
            }
        }
    }
}

/// `mkfs.xfs` with reflinks on, as the benches' xfs reflink systems format their image.
pub const XFS_REFLINK_MKFS: &[&str] = &["mkfs.xfs", "-f", "-q", "-m", "reflink=1"];

/// The file system on a thinbox image, as the runtime's `dm.fs` chooses it, formatted with
/// the runtime's options (but for ext4's `nodiscard`: the thin is empty at mkfs, so its
/// discard maps nothing) and mounted with them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThinFs {
    /// thinbox's default; the image's journal log is trimmed, as the runtime does with each
    /// layer it writes.
    Ext4,
    /// Docker's devicemapper default; mounted `nouuid` (every snapshot carries the image's
    /// UUID).
    Xfs,
}

impl ThinFs {
    /// The formatter's command line without the device. ext4 initialises its inode tables and
    /// journal at once: lazy init would go on writing while a bench measures.
    pub fn mkfs_args(self) -> &'static [&'static str] {
        match self {
            ThinFs::Ext4 => &[
                "mkfs.ext4",
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
            ],
            ThinFs::Xfs => &["mkfs.xfs", "-q", "-f", "-K"],
        }
    }

    /// [`Self::mkfs_args`] as a command; add the device.
    pub fn mkfs(self) -> Command {
        let args = self.mkfs_args();
        let mut c = Command::new(args[0]);
        c.args(&args[1..]);
        c
    }

    pub fn mount_options(self) -> Option<&'static str> {
        match self {
            ThinFs::Ext4 => None,
            ThinFs::Xfs => Some("nouuid"),
        }
    }

    /// The type `mount -t` takes.
    pub fn name(self) -> &'static str {
        match self {
            ThinFs::Ext4 => "ext4",
            ThinFs::Xfs => "xfs",
        }
    }
}

/// A filesystem of its own: a sparse image file on a loop device, formatted and mounted.
/// Field order is teardown order: unmount, then detach, then delete the image.
pub struct LoopFs {
    pub mount: Mount,
    _loop: Loop,
    _image: Remove,
}

impl LoopFs {
    /// `mkfs` is the formatter's command line without the device (e.g. `mkfs.xfs -f -q`).
    pub fn create(
        image: &Path,
        size: u64,
        mkfs: &[&str],
        target: &Path,
        options: Option<&str>,
    ) -> Result<LoopFs> {
        let guard = Remove(image.to_path_buf());
        fs::File::create(image)?.set_len(size)?;
        let lo = Loop::attach(image)?;
        let dev = lo.path();
        run(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&dev))?;
        let mount = Mount::new(None, &dev.to_string_lossy(), target, options, None)?;
        Ok(LoopFs {
            mount,
            _loop: lo,
            _image: guard,
        })
    }

    pub fn path(&self) -> &Path {
        self.mount.path()
    }

    /// Unmounts and detaches the file system but keeps its image file, whose path it returns
    /// (for a bench that hands the image on, as a qemu guest's disk).
    pub fn into_image(self) -> PathBuf {
        let LoopFs {
            mount,
            _loop,
            _image,
        } = self;
        drop(mount);
        drop(_loop);
        _image.keep()
    }
}

/// Deletes a file or directory tree when dropped.
pub struct Remove(pub PathBuf);

impl Remove {
    /// Keeps the file after all: returns its path and deletes nothing.
    pub fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Remove {
    fn drop(&mut self) {
        // Emptied by `keep`.
        if self.0.as_os_str().is_empty() {
            return;
        }
        let r = if self.0.is_dir() {
            fs::remove_dir_all(&self.0)
        } else {
            fs::remove_file(&self.0)
        };
        if let Err(e) = r {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("cow bench: failed to remove {}: {e}", self.0.display());
            }
        }
    }
}

/// An interactive `qemu-io` on one image: commands are sent on its stdin and each is done
/// when the next `qemu-io> ` prompt arrives, so a request can be timed inside one process
/// that already opened the image.
pub struct QemuIo {
    child: std::process::Child,
    out: std::process::ChildStdout,
    input: std::process::ChildStdin,
}

impl QemuIo {
    /// `qemu-io -t none -f qcow2 IMAGE` (no host page cache, as perf-anchors.md §3a).
    pub fn open(image: &Path) -> Result<QemuIo> {
        let mut child = Command::new("qemu-io")
            .args(["-t", "none", "-f", "qcow2"])
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("failed to start qemu-io")?;
        let out = child.stdout.take().expect("piped");
        let input = child.stdin.take().expect("piped");
        let mut q = QemuIo { child, out, input };
        q.until_prompt()?;
        Ok(q)
    }

    fn until_prompt(&mut self) -> Result<String> {
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"qemu-io> ") {
            let n = self.out.read(&mut buf)?;
            if n == 0 {
                bail!("qemu-io ended: {}", String::from_utf8_lossy(&got));
            }
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        if text.contains("error") || text.contains("failed") {
            bail!("qemu-io: {}", text.trim());
        }
        Ok(text)
    }

    /// Sends one command and waits for it to finish.
    pub fn command(&mut self, line: &str) -> Result<String> {
        use std::io::Write;
        writeln!(self.input, "{line}")?;
        self.input.flush()?;
        self.until_prompt()
    }

    /// 4 KiB written at `offset`, then `flush`: the qcow2 counterpart of
    /// [`write4k_fsync`], timed from the request to the end of the flush.
    pub fn write4k_flush(&mut self, offset: u64, byte: u8) -> Result<Duration> {
        let start = Instant::now();
        self.command(&format!("write -P {byte} {offset} 4k"))?;
        self.command("flush")?;
        Ok(start.elapsed())
    }
}

/// The time of each request `qemu-io` reported, in seconds, from its lines
/// `4 KiB, 1 ops; 00.00 sec (2.709 MiB/sec and 693.4947 ops/sec)`.
pub fn qemu_io_op_seconds(output: &str) -> Vec<f64> {
    output
        .lines()
        .filter_map(|l| {
            let ops: f64 = l.split(" ops;").next()?.rsplit(' ').next()?.parse().ok()?;
            let rate: f64 = l
                .split(" and ")
                .nth(1)?
                .split(" ops/sec")
                .next()?
                .trim()
                .parse()
                .ok()?;
            (rate > 0.0).then(|| ops / rate)
        })
        .collect()
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = writeln!(self.input, "quit");
        let _ = self.input.flush();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An image exported over NBD on a unix socket by `qemu-nbd` (writeback cache: the host page
/// cache in play, as for the thinbox engine's data file), stopped and its socket removed on
/// drop.
pub struct QemuNbd {
    pid: nix::unistd::Pid,
    socket: PathBuf,
    pid_file: PathBuf,
}

impl QemuNbd {
    /// `qemu-nbd --fork -k SOCKET -f FORMAT --cache=writeback -t IMAGE`: `--fork` returns
    /// once the server listens, so nothing probes the socket (a probe that hangs up makes
    /// qemu-nbd complain on stderr).
    pub fn start(image: &Path, format: &str, socket: &Path) -> Result<QemuNbd> {
        let _ = fs::remove_file(socket);
        let pid_file = socket.with_extension("pid");
        // The server keeps whatever stdio it is given: a file, not a pipe nobody drains.
        let log = socket.with_extension("log");
        let status = Command::new("qemu-nbd")
            .arg("--fork")
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("-k")
            .arg(socket)
            .args(["-f", format, "--cache=writeback", "-t"])
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .status()
            .context("failed to start qemu-nbd (qemu-utils)")?;
        let said = fs::read_to_string(&log).unwrap_or_default();
        let _ = fs::remove_file(&log);
        if !status.success() {
            bail!(
                "qemu-nbd {} failed ({status}): {}",
                image.display(),
                said.trim()
            );
        }
        let pid = fs::read_to_string(&pid_file)
            .with_context(|| format!("qemu-nbd wrote no {}", pid_file.display()))?;
        let pid = nix::unistd::Pid::from_raw(pid.trim().parse().context("qemu-nbd's pid file")?);
        Ok(QemuNbd {
            pid,
            socket: socket.to_path_buf(),
            pid_file,
        })
    }

    /// The URI fio's nbd engine and libnbd clients take.
    pub fn uri(&self) -> String {
        nbd_unix_uri(&self.socket, "")
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // Not our child (it forked away): wait for /proc to let it go, and kill it if a
        // SIGTERM is not enough.
        use nix::sys::signal::{kill, Signal};
        for signal in [Signal::SIGTERM, Signal::SIGKILL] {
            let _ = kill(self.pid, signal);
            let deadline = Instant::now() + Duration::from_secs(5);
            while running(self.pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if !running(self.pid) {
                break;
            }
        }
        let _ = fs::remove_file(&self.socket);
        let _ = fs::remove_file(&self.pid_file);
    }
}

/// Whether process `pid` exists and has not exited (a zombie waiting for its parent, here
/// init, to reap it has exited).
fn running(pid: nix::unistd::Pid) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses and may hold spaces.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// `nbd+unix:///EXPORT?socket=PATH`.
pub fn nbd_unix_uri(socket: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Set by the first SIGINT or SIGTERM (see [`stop_on_signals`]).
static INTERRUPTED: std::sync::LazyLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::LazyLock::new(Default::default);

/// Makes Ctrl-C (SIGINT) and SIGTERM stop the run cleanly: the first one only sets a flag
/// that [`check_interrupted`] turns into an error at the next step, so the run unwinds
/// through its guards and every mount, loop device, daemon and server it made is undone;
/// a second one exits at once (status 130, and may leave them). Handlers, not a blocked
/// mask: child processes (fio, qemu-nbd, the pool daemon) must not inherit blocked signals,
/// or their own SIGTERM would never arrive. A Ctrl-C in the terminal also stops a running
/// fio or qemu-io, whose failure then unwinds the run as well.
pub fn stop_on_signals() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it runs before the flag is set: only a second signal exits.
        signal_hook::flag::register_conditional_shutdown(signal, 130, INTERRUPTED.clone())?;
        signal_hook::flag::register(signal, INTERRUPTED.clone())?;
    }
    Ok(())
}

/// Whether a SIGINT or SIGTERM came (see [`stop_on_signals`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// An error once a SIGINT or SIGTERM came, for the loops to stop at.
pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        bail!("interrupted: cleaning up (a second Ctrl-C exits at once)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_zombie_is_not_running() {
        assert!(super::running(nix::unistd::getpid()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        // Exited but not reaped: a zombie.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while super::running(pid) {
            assert!(std::time::Instant::now() < deadline, "`true` did not exit");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
        child.wait().unwrap();
        assert!(!super::running(pid));
    }

    use super::*;

    #[test]
    fn qemu_io_request_times_are_read_from_its_report_lines() {
        let out = "wrote 4096/4096 bytes at offset 1048576\n\
                   4 KiB, 1 ops; 00.00 sec (2.709 MiB/sec and 693.4947 ops/sec)\n\
                   read 1048576/1048576 bytes at offset 0\n\
                   1 MiB, 1 ops; 00.01 sec (95.1 MiB/sec and 95.1000 ops/sec)\n";
        let t = qemu_io_op_seconds(out);
        assert_eq!(t.len(), 2);
        assert!((t[0] - 1.0 / 693.4947).abs() < 1e-9);
        assert!((t[1] - 1.0 / 95.1).abs() < 1e-9);
    }

    #[test]
    fn allocated_counts_a_tree_and_a_missing_path_is_zero() {
        let d = tempfile::tempdir().expect("tempdir");
        fill_file(&d.path().join("a"), 64 * 1024, 1).expect("fill");
        std::fs::create_dir(d.path().join("sub")).expect("mkdir");
        fill_file(&d.path().join("sub").join("b"), 8192, 2).expect("fill");
        assert!(allocated(d.path()) >= 72 * 1024);
        assert_eq!(allocated(&d.path().join("none")), 0);
    }
}
