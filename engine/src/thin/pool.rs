//! The pool: lifecycle, pool messages, modes, status, and the locks the data path needs.
//!
//! Locking, in the order they are taken (never the other way):
//! 1. a thin's IO gate (read for writes and discards; write to quiesce the origin of a
//!    snapshot; reads need none, a snapshot changes no mapping they see);
//! 2. block stripes (read for reads of uncached blocks, write for writes and discards; several
//!    at once always in stripe order), so that two writers never provision the same block twice
//!    and a read never sees a block that a discard freed and someone else reused (reads of
//!    cached blocks check the thin's free count instead, see `thin::cache`);
//! 3. the provisioning gate (read from allocating a data block until its mapping is inserted;
//!    write for commit), so that a commit never records a block allocated but not yet mapped;
//! 4. the metadata mutex, held for metadata work and, in a commit, across the data flush
//!    that must come before the superblock (never across other data I/O);
//! 5. the mapping cache's table list (only to register a thin's table, or to make tables
//!    stale). The open-thins map is taken before 4 and 5, never after them.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard, RwLock};

use crate::error::{DeviceRole, Error, Result};
use crate::io::BlockDevice;
use crate::thin::device::Thin;
use crate::thin::metadata::{Metadata, Superblock};
use crate::units::{DataBlockSize, ThinId};

/// The default of [`PoolOptions::kept_free_bytes`]: 16 MiB, 256 blocks of 64 KiB.
pub const DEFAULT_KEPT_FREE_BYTES: u64 = 16 << 20;

/// [`PoolOptions::kept_free_bytes`] in whole data blocks.
fn kept_blocks(options: &PoolOptions, block_size: DataBlockSize) -> u64 {
    options.kept_free_bytes / block_size.bytes()
}

/// How a pool treats writes it cannot provision and blocks it provisions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolOptions {
    /// Zero-fill a newly provisioned block that a write does not cover completely (the
    /// kernel's default; `skip_block_zeroing` turns it off).
    pub zero_new_blocks: bool,
    /// Give freed data blocks back to the data device (hole punching, device discard).
    pub discard_passdown: bool,
    /// Bytes of free data space kept allocated on the data device for reuse: freed blocks
    /// among the lowest free ones, up to this much, are not given back (see
    /// [`Pool::kept_free_blocks`]). 0 gives every freed block back at once.
    pub kept_free_bytes: u64,
    /// Open without making any change (status, reads, dump).
    pub read_only: bool,
    /// What a write that needs a new block does when the data device is full.
    pub no_space: NoSpacePolicy,
    /// Free data blocks at or below which a [`PoolEvent::LowWater`] is raised (once per
    /// crossing, like the kernel's dm event); 0 for none.
    pub low_water_blocks: u64,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            zero_new_blocks: true,
            discard_passdown: true,
            kept_free_bytes: DEFAULT_KEPT_FREE_BYTES,
            read_only: false,
            no_space: NoSpacePolicy::Error,
            low_water_blocks: 0,
        }
    }
}

/// The kernel's `error_if_no_space` and `queue_if_no_space`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoSpacePolicy {
    /// Fail the write at once (ENOSPC). The default.
    Error,
    /// Hold the write until space appears (the pool grows, blocks are freed), failing it
    /// after `timeout` (the kernel's default is 60 s).
    Queue { timeout: std::time::Duration },
}

impl NoSpacePolicy {
    pub const DEFAULT_QUEUE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
}

/// What a pool tells its subscribers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolEvent {
    /// Free data blocks fell to the low-water mark.
    LowWater {
        free_blocks: u64,
        low_water_blocks: u64,
    },
    /// A write found no free data block.
    OutOfDataSpace,
    /// The pool turned read-only.
    ReadOnly { reason: String },
}

/// The pool's operating mode, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolMode {
    ReadWrite,
    /// Writes that need a new block fail; everything else works.
    OutOfDataSpace,
    /// No change is possible; the reason says why.
    ReadOnly(String),
}

/// What `status` reports: the kernel's thin-pool status fields.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolStatus {
    pub transaction_id: u64,
    pub used_metadata_blocks: u64,
    pub total_metadata_blocks: u64,
    pub used_data_blocks: u64,
    pub total_data_blocks: u64,
    /// The metadata snapshot's block, if one is held.
    pub held_root: Option<u64>,
    pub mode: String,
    pub discard_passdown: bool,
    pub error_if_no_space: bool,
    pub needs_check: bool,
    pub metadata_low_watermark: u64,
    pub data_block_sectors: u32,
    pub zero_new_blocks: bool,
}

