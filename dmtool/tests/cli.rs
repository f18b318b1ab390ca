//! dmtool end to end: spawn the built binary on pools in temporary directories.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use fixtures::data::random_bytes;

use common::{fails, ok, run, run_with_stdin, sha256, stderr, stdout, DMTOOL};

/// A pool in a temporary directory: 64 MiB of data, 4 MiB of metadata.
struct TestPool {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl TestPool {
    fn new() -> TestPool {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pool");
        let pool = TestPool { _tmp: tmp, dir };
        ok(run(&[
            "pool",
            "create",
            "--pool",
            pool.path(),
            "--data-size",
            "64M",
            "--metadata-size",
            "4M",
        ]));
        pool
    }

    fn path(&self) -> &str {
        self.dir.to_str().unwrap()
    }

    fn metadata(&self) -> PathBuf {
        self.dir.join("metadata")
    }

    /// `dmtool GROUP VERB --pool DIR REST...`
    fn cmd(&self, group: &str, verb: &str, rest: &[&str]) -> Output {
        self.cmd_with_stdin(group, verb, rest, &[])
    }

    fn cmd_with_stdin(&self, group: &str, verb: &str, rest: &[&str], input: &[u8]) -> Output {
        let mut args = vec![group, verb, "--pool", self.path()];
        args.extend_from_slice(rest);
        run_with_stdin(&args, input)
    }

    fn read(&self, id: &str, rest: &[&str]) -> Vec<u8> {
        let mut args = vec![id];
        args.extend_from_slice(rest);
        ok(self.cmd("thin", "read", &args)).stdout
    }
}

#[test]
fn written_data_reads_back_identical() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "8M", "--name", "base"]));
    let data = random_bytes(3_000_001, 1);
    ok(pool.cmd_with_stdin("thin", "write", &["1", "--offset", "4103"], &data));
    let back = pool.read("1", &["--offset", "4103", "--length", "3000001"]);
    assert_eq!(sha256(&back), sha256(&data));

    // The whole thin by default: zeros around the data, exactly its size.
    let whole = pool.read("1", &[]);
    assert_eq!(whole.len(), 8 << 20);
    assert!(whole[..4103].iter().all(|&b| b == 0));
    assert_eq!(sha256(&whole[4103..4103 + data.len()]), sha256(&data));
    assert!(whole[4103 + data.len()..].iter().all(|&b| b == 0));

    // --input FILE, at an offset given with a suffix.
    let file = pool.dir.join("input");
    std::fs::write(&file, &data[..1 << 20]).unwrap();
    ok(pool.cmd(
        "thin",
        "write",
        &["1", "--offset", "7M", "--input", file.to_str().unwrap()],
    ));
    assert_eq!(pool.read("1", &["--offset", "7M"]), &data[..1 << 20]);
}

#[test]
fn snapshot_keeps_the_old_bytes_when_the_origin_is_overwritten() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "4M"]));
    let old = random_bytes(4 << 20, 2);
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &old));
    ok(pool.cmd("thin", "snap", &["2", "1", "--name", "before"]));
    let new = random_bytes(100_000, 3);
    ok(pool.cmd_with_stdin("thin", "write", &["1", "--offset", "1000000"], &new));

    let snap = pool.read("2", &[]);
    assert_eq!(snap.len(), 4 << 20, "a snapshot has its origin's size");
    assert_eq!(sha256(&snap), sha256(&old));
    let origin = pool.read("1", &[]);
    assert_eq!(&origin[1_000_000..1_100_000], &new[..]);
    assert_eq!(&origin[..1_000_000], &old[..1_000_000]);

    let ls: serde_json::Value =
        serde_json::from_slice(&ok(pool.cmd("thin", "ls", &["--json"])).stdout).unwrap();
    assert_eq!(ls[1]["id"], 2);
    assert_eq!(ls[1]["name"], "before");
    assert_eq!(ls[1]["origin"], 1);
    assert_eq!(ls[1]["size_bytes"], 4 << 20);
}

#[test]
fn delete_removes_the_thin_and_its_record() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "1M", "--name", "gone"]));
    ok(pool.cmd("thin", "create", &["2", "--size", "1M"]));
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &random_bytes(1 << 20, 4)));
    ok(pool.cmd("thin", "delete", &["1"]));
    let ls = stdout(&ok(pool.cmd("thin", "ls", &[])));
    assert!(!ls.contains("gone"), "{ls}");
    let ids: Vec<&str> = ls
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(ids, ["2"]);
    // The name is free again.
    ok(pool.cmd("thin", "create", &["3", "--size", "1M", "--name", "gone"]));
    let status: serde_json::Value =
        serde_json::from_slice(&ok(pool.cmd("pool", "status", &["--json"])).stdout).unwrap();
    assert_eq!(
        status["data_space"]["used_bytes"], 0,
        "deleting frees the data blocks"
    );
}

