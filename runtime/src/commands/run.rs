//! `create` and `run`: a container from an image (a writable thin snapshot of its top
//! layer), then, for `run`, its process in the foreground or, with `-d`, under a detached
//! supervisor.

use std::process::ExitCode;

use crate::cli::Global;
use crate::container::create::{create, CreateOptions};
use crate::container::runner::StartError;
use crate::container::supervise::{spawn_detached, supervise, Attach};
use crate::container::{exit_code, RunOptions};

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Keep stdin open and pass it to the container
    #[arg(short, long)]
    pub interactive: bool,

    /// Allocate a pseudo-TTY
    #[arg(short, long)]
    pub tty: bool,

    /// Remove the container when it exits
    #[arg(long)]
    pub rm: bool,

    /// A name for the container
    #[arg(long)]
    pub name: Option<String>,

    /// Set an environment variable (KEY=VALUE, or KEY to take thinbox's value)
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Overwrite the image's ENTRYPOINT (and drop its CMD)
    #[arg(long)]
    pub entrypoint: Option<String>,

    /// Working directory inside the container
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// User, as USER[:GROUP] (names or numbers)
    #[arg(short, long)]
    pub user: Option<String>,

    /// Container host name (default: the id's first 12 digits)
    #[arg(long)]
    pub hostname: Option<String>,

    /// Run with an external OCI runtime (runc, crun) instead of the built-in runner
    #[arg(long)]
    pub runtime: Option<String>,

    /// Add a Linux capability to Docker's default set (e.g. SYS_ADMIN, or ALL)
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,

    /// Drop a Linux capability from Docker's default set (e.g. NET_RAW, or ALL)
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,

    /// The image (name[:tag], name@digest, or id)
    pub image: String,

    /// The command and its arguments (default: the image's)
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Run in the background and print the container's id
    #[arg(short, long)]
    pub detach: bool,

    #[command(flatten)]
    pub create: CreateArgs,
}

impl CreateArgs {
    fn options(self) -> CreateOptions {
        CreateOptions {
            image: self.image,
            name: self.name,
            run: RunOptions {
                env: self.env,
                entrypoint: self.entrypoint,
                workdir: self.workdir,
                user: self.user,
                cmd: self.command,
                hostname: self.hostname.unwrap_or_default(),
                tty: self.tty,
            },
            open_stdin: self.interactive,
            auto_remove: self.rm,
            runtime: self.runtime,
            cap_add: self.cap_add,
            cap_drop: self.cap_drop,
        }
    }
}

pub fn create_cmd(args: CreateArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let c = create(global, args.options())?;
    println!("{}", c.id);
    Ok(ExitCode::SUCCESS)
}

pub fn run(args: RunArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let c = create(global, args.create.options())?;
    if args.detach {
        started_or_exit(spawn_detached(global, &c.id).map(|()| 0))?;
        println!("{}", c.id);
        return Ok(ExitCode::SUCCESS);
    }
    started_or_exit(supervise(global, &c.id, Attach::Foreground, |_| {}))
}

/// The container's exit code; a start failure prints its error and exits 125, 126 or 127
/// as Docker does.
pub fn started_or_exit(result: anyhow::Result<i32>) -> anyhow::Result<ExitCode> {
    match result {
        Ok(code) => Ok(exit_code(code)),
        Err(e) => match e.downcast_ref::<StartError>() {
            Some(s) => {
                eprintln!("thinbox: failed to start the container: {}", s.message);
                Ok(exit_code(i32::from(s.code)))
            }
            None => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        crate::cli::Cli::command().debug_assert();
    }

    #[test]
    fn arguments_after_the_image_are_the_command() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "thinbox", "run", "--rm", "-e", "A=1", "busybox", "sh", "-c", "exit 3",
        ])
        .unwrap();
        let crate::cli::Command::Run(args) = cli.command else {
            panic!("not run");
        };
        assert!(args.create.rm);
        assert_eq!(args.create.image, "busybox");
        assert_eq!(args.create.command, ["sh", "-c", "exit 3"]);
    }
}
