//! The first write into a shared file where the kernel's own dm-thin serves the thin (issue 8):
//! the path a storage host with device-mapper takes, which this machine's kernel lacks.
//!
//! The host makes the images with thinbox's engine, as the runtime would: a pool whose thin 1
//! holds ext4 (the runtime's mkfs options, its journal log trimmed) and thin 2 xfs, each with
//! one file of `BENCH_KERNEL_SIZE` random bytes; an xfs file system (reflink on) with the same
//! file; an ext4 file system with the file as an overlay lower layer and as a plain file. Then
//! one qemu guest
//! (`fixtures::kernel`, Debian's kernel under software emulation) gets them as disks opened with
//! O_DIRECT (`cache=none`, so a read after the guest drops its caches reaches the host disk),
//! loads the pool into dm-thin with the table `dmtool pool start --backend kernel` would load,
//! and runs interleaved rounds; in each, every system makes a fresh container and takes the
//! cow bench's probe (open, 4 KiB `pwrite`, `fsync`, close), cold:
//!
//! - `kernel dm-thin ext4`: `create_snap` of thin 1, a `thin` table loaded, ext4 mounted;
//! - `kernel dm-thin xfs`: the same on thin 2, which holds xfs (the runtime's `dm.fs=xfs`),
//!   so the block layer can be told apart from the file system on top;
//! - `xfs reflink`: a `FICLONE` of the file;
//! - `overlayfs`: an overlay mount on the lower layer (the open copies the whole file up);
//! - `plain`: the plain file, written in place (the floor).
//!
//! Every figure is measured inside the emulated machine, where the CPU runs many times slower
//! than the host's and the disks do not: compare the systems with each other (the ratios),
//! not with the cow bench's figures. Results go to `BENCH_OUT` (default `benches/results/`):
//! `kernel.md`, `kernel.json`. Parameters: `BENCH_KERNEL_SIZE` (default 1G),
//! `BENCH_KERNEL_ROUNDS` (default 9, as the cow bench's first writes), `BENCH_KERNEL_WARMUP`
//! (rounds run first and not counted, default 1: the emulator translates each kernel code path
//! the first time it runs: in a 64 MiB run without one, the first round's writes took 2–2.7×
//! the second's on every copy-on-write system), `BENCH_DIR` (scratch, default /var/tmp). Needs root (loop devices, FUSE and mounts while making the images) and
//! the kernel harness; every mount, loop device and daemon it makes is undone on the way out.
//! It never asserts a timing.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use benches::sys::{self, Mount};
use benches::{fmt_stats, fmt_stats_for, Goal, Report, Stats, Unit};
use engine::activate::daemon::{Client, Daemon, DaemonConfig, RunDir};
use engine::activate::PoolControl;
use engine::store::Volumes;
use engine::units::{format_size, parse_size};
use engine::{DataBlockSize, NewPool, PoolOptions, PoolPaths, ThinId};
use fixtures::kernel::{self, GuestOptions};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;
/// The images' thins: ext4 and xfs.
const ORIGIN_EXT4: u64 = 1;
const ORIGIN_XFS: u64 = 2;
/// The shared file's name in every image.
const FILE: &str = "big";

/// The systems, in the order of the tables.
const SYSTEMS: [&str; 5] = [
    "kernel dm-thin ext4",
    "kernel dm-thin xfs",
    "xfs reflink",
    "overlayfs",
    "plain",
];
/// The guest script's names for them, in the same order.
const TAGS: [&str; 5] = ["thin", "thinxfs", "xfs", "overlay", "plain"];

struct Opts {
    size: u64,
    rounds: usize,
    warmup: usize,
    out: PathBuf,
    dir: Option<PathBuf>,
}