#[test]
fn status_prints_the_kernel_line_a_table_and_json() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "1M"]));
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &[7u8; 65536 * 3]));
    let text = stdout(&ok(pool.cmd("pool", "status", &[])));
    let first = text.lines().next().unwrap();
    // 64 MiB of 64 KiB blocks = 1024 blocks = 131072 sectors; transaction id 1 after one
    // create; 3 data blocks used.
    assert!(first.starts_with("0 131072 thin-pool 1 "), "{first}");
    assert!(
        first.contains(" 3/1024 - rw discard_passdown error_if_no_space - "),
        "{first}"
    );
    for label in [
        "Data Space Used:",
        "Data Space Total:",
        "Data Space Available:",
        "Metadata Space Used:",
        "Metadata Space Total:",
        "Metadata Space Available:",
    ] {
        assert!(text.contains(label), "{label} missing from\n{text}");
    }
    assert!(text.contains("192KiB"), "{text}");

    let json: serde_json::Value =
        serde_json::from_slice(&ok(pool.cmd("pool", "status", &["--json"])).stdout).unwrap();
    assert_eq!(json["kernel_line"], first);
    assert_eq!(json["status"]["transaction_id"], 1);
    assert_eq!(json["status"]["used_data_blocks"], 3);
    assert_eq!(json["data_space"]["used_bytes"], 3 * 65536);
    assert_eq!(json["data_space"]["total_bytes"], 64 << 20);
    assert_eq!(json["metadata_space"]["total_bytes"], 4 << 20);
    assert_eq!(json["thin_count"], 1);
}

#[test]
fn check_is_clean_and_prints_what_thin_check_prints() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "2M"]));
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &random_bytes(1 << 20, 5)));
    ok(pool.cmd("thin", "snap", &["2", "1"]));
    let out = ok(run(&["check", pool.metadata().to_str().unwrap()]));
    assert_eq!(
        stdout(&out),
        "TRANSACTION_ID=2\nMETADATA_FREE_BLOCKS=1023\n"
    );
    assert_eq!(stderr(&out), "");
    let quiet = ok(run(&["check", "--quiet", pool.path()]));
    assert!(quiet.stdout.is_empty() && quiet.stderr.is_empty());
    ok(run(&["check", "--skip-mappings", pool.path()]));
    if fixtures::tools::available() {
        let real = fixtures::tools::thin_check(&pool.metadata(), &[]);
        assert_eq!(real.rc, 0, "{}", real.stderr);
        assert_eq!(real.stdout, stdout(&out));
    }
}

#[test]
fn check_finds_damage_in_a_corrupted_copy() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "2M"]));
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &random_bytes(2 << 20, 6)));
    let copy = pool.dir.join("metadata.damaged");
    let mut bytes = std::fs::read(pool.metadata()).unwrap();
    // Garble every block but the superblock among the first 32: whatever the trees and
    // space maps use there is now damaged.
    bytes[4096..32 * 4096].copy_from_slice(&random_bytes(31 * 4096, 7));
    std::fs::write(&copy, &bytes).unwrap();
    let out = run(&["check", copy.to_str().unwrap()]);
    fails(&out, 1, "error:");
    assert!(
        stdout(&out).starts_with("TRANSACTION_ID=1\n"),
        "{}",
        stdout(&out)
    );
    let quiet = run(&["check", "-q", copy.to_str().unwrap()]);
    assert_eq!(quiet.status.code(), Some(1));
    assert!(quiet.stdout.is_empty() && quiet.stderr.is_empty());
    // The original is untouched and still clean.
    ok(run(&["check", "-q", pool.path()]));
}

#[test]
fn dump_equals_thin_dump() {
    if !fixtures::tools::available() {
        eprintln!("skipped: thin_dump is not installed");
        return;
    }
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "4M"]));
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &random_bytes(3 << 20, 8)));
    ok(pool.cmd("thin", "snap", &["2", "1"]));
    ok(pool.cmd_with_stdin(
        "thin",
        "write",
        &["1", "--offset", "1M"],
        &random_bytes(300_000, 9),
    ));
    ok(pool.cmd("thin", "create", &["7", "--size", "1M"]));
    let meta = pool.metadata();
    let m = meta.to_str().unwrap();
    for args in [
        &[][..],
        &["--format", "human_readable"][..],
        &["--skip-mappings"][..],
        &["--dev-id", "2"][..],
    ] {
        let ours = ok(run(&[&["dump"], args, &[m]].concat()));
        let real_args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "--format" { "-f" } else { a })
            .collect();
        let real = fixtures::tools::thin_dump(&meta, &real_args);
        assert_eq!(real.rc, 0, "{}", real.stderr);
        assert_eq!(stdout(&ours), real.stdout, "dump {args:?}");
    }
    let out = pool.dir.join("dump.xml");
    ok(run(&["dump", "-o", out.to_str().unwrap(), m]));
    assert_eq!(
        std::fs::read_to_string(out).unwrap(),
        fixtures::tools::thin_dump(&meta, &[]).stdout
    );
}

