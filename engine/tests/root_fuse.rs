//! The FUSE export (root_: they mount, and the last ones attach loop devices): thin files read
//! and written through `std::fs` and O_DIRECT, discard by hole punching, fsync as a pool
//! commit, removal under open handles, read-only exports, full pools, and ext4 on a loop
//! device over an exported file. Every mount and loop device sits in a guard that undoes it on
//! drop, so a failing test leaves nothing behind.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use engine::activate::fuse::{ExportOptions, FuseExport};
use engine::io::{FileDevice, OpenMode};
use engine::thin::files;
use engine::{DataBlockSize, NewPool, Pool, PoolOptions, PoolPaths};
use fixtures::pools::{assert_checks_clean, id, mem_pool, MemPool};
use nix::fcntl::FallocateFlags;

const MIB: u64 = 1 << 20;

/// A FUSE export mounted at `DIR/mnt`.
fn export_in(dir: &Path, workers: usize) -> FuseExport {
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    FuseExport::mount(&mnt, ExportOptions { workers }).unwrap()
}

/// A memory pool of `data_blocks` 64 KiB blocks with thins `thins`, and an empty export with
/// `workers` workers in a temporary directory.
struct MemExport {
    pool: Arc<Pool>,
    export: FuseExport,
    _dir: tempfile::TempDir,
}

impl MemExport {
    fn new(data_blocks: u64, thins: &[u64], workers: usize) -> MemExport {
        let dir = tempfile::tempdir().unwrap();
        let MemPool { pool, .. } = mem_pool(
            8 * MIB,
            data_blocks,
            DataBlockSize::DEFAULT,
            Default::default(),
        );
        for &t in thins {
            pool.create_thin(id(t)).unwrap();
        }
        let export = export_in(dir.path(), workers);
        MemExport {
            pool,
            export,
            _dir: dir,
        }
    }

    /// Unmounts; a failure is the test's.
    fn unmount(self) {
        self.export.unmount().unwrap();
    }

    /// Publishes thin `thin` as `name`, `size` bytes.
    fn add(&self, name: &str, thin: u64, size: u64, read_only: bool) -> PathBuf {
        let thin = self.pool.open_thin(id(thin)).unwrap();
        self.export.add(name, thin, size, read_only).unwrap()
    }
}

/// Opens `path` for reading and writing.
fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// A pool on sparse files in `dir`, with thin 1 created and committed.
fn file_pool(dir: &Path, data_size: u64) -> Arc<Pool> {
    let paths = PoolPaths::in_dir(dir);
    let new = NewPool::new(data_size, 16 * MIB, DataBlockSize::DEFAULT);
    let pool = files::create(&paths, new, PoolOptions::default()).unwrap();
    pool.create_thin(id(1)).unwrap();
    pool.commit().unwrap();
    pool
}

/// `len` bytes at a 4 KiB-aligned address, as O_DIRECT needs.
struct Aligned {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0u8; len + 4096];
        let start = buf.as_ptr().align_offset(4096);
        Aligned { buf, start, len }
    }
    fn get(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// Waits until `name` has `n` open handles: the kernel sends RELEASE in the background after
/// close(2) returns.
fn wait_for_handles(export: &FuseExport, name: &str, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while export.open_handles(name) != Some(n) {
        assert!(
            std::time::Instant::now() < deadline,
            "{name} has {:?} open handles, not {n}",
            export.open_handles(name)
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

fn errno(e: &std::io::Error) -> Option<i32> {
    e.raw_os_error()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A loop device with direct IO over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let dev = run(Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(file));
        Loop(dev.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// A mounted filesystem, unmounted (lazily if need be) on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn ext4(dev: &str, at: &Path) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        run(Command::new("mount").arg(dev).arg(at));
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn root_fuse_files_read_and_write_like_the_thin() {
    let fx = MemExport::new(256, &[1], 2);
    let (pool, export) = (&fx.pool, &fx.export);
    let size = 16 * MIB;
    let path = export
        .add("1", pool.open_thin(id(1)).unwrap(), size, false)
        .unwrap();
    assert_eq!(path, export.mountpoint().join("1"));

    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), size);
    assert_eq!(meta.mode(), 0o100600);
    let names: Vec<String> = std::fs::read_dir(export.mountpoint())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["1"]);

    // Buffered (served as direct IO all the same) at an odd offset and length.
    let odd = pattern(300_001, 7);
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert_eq!(export.open_handles("1"), Some(1));
        f.write_all_at(&odd, 12_345).unwrap();
        let mut back = vec![0u8; odd.len()];
        f.read_exact_at(&mut back, 12_345).unwrap();
        assert!(back == odd, "buffered read back differs");
    }
    wait_for_handles(export, "1", 0);

    // O_DIRECT, aligned: 3 MiB (more than one 1 MiB request) at 5 MiB.
    let mut direct = Aligned::new(3 << 20);
    direct.get_mut().copy_from_slice(&pattern(3 << 20, 99));
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_DIRECT)
            .open(&path)
            .unwrap();
        f.write_all_at(direct.get(), 5 * MIB).unwrap();
        let mut back = Aligned::new(3 << 20);
        f.read_exact_at(back.get_mut(), 5 * MIB).unwrap();
        assert!(back.get() == direct.get(), "O_DIRECT read back differs");

        // Reads stop at the end of the file; writes cannot go past it.
        let mut tail = Aligned::new(8192);
        assert_eq!(f.read_at(tail.get_mut(), size - 4096).unwrap(), 4096);
        assert_eq!(f.read_at(tail.get_mut(), size).unwrap(), 0);
        let e = f.write_at(tail.get(), size).unwrap_err();
        assert_eq!(errno(&e), Some(nix::libc::EFBIG), "{e}");
        assert_eq!(f.write_at(tail.get(), size - 4096).unwrap(), 4096);
        // The size is the thin's: no truncating.
        let e = f.set_len(size / 2).unwrap_err();
        assert_eq!(errno(&e), Some(nix::libc::EPERM), "{e}");
        f.sync_all().unwrap();
    }

    // What the files showed is what the thin holds.
    let thin = export.remove("1").unwrap();
    assert!(!path.exists());
    let mut got = vec![0u8; odd.len()];
    thin.read(&mut got, 12_345).unwrap();
    assert!(got == odd);
    let mut got = vec![0u8; 3 << 20];
    thin.read(&mut got, 5 * MIB).unwrap();
    assert!(got == direct.get());
    fx.unmount();
}

