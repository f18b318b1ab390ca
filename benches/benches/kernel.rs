//! The first write into a shared file where the kernel's own dm-thin serves the thin (issue 8):
//! the path a storage host with device-mapper takes, which this machine's kernel lacks.
//!
//! The host makes the images with thinbox's engine, as the runtime would: a pool whose thin 1
//! holds ext4 (the runtime's mkfs options, its journal log trimmed) and thin 2 xfs, each with
//! one file of `BENCH_KERNEL_SIZE` random bytes; an xfs file system (reflink on) with the same
//! file; an ext4 file system with the file as an overlay lower layer and as a plain file. Then
//! one qemu guest
//! (`fixtures::kernel`, Debian's kernel under software emulation) gets them, and a copy of the
//! pool, as disks opened with O_DIRECT (`cache=none`, so a read after the guest drops its caches
//! reaches the host disk), loads the pool into dm-thin with the table `dmtool pool start
//! --backend kernel` would load, starts the pool daemon on the copy,
//! and runs interleaved rounds; in each, every system makes a fresh container and takes the
//! cow bench's probe (open, 4 KiB `pwrite`, `fsync`, close), cold:
//!
//! - `kernel dm-thin ext4`: `create_snap` of thin 1, a `thin` table loaded, ext4 mounted;
//! - `kernel dm-thin xfs`: the same on thin 2, which holds xfs (the runtime's `dm.fs=xfs`),
//!   so the block layer can be told apart from the file system on top;
//! - `thinbox daemon ext4`, `thinbox daemon xfs`: the same containers on a copy of the pool
//!   that `dmtool pool start --backend userspace` serves in the guest (FUSE file + loop, the
//!   path the cow bench's mounted systems take on this machine), made with `dmtool thin snap`
//!   and `dmtool thin activate`: the userspace path against the kernel's, in one machine;
//! - `xfs reflink`: a `FICLONE` of the file;
//! - `overlayfs`: an overlay mount on the lower layer (the open copies the whole file up);
//! - `plain`: the plain file, written in place (the floor).
//!
//! Every figure is measured inside the emulated machine, where the CPU runs many times slower
//! than the host's and the disks do not: compare the systems with each other (the ratios),
//! not with the cow bench's figures. Results go to `BENCH_OUT` (default `benches/results/`):
//! `kernel.md`, `kernel.json`, `kernel.svg`. Parameters: `BENCH_KERNEL_SIZE` (default 1G),
//! `BENCH_KERNEL_ROUNDS` (default 9, as the cow bench's first writes), `BENCH_KERNEL_WARMUP`
//! (rounds run first and not counted, default 1: the emulator translates each kernel code path
//! the first time it runs: in a 64 MiB run without one, the first round's writes took 2–2.7×
//! the second's on every copy-on-write system), `BENCH_DIR` (scratch, default /var/tmp),
//! `BENCH_DMTOOL` (the dmtool binary the guest runs; default: the one beside this bench in the
//! target directory, which `cargo build -p dmtool` of the same profile makes). Needs root (loop
//! devices, FUSE and mounts while making the images) and the kernel harness; every mount, loop
//! device and daemon it makes is undone on the way out. It never asserts a timing.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use benches::svg::{Chart, Point, Series};
use benches::sys::{self, Mount, ThinFs};
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

/// One system of the comparison.
struct System {
    /// In the tables and the JSON.
    name: &'static str,
    /// On the chart's axis.
    short: &'static str,
    /// The guest script's function that runs it, and its name in the script's output.
    tag: &'static str,
    /// The cow bench's colour for it: blue for ext4 on a thin, indigo for xfs on a thin.
    colour: &'static str,
    /// What its creation figure times, when it has one.
    creation: Option<&'static str>,
}

const KERNEL_CREATION: &str = "create_snap + thin table load (two dmsetup runs)";
const DAEMON_CREATION: &str = "dmtool thin snap + dmtool thin activate (two dmtool runs)";

