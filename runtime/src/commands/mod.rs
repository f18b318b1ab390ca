//! One module per verb: parse, call the storage, store and registry, format the output.

pub mod daemon;
pub mod images;
pub mod info;
pub mod inspect;
pub mod login;
pub mod pull;
pub mod rmi;

mod format;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    match cli.command {
        Command::Pull(args) => pull::run(args, &global),
        Command::Images(args) => images::run(args, &global),
        Command::Rmi(args) => rmi::run(args, &global),
        Command::Inspect(args) => inspect::run(args, &global),
        Command::Info(args) => info::run(args, &global),
        Command::Login(args) => login::login(args, &global),
        Command::Logout(args) => login::logout(args, &global),
        Command::PoolDaemon(command) => daemon::run(command, &global),
    }
}
