//! A thin pool owned by the kernel: dm-thin tables loaded through [`super::dm`].
//!
//! Owns the naming of a pool's device-mapper devices, the `thin-pool` and `thin` tables, the
//! pool messages and the parsing of the `thin-pool` status line. Uses [`super::dm`] for the
//! ioctls and reads our superblock (block size) before handing the devices to the kernel.
//! Invariant: while the pool device exists the kernel is the pool's one owner; it holds both
//! devices open exclusively, so our own engine cannot open them for writing at the same time.
//!
//! Names: the pool is `thinbox-<hash>-pool` and thin `N` is `thinbox-<hash>-N`, where `<hash>`
//! is 16 hex digits of a hash of the canonical metadata path, so the same pool gets the same
//! names from every process and two pools never share them.

use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::dm::{self, DevId, DmControl, DmError, TargetSpec};
use crate::error::{DeviceRole, Error, Result};
use crate::thin::files::PoolPaths;
use crate::thin::pool::{NoSpacePolicy, PoolOptions};
use crate::units::{ThinId, SECTOR_SIZE};

/// The kernel's target types.
const POOL_TARGET: &str = "thin-pool";
const THIN_TARGET: &str = "thin";

/// The `thin-pool` table's feature arguments for `options`, in the order the kernel backend
/// loads them: `skip_block_zeroing` when `!zero_new_blocks`, `no_discard_passdown` when
/// `!discard_passdown`, `read_only`, and `error_if_no_space` for [`NoSpacePolicy::Error`].
pub fn table_features(options: &PoolOptions) -> Vec<&'static str> {
    let mut features = Vec::new();
    if !options.zero_new_blocks {
        features.push("skip_block_zeroing");
    }
    if !options.discard_passdown {
        features.push("no_discard_passdown");
    }
    if options.read_only {
        features.push("read_only");
    }
    if options.no_space == NoSpacePolicy::Error {
        features.push("error_if_no_space");
    }
    features
}

/// A pool whose kernel `thin-pool` device exists.
#[derive(Debug)]
pub struct KernelPool {
    ctl: DmControl,
    /// `thinbox-<hash>`: the pool device and every thin device start with it.
    prefix: String,
    /// `thinbox-<hash>-pool`.
    name: String,
    dev: DevId,
}

/// What the kernel's `thin-pool` status line says, field by field.
///
/// The line is `<transaction id> <used>/<total metadata blocks> <used>/<total data blocks>
/// <held metadata root|-> rw|ro|out_of_data_space discard_passdown|no_discard_passdown|
/// ignore_discard error_if_no_space|queue_if_no_space needs_check|- [<metadata low
/// watermark>]` (the kernel's `thin-provisioning.rst`). A failed pool reports only `Fail`,
/// which does not parse (see [`KernelPool::status`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPoolStatus {
    pub transaction_id: u64,
    /// In 4 KiB metadata blocks.
    pub used_metadata_blocks: u64,
    pub total_metadata_blocks: u64,
    /// In data blocks.
    pub used_data_blocks: u64,
    pub total_data_blocks: u64,
    /// The metadata block of the held metadata snapshot (`reserve_metadata_snap`).
    pub held_root: Option<u64>,
    pub mode: KernelPoolMode,
    pub discards: KernelDiscards,
    /// `error_if_no_space` (else the kernel queues writes when the data device is full).
    pub error_if_no_space: bool,
    pub needs_check: bool,
    /// Free metadata blocks below which the kernel raises an event (newer kernels only).
    pub metadata_low_watermark: Option<u64>,
    /// The line as the kernel wrote it (trailing white space removed).
    pub raw: String,
}

/// The pool's live `thin-pool` table, field by field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelPoolTable {
    /// The pool's length: the data device's usable size.
    pub length_sectors: u64,
    pub metadata_dev: DevId,
    pub data_dev: DevId,
    pub data_block_sectors: u32,
    pub low_water_blocks: u64,
    /// `skip_block_zeroing`, `no_discard_passdown`, `read_only`, `error_if_no_space`, ...
    pub features: Vec<String>,
}

/// The pool's mode in its status line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPoolMode {
    /// `rw`.
    ReadWrite,
    /// `ro`: asked for, or forced by a metadata error.
    ReadOnly,
    /// `out_of_data_space`: writes that need a new block fail or queue.
    OutOfDataSpace,
}

/// How the pool handles discards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelDiscards {
    /// `discard_passdown`: freed blocks are discarded on the data device too.
    Passdown,
    /// `no_discard_passdown`: the pool unmaps, the data device is not told.
    NoPassdown,
    /// `ignore_discard`.
    Ignore,
}

impl FromStr for KernelPoolStatus {
    type Err = String;

