//! Where images and containers keep their files, behind one interface with two drivers:
//! - `devicemapper` (the default; [`devicemapper`]): block-level copy-on-write, every layer a
//!   thin snapshot of its parent's in our thin pool, every container a snapshot of its
//!   image's top layer;
//! - `overlay` (`--storage-driver overlay`, Docker's overlay2; [`overlay`]): file-level
//!   copy-on-write, every layer a directory of its own files stacked by overlayfs.
//!
//! A state directory uses the driver it was created with; asking for the other one later is
//! an error, not a silent switch. Layer and container records name their filesystem by
//! `device_name` (the thin's name, or the overlay directory) and, with devicemapper, its
//! thin id (0 with overlay).

pub mod devicemapper;
pub mod options;
pub mod overlay;
pub mod pack;
pub mod unpack;

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use engine::activate::PoolControl;
use engine::ThinId;

pub use devicemapper::DeviceMapper;
pub use options::Filesystem;
pub use overlay::Overlay;
pub use unpack::Whiteouts;

use crate::cli::Global;
use crate::container::{rootfs, Container};
use crate::store::LayerRecord;

/// The drivers, by the names `--storage-driver` takes (and `info` shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    DeviceMapper,
    Overlay,
}

impl DriverKind {
    pub fn parse(name: &str) -> anyhow::Result<DriverKind> {
        match name {
            "devicemapper" => Ok(DriverKind::DeviceMapper),
            "overlay" | "overlay2" => Ok(DriverKind::Overlay),
            other => bail!("unknown storage driver {other:?} (devicemapper or overlay)"),
        }
    }

    /// Docker's name for it.
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::DeviceMapper => "devicemapper",
            DriverKind::Overlay => "overlay2",
        }
    }

    /// The driver the state directory `root` was created with, if it was.
    pub fn of_root(root: &Path) -> Option<DriverKind> {
        if devicemapper::config_path(root).exists() {
            Some(DriverKind::DeviceMapper)
        } else if overlay::config_path(root).exists() {
            Some(DriverKind::Overlay)
        } else {
            None
        }
    }
}

/// Bytes of the blocks allocated to everything under `dir` (as `du` counts them: symbolic
/// links not followed, a file with several links once). Entries that vanish meanwhile count
/// nothing; a missing `dir` holds 0 bytes.
pub fn allocated_bytes(dir: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("failed to stat {}", path.display())),
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        total += meta.blocks() * 512;
        if meta.is_dir() {
            let entries = match std::fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to list {}", path.display()))
                }
            };
            for entry in entries {
                pending.push(entry?.path());
            }
        }
    }
    Ok(total)
}

/// An opened storage.
pub enum Storage {
    DeviceMapper(DeviceMapper),
    Overlay(Overlay),
}

impl Storage {
    /// Opens the storage in `--root`, creating it on first use with `--storage-driver`.
    pub fn open(global: &Global) -> anyhow::Result<Storage> {
        crate::store::secure_root(&global.root)?;
        let asked = global
            .storage_driver
            .as_deref()
            .map(DriverKind::parse)
            .transpose()?;
        let kind = match (DriverKind::of_root(&global.root), asked) {
            (Some(have), Some(want)) if have != want => bail!(
                "{} was created with the {} storage driver, not {} (use another --root)",
                global.root.display(),
                have.name(),
                want.name()
            ),
            (Some(have), _) => have,
            (None, want) => want.unwrap_or(DriverKind::DeviceMapper),
        };
        match kind {
            DriverKind::DeviceMapper => DeviceMapper::open(global).map(Storage::DeviceMapper),
            DriverKind::Overlay => {
                if let Some(dm) = global.storage_opts.iter().find(|o| o.starts_with("dm.")) {
                    bail!("storage option {dm} is for the devicemapper driver, not overlay");
                }
                Overlay::open(&global.root).map(Storage::Overlay)
            }
        }
    }

