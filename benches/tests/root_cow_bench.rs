//! The cow bench, end to end with tiny parameters (root_: it mounts overlayfs, btrfs, xfs and
//! thin file systems, attaches loop devices and serves FUSE and NBD). It checks what a run
//! writes, never a timing: every group and every system has its rows, every sample is a
//! number, the plots are SVG, and nothing the bench made (mounts, loop devices, daemons,
//! NBD servers) outlives it. A full run takes half an hour; this one about a minute and a
//! half, so a change that breaks a system's setup or teardown shows in CI, not at the next
//! published run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ sits in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// Mount points, loop backing files and process command lines that name `dir`.
fn leftovers(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    found.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&dir))
            .map(|l| format!("mount: {l}")),
    );
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let backing = e.path().join("loop/backing_file");
        if let Ok(b) = std::fs::read_to_string(&backing) {
            if b.contains(&dir) {
                found.push(format!("loop device {:?}: {}", e.file_name(), b.trim()));
            }
        }
    }
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&dir) {
                found.push(format!("process {:?}: {cmd}", e.file_name()));
            }
        }
    }
    found
}

#[test]
fn root_cow_bench_runs_every_group_and_system_and_leaves_nothing() {
    // The runtime group times the thinbox binary found beside the bench's.
    let built = cargo()
        .args(["build", "-q", "-p", "runtime", "--bin", "thinbox"])
        .status()
        .unwrap();
    assert!(built.success(), "building thinbox failed");

    let scratch = tempfile::Builder::new()
        .prefix("cow-bench-smoke.")
        .tempdir_in("/var/tmp")
        .unwrap();
    let out = scratch.path().join("results");
    let dir = scratch.path().join("scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let run = cargo()
        .args([
            "bench",
            "-q",
            "--profile",
            "dev",
            "-p",
            "benches",
            "--bench",
            "cow",
        ])
        .env("BENCH_OUT", &out)
        .env("BENCH_DIR", &dir)
        .env("BENCH_COW_SIZES", "64M")
        .env("BENCH_RUNS", "1")
        .env("BENCH_FIRST_RUNS", "1")
        .env("BENCH_FIO_SIZE", "64M")
        .env("BENCH_FIO_SECONDS", "1")
        .env("BENCH_FIO_DEPTHS", "1")
        .env("BENCH_SNAP_SIZES", "64M,128M")
        .env("BENCH_CHAIN_DEPTHS", "1,3")
        .env("BENCH_SMALL_FILES", "200")
        .env("BENCH_BLOCK_SIZES", "64K,128K")
        .env_remove("BENCH_FILTER")
        .env_remove("BENCH_THINBOX")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    let left = leftovers(scratch.path());
    assert!(
        left.is_empty(),
        "the bench left behind: {left:#?}\nits stderr:\n{stderr}"
    );
    assert!(run.status.success(), "the bench failed:\n{stderr}");

    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("cow.json")).unwrap()).unwrap();
    let mut devices: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for row in json["rows"].as_array().expect("rows") {
        let group = row["group"].as_str().unwrap();
        devices
            .entry(group)
            .or_default()
            .insert(row["device"].as_str().unwrap());
        let samples = row["samples"].as_array().unwrap();
        assert!(!samples.is_empty(), "a row without samples: {row}");
        for s in samples {
            let v = s.as_f64().unwrap_or(f64::NAN);
            assert!(
                v.is_finite() && v >= 0.0,
                "a sample that is not a figure: {row}"
            );
        }
    }
    let expect = |group: &str, systems: &[&str]| {
        let have = devices.get(group).cloned().unwrap_or_default();
        for s in systems {
            assert!(
                have.contains(s),
                "group {group} has no row for {s}: {have:?}"
            );
        }
    };
    let block_and_file = [
        "plain file",
        "overlayfs",
        "btrfs reflink",
        "xfs reflink",
        "thinbox ext4 on thin",
        "thinbox xfs on thin",
    ];
    expect("first", &block_and_file);
    expect("first", &["full copy (vfs)", "qcow2", "thinbox engine API"]);
    expect("fio", &block_and_file);
    expect(
        "fio",
        &[
            "plain file over NBD (qemu-nbd)",
            "qcow2 over NBD (qemu-nbd)",
            "thinbox engine over NBD (its server)",
        ],
    );
    expect(
        "small",
        &[
            "plain directory",
            "overlayfs",
            "btrfs reflink",
            "xfs reflink",
            "thinbox ext4 on thin",
            "thinbox xfs on thin",
        ],
    );
    expect(
        "snap",
        &[
            "thinbox container create (pool daemon)",
            "qcow2 create -b",
            "overlayfs mount",
            "btrfs subvolume snapshot",
        ],
    );
    expect("runtime", &["thinbox create, overlay driver"]);
    expect(
        "chain",
        &["thinbox create_snap + commit (engine)", "overlayfs mount"],
    );
    expect("blocksize", &["64KiB", "128KiB"]);
    // Every check (the targets that this run's sizes reach) carries a verdict.
    for check in json["checks"].as_array().expect("checks") {
        assert!(
            check["met"].is_boolean(),
            "a check without a verdict: {check}"
        );
    }

    let md = std::fs::read_to_string(out.join("cow.md")).unwrap();
    for section in [
        "## Targets (issue 8)",
        "## First 4 KiB write into a large shared file",
        "## Many small files",
        "## Thin pool block size",
    ] {
        assert!(md.contains(section), "cow.md has no {section:?}");
    }
    for plot in [
        "first-write",
        "fio-randread",
        "fio-randwrite",
        "snap-origin",
        "chain",
        "blocksize",
    ] {
        let svg = std::fs::read_to_string(out.join(format!("{plot}.svg"))).unwrap();
        assert!(
            svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
            "{plot}.svg is not an SVG document"
        );
    }
}
