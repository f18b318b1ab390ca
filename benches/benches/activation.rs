//! The kernel-visible data path: ext4 on an activated thin (FUSE file + loop device, served
//! by the pool daemon) against ext4 on a loop device over a plain sparse file, with fio.
//! Needs root (loop, FUSE, mount) and fio; otherwise it says so and does nothing.
//!
//! Two baselines, because they bracket the thin: `plain-dio` is a loop with direct IO (its
//! writes reach the disk), `plain-buffered` a loop without (its writes land in the page
//! cache). The pool daemon writes its data file through the page cache and makes it durable
//! on flush, like the buffered loop; so `plain-buffered` is the like-for-like comparison and
//! `plain-dio` the one a reader would guess from "a loop device over a plain file".
//!
//! All sides live in the same scratch directory (a tempdir in `BENCH_DIR`, or in /var/tmp),
//! each a 4 GiB device formatted `mkfs.ext4 -q` and mounted; fio runs on a 1 GiB file laid
//! out first. Jobs (`--direct=1`, `BENCH_FIO_SECONDS` each, default 10):
//! - `randwrite qd32`: 4 KiB random writes, io_uring, iodepth 32 (goal: ≥ 0.5 of plain);
//! - `seqwrite 1M`: 1 MiB sequential writes, psync (goal: ≥ 0.7 of plain);
//! - `randread qd32` and `randwrite qd1` for the picture.
//!
//! Rounds (`BENCH_RUNS`) run every job on both sides back to back, alternating which goes
//! first; ratios are per round. The daemon runs inside this process, so the process's CPU
//! time over a job divided by its IOs is the daemon's CPU per IO (the FUSE workers' cost;
//! the kernel's loop and FUSE work is in neither column).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use benches::{Config, Goal, Report, Unit};
use engine::activate::daemon::{Client, Daemon, DaemonConfig, RunDir};
use engine::activate::loopdev::{LoopDevice, LoopOptions};
use engine::activate::PoolControl;
use engine::store::Volumes;
use engine::{DataBlockSize, NewPool, PoolOptions, PoolPaths, ThinId};

const GIB: u64 = 1 << 30;
const DEVICE_SIZE: u64 = 4 * GIB;

struct Job {
    name: &'static str,
    args: &'static [&'static str],
    /// What fio reports for the figure.
    unit: Unit,
    goal: Option<f64>,
}

const JOBS: &[Job] = &[
    Job {
        name: "randwrite 4k qd32",
        args: &[
            "--rw=randwrite",
            "--bs=4k",
            "--ioengine=io_uring",
            "--iodepth=32",
        ],
        unit: Unit::Iops,
        goal: Some(0.5),
    },
    Job {
        name: "seqwrite 1M qd1",
        args: &["--rw=write", "--bs=1M", "--ioengine=psync"],
        unit: Unit::MiBps,
        goal: Some(0.7),
    },
    Job {
        name: "randread 4k qd32",
        args: &[
            "--rw=randread",
            "--bs=4k",
            "--ioengine=io_uring",
            "--iodepth=32",
        ],
        unit: Unit::Iops,
        goal: None,
    },
    Job {
        name: "randwrite 4k qd1",
        args: &["--rw=randwrite", "--bs=4k", "--ioengine=psync"],
        unit: Unit::Iops,
        goal: None,
    },
];

/// Unmounts and detaches on drop, whatever happened.
struct Side {
    name: &'static str,
    mount: PathBuf,
    device: PathBuf,
    plain_loop: Option<LoopDevice>,
}

impl Side {
    fn note(&self) -> &'static str {
        match self.name {
            "thin" => "ext4 on a thin (FUSE file + loop, dio)",
            "plain-dio" => "ext4 on a loop (dio) over a sparse file",
            _ => "ext4 on a loop (buffered) over a sparse file",
        }
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).status();
        if let Some(device) = &self.plain_loop {
            if device.detach().is_err() {
                let _ = device.detach_deferred();
            }
        }
    }
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn format_and_mount(name: &'static str, device: &Path, mount: PathBuf) -> Result<Side> {
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(device))?;
    fs::create_dir_all(&mount)?;
    run(Command::new("mount").arg(device).arg(&mount))?;
    Ok(Side {
        name,
        mount,
        device: device.to_path_buf(),
        plain_loop: None,
    })
}

/// Process CPU time (user + system) from /proc/self/stat.
fn process_cpu() -> Duration {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Fields 14 and 15 of stat; after the ')' they are the 12th and 13th.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / hz as f64)
}

struct FioResult {
    value: f64,
    ios: u64,
}

