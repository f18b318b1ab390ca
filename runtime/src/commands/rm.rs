//! `rm [-f] CONTAINER...`: deletes stopped containers: unmount, deactivate (deferred while
//! busy), delete the thin (its space returns to the pool), drop the record and log. `-f`
//! kills a running one first.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use nix::sys::signal::Signal;

use super::kill::signal;
use crate::cli::Global;
use crate::container::supervise::remove;
use crate::container::Container;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Kill and remove running containers
    #[arg(short, long)]
    pub force: bool,

    /// Accepted for Docker's sake (containers have no volumes here; no -v: that is --verbose)
    #[arg(long)]
    pub volumes: bool,

    #[arg(required = true)]
    pub containers: Vec<String>,
}

fn remove_one(global: &Global, c: &Container, force: bool) -> anyhow::Result<()> {
    if c.is_running() {
        if !force {
            bail!(
                "You cannot remove a running container {}. Stop the container before \
                 attempting removal or force remove",
                c.id
            );
        }
        let _ = signal(&global.root, c, Signal::SIGKILL);
        if !c.wait_stopped(&global.root, Duration::from_secs(30))? {
            bail!("container {} did not stop after SIGKILL", c.name);
        }
    }
    // The supervisor may have updated it meanwhile (and, with --rm, removed it).
    let c = match crate::container::Container::load(&global.root, &c.id) {
        Ok(c) => c.refresh(),
        Err(_) if !c.dir(&global.root).exists() => return Ok(()),
        Err(e) => return Err(e),
    };
    remove(global, &c)
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    Ok(super::for_each_container(
        &global.root,
        &args.containers,
        |c| remove_one(global, &c, args.force),
    ))
}
