//! `exec [-i] [-e K=V] [-w DIR] [-u USER] CONTAINER CMD...`: runs a command inside a running
//! container's namespaces (setns on /proc/PID/ns/*), stdout and stderr passed through, its
//! exit code ours.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::ExitCode;

use anyhow::bail;
use nix::sys::wait::waitpid;

use super::run::started_or_exit;
use crate::cli::Global;
use crate::container::runner::{exec_of, exit_code, process_env};
use crate::container::spec::{resolve_user, set_env};
use crate::container::{find, spawn_exec};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Pass stdin to the command
    #[arg(short, long)]
    pub interactive: bool,

    /// Set an environment variable (KEY=VALUE)
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,

    /// Working directory inside the container (default: the container's)
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// User, as USER[:GROUP] (default: the container's)
    #[arg(short, long)]
    pub user: Option<String>,

    pub container: String,

    /// The command and its arguments
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let c = find(&global.root, &args.container)?;
    let (true, Some(pid)) = (c.is_running(), c.state.pid) else {
        bail!("Container {} is not running", c.id);
    };
    let rootfs = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let user_spec = args.user.clone().unwrap_or_else(|| c.process.user.clone());
    let user = resolve_user(&rootfs, &user_spec)?;
    let mut env = process_env(&c, &user);
    for e in args.env {
        set_env(&mut env, e);
    }
    let cwd = args.workdir.unwrap_or_else(|| c.process.cwd.clone());
    let stdin: OwnedFd = if args.interactive {
        std::io::stdin().as_fd().try_clone_to_owned()?
    } else {
        File::open("/dev/null")?.into()
    };
    let exec = exec_of(
        &args.command,
        &env,
        &cwd,
        user,
        [stdin.as_raw_fd(), 1, 2],
        false,
        c.capabilities()?,
    )?;
    let result = spawn_exec(pid, &exec).and_then(|child| loop {
        match waitpid(child, None) {
            Ok(status) => {
                if let Some(code) = exit_code(status) {
                    break Ok(code);
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => break Err(e.into()),
        }
    });
    started_or_exit(result)
}