/// Waits until process `pid` holds a flock (the pool's ownership lock), watching
/// `/proc/locks`: polling with a dmtool command would take the lock itself and could make
/// the process under test lose the race.
fn wait_for_flock(child: &mut Child) {
    let pid = child.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let locks = std::fs::read_to_string("/proc/locks").unwrap();
        let held = locks.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 4 && f[1] == "FLOCK" && f[4] == pid
        });
        if held {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("pid {pid} exited ({status}) before taking the pool");
        }
        assert!(Instant::now() < deadline, "pid {pid} never took the pool");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_second_owner_is_refused_with_the_holder_named() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "4M"]));
    let mut writer: Child = Command::new(DMTOOL)
        .args(["thin", "write", "--pool", pool.path(), "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = writer.stdin.take().unwrap();
    stdin.write_all(&[1u8; 4096]).unwrap();
    let pid = writer.id();
    let holder = format!("held by pid {pid}");

    wait_for_flock(&mut writer);
    fails(&pool.cmd("thin", "ls", &[]), 1, &holder);
    let create = pool.cmd("thin", "create", &["2", "--size", "1M"]);
    fails(
        &create,
        1,
        &format!("dmtool: failed to open pool {}", pool.metadata().display()),
    );
    fails(&create, 1, &holder);
    fails(&create, 1, "thin write");
    // Offline tools refuse a live pool too, except on its metadata snapshot.
    fails(&run(&["check", pool.path()]), 1, &holder);

    drop(stdin);
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pool.read("1", &["--length", "4096"]), vec![1u8; 4096]);
}

#[test]
fn an_owner_in_this_process_is_named_too() {
    let pool = TestPool::new();
    let paths = engine::PoolPaths::in_dir(&pool.dir);
    let held = engine::thin::files::open(&paths, engine::PoolOptions::default()).unwrap();
    let out = pool.cmd("thin", "create", &["1", "--size", "1M"]);
    fails(&out, 1, &format!("held by pid {}", std::process::id()));
    drop(held);
    ok(pool.cmd("thin", "create", &["1", "--size", "1M"]));
}

#[test]
fn usage_errors_exit_2() {
    let pool = TestPool::new();
    let p = pool.path();
    let meta = pool.metadata();
    let m = meta.to_str().unwrap();
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["pool"],
        &["thin", "create", "--pool", p, "1"],
        &["thin", "create", "--pool", p, "x", "--size", "1M"],
        &["thin", "create", "--pool", p, "16777216", "--size", "1M"],
        &["thin", "create", "--pool", p, "1", "--size", "1X"],
        &[
            "thin",
            "create",
            "--pool",
            p,
            "--metadata",
            m,
            "1",
            "--size",
            "1M",
        ],
        &["thin", "create", "--metadata", m, "1", "--size", "1M"],
        &["thin", "ls"],
        &["thin", "read", "--pool", p, "1", "--bogus"],
        &["thin", "rename", "--pool", p, "1"],
        &["thin", "rename", "--pool", p, "1", "x", "--clear"],
        &["pool", "create", "--pool", p, "--block-size", "96k"],
        &["pool", "set", "--pool", p],
        &["pool", "set", "--pool", p, "--when-full", "later"],
        &["dump", "--format", "yaml", m],
        &["check"],
        &["repair", "-i", m],
        &["repair", "-i", m, "-o", m, "--data-block-size", "96k"],
    ];
    for args in cases {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}

#[test]
fn every_help_has_an_example() {
    let helps: &[&[&str]] = &[
        &[],
        &["pool"],
        &["pool", "create"],
        &["pool", "status"],
        &["pool", "set"],
        &["thin"],
        &["thin", "create"],
        &["thin", "snap"],
        &["thin", "delete"],
        &["thin", "write"],
        &["thin", "read"],
        &["thin", "ls"],
        &["thin", "import"],
        &["thin", "rename"],
        &["thin", "export"],
        &["check"],
        &["dump"],
        &["repair"],
        &["trim"],
    ];
    for args in helps {
        let out = ok(run(&[*args, &["--help"]].concat()));
        assert!(
            stdout(&out).contains("Example: dmtool "),
            "{args:?}: {}",
            stdout(&out)
        );
    }
}

#[test]
fn an_unknown_thin_fails_with_a_clear_message() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "1M"]));
    let none = "thin device 7 does not exist";
    fails(&pool.cmd("thin", "delete", &["7"]), 1, none);
    fails(&pool.cmd("thin", "read", &["7"]), 1, none);
    fails(&pool.cmd_with_stdin("thin", "write", &["7"], b"x"), 1, none);
    fails(&pool.cmd("thin", "snap", &["8", "7"]), 1, none);
    fails(
        &pool.cmd("thin", "delete", &["7"]),
        1,
        "failed to delete thin 7 in pool",
    );
    fails(
        &pool.cmd("thin", "create", &["1", "--size", "1M"]),
        1,
        "thin device 1 already exists",
    );
}

