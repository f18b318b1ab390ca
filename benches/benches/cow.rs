//! Block versus file copy-on-write, side by side on one machine in one run (issue 8).
//!
//! Systems: the thinbox engine through its API (userspace, no kernel in the path), ext4 and
//! xfs (the runtime's `dm.fs` choices) on an activated thinbox thin (pool daemon: FUSE file +
//! loop), overlayfs (the runtime's overlay driver's mount), a qcow2 overlay on the image
//! (driven by an interactive `qemu-io`), reflink copies on btrfs and on xfs (each a
//! loop-mounted filesystem in a sparse file), a full copy (Docker's vfs driver) and the plain
//! file (the floor).
//!
//! Groups (`BENCH_FILTER` picks by substring): `first` (4 KiB write + fsync into a large
//! shared file, cold and warm, space), `fio` (random and sequential IO on the inherited file),
//! `snap` (snapshot / container creation against mapped origin size), `runtime` (`thinbox
//! create` as a process, devicemapper and overlay drivers), `chain` (creation and
//! reads against layer depth), `small` (untar, find, stat and edits of many small files),
//! `workload` (the user's own shell command in a container on each system, when
//! `BENCH_WORKLOAD` is set), `blocksize` (the thin pool's CoW cost and space against its
//! block size).
//!
//! Every group runs in rounds; inside a round every system runs once, in an order that
//! rotates between rounds, and ratios are taken per round (perf-anchors.md's method).
//! Results go to `BENCH_OUT` (default `benches/results/`): `cow.md`, `cow.json`, `*.svg`.
//! Needs root (mounts, loop devices, FUSE, drop_caches); every mount, loop device and
//! daemon it makes is undone on the way out, also on failure. It never asserts a timing.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use benches::svg::{Chart, Point, Series};
use benches::sys::{self, Mount, QemuIo, Remove, ThinFs};
use benches::{env_num, fmt_num, fmt_stats, fmt_stats_for, Goal, Report, Stats, Unit};
use engine::activate::daemon::{Client, Daemon, DaemonConfig, RunDir};
use engine::activate::PoolControl;
use engine::io::{BlockDevice, FileDevice, OpenMode};
use engine::store::Volumes;
use engine::{DataBlockSize, NewPool, Pool, PoolOptions, PoolPaths, Thin, ThinId};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
/// Space other sessions on the machine keep: a plan never leaves less free on the disk.
const DISK_RESERVE: u64 = 3 * GIB;

fn id(n: u64) -> ThinId {
    ThinId::new(n).expect("small thin id")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---- options ------------------------------------------------------------------------------

struct Opts {
    sizes: Vec<u64>,
    runs: usize,
    /// Rounds of the first-write group: its targets are near misses either way, which
    /// three rounds cannot tell apart (the engine API ÷ xfs median was 0.66-1.09 over four
    /// 3-round runs of the same code).
    first_runs: usize,
    fio_seconds: u64,
    fio_size: u64,
    /// Queue depths of the random fio jobs, ascending; the first is the latency one.
    fio_depths: Vec<u32>,
    snap_sizes: Vec<u64>,
    depths: Vec<usize>,
    small_files: usize,
    /// `BENCH_WORKLOAD`: the user's own workload, a shell command.
    workload: Option<String>,
    /// `BENCH_WORKLOAD_IMAGE`: the directory the workload's image holds (default: the
    /// generated source tree of the `small` group).
    workload_image: Option<PathBuf>,
    block_sizes: Vec<u64>,
    out: PathBuf,
    filter: Option<String>,
    dir: Option<PathBuf>,
}

fn env_list<T>(name: &str, default: &str, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    let text = std::env::var(name).unwrap_or_else(|_| default.to_string());
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| parse(s.trim()).unwrap_or_else(|| panic!("{name}={text}: cannot read {s:?}")))
        .collect()
}

impl Opts {
    fn from_env() -> Opts {
        let size = engine::units::parse_size;
        Opts {
            sizes: env_list("BENCH_COW_SIZES", "64M,1G,4G", size),
            runs: env_num("BENCH_RUNS", 3usize).max(1),
            first_runs: env_num("BENCH_FIRST_RUNS", 9usize).max(1),
            fio_seconds: env_num("BENCH_FIO_SECONDS", 3u64).max(1),
            fio_size: std::env::var("BENCH_FIO_SIZE")
                .ok()
                .and_then(|s| size(&s))
                .unwrap_or(GIB),
            fio_depths: {
                let mut d = env_list("BENCH_FIO_DEPTHS", "1,4,32", |s| {
                    s.parse().ok().filter(|&d: &u32| (1..=1024).contains(&d))
                });
                d.sort_unstable();
                d.dedup();
                assert!(!d.is_empty(), "BENCH_FIO_DEPTHS names no queue depth");
                d
            },
            snap_sizes: env_list("BENCH_SNAP_SIZES", "1G,8G,64G", size),
            depths: env_list("BENCH_CHAIN_DEPTHS", "1,10,25,50,100", |s| s.parse().ok()),
            small_files: env_num("BENCH_SMALL_FILES", 4000usize).max(10),
            workload: std::env::var("BENCH_WORKLOAD")
                .ok()
                .filter(|w| !w.trim().is_empty()),
            workload_image: std::env::var_os("BENCH_WORKLOAD_IMAGE").map(PathBuf::from),
            block_sizes: env_list("BENCH_BLOCK_SIZES", "64K,128K,256K,512K,1M", size),
            out: std::env::var_os("BENCH_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results")),
            filter: std::env::var("BENCH_FILTER").ok(),
            dir: std::env::var_os("BENCH_DIR").map(PathBuf::from),
        }
    }

    /// The fio jobs of this run (see [`fio_jobs`]).
    fn fio_jobs(&self) -> Vec<FioJob> {
        fio_jobs(&self.fio_depths)
    }

    fn wants(&self, group: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| group.contains(f))
    }
}

// ---- results ------------------------------------------------------------------------------

/// What the run writes: the JSON report, the markdown document, the charts.
struct Out {
    report: Report,
    md: String,
    charts: Vec<(String, Chart)>,
    /// The lines of the summary at the top.
    targets: Vec<TargetLine>,
}

impl Out {
    /// Adds `samples` to the JSON report, unless the system did not run that measurement.
    fn record(&mut self, group: &str, what: &str, system: &str, unit: Unit, samples: &[f64]) {
        if !samples.is_empty() {
            self.report.row(group, what, system, unit, samples, "");
        }
    }

    /// A table and a chart of systems against a sweep (origin sizes, chain depths): one row
    /// per system with samples, one column per `(x, label)`, `t[system][column]` in ms. JSON
    /// rows are named `"{what} {label}"` in `group` (`what` may be empty); `charted` picks
    /// the systems drawn.
    #[allow(clippy::too_many_arguments)]
    fn sweep(
        &mut self,
        mut chart: Chart,
        file: &str,
        (group, what): (&str, &str),
        columns: &[(f64, String)],
        names: &[&str],
        t: &[Vec<Vec<f64>>],
        charted: impl Fn(usize, &str) -> bool,
    ) {
        let mut headers = vec!["system"];
        headers.extend(columns.iter().map(|(_, l)| l.as_str()));
        let mut rows = Vec::new();
        for (n, &name) in names.iter().enumerate() {
            if t[n].iter().all(|v| v.is_empty()) {
                continue;
            }
            let mut row = vec![name.to_string()];
            let mut line = series(name.to_string(), Vec::new());
            for (i, (x, label)) in columns.iter().enumerate() {
                row.push(cell(&t[n][i], " ms"));
                if let Some(p) = point(*x, &t[n][i]) {
                    line.points.push(p);
                }
                let row_name = format!("{what} {label}");
                self.record(group, row_name.trim(), name, Unit::Millis, &t[n][i]);
            }
            rows.push(row);
            if charted(n, name) {
                chart.series.push(line);
            }
        }
        self.table(&headers, &rows);
        self.chart(file, chart);
    }

    fn section(&mut self, title: &str, text: &str) {
        let _ = writeln!(self.md, "\n## {title}\n\n{text}\n");
    }

    fn table(&mut self, headers: &[&str], rows: &[Vec<String>]) {
        let _ = writeln!(self.md, "| {} |", headers.join(" | "));
        let _ = writeln!(self.md, "|{}", " --- |".repeat(headers.len()));
        for r in rows {
            let _ = writeln!(self.md, "| {} |", r.join(" | "));
        }
        let _ = writeln!(self.md);
    }

    fn chart(&mut self, file: &str, chart: Chart) {
        let _ = writeln!(self.md, "![{}]({file})\n", chart.title);
        self.charts.push((file.to_string(), chart));
    }

    /// A goal on a figure, one sample per round (ratios per round, or absolute): the median
    /// decides; the table also says in how many rounds the goal held on its own.
    fn target(&mut self, what: &str, samples: &[f64], unit: &str, goal: Goal) {
        let (text, met) = match st(samples) {
            Some(s) => {
                self.report.absolute(what, samples, unit, Some(goal));
                let rounds = format!("{} of {}", goal.count_met(samples), s.n);
                (
                    format!("{}{unit}", fmt_stats_for(&s, Some(goal))),
                    Some((goal.met(s.median), rounds)),
                )
            }
            None => ("not measured".to_string(), None),
        };
        self.targets.push(TargetLine {
            what: format!("{what} (goal {})", goal.describe(unit)),
            measured: text,
            verdict: met,
        });
    }
}

/// A target as the summary shows it.
struct TargetLine {
    /// What is measured, with its goal.
    what: String,
    /// The figure: median [min–max], or why it is missing.
    measured: String,
    /// Whether the median meets the goal, and "k of n" rounds that do on their own.
    verdict: Option<(bool, String)>,
}

fn st(samples: &[f64]) -> Option<Stats> {
    (!samples.is_empty()).then(|| Stats::of(samples))
}

fn cell(samples: &[f64], unit: &str) -> String {
    st(samples).map_or("—".into(), |s| format!("{}{unit}", fmt_stats(&s)))
}

/// Per-round ratios a[i] / b[i] (rounds where both were measured).
fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .filter(|(x, y)| x.is_finite() && y.is_finite() && **y > 0.0)
        .map(|(x, y)| x / y)
        .collect()
}

fn bytes(b: f64) -> String {
    if b >= GIB as f64 {
        format!("{:.2} GiB", b / GIB as f64)
    } else if b >= MIB as f64 {
        format!("{:.1} MiB", b / MIB as f64)
    } else if b >= KIB as f64 {
        format!("{:.0} KiB", b / KIB as f64)
    } else {
        format!("{b:.0} B")
    }
}

/// A chart line with the colour its system has in every chart.
fn series(name: impl Into<String>, points: Vec<Point>) -> Series {
    let name = name.into();
    // The first entry the name contains wins: "xfs on thin" before "xfs".
    let colour = [
        ("xfs on thin", "#332288"),
        ("plain", "#000000"),
        ("full copy", "#777777"),
        ("overlay", "#D55E00"),
        ("qcow2", "#CC79A7"),
        ("btrfs", "#E69F00"),
        ("xfs", "#56B4E9"),
        ("engine", "#009E73"),
        ("thin", "#0072B2"),
        ("thinbox", "#0072B2"),
    ]
    .iter()
    .find(|(k, _)| name.contains(k))
    .map(|(_, c)| c.to_string());
    Series {
        // The same system reached another way (NBD beside a file system): dashed.
        dashed: name.contains("over NBD"),
        name,
        points,
        colour,
    }
}

fn point(x: f64, samples: &[f64]) -> Option<Point> {
    st(samples).map(|s| Point {
        x,
        y: s.median,
        lo: s.min,
        hi: s.max,
    })
}

// ---- the systems --------------------------------------------------------------------------

/// The kinds compared, in the order rows are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    FullCopy,
    Overlay,
    Qcow2,
    Btrfs,
    Xfs,
    Engine,
    Thin,
    ThinXfs,
}

impl Kind {
    const ALL: [Kind; 9] = [
        Kind::Plain,
        Kind::FullCopy,
        Kind::Overlay,
        Kind::Qcow2,
        Kind::Btrfs,
        Kind::Xfs,
        Kind::Engine,
        Kind::Thin,
        Kind::ThinXfs,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Plain => "plain file",
            Kind::FullCopy => "full copy (vfs)",
            Kind::Overlay => "overlayfs",
            Kind::Qcow2 => "qcow2",
            Kind::Btrfs => "btrfs reflink",
            Kind::Xfs => "xfs reflink",
            Kind::Engine => "thinbox engine API",
            Kind::Thin => "thinbox ext4 on thin",
            Kind::ThinXfs => "thinbox xfs on thin",
        }
    }

    /// Disk bytes the system keeps for a `size` image (transient copies are planned apart).
    fn disk(self, size: u64) -> u64 {
        match self {
            Kind::Plain => size,
            Kind::FullCopy | Kind::Overlay | Kind::Qcow2 => 0,
            Kind::Engine if size <= GIB => size,
            Kind::Engine => 0,
            Kind::Btrfs | Kind::Xfs | Kind::Thin | Kind::ThinXfs => size + size / 16 + 64 * MIB,
        }
    }
}

/// One system with an image holding a `size` file, and at most one container on it.
trait CowSystem {
    fn kind(&self) -> Kind;
    /// Makes a fresh container (snapshot, clone, overlay mount, copy) sharing the image's
    /// file; returns the time that took.
    fn create(&mut self) -> Result<Duration>;
    /// 4 KiB written at `offset` of the inherited file, then made durable, timed.
    fn write(&mut self, offset: u64, byte: u8) -> Result<Duration>;
    /// Host bytes the container added since `create` began.
    fn space(&mut self) -> Result<u64>;
    /// The inherited file inside the container, when the system has a file system.
    fn path(&self) -> Option<PathBuf>;
    /// How fio reaches the container: the file at [`CowSystem::path`], and for systems
    /// without a kernel file system (and the plain file, their baseline) the container's
    /// disk exported over NBD.
    fn transports(&self) -> &'static [Transport] {
        &[Transport::File]
    }
    /// Serves the container's disk over NBD on `socket` until the export is dropped.
    fn serve_nbd(&mut self, _socket: &Path) -> Result<NbdExport> {
        bail!("{} is not served over NBD", self.kind().name())
    }
    fn destroy(&mut self) -> Result<()>;
}

/// How fio reaches a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    /// The inherited file through the container's file system (`--direct=1`).
    File,
    /// The container's disk through an NBD server (fio's nbd engine, libnbd).
    Nbd,
}

/// A container's disk served over NBD: the server stops when this is dropped.
enum NbdExport {
    Qemu(sys::QemuNbd),
    /// The engine's own server in this process; its connections end with fio's.
    Engine {
        uri: String,
        _listener: engine::activate::nbd::NbdListener,
    },
}

