//! A container's rootfs, mounted on `ROOT/mnt/<id>` while it runs, with the `/etc` files
//! bind-mounted over it. With the devicemapper driver: its thin activated through the pool
//! daemon, deactivated after, deleted on removal (the overlay driver's side is in
//! `storage::overlay`).

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use engine::activate::daemon::Client;
use engine::activate::PoolControl;
use engine::ThinId;

use super::Container;
use crate::storage::{self, DeviceMapper};

/// Whether something is mounted on `path` in this mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let path = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| p.replace("\\040", " ") == path)
}

fn thin_id(c: &Container) -> anyhow::Result<ThinId> {
    ThinId::new(c.thin_id).context("bad thin id in the container's record")
}

/// Activates the container's thin and mounts it; returns the mount point.
pub fn mount(
    storage: &DeviceMapper,
    client: &mut Client,
    c: &Container,
    root: &Path,
) -> anyhow::Result<PathBuf> {
    let target = c.mountpoint(root);
    let activation = client
        .activate(thin_id(c)?, false)
        .with_context(|| format!("failed to activate thin {} of the container", c.thin_id))?;
    fs::create_dir_all(&target)
        .with_context(|| format!("failed to create {}", target.display()))?;
    if !is_mounted(&target) {
        storage.mount_device(&activation.device, &target)?;
    }
    Ok(target)
}

/// Unmounts the rootfs (lazily if something still holds it) and deactivates the thin
/// (deferred, if it stays busy for ten seconds). `Ok(false)` when deactivation was deferred.
pub fn unmount(client: &mut Client, c: &Container, root: &Path) -> anyhow::Result<bool> {
    unmount_path(&c.mountpoint(root))?;
    let id = thin_id(c)?;
    let active = client
        .list()?
        .into_iter()
        .any(|t| t.id == c.thin_id && t.active.is_some());
    if !active {
        return Ok(true);
    }
    match storage::devicemapper::deactivate(client, id) {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!(thin_id = %id, "{e:#}; deactivation deferred");
            client
                .deactivate(id, true)
                .with_context(|| format!("failed to defer the deactivation of thin {id}"))?;
            Ok(false)
        }
    }
}

/// Unmounts `target` if something is mounted there (lazily if something still holds it)
/// and removes the directory.
pub fn unmount_path(target: &Path) -> anyhow::Result<()> {
    if is_mounted(target) {
        if let Err(e) = nix::mount::umount2(target, nix::mount::MntFlags::empty()) {
            tracing::warn!(mountpoint = %target.display(), "unmount failed ({e}); detaching lazily");
            nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)
                .with_context(|| format!("failed to unmount {}", target.display()))?;
        }
    }
    let _ = fs::remove_dir(target);
    Ok(())
}

/// Deletes the container's thin if it exists (its space returns to the pool).
pub fn delete_thin(client: &mut Client, c: &Container) -> anyhow::Result<()> {
    // A record written before its thin existed has no thin id; the container's device name
    // (unique) finds a thin made just before a crash.
    let found = client.list()?.into_iter().find(|t| {
        (c.thin_id == 0 || t.id == c.thin_id) && t.name.as_deref() == Some(&c.device_name)
    });
    if let Some(t) = found {
        let id = ThinId::new(t.id).context("bad thin id")?;
        client
            .delete(id)
            .with_context(|| format!("failed to delete thin {id} of container {}", c.id))?;
    }
    Ok(())
}

/// Writes the container's `hostname`, `hosts` and `resolv.conf` into its directory and
/// returns them with the paths they cover in the rootfs. The container shares the host's
/// network, so its resolv.conf is the host's.
pub fn etc_files(c: &Container, root: &Path) -> anyhow::Result<Vec<(PathBuf, &'static str)>> {
    let dir = c.dir(root);
    let hostname = dir.join("hostname");
    fs::write(&hostname, format!("{}\n", c.hostname))?;
    let hosts = dir.join("hosts");
    fs::write(
        &hosts,
        format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
             ff02::2\tip6-allrouters\n127.0.1.1\t{}\n",
            c.hostname
        ),
    )?;
    let resolv = dir.join("resolv.conf");
    let host_resolv = fs::read("/etc/resolv.conf").unwrap_or_default();
    fs::write(&resolv, host_resolv)?;
    Ok(vec![
        (hostname, "etc/hostname"),
        (hosts, "etc/hosts"),
        (resolv, "etc/resolv.conf"),
    ])
}

/// Activates thin `id` read-only, mounts it read-only on `target` (no journal replay), runs
/// `work` on it, then unmounts and deactivates whatever `work` returned.
pub fn with_readonly<T>(
    storage: &DeviceMapper,
    client: &mut Client,
    id: u64,
    target: &Path,
    work: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    use nix::mount::MsFlags;
    let thin = ThinId::new(id).context("bad thin id")?;
    let activation = client
        .activate(thin, true)
        .with_context(|| format!("failed to activate thin {id} read-only"))?;
    fs::create_dir_all(target)?;
    let fs_type = storage.options().fs.name();
    let data = match storage.options().fs {
        crate::storage::Filesystem::Ext4 => "noload",
        crate::storage::Filesystem::Xfs => "norecovery,nouuid",
    };
    let mounted = nix::mount::mount(
        Some(activation.device.as_path()),
        target,
        Some(fs_type),
        MsFlags::MS_RDONLY,
        Some(data),
    )
    .with_context(|| format!("failed to mount thin {id} read-only"));
    let result = mounted.and_then(|()| {
        let result = work(target);
        let _ = nix::mount::umount2(target, nix::mount::MntFlags::empty());
        result
    });
    let _ = fs::remove_dir(target);
    let deactivated = storage::devicemapper::deactivate(client, thin);
    let result = result?;
    deactivated?;
    Ok(result)
}
