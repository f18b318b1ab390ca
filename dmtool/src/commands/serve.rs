//! `serve`: export thins over NBD until SIGTERM or SIGINT.
//!
//! The process owns the pool for as long as it serves. Shutdown needs no unsafe signal
//! handler: SIGTERM and SIGINT are blocked before any thread starts (so every thread inherits
//! the mask) and the main thread waits for them with sigwait; then it commits the pool,
//! removes the unix socket and exits, ending the connection threads with the process.
//! Clients' flushes (and FUA requests) commit as they come, so that final commit only covers
//! writes no client has flushed yet.

use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread;

use anyhow::{bail, Context};
use engine::ThinId;
use nix::sys::signal::{SigSet, Signal};

use super::{commit, open_volumes, Access};
use crate::cli::{parse_thin_id, PoolLocation};
use crate::nbd::{Export, Server};

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

#[derive(Clone, Debug)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(String),
}

pub fn parse_listen(text: &str) -> Result<Listen, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if !path.is_empty() {
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
    } else if let Some(addr) = text.strip_prefix("tcp:") {
        if addr.rsplit_once(':').is_some() {
            return Ok(Listen::Tcp(addr.to_string()));
        }
    }
    Err(format!("{text:?} is not unix:PATH or tcp:HOST:PORT"))
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

    let access = if args.read_only {
        Access::Look
    } else {
        Access::Change
    };
    let volumes = open_volumes(&args.loc, access)?;
    let pool = volumes.pool().clone();
    let read_only = args.read_only || pool.options().read_only;
    let ids: Vec<ThinId> = if args.ids.is_empty() {
        let mut ids: Vec<ThinId> = volumes.store().volumes().map(|v| v.id).collect();
        ids.sort();
        ids
    } else {
        args.ids.clone()
    };
    if ids.is_empty() {
        bail!("pool {} has no thins to export", args.loc.name());
    }
    let mut exports = Vec::with_capacity(ids.len());
    for id in ids {
        let volume = volumes
            .volume(id)
            .with_context(|| format!("cannot export thin {id}"))?;
        exports.push(Export {
            id,
            alias: volume.name.clone(),
            size: volume.size_bytes,
            read_only,
        });
    }
    let server = Arc::new(Server::new(pool, exports));

    match &args.nbd {
        Listen::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    bail!("{} exists and is not a socket", path.display());
                }
                // A socket left by a server that died; a live owner would hold the pool.
                std::fs::remove_file(path)
                    .with_context(|| format!("failed to remove stale {}", path.display()))?;
            }
            let listener = UnixListener::bind(path)
                .with_context(|| format!("failed to listen on {}", path.display()))?;
            let server = server.clone();
            thread::spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(mut stream) => {
                            let server = server.clone();
                            thread::spawn(move || {
                                if let Err(e) = server.serve(&mut stream) {
                                    tracing::info!("nbd connection ended: {e}");
                                }
                            });
                        }
                        Err(e) => tracing::warn!("accept failed: {e}"),
                    }
                }
            });
        }
        Listen::Tcp(addr) => {
            let listener =
                TcpListener::bind(addr).with_context(|| format!("failed to listen on {addr}"))?;
            let server = server.clone();
            thread::spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(mut stream) => {
                            let _ = stream.set_nodelay(true);
                            let server = server.clone();
                            thread::spawn(move || {
                                if let Err(e) = server.serve(&mut stream) {
                                    tracing::info!("nbd connection ended: {e}");
                                }
                            });
                        }
                        Err(e) => tracing::warn!("accept failed: {e}"),
                    }
                }
            });
        }
    }
    let names: Vec<String> = server
        .exports()
        .iter()
        .map(|e| match &e.alias {
            Some(n) => format!("{} ({n})", e.id),
            None => e.id.to_string(),
        })
        .collect();
    eprintln!(
        "dmtool: serving {} over NBD{}: {}",
        match &args.nbd {
            Listen::Unix(p) => format!("unix:{}", p.display()),
            Listen::Tcp(a) => format!("tcp:{a}"),
        },
        if read_only { " (read-only)" } else { "" },
        names.join(", ")
    );

    let signal = signals.wait().context("failed to wait for signals")?;
    tracing::info!("{signal:?}: shutting down");
    let committed = if read_only {
        Ok(())
    } else {
        commit(&volumes, &args.loc)
    };
    if let Listen::Unix(path) = &args.nbd {
        let _ = std::fs::remove_file(path);
    }
    committed?;
    Ok(ExitCode::SUCCESS)
}