impl NbdExport {
    fn uri(&self) -> String {
        match self {
            NbdExport::Qemu(q) => q.uri(),
            NbdExport::Engine { uri, .. } => uri.clone(),
        }
    }
}

struct PlainSys {
    file: PathBuf,
}

impl CowSystem for PlainSys {
    fn kind(&self) -> Kind {
        Kind::Plain
    }
    fn create(&mut self) -> Result<Duration> {
        Ok(Duration::ZERO)
    }
    fn write(&mut self, offset: u64, byte: u8) -> Result<Duration> {
        sys::write4k_fsync(&self.file, offset, byte)
    }
    fn space(&mut self) -> Result<u64> {
        Ok(0)
    }
    fn path(&self) -> Option<PathBuf> {
        Some(self.file.clone())
    }
    fn transports(&self) -> &'static [Transport] {
        &[Transport::File, Transport::Nbd]
    }
    fn serve_nbd(&mut self, socket: &Path) -> Result<NbdExport> {
        Ok(NbdExport::Qemu(sys::QemuNbd::start(
            &self.file, "raw", socket,
        )?))
    }
    fn destroy(&mut self) -> Result<()> {
        Ok(())
    }
}

struct FullCopySys {
    src: PathBuf,
    copy: PathBuf,
}

impl CowSystem for FullCopySys {
    fn kind(&self) -> Kind {
        Kind::FullCopy
    }
    fn create(&mut self) -> Result<Duration> {
        let start = Instant::now();
        sys::run(
            Command::new("cp")
                .arg("--reflink=never")
                .arg(&self.src)
                .arg(&self.copy),
        )?;
        fs::File::open(&self.copy)?.sync_all()?;
        Ok(start.elapsed())
    }
    fn write(&mut self, offset: u64, byte: u8) -> Result<Duration> {
        sys::write4k_fsync(&self.copy, offset, byte)
    }
    fn space(&mut self) -> Result<u64> {
        Ok(sys::allocated(&self.copy))
    }
    fn path(&self) -> Option<PathBuf> {
        Some(self.copy.clone())
    }
    fn destroy(&mut self) -> Result<()> {
        fs::remove_file(&self.copy)?;
        Ok(())
    }
}

/// An overlay mount over `lower` with a fresh upper and work directory per container,
/// mounted as the runtime's overlay driver mounts a container.
struct OverlaySys {
    lower: PathBuf,
    run: PathBuf,
    file: String,
    mount: Option<Mount>,
}

impl OverlaySys {
    fn merged(&self) -> PathBuf {
        self.run.join("merged")
    }
    fn mount_fresh(&mut self) -> Result<Duration> {
        let (upper, work) = (self.run.join("upper"), self.run.join("work"));
        fs::create_dir_all(&upper)?;
        fs::create_dir_all(&work)?;
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.lower.display(),
            upper.display(),
            work.display()
        );
        let start = Instant::now();
        self.mount = Some(Mount::new(
            Some("overlay"),
            "overlay",
            &self.merged(),
            Some(&options),
            None,
        )?);
        Ok(start.elapsed())
    }
}

impl CowSystem for OverlaySys {
    fn kind(&self) -> Kind {
        Kind::Overlay
    }
    fn create(&mut self) -> Result<Duration> {
        self.mount_fresh()
    }
    fn write(&mut self, offset: u64, byte: u8) -> Result<Duration> {
        sys::write4k_fsync(&self.merged().join(&self.file), offset, byte)
    }
    fn space(&mut self) -> Result<u64> {
        Ok(sys::allocated(&self.run.join("upper")))
    }
    fn path(&self) -> Option<PathBuf> {
        Some(self.merged().join(&self.file))
    }
    fn destroy(&mut self) -> Result<()> {
        self.mount = None;
        fs::remove_dir_all(&self.run)?;
        Ok(())
    }
}

impl Drop for OverlaySys {
    fn drop(&mut self) {
        self.mount = None;
        let _ = fs::remove_dir_all(&self.run);
    }
}

/// A qcow2 overlay (64 KiB clusters) whose backing file is the image's raw file: first
/// writes through an interactive `qemu-io -t none`, fio through `qemu-nbd`.
struct Qcow2Sys {
    backing: PathBuf,
    overlay: PathBuf,
    io: Option<QemuIo>,
}

impl CowSystem for Qcow2Sys {
    fn kind(&self) -> Kind {
        Kind::Qcow2
    }
    fn create(&mut self) -> Result<Duration> {
        let start = Instant::now();
        sys::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw"])
                .arg("-b")
                .arg(&self.backing)
                .args(["-o", "cluster_size=65536"])
                .arg(&self.overlay),
        )?;
        self.io = Some(QemuIo::open(&self.overlay)?);
        Ok(start.elapsed())
    }
    fn write(&mut self, offset: u64, byte: u8) -> Result<Duration> {
        self.io
            .as_mut()
            .context("no qcow2 container")?
            .write4k_flush(offset, byte)
    }
    fn space(&mut self) -> Result<u64> {
        Ok(sys::allocated(&self.overlay))
    }
    fn path(&self) -> Option<PathBuf> {
        None
    }
    fn transports(&self) -> &'static [Transport] {
        &[Transport::Nbd]
    }
    fn serve_nbd(&mut self, socket: &Path) -> Result<NbdExport> {
        // qemu-io holds the image's lock: qemu-nbd opens it once qemu-io is gone.
        self.io = None;
        Ok(NbdExport::Qemu(sys::QemuNbd::start(
            &self.overlay,
            "qcow2",
            socket,
        )?))
    }
    fn destroy(&mut self) -> Result<()> {
        self.io = None;
        fs::remove_file(&self.overlay)?;
        Ok(())
    }
}

/// The name and mkfs command of a reflink-capable file system: btrfs, or xfs with reflinks.
fn reflink_mkfs(kind: Kind) -> (&'static str, &'static [&'static str]) {
    match kind {
        Kind::Btrfs => ("btrfs", &["mkfs.btrfs", "-f", "-q"]),
        _ => ("xfs", sys::XFS_REFLINK_MKFS),
    }
}

/// A reflink-capable file system on its own loop device; a container is
/// `cp --reflink=always` of the image file, synced.
struct ReflinkSys {
    kind: Kind,
    fs: sys::LoopFs,
    src: PathBuf,
    clone: PathBuf,
    used0: u64,
}

impl ReflinkSys {
    fn new(kind: Kind, dir: &Path, size: u64, seed: u64) -> Result<ReflinkSys> {
        let (tag, mkfs) = reflink_mkfs(kind);
        let image_size = (size * 2 + 2 * GIB).max(4 * GIB);
        let options = (kind == Kind::Btrfs).then_some("discard=async");
        let fs = sys::LoopFs::create(
            &dir.join(format!("{tag}.img")),
            image_size,
            mkfs,
            &dir.join(format!("mnt-{tag}")),
            options,
        )?;
        let src = fs.path().join("image");
        sys::fill_file(&src, size, seed)?;
        let clone = fs.path().join("container");
        Ok(ReflinkSys {
            kind,
            fs,
            src,
            clone,
            used0: 0,
        })
    }
}

impl CowSystem for ReflinkSys {
    fn kind(&self) -> Kind {
        self.kind
    }
    fn create(&mut self) -> Result<Duration> {
        sys::syncfs(self.fs.path());
        self.used0 = sys::fs_used(self.fs.path())?;
        let start = Instant::now();
        sys::run(
            Command::new("cp")
                .arg("--reflink=always")
                .arg(&self.src)
                .arg(&self.clone),
        )?;
        sys::syncfs(self.fs.path());
        Ok(start.elapsed())
    }
    fn write(&mut self, offset: u64, byte: u8) -> Result<Duration> {
        sys::write4k_fsync(&self.clone, offset, byte)
    }
    fn space(&mut self) -> Result<u64> {
        sys::syncfs(self.fs.path());
        Ok(sys::fs_used(self.fs.path())?.saturating_sub(self.used0))
    }
    fn path(&self) -> Option<PathBuf> {
        Some(self.clone.clone())
    }
    fn destroy(&mut self) -> Result<()> {
        fs::remove_file(&self.clone)?;
        sys::syncfs(self.fs.path());
        Ok(())
    }
}

/// The engine in this process: a pool on two sparse files, thin 1 the image (the file's
/// bytes at the same offsets), a container = `create_snap` + `commit`. After the snapshot
/// the pool is closed and opened again, so its node cache starts cold like a mount's.
struct EngineSys {
    meta: PathBuf,
    data: PathBuf,
    pool: Option<Arc<Pool>>,
    thin: Option<Thin>,
    size: u64,
    used0: (u64, u64),
    block: u64,
    _files: [Remove; 2],
}

const ORIGIN: u64 = 1;
const SNAP: u64 = 2;

fn open_pool(meta: &Path, data: &Path) -> Result<Arc<Pool>> {
    let m: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(meta, OpenMode::ReadWrite)?);
    let d: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(data, OpenMode::ReadWrite)?);
    Ok(Pool::open(m, d, PoolOptions::default())?)
}

impl EngineSys {
    /// `probes`: offsets whose blocks get real data when the image is not filled entirely
    /// (images over 1 GiB are mapped on a null device first, to spare the disk: every
    /// block is mapped, the probed ones hold real bytes, the rest read as zeros).
    fn new(
        dir: &Path,
        tag: &str,
        size: u64,
        block: DataBlockSize,
        seed: u64,
        probes: &[u64],
    ) -> Result<EngineSys> {
        let meta = dir.join(format!("engine-{tag}-meta"));
        let data = dir.join(format!("engine-{tag}-data"));
        let files = [Remove(meta.clone()), Remove(data.clone())];
        let data_size = size * 2 + 256 * MIB;
        let bs = block.bytes();
        let full = size <= GIB;
        {
            let m: Arc<dyn BlockDevice> =
                Arc::new(FileDevice::create(&meta, 256 * MIB + data_size / 128)?);
            let d: Arc<dyn BlockDevice> = if full {
                Arc::new(FileDevice::create(&data, data_size)?)
            } else {
                Arc::new(benches::NullDevice::new(data_size))
            };
            let pool = Pool::format(m, d, block, PoolOptions::default())?;
            pool.create_thin(id(ORIGIN))?;
            let thin = pool.open_thin(id(ORIGIN))?;
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut buf = vec![0u8; MIB as usize];
            let mut off = 0;
            while off < size {
                if full {
                    rng.fill_bytes(&mut buf);
                }
                thin.write(&buf, off)?;
                off += MIB;
            }
            pool.commit()?;
        }
        if !full {
            FileDevice::create(&data, data_size)?;
        }
        let pool = open_pool(&meta, &data)?;
        if !full {
            let thin = pool.open_thin(id(ORIGIN))?;
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut buf = vec![0u8; bs as usize];
            for &p in probes {
                rng.fill_bytes(&mut buf);
                thin.write(&buf, p / bs * bs)?;
            }
            drop(thin);
        }
        pool.commit()?;
        Ok(EngineSys {
            meta,
            data,
            pool: Some(pool),
            thin: None,
            size,
            used0: (0, 0),
            block: bs,
            _files: files,
        })
    }

    fn pool(&self) -> Result<&Arc<Pool>> {
        self.pool.as_ref().context("pool not open")
    }

    fn thin(&mut self) -> Result<&Thin> {
        if self.thin.is_none() {
            self.thin = Some(self.pool()?.open_thin(id(SNAP))?);
        }
        Ok(self.thin.as_ref().expect("opened"))
    }

    fn used(&self) -> Result<(u64, u64)> {
        let s = self.pool()?.status();
        Ok((s.used_data_blocks, s.used_metadata_blocks))
    }
}

impl CowSystem for EngineSys {
    fn kind(&self) -> Kind {
        Kind::Engine
    }
    fn create(&mut self) -> Result<Duration> {
        self.used0 = self.used()?;
        let pool = self.pool()?.clone();
        let start = Instant::now();
        pool.create_snap(id(SNAP), id(ORIGIN))?;
        pool.commit()?;
        let took = start.elapsed();
        drop(pool);
        self.pool = None;
        self.pool = Some(open_pool(&self.meta, &self.data)?);
        Ok(took)
    }
    fn write(&mut self, offset: u64, byte: u8) -> Result<Duration> {
        let buf = [byte; 4096];
        let start = Instant::now();
        let thin = self.thin()?;
        thin.write(&buf, offset)?;
        thin.flush()?;
        Ok(start.elapsed())
    }
    fn space(&mut self) -> Result<u64> {
        let (d, m) = self.used()?;
        Ok(d.saturating_sub(self.used0.0) * self.block + m.saturating_sub(self.used0.1) * 4096)
    }
    fn path(&self) -> Option<PathBuf> {
        None
    }
    fn transports(&self) -> &'static [Transport] {
        &[Transport::Nbd]
    }
    fn serve_nbd(&mut self, socket: &Path) -> Result<NbdExport> {
        use engine::activate::nbd::{Export, Listen, NbdListener, Server};
        let export = Export {
            id: id(SNAP),
            alias: None,
            size: self.size,
            read_only: false,
        };
        let server = Arc::new(Server::new(self.pool()?.clone(), vec![export]));
        let listener = NbdListener::start(server, &Listen::Unix(socket.to_path_buf()))?;
        Ok(NbdExport::Engine {
            uri: sys::nbd_unix_uri(socket, &SNAP.to_string()),
            _listener: listener,
        })
    }
    fn destroy(&mut self) -> Result<()> {
        self.thin = None;
        let pool = self.pool()?;
        // An NBD connection closes its thin when it sees the client's end of file, a moment
        // after fio exits.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match pool.delete(id(SNAP)) {
                Err(engine::Error::ThinBusy(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                r => break r?,
            }
        }
        pool.commit()?;
        Ok(())
    }
}

/// A pool served by the pool daemon (in this process) with thin 1 formatted with `fs`; a
/// container is a snapshot of thin 1, activated (FUSE file + loop) and mounted.
struct ThinSys {
    fs: ThinFs,
    daemon: Option<Arc<Daemon>>,
    client: Client,
    mnt: PathBuf,
    mount: Option<Mount>,
    file: String,
    used0: (u64, u64),
    block: u64,
    active: Vec<ThinId>,
    _dir: Remove,
}

/// Deactivates `thin`, waiting for the kernel to let go of the loop device.
fn deactivate(client: &mut Client, thin: ThinId) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.deactivate(thin, false) {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(e.into()),
        }
    }
}

