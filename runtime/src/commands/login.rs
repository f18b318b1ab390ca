//! `login` and `logout`: credentials per registry in `ROOT/auth.json` (mode 0600).

use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::cli::Global;
use crate::registry::{auth, Credentials, Registry};

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The registry: host[:port]
    pub server: String,

    #[arg(short, long)]
    pub username: Option<String>,

    /// The password (visible to other users in the process list: prefer --password-stdin)
    #[arg(short, long, conflicts_with = "password_stdin")]
    pub password: Option<String>,

    /// Read the password from stdin
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, clap::Args)]
pub struct LogoutArgs {
    /// The registry: host[:port]
    pub server: String,
}

fn read_line(prompt: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        eprint!("{prompt}");
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

pub fn login(args: LoginArgs, global: &Global) -> anyhow::Result<ExitCode> {
    let username = match args.username {
        Some(u) => u,
        None => read_line("Username: ")?,
    };
    let password = match (args.password, args.password_stdin) {
        (Some(p), _) => p,
        (None, true) => read_line("")?,
        (None, false) => read_line("Password: ")?,
    };
    if username.is_empty() || password.is_empty() {
        bail!("a user name and a password are needed");
    }
    let credentials = Credentials { username, password };
    Registry::for_registry(&args.server, Some(credentials.clone()))?
        .ping()
        .with_context(|| format!("login to {} failed", args.server))?;
    auth::store(&global.root, &args.server, &credentials)?;
    println!("Login Succeeded");
    Ok(ExitCode::SUCCESS)
}

pub fn logout(args: LogoutArgs, global: &Global) -> anyhow::Result<ExitCode> {
    if auth::remove(&global.root, &args.server)? {
        println!("Removing login credentials for {}", args.server);
    } else {
        println!("Not logged in to {}", args.server);
    }
    Ok(ExitCode::SUCCESS)
}
