//! Applying a layer tar onto a mounted layer filesystem, with OCI whiteouts.
//!
//! Layers are hostile input and we run as root, so nothing a layer holds may reach outside
//! the layer's root:
//! - Entry paths are cleaned lexically the way Docker cleans them (`a/../b` is `b`, a path
//!   that climbs above the root is refused, absolute paths are taken relative to the root).
//! - The parent directory of every entry is opened with `openat2(RESOLVE_IN_ROOT |
//!   RESOLVE_NO_MAGICLINKS)` from a directory fd of the root: the kernel resolves symlinks
//!   as if the root were `/`, so a link to `/etc` or `../../..` stays inside, even when
//!   another process swaps directories for links while we run. Kernels without `openat2`
//!   get a component-by-component walk with `O_NOFOLLOW` that refuses every symlink.
//! - The last component is never followed: files are created with `O_EXCL | O_NOFOLLOW`
//!   after whatever was there is removed, and owner, mode, times and extended attributes are
//!   set with the no-follow variants (the mode through an `O_PATH` fd).
//! - Hard links name a path inside the root (resolved the same way) and link the entry
//!   itself, never what a symlink points to.
//!
//! Ownership, modes with set-id bits, device nodes and extended attributes (`SCHILY.xattr.*`
//! PAX records, so file capabilities too) are applied as the image says, inside the root.
//! overlayfs' own attributes (`trusted.overlay.*`, `user.overlay.*`) are never taken from an
//! image: they would let a layer redirect overlayfs lookups.
//!
//! Bounds ([`Limits`]): bytes unpacked, entries, path length, the size of PAX and GNU long
//! name records (read into memory by the tar reader) and, for compressed layers,
//! [`RatioGuard`]. Runs of zeros are written as holes, so a sparse file (GNU sparse entries
//! are expanded with zeros by the tar reader) takes no space for what it does not hold.
//!
//! Duplicates resolve as Docker resolves them: entries apply in order and the last wins,
//! except that a directory over a directory merges (its metadata is updated).
//!
//! Whiteouts, on a layer that is a snapshot of the layers below ([`Whiteouts::Apply`], the
//! devicemapper driver): `DIR/.wh.NAME` removes `DIR/NAME` of the layers below;
//! `DIR/.wh..wh..opq` empties `DIR` of everything the layers below put there (what this layer
//! wrote, before or after the marker, stays). On a layer directory of its own that overlayfs
//! stacks ([`Whiteouts::Overlay`], the overlay driver), they become what overlayfs reads: a
//! 0:0 character device named NAME, and the `trusted.overlay.opaque=y` attribute on DIR.
//! Markers are never written to the filesystem; a bare `.wh.` is refused.

use std::cell::Cell;
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{bail, Context};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, CWD};
use rustix::io::Errno;
use tar::EntryType;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// AUFS keeps its own metadata under names with this prefix; Docker skips them.
const AUFS_META_PREFIX: &str = ".wh..wh.";

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
    /// Bytes of regular file content (holes included).
    pub bytes: u64,
    pub whiteouts: u64,
}

/// Bounds on what one layer may unpack to. Each can be changed through its environment
/// variable (a plain number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of file content, holes included (`THINBOX_MAX_LAYER_BYTES`, 64 GiB).
    pub max_bytes: u64,
    /// Tar entries, whiteouts included (`THINBOX_MAX_LAYER_ENTRIES`, 4 Mi).
    pub max_entries: u64,
    /// Bytes of an entry's path or link target (`THINBOX_MAX_PATH_BYTES`, 4096: Linux's
    /// PATH_MAX).
    pub max_path_bytes: usize,
    /// Bytes of one PAX or GNU long-name record (`THINBOX_MAX_TAR_RECORD_BYTES`, 1 MiB).
    pub max_record_bytes: u64,
    /// Uncompressed bytes per compressed byte (`THINBOX_MAX_LAYER_RATIO`, 1000: gzip cannot
    /// pass 1032, so only long runs of one byte or a crafted stream get there) ...
    pub max_ratio: u64,
    /// ... once more than this many bytes came out (`THINBOX_LAYER_RATIO_FLOOR`, 256 MiB).
    pub ratio_floor: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: 64 << 30,
            max_entries: 4 << 20,
            max_path_bytes: 4096,
            max_record_bytes: 1 << 20,
            max_ratio: 1000,
            ratio_floor: 256 << 20,
        }
    }
}