impl ThinSys {
    /// `populate` fills the image's file system (mounted at the path it is given).
    fn new(
        fs: ThinFs,
        dir: &Path,
        tag: &str,
        device_size: u64,
        block: DataBlockSize,
        file: &str,
        populate: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<ThinSys> {
        let pool_dir = dir.join(format!("thin-{tag}"));
        fs::create_dir_all(&pool_dir)?;
        let guard = Remove(pool_dir.clone());
        let paths = PoolPaths::in_dir(&pool_dir);
        let store = engine::VolumeStore::path_in(&pool_dir);
        {
            let mut volumes = Volumes::create(
                &paths,
                &store,
                NewPool::new(device_size * 3, 512 * MIB, block),
                PoolOptions::default(),
            )?;
            volumes.create_thin(id(ORIGIN), device_size, None)?;
            volumes.pool().commit()?;
        }
        let run_dir = RunDir::new(pool_dir.join("run"));
        let daemon = Daemon::start(DaemonConfig {
            paths,
            store_path: store,
            run_dir: run_dir.clone(),
            options: PoolOptions::default(),
            fuse_workers: engine::activate::fuse::ExportOptions::default().workers,
        })?;
        let client = match Client::connect(&run_dir.socket()) {
            Ok(Some(c)) => c,
            other => {
                let _ = daemon.shutdown();
                bail!("the pool daemon does not answer: {:?}", other.err());
            }
        };
        let mut me = ThinSys {
            fs,
            daemon: Some(daemon),
            client,
            mnt: pool_dir.join("mnt"),
            mount: None,
            file: file.to_string(),
            used0: (0, 0),
            block: block.bytes(),
            active: Vec::new(),
            _dir: guard,
        };
        let device = me.activate(id(ORIGIN))?;
        sys::run(fs.mkfs().arg(&device))?;
        me.mount_on(&device)?;
        populate(&me.mnt)?;
        me.mount = None;
        me.deactivate(id(ORIGIN))?;
        if fs == ThinFs::Ext4 {
            // As the runtime does with every layer it writes.
            let trim = engine::journal::trim_ext4_journal(&mut me.client, id(ORIGIN))?;
            eprintln!("  {tag}: the image's journal log: {trim:?}");
        }
        Ok(me)
    }

    fn mount_on(&mut self, device: &Path) -> Result<()> {
        self.mount = Some(Mount::new(
            None,
            &device.to_string_lossy(),
            &self.mnt,
            self.fs.mount_options(),
            None,
        )?);
        Ok(())
    }

    fn activate(&mut self, thin: ThinId) -> Result<PathBuf> {
        let a = self.client.activate(thin, false)?;
        self.active.push(thin);
        Ok(a.device)
    }

    fn deactivate(&mut self, thin: ThinId) -> Result<()> {
        deactivate(&mut self.client, thin)?;
        self.active.retain(|t| *t != thin);
        Ok(())
    }

    fn used(&mut self) -> Result<(u64, u64)> {
        let s = self.client.status()?.status;
        Ok((s.used_data_blocks, s.used_metadata_blocks))
    }

    fn root(&self) -> &Path {
        &self.mnt
    }
}

impl CowSystem for ThinSys {
    fn kind(&self) -> Kind {
        match self.fs {
            ThinFs::Ext4 => Kind::Thin,
            ThinFs::Xfs => Kind::ThinXfs,
        }
    }
    fn create(&mut self) -> Result<Duration> {
        self.used0 = self.used()?;
        let start = Instant::now();
        self.client.create_snap(id(SNAP), id(ORIGIN), None)?;
        if self.fs == ThinFs::Ext4 {
            // As the runtime does with every container.
            engine::journal::own_ext4_journal_superblock(&mut self.client, id(SNAP))?;
        }
        let device = self.activate(id(SNAP))?;
        self.mount_on(&device)?;
        Ok(start.elapsed())
    }
    fn write(&mut self, offset: u64, byte: u8) -> Result<Duration> {
        sys::write4k_fsync(&self.mnt.join(&self.file), offset, byte)
    }
    fn space(&mut self) -> Result<u64> {
        sys::syncfs(&self.mnt);
        let (d, m) = self.used()?;
        Ok(d.saturating_sub(self.used0.0) * self.block + m.saturating_sub(self.used0.1) * 4096)
    }
    fn path(&self) -> Option<PathBuf> {
        Some(self.mnt.join(&self.file))
    }
    fn destroy(&mut self) -> Result<()> {
        self.mount = None;
        self.deactivate(id(SNAP))?;
        self.client.delete(id(SNAP))?;
        Ok(())
    }
}

impl Drop for ThinSys {
    fn drop(&mut self) {
        self.mount = None;
        for thin in std::mem::take(&mut self.active) {
            if let Err(e) = deactivate(&mut self.client, thin) {
                eprintln!("cow bench: failed to deactivate thin {thin}: {e:#}");
            }
        }
        if let Some(d) = self.daemon.take() {
            if let Err(e) = d.shutdown() {
                eprintln!("cow bench: the pool daemon did not stop cleanly: {e:#}");
            }
        }
    }
}

// ---- planning the disk --------------------------------------------------------------------

/// Splits the systems into groups that fit on the disk at once; each group starts with the
/// plain file (the baseline every ratio needs). Systems that fit nowhere are returned apart.
fn plan(kinds: &[Kind], size: u64, free: u64) -> (Vec<Vec<Kind>>, Vec<Kind>) {
    let budget = free.saturating_sub(DISK_RESERVE);
    // Transient copies (overlay copy-up, full copy) exist one at a time: one `size` spare.
    let base = Kind::Plain.disk(size) + size;
    let mut groups: Vec<(u64, Vec<Kind>)> = Vec::new();
    let mut skipped = Vec::new();
    for &k in kinds.iter().filter(|k| **k != Kind::Plain) {
        let need = k.disk(size);
        if base + need > budget {
            skipped.push(k);
            continue;
        }
        match groups.iter_mut().find(|(used, _)| used + need <= budget) {
            Some((used, g)) => {
                *used += need;
                g.push(k);
            }
            None => groups.push((base + need, vec![Kind::Plain, k])),
        }
    }
    if groups.is_empty() && base <= budget {
        groups.push((base, vec![Kind::Plain]));
    }
    (groups.into_iter().map(|(_, g)| g).collect(), skipped)
}

// ---- fio ------------------------------------------------------------------------------------

struct FioJob {
    name: String,
    write: bool,
    random: bool,
    bs: u64,
    depth: u32,
}

/// 4 KiB random reads, then 4 KiB random writes, at each queue depth; then 1 MiB sequential
/// writes and reads at qd1.
fn fio_jobs(depths: &[u32]) -> Vec<FioJob> {
    let random = |write: bool, depth: u32| FioJob {
        name: format!("rand{} 4k qd{depth}", if write { "write" } else { "read" }),
        write,
        random: true,
        bs: 4096,
        depth,
    };
    let sequential = |write: bool| FioJob {
        name: format!("seq{} 1M qd1", if write { "write" } else { "read" }),
        write,
        random: false,
        bs: MIB,
        depth: 1,
    };
    let mut jobs: Vec<FioJob> = depths.iter().map(|&d| random(false, d)).collect();
    jobs.extend(depths.iter().map(|&d| random(true, d)));
    jobs.push(sequential(true));
    jobs.push(sequential(false));
    jobs
}

impl FioJob {
    fn unit(&self) -> &'static str {
        if self.bs >= MIB {
            "MiB/s"
        } else {
            "IOPS"
        }
    }
}

