//! The data path's promises: zeroing (on and off), discard giving space back to the host,
//! data block sizes other than 64 KiB, damaged metadata reported by block, and pools on
//! loop devices (root_).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use engine::block::{self, BlockKind};
use engine::io::{BlockDevice, FileDevice};
use engine::thin::files;
use engine::{DataBlockSize, Error, NewPool, Pool, PoolMode, PoolOptions, PoolPaths};
use fixtures::pools::{id, mem_pool, MemPool};

#[test]
fn new_blocks_are_zero_filled_unless_zeroing_is_off() {
    for zero in [true, false] {
        let options = PoolOptions {
            zero_new_blocks: zero,
            ..Default::default()
        };
        let MemPool { data, pool, .. } = mem_pool(8 << 20, 64, DataBlockSize::DEFAULT, options);
        // Stale bytes on the data device, as a freed block would hold.
        data.write_at(&vec![0xEE; 64 * 65536], 0).unwrap();
        pool.create_thin(id(1)).unwrap();
        let thin = pool.open_thin(id(1)).unwrap();
        thin.write(&[1u8; 100], 1000).unwrap();
        let mut buf = vec![0u8; 65536];
        thin.read(&mut buf, 0).unwrap();
        assert_eq!(&buf[1000..1100], &[1u8; 100][..]);
        let rest_is_zero = buf[..1000].iter().chain(&buf[1100..]).all(|&b| b == 0);
        // With zeroing off the untouched rest of the block is whatever the device held, as
        // with the kernel's skip_block_zeroing.
        assert_eq!(rest_is_zero, zero, "zeroing {zero}");
    }
}

/// Bytes the host holds for a file.
fn host_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn discard_frees_blocks_and_punches_holes_in_the_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let paths = PoolPaths::in_dir(dir.path());
    let new = NewPool::new(256 << 20, 4 << 20, DataBlockSize::DEFAULT);
    let options = PoolOptions {
        kept_free_bytes: 0,
        ..PoolOptions::default()
    };
    let pool = files::create(&paths, new, options).unwrap();
    pool.create_thin(id(1)).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    thin.write(&vec![7u8; 64 << 20], 0).unwrap();
    thin.flush().unwrap();
    let used = host_bytes;
    let before = used(&paths.data);
    assert!(before >= 64 << 20, "{before}");
    assert_eq!(pool.status().used_data_blocks, 1024);
    thin.discard(0, 48 << 20).unwrap();
    assert_eq!(pool.status().used_data_blocks, 256);
    thin.flush().unwrap();
    let after = used(&paths.data);
    assert!(
        after <= before - (47 << 20),
        "the host got the space back: {before} -> {after}"
    );
    let mut buf = vec![1u8; 1 << 20];
    thin.read(&mut buf, 10 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    thin.read(&mut buf, 50 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 7));
}