impl Limits {
    /// For a blob thinbox itself just packed (`commit` on the overlay driver): the container's
    /// own files, however well they compress (a zero-filled file passes any ratio), bounded
    /// only by what the filesystem held.
    pub fn own_blob() -> Limits {
        Limits {
            max_bytes: u64::MAX,
            max_entries: u64::MAX,
            max_path_bytes: usize::MAX,
            max_record_bytes: u64::MAX,
            max_ratio: u64::MAX,
            ratio_floor: u64::MAX,
        }
    }

    /// The most bytes a layer's tar stream may hold in all: the file content allowed, a
    /// header, padding and a modest PAX record for every entry allowed, and slack for
    /// end-of-archive padding. Content is counted as it is written, but bytes the tar
    /// reader skips (the data of entries it does not unpack, extension records, whatever
    /// follows the end of the archive) are only read and hashed: this bounds that work.
    pub fn max_stream_bytes(&self) -> u64 {
        const PER_ENTRY: u64 = 4 << 10;
        const SLACK: u64 = 16 << 20;
        self.max_bytes
            .saturating_add(self.max_entries.saturating_mul(PER_ENTRY))
            .saturating_add(SLACK)
    }

    /// The defaults, with what the environment sets instead.
    pub fn from_env() -> anyhow::Result<Limits> {
        fn var(name: &str, default: u64) -> anyhow::Result<u64> {
            match std::env::var(name) {
                Ok(text) => text
                    .trim()
                    .parse()
                    .with_context(|| format!("{name}={text:?} is not a number")),
                Err(_) => Ok(default),
            }
        }
        let d = Limits::default();
        Ok(Limits {
            max_bytes: var("THINBOX_MAX_LAYER_BYTES", d.max_bytes)?,
            max_entries: var("THINBOX_MAX_LAYER_ENTRIES", d.max_entries)?,
            max_path_bytes: usize::try_from(var(
                "THINBOX_MAX_PATH_BYTES",
                d.max_path_bytes as u64,
            )?)?,
            max_record_bytes: var("THINBOX_MAX_TAR_RECORD_BYTES", d.max_record_bytes)?,
            max_ratio: var("THINBOX_MAX_LAYER_RATIO", d.max_ratio)?,
            ratio_floor: var("THINBOX_LAYER_RATIO_FLOOR", d.ratio_floor)?,
        })
    }
}

/// A reader that counts the (compressed) bytes read through it into a shared counter, for
/// [`RatioGuard`].
pub struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R> Counted<R> {
    pub fn new(inner: R) -> (Counted<R>, Rc<Cell<u64>>) {
        let count = Rc::new(Cell::new(0));
        (
            Counted {
                inner,
                count: count.clone(),
            },
            count,
        )
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

/// A reader of decompressed bytes that fails once they outgrow the compressed bytes read
/// (a [`Counted`] counter) by more than the limits allow, or [`Limits::max_stream_bytes`]
/// in all: a decompression bomb stops before it fills anything or keeps a core busy.
pub struct RatioGuard<R> {
    inner: R,
    compressed: Rc<Cell<u64>>,
    out: u64,
    max_ratio: u64,
    floor: u64,
    max_out: u64,
}

impl<R> RatioGuard<R> {
    pub fn new(inner: R, compressed: Rc<Cell<u64>>, limits: &Limits) -> RatioGuard<R> {
        RatioGuard {
            inner,
            compressed,
            out: 0,
            max_ratio: limits.max_ratio,
            floor: limits.ratio_floor,
            max_out: limits.max_stream_bytes(),
        }
    }
}

impl<R: Read> Read for RatioGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out += n as u64;
        let compressed = self.compressed.get();
        if self.out > self.floor && self.out > compressed.saturating_mul(self.max_ratio) {
            return Err(io::Error::other(format!(
                "the layer decompresses to more than {} times its size ({} bytes from {} \
                 read): refused as a decompression bomb (THINBOX_MAX_LAYER_RATIO)",
                self.max_ratio, self.out, compressed
            )));
        }
        if self.out > self.max_out {
            return Err(io::Error::other(format!(
                "the layer decompresses to more than {} bytes: refused (THINBOX_MAX_LAYER_BYTES \
                 and THINBOX_MAX_LAYER_ENTRIES bound it)",
                self.max_out
            )));
        }
        Ok(n)
    }
}

