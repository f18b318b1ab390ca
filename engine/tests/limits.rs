//! Full pools, ownership and concurrency: out of data space is an error on that write only;
//! out of metadata space turns the pool read-only with needs_check set and loses nothing that
//! was written; a second owner is refused; many threads do IO at once.

use std::sync::Arc;

use engine::io::BlockDevice;
use engine::thin::files;
use engine::{DataBlockSize, Error, NewPool, Pool, PoolMode, PoolOptions, PoolPaths};
use fixtures::pools::{assert_checks_clean, id, mem_pool, MemPool};

const BS: u64 = 64 * 1024;

#[test]
fn out_of_data_space_fails_that_write_only() {
    let MemPool { meta, pool, .. } =
        mem_pool(1 << 20, 16, DataBlockSize::DEFAULT, PoolOptions::default());
    pool.create_thin(id(1)).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    thin.write(&vec![1u8; 16 * BS as usize], 0).unwrap();
    assert_eq!(pool.status().used_data_blocks, 16);
    let err = thin.write(&[2u8; 10], 16 * BS).unwrap_err();
    assert!(matches!(err, Error::NoDataSpace), "{err}");
    assert_eq!(pool.mode(), PoolMode::OutOfDataSpace);
    assert!(pool.status().to_string().contains("out_of_data_space"));
    // Provisioned blocks still take writes, and everything reads.
    thin.write(&[3u8; 100], 5 * BS + 7).unwrap();
    let mut buf = vec![0u8; 200];
    thin.read(&mut buf, 5 * BS).unwrap();
    assert_eq!(&buf[7..107], &[3u8; 100][..]);
    assert_eq!(buf[0], 1);
    // A snapshot's CoW needs space too, and fails cleanly.
    pool.create_snap(id(2), id(1)).unwrap();
    assert!(matches!(thin.write(&[4u8; 10], 0), Err(Error::NoDataSpace)));
    pool.delete(id(2)).unwrap();
    // Freeing space (here in the running transaction) makes the pool writable again: the
    // allocator commits to reuse blocks freed in it, as the kernel does.
    thin.discard(0, 4 * BS).unwrap();
    thin.write(&[5u8; 10], 16 * BS).unwrap();
    assert_eq!(pool.mode(), PoolMode::ReadWrite);
    drop(thin);
    pool.commit().unwrap();
    assert_checks_clean(&*meta);
}