    /// Parses a status line; the error names the field position and the token.
    fn from_str(line: &str) -> std::result::Result<Self, String> {
        let raw = line.trim_end().to_string();
        let tokens: Vec<&str> = line.split_whitespace().collect();
        let token = |i: usize, what: &str| {
            tokens
                .get(i)
                .copied()
                .ok_or_else(|| format!("field {} ({what}) is missing", i + 1))
        };
        let number = |i: usize, what: &str, text: &str| {
            text.parse::<u64>()
                .map_err(|_| format!("field {} ({what}): {text:?} is not a number", i + 1))
        };
        let fraction = |i: usize, what: &str| -> std::result::Result<(u64, u64), String> {
            let t = token(i, what)?;
            let (used, total) = t
                .split_once('/')
                .ok_or_else(|| format!("field {} ({what}): {t:?} is not used/total", i + 1))?;
            Ok((number(i, what, used)?, number(i, what, total)?))
        };
        if tokens.first() == Some(&"Fail") || tokens.first() == Some(&"Error") {
            return Err(format!("the kernel reports the pool as {:?}", tokens[0]));
        }
        let transaction_id = number(0, "transaction id", token(0, "transaction id")?)?;
        let (used_metadata_blocks, total_metadata_blocks) = fraction(1, "metadata blocks")?;
        let (used_data_blocks, total_data_blocks) = fraction(2, "data blocks")?;
        let held_root = match token(3, "held metadata root")? {
            "-" => None,
            t => Some(number(3, "held metadata root", t)?),
        };
        let mode = match token(4, "mode")? {
            "rw" => KernelPoolMode::ReadWrite,
            "ro" => KernelPoolMode::ReadOnly,
            "out_of_data_space" => KernelPoolMode::OutOfDataSpace,
            t => return Err(format!("field 5 (mode): unexpected {t:?}")),
        };
        let discards = match token(5, "discards")? {
            "discard_passdown" => KernelDiscards::Passdown,
            "no_discard_passdown" => KernelDiscards::NoPassdown,
            "ignore_discard" => KernelDiscards::Ignore,
            t => return Err(format!("field 6 (discards): unexpected {t:?}")),
        };
        let error_if_no_space = match token(6, "no-space policy")? {
            "error_if_no_space" => true,
            "queue_if_no_space" => false,
            t => return Err(format!("field 7 (no-space policy): unexpected {t:?}")),
        };
        let needs_check = match token(7, "needs_check")? {
            "needs_check" => true,
            "-" => false,
            t => return Err(format!("field 8 (needs_check): unexpected {t:?}")),
        };
        let metadata_low_watermark = match tokens.get(8) {
            None => None,
            Some(t) => Some(number(8, "metadata low watermark", t)?),
        };
        if tokens.len() > 9 {
            return Err(format!("field 10: unexpected {:?}", tokens[9]));
        }
        Ok(KernelPoolStatus {
            transaction_id,
            used_metadata_blocks,
            total_metadata_blocks,
            used_data_blocks,
            total_data_blocks,
            held_root,
            mode,
            discards,
            error_if_no_space,
            needs_check,
            metadata_low_watermark,
            raw,
        })
    }
}

impl std::fmt::Display for KernelPoolStatus {
    /// The line in the kernel's form (without its trailing space).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}/{} {}/{} ",
            self.transaction_id,
            self.used_metadata_blocks,
            self.total_metadata_blocks,
            self.used_data_blocks,
            self.total_data_blocks
        )?;
        match self.held_root {
            Some(root) => write!(f, "{root} ")?,
            None => f.write_str("- ")?,
        }
        f.write_str(match self.mode {
            KernelPoolMode::ReadWrite => "rw ",
            KernelPoolMode::ReadOnly => "ro ",
            KernelPoolMode::OutOfDataSpace => "out_of_data_space ",
        })?;
        f.write_str(match self.discards {
            KernelDiscards::Passdown => "discard_passdown ",
            KernelDiscards::NoPassdown => "no_discard_passdown ",
            KernelDiscards::Ignore => "ignore_discard ",
        })?;
        f.write_str(if self.error_if_no_space {
            "error_if_no_space "
        } else {
            "queue_if_no_space "
        })?;
        f.write_str(if self.needs_check { "needs_check" } else { "-" })?;
        if let Some(mark) = self.metadata_low_watermark {
            write!(f, " {mark}")?;
        }
        Ok(())
    }
}

/// `thinbox-<pool key>` for a canonical metadata path: the key the pool daemon's run
/// directory is named by ([`super::daemon::pool_key`]), so both name the same pool alike.
fn prefix_for(canonical_metadata: &Path) -> String {
    let paths = PoolPaths {
        metadata: canonical_metadata.to_path_buf(),
        // The key depends on the metadata path alone.
        data: PathBuf::new(),
        layout: crate::thin::files::Layout::Separate,
    };
    format!("thinbox-{}", super::daemon::pool_key(&paths))
}

/// An I/O error on `path` in `role`.
pub(super) fn io_err(role: DeviceRole, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        role,
        device: path.display().to_string(),
        offset: 0,
        source,
    }
}

