//! `engine::activate::{dm, kernel}` against the real kernel: one boot of Linux with dm-thin
//! under qemu (`fixtures::kernel`), no dmsetup on our side.
//!
//! The host builds a pool with our engine and hands its two files to the guest as
//! `/dev/vda` and `/dev/vdb`. The guest runs this very test binary (copied in as an extra
//! binary) with the filter `guest_side`: that function drives the kernel pool through our
//! ioctls and prints result lines. Back on the host we reopen the pool with our engine and
//! check that it holds exactly what the guest did, and that `thin_check` and our checker are
//! clean. Privileged and slow: named `root_`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use engine::activate::dm::{self, DmControl};
use engine::activate::kernel::{KernelPool, KernelPoolMode};
use engine::thin::files;
use engine::{DataBlockSize, Error, NewPool, PoolOptions, PoolPaths};
use fixtures::kernel;
use fixtures::pools::{assert_both_checkers_clean, id, read_thin, write_round_trip_thins};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The data block size (DataBlockSize::DEFAULT, 128 sectors).
const BS: u64 = 64 * KIB;
/// Each thin's size in the guest. Small, because the emulated CPU hashes slowly.
const THIN_BYTES: u64 = 32 * MIB;
/// The pool's transaction id as the host leaves it, and as the guest leaves it.
const HOST_TID: u64 = 5;
const GUEST_TID: u64 = 6;
/// Where the guest writes into a new thin 7: 16 blocks from block 10.
const T7_AT: u64 = 10 * BS;
const T7_LEN: u64 = 16 * BS;
/// The guest discards four whole blocks of thin 7 (it owns them: they are freed) and four
/// of snapshot 2 (shared with thin 1: only unmapped).
const T7_DISCARD: (u64, u64) = (12 * BS, 4 * BS);
const T2_DISCARD: (u64, u64) = (2 * MIB, 4 * BS);
/// What the guest writes over the start of thin 1 after snapshotting it as 8.
const AFTER_SNAP_LEN: u64 = BS;

//------------------------------------------------------------------------------------------------
// Guest side: runs inside the qemu guest only.

/// Reads a whole thin device and prints `SHA <name> <hex>`.
fn emit_sha(name: &str, path: &Path) -> String {
    let mut all = Vec::with_capacity(THIN_BYTES as usize);
    std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all.len() as u64, THIN_BYTES, "size of {}", path.display());
    let hex = kernel::sha256_hex(&all);
    println!("SHA {name} {hex}");
    hex
}

