//! `pool create`, `pool status`, `pool resize` and `pool set`.

use std::fs;
use std::process::ExitCode;

use anyhow::Context;
use engine::store::Volumes;
use engine::units::{format_size, METADATA_BLOCK_SIZE};
use engine::{DataBlockSize, NewPool, PoolOptions, PoolStatus};
use serde::Serialize;

use engine::activate::daemon::RunDir;
use engine::activate::{ControlStatus, PoolControl};
use engine::store::{PoolSettings, VolumeStore};

use super::{commit, control, Access};
use crate::cli::{parse_block_size, parse_bytes, PoolLocation};
use crate::output;

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Size of a new data file (an existing device keeps its own size)
    #[arg(long, value_name = "SIZE", default_value = "100G", value_parser = parse_bytes)]
    pub data_size: u64,

    /// Size of a new metadata file [default: 2G]; with --device, required: the metadata
    /// region at the device's start (whole 4k blocks, 256k to 15.9G), the data region after
    /// it. It cannot grow later: the data region follows it
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub metadata_size: Option<u64>,

    /// Data block size: the unit of allocation and copy-on-write (64k to 1G)
    #[arg(long, value_name = "SIZE", default_value = "64k", value_parser = parse_block_size)]
    pub block_size: DataBlockSize,

    /// Do not zero the rest of a newly provisioned block (the kernel's skip_block_zeroing)
    #[arg(long)]
    pub no_zero: bool,

    /// Overwrite an existing pool (its thins are lost)
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct ResizeArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// New size of the data device (files grow sparse; pools never shrink)
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub data_size: Option<u64>,

    /// New size of the metadata device
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    pub metadata_size: Option<u64>,
}

/// What the pool does when its data device is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WhenFull {
    /// Fail writes at once (error_if_no_space)
    Error,
    /// Hold writes until space appears, failing them after 60 s (queue_if_no_space)
    Queue,
}

/// On or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("setting").required(true).multiple(true)))]
pub struct SetArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Free data space at or below which the pool raises its low-water event (rounded up
    /// to whole data blocks; 0 turns the event off)
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes, group = "setting")]
    pub low_water_mark: Option<u64>,

    /// What writes that need a new block do when the data device is full
    #[arg(long, value_enum, value_name = "POLICY", group = "setting")]
    pub when_full: Option<WhenFull>,

    /// Zero the rest of a newly provisioned block (off: skip_block_zeroing)
    #[arg(long, value_enum, value_name = "ON|OFF", group = "setting")]
    pub zeroing: Option<Switch>,

    /// Freed data space the pool keeps allocated on its data device for reuse, instead of
    /// giving it back (hole punch, discard) at once: the lowest free blocks, up to this
    /// much (default 16M; 0 gives everything back). Reusing a kept block spares the host
    /// an allocation and a journal commit on the next flush. Not used by the kernel, which
    /// gives back only what thins discard
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes, group = "setting")]
    pub keep_free: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub loc: PoolLocation,

    /// Print JSON instead of the status line and table
    #[arg(long)]
    pub json: bool,
}

/// The metadata file `pool create` makes when not told a size.
const DEFAULT_METADATA_SIZE: u64 = 2 << 30;

pub fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let paths = args.loc.paths();
    if paths.metadata.exists() {
        super::refuse_if_kernel_owns(&paths.metadata)?;
    }
    if let Some(dir) = &args.loc.pool {
        fs::create_dir_all(dir)
            .with_context(|| format!("failed to create pool directory {}", dir.display()))?;
    }
    let metadata_size = match args.metadata_size {
        Some(size) => size,
        None if args.loc.is_split() => anyhow::bail!(
            "pool {}: --device needs --metadata-size, the size of the metadata region at the \
             start of the device (the rest is data)",
            args.loc.name()
        ),
        None => DEFAULT_METADATA_SIZE,
    };
    let new = NewPool {
        overwrite: args.force,
        ..NewPool::new(args.data_size, metadata_size, args.block_size)
    };
    let options = PoolOptions {
        zero_new_blocks: !args.no_zero,
        ..PoolOptions::default()
    };
    let volumes = Volumes::create(&paths, &args.loc.store_path(), new, options)
        .with_context(|| format!("failed to create pool {}", args.loc.name()))?;
    let status = volumes.pool().status();
    tracing::info!(
        data_blocks = status.total_data_blocks,
        metadata_blocks = status.total_metadata_blocks,
        "pool created"
    );
    commit(&volumes, &args.loc)?;
    Ok(ExitCode::SUCCESS)
}

