//! One interface to a pool, whoever owns it.
//!
//! [`PoolControl`] is the pool-message vocabulary plus what a client needs besides: status,
//! the list of thins, byte IO and activation. [`Local`] implements it on a pool this process
//! opened (and owns); the daemon's client implements it by asking the daemon, whose server
//! answers with a [`Local`] of its own. Commands written against the trait therefore behave
//! the same either way.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::store::Volumes;
use crate::thin::pool::PoolStatus;
use crate::units::ThinId;
use crate::Thin;

/// One thin as a listing shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThinInfo {
    pub id: u64,
    pub name: Option<String>,
    /// `None` for an orphan: a thin in the pool without a record in the volume store.
    pub size_bytes: Option<u64>,
    pub mapped_blocks: u64,
    pub origin: Option<u64>,
    /// Where the thin is active, if it is.
    pub active: Option<Activation>,
}

/// An active thin: the block device the kernel sees, and what serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    pub id: u64,
    /// The block device (`/dev/loop3`, `/dev/mapper/...`).
    pub device: PathBuf,
    /// The file behind it on the userspace path (the thin served over FUSE).
    pub file: Option<PathBuf>,
    pub read_only: bool,
    /// Deactivation was asked for and waits for the device's last user to close it.
    pub deferred_removal: bool,
}

/// Status of a pool plus who answers for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlStatus {
    pub status: PoolStatus,
    pub thin_count: usize,
    /// `None` when the pool was opened by this process; the daemon's pid otherwise.
    pub daemon_pid: Option<u32>,
    /// The kernel's pool device (`/dev/mapper/thinbox-<hash>-pool`) when the kernel owns it.
    #[serde(default)]
    pub kernel_device: Option<PathBuf>,
}

/// What every owner of a pool answers to. Each change is committed before the call returns
/// (the kernel commits after every pool message; so do we).
pub trait PoolControl {
    fn status(&mut self) -> Result<ControlStatus>;
    fn list(&mut self) -> Result<Vec<ThinInfo>>;
    fn create_thin(&mut self, id: ThinId, size_bytes: u64, name: Option<&str>) -> Result<()>;
    /// Snapshots `origin` as `id` (with the origin's size).
    fn create_snap(&mut self, id: ThinId, origin: ThinId, name: Option<&str>) -> Result<()>;
    fn delete(&mut self, id: ThinId) -> Result<()>;
    /// Sets (`None`: clears) thin `id`'s name in the volume store, atomically; a name
    /// another thin has is refused with [`Error::InvalidArgument`].
    fn rename(&mut self, id: ThinId, name: Option<&str>) -> Result<()>;
    fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()>;
    fn reserve_metadata_snap(&mut self) -> Result<()>;
    fn release_metadata_snap(&mut self) -> Result<()>;
    /// Grows the data and/or metadata device to the given sizes (`None`: leave it).
    fn resize_pool(&mut self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<()>;
    /// Thin `id`'s virtual size from the volume store.
    fn size_of(&mut self, id: ThinId) -> Result<u64>;
    fn read(&mut self, id: ThinId, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn write(&mut self, id: ThinId, offset: u64, data: &[u8]) -> Result<()>;
    fn discard(&mut self, id: ThinId, offset: u64, len: u64) -> Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<()>;
    /// Makes thin `id` a block device and says where.
    fn activate(&mut self, id: ThinId, read_only: bool) -> Result<Activation>;
    /// Takes the block device away: refused with [`Error::Busy`] while something uses it,
    /// unless `deferred`, which removes it when its last user closes it.
    fn deactivate(&mut self, id: ThinId, deferred: bool) -> Result<()>;
}

/// A pool this process owns, with its volume store.
pub struct Local {
    volumes: Volumes,
    /// Handles kept open across IO calls (a stream of `read`s must not reopen the thin);
    /// shared with IO in flight outside the daemon's lock (see [`Self::io_handle`]).
    thins: HashMap<ThinId, Arc<Thin>>,
}

impl Local {
    pub fn new(volumes: Volumes) -> Local {
        Local {
            volumes,
            thins: HashMap::new(),
        }
    }

    pub fn volumes(&self) -> &Volumes {
        &self.volumes
    }

    /// A handle on thin `id` for the caller to keep (the daemon's activations).
    pub fn open_thin(&self, id: ThinId) -> Result<Thin> {
        self.volumes.volume(id)?;
        self.volumes.pool().open_thin(id)
    }

    fn thin(&mut self, id: ThinId) -> Result<&Arc<Thin>> {
        if !self.thins.contains_key(&id) {
            let thin = self.open_thin(id)?;
            self.thins.insert(id, Arc::new(thin));
        }
        Ok(&self.thins[&id])
    }

    /// A handle for `len` bytes of IO at `offset` in thin `id` (the range checked), for IO
    /// done without holding whatever lock guards this `Local`. While it is held the thin
    /// counts as open: deleting it is refused.
    pub fn io_handle(&mut self, id: ThinId, offset: u64, len: u64) -> Result<Arc<Thin>> {
        self.check_range(id, offset, len)?;
        self.thin(id).cloned()
    }

    /// Checks that `len` bytes at `offset` lie inside thin `id`.
    fn check_range(&self, id: ThinId, offset: u64, len: u64) -> Result<()> {
        let size = self.volumes.size_of(id)?;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::InvalidArgument(format!(
                "{len} bytes at offset {offset} go past the end of thin {id} ({size} bytes)"
            )));
        }
        Ok(())
    }