/// Where fio runs a job: a file (psync at qd1, io_uring above, `--direct=1`) or an NBD URI
/// (fio's nbd engine, requests pipelined up to the queue depth).
enum FioTarget<'a> {
    File(&'a Path),
    Nbd(&'a str),
}

fn fio(target: FioTarget<'_>, size: u64, job: &FioJob, seconds: u64) -> Result<f64> {
    let rw = match (job.write, job.random) {
        (true, true) => "randwrite",
        (true, false) => "write",
        (false, true) => "randread",
        (false, false) => "read",
    };
    let mut cmd = Command::new("fio");
    cmd.arg("--name=cow");
    match target {
        FioTarget::File(file) => {
            let engine = if job.depth > 1 { "io_uring" } else { "psync" };
            cmd.arg(format!("--filename={}", file.display()))
                .arg(format!("--ioengine={engine}"))
                .arg("--direct=1");
        }
        FioTarget::Nbd(uri) => {
            cmd.arg("--ioengine=nbd").arg(format!("--uri={uri}"));
        }
    }
    let out = sys::run(
        cmd.arg(format!("--size={size}"))
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={}", job.bs))
            .arg(format!("--iodepth={}", job.depth))
            .args([
                "--randrepeat=0",
                "--refill_buffers",
                "--time_based",
                "--output-format=json",
            ])
            .arg(format!("--runtime={seconds}")),
    )?;
    let json = &out[out.find('{').context("fio printed no JSON")?..];
    let v: serde_json::Value = serde_json::from_str(json)?;
    let d = &v["jobs"][0][if job.write { "write" } else { "read" }];
    Ok(if job.bs >= MIB {
        d["bw_bytes"].as_f64().unwrap_or(0.0) / MIB as f64
    } else {
        d["iops"].as_f64().unwrap_or(0.0)
    })
}

// ---- group: first write into a shared file -------------------------------------------------

struct FirstWrite {
    kinds: Vec<Kind>,
    create: Vec<Vec<f64>>,
    cold: Vec<Vec<f64>>,
    warm: Vec<Vec<f64>>,
    space: Vec<Vec<f64>>,
    /// The plain file's cold figures of the same group, round by round.
    base: Vec<Vec<f64>>,
    /// The cold write's open, pwrite and fsync + close, where the write is a file's.
    parts: Vec<[Vec<f64>; 3]>,
    /// The disk group (1, 2, …) each row was measured in.
    group: Vec<usize>,
    /// Milliseconds waited for the disk to settle before each container creation.
    settled_create: Vec<f64>,
    /// Milliseconds waited for the disk to settle before each cold write.
    settled: Vec<f64>,
    /// The settle probe's quiet flush latency (ms), its yardstick with `quiet_read`.
    quiet_flush: f64,
    /// The settle probe's quiet read latency (ms).
    quiet_read: f64,
}

/// The first-write figures per image size, and the fio figures when that group ran.
type Measured = (Vec<(u64, FirstWrite)>, Option<FioResults>);

struct FioResults {
    /// One row per system and transport.
    rows: Vec<(Kind, Transport)>,
    /// [job][system] → samples per round
    values: Vec<Vec<Vec<f64>>>,
    space: Vec<Vec<f64>>,
}

fn build_systems(
    kinds: &[Kind],
    dir: &Path,
    size: u64,
    image: &Path,
    probes: &[u64],
) -> Result<Vec<Box<dyn CowSystem>>> {
    let mut out: Vec<Box<dyn CowSystem>> = Vec::new();
    for &k in kinds {
        let t = Instant::now();
        eprintln!(
            "  setting up {} ({})",
            k.name(),
            engine::units::format_size(size)
        );
        let s: Box<dyn CowSystem> = match k {
            Kind::Plain => Box::new(PlainSys {
                file: image.to_path_buf(),
            }),
            Kind::FullCopy => Box::new(FullCopySys {
                src: image.to_path_buf(),
                copy: dir.join("vfs-copy"),
            }),
            Kind::Overlay => Box::new(OverlaySys {
                lower: image.parent().expect("in a dir").to_path_buf(),
                run: dir.join("ovl"),
                file: image.file_name().expect("a file").to_string_lossy().into(),
                mount: None,
            }),
            Kind::Qcow2 => Box::new(Qcow2Sys {
                backing: image.to_path_buf(),
                overlay: dir.join("container.qcow2"),
                io: None,
            }),
            Kind::Btrfs | Kind::Xfs => Box::new(ReflinkSys::new(k, dir, size, 11)?),
            Kind::Engine => Box::new(EngineSys::new(
                dir,
                "fw",
                size,
                DataBlockSize::DEFAULT,
                12,
                probes,
            )?),
            Kind::Thin | Kind::ThinXfs => {
                let dev = size + size / 16 + 256 * MIB;
                // Each its own pool (the tag names its directory).
                let (fs, tag) = if k == Kind::Thin {
                    (ThinFs::Ext4, "fw")
                } else {
                    (ThinFs::Xfs, "fw-xfs")
                };
                Box::new(ThinSys::new(
                    fs,
                    dir,
                    tag,
                    dev,
                    DataBlockSize::DEFAULT,
                    "image",
                    |root| sys::fill_file(&root.join("image"), size, 13),
                )?)
            }
        };
        eprintln!("    ready in {:.1} s", t.elapsed().as_secs_f64());
        out.push(s);
    }
    Ok(out)
}

/// How long a cold write waits at most for the disk to settle (see `sys::DiskSettle`).
const SETTLE_LIMIT: Duration = Duration::from_secs(30);

fn first_and_fio(o: &Opts, out: &mut Out, dir: &Path) -> Result<Measured> {
    let mut firsts = Vec::new();
    let mut fio_res: Option<FioResults> = None;
    let have_fio = sys::have("fio");
    let mut available: Vec<Kind> = Kind::ALL.to_vec();
    if !sys::have("qemu-img") || !sys::have("qemu-io") {
        available.retain(|k| *k != Kind::Qcow2);
        out.section(
            "qcow2 skipped",
            "qemu-img/qemu-io are not installed (scripts/setup.sh).",
        );
    }
    if !sys::have("mkfs.btrfs") {
        available.retain(|k| *k != Kind::Btrfs);
        out.section(
            "btrfs skipped",
            "mkfs.btrfs is not installed (btrfs-progs).",
        );
    }
    // Measured now, before any system has written anything.
    let mut settle = sys::DiskSettle::new(dir)?;
    let mut sizes = o.sizes.clone();
    let run_fio = o.wants("fio") && have_fio;
    if run_fio && !sizes.contains(&o.fio_size) {
        sizes.push(o.fio_size);
    }
    for &size in &sizes {
        let measure_first = o.wants("first") && o.sizes.contains(&size);
        let measure_fio = run_fio && size == o.fio_size;
        if !measure_first && !measure_fio {
            continue;
        }
        let free = sys::fs_free(dir)?;
        let (groups, skipped) = plan(&available, size, free);
        if !skipped.is_empty() {
            let names: Vec<&str> = skipped.iter().map(|k| k.name()).collect();
            let _ = writeln!(
                out.md,
                "\n*{}: skipped {} (not enough free disk: {} free)*\n",
                engine::units::format_size(size),
                names.join(", "),
                bytes(free as f64)
            );
        }
        let probe_a = size / 2 + 8 * KIB;
        let probe_b = size / 2 + size / 4 + 8 * KIB;
        let mut fw = FirstWrite {
            kinds: Vec::new(),
            create: Vec::new(),
            cold: Vec::new(),
            warm: Vec::new(),
            space: Vec::new(),
            base: Vec::new(),
            parts: Vec::new(),
            group: Vec::new(),
            settled_create: Vec::new(),
            settled: Vec::new(),
            quiet_flush: ms(settle.quiet()),
            quiet_read: ms(settle.quiet_read()),
        };
        let mut fr = FioResults {
            rows: Vec::new(),
            values: vec![Vec::new(); o.fio_jobs().len()],
            space: Vec::new(),
        };
        for (gi, group) in groups.iter().enumerate() {
            eprintln!(
                "first write, {}: group {} of {}: {:?}",
                engine::units::format_size(size),
                gi + 1,
                groups.len(),
                group
            );
            let gdir = dir.join(format!("fw-{size}-{gi}"));
            fs::create_dir_all(gdir.join("lower"))?;
            let _gdir = Remove(gdir.clone());
            let image = gdir.join("lower").join("image");
            sys::fill_file(&image, size, 10)?;
            let mut systems = build_systems(group, &gdir, size, &image, &[probe_a, probe_b])?;
            let n = systems.len();
            // A group after the first repeats the plain file; its rows are kept apart.
            let first_group = gi == 0;
            let offset = fw.kinds.len();
            for &k in group.iter() {
                if k == Kind::Plain && !first_group {
                    continue;
                }
                fw.kinds.push(k);
                fw.create.push(Vec::new());
                fw.cold.push(Vec::new());
                fw.warm.push(Vec::new());
                fw.space.push(Vec::new());
                fw.base.push(Vec::new());
                fw.parts.push(Default::default());
                fw.group.push(gi + 1);
            }
            let slot = |i: usize| -> Option<usize> {
                if i == 0 {
                    first_group.then_some(0)
                } else {
                    Some(offset + i - usize::from(!first_group))
                }
            };
            // Per-round plain figures of this group, for ratios of its other systems.
            let mut plain_cold = Vec::new();
            if measure_first {
                for round in 0..o.first_runs {
                    sys::check_interrupted()?;
                    for i in rotation(round, n) {
                        sys::check_interrupted()?;
                        let s = &mut systems[i];
                        // The previous system's teardown (gigabytes deleted) must not
                        // land in this one's timed creation either.
                        let settled_create = ms(settle.wait(SETTLE_LIMIT)?);
                        fw.settled_create.push(settled_create);
                        let c = s.create()?;
                        sys::drop_caches()?;
                        let settled = ms(settle.wait(SETTLE_LIMIT)?);
                        fw.settled.push(settled);
                        sys::take_write_parts();
                        let cold = s.write(probe_a, 0xa0u8.wrapping_add(round as u8))?;
                        let parts = sys::take_write_parts();
                        let warm = s.write(probe_b, 0xb0u8.wrapping_add(round as u8))?;
                        let space = s.space()?;
                        s.destroy()?;
                        eprintln!(
                            "  round {round} {:<22} create {:>9.3} ms  cold {:>10.3} ms  warm {:>8.3} ms  space {}  (settle waits {:.0} + {:.0} ms)",
                            s.kind().name(),
                            ms(c),
                            ms(cold),
                            ms(warm),
                            bytes(space as f64),
                            settled_create,
                            settled
                        );
                        if i == 0 {
                            plain_cold.push(ms(cold));
                        }
                        if let Some(j) = slot(i) {
                            if let Some(p) = parts {
                                for (v, d) in fw.parts[j].iter_mut().zip(p) {
                                    v.push(ms(d));
                                }
                            }
                            fw.create[j].push(ms(c));
                            fw.cold[j].push(ms(cold));
                            fw.warm[j].push(ms(warm));
                            fw.space[j].push(space as f64);
                        }
                    }
                }
                if !first_group {
                    // Keep this group's plain file, shown apart.
                    fw.kinds.push(Kind::Plain);
                    fw.create.push(vec![0.0; plain_cold.len()]);
                    fw.cold.push(plain_cold.clone());
                    fw.warm.push(Vec::new());
                    fw.space.push(Vec::new());
                    fw.base.push(Vec::new());
                    fw.parts.push(Default::default());
                    fw.group.push(gi + 1);
                }
                // Every system's ratios are against the plain file of its own group.
                for b in fw.base.iter_mut().skip(offset) {
                    *b = plain_cold.clone();
                }
            }
            if measure_fio {
                fio_group(o, &mut systems, &gdir, size, group, first_group, &mut fr)?;
            }
            drop(systems);
        }
        if measure_first {
            firsts.push((size, fw));
        }
        if measure_fio {
            fio_res = Some(fr);
        }
    }
    Ok((firsts, fio_res))
}

/// The job after which the host bytes a container added are measured: random writes at the
/// lowest queue depth.
fn is_space_job(o: &Opts, job: &FioJob) -> bool {
    job.write && job.random && job.depth == o.fio_depths[0]
}

fn fio_group(
    o: &Opts,
    systems: &mut [Box<dyn CowSystem>],
    dir: &Path,
    size: u64,
    group: &[Kind],
    first_group: bool,
    fr: &mut FioResults,
) -> Result<()> {
    // (system, transport) pairs; the plain file's only in the first group.
    let members: Vec<(usize, Transport)> = (0..systems.len())
        .filter(|&i| first_group || group[i] != Kind::Plain)
        .filter(|&i| group[i] != Kind::FullCopy)
        .flat_map(|i| systems[i].transports().iter().map(move |t| (i, *t)))
        .collect();
    let base = fr.rows.len();
    for &(i, t) in &members {
        fr.rows.push((group[i], t));
        fr.space.push(Vec::new());
        for v in fr.values.iter_mut() {
            v.push(Vec::new());
        }
    }
    // In the run's scratch directory, which goes with the run whatever happens.
    let socket = dir.join(format!("cow-nbd-{}.sock", std::process::id()));
    let jobs = o.fio_jobs();
    for round in 0..o.runs {
        sys::check_interrupted()?;
        for (j, job) in jobs.iter().enumerate() {
            for k in 0..members.len() {
                sys::check_interrupted()?;
                let m = (round + k) % members.len();
                let (i, transport) = members[m];
                let s = &mut systems[i];
                s.create()?;
                let v = match transport {
                    Transport::File => {
                        let p = s.path().context("a file transport without a path")?;
                        if job.write && s.kind() == Kind::Overlay {
                            // The copy-up happens at the first open for writing; fio's clock
                            // may include its open, so the copy is made here (it is in the
                            // first-write table) and fio measures the upper file.
                            fs::OpenOptions::new().write(true).open(&p)?;
                        }
                        fio(FioTarget::File(&p), size, job, o.fio_seconds)?
                    }
                    Transport::Nbd => {
                        let export = s.serve_nbd(&socket)?;
                        let v = fio(FioTarget::Nbd(&export.uri()), size, job, o.fio_seconds)?;
                        drop(export);
                        v
                    }
                };
                if is_space_job(o, job) {
                    let space = s.space()?;
                    fr.space[base + m].push(space as f64);
                }
                s.destroy()?;
                eprintln!(
                    "  fio round {round} {:<18} {:<34} {v:.0} {}",
                    &job.name,
                    row_name(s.kind(), transport),
                    job.unit()
                );
                fr.values[j][base + m].push(v);
            }
        }
    }
    Ok(())
}

/// A fio row's name: the system, and how fio reached it.
fn row_name(kind: Kind, transport: Transport) -> String {
    match (kind, transport) {
        (_, Transport::File) => kind.name().to_string(),
        (Kind::Engine, Transport::Nbd) => "thinbox engine over NBD (its server)".into(),
        (_, Transport::Nbd) => format!("{} over NBD (qemu-nbd)", kind.name()),
    }
}

fn report_first(o: &Opts, out: &mut Out, firsts: &[(u64, FirstWrite)]) {
    out.section(
        "First 4 KiB write into a large shared file",
        "The image holds one file of incompressible data. Per round and system: make a \
         container on the image (timed: `create`), drop the page cache (`sync; echo 3 > \
         drop_caches`), then `open(O_WRONLY)` → `pwrite` 4 KiB in the middle of the file → \
         `fsync` → `close` (cold; on overlayfs the copy-up happens inside the open), then the \
         same at another shared spot (warm), then host bytes the container added, then the \
         container is removed. qcow2: `write` + `flush` in an interactive `qemu-io -t none` \
         that opened the container (process start and image open are in `create`). Engine \
         API: `Thin::write` + `Thin::flush` (a pool commit) on a pool reopened after the \
         snapshot. Ratios are per round against the plain file of the same round. Where the \
         disk cannot hold every system at once, the systems run in groups one after another, \
         each with a plain file of its own (`group N`); a ratio never crosses groups. The \
         open / pwrite / fsync split shows where a file write's time went: overlayfs copies \
         in the open, the others pay in the fsync. Before each cold write the bench waits \
         for the disk to settle: `sync` returns once the guest's writes are done, but the \
         virtual disk keeps absorbing them on its host, and for seconds after a system wrote \
         gigabytes every flush waits behind them; after a system deleted gigabytes, a \
         scratch file system mounted with `discard` (see its options above) leaves the disk \
         working through the discards for seconds, during which one read or flush in five or \
         ten is several times slower. A probe (a 4 KiB overwrite + `fsync` of a file of its \
         own, a flush and a journal commit; and a 64 KiB `O_DIRECT` read at a random place of \
         another) \
         repeats every 20 ms until both halves have stayed at their quiet latency, measured \
         at the start (at most twice it, or 0.3 ms above it), for 0.5 s in a row (30 s at \
         most). The same wait comes before each timed container creation, which follows the \
         previous system's teardown.",
    );
    let mut chart_cold = Chart {
        title: "First 4 KiB write + fsync into a shared file (cold)".into(),
        x_label: "file size (MiB)".into(),
        y_label: "latency (ms, log)".into(),
        x_log: true,
        y_log: true,
        ..Chart::default()
    };
    for (size, fw) in firsts {
        let label = engine::units::format_size(*size);
        let _ = writeln!(out.md, "\n### {label} file\n");
        let mut rows = Vec::new();
        for (i, k) in fw.kinds.iter().enumerate() {
            if fw.cold[i].is_empty() {
                continue;
            }
            let r = ratios(&fw.cold[i], &fw.base[i]);
            let name = if *k == Kind::Plain && i > 0 {
                format!("plain file (group {})", fw.group[i])
            } else {
                k.name().to_string()
            };
            let groups = fw.group.iter().max().copied().unwrap_or(1);
            rows.push(vec![
                if groups > 1 && !(*k == Kind::Plain && i > 0) {
                    format!("{name} (group {})", fw.group[i])
                } else {
                    name.clone()
                },
                if *k == Kind::Plain {
                    "—".into()
                } else {
                    cell(&fw.create[i], " ms")
                },
                format!("**{}**", cell(&fw.cold[i], " ms")),
                cell(&r, "×"),
                if fw.parts[i][0].is_empty() {
                    "—".into()
                } else {
                    fw.parts[i]
                        .iter()
                        .map(|v| st(v).map_or("—".into(), |s| fmt_num(s.median)))
                        .collect::<Vec<_>>()
                        .join(" / ")
                },
                cell(&fw.warm[i], " ms"),
                st(&fw.space[i]).map_or("—".into(), |s| bytes(s.median)),
            ]);
            for (what, unit, samples) in [
                ("cold first 4 KiB write + fsync", Unit::Millis, &fw.cold[i]),
                ("container create", Unit::Millis, &fw.create[i]),
                ("warm 4 KiB write + fsync", Unit::Millis, &fw.warm[i]),
                ("host bytes added", Unit::Bytes, &fw.space[i]),
            ] {
                out.record("first", &format!("{label}: {what}"), &name, unit, samples);
            }
            if !(*k == Kind::Plain && i > 0) {
                if let Some(p) = point((*size / MIB) as f64, &fw.cold[i]) {
                    match chart_cold.series.iter_mut().find(|s| s.name == name) {
                        Some(s) => s.points.push(p),
                        None => chart_cold.series.push(series(name, vec![p])),
                    }
                }
            }
        }
        if let (Some(c), Some(w)) = (st(&fw.settled_create), st(&fw.settled)) {
            // A wait that ran out returned on a disk that had not settled: say how often.
            let limit = ms(SETTLE_LIMIT);
            let waits = fw.settled_create.iter().chain(&fw.settled);
            let ran_out = waits.clone().filter(|&&w| w >= limit).count();
            let _ = writeln!(
                out.md,
                "Disk settle (quiet probe: flush {} ms, read {} ms): before the creations \
                 waited {} ms median, {} ms at most; before the cold writes {} ms median, {} \
                 ms at most. {ran_out} of {} waits ran out at the {} s limit (the measurement \
                 after them began on a disk that had not settled).\n",
                fmt_num(fw.quiet_flush),
                fmt_num(fw.quiet_read),
                fmt_num(c.median),
                fmt_num(c.max),
                fmt_num(w.median),
                fmt_num(w.max),
                waits.count(),
                SETTLE_LIMIT.as_secs()
            );
            out.record(
                "first",
                &format!("{label}: settle wait before create"),
                "disk",
                Unit::Millis,
                &fw.settled_create,
            );
            out.record(
                "first",
                &format!("{label}: settle wait"),
                "disk",
                Unit::Millis,
                &fw.settled,
            );
        }
        out.table(
            &[
                "system",
                "create container",
                "first write + fsync, cold",
                "÷ plain (per round)",
                "cold: open / pwrite / fsync (ms, medians)",
                "second write, warm",
                "host bytes added",
            ],
            &rows,
        );
    }
    out.chart("first-write.svg", chart_cold);

    // Targets at 1 GiB.
    let Some((_, fw)) = firsts.iter().find(|(s, _)| *s == GIB) else {
        out.targets.push(TargetLine {
            what: "first-write targets".into(),
            measured: "not measured (1G not in BENCH_COW_SIZES)".into(),
            verdict: None,
        });
        return;
    };
    let get = |k: Kind| fw.kinds.iter().position(|x| *x == k).map(|i| &fw.cold[i]);
    let _ = o;
    for thin in [Kind::Thin, Kind::ThinXfs, Kind::Engine] {
        let Some(t) = get(thin) else { continue };
        let vs = |k: Kind| get(k).map(|p| ratios(p, t));
        let tn = thin.name();
        out.target(
            &format!("1 GiB first write: overlayfs copy-up ÷ {tn} (per round)"),
            &vs(Kind::Overlay).unwrap_or_default(),
            "×",
            Goal::AtLeast(1000.0),
        );
        out.target(
            &format!("1 GiB first write: {tn} ÷ qcow2 (per round)"),
            &get(Kind::Qcow2).map(|q| ratios(t, q)).unwrap_or_default(),
            "×",
            Goal::AtMost(1.0),
        );
        out.target(
            &format!("1 GiB first write: {tn} ÷ xfs reflink (per round)"),
            &get(Kind::Xfs).map(|x| ratios(t, x)).unwrap_or_default(),
            "×",
            Goal::AtMost(1.0),
        );
        out.target(
            &format!("1 GiB first write: {tn}, absolute (perf-anchors xfs: 3.7–4.0 ms)"),
            t,
            " ms",
            Goal::AtMost(3.7),
        );
    }
}

fn report_fio(o: &Opts, out: &mut Out, fr: &FioResults) {
    let jobs = o.fio_jobs();
    let space_label = format!("host bytes after randwrite 4k qd{}", o.fio_depths[0]);
    out.section(
        &format!(
            "Random and sequential IO on the inherited {} file",
            engine::units::format_size(o.fio_size)
        ),
        &format!(
            "Every job runs on a fresh container (the whole file still shared), {} s, fio \
             `--randrepeat=0 --refill_buffers --time_based`. The writes are therefore mostly \
             first writes into shared data (copy-on-write), the reads read shared data. \
             Random 4 KiB jobs at queue depths {}. Two ways in, each with its own baseline: \
             **through a file system**, fio `--direct=1` (psync at qd1, io_uring above) on \
             the file inside the container, ratios against the plain file; **over NBD** for \
             the block systems without a kernel file system here, fio's nbd engine (libnbd, \
             requests pipelined up to the queue depth) on the container's disk: the thinbox \
             engine through its own NBD server in this process, qcow2 through `qemu-nbd`, \
             ratios against the plain file exported by `qemu-nbd` (all with the host page \
             cache in play: qemu-nbd's writeback cache, the engine's buffered data file). \
             overlayfs copies the whole file up when fio opens it, before its clock starts: \
             its rows show the upper file after the copy (the copy is in the first-write \
             table). Host bytes are after the random-write job at qd{}.",
            o.fio_seconds,
            o.fio_depths
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            o.fio_depths[0]
        ),
    );
    let mut headers = vec!["system".to_string()];
    headers.extend(jobs.iter().map(|j| format!("{} ({})", j.name, j.unit())));
    headers.push(space_label.clone());
    let mut rows = Vec::new();
    // Each transport's rows are compared with the plain file reached the same way.
    let plain = |t: Transport| fr.rows.iter().position(|r| *r == (Kind::Plain, t));
    // IOPS against queue depth, one chart per direction, a line per system.
    let depth_chart = |what: &str| Chart {
        title: format!("4 KiB random {what} of a shared file in a fresh container"),
        x_label: "queue depth".into(),
        y_label: "IOPS (log)".into(),
        x_log: o.fio_depths.len() > 1,
        y_log: true,
        x_labels: Some(
            o.fio_depths
                .iter()
                .map(|&d| (f64::from(d), d.to_string()))
                .collect(),
        ),
        ..Chart::default()
    };
    let mut read_chart = depth_chart("reads");
    let mut write_chart = depth_chart("writes");
    for (i, &(k, transport)) in fr.rows.iter().enumerate() {
        let name = row_name(k, transport);
        let mut row = vec![name.clone()];
        let mut reads = series(&name, Vec::new());
        let mut writes = series(&name, Vec::new());
        for (j, job) in jobs.iter().enumerate() {
            let v = &fr.values[j][i];
            let ratio = plain(transport)
                .filter(|p| *p != i)
                .map(|p| ratios(v, &fr.values[j][p]))
                .and_then(|r| st(&r))
                .map_or(String::new(), |s| {
                    format!(" (÷plain {})", fmt_num(s.median))
                });
            row.push(format!("{}{ratio}", cell(v, "")));
            let unit = if job.bs >= MIB {
                Unit::MiBps
            } else {
                Unit::Iops
            };
            out.record("fio", &job.name, &name, unit, v);
            if job.random {
                let line = if job.write { &mut writes } else { &mut reads };
                if let Some(p) = point(f64::from(job.depth), v) {
                    line.points.push(p);
                }
            }
        }
        row.push(st(&fr.space[i]).map_or("—".into(), |s| bytes(s.median)));
        out.record("fio", &space_label, &name, Unit::Bytes, &fr.space[i]);
        rows.push(row);
        read_chart.series.push(reads);
        write_chart.series.push(writes);
    }
    let h: Vec<&str> = headers.iter().map(|s| s.as_str()).collect();
    out.table(&h, &rows);
    out.chart("fio-randread.svg", read_chart);
    out.chart("fio-randwrite.svg", write_chart);
}

// ---- group: snapshot / container creation against origin size ------------------------------

/// A pool whose thin 1 maps `mapped` bytes: metadata built on a null data device, then
/// served from a sparse data file (the mapped blocks read as zeros; creation never reads
/// data). Returns the pool directory guard, its paths and store.
fn mapped_pool(dir: &Path, tag: &str, mapped: u64) -> Result<(Remove, PoolPaths, PathBuf)> {
    let pool_dir = dir.join(format!("snap-{tag}"));
    fs::create_dir_all(&pool_dir)?;
    let guard = Remove(pool_dir.clone());
    let paths = PoolPaths::in_dir(&pool_dir);
    let store_path = engine::VolumeStore::path_in(&pool_dir);
    let data_size = mapped + 4 * GIB;
    // The pool and its store as the runtime makes them (sparse files), then the mapping
    // written with the data device swapped for a null one, so nothing lands on the disk
    // (writes and commits leave the transaction id, which the store follows, alone).
    {
        let mut volumes = Volumes::create(
            &paths,
            &store_path,
            NewPool::new(data_size, GIB + mapped / 256, DataBlockSize::DEFAULT),
            PoolOptions::default(),
        )?;
        volumes.create_thin(id(ORIGIN), mapped + GIB, Some("image"))?;
        volumes.pool().commit()?;
    }
    {
        let meta: Arc<dyn BlockDevice> =
            Arc::new(FileDevice::open(&paths.metadata, OpenMode::ReadWrite)?);
        let data: Arc<dyn BlockDevice> = Arc::new(benches::NullDevice::new(data_size));
        let pool = Pool::open(meta, data, PoolOptions::default())?;
        let thin = pool.open_thin(id(ORIGIN))?;
        let buf = vec![0u8; MIB as usize];
        let mut off = 0;
        while off < mapped {
            thin.write(&buf, off)?;
            off += MIB;
        }
        drop(thin);
        pool.commit()?;
    }
    Ok((guard, paths, store_path))
}

/// What the runtime's devicemapper driver asks the pool daemon for a new container
/// (`storage::devicemapper::create_snapshot`): status (free-space check), the thin list
/// (a leftover with the name?), the list again (next free id), `create_snap` with a name.
/// Returns the new thin and the time of each step: status, the two lists, `create_snap`.
fn container_create(client: &mut Client, name: &str) -> Result<(ThinId, [Duration; 3])> {
    let t0 = Instant::now();
    client.status()?;
    let t1 = Instant::now();
    let list = client.list()?;
    if let Some(old) = list.iter().find(|t| t.name.as_deref() == Some(name)) {
        client.delete(id(old.id))?;
    }
    let next = client.list()?.iter().map(|t| t.id).max().unwrap_or(0) + 1;
    let t2 = Instant::now();
    client.create_snap(id(next), id(ORIGIN), Some(name))?;
    let t3 = Instant::now();
    Ok((id(next), [t1 - t0, t2 - t1, t3 - t2]))
}

struct Served {
    daemon: Option<Arc<Daemon>>,
    client: Client,
    _dir: Remove,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            if let Err(e) = d.shutdown() {
                eprintln!("cow bench: the pool daemon did not stop cleanly: {e:#}");
            }
        }
    }
}

