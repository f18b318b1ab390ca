//! `trim`: thin_trim for our pools: discard every data block the pool does not use.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use engine::io::{BlockDevice, FileDevice, OpenMode};
use engine::thin::files::open_split_regions;
use engine::tools::trim::trim;

use crate::cli::PoolLocation;
use crate::progress::{self, Unit};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub loc: PoolLocation,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let paths = args.loc.paths();
    super::refuse_if_kernel_owns(&paths.metadata)?;
    // Held until the trim is done (the split device's regions hold their own).
    let mut _lock = None;
    let (meta, data): (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) = if paths.is_split() {
        // One open of the device, locked as the pool's owner, seen as two regions: every
        // discard goes through the data region, which refuses anything outside it.
        let ((meta, data), _) = open_split_regions(&paths.metadata, OpenMode::ReadWrite)
            .with_context(|| format!("failed to open pool device {}", paths.metadata.display()))?;
        (meta, data)
    } else {
        let meta = FileDevice::open(&paths.metadata, OpenMode::ReadOnly)
            .with_context(|| format!("failed to open metadata {}", paths.metadata.display()))?;
        // The pool's owner allocates from the blocks we would discard.
        _lock = Some(super::lock_metadata(&meta, &paths.metadata)?);
        let data = FileDevice::open(&paths.data, OpenMode::ReadWrite)
            .with_context(|| format!("failed to open data {}", paths.data.display()))?;
        (Arc::new(meta), Arc::new(data))
    };
    let bar = progress::bar(0, "trimming", Unit::Blocks);
    let report = trim(meta, &*data, &mut |done, all| {
        bar.set_length(all);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = report.with_context(|| format!("failed to trim pool {}", args.loc.name()))?;
    tracing::info!(
        free_blocks = report.nr_free_blocks,
        ranges = report.nr_ranges,
        bytes = report.bytes,
        "trimmed"
    );
    Ok(ExitCode::SUCCESS)
}
