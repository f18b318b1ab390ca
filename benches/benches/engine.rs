//! thinbox engine benchmarks: a file-backed pool against a plain file in the same run, and
//! the CPU cost per operation on memory devices. See benches/README.md for how to run it and
//! what the figures mean.
//!
//! Groups (select with `BENCH_FILTER=<substring>` of the group name):
//! - `file/seqwrite`: sequential 1 MiB writes into unprovisioned space (a new thin, a new
//!   sparse file), then a flush; baselines: a plain file written in 1 MiB pwrites (the same
//!   operation) and one written in 64 KiB pwrites (the calls the thin makes);
//! - `hot/w64`, `hot/readahead`: 4 KiB random overwrites of provisioned blocks (with and
//!   without a final flush), sequential 1 MiB and random 4 KiB reads, page cache hot. In
//!   `w64` both files' page caches were filled by 64 KiB writes, in `readahead` by a
//!   sequential read after dropping them: the kernel's folio sizes differ between the two and
//!   change 4 KiB overwrite costs several-fold, so both sides always start from the same one;
//! - `cold`: the reads after dropping both files' pages (fadvise), from the disk;
//! - `cow`: first 4 KiB write into a block shared with a snapshot (one 64 KiB copy each);
//! - `snap`: `create_snap` (and `create_snap` + `commit`) on an origin with 1 GiB and with
//!   `BENCH_SNAP_MAPPED` (64 GiB) mapped, data on a `NullDevice`;
//! - `commit`: commit latency against the number of new mappings since the last commit;
//! - `mem`: µs per operation on `MemDevice`/`NullDevice` (engine CPU cost, no syscalls).
//!
//! Thin-vs-plain comparisons are interleaved: each round is cut into steps (64 MiB, or 2500
//! random operations) and every step runs on every side back to back, rotating which side
//! goes first; ratios are per step, so the load of other processes hits both sides alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use benches::*;
use engine::io::{BlockDevice, FileDevice, MemDevice};
use engine::thin::metadata::Metadata;
use engine::{BlockTime, DataBlockSize, Pool, PoolOptions, Thin, ThinId};
use rand::seq::SliceRandom;
use rand::SeedableRng;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
const BLOCK: u64 = 64 * KIB;

fn id(n: u64) -> ThinId {
    ThinId::new(n).expect("small id")
}

/// Syncs the scratch filesystem so that writeback and discards of earlier steps do not land
/// inside the next measurement.
fn settle(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f));
    }
}

/// A file-backed pool with one thin (id 0) open, and handles on its files.
struct FilePool {
    thin: Option<Thin>,
    pool: Option<Arc<Pool>>,
    meta: Arc<FileDevice>,
    data: Arc<FileDevice>,
    paths: [PathBuf; 2],
}

impl FilePool {
    fn create(dir: &Path, tag: &str, data_size: u64) -> Result<FilePool> {
        let mp = dir.join(format!("meta-{tag}"));
        let dp = dir.join(format!("data-{tag}"));
        let meta = Arc::new(FileDevice::create(&mp, 64 * MIB + data_size / 256)?);
        let data = Arc::new(FileDevice::create(&dp, data_size)?);
        let m: Arc<dyn BlockDevice> = meta.clone();
        let d: Arc<dyn BlockDevice> = data.clone();
        let pool = Pool::format(m, d, DataBlockSize::DEFAULT, PoolOptions::default())?;
        pool.create_thin(id(0))?;
        pool.commit()?;
        let thin = pool.open_thin(id(0))?;
        Ok(FilePool {
            thin: Some(thin),
            pool: Some(pool),
            meta,
            data,
            paths: [mp, dp],
        })
    }

    fn thin(&self) -> &Thin {
        self.thin.as_ref().expect("open")
    }

    fn pool(&self) -> &Arc<Pool> {
        self.pool.as_ref().expect("open")
    }

    fn drop_caches(&self) -> Result<()> {
        self.pool().commit()?;
        drop_file_cache(self.meta.file())?;
        drop_file_cache(self.data.file())?;
        Ok(())
    }
}

