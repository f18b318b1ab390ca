//! The failure policy, case by case, on devices that fail on purpose (`fixtures::faulty`):
//! each stage of a commit, a failed data flush, a flush after an aborted transaction, a
//! failed discard pass-down, metadata errors on the discard path, and a dead metadata disk.
//! The sweeps in `faults_sweep.rs` cover every injection point; these pin the decisions.

use std::sync::Arc;

use engine::block;
use engine::io::{BlockDevice, MemDevice};
use engine::thin::metadata::superblock::{self, Superblock};
use engine::tools::check::{check, CheckOptions};
use engine::{DataBlockSize, DeviceRole, Error, Pool, PoolMode, PoolOptions, ThinId};
use fixtures::faulty::{Fault, FaultyDevice, Op, Persistence, Target, EIO};

const BS: u64 = 64 * 1024;

fn tid(n: u64) -> ThinId {
    ThinId::new(n).unwrap()
}

/// Every freed block is passed down at once (none kept for reuse), so the discard path
/// runs on these small pools.
fn options() -> PoolOptions {
    PoolOptions {
        kept_free_bytes: 0,
        ..PoolOptions::default()
    }
}

struct Devs {
    meta: Arc<FaultyDevice>,
    data: Arc<FaultyDevice>,
}

impl Devs {
    fn new() -> Devs {
        Devs {
            meta: FaultyDevice::new(Arc::new(MemDevice::new(4 << 20))),
            data: FaultyDevice::new(Arc::new(MemDevice::new(256 * BS))),
        }
    }

    fn format(&self) -> Arc<Pool> {
        let (m, d): (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) =
            (self.meta.clone(), self.data.clone());
        Pool::format(m, d, DataBlockSize::DEFAULT, options()).unwrap()
    }

    fn open(&self) -> Arc<Pool> {
        let (m, d): (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) =
            (self.meta.clone(), self.data.clone());
        Pool::open(m, d, options()).unwrap()
    }

    /// The superblock on the device, behind the fault's back.
    fn on_disk(&self) -> Superblock {
        let mut b = block::zeroed();
        self.meta.inner().read_at(&mut b[..], 0).unwrap();
        Superblock::read(&b, 0).unwrap()
    }

    /// Block `v` of thin `id` as the devices hold it (opened read-only, no faults).
    fn read_back(&self, id: u64, v: u64) -> Option<Vec<u8>> {
        let ro = PoolOptions {
            read_only: true,
            ..PoolOptions::default()
        };
        let pool = Pool::open(self.meta.inner().clone(), self.data.inner().clone(), ro).unwrap();
        let thin = pool.open_thin(tid(id)).ok()?;
        let mut buf = vec![0u8; BS as usize];
        thin.read(&mut buf, v * BS).unwrap();
        Some(buf)
    }

    /// Check is clean; clearing needs_check lets the pool open read-write, and it works.
    fn recover(&self) {
        let meta = self.meta.inner().clone();
        let report = check(&*meta, &CheckOptions::default());
        assert!(report.is_clean(), "{:?}", report.findings);
        superblock::clear_needs_check(&*meta).unwrap();
        let pool = Pool::open(
            meta.clone(),
            self.data.inner().clone(),
            PoolOptions::default(),
        )
        .expect("read-write after check and clear");
        pool.create_thin(tid(99)).unwrap();
        pool.open_thin(tid(99))
            .unwrap()
            .write(&[5u8; 4096], 0)
            .unwrap();
        pool.commit().unwrap();
        drop(pool);
        let report = check(&*meta, &CheckOptions::default());
        assert!(report.is_clean() && !report.needs_check);
    }
}

fn is_eio_on(e: &Error, role: DeviceRole) -> bool {
    matches!(e, Error::Io { role: r, source, .. } if *r == role && source.raw_os_error() == Some(EIO))
}

fn assert_degraded(pool: &Pool) {
    assert!(
        matches!(pool.mode(), PoolMode::ReadOnly(_)),
        "{:?}",
        pool.mode()
    );
    let status = pool.status();
    assert_eq!(status.mode, "ro");
    assert!(status.needs_check, "status lacks needs_check");
    assert!(pool.superblock().needs_check());
}

