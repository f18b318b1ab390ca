//! Applying a layer tar onto a mounted layer filesystem, with OCI whiteouts.
//!
//! Every path is resolved one component at a time from a directory fd of the layer's root,
//! with `O_NOFOLLOW`: an entry whose path goes through a symlink (or climbs with `..`) is
//! refused, so nothing a layer contains can make us write outside the root, whatever links
//! earlier layers left. Absolute entry paths are taken relative to the root. Files are
//! created with `O_EXCL | O_NOFOLLOW` after whatever was at their place is removed.
//!
//! Whiteouts, on a layer that is a snapshot of the layers below ([`Whiteouts::Apply`], the
//! devicemapper driver): `DIR/.wh.NAME` removes `DIR/NAME` of the layers below;
//! `DIR/.wh..wh..opq` empties `DIR` of everything the layers below put there (what this layer
//! wrote, before or after the marker, stays). On a layer directory of its own that overlayfs
//! stacks ([`Whiteouts::Overlay`], the overlay driver), they become what overlayfs reads: a
//! 0:0 character device named NAME, and the `trusted.overlay.opaque=y` attribute on DIR.
//! Markers are never written to the filesystem.
//!
//! Not yet: extended attributes (`SCHILY.xattr.*`, file capabilities) and sub-second times;
//! a later hardening issue takes `openat2(RESOLVE_IN_ROOT)` and fuzzes this with hostile
//! archives.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, CWD};
use rustix::io::Errno;
use tar::EntryType;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// What a layer's whiteouts do to the directory it is applied on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whiteouts {
    /// The directory holds the layers below (a snapshot): whited-out paths are removed.
    Apply,
    /// The directory holds this layer alone, stacked by overlayfs: whiteouts are recorded as
    /// overlayfs whiteouts and opaque directories.
    Overlay,
}

/// What an apply did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub entries: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
    pub whiteouts: u64,
}

/// A path inside the layer root: its components, none of them empty, `.` or `..`.
type Components = Vec<String>;

fn components(raw: &[u8]) -> anyhow::Result<Components> {
    let text = std::str::from_utf8(raw)
        .with_context(|| format!("entry path {:?} is not UTF-8", String::from_utf8_lossy(raw)))?;
    let mut out = Vec::new();
    for c in text.split('/') {
        match c {
            "" | "." => {}
            ".." => bail!("entry path {text:?} climbs out with '..'"),
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

fn show_path(path: &[String]) -> String {
    format!("/{}", path.join("/"))
}

fn open_dir(parent: impl AsFd, name: &str) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The layer being applied.
struct Target {
    root: OwnedFd,
    /// Paths this layer wrote (an opaque marker keeps them).
    written: HashSet<Components>,
    /// Directory times, set at the end (creating entries inside changes them).
    dir_times: Vec<(Components, u64)>,
}

impl Target {
    /// Opens the directory `path` (every component a real directory, no symlink), creating
    /// missing ones (mode 0755) when `create`. `Ok(None)` when missing and not `create`.
    fn dir(&self, path: &[String], create: bool) -> anyhow::Result<Option<OwnedFd>> {
        let mut cur = open_dir(&self.root, ".").context("failed to open the layer root")?;
        for (i, c) in path.iter().enumerate() {
            let next = match open_dir(&cur, c.as_str()) {
                Ok(fd) => fd,
                Err(Errno::NOENT) if create => {
                    rustix::fs::mkdirat(&cur, c.as_str(), Mode::from_raw_mode(0o755))
                        .with_context(|| format!("failed to create {}", show_path(&path[..=i])))?;
                    open_dir(&cur, c.as_str())
                        .with_context(|| format!("failed to open {}", show_path(&path[..=i])))?
                }
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::LOOP | Errno::NOTDIR) => bail!(
                    "{} is a symlink or not a directory; entries may not go through it",
                    show_path(&path[..=i])
                ),
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("failed to open {}", show_path(&path[..=i])))
                }
            };
            cur = next;
        }
        Ok(Some(cur))
    }

    /// Opens the parent of `path` for an entry, and returns it with the last component.
    fn parent<'p>(
        &self,
        path: &'p [String],
        create: bool,
    ) -> anyhow::Result<Option<(OwnedFd, &'p str)>> {
        let (name, dir) = path
            .split_last()
            .context("an entry names the root itself")?;
        Ok(self.dir(dir, create)?.map(|fd| (fd, name.as_str())))
    }
}

