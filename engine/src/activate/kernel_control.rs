//! [`PoolControl`] for a pool the kernel owns: [`KernelPool`] plus the pool's volume store.
//!
//! Owns the volume-store protocol on the kernel path, the reading of thin ids and mapping
//! counts through a held metadata snapshot, byte IO on `/dev/mapper` nodes, and the loop
//! devices a pool on regular files needs. Uses [`super::kernel`] for every DM ioctl and
//! [`crate::tools::dump::device_details`] to read metadata. Invariant: nothing here opens the
//! pool with our engine while the kernel has it; the kernel is the one owner.
//!
//! # The volume store on the kernel path
//!
//! Our engine makes a change and its new transaction id one commit. The kernel commits after
//! every pool message, so a change is three durable steps, each of which a crash may follow:
//! 1. the store records the intent at the pool's transaction id `n`;
//! 2. the pool message (`create_thin`, `create_snap`, `delete`);
//! 3. `set_transaction_id n n+1`;
//! 4. the store applies the change at `n + 1`.
//!
//! The next open (by this module or by our engine, [`crate::store`]) reconciles: a pool at
//! `n + 1` completed the change; a pool at `n` whose thin exists (create) or is gone (delete)
//! crashed between 2 and 3, and the change is applied too; otherwise it never happened and
//! the intent is dropped. A refused message changes nothing and the intent is dropped at once.
//!
//! # Reading the metadata while the kernel owns it
//!
//! Thin ids and the mapping counts of inactive thins are not in any status line. They are read
//! as the kernel's `thin-provisioning.rst` allows: `reserve_metadata_snap` (which commits
//! first), read the device-details tree through the held root with our read-only reader,
//! `release_metadata_snap`. The kernel writes metadata around the page cache, so the page
//! cache of the metadata device is dropped before reading. If someone else already holds a
//! snapshot, the live trees of the last commit are read instead; a commit racing that read
//! can make it fail, never silently wrong (every block is checksummed and knows its place).
//! Active thins report their mapped sectors in their own status line, which is current to
//! the last IO rather than the last commit, and is preferred.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::control::{Activation, ControlStatus, PoolControl, ThinInfo};
use super::dm::DmError;
use super::kernel::{
    after_cleanup, io_err, KernelDiscards, KernelPool, KernelPoolMode, KernelPoolStatus,
};
use super::loopdev::{LoopDevice, LoopOptions};
use crate::error::{DeviceRole, Error, Result};
use crate::io::{BlockDevice, FileDevice, OpenMode};
use crate::store::{check_name, check_size, Intent, PoolView, ReconcileReport, VolumeStore};
use crate::thin::files::PoolPaths;
use crate::thin::metadata::DeviceDetails;
use crate::thin::pool::{PoolOptions, PoolStatus};
use crate::units::{ThinId, SECTOR_SIZE};

/// The block devices the kernel uses for `paths`, plus the loop devices behind regular files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelDevices {
    /// Block devices: given ones as they are, regular files replaced by their loop device.
    pub block: PoolPaths,
    /// The loop devices (metadata, data) attached to regular files.
    pub loops: Vec<LoopDevice>,
    /// Whether `block` are the two region devices of one split device.
    pub split: bool,
}

/// The path to attach a loop device to for `path`: `None` when `path` is already a block
/// device, else the file's canonical path.
fn loop_backing(role: DeviceRole, path: &Path) -> Result<Option<PathBuf>> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(|e| io_err(role, path, e))?;
    if meta.file_type().is_block_device() {
        return Ok(None);
    }
    std::fs::canonicalize(path)
        .map(Some)
        .map_err(|e| io_err(role, path, e))
}

/// A block device, and for a regular file the loop device on it with what `accept` gave.
type Found<T> = (PathBuf, Option<(LoopDevice, T)>);

/// `path` itself if it is a block device; for a regular file, the first loop device attached
/// to it for which `accept` gives something (with that something), or `None`.
fn block_device_for<T>(
    role: DeviceRole,
    path: &Path,
    accept: impl Fn(&Path) -> Option<T>,
) -> Result<Option<Found<T>>> {
    let Some(backing) = loop_backing(role, path)? else {
        return Ok(Some((path.to_path_buf(), None)));
    };
    Ok(LoopDevice::find_by_backing(&backing)
        .into_iter()
        .find_map(|l| {
            let found = accept(&l.path())?;
            Some((l.path(), Some((l, found))))
        }))
}

