//! The Linux kernel's dm-thin reads the pools we write, and we read what it writes back.
//!
//! One boot of a real kernel under qemu (`fixtures::kernel`): our engine builds a pool on two
//! files (an origin, a snapshot with a copied-on-write block, a thin with a discarded range,
//! a transaction id); the kernel activates it, reads every thin with the checksums we
//! computed, then writes, snapshots and deletes through its own pool messages; back on the
//! host the real `thin_check` and ours are clean and our engine reads the kernel's changes
//! and keeps writing. Privileged and slow: named `root_`.

use engine::thin::files;
use engine::{DataBlockSize, NewPool, PoolOptions, PoolPaths};
use fixtures::kernel;
use fixtures::pools::{assert_both_checkers_clean, id, read_thin, write_round_trip_thins};

const MIB: u64 = 1 << 20;
const BS: u64 = 64 * 1024;
/// Each thin's table length in the guest: 100 MiB.
const THIN_BYTES: u64 = 100 * MIB;

fn read_all(pool: &std::sync::Arc<engine::Pool>, thin: u64) -> Vec<u8> {
    read_thin(pool, thin, THIN_BYTES)
}

const GUEST: &str = r#"
dmsetup create pool --table "0 131072 thin-pool /dev/vda /dev/vdb 128 32"
dmsetup mknodes
for t in 1 2 3; do dmsetup create t$t --table "0 204800 thin /dev/mapper/pool $t"; done
dmsetup mknodes
dmsetup status pool
for t in 1 2 3; do emit_sha t$t /dev/mapper/t$t; done
pattern kernel-wrote-this 196608 | dd of=/dev/mapper/t1 bs=65536 seek=40 conv=fsync,notrunc 2>/dev/null
dmsetup suspend t1
dmsetup message pool 0 "create_snap 4 1"
dmsetup resume t1
dmsetup create t4 --table "0 204800 thin /dev/mapper/pool 4"; dmsetup mknodes
pattern snapshot-diverges 4096 | dd of=/dev/mapper/t4 bs=4096 seek=1 conv=fsync,notrunc 2>/dev/null
dmsetup remove t3
dmsetup message pool 0 "delete 3"
dmsetup message pool 0 "set_transaction_id 5 6"
emit_sha t4 /dev/mapper/t4
dmsetup status pool
dmsetup remove t1; dmsetup remove t2; dmsetup remove t4; dmsetup remove pool
"#;

#[test]
fn root_kernel_reads_our_pool_and_we_read_its_changes() {
    if let Err(why) = kernel::available() {
        panic!("the kernel harness is unavailable: {why}");
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = PoolPaths::in_dir(dir.path());
    let new = NewPool::new(64 * MIB, 4 * MIB, DataBlockSize::DEFAULT);

    // Our side: origin 1, snapshot 2 of it with one CoW write, thin 3 with a discard.
    let mut want = std::collections::BTreeMap::new();
    {
        let pool = files::create(&paths, new, PoolOptions::default()).unwrap();
        write_round_trip_thins(&pool, 90 * MIB + 123);
        pool.open_thin(id(3))
            .unwrap()
            .discard(BS, 4 * BS + 100)
            .unwrap();
        pool.set_transaction_id(0, 5).unwrap();
        pool.commit().unwrap();
        for t in 1..=3 {
            want.insert(format!("t{t}"), kernel::sha256_hex(&read_all(&pool, t)));
        }
    }
    assert_both_checkers_clean(&paths.metadata);

    let run = kernel::run_guest(GUEST, &[&paths.metadata, &paths.data], &[]).unwrap();
    assert!(run.ok, "the guest failed\n{}", run.report());
    for t in 1..=3 {
        let name = format!("t{t}");
        assert_eq!(
            kernel::sha_of(&run.output, &name).unwrap(),
            want[&name],
            "kernel read of {name}"
        );
    }
    let statuses: Vec<_> = kernel::parse_dm_status_lines(&run.output)
        .into_iter()
        .filter_map(|s| s.thin_pool().ok())
        .collect();
    assert_eq!(statuses.len(), 2, "two pool status lines\n{}", run.report());
    assert_eq!(statuses[0].transaction_id, 5);
    assert_eq!(statuses.last().unwrap().transaction_id, 6);
    assert_both_checkers_clean(&paths.metadata);

    // Back on our side: the kernel's writes, snapshot and delete are all there.
    let pool = files::open(&paths, PoolOptions::default()).unwrap();
    assert_eq!(pool.superblock().transaction_id, 6);
    assert_eq!(pool.thin_ids(), vec![id(1), id(2), id(4)]);
    let mut t1 = kernel::pattern("origin-from-thinbox", 3 * MIB as usize);
    t1.resize(THIN_BYTES as usize, 0);
    t1[(90 * MIB + 123) as usize..(90 * MIB + 5123) as usize]
        .copy_from_slice(&kernel::pattern("far-block", 5000));
    t1[(40 * BS) as usize..(43 * BS) as usize]
        .copy_from_slice(&kernel::pattern("kernel-wrote-this", 196_608));
    assert!(read_all(&pool, 1) == t1, "thin 1 after the kernel's write");
    let mut t4 = t1.clone();
    t4[4096..8192].copy_from_slice(&kernel::pattern("snapshot-diverges", 4096));
    let got4 = read_all(&pool, 4);
    assert_eq!(
        kernel::sha256_hex(&got4),
        kernel::sha_of(&run.output, "t4").unwrap()
    );
    assert!(got4 == t4, "the kernel's snapshot 4");
    assert_eq!(kernel::sha256_hex(&read_all(&pool, 2)), want["t2"]);
    // And we keep going on the kernel's metadata.
    let t4h = pool.open_thin(id(4)).unwrap();
    t4h.write(&[0x5A; 70_000], 50 * MIB).unwrap();
    drop(t4h);
    pool.create_snap(id(9), id(4)).unwrap();
    pool.delete(id(2)).unwrap();
    pool.commit().unwrap();
    drop(pool);
    assert_both_checkers_clean(&paths.metadata);
}