#[test]
fn nothing_goes_past_a_thins_end() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "1M"]));
    // A stream: what fits is written, the rest refused.
    let data = random_bytes((1 << 20) + 1, 10);
    fails(
        &pool.cmd_with_stdin("thin", "write", &["1"], &data),
        1,
        "does not fit in thin 1",
    );
    assert_eq!(pool.read("1", &[]), &data[..1 << 20]);
    // A file: refused before anything is written.
    let file = pool.dir.join("input");
    std::fs::write(&file, [9u8; 2]).unwrap();
    let f = file.to_str().unwrap();
    fails(
        &pool.cmd("thin", "write", &["1", "--offset", "1048575", "-i", f]),
        1,
        "does not fit",
    );
    assert_eq!(pool.read("1", &["--offset", "1048575"]), [data[1048575]]);
    ok(pool.cmd("thin", "write", &["1", "--offset", "1048574", "-i", f]));
    assert_eq!(pool.read("1", &["--offset", "1048574"]), [9u8; 2]);
    fails(
        &pool.cmd_with_stdin("thin", "write", &["1", "--offset", "2M"], b"x"),
        1,
        "past the end",
    );
    fails(
        &pool.cmd("thin", "read", &["1", "--offset", "1M", "--length", "1"]),
        1,
        "past the end",
    );
    fails(
        &pool.cmd("thin", "read", &["1", "--offset", "2M"]),
        1,
        "past the end",
    );
    assert_eq!(pool.read("1", &["--offset", "1M"]), b"");
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "16M"]));
    let mut child = Command::new(DMTOOL)
        .args(["thin", "read", "--pool", pool.path(), "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 10];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    // The pipe closes here, with most of 16 MiB unread.
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stderr(&out), "");
}

#[test]
fn create_refuses_an_existing_pool_unless_forced() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "1M"]));
    fails(&pool.cmd("pool", "create", &[]), 1, "already holds a pool");
    ok(pool.cmd(
        "pool",
        "create",
        &["--force", "--data-size", "32M", "--no-zero"],
    ));
    let status: serde_json::Value =
        serde_json::from_slice(&ok(pool.cmd("pool", "status", &["--json"])).stdout).unwrap();
    assert_eq!(status["thin_count"], 0);
    assert_eq!(status["data_space"]["total_bytes"], 32 << 20);
    assert_eq!(
        status["status"]["zero_new_blocks"], false,
        "--no-zero is remembered"
    );
    let ls = ok(pool.cmd("thin", "ls", &[]));
    assert_eq!(
        stdout(&ls).lines().count(),
        1,
        "only the header: {}",
        stdout(&ls)
    );
    assert_eq!(stderr(&ls), "", "a fresh store has nothing to reconcile");
}

#[test]
fn pools_on_named_files_keep_their_store_in_the_state_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let meta = tmp.path().join("m.img");
    let data = tmp.path().join("d.img");
    let state = tmp.path().join("state");
    let loc = [
        "--metadata",
        meta.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    fn args<'a>(verb: &[&'a str], loc: &[&'a str], rest: &[&'a str]) -> Vec<&'a str> {
        [verb, loc, rest].concat()
    }
    let with = |verb, rest| args(verb, &loc, rest);
    ok(run(&with(
        &["pool", "create"],
        &["--data-size", "16M", "--metadata-size", "1M"],
    )));
    ok(run(&with(
        &["thin", "create"],
        &["5", "--size", "64k", "--name", "small"],
    )));
    let store: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("volumes.json")).unwrap()).unwrap();
    assert_eq!(store["volumes"][0]["name"], "small");
    assert_eq!(store["transaction_id"], 1);
    let read = ok(run(&with(&["thin", "read"], &["5"])));
    assert_eq!(read.stdout.len(), 64 << 10);
}

/// A store left with a pending intent, as a crash between the protocol's steps leaves it.
fn store_with_pending(store: &Path, transaction_id: u64, pending: serde_json::Value) {
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store).unwrap()).unwrap();
    json["transaction_id"] = transaction_id.into();
    json["pending"] = pending;
    if let Some(vols) = json["volumes"].as_array_mut() {
        vols.retain(|v| v["id"] != 2);
    }
    std::fs::write(store, serde_json::to_vec(&json).unwrap()).unwrap();
}

#[test]
fn an_interrupted_change_is_settled_on_the_next_open() {
    let pool = TestPool::new();
    let store = pool.dir.join("volumes.json");
    ok(pool.cmd("thin", "create", &["1", "--size", "1M"]));
    ok(pool.cmd("thin", "create", &["2", "--size", "2M", "--name", "two"]));
    // Crashed after the pool committed (it is at 2), before the store caught up (still 1).
    let create = serde_json::json!({"op": "create", "id": 2, "size_bytes": 2097152,
                                    "name": "two", "origin": null});
    store_with_pending(&store, 1, create.clone());
    let ls = ok(pool.cmd("thin", "ls", &[]));
    assert!(stderr(&ls).contains("completed"), "{}", stderr(&ls));
    assert!(stdout(&ls).contains("two"), "{}", stdout(&ls));
    // Crashed before the pool committed: the intent names a thin the pool never made.
    let create3 = serde_json::json!({"op": "create", "id": 3, "size_bytes": 512,
                                     "name": null, "origin": null});
    store_with_pending(&store, 2, create3);
    let ls = ok(pool.cmd("thin", "ls", &[]));
    assert!(stderr(&ls).contains("rolled back"), "{}", stderr(&ls));
    // Thin 2 lost its record above: an orphan, listed but of unknown size.
    assert!(stdout(&ls).contains("orphan"), "{}", stdout(&ls));
    fails(&pool.cmd("thin", "read", &["2"]), 1, "no record");
    ok(pool.cmd("thin", "delete", &["2"]));
    let ls = ok(pool.cmd("thin", "ls", &[]));
    assert_eq!(stderr(&ls), "");
    ok(run(&["check", "-q", pool.path()]));
}