/// Who owns the pool, for the status table.
fn owner(report: &StatusReport) -> String {
    match (&report.kernel_device, report.daemon_pid) {
        (Some(node), _) => format!("kernel device-mapper, {}", node.display()),
        (None, Some(pid)) => format!("pool daemon, pid {pid}"),
        (None, None) => "none (offline)".into(),
    }
}

pub fn resize(args: ResizeArgs) -> anyhow::Result<ExitCode> {
    if args.data_size.is_none() && args.metadata_size.is_none() {
        // A block device that grew is taken at its new size when the pool is next opened.
        anyhow::bail!("nothing to do: give --data-size and/or --metadata-size");
    }
    let mut pool = control(&args.loc, Access::Change)?;
    let before = pool.status()?.status;
    let data_block = u64::from(before.data_block_sectors) * 512;
    let spaces = [
        (
            "data",
            args.data_size,
            before.total_data_blocks * data_block,
        ),
        (
            "metadata",
            args.metadata_size,
            before.total_metadata_blocks * METADATA_BLOCK_SIZE,
        ),
    ];
    for (space, wanted, now) in spaces {
        if let Some(bytes) = wanted.filter(|&b| b < now) {
            anyhow::bail!(
                "pool {} has {} of {space} space; it cannot shrink to {}",
                args.loc.name(),
                format_size(now),
                format_size(bytes)
            );
        }
    }
    if args.loc.is_split() {
        let now = before.total_metadata_blocks * METADATA_BLOCK_SIZE;
        if let Some(bytes) = args.metadata_size.filter(|&b| b > now) {
            anyhow::bail!(
                "pool {} keeps its metadata in the first {} of the device and its data right \
                 after it; the metadata cannot grow to {} (a pool needing more must be made \
                 anew with a larger --metadata-size)",
                args.loc.name(),
                format_size(now),
                format_size(bytes)
            );
        }
    }
    pool.resize_pool(args.data_size, args.metadata_size)
        .with_context(|| format!("failed to resize pool {}", args.loc.name()))?;
    let after = pool.status()?.status;
    eprintln!(
        "dmtool: pool {}: data {} -> {}, metadata {} -> {}",
        args.loc.name(),
        format_size(before.total_data_blocks * data_block),
        format_size(after.total_data_blocks * data_block),
        format_size(before.total_metadata_blocks * METADATA_BLOCK_SIZE),
        format_size(after.total_metadata_blocks * METADATA_BLOCK_SIZE),
    );
    Ok(ExitCode::SUCCESS)
}

pub fn set(args: SetArgs) -> anyhow::Result<ExitCode> {
    // A running owner read the settings when it started and would not see new ones.
    let run = RunDir::for_pool(&args.loc.paths());
    if let Some(mut daemon) = run
        .connect()
        .with_context(|| format!("failed to reach the daemon of pool {}", args.loc.name()))?
    {
        let pid = daemon.status().ok().and_then(|s| s.daemon_pid);
        let pid = pid.map_or_else(String::new, |p| format!(" (pid {p})"));
        anyhow::bail!(
            "pool {} is owned by its pool daemon{pid}; stop it first (dmtool pool stop): the \
             settings apply when the pool starts",
            args.loc.name()
        );
    }
    let mut volumes = super::open_volumes(&args.loc, Access::Change)?;
    let block_bytes = volumes.pool().block_size().bytes();
    let changes = PoolSettings {
        zero_new_blocks: args.zeroing.map(|z| z == Switch::On),
        error_if_no_space: args.when_full.map(|w| w == WhenFull::Error),
        low_water_blocks: args.low_water_mark.map(|b| b.div_ceil(block_bytes)),
        kept_free_bytes: args.keep_free,
    };
    volumes
        .change_settings(changes)
        .with_context(|| format!("failed to change the settings of pool {}", args.loc.name()))?;
    Ok(ExitCode::SUCCESS)
}