/// The lowest free blocks, up to `kept_free_bytes`, stay on the host for reuse; the rest go
/// back at the commit that frees them, and a kept block goes back once lower frees move the
/// window past it, in a pool reopened too.
#[test]
fn the_lowest_freed_blocks_stay_on_the_host_for_reuse() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let paths = PoolPaths::in_dir(dir.path());
    let new = NewPool::new(256 * MIB, 4 * MIB, DataBlockSize::DEFAULT);
    let options = PoolOptions {
        kept_free_bytes: 16 * MIB,
        ..PoolOptions::default()
    };
    let pool = files::create(&paths, new, options).unwrap();
    assert_eq!(pool.kept_free_blocks(), 256);
    pool.create_thin(id(1)).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    thin.write(&vec![7u8; 64 << 20], 0).unwrap();
    thin.flush().unwrap();
    let full = host_bytes(&paths.data);
    assert!(full >= 64 * MIB, "{full}");

    // Blocks 256..1024 freed: 256..512 are the lowest free blocks and stay, 512..1024 go.
    thin.discard(16 * MIB, 48 * MIB).unwrap();
    thin.flush().unwrap();
    let kept = host_bytes(&paths.data);
    assert!(
        kept + 31 * MIB <= full && full <= kept + 33 * MIB,
        "32 MiB given back: {full} -> {kept}"
    );

    // A new thin's blocks are the kept ones: the host allocates nothing.
    pool.create_thin(id(2)).unwrap();
    let other = pool.open_thin(id(2)).unwrap();
    other.write(&vec![9u8; 16 << 20], 0).unwrap();
    other.flush().unwrap();
    let reused = host_bytes(&paths.data);
    assert!(reused <= kept + MIB, "{kept} -> {reused}");
    drop(other);
    pool.delete(id(2)).unwrap();
    drop(thin);
    drop(pool);

    // Reopened, the pool still counts blocks 256..512 as kept: freeing 0..256 moves the
    // window down and gives them back.
    let pool = files::open(&paths, options).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    assert_eq!(host_bytes(&paths.data), reused);
    thin.discard(0, 16 * MIB).unwrap();
    thin.flush().unwrap();
    let moved = host_bytes(&paths.data);
    assert!(
        moved + 15 * MIB <= reused && reused <= moved + 17 * MIB,
        "16 MiB given back: {reused} -> {moved}"
    );
    let mut buf = vec![0u8; 16 << 20];
    thin.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    thin.read(&mut buf, 48 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn snapshot_blocks_are_not_punched_while_the_snapshot_maps_them() {
    let MemPool { data, pool, .. } =
        mem_pool(8 << 20, 64, DataBlockSize::DEFAULT, PoolOptions::default());
    pool.create_thin(id(1)).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    thin.write(&vec![3u8; 4 * 65536], 0).unwrap();
    pool.create_snap(id(2), id(1)).unwrap();
    thin.discard(0, 4 * 65536).unwrap();
    thin.flush().unwrap();
    assert_eq!(
        data.allocated(),
        4 * 65536,
        "the snapshot's blocks stay on the device"
    );
    let snap = pool.open_thin(id(2)).unwrap();
    let mut buf = vec![0u8; 4 * 65536];
    snap.read(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 3));
}

/// Overwrites of a thin's own blocks skip the metadata (the mapping cache knows them); a
/// snapshot taken while the thin is open must end that, however the cache learnt the block.
#[test]
fn writes_after_a_snapshot_of_an_open_thin_copy_the_block() {
    const BS: u64 = 65536;
    let MemPool { pool, .. } =
        mem_pool(8 << 20, 64, DataBlockSize::DEFAULT, PoolOptions::default());
    pool.create_thin(id(1)).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    let second = pool.open_thin(id(1)).unwrap();
    // Block 0 is known from its provisioning, block 1 from an in-place write through the
    // b-tree (after a reopen), block 2 from a read.
    thin.write(&[1u8; 4096], 0).unwrap();
    thin.write(&[1u8; 4096], BS).unwrap();
    thin.write(&[1u8; 4096], 2 * BS).unwrap();
    drop((thin, second));
    let thin = pool.open_thin(id(1)).unwrap();
    thin.write(&[2u8; 4096], BS).unwrap();
    thin.read(&mut [0u8; 4096], 2 * BS).unwrap();
    // The fast path is taken: an overwrite needs no new block.
    let used = pool.status().used_data_blocks;
    thin.write(&[3u8; 4096], 0).unwrap();
    thin.write(&[3u8; 4096], 2 * BS).unwrap();
    assert_eq!(pool.status().used_data_blocks, used);

    pool.create_snap(id(2), id(1)).unwrap();
    let second = pool.open_thin(id(1)).unwrap();
    for (handle, byte) in [(&thin, 4u8), (&second, 5u8)] {
        for b in 0..3 {
            handle.write(&[byte; 4096], b * BS + 4096).unwrap();
        }
    }
    assert_eq!(
        pool.status().used_data_blocks,
        used + 3,
        "one copy per block"
    );
    let snap = pool.open_thin(id(2)).unwrap();
    let mut buf = vec![0u8; 8192];
    for (b, first) in [(0u64, 3u8), (1, 2), (2, 3)] {
        snap.read(&mut buf, b * BS).unwrap();
        assert!(
            buf[..4096].iter().all(|&x| x == first),
            "snapshot block {b}"
        );
        assert!(buf[4096..].iter().all(|&x| x == 0), "snapshot block {b}");
        thin.read(&mut buf, b * BS).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == first), "origin block {b}");
        assert!(buf[4096..].iter().all(|&x| x == 5), "origin block {b}");
    }
}