#[test]
fn root_fuse_punch_hole_frees_pool_blocks() {
    let fx = MemExport::new(256, &[1], 2);
    let pool = &fx.pool;
    let f = open_rw(&fx.add("1", 1, 16 * MIB, false));
    f.write_all_at(&vec![0x5a; 8 << 20], 0).unwrap();
    let used = pool.status().used_data_blocks;
    assert_eq!(used, 128);

    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    nix::fcntl::fallocate(f.as_raw_fd(), punch, 0, 4 << 20).unwrap();
    assert_eq!(pool.status().used_data_blocks, used - 64);
    // ZERO_RANGE discards too; partial blocks at its edges are zeroed in place.
    let zero = FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    nix::fcntl::fallocate(f.as_raw_fd(), zero, (4 << 20) + 100, 1 << 20).unwrap();
    assert_eq!(pool.status().used_data_blocks, used - 64 - 15);
    let mut back = vec![0u8; 6 << 20];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back[..(4 << 20)].iter().all(|&b| b == 0));
    assert!(back[(4 << 20)..(4 << 20) + 100].iter().all(|&b| b == 0x5a));
    assert!(back[(4 << 20) + 100..(5 << 20) + 100]
        .iter()
        .all(|&b| b == 0));
    assert!(back[(5 << 20) + 100..].iter().all(|&b| b == 0x5a));
    // Allocating modes have nothing to do on a thin.
    let e = nix::fcntl::fallocate(f.as_raw_fd(), FallocateFlags::empty(), 0, 4096).unwrap_err();
    assert_eq!(e, nix::errno::Errno::EOPNOTSUPP);
    drop(f);
    fx.unmount();
}

#[test]
fn root_fuse_fsync_commits_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    std::fs::create_dir(&pool_dir).unwrap();
    let pool = file_pool(&pool_dir, 64 * MIB);
    let export = export_in(dir.path(), 2);
    let path = export
        .add("1", pool.open_thin(id(1)).unwrap(), 32 * MIB, false)
        .unwrap();
    let data = pattern(1 << 20, 3);
    let mut f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(&data).unwrap();

    // What a fresh open of the pool's files sees: only committed metadata.
    let committed = || {
        let options = PoolOptions {
            read_only: true,
            ..Default::default()
        };
        let pool = files::open(&PoolPaths::in_dir(&pool_dir), options).unwrap();
        let thin = pool.open_thin(id(1)).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        thin.read(&mut buf, 0).unwrap();
        buf
    };
    assert!(
        committed().iter().all(|&b| b == 0),
        "written data committed before fsync"
    );
    f.sync_all().unwrap();
    assert!(committed() == data, "fsync did not commit the write");
    drop(f);
    export.unmount().unwrap();
}