/// The kernel pool whose metadata is at `metadata`, with the block device it is on and the
/// loop device behind a regular file; each candidate is looked up once.
fn pool_on(metadata: &Path) -> Result<Option<(KernelPool, PathBuf, Option<LoopDevice>)>> {
    let found = |meta: &Path| KernelPool::find_by_metadata(meta).ok().flatten();
    match block_device_for(DeviceRole::Metadata, metadata, found)? {
        None => Ok(None),
        Some((block, Some((meta_loop, pool)))) => Ok(Some((pool, block, Some(meta_loop)))),
        Some((block, None)) => {
            Ok(KernelPool::find_by_metadata(&block)?.map(|pool| (pool, block, None)))
        }
    }
}

/// The kernel pool on `paths`, with the block devices it uses, if the kernel has one.
///
/// `Ok(None)` without touching anything when this machine has no working device-mapper
/// ([`KernelPool::available`]). A regular file counts through the loop device attached to it.
pub fn find(paths: &PoolPaths) -> Result<Option<(KernelPool, KernelDevices)>> {
    if !KernelPool::available() {
        return Ok(None);
    }
    let Some((pool, metadata, meta_loop)) = pool_on(&paths.metadata)? else {
        return Ok(None);
    };
    if paths.is_split() {
        // The kernel's devices are the two regions' linear devices over the one device.
        let (metadata, data) = pool.region_nodes();
        let devices = KernelDevices {
            block: PoolPaths::separate(&metadata, &data),
            loops: meta_loop.into_iter().collect(),
            split: true,
        };
        return Ok(Some((pool, devices)));
    }
    let (data, data_loop) = match block_device_for(DeviceRole::Data, &paths.data, |_| Some(()))? {
        Some((data, data_loop)) => (data, data_loop.map(|(l, ())| l)),
        None => (paths.data.clone(), None),
    };
    let devices = KernelDevices {
        block: PoolPaths::separate(&metadata, &data),
        loops: meta_loop.into_iter().chain(data_loop).collect(),
        split: false,
    };
    Ok(Some((pool, devices)))
}

/// The kernel pool device that owns the metadata at `metadata`, if one does: for the offline
/// tools, which must refuse such a pool (the kernel changes it under them).
pub fn owner_of_metadata(metadata: &Path) -> Result<Option<PathBuf>> {
    if !KernelPool::available() {
        return Ok(None);
    }
    Ok(pool_on(metadata)?.map(|(pool, _, _)| pool.node()))
}

/// What the held metadata snapshot (or the last commit) says.
struct MetadataView {
    transaction_id: u64,
    details: Vec<(ThinId, DeviceDetails)>,
}

/// A pool the kernel owns, driven through [`PoolControl`].
pub struct KernelControl {
    pool: KernelPool,
    devices: KernelDevices,
    store: VolumeStore,
    report: ReconcileReport,
    /// Open thin nodes for byte IO, with whether they were opened for writing.
    files: HashMap<ThinId, (FileDevice, bool)>,
    /// Thins activated only to do IO; deactivated again when this is dropped.
    io_activated: Vec<ThinId>,
}

