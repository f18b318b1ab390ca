//! Crash consistency: seeded workloads (writes, snapshots, discards, deletes, data and
//! metadata resizes, metadata snapshots, transaction ids, reopens, commits) run on recording
//! devices ([`fixtures::crash`]), and the pool is rebuilt as after a power cut at every flush
//! boundary of the log and at random points between flushes, with the unflushed writes of
//! both devices dropped, applied, or torn at 512-byte granularity. Every crash state must:
//!
//! - carry on block 0 the superblock of a transaction that may be current: the last one whose
//!   superblock was flushed, or the one being committed if its superblock write reached the
//!   disk (a torn superblock write is one or the other, never a mix);
//! - pass our checker (and, for a sample, the real `thin_check`);
//! - open, list exactly the thins of that transaction with exactly their mapped block
//!   counts, and read, sector by sector, what that transaction holds, or what was written
//!   to that very sector of that very thin after it (an in-place write that reached the
//!   disk), never zeros where data was committed, never another thin's or another
//!   block's data, never the data device's "never written" poison;
//! - keep working: create a thin, write, snapshot, copy on write, delete, commit, read back,
//!   and check clean again.
//!
//! Every 512-byte sector the workload writes names itself: (generation, writer thin, virtual
//! block, sector). A generation is one `Thin::write` call; the writer is the thin incarnation
//! that wrote it (a snapshot legitimately reads its origin's sectors).
//!
//! Knobs for longer runs: `CRASH_SEEDS=FIRST..END` (default `0..DEFAULT_SEEDS`),
//! `CRASH_STATES=N` (run seeds from FIRST until at least N crash states were replayed),
//! `CRASH_RANDOM=K` random policies per flush boundary (default 2), `CRASH_THIN_CHECK_EVERY=N`
//! (the real `thin_check` on every Nth state and every state with a torn superblock write,
//! default 40, 0 for never), `CRASH_THREADS=N`.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use engine::io::BlockDevice;
use engine::tools::check::{check, CheckOptions};
use engine::{DataBlockSize, Pool, PoolOptions, ThinId};
use fixtures::crash::{CrashDevice, CrashLog, Entry, Fate, Image, ImageDevice, Policy};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BS: u64 = 64 * 1024;
/// Sectors per data block.
const SPB: usize = (BS / 512) as usize;
/// Virtual blocks each thin is written over.
const SPAN: u64 = 12;
const MAX_THINS: usize = 6;
/// Thin ids the workload uses (the continuation after a crash uses 1000 and up).
const IDS: u64 = 10;
const META_BYTES: u64 = 4 << 20;
const DATA_BYTES: u64 = 16 << 20;
const MAX_DATA_BYTES: u64 = 20 << 20;
const MAX_META_BYTES: u64 = 5 << 20;
const OPS: usize = 60;
/// Seeds the CI run replays: enough for at least `MIN_CI_STATES` crash states.
const DEFAULT_SEEDS: u64 = 32;
const MIN_CI_STATES: usize = 10_000;

const MAGIC: u64 = 0x5448_494e_424f_5854; // "THINBOXT"
/// What the data device holds before anything is written: reading it means a mapping points
/// at a block nobody filled.
const POISON: &[u8; 16] = b"NEVER-WRITTEN!!\n";

// ---- self-describing sectors -----------------------------------------------------------------

