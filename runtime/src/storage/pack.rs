//! Writing a layer tar from a container's changes (`commit`): every added or changed path
//! of the upper tree as a tar entry, every deleted one as an OCI whiteout (`.wh.NAME`), in
//! the sorted order `diff` lists them, with extended attributes as `SCHILY.xattr.*` PAX
//! records. No symlink is followed (the walk descends only into real directories and files
//! are opened with `O_NOFOLLOW`). The tree is a snapshot with devicemapper, but may be a
//! live container with overlay and `commit -p=false`: a file that changes size while it is
//! read fails the pack rather than making a corrupt tar.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use anyhow::Context;
use tar::{EntryType, Header, HeaderMode};

use crate::container::diff::Kind;

/// What a layer tar holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packed {
    pub entries: u64,
    pub whiteouts: u64,
    /// Bytes of file content (Docker's layer size).
    pub bytes: u64,
}

/// Writes the layer tar of `changes` (from [`crate::container::diff::changes`]) read from
/// `upper` into `out`, ending the archive.
pub fn write_layer(
    upper: &Path,
    changes: &[(Kind, String)],
    out: impl Write,
) -> anyhow::Result<Packed> {
    let mut tar = tar::Builder::new(out);
    let mut packed = Packed::default();
    // The first path each multiply-linked inode was written under: later ones are links.
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    for (kind, path) in changes {
        let rel = path.trim_start_matches('/');
        if rel.is_empty() {
            continue;
        }
        match kind {
            Kind::Deleted => {
                let (dir, name) = rel.rsplit_once('/').unwrap_or(("", rel));
                let whiteout = if dir.is_empty() {
                    format!(".wh.{name}")
                } else {
                    format!("{dir}/.wh.{name}")
                };
                let mut header = Header::new_gnu();
                header.set_entry_type(EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(0);
                header.set_mtime(0);
                tar.append_data(&mut header, &whiteout, std::io::empty())
                    .with_context(|| format!("failed to write the whiteout of /{rel}"))?;
                packed.whiteouts += 1;
            }
            Kind::Added | Kind::Changed => {
                let written = append(&mut tar, upper, rel, &mut links)
                    .with_context(|| format!("failed to pack /{rel}"))?;
                if let Some(bytes) = written {
                    packed.bytes += bytes;
                    packed.entries += 1;
                }
            }
        }
    }
    tar.into_inner().context("failed to end the layer tar")?;
    Ok(packed)
}

/// Appends one path; `Some(content bytes)` when an entry was written (sockets are not:
/// Docker leaves them out too).
fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    upper: &Path,
    rel: &str,
    links: &mut HashMap<(u64, u64), String>,
) -> anyhow::Result<Option<u64>> {
    // Every directory on the way must be a real directory of the tree: a path through a
    // symlink (which `changes` never lists, but a caller could) would read outside it.
    let mut at = upper.to_path_buf();
    if let Some((dirs, _)) = rel.rsplit_once('/') {
        for c in dirs.split('/') {
            if c.is_empty() || c == "." || c == ".." {
                anyhow::bail!("/{rel} is not a plain path inside the container");
            }
            at.push(c);
            if !fs::symlink_metadata(&at)?.is_dir() {
                anyhow::bail!("/{rel} goes through a symlink or a file: not packed");
            }
        }
    }
    if rel == ".." || rel == "." {
        anyhow::bail!("/{rel} is not a plain path inside the container");
    }
    let full = upper.join(rel);
    let meta = fs::symlink_metadata(&full)?;
    let kind = meta.file_type();
    if kind.is_socket() {
        return Ok(None);
    }
    let mut header = Header::new_gnu();
    header.set_metadata_in_mode(&meta, HeaderMode::Complete);
    // Access and change times would make the same changes pack differently each time
    // (Docker's tars leave them out too).
    if let Some(gnu) = header.as_gnu_mut() {
        gnu.set_atime(0);
        gnu.set_ctime(0);
    }
    let xattrs =
        xattrs(&full).with_context(|| format!("failed to read the attributes of /{rel}"))?;
    if !xattrs.is_empty() {
        let records: Vec<(String, &[u8])> = xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
            .collect();
        tar.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))?;
    }
    if kind.is_file() && meta.nlink() > 1 {
        let key = (meta.dev(), meta.ino());
        if let Some(first) = links.get(&key) {
            header.set_entry_type(EntryType::Link);
            header.set_size(0);
            tar.append_link(&mut header, rel, first)?;
            return Ok(Some(0));
        }
        links.insert(key, rel.to_string());
    }
    if kind.is_symlink() {
        let target = fs::read_link(&full)?;
        header.set_size(0);
        tar.append_link(&mut header, rel, target)?;
        Ok(Some(0))
    } else if kind.is_dir() {
        header.set_size(0);
        tar.append_data(&mut header, format!("{rel}/"), std::io::empty())?;
        Ok(Some(0))
    } else if kind.is_file() {
        let file = File::options()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&full)?;
        // Exactly the size the header says: the tar crate pads by what it copied.
        let mut content = std::io::Read::take(file, meta.len());
        let mut counted = CountingReader {
            inner: &mut content,
            count: 0,
        };
        tar.append_data(&mut header, rel, &mut counted)?;
        if counted.count != meta.len() {
            anyhow::bail!(
                "/{rel} changed while it was packed ({} bytes read, {} expected)",
                counted.count,
                meta.len()
            );
        }
        Ok(Some(meta.len()))
    } else {
        // Devices and fifos: the header says it all.
        header.set_size(0);
        tar.append_data(&mut header, rel, std::io::empty())?;
        Ok(Some(0))
    }
}

