//! The volume store: thin sizes and names, kept beside the pool.
//!
//! dm-thin metadata knows which thin ids exist and what they map, nothing more: the kernel
//! keeps a thin's virtual size in its table, and nothing keeps a name. This module keeps both
//! in a small JSON file beside the pool (`DIR/volumes.json` for a pool directory; callers
//! choose a state directory for pools on named devices) and keeps it consistent with the pool
//! across crashes. The pool stays the single source of truth for which thin ids exist; the
//! store only adds facts about them, and never creates or deletes a thin on its own.
//!
//! # The file
//!
//! ```json
//! { "version": 1, "transaction_id": 7, "zero_new_blocks": true,
//!   "volumes": [ { "id": 1, "size_bytes": 1073741824, "name": "base", "origin": null } ],
//!   "pending": { "op": "create", "id": 2, "size_bytes": 1073741824, "name": null,
//!                "origin": 1 } }
//! ```
//!
//! `transaction_id` is the pool's transaction id after the last change the store recorded.
//! `zero_new_blocks` is the pool's zeroing choice, made at create time (the kernel keeps it
//! in the table, not in the metadata). `error_if_no_space` and `low_water_blocks` are the
//! other table options (`dmtool pool set`); like zeroing they are read when the pool is
//! opened or started, by this process, the daemon or the kernel activation.
//! `kept_free_bytes` (`pool set --keep-free`) is ours alone: how much freed space the
//! userspace pool keeps on its data device for reuse. Every write is atomic: a temporary
//! file in the same directory, fsync, rename over the store, fsync the directory. A missing
//! file is an empty store; a damaged one is an [`Error::Store`], never a panic.
//!
//! # Protocol for a change
//!
//! With `n` the pool's transaction id (equal to the store's, since every open reconciles):
//! 1. write the store with the change as the `pending` intent (its transaction id still `n`);
//! 2. do the pool operation, `set_transaction_id(n, n + 1)`, commit;
//! 3. write the store with the change applied, `pending` cleared, transaction id `n + 1`.
//!
//! Renames and resizes change nothing in the pool but still bump its transaction id, so every
//! change is decided the same way. If the pool refuses the operation (the id exists, the pool
//! is read-only) the pool is still at `n` and the intent is dropped at once. If anything fails
//! after the pool operation succeeded, the intent stays pending and the next reconcile decides.
//!
//! # Reconcile
//!
//! [`VolumeStore::reconcile`] runs on every open. A pending intent is applied when the pool is
//! at the store's transaction id + 1 (step 2 committed) and dropped when it is at the store's
//! (it did not), except that a create whose thin exists, or a delete whose thin is gone, is
//! applied at the store's id too: our engine makes the operation and the new id one commit, but
//! the kernel commits after every pool message, so a crash between `create_thin` (or `delete`)
//! and `set_transaction_id` leaves exactly that (see `activate::kernel_control`). When the
//! pool's id is anything else, someone else changed the pool: a create is applied if the thin
//! exists, a delete if it does not, a rename or resize is dropped. Then
//! ids are cross-checked: thins without a record are reported as orphans (kept; their size is
//! unknown), records without a thin are dropped and reported. The store is written only when
//! something changed, and never for a pool opened read-only.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::thin::files::{self, NewPool, PoolPaths};
use crate::thin::pool::{NoSpacePolicy, Pool, PoolOptions};
use crate::units::{format_size, ThinId, SECTOR_SIZE};

/// The store's file name inside a pool directory or a state directory.
pub const STORE_FILE_NAME: &str = "volumes.json";

/// The file format's version; a store with any other version is refused.
const FORMAT_VERSION: u32 = 1;

/// Longest name, in bytes. Names may become device-mapper device names one day, and the
/// kernel's `DM_NAME_LEN` is 128 including the terminating NUL.
pub const MAX_NAME_BYTES: usize = 127;

/// What the store knows about one thin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// The thin's id in the pool.
    #[serde(with = "thin_id_serde")]
    pub id: ThinId,
    /// Virtual size in bytes: a multiple of 512 and never zero.
    pub size_bytes: u64,
    /// An optional unique name (see [`check_name`]).
    #[serde(default)]
    pub name: Option<String>,
    /// The thin it was created as a snapshot of, if any (that thin may since be deleted).
    #[serde(default, with = "opt_thin_id_serde")]
    pub origin: Option<ThinId>,
}

/// A change recorded before the pool is touched (step 1 of the protocol).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Intent {
    /// A new thin (`origin: None`) or a snapshot of `origin`.
    Create {
        #[serde(with = "thin_id_serde")]
        id: ThinId,
        size_bytes: u64,
        #[serde(default)]
        name: Option<String>,
        #[serde(default, with = "opt_thin_id_serde")]
        origin: Option<ThinId>,
    },
    /// Deleting a thin (its record too, if it has one).
    Delete {
        #[serde(with = "thin_id_serde")]
        id: ThinId,
    },
    /// Setting or clearing a name.
    Rename {
        #[serde(with = "thin_id_serde")]
        id: ThinId,
        #[serde(default)]
        name: Option<String>,
    },
    /// Changing a virtual size (a shrink discards the tail first).
    Resize {
        #[serde(with = "thin_id_serde")]
        id: ThinId,
        size_bytes: u64,
    },
}

impl Intent {
    /// The thin the intent is about.
    pub fn id(&self) -> ThinId {
        match self {
            Intent::Create { id, .. }
            | Intent::Delete { id }
            | Intent::Rename { id, .. }
            | Intent::Resize { id, .. } => *id,
        }
    }
}

impl fmt::Display for Intent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Intent::Create {
                id,
                size_bytes,
                origin,
                ..
            } => match origin {
                Some(o) => write!(f, "snapshot thin {id} of thin {o}")?,
                None => write!(f, "create thin {id} of {}", format_size(*size_bytes))?,
            },
            Intent::Delete { id } => write!(f, "delete thin {id}")?,
            Intent::Rename { id, name } => match name {
                Some(n) => write!(f, "rename thin {id} to {n:?}")?,
                None => write!(f, "clear the name of thin {id}")?,
            },
            Intent::Resize { id, size_bytes } => {
                write!(f, "resize thin {id} to {}", format_size(*size_bytes))?
            }
        }
        if let Intent::Create { name: Some(n), .. } = self {
            write!(f, " named {n:?}")?;
        }
        Ok(())
    }
}

