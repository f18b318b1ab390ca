//! A pool on one device split into a metadata region and a data region (`--device`), here a
//! regular file: create, thins and snapshots, reopen, the offline tools, resize, trim,
//! restore, and repair after the superblock is destroyed, with the real thin_check on the
//! metadata region where it is installed.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;

use fixtures::data::random_bytes;

use common::{ok, run, run_with_stdin, sha256, stderr};

/// Exit 1 (a failure, not a usage error) with `needle` in stderr.
#[track_caller]
fn fails(o: &Output, needle: &str) {
    common::fails(o, 1, needle)
}

/// 1028 KiB of metadata with 128 KiB data blocks: the data region starts at 1152 KiB, and
/// the 124 KiB between belong to neither region.
const METADATA_LEN: u64 = 1028 << 10;
const DATA_OFFSET: u64 = 1152 << 10;
const BLOCK: u64 = 128 << 10;
const DATA_LEN: u64 = 32 << 20;

fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0; len as usize];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A split pool on a sparse file in a temporary directory.
struct SplitPool {
    _tmp: tempfile::TempDir,
    device: PathBuf,
    state: PathBuf,
}

impl SplitPool {
    fn new() -> SplitPool {
        let tmp = tempfile::tempdir().unwrap();
        let pool = SplitPool {
            device: tmp.path().join("disk.img"),
            state: tmp.path().join("state"),
            _tmp: tmp,
        };
        ok(pool.cmd(
            "pool",
            "create",
            &[
                "--metadata-size",
                "1028k",
                "--data-size",
                "32M",
                "--block-size",
                "128k",
            ],
        ));
        pool
    }

    fn dev(&self) -> &str {
        self.device.to_str().unwrap()
    }

    fn cmd_with_stdin(&self, group: &str, verb: &str, rest: &[&str], input: &[u8]) -> Output {
        let state = self.state.to_str().unwrap();
        let mut args = vec![group, verb, "--device", self.dev(), "--state-dir", state];
        args.extend_from_slice(rest);
        run_with_stdin(&args, input)
    }

    fn cmd(&self, group: &str, verb: &str, rest: &[&str]) -> Output {
        self.cmd_with_stdin(group, verb, rest, &[])
    }

    fn trim(&self) -> Output {
        let state = self.state.to_str().unwrap();
        run(&["trim", "--device", self.dev(), "--state-dir", state])
    }

    fn read(&self, id: &str) -> Vec<u8> {
        ok(self.cmd("thin", "read", &[id])).stdout
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_slice(&ok(self.cmd("pool", "status", &["--json"])).stdout).unwrap()
    }
}

#[test]
fn one_file_holds_metadata_then_data_and_reopens() {
    assert_eq!(DATA_OFFSET, METADATA_LEN.next_multiple_of(BLOCK));
    let pool = SplitPool::new();
    assert_eq!(
        std::fs::metadata(&pool.device).unwrap().len(),
        DATA_OFFSET + DATA_LEN,
        "a new file has room for both regions"
    );
    let status = pool.status();
    assert_eq!(status["data_space"]["total_bytes"], DATA_LEN);
    assert_eq!(status["metadata_space"]["total_bytes"], METADATA_LEN);

    ok(pool.cmd("thin", "create", &["1", "--size", "8M", "--name", "base"]));
    let origin = random_bytes(8 << 20, 1);
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &origin));
    ok(pool.cmd("thin", "snap", &["2", "1", "--name", "snap"]));
    let patch = random_bytes(4096, 2);
    ok(pool.cmd_with_stdin("thin", "write", &["1", "--offset", "1M"], &patch));
    let mut changed = origin.clone();
    changed[1 << 20..(1 << 20) + 4096].copy_from_slice(&patch);

    // The thins' bytes are in the data region, the metadata at the start of the file.
    let mapped = read_range(&pool.device, DATA_OFFSET, 8 << 20);
    assert!(
        mapped
            .windows(4096)
            .step_by(4096)
            .any(|w| w == &origin[..4096]),
        "the origin's first block is somewhere in the data region"
    );
    assert_eq!(
        &read_range(&pool.device, 32, 8),
        &27_022_010u64.to_le_bytes(),
        "the superblock is at byte 0"
    );

    // Every command reopens the pool: the split comes back from the superblock.
    assert_eq!(sha256(&pool.read("1")), sha256(&changed));
    assert_eq!(sha256(&pool.read("2")), sha256(&origin));

    // Images in and out, holes kept.
    let image = pool._tmp.path().join("snap.img");
    let img = image.to_str().unwrap();
    ok(pool.cmd("thin", "export", &["2", "--output", img]));
    assert_eq!(sha256(&std::fs::read(&image).unwrap()), sha256(&origin));
    ok(pool.cmd("thin", "create", &["3", "--size", "8M"]));
    ok(pool.cmd("thin", "import", &["3", "--input", img]));
    assert_eq!(sha256(&pool.read("3")), sha256(&origin));

    // The offline tools take the device as the metadata.
    let check = ok(run(&["check", pool.dev()]));
    assert!(String::from_utf8_lossy(&check.stdout).contains("METADATA_FREE_BLOCKS=256"));
    let xml = ok(run(&["dump", pool.dev()])).stdout;
    let xml = String::from_utf8(xml).unwrap();
    assert!(xml.contains("nr_data_blocks=\"256\""), "{xml}");

    if fixtures::tools::available() {
        // thin_check reads the metadata at the start of the whole device, and the region
        // cut out of it.
        let whole = fixtures::tools::thin_check(&pool.device, &[]);
        assert_eq!(whole.rc, 0, "{whole:?}");
        let region = pool._tmp.path().join("metadata-region");
        std::fs::write(&region, read_range(&pool.device, 0, METADATA_LEN)).unwrap();
        let cut = fixtures::tools::thin_check(&region, &[]);
        assert_eq!(cut.rc, 0, "{cut:?}");
        let dumped = fixtures::tools::thin_dump(&region, &[]);
        assert_eq!(
            dumped.stdout, xml,
            "thin_dump of the region equals our dump"
        );
    } else {
        eprintln!("thin-provisioning-tools are not installed: skipping thin_check");
    }
}