fn serve(dir: &Path, tag: &str, mapped: u64) -> Result<Served> {
    let (guard, paths, store_path) = mapped_pool(dir, tag, mapped)?;
    let run_dir = RunDir::new(guard.0.join("run"));
    let daemon = Daemon::start(DaemonConfig {
        paths,
        store_path,
        run_dir: run_dir.clone(),
        options: PoolOptions::default(),
        fuse_workers: 1,
    })?;
    match Client::connect(&run_dir.socket()) {
        Ok(Some(client)) => Ok(Served {
            daemon: Some(daemon),
            client,
            _dir: guard,
        }),
        other => {
            let _ = daemon.shutdown();
            bail!("the pool daemon does not answer: {:?}", other.err())
        }
    }
}

fn snap_group(o: &Opts, out: &mut Out, dir: &Path) -> Result<()> {
    let sizes = o.snap_sizes.clone();
    eprintln!("snap: building origins {sizes:?}");
    let mut served = Vec::new();
    let mut engines = Vec::new();
    for (i, &m) in sizes.iter().enumerate() {
        served.push(serve(dir, &format!("o{i}"), m)?);
        let (guard, paths, _) = mapped_pool(dir, &format!("e{i}"), m)?;
        let pool = open_pool(&paths.metadata, &paths.data)?;
        engines.push((pool, guard));
    }
    // Peers: qcow2 over a sparse raw backing file of that size; overlayfs over a lower dir
    // holding a sparse file of that size (neither reads the data to create a container).
    let peers_dir = dir.join("snap-peers");
    fs::create_dir_all(&peers_dir)?;
    let _peers = Remove(peers_dir.clone());
    let have_qemu = sys::have("qemu-img");
    for (i, &m) in sizes.iter().enumerate() {
        let lower = peers_dir.join(format!("lower{i}"));
        fs::create_dir_all(&lower)?;
        fs::File::create(lower.join("image"))?.set_len(m)?;
    }
    // btrfs: one subvolume per size holding a file of that size, preallocated (real extents,
    // no data written), on a loop-mounted sparse image.
    let btrfs = if sys::have("mkfs.btrfs") {
        let largest = sizes.iter().copied().max().unwrap_or(GIB);
        let fs = sys::LoopFs::create(
            &peers_dir.join("btrfs.img"),
            largest + largest / 8 + 8 * GIB,
            &["mkfs.btrfs", "-f", "-q"],
            &peers_dir.join("mnt-btrfs"),
            None,
        )?;
        for (i, &m) in sizes.iter().enumerate() {
            let sub = fs.path().join(format!("origin{i}"));
            sys::run(
                Command::new("btrfs")
                    .args(["subvolume", "create"])
                    .arg(&sub),
            )?;
            sys::run(
                Command::new("fallocate")
                    .arg("-l")
                    .arg(m.to_string())
                    .arg(sub.join("image")),
            )?;
        }
        Some(fs)
    } else {
        None
    };
    let reps = o.runs * 7;
    // [system][size] samples (ms)
    let names = [
        "thinbox container create (pool daemon)",
        "… of which status",
        "… of which list ×2",
        "… of which create_snap (+ commit)",
        "thinbox engine create_snap + commit (in process)",
        "qcow2 create -b",
        "overlayfs mount",
        "btrfs subvolume snapshot",
    ];
    let mut t = vec![vec![Vec::new(); sizes.len()]; names.len()];
    let mut pair_ratio: Vec<f64> = Vec::new();
    for rep in 0..reps {
        sys::check_interrupted()?;
        let mut this = vec![0.0; sizes.len()];
        for k in 0..sizes.len() {
            let i = (rep + k) % sizes.len();
            let name = format!("c{rep}");
            let s = &mut served[i];
            let start = Instant::now();
            let (new, parts) = container_create(&mut s.client, &name)?;
            let d = ms(start.elapsed());
            s.client.delete(new)?;
            t[0][i].push(d);
            for (k, p) in parts.iter().enumerate() {
                t[1 + k][i].push(ms(*p));
            }
            this[i] = d;
            let pool = &engines[i].0;
            let snap = id(100 + rep as u64);
            let start = Instant::now();
            pool.create_snap(snap, id(ORIGIN))?;
            pool.commit()?;
            t[4][i].push(ms(start.elapsed()));
            pool.delete(snap)?;
            pool.commit()?;
            if have_qemu {
                let ov = peers_dir.join("ov.qcow2");
                let d = sys::run_timed(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                        .arg(peers_dir.join(format!("lower{i}")).join("image"))
                        .args(["-o", "cluster_size=65536"])
                        .arg(&ov),
                )?;
                fs::remove_file(&ov)?;
                t[5][i].push(ms(d));
            }
            let run = peers_dir.join("run");
            fs::create_dir_all(run.join("u"))?;
            fs::create_dir_all(run.join("w"))?;
            let options = format!(
                "lowerdir={},upperdir={},workdir={}",
                peers_dir.join(format!("lower{i}")).display(),
                run.join("u").display(),
                run.join("w").display()
            );
            let start = Instant::now();
            let m = Mount::new(
                Some("overlay"),
                "overlay",
                &run.join("m"),
                Some(&options),
                None,
            )?;
            t[6][i].push(ms(start.elapsed()));
            drop(m);
            fs::remove_dir_all(&run)?;
            if let Some(b) = &btrfs {
                let snap = b.path().join("container");
                let d = sys::run_timed(
                    Command::new("btrfs")
                        .args(["subvolume", "snapshot"])
                        .arg(b.path().join(format!("origin{i}")))
                        .arg(&snap),
                )?;
                sys::run(
                    Command::new("btrfs")
                        .args(["subvolume", "delete"])
                        .arg(&snap),
                )?;
                t[7][i].push(ms(d));
            }
        }
        if sizes.len() > 1 {
            pair_ratio.push(this[sizes.len() - 1] / this[0]);
        }
    }
    drop(served);
    drop(btrfs);
    out.section(
        "Container creation against the mapped size of the image",
        &format!(
            "The image thin maps the given bytes (1 MiB writes on a null data device, then \
             served by the pool daemon from a sparse data file). `thinbox container create` \
             is what the runtime's devicemapper driver asks the running pool daemon for a new \
             container (status for the free-space check, the thin list twice, `create_snap` \
             with a name, committed before the answer), over its socket, without writing \
             the container's JSON record and without the mount. Peers: `qemu-img create -b` \
             on a sparse raw backing file of that size (process start included), an \
             overlayfs mount over a lower dir holding a sparse file of that size, and \
             `btrfs subvolume snapshot` of a subvolume holding a file of that size \
             preallocated with `fallocate` (real extents, no data; process start included; \
             btrfs on a loop-mounted sparse image). {reps} repetitions, sizes interleaved."
        ),
    );
    let columns: Vec<(f64, String)> = sizes
        .iter()
        .map(|&m| (m as f64 / GIB as f64, engine::units::format_size(m)))
        .collect();
    out.sweep(
        Chart {
            title: "Container / snapshot creation against mapped origin size".into(),
            x_label: "origin mapped (GiB)".into(),
            y_label: "ms (log)".into(),
            x_log: true,
            y_log: true,
            ..Chart::default()
        },
        "snap-origin.svg",
        ("snap", "create, origin"),
        &columns,
        &names,
        &t,
        // The breakdown rows ("… of which") are in the table, not the chart.
        |_, name| !name.starts_with('…'),
    );
    drop(engines);
    let big = engine::units::format_size(*sizes.last().expect("sizes"));
    let small = engine::units::format_size(sizes[0]);
    out.target(
        &format!("container create, {big} ÷ {small} mapped (per pair; noise allowance 10 %)"),
        &pair_ratio,
        "×",
        Goal::AtMost(1.10),
    );
    out.target(
        &format!("container create with {big} mapped, end to end without the mount"),
        &t[0][sizes.len() - 1],
        " ms",
        Goal::AtMost(50.0),
    );
    Ok(())
}

