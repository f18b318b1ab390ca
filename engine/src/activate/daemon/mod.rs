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
//! [`PoolControl`]: crate::activate::PoolControl

mod client;
pub mod launch;
pub mod protocol;
mod server;

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