#[test]
fn out_of_metadata_space_goes_read_only_with_needs_check_and_loses_nothing() {
    // 256 KiB of metadata (64 blocks) runs out long before 100 000 data blocks do.
    let MemPool { meta, data, pool } = mem_pool(
        256 << 10,
        100_000,
        DataBlockSize::DEFAULT,
        PoolOptions::default(),
    );
    pool.create_thin(id(7)).unwrap();
    let thin = pool.open_thin(id(7)).unwrap();
    let mut written = vec![];
    let err = loop {
        // Scattered blocks: each new leaf costs metadata.
        let v = (written.len() as u64 * 7919) % 100_000;
        match thin.write(&v.to_le_bytes(), v * BS) {
            Ok(()) => written.push(v),
            Err(e) => break e,
        }
        assert!(written.len() < 100_000, "metadata never ran out");
    };
    assert!(matches!(err, Error::NoMetadataSpace), "{err}");
    assert!(matches!(pool.mode(), PoolMode::ReadOnly(_)));
    let status = pool.status();
    assert!(status.needs_check && status.mode == "ro", "{status}");
    assert!(matches!(pool.create_thin(id(8)), Err(Error::ReadOnly(_))));
    assert!(matches!(thin.write(&[0], 0), Err(Error::ReadOnly(_))));
    drop(thin);
    drop(pool);

    // The metadata on disk is consistent, flagged, and holds every acknowledged write.
    assert_checks_clean(&*meta);
    let m: Arc<dyn BlockDevice> = meta.clone();
    let d: Arc<dyn BlockDevice> = data.clone();
    assert!(matches!(
        Pool::open(m.clone(), d.clone(), PoolOptions::default()),
        Err(Error::NeedsCheck)
    ));
    let ro = Pool::open(
        m.clone(),
        d.clone(),
        PoolOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let thin = ro.open_thin(id(7)).unwrap();
    for &v in &written {
        let mut buf = [0u8; 8];
        thin.read(&mut buf, v * BS).unwrap();
        assert_eq!(u64::from_le_bytes(buf), v, "block {v}");
    }
    drop(thin);
    drop(ro);
    // After a clean check, clearing the flag and growing the metadata device brings it back.
    engine::thin::metadata::superblock::clear_needs_check(&*meta).unwrap();
    meta.grow(4 << 20).unwrap();
    let pool = Pool::open(m, d, PoolOptions::default()).unwrap();
    pool.resize_metadata(None).unwrap();
    let thin = pool.open_thin(id(7)).unwrap();
    thin.write(&[9u8; 10], 99_999 * BS).unwrap();
    drop(thin);
    pool.commit().unwrap();
    assert_checks_clean(&*meta);
}

#[test]
fn pools_with_more_space_map_bitmaps_than_dirty_blocks_format_and_grow() {
    // 64 TiB of 64 KiB blocks: 2^30 data blocks, 65 794 data space map bitmaps. The commit
    // that creates them (format, or a resize from a small pool) writes each to a new
    // metadata block: more than the 64Ki dirty blocks the transaction manager holds before
    // it writes some out early, which used to take nodes of the bitmap index tree an insert
    // was about to change ("block is reachable twice in a tree that may not share").
    const META: u64 = 15 << 30;
    let nr_data_blocks = 1u64 << 30;
    let far = (nr_data_blocks - 1) * BS;
    let write_far_and_near = |pool: &Arc<Pool>| {
        pool.create_thin(id(1)).unwrap();
        let thin = pool.open_thin(id(1)).unwrap();
        thin.write(&[1u8; 4096], 0).unwrap();
        thin.write(&[2u8; 4096], far).unwrap();
        drop(thin);
        pool.commit().unwrap();
    };

    let MemPool { meta, pool, .. } = mem_pool(
        META,
        nr_data_blocks,
        DataBlockSize::DEFAULT,
        PoolOptions::default(),
    );
    assert_eq!(pool.status().total_data_blocks, nr_data_blocks);
    write_far_and_near(&pool);
    drop(pool);
    assert_checks_clean(&*meta);
    drop(meta);

    let MemPool { meta, data, pool } = mem_pool(
        META,
        1 << 24,
        DataBlockSize::DEFAULT,
        PoolOptions::default(),
    );
    pool.resize_data(Some(nr_data_blocks * BS)).unwrap();
    assert_eq!(pool.status().total_data_blocks, nr_data_blocks);
    write_far_and_near(&pool);
    drop(pool);
    assert_checks_clean(&*meta);
    let pool = Pool::open(meta, data, PoolOptions::default()).unwrap();
    let mut buf = [0u8; 4096];
    pool.open_thin(id(1)).unwrap().read(&mut buf, far).unwrap();
    assert_eq!(buf, [2u8; 4096]);
}

#[test]
fn a_second_owner_is_refused_and_told_who_holds_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let paths = PoolPaths::in_dir(dir.path());
    let new = NewPool::new(64 << 20, 4 << 20, DataBlockSize::DEFAULT);
    let pool = files::create(&paths, new, PoolOptions::default()).unwrap();
    let err = match files::open(&paths, PoolOptions::default()) {
        Err(e) => e,
        Ok(_) => panic!("a second owner was let in"),
    };
    let text = err.to_string();
    assert!(matches!(err, Error::Busy { .. }), "{text}");
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    // Read-only openers (status, dump) are not owners.
    files::open(
        &paths,
        PoolOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    drop(pool);
    files::open(&paths, PoolOptions::default()).unwrap();
}

#[test]
fn many_threads_write_read_and_snapshot_at_once() {
    let MemPool { meta, pool, .. } = mem_pool(
        16 << 20,
        20_000,
        DataBlockSize::DEFAULT,
        PoolOptions::default(),
    );
    for t in 0..4 {
        pool.create_thin(id(t)).unwrap();
    }
    let blocks = 300u64;
    std::thread::scope(|s| {
        // Two writers provision the same blocks of thin 0 concurrently, each its own half.
        for half in 0..2u64 {
            let pool = pool.clone();
            s.spawn(move || {
                let thin = pool.open_thin(id(0)).unwrap();
                for v in 0..blocks {
                    let byte = (v as u8).wrapping_mul(3).wrapping_add(half as u8);
                    thin.write(&vec![byte; (BS / 2) as usize], v * BS + half * BS / 2)
                        .unwrap();
                }
            });
        }
        // Writers on their own thins, with snapshots of them taken meanwhile.
        for t in 1..4u64 {
            let pool = pool.clone();
            s.spawn(move || {
                let thin = pool.open_thin(id(t)).unwrap();
                for v in 0..blocks {
                    thin.write(&[t as u8; 4096], v * BS + 4096).unwrap();
                    if v == blocks / 2 {
                        pool.create_snap(id(100 + t), id(t)).unwrap();
                    }
                }
            });
        }
        // A reader and a committer.
        let p = pool.clone();
        s.spawn(move || {
            let thin = p.open_thin(id(0)).unwrap();
            let mut buf = vec![0u8; 3 * BS as usize];
            for i in 0..200 {
                thin.read(&mut buf, (i % blocks) * BS).unwrap();
                if i % 50 == 0 {
                    p.commit().unwrap();
                }
            }
        });
    });
    let thin = pool.open_thin(id(0)).unwrap();
    let mut buf = vec![0u8; BS as usize];
    for v in 0..blocks {
        thin.read(&mut buf, v * BS).unwrap();
        let b = (v as u8).wrapping_mul(3);
        assert!(
            buf[..(BS / 2) as usize].iter().all(|&x| x == b),
            "block {v} first half"
        );
        assert!(
            buf[(BS / 2) as usize..]
                .iter()
                .all(|&x| x == b.wrapping_add(1)),
            "block {v} second half"
        );
    }
    for t in 1..4u64 {
        let snap = pool.open_thin(id(100 + t)).unwrap();
        let live = pool.open_thin(id(t)).unwrap();
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        // The snapshot froze the thin mid-run: a prefix of blocks written, the rest not.
        let mut seen_unwritten = false;
        for v in 0..blocks {
            snap.read(&mut a, v * BS + 4096).unwrap();
            live.read(&mut b, v * BS + 4096).unwrap();
            assert!(b.iter().all(|&x| x == t as u8));
            let written = a.iter().all(|&x| x == t as u8);
            assert!(
                written || a.iter().all(|&x| x == 0),
                "snapshot block {v} is torn"
            );
            assert!(
                !(written && seen_unwritten),
                "snapshot is not a point in time"
            );
            seen_unwritten |= !written;
        }
    }
    drop(thin);
    pool.commit().unwrap();
    assert_checks_clean(&*meta);
}
