//! `thin trim-journal`: give a cleanly unmounted ext4 file system's journal log back to the
//! pool (see `engine::journal`), as thinbox does to every image layer it writes.

use std::process::ExitCode;

use anyhow::{bail, Context};
use engine::journal::{trim_ext4_journal, JournalTrim};
use engine::units::format_size;
use engine::ThinId;
use serde::Serialize;

use super::{control, Access};
use crate::cli::{parse_thin_id, PoolLocation};
use crate::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Thin id (its file system must not be mounted anywhere)
    #[arg(value_parser = parse_thin_id)]
    pub id: ThinId,

    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

/// `--json`: what was found and done.
#[derive(Serialize)]
struct Report {
    id: u64,
    trimmed: bool,
    /// Why nothing was touched, when `trimmed` is false.
    skipped: Option<String>,
    log_bytes: u64,
    discarded_bytes: u64,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut pool = control(&args.loc, Access::Change)?;
    let what = format!("thin {} in pool {}", args.id, args.loc.name());
    let thins = pool
        .list()
        .with_context(|| format!("failed to list {what}"))?;
    let Some(thin) = thins.iter().find(|t| t.id == args.id.get()) else {
        bail!("no {what}");
    };
    // An active thin may be mounted: its log is live, and a discard could race the kernel
    // writing into it.
    if let Some(active) = &thin.active {
        bail!(
            "{what} is active ({}): unmount and deactivate it first",
            active.device.display()
        );
    }
    let trim = trim_ext4_journal(pool.as_mut(), args.id)
        .with_context(|| format!("failed to trim the journal of {what}"))?;
    let (log_bytes, discarded_bytes, skipped) = match trim {
        JournalTrim::Trimmed {
            log_bytes,
            discarded,
        } => (log_bytes, discarded, None),
        JournalTrim::Skipped(reason) => (0, 0, Some(reason.to_string())),
    };
    let report = Report {
        id: args.id.get(),
        trimmed: skipped.is_none(),
        skipped,
        log_bytes,
        discarded_bytes,
    };
    if args.json {
        output::json(&report)?;
    } else if let Some(reason) = &report.skipped {
        println!("thin {}: left as it is: {reason}", args.id);
    } else {
        println!(
            "thin {}: discarded {} of a {} journal log",
            args.id,
            format_size(report.discarded_bytes),
            format_size(report.log_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}
