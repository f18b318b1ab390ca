//! `stop [-t SECS] CONTAINER...`: SIGTERM, then SIGKILL after the grace period; returns once
//! the supervisor has recorded the exit.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use nix::sys::signal::Signal;

use super::kill::signal;
use crate::cli::Global;
use crate::container::Container;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds to wait for the container to stop before killing it
    #[arg(short, long, default_value_t = 10)]
    pub time: u64,

    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// Stops `c` (nothing to do when it is not running).
pub fn stop(global: &Global, c: &Container, grace: Duration) -> anyhow::Result<()> {
    if !c.is_running() {
        return Ok(());
    }
    let root = &global.root;
    // It may stop between our look and the signal.
    let _ = signal(&global.root, c, Signal::SIGTERM);
    if c.wait_stopped(root, grace)? {
        return Ok(());
    }
    let _ = signal(&global.root, c, Signal::SIGKILL);
    if !c.wait_stopped(root, Duration::from_secs(30))? {
        bail!("container {} did not stop after SIGKILL", c.name);
    }
    Ok(())
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let grace = Duration::from_secs(args.time);
    Ok(super::for_each_container(
        &global.root,
        &args.containers,
        |c| stop(global, &c, grace),
    ))
}
