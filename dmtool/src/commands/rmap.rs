//! `rmap`: thin_rmap for our pools: which thins map the given data blocks, printed as
//! thin_rmap 0.9.0 prints it.

use std::fmt::Write as _;
use std::ops::Range;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use engine::tools::rmap::rmap;

use super::open_metadata;
use crate::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Metadata device or file (a pool directory means DIR/metadata)
    #[arg(value_name = "METADATA")]
    pub metadata: PathBuf,

    /// Data blocks BEGIN..END (END not included: 5..45 is blocks 5 to 44); repeatable
    #[arg(long, value_name = "BEGIN..END", value_parser = parse_region, required = true)]
    pub region: Vec<Range<u64>>,
}

/// `BEGIN..END` with END > BEGIN, both decimal.
pub fn parse_region(text: &str) -> Result<Range<u64>, String> {
    let (begin, end) = text
        .split_once("..")
        .ok_or_else(|| format!("badly formed region {text:?} (no dots)"))?;
    let number = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("badly formed region {text:?} (couldn't parse numbers)"))
    };
    let (begin, end) = (number(begin)?, number(end)?);
    if end <= begin {
        return Err(format!("badly formed region {text:?} (end <= begin)"));
    }
    Ok(begin..end)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // The live trees of an owned pool change under the reader.
    let (dev, _owner_lock) = open_metadata(&args.metadata, true)?;
    let runs = rmap(&*dev, &args.region)
        .with_context(|| format!("failed to map data blocks of {}", args.metadata.display()))?;
    let mut text = String::new();
    for r in &runs {
        let v = r.vblocks();
        let _ = writeln!(
            text,
            "data {}..{} -> thin({}) {}..{}",
            r.data.start, r.data.end, r.thin_id, v.start, v.end
        );
    }
    output::write_stdout(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_parse_like_thin_rmap() {
        assert_eq!(parse_region("5..45"), Ok(5..45));
        assert!(parse_region("5").unwrap_err().contains("no dots"));
        assert!(parse_region("5..5").unwrap_err().contains("end <= begin"));
        assert!(parse_region("a..5").unwrap_err().contains("numbers"));
    }
}