fn mix(gen: u32, vblock: u64, sector: usize) -> u64 {
    let mut z = (u64::from(gen) << 32) ^ (vblock << 8) ^ sector as u64;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill_sector(out: &mut [u8], gen: u32, writer: u32, vblock: u64, sector: usize) {
    let h = mix(gen, vblock, sector);
    let head = [
        MAGIC,
        u64::from(gen),
        u64::from(writer),
        vblock,
        sector as u64,
    ];
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = if i < head.len() { head[i] } else { h };
        w.copy_from_slice(&v.to_le_bytes());
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Zero,
    Tag {
        gen: u32,
        writer: u32,
        vblock: u64,
        sector: usize,
    },
    Garbage,
}

fn decode(s: &[u8]) -> Seen {
    let word = |i: usize| u64::from_le_bytes(s[i * 8..i * 8 + 8].try_into().unwrap());
    if word(0) != MAGIC {
        return if s.iter().all(|&b| b == 0) {
            Seen::Zero
        } else {
            Seen::Garbage
        };
    }
    let (gen, writer, vblock, sector) = (word(1), word(2), word(3), word(4));
    if gen > u64::from(u32::MAX) || writer > u64::from(u32::MAX) || sector >= SPB as u64 {
        return Seen::Garbage;
    }
    let h = mix(gen as u32, vblock, sector as usize);
    if (5..64).any(|i| word(i) != h) {
        return Seen::Garbage;
    }
    Seen::Tag {
        gen: gen as u32,
        writer: writer as u32,
        vblock,
        sector: sector as usize,
    }
}

// ---- the model -------------------------------------------------------------------------------

/// Generation of every sector of a mapped block (0: zeros).
type Sectors = Arc<[u32; SPB]>;

#[derive(Clone)]
struct ThinM {
    /// Incarnation: ids are reused after deletes; data never is.
    inc: u32,
    blocks: BTreeMap<u64, Sectors>,
}

type Model = BTreeMap<u64, ThinM>;

/// Per (incarnation, virtual block): the sector ranges and generations written since a
/// transaction.
type Later = HashMap<(u32, u64), Vec<(Range<usize>, u32)>>;

/// One block's part of a write (or of a discard's zeroing) to a thin.
struct Journal {
    inc: u32,
    vblock: u64,
    sectors: Range<usize>,
    gen: u32,
    /// The log's clock when the write was issued: a crash before it cannot show it.
    log_start: usize,
}

/// A superblock write: a transaction the pool may come back to.
struct Commit {
    /// Log entry of the superblock write.
    sb_entry: usize,
    /// The crash point (entries issued) from which it must be durable: just past the
    /// metadata flush that follows it, or when the op that wrote it returned, if earlier (a
    /// commit that returned is durable).
    durable_at: usize,
    sb: Vec<u8>,
    model: Model,
    journal_len: usize,
    op: String,
}

struct Workload {
    seed: u64,
    log: CrashLog,
    opts: PoolOptions,
    /// The log's clock when `Pool::format` returned; crashes before it are not replayed.
    format_end: usize,
    commits: Vec<Commit>,
    journal: Vec<Journal>,
    /// Writer incarnation of each generation (index 0: zeros).
    writers: Vec<u32>,
    /// (log clock at the op's start, op) for failure messages.
    trace: Vec<(usize, String)>,
}

struct Builder {
    w: Workload,
    model: Model,
    next_inc: u32,
    meta: Arc<CrashDevice>,
    data: Arc<CrashDevice>,
}

impl Builder {
    fn new_gen(&mut self, writer: u32) -> u32 {
        self.w.writers.push(writer);
        (self.w.writers.len() - 1) as u32
    }

    fn write(&mut self, pool: &Arc<Pool>, id: u64, first: u64, n: u64) {
        let inc = self.model[&id].inc;
        let gen = self.new_gen(inc);
        let mut buf = vec![0u8; n as usize * 512];
        for k in 0..n {
            let abs = first + k;
            let (v, s) = (abs / SPB as u64, (abs % SPB as u64) as usize);
            fill_sector(&mut buf[k as usize * 512..][..512], gen, inc, v, s);
        }
        let start = self.w.log.len();
        let thin = pool.open_thin(ThinId::new(id).unwrap()).unwrap();
        thin.write(&buf, first * 512).unwrap();
        let thin_m = self.model.get_mut(&id).unwrap();
        for (v, sectors) in block_pieces(first, n) {
            let b = thin_m.blocks.entry(v).or_insert_with(|| Arc::new([0; SPB]));
            Arc::make_mut(b)[sectors.clone()].fill(gen);
            self.w.journal.push(Journal {
                inc,
                vblock: v,
                sectors,
                gen,
                log_start: start,
            });
        }
    }

    fn discard(&mut self, pool: &Arc<Pool>, id: u64, first: u64, n: u64) {
        let start = self.w.log.len();
        let thin = pool.open_thin(ThinId::new(id).unwrap()).unwrap();
        thin.discard(first * 512, n * 512).unwrap();
        let thin_m = self.model.get_mut(&id).unwrap();
        for (v, sectors) in block_pieces(first, n) {
            if sectors.len() == SPB {
                thin_m.blocks.remove(&v);
                continue;
            }
            // Partial blocks are zeroed in place (or in a copy) when mapped.
            if let Some(b) = thin_m.blocks.get_mut(&v) {
                Arc::make_mut(b)[sectors.clone()].fill(0);
            }
            self.w.journal.push(Journal {
                inc: thin_m.inc,
                vblock: v,
                sectors,
                gen: 0,
                log_start: start,
            });
        }
    }

    /// Records the superblock writes an op made. Only ops that commit may make any: a
    /// commit inside another op would record a state between two model states.
    fn after_op(&mut self, start: usize, commits: bool, op: String) {
        let end = self.w.log.len();
        for i in start..end {
            if let Entry::Write {
                dev: 0,
                offset: 0,
                len,
            } = self.w.log.entry(i)
            {
                let sb = self.w.log.write_bytes(i);
                if len != 4096 || sb.iter().all(|&b| b == 0) {
                    continue; // format clearing block 0
                }
                assert!(
                    commits,
                    "seed {}: op `{op}` committed by itself; resize the workload",
                    self.w.seed
                );
                self.w.commits.push(Commit {
                    sb_entry: i,
                    durable_at: end,
                    sb,
                    model: self.model.clone(),
                    journal_len: self.w.journal.len(),
                    op: op.clone(),
                });
            }
        }
        self.w.trace.push((start, op));
    }

    fn free_id(&self, rng: &mut SmallRng) -> u64 {
        loop {
            let id = rng.gen_range(0..IDS);
            if !self.model.contains_key(&id) {
                return id;
            }
        }
    }

    fn pick(&self, rng: &mut SmallRng) -> u64 {
        let ids: Vec<u64> = self.model.keys().copied().collect();
        ids[rng.gen_range(0..ids.len())]
    }
}

/// The (virtual block, sector range) pieces of `n` sectors from thin sector `first`.
fn block_pieces(first: u64, n: u64) -> Vec<(u64, Range<usize>)> {
    let mut out = Vec::new();
    let (mut pos, end) = (first, first + n);
    while pos < end {
        let v = pos / SPB as u64;
        let s = (pos % SPB as u64) as usize;
        let k = (SPB - s).min((end - pos) as usize);
        out.push((v, s..s + k));
        pos += k as u64;
    }
    out
}

fn open_pool(meta: &Arc<CrashDevice>, data: &Arc<CrashDevice>, opts: PoolOptions) -> Arc<Pool> {
    Pool::open(meta.clone(), data.clone(), opts).unwrap()
}

/// Runs seed's workload on recording devices and returns what the replays need.
fn build(seed: u64) -> Workload {
    let mut rng = SmallRng::seed_from_u64(seed);
    let log = CrashLog::new();
    let meta = log.add_device(Image::zeroed(META_BYTES), "metadata");
    let data = log.add_device(Image::filled(DATA_BYTES, POISON), "data");
    // Freed blocks: given back at once, given back past a window of 4 kept blocks (so
    // discards also come from the window moving), or never.
    let opts = PoolOptions {
        discard_passdown: seed % 3 != 2,
        kept_free_bytes: match seed % 3 {
            0 => 0,
            _ => 4 * BS,
        },
        ..PoolOptions::default()
    };
    let mut b = Builder {
        w: Workload {
            seed,
            log: log.clone(),
            opts,
            format_end: 0,
            commits: Vec::new(),
            journal: Vec::new(),
            writers: vec![u32::MAX],
            trace: Vec::new(),
        },
        model: Model::new(),
        next_inc: 1,
        meta: meta.clone(),
        data: data.clone(),
    };
    let mut pool =
        Some(Pool::format(meta.clone(), data.clone(), DataBlockSize::DEFAULT, opts).unwrap());
    b.w.format_end = log.len();
    b.after_op(0, true, "format".into());
    for _ in 0..OPS {
        let p = pool.as_ref().unwrap().clone();
        let start = log.len();
        let n = b.model.len();
        let roll = rng.gen_range(0..100);
        let (commits, op) = match roll {
            0..=7 if n < MAX_THINS => {
                let id = b.free_id(&mut rng);
                p.create_thin(ThinId::new(id).unwrap()).unwrap();
                b.model.insert(
                    id,
                    ThinM {
                        inc: b.next_inc,
                        blocks: BTreeMap::new(),
                    },
                );
                b.next_inc += 1;
                (false, format!("create {id}"))
            }
            8..=15 if n > 0 && n < MAX_THINS => {
                let origin = b.pick(&mut rng);
                let id = b.free_id(&mut rng);
                p.create_snap(ThinId::new(id).unwrap(), ThinId::new(origin).unwrap())
                    .unwrap();
                let blocks = b.model[&origin].blocks.clone();
                b.model.insert(
                    id,
                    ThinM {
                        inc: b.next_inc,
                        blocks,
                    },
                );
                b.next_inc += 1;
                (false, format!("snap {id} of {origin}"))
            }
            16..=20 if n > 1 => {
                let id = b.pick(&mut rng);
                p.delete(ThinId::new(id).unwrap()).unwrap();
                b.model.remove(&id);
                (false, format!("delete {id}"))
            }
            21..=62 if n > 0 => {
                let id = b.pick(&mut rng);
                let total = SPAN * SPB as u64;
                let (first, len) = match rng.gen_range(0..10) {
                    // Whole blocks.
                    0..=4 => {
                        let v = rng.gen_range(0..SPAN);
                        let k = rng.gen_range(1..=2).min(SPAN - v);
                        (v * SPB as u64, k * SPB as u64)
                    }
                    // A few sectors.
                    5..=8 => {
                        let first = rng.gen_range(0..total);
                        (first, rng.gen_range(1..=16).min(total - first))
                    }
                    // Across a block boundary.
                    _ => {
                        let first = rng.gen_range(0..total - 1);
                        (first, rng.gen_range(1..=2 * SPB as u64).min(total - first))
                    }
                };
                b.write(&p, id, first, len);
                (false, format!("write {id} sectors {first}+{len}"))
            }
            63..=70 if n > 0 => {
                let id = b.pick(&mut rng);
                let total = SPAN * SPB as u64;
                let first = rng.gen_range(0..total);
                let len = rng.gen_range(1..=3 * SPB as u64).min(total - first);
                b.discard(&p, id, first, len);
                (false, format!("discard {id} sectors {first}+{len}"))
            }
            71..=73 => {
                let t = p.superblock().transaction_id;
                p.set_transaction_id(t, t + 1).unwrap();
                (false, format!("transaction id {}", t + 1))
            }
            74..=77 => {
                if p.superblock().held_root == 0 {
                    p.reserve_metadata_snap().unwrap();
                    (true, "reserve metadata snap".into())
                } else {
                    p.release_metadata_snap().unwrap();
                    (true, "release metadata snap".into())
                }
            }
            78 if b.data.size() < MAX_DATA_BYTES => {
                let size = b.data.size() + rng.gen_range(1..=16) * BS;
                p.resize_data(Some(size)).unwrap();
                (true, format!("resize data to {size}"))
            }
            79 if b.meta.size() < MAX_META_BYTES => {
                let size = b.meta.size() + rng.gen_range(1..=64) * 4096;
                p.resize_metadata(Some(size)).unwrap();
                (true, format!("resize metadata to {size}"))
            }
            80..=82 => {
                drop(p);
                drop(pool.take()); // closing commits
                pool = Some(open_pool(&b.meta, &b.data, opts));
                (true, "reopen".into())
            }
            83..=99 => {
                if n > 0 && rng.gen_bool(0.3) {
                    let id = b.pick(&mut rng);
                    p.open_thin(ThinId::new(id).unwrap())
                        .unwrap()
                        .flush()
                        .unwrap();
                    (true, format!("flush thin {id}"))
                } else {
                    p.commit().unwrap();
                    (true, "commit".into())
                }
            }
            _ => continue,
        };
        b.after_op(start, commits, op);
    }
    let start = log.len();
    pool.as_ref().unwrap().commit().unwrap();
    drop(pool);
    b.after_op(start, true, "final commit and close".into());
    // When each superblock became durable.
    let entries = log.entries(0..log.len());
    for c in &mut b.w.commits {
        let flushed = (c.sb_entry + 1..entries.len())
            .find(|&i| entries[i] == Entry::Flush { dev: 0 })
            .map_or(usize::MAX, |i| i + 1);
        c.durable_at = c.durable_at.min(flushed);
    }
    b.w
}

// ---- replaying crashes -----------------------------------------------------------------------

#[derive(Default, Debug)]
struct Stats {
    states: usize,
    consistent: usize,
    thin_checks: usize,
    /// States whose superblock is the transaction being committed (its superblock write was
    /// unflushed and reached the disk).
    in_flight_commit: usize,
    /// States whose superblock write was torn: new when sector 0 made it, old when not.
    torn_sb_new: usize,
    torn_sb_old: usize,
    /// States where some sector read data written after the transaction (in place).
    newer_data: usize,
    failures: Vec<String>,
}

impl Stats {
    fn add(&mut self, o: Stats) {
        self.states += o.states;
        self.consistent += o.consistent;
        self.thin_checks += o.thin_checks;
        self.in_flight_commit += o.in_flight_commit;
        self.torn_sb_new += o.torn_sb_new;
        self.torn_sb_old += o.torn_sb_old;
        self.newer_data += o.newer_data;
        self.failures.extend(o.failures);
    }
}

/// What one replay found, besides pass or fail.
#[derive(Default)]
struct Outcome {
    in_flight: bool,
    newer_data: bool,
}

fn replay(
    w: &Workload,
    issued: usize,
    policy: &Policy,
    sampled: bool,
    real_tool: bool,
    stats: &mut Stats,
) -> Result<Outcome, String> {
    let mut thin_check = real_tool && sampled;
    let crash = w.log.crash(issued, policy);
    let meta: Arc<ImageDevice> = crash.devices[0].clone();
    let data: Arc<ImageDevice> = crash.devices[1].clone();
    let mut sb = vec![0u8; 4096];
    meta.read_at(&mut sb, 0).unwrap();

    // Which transaction is on disk? At least the last durable one; at most the one whose
    // superblock write was issued last.
    let durable = w
        .commits
        .iter()
        .rposition(|c| c.durable_at <= issued)
        .expect("crashes start after format");
    for (i, fate) in &crash.fates {
        if let Fate::Torn(keep) = fate {
            if w.commits.iter().any(|c| c.sb_entry == *i) {
                if keep[0] {
                    stats.torn_sb_new += 1;
                } else {
                    stats.torn_sb_old += 1;
                }
                // What the real tool makes of a torn superblock matters most.
                thin_check = real_tool;
            }
        }
    }
    let Some(ci) = (durable..w.commits.len())
        .rev()
        .find(|&c| w.commits[c].sb_entry < issued && w.commits[c].sb == sb)
    else {
        let torn: Vec<usize> = crash.torn().collect();
        return Err(format!(
            "block 0 holds no superblock the pool may come back to (last durable: commit \
             {durable} at entry {}; torn entries {torn:?})",
            w.commits[durable].sb_entry
        ));
    };
    let commit = &w.commits[ci];
    let mut outcome = Outcome {
        in_flight: ci > durable,
        ..Outcome::default()
    };

    let report = check(&*meta, &CheckOptions::default());
    if !report.is_clean() {
        let errors: Vec<String> = report.errors().take(5).map(|f| f.to_string()).collect();
        return Err(format!("our checker: {errors:?}"));
    }
    if thin_check {
        stats.thin_checks += 1;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metadata");
        meta.save(&path).unwrap();
        let run = fixtures::tools::thin_check(&path, &[]);
        if run.rc != 0 {
            return Err(format!(
                "thin_check rc {}: {}{}",
                run.rc, run.stdout, run.stderr
            ));
        }
    }

    let pool =
        Pool::open(meta.clone(), data.clone(), w.opts).map_err(|e| format!("Pool::open: {e}"))?;
    outcome.newer_data = verify_thins(w, &pool, commit, issued)?;
    keep_working(&pool, &commit.model)?;
    drop(pool);
    let report = check(&*meta, &CheckOptions::default());
    if !report.is_clean() {
        let errors: Vec<String> = report.errors().take(5).map(|f| f.to_string()).collect();
        return Err(format!(
            "our checker after working on the crashed pool: {errors:?}"
        ));
    }
    Ok(outcome)
}

/// Every thin of the transaction reads what it holds, or what was written to that sector of
/// that thin since. Returns whether any sector showed such newer data.
fn verify_thins(
    w: &Workload,
    pool: &Arc<Pool>,
    commit: &Commit,
    issued: usize,
) -> Result<bool, String> {
    let ids: Vec<u64> = pool.thin_ids().iter().map(|i| i.get()).collect();
    let want: Vec<u64> = commit.model.keys().copied().collect();
    if ids != want {
        return Err(format!("thins {ids:?}, transaction has {want:?}"));
    }
    let mut later: Later = HashMap::new();
    for j in &w.journal[commit.journal_len..] {
        if j.log_start < issued {
            later
                .entry((j.inc, j.vblock))
                .or_default()
                .push((j.sectors.clone(), j.gen));
        }
    }
    let mut newer = false;
    let mut buf = vec![0u8; (SPAN * BS) as usize];
    for (&id, t) in &commit.model {
        let thin = pool
            .open_thin(ThinId::new(id).unwrap())
            .map_err(|e| format!("open thin {id}: {e}"))?;
        let mapped = thin.mapped_blocks().map_err(|e| e.to_string())?;
        if mapped != t.blocks.len() as u64 {
            return Err(format!(
                "thin {id} maps {mapped} blocks, the transaction {}",
                t.blocks.len()
            ));
        }
        thin.read(&mut buf, 0)
            .map_err(|e| format!("read thin {id}: {e}"))?;
        for v in 0..SPAN {
            let base = t.blocks.get(&v);
            let newer_writes = later.get(&(t.inc, v));
            for s in 0..SPB {
                let want = base.map_or(0, |b| b[s]);
                let got = decode(&buf[(v * BS) as usize + s * 512..][..512]);
                let got_gen = match got {
                    Seen::Zero => 0,
                    Seen::Tag {
                        gen,
                        writer,
                        vblock,
                        sector,
                    } if vblock == v
                        && sector == s
                        && w.writers.get(gen as usize) == Some(&writer) =>
                    {
                        gen
                    }
                    _ => {
                        return Err(format!(
                            "thin {id} block {v} sector {s}: {got:?} (want generation {want})"
                        ))
                    }
                };
                if got_gen == want {
                    continue;
                }
                let written_since = newer_writes
                    .is_some_and(|ws| ws.iter().any(|(r, g)| *g == got_gen && r.contains(&s)));
                if !written_since {
                    let what = if got_gen == 0 {
                        "zeros".to_string()
                    } else {
                        format!(
                            "generation {got_gen} (writer {})",
                            w.writers[got_gen as usize]
                        )
                    };
                    return Err(format!(
                        "thin {id} (incarnation {}) block {v} sector {s}: {what}, want \
                         generation {want} or one written to it since",
                        t.inc
                    ));
                }
                newer = true;
            }
        }
    }
    Ok(newer)
}

/// The crashed pool keeps working: new thin, writes, a snapshot, copy on write, a delete,
/// a commit, and everything new reads back.
fn keep_working(pool: &Arc<Pool>, model: &Model) -> Result<(), String> {
    fn e(what: &'static str) -> impl Fn(engine::Error) -> String {
        move |err| format!("after the crash, {what}: {err}")
    }
    let (a, s) = (ThinId::new(1000).unwrap(), ThinId::new(1001).unwrap());
    let block = |gen: u32, writer: u32, v: u64| {
        let mut buf = vec![0u8; BS as usize];
        for (k, sector) in buf.chunks_exact_mut(512).enumerate() {
            fill_sector(sector, gen, writer, v, k);
        }
        buf
    };
    const G: u32 = 0xF000_0000;
    pool.create_thin(a).map_err(e("create thin"))?;
    {
        let thin = pool.open_thin(a).map_err(e("open"))?;
        thin.write(&block(G + 1, 1000, 0), 0).map_err(e("write"))?;
        thin.write(&block(G + 1, 1000, 3)[1024..2048], 3 * BS + 1024)
            .map_err(e("partial write"))?;
    }
    pool.create_snap(s, a).map_err(e("snapshot"))?;
    {
        let thin = pool.open_thin(a).map_err(e("open"))?;
        thin.write(&block(G + 2, 1000, 0), 0)
            .map_err(e("copy on write"))?;
    }
    // Old thins: one is written to (copy on write or in place), one deleted.
    let old: Vec<u64> = model.keys().copied().collect();
    if let Some(&first) = old.first() {
        let thin = pool
            .open_thin(ThinId::new(first).unwrap())
            .map_err(e("open old thin"))?;
        thin.write(&block(G + 3, first as u32, 1), BS)
            .map_err(e("write old thin"))?;
    }
    if old.len() > 1 {
        pool.delete(ThinId::new(old[old.len() - 1]).unwrap())
            .map_err(e("delete"))?;
    }
    pool.commit().map_err(e("commit"))?;
    let expect = |id: u64, v: u64, sectors: Range<usize>, gen: u32, writer: u32| {
        let thin = pool
            .open_thin(ThinId::new(id).unwrap())
            .map_err(e("open"))?;
        let mut buf = vec![0u8; BS as usize];
        thin.read(&mut buf, v * BS).map_err(e("read"))?;
        for (k, sector) in buf.chunks_exact(512).enumerate() {
            let want = if sectors.contains(&k) {
                Seen::Tag {
                    gen,
                    writer,
                    vblock: v,
                    sector: k,
                }
            } else {
                Seen::Zero
            };
            if decode(sector) != want {
                return Err(format!(
                    "after the crash: thin {id} block {v} sector {k} reads {:?}, want {want:?}",
                    decode(sector)
                ));
            }
        }
        Ok(())
    };
    expect(1001, 0, 0..SPB, G + 1, 1000)?;
    expect(1000, 0, 0..SPB, G + 2, 1000)?;
    expect(1000, 3, 2..4, G + 1, 1000)?;
    expect(1001, 3, 2..4, G + 1, 1000)?;
    if let Some(&first) = old.first() {
        expect(first, 1, 0..SPB, G + 3, first as u32)?;
    }
    Ok(())
}

/// The crash points and policies replayed for a workload: just before and just after every
/// flush, each with everything unflushed dropped, applied, and `random` random fates; plus
/// as many random points between flushes.
fn crash_points(w: &Workload, random: u64) -> Vec<(usize, Policy)> {
    let mut rng = SmallRng::seed_from_u64(w.seed ^ 0x00C4_A511);
    let len = w.log.len();
    let mut points = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let flushes: Vec<usize> = w
        .log
        .flushes()
        .into_iter()
        .filter(|&f| f >= w.format_end)
        .collect();
    for &f in &flushes {
        for issued in [f, f + 1] {
            if issued < w.format_end {
                continue;
            }
            let mut policies = vec![Policy::DropAll, Policy::ApplyAll];
            policies.extend((0..random).map(|_| Policy::Random { seed: rng.gen() }));
            for p in policies {
                if seen.insert((issued, format!("{p:?}"))) {
                    points.push((issued, p));
                }
            }
        }
    }
    for _ in 0..flushes.len() {
        let issued = rng.gen_range(w.format_end..=len);
        points.push((issued, Policy::Random { seed: rng.gen() }));
    }
    points
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
        })
        .unwrap_or(default)
}

