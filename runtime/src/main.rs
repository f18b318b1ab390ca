//! thinbox: Docker-style images and containers on a thin pool. Each image layer is a
//! snapshot of its parent layer's thin device, the first of a formatted base device, and each
//! container a writable snapshot of its image's top layer, the way Docker's devicemapper
//! driver kept them; the pool is the engine's userspace dm-thin pool, served as block devices
//! by its pool daemon. The overlay driver keeps the same images as overlayfs layers instead.
//!
//! Exit codes: 0 ok, 1 the operation failed, 2 usage error. Data goes to stdout,
//! diagnostics to stderr; a closed stdout (a broken pipe) ends quietly.

// Unsafe code lives in container::sys only (it allows it there).
#![deny(unsafe_code)]

mod archive;
mod cli;
mod commands;
mod container;
mod image;
mod registry;
mod storage;
mod store;

use std::io;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::Cli;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_tracing(cli.global.verbose);
    // One spelling of the state directory: mount points are compared with /proc's, which
    // are absolute and resolved.
    let mut cli = cli;
    cli.global.root = match std::fs::canonicalize(&cli.global.root) {
        Ok(resolved) => resolved,
        Err(_) => std::path::absolute(&cli.global.root).unwrap_or(cli.global.root),
    };
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thinbox: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr: warnings by default, more with each -v; RUST_LOG, when set, wins.
fn init_tracing(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
        .with_target(false)
        .init();
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}