fn proc_path(fd: &OwnedFd, name: &str) -> PathBuf {
    use std::os::fd::AsRawFd;
    Path::new("/proc/self/fd")
        .join(fd.as_raw_fd().to_string())
        .join(name)
}

/// Removes `name` in `dir`, whatever it is (a directory with its whole tree). Nothing there
/// is fine.
fn remove_any(dir: &OwnedFd, name: &str) -> anyhow::Result<()> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("failed to stat {name}")),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            // std's remove_dir_all walks with openat and never follows symlinks; the path
            // goes through our own directory fd.
            std::fs::remove_dir_all(proc_path(dir, name))
                .with_context(|| format!("failed to remove directory {name}"))
        }
        Ok(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty())
            .with_context(|| format!("failed to remove {name}")),
    }
}

fn is_dir(dir: &OwnedFd, name: &str) -> bool {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
}

fn set_owner_mode_time(
    dir: &OwnedFd,
    name: &str,
    header: &tar::Header,
    symlink: bool,
) -> anyhow::Result<()> {
    let uid = header.uid().ok().and_then(|u| u32::try_from(u).ok());
    let gid = header.gid().ok().and_then(|g| u32::try_from(g).ok());
    rustix::fs::chownat(
        dir,
        name,
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("failed to chown {name}"))?;
    if !symlink {
        // After chown, which clears set-id bits.
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(mode), AtFlags::empty())
            .with_context(|| format!("failed to chmod {name}"))?;
    }
    if let Ok(mtime) = header.mtime() {
        set_time(dir, name, mtime)?;
    }
    Ok(())
}

fn set_time(dir: &OwnedFd, name: &str, mtime: u64) -> anyhow::Result<()> {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: t,
        last_modification: t,
    };
    rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
        .with_context(|| format!("failed to set the times of {name}"))
}

/// Applies the tar stream `tar` onto the directory `root` (a mounted layer snapshot, or an
/// overlay layer directory), with whiteouts treated as `whiteouts` says.
pub fn apply_layer(root: &Path, tar: impl Read, whiteouts: Whiteouts) -> anyhow::Result<Applied> {
    let root_fd = rustix::fs::openat(
        CWD,
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("failed to open {}", root.display()))?;
    let mut target = Target {
        root: root_fd,
        written: HashSet::new(),
        dir_times: Vec::new(),
    };
    let mut archive = tar::Archive::new(tar);
    let mut applied = Applied::default();
    let mut opaque_dirs: Vec<Components> = Vec::new();
    for entry in archive.entries().context("failed to read the layer tar")? {
        let mut entry = entry.context("failed to read the layer tar")?;
        let path = components(&entry.path_bytes())?;
        let shown = show_path(&path);
        apply_entry(
            &mut target,
            &mut entry,
            path,
            &mut applied,
            &mut opaque_dirs,
            whiteouts,
        )
        .with_context(|| format!("failed to apply layer entry {shown}"))?;
    }
    // Opaque markers act once the whole layer is known, so entries after a marker stay.
    for dir in opaque_dirs {
        match whiteouts {
            Whiteouts::Apply => {
                if let Some(fd) = target.dir(&dir, false)? {
                    make_opaque(&target, &fd, &dir)?;
                }
            }
            Whiteouts::Overlay => {
                let fd = target
                    .dir(&dir, true)?
                    .context("the opaque directory vanished")?;
                rustix::fs::fsetxattr(
                    &fd,
                    "trusted.overlay.opaque",
                    b"y",
                    rustix::fs::XattrFlags::empty(),
                )
                .with_context(|| format!("failed to make {} opaque", show_path(&dir)))?;
            }
        }
    }
    for (path, mtime) in target.dir_times.iter().rev() {
        if let Some((fd, name)) = target.parent(path, false)? {
            set_time(&fd, name, *mtime)?;
        }
    }
    Ok(applied)
}

