//! The three benches end to end with tiny parameters (root_: the cow bench mounts overlayfs,
//! btrfs, xfs and thin file systems, attaches loop devices and serves FUSE and NBD; the others
//! drop caches and activate thins). They check what a run writes, never a timing: every group
//! and every system has its rows, every sample is a number, the cow bench's plots are SVG, and
//! nothing a bench made (mounts, loop devices, daemons, NBD servers) outlives it. Full runs
//! take minutes to half an hour; these about three minutes together, so a change that breaks a
//! system's setup or teardown shows in CI, not at the next published run.

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

/// A bench run in a scratch directory of its own under `/var/tmp`.
struct Run {
    stdout: String,
    stderr: String,
    scratch: tempfile::TempDir,
}

impl Run {
    fn out(&self) -> PathBuf {
        self.scratch.path().join("results")
    }
}

/// Runs `cargo bench --bench BENCH` (the dev profile the suite already built) with `env`,
/// `BENCH_DIR`, `BENCH_OUT` and `BENCH_JSON` in a fresh scratch directory; fails the test if the bench
/// fails or leaves anything naming that directory behind.
fn run_bench(bench: &str, env: &[(&str, &str)]) -> Run {
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{bench}-bench-smoke."))
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = scratch.path().join("scratch");
    let out = scratch.path().join("results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let mut cmd = cargo();
    cmd.args([
        "bench",
        "-q",
        "--profile",
        "dev",
        "-p",
        "benches",
        "--bench",
        bench,
    ])
    .env("BENCH_OUT", &out)
    .env("BENCH_DIR", &dir)
    // The engine bench writes its JSON only where asked; the others ignore it.
    .env("BENCH_JSON", out.join(format!("{bench}.json")))
    .env_remove("BENCH_FILTER");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = cmd.output().unwrap();
    let run = Run {
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        scratch,
    };
    let left = leftovers(run.scratch.path());
    assert!(
        left.is_empty(),
        "the {bench} bench left behind: {left:#?}\nits stderr:\n{}",
        run.stderr
    );
    assert!(
        output.status.success(),
        "the {bench} bench failed:\n{}",
        run.stderr
    );
    run
}

/// The devices of each group in a bench's JSON, after checking that every sample is a
/// figure and every check with a goal has a verdict.
fn devices_by_group(json: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut devices: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in json["rows"].as_array().expect("rows") {
        devices
            .entry(row["group"].as_str().unwrap().to_string())
            .or_default()
            .insert(row["device"].as_str().unwrap().to_string());
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
    // A check with a goal carries a verdict; the others are comparisons shown for reading.
    for check in json["checks"].as_array().expect("checks") {
        if !check["goal"].is_null() {
            assert!(
                check["met"].is_boolean(),
                "a check with a goal and no verdict: {check}"
            );
        }
    }
    devices
}

/// Fails unless `group` has a row for each of `systems`.
fn expect_rows(devices: &BTreeMap<String, BTreeSet<String>>, group: &str, systems: &[&str]) {
    let have = devices.get(group).cloned().unwrap_or_default();
    for s in systems {
        assert!(
            have.contains(*s),
            "group {group} has no row for {s}: {have:?}"
        );
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn root_cow_bench_runs_every_group_and_system_and_leaves_nothing() {
    // The runtime group times the thinbox binary found beside the bench's.
    let built = cargo()
        .args(["build", "-q", "-p", "runtime", "--bin", "thinbox"])
        .status()
        .unwrap();
    assert!(built.success(), "building thinbox failed");
    let run = run_bench(
        "cow",
        &[
            ("BENCH_COW_SIZES", "64M"),
            ("BENCH_RUNS", "1"),
            ("BENCH_FIRST_RUNS", "1"),
            ("BENCH_FIO_SIZE", "64M"),
            ("BENCH_FIO_SECONDS", "1"),
            ("BENCH_FIO_DEPTHS", "1"),
            ("BENCH_SNAP_SIZES", "64M,128M"),
            ("BENCH_CHAIN_DEPTHS", "1,3"),
            ("BENCH_SMALL_FILES", "200"),
            ("BENCH_BLOCK_SIZES", "64K,128K"),
        ],
    );
    let out = run.out();
    let devices = devices_by_group(&read_json(&out.join("cow.json")));
    let expect = |group: &str, systems: &[&str]| expect_rows(&devices, group, systems);
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

#[test]
fn root_engine_bench_runs_every_group_and_leaves_nothing() {
    let run = run_bench(
        "engine",
        &[
            ("BENCH_SIZE", "16M"),
            ("BENCH_RUNS", "1"),
            ("BENCH_OPS", "500"),
            ("BENCH_SNAP_MAPPED", "1G"),
        ],
    );
    let devices = devices_by_group(&read_json(&run.out().join("engine.json")));
    let expect = |group: &str, systems: &[&str]| expect_rows(&devices, group, systems);
    expect("file", &["plain 1M", "plain 64K", "thin"]);
    for group in ["hot/w64", "hot/readahead", "cold"] {
        expect(group, &["plain", "thin"]);
    }
    expect("cow", &["plain copy", "thin"]);
    expect("snap", &["file", "file+null", "null"]);
    expect("commit", &["file+null", "mem+null"]);
    expect("mem", &["mem", "raw mem", "thin mem", "thin null"]);
    assert!(
        run.stdout.contains("| mem |"),
        "the engine bench printed no table:\n{}",
        run.stdout
    );
}

#[test]
fn root_activation_bench_runs_every_job_on_every_system_and_leaves_nothing() {
    let run = run_bench(
        "activation",
        &[("BENCH_RUNS", "1"), ("BENCH_FIO_SECONDS", "1")],
    );
    for job in [
        "randwrite 4k qd32",
        "seqwrite 1M qd1",
        "randread 4k qd32",
        "randwrite 4k qd1",
    ] {
        for system in ["thin", "plain-dio", "plain-buffered", "daemon"] {
            let row = format!("| activation | {job} | {system} |");
            assert!(
                run.stdout.contains(&row),
                "the activation bench printed no {row:?}:\n{}",
                run.stdout
            );
        }
    }
}