impl Opts {
    fn from_env() -> Result<Opts> {
        let size = match std::env::var("BENCH_KERNEL_SIZE") {
            Ok(s) => parse_size(&s).with_context(|| format!("BENCH_KERNEL_SIZE={s}"))?,
            Err(_) => 1 << 30,
        };
        ensure!(
            size >= 16 * MIB && size % (64 << 10) == 0,
            "BENCH_KERNEL_SIZE must be a multiple of 64 KiB, at least 16 MiB"
        );
        Ok(Opts {
            size,
            rounds: benches::env_num("BENCH_KERNEL_ROUNDS", 9usize).max(1),
            warmup: benches::env_num("BENCH_KERNEL_WARMUP", 1usize),
            out: std::env::var_os("BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results")),
            dir: std::env::var_os("BENCH_DIR").map(PathBuf::from),
        })
    }
}

/// The disks handed to the guest, in order: /dev/vda, /dev/vdb, /dev/vdc, /dev/vdd.
struct Disks {
    metadata: PathBuf,
    data: PathBuf,
    xfs: PathBuf,
    ext4: PathBuf,
    data_sectors: u64,
    thin_sectors: u64,
    block_sectors: u64,
}

/// Stops the pool daemon however the image making ends.
struct DaemonGuard(Option<Arc<Daemon>>);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            if let Err(e) = d.shutdown() {
                eprintln!("kernel bench: the pool daemon did not stop cleanly: {e:#}");
            }
        }
    }
}

/// mkfs.ext4 as the runtime formats a base device: no lazy init, which would otherwise go on
/// writing in the guest while it measures.
fn mkfs_ext4(target: &Path) -> Result<()> {
    sys::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(target),
    )?;
    Ok(())
}

/// The pool: thin 1 with ext4 and the file, thin 2 with xfs and the file, made through the
/// pool daemon (FUSE file + loop); ext4's journal log trimmed as the runtime trims each layer
/// it writes.
fn make_pool(dir: &Path, size: u64) -> Result<(PathBuf, PathBuf, u64, u64)> {
    let pool_dir = dir.join("pool");
    fs::create_dir_all(&pool_dir)?;
    let paths = PoolPaths::in_dir(&pool_dir);
    let store = engine::VolumeStore::path_in(&pool_dir);
    // Room for the file, the file system's own metadata and log, and a few rounds of copies.
    let thin_bytes = (size + size / 4 + 256 * MIB).next_multiple_of(MIB);
    let data_bytes = 2 * thin_bytes + 256 * MIB;
    let block = DataBlockSize::DEFAULT;
    {
        let mut volumes = Volumes::create(
            &paths,
            &store,
            NewPool::new(data_bytes, 64 * MIB, block),
            PoolOptions::default(),
        )?;
        for origin in [ORIGIN_EXT4, ORIGIN_XFS] {
            volumes.create_thin(ThinId::new(origin).context("id")?, thin_bytes, None)?;
        }
        volumes.pool().commit()?;
    }
    let run_dir = RunDir::new(pool_dir.join("run"));
    let daemon = DaemonGuard(Some(Daemon::start(DaemonConfig {
        paths: paths.clone(),
        store_path: store,
        run_dir: run_dir.clone(),
        options: PoolOptions::default(),
        fuse_workers: engine::activate::fuse::ExportOptions::default().workers,
    })?));
    let mut client = Client::connect(&run_dir.socket())?
        .context("the pool daemon does not answer on its socket")?;
    for (origin, fstype) in [(ORIGIN_EXT4, "ext4"), (ORIGIN_XFS, "xfs")] {
        let origin = ThinId::new(origin).context("id")?;
        let device = client.activate(origin, false)?.device;
        let filled = (|| -> Result<()> {
            if fstype == "ext4" {
                mkfs_ext4(&device)?;
            } else {
                // As the cow bench's xfs on thin: -K, the thin is empty.
                sys::run(
                    Command::new("mkfs.xfs")
                        .args(["-q", "-f", "-K"])
                        .arg(&device),
                )?;
            }
            let mnt = pool_dir.join("mnt");
            let _mount = Mount::new(Some(fstype), &device.to_string_lossy(), &mnt, None, None)?;
            sys::fill_file(&mnt.join(FILE), size, 1)
        })();
        client.deactivate(origin, false)?;
        filled?;
    }
    let trim =
        engine::journal::trim_ext4_journal(&mut client, ThinId::new(ORIGIN_EXT4).context("id")?)?;
    eprintln!("  the ext4 image's journal log: {trim:?}");
    drop(client);
    drop(daemon);
    Ok((
        paths.metadata,
        paths.data,
        data_bytes / block.bytes() * block.bytes() / SECTOR,
        thin_bytes / SECTOR,
    ))
}