/// Removes from `dir` (at `path`) everything this layer did not write.
fn make_opaque(target: &Target, dir: &OwnedFd, path: &[String]) -> anyhow::Result<()> {
    let listing = std::fs::read_dir(proc_path(dir, "."))
        .with_context(|| format!("failed to list {}", show_path(path)))?;
    for child in listing {
        let child = child?;
        let Some(name) = child.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let mut child_path = path.to_vec();
        child_path.push(name.clone());
        if !target.written.contains(&child_path) {
            remove_any(dir, &name)?;
        } else if is_dir(dir, &name) {
            let sub = open_dir(dir, name.as_str())?;
            make_opaque(target, &sub, &child_path)?;
        }
    }
    Ok(())
}

fn apply_entry<R: Read>(
    target: &mut Target,
    entry: &mut tar::Entry<'_, R>,
    path: Components,
    applied: &mut Applied,
    opaque_dirs: &mut Vec<Components>,
    whiteouts: Whiteouts,
) -> anyhow::Result<()> {
    let Some(name) = path.last().cloned() else {
        // The root itself ("./"): its mode and owner come from the base device.
        return Ok(());
    };
    if name == OPAQUE_MARKER {
        applied.whiteouts += 1;
        opaque_dirs.push(path[..path.len() - 1].to_vec());
        return Ok(());
    }
    if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
        applied.whiteouts += 1;
        if hidden.is_empty() || hidden == "." || hidden == ".." {
            bail!("malformed whiteout {name:?}");
        }
        match whiteouts {
            Whiteouts::Apply => {
                if let Some(dir) = target.dir(&path[..path.len() - 1], false)? {
                    remove_any(&dir, hidden)?;
                }
            }
            Whiteouts::Overlay => {
                let dir = target
                    .dir(&path[..path.len() - 1], true)?
                    .context("the whiteout's directory vanished")?;
                remove_any(&dir, hidden)?;
                rustix::fs::mknodat(
                    &dir,
                    hidden,
                    FileType::CharacterDevice,
                    Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .context("failed to create the overlay whiteout")?;
            }
        }
        return Ok(());
    }
    let header = entry.header().clone();
    let kind = header.entry_type();
    let (dir, name) = target
        .parent(&path, true)?
        .context("the parent directory vanished")?;
    match kind {
        EntryType::Directory => {
            if !is_dir(&dir, name) {
                remove_any(&dir, name)?;
                rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                    .context("failed to create the directory")?;
            }
            set_owner_mode_time(&dir, name, &header, false)?;
            if let Ok(mtime) = header.mtime() {
                target.dir_times.push((path.clone(), mtime));
            }
        }
        EntryType::Regular | EntryType::Continuous => {
            remove_any(&dir, name)?;
            let fd = rustix::fs::openat(
                &dir,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .context("failed to create the file")?;
            let mut file = File::from(fd);
            applied.bytes += io::copy(entry, &mut file).context("failed to write the file")?;
            set_owner_mode_time(&dir, name, &header, false)?;
        }
        EntryType::Symlink => {
            let link = entry
                .link_name_bytes()
                .context("a symlink without a target")?
                .into_owned();
            remove_any(&dir, name)?;
            rustix::fs::symlinkat(link.as_slice(), &dir, name)
                .context("failed to create the symlink")?;
            set_owner_mode_time(&dir, name, &header, true)?;
        }
        EntryType::Link => {
            let link = entry
                .link_name_bytes()
                .context("a hard link without a target")?
                .into_owned();
            let source = components(&link)?;
            let (source_dir, source_name) = target.parent(&source, false)?.with_context(|| {
                format!("hard link target {} does not exist", show_path(&source))
            })?;
            remove_any(&dir, name)?;
            rustix::fs::linkat(&source_dir, source_name, &dir, name, AtFlags::empty())
                .with_context(|| format!("failed to link to {}", show_path(&source)))?;
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let file_type = match kind {
                EntryType::Char => FileType::CharacterDevice,
                EntryType::Block => FileType::BlockDevice,
                _ => FileType::Fifo,
            };
            let major = header.device_major().ok().flatten().unwrap_or(0);
            let minor = header.device_minor().ok().flatten().unwrap_or(0);
            remove_any(&dir, name)?;
            rustix::fs::mknodat(
                &dir,
                name,
                file_type,
                Mode::from_raw_mode(0o600),
                rustix::fs::makedev(major, minor),
            )
            .context("failed to create the device node")?;
            set_owner_mode_time(&dir, name, &header, false)?;
        }
        other => {
            tracing::debug!(path = %show_path(&path), "skipping a tar entry of type {other:?}");
            return Ok(());
        }
    }
    applied.entries += 1;
    target.written.insert(path);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(u64::from(rustix::process::geteuid().as_raw()));
        h.set_gid(u64::from(rustix::process::getegid().as_raw()));
        h.set_entry_type(EntryType::Regular);
        b.append_data(&mut h, path, data).unwrap();
    }

    fn raw_entry(b: &mut tar::Builder<Vec<u8>>, path: &[u8], kind: EntryType, link: Option<&str>) {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.set_size(0);
        h.set_mode(0o755);
        h.set_uid(u64::from(rustix::process::geteuid().as_raw()));
        h.set_gid(u64::from(rustix::process::getegid().as_raw()));
        h.set_entry_type(kind);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
    }

    #[test]
    fn whiteouts_and_opaque_dirs_hide_lower_files() {
        let dir = tempfile::tempdir().unwrap();
        let lower = tar_of(|b| {
            file(b, "data/keep.txt", b"original");
            file(b, "data/delete-me.txt", b"bye");
            file(b, "data/opaque/a", b"a");
            file(b, "data/opaque/sub/b", b"b");
        });
        apply_layer(dir.path(), lower.as_slice(), Whiteouts::Apply).unwrap();
        let upper = tar_of(|b| {
            file(b, "data/opaque/c", b"c");
            file(b, "data/keep.txt", b"changed");
            file(b, "data/.wh.delete-me.txt", b"");
            file(b, "data/opaque/.wh..wh..opq", b"");
        });
        let applied = apply_layer(dir.path(), upper.as_slice(), Whiteouts::Apply).unwrap();
        assert_eq!(applied.whiteouts, 2);
        let d = dir.path().join("data");
        assert_eq!(std::fs::read(d.join("keep.txt")).unwrap(), b"changed");
        assert!(!d.join("delete-me.txt").exists());
        assert!(!d.join("opaque/a").exists());
        assert!(!d.join("opaque/sub").exists());
        assert_eq!(std::fs::read(d.join("opaque/c")).unwrap(), b"c");
        assert!(!d.join("opaque/.wh..wh..opq").exists());
    }

    #[test]
    fn entries_may_not_climb_out_or_follow_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let climb = tar_of(|b| raw_entry(b, b"../escape", EntryType::Regular, None));
        assert!(apply_layer(dir.path(), climb.as_slice(), Whiteouts::Apply).is_err());

        let via_link = tar_of(|b| {
            raw_entry(
                b,
                b"evil",
                EntryType::Symlink,
                Some(outside.path().to_str().unwrap()),
            );
            file(b, "evil/owned", b"x");
        });
        let e = apply_layer(dir.path(), via_link.as_slice(), Whiteouts::Apply).unwrap_err();
        assert!(format!("{e:#}").contains("symlink"), "{e:#}");
        assert!(!outside.path().join("owned").exists());

        // A symlink replaced by a file is the file, not a write through the link.
        let replace = tar_of(|b| file(b, "evil", b"plain"));
        apply_layer(dir.path(), replace.as_slice(), Whiteouts::Apply).unwrap();
        assert_eq!(std::fs::read(dir.path().join("evil")).unwrap(), b"plain");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn absolute_paths_land_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let abs = tar_of(|b| raw_entry(b, b"/abs-dir", EntryType::Directory, None));
        apply_layer(dir.path(), abs.as_slice(), Whiteouts::Apply).unwrap();
        assert!(dir.path().join("abs-dir").is_dir());
    }
}