impl PoolStatus {
    /// The status line as `dmsetup status` prints it for a thin-pool target of
    /// `length_sectors` (the data device).
    pub fn kernel_line(&self) -> String {
        format!(
            "0 {} thin-pool {}",
            self.total_data_blocks * u64::from(self.data_block_sectors),
            self
        )
    }
}

impl fmt::Display for PoolStatus {
    /// The kernel's status fields (what follows `thin-pool` in `dmsetup status`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.held_root.map_or("-".to_string(), |h| h.to_string());
        write!(
            f,
            "{} {}/{} {}/{} {} {} {} {} {} {}",
            self.transaction_id,
            self.used_metadata_blocks,
            self.total_metadata_blocks,
            self.used_data_blocks,
            self.total_data_blocks,
            held,
            self.mode,
            if self.discard_passdown {
                "discard_passdown"
            } else {
                "no_discard_passdown"
            },
            if self.error_if_no_space {
                "error_if_no_space"
            } else {
                "queue_if_no_space"
            },
            if self.needs_check { "needs_check" } else { "-" },
            self.metadata_low_watermark,
        )
    }
}

const STRIPES: usize = 1024;

pub(crate) struct ThinGate {
    /// Held for reading by every write and discard of the thin, for writing by a snapshot
    /// of it (see [`Pool::io_gate`]).
    pub(crate) io: Arc<RwLock<()>>,
    /// The thin's cached mappings (see `thin::cache`), shared by its handles.
    pub(crate) table: Arc<crate::thin::cache::MappingTable>,
}

pub struct Pool {
    /// Recent mappings for the read path (see `thin::cache`).
    pub(crate) mappings: crate::thin::cache::MappingCache,
    /// Woken whenever free data space may have appeared (resize, frees, commit).
    space: parking_lot::Condvar,
    space_lock: Mutex<()>,
    subscribers: Mutex<Vec<std::sync::mpsc::Sender<PoolEvent>>>,
    /// Whether free space is at or below the low-water mark (raised once per crossing).
    below_low_water: std::sync::atomic::AtomicBool,
    /// A failure threw away writes that were acknowledged but not yet committed (or a data
    /// flush failed): no later flush may report success (the kernel's `aborted_with_changes`).
    lost_writes: std::sync::atomic::AtomicBool,
    md: Mutex<Metadata>,
    meta_dev: Arc<dyn BlockDevice>,
    data_dev: Arc<dyn BlockDevice>,
    block_size: DataBlockSize,
    options: PoolOptions,
    mode: Mutex<PoolMode>,
    /// Whether `mode` is read-only (it latches): what the data path checks, without the lock.
    read_only: std::sync::atomic::AtomicBool,
    stripes: Vec<RwLock<()>>,
    provisioning: RwLock<()>,
    open_thins: Mutex<HashMap<ThinId, (Arc<ThinGate>, usize)>>,
    /// Each thin's IO gate, kept from its first open until it is deleted: outlives the
    /// handles (see [`Pool::io_gate`]). A leaf lock: nothing is taken while it is held.
    io_gates: Mutex<HashMap<ThinId, Arc<RwLock<()>>>>,
    /// Free data blocks below this are kept on the data device (see
    /// [`Pool::kept_free_blocks`]); read and moved under the metadata lock.
    kept_free_end: std::sync::atomic::AtomicU64,
}

impl Pool {
    /// Formats a new pool on two devices. The data device's size sets the data blocks.
    pub fn format(
        meta_dev: Arc<dyn BlockDevice>,
        data_dev: Arc<dyn BlockDevice>,
        block_size: DataBlockSize,
        options: PoolOptions,
    ) -> Result<Arc<Pool>> {
        let nr_data_blocks = data_dev.size() / block_size.bytes();
        let md = Metadata::format(meta_dev.clone(), block_size, nr_data_blocks)?;
        tracing::debug!(nr_data_blocks, block_size = block_size.bytes(), "format");
        Ok(Self::assemble(
            md,
            meta_dev,
            data_dev,
            options,
            PoolMode::ReadWrite,
        ))
    }

