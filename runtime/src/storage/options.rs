//! The devicemapper storage options, with Docker's `--storage-opt` names and defaults.

use std::path::PathBuf;

use anyhow::{bail, Context};
use engine::units::parse_size;
use serde::{Deserialize, Serialize};

/// The filesystem on the base device (and so on every layer device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filesystem {
    Ext4,
    Xfs,
}

impl Filesystem {
    pub fn name(self) -> &'static str {
        match self {
            Filesystem::Ext4 => "ext4",
            Filesystem::Xfs => "xfs",
        }
    }
}

/// `dm.*` options. Sizes in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageOptions {
    /// `dm.basesize`: the base device's virtual size, so every layer's (default 10G).
    pub base_size: u64,
    /// `dm.fs`: ext4 (default) or xfs.
    pub fs: Filesystem,
    /// `dm.mkfsarg`: extra mkfs arguments (repeatable).
    pub mkfs_args: Vec<String>,
    /// `dm.mountopt`: extra mount options for layer devices.
    pub mount_options: Option<String>,
    /// `dm.blocksize`: the pool's data block size (default 64K).
    pub block_size: u64,
    /// `dm.loopdatasize`: the sparse data file's size (default 100G).
    pub loop_data_size: u64,
    /// `dm.loopmetadatasize`: the sparse metadata file's size (default 2G).
    pub loop_metadata_size: u64,
    /// `dm.thinpooldev`: an existing pool directory (`metadata`, `data`, `volumes.json`) to
    /// use instead of ROOT/devicemapper.
    pub thin_pool_dev: Option<PathBuf>,
    /// `dm.min_free_space`: the free data (and metadata) space, in percent of the pool, below
    /// which no new device is created (default 10).
    pub min_free_space_percent: u8,
}

impl Default for StorageOptions {
    /// Docker's defaults (daemon/graphdriver/devmapper/deviceset.go of Docker 20-23).
    fn default() -> Self {
        StorageOptions {
            base_size: 10 << 30,
            fs: Filesystem::Ext4,
            mkfs_args: Vec::new(),
            mount_options: None,
            block_size: 64 << 10,
            loop_data_size: 100 << 30,
            loop_metadata_size: 2 << 30,
            thin_pool_dev: None,
            min_free_space_percent: 10,
        }
    }
}

fn size(key: &str, value: &str) -> anyhow::Result<u64> {
    parse_size(value).with_context(|| format!("{key}={value}: not a size (such as 10G or 64K)"))
}

impl StorageOptions {
    /// Applies `KEY=VALUE` options on top of `self`.
    pub fn apply(&mut self, opts: &[String]) -> anyhow::Result<()> {
        for opt in opts {
            let Some((key, value)) = opt.split_once('=') else {
                bail!("storage option {opt:?} is not KEY=VALUE");
            };
            let key = key.trim().to_ascii_lowercase();
            let value = value.trim();
            match key.as_str() {
                "dm.basesize" => self.base_size = size(&key, value)?,
                "dm.fs" => {
                    self.fs = match value {
                        "ext4" => Filesystem::Ext4,
                        "xfs" => Filesystem::Xfs,
                        _ => bail!("dm.fs={value}: only ext4 and xfs are supported"),
                    }
                }
                "dm.mkfsarg" => self.mkfs_args.push(value.to_string()),
                "dm.mountopt" => self.mount_options = Some(value.to_string()),
                "dm.blocksize" => self.block_size = size(&key, value)?,
                "dm.loopdatasize" => self.loop_data_size = size(&key, value)?,
                "dm.loopmetadatasize" => self.loop_metadata_size = size(&key, value)?,
                "dm.thinpooldev" => self.thin_pool_dev = Some(PathBuf::from(value)),
                "dm.min_free_space" => {
                    let percent: u8 = value
                        .trim_end_matches('%')
                        .parse()
                        .ok()
                        .filter(|p| *p < 100)
                        .with_context(|| {
                            format!("dm.min_free_space={value}: not a percentage below 100")
                        })?;
                    self.min_free_space_percent = percent;
                }
                _ => bail!("unknown storage option {key:?}"),
            }
        }
        if self.base_size == 0 || !self.base_size.is_multiple_of(512) {
            bail!("dm.basesize must be a positive multiple of 512 bytes");
        }
        Ok(())
    }

    /// The options that still apply to an existing storage: the saved ones, with `opts`'
    /// mount options and minimum free space (Docker also lets those change); anything else
    /// given that differs from the saved value is refused.
    pub fn reopen(saved: &StorageOptions, opts: &[String]) -> anyhow::Result<StorageOptions> {
        let mut asked = saved.clone();
        asked.apply(opts)?;
        let mut fixed = asked.clone();
        fixed.mount_options = saved.mount_options.clone();
        fixed.min_free_space_percent = saved.min_free_space_percent;
        if fixed != *saved {
            bail!(
                "the storage was created with other options ({}); only dm.mountopt and \
                 dm.min_free_space can change",
                serde_json::to_string(saved)?
            );
        }
        Ok(asked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn docker_names_and_units_are_accepted() {
        let mut o = StorageOptions::default();
        o.apply(&opts(&[
            "dm.basesize=20G",
            "dm.fs=xfs",
            "dm.mkfsarg=-m0",
            "dm.loopdatasize=1G",
            "dm.min_free_space=5%",
        ]))
        .unwrap();
        assert_eq!(o.base_size, 20 << 30);
        assert_eq!(o.fs, Filesystem::Xfs);
        assert_eq!(o.mkfs_args, ["-m0"]);
        assert_eq!(o.loop_data_size, 1 << 30);
        assert_eq!(o.min_free_space_percent, 5);
    }

    #[test]
    fn unknown_or_malformed_options_are_refused() {
        let mut o = StorageOptions::default();
        assert!(o.apply(&opts(&["dm.nope=1"])).is_err());
        assert!(o.apply(&opts(&["dm.basesize"])).is_err());
        assert!(o.apply(&opts(&["dm.fs=btrfs"])).is_err());
        assert!(o.apply(&opts(&["dm.min_free_space=150%"])).is_err());
    }

    #[test]
    fn reopening_may_change_mount_options_only() {
        let saved = StorageOptions::default();
        let o = StorageOptions::reopen(&saved, &opts(&["dm.mountopt=noatime"])).unwrap();
        assert_eq!(o.mount_options.as_deref(), Some("noatime"));
        assert!(StorageOptions::reopen(&saved, &opts(&["dm.basesize=1G"])).is_err());
    }
}