impl Drop for FilePool {
    fn drop(&mut self) {
        self.thin = None;
        self.pool = None;
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct PlainPath {
    file: PlainFile,
    path: PathBuf,
}

impl PlainPath {
    fn create(dir: &Path, tag: &str, size: u64) -> Result<PlainPath> {
        let path = dir.join(format!("plain-{tag}"));
        Ok(PlainPath {
            file: PlainFile::create(&path, size)?,
            path,
        })
    }
}

impl Drop for PlainPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An interleaved comparison: every round is cut into steps, and each step runs on every
/// side back to back (starting with a different side each step), so load from other
/// processes hits all sides alike. The thin is the last side.
struct Cmp {
    names: Vec<&'static str>,
    /// [side][round]: time of the whole round.
    totals: Vec<Vec<Sample>>,
    /// [base side][step]: thin throughput ÷ base throughput in that step, wall and CPU.
    ratio_wall: Vec<Vec<f64>>,
    ratio_cpu: Vec<Vec<f64>>,
}

impl Cmp {
    fn new(names: &[&'static str]) -> Cmp {
        let n = names.len();
        Cmp {
            names: names.to_vec(),
            totals: vec![Vec::new(); n],
            ratio_wall: vec![Vec::new(); n - 1],
            ratio_cpu: vec![Vec::new(); n - 1],
        }
    }

    /// One round of `steps` steps; step `k` runs `f(side, target, k)` on every side.
    fn round(
        &mut self,
        round: usize,
        sides: &[&dyn Target],
        steps: usize,
        mut f: impl FnMut(usize, &dyn Target, usize) -> Result<()>,
    ) -> Result<()> {
        let n = sides.len();
        let mut totals = vec![Sample::default(); n];
        for k in 0..steps {
            let mut step = vec![Sample::default(); n];
            for j in 0..n {
                let i = (round + k + j) % n;
                let (res, s) = measure(|| f(i, sides[i], k));
                res?;
                step[i] = s;
            }
            for (t, s) in totals.iter_mut().zip(&step) {
                *t += *s;
            }
            self.add_ratios(&step);
        }
        for (t, s) in self.totals.iter_mut().zip(totals) {
            t.push(s);
        }
        Ok(())
    }

    /// A round measured elsewhere as one step (e.g. writes plus a final flush).
    fn push(&mut self, step: &[Sample]) {
        self.add_ratios(step);
        for (t, s) in self.totals.iter_mut().zip(step) {
            t.push(*s);
        }
    }

    fn add_ratios(&mut self, step: &[Sample]) {
        let thin = step.len() - 1;
        for b in 0..thin {
            let r = |x: Duration, y: Duration| x.as_secs_f64() / y.as_secs_f64().max(1e-12);
            self.ratio_wall[b].push(r(step[b].wall, step[thin].wall));
            self.ratio_cpu[b].push(r(step[b].cpu, step[thin].cpu));
        }
    }

    /// A row per side (throughput of each round, wall time) and a check per baseline.
    #[allow(clippy::too_many_arguments)]
    fn report(
        &self,
        r: &mut Report,
        group: &str,
        name: &str,
        unit: Unit,
        (bytes, ops): (u64, u64),
        note: &str,
        goal: Option<Goal>,
    ) {
        let thin = self.names.len() - 1;
        for (n, t) in self.names.iter().zip(&self.totals) {
            let v: Vec<f64> = t
                .iter()
                .map(|s| unit.from_run(s.wall, bytes, ops))
                .collect();
            r.row(group, name, n, unit, &v, note);
        }
        for b in 0..thin {
            let label = if thin == 1 {
                format!("{group}: {name}")
            } else {
                format!("{group}: {name} (vs {})", self.names[b])
            };
            r.ratio(
                &label,
                self.names[b],
                &self.ratio_wall[b],
                Some(&self.ratio_cpu[b]),
                goal,
            );
        }
    }
}

/// Steps a run over `size` bytes is cut into: 64 MiB each.
fn steps_for(size: u64) -> usize {
    (size / (64 * MIB)).max(1) as usize
}

/// Random-IO steps: 2500 operations each (fewer if `ops` is small).
const OPS_PER_STEP: usize = 2500;

/// A pool with thin 0 mapping `[0, size)` and a plain file with the same bytes, both
/// written in 64 KiB pwrites (what the pool's data device receives) and flushed, so both
/// page caches hold the same folios.
fn prepare_pair(dir: &Path, tag: &str, size: u64) -> Result<(FilePool, PlainPath)> {
    // Room for the CoW group's copies after the thin has mapped `size` bytes.
    let pool = FilePool::create(dir, tag, size * 2)?;
    let plain = PlainPath::create(dir, tag, size * 2)?;
    let buf = pattern(BLOCK as usize, 7);
    for t in [&plain.file as &dyn Target, pool.thin()] {
        seq_write(t, 0, size, BLOCK as usize, &buf)?;
        t.flush()?;
    }
    Ok((pool, plain))
}

/// Drops both files' pages, then reads both back sequentially in 1 MiB requests: the page
/// cache then holds what readahead made of them, the same on both sides.
fn warm_by_reading(pool: &FilePool, plain: &PlainPath, size: u64) -> Result<()> {
    pool.drop_caches()?;
    drop_file_cache(plain.file.0.file())?;
    // Interleaved in 64 MiB slices, so both files see the same memory conditions while
    // readahead picks folio sizes.
    let steps = steps_for(size);
    let slice = size / steps as u64;
    for k in 0..steps as u64 {
        for t in [&plain.file as &dyn Target, pool.thin()] {
            seq_read(t, k * slice, (k + 1) * slice, MIB as usize)?;
        }
    }
    Ok(())
}

// ---- file: throughput against a plain file ----------------------------------------------

fn seq_write_group(cfg: &Config, dir: &Path, r: &mut Report) -> Result<()> {
    let size = cfg.size / MIB * MIB;
    let steps = steps_for(size);
    let slice = size / steps as u64;
    let big = pattern(MIB as usize, 1);
    let names = ["plain 1M", "plain 64K", "thin"];
    let mut write = Cmp::new(&names);
    let mut write_flush = Cmp::new(&names);
    // Round 0 is a warm-up (not recorded): the first GiBs written into the page cache of a
    // fresh VM are slow for every side alike (the host backs guest memory on first touch).
    for round in 0..=cfg.runs {
        settle(dir);
        let tag = format!("w{round}");
        let pool = FilePool::create(dir, &tag, size)?;
        let p1 = PlainPath::create(dir, &format!("{tag}-1m"), size)?;
        let p64 = PlainPath::create(dir, &format!("{tag}-64k"), size)?;
        let sides: [&dyn Target; 3] = [&p1.file, &p64.file, pool.thin()];
        if round == 0 {
            for t in sides {
                seq_write(t, 0, size, MIB as usize, &big)?;
                t.flush()?;
            }
            continue;
        }
        write.round(round, &sides, steps, |i, t, k| {
            let chunk = if i == 1 { BLOCK } else { MIB } as usize;
            let at = k as u64 * slice;
            seq_write(t, at, at + slice, chunk, &big).map(|_| ())
        })?;
        let mut flushes = [Sample::default(); 3];
        for j in 0..3 {
            let i = (round + j) % 3;
            let (res, s) = measure(|| sides[i].flush());
            res?;
            flushes[i] = s;
        }
        let last = |i: usize| *write.totals[i].last().expect("round ran");
        let with: Vec<Sample> = (0..3)
            .map(|i| {
                let mut s = last(i);
                s += flushes[i];
                s
            })
            .collect();
        write_flush.push(&with);
    }
    let note = format!(
        "{} into a new sparse file / new thin in 1 MiB writes (plain 64K: 64 KiB pwrites, what \
         the thin issues); no fsync",
        engine::units::format_size(size)
    );
    let goal = Some(Goal::AtLeast(0.85));
    let work = (size, 0);
    write.report(
        r,
        "file",
        "seq write 1 MiB, unprovisioned",
        Unit::MiBps,
        work,
        &note,
        goal,
    );
    let note = "same run, + final fdatasync (plain) / Pool::commit (thin); one step per round";
    write_flush.report(
        r,
        "file",
        "seq write 1 MiB + flush",
        Unit::MiBps,
        work,
        note,
        goal,
    );
    Ok(())
}

/// Overwrites and reads on provisioned blocks, page cache hot, in the current cache state.
#[allow(clippy::too_many_arguments)]
fn hot_group(
    cfg: &Config,
    dir: &Path,
    r: &mut Report,
    pool: &FilePool,
    plain: &PlainPath,
    state: &str,
    ops: usize,
    with_goals: bool,
) -> Result<()> {
    let size = cfg.size / MIB * MIB;
    let steps = steps_for(size);
    let slice = size / steps as u64;
    let small = pattern(4096, 2);
    let sides: [&dyn Target; 2] = [&plain.file, pool.thin()];
    let names = ["plain", "thin"];
    let mut over = Cmp::new(&names);
    let mut over_flush = Cmp::new(&names);
    let mut sread = Cmp::new(&names);
    let mut rread = Cmp::new(&names);
    let flush_ops = (ops / 10).max(1);
    let per = OPS_PER_STEP.min(ops);
    let rsteps = ops.div_ceil(per);
    for round in 0..cfg.runs {
        settle(dir);
        let offs = random_offsets(ops, size, 4096, 100 + round as u64);
        over.round(round, &sides, rsteps, |_, x, k| {
            let o = &offs[k * per..((k + 1) * per).min(offs.len())];
            rand_write(x, o, &small).map(|_| ())
        })?;
        settle(dir);
        let offs = random_offsets(flush_ops, size, 4096, 200 + round as u64);
        over_flush.round(round, &sides, 1, |_, x, _| {
            rand_write(x, &offs, &small)?;
            x.flush()
        })?;
        sread.round(round, &sides, steps, |_, x, k| {
            let at = k as u64 * slice;
            seq_read(x, at, at + slice, MIB as usize).map(|_| ())
        })?;
        let offs = random_offsets(ops, size, 4096, 300 + round as u64);
        rread.round(round, &sides, rsteps, |_, x, k| {
            let o = &offs[k * per..((k + 1) * per).min(offs.len())];
            rand_read(x, o, 4096).map(|_| ())
        })?;
    }
    let g = format!("hot/{state}");
    let note = format!(
        "{} random 4 KiB pwrites over {}, no fsync",
        ops,
        engine::units::format_size(size)
    );
    let n = ops as u64;
    let goal = |g: f64| with_goals.then_some(Goal::AtLeast(g));
    let (g90, g95) = (goal(0.9), goal(0.95));
    let name = "rand overwrite 4 KiB, provisioned";
    over.report(r, &g, name, Unit::Iops, (0, n), &note, g90);
    let note = format!("{flush_ops} random 4 KiB writes, then one flush; one step per round");
    let name = "rand overwrite 4 KiB + flush";
    over_flush.report(r, &g, name, Unit::Iops, (0, flush_ops as u64), &note, g90);
    sread.report(r, &g, "seq read 1 MiB", Unit::MiBps, (size, 0), "", g95);
    let note = format!("{} reads", ops);
    rread.report(r, &g, "rand read 4 KiB", Unit::Iops, (0, n), &note, g95);
    Ok(())
}

// ---- cold: reads from the disk ------------------------------------------------------------

fn cold_group(
    cfg: &Config,
    dir: &Path,
    r: &mut Report,
    pool: &FilePool,
    plain: &PlainPath,
) -> Result<()> {
    let size = cfg.size / MIB * MIB;
    let steps = steps_for(size);
    let slice = size / steps as u64;
    let sides: [&dyn Target; 2] = [&plain.file, pool.thin()];
    let names = ["plain", "thin"];
    let drop_all = || -> Result<()> {
        pool.drop_caches()?;
        drop_file_cache(plain.file.0.file())?;
        Ok(())
    };
    let ops = (cfg.ops / 10).max(1);
    let per = (OPS_PER_STEP / 10).min(ops);
    let rsteps = ops.div_ceil(per);
    let mut sread = Cmp::new(&names);
    let mut rread = Cmp::new(&names);
    for round in 0..cfg.runs {
        settle(dir);
        drop_all()?;
        sread.round(round, &sides, steps, |_, x, k| {
            let at = k as u64 * slice;
            seq_read(x, at, at + slice, MIB as usize).map(|_| ())
        })?;
        let offs = random_offsets(ops, size, 4096, 400 + round as u64);
        drop_all()?;
        rread.round(round, &sides, rsteps, |_, x, k| {
            let o = &offs[k * per..((k + 1) * per).min(offs.len())];
            rand_read(x, o, 4096).map(|_| ())
        })?;
    }
    let note = "both files' pages dropped (fadvise DONTNEED) before each round; the engine's \
                metadata cache stays warm";
    let goal = Some(Goal::AtLeast(0.95));
    sread.report(
        r,
        "cold",
        "seq read 1 MiB",
        Unit::MiBps,
        (size, 0),
        note,
        goal,
    );
    let note = format!("{ops} reads; {note}");
    let name = "rand read 4 KiB";
    rread.report(r, "cold", name, Unit::Iops, (0, ops as u64), &note, goal);
    Ok(())
}

// ---- cow: first write into a shared block -------------------------------------------------

/// The plain-file equivalent of one CoW: read the 64 KiB block, merge 4 KiB into it, write it
/// to a block nobody wrote before (a hole of another sparse file).
struct CopyBlock<'a> {
    src: &'a PlainFile,
    dst: &'a PlainFile,
    next: std::cell::Cell<u64>,
    buf: std::cell::RefCell<Vec<u8>>,
}

impl Target for CopyBlock<'_> {
    fn write(&self, data: &[u8], offset: u64) -> Result<()> {
        let mut block = self.buf.borrow_mut();
        let base = offset / BLOCK * BLOCK;
        self.src.read(&mut block, base)?;
        let within = (offset - base) as usize;
        block[within..within + data.len()].copy_from_slice(data);
        let at = self.next.get();
        self.next.set(at + BLOCK);
        self.dst.write(&block, at)
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.src.read(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        self.dst.flush()
    }
}

fn cow_group(
    cfg: &Config,
    dir: &Path,
    r: &mut Report,
    pool: &FilePool,
    plain: &PlainPath,
) -> Result<()> {
    let size = cfg.size / MIB * MIB;
    let blocks = size / BLOCK;
    let small = pattern(4096, 3);
    let ops = (cfg.ops / 25).clamp(1, blocks as usize);
    let per = 200.min(ops);
    let steps = ops.div_ceil(per);
    let dst = PlainPath::create(dir, "cow-dst", (cfg.runs * ops) as u64 * BLOCK)?;
    let copy = CopyBlock {
        src: &plain.file,
        dst: &dst.file,
        next: std::cell::Cell::new(0),
        buf: std::cell::RefCell::new(vec![0u8; BLOCK as usize]),
    };
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut cow = Cmp::new(&["plain copy", "thin"]);
    let mut us_overwrite = Vec::new();
    for round in 0..cfg.runs {
        // A new snapshot shares every block of the origin again.
        pool.pool().create_snap(id(100 + round as u64), id(0))?;
        pool.pool().commit()?;
        settle(dir);
        let mut order: Vec<u64> = (0..blocks).collect();
        order.shuffle(&mut rng);
        let offs: Vec<u64> = order[..ops].iter().map(|b| b * BLOCK + 8192).collect();
        let sides: [&dyn Target; 2] = [&copy, pool.thin()];
        cow.round(round, &sides, steps, |_, t, k| {
            let o = &offs[k * per..((k + 1) * per).min(offs.len())];
            rand_write(t, o, &small).map(|_| ())
        })?;
        // The same blocks again: now unshared, written in place.
        let d = rand_write(pool.thin(), &offs, &small)?;
        us_overwrite.push(Unit::Micros.from_run(d, 0, ops as u64));
        // Give the old blocks back so the next round has room.
        pool.pool().delete(id(100 + round as u64))?;
        pool.pool().commit()?;
    }
    let note = format!(
        "{ops} writes into distinct shared blocks, no fsync; plain copy = pread 64 KiB + \
         pwrite 64 KiB into a hole of another file (the I/O a CoW needs)"
    );
    let name = "4 KiB write into shared block (64 KiB copy)";
    cow.report(r, "cow", name, Unit::Micros, (0, ops as u64), &note, None);
    let name = "same blocks again (unshared now)";
    r.row("cow", name, "thin", Unit::Micros, &us_overwrite, "");
    Ok(())
}

// ---- snap: create_snap against mapping count ----------------------------------------------

struct NullPool {
    pool: Option<Arc<Pool>>,
    origin: Option<Thin>,
    path: PathBuf,
}

impl Drop for NullPool {
    fn drop(&mut self) {
        self.origin = None;
        self.pool = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A pool whose metadata is a sparse file and whose data is a `NullDevice`, with thin 0
/// mapping `mapped` bytes from offset 0 (full 64 KiB writes, so nothing is zero-filled).
/// Returns the pool and the time spent mapping and committing.
fn null_pool(
    dir: &Path,
    tag: &str,
    data_size: u64,
    mapped: u64,
) -> Result<(NullPool, Duration, Duration)> {
    let path = dir.join(format!("meta-{tag}"));
    let meta = Arc::new(FileDevice::create(&path, GIB)?);
    let data: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(data_size));
    let pool = Pool::format(meta, data, DataBlockSize::DEFAULT, PoolOptions::default())?;
    pool.create_thin(id(0))?;
    pool.commit()?;
    let thin = pool.open_thin(id(0))?;
    let buf = vec![0u8; MIB as usize];
    let build = seq_write(&thin, 0, mapped, MIB as usize, &buf)?;
    let (c, commit) = time(|| pool.commit());
    c?;
    Ok((
        NullPool {
            pool: Some(pool),
            origin: Some(thin),
            path,
        },
        build,
        commit,
    ))
}

fn snap_group(cfg: &Config, dir: &Path, r: &mut Report) -> Result<()> {
    let small_mapped = GIB;
    let big_mapped = cfg.snap_mapped.max(small_mapped);
    let data_size = big_mapped + GIB;
    let mut pools = Vec::new();
    for (tag, mapped) in [("s1g", small_mapped), ("sbig", big_mapped)] {
        let (p, build, commit) = null_pool(dir, tag, data_size, mapped)?;
        let n = mapped / BLOCK;
        let label = engine::units::format_size(mapped);
        r.row(
            "snap",
            &format!("build origin: map {label} (64 KiB writes)"),
            "null",
            Unit::Micros,
            &[Unit::Micros.from_run(build, 0, n)],
            &format!("{n} mappings; µs per mapping"),
        );
        r.row(
            "snap",
            &format!("commit of that build ({label})"),
            "file",
            Unit::Millis,
            &[commit.as_secs_f64() * 1e3],
            "one sample",
        );
        pools.push((label, p));
    }
    // Alternating between the two origins, `reps` times; each snapshot is taken right after
    // a commit (the state a daemon is in between requests).
    let reps = cfg.runs * 20;
    let mut alone: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut with_commit: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut ratio = Vec::new();
    let mut ratio_cpu = Vec::new();
    let mut ratio_commit = Vec::new();
    for rep in 0..reps {
        let mut this = [Sample::default(); 2];
        let mut this_c = [0.0; 2];
        let order: [usize; 2] = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let pool = pools[i].1.pool.as_ref().expect("open");
            pool.commit()?;
            let snap = id(1 + rep as u64);
            let ((s, c), d) = time(|| {
                let (s, ds) = measure(|| pool.create_snap(snap, id(0)));
                (s, (ds, pool.commit()))
            });
            s?;
            let (ds, c) = c;
            c?;
            this[i] = ds;
            this_c[i] = d.as_secs_f64() * 1e3;
        }
        for i in 0..2 {
            alone[i].push(this[i].wall.as_secs_f64() * 1e6);
            with_commit[i].push(this_c[i]);
        }
        let q = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-12);
        ratio.push(q(this[1].wall, this[0].wall));
        ratio_cpu.push(q(this[1].cpu, this[0].cpu));
        ratio_commit.push(this_c[1] / this_c[0]);
    }
    for (i, (label, _)) in pools.iter().enumerate() {
        r.row(
            "snap",
            &format!("create_snap, origin {label} mapped"),
            "file+null",
            Unit::Micros,
            &alone[i],
            "origin open; the call alone",
        );
        r.absolute(
            &format!("snap: create_snap µs, origin {label} mapped"),
            &alone[i],
            "µs",
            Some(Goal::AtMost(1000.0)),
        );
        r.row(
            "snap",
            &format!("create_snap + commit, origin {label}"),
            "file+null",
            Unit::Millis,
            &with_commit[i],
            "commit = metadata writes + 2 fdatasync of the metadata file",
        );
    }
    let big = &pools[1].0;
    // "No slower": the per-pair ratio of the two create_snap calls. Single calls of a few
    // µs carry scheduler noise, hence the CPU-time column; 1.0 is the goal's centre.
    r.ratio(
        &format!("snap: create_snap time, origin {big} ÷ 1GiB (per pair; ≤ 1 = no slower)"),
        "1GiB origin",
        &ratio,
        Some(&ratio_cpu),
        Some(Goal::AtMost(1.1)),
    );
    r.absolute(
        &format!("snap: create_snap+commit time, {big} ÷ 1GiB (per pair)"),
        &ratio_commit,
        "×",
        None,
    );
    Ok(())
}

// ---- commit: latency against dirty-set size -------------------------------------------------

fn commit_group(cfg: &Config, dir: &Path, r: &mut Report) -> Result<()> {
    let (np, _, _) = null_pool(dir, "commit", 64 * GIB, 0)?;
    // The same on MemDevice metadata: the commit's CPU work without the two fdatasyncs.
    let mem_meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(GIB));
    let null: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(64 * GIB));
    let mem_pool = Pool::format(
        mem_meta,
        null,
        DataBlockSize::DEFAULT,
        PoolOptions::default(),
    )?;
    mem_pool.create_thin(id(0))?;
    mem_pool.commit()?;
    let mem_thin = mem_pool.open_thin(id(0))?;
    let file_pool = np.pool.as_ref().expect("open");
    let file_thin = np.origin.as_ref().expect("open");
    let buf = vec![0u8; BLOCK as usize];
    let space = 64 * GIB / BLOCK;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(9);
    let mut free: Vec<u64> = (0..space).collect();
    free.shuffle(&mut rng);
    for k in [1usize, 16, 256, 4096, 32768] {
        let mut ms = [Vec::new(), Vec::new()];
        for _ in 0..cfg.runs {
            for (i, (pool, thin)) in [(file_pool, file_thin), (&mem_pool, &mem_thin)]
                .into_iter()
                .enumerate()
            {
                pool.commit()?;
                for j in 0..k {
                    let v = free[free.len() - 1 - j];
                    thin.write(&buf, v * BLOCK)?;
                }
                let (c, d) = time(|| pool.commit());
                c?;
                ms[i].push(d.as_secs_f64() * 1e3);
            }
            free.truncate(free.len() - k);
        }
        let name = format!("commit after {k} new mappings");
        let note = "random vblocks of a thin; metadata on a sparse file (2 fdatasync)";
        r.row("commit", &name, "file+null", Unit::Millis, &ms[0], note);
        let note = "same, metadata on MemDevice: CPU work of the commit only";
        r.row("commit", &name, "mem+null", Unit::Millis, &ms[1], note);
    }
    Ok(())
}