/// A pool with thin 1 holding block 0 = 1s (committed) and block 1 = 2s (not committed).
fn pool_with_pending_write(d: &Devs) -> Arc<Pool> {
    let pool = d.format();
    pool.create_thin(tid(1)).unwrap();
    let thin = pool.open_thin(tid(1)).unwrap();
    thin.write(&vec![1u8; BS as usize], 0).unwrap();
    pool.commit().unwrap();
    thin.write(&vec![2u8; BS as usize], BS).unwrap();
    pool
}

#[test]
fn each_stage_of_a_commit_fails_safely() {
    // A dry run counts the commit's metadata writes: the last one is the superblock.
    let d = Devs::new();
    let pool = pool_with_pending_write(&d);
    d.meta.set_logging(true);
    pool.commit().unwrap();
    let log = d.meta.log();
    let writes = log.iter().filter(|r| r.op == Op::Write).count() as u64;
    let last = log.iter().rfind(|r| r.op == Op::Write).unwrap();
    assert_eq!(last.offset, 0, "the superblock is written last");
    assert_eq!(log.iter().filter(|r| r.op == Op::Sync).count(), 2);

    // (fault, whether the new transaction is on disk afterwards)
    let cases = [
        (Fault::once(Target::Kind(Op::Write), 0), false), // a tree or bitmap block
        (Fault::once(Target::Kind(Op::Sync), 0), false),  // the flush before the superblock
        (Fault::once(Target::Kind(Op::Write), writes - 1), false), // the superblock itself
        // The flush after the superblock: the new superblock was written, but the commit
        // failed, so the pool rewrites the old one with needs_check (its blocks are intact:
        // a transaction never writes a block the committed superblock reaches).
        (Fault::once(Target::Kind(Op::Sync), 1), false),
        // The same on a disk that dies there: the rewrite fails too, so the new superblock
        // stays (with these devices every completed write is on the disk).
        (Fault::dead(Target::Kind(Op::Sync), 1), true),
    ];
    for (fault, new_on_disk) in cases {
        let d = Devs::new();
        let pool = pool_with_pending_write(&d);
        d.meta.arm(fault);
        let e = pool.commit().unwrap_err();
        assert!(is_eio_on(&e, DeviceRole::Metadata), "{fault:?}: {e:?}");
        assert_degraded(&pool);
        // The open pool shows the last commit: block 1 was never committed.
        let thin = pool.open_thin(tid(1)).unwrap();
        let mut buf = vec![0u8; BS as usize];
        if fault.persistence == Persistence::Once {
            thin.read(&mut buf, BS).unwrap();
            assert!(
                buf.iter().all(|&b| b == 0),
                "{fault:?}: aborted write still mapped"
            );
        }
        // Flushing again cannot make the lost write durable: it must keep failing.
        assert!(
            thin.flush().is_err(),
            "{fault:?}: a flush after the abort succeeded"
        );
        drop(thin);
        drop(pool);
        d.meta.disarm();
        assert_eq!(
            d.on_disk().needs_check(),
            !new_on_disk,
            "{fault:?}: needs_check on disk"
        );
        assert_eq!(
            d.read_back(1, 0).unwrap(),
            vec![1u8; BS as usize],
            "{fault:?}"
        );
        let block1 = d.read_back(1, 1).unwrap();
        let want = if new_on_disk { 2u8 } else { 0u8 };
        assert!(block1.iter().all(|&b| b == want), "{fault:?}: block 1");
        d.recover();
    }
}

