//! The devicemapper driver: a thin pool in the state directory (Docker's loop-lvm layout,
//! `ROOT/devicemapper/{data,metadata}`, or an existing pool with `dm.thinpooldev`), a
//! formatted base device, one thin snapshot per image layer and one per container.
//!
//! Every pool operation goes through the pool daemon, which owns the pool and serves active
//! thins as block devices; it is started on first need (`thinbox pool-daemon run`) and keeps
//! running, as dockerd does, until `thinbox pool-daemon stop`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use engine::activate::daemon::{launch, Client, RunDir};
use engine::activate::{ControlStatus, PoolControl};
use engine::journal::JournalTrim;
use engine::{
    DataBlockSize, Error as EngineError, NewPool, PoolOptions, PoolPaths, ThinId, Volumes,
};
use serde::{Deserialize, Serialize};

use super::options::{Filesystem, StorageOptions};
use crate::cli::Global;

/// The base device's name in the volume store.
pub const BASE_DEVICE_NAME: &str = "thinbox-base";

/// What the storage was created with (`ROOT/devicemapper/config.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StorageConfig {
    options: StorageOptions,
    base_thin_id: u64,
}

/// An opened devicemapper storage.
pub struct DeviceMapper {
    root: PathBuf,
    options: StorageOptions,
    base: ThinId,
    paths: PoolPaths,
    store_path: PathBuf,
}

pub(super) fn config_path(root: &Path) -> PathBuf {
    root.join("devicemapper").join("config.json")
}

/// Where the pool of `options` lives: its two devices and its volume store.
fn pool_location(root: &Path, options: &StorageOptions) -> (PoolPaths, PathBuf) {
    let dir = options
        .thin_pool_dev
        .clone()
        .unwrap_or_else(|| root.join("devicemapper"));
    (PoolPaths::in_dir(&dir), engine::VolumeStore::path_in(&dir))
}

/// A client of the pool daemon of `paths`, starting the daemon when none runs.
pub fn connect_or_start(paths: &PoolPaths, store_path: &Path) -> anyhow::Result<Client> {
    let run = RunDir::for_pool(paths);
    if let Some(client) = run.connect()? {
        return Ok(client);
    }
    let exe = std::env::current_exe().context("failed to find the thinbox binary")?;
    let mut command = Command::new(exe);
    command
        .args(["-v", "pool-daemon", "run", "--detached-child", "--metadata"])
        .arg(std::path::absolute(&paths.metadata)?)
        .arg("--data")
        .arg(std::path::absolute(&paths.data)?)
        .arg("--volume-store")
        .arg(std::path::absolute(store_path)?);
    let pid = launch::spawn_detached(&run, command).context("failed to start the pool daemon")?;
    tracing::info!(pid, log = %run.log_file().display(), "started the pool daemon");
    run.connect()?
        .context("the pool daemon stopped answering right after it started")
}

impl DeviceMapper {
    /// Opens the storage in `--root`, creating it (pool, base device) on first use.
    pub fn open(global: &Global) -> anyhow::Result<DeviceMapper> {
        let root = &global.root;
        let config_path = config_path(root);
        if config_path.exists() {
            let bytes = fs::read(&config_path)
                .with_context(|| format!("failed to read {}", config_path.display()))?;
            let config: StorageConfig = serde_json::from_slice(&bytes)
                .with_context(|| format!("failed to parse {}", config_path.display()))?;
            let options = StorageOptions::reopen(&config.options, &global.storage_opts)?;
            let (paths, store_path) = pool_location(root, &options);
            return Ok(DeviceMapper {
                root: root.clone(),
                options,
                base: ThinId::new(config.base_thin_id).context("bad base thin id")?,
                paths,
                store_path,
            });
        }
        let mut options = StorageOptions::default();
        options.apply(&global.storage_opts)?;
        DeviceMapper::create(root, options)
    }