mod guard;
#[cfg(test)]
mod hostile_tests;
pub use guard::TarGuard;

/// A path inside the layer root: its components, none of them empty, `.` or `..`.
type Components = Vec<String>;

/// Cleans `raw` lexically, as Docker does (`filepath.Clean` of the name joined to the
/// root): `.` and empty components go, `..` removes the one before; climbing above the root
/// is refused.
fn components(raw: &[u8]) -> anyhow::Result<Components> {
    let text = std::str::from_utf8(raw)
        .with_context(|| format!("entry path {:?} is not UTF-8", String::from_utf8_lossy(raw)))?;
    let mut out: Components = Vec::new();
    for c in text.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    bail!("entry path {text:?} climbs out of the layer with '..'");
                }
            }
            c => {
                if c.len() > 255 {
                    bail!("entry path {text:?} has a component longer than 255 bytes");
                }
                out.push(c.to_string())
            }
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

/// How paths are resolved under the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolve {
    /// `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`: symlinks followed, inside the root.
    InRoot,
    /// One component at a time with `O_NOFOLLOW`: symlinks refused.
    NoFollow,
}

/// The layer being applied.
struct Target {
    root: OwnedFd,
    resolve: Resolve,
    /// Paths this layer wrote (an opaque marker keeps them).
    written: HashSet<Components>,
    /// Directory times, set at the end (creating entries inside changes them).
    dir_times: Vec<(Components, u64)>,
    limits: Limits,
    buf: Vec<u8>,
}

impl Target {
    /// Opens the directory at `path` under the root, as [`Resolve`] says.
    fn open(&self, path: &[String]) -> rustix::io::Result<OwnedFd> {
        if path.is_empty() {
            return open_dir(&self.root, ".");
        }
        match self.resolve {
            Resolve::InRoot => {
                let joined = path.join("/");
                // EAGAIN: a rename or mount raced with the lookup; the kernel asks for a retry.
                let mut last = Errno::AGAIN;
                for _ in 0..64 {
                    match rustix::fs::openat2(
                        &self.root,
                        joined.as_str(),
                        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
                        Mode::empty(),
                        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
                    ) {
                        Err(Errno::AGAIN) => last = Errno::AGAIN,
                        other => return other,
                    }
                }
                Err(last)
            }
            Resolve::NoFollow => {
                let mut cur = open_dir(&self.root, ".")?;
                for c in path {
                    cur = open_dir(&cur, c.as_str())?;
                }
                Ok(cur)
            }
        }
    }

    fn open_error(e: Errno, path: &[String]) -> anyhow::Error {
        match e {
            Errno::LOOP | Errno::NOTDIR => anyhow::anyhow!(
                "{} is not a directory (a file, or a symlink this resolution may not follow); \
                 entries may not go through it",
                show_path(path)
            ),
            e => anyhow::Error::new(e).context(format!("failed to open {}", show_path(path))),
        }
    }

    /// Opens the directory `path`, creating missing ones (mode 0755) when `create`.
    /// `Ok(None)` when missing and not `create`.
    fn dir(&self, path: &[String], create: bool) -> anyhow::Result<Option<OwnedFd>> {
        match self.open(path) {
            Ok(fd) => return Ok(Some(fd)),
            Err(Errno::NOENT) if create => {}
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(Self::open_error(e, path)),
        }
        let mut cur = self.open(&[]).context("failed to open the layer root")?;
        for i in 0..path.len() {
            cur = match self.open(&path[..=i]) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rustix::fs::mkdirat(&cur, path[i].as_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => {
                            return Err(e).with_context(|| {
                                format!("failed to create {}", show_path(&path[..=i]))
                            })
                        }
                    }
                    self.open(&path[..=i])
                        .map_err(|e| Self::open_error(e, &path[..=i]))?
                }
                Err(e) => return Err(Self::open_error(e, &path[..=i])),
            };
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
            // std's remove_dir_all walks with openat and never follows symlinks (a link
            // swapped in for the directory is unlinked itself); the path goes through our
            // own directory fd.
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

/// The extended attributes an entry's PAX records carry (`SCHILY.xattr.NAME=VALUE`), less
/// those an image may not set.
fn xattrs_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let Some(pax) = entry.pax_extensions().context("malformed PAX records")? else {
        return Ok(out);
    };
    for record in pax {
        let record = record.context("malformed PAX record")?;
        let Ok(key) = record.key() else { continue };
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
            continue;
        };
        let allowed = (name.starts_with("security.")
            || name.starts_with("user.")
            || name.starts_with("trusted."))
            && !name.starts_with("trusted.overlay.")
            && !name.starts_with("user.overlay.");
        if !allowed || name.contains('\0') {
            tracing::warn!(
                xattr = name,
                "extended attribute from the image not applied"
            );
            continue;
        }
        out.push((name.to_string(), record.value_bytes().to_vec()));
    }
    Ok(out)
}