/// What reconcile did with an intent it found pending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingOutcome {
    pub intent: Intent,
    /// Whether the change was applied to the records (else it was dropped).
    pub applied: bool,
    /// Why, in a few words: the pool's transaction id, or what the pool shows.
    pub reason: String,
}

/// What [`VolumeStore::reconcile`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// The intent a crash (or a failure) left pending, and its fate.
    pub pending: Option<PendingOutcome>,
    /// Thins in the pool without a record: kept, but their size is unknown. Sorted.
    pub orphans: Vec<ThinId>,
    /// Records whose thin is not in the pool: dropped from the store. Sorted by id.
    pub dropped: Vec<Volume>,
    /// `(store, pool)` transaction ids when they differed beyond what a pending intent
    /// explains: someone else changed the pool.
    pub transaction_id_moved: Option<(u64, u64)>,
    /// Whether the store file was rewritten.
    pub written: bool,
}

impl ReconcileReport {
    /// Nothing was found: no pending intent, no orphans, no dropped records.
    pub fn is_clean(&self) -> bool {
        self.pending.is_none()
            && self.orphans.is_empty()
            && self.dropped.is_empty()
            && self.transaction_id_moved.is_none()
    }
}

/// What reconciling needs to know about a pool: its committed transaction id and thin ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolView {
    pub transaction_id: u64,
    pub thin_ids: BTreeSet<ThinId>,
    /// The store is then reconciled in memory only (never written).
    pub read_only: bool,
}

impl PoolView {
    /// The view of a pool our engine opened.
    pub fn of(pool: &Pool) -> PoolView {
        PoolView {
            transaction_id: pool.superblock().transaction_id,
            thin_ids: pool.thin_ids().into_iter().collect(),
            read_only: pool.options().read_only,
        }
    }
}

/// The file as it is on disk, before validation.
#[derive(Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    #[serde(default)]
    transaction_id: Option<u64>,
    #[serde(default)]
    zero_new_blocks: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error_if_no_space: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    low_water_blocks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kept_free_bytes: Option<u64>,
    #[serde(default)]
    volumes: Vec<Volume>,
    #[serde(default)]
    pending: Option<Intent>,
}

/// The records of one pool's thins, as loaded from (and saved to) one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeStore {
    path: PathBuf,
    transaction_id: Option<u64>,
    zero_new_blocks: Option<bool>,
    error_if_no_space: Option<bool>,
    low_water_blocks: Option<u64>,
    kept_free_bytes: Option<u64>,
    volumes: BTreeMap<ThinId, Volume>,
    pending: Option<Intent>,
}

/// The pool's table options kept in the store (dm-thin keeps them in the pool's table line,
/// not in the metadata). `None` leaves the opener's choice (the defaults).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PoolSettings {
    /// Zero the rest of newly provisioned blocks (off: the kernel's `skip_block_zeroing`).
    pub zero_new_blocks: Option<bool>,
    /// Fail writes at once when the data device is full (`error_if_no_space`), or queue
    /// them (`queue_if_no_space`, the kernel's default).
    pub error_if_no_space: Option<bool>,
    /// Free data blocks at or below which the low-water event is raised (the table's
    /// `low_water_mark`).
    pub low_water_blocks: Option<u64>,
    /// Free data space kept allocated on the data device for reuse
    /// ([`PoolOptions::kept_free_bytes`]; not a kernel option: the kernel gives back only
    /// what a thin discards).
    pub kept_free_bytes: Option<u64>,
}

impl PoolSettings {
    /// `options` with every setting that is set applied.
    pub fn apply(&self, mut options: PoolOptions) -> PoolOptions {
        if let Some(zero) = self.zero_new_blocks {
            options.zero_new_blocks = zero;
        }
        if let Some(error) = self.error_if_no_space {
            options.no_space = if error {
                NoSpacePolicy::Error
            } else {
                NoSpacePolicy::Queue {
                    timeout: NoSpacePolicy::DEFAULT_QUEUE_TIMEOUT,
                }
            };
        }
        if let Some(mark) = self.low_water_blocks {
            options.low_water_blocks = mark;
        }
        if let Some(kept) = self.kept_free_bytes {
            options.kept_free_bytes = kept;
        }
        options
    }
}