fn fio(side: &Side, job: &Job, seconds: u64) -> Result<FioResult> {
    let file = side.mount.join("t");
    let out = run(Command::new("fio")
        .arg(format!("--name={}", side.name))
        .arg(format!("--filename={}", file.display()))
        .args([
            "--size=1G",
            "--direct=1",
            "--randrepeat=0",
            "--refill_buffers",
        ])
        .args(["--time_based", &format!("--runtime={seconds}")])
        .args(["--output-format=json"])
        .args(job.args))?;
    let json = &out[out.find('{').context("fio printed no JSON")?..];
    let report: serde_json::Value = serde_json::from_str(json)?;
    let j = &report["jobs"][0];
    let dir = if job.args.iter().any(|a| a.contains("read")) {
        &j["read"]
    } else {
        &j["write"]
    };
    let ios = dir["total_ios"].as_u64().unwrap_or(0);
    let value = match job.unit {
        Unit::Iops => dir["iops"].as_f64().unwrap_or(0.0),
        _ => dir["bw_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
    };
    Ok(FioResult { value, ios })
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let config = Config::from_env();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("activation bench: skipped (needs root for loop devices, FUSE and mount)");
        return Ok(());
    }
    if Command::new("fio").arg("--version").output().is_err() {
        eprintln!("activation bench: skipped (fio is not installed)");
        return Ok(());
    }
    let seconds: u64 = std::env::var("BENCH_FIO_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let (dir, _guard) = config.scratch()?;
    let mut report = Report::new();
    report.context(
        "bench",
        "activation: ext4 on an activated thin vs ext4 on a plain loop",
    );
    report.context(
        "kernel",
        run(Command::new("uname").arg("-r"))?.trim().to_string(),
    );
    report.context(
        "fio",
        run(Command::new("fio").arg("--version"))?
            .trim()
            .to_string(),
    );
    report.context(
        "runtime",
        format!("{seconds} s per job, {} rounds", config.runs),
    );

    // The thin side: a pool, its daemon in this process, thin 1 activated.
    let pool_dir = dir.join("pool");
    fs::create_dir_all(&pool_dir)?;
    let paths = PoolPaths::in_dir(&pool_dir);
    let store = engine::VolumeStore::path_in(&pool_dir);
    {
        let mut volumes = Volumes::create(
            &paths,
            &store,
            NewPool::new(2 * DEVICE_SIZE, 256 << 20, DataBlockSize::DEFAULT),
            PoolOptions::default(),
        )?;
        volumes.create_thin(ThinId::new(1).expect("id"), DEVICE_SIZE, None)?;
        volumes.pool().commit()?;
    }
    let run_dir = RunDir::new(dir.join("run"));
    let workers = std::env::var("BENCH_FUSE_WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| engine::activate::fuse::ExportOptions::default().workers);
    report.context("fuse workers", workers.to_string());
    let daemon = Daemon::start(DaemonConfig {
        paths: paths.clone(),
        store_path: store,
        run_dir: run_dir.clone(),
        options: PoolOptions::default(),
        fuse_workers: workers,
    })?;
    let mut client = Client::connect(&run_dir.socket())?.context("the daemon answers")?;
    let activation = client.activate(ThinId::new(1).expect("id"), false)?;
    let thin_side = format_and_mount("thin", &activation.device, dir.join("mnt-thin"));
    if thin_side.is_err() {
        let _ = client.deactivate(ThinId::new(1).expect("id"), true);
        daemon.shutdown()?;
    }

    // The baselines: a sparse file of the same size on a loop device, once with direct IO
    // (the loop writes to the disk) and once buffered (the loop writes into the page cache,
    // as the pool daemon does with its data file: the like-for-like comparison).
    let mut sides = vec![thin_side?];
    for (name, direct_io) in [("plain-dio", true), ("plain-buffered", false)] {
        let file = dir.join(format!("{name}.img"));
        fs::File::create(&file)?.set_len(DEVICE_SIZE)?;
        let device = LoopDevice::attach(
            &file,
            LoopOptions {
                direct_io,
                ..LoopOptions::default()
            },
        )?;
        match format_and_mount(name, &device.path(), dir.join(format!("mnt-{name}"))) {
            Ok(mut side) => {
                side.plain_loop = Some(device);
                sides.push(side);
            }
            Err(e) => {
                let _ = device.detach_deferred();
                return Err(e);
            }
        }
    }
    report.context(
        "devices",
        sides
            .iter()
            .map(|s| format!("{} {}", s.name, s.device.display()))
            .collect::<Vec<_>>()
            .join(", "),
    );

    for job in JOBS {
        // samples[side][round]
        let mut samples = vec![Vec::new(); sides.len()];
        let mut cpu_per_io = Vec::new();
        for round in 0..config.runs {
            // Rotate who goes first, so that drift and background load hit every side alike.
            for k in 0..sides.len() {
                let i = (k + round) % sides.len();
                let before = process_cpu();
                let r = fio(&sides[i], job, seconds)?;
                let cpu = process_cpu() - before;
                if i == 0 && r.ios > 0 {
                    cpu_per_io.push(cpu.as_secs_f64() * 1e6 / r.ios as f64);
                }
                samples[i].push(r.value);
            }
        }
        for (side, values) in sides.iter().zip(&samples) {
            report.row(
                "activation",
                job.name,
                side.name,
                job.unit,
                values,
                side.note(),
            );
        }
        report.row(
            "activation",
            job.name,
            "daemon",
            Unit::Micros,
            &cpu_per_io,
            "daemon CPU per IO",
        );
        for (b, baseline) in sides.iter().enumerate().skip(1) {
            let ratios: Vec<f64> = samples[0]
                .iter()
                .zip(&samples[b])
                .map(|(t, p)| t / p)
                .collect();
            report.ratio(
                &format!("ext4 on thin ÷ ext4 on {}, {}", baseline.name, job.name),
                baseline.name,
                &ratios,
                None,
                job.goal.map(Goal::AtLeast),
            );
        }
    }

    drop(sides);
    client.deactivate(ThinId::new(1).expect("id"), false)?;
    daemon.shutdown()?;
    println!("{}", report.render());
    if let Some(path) = &config.json {
        report.write_json(path)?;
    }
    Ok(())
}