/// A reader that counts what it gave.
struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: std::io::Read> std::io::Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// The extended attributes of `path` (not followed), except overlayfs' own, which describe
/// the container's layers, not its files.
fn xattrs(path: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut names = vec![0u8; 4096];
    let len = loop {
        match rustix::fs::llistxattr(path, &mut names) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for name in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with("trusted.overlay.") || name.starts_with("user.overlay.") {
            continue;
        }
        let mut value = vec![0u8; 256];
        let n = loop {
            match rustix::fs::lgetxattr(path, name.as_str(), &mut value) {
                Ok(n) => break n,
                Err(rustix::io::Errno::RANGE) => value.resize(value.len() * 4, 0),
                // Removed meanwhile.
                Err(rustix::io::Errno::NODATA) => break usize::MAX,
                Err(e) => return Err(e.into()),
            }
        };
        if n != usize::MAX {
            value.truncate(n);
            out.push((name, value));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::diff::changes;
    use crate::storage::unpack::{apply_layer, Whiteouts};

    /// What `dir` holds: every path with its type and content or target.
    fn tree(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for entry in walkdir(dir) {
            let rel = entry
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let meta = fs::symlink_metadata(&entry).unwrap();
            let what = if meta.is_dir() {
                "dir".to_string()
            } else if meta.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&entry).unwrap().display())
            } else {
                format!("{:?}", fs::read(&entry).unwrap())
            };
            out.push(format!("{rel} {what} {:o}", meta.mode() & 0o7777));
        }
        out.sort();
        out
    }

    fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            out.push(p.clone());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                out.extend(walkdir(&p));
            }
        }
        out
    }

    /// `cp -a`, or with `link` `cp -al`: files hard-linked, as untouched files of a
    /// snapshot are the same inodes as their origin's.
    fn copy_tree(from: &Path, to: &Path, link: bool) {
        let status = std::process::Command::new("cp")
            .arg(if link { "-al" } else { "-a" })
            .arg(format!("{}/.", from.display()))
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn symlinks_out_of_the_rootfs_are_packed_as_links_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper) = (dir.path().join("lower"), dir.path().join("upper"));
        fs::create_dir(&lower).unwrap();
        fs::create_dir(&upper).unwrap();
        for (name, target) in [
            ("root", "/"),
            ("etc", "/etc"),
            ("up", "../../../../.."),
            ("pw", "/etc/passwd"),
        ] {
            std::os::unix::fs::symlink(target, upper.join(name)).unwrap();
        }
        let list = changes(&lower, &upper).unwrap();
        let names: Vec<&str> = list.iter().map(|(_, p)| p.as_str()).collect();
        assert_eq!(names, ["/etc", "/pw", "/root", "/up"]);
        let mut bytes = Vec::new();
        let packed = write_layer(&upper, &list, &mut bytes).unwrap();
        assert_eq!((packed.entries, packed.bytes), (4, 0));
        let mut archive = tar::Archive::new(bytes.as_slice());
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            assert_eq!(entry.header().entry_type(), EntryType::Symlink);
            assert_eq!(entry.size(), 0);
        }
        // A change list naming paths through those links is refused, not followed.
        for bad in [
            "/etc/passwd",
            "/root/etc/shadow",
            "/up/etc/hostname",
            "/../etc/passwd",
        ] {
            let list = vec![(Kind::Added, bad.to_string())];
            let e = write_layer(&upper, &list, Vec::new()).unwrap_err();
            assert!(format!("{e:#}").contains("not"), "{bad}: {e:#}");
        }
    }

    #[test]
    fn the_layer_applied_on_the_parent_gives_the_upper_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (lower, upper, replay) = (
            dir.path().join("lower"),
            dir.path().join("upper"),
            dir.path().join("replay"),
        );
        for d in [&lower, &upper, &replay] {
            fs::create_dir(d).unwrap();
        }
        fs::create_dir_all(lower.join("etc/conf.d")).unwrap();
        fs::write(lower.join("etc/keep"), "keep").unwrap();
        fs::write(lower.join("etc/edit"), "old").unwrap();
        fs::write(lower.join("etc/conf.d/a"), "a").unwrap();
        fs::write(lower.join("gone"), "x").unwrap();
        fs::write(lower.join("becomes-dir"), "x").unwrap();
        std::os::unix::fs::symlink("etc/keep", lower.join("link")).unwrap();
        copy_tree(&lower, &upper, true);
        copy_tree(&lower, &replay, false);

        fs::remove_file(upper.join("etc/edit")).unwrap();
        fs::write(upper.join("etc/edit"), "new content").unwrap();
        fs::remove_dir_all(upper.join("etc/conf.d")).unwrap();
        fs::remove_file(upper.join("gone")).unwrap();
        fs::remove_file(upper.join("becomes-dir")).unwrap();
        fs::create_dir(upper.join("becomes-dir")).unwrap();
        fs::write(upper.join("becomes-dir/inside"), "i").unwrap();
        fs::create_dir_all(upper.join("new/deep")).unwrap();
        fs::write(upper.join("new/deep/file"), "f").unwrap();
        fs::hard_link(upper.join("new/deep/file"), upper.join("new/hard")).unwrap();
        fs::remove_file(upper.join("link")).unwrap();
        std::os::unix::fs::symlink("/elsewhere", upper.join("link")).unwrap();

        rustix::fs::lsetxattr(
            upper.join("new/deep/file"),
            "user.thinbox.test",
            b"kept",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let list = changes(&lower, &upper).unwrap();
        let mut bytes = Vec::new();
        let packed = write_layer(&upper, &list, &mut bytes).unwrap();
        assert_eq!(packed.whiteouts, 2, "{list:?}");
        assert_eq!(packed.bytes, "new content".len() as u64 + 1 + 1);
        apply_layer(&replay, bytes.as_slice(), Whiteouts::Apply).unwrap();
        assert_eq!(tree(&replay), tree(&upper));
        let mut value = [0u8; 16];
        let n = rustix::fs::lgetxattr(
            replay.join("new/deep/file"),
            "user.thinbox.test",
            &mut value,
        )
        .expect("the attribute came through the tar");
        assert_eq!(&value[..n], b"kept");
    }
}