fn store_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Store {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Checks a name: 1 to [`MAX_NAME_BYTES`] bytes, no `/`, no whitespace or control
/// characters, and not all digits (so a name can never be mistaken for an id).
pub fn check_name(name: &str) -> Result<()> {
    let why = if name.is_empty() {
        "is empty"
    } else if name.len() > MAX_NAME_BYTES {
        "is longer than 127 bytes"
    } else if name.contains('/') {
        "contains '/'"
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "contains whitespace or control characters"
    } else if name.bytes().all(|b| b.is_ascii_digit()) {
        "is all digits (reserved for thin ids)"
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument(format!("name {name:?} {why}")))
}

/// Checks a virtual size: not zero, a whole number of 512-byte sectors (the unit of the
/// kernel's tables).
// `u64::is_multiple_of` needs Rust 1.87; the workspace promises 1.80.
#[allow(clippy::manual_is_multiple_of)]
pub fn check_size(size_bytes: u64) -> Result<()> {
    if size_bytes == 0 || size_bytes % SECTOR_SIZE != 0 {
        return Err(Error::InvalidArgument(format!(
            "thin size {size_bytes} bytes is not a positive multiple of 512"
        )));
    }
    Ok(())
}

impl VolumeStore {
    /// An empty store that will live at `path` (nothing is written yet).
    pub fn new(path: &Path) -> VolumeStore {
        VolumeStore {
            path: path.to_path_buf(),
            transaction_id: None,
            zero_new_blocks: None,
            error_if_no_space: None,
            low_water_blocks: None,
            kept_free_bytes: None,
            volumes: BTreeMap::new(),
            pending: None,
        }
    }

    /// The store for a pool directory: `DIR/volumes.json`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(STORE_FILE_NAME)
    }

    /// Reads the store at `path`. A missing file is an empty store. Unreadable, damaged or
    /// inconsistent contents (duplicate ids or names, bad sizes, an unknown version) are an
    /// [`Error::Store`].
    pub fn load(path: &Path) -> Result<VolumeStore> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::new(path)),
            Err(e) => return Err(store_err(path, format!("cannot read it: {e}"))),
        };
        let file: StoreFile = serde_json::from_slice(&bytes).map_err(|e| {
            store_err(
                path,
                format!(
                    "not a valid volume store ({e}); move it away to start an empty one \
                     (thin sizes and names are then lost)"
                ),
            )
        })?;
        Self::from_file(path, file).map_err(|why| store_err(path, why))
    }

    fn from_file(path: &Path, file: StoreFile) -> Result<VolumeStore, String> {
        if file.version != FORMAT_VERSION {
            return Err(format!(
                "format version {} is not supported (this build reads {FORMAT_VERSION})",
                file.version
            ));
        }
        let mut store = VolumeStore::new(path);
        store.transaction_id = file.transaction_id;
        store.zero_new_blocks = file.zero_new_blocks;
        store.error_if_no_space = file.error_if_no_space;
        store.low_water_blocks = file.low_water_blocks;
        store.kept_free_bytes = file.kept_free_bytes;
        for v in file.volumes {
            check_size(v.size_bytes).map_err(|e| format!("thin {}: {e}", v.id))?;
            if let Some(name) = &v.name {
                check_name(name).map_err(|e| format!("thin {}: {e}", v.id))?;
                if let Some(other) = store.by_name(name) {
                    return Err(format!(
                        "thins {} and {} are both named {name:?}",
                        other.id, v.id
                    ));
                }
            }
            if store.volumes.contains_key(&v.id) {
                return Err(format!("thin {} has two records", v.id));
            }
            store.volumes.insert(v.id, v);
        }
        if let Some(intent) = &file.pending {
            let bad = |e: Error| format!("pending intent ({intent}): {e}");
            match intent {
                Intent::Create {
                    size_bytes, name, ..
                } => {
                    check_size(*size_bytes).map_err(bad)?;
                    name.as_deref().map(check_name).transpose().map_err(bad)?;
                }
                Intent::Rename { name, .. } => {
                    name.as_deref().map(check_name).transpose().map_err(bad)?;
                }
                Intent::Resize { size_bytes, .. } => check_size(*size_bytes).map_err(bad)?,
                Intent::Delete { .. } => {}
            }
            if file.transaction_id.is_none() {
                return Err(format!(
                    "pending intent ({intent}) without a transaction id"
                ));
            }
        }
        store.pending = file.pending;
        Ok(store)
    }

    /// Writes the store atomically: a temporary file beside it, fsync, rename over the old
    /// one, fsync the directory (created if missing). On `Ok` the new contents are durable.
    pub fn save(&self) -> Result<()> {
        let file = StoreFile {
            version: FORMAT_VERSION,
            transaction_id: self.transaction_id,
            zero_new_blocks: self.zero_new_blocks,
            error_if_no_space: self.error_if_no_space,
            low_water_blocks: self.low_water_blocks,
            kept_free_bytes: self.kept_free_bytes,
            volumes: self.volumes.values().cloned().collect(),
            pending: self.pending.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| store_err(&self.path, format!("cannot encode it: {e}")))?;
        bytes.push(b'\n');
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self
            .path
            .file_name()
            .ok_or_else(|| store_err(&self.path, "the path names no file"))?;
        let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
        let write = || -> io::Result<()> {
            fs::create_dir_all(&dir)?;
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &self.path)?;
            File::open(&dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            store_err(&self.path, format!("cannot write it: {e}"))
        })?;
        tracing::debug!(path = %self.path.display(), transaction_id = ?self.transaction_id,
            pending = ?self.pending, "volume store saved");
        Ok(())
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pool's transaction id after the last recorded change; `None` for a new store.
    pub fn transaction_id(&self) -> Option<u64> {
        self.transaction_id
    }

    /// The pool's zeroing choice recorded at create time, if any.
    pub fn zero_new_blocks(&self) -> Option<bool> {
        self.zero_new_blocks
    }

    /// The pool's table options recorded in the store.
    pub fn settings(&self) -> PoolSettings {
        PoolSettings {
            zero_new_blocks: self.zero_new_blocks,
            error_if_no_space: self.error_if_no_space,
            low_water_blocks: self.low_water_blocks,
            kept_free_bytes: self.kept_free_bytes,
        }
    }

    /// Records the settings that are set in `changes` (the others stay) and saves the store
    /// atomically. They take effect the next time the pool is opened or started.
    pub fn change_settings(&mut self, changes: PoolSettings) -> Result<()> {
        let mut next = self.clone();
        if let Some(z) = changes.zero_new_blocks {
            next.zero_new_blocks = Some(z);
        }
        if let Some(e) = changes.error_if_no_space {
            next.error_if_no_space = Some(e);
        }
        if let Some(m) = changes.low_water_blocks {
            next.low_water_blocks = Some(m);
        }
        if let Some(k) = changes.kept_free_bytes {
            next.kept_free_bytes = Some(k);
        }
        next.save()?;
        *self = next;
        Ok(())
    }

    /// The intent a crash or failure left pending (always `None` after a reconcile).
    pub fn pending(&self) -> Option<&Intent> {
        self.pending.as_ref()
    }

    /// Every record, by id.
    pub fn volumes(&self) -> impl Iterator<Item = &Volume> {
        self.volumes.values()
    }

    /// The record of thin `id`.
    pub fn get(&self, id: ThinId) -> Option<&Volume> {
        self.volumes.get(&id)
    }

    /// The record named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Volume> {
        self.volumes
            .values()
            .find(|v| v.name.as_deref() == Some(name))
    }

    /// Step 1 of the protocol for an owner that is not our engine (the kernel): records
    /// `intent` as pending at transaction id `n`, the pool's current one, which must be the
    /// store's too (reconcile first). On `Ok` the intent is durable.
    pub fn begin_intent(&mut self, intent: Intent, n: u64) -> Result<()> {
        if self.pending.is_some() || self.transaction_id != Some(n) {
            return Err(store_err(
                &self.path,
                format!(
                    "cannot record a change at transaction id {n}: the store is at {:?}{} \
                     (reconcile it first)",
                    self.transaction_id,
                    if self.pending.is_some() {
                        " with a change pending"
                    } else {
                        ""
                    }
                ),
            ));
        }
        self.pending = Some(intent);
        if let Err(e) = self.save() {
            self.pending = None;
            return Err(e);
        }
        Ok(())
    }

    /// Drops the pending intent: the pool refused the operation and did not change.
    pub fn abandon_intent(&mut self) -> Result<()> {
        if self.pending.take().is_some() {
            self.save()?;
        }
        Ok(())
    }

    /// Step 3: applies the pending intent, clears it and records `new_tid`.
    pub fn finish_intent(&mut self, new_tid: u64) -> Result<()> {
        if let Some(intent) = self.pending.take() {
            self.apply(&intent);
        }
        self.transaction_id = Some(new_tid);
        self.save()
    }

    fn apply(&mut self, intent: &Intent) {
        match intent.clone() {
            Intent::Create {
                id,
                size_bytes,
                name,
                origin,
            } => {
                self.volumes.insert(
                    id,
                    Volume {
                        id,
                        size_bytes,
                        name,
                        origin,
                    },
                );
            }
            Intent::Delete { id } => {
                self.volumes.remove(&id);
            }
            Intent::Rename { id, name } => {
                if let Some(v) = self.volumes.get_mut(&id) {
                    v.name = name;
                }
            }
            Intent::Resize { id, size_bytes } => {
                if let Some(v) = self.volumes.get_mut(&id) {
                    v.size_bytes = size_bytes;
                }
            }
        }
    }

    /// Brings the store in line with `pool` (see the module doc): decides a pending intent,
    /// drops records whose thin is gone, reports thins without a record. Writes the store
    /// when something changed, unless the pool was opened read-only (then the reconciled
    /// state is only in memory).
    pub fn reconcile(&mut self, pool: &Pool) -> Result<ReconcileReport> {
        self.reconcile_with(&PoolView::of(pool))
    }

    /// [`VolumeStore::reconcile`] against what is known of a pool some other owner (the
    /// kernel) holds: its transaction id and thin ids.
    pub fn reconcile_with(&mut self, pool: &PoolView) -> Result<ReconcileReport> {
        let pool_tid = pool.transaction_id;
        let mut report = ReconcileReport::default();
        let mut changed = false;
        let mut explained = false;
        if let Some(intent) = self.pending.take() {
            changed = true;
            let store_tid = self.transaction_id.unwrap_or(pool_tid);
            let (applied, reason) = if store_tid.checked_add(1) == Some(pool_tid) {
                explained = true;
                (
                    true,
                    format!("the pool committed it (transaction id {pool_tid})"),
                )
            } else if store_tid == pool_tid {
                explained = true;
                let exists = pool.thin_ids.contains(&intent.id());
                match intent {
                    Intent::Create { .. } if exists => (
                        true,
                        format!(
                            "the pool made the thin but its transaction id stayed at {pool_tid}"
                        ),
                    ),
                    Intent::Delete { .. } if !exists => (
                        true,
                        format!(
                            "the pool deleted the thin but its transaction id stayed at \
                             {pool_tid}"
                        ),
                    ),
                    _ => (
                        false,
                        format!("the pool never committed it (transaction id {pool_tid})"),
                    ),
                }
            } else {
                let exists = pool.thin_ids.contains(&intent.id());
                let (applied, what) = match intent {
                    Intent::Create { .. } if exists => (true, "the thin exists"),
                    Intent::Create { .. } => (false, "the thin does not exist"),
                    Intent::Delete { .. } if exists => (false, "the thin still exists"),
                    Intent::Delete { .. } => (true, "the thin is gone"),
                    Intent::Rename { .. } | Intent::Resize { .. } => {
                        (false, "the pool cannot tell whether it happened")
                    }
                };
                let reason = format!(
                    "the pool's transaction id is {pool_tid}, not {store_tid} or {}, and {what}",
                    store_tid.saturating_add(1)
                );
                (applied, reason)
            };
            if applied {
                self.apply(&intent);
            }
            report.pending = Some(PendingOutcome {
                intent,
                applied,
                reason,
            });
        }
        if self.transaction_id != Some(pool_tid) {
            if let (Some(old), false) = (self.transaction_id, explained) {
                report.transaction_id_moved = Some((old, pool_tid));
            }
            self.transaction_id = Some(pool_tid);
            changed = true;
        }
        let in_pool = &pool.thin_ids;
        report.orphans = in_pool
            .iter()
            .filter(|id| !self.volumes.contains_key(id))
            .copied()
            .collect();
        let gone: Vec<ThinId> = self
            .volumes
            .keys()
            .filter(|id| !in_pool.contains(id))
            .copied()
            .collect();
        for id in gone {
            if let Some(v) = self.volumes.remove(&id) {
                report.dropped.push(v);
                changed = true;
            }
        }
        if changed && !pool.read_only {
            self.save()?;
            report.written = true;
        }
        if !report.is_clean() {
            tracing::debug!(?report, "volume store reconciled");
        }
        Ok(report)
    }
}