/// Sets owner, extended attributes, mode (for all but symlinks) and mtime of `dir/name`,
/// never following `name`. The order is Docker's: chown first (it clears set-id bits and
/// file capabilities), then attributes, then the mode.
fn set_metadata(
    dir: &OwnedFd,
    name: &str,
    header: &tar::Header,
    xattrs: &[(String, Vec<u8>)],
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
    for (key, value) in xattrs {
        // lsetxattr through our directory fd: the last component is never followed.
        match rustix::fs::lsetxattr(
            proc_path(dir, name),
            key.as_str(),
            value,
            rustix::fs::XattrFlags::empty(),
        ) {
            Ok(()) => {}
            // No xattrs on this filesystem, or none of that namespace on this file type
            // (user.* on symlinks and devices): Docker skips these too.
            Err(Errno::NOTSUP | Errno::PERM) => {
                tracing::warn!(xattr = %key, file = name, "extended attribute not supported here")
            }
            Err(e) => {
                return Err(e).with_context(|| format!("failed to set attribute {key} on {name}"))
            }
        }
    }
    if !symlink {
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        // chmod has no no-follow form on older kernels: pin the inode with O_PATH |
        // O_NOFOLLOW, check it is not a symlink, and chmod it through its fd's /proc link.
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("failed to open {name}"))?;
        let st = rustix::fs::fstat(&fd).with_context(|| format!("failed to stat {name}"))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            bail!("{name} was replaced by a symlink while it was applied");
        }
        let via = format!("/proc/self/fd/{}", fd.as_raw_fd());
        rustix::fs::chmodat(
            CWD,
            via.as_str(),
            Mode::from_raw_mode(mode),
            AtFlags::empty(),
        )
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
/// overlay layer directory), with whiteouts treated as `whiteouts` says, within the
/// [`Limits`] the environment sets.
#[allow(dead_code)] // pull and load pass the limits their decompression checks use
pub fn apply_layer(root: &Path, tar: impl Read, whiteouts: Whiteouts) -> anyhow::Result<Applied> {
    apply_layer_with(root, tar, whiteouts, &Limits::from_env()?)
}

/// [`apply_layer`] within `limits`.
pub fn apply_layer_with(
    root: &Path,
    tar: impl Read,
    whiteouts: Whiteouts,
    limits: &Limits,
) -> anyhow::Result<Applied> {
    apply(root, tar, whiteouts, limits, None)
}