impl KernelControl {
    /// Hands the pool on `paths` to the kernel and returns control of it.
    ///
    /// Regular files get loop devices first (detached again if the start fails). A split
    /// device ([`crate::thin::files::Layout::Split`]) is one device under two `linear`
    /// devices, one per region ([`KernelPool::start_split`]). The store at
    /// `store_path` must already be reconciled with the pool (open it with our engine first);
    /// the settings it records (zeroing, no-space policy, low-water mark) override `options`.
    ///
    /// * `Err(Busy)`: the kernel has the pool already, or a device is held elsewhere.
    /// * the errors of [`KernelPool::start`] and [`LoopDevice::attach`].
    pub fn start(
        paths: &PoolPaths,
        store_path: &Path,
        options: PoolOptions,
    ) -> Result<KernelControl> {
        if let Some((pool, _)) = find(paths)? {
            return Err(Error::Busy {
                what: format!("pool metadata {}", paths.metadata.display()),
                holder: format!("it is active in the kernel as {}", pool.node().display()),
            });
        }
        let store = VolumeStore::load(store_path)?;
        let options = store.settings().apply(options);
        let mut loops = Vec::new();
        let attached = (|| -> Result<PoolPaths> {
            let mut attach = |role: DeviceRole, path: &Path| -> Result<PathBuf> {
                let Some(backing) = loop_backing(role, path)? else {
                    return Ok(path.to_path_buf());
                };
                let l = LoopDevice::attach(
                    &backing,
                    LoopOptions {
                        read_only: options.read_only,
                        ..LoopOptions::default()
                    },
                )?;
                let node = l.path();
                loops.push(l);
                Ok(node)
            };
            let metadata = attach(DeviceRole::Metadata, &paths.metadata)?;
            if paths.is_split() {
                return Ok(PoolPaths::split(&metadata));
            }
            let data = attach(DeviceRole::Data, &paths.data)?;
            Ok(PoolPaths::separate(&metadata, &data))
        })();
        let started = attached.and_then(|block| {
            if paths.is_split() {
                // One device (its loop device, for a file) under both regions.
                let pool =
                    KernelPool::start_split(&block.metadata, &options, options.low_water_blocks)?;
                let (metadata, data) = pool.region_nodes();
                return Ok((pool, PoolPaths::separate(&metadata, &data)));
            }
            let pool = KernelPool::start(&block, &options, options.low_water_blocks)?;
            Ok((pool, block))
        });
        let (pool, block) = match started {
            Ok(p) => p,
            Err(cause) => return Err(detach_all(&loops, cause)),
        };
        let devices = KernelDevices {
            block,
            loops,
            split: paths.is_split(),
        };
        Self::attach(pool, devices, store)
    }

    /// Control of a pool the kernel already has ([`find`]), with the store at `store_path`
    /// reconciled against it.
    pub fn open(pool: KernelPool, devices: KernelDevices, store_path: &Path) -> Result<Self> {
        let store = VolumeStore::load(store_path)?;
        Self::attach(pool, devices, store)
    }

    fn attach(pool: KernelPool, devices: KernelDevices, store: VolumeStore) -> Result<Self> {
        let mut control = KernelControl {
            pool,
            devices,
            store,
            report: ReconcileReport::default(),
            files: HashMap::new(),
            io_activated: Vec::new(),
        };
        let tid = control.pool.status()?.transaction_id;
        if control.store.pending().is_some() || control.store.transaction_id() != Some(tid) {
            control.report = control.reconcile()?;
        }
        Ok(control)
    }

    /// The kernel pool.
    pub fn pool(&self) -> &KernelPool {
        &self.pool
    }

    /// The block devices the kernel uses, and the loop devices among them.
    pub fn devices(&self) -> &KernelDevices {
        &self.devices
    }

    /// The records.
    pub fn store(&self) -> &VolumeStore {
        &self.store
    }

    /// What reconciling the store at open found.
    pub fn reconcile_report(&self) -> &ReconcileReport {
        &self.report
    }

