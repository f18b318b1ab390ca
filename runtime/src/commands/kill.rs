//! `kill [-s SIGNAL] CONTAINER...`: signals a running container's first process.

use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cli::Global;
use crate::container::{parse_signal, pause, Container};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The signal (name or number)
    #[arg(short, long, default_value = "KILL")]
    pub signal: String,

    #[arg(required = true)]
    pub containers: Vec<String>,
}

/// Sends `signal` to `c`'s first process, after thawing what an interrupted commit may have
/// left frozen (a frozen process would not take the signal).
pub fn signal(root: &Path, c: &Container, signal: Signal) -> anyhow::Result<()> {
    let (true, Some(pid)) = (c.is_running(), c.state.pid) else {
        bail!(
            "Cannot kill container: {}: Container {} is not running",
            c.name,
            c.id
        );
    };
    // A commit in progress holds the store's lock and thaws what it froze itself; only
    // when none runs is a frozen container a dead commit's leftover.
    if let Ok(Some(_idle)) = crate::store::Store::try_lock(root) {
        pause::recover(root, c);
    }
    kill(Pid::from_raw(pid as i32), signal)?;
    Ok(())
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let sig = parse_signal(&args.signal)?;
    Ok(super::for_each_container(
        &global.root,
        &args.containers,
        |c| signal(&global.root, &c, sig),
    ))
}