#[test]
fn root_fuse_remove_while_open_fails_with_eio_and_readd_is_a_new_file() {
    let fx = MemExport::new(256, &[1, 2], 2);
    let export = &fx.export;
    let path = fx.add("x", 1, 4 * MIB, false);
    let f = open_rw(&path);
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    let ino = f.metadata().unwrap().ino();
    assert_eq!(export.open_handles("x"), Some(1));

    let thin = export.remove("x").unwrap();
    assert_eq!(export.open_handles("x"), None);
    let mut buf = [0u8; 4096];
    let e = f.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(errno(&e), Some(nix::libc::EIO), "{e}");
    let e = f.write_at(&buf, 0).unwrap_err();
    assert_eq!(errno(&e), Some(nix::libc::EIO), "{e}");
    assert_eq!(
        std::fs::metadata(&path).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    // The thin came back intact.
    thin.read(&mut buf, 0).unwrap();
    assert_eq!(buf, [1u8; 4096]);

    // The same name again, another thin: a new inode with the new contents.
    fx.add("x", 2, 8 * MIB, false);
    let mut g = File::open(&path).unwrap();
    assert_ne!(g.metadata().unwrap().ino(), ino);
    assert_eq!(g.metadata().unwrap().len(), 8 * MIB);
    g.read_exact(&mut buf).unwrap();
    assert_eq!(buf, [0u8; 4096]);
    // The old handle stays dead.
    assert!(f.read_at(&mut buf, 0).is_err());
    drop((f, g));
    fx.unmount();
}

#[test]
fn root_fuse_read_only_export_refuses_writes() {
    let fx = MemExport::new(256, &[1], 1);
    fx.pool
        .open_thin(id(1))
        .unwrap()
        .write(&[9u8; 4096], 0)
        .unwrap();
    let path = fx.add("ro", 1, 4 * MIB, true);
    assert_eq!(std::fs::metadata(&path).unwrap().mode(), 0o100400);
    // Root passes permission bits, so the refusal is the export's own.
    let e = OpenOptions::new().write(true).open(&path).unwrap_err();
    assert_eq!(errno(&e), Some(nix::libc::EROFS), "{e}");
    let mut buf = [0u8; 4096];
    File::open(&path).unwrap().read_exact(&mut buf).unwrap();
    assert_eq!(buf, [9u8; 4096]);
    fx.unmount();
}

#[test]
fn root_fuse_full_pool_gives_enospc() {
    // 16 blocks of 64 KiB: 1 MiB of data space behind a 16 MiB file.
    let fx = MemExport::new(16, &[1], 2);
    let f = open_rw(&fx.add("1", 1, 16 * MIB, false));
    let e = f.write_all_at(&vec![1u8; 2 << 20], 0).unwrap_err();
    assert_eq!(errno(&e), Some(nix::libc::ENOSPC), "{e}");
    // A discard gives space back and writes work again.
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    nix::fcntl::fallocate(f.as_raw_fd(), punch, 0, 16 * MIB as i64).unwrap();
    f.write_all_at(&[2u8; 4096], 8 * MIB).unwrap();
    drop(f);
    fx.unmount();
}

#[test]
fn root_fuse_unmount_while_a_file_is_open_is_busy_and_drop_detaches() {
    let fx = MemExport::new(64, &[1], 2);
    let path = fx.add("1", 1, 4 * MIB, false);
    let MemExport { export, .. } = fx;
    let mnt = export.mountpoint().to_path_buf();
    let f = File::open(&path).unwrap();
    let e = export.unmount().unwrap_err();
    assert!(matches!(e, engine::Error::Busy { .. }), "{e}");
    // Detached: the mount point is an empty directory again, the open file still reads.
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
    let mut buf = [1u8; 512];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 512]);
}

/// Blocks the pool uses now.
fn used(pool: &Pool) -> u64 {
    pool.status().used_data_blocks
}

#[test]
fn root_fuse_ext4_on_a_loop_device_trims_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    std::fs::create_dir(&pool_dir).unwrap();
    let pool = file_pool(&pool_dir, 512 * MIB);
    let export = export_in(dir.path(), 4);
    let path = export
        .add("1", pool.open_thin(id(1)).unwrap(), 256 * MIB, false)
        .unwrap();
    {
        let lo = Loop::attach(&path);
        assert_eq!(export.open_handles("1"), Some(1));
        run(Command::new("mkfs.ext4")
            .args(["-q", "-E", "nodiscard"])
            .arg(&lo.0));
        let fs = Mounted::ext4(&lo.0, &dir.path().join("ext4"));
        for i in 0..24 {
            std::fs::write(fs.0.join(format!("f{i}")), pattern(1 << 20, i as u8)).unwrap();
        }
        run(Command::new("sync").arg("-f").arg(&fs.0));
        let full = used(&pool);
        for i in 0..24 {
            std::fs::remove_file(fs.0.join(format!("f{i}"))).unwrap();
        }
        run(Command::new("sync").arg("-f").arg(&fs.0));
        run(Command::new("fstrim").arg(&fs.0));
        let trimmed = used(&pool);
        assert!(
            trimmed + 300 < full,
            "fstrim freed too little: {full} -> {trimmed} blocks"
        );
        drop(fs);
        drop(lo);
    }
    wait_for_handles(&export, "1", 0);
    let thin = export.remove("1").unwrap();
    thin.flush().unwrap();
    drop(thin);
    export.unmount().unwrap();
    drop(pool);
    let meta =
        FileDevice::open(&PoolPaths::in_dir(&pool_dir).metadata, OpenMode::ReadOnly).unwrap();
    assert_checks_clean(&meta);
}
