//! The four benches end to end with tiny parameters (root_: the cow bench mounts overlayfs,
//! btrfs, xfs and thin file systems, attaches loop devices and serves FUSE and NBD; the others
//! drop caches and activate thins, and the kernel bench boots a qemu guest). They check what a run writes, never a timing: every group
//! and every system has its rows, every sample is a number, the cow bench's plots are SVG, and
//! no mount, loop device or process (daemons, NBD servers) naming the run's scratch directory
//! outlives it. Full runs
//! take minutes to half an hour; these about four minutes together, so a change that breaks a
//! system's setup or teardown shows in CI, not at the next published run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The systems of the cow bench's groups that work on a tree of files (`small`, `workload`).
const TREE_SYSTEMS: [&str; 6] = [
    "plain directory",
    "overlayfs",
    "btrfs reflink",
    "xfs reflink",
    "thinbox ext4 on thin",
    "thinbox xfs on thin",
];

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

/// What a bench left behind that names `dir`.
#[derive(Debug)]
enum Leftover {
    /// A mount point under it (or a mount of something under it).
    Mount(String),
    /// A loop device (`/dev/loopN`) backed by a file under it.
    Loop(String),
    /// A process (pid) with it on its command line or as its working directory.
    Process(String),
}

fn leftovers(dir: &Path) -> Vec<Leftover> {
    let dir = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for line in mounts.lines().filter(|l| l.contains(&dir)) {
        if let Some(target) = line.split(' ').nth(1) {
            found.push(Leftover::Mount(target.to_string()));
        }
    }
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let backing = e.path().join("loop/backing_file");
        if let Ok(b) = std::fs::read_to_string(&backing) {
            if b.contains(&dir) {
                let name = e.file_name().to_string_lossy().into_owned();
                found.push(Leftover::Loop(format!("/dev/{name}")));
            }
        }
    }
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cwd = std::fs::read_link(e.path().join("cwd")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(&dir) || cwd.to_string_lossy().contains(&dir) {
            found.push(Leftover::Process(
                e.file_name().to_string_lossy().into_owned(),
            ));
        }
    }
    found
}

/// Undoes what a failed bench left (processes first, then the deepest mounts, then loop
/// devices), so that a failing test does not leak either; best effort, the test fails anyway.
fn sweep(left: &[Leftover]) {
    let quiet = |c: &mut Command| {
        let _ = c
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    };
    for l in left {
        if let Leftover::Process(pid) = l {
            quiet(Command::new("kill").arg(pid));
        }
    }
    let mut mounts: Vec<&String> = left
        .iter()
        .filter_map(|l| match l {
            Leftover::Mount(m) => Some(m),
            _ => None,
        })
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        quiet(Command::new("umount").arg("-l").arg(m));
    }
    for l in left {
        if let Leftover::Loop(dev) = l {
            quiet(Command::new("losetup").arg("-d").arg(dev));
        }
    }
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

/// Runs `cargo bench --bench BENCH` in the dev profile (which `scripts/test.sh`'s `cargo build`
/// has built; `cargo test` alone builds the test profile, so it compiles once more) with only
/// `env`, and `BENCH_DIR`, `BENCH_OUT` and `BENCH_JSON` in a fresh scratch directory, of the
/// `BENCH_*` variables. Fails the test if the bench fails or leaves anything naming that
/// directory behind (after sweeping it away).
fn run_bench(bench: &str, env: &[(&str, &str)]) -> Run {
    let (run, status) = run_bench_status(bench, env);
    assert!(
        status.success(),
        "the {bench} bench failed:\n{}",
        run.stderr
    );
    run
}

