//! `ps [-a] [-q] [--no-trunc]`: CONTAINER ID, IMAGE, COMMAND, CREATED, STATUS, PORTS, NAMES,
//! newest first, as Docker prints them.

use std::process::ExitCode;

use serde_json::json;

use super::format::{ellipsis, human_since, listing};
use crate::cli::Global;
use crate::container::{list, seconds_since, Container, Status};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// All containers (default: running ones)
    #[arg(short, long)]
    pub all: bool,

    /// Only ids
    #[arg(short, long)]
    pub quiet: bool,

    /// Full ids and commands
    #[arg(long)]
    pub no_trunc: bool,

    /// A template per container (`{{.ID}}`, `{{.Status}}`, `{{.Names}}`) or `json`
    #[arg(long)]
    pub format: Option<String>,
}

/// "Up 3 seconds", "Exited (0) 2 seconds ago", "Created".
pub fn status_text(c: &Container) -> String {
    let ago = |t: &Option<String>| t.as_deref().and_then(seconds_since).unwrap_or(0);
    match c.status() {
        Status::Creating | Status::Created => "Created".to_string(),
        Status::Running => {
            let since = human_since(ago(&c.state.started_at));
            format!("Up {}", since.trim_end_matches(" ago"))
        }
        Status::Exited => format!(
            "Exited ({}) {}",
            c.state.exit_code.unwrap_or(0),
            human_since(ago(&c.state.finished_at))
        ),
        Status::Dead => "Dead".to_string(),
    }
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let mut all = list(&global.root)?;
    all.reverse();
    let rows: Vec<serde_json::Value> = all
        .iter()
        .filter(|c| args.all || c.is_running())
        .map(|c| {
            let command = if args.no_trunc {
                c.command_line()
            } else {
                ellipsis(&c.command_line(), 20)
            };
            json!({
                "ID": if args.no_trunc { c.id.as_str() } else { c.short_id() },
                "Image": c.image,
                "Command": format!("{command:?}"),
                "CreatedAt": c.created,
                "RunningFor": human_since(seconds_since(&c.created).unwrap_or(0)),
                "Status": status_text(c),
                "State": c.status().name(),
                "Ports": "",
                "Names": c.name,
            })
        })
        .collect();
    let mut out = String::new();
    if args.quiet {
        for r in &rows {
            out.push_str(r["ID"].as_str().unwrap_or_default());
            out.push('\n');
        }
    } else {
        out = listing(
            &rows,
            args.format.as_deref(),
            &[
                ("CONTAINER ID", "ID"),
                ("IMAGE", "Image"),
                ("COMMAND", "Command"),
                ("CREATED", "RunningFor"),
                ("STATUS", "Status"),
                ("PORTS", "Ports"),
                ("NAMES", "Names"),
            ],
        )?;
    }
    use std::io::Write;
    std::io::stdout().write_all(out.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_commands_are_cut_like_dockers() {
        assert_eq!(ellipsis("echo hi", 20), "echo hi");
        let cut = ellipsis("sh -c 'echo hello world'", 20);
        assert_eq!(cut.chars().count(), 20);
        assert!(cut.ends_with('…'));
    }
}