/// The kernel flushes the data device before every metadata commit (its pre-commit
/// callback) and treats a failure like any failed commit: abort, needs_check, read-only. The
/// transaction's new mappings may name blocks whose contents never reached the disk.
#[test]
fn a_failed_data_flush_fails_the_commit_and_aborts_the_transaction() {
    let d = Devs::new();
    let pool = pool_with_pending_write(&d);
    d.data.arm(Fault::once(Target::Kind(Op::Sync), 0));
    let thin = pool.open_thin(tid(1)).unwrap();
    let e = thin.flush().unwrap_err();
    assert!(is_eio_on(&e, DeviceRole::Data), "{e:?}");
    assert_degraded(&pool);
    // A retry must not report the lost write durable.
    assert!(
        thin.flush().is_err(),
        "a flush after the failed one succeeded"
    );
    assert!(matches!(thin.write(&[1], 0), Err(Error::ReadOnly(_))));
    drop(thin);
    drop(pool);
    assert!(d.on_disk().needs_check());
    assert_eq!(d.read_back(1, 0).unwrap(), vec![1u8; BS as usize]);
    assert!(d.read_back(1, 1).unwrap().iter().all(|&b| b == 0));
    d.recover();
}

/// The kernel errors a flush of a thin whose changes were aborted (`aborted_with_changes`):
/// a write acknowledged before a metadata failure is gone, and no later flush may say it is
/// durable.
#[test]
fn a_flush_after_an_aborted_transaction_fails() {
    let d = Devs::new();
    let pool = pool_with_pending_write(&d);
    pool.create_thin(tid(2)).unwrap();
    // The failure comes from another thin's metadata: thin 1's pending write goes with it.
    d.meta.arm(Fault::once(Target::Kind(Op::Write), 0));
    assert!(pool.commit().is_err());
    let thin = pool.open_thin(tid(1)).unwrap();
    let e = thin.flush().unwrap_err();
    assert!(matches!(e, Error::ReadOnly(_)), "{e:?}");
    // A pool opened read-only, or one that lost nothing, flushes fine.
    drop(thin);
    drop(pool);
    let ro = PoolOptions {
        read_only: true,
        ..PoolOptions::default()
    };
    let pool = Pool::open(d.meta.inner().clone(), d.data.inner().clone(), ro).unwrap();
    pool.commit().unwrap();
}

#[test]
fn a_read_only_pool_that_lost_nothing_still_flushes() {
    let d = Devs::new();
    let pool = d.format();
    pool.create_thin(tid(1)).unwrap();
    pool.commit().unwrap();
    drop(pool);
    let pool = d.open();
    // Nothing changed since the commit; a metadata read fails (the cache is cold).
    d.meta.arm(Fault::once(Target::Kind(Op::Read), 0));
    let thin = pool.open_thin(tid(1)).unwrap();
    let mut buf = [0u8; 16];
    assert!(thin.read(&mut buf, 0).is_err());
    assert_degraded(&pool);
    thin.flush().unwrap();
}

/// Like the kernel's `passdown_endio`, a failed discard pass-down is ignored: the commit
/// before it was durable, and the blocks are free either way.
#[test]
fn a_failed_discard_pass_down_does_not_fail_the_commit() {
    let d = Devs::new();
    let pool = pool_with_pending_write(&d);
    pool.commit().unwrap();
    pool.create_thin(tid(2)).unwrap();
    pool.delete(tid(1)).unwrap();
    d.data.arm(Fault::once(Target::Kind(Op::Discard), 0));
    pool.commit().expect("the commit was durable");
    assert_eq!(d.data.injected(), 1, "the pass-down was tried");
    assert_eq!(pool.mode(), PoolMode::ReadWrite);
    assert!(!pool.status().needs_check);
    drop(pool);
    assert!(d.read_back(1, 0).is_none(), "thin 1 was deleted");
    let report = check(&**d.meta.inner(), &CheckOptions::default());
    assert!(report.is_clean() && !report.needs_check);
}