/// The systems, in the order of the tables; the first four are the thins.
const SYSTEMS: [System; 7] = [
    System {
        name: "kernel dm-thin ext4",
        short: "kernel ext4",
        tag: "thin",
        colour: "#0072B2",
        creation: Some(KERNEL_CREATION),
    },
    System {
        name: "kernel dm-thin xfs",
        short: "kernel xfs",
        tag: "thinxfs",
        colour: "#332288",
        creation: Some(KERNEL_CREATION),
    },
    System {
        name: "thinbox daemon ext4",
        short: "daemon ext4",
        tag: "dthin",
        colour: "#0072B2",
        creation: Some(DAEMON_CREATION),
    },
    System {
        name: "thinbox daemon xfs",
        short: "daemon xfs",
        tag: "dthinxfs",
        colour: "#332288",
        creation: Some(DAEMON_CREATION),
    },
    System {
        name: "xfs reflink",
        short: "xfs reflink",
        tag: "xfs",
        colour: "#56B4E9",
        creation: Some("FICLONE + fsync"),
    },
    System {
        name: "overlayfs",
        short: "overlayfs",
        tag: "overlay",
        colour: "#D55E00",
        creation: Some("mount"),
    },
    System {
        name: "plain",
        short: "plain",
        tag: "plain",
        colour: "#000000",
        creation: None,
    },
];
const THINS: usize = 4;

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

