//! `pool-daemon run` and `pool-daemon stop` (hidden): the pool daemon that owns the storage's
//! pool while thinbox works with it. Other verbs start it when they need it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use engine::activate::daemon::{launch, DaemonConfig, RunDir};
use engine::{PoolOptions, PoolPaths};

use crate::cli::Global;
use crate::storage::Storage;

/// FUSE worker threads serving the active thins (dmtool's measured sweet spot).
const FUSE_WORKERS: usize = 8;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the daemon of the pool on --metadata and --data in the foreground
    Run(RunArgs),
    /// Stop the daemon of the storage in --root
    Stop(StopArgs),
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[arg(long)]
    metadata: PathBuf,
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    volume_store: PathBuf,
    /// Start a session of its own (set by the verbs that launch the daemon)
    #[arg(long)]
    detached_child: bool,
}

#[derive(Debug, clap::Args)]
pub struct StopArgs {
    /// Stop even while thins are mounted or open
    #[arg(long)]
    force: bool,
}

pub fn run(command: Command, global: &Global) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => {
            let paths = PoolPaths::separate(&args.metadata, &args.data);
            let config = DaemonConfig {
                run_dir: RunDir::for_pool(&paths),
                paths,
                store_path: args.volume_store,
                options: PoolOptions::default(),
                fuse_workers: FUSE_WORKERS,
            };
            launch::serve_in_foreground(config, args.detached_child)
                .context("failed to run the pool daemon")?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Stop(args) => {
            let Some(Storage::DeviceMapper(storage)) = Storage::open_existing(global)? else {
                // No storage, or the overlay driver's, which has no daemon.
                return Ok(ExitCode::SUCCESS);
            };
            let run = RunDir::for_pool(storage.paths());
            if !launch::stop(&run, args.force).context("failed to stop the pool daemon")? {
                eprintln!("thinbox: no pool daemon runs");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
