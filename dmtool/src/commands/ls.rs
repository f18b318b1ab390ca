//! `ls`: thin_ls for a metadata device: per thin mapped, exclusive and shared space, in
//! thin_ls 0.9.0's table (same fields, same widths, same human sizes) or as JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::Context;
use engine::tools::ls::{ls, Listing, ThinUsage};
use engine::tools::MetadataRoot;
use serde::Serialize;

use super::open_metadata;
use crate::output;

/// A column of the table; the names are thin_ls's `-o` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Dev,
    MappedBlocks,
    ExclusiveBlocks,
    SharedBlocks,
    MappedSectors,
    ExclusiveSectors,
    SharedSectors,
    MappedBytes,
    ExclusiveBytes,
    SharedBytes,
    Mapped,
    Exclusive,
    Shared,
    Transaction,
    CreateTime,
    SnapTime,
    /// Not in thin_ls 0.9.0 (later versions have it): the highest mapped virtual block.
    HighestBlock,
    /// Not in thin_ls 0.9.0: the end of the highest mapped block, as a human size.
    HighestMapped,
}

const FIELDS: [(&str, Field); 18] = [
    ("DEV", Field::Dev),
    ("MAPPED_BLOCKS", Field::MappedBlocks),
    ("EXCLUSIVE_BLOCKS", Field::ExclusiveBlocks),
    ("SHARED_BLOCKS", Field::SharedBlocks),
    ("MAPPED_SECTORS", Field::MappedSectors),
    ("EXCLUSIVE_SECTORS", Field::ExclusiveSectors),
    ("SHARED_SECTORS", Field::SharedSectors),
    ("MAPPED_BYTES", Field::MappedBytes),
    ("EXCLUSIVE_BYTES", Field::ExclusiveBytes),
    ("SHARED_BYTES", Field::SharedBytes),
    ("MAPPED", Field::Mapped),
    ("EXCLUSIVE", Field::Exclusive),
    ("SHARED", Field::Shared),
    ("TRANSACTION", Field::Transaction),
    ("CREATE_TIME", Field::CreateTime),
    ("SNAP_TIME", Field::SnapTime),
    ("HIGHEST_BLOCK", Field::HighestBlock),
    ("HIGHEST_MAPPED", Field::HighestMapped),
];

impl Field {
    fn name(self) -> &'static str {
        FIELDS
            .iter()
            .find(|(_, f)| *f == self)
            .map(|(n, _)| *n)
            .expect("every field has a name")
    }
}

/// A `-o` list: field names separated by commas.
#[derive(Clone, Debug)]
pub struct Fields(pub Vec<Field>);

impl FromStr for Fields {
    type Err = String;

    fn from_str(text: &str) -> Result<Fields, String> {
        if text.is_empty() {
            return Ok(Fields(Vec::new()));
        }
        text.split(',')
            .map(|name| {
                FIELDS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, f)| *f)
                    .ok_or_else(|| {
                        let all: Vec<&str> = FIELDS.iter().map(|(n, _)| *n).collect();
                        format!("unknown field {name:?} (fields: {})", all.join(","))
                    })
            })
            .collect::<Result<_, _>>()
            .map(Fields)
    }
}

