//! Full pools: queue_if_no_space waits for the pool to grow (or times out with ENOSPC), the
//! low-water mark raises one event per crossing, repeated fills with concurrent writers
//! corrupt nothing, and a deleted thin's data never shows through a new thin.

use std::time::{Duration, Instant};

use engine::io::BlockDevice;
use engine::{DataBlockSize, Error, NoSpacePolicy, PoolEvent, PoolMode, PoolOptions};
use fixtures::pools::{assert_checks_clean, id, mem_pool, MemPool};

const BS: u64 = 64 * 1024;

#[test]
fn queued_writes_wait_for_the_pool_to_grow() {
    let options = PoolOptions {
        no_space: NoSpacePolicy::Queue {
            timeout: Duration::from_secs(30),
        },
        ..Default::default()
    };
    let MemPool { meta, data, pool } = mem_pool(8 << 20, 8, DataBlockSize::DEFAULT, options);
    assert!(pool.status().to_string().contains("queue_if_no_space"));
    pool.create_thin(id(1)).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    thin.write(&vec![1u8; 8 * BS as usize], 0).unwrap();
    std::thread::scope(|s| {
        let writer = s.spawn(|| thin.write(&[2u8; 100], 8 * BS));
        // The writer is held, not failed.
        std::thread::sleep(Duration::from_millis(300));
        assert!(!writer.is_finished(), "the write did not wait");
        assert_eq!(pool.mode(), PoolMode::OutOfDataSpace);
        data.grow(16 * BS).unwrap();
        pool.resize_data(None).unwrap();
        writer.join().unwrap().unwrap();
    });
    assert_eq!(pool.mode(), PoolMode::ReadWrite);
    let mut buf = [0u8; 100];
    thin.read(&mut buf, 8 * BS).unwrap();
    assert_eq!(buf, [2u8; 100]);
    drop(thin);
    pool.commit().unwrap();
    assert_checks_clean(&*meta);
}

#[test]
fn queued_writes_fail_with_enospc_after_the_timeout() {
    let options = PoolOptions {
        no_space: NoSpacePolicy::Queue {
            timeout: Duration::from_millis(400),
        },
        ..Default::default()
    };
    let MemPool { pool, .. } = mem_pool(8 << 20, 4, DataBlockSize::DEFAULT, options);
    pool.create_thin(id(1)).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    thin.write(&vec![1u8; 4 * BS as usize], 0).unwrap();
    let started = Instant::now();
    assert!(matches!(
        thin.write(&[2u8; 10], 4 * BS),
        Err(Error::NoDataSpace)
    ));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400),
        "gave up after {waited:?}"
    );
    // Provisioned blocks and reads still work meanwhile.
    thin.write(&[3u8; 10], 0).unwrap();
}

#[test]
fn the_low_water_mark_raises_one_event_per_crossing() {
    let options = PoolOptions {
        low_water_blocks: 10,
        ..Default::default()
    };
    let MemPool { pool, .. } = mem_pool(8 << 20, 40, DataBlockSize::DEFAULT, options);
    let events = pool.subscribe();
    pool.create_thin(id(1)).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    thin.write(&vec![1u8; 29 * BS as usize], 0).unwrap();
    assert!(
        events.try_recv().is_err(),
        "11 free blocks are above the mark"
    );
    // One block at a time, so the event reports exactly where the mark was crossed (a
    // multi-block write reports what is left after it).
    for v in 29..34 {
        thin.write(&[1u8; 100], v * BS).unwrap();
    }
    let got: Vec<PoolEvent> = events.try_iter().collect();
    assert_eq!(
        got,
        vec![PoolEvent::LowWater {
            free_blocks: 10,
            low_water_blocks: 10
        }]
    );
    // Back above the mark (blocks freed and committed), then below again: a second event.
    thin.discard(0, 20 * BS).unwrap();
    pool.commit().unwrap();
    for v in 100..116 {
        thin.write(&[1u8; 100], v * BS).unwrap();
    }
    let got: Vec<PoolEvent> = events.try_iter().collect();
    assert_eq!(
        got,
        vec![PoolEvent::LowWater {
            free_blocks: 10,
            low_water_blocks: 10
        }]
    );
    // Running out is an event too.
    let _ = thin.write(&vec![1u8; 11 * BS as usize], 200 * BS);
    assert!(events.try_iter().any(|e| e == PoolEvent::OutOfDataSpace));
}

#[test]
fn repeated_fills_with_concurrent_writers_corrupt_nothing() {
    let MemPool { meta, pool, .. } =
        mem_pool(8 << 20, 300, DataBlockSize::DEFAULT, PoolOptions::default());
    for t in 0..4 {
        pool.create_thin(id(t)).unwrap();
    }
    for round in 0..4u8 {
        let written: Vec<Vec<u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    let pool = pool.clone();
                    s.spawn(move || {
                        let thin = pool.open_thin(id(t)).unwrap();
                        let mut ok = vec![];
                        for v in 0..200u64 {
                            let tag = [round, t as u8, v as u8, 0xC5];
                            match thin.write(&tag.repeat(1024), v * BS + 4096) {
                                Ok(()) => ok.push(v),
                                Err(Error::NoDataSpace) => {}
                                Err(e) => panic!("thin {t} block {v}: {e}"),
                            }
                        }
                        ok
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            pool.status().used_data_blocks,
            300,
            "round {round} fills the pool"
        );
        for (t, blocks) in written.iter().enumerate() {
            let thin = pool.open_thin(id(t as u64)).unwrap();
            let mut buf = vec![0u8; 4096];
            for &v in blocks {
                thin.read(&mut buf, v * BS + 4096).unwrap();
                let tag = [round, t as u8, v as u8, 0xC5];
                assert!(buf == tag.repeat(1024), "round {round} thin {t} block {v}");
            }
            thin.discard(0, 200 * BS).unwrap();
        }
        pool.commit().unwrap();
        assert_eq!(pool.status().used_data_blocks, 0);
        assert_checks_clean(&*meta);
    }
}

#[test]
fn a_deleted_thins_data_never_shows_through_a_new_thin() {
    // Without discard passdown the old bytes stay on the data device: zeroing alone must
    // keep them out of the new thin.
    let options = PoolOptions {
        discard_passdown: false,
        ..Default::default()
    };
    let MemPool { data, pool, .. } = mem_pool(8 << 20, 64, DataBlockSize::DEFAULT, options);
    pool.create_thin(id(1)).unwrap();
    let canary = b"CANARY-SECRET-42";
    {
        let thin = pool.open_thin(id(1)).unwrap();
        thin.write(&canary.repeat(64 * BS as usize / canary.len()), 0)
            .unwrap();
    }
    pool.delete(id(1)).unwrap();
    pool.commit().unwrap();
    assert!(
        data.to_bytes().windows(canary.len()).any(|w| w == canary),
        "the bytes are still on the device"
    );
    pool.create_thin(id(2)).unwrap();
    let thin = pool.open_thin(id(2)).unwrap();
    for v in 0..64u64 {
        // Small writes in every block: each provisions a block that held the canary.
        thin.write(b"new", v * BS + 1000).unwrap();
    }
    assert_eq!(pool.status().used_data_blocks, 64);
    let mut all = vec![0u8; 64 * BS as usize];
    thin.read(&mut all, 0).unwrap();
    assert!(
        !all.windows(canary.len()).any(|w| w == canary),
        "the deleted thin's data shows through"
    );
}