// ---- mem: engine CPU cost per operation -----------------------------------------------------

fn mem_group(cfg: &Config, r: &mut Report) -> Result<()> {
    let ops = cfg.ops;
    let size = 256 * MIB;
    let small = pattern(4096, 4);
    let big = pattern(MIB as usize, 5);
    let block = pattern(BLOCK as usize, 6);
    let us = |d| Unit::Micros.from_run(d, 0, ops as u64);

    // Raw MemDevice: the floor the thin adds to.
    let raw = PlainFile0(MemDevice::new(size));
    seq_write(&raw, 0, size, MIB as usize, &big)?;
    // Pool on MemDevice (data copies real) and on NullDevice (engine work only).
    let mem_data: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(size));
    let null_data: Arc<dyn BlockDevice> = Arc::new(NullDevice::new(size));
    let names = [
        "provision 64 KiB (full block)",
        "provision 4 KiB (zero-fill rest)",
        "overwrite 4 KiB, provisioned",
        "read 4 KiB, mapped",
        "read 4 KiB, unmapped",
        "overwrite 1 MiB, provisioned",
        "read 1 MiB, mapped",
    ];
    // [workload][raw, thin on mem, thin on null] -> samples
    let mut res: Vec<[Vec<f64>; 3]> = names.iter().map(|_| Default::default()).collect();
    for round in 0..cfg.runs {
        let blocks = size / BLOCK;
        let offs4 = random_offsets(ops, size, 4096, 500 + round as u64);
        let offs1m = random_offsets(ops / 16 + 1, size, MIB, 600 + round as u64);
        let n1m = offs1m.len() as u64;
        let raw_w = rand_write(&raw, &offs4, &small)?;
        let raw_r = rand_read(&raw, &offs4, 4096)?;
        let raw_w1m = rand_write(&raw, &offs1m, &big)?;
        let raw_r1m = rand_read(&raw, &offs1m, MIB as usize)?;
        res[2][0].push(us(raw_w));
        res[3][0].push(us(raw_r));
        res[5][0].push(Unit::Micros.from_run(raw_w1m, 0, n1m));
        res[6][0].push(Unit::Micros.from_run(raw_r1m, 0, n1m));
        for (side, data) in [(1, &mem_data), (2, &null_data)] {
            let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(256 * MIB));
            let pool = Pool::format(
                meta,
                data.clone(),
                DataBlockSize::DEFAULT,
                PoolOptions::default(),
            )?;
            pool.create_thin(id(0))?;
            pool.create_thin(id(1))?;
            pool.commit()?;
            let thin = pool.open_thin(id(0))?;
            let other = pool.open_thin(id(1))?;
            // Half the data blocks go to thin 0 in full-block writes, the other half to
            // thin 1 in 4 KiB writes (each zero-fills the rest of its block).
            let half = blocks / 2;
            let offs_full: Vec<u64> = (0..half).map(|b| b * BLOCK).collect();
            let d = rand_write(&thin, &offs_full, &block)?;
            res[0][side].push(Unit::Micros.from_run(d, 0, half));
            let offs_part: Vec<u64> = (0..half).map(|b| b * BLOCK + 4096).collect();
            let d = rand_write(&other, &offs_part, &small)?;
            res[1][side].push(Unit::Micros.from_run(d, 0, half));
            pool.commit()?;
            // Thin 0 now maps [0, span) entirely.
            let span = half * BLOCK;
            let offs4t = random_offsets(ops, span, 4096, 700 + round as u64);
            let offs1mt = random_offsets(ops / 16 + 1, span, MIB, 800 + round as u64);
            let unmapped: Vec<u64> = offs4t.iter().map(|o| o + 4 * span).collect();
            let n1m = offs1mt.len() as u64;
            res[2][side].push(us(rand_write(&thin, &offs4t, &small)?));
            res[3][side].push(us(rand_read(&thin, &offs4t, 4096)?));
            res[4][side].push(us(rand_read(&thin, &unmapped, 4096)?));
            let d = rand_write(&thin, &offs1mt, &big)?;
            res[5][side].push(Unit::Micros.from_run(d, 0, n1m));
            let d = rand_read(&thin, &offs1mt, MIB as usize)?;
            res[6][side].push(Unit::Micros.from_run(d, 0, n1m));
        }
    }
    for (name, [raw, mem, null]) in names.iter().zip(&res) {
        if !raw.is_empty() {
            r.row(
                "mem",
                name,
                "raw mem",
                Unit::Micros,
                raw,
                "MemDevice read_at/write_at, no pool",
            );
        }
        r.row(
            "mem",
            name,
            "thin mem",
            Unit::Micros,
            mem,
            "pool on MemDevice meta+data",
        );
        r.row(
            "mem",
            name,
            "thin null",
            Unit::Micros,
            null,
            "data on NullDevice: engine work only",
        );
    }

    // Metadata alone: insert and lookup on the mapping tree (no pool locks).
    let n: u64 = 1 << 20;
    let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(GIB));
    let mut md = Metadata::format(meta, DataBlockSize::DEFAULT, n + 1024)?;
    md.create_thin(id(0))?;
    let mut keys: Vec<u64> = (0..n).collect();
    keys.shuffle(&mut rand::rngs::SmallRng::seed_from_u64(11));
    let (res, d) = time(|| -> Result<()> {
        for &k in &keys {
            let b = md.alloc_data_block().context("data space")?;
            md.insert(id(0), k, BlockTime { block: b, time: 0 })?;
        }
        Ok(())
    });
    res?;
    r.row(
        "mem",
        "Metadata::alloc+insert, random keys, 1M",
        "mem",
        Unit::Micros,
        &[Unit::Micros.from_run(d, 0, n)],
        "one sample; tree built from empty, uncommitted",
    );
    md.commit()?;
    let mut lk = Vec::new();
    for round in 0..cfg.runs {
        let probe = random_offsets(ops, n, 1, 900 + round as u64);
        let (res, d) = time(|| -> Result<()> {
            for &k in &probe {
                std::hint::black_box(md.lookup(id(0), k)?);
            }
            Ok(())
        });
        res?;
        lk.push(us(d));
    }
    r.row(
        "mem",
        "Metadata::lookup, 1M mappings",
        "mem",
        Unit::Micros,
        &lk,
        "top-level + mapping tree, cached nodes",
    );
    Ok(())
}