impl Default for Fields {
    /// thin_ls's default columns.
    fn default() -> Fields {
        Fields(vec![
            Field::Dev,
            Field::Mapped,
            Field::CreateTime,
            Field::SnapTime,
        ])
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Metadata device or file (a pool directory means DIR/metadata)
    #[arg(value_name = "METADATA")]
    pub metadata: PathBuf,

    /// Columns, comma separated: DEV, MAPPED_BLOCKS, EXCLUSIVE_BLOCKS, SHARED_BLOCKS,
    /// MAPPED_SECTORS, EXCLUSIVE_SECTORS, SHARED_SECTORS, MAPPED_BYTES, EXCLUSIVE_BYTES,
    /// SHARED_BYTES, MAPPED, EXCLUSIVE, SHARED, TRANSACTION, CREATE_TIME, SNAP_TIME, and
    /// (not in thin_ls 0.9.0) HIGHEST_BLOCK, HIGHEST_MAPPED [default:
    /// DEV,MAPPED,CREATE_TIME,SNAP_TIME]
    #[arg(short = 'o', long = "format", value_name = "FIELDS", value_parser = clap::value_parser!(Fields))]
    pub fields: Option<Fields>,

    /// Leave out the header row
    #[arg(long)]
    pub no_headers: bool,

    /// Read the held metadata snapshot (works on a live pool)
    #[arg(short = 'm', long)]
    pub metadata_snap: bool,

    /// Print every field of every thin as JSON instead of a table
    #[arg(long, conflicts_with_all = ["fields", "no_headers"])]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    // The live trees of an owned pool change under the reader; its held snapshot does not.
    let (dev, _owner_lock) = open_metadata(&args.metadata, !args.metadata_snap)?;
    let root = if args.metadata_snap {
        MetadataRoot::HeldSnap
    } else {
        MetadataRoot::Live
    };
    let listing = ls(&*dev, root)
        .with_context(|| format!("failed to list the thins of {}", args.metadata.display()))?;
    if args.json {
        let rows: Vec<UsageJson> = listing
            .thins
            .iter()
            .map(|t| UsageJson::new(t, listing.superblock.data_block_size))
            .collect();
        output::json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    let fields = args.fields.unwrap_or_default();
    let text = table(&listing, &fields.0, !args.no_headers);
    output::write_stdout(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// thin_ls's grid: every cell right-aligned to its column's widest cell and followed by
/// one space, one line per row.
pub fn table(listing: &Listing, fields: &[Field], headers: bool) -> String {
    // No columns, no rows: thin_ls prints nothing at all for `-o ''`.
    if fields.is_empty() {
        return String::new();
    }
    let block_sectors = u64::from(listing.superblock.data_block_size);
    let mut rows: Vec<Vec<String>> = Vec::new();
    if headers {
        rows.push(fields.iter().map(|f| f.name().to_string()).collect());
    }
    for t in &listing.thins {
        rows.push(fields.iter().map(|&f| cell(t, f, block_sectors)).collect());
    }
    let mut widths = vec![0; fields.len()];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut text = String::new();
    for row in &rows {
        for (c, w) in row.iter().zip(&widths) {
            text.push_str(&format!("{c:>w$} "));
        }
        text.push('\n');
    }
    text
}

fn cell(t: &ThinUsage, field: Field, block_sectors: u64) -> String {
    let (mapped, exclusive, shared) = (
        t.details.mapped_blocks,
        t.exclusive_blocks,
        t.shared_blocks(),
    );
    // Products of numbers read from disk: saturate rather than wrap.
    let sectors = |blocks: u64| blocks.saturating_mul(block_sectors);
    let bytes = |blocks: u64| sectors(blocks).saturating_mul(512);
    match field {
        Field::Dev => t.thin_id.to_string(),
        Field::MappedBlocks => mapped.to_string(),
        Field::ExclusiveBlocks => exclusive.to_string(),
        Field::SharedBlocks => shared.to_string(),
        Field::MappedSectors => sectors(mapped).to_string(),
        Field::ExclusiveSectors => sectors(exclusive).to_string(),
        Field::SharedSectors => sectors(shared).to_string(),
        Field::MappedBytes => bytes(mapped).to_string(),
        Field::ExclusiveBytes => bytes(exclusive).to_string(),
        Field::SharedBytes => bytes(shared).to_string(),
        Field::Mapped => disk_size(bytes(mapped)),
        Field::Exclusive => disk_size(bytes(exclusive)),
        Field::Shared => disk_size(bytes(shared)),
        Field::Transaction => t.details.transaction_id.to_string(),
        Field::CreateTime => t.details.creation_time.to_string(),
        Field::SnapTime => t.details.snapshotted_time.to_string(),
        Field::HighestBlock => t
            .highest_mapped
            .map_or_else(|| "-".into(), |b| b.to_string()),
        Field::HighestMapped => t
            .highest_mapped
            .map_or_else(|| "-".into(), |b| disk_size(bytes(b.saturating_add(1)))),
    }
}

/// A byte count as thin_ls 0.9.0 prints sizes: plain bytes up to 8 KiB; else bytes are
/// divided by 1024 (rounding down) while above 1 MiB, then once more (rounding to nearest,
/// halves up) if still above 8192, with the suffix for the divisions made: `7680`, `9KiB`,
/// `8192KiB`, `9MiB`, `1024MiB`.
pub fn disk_size(bytes: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let (mut n, mut unit) = (bytes, 0);
    while n > 1 << 20 {
        n /= 1024;
        unit += 1;
    }
    if n > 8 * 1024 {
        n = (n + 512) / 1024;
        unit += 1;
    }
    format!("{n}{}", SUFFIXES[unit])
}

/// One thin in `ls --json`: every count, in blocks and bytes.
#[derive(Serialize)]
struct UsageJson {
    dev: u64,
    mapped_blocks: u64,
    exclusive_blocks: u64,
    shared_blocks: u64,
    mapped_bytes: u64,
    exclusive_bytes: u64,
    shared_bytes: u64,
    transaction: u64,
    create_time: u32,
    snap_time: u32,
    /// `null` when the thin maps nothing.
    highest_mapped_block: Option<u64>,
}

impl UsageJson {
    fn new(t: &ThinUsage, block_sectors: u32) -> UsageJson {
        let bytes = |blocks: u64| {
            blocks
                .saturating_mul(u64::from(block_sectors))
                .saturating_mul(512)
        };
        UsageJson {
            dev: t.thin_id,
            mapped_blocks: t.details.mapped_blocks,
            exclusive_blocks: t.exclusive_blocks,
            shared_blocks: t.shared_blocks(),
            mapped_bytes: bytes(t.details.mapped_blocks),
            exclusive_bytes: bytes(t.exclusive_blocks),
            shared_bytes: bytes(t.shared_blocks()),
            transaction: t.details.transaction_id,
            create_time: t.details.creation_time,
            snap_time: t.details.snapshotted_time,
            highest_mapped_block: t.highest_mapped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_thin_ls_prints_them() {
        // Pairs measured with thin_ls 0.9.0 (see dmtool/tests/thin_tools.rs for the live
        // comparison).
        for (bytes, text) in [
            (0, "0"),
            (512, "512"),
            (8192, "8192"),
            (8704, "9KiB"),
            (523_776, "512KiB"),
            (1_048_576, "1024KiB"),
            (1_114_112, "1088KiB"),
            (8_389_120, "8192KiB"),
            (8_389_632, "8MiB"),
            (9_960_960, "9MiB"),
            (9_961_472, "10MiB"),
            (39_321_600, "38MiB"),
            (1_073_741_824, "1024MiB"),
            (9_663_676_416, "9GiB"),
            (8_797_166_764_032, "8TiB"),
        ] {
            assert_eq!(disk_size(bytes), text, "{bytes}");
        }
    }

    #[test]
    fn fields_parse_by_thin_ls_names() {
        let f: Fields = "DEV,SHARED,HIGHEST_BLOCK".parse().unwrap();
        assert_eq!(f.0, [Field::Dev, Field::Shared, Field::HighestBlock]);
        assert!("DEV,BOGUS".parse::<Fields>().unwrap_err().contains("BOGUS"));
        assert!("".parse::<Fields>().unwrap().0.is_empty());
    }
}