/// A file system in a sparse file, filled through a loop mount by `fill`.
fn make_fs_image(
    path: &Path,
    bytes: u64,
    mkfs: &mut Command,
    fstype: &str,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    fs::File::create(path)?.set_len(bytes)?;
    sys::run(mkfs.arg(path))?;
    let mnt = path.with_extension("mnt");
    let mount = Mount::new(
        Some(fstype),
        &path.to_string_lossy(),
        &mnt,
        Some("loop"),
        None,
    )?;
    let filled = fill(&mnt);
    drop(mount);
    let _ = fs::remove_dir(&mnt);
    filled
}

fn make_disks(dir: &Path, size: u64) -> Result<Disks> {
    eprintln!(
        "kernel bench: making the images ({} file)",
        format_size(size)
    );
    let (metadata, data, data_sectors, thin_sectors) = make_pool(dir, size)?;
    let xfs = dir.join("xfs.img");
    make_fs_image(
        &xfs,
        size + size / 4 + 512 * MIB,
        Command::new("mkfs.xfs").args(["-q", "-f", "-m", "reflink=1"]),
        "xfs",
        |mnt| sys::fill_file(&mnt.join(FILE), size, 1),
    )?;
    let ext4 = dir.join("ext4.img");
    // The lower layer, the plain file and room for one copy-up.
    make_fs_image(
        &ext4,
        3 * size + 512 * MIB,
        Command::new("mkfs.ext4").args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ]),
        "ext4",
        |mnt| {
            fs::create_dir_all(mnt.join("lower"))?;
            sys::fill_file(&mnt.join("lower").join(FILE), size, 1)?;
            sys::fill_file(&mnt.join("plain"), size, 1)
        },
    )?;
    Ok(Disks {
        metadata,
        data,
        xfs,
        ext4,
        data_sectors,
        thin_sectors,
        block_sectors: DataBlockSize::DEFAULT.bytes() / SECTOR,
    })
}

/// The `thin-pool` table's feature arguments for `options`, as the kernel backend loads them.
fn pool_features(options: &PoolOptions) -> String {
    let mut features = Vec::new();
    if !options.zero_new_blocks {
        features.push("skip_block_zeroing");
    }
    if !options.discard_passdown {
        features.push("no_discard_passdown");
    }
    if features.is_empty() {
        String::new()
    } else {
        format!(" {} {}", features.len(), features.join(" "))
    }
}

/// Where round `round` writes: a different 64 KiB block of the file each round, 4 KiB in.
fn offset(round: usize, size: u64) -> u64 {
    let blocks = size / (64 << 10);
    let block = (round as u64 * 7919 + 13) % blocks;
    block * (64 << 10) + 4096
}