/// A pool together with its volume store: the changes dmtool and the runtime make, each
/// following the store's protocol (module doc), so callers stay thin.
pub struct Volumes {
    pool: Arc<Pool>,
    store: VolumeStore,
    report: ReconcileReport,
}

impl Volumes {
    /// Formats a new pool (see [`files::create`]) and writes an empty store at `store_path`
    /// recording `options.zero_new_blocks`, replacing any store there.
    pub fn create(
        paths: &PoolPaths,
        store_path: &Path,
        new: NewPool,
        options: PoolOptions,
    ) -> Result<Volumes> {
        let pool = files::create(paths, new, options)?;
        // Commit the empty pool before the store names its transaction id.
        pool.commit()?;
        let mut store = VolumeStore::new(store_path);
        store.transaction_id = Some(pool.superblock().transaction_id);
        store.zero_new_blocks = Some(options.zero_new_blocks);
        store.save()?;
        Ok(Volumes {
            pool,
            store,
            report: ReconcileReport::default(),
        })
    }

    /// Opens a pool (see [`files::open`]; for writing it takes the ownership lock), loads its
    /// store and reconciles the two. The settings the store records (zeroing, no-space
    /// policy, low-water mark) override `options`.
    pub fn open(paths: &PoolPaths, store_path: &Path, options: PoolOptions) -> Result<Volumes> {
        let options = VolumeStore::load(store_path)?.settings().apply(options);
        let pool = files::open(paths, options)?;
        // Read again: only now, as the pool's owner, is the store ours to trust and change.
        let store = VolumeStore::load(store_path)?;
        Volumes::attach(pool, store)
    }