fn write_at(path: &Path, data: &[u8], offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// Discards a byte range of a block device with BLKDISCARD, through our FileDevice.
fn discard(path: &Path, (offset, len): (u64, u64)) {
    use engine::io::{BlockDevice, FileDevice, OpenMode};
    let dev = FileDevice::open(path, OpenMode::ReadWrite).unwrap();
    dev.discard(offset, len).unwrap();
    dev.sync().unwrap();
}

fn kv(key: &str, value: impl std::fmt::Display) {
    println!("KV {key} {value}");
    std::io::stdout().flush().unwrap();
}

/// The guest's half of the scenario. Ignored on the host; `root_kernel_dm_*` runs it in the
/// guest with `--ignored --exact guest_side` and `THINBOX_IN_GUEST=1`.
#[test]
#[ignore = "runs inside the qemu guest of root_kernel_dm_drives_a_pool_our_engine_made"]
fn guest_side() {
    if std::env::var_os("THINBOX_IN_GUEST").is_none() {
        eprintln!("guest_side only runs inside the kernel guest (THINBOX_IN_GUEST=1)");
        return;
    }
    let started = Instant::now();
    // The test harness has printed "test guest_side ... " without a line end.
    println!();
    let paths = PoolPaths::separate(Path::new("/dev/vda"), Path::new("/dev/vdb"));
    let ctl = DmControl::open().expect("open /dev/mapper/control");
    let v = ctl.version();
    kv("dm_version", format!("{}.{}.{}", v[0], v[1], v[2]));
    kv("available", KernelPool::available());
    kv("found_before", KernelPool::find(&paths).unwrap().is_some());

    let pool = KernelPool::start(&paths, &PoolOptions::default(), 16).expect("start");
    kv("pool_name", pool.name());
    let again = KernelPool::start(&paths, &PoolOptions::default(), 16).unwrap_err();
    kv(
        "start_twice",
        format!("busy={} {again}", matches!(again, Error::Busy { .. })),
    );
    let found = KernelPool::find(&paths)
        .unwrap()
        .expect("find the started pool");
    kv(
        "found_after",
        found.name() == pool.name() && found.dev() == pool.dev(),
    );
    drop(found);
    let s = pool.status().unwrap();
    kv("status_start", &s.raw);
    kv("tid_start", s.transaction_id);
    // dmsetup reads the same status through libdevmapper.
    let out = std::process::Command::new("dmsetup")
        .args(["status", pool.name()])
        .output()
        .unwrap();
    kv(
        "dmsetup_status",
        String::from_utf8_lossy(&out.stdout).trim(),
    );
    let table = ctl.table(pool.name()).unwrap();
    kv("pool_table", &table[0]);
    // The same answers through the smallest buffer: every reply comes back with
    // DM_BUFFER_FULL_FLAG first and is retried larger.
    let small = DmControl::open().unwrap().with_initial_buffer(0);
    kv(
        "small_buffer_same",
        small.table(pool.name()).unwrap() == table
            && small.status(pool.name()).unwrap() == ctl.status(pool.name()).unwrap()
            && small.list().unwrap() == ctl.list().unwrap()
            && small.list_versions().unwrap() == ctl.list_versions().unwrap(),
    );

    // Read what our engine wrote.
    for t in 1..=3 {
        let path = pool.activate(id(t), THIN_BYTES, false).unwrap();
        emit_sha(&format!("t{t}"), &path);
    }
    let same = pool.activate(id(1), THIN_BYTES, false).unwrap();
    kv("activate_twice", same == pool.thin_path(id(1)));
    let info = ctl.info(&pool.thin_name(id(1))).unwrap().unwrap();
    kv(
        "thin1_info",
        format!(
            "targets={} open={} suspended={} ro={}",
            info.target_count, info.open_count, info.suspended, info.read_only
        ),
    );
    let ro = pool.activate(id(2), THIN_BYTES, true);
    kv("activate_2_ro_again", ro.is_ok());

    // A new thin, written by the kernel.
    pool.message("create_thin 7").unwrap();
    let t7 = pool.activate(id(7), THIN_BYTES, false).unwrap();
    write_at(
        &t7,
        &kernel::pattern("guest-new-thin", T7_LEN as usize),
        T7_AT,
    );
    emit_sha("t7", &t7);
    let dup = pool.message("create_thin 7").unwrap_err();
    kv("create_thin_twice", &dup);

    // A snapshot of an active origin (suspended around the message), then the origin moves on.
    pool.create_snap(id(8), id(1)).unwrap();
    let t1 = pool.thin_path(id(1));
    write_at(
        &t1,
        &kernel::pattern("after-snap", AFTER_SNAP_LEN as usize),
        0,
    );
    emit_sha("t1_after", &t1);
    // Read-only: the kernel marks the device read-only and refuses writers.
    let t8 = pool.activate(id(8), THIN_BYTES, true).unwrap();
    emit_sha("t8", &t8);
    let t8_info = ctl.info(&pool.thin_name(id(8))).unwrap().unwrap();
    // Linux lets a writer open a read-only disk and refuses its writes (EPERM).
    let t8_write = std::fs::OpenOptions::new()
        .write(true)
        .open(&t8)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 4096], 0));
    kv(
        "t8_read_only",
        format!(
            "info={} write={:?}",
            t8_info.read_only,
            t8_write.map_err(|e| e.raw_os_error())
        ),
    );

    kv(
        "origin_resumed",
        !ctl.info(&pool.thin_name(id(1))).unwrap().unwrap().suspended,
    );

    // Discards: thin 7's own blocks are freed, snapshot 2's shared blocks only unmapped.
    let used_before = pool.status().unwrap().used_data_blocks;
    discard(&t7, T7_DISCARD);
    discard(&pool.thin_path(id(2)), T2_DISCARD);
    let used_after = pool.status().unwrap().used_data_blocks;
    kv("discard_freed", used_before - used_after);
    emit_sha("t7_after", &t7);
    emit_sha("t2_after", &pool.thin_path(id(2)));

    // Delete thin 3.
    pool.deactivate(id(3), false).unwrap();
    pool.message("delete 3").unwrap();
    kv("thin3_node_gone", !pool.thin_path(id(3)).exists());

    // Transaction ids: a wrong old id is refused, the right one moves it.
    let wrong = pool
        .message(&format!("set_transaction_id {} 99", HOST_TID + 1))
        .unwrap_err();
    kv("set_tid_wrong", &wrong);
    pool.message(&format!("set_transaction_id {HOST_TID} {GUEST_TID}"))
        .unwrap();

    // A metadata snapshot, held and released.
    pool.message("reserve_metadata_snap").unwrap();
    let held = pool.status().unwrap();
    kv("held_root", format!("{:?}", held.held_root));
    pool.message("release_metadata_snap").unwrap();
    kv(
        "held_after_release",
        format!("{:?}", pool.status().unwrap().held_root),
    );

    // A busy thin: refused, then removed on its last close.
    let holder = std::fs::File::open(&t7).unwrap();
    let busy = pool.deactivate(id(7), false).unwrap_err();
    kv(
        "busy",
        format!("busy={} {busy}", matches!(busy, Error::Busy { .. })),
    );
    pool.deactivate(id(7), true).unwrap();
    let pending = ctl.info(&pool.thin_name(id(7))).unwrap();
    kv(
        "deferred_pending",
        pending.is_some_and(|i| i.deferred_remove),
    );
    kv("t7_node_gone", !t7.exists());
    for t in [1, 2, 8] {
        pool.deactivate(id(t), false).unwrap();
    }
    pool.deactivate(id(3), false).unwrap();
    let active = |pool: &KernelPool| -> Vec<u64> {
        pool.active_thins()
            .unwrap()
            .iter()
            .map(|t| t.get())
            .collect()
    };
    kv("active_while_pending", format!("{:?}", active(&pool)));
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pool.active_thins().unwrap().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    kv("active_after_close", format!("{:?}", active(&pool)));

    let last = pool.status().unwrap();
    kv("status_end", &last.raw);
    kv("tid_end", last.transaction_id);
    kv("used_data_end", last.used_data_blocks);
    kv("mode_end", format!("{:?}", last.mode));
    let name = pool.name().to_string();
    pool.stop().unwrap();
    kv(
        "pool_gone",
        ctl.info(&name).unwrap().is_none() && !dm::node_path(&name).exists(),
    );
    kv("found_at_end", KernelPool::find(&paths).unwrap().is_some());

    // Features from PoolOptions reach the table, and a read-only pool says so.
    let options = PoolOptions {
        zero_new_blocks: false,
        discard_passdown: false,
        read_only: true,
        no_space: engine::NoSpacePolicy::Queue {
            timeout: engine::NoSpacePolicy::DEFAULT_QUEUE_TIMEOUT,
        },
        ..PoolOptions::default()
    };
    let ro = KernelPool::start(&paths, &options, 0).unwrap();
    kv("ro_table", &ctl.table(ro.name()).unwrap()[0]);
    let st = ro.status().unwrap();
    kv("ro_status", format!("{:?} {}", st.mode, st.raw));
    let refused = ro.message("create_thin 20").unwrap_err();
    kv("ro_create_thin", &refused);
    ro.stop().unwrap();
    kv("list_at_end", ctl.list().unwrap().len());
    kv("guest_seconds", started.elapsed().as_secs_f64());
    println!("GUEST_SIDE_DONE");
}

