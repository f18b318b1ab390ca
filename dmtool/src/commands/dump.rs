//! `dump`: thin_dump's output, byte for byte.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use engine::tools::dump::{dump, DumpFormat, DumpOptions};

use super::open_metadata;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    /// thin_dump's XML, which thin_restore reads back
    Xml,
    /// One line per device and mapping run
    #[value(name = "human_readable")]
    HumanReadable,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Metadata device or file (a pool directory means DIR/metadata)
    #[arg(value_name = "METADATA")]
    pub metadata: PathBuf,

    /// Output format
    #[arg(short, long, value_enum, default_value = "xml")]
    pub format: Format,

    /// Dump the held metadata snapshot (works on a live pool)
    #[arg(short = 'm', long)]
    pub metadata_snap: bool,

    /// Print devices without their mappings
    #[arg(long)]
    pub skip_mappings: bool,

    /// Print only this device
    #[arg(long, value_name = "N")]
    pub dev_id: Option<u64>,

    /// Write to FILE instead of stdout
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // The live trees of an owned pool change under the reader; its held snapshot does not.
    let (dev, _owner_lock) = open_metadata(&args.metadata, !args.metadata_snap)?;
    let opts = DumpOptions {
        format: match args.format {
            Format::Xml => DumpFormat::Xml,
            Format::HumanReadable => DumpFormat::HumanReadable,
        },
        use_metadata_snap: args.metadata_snap,
        skip_mappings: args.skip_mappings,
        dev_id: args.dev_id,
    };
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(
            File::create(path).with_context(|| format!("failed to create {}", path.display()))?,
        ),
        None => Box::new(io::stdout().lock()),
    };
    dump(&*dev, &opts, &mut out)
        .and_then(|()| out.flush().map_err(engine::tools::dump::DumpError::Output))
        .with_context(|| format!("failed to dump {}", args.metadata.display()))?;
    Ok(ExitCode::SUCCESS)
}
