//! Random sequences of pool operations checked against an in-memory model of every thin's
//! bytes. After each commit every thin reads back as the model says, and the real
//! `thin_check` passes and the real `thin_dump` lists exactly the blocks the model maps.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use engine::io::{BlockDevice, FileDevice, OpenMode};
use engine::tools::check::{check, CheckOptions};
use engine::tools::dump::{dump, DumpOptions};
use engine::{DataBlockSize, Error, Pool, PoolOptions, ThinId};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const BS: u64 = 64 * 1024;
/// Virtual blocks a thin is written over: enough for multi-level mapping trees.
const SPAN: u64 = 4000;

#[derive(Default, Clone)]
struct ThinModel {
    /// Block contents of mapped blocks (unmapped blocks read as zeros), shared between a
    /// thin and its snapshots until one of them changes the block, like the pool itself.
    blocks: BTreeMap<u64, Arc<Vec<u8>>>,
}

impl ThinModel {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let pos = offset + done as u64;
            let (v, within) = (pos / BS, (pos % BS) as usize);
            let n = (BS as usize - within).min(data.len() - done);
            let block = self
                .blocks
                .entry(v)
                .or_insert_with(|| Arc::new(vec![0; BS as usize]));
            Arc::make_mut(block)[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    fn discard(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (v, within) = (pos / BS, pos % BS);
            let n = (BS - within).min(end - pos);
            if n == BS {
                self.blocks.remove(&v);
            } else if let Some(block) = self.blocks.get_mut(&v) {
                Arc::make_mut(block)[within as usize..(within + n) as usize].fill(0);
            }
            pos += n;
        }
    }
}

struct Harness {
    dir: tempfile::TempDir,
    pool: Option<Arc<Pool>>,
    model: BTreeMap<u64, ThinModel>,
    committed: BTreeMap<u64, ThinModel>,
}

impl Harness {
    fn new(data_blocks: u64) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let meta: Arc<dyn BlockDevice> =
            Arc::new(FileDevice::create(&dir.path().join("metadata"), 8 << 20).unwrap());
        let data: Arc<dyn BlockDevice> =
            Arc::new(FileDevice::create(&dir.path().join("data"), data_blocks * BS).unwrap());
        let pool =
            Pool::format(meta, data, DataBlockSize::DEFAULT, PoolOptions::default()).unwrap();
        Harness {
            dir,
            pool: Some(pool),
            model: BTreeMap::new(),
            committed: BTreeMap::new(),
        }
    }

    fn pool(&self) -> &Arc<Pool> {
        self.pool.as_ref().unwrap()
    }

    fn reopen(&mut self) {
        self.pool = None; // closing commits
        self.committed = self.model.clone();
        let meta: Arc<dyn BlockDevice> = Arc::new(
            FileDevice::open(&self.dir.path().join("metadata"), OpenMode::ReadWrite).unwrap(),
        );
        let data: Arc<dyn BlockDevice> =
            Arc::new(FileDevice::open(&self.dir.path().join("data"), OpenMode::ReadWrite).unwrap());
        self.pool = Some(Pool::open(meta, data, PoolOptions::default()).unwrap());
    }

    fn verify_reads(&self, rng: &mut SmallRng) {
        for (&id, m) in &self.model {
            let thin = self.pool().open_thin(ThinId::new(id).unwrap()).unwrap();
            assert_eq!(
                thin.mapped_blocks().unwrap(),
                m.blocks.len() as u64,
                "thin {id} mapped blocks"
            );
            let mut buf = vec![0u8; BS as usize];
            for (&v, want) in &m.blocks {
                thin.read(&mut buf, v * BS).unwrap();
                assert!(buf == **want, "thin {id} block {v} differs");
            }
            // Unmapped blocks read as zeros; an unaligned read spanning several blocks agrees.
            for _ in 0..8 {
                let off = rng.gen_range(0..SPAN * BS);
                let len = rng.gen_range(1..3 * BS as usize);
                let mut got = vec![0xEE; len];
                thin.read(&mut got, off).unwrap();
                let mut want = vec![0u8; len];
                let mut done = 0;
                while done < len {
                    let pos = off + done as u64;
                    let (v, within) = (pos / BS, (pos % BS) as usize);
                    let n = (BS as usize - within).min(len - done);
                    if let Some(b) = m.blocks.get(&v) {
                        want[done..done + n].copy_from_slice(&b[within..within + n]);
                    }
                    done += n;
                }
                assert!(got == want, "thin {id}: read of {len} at {off} differs");
            }
        }
    }

    /// The real thin_check passes and the real thin_dump maps exactly the model's blocks.
    fn verify_with_real_tools(&self) {
        let meta = self.dir.path().join("metadata");
        let real_check = std::process::Command::new("thin_check")
            .arg(&meta)
            .output()
            .expect("thin_check runs");
        assert!(
            real_check.status.success(),
            "thin_check failed:\n{}{}",
            String::from_utf8_lossy(&real_check.stdout),
            String::from_utf8_lossy(&real_check.stderr)
        );
        let real_dump = std::process::Command::new("thin_dump")
            .arg(&meta)
            .output()
            .expect("thin_dump runs");
        assert!(real_dump.status.success());
        let theirs = String::from_utf8_lossy(&real_dump.stdout);
        // Our dump says exactly what theirs says, and our checker (which also checks data
        // reference counts and leaks) is clean.
        let dev = FileDevice::open(&meta, OpenMode::ReadOnly).unwrap();
        let mut ours = Vec::new();
        dump(&dev, &DumpOptions::default(), &mut ours).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            theirs,
            "our dump differs from thin_dump"
        );
        let report = check(&dev, &CheckOptions::default());
        assert!(report.is_clean(), "our check: {:?}", report.findings);
        if self.pool().superblock().held_root != 0 {
            let snap = std::process::Command::new("thin_dump")
                .arg("-m")
                .arg(&meta)
                .output()
                .unwrap();
            let mut ours = Vec::new();
            dump(
                &dev,
                &DumpOptions {
                    use_metadata_snap: true,
                    ..Default::default()
                },
                &mut ours,
            )
            .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&snap.stdout),
                "dump -m"
            );
        }
        let mapped = parse_dump_mappings(&theirs);
        let want: BTreeMap<u64, BTreeSet<u64>> = self
            .committed
            .iter()
            .map(|(&id, m)| (id, m.blocks.keys().copied().collect()))
            .collect();
        assert_eq!(mapped, want, "thin_dump's mappings differ from the model");
    }
}

