//! The command line: top-level parser, the pool location every pool verb takes, and the
//! value parsers for sizes and ids.

use std::path::{Path, PathBuf};

use clap::{ArgAction, Parser, Subcommand};
use engine::store::{VolumeStore, STORE_FILE_NAME};
use engine::units::{parse_size, MAX_THIN_ID};
use engine::{DataBlockSize, PoolPaths, ThinId};

use crate::commands::{
    activate, check, daemon, dump, pool, repair, restore, serve, thin, thin_io, trim, trim_journal,
};
use crate::commands::{delta, links, ls, metadata_size, rmap};

/// Admin tool for thinbox pools: create pools and thins, move data in and out, and check and
/// dump metadata like thin-provisioning-tools.
#[derive(Debug, Parser)]
#[command(name = "dmtool", version, propagate_version = true)]
#[command(after_help = "Example: dmtool pool create --pool /srv/pool --data-size 10G")]
pub struct Cli {
    /// More diagnostics on stderr: -v info, -vv debug, -vvv trace (RUST_LOG overrides)
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a pool or show its status
    #[command(subcommand)]
    #[command(after_help = "Example: dmtool pool status --pool /srv/pool")]
    Pool(PoolCommand),
    /// Create, snapshot, delete, list, read and write thin devices
    #[command(subcommand)]
    #[command(after_help = "Example: dmtool thin ls --pool /srv/pool")]
    Thin(ThinCommand),
    /// Check pool metadata offline, like thin_check
    #[command(
        after_help = "Exit status: 0 clean, 1 damage found or the check failed, 2 usage.\n\n\
                      Example: dmtool check --clear-needs-check-flag /srv/pool/metadata"
    )]
    Check(check::Args),
    /// Print pool metadata as XML or human-readable text, like thin_dump
    #[command(after_help = "Example: dmtool dump --format human_readable /srv/pool/metadata")]
    Dump(dump::Args),
    /// Write a fresh pool's metadata from thin_dump XML, like thin_restore
    #[command(after_help = "Example: dmtool restore -i pool.xml -o /srv/pool/metadata")]
    Restore(restore::Args),
    /// Rebuild usable metadata from a damaged metadata device, like thin_repair
    ///
    /// Every mapping reachable through intact nodes is kept; subtrees cut off by a broken
    /// node are found by scanning the whole device and put back where the old space map
    /// vouches for them. The space maps are recomputed. The input is only read; copy the
    /// output over it (or point the pool at it) once it checks clean.
    #[command(
        after_help = "Example: dmtool repair -i /srv/pool/metadata -o /srv/meta.new \
                            && dmtool check /srv/meta.new\n\
                            Without a superblock: dmtool repair -i broken.meta -o new.meta \
                            --data-block-size 64k"
    )]
    Repair(repair::Args),
    /// Discard the data blocks the pool does not use, like thin_trim
    ///
    /// Every run of free blocks in the data space map is discarded on the data device (a
    /// hole punched in a data file, BLKDISCARD on a block device). The metadata is checked
    /// first and trim refuses damaged metadata. The pool must be offline.
    #[command(after_help = "Example: dmtool trim --pool /srv/pool\n\
                            Example: dmtool trim --metadata /dev/vg/meta --data /dev/vg/data\n\
                            Example: dmtool trim --device /dev/sdb (only its data region)")]
    Trim(trim::Args),
    /// Export thins over NBD (newstyle); runs until SIGTERM or SIGINT, then commits
    #[command(after_help = "Example: dmtool serve --pool /srv/pool --nbd unix:/run/pool.sock 1")]
    Serve(serve::Args),

    // thin-provisioning-tools' reports and the links that give dmtool their names.
    /// List thins with their mapped, exclusive and shared space, like thin_ls
    ///
    /// Prints what thin_ls 0.9.0 prints for the same metadata. A block is exclusive to a
    /// thin when no other mapping (of any thin) names it; shared = mapped - exclusive.
    #[command(
        after_help = "Exit status: 0 ok, 1 the metadata could not be read, 2 usage.\n\n\
                      Example: dmtool ls -o DEV,MAPPED,EXCLUSIVE,SHARED /srv/pool/metadata"
    )]
    Ls(ls::Args),
    /// Show how two thins' mappings differ, like thin_delta
    ///
    /// Prints thin_delta 0.9.0's XML for the same metadata. The global -v/--verbose is
    /// thin_delta's --verbose here: every range with its data blocks.
    #[command(
        after_help = "Exit status: 0 ok, 1 a thin is missing or the metadata could not be \
                      read, 2 usage.\n\n\
                      Example: dmtool delta --thin1 1 --thin2 2 --verbose /srv/pool/metadata"
    )]
    Delta(delta::Args),
    /// Show which thins map given data blocks, like thin_rmap
    #[command(
        after_help = "Exit status: 0 ok, 1 the metadata could not be read, 2 usage.\n\n\
                      Example: dmtool rmap --region 0..1024 /srv/pool/metadata"
    )]
    Rmap(rmap::Args),
    /// Estimate the metadata size a pool needs, like thin_metadata_size (-h for options)
    #[command(
        after_help = "Example: dmtool metadata-size -b 64k -s 1t -m 1000 -u m",
        disable_help_flag = true
    )]
    MetadataSize(metadata_size::Args),
    /// Make thin_check, thin_dump, ... symlinks to dmtool in DIR
    ///
    /// Run through a link named after a thin-provisioning-tools program, dmtool runs its verb
    /// of that name with that program's options: thin_check, thin_dump, thin_restore,
    /// thin_ls, thin_delta, thin_rmap, thin_metadata_size. Usage errors exit 2, not 1.
    #[command(after_help = "Example: dmtool links /usr/local/sbin")]
    Links(links::Args),
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Format a new pool (sparse files are created as needed)
    ///
    /// With --device, one device (or file) holds the whole pool: the first --metadata-size
    /// bytes are the metadata region, the rest from the next data block boundary is the data
    /// region. The split is read back from the pool's superblock whenever the pool is
    /// opened; every verb then takes the same --device.
    #[command(
        after_help = "Example: dmtool pool create --pool /srv/pool --data-size 10G \
                            --metadata-size 256M --block-size 64k\n\
                      Example: dmtool pool create --device /dev/sdb --metadata-size 1G \
                            --state-dir /var/lib/dmtool/sdb"
    )]
    Create(pool::CreateArgs),
    /// Show the kernel status line and space usage
    #[command(after_help = "Example: dmtool pool status --pool /srv/pool --json")]
    Status(pool::StatusArgs),
    /// Grow the data and/or metadata space (a file is extended sparse; pools never shrink)
    #[command(after_help = "Example: dmtool pool resize --pool /srv/pool --data-size 200G")]
    Resize(pool::ResizeArgs),
    /// Change the pool's table options: low-water mark, what happens when it is full, zeroing
    ///
    /// dm-thin keeps these in the pool's table, not in its metadata; they are kept in the
    /// volume store and used whenever the pool is opened, served by its daemon or handed to
    /// the kernel (as low_water_mark, error_if_no_space, skip_block_zeroing). Refused while
    /// the pool has an owner; `pool status` shows them.
    #[command(
        after_help = "Example: dmtool pool set --pool /srv/pool --low-water-mark 1G \
                            --when-full queue --zeroing off"
    )]
    Set(pool::SetArgs),
    /// Hand the pool to an owner that keeps it while its thins are active
    ///
    /// The owner is the kernel's device-mapper where it works (loop devices are attached to
    /// regular files), else the userspace pool daemon. Every other verb then goes through the
    /// owner instead of opening the pool itself. `thin activate` starts one when none runs.
    #[command(after_help = "Example: dmtool pool start --pool /srv/pool --backend kernel")]
    Start(daemon::StartArgs),
    /// Take the pool back from its owner: deactivate every thin, commit, release the pool
    #[command(after_help = "Example: dmtool pool stop --pool /srv/pool")]
    Stop(daemon::StopArgs),
}