#[test]
fn a_damaged_store_is_an_error_that_names_it() {
    let pool = TestPool::new();
    let store = pool.dir.join("volumes.json");
    std::fs::write(&store, "{ not json").unwrap();
    fails(
        &pool.cmd("thin", "ls", &[]),
        1,
        &format!("state store {}", store.display()),
    );
}

#[test]
fn kernel_backend_is_refused_clearly_without_device_mapper() {
    if engine::activate::kernel::KernelPool::available() {
        eprintln!("skipped: this host has device-mapper");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    ok(run(&[
        "pool",
        "create",
        "--pool",
        p,
        "--data-size",
        "64M",
        "--metadata-size",
        "8M",
    ]));
    for args in [
        &["pool", "start", "--backend", "kernel", "--pool", p][..],
        &["thin", "activate", "--backend", "kernel", "--pool", p, "0"][..],
    ] {
        fails(&run(args), 1, "device-mapper");
        let err = stderr(&run(args));
        assert!(err.contains("unavailable here"), "{err}");
    }
    // Nothing was started: the pool is still offline.
    let status = stdout(&ok(run(&["pool", "status", "--pool", p])));
    assert!(status.contains("none (offline)"), "{status}");
}

#[test]
fn resize_grows_data_and_metadata_and_never_shrinks() {
    let pool = TestPool::new();
    let totals = |pool: &TestPool| {
        let out = ok(pool.cmd("pool", "status", &["--json"]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["status"]["total_data_blocks"].as_u64().unwrap(),
            v["status"]["total_metadata_blocks"].as_u64().unwrap(),
        )
    };
    assert_eq!(totals(&pool), (1024, 1024));
    ok(pool.cmd(
        "pool",
        "resize",
        &["--data-size", "128M", "--metadata-size", "8M"],
    ));
    assert_eq!(totals(&pool), (2048, 2048));
    assert_eq!(
        std::fs::metadata(pool.dir.join("data")).unwrap().len(),
        128 << 20
    );
    fails(
        &pool.cmd("pool", "resize", &["--data-size", "64M"]),
        1,
        "cannot shrink",
    );
    fails(&pool.cmd("pool", "resize", &[]), 1, "nothing to do");
    assert_eq!(totals(&pool), (2048, 2048));
    let check = ok(run(&["check", pool.metadata().to_str().unwrap()]));
    assert!(check.status.success());
}

/// Zeroes metadata block `loc` of the file at `path` (4 KiB blocks).
fn zero_metadata_block(path: &Path, loc: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0u8; 4096], loc * 4096).unwrap();
}

#[test]
fn repair_brings_back_a_pool_whose_superblock_is_destroyed() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "24M", "--name", "big"]));
    ok(pool.cmd("thin", "create", &["2", "--size", "4M"]));
    let one = random_bytes(20 << 20, 11);
    let two = random_bytes(3 << 20, 12);
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &one));
    ok(pool.cmd_with_stdin("thin", "write", &["2", "--offset", "1M"], &two));
    ok(pool.cmd("thin", "snap", &["3", "1"]));
    let before1 = pool.read("1", &[]);
    let before2 = pool.read("2", &[]);

    let meta = pool.metadata();
    let damaged = pool.dir.join("damaged");
    std::fs::copy(&meta, &damaged).unwrap();
    zero_metadata_block(&damaged, 0);
    let new = pool.dir.join("repaired");
    let (d, n) = (damaged.to_str().unwrap(), new.to_str().unwrap());

    // Nothing says what the block size was: refused, naming the cause.
    fails(
        &run(&["repair", "-i", d, "-o", n]),
        1,
        "data block size is unknown",
    );
    // The output may not be the input.
    fails(&run(&["repair", "-i", d, "-o", d]), 1, "same metadata");

    let out = ok(run(&[
        "repair",
        "-i",
        d,
        "-o",
        n,
        "--data-block-size",
        "64k",
    ]));
    assert!(out.stdout.is_empty());
    assert!(stderr(&out).contains("3 devices"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("superblock was unreadable"),
        "{}",
        stderr(&out)
    );
    if fixtures::tools::available() {
        let c = fixtures::tools::thin_check(&new, &[]);
        assert_eq!(c.rc, 0, "thin_check of the repair: {}", c.stderr);
    }
    ok(run(&["check", n]));
    std::fs::rename(&new, &meta).unwrap();
    assert_eq!(sha256(&pool.read("1", &[])), sha256(&before1));
    assert_eq!(sha256(&pool.read("2", &[])), sha256(&before2));
    assert_eq!(sha256(&pool.read("3", &[])), sha256(&before1));
}