fn op_at(w: &Workload, issued: usize) -> String {
    match w.trace.iter().rposition(|(start, _)| *start < issued) {
        Some(i) => format!("during op {i} `{}`", w.trace[i].1),
        None => "before the first op".into(),
    }
}

fn run_seed(seed: u64, random: u64, thin_check_every: u64) -> Stats {
    let w = build(seed);
    let mut stats = Stats::default();
    for (k, (issued, policy)) in crash_points(&w, random).into_iter().enumerate() {
        // A fixed sample for each seed, whatever the threads do.
        let n = seed.wrapping_mul(7919).wrapping_add(k as u64);
        let thin_check = thin_check_every != 0 && n.is_multiple_of(thin_check_every);
        stats.states += 1;
        match replay(
            &w,
            issued,
            &policy,
            thin_check,
            thin_check_every != 0,
            &mut stats,
        ) {
            Ok(o) => {
                stats.consistent += 1;
                stats.in_flight_commit += usize::from(o.in_flight);
                stats.newer_data += usize::from(o.newer_data);
            }
            Err(why) => stats.failures.push(format!(
                "seed {seed}, crash after {issued} of {} entries ({}), {policy:?}: {why}",
                w.log.len(),
                op_at(&w, issued)
            )),
        }
    }
    stats
}

