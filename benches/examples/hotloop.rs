//! One workload in a loop, for profilers (`perf record -g`, flamegraphs):
//!
//! ```text
//! cargo build --profile bench -p benches --example hotloop
//! perf record --call-graph dwarf target/release/examples/hotloop read4k thin-file 10
//! ```
//!
//! Arguments: `OP TARGET SECONDS`, where OP is `read4k`, `write4k` (overwrite of
//! provisioned blocks), `read1m`, `write1m`, `provision` (1 MiB writes into new space) or
//! `cow4k` (4 KiB writes into distinct blocks shared with a snapshot, thin targets only) or
//! `snap` (commit, then time create_snap of the origin; thin targets),
//! and TARGET is `plain` (a plain file), `thin-file` (a pool on files), `thin-file-direct`
//! (the same pool's data file accessed directly, bypassing the engine), `thin-mem`
//! (MemDevice metadata and data), `thin-null` (MemDevice metadata, NullDevice data) or
//! `thin-filemeta-null` (metadata in a file, NullDevice data).
//! Files go to a tempdir in `BENCH_DIR` (or in /var/tmp); `BENCH_SIZE` (default 1G) is the span.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use benches::*;
use engine::io::{BlockDevice, FileDevice, MemDevice};
use engine::{DataBlockSize, Pool, PoolOptions, ThinId};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [op, target, secs] = &args[..] else {
        bail!("usage: hotloop OP TARGET SECONDS (see the source)");
    };
    let secs: f64 = secs.parse()?;
    let cfg = Config::from_env();
    let size = cfg.size / (1 << 20) * (1 << 20);
    let (dir, _guard) = cfg.scratch()?;
    let span = match op.as_str() {
        "provision" => size * 64,
        "snap" => 65 << 30,
        "cow4k" => size * 2,
        _ => size,
    };

    let (meta, data): (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) = match target.as_str() {
        "plain" | "thin-file" | "thin-file-direct" => (
            Arc::new(FileDevice::create(&dir.join("meta"), 256 << 20)?),
            Arc::new(FileDevice::create(&dir.join("data"), span)?),
        ),
        "thin-mem" => (
            Arc::new(MemDevice::new(256 << 20)),
            Arc::new(MemDevice::new(span)),
        ),
        "thin-null" => (
            Arc::new(MemDevice::new(256 << 20)),
            Arc::new(NullDevice::new(span)),
        ),
        "thin-filemeta-null" => (
            Arc::new(FileDevice::create(&dir.join("meta"), 256 << 20)?),
            Arc::new(NullDevice::new(span)),
        ),
        t => bail!("unknown target {t}"),
    };
    let id = ThinId::new(0).expect("0");
    let pool = Pool::format(
        meta,
        data.clone(),
        DataBlockSize::DEFAULT,
        PoolOptions::default(),
    )?;
    pool.create_thin(id)?;
    let thin = pool.open_thin(id)?;
    let plain = PlainFile(FileDevice::create(&dir.join("plain"), span)?);
    let buf = pattern(1 << 20, 1);
    let direct = Dev(data.clone());
    let t: &dyn Target = match target.as_str() {
        "plain" => &plain,
        "thin-file-direct" => {
            // Provision through the thin, then time the pool's data file directly (the
            // thin's blocks sit at the same offsets: allocation is sequential).
            seq_write(&thin, 0, size, 64 << 10, &buf)?;
            thin.flush()?;
            &direct
        }
        _ => &thin,
    };
    if op != "provision" {
        seq_write(t, 0, size, 64 << 10, &buf)?;
        t.flush()?;
    }
    if op == "snap" {
        // The origin maps `size` bytes (built above with 64 KiB writes); each iteration is
        // a commit (untimed) and a create_snap (timed).
        let mut times = Vec::new();
        let start = Instant::now();
        let mut n = 1u64;
        while start.elapsed() < Duration::from_secs_f64(secs) {
            pool.commit()?;
            let t0 = Instant::now();
            pool.create_snap(ThinId::new(n).expect("small"), id)?;
            times.push(t0.elapsed().as_secs_f64() * 1e6);
            n += 1;
        }
        times.sort_by(f64::total_cmp);
        println!(
            "create_snap, origin {}: {} calls, median {:.2} µs",
            engine::units::format_size(size),
            times.len(),
            times[times.len() / 2]
        );
        return Ok(());
    }
    if op == "cow4k" {
        // Every block of the thin is now shared with the snapshot: each 4 KiB write into a
        // new block copies it.
        pool.create_snap(ThinId::new(1).expect("1"), id)?;
        pool.commit()?;
        let mut blocks: Vec<u64> = (0..size >> 16).collect();
        use rand::seq::SliceRandom;
        blocks.shuffle(&mut <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(3));
        let start = Instant::now();
        let mut n = 0u64;
        for b in blocks {
            if start.elapsed() >= Duration::from_secs_f64(secs) {
                break;
            }
            t.write(&buf[..4096], (b << 16) + 8192)?;
            n += 1;
        }
        let d = start.elapsed().as_secs_f64();
        println!(
            "cow4k on {target}: {n} ops in {d:.2} s = {:.3} µs/op",
            d * 1e6 / n as f64
        );
        return Ok(());
    }
    let (io, step): (usize, u64) = match op.as_str() {
        "read4k" | "write4k" => (4096, 4096),
        "read1m" | "write1m" | "provision" => (1 << 20, 1 << 20),
        o => bail!("unknown op {o}"),
    };
    let offs = random_offsets(1 << 16, size, step, 42);
    let mut rbuf = vec![0u8; io];
    let start = Instant::now();
    let mut n = 0u64;
    let mut next = 0u64;
    // HOTLOOP_SPREAD=1: every call at another of the 65536 offsets (the whole span, as the
    // bench's hot/w64 reads), instead of the same first 1024 (CPU caches warm).
    let spread = std::env::var_os("HOTLOOP_SPREAD").is_some();
    let mut cursor = 0usize;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        let batch = if io >= 1 << 20 { 16 } else { 1024 };
        let window = if spread {
            cursor = (cursor + batch) % (offs.len() - batch);
            &offs[cursor..cursor + batch]
        } else {
            &offs[..batch]
        };
        for &off in window {
            match op.as_str() {
                "read4k" | "read1m" => t.read(&mut rbuf, off)?,
                "write4k" | "write1m" => t.write(&buf[..io], off)?,
                _ => {
                    if next + io as u64 > span {
                        bail!("out of space after {n} writes");
                    }
                    t.write(&buf[..io], next)?;
                    next += io as u64;
                }
            }
            n += 1;
        }
    }
    let d = start.elapsed().as_secs_f64();
    println!(
        "{op} on {target}: {n} ops in {d:.2} s = {:.3} µs/op",
        d * 1e6 / n as f64
    );
    drop(thin);
    drop(pool);
    Ok(())
}

/// A pool's device used directly, bypassing the engine.
struct Dev(Arc<dyn BlockDevice>);

impl Target for Dev {
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
