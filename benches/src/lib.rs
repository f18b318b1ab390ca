//! Benchmark harness for thinbox: targets, workloads, timing and the results table.
//!
//! - [`Target`]: something a workload reads and writes by byte offset. A plain file
//!   ([`PlainFile`], the baseline) and a thin device ([`engine::Thin`]) both implement it, so
//!   each comparison runs the very same loop on both sides.
//! - Workloads ([`seq_write`], [`seq_read`], [`rand_write`], [`rand_read`]) return the
//!   elapsed time; nothing in them syncs unless the caller asks ([`Target::flush`]).
//! - [`Stats`]: median and range of repeated samples; [`Report`] prints the tables and
//!   writes JSON (`BENCH_JSON=path`).
//! - [`NullDevice`]: a data device that reads zeros and drops writes, so building a pool
//!   with a million mappings costs only the metadata work.
//!
//! Timing uses `std::time::Instant` (wall) and the thread's CPU clock ([`measure`]). Every
//! figure is the median of `BENCH_RUNS` rounds; comparisons are interleaved step by step and
//! report the median of the per-step ratios (the method of `shared/design/perf-anchors.md`).
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use engine::io::{BlockDevice, FileDevice};
use engine::Thin;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

pub mod svg;
pub mod sys;

// ---- configuration ----------------------------------------------------------------------

/// Knobs, all from the environment.
#[derive(Clone, Debug)]
pub struct Config {
    /// `BENCH_SIZE`: bytes written and read by the throughput workloads (default 1G).
    pub size: u64,
    /// `BENCH_DIR`: where the scratch tempdir, holding the pool and plain files, goes
    /// (default /var/tmp).
    pub dir: Option<PathBuf>,
    /// `BENCH_RUNS`: repetitions of every measurement (default 5).
    pub runs: usize,
    /// `BENCH_OPS`: 4 KiB operations per random-IO run (default 50000).
    pub ops: usize,
    /// `BENCH_SNAP_MAPPED`: bytes mapped by the large create_snap origin (default 64G).
    pub snap_mapped: u64,
    /// `BENCH_COLD=0` skips the cold-cache read comparison (default: run it).
    pub cold: bool,
    /// `BENCH_JSON`: write every figure to this file as JSON.
    pub json: Option<PathBuf>,
    /// `BENCH_FILTER`: only run groups whose name contains this.
    pub filter: Option<String>,
}

fn env_size(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => engine::units::parse_size(&v)
            .unwrap_or_else(|| panic!("{name}={v}: not a size (e.g. 512M, 1G)")),
        Err(_) => default,
    }
}

/// A number from the environment variable `name`, or `default` when it is not set; a value
/// that is not a number stops the run with a message naming the variable.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) => default,
    }
}

impl Config {
    pub fn from_env() -> Config {
        Config {
            size: env_size("BENCH_SIZE", 1 << 30),
            dir: std::env::var_os("BENCH_DIR").map(PathBuf::from),
            runs: env_num("BENCH_RUNS", 5usize).max(1),
            ops: env_num("BENCH_OPS", 50_000usize).max(1),
            snap_mapped: env_size("BENCH_SNAP_MAPPED", 64 << 30),
            cold: std::env::var("BENCH_COLD").map_or(true, |v| v != "0"),
            json: std::env::var_os("BENCH_JSON").map(PathBuf::from),
            filter: std::env::var("BENCH_FILTER").ok(),
        }
    }

    /// Whether the group `name` is selected by `BENCH_FILTER`.
    pub fn wants(&self, name: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| name.contains(f))
    }

    /// The scratch directory: a new tempdir in `BENCH_DIR`, or in /var/tmp (disk, not
    /// tmpfs). Dropping the returned guard deletes it.
    pub fn scratch(&self) -> io::Result<(PathBuf, tempfile::TempDir)> {
        let t = scratch_dir(self.dir.as_deref(), "thinbox-bench-")?;
        Ok((t.path().to_path_buf(), t))
    }
}

/// A new tempdir named `prefix…` in `base` (created if missing), or in /var/tmp: a run never
/// meets the files of an earlier one, and leaves none behind, even when `BENCH_DIR` names a
/// shared directory.
pub fn scratch_dir(base: Option<&Path>, prefix: &str) -> io::Result<tempfile::TempDir> {
    let base = base.unwrap_or(Path::new("/var/tmp"));
    std::fs::create_dir_all(base)?;
    tempfile::Builder::new().prefix(prefix).tempdir_in(base)
}