#[test]
fn crash_states_are_consistent() {
    let (first, end, min_states) = match std::env::var("CRASH_SEEDS") {
        Ok(range) => {
            let (a, b) = range.split_once("..").expect("CRASH_SEEDS=FIRST..END");
            (a.parse().unwrap(), b.parse().unwrap(), 0)
        }
        Err(_) => (0, DEFAULT_SEEDS, MIN_CI_STATES),
    };
    let target = env_u64("CRASH_STATES", 0) as usize;
    let end = if target > 0 { u64::MAX } else { end };
    let random = env_u64("CRASH_RANDOM", 2);
    let thin_check_every = env_u64("CRASH_THIN_CHECK_EVERY", 40);
    if thin_check_every != 0 {
        assert!(
            fixtures::tools::available(),
            "thin-provisioning-tools must be installed (run the setup script)"
        );
    }
    let threads = env_u64(
        "CRASH_THREADS",
        std::thread::available_parallelism().map_or(2, |n| n.get().min(4)) as u64,
    );
    let started = Instant::now();
    let next = AtomicU64::new(first);
    let done = AtomicUsize::new(0);
    let total = Mutex::new(Stats::default());
    let seeds_run = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                if target > 0 && done.load(Ordering::Relaxed) >= target {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= end {
                    return;
                }
                let s = run_seed(seed, random, thin_check_every);
                done.fetch_add(s.states, Ordering::Relaxed);
                seeds_run.fetch_add(1, Ordering::Relaxed);
                total.lock().unwrap().add(s);
            });
        }
    });
    let stats = total.into_inner().unwrap();
    eprintln!(
        "crash consistency: {} seeds, {} crash states replayed, {} consistent, {} failed; \
         {} real thin_check runs; {} states in a commit's flight (new superblock), torn \
         superblock writes: {} new / {} old; {} states read in-place data newer than their \
         transaction; {:.1} s",
        seeds_run.load(Ordering::Relaxed),
        stats.states,
        stats.consistent,
        stats.failures.len(),
        stats.thin_checks,
        stats.in_flight_commit,
        stats.torn_sb_new,
        stats.torn_sb_old,
        stats.newer_data,
        started.elapsed().as_secs_f64()
    );
    for f in stats.failures.iter().take(20) {
        eprintln!("  {f}");
    }
    assert!(
        stats.failures.is_empty(),
        "{} inconsistent crash states",
        stats.failures.len()
    );
    assert!(stats.states >= min_states.max(target));
    if min_states > 0 {
        // The sweep reached the interesting cases.
        assert!(stats.in_flight_commit > 0 && stats.torn_sb_new > 0 && stats.torn_sb_old > 0);
        assert!(stats.newer_data > 0);
    }
}