    /// Opens the storage if it was ever created.
    pub fn open_existing(global: &Global) -> anyhow::Result<Option<Storage>> {
        match DriverKind::of_root(&global.root) {
            Some(_) => Storage::open(global).map(Some),
            None => Ok(None),
        }
    }

    pub fn kind(&self) -> DriverKind {
        match self {
            Storage::DeviceMapper(_) => DriverKind::DeviceMapper,
            Storage::Overlay(_) => DriverKind::Overlay,
        }
    }

    /// A new layer's filesystem named `name` on top of `parent` (none: the bottom layer).
    /// Returns its thin id (0 with overlay).
    pub fn new_layer(&self, parent: Option<&LayerRecord>, name: &str) -> anyhow::Result<u64> {
        match self {
            Storage::DeviceMapper(dm) => {
                let origin = match parent {
                    Some(p) => ThinId::new(p.thin_id).context("bad thin id in a layer record")?,
                    None => dm.base(),
                };
                let mut client = dm.control()?;
                Ok(dm.create_snapshot(&mut client, origin, name)?.get())
            }
            Storage::Overlay(o) => {
                o.create_layer(name)?;
                Ok(0)
            }
        }
    }

    /// Runs `work` on layer `layer`'s filesystem, writable, with the whiteout mode its
    /// content wants.
    pub fn with_layer_writable<T>(
        &self,
        layer: &LayerRecord,
        work: impl FnOnce(&Path, Whiteouts) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        match self {
            Storage::DeviceMapper(dm) => {
                let id = ThinId::new(layer.thin_id).context("bad thin id in a layer record")?;
                let mut client = dm.control()?;
                dm.with_mounted(&mut client, id, |root| work(root, Whiteouts::Apply))
            }
            Storage::Overlay(o) => work(&o.diff_dir(&layer.device_name), Whiteouts::Overlay),
        }
    }

    /// Deletes the filesystems of `layers` that exist (children before parents, as given).
    pub fn remove_layers(&self, layers: &[&LayerRecord]) -> anyhow::Result<()> {
        match self {
            Storage::DeviceMapper(dm) => {
                let mut client = dm.control()?;
                let thins = client.list()?;
                for layer in layers {
                    // A record saved before its thin existed has no thin id yet; its device
                    // name (unique per layer) finds a thin made just before a crash.
                    let Some(t) = thins.iter().find(|t| {
                        (layer.thin_id == 0 || t.id == layer.thin_id)
                            && t.name.as_deref() == Some(&layer.device_name)
                    }) else {
                        continue;
                    };
                    let id = ThinId::new(t.id).context("bad thin id")?;
                    if t.active.is_some() {
                        let _ = client.deactivate(id, false);
                    }
                    client.delete(id).with_context(|| {
                        format!("failed to delete thin {id} of layer {}", layer.chain_id)
                    })?;
                }
                Ok(())
            }
            Storage::Overlay(o) => layers.iter().try_for_each(|l| o.remove(&l.device_name)),
        }
    }

    /// A new container filesystem named `name` on top of `layers` (the image's, bottom
    /// first). Returns its thin id and the thin it is a snapshot of (0 and 0 with overlay).
    pub fn new_container(&self, layers: &[LayerRecord], name: &str) -> anyhow::Result<(u64, u64)> {
        match self {
            Storage::DeviceMapper(dm) => {
                let origin = match layers.last() {
                    Some(top) => {
                        ThinId::new(top.thin_id).context("bad thin id in a layer record")?
                    }
                    None => dm.base(),
                };
                let mut client = dm.control()?;
                let thin = dm.create_snapshot(&mut client, origin, name)?;
                dm.own_journal_superblock(&mut client, thin);
                Ok((thin.get(), origin.get()))
            }
            Storage::Overlay(o) => {
                o.create_container(name)?;
                Ok((0, 0))
            }
        }
    }

