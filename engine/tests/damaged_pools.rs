//! Damaged metadata never makes the pool panic or hang: every byte of the fixture images'
//! blocks is changed (and the block resealed, so the damage gets past the checksum into the
//! structure), then the pool is opened, every thin read, written and snapshotted, and
//! committed. Each step may fail with an error; none may panic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::block::{self, BlockKind};
use engine::io::{BlockDevice, MemDevice};
use engine::{Pool, PoolOptions, ThinId};

fn exercise(image: &[u8], data_bytes: u64) {
    let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(image));
    let data: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(data_bytes));
    let Ok(pool) = Pool::open(meta, data, PoolOptions::default()) else {
        return;
    };
    let mut buf = vec![0u8; 300_000];
    for id in pool.thin_ids() {
        let Ok(thin) = pool.open_thin(id) else {
            continue;
        };
        let _ = thin.read(&mut buf, 0);
        let _ = thin.read(&mut buf, 150 * 65536);
        let _ = thin.write(&buf[..70_000], 5 * 65536 + 17);
        let _ = thin.discard(0, 3 * 65536);
    }
    if let Some(&first) = pool.thin_ids().first() {
        let _ = pool.create_snap(ThinId::new(4000).unwrap(), first);
        let _ = pool.delete(first);
    }
    let _ = pool.create_thin(ThinId::new(4001).unwrap());
    let _ = pool.commit();
    let _ = pool.release_metadata_snap();
}

/// `DAMAGE_STEP=1` sweeps every byte (slow; the default samples).
fn sweep(name: &str, step: usize) {
    let step = std::env::var("DAMAGE_STEP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(step);
    let image = fixtures::thin::metadata_image(name);
    let expect = fixtures::thin::expect(name);
    let data_bytes = expect["data_sm_root"]["nr_blocks"].as_u64().unwrap() * 65536;
    let kinds: Vec<(usize, BlockKind)> = (0..image.len() / 4096)
        .filter_map(|b| {
            let blk: &[u8; 4096] = image[b * 4096..(b + 1) * 4096].try_into().unwrap();
            BlockKind::identify(blk).map(|k| (b, k))
        })
        .collect();
    let mut cases = 0;
    let mut slowest = Duration::ZERO;
    for &(b, kind) in &kinds {
        for offset in (4..4096).step_by(step) {
            for xor in [0x01u8, 0x80, 0xFF] {
                let mut damaged = image.clone();
                let blk: &mut [u8; 4096] =
                    (&mut damaged[b * 4096..(b + 1) * 4096]).try_into().unwrap();
                blk[offset] ^= xor;
                block::seal(blk, b as u64, kind);
                let started = Instant::now();
                exercise(&damaged, data_bytes);
                slowest = slowest.max(started.elapsed());
                cases += 1;
            }
        }
    }
    eprintln!(
        "{name}: {cases} damaged images over {} blocks, slowest {slowest:?}",
        kinds.len()
    );
    // A hang guard, not a speed goal (healthy cases take milliseconds).
    assert!(
        slowest < Duration::from_secs(30),
        "a damaged image took {slowest:?}: a hang in the making"
    );
}

#[test]
fn two_devs_every_header_and_sampled_bytes() {
    sweep("two-devs", 13);
}

#[test]
fn kernel_scenario_sampled_bytes() {
    sweep("kernel-scenario", 37);
}

/// Found by the `metadata` fuzz target: a data space map root claiming 2^64 blocks made the
/// open allocate for all of them.
#[test]
fn an_absurd_data_space_map_size_is_an_error_not_an_allocation() {
    let mut image = fixtures::thin::metadata_image("two-devs");
    let sb: &mut [u8; 4096] = (&mut image[..4096]).try_into().unwrap();
    sb[64..72].copy_from_slice(&u64::MAX.to_le_bytes());
    block::seal(sb, 0, BlockKind::Superblock);
    let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(&image));
    let data: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let err = Pool::open(meta, data, PoolOptions::default())
        .err()
        .expect("refused");
    assert!(matches!(err, engine::Error::Corrupt { .. }), "{err}");
}
