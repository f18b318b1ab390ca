//! One module per verb: parse, call the storage, store and registry, format the output.

pub mod commit;
pub mod daemon;
pub mod diff;
pub mod exec;
pub mod images;
pub mod info;
pub mod inspect;
pub mod kill;
pub mod login;
pub mod logs;
pub mod prune;
pub mod ps;
pub mod pull;
pub mod rm;
pub mod rmi;
pub mod run;
pub mod start;
pub mod stop;

mod format;

// Image verbs beyond pull: push, tag, history, system df, save, load.
pub mod history;
pub mod load;
pub mod push;
pub mod save;
pub mod system_df;
pub mod tag;

use std::path::Path;
use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::container::{find, Container};

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    match cli.command {
        Command::Push(args) => push::run(args, &global),
        Command::Tag(args) => tag::run(args, &global),
        Command::History(args) => history::run(args, &global),
        Command::Save(args) => save::run(args, &global),
        Command::Load(args) => load::run(args, &global),
        Command::System(command) => system_df::run(command, &global),
        Command::Image(command) => prune::image_command(command, &global),
        Command::Container(command) => prune::container_command(command, &global),
        Command::Pull(args) => pull::run(args, &global),
        Command::Images(args) => images::run(args, &global),
        Command::Rmi(args) => rmi::run(args, &global),
        Command::Inspect(args) => inspect::run(args, &global),
        Command::Info(args) => info::run(args, &global),
        Command::Login(args) => login::login(args, &global),
        Command::Logout(args) => login::logout(args, &global),
        Command::PoolDaemon(command) => daemon::run(command, &global),
        Command::Create(args) => run::create_cmd(args, &global),
        Command::Run(args) => run::run(args, &global),
        Command::Ps(args) => ps::run(args, &global),
        Command::Start(args) => start::run(args, &global),
        Command::Stop(args) => stop::run(args, &global),
        Command::Kill(args) => kill::run(args, &global),
        Command::Rm(args) => rm::run(args, &global),
        Command::Logs(args) => logs::run(args, &global),
        Command::Exec(args) => exec::run(args, &global),
        Command::ContainerShim(args) => start::shim(args, &global),
        Command::Diff(args) => diff::run(args, &global),
        Command::Commit(args) => commit::run(args, &global),
    }
}

/// Docker's way with a list of containers (`start`, `stop`, `kill`, `rm`): each name in turn,
/// its own name printed when `act` succeeds, its error printed when it fails, and a failure
/// exit status when any failed, without stopping at the first.
fn for_each_container(
    root: &Path,
    names: &[String],
    mut act: impl FnMut(Container) -> anyhow::Result<()>,
) -> ExitCode {
    let mut failed = false;
    for name in names {
        match find(root, name).and_then(&mut act) {
            Ok(()) => println!("{name}"),
            Err(e) => {
                eprintln!("Error response from daemon: {e:#}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
