//! `info`: the storage driver's state, with Docker's field names (devicemapper's pool
//! figures, or overlay2's backing filesystem).

use std::process::ExitCode;

use engine::activate::PoolControl;
use serde_json::json;

use super::format::{human_size, render};
use crate::cli::Global;
use crate::storage::{DeviceMapper, Filesystem, Overlay, Storage};
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// `json` or a template (`{{.Driver}}`, `{{json .DriverStatus}}`)
    #[arg(short, long)]
    pub format: Option<String>,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let storage = Storage::open(global)?;
    let store = Store::load(&global.root)?;
    let fields = match &storage {
        Storage::DeviceMapper(dm) => devicemapper_fields(dm)?,
        Storage::Overlay(o) => overlay_fields(o),
    };
    let driver = storage.kind().name();
    let value = json!({
        "Driver": driver,
        "DriverStatus": fields.iter().map(|(k, v)| [k.to_string(), v.clone()]).collect::<Vec<_>>(),
        "Images": store.images.len(),
        "DockerRootDir": global.root.display().to_string(),
    });
    match &args.format {
        Some(template) => println!("{}", render(template, &value)?),
        None => {
            println!("Images: {}", store.images.len());
            println!("Storage Driver: {driver}");
            for (k, v) in &fields {
                println!(" {k}: {v}");
            }
            println!("Thinbox Root Dir: {}", global.root.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// overlay2's lines: what the layers' directories sit on.
fn overlay_fields(o: &Overlay) -> Vec<(&'static str, String)> {
    let backing = nix::sys::statfs::statfs(o.dir()).map_or("unknown".to_string(), |s| {
        match s.filesystem_type() {
            nix::sys::statfs::EXT4_SUPER_MAGIC => "extfs".to_string(),
            nix::sys::statfs::XFS_SUPER_MAGIC => "xfs".to_string(),
            nix::sys::statfs::BTRFS_SUPER_MAGIC => "btrfs".to_string(),
            nix::sys::statfs::TMPFS_MAGIC => "tmpfs".to_string(),
            other => format!("{other:?}"),
        }
    });
    vec![
        ("Backing Filesystem", backing),
        ("Supports d_type", "true".to_string()),
        ("Using metacopy", "false".to_string()),
        ("Native Overlay Diff", "true".to_string()),
    ]
}

/// devicemapper's lines: the pool's space, as Docker shows it.
fn devicemapper_fields(storage: &DeviceMapper) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut client = storage.control()?;
    let status = client.status()?.status;
    let options = storage.options();
    let block = u64::from(status.data_block_sectors) * 512;
    let meta_block = 4096u64;
    let data_total = status.total_data_blocks * block;
    let data_used = status.used_data_blocks * block;
    let mut data_free = data_total - data_used;
    // A sparse data file can only grow as far as its filesystem lets it (Docker says the
    // same for loop files).
    if let Ok(fs) = nix::sys::statvfs::statvfs(&storage.paths().data) {
        data_free = data_free.min(fs.blocks_available() * fs.fragment_size());
    }
    let meta_total = status.total_metadata_blocks * meta_block;
    let meta_used = status.used_metadata_blocks * meta_block;
    let backing = match options.fs {
        Filesystem::Ext4 => "extfs",
        Filesystem::Xfs => "xfs",
    };
    let fields: Vec<(&'static str, String)> = vec![
        ("Pool Name", storage.pool_name()),
        ("Pool Blocksize", human_size(block)),
        ("Base Device Size", human_size(options.base_size)),
        ("Backing Filesystem", backing.to_string()),
        ("Data file", storage.paths().data.display().to_string()),
        (
            "Metadata file",
            storage.paths().metadata.display().to_string(),
        ),
        ("Data Space Used", human_size(data_used)),
        ("Data Space Total", human_size(data_total)),
        ("Data Space Available", human_size(data_free)),
        ("Metadata Space Used", human_size(meta_used)),
        ("Metadata Space Total", human_size(meta_total)),
        (
            "Metadata Space Available",
            human_size(meta_total - meta_used),
        ),
        (
            "Thin Pool Minimum Free Space",
            human_size(data_total * u64::from(options.min_free_space_percent) / 100),
        ),
        ("Deferred Removal Enabled", "true".to_string()),
        ("Deferred Deletion Enabled", "false".to_string()),
        ("Deferred Deleted Device Count", "0".to_string()),
    ];
    Ok(fields)
}