/// The disks handed to the guest, in order: /dev/vda ... /dev/vdf.
struct Disks {
    metadata: PathBuf,
    data: PathBuf,
    xfs: PathBuf,
    ext4: PathBuf,
    /// The pool's copy for the daemon.
    daemon_metadata: PathBuf,
    daemon_data: PathBuf,
    /// The pool's volume store (the thins' sizes), which the guest's dmtool needs.
    volumes: String,
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

/// The pool: thin 1 with ext4 and the file, thin 2 with xfs and the file, made through the
/// pool daemon (FUSE file + loop); ext4's journal log trimmed as the runtime trims each layer
/// it writes.
fn make_pool(dir: &Path, size: u64) -> Result<(PoolPaths, PathBuf, u64, u64)> {
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
    for (origin, fs) in [(ORIGIN_EXT4, ThinFs::Ext4), (ORIGIN_XFS, ThinFs::Xfs)] {
        let origin = ThinId::new(origin).context("id")?;
        let device = client.activate(origin, false)?.device;
        let filled = (|| -> Result<()> {
            sys::run(fs.mkfs().arg(&device))?;
            let mnt = pool_dir.join("mnt");
            let _mount = Mount::new(
                Some(fs.name()),
                &device.to_string_lossy(),
                &mnt,
                fs.mount_options(),
                None,
            )?;
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
        paths,
        engine::VolumeStore::path_in(&pool_dir),
        data_bytes / block.bytes() * block.bytes() / SECTOR,
        thin_bytes / SECTOR,
    ))
}

/// A file system in a sparse file, formatted with `mkfs` and filled by `fill` through a loop
/// mount; returns the image.
fn make_fs_image(
    path: &Path,
    bytes: u64,
    mkfs: &[&str],
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let fs = sys::LoopFs::create(path, bytes, mkfs, &path.with_extension("mnt"), None)?;
    fill(fs.path())?;
    Ok(fs.into_image())
}

fn make_disks(dir: &Path, size: u64) -> Result<Disks> {
    eprintln!(
        "kernel bench: making the images ({} file)",
        format_size(size)
    );
    let (paths, store, data_sectors, thin_sectors) = make_pool(dir, size)?;
    let copy = dir.join("pool-copy");
    fs::create_dir_all(&copy)?;
    let copy_paths = PoolPaths::in_dir(&copy);
    for (from, to) in [
        (&paths.metadata, &copy_paths.metadata),
        (&paths.data, &copy_paths.data),
    ] {
        sys::run(Command::new("cp").arg("--sparse=always").arg(from).arg(to))?;
    }
    let volumes = fs::read_to_string(&store)
        .with_context(|| format!("read the volume store {}", store.display()))?;
    let xfs = make_fs_image(
        &dir.join("xfs.img"),
        size + size / 4 + 512 * MIB,
        sys::XFS_REFLINK_MKFS,
        |mnt| sys::fill_file(&mnt.join(FILE), size, 1),
    )?;
    // The lower layer, the plain file and room for one copy-up.
    let ext4 = make_fs_image(
        &dir.join("ext4.img"),
        3 * size + 512 * MIB,
        ThinFs::Ext4.mkfs_args(),
        |mnt| {
            fs::create_dir_all(mnt.join("lower"))?;
            sys::fill_file(&mnt.join("lower").join(FILE), size, 1)?;
            sys::fill_file(&mnt.join("plain"), size, 1)
        },
    )?;
    Ok(Disks {
        metadata: paths.metadata,
        data: paths.data,
        xfs,
        ext4,
        daemon_metadata: copy_paths.metadata,
        daemon_data: copy_paths.data,
        volumes,
        data_sectors,
        thin_sectors,
        block_sectors: DataBlockSize::DEFAULT.bytes() / SECTOR,
    })
}

/// The `thin-pool` table's low water mark and feature arguments, as the kernel backend loads
/// them for `options`.
fn pool_table_tail(options: &PoolOptions) -> String {
    let features = engine::activate::kernel::table_features(options);
    let mut tail = format!("{} {}", options.low_water_blocks, features.len());
    for f in features {
        tail.push(' ');
        tail.push_str(f);
    }
    tail
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
dmsetup create pool --table "0 {data} thin-pool /dev/vda /dev/vdb {block} {tail}"
dmsetup mknodes
# The copy of the pool, served by the pool daemon.
U="--metadata /dev/vde --data /dev/vdf --state-dir /tmp/daemon"
mkdir -p /tmp/daemon
cat > /tmp/daemon/volumes.json <<'VOLUMES_EOF'
{volumes}
VOLUMES_EOF
dmtool pool start --backend userspace $U
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
# daemon_container TAG ROUND OFFSET ORIGIN FSTYPE [MOUNT OPTIONS]: the same through dmtool and
# the pool daemon. `guest-probe time` prints the command's own output before its figure.
dused() {{ dmtool pool status $U | awk 'NR == 1 {{ split($6, a, "/"); print a[1] }}'; }}
daemon_container() {{
  id=$((100 + $2))
  settle
  s=$($P time dmtool thin snap $U $id $4)
  out=$($P time dmtool thin activate $U $id)
  dev=$(echo "$out" | head -n 1)
  a=$(echo "$out" | tail -n 1)
  mount -t $5 ${{6:+-o $6}} $dev /mnt/c
  cold
  u0=$(dused)
  w=$($P write /mnt/c/{file} $3)
  u1=$(dused)
  echo "$K $1 $2 write $w snap $s table $a blocks $((u1 - u0))"
  umount /mnt/c
  dmtool thin deactivate $U $id
  dmtool thin delete $U $id
}}
dthin() {{ daemon_container dthin $1 $2 {ext4} ext4; }}
dthinxfs() {{ daemon_container dthinxfs $1 $2 {xfs} xfs nouuid; }}
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
        tail = pool_table_tail(&PoolOptions::default()),
        volumes = d.volumes.trim_end(),
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
        for k in 0..SYSTEMS.len() {
            let _ = writeln!(
                s,
                "{} {round} {off}",
                SYSTEMS[(round + k) % SYSTEMS.len()].tag
            );
        }
    }
    let _ = writeln!(
        s,
        "umount /mnt/x /mnt/e\ndmsetup remove pool\ndmtool pool stop $U\necho \"KV kernel $(uname -r)\""
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
        let index = SYSTEMS
            .iter()
            .position(|s| Some(&s.tag) == words.get(1))
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
    for (i, (system, s)) in SYSTEMS.iter().zip(&all).enumerate() {
        let reported = |what: &str, n: usize| {
            ensure!(
                n == rounds,
                "{}: {n} of {rounds} rounds reported a {what}",
                system.name
            );
            Ok(())
        };
        reported("write", s.write.len())?;
        if system.creation.is_some() {
            reported("creation", s.create.len())?;
        }
        if i < THINS {
            reported("pool space", s.blocks.len())?;
        }
    }
    Ok(all)
}

/// The dmtool binary for the guest: `BENCH_DMTOOL`, or the one beside this bench in the target
/// directory.
fn dmtool_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BENCH_DMTOOL") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let beside = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("dmtool"))
        .context("the bench's own path has no target directory")?;
    ensure!(
        beside.exists(),
        "no dmtool at {} (build it with the bench's profile: cargo build --release -p dmtool, \
         or set BENCH_DMTOOL)",
        beside.display()
    );
    Ok(beside)
}

/// The first writes as a chart: a column per system, the median with [min–max] whiskers, on a
/// log scale (overlayfs's copy-up is three orders of magnitude above the rest); the daemon's
/// thins dashed.
fn chart(samples: &[Samples]) -> Chart {
    let series = SYSTEMS
        .iter()
        .zip(samples)
        .enumerate()
        .map(|(i, (system, s))| {
            let stats = Stats::of(&s.write);
            Series {
                name: system.name.to_string(),
                points: vec![Point {
                    x: (i + 1) as f64,
                    y: stats.median,
                    lo: stats.min,
                    hi: stats.max,
                }],
                colour: Some(system.colour.to_string()),
                dashed: system.name.starts_with("thinbox daemon"),
            }
        })
        .collect();
    Chart {
        title: "Cold 4 KiB write + fsync into a shared file, in a qemu guest (emulated)".into(),
        x_label: "system".into(),
        y_label: "ms (log)".into(),
        x_log: false,
        y_log: true,
        x_labels: Some(
            SYSTEMS
                .iter()
                .enumerate()
                .map(|(i, s)| ((i + 1) as f64, s.short.to_string()))
                .collect(),
        ),
        series,
    }
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
    let _ = writeln!(out);
    out.push_str(&r.rows_table());
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
    let dmtool = dmtool_bin()?;
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
        &[
            &disks.metadata,
            &disks.data,
            &disks.xfs,
            &disks.ext4,
            &disks.daemon_metadata,
            &disks.daemon_data,
        ],
        &[&probe, &dmtool],
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
        "kernel: first write into a shared file, the kernel's dm-thin and the pool daemon against xfs reflink and overlayfs, in a qemu guest",
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
    for (system, s) in SYSTEMS.iter().zip(&samples) {
        r.row(
            group,
            "4 KiB write + fsync, cold",
            system.name,
            Unit::Millis,
            &s.write,
            "",
        );
        if let Some(note) = system.creation {
            r.row(
                group,
                "container creation",
                system.name,
                Unit::Millis,
                &s.create,
                note,
            );
        }
    }
    let block_bytes = (disks.block_sectors * SECTOR) as f64;
    let thins = &SYSTEMS[..THINS];
    for (system, s) in thins.iter().zip(&samples) {
        let added: Vec<f64> = s.blocks.iter().map(|b| b * block_bytes).collect();
        r.row(
            group,
            "pool space the write added",
            system.name,
            Unit::Bytes,
            &added,
            "whole pool blocks, from the pool's status",
        );
    }
    let [kernel_ext4, kernel_xfs, daemon_ext4, daemon_xfs, xfs, overlay, plain] = &samples[..]
    else {
        unreachable!("one entry per system");
    };
    for (system, s) in thins.iter().zip(&samples) {
        r.ratio(
            &format!("overlayfs copy-up ÷ {} (times faster)", system.name),
            "overlayfs",
            &ratios(&overlay.write, &s.write),
            None,
            Some(Goal::AtLeast(1000.0)),
        );
    }
    for (system, s) in thins.iter().zip(&samples) {
        r.ratio(
            &format!("{} ÷ xfs reflink", system.name),
            "xfs reflink",
            &ratios(&s.write, &xfs.write),
            None,
            Some(Goal::AtMost(1.0)),
        );
    }
    // What the userspace path costs over the kernel's, in the same machine.
    for (fs, daemon, kernel) in [
        ("ext4", daemon_ext4, kernel_ext4),
        ("xfs", daemon_xfs, kernel_xfs),
    ] {
        r.ratio(
            &format!("thinbox daemon {fs} ÷ kernel dm-thin {fs}"),
            &format!("kernel dm-thin {fs}"),
            &ratios(&daemon.write, &kernel.write),
            None,
            None,
        );
    }
    // Every copy-on-write system but overlayfs (whose copy-up has its own ratio) against the
    // floor.
    for (system, s) in SYSTEMS.iter().zip(&samples) {
        if !matches!(system.name, "plain" | "overlayfs") {
            r.ratio(
                &format!("{} ÷ plain", system.name),
                "plain",
                &ratios(&s.write, &plain.write),
                None,
                None,
            );
        }
    }

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
    fs::write(o.out.join("kernel.svg"), chart(&samples).render())?;
    r.write_json(&o.out.join("kernel.json"))?;
    print!("{md}");
    for (system, s) in SYSTEMS.iter().zip(&samples) {
        eprintln!(
            "kernel bench: {}: {} ms",
            system.name,
            fmt_stats(&Stats::of(&s.write))
        );
    }
    Ok(())
}
