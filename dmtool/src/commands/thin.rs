//! `thin create`, `thin snap`, `thin delete`, `thin rename` and `thin ls`.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::process::ExitCode;

use anyhow::Context;
use engine::activate::{ControlStatus, PoolControl};
use engine::io::{FileDevice, OpenMode};
use engine::tools::ls::{ls as list_usage, ThinUsage};
use engine::tools::MetadataRoot;
use engine::units::format_size;
use engine::{Error, ThinId};
use serde::Serialize;

use super::{control, Access};
use crate::cli::{parse_bytes, parse_thin_id, PoolLocation};
use crate::output;

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Thin id (0 to 16777215)
    #[arg(value_parser = parse_thin_id)]
    pub id: ThinId,

    /// Virtual size (a multiple of 512 bytes; k, M, G, T suffixes)
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub size: u64,

    /// A unique name
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct SnapArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Id of the new snapshot
    #[arg(value_parser = parse_thin_id)]
    pub id: ThinId,

    /// Id of the thin to snapshot
    #[arg(value_parser = parse_thin_id)]
    pub origin: ThinId,

    /// A unique name
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Thin id
    #[arg(value_parser = parse_thin_id)]
    pub id: ThinId,
}

#[derive(Debug, clap::Args)]
pub struct RenameArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Thin id
    #[arg(value_parser = parse_thin_id)]
    pub id: ThinId,

    /// The new name (unique in the pool)
    #[arg(required_unless_present = "clear")]
    pub name: Option<String>,

    /// Remove the thin's name instead
    #[arg(long, conflicts_with = "name")]
    pub clear: bool,
}

#[derive(Debug, clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

pub fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let mut pool = control(&args.loc, Access::Change)?;
    pool.create_thin(args.id, args.size, args.name.as_deref())
        .with_context(|| {
            format!(
                "failed to create thin {} in pool {}",
                args.id,
                args.loc.name()
            )
        })?;
    Ok(ExitCode::SUCCESS)
}

pub fn snap(args: SnapArgs) -> anyhow::Result<ExitCode> {
    let mut pool = control(&args.loc, Access::Change)?;
    pool.create_snap(args.id, args.origin, args.name.as_deref())
        .with_context(|| {
            format!(
                "failed to snapshot thin {} as thin {} in pool {}",
                args.origin,
                args.id,
                args.loc.name()
            )
        })?;
    Ok(ExitCode::SUCCESS)
}

