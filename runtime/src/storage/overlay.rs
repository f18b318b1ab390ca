//! The overlay driver (`--storage-driver overlay`, Docker's overlay2 layout): file-level
//! copy-on-write with the kernel's overlayfs, beside the devicemapper driver so that the same
//! image and workload can run on block or file copy-on-write.
//!
//! `ROOT/overlay2/<name>/diff` holds one layer's own files (whiteouts as overlayfs reads
//! them: 0:0 character devices and `trusted.overlay.opaque`); a container's directory adds
//! `work` and its writable `diff` (the upper layer); `ROOT/overlay2/l/<short>` are short
//! links to the layers' `diff`, so that a deep stack's `lowerdir=` stays within the one page
//! the mount options may take (the mount runs with `ROOT/overlay2` as its working directory
//! and relative paths, as Docker's overlay2 does).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use sha2::Digest as _;

/// An opened overlay storage.
pub struct Overlay {
    dir: PathBuf,
}

/// Where the driver keeps its files.
pub fn overlay_dir(root: &Path) -> PathBuf {
    root.join("overlay2")
}

pub(super) fn config_path(root: &Path) -> PathBuf {
    overlay_dir(root).join("config.json")
}

/// A readable mount option or path: what overlayfs takes in `lowerdir=` (`:` and `,` would
/// split it).
fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.contains(['/', ':', ',']) || name.starts_with('.') {
        bail!("{name:?} cannot name an overlay layer directory");
    }
    Ok(())
}

impl Overlay {
    /// Opens (creating on first use) the overlay storage in `root`.
    pub fn open(root: &Path) -> anyhow::Result<Overlay> {
        let has_overlay = || {
            fs::read_to_string("/proc/filesystems")
                .unwrap_or_default()
                .lines()
                .any(|l| l.trim_end().ends_with("\toverlay"))
        };
        if !has_overlay() {
            // A module not loaded yet (after a reboot) is loaded, as mount(8) would.
            let _ = Command::new("modprobe").arg("overlay").status();
            if !has_overlay() {
                bail!("the kernel has no overlayfs, which the overlay driver needs");
            }
        }
        let dir = overlay_dir(root);
        let config = config_path(root);
        if !config.exists() {
            crate::store::private_dir(&dir)?;
            for sub in [dir.join("l"), dir.join("empty")] {
                fs::create_dir_all(&sub)
                    .with_context(|| format!("failed to create {}", sub.display()))?;
            }
            crate::store::write_atomic(&config, b"{\"driver\": \"overlay2\"}\n")?;
            tracing::info!(dir = %dir.display(), "created the overlay storage");
        }
        Ok(Overlay { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `ROOT/overlay2/<name>`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The files of layer (or container) `name`.
    pub fn diff_dir(&self, name: &str) -> PathBuf {
        self.path(name).join("diff")
    }

    /// The short link's name for `name`, relative to the driver's directory.
    fn short(name: &str) -> String {
        let hash = sha2::Sha256::digest(name.as_bytes());
        let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("l/{hex}")
    }

    /// Makes an empty layer directory `name` (what an interrupted run left there goes) and
    /// its short link.
    pub fn create_layer(&self, name: &str) -> anyhow::Result<()> {
        check_name(name)?;
        self.remove(name)?;
        let diff = self.diff_dir(name);
        fs::create_dir_all(&diff)
            .with_context(|| format!("failed to create {}", diff.display()))?;
        let link = self.dir.join(Self::short(name));
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(Path::new("..").join(name).join("diff"), &link)
            .with_context(|| format!("failed to create {}", link.display()))?;
        Ok(())
    }

    /// Makes a container's directory: its writable `diff` and overlayfs' `work`.
    pub fn create_container(&self, name: &str) -> anyhow::Result<()> {
        self.create_layer(name)?;
        let work = self.path(name).join("work");
        fs::create_dir_all(&work).with_context(|| format!("failed to create {}", work.display()))
    }

    /// Removes layer or container `name` (nothing there is fine).
    /// Blocks allocated under the driver's directory, in bytes.
    pub fn bytes_in_use(&self) -> anyhow::Result<u64> {
        super::allocated_bytes(&self.dir)
    }

    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        check_name(name)?;
        let _ = fs::remove_file(self.dir.join(Self::short(name)));
        let path = self.path(name);
        match fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("failed to remove {}", path.display())),
        }
    }

    /// `lowerdir=` for `layers` (their names, bottom first): short links, top first, with the
    /// empty directory at the bottom (a read-only stack of one layer still has two, which
    /// overlayfs wants without an upper layer; an image of no layers has one).
    fn lowerdir(&self, layers: &[String]) -> anyhow::Result<String> {
        let mut dirs: Vec<String> = Vec::new();
        for name in layers.iter().rev() {
            check_name(name)?;
            dirs.push(Self::short(name));
        }
        dirs.push("empty".to_string());
        Ok(dirs.join(":"))
    }

    /// Mounts a container's stack on `target`: its `diff` as the writable upper layer, the
    /// image's layers below.
    pub fn mount_container(
        &self,
        layers: &[String],
        name: &str,
        target: &Path,
    ) -> anyhow::Result<()> {
        check_name(name)?;
        let mut options = format!(
            "lowerdir={},upperdir={name}/diff,workdir={name}/work",
            self.lowerdir(layers)?
        );
        // The inodes index ties an upper directory to its lower layers' file handles;
        // Docker turns it off so that a container's layers can be moved or remade.
        if Path::new("/sys/module/overlay/parameters/index").exists() {
            options.push_str(",index=off");
        }
        self.mount(&options, target, false)
    }

    /// Mounts `layers` (bottom first; with a container's `diff` last, as its top) read-only.
    pub fn mount_readonly(&self, layers: &[String], target: &Path) -> anyhow::Result<()> {
        let options = format!("lowerdir={}", self.lowerdir(layers)?);
        self.mount(&options, target, true)
    }

    fn mount(&self, options: &str, target: &Path, read_only: bool) -> anyhow::Result<()> {
        if options.len() >= 4096 {
            bail!(
                "the layer stack is too deep for one overlay mount ({} bytes of options)",
                options.len()
            );
        }
        fs::create_dir_all(target)
            .with_context(|| format!("failed to create {}", target.display()))?;
        // Relative paths keep the options short; the `mount` program runs in our directory
        // (changing this process's own working directory would race its other threads).
        let mut command = Command::new("mount");
        command
            .current_dir(&self.dir)
            .args(["-t", "overlay", "overlay", "-o"]);
        let options = if read_only {
            format!("ro,{options}")
        } else {
            options.to_string()
        };
        command.arg(&options).arg(target);
        let output = command.output().context("failed to run mount")?;
        if !output.status.success() {
            bail!(
                "failed to mount the overlay on {}: {}",
                target.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }
}
