//! `logs [-f] [-t] [--tail N] CONTAINER`: the container's json-file log, stdout entries to
//! stdout and stderr entries to stderr; `-f` follows it while the container runs.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::Global;
use crate::container::logs::Entry;
use crate::container::{find, Container};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Follow the log while the container runs
    #[arg(short, long)]
    pub follow: bool,

    /// Show timestamps
    #[arg(short, long)]
    pub timestamps: bool,

    /// Only the last N lines ("all" for every line)
    #[arg(short = 'n', long, default_value = "all")]
    pub tail: String,

    pub container: String,
}

fn show(entry: &Entry, timestamps: bool) -> io::Result<()> {
    let text = if timestamps {
        format!("{} {}", entry.time, entry.log)
    } else {
        entry.log.clone()
    };
    if entry.stream == "stderr" {
        let mut err = io::stderr().lock();
        err.write_all(text.as_bytes())?;
        err.flush()
    } else {
        let mut out = io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()
    }
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let c = find(&global.root, &args.container)?;
    let path = c.log_path(&global.root);
    let tail: Option<usize> = match args.tail.as_str() {
        "all" | "-1" => None,
        n => Some(n.parse()?),
    };
    let mut reader = match File::open(&path) {
        Ok(f) => BufReader::new(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !args.follow => {
            return Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Wait for the log to appear while the container lives.
            loop {
                std::thread::sleep(Duration::from_millis(100));
                if let Ok(f) = File::open(&path) {
                    break BufReader::new(f);
                }
                if !Container::load(&global.root, &c.id)?.refresh().is_running() {
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
        Err(e) => return Err(e.into()),
    };
    // What is there now.
    let mut entries = Vec::new();
    let mut line = String::new();
    let mut partial = String::new();
    while reader.read_line(&mut line)? > 0 {
        if line.ends_with('\n') {
            if let Ok(e) = serde_json::from_str::<Entry>(&line) {
                entries.push(e);
            }
        } else {
            partial = line.clone();
        }
        line.clear();
    }
    let skip = tail.map_or(0, |n| entries.len().saturating_sub(n));
    for e in &entries[skip..] {
        show(e, args.timestamps)?;
    }
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    // New lines as they come, until the container stops and the log is read to its end.
    line = partial;
    loop {
        let running = Container::load(&global.root, &c.id)
            .map(|c| c.refresh().is_running())
            .unwrap_or(false);
        let mut got = false;
        while reader.read_line(&mut line)? > 0 {
            if !line.ends_with('\n') {
                break;
            }
            if let Ok(e) = serde_json::from_str::<Entry>(&line) {
                show(&e, args.timestamps)?;
            }
            line.clear();
            got = true;
        }
        if !running && !got {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