//------------------------------------------------------------------------------------------------
// Host side

fn read_all(pool: &std::sync::Arc<engine::Pool>, thin: u64) -> Vec<u8> {
    read_thin(pool, thin, THIN_BYTES)
}

/// The `KV <key> <value>` lines the guest printed.
fn kv_lines(output: &str) -> BTreeMap<String, String> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("KV "))
        .map(|l| match l.split_once(' ') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.to_string(), String::new()),
        })
        .collect()
}

/// This test binary, copied under a fixed name (and stripped, so the initramfs stays small).
fn guest_binary(dir: &Path) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let copy = dir.join("thinbox-dm-guest");
    let stripped = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&copy)
        .arg(&exe)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(&exe, &copy).unwrap();
    }
    copy
}

const GUEST: &str = "
export THINBOX_IN_GUEST=1
thinbox-dm-guest --ignored --exact guest_side --nocapture --test-threads=1
";

#[test]
fn root_kernel_dm_drives_a_pool_our_engine_made() {
    if let Err(why) = kernel::available() {
        eprintln!("skipped: the kernel harness is unavailable: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let paths = PoolPaths::in_dir(dir.path());
    let new = NewPool::new(64 * MIB, 4 * MIB, DataBlockSize::DEFAULT);

    // Our side: origin 1, snapshot 2 with a copied-on-write block, scratch thin 3.
    let mut want = BTreeMap::new();
    let (t1_host, t2_host) = {
        let pool = files::create(&paths, new, PoolOptions::default()).unwrap();
        write_round_trip_thins(&pool, 30 * MIB + 123);
        pool.set_transaction_id(0, HOST_TID).unwrap();
        pool.commit().unwrap();
        for t in 1..=3 {
            want.insert(format!("t{t}"), kernel::sha256_hex(&read_all(&pool, t)));
        }
        (read_all(&pool, 1), read_all(&pool, 2))
    };
    assert_both_checkers_clean(&paths.metadata);

    let bin = guest_binary(dir.path());
    let booted = Instant::now();
    let run = kernel::run_guest(GUEST, &[&paths.metadata, &paths.data], &[&bin]).unwrap();
    let guest_wall = booted.elapsed();
    eprintln!("guest run took {:.1} s", guest_wall.as_secs_f64());
    assert!(run.ok, "the guest failed\n{}", run.report());
    assert!(
        run.output.contains("GUEST_SIDE_DONE"),
        "the guest side did not run to its end\n{}",
        run.report()
    );
    let kv = kv_lines(&run.output);
    let get = |k: &str| {
        kv.get(k)
            .unwrap_or_else(|| panic!("the guest printed no {k}\n{}", run.report()))
            .as_str()
    };
    let sha = |name: &str| kernel::sha_of(&run.output, name).unwrap();

    // What the guest saw of the interface.
    assert!(get("dm_version").starts_with("4."), "{}", get("dm_version"));
    assert_eq!(get("available"), "true");
    assert_eq!(get("found_before"), "false");
    let pool_name = get("pool_name");
    assert!(
        pool_name.starts_with("thinbox-") && pool_name.ends_with("-pool") && pool_name.len() == 29,
        "{pool_name}"
    );
    assert!(
        get("start_twice").starts_with("busy=true"),
        "{}",
        get("start_twice")
    );
    assert!(get("start_twice").contains(pool_name));
    assert_eq!(get("found_after"), "true");
    assert_eq!(get("tid_start"), HOST_TID.to_string());
    // Our status is the kernel's line, as dmsetup shows it.
    let status_start = get("status_start");
    assert!(
        get("dmsetup_status").ends_with(status_start),
        "dmsetup says {:?}, we say {status_start:?}",
        get("dmsetup_status")
    );
    assert!(
        status_start.contains(" rw discard_passdown error_if_no_space - ")
            || status_start.contains(" rw no_discard_passdown error_if_no_space - "),
        "{status_start}"
    );
    // The table: the whole 64 MiB data device, our block size and low-water mark.
    let table = get("pool_table");
    assert!(table.starts_with("0 131072 thin-pool "), "{table}");
    assert!(table.contains(" 128 16 "), "{table}");
    assert_eq!(get("small_buffer_same"), "true");
    assert_eq!(get("activate_twice"), "true");
    assert_eq!(
        get("thin1_info"),
        "targets=1 open=0 suspended=false ro=false"
    );
    assert_eq!(get("activate_2_ro_again"), "true");

    // The kernel read exactly what we wrote.
    for t in 1..=3 {
        let name = format!("t{t}");
        assert_eq!(sha(&name), want[&name], "kernel read of {name}");
    }
    assert!(
        get("create_thin_twice").contains("create_thin 7"),
        "{}",
        get("create_thin_twice")
    );
    assert_eq!(sha("t8"), want["t1"], "snapshot 8 is thin 1 as it was");
    assert_eq!(get("origin_resumed"), "true");
    assert_eq!(
        get("discard_freed"),
        "4",
        "four whole blocks of thin 7 freed"
    );
    assert_eq!(get("thin3_node_gone"), "true");
    assert!(
        get("set_tid_wrong").contains("set_transaction_id 6 99"),
        "{}",
        get("set_tid_wrong")
    );
    assert!(
        get("held_root").starts_with("Some("),
        "{}",
        get("held_root")
    );
    assert_eq!(get("held_after_release"), "None");
    let busy = get("busy");
    assert!(busy.starts_with("busy=true"), "{busy}");
    assert!(
        busy.contains(&format!("{}-7", &pool_name[..24])),
        "names the device: {busy}"
    );
    assert!(busy.contains("open count 1"), "{busy}");
    assert_eq!(get("deferred_pending"), "true");
    assert_eq!(get("t7_node_gone"), "true");
    assert_eq!(get("active_while_pending"), "[7]");
    assert_eq!(get("active_after_close"), "[]");
    assert_eq!(get("tid_end"), GUEST_TID.to_string());
    assert_eq!(get("mode_end"), format!("{:?}", KernelPoolMode::ReadWrite));
    assert_eq!(get("pool_gone"), "true");
    assert_eq!(get("found_at_end"), "false");
    assert_eq!(get("list_at_end"), "0");
    assert_eq!(get("t8_read_only"), "info=true write=Err(Some(1))");
    let ro_table = get("ro_table");
    assert!(
        ro_table.ends_with(" 128 0 3 skip_block_zeroing no_discard_passdown read_only"),
        "{ro_table}"
    );
    let ro_status = get("ro_status");
    assert!(
        ro_status.starts_with("ReadOnly 6 ")
            && ro_status.contains(" ro no_discard_passdown queue_if_no_space "),
        "{ro_status}"
    );
    assert!(
        get("ro_create_thin").contains("create_thin 20"),
        "{}",
        get("ro_create_thin")
    );
    eprintln!(
        "guest side took {} s inside the guest",
        get("guest_seconds")
    );

    // Back on our side: the pool holds exactly the guest's changes.
    assert_both_checkers_clean(&paths.metadata);
    let pool = files::open(&paths, PoolOptions::default()).unwrap();
    assert_eq!(pool.superblock().transaction_id, GUEST_TID);
    assert_eq!(pool.thin_ids(), vec![id(1), id(2), id(7), id(8)]);
    assert_eq!(pool.superblock().held_root, 0);

    let mut t1 = t1_host.clone();
    t1[..AFTER_SNAP_LEN as usize]
        .copy_from_slice(&kernel::pattern("after-snap", AFTER_SNAP_LEN as usize));
    let got1 = read_all(&pool, 1);
    assert_eq!(kernel::sha256_hex(&got1), sha("t1_after"));
    assert!(got1 == t1, "thin 1 after the guest's write");
    assert!(
        read_all(&pool, 8) == t1_host,
        "snapshot 8 keeps thin 1's old start"
    );

    let mut t2 = t2_host.clone();
    let (at, len) = (T2_DISCARD.0 as usize, T2_DISCARD.1 as usize);
    t2[at..at + len].fill(0);
    let got2 = read_all(&pool, 2);
    assert_eq!(kernel::sha256_hex(&got2), sha("t2_after"));
    assert!(
        got2 == t2,
        "snapshot 2 reads zeros where the guest discarded"
    );

    let mut t7 = vec![0u8; THIN_BYTES as usize];
    t7[T7_AT as usize..(T7_AT + T7_LEN) as usize]
        .copy_from_slice(&kernel::pattern("guest-new-thin", T7_LEN as usize));
    assert_eq!(kernel::sha256_hex(&t7), sha("t7"));
    let (at, len) = (T7_DISCARD.0 as usize, T7_DISCARD.1 as usize);
    t7[at..at + len].fill(0);
    let got7 = read_all(&pool, 7);
    assert_eq!(kernel::sha256_hex(&got7), sha("t7_after"));
    assert!(got7 == t7, "thin 7 reads zeros where the guest discarded");
    let thin7 = pool.open_thin(id(7)).unwrap();
    assert_eq!(
        thin7.mapped_blocks().unwrap(),
        12,
        "16 written, 4 discarded"
    );
    drop(thin7);
    assert_eq!(
        pool.status().used_data_blocks.to_string(),
        get("used_data_end"),
        "the data blocks in use, as the kernel counted them"
    );

    // And we keep going on the kernel's metadata.
    pool.delete(id(8)).unwrap();
    pool.commit().unwrap();
    drop(pool);
    assert_both_checkers_clean(&paths.metadata);
}