/// The guest script: the pool loaded into dm-thin, then the rounds. Each system prints one
/// line, `R <system> <round> <key> <ms> ...` (`W` for warm-up rounds).
fn guest_script(o: &Opts, d: &Disks) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"P=guest-probe
dmsetup create pool --table "0 {data} thin-pool /dev/vda /dev/vdb {block} 1024{features}"
dmsetup mknodes
mkdir -p /mnt/c /mnt/x /mnt/e /mnt/o
mount -t xfs /dev/vdc /mnt/x
mount -t ext4 /dev/vdd /mnt/e
# The disks under the guest finish what the last system wrote before the next one is timed.
settle() {{ sync; sleep 1; }}
cold() {{ sync; echo 3 > /proc/sys/vm/drop_caches; }}
used() {{ dmsetup status pool | awk '{{ split($6, a, "/"); print a[1] }}'; }}
# container TAG ROUND OFFSET ORIGIN FSTYPE [MOUNT OPTIONS]
container() {{
  id=$((100 + $2))
  settle
  s=$($P time dmsetup message pool 0 "create_snap $id $4")
  a=$($P time dmsetup create c$id --table "0 {thin} thin /dev/mapper/pool $id")
  dmsetup mknodes
  mount -t $5 ${{6:+-o $6}} /dev/mapper/c$id /mnt/c
  cold
  u0=$(used)
  w=$($P write /mnt/c/{file} $3)
  u1=$(used)
  echo "$K $1 $2 write $w snap $s table $a blocks $((u1 - u0))"
  umount /mnt/c
  dmsetup remove c$id
  dmsetup message pool 0 "delete $id"
}}
thin() {{ container thin $1 $2 {ext4} ext4; }}
# Every snapshot carries the image's UUID, as in the runtime.
thinxfs() {{ container thinxfs $1 $2 {xfs} xfs nouuid; }}
xfs() {{
  settle
  c=$($P clone /mnt/x/{file} /mnt/x/clone)
  cold
  w=$($P write /mnt/x/clone $2)
  echo "$K xfs $1 write $w create $c"
  rm /mnt/x/clone
}}
overlay() {{
  settle
  mkdir -p /mnt/e/run/upper /mnt/e/run/work
  c=$($P time mount -t overlay overlay -o lowerdir=/mnt/e/lower,upperdir=/mnt/e/run/upper,workdir=/mnt/e/run/work /mnt/o)
  cold
  w=$($P write /mnt/o/{file} $2)
  echo "$K overlay $1 write $w create $c"
  umount /mnt/o
  rm -rf /mnt/e/run
  # Deleting the copy frees a file's worth of blocks: let the disks take it before the next.
  sync; sleep 2
}}
plain() {{
  settle
  cold
  w=$($P write /mnt/e/plain $2)
  echo "$K plain $1 write $w"
}}"#,
        data = d.data_sectors,
        block = d.block_sectors,
        features = pool_features(&PoolOptions::default()),
        ext4 = ORIGIN_EXT4,
        xfs = ORIGIN_XFS,
        thin = d.thin_sectors,
        file = FILE,
    );
    // Warm-up rounds are numbered after the counted ones, so every round has a snapshot id and
    // a block of the file of its own.
    let rounds = (o.rounds..o.rounds + o.warmup)
        .map(|r| ("W", r))
        .chain((0..o.rounds).map(|r| ("R", r)));
    for (kind, round) in rounds {
        let _ = writeln!(s, "K={kind}");
        let off = offset(round, o.size);
        for k in 0..TAGS.len() {
            let _ = writeln!(s, "{} {round} {off}", TAGS[(round + k) % TAGS.len()]);
        }
    }
    let _ = writeln!(
        s,
        "umount /mnt/x /mnt/e\ndmsetup remove pool\necho \"KV kernel $(uname -r)\""
    );
    s
}

/// One system's figures: the write, and its creation steps.
#[derive(Default)]
struct Samples {
    write: Vec<f64>,
    create: Vec<f64>,
    blocks: Vec<f64>,
}