/// A snapshot is a point-in-time copy: taken while writers hammer the origin, it never changes
/// afterwards.
#[test]
fn snapshots_taken_while_the_origin_is_written_never_change_afterwards() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const BLOCKS: u64 = 8;
    let MemPool { pool, .. } = mem_pool(
        16 << 20,
        512,
        DataBlockSize::DEFAULT,
        PoolOptions::default(),
    );
    pool.create_thin(id(1)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2u8)
        .map(|w| {
            let (pool, stop) = (pool.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut thin = pool.open_thin(id(1)).unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if n.is_multiple_of(5) {
                        // Now and then the origin has no open handle: a snapshot may come
                        // just before a writer opens it.
                        drop(thin);
                        thin = pool.open_thin(id(1)).unwrap();
                    }
                    let block = n % BLOCKS;
                    let byte = (n as u8).wrapping_mul(2).wrapping_add(w);
                    thin.write(&[byte; 512], block * 65536 + w as u64 * 4096)
                        .unwrap();
                    n += 1;
                }
            })
        })
        .collect();
    let read_all = |snap: u64| {
        let thin = pool.open_thin(id(snap)).unwrap();
        let mut buf = vec![0u8; (BLOCKS * 65536) as usize];
        thin.read(&mut buf, 0).unwrap();
        buf
    };
    let mut taken = Vec::new();
    for snap in 2..40u64 {
        pool.create_snap(id(snap), id(1)).unwrap();
        taken.push((snap, read_all(snap)));
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    for (snap, then) in taken {
        assert!(
            read_all(snap) == then,
            "snapshot {snap} changed after it was taken"
        );
    }
}