#[derive(Debug, Subcommand)]
pub enum ThinCommand {
    /// Create a thin device
    #[command(
        after_help = "Example: dmtool thin create --pool /srv/pool 1 --size 10G --name base"
    )]
    Create(thin::CreateArgs),
    /// Snapshot a thin device (the snapshot has the origin's size)
    #[command(after_help = "Example: dmtool thin snap --pool /srv/pool 2 1 --name base-snap")]
    Snap(thin::SnapArgs),
    /// Delete a thin device
    #[command(after_help = "Example: dmtool thin delete --pool /srv/pool 2")]
    Delete(thin::DeleteArgs),
    /// Name a thin, or rename it (names live in the volume store beside the pool)
    ///
    /// The change is atomic (the store is replaced in one rename) and goes through the
    /// pool's owner when one runs. A name another thin has is refused.
    #[command(after_help = "Example: dmtool thin rename --pool /srv/pool 1 base-v2")]
    Rename(thin::RenameArgs),
    /// Copy stdin (or --input FILE) into a thin device
    ///
    /// Input that would go past the thin's end is refused; with a file this is known before
    /// anything is written, with a stream what came before that point stays written.
    #[command(after_help = "Example: dmtool thin write --pool /srv/pool 1 --offset 1M < disk.img")]
    Write(thin_io::WriteArgs),
    /// Copy a thin device (or part of it) to stdout
    #[command(after_help = "Example: dmtool thin read --pool /srv/pool 1 --length 4k | xxd")]
    Read(thin_io::ReadArgs),
    /// Copy a raw or sparse image file into a thin, keeping holes unmapped
    ///
    /// Only the file's data extents are read (SEEK_DATA/SEEK_HOLE); the thin's ranges that
    /// are holes in the file, and whole blocks of zeros, are discarded instead of written,
    /// so they use no pool space. The thin past the file's end is left as it was.
    #[command(after_help = "Example: dmtool thin import --pool /srv/pool 1 --input disk.img")]
    Import(thin_io::ImportArgs),
    /// Copy a thin into an image file, leaving unmapped and zero ranges as holes
    #[command(after_help = "Example: dmtool thin export --pool /srv/pool 1 --output disk.img")]
    Export(thin_io::ExportArgs),
    /// Give the journal log of a thin's unmounted ext4 back to the pool
    ///
    /// A cleanly unmounted ext4's journal log holds nothing the next mount reads, yet stays
    /// mapped: every snapshot then copies it chunk by chunk as it logs. This discards the
    /// log's whole pool blocks (never the journal superblock's), as thinbox does to each
    /// image layer. A file system that needs recovery, has no internal journal or is not ext4
    /// is left as it is; an active thin is refused.
    #[command(after_help = "Example: dmtool thin trim-journal --pool /srv/pool 1")]
    TrimJournal(trim_journal::Args),
    /// List thin devices: id, name, size, mapped space, origin, block device
    ///
    /// EXCLUSIVE is the space of blocks no other thin maps, SHARED the rest of MAPPED, as
    /// thin_ls counts them (see `dmtool ls` for thin_ls's own table).
    #[command(after_help = "Example: dmtool thin ls --pool /srv/pool --json")]
    Ls(thin::LsArgs),
    /// Make a thin a block device and print its path (starts an owner if needed)
    ///
    /// In the kernel the thin is a device-mapper `thin` device (/dev/mapper/...); with the
    /// userspace daemon it is served as a file over FUSE, with a loop device on top.
    #[command(after_help = "Example: mkfs.ext4 $(dmtool thin activate --pool /srv/pool 1)")]
    Activate(activate::ActivateArgs),
    /// Remove a thin's block device; refused while it is mounted or open, unless --deferred
    #[command(after_help = "Example: dmtool thin deactivate --pool /srv/pool 1 --deferred")]
    Deactivate(activate::DeactivateArgs),
}

