//! The runtime's records beside the pool, as JSON files in the state directory, each written
//! atomically (temporary file, fsync, rename, fsync of the directory):
//! - `layers.json`: every layer, keyed by chain id, with the thin that holds it;
//! - `images.json`: every image, keyed by id (its config's digest);
//! - `repositories.json`: tags and digests (`repo:tag`, `repo@sha256:…`) naming images, in
//!   Docker's shape;
//! - `blobs/sha256/<hex>`: the content store: manifests, configs and the layers' original
//!   (compressed) blobs, so that save and push can reproduce their digests.
//!
//! The engine stays the one source of truth for which thins exist: a layer record says which
//! thin it uses, and a layer whose apply did not finish stays `Preparing` until the next
//! mutating command reconciles it (deletes its thin and its record).
//!
//! Mutating commands hold `ROOT/lock` (flock) from start to end.
//!
//! Layers keep what their image has: set-uid binaries, device nodes, world-writable
//! directories. Only root may reach them, so the state directory is 0711 and every
//! directory in it holding content (layers, mounts, the pool, blobs, containers) 0700;
//! [`secure_root`] makes them so, on roots older versions made 0755 too.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::image::Digest;

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("a state file has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state")
    ));
    let mut file =
        File::create(&tmp).with_context(|| format!("failed to create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("failed to write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("failed to replace {}", path.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("failed to sync {}", dir.display()))?;
    Ok(())
}

/// The state directory's mode: others may pass through it to files they know the names
/// of, but not list it (Docker's `/var/lib/docker` is 0710; the read-only verbs' records
/// stay readable here).
const ROOT_MODE: u32 = 0o711;

/// The mode of the directories holding layer content, mounts and container files.
const PRIVATE_MODE: u32 = 0o700;

/// Directories of the state directory that hold layer content, mounts or container files,
/// made by the command that first needs them.
const PRIVATE_DIRS: [&str; 4] = ["blobs", "containers", "mnt", "tmp"];

/// Directories of the state directory that only one storage driver makes, when it is
/// created (with [`private_dir`]).
const DRIVER_DIRS: [&str; 2] = ["overlay2", "devicemapper"];

/// Creates `path` (its parents as usual) with no more access than `mode`, or takes away
/// what an existing `path` allows beyond `mode` (what it allows less stays: an
/// administrator's tighter mode is kept).
fn restrict_dir(path: &Path, mode: u32) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("failed to create {}", path.display())),
    }
    let current = fs::metadata(path)
        .with_context(|| format!("failed to read {}", path.display()))?
        .permissions()
        .mode()
        & 0o7777;
    if current & !mode != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(current & mode))
            .with_context(|| format!("failed to restrict {}", path.display()))?;
    }
    Ok(())
}

/// Creates (or restricts) a directory for layer content or mounts: 0700.
pub fn private_dir(path: &Path) -> anyhow::Result<()> {
    restrict_dir(path, PRIVATE_MODE)
}

/// Creates the state directory `root` if needed and restricts it and its content
/// directories (see the module doc). Every command that may write there calls it first.
pub fn secure_root(root: &Path) -> anyhow::Result<()> {
    restrict_dir(root, ROOT_MODE)?;
    for name in PRIVATE_DIRS {
        private_dir(&root.join(name))?;
    }
    for name in DRIVER_DIRS {
        let dir = root.join(name);
        if dir.exists() {
            private_dir(&dir)?;
        }
    }
    Ok(())
}

fn load_json<T: DeserializeOwned + Default>(path: &Path) -> anyhow::Result<T> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("failed to parse {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
}

fn save_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Where a layer is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerState {
    /// Its thin may exist and be partly written; not usable.
    Preparing,
    /// Applied, unmounted, deactivated: usable by images.
    Ready,
}

/// The compressed blob a layer was pulled as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// One layer: a thin snapshot of its parent's thin with the layer's tar applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The layer's identity (OCI chain id: the diff id for the first layer, otherwise
    /// sha256 of "parent-chain-id diff-id").
    pub chain_id: Digest,
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    pub parent: Option<Digest>,
    pub thin_id: u64,
    pub device_name: String,
    /// Bytes of file content the tar carried (Docker's layer size).
    pub size: u64,
    pub blob: Option<BlobRef>,
    pub state: LayerState,
}

/// One image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The config's digest.
    pub id: Digest,
    /// The manifest it was pulled with (its digest is the repo digest).
    pub manifest_digest: Option<Digest>,
    /// Chain ids, bottom first.
    pub layers: Vec<Digest>,
    /// The config's `created`, as written there.
    pub created: Option<String>,
}

/// All records, loaded together and saved file by file.
pub struct Store {
    root: PathBuf,
    pub layers: BTreeMap<Digest, LayerRecord>,
    pub images: BTreeMap<Digest, ImageRecord>,
    pub repositories: Repositories,
    _lock: Option<File>,
}

/// Docker's `repositories.json`: repository → reference (`repo:tag`, `repo@digest`) → id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repositories {
    #[serde(rename = "Repositories")]
    pub repositories: BTreeMap<String, BTreeMap<String, Digest>>,
}

