//! One module per verb: parse, call the storage, store and registry, format the output.

pub mod daemon;
pub mod images;
pub mod info;
pub mod inspect;
pub mod login;
pub mod pull;
pub mod rmi;

mod format;

// Image verbs beyond pull: push, tag, history, system df, save, load.
pub mod history;
pub mod load;
pub mod push;
pub mod save;
pub mod system_df;
pub mod tag;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    match cli.command {
        Command::Push(args) => push::run(args, &global),
        Command::Tag(args) => tag::run(args, &global),
        Command::History(args) => history::run(args, &global),
        Command::Save(args) => save::run(args, &global),
        Command::Load(args) => load::run(args, &global),
        Command::System(command) => system_df::run(command, &global),
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