/// A MemDevice as a target (the raw floor of the mem group).
struct PlainFile0(MemDevice);

impl Target for PlainFile0 {
    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        Ok(self.0.write_at(buf, offset)?)
    }
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Ok(self.0.read_at(buf, offset)?)
    }
    fn flush(&self) -> Result<()> {
        Ok(self.0.sync()?)
    }
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; no other arguments are understood.
    let cfg = Config::from_env();
    let (dir, _guard) = cfg.scratch()?;
    let mut r = Report::new();
    r.context("commit", git_commit());
    r.context("machine", format!("{} CPUs, kernel {}", cpus(), kernel()));
    r.context(
        "scratch",
        format!("{} — {}", dir.display(), filesystem_of(&dir)),
    );
    r.context(
        "parameters",
        format!(
            "size {}, runs {}, ops {}, data block 64 KiB, zero_new_blocks on, discard_passdown on, snap origin {}",
            engine::units::format_size(cfg.size),
            cfg.runs,
            cfg.ops,
            engine::units::format_size(cfg.snap_mapped)
        ),
    );
    r.context("fsync policy", "throughput rows: no fsync on either side (page cache); \"+ flush\" rows: one fdatasync (plain) vs Pool::commit (thin: metadata writes, data fdatasync, metadata fdatasync, superblock fdatasync) at the end, timed");
    r.context("load before", loadavg());
    r.context("cpu pressure before", cpu_pressure());
    let start = std::time::Instant::now();
    eprintln!("thinbox benches in {}", dir.display());

    let mut times: Vec<String> = Vec::new();
    let mut lap = std::time::Instant::now();
    let mut mark = |name: &str| {
        times.push(format!("{name} {:.0}s", lap.elapsed().as_secs_f64()));
        lap = std::time::Instant::now();
    };
    if cfg.wants("file/seqwrite") {
        seq_write_group(&cfg, &dir, &mut r)?;
        mark("seqwrite");
    }
    let rest = ["hot/w64", "hot/readahead", "cold", "cow"];
    if rest.iter().any(|g| cfg.wants(g)) {
        settle(&dir);
        let (pool, plain) = prepare_pair(&dir, "rw", cfg.size / MIB * MIB)?;
        mark("prepare");
        if cfg.wants("hot/w64") {
            hot_group(&cfg, &dir, &mut r, &pool, &plain, "w64", cfg.ops, true)?;
            mark("hot/w64");
        }
        if cfg.wants("hot/readahead") {
            warm_by_reading(&pool, &plain, cfg.size / MIB * MIB)?;
            // Informational: readahead's folio sizes are not under the bench's control, and
            // 4 KiB overwrites into large folios are several times slower (see README).
            let ops = (cfg.ops / 5).max(1);
            hot_group(&cfg, &dir, &mut r, &pool, &plain, "readahead", ops, false)?;
            mark("hot/readahead");
        }
        if cfg.cold && cfg.wants("cold") {
            cold_group(&cfg, &dir, &mut r, &pool, &plain)?;
            mark("cold");
        }
        if cfg.wants("cow") {
            cow_group(&cfg, &dir, &mut r, &pool, &plain)?;
            mark("cow");
        }
    }
    if cfg.wants("snap") {
        snap_group(&cfg, &dir, &mut r)?;
        mark("snap");
    }
    if cfg.wants("commit") {
        commit_group(&cfg, &dir, &mut r)?;
        mark("commit");
    }
    if cfg.wants("mem") {
        mem_group(&cfg, &mut r)?;
        mark("mem");
    }
    r.context("load after", loadavg());
    r.context("cpu pressure after", cpu_pressure());
    r.context(
        "wall time",
        format!(
            "{:.0} s ({})",
            start.elapsed().as_secs_f64(),
            times.join(", ")
        ),
    );
    println!("\n{}", r.render());
    if let Some(path) = &cfg.json {
        r.write_json(path)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
