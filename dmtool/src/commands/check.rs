//! `check`: thin_check for our pools (and the kernel's).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use engine::io::{FileDevice, OpenMode};
use engine::thin::metadata::superblock::clear_needs_check;
use engine::tools::check::{check_with_progress, CheckOptions};

use super::open_metadata;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Metadata device or file (a pool directory means DIR/metadata)
    #[arg(value_name = "METADATA")]
    pub metadata: PathBuf,

    /// Print nothing; only the exit code says whether the metadata is damaged
    #[arg(short, long)]
    pub quiet: bool,

    /// Check the device tree but not each device's mappings (reference counts are then not
    /// compared)
    #[arg(long)]
    pub skip_mappings: bool,

    /// Check the held metadata snapshot instead of the live trees
    #[arg(short = 'm', long)]
    pub metadata_snap: bool,

    /// When the check finds no error, clear NEEDS_CHECK in the superblock (only its flags
    /// and checksum change), so the pool opens read-write again
    #[arg(long, conflicts_with = "metadata_snap")]
    pub clear_needs_check_flag: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // A live pool changes under the checker and would show damage that is not there.
    let (dev, _owner_lock) = open_metadata(&args.metadata, !args.metadata_snap)?;
    let opts = CheckOptions {
        skip_mappings: args.skip_mappings,
        use_metadata_snap: args.metadata_snap,
    };
    let bar = crate::progress::bar(0, "checking", crate::progress::Unit::Blocks);
    let report = check_with_progress(&*dev, &opts, &mut |done, all| {
        bar.set_length(all.max(done));
        bar.set_position(done);
    });
    bar.finish_and_clear();
    if !args.quiet {
        // thin_check 0.9.0 prints these two lines on stdout, the second being the metadata
        // space map's block count minus one (see check::Report::metadata_nr_blocks).
        let mut text = String::new();
        if let Some(tid) = report.transaction_id {
            text.push_str(&format!("TRANSACTION_ID={tid}\n"));
        }
        if let Some(nr) = report.metadata_nr_blocks {
            text.push_str(&format!("METADATA_FREE_BLOCKS={}\n", nr.saturating_sub(1)));
        }
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .context("failed to write to stdout")?;
        for finding in &report.findings {
            eprintln!("{finding}");
        }
        let (suppressed_errors, suppressed_warnings) =
            (report.suppressed_errors, report.suppressed_warnings);
        if suppressed_errors + suppressed_warnings > 0 {
            eprintln!(
                "... and {suppressed_errors} more errors, {suppressed_warnings} more warnings"
            );
        }
        if !report.is_clean() {
            eprintln!(
                "dmtool: {} is damaged: {} errors",
                args.metadata.display(),
                report.nr_errors()
            );
        }
    }
    if !report.is_clean() {
        return Ok(ExitCode::FAILURE);
    }
    if args.clear_needs_check_flag && report.needs_check {
        // The owner lock taken above is still held: nobody else has the pool.
        let path = crate::cli::metadata_path(&args.metadata);
        let rw = FileDevice::open(&path, OpenMode::ReadWrite)
            .with_context(|| format!("failed to open metadata {} to write", path.display()))?;
        clear_needs_check(&rw).with_context(|| {
            format!("failed to clear needs_check in metadata {}", path.display())
        })?;
        if !args.quiet {
            eprintln!("dmtool: cleared needs_check in {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