/// `result`, unless `cleanup` (run after it) failed too: then the cleanup's error, or both
/// errors when `result` had failed already.
pub(super) fn after_cleanup<T>(result: Result<T>, cleanup: Result<()>) -> Result<T> {
    match (result, cleanup) {
        (result, Ok(())) => result,
        (Ok(_), Err(e)) => Err(e),
        (Err(cause), Err(cleanup)) => Err(DmError::CleanupFailed {
            cause: Box::new(cause),
            cleanup: Box::new(cleanup),
        }
        .into()),
    }
}

/// A table as one line, targets separated by `; ` (for messages).
fn describe(table: &[TargetSpec]) -> String {
    table
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

fn canonical(role: DeviceRole, path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|e| io_err(role, path, e))
}

/// Checks that `path` is a block device and returns its device number.
fn block_device(role: DeviceRole, path: &Path) -> Result<DevId> {
    let meta = std::fs::metadata(path).map_err(|e| io_err(role, path, e))?;
    if !meta.file_type().is_block_device() {
        return Err(DmError::NotBlockDevice {
            role: match role {
                DeviceRole::Metadata => "metadata device",
                DeviceRole::Data => "data device",
            },
            path: path.to_path_buf(),
        }
        .into());
    }
    let rdev = meta.rdev();
    Ok(DevId {
        major: nix::sys::stat::major(rdev) as u32,
        minor: nix::sys::stat::minor(rdev) as u32,
    })
}

/// Opens a block device read-only and exclusively, so a device that something else holds
/// (a mounted filesystem, our daemon, another pool) is refused before the kernel gets it.
fn open_exclusive(role: DeviceRole, path: &Path) -> Result<crate::io::FileDevice> {
    // FileDevice opens read-only devices shared; O_EXCL on a block device claims it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_EXCL)
        .open(path);
    match file {
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => Err(Error::Busy {
            what: format!("{role} {}", path.display()),
            holder: "it is open exclusively elsewhere (a filesystem, a pool or the daemon)".into(),
        }),
        Err(source) => Err(io_err(role, path, source)),
        Ok(claim) => {
            // The claim only has to last while we read; FileDevice reads through its own fd.
            let dev = crate::io::FileDevice::open(path, crate::io::OpenMode::ReadOnly)
                .map_err(|e| io_err(role, path, e));
            drop(claim);
            dev
        }
    }
}

/// Reads the superblock's data block size (in sectors) from the metadata device.
fn data_block_sectors(meta: &crate::io::FileDevice) -> Result<u32> {
    use crate::io::BlockDevice;
    let mut b = crate::block::zeroed();
    meta.read_at(&mut b[..], 0).map_err(|source| Error::Io {
        role: DeviceRole::Metadata,
        device: meta.describe(),
        offset: 0,
        source,
    })?;
    let sb = crate::thin::metadata::Superblock::read(&b, 0)?;
    Ok(sb.data_block_size)
}

/// Undoes a half-made device after `cause`, keeping both errors if undoing fails too.
fn roll_back(ctl: &DmControl, name: &str, cause: Error) -> Error {
    match ctl.remove(name) {
        Ok(()) | Err(DmError::NoSuchDevice(_)) => cause,
        Err(cleanup) => DmError::CleanupFailed {
            cause: Box::new(cause),
            cleanup: Box::new(cleanup.into()),
        }
        .into(),
    }
}

/// Creates `name` with `table`, resumes it and makes its node; removes it again on failure.
fn create_device(
    ctl: &DmControl,
    name: &str,
    table: &[TargetSpec],
    read_only: bool,
) -> Result<(DevId, PathBuf)> {
    ctl.create(name, None)?;
    let made = (|| -> Result<(DevId, PathBuf)> {
        ctl.load_table(name, table, read_only)?;
        let dev = ctl.resume(name)?;
        let node = dm::make_node(name, dev)?;
        Ok((dev, node))
    })();
    made.map_err(|cause| roll_back(ctl, name, cause))
}

impl KernelPool {
    /// Whether the kernel's device-mapper works here: the control node opens, DM_VERSION
    /// answers, and the kernel knows the `thin-pool` target (registered, or loadable on
    /// request).
    pub fn available() -> bool {
        let Ok(ctl) = DmControl::open() else {
            return false;
        };
        if ctl
            .list_versions()
            .is_ok_and(|v| v.iter().any(|t| t.name == POOL_TARGET))
        {
            return true;
        }
        ctl.target_version(POOL_TARGET).is_ok_and(|v| v.is_some())
    }

    /// The device-mapper name of the pool on `paths`: `thinbox-<hash>-pool`.
    ///
    /// * `Err(Io)`: the metadata path does not resolve.
    pub fn pool_name(paths: &PoolPaths) -> Result<String> {
        let meta = canonical(DeviceRole::Metadata, &paths.metadata)?;
        Ok(format!("{}-pool", prefix_for(&meta)))
    }

