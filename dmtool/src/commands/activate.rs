//! `thin activate` and `thin deactivate`.

use std::process::ExitCode;

use anyhow::{bail, Context};
use engine::activate::daemon::RunDir;
use engine::activate::PoolControl;
use engine::ThinId;

use super::daemon::{spawn_detached, start_kernel, Backend, DEFAULT_FUSE_WORKERS};
use crate::cli::{parse_thin_id, PoolLocation};
use crate::output;

#[derive(Debug, clap::Args)]
pub struct ActivateArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Thin id
    #[arg(value_parser = parse_thin_id)]
    pub id: ThinId,

    /// A read-only block device
    #[arg(long)]
    pub read_only: bool,

    /// Print JSON (device, backing file, flags) instead of the device path
    #[arg(long)]
    pub json: bool,

    /// Who takes the pool when nothing owns it yet (an owner that runs is used as it is)
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
}

#[derive(Debug, clap::Args)]
pub struct DeactivateArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Thin id
    #[arg(value_parser = parse_thin_id)]
    pub id: ThinId,

    /// If the device is in use, remove it when its last user closes it instead of failing
    #[arg(long)]
    pub deferred: bool,
}

pub fn activate(args: ActivateArgs) -> anyhow::Result<ExitCode> {
    let run = RunDir::for_pool(&args.loc.paths());
    let mut client: Box<dyn PoolControl> = match run.connect()? {
        Some(client) => Box::new(client),
        None => match super::kernel(&args.loc)? {
            Some(kernel) => Box::new(kernel),
            None if args.backend.resolve()? == Backend::Kernel => {
                Box::new(start_kernel(&args.loc)?)
            }
            None => {
                let pid = spawn_detached(&args.loc, DEFAULT_FUSE_WORKERS, &run)?;
                eprintln!("dmtool: started the pool daemon (pid {pid})");
                Box::new(
                    run.connect()?
                        .context("the pool daemon stopped answering right after it started")?,
                )
            }
        },
    };
    let activation = client.activate(args.id, args.read_only).with_context(|| {
        format!(
            "failed to activate thin {} of pool {}",
            args.id,
            args.loc.name()
        )
    })?;
    if args.json {
        output::json(&activation)?;
    } else {
        println!("{}", activation.device.display());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn deactivate(args: DeactivateArgs) -> anyhow::Result<ExitCode> {
    let run = RunDir::for_pool(&args.loc.paths());
    let mut client: Box<dyn PoolControl> = match run.connect()? {
        Some(client) => Box::new(client),
        None => match super::kernel(&args.loc)? {
            Some(kernel) => Box::new(kernel),
            None => bail!(
                "thin {} of pool {} is not active (no pool daemon runs, and the kernel does \
                 not have the pool)",
                args.id,
                args.loc.name()
            ),
        },
    };
    client.deactivate(args.id, args.deferred).with_context(|| {
        format!(
            "failed to deactivate thin {} of pool {}",
            args.id,
            args.loc.name()
        )
    })?;
    Ok(ExitCode::SUCCESS)
}
