//! A container's changes against its image: the container's filesystem walked beside its
//! origin layer's (mounted read-only). The container's thin is a block-level snapshot of the
//! layer's filesystem, so an untouched file keeps its inode's ctime: a file is changed when
//! its type, mode, owner, size, mtime or ctime (or a link's target) differ. The mount points
//! the runner makes (`/proc`, `/sys`, `/dev`, `/etc/hostname`, `/etc/hosts`,
//! `/etc/resolv.conf`) are not changes, as Docker's init layer keeps them out too.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What happened to a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Changed,
    Added,
    Deleted,
}

impl Kind {
    /// Docker's letter: A, C or D.
    pub fn letter(self) -> char {
        match self {
            Kind::Added => 'A',
            Kind::Changed => 'C',
            Kind::Deleted => 'D',
        }
    }
}

/// Paths the runner creates for its mounts when the image lacks them.
pub const INIT_PATHS: [&str; 6] = [
    "/proc",
    "/sys",
    "/dev",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
];

fn same(a: &fs::Metadata, b: &fs::Metadata, a_path: &Path, b_path: &Path) -> bool {
    let basic = a.file_type() == b.file_type()
        && a.mode() == b.mode()
        && a.uid() == b.uid()
        && a.gid() == b.gid()
        && a.rdev() == b.rdev();
    if !basic {
        return false;
    }
    if a.is_dir() {
        // A directory's times change with its entries; its children say what changed.
        return true;
    }
    a.size() == b.size()
        && (a.mtime(), a.mtime_nsec()) == (b.mtime(), b.mtime_nsec())
        && (a.ctime(), a.ctime_nsec()) == (b.ctime(), b.ctime_nsec())
        && (!a.file_type().is_symlink() || fs::read_link(a_path).ok() == fs::read_link(b_path).ok())
}

fn names(dir: &Path) -> io::Result<BTreeSet<String>> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e),
    }
}

/// Every path under `container` that differs from `parent`, sorted, with Docker's rules: a
/// deleted directory is one line, an added one lists what it holds, and a directory whose
/// entries changed is `C`.
pub fn changes(parent: &Path, container: &Path) -> io::Result<Vec<(Kind, String)>> {
    let mut out = Vec::new();
    walk(parent, container, "", &mut out)?;
    Ok(out)
}

/// Compares directory `rel` of both trees; `true` when something under it changed.
fn walk(
    parent: &Path,
    container: &Path,
    rel: &str,
    out: &mut Vec<(Kind, String)>,
) -> io::Result<bool> {
    let (p_dir, c_dir) = (
        parent.join(&rel[rel.len().min(1)..]),
        container.join(&rel[rel.len().min(1)..]),
    );
    let old = names(&p_dir)?;
    let new = names(&c_dir)?;
    let mut changed = false;
    for name in old.union(&new) {
        let path = format!("{rel}/{name}");
        let (p, c) = (p_dir.join(name), c_dir.join(name));
        match (fs::symlink_metadata(&p).ok(), fs::symlink_metadata(&c).ok()) {
            (None, Some(cm)) => {
                if !INIT_PATHS.contains(&path.as_str()) {
                    out.push((Kind::Added, path.clone()));
                    if cm.is_dir() {
                        added_below(&c, &path, out)?;
                    }
                    changed = true;
                }
            }
            (Some(_), None) => {
                out.push((Kind::Deleted, path));
                changed = true;
            }
            (Some(pm), Some(cm)) => {
                if pm.is_dir() && cm.is_dir() {
                    let at = out.len();
                    let inner = walk(parent, container, &path, out)?;
                    if inner || !same(&pm, &cm, &p, &c) {
                        out.insert(at, (Kind::Changed, path));
                        changed = true;
                    }
                } else if !same(&pm, &cm, &p, &c) {
                    out.push((Kind::Changed, path.clone()));
                    if cm.is_dir() {
                        // A file became a directory: everything in it is new.
                        added_below(&c, &path, out)?;
                    }
                    changed = true;
                }
            }
            (None, None) => {}
        }
    }
    Ok(changed)
}

/// Everything under the added directory `dir` (`rel` in the container), added too (but not
/// the runner's mount points: an image without `/etc` gets `/etc/hostname` made for it).
fn added_below(dir: &Path, rel: &str, out: &mut Vec<(Kind, String)>) -> io::Result<()> {
    for name in names(dir)? {
        let path = format!("{rel}/{name}");
        if INIT_PATHS.contains(&path.as_str()) {
            continue;
        }
        let full = dir.join(&name);
        out.push((Kind::Added, path.clone()));
        if fs::symlink_metadata(&full)?.is_dir() {
            added_below(&full, &path, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_changes_and_deletes_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for root in [&a, &b] {
            fs::create_dir_all(root.join("data/sub")).unwrap();
            fs::create_dir_all(root.join("etc")).unwrap();
        }
        fs::write(a.join("data/keep"), "x").unwrap();
        fs::write(a.join("data/gone"), "x").unwrap();
        fs::write(a.join("data/edit"), "x").unwrap();
        // b is a's copy (times preserved), then changed.
        // The same inode in both trees: untouched, like a file of the snapshot's origin.
        fs::hard_link(a.join("data/keep"), b.join("data/keep")).unwrap();
        fs::write(b.join("data/edit"), "changed!").unwrap();
        fs::write(b.join("data/sub/new"), "n").unwrap();
        fs::create_dir_all(b.join("x/y")).unwrap();
        fs::write(b.join("etc/hostname"), "").unwrap();
        fs::create_dir(b.join("proc")).unwrap();
        let got: Vec<String> = changes(&a, &b)
            .unwrap()
            .into_iter()
            .map(|(k, p)| format!("{} {p}", k.letter()))
            .collect();
        assert_eq!(
            got,
            [
                "C /data",
                "C /data/edit",
                "D /data/gone",
                "C /data/sub",
                "A /data/sub/new",
                "A /x",
                "A /x/y",
            ]
        );
    }
}