/// Bytes used, total and available in one of the pool's two spaces.
#[derive(Serialize)]
struct Space {
    used_bytes: u64,
    total_bytes: u64,
    available_bytes: u64,
}

impl Space {
    fn new(used_blocks: u64, total_blocks: u64, block_bytes: u64) -> Space {
        Space {
            used_bytes: used_blocks * block_bytes,
            total_bytes: total_blocks * block_bytes,
            available_bytes: total_blocks.saturating_sub(used_blocks) * block_bytes,
        }
    }
}

/// What `pool status --json` prints.
#[derive(Serialize)]
struct StatusReport {
    kernel_line: String,
    status: PoolStatus,
    data_space: Space,
    metadata_space: Space,
    thin_count: usize,
    /// The low-water mark in data blocks recorded for the pool (`pool set`); 0: none.
    low_water_blocks: u64,
    /// Freed data space kept on the data device for reuse (`pool set --keep-free`).
    kept_free_bytes: u64,
    /// The pool daemon that owns the pool, if one runs.
    daemon_pid: Option<u32>,
    /// The kernel's pool device, when the kernel owns the pool.
    kernel_device: Option<std::path::PathBuf>,
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut pool = control(&args.loc, Access::Look)?;
    let ControlStatus {
        status,
        thin_count,
        daemon_pid,
        kernel_device,
    } = pool
        .status()
        .with_context(|| format!("failed to read the status of pool {}", args.loc.name()))?;
    let data_block = u64::from(status.data_block_sectors) * 512;
    let settings = VolumeStore::load(&args.loc.store_path())
        .map(|s| s.settings())
        .unwrap_or_default();
    let report = StatusReport {
        kernel_line: status.kernel_line(),
        data_space: Space::new(
            status.used_data_blocks,
            status.total_data_blocks,
            data_block,
        ),
        metadata_space: Space::new(
            status.used_metadata_blocks,
            status.total_metadata_blocks,
            METADATA_BLOCK_SIZE,
        ),
        thin_count,
        low_water_blocks: settings.low_water_blocks.unwrap_or(0),
        kept_free_bytes: settings.apply(PoolOptions::default()).kept_free_bytes,
        daemon_pid,
        kernel_device,
        status,
    };
    if args.json {
        output::json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", report.kernel_line);
    let row = |label: &str, bytes: u64| vec![label.to_string(), format_size(bytes)];
    let rows = vec![
        row("Data Space Used:", report.data_space.used_bytes),
        row("Data Space Total:", report.data_space.total_bytes),
        row("Data Space Available:", report.data_space.available_bytes),
        row("Metadata Space Used:", report.metadata_space.used_bytes),
        row("Metadata Space Total:", report.metadata_space.total_bytes),
        row(
            "Metadata Space Available:",
            report.metadata_space.available_bytes,
        ),
        vec!["Data Block Size:".into(), format_size(data_block)],
        vec!["Thin Devices:".into(), report.thin_count.to_string()],
        vec![
            "Zeroing:".into(),
            if report.status.zero_new_blocks {
                "on"
            } else {
                "off (skip_block_zeroing)"
            }
            .into(),
        ],
        vec![
            "When Full:".into(),
            if report.status.error_if_no_space {
                "error (error_if_no_space)"
            } else {
                "queue (queue_if_no_space)"
            }
            .into(),
        ],
        vec![
            "Low Water Mark:".into(),
            format!(
                "{} blocks ({})",
                report.low_water_blocks,
                format_size(report.low_water_blocks * data_block)
            ),
        ],
        vec![
            "Kept Free:".into(),
            format!(
                "{} (freed space kept for reuse)",
                format_size(report.kept_free_bytes)
            ),
        ],
        vec!["Mode:".into(), report.status.mode.clone()],
        vec!["Needs Check:".into(), report.status.needs_check.to_string()],
        vec!["Owner:".into(), owner(&report)],
    ];
    output::table(&["", ""], &[], &rows[..])?;
    Ok(ExitCode::SUCCESS)
}