/// The recorder sees the pool's commit protocol: data flushed, then metadata blocks, a
/// metadata flush, the superblock, a metadata flush; nothing but the superblock write
/// touches block 0.
#[test]
fn commit_protocol_as_recorded() {
    for seed in 0..10 {
        commit_protocol_of(seed);
    }
}

fn commit_protocol_of(seed: u64) {
    let w = build(seed);
    let entries = w.log.entries(0..w.log.len());
    assert!(w.commits.len() > 5);
    for c in &w.commits[1..] {
        let i = c.sb_entry;
        // Back from the superblock write: a metadata flush first (after every metadata
        // block write of the transaction).
        let prev_meta = (0..i)
            .rev()
            .find(|&k| entries[k].dev() == 0)
            .expect("metadata before the superblock");
        assert_eq!(
            entries[prev_meta],
            Entry::Flush { dev: 0 },
            "op `{}`: the superblock write at {i} follows an unflushed metadata write",
            c.op
        );
        let flushed = (i + 1..entries.len()).find(|&k| entries[k] == Entry::Flush { dev: 0 });
        assert!(
            flushed.is_some_and(|k| k < c.durable_at),
            "op `{}`: superblock at {i} not flushed before the op returned",
            c.op
        );
        // The data device was flushed after its last write before the superblock.
        let last_data_write = (0..i).rev().find(|&k| {
            matches!(
                entries[k],
                Entry::Write { dev: 1, .. } | Entry::Discard { dev: 1, .. }
            )
        });
        if let Some(k) = last_data_write {
            assert!(
                (k..i).any(|j| entries[j] == Entry::Flush { dev: 1 }),
                "op `{}`: data written at entry {k} was not flushed before the superblock at {i}",
                c.op
            );
        }
    }
    if seed == 0 {
        let stats = w.log.stats();
        eprintln!("seed 0 log: {stats:?}, {} commits", w.commits.len());
    }
}

