//! The pool daemon: the userspace owner of a pool while its thins are active.
//!
//! It holds the pool's ownership lock, serves every active thin as a file in its FUSE mount
//! with a loop device on top, and answers clients on a unix socket ([`protocol`]). Clients
//! ([`Client`]) and the daemon's own request handler both speak [`PoolControl`], so a command
//! behaves the same whether it opens the pool itself or goes through the daemon.
//!
//! Each pool's daemon keeps its runtime files in a directory of its own, [`RunDir`]:
//! `/run/thinbox/pool-<key>/` with `daemon.sock`, `daemon.pid`, `daemon.log` and the FUSE
//! mount point `fuse/`, where `<key>` is derived from the pool's metadata path so that every
//! client finds the same daemon.
//!
//! Whoever can connect to the socket can read and write every thin, so only the daemon's
//! own user (and root) may: the run directory is 0700 and belongs to that user (checked,
//! whatever the umask), the run root above it cannot be written by others (or is sticky,
//! like `/tmp`), and the daemon also refuses peers of another user
//! ([`peer_is_trusted`](crate::activate::peer_is_trusted)).
//!
//! [`PoolControl`]: crate::activate::PoolControl

mod client;
pub mod launch;
pub mod protocol;
mod server;

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use client::Client;
pub use server::{Daemon, DaemonConfig};

use crate::thin::files::PoolPaths;

/// Where the run directories live unless `THINBOX_RUN_ROOT` says otherwise.
pub const RUN_ROOT: &str = "/run/thinbox";

/// A pool daemon's runtime directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDir(PathBuf);

impl RunDir {
    /// The run directory of the pool on `paths`: under `$THINBOX_RUN_ROOT` (default
    /// [`RUN_ROOT`]), named after [`pool_key`].
    pub fn for_pool(paths: &PoolPaths) -> RunDir {
        let root = std::env::var_os("THINBOX_RUN_ROOT")
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(RUN_ROOT), PathBuf::from);
        RunDir(root.join(format!("pool-{}", pool_key(paths))))
    }

    pub fn new(path: PathBuf) -> RunDir {
        RunDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn socket(&self) -> PathBuf {
        self.0.join("daemon.sock")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.0.join("daemon.pid")
    }

    pub fn log_file(&self) -> PathBuf {
        self.0.join("daemon.log")
    }

    pub fn fuse_dir(&self) -> PathBuf {
        self.0.join("fuse")
    }

    /// Creates the run directory and the run root above it if needed, and makes sure only
    /// this user can reach what is inside (module doc); returns the directory with symlinks
    /// resolved, as `/proc` names its mounts. Refuses a directory another user owns, or a
    /// run root others could swap it in.
    pub fn prepare(&self) -> crate::Result<RunDir> {
        let refuse = |path: &Path, why: String| {
            crate::Error::Activation(format!("unsafe run directory {}: {why}", path.display()))
        };
        let failed = |path: &Path, e: io::Error| {
            crate::Error::Activation(format!("failed to prepare {}: {e}", path.display()))
        };
        let me = nix::unistd::geteuid().as_raw();
        if let Some(root) = self.0.parent() {
            fs::create_dir_all(root).map_err(|e| failed(root, e))?;
            let meta = fs::metadata(root).map_err(|e| failed(root, e))?;
            let others_write = meta.mode() & 0o022 != 0;
            let sticky = meta.mode() & 0o1000 != 0;
            if others_write && !sticky {
                if meta.uid() != me {
                    return Err(refuse(root, "others may write to it".into()));
                }
                // Ours (made under a permissive umask): take the others' write away.
                fs::set_permissions(root, fs::Permissions::from_mode(meta.mode() & 0o755))
                    .map_err(|e| failed(root, e))?;
            }
            if meta.uid() != me && meta.uid() != 0 {
                return Err(refuse(root, format!("it belongs to uid {}", meta.uid())));
            }
        }
        match fs::DirBuilder::new().mode(0o700).create(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(failed(&self.0, e)),
        }
        let meta = fs::symlink_metadata(&self.0).map_err(|e| failed(&self.0, e))?;
        if !meta.is_dir() {
            return Err(refuse(&self.0, "it is not a directory".into()));
        }
        if meta.uid() != me {
            return Err(refuse(&self.0, format!("it belongs to uid {}", meta.uid())));
        }
        if meta.mode() & 0o777 != 0o700 {
            fs::set_permissions(&self.0, fs::Permissions::from_mode(0o700))
                .map_err(|e| failed(&self.0, e))?;
        }
        let resolved = fs::canonicalize(&self.0).map_err(|e| failed(&self.0, e))?;
        Ok(RunDir(resolved))
    }

    /// A client of the daemon running here, or `None` when none runs.
    pub fn connect(&self) -> crate::Result<Option<Client>> {
        Client::connect(&self.socket())
    }
}

/// 16 hex digits naming a pool: FNV-1a of its metadata device's absolute, symlink-resolved
/// path (the path as given when it cannot be resolved). Stable across runs and processes.
pub fn pool_key(paths: &PoolPaths) -> String {
    let path = std::fs::canonicalize(&paths.metadata)
        .or_else(|_| std::path::absolute(&paths.metadata))
        .unwrap_or_else(|_| paths.metadata.clone());
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in path.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_follows_the_metadata_path() {
        let a = PoolPaths::in_dir(Path::new("/srv/pool-a"));
        let b = PoolPaths::in_dir(Path::new("/srv/pool-b"));
        assert_eq!(pool_key(&a), pool_key(&a));
        assert_ne!(pool_key(&a), pool_key(&b));
        assert_eq!(pool_key(&a).len(), 16);
    }
}