#[test]
fn the_split_device_has_one_owner() {
    let pool = SplitPool::new();
    let held = engine::thin::files::open(
        &engine::PoolPaths::split(&pool.device),
        engine::PoolOptions::default(),
    )
    .unwrap();
    let owner = format!("held by pid {}", std::process::id());
    fails(&pool.cmd("thin", "create", &["1", "--size", "1M"]), &owner);
    fails(&pool.trim(), &owner);
    fails(&run(&["check", pool.dev()]), &owner);
    drop(held);
    ok(pool.cmd("thin", "create", &["1", "--size", "1M"]));
}

#[test]
fn metadata_never_grows_into_the_data_and_data_grows_to_the_end() {
    let pool = SplitPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "4M"]));
    let bytes = random_bytes(4 << 20, 3);
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &bytes));

    fails(
        &pool.cmd("pool", "resize", &["--metadata-size", "2M"]),
        "the metadata cannot grow",
    );
    assert_eq!(pool.status()["metadata_space"]["total_bytes"], METADATA_LEN);

    ok(pool.cmd("pool", "resize", &["--data-size", "48M"]));
    assert_eq!(
        std::fs::metadata(&pool.device).unwrap().len(),
        DATA_OFFSET + (48 << 20)
    );
    assert_eq!(pool.status()["data_space"]["total_bytes"], 48u64 << 20);
    assert_eq!(sha256(&pool.read("1")), sha256(&bytes));
    ok(run(&["check", pool.dev()]));

    // A device that grew is taken at its new size when the pool next opens.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&pool.device)
        .unwrap();
    f.set_len(DATA_OFFSET + (64 << 20) + 1000).unwrap();
    drop(f);
    assert_eq!(pool.status()["data_space"]["total_bytes"], 64u64 << 20);
    ok(run(&["check", pool.dev()]));
}

#[test]
fn trim_discards_only_in_the_data_region() {
    let pool = SplitPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "4M"]));
    ok(pool.cmd("thin", "create", &["2", "--size", "4M"]));
    let one = random_bytes(4 << 20, 4);
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &one));
    ok(pool.cmd_with_stdin("thin", "write", &["2"], &random_bytes(4 << 20, 5)));
    ok(pool.cmd("thin", "delete", &["2"]));

    // Stale bytes everywhere nothing maps: the last 16 MiB of the data region, and the gap
    // between the regions.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&pool.device)
        .unwrap();
    let gap = random_bytes((DATA_OFFSET - METADATA_LEN) as usize, 6);
    f.write_all_at(&gap, METADATA_LEN).unwrap();
    f.write_all_at(&random_bytes(16 << 20, 7), DATA_OFFSET + (16 << 20))
        .unwrap();
    f.sync_all().unwrap();
    drop(f);
    let metadata_before = sha256(&read_range(&pool.device, 0, METADATA_LEN));
    let allocated_before = allocated_bytes(&pool.device);

    let out = ok(pool.trim());
    assert!(out.stdout.is_empty() && out.stderr.is_empty());

    assert_eq!(
        sha256(&read_range(&pool.device, 0, METADATA_LEN)),
        metadata_before,
        "trim never touches the metadata region"
    );
    assert_eq!(
        read_range(&pool.device, METADATA_LEN, DATA_OFFSET - METADATA_LEN),
        gap,
        "nor the bytes between the regions"
    );
    let allocated_after = allocated_bytes(&pool.device);
    assert!(
        allocated_after + (16 << 20) <= allocated_before,
        "{allocated_after} bytes allocated after trim, {allocated_before} before"
    );
    assert_eq!(sha256(&pool.read("1")), sha256(&one));
    ok(run(&["check", pool.dev()]));
}

