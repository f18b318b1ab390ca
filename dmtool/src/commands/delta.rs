//! `delta`: thin_delta for our pools: how two thins' mappings differ, in thin_delta 0.9.0's
//! XML, byte for byte.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use engine::tools::delta::{delta, Delta, Piece};
use engine::tools::MetadataRoot;

use super::open_metadata;
use crate::output;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Metadata device or file (a pool directory means DIR/metadata)
    #[arg(value_name = "METADATA")]
    pub metadata: PathBuf,

    /// The left thin (a thin or a snapshot: they are the same to the pool)
    #[arg(long = "thin1", visible_alias = "snap1", value_name = "ID")]
    pub thin1: u64,

    /// The right thin
    #[arg(long = "thin2", visible_alias = "snap2", value_name = "ID")]
    pub thin2: u64,

    /// Read the held metadata snapshot (works on a live pool); `-mBLOCK` or
    /// `--metadata-snap=BLOCK` also checks that it is at BLOCK (the value must be attached)
    #[arg(
        short = 'm',
        long,
        value_name = "BLOCK",
        num_args = 0..=1,
        require_equals = true
    )]
    pub metadata_snap: Option<Option<u64>>,
}

/// thin_delta's `-mBLOCK` (getopt's optional argument, attached) as clap reads it:
/// `--metadata-snap=BLOCK`. Only `dmtool delta ...` command lines are touched.
pub fn normalize_args(mut argv: Vec<OsString>) -> Vec<OsString> {
    if argv.get(1).is_some_and(|verb| verb == "delta") {
        for arg in argv.iter_mut().skip(2) {
            let block = arg
                .to_str()
                .and_then(|a| a.strip_prefix("-m"))
                .filter(|b| !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit()))
                .map(str::to_string);
            if let Some(block) = block {
                *arg = OsString::from(format!("--metadata-snap={block}"));
            }
        }
    }
    argv
}

/// `verbose` is dmtool's global `-v/--verbose`: for delta it means thin_delta's `--verbose`
/// (each range with its data blocks), not more log output.
pub fn run(args: Args, verbose: bool) -> anyhow::Result<ExitCode> {
    let root = match args.metadata_snap {
        None => MetadataRoot::Live,
        Some(None) => MetadataRoot::HeldSnap,
        Some(Some(block)) => MetadataRoot::HeldSnapAt(block),
    };
    let (dev, _owner_lock) = open_metadata(&args.metadata, root == MetadataRoot::Live)?;
    let d = delta(&*dev, root, args.thin1, args.thin2).with_context(|| {
        format!(
            "failed to compare thins {} and {} in {}",
            args.thin1,
            args.thin2,
            args.metadata.display()
        )
    })?;
    output::write_stdout(xml(&d, args.thin1, args.thin2, verbose).as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// The kinds of piece, as their XML element names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    LeftOnly,
    RightOnly,
    Different,
    Same,
}

impl Kind {
    fn of(p: &Piece) -> Kind {
        match p {
            Piece::LeftOnly { .. } => Kind::LeftOnly,
            Piece::RightOnly { .. } => Kind::RightOnly,
            Piece::Different { .. } => Kind::Different,
            Piece::Same { .. } => Kind::Same,
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Kind::LeftOnly => "left_only",
            Kind::RightOnly => "right_only",
            Kind::Different => "different",
            Kind::Same => "same",
        }
    }
}

fn span(p: &Piece) -> (u64, u64) {
    match *p {
        Piece::LeftOnly { vblock, len, .. }
        | Piece::RightOnly { vblock, len, .. }
        | Piece::Same { vblock, len, .. }
        | Piece::Different { vblock, len, .. } => (vblock, len),
    }
}

/// thin_delta's XML. The superblock line names the held snapshot when the superblock read
/// has one, and the data space map's size (0 in a held snapshot's copy, as thin_delta says).
/// Plain: adjacent pieces of one kind join into one element. Verbose: a run of pieces of one
/// kind is one element holding a `<range>` per piece.
pub fn xml(d: &Delta, left: u64, right: u64, verbose: bool) -> String {
    let sb = &d.superblock;
    let mut s = String::new();
    let _ = write!(
        s,
        "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" data_block_size=\"{}\" \
         nr_data_blocks=\"{}\"",
        sb.time, sb.transaction_id, sb.data_block_size, sb.data_sm_root.nr_blocks
    );
    if sb.held_root != 0 {
        let _ = write!(s, " metadata_snap=\"{}\"", sb.held_root);
    }
    let _ = writeln!(s, ">\n  <diff left=\"{left}\" right=\"{right}\">");
    if verbose {
        let mut open: Option<Kind> = None;
        for p in &d.pieces {
            let k = Kind::of(p);
            if open != Some(k) {
                if let Some(o) = open {
                    let _ = writeln!(s, "    </{}>", o.tag());
                }
                let _ = writeln!(s, "    <{}>", k.tag());
                open = Some(k);
            }
            let _ = match *p {
                Piece::LeftOnly { vblock, data, len }
                | Piece::RightOnly { vblock, data, len }
                | Piece::Same { vblock, data, len } => writeln!(
                    s,
                    "      <range begin=\"{vblock}\" data_begin=\"{data}\" length=\"{len}\"/>"
                ),
                Piece::Different {
                    vblock,
                    left_data,
                    right_data,
                    len,
                } => writeln!(
                    s,
                    "      <range begin=\"{vblock}\" left_data_begin=\"{left_data}\" \
                     right_data_begin=\"{right_data}\" length=\"{len}\"/>"
                ),
            };
        }
        if let Some(o) = open {
            let _ = writeln!(s, "    </{}>", o.tag());
        }
    } else {
        let mut current: Option<(Kind, u64, u64)> = None;
        let flush = |s: &mut String, c: Option<(Kind, u64, u64)>| {
            if let Some((k, begin, end)) = c {
                let _ = writeln!(
                    s,
                    "    <{} begin=\"{begin}\" length=\"{}\"/>",
                    k.tag(),
                    end - begin
                );
            }
        };
        for p in &d.pieces {
            let (k, (vblock, len)) = (Kind::of(p), span(p));
            match &mut current {
                Some((ck, _, end)) if *ck == k && *end == vblock => *end = end.saturating_add(len),
                _ => {
                    flush(&mut s, current.take());
                    current = Some((k, vblock, vblock.saturating_add(len)));
                }
            }
        }
        flush(&mut s, current);
    }
    s.push_str("  </diff>\n</superblock>\n");
    s
}
