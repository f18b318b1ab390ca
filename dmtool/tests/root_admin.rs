//! The admin verbs against real owners and devices, as root: `thin rename` through the pool
//! daemon, `thin ls` on a pool the daemon owns (read through a metadata snapshot),
//! `pool set`/`trim`/`repair` refused while the daemon owns the pool, and `trim` on a pool
//! whose devices are loop devices (BLKDISCARD, not hole punching).
//!
//! Each test keeps the daemon's run directory under a temporary `THINBOX_RUN_ROOT` and a
//! guard that kills the daemon and detaches every loop device backed by the test's files,
//! even when the test fails.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

mod common;

use common::Env;

fn daemon_pid(run_root: &Path) -> u32 {
    for d in std::fs::read_dir(run_root).unwrap().flatten() {
        if let Ok(text) = std::fs::read_to_string(d.path().join("daemon.pid")) {
            return text.trim().parse().unwrap();
        }
    }
    panic!("no daemon.pid under {}", run_root.display());
}

fn thin_ls(env: &Env, pool: &str) -> Value {
    serde_json::from_str(&env.ok(&["thin", "ls", "--pool", pool, "--json"])).unwrap()
}

fn names(env: &Env, pool: &str) -> Vec<Value> {
    thin_ls(env, pool)
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].clone())
        .collect()
}

/// (id, mapped, exclusive, shared) in blocks, per thin.
fn space(ls: &Value) -> Vec<(u64, u64, u64, u64)> {
    let n = |t: &Value, k: &str| t[k].as_u64().unwrap();
    ls.as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                n(t, "id"),
                n(t, "mapped_blocks"),
                n(t, "exclusive_blocks"),
                n(t, "shared_blocks"),
            )
        })
        .collect()
}

#[test]
fn root_rename_goes_through_the_daemon_and_offline_verbs_refuse_it() {
    let env = Env::new();
    let pool_dir = env.path("pool");
    let pool = pool_dir.to_str().unwrap();
    env.ok(&[
        "pool",
        "create",
        "--pool",
        pool,
        "--data-size",
        "64M",
        "--metadata-size",
        "4M",
    ]);
    env.ok(&[
        "thin", "create", "--pool", pool, "1", "--size", "4M", "--name", "a",
    ]);
    env.ok(&[
        "thin", "create", "--pool", pool, "2", "--size", "4M", "--name", "b",
    ]);
    // 1 MiB (16 blocks) in thin 1, then thin 3 a snapshot of it.
    env.ok_with_stdin(&["thin", "write", "--pool", pool, "1"], &vec![7u8; 1 << 20]);
    env.ok(&["thin", "snap", "--pool", pool, "3", "1"]);
    env.ok(&["pool", "start", "--pool", pool, "--backend", "userspace"]);
    let pid = daemon_pid(&env.run_root);

    // Changes made through the daemon show in `thin ls` while it owns the pool: 128 KiB
    // written into the snapshot (two blocks copied), and a snapshot of the snapshot.
    env.ok_with_stdin(
        &["thin", "write", "--pool", pool, "3", "--offset", "256K"],
        &vec![9u8; 128 << 10],
    );
    env.ok(&["thin", "snap", "--pool", pool, "4", "3"]);
    let owned = thin_ls(&env, pool);
    assert_eq!(
        space(&owned),
        [(1, 16, 2, 14), (2, 0, 0, 0), (3, 16, 0, 16), (4, 16, 0, 16)],
        "{owned:#}"
    );
    assert_eq!(owned[3]["origin"], 3);
    // The metadata snapshot `thin ls` read through is given back.
    let status: Value =
        serde_json::from_str(&env.ok(&["pool", "status", "--pool", pool, "--json"])).unwrap();
    assert_eq!(status["status"]["held_root"], Value::Null, "{status:#}");
    assert_eq!(status["daemon_pid"], pid);

    env.ok(&["thin", "rename", "--pool", pool, "1", "a2"]);
    assert_eq!(
        names(&env, pool),
        [json!("a2"), json!("b"), Value::Null, Value::Null]
    );
    let owned_after_rename = thin_ls(&env, pool);
    env.fails(
        &["thin", "rename", "--pool", pool, "2", "a2"],
        "is taken by thin 1",
    );

    // Verbs that change the pool offline refuse it and name the daemon.
    env.fails(
        &["pool", "set", "--pool", pool, "--zeroing", "off"],
        &format!("owned by its pool daemon (pid {pid})"),
    );
    env.fails(&["trim", "--pool", pool], &format!("pid {pid}"));
    let new = env.path("repaired");
    env.fails(
        &["repair", "-i", pool, "-o", new.to_str().unwrap()],
        &format!("pid {pid}"),
    );

    env.ok(&["pool", "stop", "--pool", pool]);
    // The rename was the daemon's change to the store: it is there offline too, and the
    // offline listing reads what the daemon's listing read.
    assert_eq!(
        names(&env, pool),
        [json!("a2"), json!("b"), Value::Null, Value::Null]
    );
    assert_eq!(thin_ls(&env, pool), owned_after_rename);
}

fn losetup(file: &Path) -> String {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(file)
        .output()
        .expect("losetup runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn root_trim_discards_free_blocks_of_a_loop_device() {
    use std::os::unix::fs::FileExt;
    let env = Env::new();
    let (meta_file, data_file) = (env.path("meta.img"), env.path("data.img"));
    for (f, size) in [(&meta_file, 4u64 << 20), (&data_file, 64 << 20)] {
        std::fs::File::create(f).unwrap().set_len(size).unwrap();
    }
    let (meta, data) = (losetup(&meta_file), losetup(&data_file));
    let state = env.path("state");
    let loc = [
        "--metadata",
        meta.as_str(),
        "--data",
        data.as_str(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let with = |verb: &[&str], rest: &[&str]| -> Vec<String> {
        verb.iter()
            .chain(loc.iter())
            .chain(rest.iter())
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        env.ok(&a)
    };
    run(with(&["pool", "create"], &[]));
    run(with(&["thin", "create"], &["1", "--size", "4M"]));
    let data_bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    let input = env.path("input");
    std::fs::write(&input, &data_bytes).unwrap();
    run(with(
        &["thin", "write"],
        &["1", "--input", input.to_str().unwrap()],
    ));
    // Stale bytes in blocks nothing maps (32 MiB and up), written through the loop device.
    let dev = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    dev.write_all_at(&vec![0x77u8; 16 << 20], 32 << 20).unwrap();
    dev.sync_all().unwrap();
    drop(dev);
    let before = allocated(&data_file);
    assert!(before >= 20 << 20, "{before}");

    run(with(&["trim"], &[]));
    let after = allocated(&data_file);
    eprintln!("loop-backed data file: {before} bytes allocated before trim, {after} after");
    assert!(after <= (4 << 20) + (1 << 20), "{after} bytes after trim");
    let out = env.path("exported");
    run(with(
        &["thin", "export"],
        &["1", "--output", out.to_str().unwrap()],
    ));
    assert!(std::fs::read(&out).unwrap() == data_bytes, "thin 1 changed");
}
