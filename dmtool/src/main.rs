//! dmtool: dmsetup-like admin verbs and thin-provisioning-tools-like check and dump for
//! thinbox pools. Every command is a thin shell over `engine`: parse, call, format.
//!
//! Exit codes: 0 ok, 1 the operation failed or check found damage, 2 usage error. Data goes
//! to stdout, diagnostics to stderr; a closed stdout (a broken pipe) ends quietly.

#![forbid(unsafe_code)]

mod cli;
mod commands;
mod output;
mod progress;

use std::io;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use crate::cli::{Cli, Command};
use crate::commands::links::invocation;

fn main() -> ExitCode {
    // Through a link named thin_check, thin_ls, ... dmtool is that tool: `thin_ls ARGS` runs
    // as `dmtool ls ARGS`.
    let argv = invocation(std::env::args_os().collect());
    let argv = commands::delta::normalize_args(argv);
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with 0; everything else is a usage error.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // For delta, -v/--verbose is thin_delta's --verbose, not more logging.
    let log_level = match cli.command {
        Command::Delta(_) => 0,
        _ => cli.verbose,
    };
    init_tracing(log_level);
    match commands::run(cli.command, cli.verbose) {
        Ok(code) => code,
        // Whoever read our output stopped reading; that is their choice, not our failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmtool: {e:#}");
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
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