// ---- regressions -----------------------------------------------------------------------------

/// A small pool on recording devices, with thin 1 created and committed.
fn small_pool(meta_bytes: u64) -> (CrashLog, Arc<CrashDevice>, Arc<CrashDevice>, Arc<Pool>) {
    let log = CrashLog::new();
    let meta = log.add_device(Image::zeroed(meta_bytes), "metadata");
    let data = log.add_device(Image::filled(4 << 20, POISON), "data");
    let pool = Pool::format(
        meta.clone(),
        data.clone(),
        DataBlockSize::DEFAULT,
        PoolOptions::default(),
    )
    .unwrap();
    pool.create_thin(ThinId::new(1).unwrap()).unwrap();
    pool.commit().unwrap();
    (log, meta, data, pool)
}

/// Writes one tagged block at thin 1's block 0 (not committed).
fn write_tagged_block(pool: &Arc<Pool>) {
    let mut buf = vec![0u8; BS as usize];
    for (k, sector) in buf.chunks_exact_mut(512).enumerate() {
        fill_sector(sector, 1, 1, 0, k);
    }
    let thin = pool.open_thin(ThinId::new(1).unwrap()).unwrap();
    thin.write(&buf, 0).unwrap();
}

/// Crashes right after the last superblock write became durable, losing every unflushed
/// write, and reads thin 1's block 0: it is mapped, so it must hold what was written.
fn block_zero_after_last_commit(log: &CrashLog, read_only: bool) -> Vec<Seen> {
    let entries = log.entries(0..log.len());
    let sb = (0..entries.len())
        .rev()
        .find(|&i| {
            matches!(
                entries[i],
                Entry::Write {
                    dev: 0,
                    offset: 0,
                    ..
                }
            )
        })
        .unwrap();
    let durable = (sb..entries.len())
        .find(|&i| entries[i] == Entry::Flush { dev: 0 })
        .unwrap()
        + 1;
    let crash = log.crash(durable, &Policy::DropAll);
    let opts = PoolOptions {
        read_only,
        ..PoolOptions::default()
    };
    let pool = Pool::open(crash.devices[0].clone(), crash.devices[1].clone(), opts).unwrap();
    let thin = pool.open_thin(ThinId::new(1).unwrap()).unwrap();
    assert_eq!(thin.mapped_blocks().unwrap(), 1);
    let mut buf = vec![0u8; BS as usize];
    thin.read(&mut buf, 0).unwrap();
    buf.chunks_exact(512).map(decode).collect()
}