fn parse_dump_mappings(xml: &str) -> BTreeMap<u64, BTreeSet<u64>> {
    let attr = |line: &str, name: &str| -> u64 {
        let key = format!("{name}=\"");
        let start = line.find(&key).unwrap() + key.len();
        line[start..].split('"').next().unwrap().parse().unwrap()
    };
    let mut out = BTreeMap::new();
    let mut current = 0;
    for line in xml.lines() {
        let line = line.trim();
        if line.starts_with("<device ") {
            current = attr(line, "dev_id");
            out.insert(current, BTreeSet::new());
        } else if line.starts_with("<single_mapping") {
            out.get_mut(&current)
                .unwrap()
                .insert(attr(line, "origin_block"));
        } else if line.starts_with("<range_mapping") {
            let (b, l) = (attr(line, "origin_begin"), attr(line, "length"));
            out.get_mut(&current).unwrap().extend(b..b + l);
        }
    }
    out
}

fn pattern(rng: &mut SmallRng, len: usize) -> Vec<u8> {
    let seed: u8 = rng.gen();
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8) ^ (i as u8))
        .collect()
}

fn real_tools_present() -> bool {
    Path::new("/usr/sbin/thin_check").exists() || which("thin_check")
}

fn which(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(seed: u64, steps: usize) {
    assert!(
        real_tools_present(),
        "thin-provisioning-tools must be installed (run the setup script)"
    );
    let mut rng = SmallRng::seed_from_u64(seed);
    // Verification draws from its own generator so the operations do not depend on how often
    // we verify.
    let mut vrng = SmallRng::seed_from_u64(!seed);
    let mut h = Harness::new(60_000);
    let mut commits = 0;
    for step in 0..steps {
        let ids: Vec<u64> = h.model.keys().copied().collect();
        let pick = rng.gen_range(0..100);
        match pick {
            0..=4 => {
                let id = rng.gen_range(0..40);
                let r = h.pool().create_thin(ThinId::new(id).unwrap());
                if let std::collections::btree_map::Entry::Vacant(e) = h.model.entry(id) {
                    r.unwrap();
                    e.insert(ThinModel::default());
                } else {
                    assert!(matches!(r, Err(Error::ThinExists(_))));
                }
            }
            5..=9 if !ids.is_empty() => {
                let origin = ids[rng.gen_range(0..ids.len())];
                let id = rng.gen_range(0..40);
                let r = h
                    .pool()
                    .create_snap(ThinId::new(id).unwrap(), ThinId::new(origin).unwrap());
                if h.model.contains_key(&id) {
                    assert!(matches!(r, Err(Error::ThinExists(_))));
                } else {
                    r.unwrap();
                    let copy = h.model[&origin].clone();
                    h.model.insert(id, copy);
                }
            }
            10..=12 if ids.len() > 2 => {
                let id = ids[rng.gen_range(0..ids.len())];
                h.pool().delete(ThinId::new(id).unwrap()).unwrap();
                h.model.remove(&id);
            }
            13..=62 if !ids.is_empty() => {
                let id = ids[rng.gen_range(0..ids.len())];
                // Mostly clustered small writes (to share leaves), sometimes large ones.
                let len = if rng.gen_bool(0.1) {
                    rng.gen_range(1..4 * BS as usize)
                } else {
                    rng.gen_range(1..9000)
                };
                let hot = rng.gen_bool(0.7);
                let off = if hot {
                    rng.gen_range(0..300 * BS)
                } else {
                    rng.gen_range(0..SPAN * BS)
                };
                let data = pattern(&mut rng, len);
                let thin = h.pool().open_thin(ThinId::new(id).unwrap()).unwrap();
                thin.write(&data, off).unwrap();
                h.model.get_mut(&id).unwrap().write(off, &data);
            }
            63..=72 if !ids.is_empty() => {
                let id = ids[rng.gen_range(0..ids.len())];
                let off = rng.gen_range(0..SPAN * BS);
                let len = rng.gen_range(1..40 * BS);
                let thin = h.pool().open_thin(ThinId::new(id).unwrap()).unwrap();
                thin.discard(off, len).unwrap();
                h.model.get_mut(&id).unwrap().discard(off, len);
            }
            83..=86 if !ids.is_empty() => {
                // Many scattered small writes: grows mapping trees past one leaf.
                let id = ids[rng.gen_range(0..ids.len())];
                let thin = h.pool().open_thin(ThinId::new(id).unwrap()).unwrap();
                for _ in 0..250 {
                    let off = rng.gen_range(0..SPAN) * BS + rng.gen_range(0..BS - 600);
                    let data = pattern(&mut rng, 512);
                    thin.write(&data, off).unwrap();
                    h.model.get_mut(&id).unwrap().write(off, &data);
                }
            }
            87..=88 => {
                // The metadata snapshot: reserve one if none is held, else release it.
                if h.pool().superblock().held_root == 0 {
                    h.pool().reserve_metadata_snap().unwrap();
                    h.committed = h.model.clone();
                } else {
                    h.pool().release_metadata_snap().unwrap();
                    h.committed = h.model.clone();
                }
            }
            89 => {
                let total = h.pool().status().total_data_blocks;
                h.pool().resize_data(Some((total + 1000) * BS)).unwrap();
                h.committed = h.model.clone();
            }
            73..=76 => {
                h.reopen();
                commits += 1;
                h.verify_reads(&mut vrng);
                h.verify_with_real_tools();
            }
            77..=82 => {
                h.pool().commit().unwrap();
                h.committed = h.model.clone();
                commits += 1;
                if commits % 3 == 0 {
                    h.verify_reads(&mut vrng);
                    h.verify_with_real_tools();
                }
            }
            _ => {}
        }
        let every: usize = std::env::var("MODEL_VERIFY_EVERY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(97);
        if std::env::var("MODEL_TRACE").is_ok() {
            eprintln!("step {step}: op {pick}");
        }
        if step % every == 0 {
            h.verify_reads(&mut vrng);
        }
    }
    h.pool().commit().unwrap();
    h.committed = h.model.clone();
    h.verify_reads(&mut vrng);
    h.verify_with_real_tools();
    let status = h.pool().status();
    let mapped: usize = h.model.values().map(|m| m.blocks.len()).sum();
    eprintln!(
        "seed {seed}: {commits} commits, {} thins, {mapped} mappings; {}",
        h.model.len(),
        status
    );
    assert!(status.used_data_blocks > 0);
}

#[test]
fn random_operations_seed_1() {
    run(1, 1500);
}

#[test]
fn random_operations_seed_2() {
    run(2, 1500);
}

#[test]
fn random_operations_seed_3() {
    run(3, 1500);
}

/// Longer runs: `MODEL_SEEDS=10..40 cargo test -p engine --test pool_model many_seeds`.
#[test]
fn many_seeds() {
    let Ok(range) = std::env::var("MODEL_SEEDS") else {
        return;
    };
    let (a, b) = range.split_once("..").expect("MODEL_SEEDS=FIRST..END");
    for seed in a.parse::<u64>().unwrap()..b.parse::<u64>().unwrap() {
        eprintln!("seed {seed}");
        run(seed, 1500);
    }
}