#[test]
fn repair_refuses_metadata_its_owner_holds() {
    let pool = TestPool::new();
    let paths = engine::PoolPaths::in_dir(&pool.dir);
    let held = engine::thin::files::open(&paths, engine::PoolOptions::default()).unwrap();
    let new = pool.dir.join("repaired");
    let out = run(&["repair", "-i", pool.path(), "-o", new.to_str().unwrap()]);
    fails(&out, 1, &format!("held by pid {}", std::process::id()));
    drop(held);
    ok(run(&[
        "repair",
        "-i",
        pool.path(),
        "-o",
        new.to_str().unwrap(),
        "-q",
    ]));
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn mapped_blocks(pool: &TestPool, id: u64) -> u64 {
    let ls: serde_json::Value =
        serde_json::from_slice(&ok(pool.cmd("thin", "ls", &["--json"])).stdout).unwrap();
    ls.as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap()["mapped_blocks"]
        .as_u64()
        .unwrap()
}

#[test]
fn import_and_export_keep_holes() {
    use std::os::unix::fs::FileExt;
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "16M"]));
    // The thin holds data everywhere first: import must leave the file's holes unmapped.
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &random_bytes(16 << 20, 20)));
    assert_eq!(mapped_blocks(&pool, 1), 256);

    // 16 MiB sparse: 300000 bytes at 1 MiB (blocks 16..=20), 1 MiB at 8 MiB (blocks
    // 128..=143), and 256 KiB of written zeros at 12 MiB (a data extent, but zeros).
    let image = pool.dir.join("image");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(16 << 20).unwrap();
    f.write_all_at(&random_bytes(300_000, 21), 1 << 20).unwrap();
    f.write_all_at(&random_bytes(1 << 20, 22), 8 << 20).unwrap();
    f.write_all_at(&vec![0u8; 256 << 10], 12 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let want = std::fs::read(&image).unwrap();

    let img = image.to_str().unwrap();
    let out = ok(pool.cmd("thin", "import", &["1", "--input", img]));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "quiet in scripts"
    );
    assert_eq!(
        mapped_blocks(&pool, 1),
        5 + 16,
        "only the data extents are mapped"
    );
    assert_eq!(sha256(&pool.read("1", &[])), sha256(&want));

    let exported = pool.dir.join("exported");
    let exp = exported.to_str().unwrap();
    ok(pool.cmd("thin", "export", &["1", "--output", exp]));
    let back = std::fs::read(&exported).unwrap();
    assert_eq!(back.len(), 16 << 20);
    assert_eq!(sha256(&back), sha256(&want));
    let allocated = allocated_bytes(&exported);
    assert!(
        allocated <= 1_500_000,
        "the export allocates {allocated} bytes for 1.3 MB of data"
    );

    // Too big for the thin: refused before anything is written.
    let big = pool.dir.join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(17 << 20)
        .unwrap();
    fails(
        &pool.cmd("thin", "import", &["1", "--input", big.to_str().unwrap()]),
        1,
        "does not fit in thin 1",
    );
    assert_eq!(sha256(&pool.read("1", &[])), sha256(&want));
}

