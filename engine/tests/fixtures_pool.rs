//! Every fixture image opens as a pool and reads as the independent reader (`.expect.json`)
//! and the real tools (`.txt`) said; the pool the Linux kernel wrote (`kernel-scenario`)
//! reads back with the checksums the kernel printed; and we keep working on those pools with
//! the real `thin_check` and our checker staying clean.

use std::sync::Arc;

use engine::io::{BlockDevice, MemDevice};
use engine::tools::check::{check, CheckOptions};
use engine::{Error, Pool, PoolOptions, ThinId};
use serde_json::Value;

const KERNEL_THIN_BYTES: u64 = 204_800 * 512;

fn open(
    name: &str,
    options: PoolOptions,
) -> (Arc<MemDevice>, Arc<MemDevice>, engine::Result<Arc<Pool>>) {
    let meta = Arc::new(MemDevice::from_bytes(&fixtures::thin::metadata_image(name)));
    let expect = fixtures::thin::expect(name);
    let block_bytes = expect["superblock"]["data_block_size"].as_u64().unwrap() * 512;
    let nr_data = expect["data_sm_root"]["nr_blocks"].as_u64().unwrap();
    let data = Arc::new(match fixtures::thin::data_image(name) {
        Some(bytes) => MemDevice::from_bytes(&bytes),
        None => MemDevice::new(nr_data * block_bytes),
    });
    let m: Arc<dyn BlockDevice> = meta.clone();
    let d: Arc<dyn BlockDevice> = data.clone();
    let pool = Pool::open(m, d, options);
    (meta, data, pool)
}

fn read_only() -> PoolOptions {
    PoolOptions {
        read_only: true,
        ..PoolOptions::default()
    }
}

fn rle_total(rle: &Value) -> u64 {
    rle.as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_u64().unwrap())
        .sum()
}

#[test]
fn every_fixture_opens_and_matches_the_independent_reader() {
    for name in fixtures::thin::names() {
        let expect = fixtures::thin::expect(&name);
        let (_, _, pool) = open(&name, read_only());
        let pool = pool.unwrap_or_else(|e| panic!("{name}: {e}"));
        let sb = pool.superblock();
        let esb = &expect["superblock"];
        assert_eq!(
            u64::from(sb.time),
            esb["time"].as_u64().unwrap(),
            "{name} time"
        );
        assert_eq!(
            sb.transaction_id,
            esb["trans_id"].as_u64().unwrap(),
            "{name} trans_id"
        );
        assert_eq!(
            sb.held_root,
            esb["held_root"].as_u64().unwrap(),
            "{name} held_root"
        );
        assert_eq!(
            sb.needs_check(),
            esb["flags"].as_u64().unwrap() & 1 == 1,
            "{name} flags"
        );
        let status = pool.status();
        // Used counts come from the bitmaps (the superblock's nr_allocated is only a hint).
        assert_eq!(
            status.used_data_blocks,
            rle_total(&expect["data_ref_counts_rle"]),
            "{name} data used"
        );
        let total_meta = expect["metadata_sm_root"]["nr_blocks"].as_u64().unwrap();
        let reserve = Pool::metadata_reserve(total_meta);
        assert_eq!(
            status.used_metadata_blocks,
            rle_total(&expect["metadata_ref_counts_rle"]) + reserve,
            "{name} meta used (the kernel counts its reserve as used)"
        );
        assert_eq!(
            status.total_data_blocks,
            expect["data_sm_root"]["nr_blocks"].as_u64().unwrap()
        );
        let devices = expect["devices"].as_object().unwrap();
        let ids: Vec<u64> = pool.thin_ids().iter().map(|t| t.get()).collect();
        let mut want_ids: Vec<u64> = devices.keys().map(|k| k.parse().unwrap()).collect();
        want_ids.sort();
        assert_eq!(ids, want_ids, "{name} devices");
        for (id, d) in devices {
            let id = ThinId::new(id.parse().unwrap()).unwrap();
            let details = pool.thin_details(id).unwrap();
            assert_eq!(details.mapped_blocks, d["mapped_blocks"].as_u64().unwrap());
            assert_eq!(
                details.transaction_id,
                d["transaction_id"].as_u64().unwrap()
            );
            assert_eq!(
                u64::from(details.creation_time),
                d["creation_time"].as_u64().unwrap()
            );
            assert_eq!(
                u64::from(details.snapshotted_time),
                d["snapshotted_time"].as_u64().unwrap()
            );
        }
    }
}