/// Cached reads take no lock; a block they read must never be one that was freed meanwhile and
/// reused by another thin. Here one thread reads the blocks of thin 1 over and over while
/// another frees them (by discard, or by copying them on write when the snapshot that shared
/// them is gone), commits (the blocks become allocatable), fills thin 2 with the freed blocks
/// and maps thin 1 again: the reader sees thin 1's bytes or zeros, never thin 2's.
#[test]
fn cached_reads_never_see_a_block_reused_by_another_thin() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const BLOCKS: u64 = 4;
    let MemPool { pool, .. } = mem_pool(
        8 << 20,
        BLOCKS * 2,
        DataBlockSize::DEFAULT,
        PoolOptions::default(),
    );
    pool.create_thin(id(1)).unwrap();
    pool.create_thin(id(2)).unwrap();
    let ours = pool.open_thin(id(1)).unwrap();
    for b in 0..BLOCKS {
        ours.write(&[1u8; 65536], b * 65536).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pool, stop) = (pool.clone(), stop.clone());
        std::thread::spawn(move || {
            let thin = pool.open_thin(id(1)).unwrap();
            let mut buf = [0u8; 4096];
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for b in 0..BLOCKS {
                    thin.read(&mut buf, b * 65536 + 8192).unwrap();
                    assert!(
                        buf.iter().all(|&x| x == 1) || buf.iter().all(|&x| x == 0),
                        "read {reads}: block {b} held another thin's bytes ({})",
                        buf[0]
                    );
                    reads += 1;
                }
            }
            reads
        })
    };
    let theirs = pool.open_thin(id(2)).unwrap();
    for by_discard in [true, false]
        .into_iter()
        .flat_map(|d| std::iter::repeat_n(d, 3000))
    {
        if by_discard {
            ours.discard(0, BLOCKS * 65536).unwrap();
        } else {
            // Shared with a snapshot by time, with nobody else by count: the copy frees them.
            pool.create_snap(id(3), id(1)).unwrap();
            pool.delete(id(3)).unwrap();
            for b in 0..BLOCKS {
                ours.write(&[1u8; 4096], b * 65536).unwrap();
            }
        }
        pool.commit().unwrap();
        for b in 0..BLOCKS {
            theirs.write(&[2u8; 65536], b * 65536).unwrap();
        }
        theirs.discard(0, BLOCKS * 65536).unwrap();
        pool.commit().unwrap();
        if by_discard {
            for b in 0..BLOCKS {
                ours.write(&[1u8; 65536], b * 65536).unwrap();
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads > 0);
}

#[test]
fn data_block_sizes_other_than_64k_work() {
    for kib in [192u64, 1024] {
        let block = DataBlockSize::from_bytes(kib << 10).unwrap();
        let MemPool { pool, .. } = mem_pool(8 << 20, 200, block, PoolOptions::default());
        pool.create_thin(id(1)).unwrap();
        let thin = pool.open_thin(id(1)).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        thin.write(&data, 77_777).unwrap();
        pool.create_snap(id(2), id(1)).unwrap();
        thin.write(&[9u8; 10], 77_777 + 1000).unwrap();
        let mut back = vec![0u8; data.len()];
        pool.open_thin(id(2))
            .unwrap()
            .read(&mut back, 77_777)
            .unwrap();
        assert!(back == data, "{kib} KiB blocks: snapshot");
        thin.read(&mut back, 77_777).unwrap();
        assert_eq!(&back[1000..1010], &[9u8; 10]);
        assert_eq!(pool.status().data_block_sectors as u64, kib * 2);
    }
    assert!(DataBlockSize::from_bytes(100 << 10).is_none());
}

#[test]
fn a_damaged_node_is_an_error_naming_the_block_and_the_pool_degrades() {
    let MemPool { meta, data, pool } = mem_pool(
        8 << 20,
        4096,
        DataBlockSize::DEFAULT,
        PoolOptions::default(),
    );
    pool.create_thin(id(1)).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    for v in 0..600u64 {
        thin.write(&[1u8; 512], v * 65536).unwrap();
    }
    drop(thin);
    drop(pool);
    // Find a mapping leaf (a node holding 8-byte values, not the top level) and damage it.
    let bytes = meta.to_bytes();
    let leaf = (1..bytes.len() / 4096)
        .find(|&b| {
            let blk: &[u8; 4096] = bytes[b * 4096..(b + 1) * 4096].try_into().unwrap();
            BlockKind::identify(blk) == Some(BlockKind::Node)
                && block::read_u32(blk, 4) == 2
                && block::read_u32(blk, 16) > 100
        })
        .expect("a full mapping leaf");
    meta.write_at(&[0xFF; 4], leaf as u64 * 4096 + 100).unwrap();
    let m: Arc<dyn BlockDevice> = meta.clone();
    let d: Arc<dyn BlockDevice> = data.clone();
    let pool = Pool::open(m, d, PoolOptions::default()).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    let mut buf = vec![0u8; 512];
    let mut seen = None;
    for v in 0..600u64 {
        if let Err(e) = thin.read(&mut buf, v * 65536) {
            seen = Some(e);
            break;
        }
    }
    let err = seen.expect("some read crosses the damaged leaf");
    assert!(
        matches!(err, Error::Corrupt { block, .. } if block.0 == leaf as u64),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("block {leaf}")) && err.to_string().contains("checksum"),
        "{err}"
    );
    // A write that runs into it turns the pool read-only with needs_check.
    let mut failed = false;
    for v in 0..600u64 {
        if thin.write(&[2u8; 512], v * 65536).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed);
    assert!(matches!(pool.mode(), PoolMode::ReadOnly(_)));
    assert!(pool.status().needs_check);
}