#[test]
fn trim_journal_discards_an_unmounted_ext4_log_and_leaves_other_thins_alone() {
    use std::os::unix::fs::FileExt;
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "64M"]));
    ok(pool.cmd("thin", "create", &["2", "--size", "16M"]));
    // ext4 whose 4 MiB journal log holds an old log's bytes, as a used layer's does.
    let image = pool.dir.join("ext4");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mkfs = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-J", "size=4"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(mkfs.status.success());
    let file = std::fs::File::open(&image).unwrap();
    let len = 64 << 20;
    let log = engine::journal::ext4_journal_log(len, &mut |offset, buf| {
        file.read_exact_at(buf, offset)
            .map_err(|e| engine::Error::InvalidArgument(e.to_string()))
    })
    .unwrap()
    .unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    for r in &log.log {
        f.write_all_at(&vec![0x5a; (r.end - r.start) as usize], r.start)
            .unwrap();
    }
    drop(f);
    ok(pool.cmd("thin", "import", &["1", "--input", image.to_str().unwrap()]));
    let before = mapped_blocks(&pool, 1);

    let out = ok(pool.cmd("thin", "trim-journal", &["1", "--json"]));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["trimmed"], true, "{report}");
    assert_eq!(report["log_bytes"], (4 << 20) - 4096);
    // Every 64 KiB block wholly inside the log goes; not the journal superblock's, nor one
    // the log shares with the rest of the file system. Counted from the bytes, not from the
    // log's ranges: the log alone was filled with 0x5a, so those blocks are the image's
    // 64 KiB blocks that are 0x5a throughout.
    let want = std::fs::read(&image).unwrap();
    let chunk = 64 << 10;
    let log_only: Vec<usize> = want
        .chunks(chunk)
        .enumerate()
        .filter(|(_, c)| c.iter().all(|&b| b == 0x5a))
        .map(|(i, _)| i)
        .collect();
    assert!(log_only.len() >= 60, "{log:?}");
    assert_eq!(report["discarded_bytes"], (log_only.len() * chunk) as u64);
    assert_eq!(before - mapped_blocks(&pool, 1), log_only.len() as u64);
    // Those blocks read as zeros now; every other byte is the image's.
    let back = pool.read("1", &[]);
    assert_eq!(back.len(), want.len());
    for (i, (got, was)) in back.chunks(chunk).zip(want.chunks(chunk)).enumerate() {
        if log_only.contains(&i) {
            assert!(got.iter().all(|&b| b == 0), "block {i} still holds its log");
        } else {
            assert!(got == was, "block {i} changed, outside the log");
        }
    }
    let out = ok(pool.cmd("thin", "trim-journal", &["1"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("thin 1: discarded"), "{text}");

    // Not ext4: nothing touched, and said so.
    ok(pool.cmd_with_stdin("thin", "write", &["2"], &random_bytes(1 << 20, 30)));
    let out = ok(pool.cmd("thin", "trim-journal", &["2"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("left as it is: not an ext4 file system"),
        "{text}"
    );
    assert_eq!(mapped_blocks(&pool, 2), 16);
    fails(&pool.cmd("thin", "trim-journal", &["9"]), 1, "no thin 9");
}

#[test]
fn trim_gives_free_blocks_back_and_keeps_live_data() {
    use std::os::unix::fs::FileExt;
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "8M"]));
    ok(pool.cmd("thin", "create", &["2", "--size", "8M"]));
    let one = random_bytes(8 << 20, 30);
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &one));
    ok(pool.cmd_with_stdin("thin", "write", &["2"], &random_bytes(8 << 20, 31)));
    ok(pool.cmd("thin", "delete", &["2"]));
    // Nothing maps data blocks 512 and up (32 MiB): fill them with stale bytes, as a pool
    // that ran without discard passdown would have left them.
    let xml = stdout(&ok(run(&["dump", pool.path()])));
    let highest = xml
        .lines()
        .filter_map(|l| {
            let at = l.find("data_b")? + l[l.find("data_b")?..].find('"')? + 1;
            let n: u64 = l[at..at + l[at..].find('"')?].parse().ok()?;
            let len: u64 = l
                .find("length=\"")
                .map(|i| {
                    l[i + 8..i + 8 + l[i + 8..].find('"').unwrap()]
                        .parse()
                        .unwrap()
                })
                .unwrap_or(1);
            Some(n + len)
        })
        .max()
        .unwrap();
    assert!(highest <= 512, "mapped up to block {highest}");
    let data = pool.dir.join("data");
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    f.write_all_at(&random_bytes(32 << 20, 32), 32 << 20)
        .unwrap();
    f.sync_all().unwrap();
    let before = allocated_bytes(&data);
    assert!(before >= 40 << 20, "{before}");

    // Refused while someone owns the pool, naming the owner.
    let paths = engine::PoolPaths::in_dir(&pool.dir);
    let held = engine::thin::files::open(&paths, engine::PoolOptions::default()).unwrap();
    fails(
        &run(&["trim", "--pool", pool.path()]),
        1,
        &format!("held by pid {}", std::process::id()),
    );
    drop(held);

    let out = ok(run(&["trim", "--pool", pool.path()]));
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    let after = allocated_bytes(&data);
    eprintln!("data file allocated: {before} bytes before trim, {after} after");
    assert!(
        after <= (8 << 20) + (1 << 20),
        "{after} bytes allocated after trim, {before} before"
    );
    assert_eq!(sha256(&pool.read("1", &[])), sha256(&one));
    ok(run(&["check", pool.path()]));
}

#[test]
fn rename_is_atomic_and_refuses_a_taken_name() {
    let pool = TestPool::new();
    ok(pool.cmd("thin", "create", &["1", "--size", "1M", "--name", "base"]));
    ok(pool.cmd("thin", "create", &["2", "--size", "1M", "--name", "other"]));
    ok(pool.cmd("thin", "rename", &["1", "base-v2"]));
    let names = || -> Vec<serde_json::Value> {
        let ls: serde_json::Value =
            serde_json::from_slice(&ok(pool.cmd("thin", "ls", &["--json"])).stdout).unwrap();
        ls.as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].clone())
            .collect()
    };
    assert_eq!(names(), ["base-v2", "other"]);
    // Renaming to its own name changes nothing; another thin's name is refused.
    ok(pool.cmd("thin", "rename", &["1", "base-v2"]));
    fails(
        &pool.cmd("thin", "rename", &["2", "base-v2"]),
        1,
        "name \"base-v2\" is taken by thin 1",
    );
    fails(&pool.cmd("thin", "rename", &["3", "x"]), 1, "thin 3");
    fails(
        &pool.cmd("thin", "rename", &["2", "bad/name"]),
        1,
        "failed to rename thin 2",
    );
    assert_eq!(names(), ["base-v2", "other"]);
    ok(pool.cmd("thin", "rename", &["2", "--clear"]));
    assert_eq!(
        names(),
        [serde_json::json!("base-v2"), serde_json::Value::Null]
    );
    // No temporary file is left beside the store.
    let left: Vec<_> = std::fs::read_dir(&pool.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("volumes") && n != "volumes.json")
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Refused while another process owns the pool, naming it.
    let paths = engine::PoolPaths::in_dir(&pool.dir);
    let held = engine::thin::files::open(&paths, engine::PoolOptions::default()).unwrap();
    fails(
        &pool.cmd("thin", "rename", &["2", "x"]),
        1,
        &format!("held by pid {}", std::process::id()),
    );
    drop(held);
}

