//! dmtool's thin-provisioning-tools reports (`ls`, `delta`, `rmap`, `metadata-size`)
//! against the real 0.9.0 tools, byte for byte, on every fixture and on random pools the
//! engine writes; and dmtool run through links named after the tools.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use engine::io::{BlockDevice, FileDevice};
use engine::{DataBlockSize, Pool, PoolOptions, ThinId};
use fixtures::thin;

const DMTOOL: &str = env!("CARGO_BIN_EXE_dmtool");

/// The outcome of one run, comparable between our tool and the real one.
#[derive(Debug, PartialEq, Eq)]
struct Ran {
    rc: i32,
    stdout: String,
}

fn ran(o: Output) -> (Ran, String) {
    (
        Ran {
            rc: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        },
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `program args...`, captured.
fn exec(program: &Path, args: &[&str]) -> (Ran, String) {
    let out = Command::new(program)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    ran(out)
}

fn dmtool(args: &[&str]) -> (Ran, String) {
    exec(Path::new(DMTOOL), args)
}

/// The real tool, from /usr/sbin or PATH.
fn real(tool: &str, args: &[&str]) -> (Ran, String) {
    let path = ["/usr/sbin", "/sbin", "/usr/local/sbin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(tool));
    exec(&path, args)
}

fn tools_installed() -> bool {
    ["thin_ls", "thin_delta", "thin_rmap", "thin_metadata_size"]
        .iter()
        .all(|t| Path::new("/usr/sbin").join(t).is_file())
}

/// Asserts `dmtool VERB ARGS META` prints what `TOOL ARGS META` prints, and both succeed.
#[track_caller]
fn same(verb: &str, tool: &str, args: &[&str], meta: &Path) {
    let m = meta.to_str().unwrap();
    let (theirs, their_err) = real(tool, &[args, &[m]].concat());
    assert_eq!(theirs.rc, 0, "{tool} {args:?} {m}: {their_err}");
    let (ours, our_err) = dmtool(&[&[verb], args, &[m]].concat());
    assert_eq!(
        ours, theirs,
        "dmtool {verb} {args:?} {m} differs from {tool}; our stderr: {our_err}"
    );
}

const ALL_FIELDS: &str = "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,MAPPED_SECTORS,\
                          EXCLUSIVE_SECTORS,SHARED_SECTORS,MAPPED_BYTES,EXCLUSIVE_BYTES,\
                          SHARED_BYTES,MAPPED,EXCLUSIVE,SHARED,TRANSACTION,CREATE_TIME,SNAP_TIME";

/// Every report we make like the real tools, on the metadata at `meta`: ls in several
/// shapes, delta between (up to) the first five devices both ways, rmap over regions.
/// Returns how many comparisons were made.
fn compare_all(meta: &Path) -> usize {
    let m = meta.to_str().unwrap();
    let mut n = 0;
    let held = {
        let (r, _) = real("thin_ls", &["-m", m]);
        r.rc == 0
    };
    let mut roots: Vec<&[&str]> = vec![&[]];
    if held {
        roots.push(&["-m"]);
    }
    for root in &roots {
        for shape in [
            &[][..],
            &["-o", ALL_FIELDS][..],
            &["--no-headers", "-o", "SHARED,DEV,EXCLUSIVE"][..],
            &["-o", ""][..],
        ] {
            same("ls", "thin_ls", &[*root, shape].concat(), meta);
            n += 1;
        }
        let (ids, _) = real(
            "thin_ls",
            &[*root, &["--no-headers", "-o", "DEV", m]].concat(),
        );
        let ids: Vec<&str> = ids.stdout.split_whitespace().take(5).collect();
        for a in &ids {
            for b in &ids {
                for verbose in [&[][..], &["--verbose"][..]] {
                    let args = [*root, &["--thin1", a, "--snap2", b], verbose].concat();
                    same("delta", "thin_delta", &args, meta);
                    n += 1;
                }
            }
        }
    }
    for regions in [
        &["--region", "0..18446744073709551615"][..],
        &[
            "--region", "0..20", "--region", "10..40", "--region", "500..503",
        ][..],
        &["--region", "5..6"][..],
    ] {
        same("rmap", "thin_rmap", regions, meta);
        n += 1;
    }
    n
}

#[test]
fn ls_delta_and_rmap_equal_the_real_tools_on_every_fixture() {
    if !tools_installed() {
        eprintln!("skipped: thin-provisioning-tools are not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut comparisons = 0;
    let names = thin::names();
    for name in &names {
        let meta = thin::write_image(name, tmp.path());
        comparisons += compare_all(&meta);
    }
    eprintln!("{} fixtures, {comparisons} comparisons", names.len());
    assert!(names.len() >= 12, "fixtures missing: {names:?}");
}

/// A deterministic generator (xorshift64*), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn id(n: u64) -> ThinId {
    ThinId::new(n).unwrap()
}

/// A pool the engine writes at random: origins written in clusters and scattered blocks,
/// snapshots (and snapshots of snapshots) that then diverge by writes and discards, a
/// deleted thin, and — for odd seeds — a metadata snapshot held half way, after which
/// everything changes again. Block size 64 KiB, up to 8 MiB of metadata.
fn random_pool(dir: &Path, seed: u64) -> PathBuf {
    const BS: u64 = 64 * 1024;
    let meta_path = dir.join(format!("random-{seed}.meta"));
    let meta: Arc<dyn BlockDevice> = Arc::new(FileDevice::create(&meta_path, 8 << 20).unwrap());
    let data: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::create(&dir.join(format!("random-{seed}.data")), 20_000 * BS).unwrap(),
    );
    let pool = Pool::format(meta, data, DataBlockSize::DEFAULT, PoolOptions::default()).unwrap();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let block = vec![0x5a; BS as usize];
    let mut ids: Vec<u64> = Vec::new();
    let mut next_id = 1;
    let steps = 30 + rng.below(30);
    for step in 0..steps {
        if seed % 2 == 1 && step == steps / 2 {
            pool.commit().unwrap();
            pool.reserve_metadata_snap().unwrap();
        }
        match rng.below(10) {
            0 | 1 if ids.len() < 8 => {
                pool.create_thin(id(next_id)).unwrap();
                ids.push(next_id);
                next_id += 1;
            }
            2 | 3 if !ids.is_empty() && ids.len() < 8 => {
                let origin = ids[rng.below(ids.len() as u64) as usize];
                pool.create_snap(id(next_id), id(origin)).unwrap();
                ids.push(next_id);
                next_id += 1;
            }
            4 if ids.len() > 3 => {
                let gone = ids.remove(rng.below(ids.len() as u64) as usize);
                pool.delete(id(gone)).unwrap();
            }
            5 if !ids.is_empty() => {
                let t = pool
                    .open_thin(id(ids[rng.below(ids.len() as u64) as usize]))
                    .unwrap();
                let start = rng.below(3000);
                let len = 1 + rng.below(60);
                t.discard(start * BS, len * BS).unwrap();
            }
            _ if !ids.is_empty() => {
                let t = pool
                    .open_thin(id(ids[rng.below(ids.len() as u64) as usize]))
                    .unwrap();
                if rng.below(2) == 0 {
                    // A cluster: consecutive blocks, long runs for delta and rmap.
                    let start = rng.below(2000);
                    for v in start..start + 1 + rng.below(300) {
                        t.write(&block, v * BS).unwrap();
                    }
                } else {
                    for _ in 0..1 + rng.below(80) {
                        t.write(&block, rng.below(3000) * BS).unwrap();
                    }
                }
            }
            _ => {}
        }
    }
    pool.commit().unwrap();
    drop(pool);
    meta_path
}

#[test]
fn ls_delta_and_rmap_equal_the_real_tools_on_random_pools() {
    if !tools_installed() {
        eprintln!("skipped: thin-provisioning-tools are not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let seeds: u64 = std::env::var("THIN_TOOLS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let mut comparisons = 0;
    for seed in 1..=seeds {
        let meta = random_pool(tmp.path(), seed);
        comparisons += compare_all(&meta);
        std::fs::remove_file(&meta).unwrap();
        std::fs::remove_file(tmp.path().join(format!("random-{seed}.data"))).unwrap();
    }
    eprintln!("{seeds} random pools, {comparisons} comparisons");
}

#[test]
fn metadata_size_agrees_with_thin_metadata_size_over_a_grid() {
    if !tools_installed() {
        eprintln!("skipped: thin-provisioning-tools are not installed");
        return;
    }
    let links = tempfile::tempdir().unwrap();
    let (made, err) = dmtool(&["links", links.path().to_str().unwrap()]);
    assert_eq!(made.rc, 0, "{err}");
    let ours = links.path().join("thin_metadata_size");
    let mut cases = 0;
    for block in ["64k", "128", "256k", "1m", "8m", "1g", "65536b"] {
        for pool in ["1g", "100G", "1t", "3T", "16t", "1p", "2000000"] {
            for thins in ["1", "100", "1000", "1k", "65536"] {
                for output in [
                    &[][..],
                    &["-u", "m"][..],
                    &["-u", "G", "-n"][..],
                    &["-ub", "-nshort"][..],
                    &["-u", "kibibytes", "--numeric-only=long"][..],
                    &["-u", "t", "-n"][..],
                ] {
                    let args = [&["-b", block, "-s", pool, "-m", thins][..], output].concat();
                    let (theirs, their_err) = real("thin_metadata_size", &args);
                    let (mine, my_err) = exec(&ours, &args);
                    cases += 1;
                    if theirs.rc == 0 {
                        assert_eq!(mine, theirs, "{args:?}: {my_err}");
                    } else {
                        // Refusals agree; ours is a usage error (2), theirs exits 1.
                        assert_eq!(mine.rc, 2, "{args:?}: they said {their_err}");
                        let why = their_err.trim().trim_end_matches('!');
                        let why = why.split(" - ").nth(1).unwrap_or(why);
                        assert!(
                            my_err.contains(why.split_whitespace().next().unwrap()),
                            "{args:?}: {my_err} vs {their_err}"
                        );
                    }
                }
            }
        }
    }
    // Option order shows in the description of unitless sizes, as in the original.
    for args in [
        &["-u", "m", "-b", "128", "-s", "10g", "-m", "3"][..],
        &["-b", "128", "-u", "m", "-s", "20971520", "-m", "3"][..],
        &["--block=64k", "--pool", "1t", "--max-thins", "9"][..],
    ] {
        assert_eq!(
            exec(&ours, args).0,
            real("thin_metadata_size", args).0,
            "{args:?}"
        );
        cases += 1;
    }
    eprintln!("{cases} metadata-size cases");
}

/// A tempdir with `dmtool links` run in it.
fn linked() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = dmtool(&["links", dir.path().to_str().unwrap()]);
    assert_eq!(out.rc, 0, "{err}");
    assert_eq!(out.stdout.lines().count(), 9, "{}", out.stdout);
    dir
}

#[test]
fn links_make_dmtool_answer_to_the_tools_names() {
    let dir = linked();
    let link = |tool: &str| dir.path().join(tool);
    for tool in [
        "thin_check",
        "thin_dump",
        "thin_restore",
        "thin_ls",
        "thin_delta",
        "thin_rmap",
        "thin_metadata_size",
        "thin_repair",
        "thin_trim",
    ] {
        let target = std::fs::read_link(link(tool)).unwrap();
        assert_eq!(target, Path::new(DMTOOL).canonicalize().unwrap(), "{tool}");
    }
    // Again: links already there are fine; a stranger in the way is refused without --force.
    let d = dir.path().to_str().unwrap();
    assert_eq!(dmtool(&["links", d]).0.rc, 0);
    std::fs::remove_file(link("thin_ls")).unwrap();
    std::fs::write(link("thin_ls"), "not a link").unwrap();
    let (out, err) = dmtool(&["links", d]);
    assert_eq!(out.rc, 1);
    assert!(err.contains("thin_ls already exists"), "{err}");
    assert_eq!(dmtool(&["links", "--force", d]).0.rc, 0);
    assert!(std::fs::read_link(link("thin_ls")).is_ok());

    // thin_repair and thin_trim take their tools' options too.
    let help = exec(&link("thin_repair"), &["--help"]).0;
    assert_eq!(help.rc, 0);
    let err = exec(
        &link("thin_trim"),
        &["--metadata-dev", "/nonexistent", "--data-dev", "/x"],
    )
    .1;
    assert!(err.contains("/nonexistent"), "{err}");
}

#[test]
fn the_links_behave_as_the_tools_do() {
    if !tools_installed() {
        eprintln!("skipped: thin-provisioning-tools are not installed");
        return;
    }
    let dir = linked();
    let tmp = tempfile::tempdir().unwrap();
    let link = |tool: &str| dir.path().join(tool);
    let two = thin::write_image("two-devs", tmp.path());
    let t = two.to_str().unwrap();

    // thin_check: the same stdout and exit code, --quiet prints nothing.
    for args in [&[][..], &["--skip-mappings"][..], &["-q"][..]] {
        let a = [args, &[t]].concat();
        assert_eq!(
            exec(&link("thin_check"), &a).0,
            real("thin_check", &a).0,
            "{a:?}"
        );
    }
    // --clear-needs-check-flag writes what the real one writes.
    let ours = thin::write_image("needs-check", tmp.path());
    let theirs = tmp.path().join("needs-check.real");
    std::fs::copy(&ours, &theirs).unwrap();
    let o = ours.to_str().unwrap();
    let (mine, err) = exec(&link("thin_check"), &["-q", "--clear-needs-check-flag", o]);
    assert_eq!(
        mine,
        Ran {
            rc: 0,
            stdout: String::new()
        },
        "{err}"
    );
    let r = theirs.to_str().unwrap();
    assert_eq!(
        real("thin_check", &["-q", "--clear-needs-check-flag", r])
            .0
            .rc,
        0
    );
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());
    // Damage: exit 1 from both.
    let mut bytes = std::fs::read(&two).unwrap();
    bytes[10 * 4096 + 100] ^= 0xff;
    let damaged = tmp.path().join("damaged.meta");
    std::fs::write(&damaged, &bytes).unwrap();
    let d = damaged.to_str().unwrap();
    assert_eq!(exec(&link("thin_check"), &["-q", d]).0.rc, 1);
    assert_eq!(real("thin_check", &["-q", d]).0.rc, 1);

    // thin_dump -f human_readable -o FILE, then thin_restore -i -o of its XML.
    let human = tmp.path().join("human.txt");
    let (out, err) = exec(
        &link("thin_dump"),
        &["-f", "human_readable", "-o", human.to_str().unwrap(), t],
    );
    assert_eq!(out.rc, 0, "{err}");
    let (real_human, _) = real("thin_dump", &["-f", "human_readable", t]);
    assert_eq!(std::fs::read_to_string(&human).unwrap(), real_human.stdout);
    let xml = tmp.path().join("two.xml");
    let (out, _) = exec(&link("thin_dump"), &["-o", xml.to_str().unwrap(), t]);
    assert_eq!(out.rc, 0);
    let restored = tmp.path().join("restored.meta");
    std::fs::write(&restored, vec![0u8; 4 << 20]).unwrap();
    let (out, err) = exec(
        &link("thin_restore"),
        &[
            "-q",
            "-i",
            xml.to_str().unwrap(),
            "-o",
            restored.to_str().unwrap(),
        ],
    );
    assert_eq!(out.rc, 0, "{err}");
    assert_eq!(real("thin_check", &[restored.to_str().unwrap()]).0.rc, 0);
    // Our restore writes format version 2, as the kernel does (the fixture has 1).
    assert_eq!(
        real("thin_dump", &[restored.to_str().unwrap()]).0.stdout,
        std::fs::read_to_string(&xml)
            .unwrap()
            .replacen("version=\"1\"", "version=\"2\"", 1)
    );

    // thin_ls, thin_delta, thin_rmap through their links.
    let snap = thin::write_image("metadata-snap", tmp.path());
    let s = snap.to_str().unwrap();
    for (tool, args) in [
        ("thin_ls", &["-o", "DEV,EXCLUSIVE,SHARED", t][..]),
        ("thin_ls", &["--no-headers", "-m", s][..]),
        (
            "thin_delta",
            &["--snap1", "1", "--thin2", "2", "--verbose", t][..],
        ),
        ("thin_delta", &["-m", "--snap1", "1", "--snap2", "2", s][..]),
        (
            "thin_rmap",
            &["--region", "0..20", "--region", "400..402", t][..],
        ),
    ] {
        assert_eq!(
            exec(&link(tool), args).0,
            real(tool, args).0,
            "{tool} {args:?}"
        );
    }

    // Failures: exit 1 for what the metadata lacks, 2 for usage (the originals say 1).
    let (out, err) = exec(&link("thin_delta"), &["--thin1", "1", "--thin2", "9", t]);
    assert_eq!(out.rc, 1);
    assert!(
        err.contains("thin device 9 is not in the metadata"),
        "{err}"
    );
    let (out, err) = exec(&link("thin_ls"), &["-m", t]);
    assert_eq!(out.rc, 1);
    assert!(err.contains("no metadata snapshot is held"), "{err}");
    for (tool, args) in [
        ("thin_ls", &["-o", "DEV,BOGUS", t][..]),
        ("thin_delta", &["--thin1", "1", t][..]),
        ("thin_rmap", &[t][..]),
        ("thin_rmap", &["--region", "5..5", t][..]),
        ("thin_check", &["--bogus", t][..]),
        (
            "thin_metadata_size",
            &["-b", "96k", "-s", "1t", "-m", "1"][..],
        ),
    ] {
        let (out, err) = exec(&link(tool), args);
        assert_eq!(out.rc, 2, "{tool} {args:?}: {err}");
        assert!(out.stdout.is_empty() && !err.is_empty(), "{tool} {args:?}");
        assert_eq!(real(tool, args).0.rc, 1, "{tool} {args:?}");
    }
}

#[test]
fn delta_names_the_held_snapshot_block_or_refuses_another() {
    if !tools_installed() {
        eprintln!("skipped: thin-provisioning-tools are not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let meta = thin::write_image("kernel-scenario", tmp.path());
    let held = thin::expect("kernel-scenario")["superblock"]["held_root"]
        .as_u64()
        .unwrap();
    assert_ne!(held, 0);
    let at = format!("--metadata-snap={held}");
    same(
        "delta",
        "thin_delta",
        &[&at, "--thin1", "0", "--thin2", "1"],
        &meta,
    );
    let (out, err) = dmtool(&[
        "delta",
        "--metadata-snap=5",
        "--thin1",
        "0",
        "--thin2",
        "1",
        meta.to_str().unwrap(),
    ]);
    assert_eq!(out.rc, 1);
    assert!(err.contains("not the held one"), "{err}");
}

#[test]
fn thin_ls_of_a_pool_shows_exclusive_and_shared_space() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let p = dir.to_str().unwrap();
    let ok = |args: &[&str]| {
        let (out, err) = dmtool(args);
        assert_eq!(out.rc, 0, "{args:?}: {err}");
        out.stdout
    };
    ok(&[
        "pool",
        "create",
        "--pool",
        p,
        "--data-size",
        "64M",
        "--metadata-size",
        "4M",
    ]);
    ok(&[
        "thin", "create", "--pool", p, "1", "--size", "4M", "--name", "base",
    ]);
    let input = tmp.path().join("input");
    std::fs::write(&input, vec![7u8; 10 * 65536]).unwrap();
    let i = input.to_str().unwrap();
    ok(&["thin", "write", "--pool", p, "1", "--input", i]);
    ok(&["thin", "snap", "--pool", p, "2", "1"]);
    std::fs::write(&input, vec![8u8; 3 * 65536]).unwrap();
    ok(&[
        "thin", "write", "--pool", p, "2", "--input", i, "--offset", "128k",
    ]);

    let json: serde_json::Value =
        serde_json::from_str(&ok(&["thin", "ls", "--pool", p, "--json"])).unwrap();
    // Thin 2 copied 3 of its 10 blocks: 3 exclusive each side, 7 shared.
    for (row, exclusive) in [(0, 3), (1, 3)] {
        assert_eq!(json[row]["mapped_blocks"], 10, "{json}");
        assert_eq!(json[row]["exclusive_blocks"], exclusive, "{json}");
        assert_eq!(json[row]["shared_blocks"], 7, "{json}");
        assert_eq!(json[row]["shared_bytes"], 7 * 65536, "{json}");
        assert_eq!(json[row]["highest_mapped_block"], 9, "{json}");
    }
    let table = ok(&["thin", "ls", "--pool", p]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID",
            "NAME",
            "SIZE",
            "MAPPED",
            "EXCLUSIVE",
            "SHARED",
            "ORIGIN",
            "DEVICE"
        ]
    );
    assert!(table.contains("192KiB  448KiB"), "{table}");

    // The same figures as `dmtool ls` and thin_ls give for the metadata.
    let meta = dir.join("metadata");
    let fields = ["-o", "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS"];
    let ours = ok(&[&["ls"][..], &fields, &[meta.to_str().unwrap()]].concat());
    assert_eq!(
        ours,
        "DEV MAPPED_BLOCKS EXCLUSIVE_BLOCKS SHARED_BLOCKS \n  1            10                3             7 \n  2            10                3             7 \n"
    );
    if tools_installed() {
        same("ls", "thin_ls", &fields, &meta);
    }
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["ls", "--json", meta.to_str().unwrap()])).unwrap();
    assert_eq!(json[1]["exclusive_bytes"], 3 * 65536);
}

#[test]
fn every_new_verb_has_help_with_an_example() {
    for verb in ["ls", "delta", "rmap", "metadata-size", "links", "check"] {
        let (out, err) = dmtool(&[verb, "--help"]);
        assert_eq!(out.rc, 0, "{verb}: {err}");
        assert!(
            out.stdout.contains(&format!("Example: dmtool {verb}")),
            "{verb}: {}",
            out.stdout
        );
    }
    let (out, _) = dmtool(&["metadata-size", "-h"]);
    assert!(out.stdout.contains("-b, --block-size"), "{}", out.stdout);
}

/// 40 devices restored (by the real thin_restore) from XML in which many ranges start at the
/// same few data blocks: thin_rmap's unstable sort reorders such ties (a stable sort by data
/// block gives another order), and ours must reorder them the same way.
#[test]
fn rmap_orders_ties_as_thin_rmap_does() {
    if !tools_installed() {
        eprintln!("skipped: thin-provisioning-tools are not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for seed in 1..=6u64 {
        let mut rng = Rng(seed * 7919);
        let mut xml = String::from(
            "<superblock uuid=\"\" time=\"0\" transaction=\"1\" flags=\"0\" version=\"2\" \
             data_block_size=\"128\" nr_data_blocks=\"10000\">\n",
        );
        for dev in 0..40 {
            xml.push_str(&format!(
                "  <device dev_id=\"{dev}\" mapped_blocks=\"0\" transaction=\"0\" \
                 creation_time=\"0\" snap_time=\"0\">\n"
            ));
            let mut v = 0;
            for _ in 0..1 + rng.below(12) {
                v += 1 + rng.below(5);
                let data = match rng.below(8) {
                    7 => rng.below(300),
                    k => k * 10,
                };
                let len = 1 + rng.below(4);
                xml.push_str(&format!(
                    "    <range_mapping origin_begin=\"{v}\" data_begin=\"{data}\" \
                     length=\"{len}\" time=\"0\"/>\n"
                ));
                v += len;
            }
            xml.push_str("  </device>\n");
        }
        xml.push_str("</superblock>\n");
        let xml_path = tmp.path().join(format!("ties-{seed}.xml"));
        std::fs::write(&xml_path, xml).unwrap();
        let meta = tmp.path().join(format!("ties-{seed}.meta"));
        std::fs::write(&meta, vec![0u8; 8 << 20]).unwrap();
        let restored = fixtures::tools::thin_restore(&xml_path, &meta);
        assert_eq!(restored.rc, 0, "{}", restored.stderr);
        same("rmap", "thin_rmap", &["--region", "0..100000"], &meta);
        same(
            "rmap",
            "thin_rmap",
            &["--region", "0..35", "--region", "200..300"],
            &meta,
        );
        same("ls", "thin_ls", &["-o", ALL_FIELDS], &meta);
    }
}

/// Damaged metadata is an error naming the file and the damage, exit 1, never a panic: every
/// single node of `two-devs` garbled in turn (checksums resealed or not), and a truncated copy.
#[test]
fn damaged_metadata_is_a_clear_error_for_ls_delta_and_rmap() {
    let tmp = tempfile::tempdir().unwrap();
    let good = thin::metadata_image("two-devs");
    let path = tmp.path().join("damaged.meta");
    let p = path.to_str().unwrap();
    let runs: [&[&str]; 3] = [
        &["ls", "-o", "DEV,EXCLUSIVE,SHARED", p],
        &["delta", "--thin1", "1", "--thin2", "2", p],
        &["rmap", "--region", "0..1000", p],
    ];
    let mut failures = 0;
    for block in 1..12usize {
        let mut bytes = good.clone();
        let mut x = block as u64 * 0x9e37_79b9;
        for b in &mut bytes[block * 4096 + 16..block * 4096 + 600] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(&path, &bytes).unwrap();
        for args in runs {
            let (out, err) = dmtool(args);
            assert!(!err.contains("panicked"), "{args:?} block {block}: {err}");
            if out.rc != 0 {
                assert_eq!(out.rc, 1, "{args:?} block {block}: {err}");
                assert!(
                    err.contains(p) && err.contains("damaged"),
                    "{args:?}: {err}"
                );
                failures += 1;
            }
        }
    }
    assert!(failures > 0, "garbling the trees' blocks went unnoticed");
    std::fs::write(&path, &good[..5 * 4096]).unwrap();
    for args in runs {
        let (out, err) = dmtool(args);
        assert_eq!(out.rc, 1, "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && err.contains(p),
            "{args:?}: {err}"
        );
    }
}
