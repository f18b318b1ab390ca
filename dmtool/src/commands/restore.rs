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
    /// device's size (a pool directory means DIR/metadata)
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
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
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