/// Where a pool is: a directory, two named devices, or one device split into a metadata
/// region and a data region; plus a state directory for the volume store (thin sizes and
/// names, which dm-thin metadata does not hold).
#[derive(Clone, Debug, clap::Args)]
pub struct PoolLocation {
    /// Pool directory holding `metadata`, `data` and `volumes.json`
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present_any = ["metadata", "device"],
        conflicts_with_all = ["metadata", "data", "device"]
    )]
    pub pool: Option<PathBuf>,

    /// Metadata device or file (with --data, instead of --pool)
    #[arg(long, alias = "metadata-dev", value_name = "DEV", requires = "data")]
    pub metadata: Option<PathBuf>,

    /// Data device or file (with --metadata)
    #[arg(long, alias = "data-dev", value_name = "DEV", requires = "metadata")]
    pub data: Option<PathBuf>,

    /// One device or file holding the whole pool: metadata first (the size `pool create
    /// --metadata-size` gave it), then data
    #[arg(long, value_name = "DEV", conflicts_with_all = ["metadata", "data"])]
    pub device: Option<PathBuf>,

    /// Directory for the volume store (volumes.json) [default: the --pool directory, or
    /// /var/lib/dmtool/<device or metadata path with / replaced by _> otherwise]
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

/// Where the volume store of a pool on named devices lives when `--state-dir` is not given.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/dmtool";