    fn create(root: &Path, options: StorageOptions) -> anyhow::Result<DeviceMapper> {
        let dm_dir = root.join("devicemapper");
        crate::store::private_dir(&dm_dir)?;
        let (paths, store_path) = pool_location(root, &options);
        match &options.thin_pool_dev {
            Some(dir) => {
                if !paths.metadata.exists() || !paths.data.exists() {
                    bail!(
                        "dm.thinpooldev={}: no pool there (metadata and data files; create one \
                         with dmtool pool create)",
                        dir.display()
                    );
                }
            }
            // A pool left by an earlier, interrupted creation is used as it is.
            None if paths.metadata.exists() => {}
            None => {
                let block_size = DataBlockSize::from_bytes(options.block_size).with_context(|| {
                    format!(
                        "dm.blocksize={}: not a valid pool block size (64K to 1G, a multiple of 64K)",
                        options.block_size
                    )
                })?;
                let new = NewPool::new(
                    options.loop_data_size,
                    options.loop_metadata_size,
                    block_size,
                );
                Volumes::create(&paths, &store_path, new, PoolOptions::default()).with_context(
                    || format!("failed to create the pool in {}", dm_dir.display()),
                )?;
            }
        }
        let mut client = connect_or_start(&paths, &store_path)?;
        // A base device left by an interrupted creation is made again.
        if let Some(old) = client
            .list()?
            .into_iter()
            .find(|t| t.name.as_deref() == Some(BASE_DEVICE_NAME))
        {
            client.delete(ThinId::new(old.id).context("bad thin id")?)?;
        }
        let base = new_thin_id(&mut client)?;
        client
            .create_thin(base, options.base_size, Some(BASE_DEVICE_NAME))
            .context("failed to create the base device")?;
        let activation = client
            .activate(base, false)
            .context("failed to activate the base device")?;
        let made = mkfs(&options, &activation.device);
        let deactivated = deactivate(&mut client, base);
        made?;
        deactivated?;
        let config = StorageConfig {
            options: options.clone(),
            base_thin_id: base.get(),
        };
        crate::store::write_atomic(&config_path(root), &serde_json::to_vec_pretty(&config)?)?;
        tracing::info!(thin_id = %base, fs = options.fs.name(), "created the base device");
        let dm = DeviceMapper {
            root: root.to_path_buf(),
            options,
            base,
            paths,
            store_path,
        };
        // mkfs zeroes the journal; on a device that cannot zero without writing, those
        // zeros took blocks.
        dm.trim_journal(&mut client, base);
        Ok(dm)
    }

    pub fn options(&self) -> &StorageOptions {
        &self.options
    }

    pub fn base(&self) -> ThinId {
        self.base
    }

    pub fn paths(&self) -> &PoolPaths {
        &self.paths
    }

    /// A client of the pool daemon (started if needed).
    pub fn control(&self) -> anyhow::Result<Client> {
        connect_or_start(&self.paths, &self.store_path)
    }

    /// The pool's name as `info` shows it.
    pub fn pool_name(&self) -> String {
        format!(
            "thinbox-{}-pool",
            engine::activate::daemon::pool_key(&self.paths)
        )
    }

    /// Refuses new devices once free data or metadata space is below `dm.min_free_space`.
    pub fn check_free_space(&self, status: &ControlStatus) -> anyhow::Result<()> {
        let min = u64::from(self.options.min_free_space_percent);
        let s = &status.status;
        let check = |what: &str, used: u64, total: u64| -> anyhow::Result<()> {
            let free = total.saturating_sub(used);
            if total > 0 && free * 100 < min * total {
                bail!(
                    "thin pool has {free} free {what} blocks out of {total}, less than the \
                     required minimum of {min}% (dm.min_free_space); free space by removing \
                     images or grow the pool"
                );
            }
            Ok(())
        };
        check("data", s.used_data_blocks, s.total_data_blocks)?;
        check("metadata", s.used_metadata_blocks, s.total_metadata_blocks)
    }

    /// Snapshots `origin` as a new thin named `name`, after the free-space check. A thin left
    /// with that name by an interrupted run is deleted first.
    pub fn create_snapshot(
        &self,
        client: &mut Client,
        origin: ThinId,
        name: &str,
    ) -> anyhow::Result<ThinId> {
        self.check_free_space(&client.status()?)?;
        if let Some(old) = client
            .list()?
            .into_iter()
            .find(|t| t.name.as_deref() == Some(name))
        {
            client.delete(ThinId::new(old.id).context("bad thin id")?)?;
        }
        let id = new_thin_id(client)?;
        client
            .create_snap(id, origin, Some(name))
            .with_context(|| format!("failed to snapshot thin {origin}"))?;
        Ok(id)
    }

    /// Activates thin `id`, mounts it on a directory of ours, runs `work` on the mount point,
    /// then unmounts and deactivates, whatever `work` returned (its error comes first).
    pub fn with_mounted<T>(
        &self,
        client: &mut Client,
        id: ThinId,
        work: impl FnOnce(&Path) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let activation = client
            .activate(id, false)
            .with_context(|| format!("failed to activate thin {id}"))?;
        let mountpoint = self.root.join("mnt").join(id.get().to_string());
        let mounted = fs::create_dir_all(&mountpoint)
            .with_context(|| format!("failed to create {}", mountpoint.display()))
            .and_then(|()| mount(&self.options, &activation.device, &mountpoint));
        let result = mounted.and_then(|()| {
            let result = work(&mountpoint);
            let unmounted = nix::mount::umount2(&mountpoint, nix::mount::MntFlags::empty())
                .with_context(|| format!("failed to unmount {}", mountpoint.display()));
            match (result, unmounted) {
                (Err(e), Err(u)) => Err(e.context(format!("and then: {u:#}"))),
                (r, u) => u.and(r),
            }
        });
        let deactivated = deactivate(client, id);
        let _ = fs::remove_dir(&mountpoint);
        if result.is_ok() && deactivated.is_ok() {
            self.trim_journal(client, id);
        }
        match (result, deactivated) {
            (Err(e), Err(d)) => Err(e.context(format!("and then: {d:#}"))),
            (r, d) => d.and(r),
        }
    }