    /// Mounts container `c` (on `layers`) on its mount point and returns it.
    pub fn mount_container(
        &self,
        layers: &[LayerRecord],
        c: &Container,
        root: &Path,
    ) -> anyhow::Result<PathBuf> {
        match self {
            Storage::DeviceMapper(dm) => {
                let mut client = dm.control()?;
                rootfs::mount(dm, &mut client, c, root)
            }
            Storage::Overlay(o) => {
                let target = std::path::absolute(c.mountpoint(root))?;
                if !rootfs::is_mounted(&target) {
                    o.mount_container(&names(layers), &c.device_name, &target)?;
                }
                Ok(target)
            }
        }
    }

    /// Unmounts container `c` (and deactivates its thin). `Ok(false)` when the thin stays
    /// busy and its deactivation was deferred.
    pub fn unmount_container(&self, c: &Container, root: &Path) -> anyhow::Result<bool> {
        match self {
            Storage::DeviceMapper(dm) => {
                let mut client = dm.control()?;
                rootfs::unmount(&mut client, c, root)
            }
            Storage::Overlay(_) => {
                rootfs::unmount_path(&c.mountpoint(root))?;
                Ok(true)
            }
        }
    }

    /// Bytes the driver's filesystems take on the host now: the pool's used data blocks
    /// (devicemapper), or the blocks allocated under the overlay directory (overlay).
    pub fn bytes_in_use(&self) -> anyhow::Result<u64> {
        match self {
            Storage::DeviceMapper(dm) => {
                let status = dm.control()?.status()?.status;
                Ok(status.used_data_blocks * u64::from(status.data_block_sectors) * 512)
            }
            Storage::Overlay(o) => o.bytes_in_use(),
        }
    }

    /// Deletes container `c`'s filesystem (nothing there is fine).
    pub fn remove_container(&self, c: &Container) -> anyhow::Result<()> {
        match self {
            Storage::DeviceMapper(dm) => {
                let mut client = dm.control()?;
                rootfs::delete_thin(&mut client, c)
            }
            Storage::Overlay(o) => o.remove(&c.device_name),
        }
    }

    /// Runs `work` on the image made of `layers` (bottom first), mounted read-only on
    /// `target`.
    pub fn with_image_readonly<T>(
        &self,
        layers: &[LayerRecord],
        target: &Path,
        work: impl FnOnce(&Path) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        match self {
            Storage::DeviceMapper(dm) => {
                let top = layers.last().map_or(dm.base().get(), |l| l.thin_id);
                let mut client = dm.control()?;
                rootfs::with_readonly(dm, &mut client, top, target, work)
            }
            Storage::Overlay(o) => with_overlay_readonly(o, names(layers), target, work),
        }
    }

    /// Runs `work` on container `c` (on `layers`), mounted read-only on `target`; the
    /// container must not be running.
    pub fn with_container_readonly<T>(
        &self,
        layers: &[LayerRecord],
        c: &Container,
        target: &Path,
        work: impl FnOnce(&Path) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        match self {
            Storage::DeviceMapper(dm) => {
                let mut client = dm.control()?;
                rootfs::with_readonly(dm, &mut client, c.thin_id, target, work)
            }
            Storage::Overlay(o) => {
                let mut stack = names(layers);
                stack.push(c.device_name.clone());
                with_overlay_readonly(o, stack, target, work)
            }
        }
    }
}

fn names(layers: &[LayerRecord]) -> Vec<String> {
    layers.iter().map(|l| l.device_name.clone()).collect()
}

fn with_overlay_readonly<T>(
    o: &Overlay,
    stack: Vec<String>,
    target: &Path,
    work: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let target = std::path::absolute(target)?;
    o.mount_readonly(&stack, &target)?;
    let result = work(&target);
    let unmounted = rootfs::unmount_path(&target);
    let _ = fs::remove_dir(&target);
    let result = result?;
    unmounted?;
    Ok(result)
}
