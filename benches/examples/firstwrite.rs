//! The cold first 4 KiB write + flush into a snapshot, one phase at a time, for strace/perf:
//!
//! ```text
//! cargo build --profile bench -p benches --example firstwrite
//! strace -f -T -e trace=pread64,pwrite64,fdatasync target/release/examples/firstwrite 1G 5
//! ```
//!
//! Arguments: `SIZE ROUNDS`. A pool on two sparse files in a tempdir in `BENCH_DIR` (or in
//! /var/tmp) holds thin 1 with SIZE bytes of random data. Each round snapshots it (thin 2),
//! commits, reopens the pool (its node cache cold, as after a restart), drops the page cache,
//! then times opening the snapshot, a 4 KiB write in the middle of it and the flush, and
//! deletes the snapshot. Needs root (drop_caches).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use benches::Config;
use engine::io::{BlockDevice, FileDevice, OpenMode};
use engine::{DataBlockSize, Pool, PoolOptions, ThinId};
use rand::{RngCore, SeedableRng};

fn open(dir: &std::path::Path) -> Result<Arc<Pool>> {
    let m: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&dir.join("meta"), OpenMode::ReadWrite)?);
    let d: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&dir.join("data"), OpenMode::ReadWrite)?);
    Ok(Pool::open(m, d, PoolOptions::default())?)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [size, rounds] = &args[..] else {
        bail!("usage: firstwrite SIZE ROUNDS");
    };
    let size = engine::units::parse_size(size).ok_or_else(|| anyhow::anyhow!("bad size"))?;
    let rounds: usize = rounds.parse()?;
    let (dir, _guard) = Config::from_env().scratch()?;
    let (origin, snap) = (ThinId::new(1).expect("1"), ThinId::new(2).expect("2"));
    {
        let m: Arc<dyn BlockDevice> = Arc::new(FileDevice::create(&dir.join("meta"), 256 << 20)?);
        let d: Arc<dyn BlockDevice> = Arc::new(FileDevice::create(&dir.join("data"), size * 2)?);
        let pool = Pool::format(m, d, DataBlockSize::DEFAULT, PoolOptions::default())?;
        pool.create_thin(origin)?;
        let thin = pool.open_thin(origin)?;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let mut buf = vec![0u8; 1 << 20];
        for off in (0..size).step_by(1 << 20) {
            rng.fill_bytes(&mut buf);
            thin.write(&buf, off)?;
        }
        pool.commit()?;
    }
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    for round in 0..rounds {
        let created = {
            let pool = open(&dir)?;
            let c = Instant::now();
            pool.create_snap(snap, origin)?;
            pool.commit()?;
            ms(c)
        };
        let pool = open(&dir)?;
        benches::sys::drop_caches()?;
        eprintln!("--- round {round}: measuring");
        let t = Instant::now();
        let thin = pool.open_thin(snap)?;
        let opened = ms(t);
        let w = Instant::now();
        thin.write(&[0xab; 4096], size / 2 + round as u64 * (1 << 20))?;
        let written = ms(w);
        let f = Instant::now();
        thin.flush()?;
        let flushed = ms(f);
        eprintln!("--- round {round}: done");
        println!(
            "round {round}: total {:.3} ms = open {opened:.3} + write {written:.3} + flush {flushed:.3} (create {created:.3})",
            ms(t)
        );
        drop(thin);
        pool.delete(snap)?;
        pool.commit()?;
    }
    Ok(())
}