    /// Pairs an open pool with a loaded store and reconciles them.
    pub fn attach(pool: Arc<Pool>, mut store: VolumeStore) -> Result<Volumes> {
        let report = store.reconcile(&pool)?;
        Ok(Volumes {
            pool,
            store,
            report,
        })
    }

    /// Records the pool's table options in the store (see [`VolumeStore::change_settings`]);
    /// the pool open now keeps the options it was opened with.
    pub fn change_settings(&mut self, changes: PoolSettings) -> Result<()> {
        self.store.change_settings(changes)
    }

    /// The pool. Changing thins through it directly bypasses the store (the next reconcile
    /// reports them as orphans or drops their records).
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The records.
    pub fn store(&self) -> &VolumeStore {
        &self.store
    }

    /// What the reconcile at open found.
    pub fn reconcile_report(&self) -> &ReconcileReport {
        &self.report
    }

    /// The pool and the store, for callers that manage them separately.
    pub fn into_parts(self) -> (Arc<Pool>, VolumeStore) {
        (self.pool, self.store)
    }

    /// The record of thin `id`. [`Error::NoSuchThin`] when the pool has no such thin; an
    /// [`Error::Store`] when the thin is an orphan (in the pool, without a record).
    pub fn volume(&self, id: ThinId) -> Result<&Volume> {
        match self.store.get(id) {
            Some(v) => Ok(v),
            None if self.pool.exists(id) => Err(store_err(
                self.store.path(),
                format!("thin {id} has no record (an orphan: its size is unknown)"),
            )),
            None => Err(Error::NoSuchThin(id)),
        }
    }

    /// Thin `id`'s virtual size in bytes (errors as [`Volumes::volume`]).
    pub fn size_of(&self, id: ThinId) -> Result<u64> {
        self.volume(id).map(|v| v.size_bytes)
    }

    fn check_new_name(&self, id: ThinId, name: Option<&str>) -> Result<()> {
        let Some(name) = name else { return Ok(()) };
        check_name(name)?;
        match self.store.by_name(name) {
            Some(other) if other.id != id => Err(Error::InvalidArgument(format!(
                "name {name:?} is taken by thin {}",
                other.id
            ))),
            _ => Ok(()),
        }
    }

    /// Creates thin `id` of `size_bytes` (a positive multiple of 512), optionally named.
    pub fn create_thin(&mut self, id: ThinId, size_bytes: u64, name: Option<&str>) -> Result<()> {
        check_size(size_bytes)?;
        self.check_new_name(id, name)?;
        if self.pool.exists(id) {
            return Err(Error::ThinExists(id));
        }
        let intent = Intent::Create {
            id,
            size_bytes,
            name: name.map(str::to_owned),
            origin: None,
        };
        self.change(intent, |pool| pool.create_thin(id))
    }

    /// Snapshots `origin` as `id`, with the origin's size. The origin needs a record.
    pub fn snapshot(&mut self, id: ThinId, origin: ThinId, name: Option<&str>) -> Result<()> {
        let size_bytes = self.size_of(origin)?;
        self.check_new_name(id, name)?;
        if self.pool.exists(id) {
            return Err(Error::ThinExists(id));
        }
        let intent = Intent::Create {
            id,
            size_bytes,
            name: name.map(str::to_owned),
            origin: Some(origin),
        };
        self.change(intent, |pool| pool.create_snap(id, origin))
    }

    /// Deletes thin `id` and its record. Orphans (thins without a record) can be deleted too.
    pub fn delete(&mut self, id: ThinId) -> Result<()> {
        if !self.pool.exists(id) {
            return Err(Error::NoSuchThin(id));
        }
        self.change(Intent::Delete { id }, |pool| pool.delete(id))
    }

    /// Sets (or with `None` clears) thin `id`'s name.
    pub fn rename(&mut self, id: ThinId, name: Option<&str>) -> Result<()> {
        self.volume(id)?;
        self.check_new_name(id, name)?;
        let intent = Intent::Rename {
            id,
            name: name.map(str::to_owned),
        };
        self.change(intent, |_| Ok(()))
    }

    /// Changes thin `id`'s virtual size. Shrinking discards everything past the new end,
    /// so growing again later reads zeros there.
    pub fn resize(&mut self, id: ThinId, size_bytes: u64) -> Result<()> {
        check_size(size_bytes)?;
        let old = self.size_of(id)?;
        let intent = Intent::Resize { id, size_bytes };
        self.change(intent, |pool| {
            if size_bytes < old {
                pool.open_thin(id)?.discard(size_bytes, old - size_bytes)?;
            }
            Ok(())
        })
    }

    /// Runs the protocol for one change (module doc).
    fn change(
        &mut self,
        intent: Intent,
        pool_op: impl FnOnce(&Arc<Pool>) -> Result<()>,
    ) -> Result<()> {
        tracing::debug!(%intent, "volume change");
        let n = self.begin(&intent)?;
        if let Err(e) = pool_op(&self.pool) {
            // The pool refused or failed before its transaction id moved, so reconcile drops
            // the intent. If even that cannot be written, the intent stays pending on disk and
            // the next open drops it the same way; the pool's error is the one to report.
            if let Err(cleanup) = self.store.reconcile(&self.pool) {
                tracing::warn!(error = %cleanup, "could not clear a refused volume change");
            }
            return Err(e);
        }
        self.commit_pool(n)?;
        self.finish(&intent, n + 1)
    }