    /// Opens an existing pool. A data device larger than the pool's data space map grows it
    /// (as the kernel does on activation); a smaller one is refused.
    pub fn open(
        meta_dev: Arc<dyn BlockDevice>,
        data_dev: Arc<dyn BlockDevice>,
        options: PoolOptions,
    ) -> Result<Arc<Pool>> {
        let mut md = Metadata::open(meta_dev.clone())?;
        let block_size = md.data_block_size();
        let dev_blocks = data_dev.size() / block_size.bytes();
        if dev_blocks < md.nr_data_blocks() {
            return Err(Error::InvalidArgument(format!(
                "data device {} holds {dev_blocks} blocks, the pool has {}",
                data_dev.describe(),
                md.nr_data_blocks()
            )));
        }
        let mode = if options.read_only {
            PoolMode::ReadOnly("opened read-only".into())
        } else if md.superblock().needs_check() {
            return Err(Error::NeedsCheck);
        } else {
            if dev_blocks > md.nr_data_blocks() {
                md.resize_data(dev_blocks)?;
                md.commit()?;
            }
            PoolMode::ReadWrite
        };
        Ok(Self::assemble(md, meta_dev, data_dev, options, mode))
    }

    fn assemble(
        md: Metadata,
        meta_dev: Arc<dyn BlockDevice>,
        data_dev: Arc<dyn BlockDevice>,
        options: PoolOptions,
        mode: PoolMode,
    ) -> Arc<Pool> {
        let block_size = md.data_block_size();
        // What a pool closed cleanly kept is still on the device: take it as kept again. The
        // window it was closed with may have been the default one, larger than this opener's:
        // starting from the larger, the first commit gives back what the new one lets go.
        let default_window = kept_blocks(&PoolOptions::default(), block_size);
        let kept_free_end =
            md.end_of_lowest_free_data(kept_blocks(&options, block_size).max(default_window));
        let mode =
            if mode == PoolMode::ReadWrite && md.free_data_blocks() == 0 && md.nr_data_blocks() > 0
            {
                PoolMode::OutOfDataSpace
            } else {
                mode
            };
        Arc::new(Pool {
            mappings: crate::thin::cache::MappingCache::new(),
            space: parking_lot::Condvar::new(),
            space_lock: Mutex::new(()),
            subscribers: Mutex::new(Vec::new()),
            below_low_water: std::sync::atomic::AtomicBool::new(false),
            lost_writes: std::sync::atomic::AtomicBool::new(false),
            md: Mutex::new(md),
            meta_dev,
            data_dev,
            block_size,
            options,
            read_only: std::sync::atomic::AtomicBool::new(matches!(mode, PoolMode::ReadOnly(_))),
            mode: Mutex::new(mode),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            provisioning: RwLock::new(()),
            open_thins: Mutex::new(HashMap::new()),
            io_gates: Mutex::new(HashMap::new()),
            kept_free_end: std::sync::atomic::AtomicU64::new(kept_free_end),
        })
    }

    pub fn block_size(&self) -> DataBlockSize {
        self.block_size
    }

    pub fn options(&self) -> PoolOptions {
        self.options
    }

    pub(crate) fn data_dev(&self) -> &Arc<dyn BlockDevice> {
        &self.data_dev
    }

    pub fn metadata_device(&self) -> &Arc<dyn BlockDevice> {
        &self.meta_dev
    }

    fn stripe_index(id: ThinId, vblock: u64) -> usize {
        let h = (id.get().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ vblock)
            .wrapping_mul(0xff51_afd7_ed55_8ccd);
        (h >> 54) as usize % STRIPES
    }

    pub(crate) fn stripe(&self, id: ThinId, vblock: u64) -> &RwLock<()> {
        &self.stripes[Self::stripe_index(id, vblock)]
    }

    /// The stripes covering `vblocks` of a thin, sorted and without repeats. Whoever holds
    /// several stripes took them in this order, so two requests never wait on each other in
    /// a cycle (and never on themselves).
    pub(crate) fn stripes_for(
        &self,
        id: ThinId,
        vblocks: impl Iterator<Item = u64>,
    ) -> Vec<&RwLock<()>> {
        let mut indices: Vec<usize> = vblocks.map(|v| Self::stripe_index(id, v)).collect();
        indices.sort_unstable();
        indices.dedup();
        indices.into_iter().map(|i| &self.stripes[i]).collect()
    }

    pub(crate) fn provisioning(&self) -> &RwLock<()> {
        &self.provisioning
    }

