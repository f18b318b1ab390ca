//! `restore`: thin_restore for our pools: a fresh pool on METADATA from thin_dump XML.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use engine::io::lock::{lock_exclusive, LockError};
use engine::io::{BlockDevice, FileDevice, OpenMode};
use engine::tools::restore::restore;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// thin_dump XML to read ("-" reads stdin)
    #[arg(short, long, value_name = "FILE")]
    pub input: PathBuf,

    /// Metadata device or file to overwrite; it must exist, and its size is the metadata
    /// device's size (a pool directory means DIR/metadata). A device that already holds a
    /// pool keeps that pool's metadata size, so a device split into metadata and data
    /// (`pool create --device`) keeps its data region
    #[arg(short, long, value_name = "METADATA")]
    pub output: PathBuf,

    /// Print nothing on success
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let path = if args.output.is_dir() {
        args.output.join("metadata")
    } else {
        args.output.clone()
    };
    super::refuse_if_kernel_owns(&path)?;
    // Like thin_restore, the output must exist: its size is the metadata device's size.
    let dev = FileDevice::open(&path, OpenMode::ReadWrite)
        .with_context(|| format!("failed to open metadata {}", path.display()))?;
    // Never overwrite the metadata of a pool some owner has open.
    let lock = dev
        .file()
        .try_clone()
        .with_context(|| format!("failed to open metadata {}", path.display()))?;
    match lock_exclusive(&lock) {
        Ok(()) => {}
        Err(LockError::Held(holder)) => anyhow::bail!(
            "metadata {} is in use by its pool's owner ({holder}); stop the owner first",
            path.display()
        ),
        Err(LockError::Io(e)) => {
            return Err(anyhow::Error::new(e)
                .context(format!("failed to lock metadata {}", path.display())))
        }
    }
    let dev = keep_metadata_extent(Arc::new(dev), &path, args.quiet);
    let input_name = args.input.display().to_string();
    let result = if args.input.as_os_str() == "-" {
        restore(io::stdin().lock(), dev)
    } else {
        let f = File::open(&args.input)
            .with_context(|| format!("failed to open {}", args.input.display()))?;
        restore(BufReader::new(f), dev)
    };
    let report =
        result.with_context(|| format!("failed to restore {input_name} to {}", path.display()))?;
    if !args.quiet {
        eprintln!(
            "dmtool: restored {} devices, {} mappings, transaction {} to {}",
            report.nr_devices,
            report.nr_mappings,
            report.transaction_id,
            path.display()
        );
    }
    drop(lock);
    Ok(ExitCode::SUCCESS)
}

/// The part of `dev` new metadata may take: all of it, unless it holds a pool whose metadata
/// space map covers less (a device split into metadata and data: the rest is its data, and
/// a metadata device the size of the whole device would move the data region's start).
pub fn keep_metadata_extent(
    dev: Arc<dyn BlockDevice>,
    path: &std::path::Path,
    quiet: bool,
) -> Arc<dyn BlockDevice> {
    let (extent, cut) = engine::thin::files::metadata_extent(dev);
    if cut && !quiet {
        eprintln!(
            "dmtool: {} holds a pool with {} of metadata; only that part is written (the rest \
             may be its data region)",
            path.display(),
            engine::units::format_size(extent.size())
        );
    }
    extent
}