impl PoolLocation {
    pub fn paths(&self) -> PoolPaths {
        match (&self.pool, &self.device, &self.metadata, &self.data) {
            (Some(dir), _, _, _) => PoolPaths::in_dir(dir),
            (None, Some(device), _, _) => PoolPaths::split(device),
            (None, None, Some(metadata), Some(data)) => PoolPaths::separate(metadata, data),
            // clap's required_unless_present_any / requires / conflicts rule this out.
            _ => unreachable!("clap requires --pool, --device or both --metadata and --data"),
        }
    }

    /// The volume store's file.
    pub fn store_path(&self) -> PathBuf {
        if let Some(dir) = &self.state_dir {
            return dir.join(STORE_FILE_NAME);
        }
        match &self.pool {
            Some(dir) => VolumeStore::path_in(dir),
            None => default_state_dir(&self.paths().metadata).join(STORE_FILE_NAME),
        }
    }

    /// Whether the pool is one device split into metadata and data (`--device`).
    pub fn is_split(&self) -> bool {
        self.device.is_some()
    }

    /// The name errors use for the pool: its metadata path (the device, when split).
    pub fn name(&self) -> String {
        self.paths().metadata.display().to_string()
    }
}

/// `/var/lib/dmtool/<absolute metadata path with / replaced by _>`. Symlinks are not
/// resolved: `/dev/vg/meta` keeps its name across reboots, the `/dev/dm-N` behind it may not.
pub fn default_state_dir(metadata: &Path) -> PathBuf {
    let abs = std::path::absolute(metadata).unwrap_or_else(|_| metadata.to_path_buf());
    let flat = abs.to_string_lossy().replace('/', "_");
    Path::new(DEFAULT_STATE_ROOT).join(flat)
}

/// A metadata path as the offline tools take it: a pool directory means `DIR/metadata`.
pub fn metadata_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("metadata")
    } else {
        path.to_path_buf()
    }
}

/// A byte count with an optional k, M, G, T (binary) suffix.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    parse_size(text).ok_or_else(|| {
        format!("{text:?} is not a size (a number with an optional k, M, G or T suffix)")
    })
}

/// A data block size: 64k to 1G, a multiple of 64k.
pub fn parse_block_size(text: &str) -> Result<DataBlockSize, String> {
    let bytes = parse_bytes(text)?;
    DataBlockSize::from_bytes(bytes)
        .ok_or_else(|| format!("{text:?} is not a data block size (64k to 1G, a multiple of 64k)"))
}

/// A thin id: 0 to 16777215.
pub fn parse_thin_id(text: &str) -> Result<ThinId, String> {
    text.parse::<u64>()
        .ok()
        .and_then(ThinId::new)
        .ok_or_else(|| format!("{text:?} is not a thin id (0 to {MAX_THIN_ID})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn state_dir_flattens_the_metadata_path() {
        assert_eq!(
            default_state_dir(Path::new("/dev/vg/meta")),
            Path::new("/var/lib/dmtool/_dev_vg_meta")
        );
    }
}