    /// Step 1: records the intent. Returns the pool's transaction id `n`.
    fn begin(&mut self, intent: &Intent) -> Result<u64> {
        let n = self.pool.superblock().transaction_id;
        if self.store.pending.is_some() || self.store.transaction_id != Some(n) {
            // An earlier change failed half way, or the pool was changed behind our back.
            self.store.reconcile(&self.pool)?;
        }
        if n == u64::MAX {
            return Err(Error::InvalidArgument(
                "the pool's transaction id is at its maximum".into(),
            ));
        }
        self.store.pending = Some(intent.clone());
        if let Err(e) = self.store.save() {
            self.store.pending = None;
            return Err(e);
        }
        Ok(n)
    }

    /// Step 2 (after the pool operation): bump the transaction id and commit.
    fn commit_pool(&self, n: u64) -> Result<()> {
        self.pool.set_transaction_id(n, n + 1)?;
        self.pool.commit()
    }

    /// Step 3: applies the change to the records and clears the intent.
    fn finish(&mut self, intent: &Intent, new_tid: u64) -> Result<()> {
        self.store.apply(intent);
        self.store.pending = None;
        self.store.transaction_id = Some(new_tid);
        self.store.save()
    }
}

/// Thin ids go through [`ThinId::new`] when read, like every other door into the type.
mod thin_id_serde {
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    use crate::units::ThinId;

    pub fn serialize<S: Serializer>(id: &ThinId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(id.get())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ThinId, D::Error> {
        let raw = u64::deserialize(d)?;
        ThinId::new(raw).ok_or_else(|| {
            D::Error::custom(format!(
                "thin id {raw} is out of range (ids are 0..=16777215)"
            ))
        })
    }
}

mod opt_thin_id_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::units::ThinId;

    pub fn serialize<S: Serializer>(id: &Option<ThinId>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.serialize_some(&id.get()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ThinId>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::thin_id_serde")] ThinId);
        Ok(Option::<Wrap>::deserialize(d)?.map(|Wrap(id)| id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{BlockDevice, MemDevice};
    use crate::units::DataBlockSize;

    fn id(n: u64) -> ThinId {
        ThinId::new(n).unwrap()
    }

    fn mem_pool() -> Arc<Pool> {
        let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20));
        let data: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
        Pool::format(meta, data, DataBlockSize::DEFAULT, PoolOptions::default()).unwrap()
    }

    fn store_path(dir: &tempfile::TempDir) -> PathBuf {
        VolumeStore::path_in(dir.path())
    }

    fn fresh(dir: &tempfile::TempDir) -> Volumes {
        let pool = mem_pool();
        pool.commit().unwrap();
        Volumes::attach(pool, VolumeStore::new(&store_path(dir))).unwrap()
    }

    /// What a process opening the pool after a crash sees: the store as it is on disk.
    fn reopen(v: Volumes) -> (Volumes, ReconcileReport) {
        let (pool, store) = v.into_parts();
        let store = VolumeStore::load(store.path()).unwrap();
        let v = Volumes::attach(pool, store).unwrap();
        let report = v.reconcile_report().clone();
        (v, report)
    }

    #[test]
    fn store_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = VolumeStore::new(&store_path(&dir));
        s.transaction_id = Some(7);
        s.zero_new_blocks = Some(false);
        s.apply(&Intent::Create {
            id: id(1),
            size_bytes: 1 << 30,
            name: Some("base".into()),
            origin: None,
        });
        s.apply(&Intent::Create {
            id: id(16_777_215),
            size_bytes: 1 << 30,
            name: None,
            origin: Some(id(1)),
        });
        s.pending = Some(Intent::Resize {
            id: id(1),
            size_bytes: 2 << 30,
        });
        s.save().unwrap();
        assert_eq!(VolumeStore::load(s.path()).unwrap(), s);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [STORE_FILE_NAME], "no temporary file is left behind");
    }