impl Repositories {
    /// Points `reference` (in repository `repo`) at `id`.
    pub fn set(&mut self, repo: &str, reference: String, id: &Digest) {
        self.repositories
            .entry(repo.to_string())
            .or_default()
            .insert(reference, id.clone());
    }

    /// Every `(reference, id)`.
    pub fn all(&self) -> impl Iterator<Item = (&String, &Digest)> {
        self.repositories.values().flat_map(|refs| refs.iter())
    }

    /// The image a full reference (`repo:tag` or `repo@digest`) names.
    pub fn get(&self, reference: &str) -> Option<&Digest> {
        self.all().find(|(r, _)| *r == reference).map(|(_, id)| id)
    }

    /// References naming `id`.
    pub fn of(&self, id: &Digest) -> Vec<String> {
        self.all()
            .filter(|(_, i)| *i == id)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Removes `reference`; `true` when it existed.
    pub fn remove(&mut self, reference: &str) -> bool {
        let mut removed = false;
        for refs in self.repositories.values_mut() {
            removed |= refs.remove(reference).is_some();
        }
        self.repositories.retain(|_, refs| !refs.is_empty());
        removed
    }
}

impl Store {
    /// Loads the records without a lock (for read-only verbs).
    pub fn load(root: &Path) -> anyhow::Result<Store> {
        Ok(Store {
            root: root.to_path_buf(),
            layers: load_json(&root.join("layers.json"))?,
            images: load_json(&root.join("images.json"))?,
            repositories: load_json(&root.join("repositories.json"))?,
            _lock: None,
        })
    }

    /// Takes `ROOT/lock` (waiting for another mutating command to finish), then loads.
    pub fn lock(root: &Path) -> anyhow::Result<Store> {
        secure_root(root)?;
        let path = root.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("failed to open {}", path.display()))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .with_context(|| format!("failed to lock {}", path.display()))?;
        let mut store = Store::load(root)?;
        store._lock = Some(file);
        Ok(store)
    }

    /// The state directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes `ROOT/lock` if no other command holds it; `None` when one does.
    pub fn try_lock(root: &Path) -> anyhow::Result<Option<Store>> {
        let path = root.join("lock");
        let file = match File::options().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("failed to open {}", path.display())),
        };
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("failed to lock {}", path.display())),
        }
        let mut store = Store::load(root)?;
        store._lock = Some(file);
        Ok(Some(store))
    }

    pub fn save_layers(&self) -> anyhow::Result<()> {
        save_json(&self.root.join("layers.json"), &self.layers)
    }

    pub fn save_images(&self) -> anyhow::Result<()> {
        save_json(&self.root.join("images.json"), &self.images)?;
        save_json(&self.root.join("repositories.json"), &self.repositories)
    }

    /// The content store's file for `digest`.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        blob_path(&self.root, digest)
    }

    /// Reads a stored blob (manifest, config).
    pub fn read_blob(&self, digest: &Digest) -> anyhow::Result<Vec<u8>> {
        let path = self.blob_path(digest);
        fs::read(&path).with_context(|| format!("failed to read blob {}", path.display()))
    }

    /// Finds an image by id (full or a prefix of at least 4 hex digits, with or without
    /// `sha256:`) or by reference (`repo:tag`, `repo@digest`; a missing tag means `latest`).
    pub fn find_image(&self, name: &str) -> Option<&ImageRecord> {
        if let Some(id) = self.repositories.get(name) {
            return self.images.get(id);
        }
        if let Ok(r) = crate::image::Reference::parse(name) {
            if let Some(id) = self.repositories.get(&r.to_string()) {
                return self.images.get(id);
            }
        }
        let hex = name.strip_prefix("sha256:").unwrap_or(name);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut matches = self.images.values().filter(|i| i.id.hex().starts_with(hex));
            if let (Some(one), None) = (matches.next(), matches.next()) {
                return Some(one);
            }
        }
        None
    }

    /// The virtual size of layer devices (the base device's), from the storage's config.
    pub fn device_size(&self) -> Option<u64> {
        let bytes = fs::read(self.root.join("devicemapper").join("config.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        v["options"]["base_size"].as_u64()
    }

    /// The layer records of image `id`, bottom first.
    pub fn image_layers(&self, id: &Digest) -> anyhow::Result<Vec<LayerRecord>> {
        let image = self
            .images
            .get(id)
            .with_context(|| format!("image {id} is gone"))?;
        image
            .layers
            .iter()
            .map(|l| {
                self.layers
                    .get(l)
                    .cloned()
                    .with_context(|| format!("image {id} has no record of layer {l}"))
            })
            .collect()
    }

    /// Bytes of content of an image's layers.
    pub fn image_size(&self, image: &ImageRecord) -> u64 {
        image
            .layers
            .iter()
            .filter_map(|l| self.layers.get(l))
            .map(|l| l.size)
            .sum()
    }
}

/// `ROOT/blobs/sha256/<hex>`.
pub fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    root.join("blobs")
        .join(digest.algorithm())
        .join(digest.hex())
}