pub fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let mut pool = control(&args.loc, Access::Change)?;
    pool.delete(args.id).with_context(|| {
        format!(
            "failed to delete thin {} in pool {}",
            args.id,
            args.loc.name()
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn rename(args: RenameArgs) -> anyhow::Result<ExitCode> {
    let mut pool = control(&args.loc, Access::Change)?;
    pool.rename(args.id, args.name.as_deref())
        .with_context(|| {
            format!(
                "failed to rename thin {} in pool {}",
                args.id,
                args.loc.name()
            )
        })?;
    Ok(ExitCode::SUCCESS)
}

/// One row of `thin ls --json`: a stable shape.
#[derive(Serialize)]
struct ThinRow {
    id: u64,
    name: Option<String>,
    /// `None` for an orphan (a thin without a record in the volume store).
    size_bytes: Option<u64>,
    mapped_blocks: u64,
    mapped_bytes: u64,
    /// Mappings of data blocks no other mapping names (as thin_ls counts them); `None` when
    /// the metadata could not be read for it.
    exclusive_blocks: Option<u64>,
    exclusive_bytes: Option<u64>,
    /// `mapped_blocks - exclusive_blocks`.
    shared_blocks: Option<u64>,
    shared_bytes: Option<u64>,
    /// The highest mapped virtual block (`None` when nothing is mapped).
    highest_mapped_block: Option<u64>,
    origin: Option<u64>,
    orphan: bool,
    /// The block device, when the thin is active.
    device: Option<String>,
    /// Its removal waits for the device's last user to close it.
    deferred_removal: bool,
}

pub fn ls(args: LsArgs) -> anyhow::Result<ExitCode> {
    let mut pool = control(&args.loc, Access::Look)?;
    let what = || format!("failed to list the thins of pool {}", args.loc.name());
    let status = pool.status().with_context(what)?;
    let block_bytes = u64::from(status.status.data_block_sectors) * 512;
    let thins = pool.list().with_context(what)?;
    let usage = usage(&args.loc, &mut *pool, &status)?;
    let rows: Vec<ThinRow> = thins
        .into_iter()
        .map(|t| {
            let u = usage.as_ref().and_then(|u| u.get(&t.id));
            (t, u)
        })
        .map(|(t, u)| ThinRow {
            id: t.id,
            name: t.name,
            orphan: t.size_bytes.is_none(),
            size_bytes: t.size_bytes,
            mapped_blocks: t.mapped_blocks,
            mapped_bytes: t.mapped_blocks.saturating_mul(block_bytes),
            exclusive_blocks: u.map(|u| u.exclusive_blocks),
            exclusive_bytes: u.map(|u| u.exclusive_blocks.saturating_mul(block_bytes)),
            shared_blocks: u.map(|u| u.shared_blocks()),
            shared_bytes: u.map(|u| u.shared_blocks().saturating_mul(block_bytes)),
            highest_mapped_block: u.and_then(|u| u.highest_mapped),
            origin: t.origin,
            deferred_removal: t.active.as_ref().is_some_and(|a| a.deferred_removal),
            device: t.active.map(|a| a.device.display().to_string()),
        })
        .collect();
    if args.json {
        output::json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.name.clone().unwrap_or_else(|| "-".into()),
                r.size_bytes
                    .map_or_else(|| "? (orphan)".into(), format_size),
                format_size(r.mapped_bytes),
                r.exclusive_bytes.map_or_else(|| "-".into(), format_size),
                r.shared_bytes.map_or_else(|| "-".into(), format_size),
                r.origin.map_or_else(|| "-".into(), |o| o.to_string()),
                match (&r.device, r.deferred_removal) {
                    (Some(d), true) => format!("{d} (deferred removal)"),
                    (Some(d), false) => d.clone(),
                    (None, _) => "-".into(),
                },
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "NAME",
            "SIZE",
            "MAPPED",
            "EXCLUSIVE",
            "SHARED",
            "ORIGIN",
            "DEVICE",
        ],
        &["ID", "SIZE", "MAPPED", "EXCLUSIVE", "SHARED", "ORIGIN"],
        &cells,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Each thin's exclusive and shared counts, read from the metadata as `thin_ls` reads it:
/// straight from the device when this process owns the pool (it is committed), else through
/// a metadata snapshot reserved for the read and released after it. `None` (the columns
/// show `-`) when someone else holds the metadata snapshot.
fn usage(
    loc: &PoolLocation,
    pool: &mut dyn PoolControl,
    status: &ControlStatus,
) -> anyhow::Result<Option<BTreeMap<u64, ThinUsage>>> {
    let path = loc.paths().metadata;
    let what = || {
        format!(
            "failed to read the usage of the thins of pool {}",
            loc.name()
        )
    };
    let read = |root| -> anyhow::Result<Vec<ThinUsage>> {
        let dev = FileDevice::open(&path, OpenMode::ReadOnly)
            .with_context(|| format!("failed to open metadata {}", path.display()))?;
        // The kernel writes metadata around the page cache: drop what an earlier reader left.
        let _ = nix::fcntl::posix_fadvise(
            dev.file().as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        Ok(list_usage(&dev, root).with_context(what)?.thins)
    };
    let owned_here = status.daemon_pid.is_none() && status.kernel_device.is_none();
    let thins = if owned_here {
        read(MetadataRoot::Live)?
    } else {
        match pool.reserve_metadata_snap() {
            Err(Error::MetadataSnapExists) => {
                eprintln!(
                    "dmtool: warning: a metadata snapshot is held on pool {}: exclusive and \
                     shared space are not shown",
                    loc.name()
                );
                return Ok(None);
            }
            other => other.with_context(what)?,
        }
        let thins = read(MetadataRoot::HeldSnap);
        let released = pool.release_metadata_snap().with_context(|| {
            format!(
                "failed to release the metadata snapshot of pool {}",
                loc.name()
            )
        });
        match (thins, released) {
            (Ok(t), Ok(())) => t,
            (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
            (Err(e), Err(r)) => return Err(e.context(format!("also: {r:#}"))),
        }
    };
    Ok(Some(thins.into_iter().map(|t| (t.thin_id, t)).collect()))
}