// ---- devices ----------------------------------------------------------------------------

/// A data device that holds nothing: reads return zeros, writes are dropped. For workloads
/// whose data does not matter (building large mapping trees, pure metadata cost).
pub struct NullDevice {
    size: std::sync::atomic::AtomicU64,
}

impl NullDevice {
    pub fn new(size: u64) -> NullDevice {
        NullDevice {
            size: std::sync::atomic::AtomicU64::new(size),
        }
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "access past the end of the null device",
            )),
        }
    }
}

impl BlockDevice for NullDevice {
    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)?;
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check(offset, buf.len() as u64)
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check(offset, len)
    }

    fn grow(&self, new_size: u64) -> io::Result<()> {
        self.size
            .fetch_max(new_size, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn describe(&self) -> String {
        "null".to_string()
    }
}

/// Drops a file's clean pages from the page cache (after an fsync), so the next reads go to
/// the disk. Per file, needs no privileges and leaves everyone else's cache alone.
pub fn drop_file_cache(file: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    file.sync_all()?;
    nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(io::Error::from)
}

// ---- targets and workloads --------------------------------------------------------------

/// What a workload drives: a plain file or a thin device.
pub trait Target {
    fn write(&self, buf: &[u8], offset: u64) -> anyhow::Result<()>;
    fn read(&self, buf: &mut [u8], offset: u64) -> anyhow::Result<()>;
    /// Makes the writes durable: `fdatasync` for a file, a pool commit for a thin.
    fn flush(&self) -> anyhow::Result<()>;
}

/// The baseline: a sparse file accessed through the engine's own `FileDevice` (the same
/// `pwrite`/`pread` calls the pool's data device makes).
pub struct PlainFile(pub FileDevice);

impl PlainFile {
    pub fn create(path: &Path, size: u64) -> io::Result<PlainFile> {
        FileDevice::create(path, size).map(PlainFile)
    }
}

impl Target for PlainFile {
    fn write(&self, buf: &[u8], offset: u64) -> anyhow::Result<()> {
        Ok(self.0.write_at(buf, offset)?)
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
        Ok(self.0.read_at(buf, offset)?)
    }
    fn flush(&self) -> anyhow::Result<()> {
        Ok(self.0.sync()?)
    }
}

impl Target for Thin {
    fn write(&self, buf: &[u8], offset: u64) -> anyhow::Result<()> {
        Ok(Thin::write(self, buf, offset)?)
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
        Ok(Thin::read(self, buf, offset)?)
    }
    fn flush(&self) -> anyhow::Result<()> {
        Ok(Thin::flush(self)?)
    }
}

/// A buffer of incompressible bytes (contents never matter to the engine; this keeps a
/// future compressing layer honest).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// `n` offsets of `io`-byte aligned requests spread uniformly over `[0, span)`.
pub fn random_offsets(n: usize, span: u64, io: u64, seed: u64) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let slots = span / io;
    (0..n).map(|_| rng.gen_range(0..slots) * io).collect()
}

/// Writes `[start, end)` in `chunk`-byte requests, in order.
pub fn seq_write(
    t: &dyn Target,
    start: u64,
    end: u64,
    chunk: usize,
    buf: &[u8],
) -> anyhow::Result<Duration> {
    let began = Instant::now();
    let mut off = start;
    while off < end {
        t.write(&buf[..chunk], off)?;
        off += chunk as u64;
    }
    Ok(began.elapsed())
}

/// Reads `[start, end)` in `chunk`-byte requests, in order.
pub fn seq_read(t: &dyn Target, start: u64, end: u64, chunk: usize) -> anyhow::Result<Duration> {
    let mut buf = vec![0u8; chunk];
    let began = Instant::now();
    let mut off = start;
    while off < end {
        t.read(&mut buf, off)?;
        off += chunk as u64;
    }
    std::hint::black_box(&buf);
    Ok(began.elapsed())
}

/// Writes `buf` at each offset.
pub fn rand_write(t: &dyn Target, offsets: &[u64], buf: &[u8]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    for &off in offsets {
        t.write(buf, off)?;
    }
    Ok(start.elapsed())
}