/// Reads the `R` lines back: system → samples, in round order.
fn parse(output: &str, rounds: usize) -> Result<Vec<Samples>> {
    let mut all: Vec<Samples> = (0..SYSTEMS.len()).map(|_| Samples::default()).collect();
    for line in output.lines().filter(|l| l.starts_with("R ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let index = TAGS
            .iter()
            .position(|s| Some(s) == words.get(1))
            .with_context(|| format!("unknown system in {line:?}"))?;
        let value = |key: &str| -> Result<Option<f64>> {
            match words.iter().position(|w| *w == key) {
                None => Ok(None),
                Some(i) => {
                    let v: f64 = words
                        .get(i + 1)
                        .and_then(|v| v.parse().ok())
                        .with_context(|| format!("no figure after {key} in {line:?}"))?;
                    ensure!(v.is_finite() && v >= 0.0, "bad figure in {line:?}");
                    Ok(Some(v))
                }
            }
        };
        let s = &mut all[index];
        s.write
            .push(value("write")?.with_context(|| format!("no write in {line:?}"))?);
        match (value("snap")?, value("table")?, value("create")?) {
            (Some(snap), Some(table), _) => s.create.push(snap + table),
            (_, _, Some(create)) => s.create.push(create),
            _ => {}
        }
        if let Some(b) = value("blocks")? {
            s.blocks.push(b);
        }
    }
    for (name, s) in SYSTEMS.iter().zip(&all) {
        ensure!(
            s.write.len() == rounds,
            "{name}: {} of {rounds} rounds reported",
            s.write.len()
        );
    }
    Ok(all)
}

/// Per-round ratios a ÷ b.
fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

/// The report as markdown: context, then the ratios against their goals, then every figure.
fn render(r: &Report) -> String {
    let mut out = String::new();
    for (k, v) in &r.context {
        let _ = writeln!(out, "- {k}: {v}");
    }
    let _ = writeln!(
        out,
        "\nRatios, one per round: median [min–max]; met: whether the median meets the goal, \
         and in how many rounds the ratio does on its own.\n"
    );
    let _ = writeln!(out, "| ratio | median [min–max] | goal | met |");
    let _ = writeln!(out, "| --- | --- | --- | --- |");
    for c in &r.checks {
        let met = match (c.met, c.samples_met) {
            (Some(met), Some(k)) => {
                let word = if met { "yes" } else { "**no**" };
                format!("{word} ({k} of {})", c.stats.n)
            }
            _ => "—".into(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {met} |",
            c.name,
            fmt_stats_for(&c.stats, c.goal),
            c.goal.map_or("—".into(), |g| g.describe("")),
        );
    }
    let _ = writeln!(
        out,
        "\n| figure | system | median [min–max] | unit | n | note |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
    for row in &r.rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            row.name,
            row.device,
            fmt_stats(&row.stats),
            row.unit.label(),
            row.stats.n,
            row.note
        );
    }
    out
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("kernel bench: skipped (needs root for loop devices, FUSE and mounts)");
        return Ok(());
    }
    if let Err(why) = kernel::available() {
        bail!("the kernel harness cannot run here: {why}");
    }
    sys::stop_on_signals()?;
    let o = Opts::from_env()?;
    let probe = PathBuf::from(env!("CARGO_BIN_EXE_guest-probe"));
    let scratch = benches::scratch_dir(o.dir.as_deref(), "thinbox-kernel-bench.")?;
    let disks = make_disks(scratch.path(), o.size)?;
    sys::check_interrupted()?;

    let script = guest_script(&o, &disks);
    eprintln!(
        "kernel bench: booting the guest for {} rounds (software emulation; minutes)",
        o.rounds
    );
    let run = kernel::run_guest_with(
        &script,
        &[&disks.metadata, &disks.data, &disks.xfs, &disks.ext4],
        &[&probe],
        &GuestOptions {
            filesystems: true,
            disk_cache: Some("none".into()),
            memory_mib: Some(1536),
            // A 1 GiB copy-up takes tens of seconds under emulation.
            timeout_secs: Some(600 + (o.rounds + o.warmup) as u64 * (60 + 60 * (o.size >> 30))),
        },
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    if !run.ok {
        bail!("the guest failed:\n{}", run.report());
    }
    let samples = parse(&run.output, o.rounds).with_context(|| run.report())?;
    let guest_kernel = kernel::kvs(&run.output)
        .get("kernel")
        .cloned()
        .unwrap_or_default();

    let mut r = Report::new();
    r.context(
        "bench",
        "kernel: first write into a shared file, kernel dm-thin against xfs reflink and overlayfs, in a qemu guest",
    );
    r.context("commit", benches::git_commit());
    r.context(
        "machine",
        format!(
            "{} host CPUs; guest: 1 emulated CPU (qemu -accel tcg), 1536 MiB, virtio disks cache=none",
            benches::cpus()
        ),
    );
    r.context("host kernel", benches::kernel());
    r.context("guest kernel", guest_kernel);
    r.context("scratch", benches::filesystem_of(scratch.path()));
    r.context(
        "parameters",
        format!(
            "file {}, {} rounds after {} warm-up, pool block {} KiB",
            format_size(o.size),
            o.rounds,
            o.warmup,
            disks.block_sectors * SECTOR / 1024
        ),
    );
    r.context("load after", benches::loadavg());
    let group = "kernel";
    for (name, s) in SYSTEMS.iter().zip(&samples) {
        r.row(
            group,
            "4 KiB write + fsync, cold",
            name,
            Unit::Millis,
            &s.write,
            "",
        );
        if !s.create.is_empty() {
            let note = match *name {
                "kernel dm-thin ext4" | "kernel dm-thin xfs" => {
                    "create_snap + thin table load (two dmsetup runs)"
                }
                "xfs reflink" => "FICLONE + fsync",
                _ => "mount",
            };
            r.row(
                group,
                "container creation",
                name,
                Unit::Millis,
                &s.create,
                note,
            );
        }
    }
    let [thin, thin_xfs, xfs, overlay, plain] = &samples[..] else {
        unreachable!("one entry per system");
    };
    let block_bytes = (disks.block_sectors * SECTOR) as f64;
    for (name, s) in [
        ("kernel dm-thin ext4", thin),
        ("kernel dm-thin xfs", thin_xfs),
    ] {
        let added: Vec<f64> = s.blocks.iter().map(|b| b * block_bytes).collect();
        r.row(
            group,
            "pool space the write added",
            name,
            Unit::Bytes,
            &added,
            "whole pool blocks, from the pool's status",
        );
    }
    r.ratio(
        "overlayfs copy-up ÷ kernel dm-thin (times faster)",
        "overlayfs",
        &ratios(&overlay.write, &thin.write),
        None,
        Some(Goal::AtLeast(1000.0)),
    );
    r.ratio(
        "overlayfs copy-up ÷ kernel dm-thin xfs (times faster)",
        "overlayfs",
        &ratios(&overlay.write, &thin_xfs.write),
        None,
        Some(Goal::AtLeast(1000.0)),
    );
    r.ratio(
        "kernel dm-thin ÷ xfs reflink",
        "xfs reflink",
        &ratios(&thin.write, &xfs.write),
        None,
        Some(Goal::AtMost(1.0)),
    );
    r.ratio(
        "kernel dm-thin xfs ÷ xfs reflink",
        "xfs reflink",
        &ratios(&thin_xfs.write, &xfs.write),
        None,
        Some(Goal::AtMost(1.0)),
    );
    r.ratio(
        "kernel dm-thin ÷ plain",
        "plain",
        &ratios(&thin.write, &plain.write),
        None,
        None,
    );
    r.ratio(
        "kernel dm-thin xfs ÷ plain",
        "plain",
        &ratios(&thin_xfs.write, &plain.write),
        None,
        None,
    );
    r.ratio(
        "xfs reflink ÷ plain",
        "plain",
        &ratios(&xfs.write, &plain.write),
        None,
        None,
    );

    fs::create_dir_all(&o.out)?;
    let mut md = String::new();
    let _ = writeln!(md, "# First write under the kernel's dm-thin: latest run\n");
    let _ = writeln!(
        md,
        "Written by `cargo bench -p benches --bench kernel` (see benches/README.md). Everything \
         was measured inside a qemu guest under software emulation: compare the systems with \
         each other, not with the cow bench. Medians [min–max] over the rounds; ratios are per \
         round.\n"
    );
    md.push_str(&render(&r));
    fs::write(o.out.join("kernel.md"), &md)?;
    r.write_json(&o.out.join("kernel.json"))?;
    print!("{md}");
    eprintln!(
        "kernel bench: kernel dm-thin ext4 {} ms, xfs {} ms, xfs reflink {} ms, overlayfs {} ms, plain {} ms",
        fmt_stats(&Stats::of(&thin.write)),
        fmt_stats(&Stats::of(&thin_xfs.write)),
        fmt_stats(&Stats::of(&xfs.write)),
        fmt_stats(&Stats::of(&overlay.write)),
        fmt_stats(&Stats::of(&plain.write)),
    );
    Ok(())
}