/// Fail-stop (house style 2.3): every metadata error turns the pool read-only, including
/// those on the discard path's lookups.
#[test]
fn a_metadata_read_error_while_discarding_turns_the_pool_read_only() {
    // Whole blocks (the unmapping walk) and part of one block (the zeroing lookup).
    for (offset, len) in [(0, 2 * BS), (100, 1000)] {
        let d = Devs::new();
        let pool = d.format();
        pool.create_thin(tid(1)).unwrap();
        pool.open_thin(tid(1))
            .unwrap()
            .write(&vec![3u8; 2 * BS as usize], 0)
            .unwrap();
        drop(pool);
        let pool = d.open(); // cold cache: the lookup reads the device
        d.meta.arm(Fault::once(Target::Kind(Op::Read), 0));
        let e = pool
            .open_thin(tid(1))
            .unwrap()
            .discard(offset, len)
            .unwrap_err();
        assert!(is_eio_on(&e, DeviceRole::Metadata), "{e:?}");
        assert_degraded(&pool);
        drop(pool);
        assert!(d.on_disk().needs_check());
        assert_eq!(d.read_back(1, 1).unwrap(), vec![3u8; BS as usize]);
        d.recover();
    }
}

/// When the superblock cannot be written, needs_check is still set in memory (status says
/// so), as the kernel's dm_pool_metadata_set_needs_check sets its flag before writing.
#[test]
fn a_dead_metadata_disk_still_reports_needs_check() {
    let d = Devs::new();
    let pool = pool_with_pending_write(&d);
    d.meta.arm(Fault::dead(Target::Kind(Op::Write), 0));
    assert!(pool.commit().is_err());
    assert_degraded(&pool);
    drop(pool);
    assert!(!d.on_disk().needs_check(), "the disk took no write");
    d.meta.disarm();
    assert_eq!(d.read_back(1, 0).unwrap(), vec![1u8; BS as usize]);
}

/// A failed data write fails that write, leaves the pool writable and the metadata intact.
#[test]
fn a_failed_data_write_fails_only_that_write() {
    let d = Devs::new();
    let pool = pool_with_pending_write(&d);
    let thin = pool.open_thin(tid(1)).unwrap();
    for (offset, len) in [(0, BS), (2 * BS, BS), (3 * BS + 10, 100)] {
        // In place, a new block, a new block with zero-fill.
        d.data.arm(Fault::once(Target::Kind(Op::Write), 0));
        let e = thin.write(&vec![9u8; len as usize], offset).unwrap_err();
        assert!(is_eio_on(&e, DeviceRole::Data), "{e:?}");
        assert_eq!(pool.mode(), PoolMode::ReadWrite);
    }
    let mut buf = vec![0u8; BS as usize];
    thin.read(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![1u8; BS as usize], "the failed in-place write");
    assert_eq!(
        thin.mapped_blocks().unwrap(),
        2,
        "failed provisions map nothing"
    );
    thin.flush().unwrap();
    drop(thin);
    drop(pool);
    let report = check(&**d.meta.inner(), &CheckOptions::default());
    assert!(
        report.is_clean() && !report.needs_check,
        "{:?}",
        report.findings
    );
    assert_eq!(d.read_back(1, 1).unwrap(), vec![2u8; BS as usize]);
}

/// A thin created in a transaction that a failure threw away is gone: its open handle reads
/// "no such thin", not "damaged metadata" (which would also rewrite the superblock again).
#[test]
fn a_thin_whose_creation_was_rolled_back_is_gone() {
    let d = Devs::new();
    let pool = pool_with_pending_write(&d);
    pool.create_thin(tid(2)).unwrap();
    let thin = pool.open_thin(tid(2)).unwrap();
    thin.write(&[4u8; 4096], 0).unwrap();
    d.meta.arm(Fault::once(Target::Kind(Op::Write), 0));
    assert!(pool.commit().is_err());
    let ops = d.meta.counts();
    for len in [4096, 3 * BS as usize] {
        let mut buf = vec![0u8; len];
        let e = thin.read(&mut buf, 0).unwrap_err();
        assert!(matches!(e, Error::NoSuchThin(_)), "{e:?}");
    }
    assert_eq!(
        d.meta.counts(),
        ops,
        "no metadata I/O for a thin that is gone"
    );
    assert!(matches!(thin.mapped_blocks(), Err(Error::NoSuchThin(_))));
    drop(thin);
    drop(pool);
    d.recover();
}