/// A loop device attached for the length of a test, detached even if the test fails.
struct Loop(String);

impl Loop {
    fn attach(file: &std::path::Path) -> Loop {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn root_pool_on_loop_devices() {
    let dir = tempfile::tempdir().unwrap();
    let (mf, df) = (dir.path().join("m.img"), dir.path().join("d.img"));
    std::fs::File::create(&mf)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    std::fs::File::create(&df)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let (ml, dl) = (Loop::attach(&mf), Loop::attach(&df));
    let paths = PoolPaths::separate(Path::new(&ml.0), Path::new(&dl.0));
    let new = NewPool::new(0, 0, DataBlockSize::DEFAULT);
    {
        let pool = files::create(&paths, new, PoolOptions::default()).unwrap();
        // Sizes come from the kernel, not from arguments.
        assert_eq!(pool.status().total_data_blocks, 2048);
        // The data device is opened exclusively: nobody else can open it for writing now.
        let again = FileDevice::open(&paths.data, engine::io::OpenMode::ReadWrite);
        assert!(
            again.is_err(),
            "a second exclusive open of the loop device succeeded"
        );
        pool.create_thin(id(1)).unwrap();
        let thin = pool.open_thin(id(1)).unwrap();
        thin.write(&vec![0x42; 5 << 20], 12_345).unwrap();
        thin.discard(0, 1 << 20).unwrap();
        thin.flush().unwrap();
    }
    let real = fixtures::tools::thin_check(&paths.metadata, &[]);
    assert_eq!(real.rc, 0, "{}{}", real.stdout, real.stderr);
    let pool = files::open(&paths, PoolOptions::default()).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    thin.read(&mut buf, 2 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42));
}

/// `open_thin` and `delete` racing: a handle is only ever given for a thin that exists, and
/// the thin stays until the handle is closed (`delete` refuses it meanwhile). Before the
/// fix, `open_thin` looked for the thin before taking the lock `delete` holds, so a delete
/// in between left a handle on a thin that was gone.
#[test]
fn a_thin_opened_while_another_thread_deletes_it_exists_until_closed() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let MemPool { pool, .. } = mem_pool(8 << 20, 64, DataBlockSize::DEFAULT, Default::default());
    let stop = Arc::new(AtomicBool::new(false));
    let deleted = Arc::new(AtomicU32::new(0));
    let churn = {
        let (pool, stop, deleted) = (pool.clone(), stop.clone(), deleted.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match pool.create_thin(id(1)) {
                    Ok(()) | Err(Error::ThinExists(_)) => {}
                    Err(e) => panic!("create_thin: {e}"),
                }
                match pool.delete(id(1)) {
                    Ok(()) => {
                        deleted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Error::ThinBusy(_)) => {}
                    Err(e) => panic!("delete: {e}"),
                }
                // Freed metadata and data blocks come back only with a commit.
                pool.commit().unwrap();
            }
        })
    };
    // Until both sides have run often enough for the race to be exercised, not avoided
    // (with other tests running, either thread may get the CPUs late).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut opened = 0u32;
    while opened < 5000 || deleted.load(Ordering::Relaxed) < 5000 {
        assert!(
            std::time::Instant::now() < deadline,
            "opened {opened}, deleted {} in 60 s",
            deleted.load(Ordering::Relaxed)
        );
        match pool.open_thin(id(1)) {
            Ok(thin) => {
                opened += 1;
                assert!(
                    pool.thin_ids().contains(&id(1)),
                    "open {opened}: a handle on a deleted thin"
                );
                thin.write(&[3u8; 512], 0).unwrap();
            }
            Err(Error::NoSuchThin(_)) => {}
            Err(e) => panic!("open_thin: {e}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
}
