//! `start [-a] CONTAINER...`: starts stopped containers, under a detached supervisor or,
//! with `-a`, attached in the foreground; and the hidden `container-shim` that is that
//! detached supervisor.

use std::process::ExitCode;

use super::run::started_or_exit;
use crate::cli::Global;
use crate::container::supervise::{run_detached, spawn_detached, supervise, Attach};
use crate::container::{exit_code, find};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Attach stdout/stderr and pass the exit code through (one container)
    #[arg(short, long)]
    pub attach: bool,

    /// Attach stdin (with -a)
    #[arg(short, long)]
    pub interactive: bool,

    /// Containers (name, id or id prefix)
    #[arg(required = true)]
    pub containers: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct ShimArgs {
    pub id: String,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    if args.attach {
        let [name] = args.containers.as_slice() else {
            anyhow::bail!("you cannot start and attach multiple containers at once");
        };
        let c = find(&global.root, name)?;
        return started_or_exit(supervise(global, &c.id, Attach::Foreground, |_| {}));
    }
    Ok(super::for_each_container(
        &global.root,
        &args.containers,
        |c| {
            if c.is_running() {
                return Ok(());
            }
            spawn_detached(global, &c.id)
        },
    ))
}

pub fn shim(args: ShimArgs, global: &Global) -> anyhow::Result<ExitCode> {
    run_detached(global, &args.id).map(exit_code)
}
