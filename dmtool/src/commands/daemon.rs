//! `pool start` and `pool stop`: handing a pool to an owner that keeps it while its thins are
//! active (the kernel's device-mapper, or our userspace pool daemon) and taking it back.
//!
//! With the kernel backend `pool start` attaches loop devices to regular files, loads the
//! `thin-pool` table through DM ioctls and returns; the kernel then owns the pool until
//! `pool stop`, which removes the pool device and detaches those loop devices.
//!
//! `pool start` runs this same binary again as `pool start --foreground` in a session of its
//! own (so that no terminal hang-up or exiting shell takes it down), with its output in the
//! run directory's `daemon.log`, and returns once the daemon answers on its socket.
//!
//! The launching and the foreground loop are `engine::activate::daemon::launch`, shared with
//! thinbox.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};
use engine::activate::daemon::{launch, DaemonConfig, RunDir};
use engine::activate::kernel::KernelPool;
use engine::activate::kernel_control::KernelControl;
use engine::activate::PoolControl;
use engine::PoolOptions;

use crate::cli::PoolLocation;

/// FUSE worker threads unless `--fuse-workers` says otherwise (the export's measured sweet
/// spot on 2 cores: 1 worker gave 35k 4 KiB writes/s at qd32, 2 gave 44k, 8 gave 72k).
pub const DEFAULT_FUSE_WORKERS: u16 = 8;

/// Who takes the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The kernel where device-mapper works (/dev/mapper/control), else the userspace daemon
    Auto,
    /// The kernel's device-mapper (dm-thin), driven through DM ioctls
    Kernel,
    /// The userspace pool daemon: each active thin a FUSE file with a loop device on top
    Userspace,
}

impl Backend {
    /// `Auto` made concrete for this machine; `Kernel` fails here without device-mapper.
    pub fn resolve(self) -> anyhow::Result<Backend> {
        let available = KernelPool::available();
        match self {
            Backend::Auto if available => Ok(Backend::Kernel),
            Backend::Auto => Ok(Backend::Userspace),
            Backend::Kernel if !available => bail!(
                "the kernel backend needs device-mapper with the thin-pool target, and it is \
                 unavailable here (/dev/mapper/control does not answer or knows no thin-pool); \
                 use --backend userspace"
            ),
            other => Ok(other),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Who owns the pool while it runs
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,

    /// Run in the foreground (logs on stderr) instead of detaching
    #[arg(long)]
    pub foreground: bool,

    /// FUSE worker threads serving the active thins
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FUSE_WORKERS, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub fuse_workers: u16,

    /// Set by `pool start` on the detached daemon it launches
    #[arg(long, hide = true)]
    pub detached_child: bool,
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Stop even while thins are active. The daemon detaches devices in use when their users
    /// close them (their filesystems see IO errors until then); the kernel deactivates the idle
    /// ones and still refuses while one is open
    #[arg(long)]
    pub force: bool,
}

pub fn start(args: StartArgs) -> anyhow::Result<ExitCode> {
    let run = RunDir::for_pool(&args.loc.paths());
    if let Some(mut client) = run.connect()? {
        let pid = client.status().ok().and_then(|s| s.daemon_pid);
        bail!(
            "pool {} already has a daemon (pid {})",
            args.loc.name(),
            pid.map_or_else(|| "unknown".into(), |p| p.to_string())
        );
    }
    if args.foreground || args.detached_child {
        if args.backend == Backend::Kernel {
            bail!("--foreground runs the userspace daemon; the kernel needs no process");
        }
        return run_foreground(&args, run);
    }
    if args.backend.resolve()? == Backend::Kernel {
        let pool = start_kernel(&args.loc)?;
        tracing::info!("kernel pool started: {}", pool.pool().node().display());
        return Ok(ExitCode::SUCCESS);
    }
    let pid = spawn_detached(&args.loc, args.fuse_workers, &run)?;
    eprintln!(
        "dmtool: pool daemon started (pid {pid}), log in {}",
        run.log_file().display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Hands the pool at `loc` to the kernel, after reconciling its volume store with our
/// engine (the kernel knows nothing of it).
pub fn start_kernel(loc: &PoolLocation) -> anyhow::Result<KernelControl> {
    let volumes = super::open_volumes(loc, super::Access::Change)?;
    let options = volumes.pool().options();
    drop(volumes);
    KernelControl::start(&loc.paths(), &loc.store_path(), options)
        .with_context(|| format!("failed to start pool {} in the kernel", loc.name()))
}

/// Launches a detached daemon for `loc` and waits until it answers; returns its pid.
pub fn spawn_detached(loc: &PoolLocation, fuse_workers: u16, run: &RunDir) -> anyhow::Result<u32> {
    let exe = std::env::current_exe().context("failed to find the dmtool binary")?;
    let mut command = Command::new(exe);
    command
        .args(["-v", "pool", "start", "--foreground", "--detached-child"])
        .args(["--fuse-workers", &fuse_workers.to_string()])
        .args(location_args(loc));
    Ok(launch::spawn_detached(run, command)?)
}

/// The command-line arguments that name `loc` again.
fn location_args(loc: &PoolLocation) -> Vec<PathBuf> {
    let mut args = Vec::new();
    let mut push = |flag: &str, value: &Option<PathBuf>| {
        if let Some(v) = value {
            args.push(PathBuf::from(flag));
            args.push(std::path::absolute(v).unwrap_or_else(|_| v.clone()));
        }
    };
    push("--pool", &loc.pool);
    push("--metadata", &loc.metadata);
    push("--data", &loc.data);
    push("--device", &loc.device);
    push("--state-dir", &loc.state_dir);
    args
}

fn run_foreground(args: &StartArgs, run: RunDir) -> anyhow::Result<ExitCode> {
    let config = DaemonConfig {
        paths: args.loc.paths(),
        store_path: args.loc.store_path(),
        run_dir: run,
        options: PoolOptions::default(),
        fuse_workers: usize::from(args.fuse_workers),
    };
    launch::serve_in_foreground(config, args.detached_child)
        .with_context(|| format!("failed to run the daemon of pool {}", args.loc.name()))?;
    Ok(ExitCode::SUCCESS)
}

pub fn stop(args: StopArgs) -> anyhow::Result<ExitCode> {
    let run = RunDir::for_pool(&args.loc.paths());
    if run.connect()?.is_none() {
        if let Some(kernel) = super::kernel(&args.loc)? {
            kernel.stop(args.force).with_context(|| {
                format!("failed to stop pool {} in the kernel", args.loc.name())
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        bail!(
            "pool {} is not running (no pool daemon, not in the kernel)",
            args.loc.name()
        );
    }
    let stopped = launch::stop(&run, args.force)
        .with_context(|| format!("failed to stop the daemon of pool {}", args.loc.name()))?;
    if !stopped {
        bail!("no pool daemon runs for pool {}", args.loc.name());
    }
    Ok(ExitCode::SUCCESS)
}
