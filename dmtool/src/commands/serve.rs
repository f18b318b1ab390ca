//! `serve`: export thins over NBD until SIGTERM or SIGINT.
//!
//! When the pool daemon runs, it serves the exports (it owns the pool) for as long as this
//! process keeps its connection to it; otherwise this process opens the pool and serves
//! them itself. Either way the verb behaves the same: it runs until a signal.
//!
//! Shutdown needs no unsafe signal handler: SIGTERM and SIGINT are blocked before any thread
//! starts (so every thread inherits the mask) and the main thread waits for them with
//! sigwait; then it commits the pool (or closes its connection to the daemon, which stops
//! listening), removes the unix socket and exits. Clients' flushes (and FUA requests) commit
//! as they come, so that final commit only covers writes no client has flushed yet.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use engine::activate::daemon::RunDir;
use engine::activate::nbd::{self, Listen, NbdListener, Server};
use engine::ThinId;
use nix::sys::signal::{SigSet, Signal};

use super::{commit, open_volumes, Access};
use crate::cli::{parse_thin_id, PoolLocation};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Where to listen: unix:PATH or tcp:HOST:PORT
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub nbd: Listen,

    /// Thin ids to export [default: every thin the volume store knows]
    #[arg(value_parser = parse_thin_id)]
    pub ids: Vec<ThinId>,

    /// Export read-only: writes, trims and zeroing fail with EPERM
    #[arg(long)]
    pub read_only: bool,
}

pub fn parse_listen(text: &str) -> Result<Listen, String> {
    Listen::parse(text).ok_or_else(|| format!("{text:?} is not unix:PATH or tcp:HOST:PORT"))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // Before any thread exists, so that every thread inherits the mask and only the
    // sigwait below sees these signals.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .context("failed to block SIGTERM and SIGINT")?;

    let run = RunDir::for_pool(&args.loc.paths());
    if let Some(mut client) = run.connect()? {
        let names = client
            .serve_nbd(&args.nbd, &args.ids, args.read_only)
            .with_context(|| format!("the daemon of pool {} cannot serve NBD", args.loc.name()))?;
        eprintln!(
            "dmtool: the pool daemon serves {} over NBD{}: {names}",
            args.nbd,
            if args.read_only { " (read-only)" } else { "" },
        );
        let signal = signals.wait().context("failed to wait for signals")?;
        tracing::info!("{signal:?}: shutting down");
        // Closing the connection stops the daemon's listener; the daemon owns the commits.
        drop(client);
        return Ok(ExitCode::SUCCESS);
    }

    let access = if args.read_only {
        Access::Look
    } else {
        Access::Change
    };
    let volumes = open_volumes(&args.loc, access)?;
    let read_only = args.read_only || volumes.pool().options().read_only;
    let exports = nbd::exports_for(&volumes, &args.ids, read_only)
        .with_context(|| format!("cannot export pool {}", args.loc.name()))?;
    let names = nbd::describe(&exports);
    let server = Arc::new(Server::new(volumes.pool().clone(), exports));
    let listener = NbdListener::start(server, &args.nbd)?;
    eprintln!(
        "dmtool: serving {} over NBD{}: {names}",
        args.nbd,
        if read_only { " (read-only)" } else { "" },
    );

    let signal = signals.wait().context("failed to wait for signals")?;
    tracing::info!("{signal:?}: shutting down");
    listener.stop();
    if !read_only {
        commit(&volumes, &args.loc)?;
    }
    Ok(ExitCode::SUCCESS)
}