#[test]
fn the_kernels_thins_read_back_with_the_kernels_checksums() {
    let (_, _, pool) = open("kernel-scenario", read_only());
    let pool = pool.unwrap();
    let txt = std::fs::read_to_string(fixtures::thin::dir().join("kernel-scenario.txt")).unwrap();
    let shas = fixtures::kernel::parse_sha_lines(&txt).unwrap();
    let read_sha = |id: u64| {
        let thin = pool.open_thin(ThinId::new(id).unwrap()).unwrap();
        let mut all = vec![0u8; KERNEL_THIN_BYTES as usize];
        thin.read(&mut all, 0).unwrap();
        (fixtures::kernel::sha256_hex(&all), all)
    };
    assert_eq!(
        read_sha(1).0,
        shas["t1"],
        "thin 1 (snapshot with a CoW block)"
    );
    assert_eq!(read_sha(2).0, shas["t2"], "thin 2 (with a discarded range)");
    // The record lacks t0's checksum; its contents follow from the guest script.
    let (_, t0) = read_sha(0);
    let mut want = vec![0u8; KERNEL_THIN_BYTES as usize];
    want[..1 << 20].copy_from_slice(&fixtures::kernel::pattern("dev0-origin-data", 1 << 20));
    want[100 * 65536..101 * 65536]
        .copy_from_slice(&fixtures::kernel::pattern("dev0-new-block", 65536));
    assert!(t0 == want, "thin 0 reads as the guest wrote it");
}

#[test]
fn the_kernels_status_line_matches_ours() {
    let (_, _, pool) = open("kernel-scenario", read_only());
    let status = pool.unwrap().status();
    // The kernel printed (after reserve_metadata_snap):
    // 0 131072 thin-pool 7 115/1024 24/1024 76 rw discard_passdown queue_if_no_space - 256
    assert_eq!(status.transaction_id, 7);
    assert_eq!(
        (status.used_metadata_blocks, status.total_metadata_blocks),
        (115, 1024)
    );
    assert_eq!(
        (status.used_data_blocks, status.total_data_blocks),
        (24, 1024)
    );
    assert_eq!(status.held_root, Some(76));
    assert_eq!(status.metadata_low_watermark, 256);
    assert!(status
        .kernel_line()
        .starts_with("0 131072 thin-pool 7 115/1024 24/1024 76 "));
}

/// Writes the metadata to a file and runs the real thin_check and our checker on it.
fn assert_clean(name: &str, meta: &MemDevice) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    std::fs::write(&path, meta.to_bytes()).unwrap();
    let real = fixtures::tools::thin_check(&path, &[]);
    assert_eq!(
        real.rc, 0,
        "{name}: thin_check: {}{}",
        real.stdout, real.stderr
    );
    let ours = check(meta, &CheckOptions::default());
    assert!(
        ours.errors().next().is_none(),
        "{name}: our check: {:?}",
        ours.errors().collect::<Vec<_>>()
    );
}

#[test]
fn we_keep_working_on_every_fixture_and_stay_clean() {
    for name in fixtures::thin::names() {
        let (meta, _data, pool) = open(&name, PoolOptions::default());
        let pool = match pool {
            Err(Error::NeedsCheck) => {
                assert_eq!(name, "needs-check");
                continue;
            }
            r => r.unwrap_or_else(|e| panic!("{name}: {e}")),
        };
        let ids = pool.thin_ids();
        let fresh = ThinId::new(1000).unwrap();
        pool.create_thin(fresh).unwrap();
        {
            let thin = pool.open_thin(fresh).unwrap();
            thin.write(&vec![0xA5; 200_000], 12_345).unwrap();
        }
        if let Some(&first) = ids.first() {
            // Snapshot an existing device, then diverge both sides.
            let snap = ThinId::new(1001).unwrap();
            pool.create_snap(snap, first).unwrap();
            for id in [first, snap] {
                let thin = pool.open_thin(id).unwrap();
                let mut before = vec![0u8; 300_000];
                thin.read(&mut before, 0).unwrap();
                thin.write(&[id.get() as u8; 5000], 70_000).unwrap();
                let mut after = vec![0u8; 300_000];
                thin.read(&mut after, 0).unwrap();
                before[70_000..75_000].fill(id.get() as u8);
                assert!(before == after, "{name}: thin {id} after a CoW write");
            }
            pool.delete(ids[ids.len() - 1]).unwrap();
        }
        if pool.superblock().held_root != 0 {
            pool.release_metadata_snap().unwrap();
        }
        pool.commit().unwrap();
        assert_clean(&name, &meta);
    }
}

#[test]
fn needs_check_refuses_writing_but_reads() {
    let (_, _, pool) = open("needs-check", PoolOptions::default());
    assert!(matches!(pool, Err(Error::NeedsCheck)));
    let (_, _, pool) = open("needs-check", read_only());
    let pool = pool.unwrap();
    assert!(pool.status().needs_check);
    assert!(matches!(
        pool.create_thin(ThinId::new(50).unwrap()),
        Err(Error::ReadOnly(_))
    ));
    let thin = pool.open_thin(ThinId::new(1).unwrap()).unwrap();
    let mut buf = vec![0u8; 4096];
    thin.read(&mut buf, 0).unwrap();
    assert!(thin.write(&buf, 0).is_err());
}