// ---- group: thinbox create through the runtime ---------------------------------------------

/// The `thinbox` binary: `BENCH_THINBOX`, or beside this bench's target directory
/// (`cargo build --release -p runtime`, which scripts/bench.sh does).
fn thinbox_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BENCH_THINBOX") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("thinbox");
    p.exists().then_some(p)
}

/// A thinbox state directory; its pool daemon (started by thinbox itself) is stopped and
/// the directory deleted when dropped.
struct Runtime {
    bin: PathBuf,
    root: PathBuf,
    devicemapper: bool,
}

impl Runtime {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.root);
        if !self.devicemapper {
            c.args(["--storage-driver", "overlay"]);
        }
        c
    }

    fn pool_paths(&self) -> PoolPaths {
        PoolPaths::in_dir(&self.root.join("devicemapper"))
    }

    fn stop_daemon(&self) {
        if !self.devicemapper {
            return;
        }
        let _ = sys::run(self.cmd().args(["pool-daemon", "stop"]));
        let run = RunDir::for_pool(&self.pool_paths());
        if let Err(e) = engine::activate::daemon::launch::stop(&run, true) {
            eprintln!("cow bench: the runtime's pool daemon: {e:#}");
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_daemon();
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// A Docker archive (manifest.json, config, one layer) holding one small file.
fn image_archive(dir: &Path) -> Result<PathBuf> {
    let d = dir.join("image-archive");
    let rootfs = d.join("rootfs");
    fs::create_dir_all(&rootfs)?;
    fs::write(rootfs.join("hello"), b"hello from the cow bench\n")?;
    sys::run(
        Command::new("tar")
            .arg("-cf")
            .arg(d.join("layer.tar"))
            .arg("-C")
            .arg(&rootfs)
            .arg("."),
    )?;
    let sum = sys::run(Command::new("sha256sum").arg(d.join("layer.tar")))?;
    let hex = sum
        .split_whitespace()
        .next()
        .context("sha256sum printed nothing")?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": { "Cmd": ["/hello"] },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{hex}")] },
        "history": [ { "created": "2026-01-01T00:00:00Z", "created_by": "cow bench" } ],
    });
    fs::write(d.join("config.json"), serde_json::to_vec(&config)?)?;
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": ["bench/cow:latest"],
        "Layers": ["layer.tar"],
    }]);
    fs::write(d.join("manifest.json"), serde_json::to_vec(&manifest)?)?;
    let archive = dir.join("image.tar");
    sys::run(
        Command::new("tar")
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(&d)
            .args(["manifest.json", "config.json", "layer.tar"]),
    )?;
    Ok(archive)
}

/// Maps `mapped` more bytes in the image's thin, past the end of its file system (which
/// never sees them), with the pool's daemon stopped and the data device swapped for a
/// null one: the mapping tree grows as a full image's would, nothing lands on the disk.
fn inflate(rt: &Runtime, mapped: u64) -> Result<()> {
    let out = sys::run(rt.cmd().args(["inspect", "bench/cow:latest"]))?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let thin: u64 = v[0]["GraphDriver"]["Data"]["DeviceId"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .context("no DeviceId in thinbox inspect")?;
    rt.stop_daemon();
    let paths = rt.pool_paths();
    let data_size = fs::metadata(&paths.data)?.len();
    let meta: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&paths.metadata, OpenMode::ReadWrite)?);
    let data: Arc<dyn BlockDevice> = Arc::new(benches::NullDevice::new(data_size));
    let pool = Pool::open(meta, data, PoolOptions::default())?;
    let t = pool.open_thin(id(thin))?;
    let buf = vec![0u8; MIB as usize];
    // Far past the base device's 10 GiB.
    let start = 1 << 40;
    let mut off = 0;
    while off < mapped {
        t.write(&buf, start + off)?;
        off += MIB;
    }
    drop(t);
    pool.commit()?;
    Ok(())
}

fn runtime_group(o: &Opts, out: &mut Out, dir: &Path) -> Result<()> {
    let Some(bin) = thinbox_bin() else {
        out.section(
            "thinbox create through the runtime: not run",
            "No thinbox binary (build it with `cargo build --release -p runtime`, or set \
             BENCH_THINBOX); scripts/bench.sh builds it.",
        );
        return Ok(());
    };
    let archive = image_archive(dir)?;
    let sizes = [o.snap_sizes[0], *o.snap_sizes.last().expect("sizes")];
    let mut rts = Vec::new();
    let mut labels = Vec::new();
    for (i, &m) in sizes.iter().enumerate() {
        let rt = Runtime {
            bin: bin.clone(),
            root: dir.join(format!("rt{i}")),
            devicemapper: true,
        };
        sys::run(rt.cmd().arg("load").arg("-i").arg(&archive))?;
        inflate(&rt, m)?;
        rts.push(rt);
        labels.push(format!(
            "thinbox create, devicemapper, {} mapped",
            engine::units::format_size(m)
        ));
    }
    let rt = Runtime {
        bin: bin.clone(),
        root: dir.join("rt-overlay"),
        devicemapper: false,
    };
    sys::run(rt.cmd().arg("load").arg("-i").arg(&archive))?;
    rts.push(rt);
    labels.push("thinbox create, overlay driver".into());
    // One create first on each: it starts the pool daemon.
    for rt in &rts {
        let id = sys::run(rt.cmd().args(["create", "bench/cow:latest"]))?;
        sys::run(rt.cmd().args(["rm", id.trim()]))?;
    }
    let reps = o.runs * 5;
    let mut t = vec![Vec::new(); rts.len()];
    let mut pair = Vec::new();
    for rep in 0..reps {
        sys::check_interrupted()?;
        let mut this = vec![0.0; rts.len()];
        for k in 0..rts.len() {
            let i = (rep + k) % rts.len();
            let start = Instant::now();
            let id = sys::run(rts[i].cmd().args(["create", "bench/cow:latest"]))?;
            this[i] = ms(start.elapsed());
            t[i].push(this[i]);
            sys::run(rts[i].cmd().args(["rm", id.trim()]))?;
        }
        pair.push(this[1] / this[0]);
    }
    drop(rts);
    out.section(
        "thinbox create through the runtime",
        &format!(
            "`thinbox create bench/cow:latest` as a process, end to end (process start, the \
             store lock, the container's record written before and after, the snapshot by \
             the running pool daemon), without the mount, which `create` does not do. The \
             image is one small layer loaded from a Docker archive; its thin then gets the \
             given bytes mapped past the end of its file system (with the daemon stopped, \
             on a null data device), so the pool's mapping tree is that of an image of that \
             size. The same image on the overlay driver for comparison. One create per \
             state directory first (it starts the pool daemon); then {reps} repetitions, \
             interleaved, each followed by `thinbox rm`."
        ),
    );
    let rows: Vec<Vec<String>> = labels
        .iter()
        .zip(&t)
        .map(|(l, v)| vec![l.clone(), cell(v, " ms")])
        .collect();
    for (l, v) in labels.iter().zip(&t) {
        out.report
            .row("runtime", "thinbox create", l, Unit::Millis, v, "");
    }
    out.table(&["command", "wall time"], &rows);
    let big = engine::units::format_size(sizes[1]);
    let small = engine::units::format_size(sizes[0]);
    out.target(
        &format!(
            "`thinbox create`, image with {big} ÷ {small} mapped (per pair; noise allowance 10 %)"
        ),
        &pair,
        "×",
        Goal::AtMost(1.10),
    );
    out.target(
        &format!("`thinbox create` from an image with {big} mapped, end to end without the mount"),
        &t[1],
        " ms",
        Goal::AtMost(50.0),
    );
    Ok(())
}

// ---- group: chain depth --------------------------------------------------------------------

fn chain_group(o: &Opts, out: &mut Out, dir: &Path) -> Result<()> {
    let depths = o.depths.clone();
    let max = *depths.iter().max().unwrap_or(&1);
    let cdir = dir.join("chain");
    fs::create_dir_all(&cdir)?;
    let _g = Remove(cdir.clone());
    // [system][depth index] samples (ms)
    let names = [
        "thinbox create_snap + commit (engine)",
        "thinbox 4 KiB read of a base block (engine)",
        "overlayfs mount",
        "overlayfs cold stat + read of a base file",
        "qcow2 create -b",
        "qcow2 qemu-io open + 4 KiB read of a base cluster",
    ];
    let mut t = vec![vec![Vec::new(); depths.len()]; names.len()];
    let have_qemu = sys::have("qemu-img") && sys::have("qemu-io");
    // Overlay layers: l1 holds the base file; every layer adds one file of its own.
    for d in 1..=max {
        let l = cdir.join(format!("l{d}"));
        fs::create_dir_all(&l)?;
        fs::write(l.join(format!("own{d}")), b"layer")?;
        if d == 1 {
            fs::write(l.join("base"), vec![7u8; 64 * 1024])?;
        }
    }
    for round in 0..o.runs {
        sys::check_interrupted()?;
        eprintln!("chain: round {round}");
        // thin: a chain of snapshots of snapshots on a 64 MiB image.
        let meta = cdir.join("meta");
        let data = cdir.join("data");
        {
            let m: Arc<dyn BlockDevice> = Arc::new(FileDevice::create(&meta, 256 * MIB)?);
            let dd: Arc<dyn BlockDevice> = Arc::new(FileDevice::create(&data, GIB)?);
            let pool = Pool::format(m, dd, DataBlockSize::DEFAULT, PoolOptions::default())?;
            pool.create_thin(id(1))?;
            let thin = pool.open_thin(id(1))?;
            let buf = benches::pattern(MIB as usize, 1);
            let mut off = 0;
            while off < 64 * MIB {
                thin.write(&buf, off)?;
                off += MIB;
            }
            drop(thin);
            pool.commit()?;
            for d in 1..=max {
                let start = Instant::now();
                pool.create_snap(id(d as u64 + 1), id(d as u64))?;
                pool.commit()?;
                let took = ms(start.elapsed());
                if let Some(i) = depths.iter().position(|x| *x == d) {
                    t[0][i].push(took);
                    let thin = pool.open_thin(id(d as u64 + 1))?;
                    let mut b = vec![0u8; 4096];
                    let mut rng = SmallRng::seed_from_u64(d as u64);
                    let n = 2000;
                    let start = Instant::now();
                    for _ in 0..n {
                        thin.read(&mut b, rng.gen_range(0..16384u64) * 4096)?;
                    }
                    t[1][i].push(ms(start.elapsed()) / n as f64);
                }
            }
        }
        fs::remove_file(&meta)?;
        fs::remove_file(&data)?;
        // overlay: mount with the top `d` layers' worth of lowerdirs (l_d on top ... l1).
        for (i, &d) in depths.iter().enumerate() {
            let lower: Vec<String> = (1..=d).rev().map(|k| format!("l{k}")).collect();
            let run = cdir.join("run");
            fs::create_dir_all(run.join("u"))?;
            fs::create_dir_all(run.join("w"))?;
            let options = format!("lowerdir={},upperdir=run/u,workdir=run/w", lower.join(":"));
            let start = Instant::now();
            let m = Mount::new(
                Some("overlay"),
                "overlay",
                &run.join("m"),
                Some(&options),
                Some(&cdir),
            )?;
            t[2][i].push(ms(start.elapsed()));
            sys::drop_caches()?;
            let start = Instant::now();
            let _ = fs::metadata(m.path().join("base"))?;
            let _ = fs::read(m.path().join("base"))?;
            t[3][i].push(ms(start.elapsed()));
            drop(m);
            fs::remove_dir_all(&run)?;
        }
        // qcow2: base (64 MiB of data) and a chain of overlays.
        if have_qemu {
            let q = cdir.join("q");
            fs::create_dir_all(&q)?;
            let base_raw = q.join("base.raw");
            sys::fill_file(&base_raw, 64 * MIB, 3)?;
            sys::run(
                Command::new("qemu-img")
                    .args([
                        "convert",
                        "-f",
                        "raw",
                        "-O",
                        "qcow2",
                        "-o",
                        "cluster_size=65536",
                    ])
                    .arg(&base_raw)
                    .arg(q.join("c0.qcow2")),
            )?;
            for d in 1..=max {
                let d0 = sys::run_timed(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                        .arg(format!("c{}.qcow2", d - 1))
                        .args(["-o", "cluster_size=65536"])
                        .arg(format!("c{d}.qcow2"))
                        .current_dir(&q),
                )?;
                if let Some(i) = depths.iter().position(|x| *x == d) {
                    t[4][i].push(ms(d0));
                    let d1 = sys::run_timed(
                        Command::new("qemu-io")
                            .args(["-t", "none", "-f", "qcow2", "-c", "read 65536 4k"])
                            .arg(format!("c{d}.qcow2"))
                            .current_dir(&q),
                    )?;
                    t[5][i].push(ms(d1));
                }
            }
            fs::remove_dir_all(&q)?;
        }
    }
    out.section(
        "Chains: creation and reads against layer depth",
        "thinbox: snapshot of the snapshot of … a 64 MiB image thin, `create_snap` + \
         `commit` at each depth (engine API, metadata and data on sparse files), and 2000 \
         random 4 KiB reads through the deepest thin (µs per read shown in ms). overlayfs: \
         a mount with that many lowerdirs (relative paths, as the runtime's driver mounts), \
         then a stat + read of a 64 KiB file that only the bottom layer has, caches dropped. \
         qcow2: `qemu-img create -b` on top of a chain of that depth, then a `qemu-io` \
         process reading 4 KiB that only the base has (opens the whole chain).",
    );
    let columns: Vec<(f64, String)> = depths
        .iter()
        .map(|&d| (d as f64, format!("depth {d}")))
        .collect();
    out.sweep(
        Chart {
            title: "Creating a layer at depth d".into(),
            x_label: "chain depth".into(),
            y_label: "ms (log)".into(),
            x_log: true,
            y_log: true,
            ..Chart::default()
        },
        "chain.svg",
        ("chain", ""),
        &columns,
        &names,
        &t,
        // Creation rows only: reads are in the table.
        |n, _| n % 2 == 0,
    );
    Ok(())
}

// ---- group: many small files ---------------------------------------------------------------

/// A generated source-like tree: `n` files of 200 B – 16 KiB in directories of 100.
fn make_tree(root: &Path, n: usize) -> Result<u64> {
    let mut rng = SmallRng::seed_from_u64(21);
    let mut total = 0;
    for i in 0..n {
        let d = root.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            fs::create_dir_all(&d)?;
        }
        let len = rng.gen_range(200..16 * 1024usize);
        let mut body = vec![0u8; len];
        for b in body.iter_mut() {
            const TEXT: &[u8] = b"abcdefghijklmnopqrstuvwxyz \n{}();";
            *b = TEXT[rng.gen_range(0..TEXT.len())];
        }
        fs::write(d.join(format!("f{i:05}.c")), &body)?;
        total += len as u64;
    }
    Ok(total)
}