/// [`run_bench`] without the verdict on its exit status, which it returns.
fn run_bench_status(bench: &str, env: &[(&str, &str)]) -> (Run, std::process::ExitStatus) {
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
    // Whatever the caller exported (a README example tried earlier) stays out.
    for (k, _) in std::env::vars_os() {
        let set_here = ["BENCH_OUT", "BENCH_DIR", "BENCH_JSON"];
        if k.to_string_lossy().starts_with("BENCH_") && !set_here.iter().any(|s| k == *s) {
            cmd.env_remove(&k);
        }
    }
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
    sweep(&left);
    assert!(
        left.is_empty(),
        "the {bench} bench left behind: {left:#?}\nits stderr:\n{}",
        run.stderr
    );
    (run, output.status)
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
            // Reads the inherited tree, edits it and adds a file, as a user's workload might;
            // fails if an earlier system's edit reached its input (the plain baseline once
            // wrote into the image the overlay mounts).
            (
                "BENCH_WORKLOAD",
                "cat d000/* >/dev/null && ! grep -q edited d001/f00100.c && \
                 echo edited >>d001/f00100.c && dd if=/dev/zero of=new bs=64k count=16 status=none",
            ),
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
    expect("small", &TREE_SYSTEMS);
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
    expect("workload", &TREE_SYSTEMS);
    expect("blocksize", &["64KiB", "128KiB"]);
    let md = std::fs::read_to_string(out.join("cow.md")).unwrap();
    for section in [
        "## Targets (issue 8)",
        "## First 4 KiB write into a large shared file",
        "## Many small files",
        "## Your workload",
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

#[test]
fn root_leftovers_finds_and_sweeps_a_mount_a_loop_device_and_a_process() {
    let scratch = tempfile::Builder::new()
        .prefix("leftovers-smoke.")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir = scratch.path();
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let log = dir.join("log");
    std::fs::write(&log, b"").unwrap();
    // Made first, checked after the sweep: a failed step must not leak the others.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "smoke"])
        .arg(&mnt)
        .status();
    let attached = Command::new("losetup").arg("-f").arg(&image).status();
    let mut tail = Command::new("tail")
        .arg("-f")
        .arg(&log)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // `spawn` returns once the child has left our address space (vfork-style spawning), which
    // can be before its exec has set up the new command line: a scan at that moment missed it
    // in about 2 of 5 runs here. A bench's leftovers are long past their exec; wait for this one.
    let cmdline = format!("/proc/{}/cmdline", tail.id());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&std::fs::read(&cmdline).unwrap_or_default())
        .contains(&*log.to_string_lossy())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = leftovers(dir);
    sweep(&left);
    // A process the sweep missed must not keep the test waiting forever: it gets 5 s to end,
    // then it is killed and the test fails.
    let deadline = Instant::now() + Duration::from_secs(5);
    let swept = loop {
        match tail.try_wait().unwrap() {
            Some(_) => break true,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            None => {
                let _ = tail.kill();
                let _ = tail.wait();
                break false;
            }
        }
    };
    let after = leftovers(dir);
    assert!(mounted.unwrap().success() && attached.unwrap().success());
    assert_eq!(left.len(), 3, "found {left:?}");
    assert!(swept, "the sweep did not end the process");
    assert!(after.is_empty(), "still there after the sweep: {after:?}");
}

#[test]
fn root_cow_bench_workload_runs_on_a_given_image_and_fails_clearly() {
    let image = tempfile::Builder::new()
        .prefix("workload-image.")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::create_dir(image.path().join("src")).unwrap();
    std::fs::write(
        image.path().join("src/main.c"),
        "int main(void) { return 0; }\n",
    )
    .unwrap();
    let image_path = image.path().to_str().unwrap();
    // The image's content is the container's working directory, fresh for every system, and
    // a process the workload leaves behind does not outlive it.
    let run = run_bench(
        "cow",
        &[
            ("BENCH_FILTER", "workload"),
            ("BENCH_RUNS", "1"),
            ("BENCH_WORKLOAD_IMAGE", image_path),
            (
                "BENCH_WORKLOAD",
                "test -f src/main.c && ! test -e seen && touch seen && \
                 (sleep 600 >/dev/null 2>&1 </dev/null &)",
            ),
        ],
    );
    let devices = devices_by_group(&read_json(&run.out().join("cow.json")));
    expect_rows(&devices, "workload", &TREE_SYSTEMS);

    // A failing command fails the group, with its status, and the bench's exit status.
    let (run, status) = run_bench_status(
        "cow",
        &[
            ("BENCH_FILTER", "workload"),
            ("BENCH_RUNS", "1"),
            ("BENCH_WORKLOAD_IMAGE", image_path),
            ("BENCH_WORKLOAD", "echo broken >&2; exit 7"),
        ],
    );
    assert!(
        !status.success(),
        "a failed group exited 0:\n{}",
        run.stderr
    );
    let md = std::fs::read_to_string(run.out().join("cow.md")).unwrap();
    assert!(
        md.contains("## workload: failed")
            && md.contains("exit status: 7")
            && md.contains("broken"),
        "{md}"
    );

    // A relative image path would be read from `benches/`: refused.
    let (run, status) = run_bench_status(
        "cow",
        &[
            ("BENCH_FILTER", "workload"),
            ("BENCH_WORKLOAD_IMAGE", "src"),
            ("BENCH_WORKLOAD", "true"),
        ],
    );
    assert!(!status.success());
    assert!(
        run.stderr.contains("must be an absolute path"),
        "{}",
        run.stderr
    );
}

#[test]
fn root_kernel_bench_runs_every_system_in_the_guest_and_leaves_nothing() {
    if let Err(why) = fixtures::kernel::available() {
        eprintln!("skipped: the kernel harness is unavailable: {why}");
        return;
    }
    let run = run_bench(
        "kernel",
        &[
            ("BENCH_KERNEL_SIZE", "64M"),
            ("BENCH_KERNEL_ROUNDS", "1"),
            ("BENCH_KERNEL_WARMUP", "0"),
        ],
    );
    let json = read_json(&run.out().join("kernel.json"));
    let devices = devices_by_group(&json);
    let thins = [
        "kernel dm-thin ext4",
        "kernel dm-thin xfs",
        "thinbox daemon ext4",
        "thinbox daemon xfs",
    ];
    let others = ["xfs reflink", "overlayfs", "plain"];
    expect_rows(
        &devices,
        "kernel",
        &[thins.as_slice(), others.as_slice()].concat(),
    );
    let rows = json["rows"].as_array().unwrap();
    let row = |name: &str, device: &str| {
        rows.iter()
            .find(|r| r["name"] == name && r["device"] == device)
            .unwrap_or_else(|| panic!("no {name:?} row for {device}"))
    };
    for system in thins.iter().chain(&others[..2]) {
        row("container creation", system);
    }
    // The kernel and the daemon really copied on write into our pool: whole 64 KiB blocks, at
    // least the one the write landed in, and nothing like the 64 MiB file.
    for system in thins {
        let added = row("pool space the write added", system)["samples"][0]
            .as_f64()
            .unwrap();
        assert!(
            added >= 65536.0 && added % 65536.0 == 0.0 && added <= 4.0 * 65536.0,
            "{system}: the write added {added} bytes to the pool"
        );
    }
    assert!(
        std::fs::read_to_string(run.out().join("kernel.md"))
            .unwrap()
            .contains("| ratio | median [min–max] | goal | met |"),
        "kernel.md has no ratio table"
    );
    // The chart: an SVG document with a marker for each of the seven systems.
    let svg = std::fs::read_to_string(run.out().join("kernel.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
        "kernel.svg is not an SVG document"
    );
    assert_eq!(svg.matches("<circle").count(), 7, "kernel.svg: {svg}");
}