    #[test]
    fn settings_are_saved_and_applied_to_the_options() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = VolumeStore::new(&store_path(&dir));
        store.save().unwrap();
        let changes = PoolSettings {
            zero_new_blocks: Some(false),
            error_if_no_space: Some(false),
            low_water_blocks: Some(16),
            kept_free_bytes: Some(0),
        };
        store.change_settings(changes).unwrap();
        store
            .change_settings(PoolSettings {
                low_water_blocks: Some(32),
                ..PoolSettings::default()
            })
            .unwrap();
        let loaded = VolumeStore::load(&store_path(&dir)).unwrap();
        let want = PoolSettings {
            low_water_blocks: Some(32),
            ..changes
        };
        assert_eq!(loaded.settings(), want);
        let options = loaded.settings().apply(PoolOptions::default());
        assert!(!options.zero_new_blocks);
        assert_eq!(options.low_water_blocks, 32);
        assert_eq!(options.kept_free_bytes, 0);
        assert!(matches!(options.no_space, NoSpacePolicy::Queue { .. }));
        // Unset settings leave the opener's choice.
        let defaults = PoolSettings::default().apply(PoolOptions::default());
        assert_eq!(defaults, PoolOptions::default());
    }

    #[test]
    fn missing_store_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let s = VolumeStore::load(&store_path(&dir)).unwrap();
        assert_eq!(s.volumes().count(), 0);
        assert_eq!(s.transaction_id(), None);
    }

    #[test]
    fn damaged_store_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = store_path(&dir);
        let bad = [
            "",
            "{",
            "[]",
            r#"{"version": 2}"#,
            r#"{"version": 1, "volumes": [{"id": 16777216, "size_bytes": 512}]}"#,
            r#"{"version": 1, "volumes": [{"id": 1, "size_bytes": 0}]}"#,
            r#"{"version": 1, "volumes": [{"id": 1, "size_bytes": 513}]}"#,
            r#"{"version": 1, "volumes": [{"id": 1, "size_bytes": 512},
                                          {"id": 1, "size_bytes": 512}]}"#,
            r#"{"version": 1, "volumes": [{"id": 1, "size_bytes": 512, "name": "a"},
                                          {"id": 2, "size_bytes": 512, "name": "a"}]}"#,
            r#"{"version": 1, "volumes": [{"id": 1, "size_bytes": 512, "name": "12"}]}"#,
            r#"{"version": 1, "pending": {"op": "delete", "id": 1}}"#,
            r#"{"version": 1, "transaction_id": 1, "pending": {"op": "explode", "id": 1}}"#,
        ];
        for text in bad {
            fs::write(&path, text).unwrap();
            match VolumeStore::load(&path) {
                Err(Error::Store { path: p, message }) => {
                    assert_eq!(p, path.display().to_string());
                    assert!(!message.is_empty());
                }
                other => panic!("{text:?} loaded as {other:?}"),
            }
        }
    }

    #[test]
    fn changes_bump_the_transaction_id_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = fresh(&dir);
        v.create_thin(id(1), 1 << 20, Some("base")).unwrap();
        v.snapshot(id(2), id(1), Some("snap")).unwrap();
        v.rename(id(2), None).unwrap();
        v.resize(id(1), 4 << 20).unwrap();
        v.create_thin(id(3), 512, None).unwrap();
        v.delete(id(3)).unwrap();
        assert_eq!(v.pool().superblock().transaction_id, 6);
        let (v, report) = reopen(v);
        assert!(report.is_clean(), "{report:?}");
        assert!(!report.written);
        assert_eq!(v.store().transaction_id(), Some(6));
        let vols: Vec<_> = v.store().volumes().cloned().collect();
        assert_eq!(
            vols,
            [
                Volume {
                    id: id(1),
                    size_bytes: 4 << 20,
                    name: Some("base".into()),
                    origin: None
                },
                Volume {
                    id: id(2),
                    size_bytes: 1 << 20,
                    name: None,
                    origin: Some(id(1))
                },
            ]
        );
        assert_eq!(v.size_of(id(2)).unwrap(), 1 << 20);
        assert!(matches!(v.size_of(id(3)), Err(Error::NoSuchThin(_))));
    }

    #[test]
    fn refused_changes_leave_nothing_pending() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = fresh(&dir);
        v.create_thin(id(1), 1 << 20, Some("base")).unwrap();
        assert!(matches!(
            v.create_thin(id(1), 1 << 20, None),
            Err(Error::ThinExists(_))
        ));
        assert!(matches!(
            v.create_thin(id(2), 1 << 20, Some("base")),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            v.create_thin(id(2), 1000, None),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            v.snapshot(id(2), id(9), None),
            Err(Error::NoSuchThin(_))
        ));
        assert!(matches!(v.delete(id(9)), Err(Error::NoSuchThin(_))));
        // Refused by the pool itself, after the intent was written: the thin is open.
        let thin = v.pool().open_thin(id(1)).unwrap();
        assert!(matches!(v.delete(id(1)), Err(Error::ThinBusy(_))));
        drop(thin);
        assert_eq!(v.store().pending(), None);
        assert_eq!(VolumeStore::load(v.store().path()).unwrap().pending(), None);
        assert_eq!(v.pool().superblock().transaction_id, 1);
        v.delete(id(1)).unwrap();
    }

    #[test]
    fn crash_before_the_pool_commit_drops_the_intent() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = fresh(&dir);
        v.create_thin(id(1), 1 << 20, None).unwrap();
        let intent = Intent::Create {
            id: id(2),
            size_bytes: 1 << 20,
            name: Some("lost".into()),
            origin: None,
        };
        v.begin(&intent).unwrap();
        // Crash: the pool operation never ran (or never committed).
        let (v, report) = reopen(v);
        let outcome = report.pending.expect("the intent was found");
        assert_eq!(outcome.intent, intent);
        assert!(!outcome.applied);
        assert!(report.written);
        assert!(report.orphans.is_empty() && report.dropped.is_empty());
        assert!(v.store().get(id(2)).is_none());
        assert_eq!(v.store().transaction_id(), Some(1));
        let on_disk = VolumeStore::load(v.store().path()).unwrap();
        assert_eq!(on_disk.pending(), None);
    }

    #[test]
    fn kernel_crash_between_message_and_transaction_id_is_decided_by_what_exists() {
        // The kernel path (activate::kernel_control) commits the pool message and
        // set_transaction_id separately; a crash between leaves the pool at the store's id.
        let dir = tempfile::tempdir().unwrap();
        let mut store = VolumeStore::new(&store_path(&dir));
        store.transaction_id = Some(4);
        store
            .begin_intent(
                Intent::Create {
                    id: id(7),
                    size_bytes: 1 << 20,
                    name: Some("made".into()),
                    origin: None,
                },
                4,
            )
            .unwrap();
        let mut view = PoolView {
            transaction_id: 4,
            thin_ids: [id(7)].into_iter().collect(),
            read_only: false,
        };
        let mut reloaded = VolumeStore::load(store.path()).unwrap();
        let report = reloaded.reconcile_with(&view).unwrap();
        assert!(report.pending.unwrap().applied);
        assert!(report.orphans.is_empty());
        assert_eq!(reloaded.get(id(7)).unwrap().name.as_deref(), Some("made"));

        // A delete whose thin is gone at the same id is applied too; one whose thin is still
        // there never happened.
        reloaded
            .begin_intent(Intent::Delete { id: id(7) }, 4)
            .unwrap();
        let mut deleted = VolumeStore::load(reloaded.path()).unwrap();
        let mut kept = deleted.clone();
        view.thin_ids.clear();
        assert!(
            deleted
                .reconcile_with(&view)
                .unwrap()
                .pending
                .unwrap()
                .applied
        );
        assert!(deleted.get(id(7)).is_none());
        view.thin_ids.insert(id(7));
        assert!(!kept.reconcile_with(&view).unwrap().pending.unwrap().applied);
        assert!(kept.get(id(7)).is_some());

        // begin_intent refuses a store that is not at the pool's id.
        assert!(kept.begin_intent(Intent::Delete { id: id(7) }, 9).is_err());
    }

    #[test]
    fn crash_after_the_pool_commit_applies_the_intent() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = fresh(&dir);
        v.create_thin(id(1), 1 << 20, None).unwrap();
        for intent in [
            Intent::Create {
                id: id(2),
                size_bytes: 1 << 20,
                name: Some("snap".into()),
                origin: Some(id(1)),
            },
            Intent::Rename {
                id: id(2),
                name: Some("renamed".into()),
            },
            Intent::Delete { id: id(1) },
        ] {
            let n = v.begin(&intent).unwrap();
            match &intent {
                Intent::Create { .. } => v.pool().create_snap(id(2), id(1)).unwrap(),
                Intent::Delete { .. } => v.pool().delete(id(1)).unwrap(),
                _ => {}
            }
            v.commit_pool(n).unwrap();
            // Crash: the store still says pending at n.
            let (v2, report) = reopen(v);
            v = v2;
            let outcome = report.pending.expect("the intent was found");
            assert!(outcome.applied, "{outcome:?}");
            assert_eq!(outcome.intent, intent);
            assert_eq!(v.store().transaction_id(), Some(n + 1));
        }
        let vols: Vec<_> = v.store().volumes().cloned().collect();
        assert_eq!(
            vols,
            [Volume {
                id: id(2),
                size_bytes: 1 << 20,
                name: Some("renamed".into()),
                origin: Some(id(1))
            }]
        );
    }

    #[test]
    fn a_pool_changed_elsewhere_decides_by_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = fresh(&dir);
        let intent = Intent::Create {
            id: id(5),
            size_bytes: 1 << 20,
            name: None,
            origin: None,
        };
        let n = v.begin(&intent).unwrap();
        v.pool().create_thin(id(5)).unwrap();
        v.pool().set_transaction_id(n, n + 10).unwrap();
        v.pool().commit().unwrap();
        let (v, report) = reopen(v);
        let outcome = report.pending.unwrap();
        assert!(outcome.applied, "{outcome:?}");
        assert_eq!(report.transaction_id_moved, Some((n, n + 10)));
        assert_eq!(v.store().transaction_id(), Some(n + 10));
        assert!(v.store().get(id(5)).is_some());
    }

    #[test]
    fn orphans_are_reported_and_kept_and_lost_records_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = fresh(&dir);
        v.create_thin(id(1), 1 << 20, Some("kept")).unwrap();
        v.create_thin(id(2), 1 << 20, Some("lost")).unwrap();
        // Behind the store's back: a thin appears, another disappears.
        v.pool().create_thin(id(7)).unwrap();
        v.pool().delete(id(2)).unwrap();
        v.pool().commit().unwrap();
        let (mut v, report) = reopen(v);
        assert_eq!(report.orphans, [id(7)]);
        assert_eq!(report.dropped.len(), 1);
        assert_eq!(report.dropped[0].name.as_deref(), Some("lost"));
        assert_eq!(report.transaction_id_moved, None);
        assert!(report.written);
        assert!(
            v.pool().exists(id(7)),
            "orphans are never deleted by reconcile"
        );
        assert!(matches!(v.size_of(id(7)), Err(Error::Store { .. })));
        assert!(matches!(
            v.snapshot(id(8), id(7), None),
            Err(Error::Store { .. })
        ));

        // Reported again on the next open, but nothing more to write.
        let (mut v2, report) = reopen(v);
        assert_eq!(report.orphans, [id(7)]);
        assert!(!report.written);
        // An orphan can be deleted through the store.
        v2.delete(id(7)).unwrap();
        v = v2;
        let (_, report) = reopen(v);
        assert!(report.is_clean(), "{report:?}");
    }

    #[test]
    fn a_transaction_id_moved_elsewhere_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let v = fresh(&dir);
        v.pool().set_transaction_id(0, 41).unwrap();
        v.pool().commit().unwrap();
        let (v, report) = reopen(v);
        assert_eq!(report.transaction_id_moved, Some((0, 41)));
        assert_eq!(v.store().transaction_id(), Some(41));
    }

    #[test]
    fn shrinking_discards_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = fresh(&dir);
        v.create_thin(id(1), 1 << 20, None).unwrap();
        let thin = v.pool().open_thin(id(1)).unwrap();
        thin.write(&[0xaa; 4096], (1 << 20) - 4096).unwrap();
        drop(thin);
        v.resize(id(1), 512 << 10).unwrap();
        v.resize(id(1), 1 << 20).unwrap();
        let mut buf = [1u8; 4096];
        v.pool()
            .open_thin(id(1))
            .unwrap()
            .read(&mut buf, (1 << 20) - 4096)
            .unwrap();
        assert_eq!(buf, [0; 4096]);
    }

    #[test]
    fn read_only_pools_reconcile_in_memory_only() {
        let dir = tempfile::tempdir().unwrap();
        let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20));
        let data: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
        let pool = Pool::format(
            meta.clone(),
            data.clone(),
            DataBlockSize::DEFAULT,
            PoolOptions::default(),
        )
        .unwrap();
        pool.create_thin(id(3)).unwrap();
        pool.commit().unwrap();
        drop(pool);
        let ro = PoolOptions {
            read_only: true,
            ..PoolOptions::default()
        };
        let pool = Pool::open(meta, data, ro).unwrap();
        let v = Volumes::attach(pool, VolumeStore::load(&store_path(&dir)).unwrap()).unwrap();
        assert_eq!(v.reconcile_report().orphans, [id(3)]);
        assert!(!v.reconcile_report().written);
        assert!(!store_path(&dir).exists());
    }

    #[test]
    fn names_follow_the_rules() {
        for good in ["base", "a.b-c_d:1@x+y", "1a", &"x".repeat(127)] {
            check_name(good).unwrap();
        }
        for bad in ["", "a/b", "a b", "a\tb", "123", &"x".repeat(128)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