    /// Gives the journal log of thin `id`'s ext4, unmounted cleanly, back to the pool (see
    /// `engine::journal`): a layer then holds no old log, and each snapshot of it writes
    /// its own log into fresh blocks instead of copying the layer's. Best effort: a file
    /// system it cannot read is left as it is, with a warning.
    fn trim_journal(&self, client: &mut Client, id: ThinId) {
        if self.options.fs != Filesystem::Ext4 {
            return;
        }
        match engine::journal::trim_ext4_journal(client, id) {
            Ok(JournalTrim::Trimmed { discarded, .. }) => {
                tracing::debug!(thin_id = %id, discarded, "trimmed the journal log");
            }
            Ok(JournalTrim::Skipped(reason)) => {
                tracing::debug!(thin_id = %id, %reason, "journal log left as it is");
            }
            Err(e) => {
                tracing::warn!(thin_id = %id, error = %e, "journal log left as it is");
            }
        }
    }
}

impl DeviceMapper {
    /// Gives a new container's thin `id` its own copy of the block holding its ext4's
    /// journal superblock (see `engine::journal::own_ext4_journal_superblock`), so that the
    /// container's first journal commit, its first `fsync` typically, does not wait for
    /// that copy. Best effort: without it the commit makes the copy itself.
    pub fn own_journal_superblock(&self, client: &mut Client, id: ThinId) {
        if self.options.fs != Filesystem::Ext4 {
            return;
        }
        match engine::journal::own_ext4_journal_superblock(client, id) {
            Ok(owned) => tracing::debug!(thin_id = %id, ?owned, "journal superblock owned"),
            Err(e) => tracing::warn!(thin_id = %id, error = %e, "journal superblock left shared"),
        }
    }

    /// Mounts the active thin `device` on `target` with the storage's filesystem and
    /// `dm.mountopt` (containers keep their rootfs mounted while they run).
    pub fn mount_device(&self, device: &Path, target: &Path) -> anyhow::Result<()> {
        mount(&self.options, device, target)
    }
}

/// The next free thin id: one above the highest in the pool.
fn new_thin_id(client: &mut Client) -> anyhow::Result<ThinId> {
    let highest = client.list()?.iter().map(|t| t.id).max().unwrap_or(0);
    ThinId::new(highest + 1).context("the pool has no thin id left")
}

/// Deactivates `id`, waiting a little for the kernel to let go of the loop device after an
/// unmount.
pub fn deactivate(client: &mut Client, id: ThinId) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.deactivate(id, false) {
            Ok(()) => return Ok(()),
            Err(EngineError::ThinBusy(_) | EngineError::Busy { .. })
                if Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("failed to deactivate thin {id}")),
        }
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("failed to run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Formats the base device as Docker's devicemapper driver did: no discard at mkfs (the
/// thin is empty), and ext4's inode tables and journal initialised now, so that no lazy
/// init thread writes into every layer snapshot later.
fn mkfs(options: &StorageOptions, device: &Path) -> anyhow::Result<()> {
    let mut command = match options.fs {
        Filesystem::Ext4 => {
            let mut c = Command::new("mkfs.ext4");
            c.args([
                "-q",
                "-F",
                "-E",
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            ]);
            c
        }
        Filesystem::Xfs => {
            let mut c = Command::new("mkfs.xfs");
            c.args(["-q", "-f", "-K"]);
            c
        }
    };
    command.args(&options.mkfs_args).arg(device);
    run(&mut command).context("failed to format the base device")
}

fn mount(options: &StorageOptions, device: &Path, target: &Path) -> anyhow::Result<()> {
    let mut data: Vec<&str> = Vec::new();
    if options.fs == Filesystem::Xfs {
        // Every layer is a copy of the base filesystem, with its UUID.
        data.push("nouuid");
    }
    if let Some(extra) = &options.mount_options {
        data.push(extra);
    }
    let data = data.join(",");
    nix::mount::mount(
        Some(device),
        target,
        Some(options.fs.name()),
        nix::mount::MsFlags::empty(),
        (!data.is_empty()).then_some(data.as_str()),
    )
    .with_context(|| {
        format!(
            "failed to mount {} on {}",
            device.display(),
            target.display()
        )
    })
}