/// A container with the image's tree at `tree`, and a place to untar into (`scratch`).
trait TreeSys {
    fn name(&self) -> &'static str;
    fn create(&mut self) -> Result<Duration>;
    fn root(&self) -> PathBuf;
    fn space(&mut self) -> Result<u64>;
    fn destroy(&mut self) -> Result<()>;
}

/// The baseline: a plain directory holding a fresh copy of the image's tree each round (the
/// copy is its setup, not a creation: the table shows none), so that what one round writes
/// never reaches the next round's input, nor the image the overlay mounts as its lower dir.
struct TreePlain {
    image: PathBuf,
    root: PathBuf,
}
impl TreeSys for TreePlain {
    fn name(&self) -> &'static str {
        "plain directory"
    }
    fn create(&mut self) -> Result<Duration> {
        fs::create_dir_all(&self.root)?;
        sys::run(
            Command::new("cp")
                .arg("-a")
                .arg(self.image.join("tree"))
                .arg(self.root.join("tree")),
        )?;
        sys::syncfs(&self.root);
        Ok(Duration::ZERO)
    }
    fn root(&self) -> PathBuf {
        self.root.clone()
    }
    fn space(&mut self) -> Result<u64> {
        Ok(0)
    }
    fn destroy(&mut self) -> Result<()> {
        fs::remove_dir_all(&self.root)?;
        Ok(())
    }
}

struct TreeOverlay(OverlaySys);
impl TreeSys for TreeOverlay {
    fn name(&self) -> &'static str {
        "overlayfs"
    }
    fn create(&mut self) -> Result<Duration> {
        self.0.mount_fresh()
    }
    fn root(&self) -> PathBuf {
        self.0.merged()
    }
    fn space(&mut self) -> Result<u64> {
        self.0.space()
    }
    fn destroy(&mut self) -> Result<()> {
        self.0.destroy()
    }
}

struct TreeThin(ThinSys);
impl TreeSys for TreeThin {
    fn name(&self) -> &'static str {
        self.0.kind().name()
    }
    fn create(&mut self) -> Result<Duration> {
        self.0.create()
    }
    fn root(&self) -> PathBuf {
        self.0.root().to_path_buf()
    }
    fn space(&mut self) -> Result<u64> {
        self.0.space()
    }
    fn destroy(&mut self) -> Result<()> {
        self.0.destroy()
    }
}

/// btrfs: the image is a subvolume, a container its snapshot (Docker's btrfs driver).
/// xfs: a container is `cp -a --reflink=always` of the image directory.
struct TreeReflink {
    kind: Kind,
    fs: sys::LoopFs,
    used0: u64,
}
impl TreeReflink {
    fn new(kind: Kind, dir: &Path, tree: &Path, fs_size: u64) -> Result<TreeReflink> {
        let (tag, mkfs) = reflink_mkfs(kind);
        let fs = sys::LoopFs::create(
            &dir.join(format!("tree-{tag}.img")),
            fs_size,
            mkfs,
            &dir.join(format!("tree-mnt-{tag}")),
            None,
        )?;
        let image = fs.path().join("image");
        if kind == Kind::Btrfs {
            sys::run(
                Command::new("btrfs")
                    .args(["-q", "subvolume", "create"])
                    .arg(&image),
            )?;
        } else {
            fs::create_dir_all(&image)?;
        }
        sys::run(
            Command::new("cp")
                .arg("-a")
                .arg(tree)
                .arg(image.join("tree")),
        )?;
        sys::syncfs(fs.path());
        Ok(TreeReflink { kind, fs, used0: 0 })
    }
    fn container(&self) -> PathBuf {
        self.fs.path().join("c")
    }
}
impl TreeSys for TreeReflink {
    fn name(&self) -> &'static str {
        self.kind.name()
    }
    fn create(&mut self) -> Result<Duration> {
        sys::syncfs(self.fs.path());
        self.used0 = sys::fs_used(self.fs.path())?;
        let image = self.fs.path().join("image");
        let start = Instant::now();
        if self.kind == Kind::Btrfs {
            sys::run(
                Command::new("btrfs")
                    .args(["-q", "subvolume", "snapshot"])
                    .arg(&image)
                    .arg(self.container()),
            )?;
        } else {
            sys::run(
                Command::new("cp")
                    .args(["-a", "--reflink=always"])
                    .arg(&image)
                    .arg(self.container()),
            )?;
        }
        sys::syncfs(self.fs.path());
        Ok(start.elapsed())
    }
    fn root(&self) -> PathBuf {
        self.container()
    }
    fn space(&mut self) -> Result<u64> {
        sys::syncfs(self.fs.path());
        Ok(sys::fs_used(self.fs.path())?.saturating_sub(self.used0))
    }
    fn destroy(&mut self) -> Result<()> {
        if self.kind == Kind::Btrfs {
            sys::run(
                Command::new("btrfs")
                    .args(["-q", "subvolume", "delete"])
                    .arg(self.container()),
            )?;
        } else {
            fs::remove_dir_all(self.container())?;
        }
        sys::syncfs(self.fs.path());
        Ok(())
    }
}

/// The order systems run in during `round`: each round starts one system later, so that no
/// system always follows the same one (the method of perf-anchors.md).
fn rotation(round: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (round + k) % n)
}

fn walk(dir: &Path, f: &mut impl FnMut(&Path, &fs::Metadata)) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let md = fs::symlink_metadata(e.path())?;
        f(&e.path(), &md);
        if md.is_dir() {
            walk(&e.path(), f)?;
        }
    }
    Ok(())
}

/// Bytes a tree takes on disk (allocated blocks, not lengths) and its number of entries.
fn tree_size(tree: &Path) -> Result<(u64, u64)> {
    let (mut bytes, mut entries) = (0, 0);
    walk(tree, &mut |_, md| {
        bytes += std::os::unix::fs::MetadataExt::blocks(md) * 512;
        entries += 1;
    })?;
    Ok((bytes, entries))
}

/// The systems of the groups that work on a tree of files (`small`, `workload`): a plain
/// directory and a container on overlayfs, btrfs (when `mkfs.btrfs` is there), xfs reflink,
/// and ext4 and xfs on a thin, each with the tree of `SDIR/image/tree` at `<root>/tree`.
/// `bytes` is the space the tree takes (allocated, not apparent) and `entries` its number of
/// files and directories: file systems and thins get room for the tree twice over, and ext4
/// (one inode per 16 KiB) inodes enough for it twice over.
fn tree_systems(sdir: &Path, bytes: u64, entries: u64) -> Result<Vec<Box<dyn TreeSys>>> {
    let image = sdir.join("image");
    let tree = image.join("tree");
    let room = (4 * GIB).max(2 * bytes + GIB).max(entries * 32 * 1024);
    let mut systems: Vec<Box<dyn TreeSys>> = vec![
        Box::new(TreePlain {
            image: image.clone(),
            root: sdir.join("plain"),
        }),
        Box::new(TreeOverlay(OverlaySys {
            lower: image,
            run: sdir.join("ovl"),
            file: String::new(),
            mount: None,
        })),
    ];
    if sys::have("mkfs.btrfs") {
        systems.push(Box::new(TreeReflink::new(Kind::Btrfs, sdir, &tree, room)?));
    }
    systems.push(Box::new(TreeReflink::new(Kind::Xfs, sdir, &tree, room)?));
    for (fs, tag) in [(ThinFs::Ext4, "tree"), (ThinFs::Xfs, "tree-xfs")] {
        let tree = tree.clone();
        systems.push(Box::new(TreeThin(ThinSys::new(
            fs,
            sdir,
            tag,
            room,
            DataBlockSize::DEFAULT,
            "tree",
            move |root| {
                sys::run(
                    Command::new("cp")
                        .arg("-a")
                        .arg(&tree)
                        .arg(root.join("tree")),
                )?;
                Ok(())
            },
        )?)));
    }
    Ok(systems)
}

fn small_group(o: &Opts, out: &mut Out, dir: &Path) -> Result<()> {
    let sdir = dir.join("small");
    fs::create_dir_all(&sdir)?;
    let _g = Remove(sdir.clone());
    let tree = sdir.join("image").join("tree");
    fs::create_dir_all(&tree)?;
    let total = make_tree(&tree, o.small_files)?;
    let tarball = sdir.join("tree.tar");
    sys::run(
        Command::new("tar")
            .arg("-cf")
            .arg(&tarball)
            .arg("-C")
            .arg(&tree)
            .arg("."),
    )?;
    eprintln!("small: {} files, {}", o.small_files, bytes(total as f64));
    let (tree_bytes, entries) = tree_size(&tree)?;
    let mut systems = tree_systems(&sdir, tree_bytes, entries)?;
    let ops = [
        "create container",
        "untar the tree + syncfs",
        "find over the inherited tree, cold",
        "stat every inherited file, warm",
        "append to 200 inherited files + syncfs",
    ];
    let n = systems.len();
    // [system][op] samples (ms); [system] space
    let mut t = vec![vec![Vec::new(); ops.len()]; n];
    let mut space = vec![Vec::new(); n];
    for round in 0..o.runs {
        sys::check_interrupted()?;
        for i in rotation(round, n) {
            let s = &mut systems[i];
            let c = s.create()?;
            let root = s.root();
            let new = root.join("new");
            fs::create_dir_all(&new)?;
            let start = Instant::now();
            sys::run(
                Command::new("tar")
                    .arg("-xf")
                    .arg(&tarball)
                    .arg("-C")
                    .arg(&new),
            )?;
            sys::syncfs(&root);
            let untar = start.elapsed();
            sys::drop_caches()?;
            let start = Instant::now();
            let found = sys::run(
                Command::new("find")
                    .arg(root.join("tree"))
                    .args(["-type", "f"]),
            )?;
            let find = start.elapsed();
            if found.lines().count() != o.small_files {
                bail!("find saw {} files in {}", found.lines().count(), s.name());
            }
            let start = Instant::now();
            let mut seen = 0u64;
            walk(&root.join("tree"), &mut |_, md| seen += md.len())?;
            let stat = start.elapsed();
            std::hint::black_box(seen);
            let start = Instant::now();
            let step = (o.small_files / 200).max(1);
            for f in (0..o.small_files).step_by(step).take(200) {
                use std::io::Write;
                let p = root
                    .join("tree")
                    .join(format!("d{:03}", f / 100))
                    .join(format!("f{f:05}.c"));
                let mut h = fs::OpenOptions::new().append(true).open(&p)?;
                h.write_all(b"// edited\n")?;
            }
            sys::syncfs(&root);
            let edit = start.elapsed();
            let sp = s.space()?;
            s.destroy()?;
            eprintln!(
                "  small round {round} {:<22} create {:.1} untar {:.0} find {:.0} stat {:.1} edit {:.1} ms, {}",
                s.name(),
                ms(c),
                ms(untar),
                ms(find),
                ms(stat),
                ms(edit),
                bytes(sp as f64)
            );
            for (j, d) in [c, untar, find, stat, edit].iter().enumerate() {
                t[i][j].push(ms(*d));
            }
            space[i].push(sp as f64);
        }
    }
    out.section(
        "Many small files: where file copy-on-write should win",
        &format!(
            "An image holding a generated source tree of {} files ({} in all, 200 B – 16 KiB \
             each, 100 per directory). Per round and system: create a container, untar the \
             same tree (from a tarball) into a new directory of the container and sync the \
             file system, drop caches and `find` every inherited file, stat them all again \
             warm (a Rust walk), append a line to 200 inherited files and sync. btrfs makes \
             a container with `btrfs subvolume snapshot` (Docker's btrfs driver), xfs with \
             `cp -a --reflink=always` of the tree (its cost grows with the file count). \
             Ratios are against the plain directory in the same round.",
            o.small_files,
            bytes(total as f64)
        ),
    );
    let mut headers = vec!["system".to_string()];
    headers.extend(ops.iter().map(|s| s.to_string()));
    headers.push("host bytes added".into());
    let mut rows = Vec::new();
    for (i, s) in systems.iter().enumerate() {
        let mut row = vec![s.name().to_string()];
        for (j, op) in ops.iter().enumerate() {
            if i == 0 && j == 0 {
                row.push("—".into());
                continue;
            }
            let r = if i > 0 && j > 0 {
                st(&ratios(&t[i][j], &t[0][j]))
                    .map_or(String::new(), |r| format!(" ({}×)", fmt_num(r.median)))
            } else {
                String::new()
            };
            row.push(format!("{}{r}", cell(&t[i][j], " ms")));
            out.report
                .row("small", op, s.name(), Unit::Millis, &t[i][j], "");
        }
        // The plain directory is the baseline, not a container: it adds no copy to measure.
        row.push(if i == 0 {
            "—".into()
        } else {
            st(&space[i]).map_or("—".into(), |s| bytes(s.median))
        });
        rows.push(row);
    }
    let h: Vec<&str> = headers.iter().map(|s| s.as_str()).collect();
    out.table(&h, &rows);
    Ok(())
}

// ---- group: the user's own workload ---------------------------------------------------------

