//! `pool start` and `pool stop`: the pool daemon's life.
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
use engine::activate::PoolControl;
use engine::PoolOptions;

use crate::cli::PoolLocation;

/// FUSE worker threads unless `--fuse-workers` says otherwise (the export's measured sweet
/// spot on 2 cores: 1 worker gave 35k 4 KiB writes/s at qd32, 2 gave 44k, 8 gave 72k).
pub const DEFAULT_FUSE_WORKERS: u16 = 8;

#[derive(Debug, clap::Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

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

    /// Stop even while thins are mounted or open: their devices detach when their users close
    /// them, and their filesystems see IO errors until then
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
    if args.foreground {
        return run_foreground(&args, run);
    }
    let pid = spawn_detached(&args.loc, args.fuse_workers, &run)?;
    eprintln!(
        "dmtool: pool daemon started (pid {pid}), log in {}",
        run.log_file().display()
    );
    Ok(ExitCode::SUCCESS)
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
    let stopped = launch::stop(&run, args.force)
        .with_context(|| format!("failed to stop the daemon of pool {}", args.loc.name()))?;
    if !stopped {
        bail!("no pool daemon runs for pool {}", args.loc.name());
    }
    Ok(ExitCode::SUCCESS)
}