#[test]
fn restore_onto_the_device_keeps_its_data_region() {
    let pool = SplitPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "2M"]));
    let bytes = random_bytes(2 << 20, 8);
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &bytes));
    let xml = pool._tmp.path().join("pool.xml");
    let dumped = ok(run(&["dump", pool.dev()])).stdout;
    std::fs::write(&xml, &dumped).unwrap();
    let data_before = sha256(&read_range(&pool.device, DATA_OFFSET, DATA_LEN));

    let out = ok(run(&[
        "restore",
        "-i",
        xml.to_str().unwrap(),
        "-o",
        pool.dev(),
    ]));
    assert!(
        stderr(&out).contains("only that part is written"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ok(run(&["dump", pool.dev()])).stdout, dumped);
    assert_eq!(
        sha256(&read_range(&pool.device, DATA_OFFSET, DATA_LEN)),
        data_before
    );
    assert_eq!(pool.status()["metadata_space"]["total_bytes"], METADATA_LEN);
    assert_eq!(sha256(&pool.read("1")), sha256(&bytes));
}

/// The procedure docs/format.md gives for a split device whose superblock is gone: the split
/// cannot be read, so `repair` scans the device into a file of the metadata region's size,
/// and that file is copied back over the region. Nothing in the data region moves.
#[test]
fn a_destroyed_superblock_is_repaired_into_a_region_sized_file_and_copied_back() {
    let pool = SplitPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "4M", "--name", "base"]));
    let origin = random_bytes(3 << 20, 21);
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &origin));
    ok(pool.cmd("thin", "snap", &["2", "1"]));
    let patch = random_bytes(256 << 10, 22);
    ok(pool.cmd_with_stdin("thin", "write", &["2", "--offset", "1M"], &patch));
    let mut snap = origin.clone();
    snap[1 << 20..(1 << 20) + patch.len()].copy_from_slice(&patch);
    let data_before = sha256(&read_range(&pool.device, DATA_OFFSET, DATA_LEN));
    let dump_before = ok(run(&["dump", pool.dev()])).stdout;

    // Destroy the superblock: the pool no longer opens, and says why.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&pool.device)
        .unwrap();
    f.write_all_at(&[0; 4096], 0).unwrap();
    drop(f);
    fails(&pool.cmd("thin", "ls", &[]), "no intact pool superblock");

    let region = pool._tmp.path().join("metadata.new");
    std::fs::File::create(&region)
        .unwrap()
        .set_len(METADATA_LEN)
        .unwrap();
    let out = ok(run(&[
        "repair",
        "-i",
        pool.dev(),
        "-o",
        region.to_str().unwrap(),
        "--data-block-size",
        "128k",
    ]));
    assert!(
        stderr(&out).contains("found by scanning"),
        "{}",
        stderr(&out)
    );
    ok(run(&["check", region.to_str().unwrap()]));
    if fixtures::tools::available() {
        let checked = fixtures::tools::thin_check(&region, &[]);
        assert_eq!(checked.rc, 0, "{checked:?}");
    }
    // Copy it back (what `dd conv=notrunc` does).
    let repaired = std::fs::read(&region).unwrap();
    assert_eq!(repaired.len() as u64, METADATA_LEN);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&pool.device)
        .unwrap();
    f.write_all_at(&repaired, 0).unwrap();
    drop(f);

    // The same split, the same mappings, the same bytes; the data region untouched.
    let status = pool.status();
    assert_eq!(status["metadata_space"]["total_bytes"], METADATA_LEN);
    assert_eq!(status["data_space"]["total_bytes"], DATA_LEN);
    let mappings = |xml: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(xml)
            .lines()
            .filter(|l| l.contains("_mapping"))
            .map(str::to_owned)
            .collect()
    };
    let before = mappings(&dump_before);
    assert!(before.len() > 2, "{before:?}");
    assert_eq!(mappings(&ok(run(&["dump", pool.dev()])).stdout), before);
    assert_eq!(sha256(&pool.read("1")[..origin.len()]), sha256(&origin));
    assert_eq!(sha256(&pool.read("2")[..snap.len()]), sha256(&snap));
    assert_eq!(
        sha256(&read_range(&pool.device, DATA_OFFSET, DATA_LEN)),
        data_before
    );
    ok(run(&["check", pool.dev()]));
}

#[test]
fn bad_split_sizes_are_refused_with_the_device_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("disk.img");
    let d = dev.to_str().unwrap();
    let state = tmp.path().join("state");
    let s = state.to_str().unwrap();
    let create = |rest: &[&str]| {
        let mut args = vec!["pool", "create", "--device", d, "--state-dir", s];
        args.extend_from_slice(rest);
        run(&args)
    };
    fails(&create(&["--data-size", "16M"]), "needs --metadata-size");
    fails(
        &create(&["--metadata-size", "1000000", "--data-size", "16M"]),
        "not a multiple of 4 KiB",
    );
    fails(
        &create(&["--metadata-size", "64k", "--data-size", "16M"]),
        "too small",
    );
    assert!(
        !dev.exists(),
        "nothing is created for sizes that cannot work"
    );

    // A device with no pool on it has no known split.
    std::fs::File::create(&dev)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let out = run(&["thin", "ls", "--device", d, "--state-dir", s]);
    fails(&out, "no intact pool superblock");
    assert!(stderr(&out).contains(d), "{}", stderr(&out));

    // --device takes the place of --pool and --metadata/--data.
    let both = run(&["thin", "ls", "--device", d, "--pool", s]);
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
}