/// Reads `len` bytes at each offset.
pub fn rand_read(t: &dyn Target, offsets: &[u64], len: usize) -> anyhow::Result<Duration> {
    let mut buf = vec![0u8; len];
    let start = Instant::now();
    for &off in offsets {
        t.read(&mut buf, off)?;
    }
    std::hint::black_box(&buf);
    Ok(start.elapsed())
}

/// Times one call.
pub fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let r = f();
    (r, start.elapsed())
}

/// CPU time this thread has used (user + system). For work that stays in the page cache it
/// is much less disturbed than wall time by other processes competing for the CPUs.
pub fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// Wall and thread CPU time of one measured step.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub wall: Duration,
    pub cpu: Duration,
}

impl std::ops::AddAssign for Sample {
    fn add_assign(&mut self, o: Sample) {
        self.wall += o.wall;
        self.cpu += o.cpu;
    }
}

/// Runs `f`, returning its result with the wall and CPU time it took.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Sample) {
    let c0 = thread_cpu();
    let start = Instant::now();
    let r = f();
    let wall = start.elapsed();
    let cpu = thread_cpu().saturating_sub(c0);
    (r, Sample { wall, cpu })
}

// ---- statistics -------------------------------------------------------------------------

/// Median and range of repeated samples.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    pub fn of(samples: &[f64]) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stats {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        }
    }
}

/// How a figure is expressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Unit {
    /// MiB per second (bigger is better).
    MiBps,
    /// Operations per second (bigger is better).
    Iops,
    /// Microseconds per operation (smaller is better).
    Micros,
    /// Milliseconds per operation (smaller is better).
    Millis,
    /// Bytes (space used; smaller is better).
    Bytes,
}

impl Unit {
    pub fn label(self) -> &'static str {
        match self {
            Unit::MiBps => "MiB/s",
            Unit::Iops => "IOPS",
            Unit::Micros => "µs/op",
            Unit::Millis => "ms",
            Unit::Bytes => "bytes",
        }
    }

    /// A throughput in this unit from `bytes` or `ops` done in `d`.
    pub fn from_run(self, d: Duration, bytes: u64, ops: u64) -> f64 {
        let s = d.as_secs_f64();
        match self {
            Unit::MiBps => bytes as f64 / (1u64 << 20) as f64 / s,
            Unit::Iops => ops as f64 / s,
            Unit::Micros => s * 1e6 / ops as f64,
            Unit::Millis => s * 1e3 / ops as f64,
            Unit::Bytes => bytes as f64,
        }
    }
}