#[test]
fn pool_set_is_kept_shown_and_used() {
    use std::os::unix::fs::FileExt;
    let pool = TestPool::new();
    let row = |label: &str| -> String {
        let table = stdout(&ok(pool.cmd("pool", "status", &[])));
        let line = table.lines().find(|l| l.starts_with(label));
        line.unwrap_or_else(|| panic!("no {label} in {table}"))[label.len()..]
            .trim()
            .to_string()
    };
    assert_eq!(row("Zeroing:"), "on");
    assert_eq!(row("When Full:"), "error (error_if_no_space)");
    assert_eq!(row("Low Water Mark:"), "0 blocks (0B)");

    ok(pool.cmd(
        "pool",
        "set",
        &[
            "--low-water-mark",
            "1M",
            "--when-full",
            "queue",
            "--zeroing",
            "off",
        ],
    ));
    assert_eq!(row("Zeroing:"), "off (skip_block_zeroing)");
    assert_eq!(row("When Full:"), "queue (queue_if_no_space)");
    assert_eq!(row("Low Water Mark:"), "16 blocks (1MiB)");
    let json: serde_json::Value =
        serde_json::from_slice(&ok(pool.cmd("pool", "status", &["--json"])).stdout).unwrap();
    assert_eq!(json["low_water_blocks"], 16);
    assert_eq!(json["status"]["zero_new_blocks"], false);
    assert_eq!(json["status"]["error_if_no_space"], false);
    // One setting changes alone; the others stay.
    ok(pool.cmd("pool", "set", &["--when-full", "error"]));
    let json: serde_json::Value =
        serde_json::from_slice(&ok(pool.cmd("pool", "status", &["--json"])).stdout).unwrap();
    assert_eq!(json["status"]["error_if_no_space"], true);
    assert_eq!(json["low_water_blocks"], 16);

    // Zeroing off is what writes use: a 4 KiB write to a new block leaves the rest of the
    // block as the data device had it.
    let data = pool.dir.join("data");
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    f.write_all_at(&vec![0xaa; 1 << 20], 0).unwrap();
    drop(f);
    ok(pool.cmd("thin", "create", &["1", "--size", "1M"]));
    ok(pool.cmd_with_stdin("thin", "write", &["1"], &[0x11; 4096]));
    let block = pool.read("1", &["--length", "64k"]);
    assert!(block[..4096].iter().all(|&b| b == 0x11));
    assert!(block[4096..].iter().all(|&b| b == 0xaa), "zeroing is off");
    ok(pool.cmd("pool", "set", &["--zeroing", "on"]));
    ok(pool.cmd("thin", "create", &["2", "--size", "1M"]));
    ok(pool.cmd_with_stdin("thin", "write", &["2"], &[0x22; 4096]));
    let block = pool.read("2", &["--length", "64k"]);
    assert!(block[4096..].iter().all(|&b| b == 0), "zeroing is on again");

    // Freed space: by default the lowest freed blocks stay on the host for reuse; with
    // --keep-free 0 they go back at once.
    assert_eq!(row("Kept Free:"), "16MiB (freed space kept for reuse)");
    let write_and_delete_8m = || {
        ok(pool.cmd("thin", "create", &["3", "--size", "8M"]));
        ok(pool.cmd_with_stdin("thin", "write", &["3"], &vec![0x33; 8 << 20]));
        let written = allocated_bytes(&data);
        ok(pool.cmd("thin", "delete", &["3"]));
        (written, allocated_bytes(&data))
    };
    let (written, deleted) = write_and_delete_8m();
    assert!(
        deleted + (1 << 20) >= written,
        "kept: {written} -> {deleted}"
    );
    ok(pool.cmd("pool", "set", &["--keep-free", "0"]));
    assert_eq!(row("Kept Free:"), "0B (freed space kept for reuse)");
    let json: serde_json::Value =
        serde_json::from_slice(&ok(pool.cmd("pool", "status", &["--json"])).stdout).unwrap();
    assert_eq!(json["kept_free_bytes"], 0);
    // The next commit gives back what the smaller window no longer keeps.
    ok(pool.cmd("thin", "create", &["4", "--size", "1M"]));
    let given_back = allocated_bytes(&data);
    assert!(
        given_back + (7 << 20) <= deleted,
        "kept blocks given back: {deleted} -> {given_back}"
    );
    ok(pool.cmd("thin", "delete", &["4"]));
    let (again, deleted) = write_and_delete_8m();
    assert!(again <= written + (1 << 20), "{written} -> {again}");
    assert!(
        deleted + (7 << 20) <= again,
        "given back: {again} -> {deleted}"
    );

    // Refused while another process owns the pool, naming it.
    let paths = engine::PoolPaths::in_dir(&pool.dir);
    let held = engine::thin::files::open(&paths, engine::PoolOptions::default()).unwrap();
    fails(
        &pool.cmd("pool", "set", &["--zeroing", "off"]),
        1,
        &format!("held by pid {}", std::process::id()),
    );
    drop(held);
}