fn tagged(k: usize) -> Seen {
    Seen::Tag {
        gen: 1,
        writer: 1,
        vblock: 0,
        sector: k,
    }
}

/// Releasing the metadata snapshot commits: the data the new mappings point at must be
/// flushed first (it was not: a crash right after showed the data device's old contents
/// through a committed mapping).
#[test]
fn release_metadata_snap_flushes_data_before_committing() {
    let (log, _meta, _data, pool) = small_pool(4 << 20);
    pool.reserve_metadata_snap().unwrap();
    write_tagged_block(&pool);
    pool.release_metadata_snap().unwrap();
    let seen = block_zero_after_last_commit(&log, false);
    for (k, s) in seen.into_iter().enumerate() {
        assert_eq!(
            s,
            tagged(k),
            "sector {k} after a crash right after the release"
        );
    }
}

/// Running out of metadata space commits what there is (and sets needs_check): the data
/// the mappings point at must be flushed first.
#[test]
fn metadata_exhaustion_flushes_data_before_committing() {
    let (log, _meta, _data, pool) = small_pool(256 << 10);
    write_tagged_block(&pool);
    let mut id = 2;
    loop {
        match pool.create_thin(ThinId::new(id).unwrap()) {
            Ok(()) => id += 1,
            Err(engine::Error::NoMetadataSpace) => break,
            Err(e) => panic!("create thin {id}: {e}"),
        }
        assert!(id < 1000, "metadata never ran out");
    }
    assert!(pool.superblock().needs_check());
    drop(pool);
    let seen = block_zero_after_last_commit(&log, true);
    for (k, s) in seen.into_iter().enumerate() {
        assert_eq!(
            s,
            tagged(k),
            "sector {k} after a crash right after the exhaustion commit"
        );
    }
}

// ---- concurrent writers and commits ----------------------------------------------------------

/// One write of the concurrent test: thin 1's block `v`, sectors `sectors`, issued while the
/// log's clock went from `start` to `end`.
struct TimedWrite {
    v: u64,
    sectors: Range<usize>,
    start: usize,
    end: usize,
}

/// A writer provisions blocks while another thread commits: a commit may take a write or
/// not, but a mapping it records must point at the written data (never at what the data
/// device held before), and a write that completed before the commit started is in it.
/// Crashes at a sample of the flush boundaries, with unflushed writes dropped, applied and
/// torn (`CRASH_CONCURRENT_ROUNDS`, `CRASH_CONCURRENT_STATES` per round for longer runs).
#[test]
fn crash_during_concurrent_writes_and_commits() {
    let rounds = env_u64("CRASH_CONCURRENT_ROUNDS", 6);
    let (mut states, mut failures, mut mid_commit) = (0, Vec::new(), 0);
    for round in 0..rounds {
        let (n, m) = concurrent_round(round, &mut failures);
        states += n;
        mid_commit += m;
    }
    eprintln!(
        "concurrent commits: {rounds} rounds, {states} crash states, {} failed; {mid_commit} \
         states show a transaction committed while writes were in flight",
        failures.len()
    );
    for f in failures.iter().take(20) {
        eprintln!("  {f}");
    }
    assert!(
        failures.is_empty(),
        "{} inconsistent crash states",
        failures.len()
    );
    assert!(mid_commit > 0, "no commit overlapped a write");
}