/// A figure with three significant digits and thousands separators.
pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 {
        // Thousands separators for readability.
        let s = format!("{:.0}", x);
        let (sign, digits) = s.split_at(if s.starts_with('-') { 1 } else { 0 });
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// `median [min–max]`, the median shown against `goal` where there is one ([`Goal::show`]).
pub fn fmt_stats_for(s: &Stats, goal: Option<Goal>) -> String {
    match goal {
        Some(g) => format!(
            "{} [{}–{}]",
            g.show(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
        None => fmt_stats(s),
    }
}

/// `median [min–max]`.
pub fn fmt_stats(s: &Stats) -> String {
    format!(
        "{} [{}–{}]",
        fmt_num(s.median),
        fmt_num(s.min),
        fmt_num(s.max)
    )
}

// ---- report -----------------------------------------------------------------------------

/// One measured figure.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub group: String,
    pub name: String,
    pub device: String,
    pub unit: Unit,
    pub stats: Stats,
    /// Every sample, in run order.
    pub samples: Vec<f64>,
    pub note: String,
}

/// A goal on a ratio or on an absolute figure.
#[derive(Clone, Copy, Debug, Serialize)]
pub enum Goal {
    /// The value must be at least this.
    AtLeast(f64),
    /// The value must be at most this.
    AtMost(f64),
}

impl Goal {
    pub fn met(self, v: f64) -> bool {
        match self {
            Goal::AtLeast(g) => v >= g,
            Goal::AtMost(g) => v <= g,
        }
    }

    /// How many of `samples` meet the goal.
    pub fn count_met(self, samples: &[f64]) -> usize {
        samples.iter().filter(|&&v| self.met(v)).count()
    }

    /// `v` as tables show it ([`fmt_num`]), with more digits where that rounding would seem
    /// to meet a goal `v` misses, or the other way round: a median of 1.0017 against
    /// "≤ 1.00" reads 1.002, not a 1.00 that fails its goal.
    pub fn show(self, v: f64) -> String {
        let same_side = |shown: &str| {
            let read: Option<f64> = shown.replace(',', "").parse().ok();
            read.is_none_or(|r| self.met(r) == self.met(v))
        };
        let shown = fmt_num(v);
        if same_side(&shown) {
            return shown;
        }
        // One more decimal at a time, until the figure as read falls where `v` does.
        (1..=9)
            .map(|decimals| format!("{v:.decimals$}"))
            .find(|s| same_side(s))
            .unwrap_or_else(|| v.to_string())
    }

    /// "≥ 1,000×", "≤ 3.70 ms": the goal as tables show it (`unit` as it follows a number).
    pub fn describe(self, unit: &str) -> String {
        match self {
            Goal::AtLeast(g) => format!("≥ {}{unit}", fmt_num(g)),
            Goal::AtMost(g) => format!("≤ {}{unit}", fmt_num(g)),
        }
    }
}

/// A thin-vs-baseline comparison, or a goal on one figure.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub baseline: Option<String>,
    pub value: String,
    /// Median of the per-round ratios (or the figure itself for absolute goals).
    pub stats: Stats,
    /// The same ratio computed from thread CPU time, where that was measured.
    pub cpu: Option<Stats>,
    pub unit: String,
    pub goal: Option<Goal>,
    /// Whether the median meets the goal: what decides.
    pub met: Option<bool>,
    /// How many of the `stats.n` samples meet the goal on their own: how close a verdict
    /// is (a median that passes with 5 of 9 rounds is a coin toss, one with 9 of 9 is not).
    pub samples_met: Option<usize>,
}

/// Everything one bench run measured, with the context needed to read it.
#[derive(Default, Serialize)]
pub struct Report {
    pub context: Vec<(String, String)>,
    pub rows: Vec<Row>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new() -> Report {
        Report::default()
    }

    pub fn context(&mut self, key: &str, value: impl Into<String>) {
        self.context.push((key.to_string(), value.into()));
    }

    /// Records a figure and prints it at once (a long run shows progress).
    pub fn row(
        &mut self,
        group: &str,
        name: &str,
        device: &str,
        unit: Unit,
        samples: &[f64],
        note: &str,
    ) -> Stats {
        let stats = Stats::of(samples);
        eprintln!(
            "  {group:<10} {name:<44} {device:<8} {:>28} {}",
            fmt_stats(&stats),
            unit.label()
        );
        self.rows.push(Row {
            group: group.into(),
            name: name.into(),
            device: device.into(),
            unit,
            stats,
            samples: samples.to_vec(),
            note: note.into(),
        });
        stats
    }

    /// Records ratios (thin ÷ baseline, one per interleaved step) against a goal, with
    /// the same ratios from CPU time when given.
    pub fn ratio(
        &mut self,
        name: &str,
        baseline: &str,
        ratios: &[f64],
        cpu: Option<&[f64]>,
        goal: Option<Goal>,
    ) {
        let stats = Stats::of(ratios);
        self.checks.push(Check {
            name: name.into(),
            baseline: Some(baseline.into()),
            value: format!("{:.3}", stats.median),
            stats,
            cpu: cpu.filter(|c| !c.is_empty()).map(Stats::of),
            unit: "×".into(),
            goal,
            met: goal.map(|g| g.met(stats.median)),
            samples_met: goal.map(|g| g.count_met(ratios)),
        });
    }

    /// Records an absolute figure (its samples, one per round) against a goal.
    pub fn absolute(&mut self, name: &str, samples: &[f64], unit: &str, goal: Option<Goal>) {
        let stats = Stats::of(samples);
        self.checks.push(Check {
            name: name.into(),
            baseline: None,
            value: goal.map_or_else(|| fmt_num(stats.median), |g| g.show(stats.median)),
            stats,
            cpu: None,
            unit: unit.into(),
            goal,
            met: goal.map(|g| g.met(stats.median)),
            samples_met: goal.map(|g| g.count_met(samples)),
        });
    }

    /// The tables as text (also what README.md quotes).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.context {
            let _ = writeln!(out, "{k:<14} {v}");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Goals. Ratios are thin ÷ plain throughput, median [min–max] over n interleaved \
             steps (wall time; the CPU column: the same from thread CPU time); met: whether the \
             median meets the goal, and how many of the n steps do on their own:"
        );
        let _ = writeln!(
            out,
            "| check | median [min–max] | n | CPU-time ratio | goal | met |\n\
             | --- | --- | --- | --- | --- | --- |"
        );
        for c in &self.checks {
            let unit = if c.unit == "×" {
                String::new()
            } else {
                format!(" {}", c.unit)
            };
            let _ = writeln!(
                out,
                "| {} | {}{} | {} | {} | {} | {} |",
                c.name,
                fmt_stats_for(&c.stats, c.goal),
                unit,
                c.stats.n,
                c.cpu.as_ref().map_or("—".into(), fmt_stats),
                c.goal.map_or("—".into(), |g| g.describe(&unit)),
                match (c.met, c.samples_met) {
                    (None, _) => "—".into(),
                    (Some(met), k) => {
                        let word = if met { "yes" } else { "**NO**" };
                        match k {
                            Some(k) => format!("{word} ({k} of {})", c.stats.n),
                            None => word.into(),
                        }
                    }
                }
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Figures (median [min–max] over n runs):");
        out.push_str(&self.rows_table());
        out
    }

    /// Every figure as a markdown table: group, workload, device, median [min–max], unit, n,
    /// note.
    pub fn rows_table(&self) -> String {
        let mut out = String::from(
            "| group | workload | device | median [min–max] | unit | n | note |\n\
             | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.group,
                r.name,
                r.device,
                fmt_stats(&r.stats),
                r.unit.label(),
                r.stats.n,
                r.note
            );
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(io::Error::other)?;
        std::fs::write(path, text)
    }
}

// ---- environment ------------------------------------------------------------------------

/// `git rev-parse --short HEAD`, with `+dirty` when engine/ or benches/ differ from it.
pub fn git_commit() -> String {
    let out = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
    };
    let Some(head) = out(&["rev-parse", "--short", "HEAD"]).filter(|o| o.status.success()) else {
        return "unknown".into();
    };
    let mut s = String::from_utf8_lossy(&head.stdout).trim().to_string();
    // `git diff --quiet` reads the index without rewriting it.
    if let Some(d) = out(&["diff", "--quiet", "HEAD", "--", "../engine", "."]) {
        if d.status.code() == Some(1) {
            s.push_str("+dirty");
        }
    }
    s
}