    /// Takes the pool back from the kernel: removes the pool device (the kernel commits) and
    /// detaches the loop devices this pool's files had.
    ///
    /// With `force`, active thins nobody uses are deactivated first; without, any active thin
    /// refuses the stop. A thin in use always does ([`Error::Busy`], naming the devices). On
    /// every `Err` the pool is still in the kernel.
    pub fn stop(mut self, force: bool) -> Result<()> {
        self.release_io();
        let active = self.pool.active_thins()?;
        if !active.is_empty() {
            let list = |ids: &[ThinId]| {
                ids.iter()
                    .map(|id| self.pool.thin_path(*id).display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !force {
                return Err(Error::Busy {
                    what: format!("kernel pool {}", self.pool.name()),
                    holder: format!(
                        "thin devices are active: {} (deactivate them, or stop with --force)",
                        list(&active)
                    ),
                });
            }
            let mut busy = Vec::new();
            for id in active {
                match self.pool.deactivate(id, false) {
                    Ok(()) => {}
                    Err(Error::Busy { .. }) => busy.push(id),
                    Err(e) => return Err(e),
                }
            }
            if !busy.is_empty() {
                return Err(Error::Busy {
                    what: format!("kernel pool {}", self.pool.name()),
                    holder: format!("thin devices are in use: {}", list(&busy)),
                });
            }
        }
        // `KernelPool::stop` takes its pool by value; ours is inside a value with a Drop (which
        // has nothing left to do: the IO handles went above).
        self.pool.remove()?;
        let devices = self.devices.clone();
        drop(self);
        let mut first = None;
        for l in &devices.loops {
            if let Err(e) = l.detach() {
                tracing::warn!(device = %l.path().display(), error = %e, "loop detach failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Reads thin ids and details through a held metadata snapshot (module doc).
    fn read_metadata(&self) -> Result<MetadataView> {
        let held_by_other = self.pool.status()?.held_root.is_some();
        if !held_by_other {
            self.pool.message("reserve_metadata_snap")?;
        }
        let read = self.read_details(!held_by_other);
        if held_by_other {
            return read;
        }
        after_cleanup(read, self.pool.message("release_metadata_snap"))
    }

    fn read_details(&self, use_metadata_snap: bool) -> Result<MetadataView> {
        let path = &self.devices.block.metadata;
        // Read-only opens of a block device do not claim it, so this works beside the kernel.
        let dev = FileDevice::open(path, OpenMode::ReadOnly)
            .map_err(|e| io_err(DeviceRole::Metadata, path, e))?;
        // The kernel writes metadata around the page cache: drop what an earlier reader left.
        nix::fcntl::posix_fadvise(
            dev.file().as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .map_err(|e| io_err(DeviceRole::Metadata, path, e.into()))?;
        let (sb, details) = crate::tools::dump::device_details(&dev, use_metadata_snap)?;
        let details = details
            .into_iter()
            .filter_map(|(id, d)| Some((ThinId::new(id)?, d)))
            .collect();
        Ok(MetadataView {
            transaction_id: sb.transaction_id,
            details,
        })
    }

    fn reconcile(&mut self) -> Result<ReconcileReport> {
        let view = self.read_metadata()?;
        let status = self.pool.status()?;
        let pool_view = PoolView {
            transaction_id: view.transaction_id,
            thin_ids: view
                .details
                .iter()
                .map(|(id, _)| *id)
                .collect::<BTreeSet<_>>(),
            read_only: status.mode == KernelPoolMode::ReadOnly,
        };
        self.store.reconcile_with(&pool_view)
    }

    /// Runs the store protocol (module doc) around `op`.
    fn change(&mut self, intent: Intent, op: impl FnOnce(&KernelPool) -> Result<()>) -> Result<()> {
        tracing::debug!(%intent, "volume change (kernel)");
        let mut n = self.pool.status()?.transaction_id;
        if self.store.pending().is_some() || self.store.transaction_id() != Some(n) {
            self.reconcile()?;
            n = self.pool.status()?.transaction_id;
        }
        if n == u64::MAX {
            return Err(Error::InvalidArgument(
                "the pool's transaction id is at its maximum".into(),
            ));
        }
        self.store.begin_intent(intent, n)?;
        if let Err(e) = op(&self.pool) {
            // A refused message changes nothing, but a failure around it (resuming a
            // suspended origin) may follow a change that happened: decide by what exists.
            if let Err(cleanup) = self.reconcile() {
                tracing::warn!(error = %cleanup, "could not settle a failed volume change");
            }
            return Err(e);
        }
        // If this fails the intent stays pending, and the next open applies it (the thin
        // exists, or is gone, at transaction id n).
        self.pool
            .message(&format!("set_transaction_id {n} {}", n + 1))?;
        self.store.finish_intent(n + 1)
    }

    fn check_new_name(&self, name: Option<&str>) -> Result<()> {
        let Some(name) = name else { return Ok(()) };
        check_name(name)?;
        match self.store.by_name(name) {
            Some(other) => Err(Error::InvalidArgument(format!(
                "name {name:?} is taken by thin {}",
                other.id
            ))),
            None => Ok(()),
        }
    }

    fn record_size(&self, id: ThinId) -> Result<u64> {
        if let Some(v) = self.store.get(id) {
            return Ok(v.size_bytes);
        }
        let exists = self.read_metadata()?.details.iter().any(|(i, _)| *i == id);
        if exists {
            Err(Error::Store {
                path: self.store.path().display().to_string(),
                message: format!("thin {id} has no record (an orphan: its size is unknown)"),
            })
        } else {
            Err(Error::NoSuchThin(id))
        }
    }

    fn check_range(&self, id: ThinId, offset: u64, len: u64) -> Result<()> {
        let size = self.record_size(id)?;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::InvalidArgument(format!(
                "{len} bytes at offset {offset} go past the end of thin {id} ({size} bytes)"
            )));
        }
        Ok(())
    }

    /// The thin's node opened for IO, activating the thin first if it is not active.
    fn device(&mut self, id: ThinId, write: bool) -> Result<&FileDevice> {
        let reopen = match self.files.get(&id) {
            Some((_, rw)) => write && !rw,
            None => true,
        };
        if reopen {
            let size = self.record_size(id)?;
            if self.pool.thin_info(id)?.is_none() {
                self.pool.activate(id, size, false)?;
                self.io_activated.push(id);
            }
            let path = self.pool.thin_path(id);
            let mode = if write {
                OpenMode::ReadWrite
            } else {
                OpenMode::ReadOnly
            };
            let dev = FileDevice::open(&path, mode).map_err(|e| {
                if e.kind() == std::io::ErrorKind::ResourceBusy {
                    Error::Busy {
                        what: format!("thin device {id} ({})", path.display()),
                        holder: "it is open exclusively elsewhere (a mount?)".into(),
                    }
                } else {
                    io_err(DeviceRole::Data, &path, e)
                }
            })?;
            self.files.insert(id, (dev, write));
        }
        Ok(&self.files[&id].0)
    }

    /// Syncs and closes the IO handles, and deactivates the thins activated only for IO.
    fn release_io(&mut self) {
        for (id, (dev, rw)) in self.files.drain() {
            if rw {
                if let Err(e) = dev.sync() {
                    tracing::warn!(thin_id = %id, error = %e, "sync of a thin device failed");
                }
            }
        }
        for id in std::mem::take(&mut self.io_activated) {
            if let Err(e) = self.pool.deactivate(id, false) {
                tracing::warn!(thin_id = %id, error = %e, "could not deactivate a thin used for IO");
            }
        }
    }

    fn activation(&self, id: ThinId) -> Result<Option<Activation>> {
        Ok(self.pool.thin_info(id)?.map(|info| Activation {
            id: id.get(),
            device: self.pool.thin_path(id),
            file: None,
            read_only: info.read_only,
            deferred_removal: info.deferred_remove,
        }))
    }
}

impl Drop for KernelControl {
    fn drop(&mut self) {
        self.release_io();
    }
}

/// Detaches `loops` after `cause`, keeping both errors if detaching fails too.
fn detach_all(loops: &[LoopDevice], cause: Error) -> Error {
    for l in loops {
        if let Err(cleanup) = l.detach() {
            return DmError::CleanupFailed {
                cause: Box::new(cause),
                cleanup: Box::new(cleanup),
            }
            .into();
        }
    }
    cause
}

/// The kernel's status in the engine's terms.
fn pool_status(s: &KernelPoolStatus, block_sectors: u32, zero_new_blocks: bool) -> PoolStatus {
    PoolStatus {
        transaction_id: s.transaction_id,
        used_metadata_blocks: s.used_metadata_blocks,
        total_metadata_blocks: s.total_metadata_blocks,
        used_data_blocks: s.used_data_blocks,
        total_data_blocks: s.total_data_blocks,
        held_root: s.held_root,
        mode: match s.mode {
            KernelPoolMode::ReadWrite => "rw",
            KernelPoolMode::ReadOnly => "ro",
            KernelPoolMode::OutOfDataSpace => "out_of_data_space",
        }
        .to_string(),
        discard_passdown: s.discards == KernelDiscards::Passdown,
        error_if_no_space: s.error_if_no_space,
        needs_check: s.needs_check,
        metadata_low_watermark: s.metadata_low_watermark.unwrap_or(0),
        data_block_sectors: block_sectors,
        zero_new_blocks,
    }
}

/// The size in bytes of the block device `major:minor`, from sysfs.
fn sysfs_size(dev: super::dm::DevId) -> Result<u64> {
    let path = PathBuf::from(format!("/sys/dev/block/{}:{}/size", dev.major, dev.minor));
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(DeviceRole::Data, &path, e))?;
    text.trim()
        .parse::<u64>()
        .map(|sectors| sectors * SECTOR_SIZE)
        .map_err(|_| Error::InvalidArgument(format!("{}: {text:?} is not a size", path.display())))
}

impl PoolControl for KernelControl {
    fn status(&mut self) -> Result<ControlStatus> {
        let s = self.pool.status()?;
        let table = self.pool.table()?;
        let zero = !table.features.iter().any(|f| f == "skip_block_zeroing");
        let thin_count = match self.read_metadata() {
            Ok(view) => view.details.len(),
            Err(e) => {
                tracing::warn!(error = %e, "could not read thin ids; counting records instead");
                self.store.volumes().count()
            }
        };
        Ok(ControlStatus {
            status: pool_status(&s, table.data_block_sectors, zero),
            thin_count,
            daemon_pid: None,
            kernel_device: Some(self.pool.node()),
        })
    }

    fn list(&mut self) -> Result<Vec<ThinInfo>> {
        let block_sectors = u64::from(self.pool.table()?.data_block_sectors);
        let view = self.read_metadata()?;
        let mut rows = Vec::new();
        for (id, details) in view.details {
            let record = self.store.get(id);
            let mapped_blocks = match self.pool.thin_mapped_sectors(id)? {
                Some(sectors) => sectors.div_ceil(block_sectors),
                None => details.mapped_blocks,
            };
            rows.push(ThinInfo {
                id: id.get(),
                name: record.and_then(|v| v.name.clone()),
                size_bytes: record.map(|v| v.size_bytes),
                mapped_blocks,
                origin: record.and_then(|v| v.origin).map(ThinId::get),
                active: self.activation(id)?,
            });
        }
        Ok(rows)
    }

    fn create_thin(&mut self, id: ThinId, size_bytes: u64, name: Option<&str>) -> Result<()> {
        check_size(size_bytes)?;
        self.check_new_name(name)?;
        let intent = Intent::Create {
            id,
            size_bytes,
            name: name.map(str::to_owned),
            origin: None,
        };
        self.change(intent, |pool| {
            pool.message(&format!("create_thin {}", id.get()))
        })
    }

    fn create_snap(&mut self, id: ThinId, origin: ThinId, name: Option<&str>) -> Result<()> {
        let size_bytes = self.record_size(origin)?;
        self.check_new_name(name)?;
        let intent = Intent::Create {
            id,
            size_bytes,
            name: name.map(str::to_owned),
            origin: Some(origin),
        };
        // The origin's pending writes must reach the pool before the snapshot.
        if let Some((dev, true)) = self.files.get(&origin) {
            dev.sync()
                .map_err(|e| io_err(DeviceRole::Data, dev.path(), e))?;
        }
        self.change(intent, |pool| pool.create_snap(id, origin))
    }

    fn delete(&mut self, id: ThinId) -> Result<()> {
        if self.files.contains_key(&id) || self.io_activated.contains(&id) {
            self.release_io();
        }
        if self.pool.thin_info(id)?.is_some() {
            return Err(Error::Busy {
                what: format!("thin {id}"),
                holder: format!(
                    "it is active as {} (deactivate it first)",
                    self.pool.thin_path(id).display()
                ),
            });
        }
        self.change(Intent::Delete { id }, |pool| {
            pool.message(&format!("delete {}", id.get()))
        })
    }

    fn rename(&mut self, id: ThinId, name: Option<&str>) -> Result<()> {
        self.record_size(id)?;
        if self.store.get(id).and_then(|v| v.name.as_deref()) == name {
            return Ok(());
        }
        self.check_new_name(name)?;
        let intent = Intent::Rename {
            id,
            name: name.map(str::to_owned),
        };
        // Nothing changes in the pool; the transaction id still moves, as for every change.
        self.change(intent, |_| Ok(()))
    }

    fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()> {
        self.pool
            .message(&format!("set_transaction_id {old} {new}"))
    }

    fn reserve_metadata_snap(&mut self) -> Result<()> {
        self.pool.message("reserve_metadata_snap")
    }

    fn release_metadata_snap(&mut self) -> Result<()> {
        self.pool.message("release_metadata_snap")
    }

    fn resize_pool(&mut self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<()> {
        let table = self.pool.table()?;
        let block = u64::from(table.data_block_sectors);
        let mut length = table.length_sectors;
        if let Some(bytes) = data_bytes.filter(|_| self.devices.split) {
            if bytes / SECTOR_SIZE / block * block > length {
                // Its data region is a linear device of a fixed length.
                return Err(Error::InvalidArgument(format!(
                    "kernel pool {} is on a split device, whose data region cannot grow while \
                     the kernel has it: stop the pool, resize, start it again",
                    self.pool.name()
                )));
            }
        }
        if let Some(bytes) = data_bytes {
            let want = bytes / SECTOR_SIZE / block * block;
            let have = sysfs_size(table.data_dev)? / SECTOR_SIZE / block * block;
            if want < length {
                return Err(Error::InvalidArgument(format!(
                    "the kernel cannot shrink a pool's data ({} bytes now, {bytes} asked)",
                    length * SECTOR_SIZE
                )));
            }
            if want > have {
                return Err(Error::InvalidArgument(format!(
                    "the data device is {} bytes: grow it (and its loop device) before the pool",
                    have * SECTOR_SIZE
                )));
            }
            length = want;
        }
        if let Some(bytes) = metadata_bytes {
            let have = sysfs_size(table.metadata_dev)?;
            if bytes > have {
                return Err(Error::InvalidArgument(format!(
                    "the metadata device is {have} bytes: grow it (and its loop device) first; \
                     the kernel grows the pool's metadata into it on the next reload"
                )));
            }
        }
        // Resuming also makes the kernel grow into a larger metadata device.
        self.pool.reload(length)
    }

    fn size_of(&mut self, id: ThinId) -> Result<u64> {
        self.record_size(id)
    }

    fn read(&mut self, id: ThinId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(id, offset, buf.len() as u64)?;
        let dev = self.device(id, false)?;
        dev.read_at(buf, offset)
            .map_err(|e| io_err(DeviceRole::Data, dev.path(), e))
    }

    fn write(&mut self, id: ThinId, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(id, offset, data.len() as u64)?;
        let dev = self.device(id, true)?;
        dev.write_at(data, offset)
            .map_err(|e| io_err(DeviceRole::Data, dev.path(), e))
    }

    fn discard(&mut self, id: ThinId, offset: u64, len: u64) -> Result<()> {
        self.check_range(id, offset, len)?;
        let dev = self.device(id, true)?;
        dev.discard(offset, len)
            .map_err(|e| io_err(DeviceRole::Data, dev.path(), e))
    }

    fn flush(&mut self) -> Result<()> {
        for (dev, rw) in self.files.values() {
            if *rw {
                dev.sync()
                    .map_err(|e| io_err(DeviceRole::Data, dev.path(), e))?;
            }
        }
        Ok(())
    }

    fn activate(&mut self, id: ThinId, read_only: bool) -> Result<Activation> {
        let size = self.record_size(id)?;
        // An activation asked for by a user outlives this value.
        self.io_activated.retain(|i| *i != id);
        self.pool.activate(id, size, read_only)?;
        self.activation(id)?
            .ok_or_else(|| Error::Activation(format!("thin {id} vanished right after activation")))
    }

    fn deactivate(&mut self, id: ThinId, deferred: bool) -> Result<()> {
        if let Some((dev, rw)) = self.files.remove(&id) {
            if rw {
                dev.sync()
                    .map_err(|e| io_err(DeviceRole::Data, dev.path(), e))?;
            }
            self.io_activated.retain(|i| *i != id);
        }
        self.pool.deactivate(id, deferred)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_status_becomes_the_engines_status_with_the_same_line() {
        let line = "6 141/16384 60/8192 - rw discard_passdown queue_if_no_space - 1024";
        let k: KernelPoolStatus = line.parse().unwrap();
        let s = pool_status(&k, 128, true);
        assert_eq!(s.to_string(), line);
        assert_eq!(
            s.kernel_line(),
            format!("0 {} thin-pool {line}", 8192 * 128)
        );
        assert_eq!((s.data_block_sectors, s.zero_new_blocks), (128, true));

        let held = "7 200/1024 61/1024 177 ro no_discard_passdown error_if_no_space needs_check";
        let s = pool_status(&held.parse().unwrap(), 256, false);
        assert_eq!(s.held_root, Some(177));
        assert_eq!(s.mode, "ro");
        assert!(!s.discard_passdown && s.error_if_no_space && s.needs_check);
    }

    #[test]
    fn finding_a_pool_here_is_none_without_device_mapper() {
        if KernelPool::available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let paths = PoolPaths::in_dir(dir.path());
        std::fs::write(&paths.metadata, [0u8; 4096]).unwrap();
        std::fs::write(&paths.data, [0u8; 4096]).unwrap();
        assert!(find(&paths).unwrap().is_none());
        assert_eq!(owner_of_metadata(&paths.metadata).unwrap(), None);
    }
}
