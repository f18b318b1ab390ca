//! `thin create`, `thin snap`, `thin delete` and `thin ls`.

use std::process::ExitCode;

use anyhow::Context;
use engine::units::format_size;
use engine::ThinId;
use serde::Serialize;

use super::{commit, open_volumes, Access};
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
pub struct LsArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

pub fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let mut volumes = open_volumes(&args.loc, Access::Change)?;
    volumes
        .create_thin(args.id, args.size, args.name.as_deref())
        .with_context(|| {
            format!(
                "failed to create thin {} in pool {}",
                args.id,
                args.loc.name()
            )
        })?;
    commit(&volumes, &args.loc)?;
    Ok(ExitCode::SUCCESS)
}

pub fn snap(args: SnapArgs) -> anyhow::Result<ExitCode> {
    let mut volumes = open_volumes(&args.loc, Access::Change)?;
    volumes
        .snapshot(args.id, args.origin, args.name.as_deref())
        .with_context(|| {
            format!(
                "failed to snapshot thin {} as thin {} in pool {}",
                args.origin,
                args.id,
                args.loc.name()
            )
        })?;
    commit(&volumes, &args.loc)?;
    Ok(ExitCode::SUCCESS)
}

pub fn delete(args: DeleteArgs) -> anyhow::Result<ExitCode> {
    let mut volumes = open_volumes(&args.loc, Access::Change)?;
    volumes.delete(args.id).with_context(|| {
        format!(
            "failed to delete thin {} in pool {}",
            args.id,
            args.loc.name()
        )
    })?;
    commit(&volumes, &args.loc)?;
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
    origin: Option<u64>,
    orphan: bool,
}

pub fn ls(args: LsArgs) -> anyhow::Result<ExitCode> {
    let volumes = open_volumes(&args.loc, Access::Look)?;
    let pool = volumes.pool();
    let block_bytes = pool.block_size().bytes();
    let mut rows = Vec::new();
    for id in pool.thin_ids() {
        let details = pool
            .thin_details(id)
            .with_context(|| format!("failed to read thin {id} in pool {}", args.loc.name()))?;
        let record = volumes.store().get(id);
        rows.push(ThinRow {
            id: id.get(),
            name: record.and_then(|v| v.name.clone()),
            size_bytes: record.map(|v| v.size_bytes),
            mapped_blocks: details.mapped_blocks,
            mapped_bytes: details.mapped_blocks * block_bytes,
            origin: record.and_then(|v| v.origin).map(ThinId::get),
            orphan: record.is_none(),
        });
    }
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
                r.origin.map_or_else(|| "-".into(), |o| o.to_string()),
            ]
        })
        .collect();
    output::table(
        &["ID", "NAME", "SIZE", "MAPPED", "ORIGIN"],
        &["ID", "SIZE", "MAPPED", "ORIGIN"],
        &cells,
    )?;
    Ok(ExitCode::SUCCESS)
}