/// The filesystem type, device, mount point and mount options holding `path` (longest
/// mount-point prefix).
pub fn filesystem_of(path: &Path) -> String {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return "unknown".into();
    };
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mp = Path::new(f[1]);
        if path.starts_with(mp) && best.as_ref().is_none_or(|(l, _)| f[1].len() > *l) {
            // With its options: `discard` and friends change what a deletion costs later.
            let options = f.get(3).copied().unwrap_or("");
            best = Some((
                f[1].len(),
                format!("{} on {} ({}, {options})", f[2], f[0], f[1]),
            ));
        }
    }
    best.map_or("unknown".into(), |(_, s)| s)
}

/// The 1-minute load average, to judge how busy the machine was.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `/proc/pressure/cpu` "some" averages: the share of time runnable tasks waited for a CPU.
pub fn cpu_pressure() -> String {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.trim_start_matches("some ").to_string())
        })
        .unwrap_or_default()
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_rounded_onto_its_goal_shows_which_side_it_is_on() {
        let at_most = Goal::AtMost(1.0);
        assert_eq!(at_most.show(1.0017), "1.002");
        assert_eq!(at_most.show(1.0004), "1.0004");
        assert_eq!(
            at_most.show(0.9981),
            "0.998",
            "rounding keeps it on its side"
        );
        assert_eq!(at_most.show(1.0), "1.00");
        assert_eq!(at_most.show(1.62), "1.62");
        let at_least = Goal::AtLeast(1000.0);
        assert_eq!(at_least.show(999.7), "999.7");
        assert_eq!(at_least.show(999.96), "999.96");
        assert_eq!(at_least.show(1518.0), "1,518");
    }
}