fn workload_group(o: &Opts, out: &mut Out, dir: &Path) -> Result<()> {
    let command = o.workload.as_deref().context("BENCH_WORKLOAD is not set")?;
    let wdir = dir.join("workload");
    fs::create_dir_all(&wdir)?;
    let _g = Remove(wdir.clone());
    let tree = wdir.join("image").join("tree");
    let (what, total, entries) = match &o.workload_image {
        Some(src) => {
            // `cargo bench` runs the bench in `benches/`, not where the user typed the command.
            if !src.is_absolute() {
                bail!(
                    "BENCH_WORKLOAD_IMAGE={} must be an absolute path",
                    src.display()
                );
            }
            if !src.is_dir() {
                bail!("BENCH_WORKLOAD_IMAGE={} is not a directory", src.display());
            }
            let (total, entries) = tree_size(src)?;
            // The image, the plain copy, and one copy in each of btrfs, xfs and the two
            // thins, before the workload writes anything.
            let need = 6 * total + GIB;
            let free = sys::fs_free(&wdir)?;
            if free < need {
                bail!(
                    "the workload's image ({}) needs about {} free in {} (six copies and room \
                     to write); there are {}",
                    bytes(total as f64),
                    bytes(need as f64),
                    wdir.display(),
                    bytes(free as f64)
                );
            }
            fs::create_dir_all(&tree)?;
            // The directory's content, not the directory: `src/.` into `tree`.
            sys::run(Command::new("cp").arg("-a").arg(src.join(".")).arg(&tree))?;
            (format!("a copy of `{}`", src.display()), total, entries)
        }
        None => {
            fs::create_dir_all(&tree)?;
            make_tree(&tree, o.small_files)?;
            let (total, entries) = tree_size(&tree)?;
            (
                format!(
                    "the `small` group's generated tree of {} files",
                    o.small_files
                ),
                total,
                entries,
            )
        }
    };
    eprintln!("workload: `{command}` on {what}, {}", bytes(total as f64));
    let mut systems = tree_systems(&wdir, total, entries)?;
    // The plain baseline copies and deletes a whole image around the timed runs: let the
    // disk settle before each one, as the first-write group does.
    let mut settle = sys::DiskSettle::new(&wdir)?;
    let n = systems.len();
    // [system] samples: creation ms, workload ms, host bytes added
    let mut create = vec![Vec::new(); n];
    let mut work = vec![Vec::new(); n];
    let mut space = vec![Vec::new(); n];
    for round in 0..o.runs {
        sys::check_interrupted()?;
        for i in rotation(round, n) {
            let s = &mut systems[i];
            settle.wait(SETTLE_LIMIT)?;
            let c = s.create()?;
            let root = s.root();
            sys::drop_caches()?;
            settle.wait(SETTLE_LIMIT)?;
            let start = Instant::now();
            // In a PID namespace of its own: whatever the command leaves running in the
            // background dies with it, and cannot keep the container busy.
            let run = Command::new("unshare")
                .args(["--pid", "--fork", "--kill-child", "sh", "-c"])
                .arg(command)
                .current_dir(root.join("tree"))
                .env("BENCH_SYSTEM", s.name())
                .output()
                .context("cannot start unshare")?;
            // All file systems, for every system alike: what the command wrote outside the
            // container (tool caches, temporary files) is paid by each of them.
            nix::unistd::sync();
            let w = start.elapsed();
            if !run.status.success() {
                let _ = s.destroy();
                bail!(
                    "the workload failed on {} ({}): {}",
                    s.name(),
                    run.status,
                    String::from_utf8_lossy(&run.stderr).trim()
                );
            }
            let sp = s.space()?;
            s.destroy()?;
            eprintln!(
                "  workload round {round} {:<22} create {:.1} ms, workload {:.1} ms, {}",
                s.name(),
                ms(c),
                ms(w),
                bytes(sp as f64)
            );
            create[i].push(ms(c));
            work[i].push(ms(w));
            space[i].push(sp as f64);
        }
    }
    out.section(
        "Your workload",
        &format!(
            "`{command}` (`BENCH_WORKLOAD`), run by `sh -c` in the container's copy of the \
             image, {what} ({} in all). Per round and system: create a container, drop \
             caches, run the command (in a PID namespace of its own) and `sync` (both timed: \
             deferred writes count), then the host bytes the container added. The plain \
             directory is a fresh copy of the image each round. `BENCH_SYSTEM` tells the \
             command where it runs. Ratios are against the plain directory in the same round.",
            bytes(total as f64)
        ),
    );
    let mut rows = Vec::new();
    for (i, s) in systems.iter().enumerate() {
        let ratio = if i == 0 {
            String::new()
        } else {
            st(&ratios(&work[i], &work[0]))
                .map_or(String::new(), |r| format!(" ({}×)", fmt_num(r.median)))
        };
        rows.push(vec![
            s.name().to_string(),
            if i == 0 {
                "—".into()
            } else {
                cell(&create[i], " ms")
            },
            format!("{}{ratio}", cell(&work[i], " ms")),
            if i == 0 {
                "—".into()
            } else {
                st(&space[i]).map_or("—".into(), |s| bytes(s.median))
            },
        ]);
        if i > 0 {
            out.report.row(
                "workload",
                "create container",
                s.name(),
                Unit::Millis,
                &create[i],
                "",
            );
            out.report.row(
                "workload",
                "host bytes added",
                s.name(),
                Unit::Bytes,
                &space[i],
                "",
            );
        }
        out.report.row(
            "workload",
            "workload + sync",
            s.name(),
            Unit::Millis,
            &work[i],
            command,
        );
    }
    out.table(
        &[
            "system",
            "create container",
            "workload + sync",
            "host bytes added",
        ],
        &rows,
    );
    Ok(())
}

// ---- group: block size sweep ---------------------------------------------------------------

fn blocksize_group(o: &Opts, out: &mut Out, dir: &Path) -> Result<()> {
    let image = 256 * MIB;
    let writes = 400usize;
    let mut pools = Vec::new();
    for &bs in &o.block_sizes {
        let block = DataBlockSize::from_bytes(bs)
            .with_context(|| format!("{bs} is not a data block size"))?;
        eprintln!("blocksize: image for {}", engine::units::format_size(bs));
        pools.push(EngineSys::new(
            dir,
            &format!("bs{bs}"),
            image,
            block,
            31,
            &[],
        )?);
    }
    let n = pools.len();
    // [pool] samples: µs per write, bytes added per write, commit ms
    let mut us = vec![Vec::new(); n];
    let mut per_write = vec![Vec::new(); n];
    let mut commit = vec![Vec::new(); n];
    for round in 0..o.runs {
        sys::check_interrupted()?;
        let mut rng = SmallRng::seed_from_u64(100 + round as u64);
        let offs: Vec<u64> = (0..writes)
            .map(|_| rng.gen_range(0..image / 4096) * 4096)
            .collect();
        for i in rotation(round, n) {
            let p = &mut pools[i];
            p.create()?;
            sys::drop_caches()?;
            let buf = benches::pattern(4096, round as u64);
            let thin = p.thin()?;
            let start = Instant::now();
            for &off in &offs {
                thin.write(&buf, off)?;
            }
            let w = start.elapsed();
            let start = Instant::now();
            thin.flush()?;
            let c = start.elapsed();
            let sp = p.space()?;
            p.destroy()?;
            us[i].push(w.as_secs_f64() * 1e6 / writes as f64);
            commit[i].push(ms(c));
            per_write[i].push(sp as f64 / writes as f64);
        }
    }
    out.section(
        "Thin pool block size: copy-on-write cost against space",
        &format!(
            "Engine API, one pool per data block size, each with a 256 MiB image thin of \
             incompressible data. Per round: snapshot, drop caches, {writes} random 4 KiB \
             writes into the snapshot (the same offsets for every block size in a round; \
             larger blocks see more of them land in an already copied block), then one flush \
             (a commit). Space is the pool's data and metadata growth per write."
        ),
    );
    let mut rows = Vec::new();
    let mut c1 = Chart {
        title: "Block size: µs per 4 KiB first write (cold) and KiB added per write".into(),
        x_label: "data block size (KiB)".into(),
        y_label: "µs per write / KiB per write (log)".into(),
        x_log: true,
        y_log: true,
        ..Chart::default()
    };
    let mut s_us = series("µs per write", Vec::new());
    let mut s_sp = series("KiB added per write", Vec::new());
    for (i, &bs) in o.block_sizes.iter().enumerate() {
        let label = engine::units::format_size(bs);
        let kib: Vec<f64> = per_write[i].iter().map(|b| b / KIB as f64).collect();
        rows.push(vec![
            label.clone(),
            cell(&us[i], " µs"),
            cell(&commit[i], " ms"),
            cell(&kib, " KiB"),
            st(&kib).map_or("—".into(), |s| {
                format!("{:.1}×", s.median * 1024.0 / 4096.0)
            }),
        ]);
        out.record("blocksize", "4 KiB CoW write", &label, Unit::Micros, &us[i]);
        out.record(
            "blocksize",
            "bytes added per write",
            &label,
            Unit::Bytes,
            &per_write[i],
        );
        let x = (bs / KIB) as f64;
        if let Some(p) = point(x, &us[i]) {
            s_us.points.push(p);
        }
        if let Some(p) = point(x, &kib) {
            s_sp.points.push(p);
        }
    }
    c1.series = vec![s_us, s_sp];
    out.table(
        &[
            "block size",
            "µs per 4 KiB write into shared data",
            "final flush (commit)",
            "space added per write",
            "space ÷ bytes written",
        ],
        &rows,
    );
    out.chart("blocksize.svg", c1);
    Ok(())
}

// ---- main ----------------------------------------------------------------------------------

fn context(o: &Opts, out: &mut Out, dir: &Path) {
    let r = &mut out.report;
    r.context("bench", "cow: block versus file copy-on-write");
    r.context("commit", benches::git_commit());
    r.context(
        "machine",
        format!(
            "{} CPUs, {}",
            benches::cpus(),
            fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| m.lines().next().map(|l| l
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_string()))
                .and_then(|kb| kb.parse::<u64>().ok())
                .map_or("? RAM".into(), |kb| format!(
                    "{:.0} GiB RAM",
                    kb as f64 / 1048576.0
                ))
        ),
    );
    r.context("kernel", benches::kernel());
    r.context("scratch", benches::filesystem_of(dir));
    for (name, prog, args) in [
        ("fio", "fio", &[][..]),
        ("qemu-img", "qemu-img", &[][..]),
        ("btrfs-progs", "mkfs.btrfs", &["-V"][..]),
        ("xfsprogs", "mkfs.xfs", &["-V"][..]),
        ("e2fsprogs", "mkfs.ext4", &["-V"][..]),
    ] {
        r.context(name, sys::version(prog, args));
    }
    r.context(
        "parameters",
        format!(
            "sizes {:?}, runs {} (first write {}), fio {} s on {}, snap origins {:?}, depths {:?}, small files {}, block sizes {:?}",
            o.sizes.iter().map(|s| engine::units::format_size(*s)).collect::<Vec<_>>(),
            o.runs,
            o.first_runs,
            o.fio_seconds,
            engine::units::format_size(o.fio_size),
            o.snap_sizes.iter().map(|s| engine::units::format_size(*s)).collect::<Vec<_>>(),
            o.depths,
            o.small_files,
            o.block_sizes.iter().map(|s| engine::units::format_size(*s)).collect::<Vec<_>>(),
        ),
    );
    if let Some(w) = &o.workload {
        let image = o.workload_image.as_ref().map_or_else(
            || "the generated tree".to_string(),
            |p| p.display().to_string(),
        );
        r.context("workload", format!("`{w}` on {image}"));
    }
    r.context("load before", benches::loadavg());
    r.context("cpu pressure before", benches::cpu_pressure());
}

fn write_results(o: &Opts, out: &Out, started: Instant) -> Result<()> {
    fs::create_dir_all(&o.out)?;
    let mut md = String::new();
    let _ = writeln!(md, "# Block versus file copy-on-write: latest run\n");
    let _ = writeln!(
        md,
        "Written by `cargo bench -p benches --bench cow` (see benches/README.md). Medians \
         [min–max] over the rounds; ratios are per round.\n"
    );
    let _ = writeln!(md, "| context | |\n| --- | --- |");
    for (k, v) in &out.report.context {
        let _ = writeln!(md, "| {k} | {} |", v.replace('|', "/"));
    }
    let _ = writeln!(
        md,
        "| wall time | {:.0} s |",
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(md, "\n## Targets (issue 8)\n");
    let _ = writeln!(
        md,
        "The median decides; the last column says in how many rounds the goal held on its own.\n"
    );
    let _ = writeln!(
        md,
        "| target | measured | met | rounds that met it |\n| --- | --- | --- | --- |"
    );
    for TargetLine {
        what,
        measured,
        verdict,
    } in &out.targets
    {
        let (m, rounds) = match verdict {
            Some((true, r)) => ("yes", r.as_str()),
            Some((false, r)) => ("**no**", r.as_str()),
            None => ("—", "—"),
        };
        let _ = writeln!(md, "| {what} | {measured} | {m} | {rounds} |");
    }
    md.push_str(&out.md);
    fs::write(o.out.join("cow.md"), md)?;
    out.report.write_json(&o.out.join("cow.json"))?;
    for (file, chart) in &out.charts {
        fs::write(o.out.join(file), chart.render())?;
    }
    eprintln!("cow bench: results in {}", o.out.display());
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    sys::stop_on_signals()?;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("cow bench: skipped (needs root for mounts, loop devices, FUSE, drop_caches)");
        return Ok(());
    }
    let o = Opts::from_env();
    let started = Instant::now();
    let scratch = benches::scratch_dir(o.dir.as_deref(), "thinbox-cow-")?;
    let dir = scratch.path().to_path_buf();
    let mut out = Out {
        report: Report::new(),
        md: String::new(),
        charts: Vec::new(),
        targets: Vec::new(),
    };
    context(&o, &mut out, &dir);
    // A group that fails is reported in its place and the others still run; the exit status
    // says so at the end, for scripts.
    let mut failed = Vec::new();
    let mut step = |name: &str, out: &mut Out, f: &mut dyn FnMut(&mut Out) -> Result<()>| {
        if !o.wants(name) || sys::interrupted() {
            return;
        }
        let t = Instant::now();
        if let Err(e) = f(out) {
            eprintln!("cow bench: group {name} failed: {e:#}");
            out.section(&format!("{name}: failed"), &format!("`{e:#}`"));
            failed.push(name.to_string());
        }
        out.report.context(
            &format!("time {name}"),
            format!("{:.0} s", t.elapsed().as_secs_f64()),
        );
    };
    let mut first_failed = false;
    if o.wants("first") || o.wants("fio") {
        let t = Instant::now();
        match first_and_fio(&o, &mut out, &dir) {
            Ok((firsts, fr)) => {
                if !firsts.is_empty() {
                    report_first(&o, &mut out, &firsts);
                }
                if let Some(fr) = fr {
                    report_fio(&o, &mut out, &fr);
                }
            }
            Err(e) => {
                eprintln!("cow bench: first/fio failed: {e:#}");
                out.section("first write / fio: failed", &format!("`{e:#}`"));
                first_failed = true;
            }
        }
        out.report.context(
            "time first+fio",
            format!("{:.0} s", t.elapsed().as_secs_f64()),
        );
    }
    step("snap", &mut out, &mut |out| snap_group(&o, out, &dir));
    step("runtime", &mut out, &mut |out| runtime_group(&o, out, &dir));
    step("chain", &mut out, &mut |out| chain_group(&o, out, &dir));
    step("small", &mut out, &mut |out| small_group(&o, out, &dir));
    if o.workload.is_some() {
        step("workload", &mut out, &mut |out| {
            workload_group(&o, out, &dir)
        });
    } else if o.filter.as_deref() == Some("workload") {
        eprintln!(
            "cow bench: the workload group runs the command in BENCH_WORKLOAD; it is not set"
        );
    }
    step("blocksize", &mut out, &mut |out| {
        blocksize_group(&o, out, &dir)
    });
    // An interrupted run leaves the last complete results in place.
    sys::check_interrupted()?;
    out.report.context("load after", benches::loadavg());
    out.report
        .context("cpu pressure after", benches::cpu_pressure());
    write_results(&o, &out, started)?;
    print!("{}", fs::read_to_string(o.out.join("cow.md"))?);
    if first_failed {
        failed.insert(0, "first/fio".to_string());
    }
    if !failed.is_empty() {
        bail!(
            "groups that failed (their errors are in {}): {}",
            o.out.join("cow.md").display(),
            failed.join(", ")
        );
    }
    Ok(())
}