    fn commit(&self) -> Result<()> {
        self.volumes.pool().commit()
    }

    /// Drops the cached IO handle of `id` (before it is deleted).
    fn forget(&mut self, id: ThinId) {
        self.thins.remove(&id);
    }
}

impl PoolControl for Local {
    fn status(&mut self) -> Result<ControlStatus> {
        let pool = self.volumes.pool();
        Ok(ControlStatus {
            status: pool.status(),
            thin_count: pool.thin_ids().len(),
            daemon_pid: None,
            kernel_device: None,
        })
    }

    fn list(&mut self) -> Result<Vec<ThinInfo>> {
        let pool = self.volumes.pool();
        let mut rows = Vec::new();
        for id in pool.thin_ids() {
            let details = pool.thin_details(id)?;
            let record = self.volumes.store().get(id);
            rows.push(ThinInfo {
                id: id.get(),
                name: record.and_then(|v| v.name.clone()),
                size_bytes: record.map(|v| v.size_bytes),
                mapped_blocks: details.mapped_blocks,
                origin: record.and_then(|v| v.origin).map(ThinId::get),
                active: None,
            });
        }
        Ok(rows)
    }

    fn create_thin(&mut self, id: ThinId, size_bytes: u64, name: Option<&str>) -> Result<()> {
        self.volumes.create_thin(id, size_bytes, name)?;
        self.commit()
    }

    fn create_snap(&mut self, id: ThinId, origin: ThinId, name: Option<&str>) -> Result<()> {
        self.volumes.snapshot(id, origin, name)?;
        self.commit()
    }

    fn delete(&mut self, id: ThinId) -> Result<()> {
        self.forget(id);
        self.volumes.delete(id)?;
        self.commit()
    }

    fn rename(&mut self, id: ThinId, name: Option<&str>) -> Result<()> {
        self.volumes.rename(id, name)
    }

    fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()> {
        self.volumes.pool().set_transaction_id(old, new)?;
        self.commit()
    }

    fn reserve_metadata_snap(&mut self) -> Result<()> {
        self.volumes.pool().reserve_metadata_snap()?;
        self.commit()
    }

    fn release_metadata_snap(&mut self) -> Result<()> {
        self.volumes.pool().release_metadata_snap()?;
        self.commit()
    }

    fn resize_pool(&mut self, data_bytes: Option<u64>, metadata_bytes: Option<u64>) -> Result<()> {
        let pool = self.volumes.pool();
        if let Some(bytes) = data_bytes {
            pool.resize_data(Some(bytes))?;
        }
        if let Some(bytes) = metadata_bytes {
            pool.resize_metadata(Some(bytes))?;
        }
        self.commit()
    }

    fn size_of(&mut self, id: ThinId) -> Result<u64> {
        self.volumes.size_of(id)
    }

    fn read(&mut self, id: ThinId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(id, offset, buf.len() as u64)?;
        self.thin(id)?.read(buf, offset)
    }

    fn write(&mut self, id: ThinId, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(id, offset, data.len() as u64)?;
        self.thin(id)?.write(data, offset)
    }

    fn discard(&mut self, id: ThinId, offset: u64, len: u64) -> Result<()> {
        self.check_range(id, offset, len)?;
        self.thin(id)?.discard(offset, len)
    }

    fn flush(&mut self) -> Result<()> {
        self.commit()
    }

    fn activate(&mut self, _id: ThinId, _read_only: bool) -> Result<Activation> {
        Err(Error::Activation(
            "activation needs the pool daemon or the kernel (dmtool pool start)".to_string(),
        ))
    }

    fn deactivate(&mut self, id: ThinId, _deferred: bool) -> Result<()> {
        Err(Error::Activation(format!(
            "thin {id} is not active: no pool daemon runs for this pool"
        )))
    }
}