    pub(crate) fn metadata(&self) -> MutexGuard<'_, Metadata> {
        self.md.lock()
    }

    pub fn mode(&self) -> PoolMode {
        self.mode.lock().clone()
    }

    /// Refuses changes unless the pool is writable. Out of data space still allows changes
    /// that need no new data block.
    pub(crate) fn check_writable(&self) -> Result<()> {
        if !self.read_only.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        match &*self.mode.lock() {
            PoolMode::ReadOnly(why) => Err(Error::ReadOnly(why.clone())),
            _ => Ok(()),
        }
    }

    pub(crate) fn set_mode(&self, mode: PoolMode) {
        let mut m = self.mode.lock();
        if matches!(*m, PoolMode::ReadOnly(_)) {
            return;
        }
        if *m != mode {
            match &mode {
                PoolMode::ReadWrite => tracing::info!("pool back to read-write"),
                PoolMode::OutOfDataSpace => tracing::warn!("pool is out of data space"),
                PoolMode::ReadOnly(why) => {
                    tracing::warn!(reason = %why, "pool switched to read-only")
                }
            }
            let event = match &mode {
                PoolMode::ReadWrite => None,
                PoolMode::OutOfDataSpace => Some(PoolEvent::OutOfDataSpace),
                PoolMode::ReadOnly(why) => Some(PoolEvent::ReadOnly {
                    reason: why.clone(),
                }),
            };
            if matches!(mode, PoolMode::ReadOnly(_)) {
                self.read_only
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            *m = mode;
            drop(m);
            if let Some(event) = event {
                self.emit(event);
            }
        }
    }

    /// Handles a failed metadata operation the way the kernel does: throw the running
    /// transaction away, and for anything but a refusal go read-only with needs_check set.
    pub(crate) fn metadata_failed(&self, md: &mut Metadata, err: &Error) {
        let degrade = match err {
            Error::NoMetadataSpace => Some("out of metadata space"),
            Error::Io {
                role: DeviceRole::Metadata,
                ..
            } => Some("metadata i/o error"),
            Error::Corrupt { .. } => Some("metadata is damaged"),
            _ => None,
        };
        if let Some(why) = degrade {
            if self.options.read_only {
                // Nothing to protect: no change is made through this pool.
                return;
            }
            self.fail(md, format!("{why}: {err}"), false);
        }
    }

    /// The failure policy (the kernel's `metadata_operation_failed`): abort the running
    /// transaction, set needs_check, latch read-only. `data_lost` says that acknowledged
    /// writes may be gone even if no metadata changed (a failed data flush).
    fn fail(&self, md: &mut Metadata, reason: String, data_lost: bool) {
        // A pool already read-only changes nothing: only a first failure can lose writes.
        let writable = !matches!(*self.mode.lock(), PoolMode::ReadOnly(_));
        if data_lost || (writable && md.has_changes()) {
            self.lost_writes
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        md.abort();
        self.mappings.clear();
        if let Err(e) = md.persist_needs_check() {
            tracing::error!(error = %e, "could not set needs_check");
        }
        tracing::warn!(reason = %reason, "pool switched to read-only");
        self.enter_read_only(reason);
    }

    /// The data device's flush before a metadata commit (the kernel's pre-commit callback)
    /// failed: the commit fails like one with a metadata error. The transaction's mappings
    /// may name blocks whose contents never reached the disk, so it is thrown away and the
    /// pool turns read-only with needs_check, as the kernel's does.
    fn data_flush_failed(&self, md: &mut Metadata, err: Error) -> Error {
        self.fail(md, format!("data device flush failed: {err}"), true);
        err
    }

    /// Flushes the data device before a commit (metadata lock not held); a failure goes
    /// through [`Self::data_flush_failed`].
    fn sync_data_for_commit(&self) -> Result<()> {
        self.data_dev
            .sync()
            .map_err(|e| self.data_flush_failed(&mut self.md.lock(), self.data_io_error(0, e)))
    }

    /// Latches read-only mode (it never goes back while the pool is open) and tells
    /// subscribers.
    fn enter_read_only(&self, reason: String) {
        let mut mode = self.mode.lock();
        *mode = PoolMode::ReadOnly(reason.clone());
        self.read_only
            .store(true, std::sync::atomic::Ordering::Release);
        drop(mode);
        self.emit(PoolEvent::ReadOnly { reason });
    }

    /// Metadata blocks kept back, as the kernel does (a tenth of the device, at most 16 MiB):
    /// the pool turns read-only when only the reserve is left, so the commit that records
    /// everything so far still has room. Status lines count the reserve as used, like the
    /// kernel's.
    pub fn metadata_reserve(nr_metadata_blocks: u64) -> u64 {
        (nr_metadata_blocks / 10).min(4096)
    }

    /// Whether only the reserve is left (see `metadata_reserve`).
    pub(crate) fn metadata_space_short(&self, md: &Metadata) -> bool {
        // A commit itself needs a few blocks (space map bitmaps and indexes move), which the
        // kernel's reserve does not guarantee on tiny devices.
        const COMMIT_HEADROOM: u64 = 32;
        let threshold = Self::metadata_reserve(md.nr_metadata_blocks()).max(COMMIT_HEADROOM);
        md.free_metadata_blocks() < threshold
    }

    /// With only the reserve left: commit everything written so far, set needs_check and go
    /// read-only (the kernel's "no free metadata space"). Call it holding no pool lock: it
    /// waits for in-flight provisioning, so the commit records no block allocated but not
    /// yet mapped.
    pub(crate) fn out_of_metadata_space(&self) -> Error {
        let _gate = self.provisioning.write();
        let mut md = self.md.lock();
        if matches!(self.mode(), PoolMode::ReadOnly(_)) {
            return Error::NoMetadataSpace;
        }
        md.set_needs_check();
        // A failed commit has already taken the pool read-only, its own way.
        if self.commit_locked(&mut md).is_ok() {
            tracing::warn!("out of metadata space: pool switched to read-only, needs_check set");
            self.enter_read_only("out of metadata space".into());
        }
        Error::NoMetadataSpace
    }

    /// Runs a metadata operation that needs metadata space (creating devices), refusing it
    /// when only the reserve is left.
    fn with_metadata_space<T>(&self, f: impl FnOnce(&mut Metadata) -> Result<T>) -> Result<T> {
        self.check_writable()?;
        if self.metadata_space_short(&self.md.lock()) {
            return Err(self.out_of_metadata_space());
        }
        self.with_metadata(f)
    }

    /// Runs a metadata step of the data path (a lookup, a mapping change) under the metadata
    /// lock; a failure goes through the failure policy. No writability check: reads work on a
    /// read-only pool.
    pub(crate) fn on_metadata<T>(&self, f: impl FnOnce(&mut Metadata) -> Result<T>) -> Result<T> {
        let mut md = self.md.lock();
        f(&mut md).inspect_err(|e| self.metadata_failed(&mut md, e))
    }

    /// Runs a metadata operation under the metadata lock, with the failure policy above.
    /// Operations that free space or grow it run even when metadata space is short.
    fn with_metadata<T>(&self, f: impl FnOnce(&mut Metadata) -> Result<T>) -> Result<T> {
        self.check_writable()?;
        self.on_metadata(f)
    }

    // ---- pool messages -------------------------------------------------------------------

    pub fn create_thin(&self, id: ThinId) -> Result<()> {
        tracing::debug!(thin_id = %id, "create_thin");
        self.with_metadata_space(|md| md.create_thin(id))
    }

    /// Snapshots `origin` as `id`. IO to the origin is held off while the snapshot is taken,
    /// so the snapshot is a point-in-time copy.
    pub fn create_snap(&self, id: ThinId, origin: ThinId) -> Result<()> {
        tracing::debug!(thin_id = %id, origin = %origin, "create_snap");
        loop {
            // No write of the origin is under way while the snapshot is made, through any
            // handle, including one opened meanwhile: they all share this gate. Taken under
            // the metadata lock, where `delete` drops gates, so no gate outlives its thin.
            let gate = {
                let md = self.md.lock();
                if !md.exists(origin) {
                    return Err(Error::NoSuchThin(origin));
                }
                self.io_gate(origin)
            };
            let _quiesced = gate.write();
            let made = self.with_metadata_space(|md| {
                // Deleted (and perhaps made again, with another gate) since the look above:
                // look again.
                let same = self
                    .io_gates
                    .lock()
                    .get(&origin)
                    .is_some_and(|g| Arc::ptr_eq(g, &gate));
                if !same {
                    return Ok(false);
                }
                md.create_snap(id, origin)?;
                // The origin's blocks are shared now: no cached mapping of it may say they
                // are its own, in any table it has.
                self.mappings.clear_thin(origin);
                Ok(true)
            })?;
            if made {
                return Ok(());
            }
        }
    }

    /// The IO gate of a thin. One per thin id from the first open or snapshot until the
    /// thin is deleted, so a snapshot holds off the writes of every handle of its origin,
    /// those opened while it waits included (a gate that lived only as long as the open
    /// handles could be replaced by a new one, whose writers the snapshot would not see).
    /// Callers have seen the thin exist under a lock `delete` takes (the metadata lock or
    /// `open_thins`), so the gate is not made for a thin deleted meanwhile.
    fn io_gate(&self, id: ThinId) -> Arc<RwLock<()>> {
        self.io_gates.lock().entry(id).or_default().clone()
    }

    /// Deletes a thin. Refused while it is open.
    pub fn delete(&self, id: ThinId) -> Result<()> {
        tracing::debug!(thin_id = %id, "delete");
        let open = self.open_thins.lock();
        if open.contains_key(&id) {
            return Err(Error::ThinBusy(id));
        }
        let r = self.with_metadata(|md| {
            md.delete(id)?;
            // The id may come back as another thin, with a gate of its own.
            self.mappings.clear();
            self.io_gates.lock().remove(&id);
            Ok(())
        });
        drop(open);
        if r.is_ok() {
            self.after_free();
        }
        r
    }

    pub fn set_transaction_id(&self, old: u64, new: u64) -> Result<()> {
        self.with_metadata(|md| md.set_transaction_id(old, new))
    }

    pub fn reserve_metadata_snap(&self) -> Result<()> {
        self.check_writable()?;
        let gate = self.provisioning.write();
        self.sync_data_for_commit()?;
        // Not `with_metadata_space`: running out takes the provisioning gate this holds.
        if self.metadata_space_short(&self.md.lock()) {
            drop(gate);
            return Err(self.out_of_metadata_space());
        }
        self.with_metadata(|md| md.reserve_metadata_snap())?;
        self.pass_down_discards();
        drop(gate);
        Ok(())
    }

    pub fn release_metadata_snap(&self) -> Result<()> {
        self.check_writable()?;
        let _gate = self.provisioning.write();
        // Releasing commits: the data the mappings point at goes to disk first.
        self.sync_data_for_commit()?;
        self.with_metadata(|md| md.release_metadata_snap())?;
        self.pass_down_discards();
        Ok(())
    }

    /// Makes everything written so far durable: data first, then metadata (superblock last).
    /// Data blocks freed since the last commit go back to the data device afterwards.
    pub fn commit(&self) -> Result<()> {
        if let PoolMode::ReadOnly(why) = self.mode() {
            if self.lost_writes.load(std::sync::atomic::Ordering::Relaxed) {
                // Writes acknowledged before the failure are gone: a flush must not say
                // they are durable (the kernel errors such flushes too).
                return Err(Error::ReadOnly(format!(
                    "{why}; writes since the last commit were lost"
                )));
            }
            // Nothing can have changed since the pool went read-only; data still syncs.
            return self.data_dev.sync().map_err(|e| self.data_io_error(0, e));
        }
        let _gate = self.provisioning.write();
        self.check_writable()?;
        self.commit_locked(&mut self.md.lock())?;
        self.pass_down_discards();
        // Blocks freed by the transaction are allocatable now: wake queued writers.
        self.after_free();
        Ok(())
    }

    /// Commits the running transaction (the caller holds the provisioning gate for writing and
    /// the metadata lock). The data the new mappings point at must be durable before the
    /// superblock that records them: it is flushed once the metadata blocks are on their way.
    /// A failure goes through the failure policy before it is returned.
    fn commit_locked(&self, md: &mut Metadata) -> Result<()> {
        let mut data_flush_failed = false;
        let committed = md.commit_with(|| {
            self.data_dev.sync().map_err(|e| {
                data_flush_failed = true;
                self.data_io_error(0, e)
            })
        });
        committed.map_err(|e| {
            if data_flush_failed {
                self.data_flush_failed(md, e)
            } else {
                self.metadata_failed(md, &e);
                e
            }
        })
    }

    /// Gives freed blocks back to the data device. Called with the provisioning gate held
    /// for writing, right after a commit, so none of them can have been reused yet. A failed
    /// discard is logged, not returned: the commit before it is durable and the blocks are
    /// free either way; only the host does not get the space back (the kernel ignores a
    /// failed pass-down too, in `passdown_endio`).
    ///
    /// The lowest free blocks, up to [`PoolOptions::kept_free_bytes`], are kept: the
    /// allocator hands them out first, and a block reused where the device still holds it
    /// costs a plain overwrite, where a punched one must be allocated again by the host
    /// (for a file, a journal commit at the next flush: ~0.5 ms on the project's machine).
    /// A block freed above that window is given back at once; a kept block whose window
    /// moved past it (lower blocks were freed) is given back then. So the free blocks the
    /// device still holds never exceed the window, across reopens too (a pool opened takes
    /// its window as kept).
    fn pass_down_discards(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut md = self.md.lock();
        let freed = md.take_freed_data_blocks();
        if !self.options.discard_passdown {
            return;
        }
        let old_end = self.kept_free_end.load(Relaxed);
        let new_end = md.end_of_lowest_free_data(self.kept_free_blocks());
        self.kept_free_end.store(new_end, Relaxed);
        let mut pending: Vec<u64> = freed.into_iter().filter(|&b| b >= new_end).collect();
        // Free blocks the window let go: only when it moved down (lower blocks were freed).
        let mut next = new_end;
        while next < old_end {
            match md.next_free_data_block(next) {
                Some(b) if b < old_end => {
                    pending.push(b);
                    next = b + 1;
                }
                _ => break,
            }
        }
        if pending.is_empty() {
            return;
        }
        pending.sort_unstable();
        pending.dedup();
        let bs = self.block_size.bytes();
        let mut i = 0;
        while i < pending.len() {
            let start = pending[i];
            let mut end = start + 1;
            while i + 1 < pending.len() && pending[i + 1] == end {
                i += 1;
                end += 1;
            }
            i += 1;
            // A freed block cannot be reused before the commit that just ran, except one
            // allocated and freed within that same transaction: punching a live block would
            // lose data, so check.
            if (start..end).any(|b| md.data_block_count(b) != 0) {
                continue;
            }
            if let Err(e) = self.data_dev.discard(start * bs, (end - start) * bs) {
                let e = self.data_io_error(start * bs, e);
                tracing::warn!(error = %e, blocks = end - start, "discard pass-down failed");
            }
        }
    }

    /// How many of the lowest free data blocks the pool keeps on the data device rather
    /// than giving them back ([`PoolOptions::kept_free_bytes`] in blocks).
    pub fn kept_free_blocks(&self) -> u64 {
        kept_blocks(&self.options, self.block_size)
    }

    /// Blocks were freed: an out-of-space pool may have room again.
    pub(crate) fn after_free(&self) {
        let free = self.md.lock().free_data_blocks();
        if free > 0 && self.mode() == PoolMode::OutOfDataSpace {
            self.set_mode(PoolMode::ReadWrite);
        }
        if free > self.options.low_water_blocks {
            self.below_low_water
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        let _guard = self.space_lock.lock();
        self.space.notify_all();
    }

    /// Called after each data block allocation with the free count left.
    pub(crate) fn after_alloc(&self, free: u64) {
        let lwm = self.options.low_water_blocks;
        if lwm > 0
            && free <= lwm
            && !self
                .below_low_water
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                free_blocks = free,
                low_water_blocks = lwm,
                "data space below the low-water mark"
            );
            self.emit(PoolEvent::LowWater {
                free_blocks: free,
                low_water_blocks: lwm,
            });
        }
    }

    /// Waits (queue_if_no_space) until free data space may have appeared or `deadline`
    /// passes; returns false on timeout.
    pub(crate) fn wait_for_space(&self, deadline: std::time::Instant) -> bool {
        let mut guard = self.space_lock.lock();
        if self.md.lock().free_data_blocks() > 0 {
            return true;
        }
        !self.space.wait_until(&mut guard, deadline).timed_out()
    }

    /// Events (low-water crossings, out of space, read-only) from now on.
    pub fn subscribe(&self) -> std::sync::mpsc::Receiver<PoolEvent> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.subscribers.lock().push(tx);
        rx
    }

    pub(crate) fn emit(&self, event: PoolEvent) {
        self.subscribers
            .lock()
            .retain(|tx| tx.send(event.clone()).is_ok());
    }

    pub(crate) fn data_io_error(&self, offset: u64, source: std::io::Error) -> Error {
        Error::Io {
            role: DeviceRole::Data,
            device: self.data_dev.describe(),
            offset,
            source,
        }
    }

    // ---- sizes ---------------------------------------------------------------------------

    /// Grows the data space to the data device's size (grow the device first, or pass a
    /// new size for a sparse file, which is extended).
    pub fn resize_data(&self, new_size_bytes: Option<u64>) -> Result<()> {
        if let Some(size) = new_size_bytes {
            self.check_writable()?;
            self.data_dev
                .grow(size)
                .map_err(|e| self.data_io_error(size, e))?;
        }
        let nr = self.data_dev.size() / self.block_size.bytes();
        self.with_metadata(|md| md.resize_data(nr))?;
        self.commit()?;
        self.after_free();
        Ok(())
    }

    /// Grows the metadata space to the metadata device's size (extending a sparse file to
    /// `new_size_bytes` first when given).
    pub fn resize_metadata(&self, new_size_bytes: Option<u64>) -> Result<()> {
        if let Some(size) = new_size_bytes {
            self.check_writable()?;
            self.meta_dev.grow(size).map_err(|e| Error::Io {
                role: DeviceRole::Metadata,
                device: self.meta_dev.describe(),
                offset: size,
                source: e,
            })?;
        }
        let size = self.meta_dev.size();
        self.with_metadata(|md| md.resize_metadata(size))?;
        self.commit()
    }

    // ---- thins ---------------------------------------------------------------------------

    /// Opens a thin for IO. While any handle is open the thin cannot be deleted.
    pub fn open_thin(self: &Arc<Self>, id: ThinId) -> Result<Thin> {
        // `delete` holds this lock from its check for handles to the end: a thin that
        // exists here stays until the handle is closed.
        let mut open = self.open_thins.lock();
        if !self.md.lock().exists(id) {
            return Err(Error::NoSuchThin(id));
        }
        let entry = open.entry(id).or_insert_with(|| {
            (
                Arc::new(ThinGate {
                    io: self.io_gate(id),
                    table: self.mappings.new_table(id),
                }),
                0,
            )
        });
        entry.1 += 1;
        Ok(Thin::new(self.clone(), id, entry.0.clone()))
    }

    pub(crate) fn close_thin(&self, id: ThinId) {
        let mut open = self.open_thins.lock();
        if let Some(e) = open.get_mut(&id) {
            e.1 -= 1;
            if e.1 == 0 {
                e.0.table.release(&self.mappings);
                open.remove(&id);
            }
        }
    }

    /// Whether a thin has open handles.
    pub fn is_open(&self, id: ThinId) -> bool {
        self.open_thins.lock().contains_key(&id)
    }

    // ---- queries -------------------------------------------------------------------------

    pub fn thin_ids(&self) -> Vec<ThinId> {
        self.md.lock().devices().map(|(id, _)| id).collect()
    }

    pub fn thin_details(&self, id: ThinId) -> Result<crate::thin::metadata::DeviceDetails> {
        self.md.lock().device(id).copied()
    }

    pub fn exists(&self, id: ThinId) -> bool {
        self.md.lock().exists(id)
    }

    pub fn superblock(&self) -> Superblock {
        self.md.lock().superblock().clone()
    }

    pub fn status(&self) -> PoolStatus {
        let md = self.md.lock();
        let sb = md.superblock();
        let total_meta = md.nr_metadata_blocks();
        let mode = match self.mode() {
            PoolMode::ReadWrite => "rw",
            PoolMode::OutOfDataSpace => "out_of_data_space",
            PoolMode::ReadOnly(_) => "ro",
        };
        PoolStatus {
            transaction_id: sb.transaction_id,
            used_metadata_blocks: (total_meta - md.free_metadata_blocks()
                + Self::metadata_reserve(total_meta))
            .min(total_meta),
            total_metadata_blocks: total_meta,
            used_data_blocks: md.nr_data_blocks() - md.free_data_blocks(),
            total_data_blocks: md.nr_data_blocks(),
            held_root: (sb.held_root != 0).then_some(sb.held_root),
            mode: mode.to_string(),
            discard_passdown: self.options.discard_passdown,
            error_if_no_space: self.options.no_space == NoSpacePolicy::Error,
            needs_check: sb.needs_check(),
            metadata_low_watermark: (total_meta / 4).min(1024),
            data_block_sectors: self.block_size.sectors(),
            zero_new_blocks: self.options.zero_new_blocks,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if matches!(*self.mode.get_mut(), PoolMode::ReadOnly(_)) {
            return;
        }
        // Closing a pool commits what was written, like deactivating a kernel pool.
        if let Err(e) = self.commit() {
            tracing::error!(error = %e, "commit on close failed");
        }
    }
}
