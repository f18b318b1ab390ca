//! `repair`: thin_repair for our pools (and the kernel's): rebuilds usable metadata from a
//! damaged metadata device onto another one, keeping every mapping that can be trusted.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use engine::io::{FileDevice, OpenMode};
use engine::tools::repair::{repair, RepairOptions, RepairReport};
use engine::DataBlockSize;

use super::open_metadata;
use crate::cli::{metadata_path, parse_block_size};
use crate::progress::{self, Unit};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Damaged metadata device or file to read (a pool directory means DIR/metadata); it
    /// is never written
    #[arg(short, long, value_name = "METADATA")]
    pub input: PathBuf,

    /// Metadata device or file to write the repaired metadata to; its size is the new
    /// metadata device's size (a missing file is created with the input's size; a device
    /// that holds a pool keeps that pool's metadata size, as `restore` does)
    #[arg(short, long, value_name = "METADATA")]
    pub output: PathBuf,

    /// The pool's data block size, needed when the superblock is destroyed
    #[arg(long, value_name = "SIZE", value_parser = parse_block_size)]
    pub data_block_size: Option<DataBlockSize>,

    /// Data blocks in the pool [default: the superblock's; without one, the highest mapped
    /// block + 1 (the pool grows to its data device when opened)]
    #[arg(long, value_name = "N")]
    pub nr_data_blocks: Option<u64>,

    /// The pool's transaction id [default: the superblock's; without one, the highest in
    /// the device details]
    #[arg(long, value_name = "N")]
    pub transaction_id: Option<u64>,

    /// Print nothing on success
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let input_path = metadata_path(&args.input);
    let output_path = metadata_path(&args.output);
    // Reading a pool its owner is changing would rebuild a state that never existed.
    let (input, _input_lock) = open_metadata(&input_path, true)?;
    if !output_path.exists() {
        FileDevice::create(&output_path, input.size())
            .with_context(|| format!("failed to create metadata {}", output_path.display()))?;
    }
    if same_file(&input_path, &output_path)? {
        anyhow::bail!(
            "input and output are the same metadata {}: repair writes a new copy",
            input_path.display()
        );
    }
    super::refuse_if_kernel_owns(&output_path)?;
    let output = FileDevice::open(&output_path, OpenMode::ReadWrite)
        .with_context(|| format!("failed to open metadata {}", output_path.display()))?;
    let _output_lock = super::lock_metadata(&output, &output_path)?;
    let opts = RepairOptions {
        data_block_size: args.data_block_size,
        nr_data_blocks: args.nr_data_blocks,
        transaction_id: args.transaction_id,
    };
    let bar = progress::bar(0, "scanning", Unit::Blocks);
    let output = super::restore::keep_metadata_extent(Arc::new(output), &output_path, args.quiet);
    let report = repair(&*input, output, &opts, &mut |done, all| {
        bar.set_length(all);
        bar.set_position(done);
    });
    bar.finish_and_clear();
    let report = report.with_context(|| {
        format!(
            "failed to repair metadata {} onto {}",
            input_path.display(),
            output_path.display()
        )
    })?;
    if !args.quiet {
        describe(&report, &input_path, &output_path);
    }
    Ok(ExitCode::SUCCESS)
}

/// Says on stderr what was kept and what was lost.
fn describe(r: &RepairReport, input: &Path, output: &Path) {
    eprintln!(
        "dmtool: repaired {} onto {}: {} devices, {} mappings ({} recovered from orphaned \
         nodes), transaction {}, {} damaged nodes",
        input.display(),
        output.display(),
        r.nr_devices,
        r.nr_mappings,
        r.nr_adopted_mappings,
        r.transaction_id,
        r.nr_damaged_nodes
    );
    if !r.superblock_intact {
        eprintln!(
            "dmtool: warning: the superblock was unreadable; the trees were found by scanning"
        );
    }
    for lost in &r.lost {
        let end = lost
            .end
            .map_or_else(|| "end".to_string(), |e| (e - 1).to_string());
        eprintln!(
            "dmtool: warning: thin {}: the mappings of blocks {}..{end} are lost (they read as \
             zeros)",
            lost.thin_id, lost.begin
        );
    }
    for id in &r.devices_without_mappings {
        eprintln!("dmtool: warning: thin {id}: its mapping tree is lost; it is kept empty");
    }
    for id in &r.devices_without_details {
        eprintln!("dmtool: warning: thin {id}: its details were lost and are made up");
    }
    if r.nr_dropped_mappings > 0 {
        eprintln!(
            "dmtool: warning: {} mappings pointed past the data device and were dropped",
            r.nr_dropped_mappings
        );
    }
    if r.dropped_metadata_snap {
        eprintln!("dmtool: warning: the held metadata snapshot was not carried over");
    }
}

fn same_file(a: &Path, b: &Path) -> anyhow::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (ma, mb) = (
        std::fs::metadata(a).with_context(|| format!("failed to stat {}", a.display()))?,
        std::fs::metadata(b).with_context(|| format!("failed to stat {}", b.display()))?,
    );
    let rdev = |m: &std::fs::Metadata| (m.rdev() != 0).then_some(m.rdev());
    Ok((ma.dev(), ma.ino()) == (mb.dev(), mb.ino())
        || rdev(&ma).is_some_and(|r| Some(r) == rdev(&mb)))
}