/// Returns (crash states replayed, states whose transaction overlapped a write).
fn concurrent_round(round: u64, failures: &mut Vec<String>) -> (usize, usize) {
    const N: u64 = 48;
    let mut rng = SmallRng::seed_from_u64(round);
    let plan: Vec<(u64, Range<usize>)> = (0..N)
        .map(|v| {
            let sectors = if rng.gen_bool(0.5) {
                0..SPB
            } else {
                let a = rng.gen_range(0..SPB - 1);
                a..rng.gen_range(a + 1..=SPB)
            };
            (v, sectors)
        })
        .collect();
    let (log, _meta, data, pool) = small_pool(4 << 20);
    // Widen the windows between the pool's steps on the data device.
    data.set_hook(Some(Arc::new(|_| {
        std::thread::sleep(std::time::Duration::from_micros(30))
    })));
    let writes = Mutex::new(Vec::new());
    let calls = Mutex::new(Vec::new());
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let thin = pool.open_thin(ThinId::new(1).unwrap()).unwrap();
            for (v, sectors) in &plan {
                let mut buf = vec![0u8; sectors.len() * 512];
                for (k, s) in sectors.clone().enumerate() {
                    fill_sector(&mut buf[k * 512..][..512], 1, 1, *v, s);
                }
                let start = log.len();
                thin.write(&buf, v * BS + sectors.start as u64 * 512)
                    .unwrap();
                let end = log.len();
                writes.lock().unwrap().push(TimedWrite {
                    v: *v,
                    sectors: sectors.clone(),
                    start,
                    end,
                });
            }
            done.store(true, Ordering::SeqCst);
        });
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                let start = log.len();
                pool.commit().unwrap();
                calls.lock().unwrap().push((start, log.len()));
            }
        });
    });
    let start = log.len();
    pool.commit().unwrap();
    drop(pool);
    calls.lock().unwrap().push((start, log.len()));
    data.set_hook(None);
    let (writes, calls) = (writes.into_inner().unwrap(), calls.into_inner().unwrap());

    // Every superblock write, the clock when its commit started, and when it was durable.
    let entries = log.entries(0..log.len());
    let mut sbs = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if let Entry::Write {
            dev: 0, offset: 0, ..
        } = e
        {
            let bytes = log.write_bytes(i);
            if bytes.iter().all(|&b| b == 0) {
                continue;
            }
            let began = calls
                .iter()
                .find(|(s, e)| *s <= i && i < *e)
                .map_or(i, |c| c.0);
            let durable = (i..entries.len())
                .find(|&k| entries[k] == Entry::Flush { dev: 0 })
                .map_or(usize::MAX, |k| k + 1);
            sbs.push((i, bytes, began, durable));
        }
    }
    let first = writes.first().map_or(0, |w| w.start);
    let mut points = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if matches!(e, Entry::Flush { .. }) && i >= first {
            for issued in [i, i + 1] {
                points.push((issued, Policy::DropAll));
                points.push((issued, Policy::ApplyAll));
                points.push((issued, Policy::Random { seed: rng.gen() }));
            }
        }
    }
    // A sample of them: the committer makes many flushes.
    let per_round = env_u64("CRASH_CONCURRENT_STATES", 300) as usize;
    while points.len() > per_round {
        points.swap_remove(rng.gen_range(0..points.len()));
    }
    let mut overlapped = 0;
    for (issued, policy) in &points {
        let r = (|| -> Result<bool, String> {
            let crash = log.crash(*issued, policy);
            let mut sb = vec![0u8; 4096];
            crash.devices[0].read_at(&mut sb, 0).unwrap();
            let durable = sbs.iter().rposition(|s| s.3 <= *issued).unwrap();
            let c = (durable..sbs.len())
                .rev()
                .find(|&c| sbs[c].0 < *issued && sbs[c].1 == sb)
                .ok_or("block 0 holds no superblock the pool may come back to")?;
            let (sb_entry, began) = (sbs[c].0, sbs[c].2);
            let report = check(&*crash.devices[0], &CheckOptions::default());
            if !report.is_clean() {
                let errors: Vec<String> = report.errors().take(5).map(|f| f.to_string()).collect();
                return Err(format!("our checker: {errors:?}"));
            }
            let pool = Pool::open(
                crash.devices[0].clone(),
                crash.devices[1].clone(),
                PoolOptions::default(),
            )
            .map_err(|e| format!("Pool::open: {e}"))?;
            let thin = pool.open_thin(ThinId::new(1).unwrap()).unwrap();
            let mut buf = vec![0u8; (N * BS) as usize];
            thin.read(&mut buf, 0).map_err(|e| e.to_string())?;
            let mut written = 0;
            let mut overlap = false;
            for w in &writes {
                let block = &buf[(w.v * BS) as usize..][..BS as usize];
                let unmapped = block.iter().all(|&b| b == 0);
                if unmapped {
                    if w.end <= began {
                        return Err(format!(
                            "block {} lost: written at {}..{} before the commit at {began}",
                            w.v, w.start, w.end
                        ));
                    }
                    continue;
                }
                written += 1;
                overlap |= w.end > began;
                if w.start > sb_entry {
                    return Err(format!(
                        "block {} written at {} shows in the transaction of {sb_entry}",
                        w.v, w.start
                    ));
                }
                for (k, sector) in block.chunks_exact(512).enumerate() {
                    let want = if w.sectors.contains(&k) {
                        Seen::Tag {
                            gen: 1,
                            writer: 1,
                            vblock: w.v,
                            sector: k,
                        }
                    } else {
                        Seen::Zero
                    };
                    if decode(sector) != want {
                        return Err(format!(
                            "block {} sector {k}: {:?}, want {want:?} (written at {}..{}, \
                             commit began {began}, superblock at {sb_entry})",
                            w.v,
                            decode(sector),
                            w.start,
                            w.end
                        ));
                    }
                }
            }
            let mapped = thin.mapped_blocks().unwrap();
            if mapped != written {
                return Err(format!("{mapped} blocks mapped, {written} read back"));
            }
            Ok(overlap)
        })();
        match r {
            Ok(o) => overlapped += usize::from(o),
            Err(why) => failures.push(format!(
                "round {round}, crash after {issued} of {} entries, {policy:?}: {why}",
                log.len()
            )),
        }
    }
    (points.len(), overlapped)
}