    /// The kernel pool on `paths`, if the kernel has one.
    ///
    /// * `Ok(None)`: no such device, or no device-mapper here at all (no control node).
    /// * `Err(InvalidArgument)`: a device of the pool's name exists but is no thin-pool.
    pub fn find(paths: &PoolPaths) -> Result<Option<KernelPool>> {
        Self::find_by_metadata(&paths.metadata)
    }

    /// [`KernelPool::find`] by the metadata device alone (all the name depends on).
    pub fn find_by_metadata(metadata: &Path) -> Result<Option<KernelPool>> {
        let meta = canonical(DeviceRole::Metadata, metadata)?;
        let prefix = prefix_for(&meta);
        let name = format!("{prefix}-pool");
        let ctl = match DmControl::open() {
            Ok(ctl) => ctl,
            Err(DmError::NoControl { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        let Some(info) = ctl.info(&name)? else {
            return Ok(None);
        };
        let table = ctl.table(&name)?;
        if info.active_table && !table.iter().all(|t| t.target_type == POOL_TARGET) {
            return Err(Error::InvalidArgument(format!(
                "device-mapper device {name} exists but is not a thin-pool (its table is {})",
                describe(&table)
            )));
        }
        if info.active_table {
            dm::make_node(&name, info.dev)?;
        }
        Ok(Some(KernelPool {
            ctl,
            prefix,
            name,
            dev: info.dev,
        }))
    }

    /// Hands the pool on `paths` to the kernel: loads `thin-pool <metadata> <data> <block
    /// sectors> <low water blocks> [features]` and resumes it, so the kernel owns the pool
    /// until [`KernelPool::stop`].
    ///
    /// The block size comes from our superblock (the metadata must hold a pool; format it with
    /// [`crate::thin::files::create`] first). The pool's length is the data device's size,
    /// rounded down to whole blocks; a larger device than the metadata records is grown into
    /// by the kernel on resume. Features from `options`: `skip_block_zeroing` when
    /// `!zero_new_blocks`, `no_discard_passdown` when `!discard_passdown`, `read_only`, and
    /// `error_if_no_space` for [`NoSpacePolicy::Error`] (the kernel's default is to queue; its
    /// queue timeout is a module parameter, not a table feature).
    ///
    /// * `Err(Dm(NotBlockDevice))`: a path is a regular file (loop attachment is
    ///   [`super::loopdev`]'s job).
    /// * `Err(Busy)`: the kernel already has this pool, or a device is held elsewhere.
    /// * `Err(Corrupt)`: the metadata holds no valid superblock.
    /// * `Err(Dm(TableRejected))`: the kernel refused the table (the kernel log says why).
    pub fn start(
        paths: &PoolPaths,
        options: &PoolOptions,
        low_water_blocks: u64,
    ) -> Result<KernelPool> {
        let meta_path = canonical(DeviceRole::Metadata, &paths.metadata)?;
        // A path that is no block device is refused before device-mapper is asked anything.
        block_device(DeviceRole::Metadata, &meta_path)?;
        block_device(DeviceRole::Data, &canonical(DeviceRole::Data, &paths.data)?)?;
        let prefix = prefix_for(&meta_path);
        let ctl = DmControl::open()?;
        Self::refuse_if_running(&ctl, &prefix, &meta_path)?;
        Self::start_named(ctl, prefix, paths, options, low_water_blocks)
    }

    fn refuse_if_running(ctl: &DmControl, prefix: &str, meta_path: &Path) -> Result<()> {
        let name = format!("{prefix}-pool");
        if ctl.info(&name)?.is_some() {
            return Err(Error::Busy {
                what: format!("pool metadata {}", meta_path.display()),
                holder: format!("the kernel (device-mapper device {name})"),
            });
        }
        Ok(())
    }

    /// The names of the `linear` devices a split pool's regions get: (metadata, data).
    fn region_names(prefix: &str) -> (String, String) {
        (format!("{prefix}-tmeta"), format!("{prefix}-tdata"))
    }

    /// The `/dev/mapper` nodes of a split pool's two regions (metadata, data); they exist
    /// only while the kernel has a pool that [`KernelPool::start_split`] started.
    pub fn region_nodes(&self) -> (PathBuf, PathBuf) {
        let (meta, data) = Self::region_names(&self.prefix);
        (dm::node_path(&meta), dm::node_path(&data))
    }

    /// Hands the pool on one block device split into a metadata and a data region
    /// ([`crate::thin::files::SplitLayout`], read from its superblock) to the kernel: a
    /// `linear` device over each region (`<prefix>-tmeta`, `<prefix>-tdata`), then the
    /// `thin-pool` on those, as [`KernelPool::start`]. The pool is named by `device`, so
    /// [`KernelPool::find_by_metadata`] of the device finds it; [`KernelPool::stop`] removes
    /// the region devices too. On failure nothing is left behind.
    ///
    /// * `Err(InvalidArgument)`: the device holds no intact superblock (the split is unknown).
    /// * the errors of [`KernelPool::start`].
    pub fn start_split(
        device: &Path,
        options: &PoolOptions,
        low_water_blocks: u64,
    ) -> Result<KernelPool> {
        let path = canonical(DeviceRole::Metadata, device)?;
        let dev = block_device(DeviceRole::Metadata, &path)?;
        let prefix = prefix_for(&path);
        let ctl = DmControl::open()?;
        Self::refuse_if_running(&ctl, &prefix, &path)?;
        let layout = {
            let whole = open_exclusive(DeviceRole::Metadata, &path)?;
            crate::thin::files::SplitLayout::read(&whole)?
        };
        let (meta_name, data_name) = Self::region_names(&prefix);
        // Region devices without their pool are left from a stop that failed half-way.
        Self::remove_region_devices(&ctl, &prefix)?;
        let ctl_for_rollback = DmControl::open()?;
        let linear = |offset: u64, len: u64| {
            [TargetSpec {
                start_sector: 0,
                length_sectors: len / SECTOR_SIZE,
                target_type: "linear".into(),
                params: format!("{dev} {}", offset / SECTOR_SIZE),
            }]
        };
        let read_only = options.read_only;
        let (_, meta_node) =
            create_device(&ctl, &meta_name, &linear(0, layout.metadata_len), read_only)?;
        let data_table = linear(layout.data_offset, layout.data_len);
        let data_node = match create_device(&ctl, &data_name, &data_table, read_only) {
            Ok((_, node)) => node,
            Err(cause) => return Err(roll_back(&ctl, &meta_name, cause)),
        };
        tracing::debug!(
            device = %path.display(),
            metadata = %meta_node.display(),
            data = %data_node.display(),
            "split device regions"
        );
        let regions = PoolPaths::separate(&meta_node, &data_node);
        Self::start_named(ctl, prefix, &regions, options, low_water_blocks).map_err(|cause| {
            let cause = roll_back(&ctl_for_rollback, &data_name, cause);
            roll_back(&ctl_for_rollback, &meta_name, cause)
        })
    }

    /// [`KernelPool::start`] under the name `<prefix>-pool`, whatever `paths` are.
    fn start_named(
        ctl: DmControl,
        prefix: String,
        paths: &PoolPaths,
        options: &PoolOptions,
        low_water_blocks: u64,
    ) -> Result<KernelPool> {
        let meta_path = canonical(DeviceRole::Metadata, &paths.metadata)?;
        let data_path = canonical(DeviceRole::Data, &paths.data)?;
        let meta_dev = block_device(DeviceRole::Metadata, &meta_path)?;
        let data_dev = block_device(DeviceRole::Data, &data_path)?;
        let name = format!("{prefix}-pool");

        let block_sectors = {
            let meta = open_exclusive(DeviceRole::Metadata, &meta_path)?;
            data_block_sectors(&meta)?
        };
        let data_sectors = {
            use crate::io::BlockDevice;
            let data = open_exclusive(DeviceRole::Data, &data_path)?;
            let sectors = data.size() / SECTOR_SIZE;
            sectors - sectors % u64::from(block_sectors)
        };
        if data_sectors == 0 {
            return Err(Error::InvalidArgument(format!(
                "data device {} is smaller than one data block ({block_sectors} sectors)",
                data_path.display()
            )));
        }

        let features = table_features(options);
        let mut params = format!(
            "{meta_dev} {data_dev} {block_sectors} {low_water_blocks} {}",
            features.len()
        );
        for f in &features {
            params.push(' ');
            params.push_str(f);
        }
        let table = [TargetSpec {
            start_sector: 0,
            length_sectors: data_sectors,
            target_type: POOL_TARGET.into(),
            params,
        }];
        tracing::debug!(pool = %name, table = %table[0], "start kernel pool");
        let (dev, _node) = create_device(&ctl, &name, &table, false)?;
        Ok(KernelPool {
            ctl,
            prefix,
            name,
            dev,
        })
    }

    /// The pool device's name, `thinbox-<hash>-pool`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool device's number.
    pub fn dev(&self) -> DevId {
        self.dev
    }

    /// `/dev/mapper/<pool name>`.
    pub fn node(&self) -> PathBuf {
        dm::node_path(&self.name)
    }

    /// The device-mapper name of thin `id`: `thinbox-<hash>-<id>`.
    pub fn thin_name(&self, id: ThinId) -> String {
        format!("{}-{}", self.prefix, id.get())
    }

    /// `/dev/mapper/<thin name>`.
    pub fn thin_path(&self, id: ThinId) -> PathBuf {
        dm::node_path(&self.thin_name(id))
    }

    /// Sends a pool message: `create_thin <id>`, `create_snap <id> <origin id>`,
    /// `delete <id>`, `set_transaction_id <old> <new>`, `reserve_metadata_snap`,
    /// `release_metadata_snap`. The kernel commits before it answers.
    ///
    /// * `Err(Dm(MessageFailed))`: the pool refused it (an existing id, a wrong old
    ///   transaction id, a held snapshot, ...; the kernel log says which).
    pub fn message(&self, text: &str) -> Result<()> {
        self.ctl.message(&self.name, 0, text)?;
        Ok(())
    }

    /// `create_snap id origin`, with the origin suspended around it if it is active, as the
    /// kernel requires (its in-flight writes must reach the pool before the snapshot).
    pub fn create_snap(&self, id: ThinId, origin: ThinId) -> Result<()> {
        let origin_name = self.thin_name(origin);
        let suspend = self
            .ctl
            .info(&origin_name)?
            .is_some_and(|i| i.active_table && !i.suspended);
        if suspend {
            self.ctl.suspend(&origin_name)?;
        }
        let sent = self.message(&format!("create_snap {} {}", id.get(), origin.get()));
        if !suspend {
            return sent;
        }
        let resumed = self.ctl.resume(&origin_name).map(drop).map_err(Error::from);
        after_cleanup(sent, resumed)
    }

    /// The pool's status line, parsed.
    ///
    /// * `Err(Dm(BadStatus))`: the kernel reports the pool as failed (`Fail`), or the line
    ///   does not parse; the error quotes the line.
    pub fn status(&self) -> Result<KernelPoolStatus> {
        let targets = self.ctl.status(&self.name)?;
        let bad = |line: &str, reason: String| DmError::BadStatus {
            target: POOL_TARGET,
            device: self.name.clone(),
            line: line.to_string(),
            reason,
        };
        let [target] = &targets[..] else {
            return Err(bad("", format!("{} targets, expected one", targets.len())).into());
        };
        if target.target_type != POOL_TARGET {
            return Err(bad(
                &target.params,
                format!("the target is {:?}", target.target_type),
            )
            .into());
        }
        target
            .params
            .parse()
            .map_err(|reason| bad(&target.params, reason).into())
    }

    /// Activates thin `id` as `/dev/mapper/thinbox-<hash>-<id>` with `size_bytes` (a whole
    /// number of sectors) and returns the node's path. A thin that is already active is left
    /// as it is and its path returned.
    ///
    /// * `Err(InvalidArgument)`: the size is 0 or not a multiple of 512, or a device of the
    ///   thin's name exists with another table.
    /// * `Err(Dm(TableRejected))`: the kernel refused (most often: no thin `id` in the pool).
    pub fn activate(&self, id: ThinId, size_bytes: u64, read_only: bool) -> Result<PathBuf> {
        if size_bytes == 0 || !size_bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(Error::InvalidArgument(format!(
                "thin device size {size_bytes} is not a positive multiple of {SECTOR_SIZE} bytes"
            )));
        }
        let name = self.thin_name(id);
        let params = format!("{} {}", self.dev, id.get());
        if let Some(info) = self.ctl.info(&name)? {
            let table = self.ctl.table(&name)?;
            let ours =
                matches!(&table[..], [t] if t.target_type == THIN_TARGET && t.params == params);
            if !ours {
                return Err(Error::InvalidArgument(format!(
                    "device-mapper device {name} exists but is not thin {id} of {} \
                     (its table is {})",
                    self.name,
                    describe(&table)
                )));
            }
            return Ok(dm::make_node(&name, info.dev)?);
        }
        let table = [TargetSpec {
            start_sector: 0,
            length_sectors: size_bytes / SECTOR_SIZE,
            target_type: THIN_TARGET.into(),
            params,
        }];
        tracing::debug!(thin = %name, table = %table[0], read_only, "activate thin");
        let (_dev, node) = create_device(&self.ctl, &name, &table, read_only)?;
        Ok(node)
    }

    /// Removes thin `id`'s device (not the thin: its blocks stay in the pool). A thin that is
    /// not active is not an error.
    ///
    /// * `Err(Busy)`: the device is open (a mount, a process); the error names the device.
    ///   With `deferred`, an open device is instead removed when its last opener closes it,
    ///   and this returns `Ok`.
    pub fn deactivate(&self, id: ThinId, deferred: bool) -> Result<()> {
        let name = self.thin_name(id);
        let removed = if deferred {
            self.ctl.remove_deferred(&name).map(drop)
        } else {
            self.ctl.remove(&name)
        };
        match removed {
            Ok(()) | Err(DmError::NoSuchDevice(_)) => Ok(()),
            Err(DmError::DeviceBusy { device, open_count }) => Err(Error::Busy {
                what: format!("thin device {id} ({})", dm::node_path(&device).display()),
                holder: format!("it is open (open count {open_count})"),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// What device-mapper says about thin `id`'s device; `None` when it is not active.
    pub fn thin_info(&self, id: ThinId) -> Result<Option<dm::DeviceInfo>> {
        Ok(self.ctl.info(&self.thin_name(id))?)
    }

    /// The sectors thin `id` maps, from its `thin` status line (`<mapped sectors> <highest
    /// mapped sector>`); `None` when the thin is not active.
    ///
    /// * `Err(Dm(BadStatus))`: the thin reports `Fail`, or the line does not parse.
    pub fn thin_mapped_sectors(&self, id: ThinId) -> Result<Option<u64>> {
        let name = self.thin_name(id);
        let targets = match self.ctl.status(&name) {
            Ok(t) => t,
            Err(DmError::NoSuchDevice(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let bad = |line: &str, reason: &str| DmError::BadStatus {
            target: THIN_TARGET,
            device: name.clone(),
            line: line.to_string(),
            reason: reason.to_string(),
        };
        let [target] = &targets[..] else {
            // Created but never resumed: no live table, nothing mapped through it.
            return Ok(None);
        };
        let first = target.params.split_whitespace().next().unwrap_or("");
        first
            .parse::<u64>()
            .map(Some)
            .map_err(|_| bad(&target.params, "field 1 (mapped sectors) is not a number").into())
    }

    /// The pool's live table: `thin-pool <metadata dev> <data dev> <block sectors> <low water
    /// blocks> [<#features> <feature>...]`.
    pub fn table(&self) -> Result<KernelPoolTable> {
        let table = self.ctl.table(&self.name)?;
        let bad = |reason: String| -> Error {
            DmError::BadStatus {
                target: POOL_TARGET,
                device: self.name.clone(),
                line: describe(&table),
                reason,
            }
            .into()
        };
        let [t] = &table[..] else {
            return Err(bad(format!("{} targets, expected one", table.len())));
        };
        let p: Vec<&str> = t.params.split_whitespace().collect();
        if p.len() < 4 {
            return Err(bad("fewer than 4 thin-pool arguments".into()));
        }
        let dev = |i: usize| -> Result<DevId> {
            p[i].split_once(':')
                .and_then(|(a, b)| {
                    Some(DevId {
                        major: a.parse().ok()?,
                        minor: b.parse().ok()?,
                    })
                })
                .ok_or_else(|| {
                    bad(format!(
                        "argument {} ({:?}) is not major:minor",
                        i + 1,
                        p[i]
                    ))
                })
        };
        let number = |i: usize| -> Result<u64> {
            p[i].parse()
                .map_err(|_| bad(format!("argument {} ({:?}) is not a number", i + 1, p[i])))
        };
        Ok(KernelPoolTable {
            length_sectors: t.length_sectors,
            metadata_dev: dev(0)?,
            data_dev: dev(1)?,
            data_block_sectors: number(2)? as u32,
            low_water_blocks: number(3)?,
            features: p.iter().skip(5).map(|f| f.to_string()).collect(),
        })
    }

    /// Reloads the pool's table with a data length of `data_sectors` (suspend, load,
    /// resume): the kernel then grows into a larger data device, and into a larger metadata
    /// device if that grew too. The pool is resumed even when the load fails.
    ///
    /// * `Err(Dm(TableRejected))`: the kernel refused (a shrink, or a length past the data
    ///   device's end).
    pub fn reload(&self, data_sectors: u64) -> Result<()> {
        let mut table = self.ctl.table(&self.name)?;
        let [t] = &mut table[..] else {
            return Err(Error::InvalidArgument(format!(
                "kernel pool {} has {} targets, expected one",
                self.name,
                table.len()
            )));
        };
        t.length_sectors = data_sectors;
        tracing::debug!(pool = %self.name, table = %t, "reload kernel pool");
        self.ctl.suspend(&self.name)?;
        let loaded = self.ctl.load_table(&self.name, &table, false);
        let resumed = self.ctl.resume(&self.name).map(drop).map_err(Error::from);
        after_cleanup(loaded.map(drop).map_err(Error::from), resumed)
    }

    /// The ids of this pool's thins that have a device (including ones whose deferred
    /// removal waits for their last opener), in order.
    pub fn active_thins(&self) -> Result<Vec<ThinId>> {
        let lead = format!("{}-", self.prefix);
        let mut ids: Vec<ThinId> = self
            .ctl
            .list()?
            .into_iter()
            .filter_map(|(name, _)| {
                let n = name.strip_prefix(&lead)?;
                if !n.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                ThinId::new(n.parse().ok()?)
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Removes the pool device; the kernel commits the metadata as it goes, and the devices
    /// are free for another owner afterwards.
    ///
    /// * `Err(Busy)`: thins are still active (deactivate them first), or the pool device is
    ///   open. The pool is left running; [`KernelPool::find`] gets it back.
    pub fn stop(self) -> Result<()> {
        self.remove()
    }

    /// [`KernelPool::stop`] for an owner that cannot give the pool up by value; the pool must
    /// not be used afterwards.
    pub(super) fn remove(&self) -> Result<()> {
        let active = self.active_thins()?;
        if !active.is_empty() {
            return Err(Error::Busy {
                what: format!("kernel pool {}", self.name),
                holder: format!(
                    "thin devices {} are active",
                    active
                        .iter()
                        .map(|id| id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        // A thin whose deferred remove has just run leaves the kernel's name table before its
        // live table lets go of the pool (the table is destroyed after unhashing), so the pool
        // can look open for a moment after the last thin is gone. Retry for about a second,
        // as libdevmapper's dm_task_retry_remove does, before calling it busy.
        let mut tries = 0;
        let removed = loop {
            match self.ctl.remove(&self.name) {
                Err(DmError::DeviceBusy { .. }) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other,
            }
        };
        match removed {
            Ok(()) => {
                tracing::debug!(pool = %self.name, "stopped kernel pool");
                self.remove_regions()
            }
            Err(DmError::DeviceBusy { device, open_count }) => Err(Error::Busy {
                what: format!("kernel pool {device}"),
                holder: format!("it is open (open count {open_count})"),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the `linear` devices of a split pool's regions, if it has them (after the
    /// pool itself, which holds them).
    fn remove_regions(&self) -> Result<()> {
        Self::remove_region_devices(&self.ctl, &self.prefix)
    }

    fn remove_region_devices(ctl: &DmControl, prefix: &str) -> Result<()> {
        let (meta, data) = Self::region_names(prefix);
        for name in [data, meta] {
            match ctl.remove(&name) {
                Ok(()) | Err(DmError::NoSuchDevice(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "5 141/1024 60/1024 - rw discard_passdown queue_if_no_space - 1024 ";

    #[test]
    fn pool_status_line_parses_and_round_trips() {
        let s: KernelPoolStatus = LINE.parse().unwrap();
        assert_eq!(s.transaction_id, 5);
        assert_eq!(
            (s.used_metadata_blocks, s.total_metadata_blocks),
            (141, 1024)
        );
        assert_eq!((s.used_data_blocks, s.total_data_blocks), (60, 1024));
        assert_eq!(s.held_root, None);
        assert_eq!(s.mode, KernelPoolMode::ReadWrite);
        assert_eq!(s.discards, KernelDiscards::Passdown);
        assert!(!s.error_if_no_space && !s.needs_check);
        assert_eq!(s.metadata_low_watermark, Some(1024));
        assert_eq!(s.raw, LINE.trim_end());
        assert_eq!(s.to_string(), s.raw);

        let held = "7 200/1024 61/1024 177 ro no_discard_passdown error_if_no_space needs_check";
        let s: KernelPoolStatus = held.parse().unwrap();
        assert_eq!(s.held_root, Some(177));
        assert_eq!(s.mode, KernelPoolMode::ReadOnly);
        assert!(s.error_if_no_space && s.needs_check);
        assert_eq!(s.metadata_low_watermark, None);
        assert_eq!(s.to_string(), held);
    }

    #[test]
    fn bad_pool_status_names_the_field_and_token() {
        let e = "5 141/1024 60-1024 - rw"
            .parse::<KernelPoolStatus>()
            .unwrap_err();
        assert!(e.contains("field 3") && e.contains("60-1024"), "{e}");
        let e = "5 1/2 3/4 - sideways discard_passdown queue_if_no_space -"
            .parse::<KernelPoolStatus>()
            .unwrap_err();
        assert!(e.contains("field 5") && e.contains("sideways"), "{e}");
        let e = "Fail".parse::<KernelPoolStatus>().unwrap_err();
        assert!(e.contains("Fail"), "{e}");
        assert!("".parse::<KernelPoolStatus>().is_err());
    }

    #[test]
    fn names_are_stable_and_per_metadata_path() {
        let a = prefix_for(Path::new("/dev/vda"));
        assert_eq!(a, prefix_for(Path::new("/dev/vda")));
        assert_ne!(a, prefix_for(Path::new("/dev/vdb")));
        assert_eq!(a.len(), "thinbox-".len() + 16);
        // Pinned: a name that changed between releases would lose track of running pools.
        // (FNV-1a of the path; `daemon::pool_key` owns the hash.)
        assert_eq!(a, "thinbox-838b248234b407af");
        dm::validate_name(&format!("{a}-pool")).unwrap();
        dm::validate_name(&format!("{a}-16777215")).unwrap();
    }

    #[test]
    fn regular_files_are_refused_by_start() {
        let dir = tempfile::tempdir().unwrap();
        let paths = PoolPaths::in_dir(dir.path());
        std::fs::write(&paths.metadata, [0u8; 4096]).unwrap();
        std::fs::write(&paths.data, [0u8; 4096]).unwrap();
        let e = KernelPool::start(&paths, &PoolOptions::default(), 0).unwrap_err();
        assert!(
            matches!(e, Error::Dm(DmError::NotBlockDevice { .. })),
            "{e}"
        );
        assert!(e.to_string().contains("metadata"), "{e}");
    }
}