fn apply(
    root: &Path,
    tar: impl Read,
    whiteouts: Whiteouts,
    limits: &Limits,
    resolve: Option<Resolve>,
) -> anyhow::Result<Applied> {
    let root_fd = rustix::fs::openat(
        CWD,
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("failed to open {}", root.display()))?;
    let resolve = resolve.unwrap_or_else(|| {
        match rustix::fs::openat2(
            &root_fd,
            ".",
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(_) => Resolve::InRoot,
            Err(e) => {
                tracing::warn!(
                    "openat2 is not available ({e}): symlinks in layer paths are refused"
                );
                Resolve::NoFollow
            }
        }
    });
    let mut target = Target {
        root: root_fd,
        resolve,
        written: HashSet::new(),
        dir_times: Vec::new(),
        limits: *limits,
        buf: vec![0; 64 << 10],
    };
    let mut archive = tar::Archive::new(TarGuard::new(tar, limits.max_record_bytes));
    let mut applied = Applied::default();
    let mut seen = 0u64;
    let mut opaque_dirs: Vec<Components> = Vec::new();
    for entry in archive.entries().context("failed to read the layer tar")? {
        let mut entry = entry.context("failed to read the layer tar")?;
        seen += 1;
        if seen > limits.max_entries {
            bail!(
                "the layer has more than {} entries: refused (THINBOX_MAX_LAYER_ENTRIES)",
                limits.max_entries
            );
        }
        let raw = entry.path_bytes();
        if raw.len() > limits.max_path_bytes {
            bail!(
                "a layer entry's path is {} bytes long, more than {}: refused \
                 (THINBOX_MAX_PATH_BYTES)",
                raw.len(),
                limits.max_path_bytes
            );
        }
        let path = components(&raw)?;
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
            if is_dir(&fd, name) {
                set_time(&fd, name, *mtime)?;
            }
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

/// Copies a file's content, leaving holes where whole chunks are zero, within the layer's
/// byte budget.
fn write_content(
    entry: &mut impl Read,
    file: &mut File,
    buf: &mut [u8],
    applied: &mut Applied,
    limits: &Limits,
) -> anyhow::Result<()> {
    let mut len = 0u64;
    loop {
        let n = match entry.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("failed to read the file from the layer"),
        };
        applied.bytes += n as u64;
        if applied.bytes > limits.max_bytes {
            bail!(
                "the layer unpacks to more than {} bytes: refused (THINBOX_MAX_LAYER_BYTES)",
                limits.max_bytes
            );
        }
        if buf[..n].iter().all(|&b| b == 0) {
            file.seek(SeekFrom::Current(n as i64))?;
        } else {
            file.write_all(&buf[..n])
                .context("failed to write the file")?;
        }
        len += n as u64;
    }
    // A trailing hole needs the length set.
    file.set_len(len).context("failed to size the file")?;
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
    if path[0].starts_with(AUFS_META_PREFIX) {
        tracing::debug!(path = %show_path(&path), "skipping AUFS metadata");
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
    let link_name = |entry: &tar::Entry<'_, R>| -> anyhow::Result<Vec<u8>> {
        let link = entry
            .link_name_bytes()
            .context("a link without a target")?
            .into_owned();
        if link.len() > target.limits.max_path_bytes {
            bail!(
                "the link target is {} bytes long, more than {}: refused \
                 (THINBOX_MAX_PATH_BYTES)",
                link.len(),
                target.limits.max_path_bytes
            );
        }
        Ok(link)
    };
    let xattrs = xattrs_of(entry)?;
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
            set_metadata(&dir, name, &header, &xattrs, false)?;
            if let Ok(mtime) = header.mtime() {
                target.dir_times.push((path.clone(), mtime));
            }
        }
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            remove_any(&dir, name)?;
            let fd = rustix::fs::openat(
                &dir,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .context("failed to create the file")?;
            let mut file = File::from(fd);
            write_content(entry, &mut file, &mut target.buf, applied, &target.limits)?;
            drop(file);
            set_metadata(&dir, name, &header, &xattrs, false)?;
        }
        EntryType::Symlink => {
            let link = link_name(entry)?;
            remove_any(&dir, name)?;
            rustix::fs::symlinkat(link.as_slice(), &dir, name)
                .context("failed to create the symlink")?;
            set_metadata(&dir, name, &header, &xattrs, true)?;
        }
        EntryType::Link => {
            let source = components(&link_name(entry)?)?;
            let (source_dir, source_name) = target.parent(&source, false)?.with_context(|| {
                format!("hard link target {} does not exist", show_path(&source))
            })?;
            if source == path {
                // Docker removes the path first and then fails to link it; linking a path
                // to itself is nothing to do.
                bail!("{} is a hard link to itself", show_path(&path));
            }
            remove_any(&dir, name)?;
            // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
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
            set_metadata(&dir, name, &header, &xattrs, false)?;
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
        // The link is resolved inside the root, where its target does not exist.
        let e = apply_layer(dir.path(), via_link.as_slice(), Whiteouts::Apply).unwrap_err();
        assert!(format!("{e:#}").contains("/evil"), "{e:#}");
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
