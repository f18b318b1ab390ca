//! One owner per pool: an exclusive, non-blocking `flock` on the metadata device, held for as
//! long as the device stays open. A second would-be owner learns who holds it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// Takes the exclusive lock on `file` or says who holds it.
pub fn lock_exclusive(file: &File) -> Result<(), LockError> {
    #[allow(deprecated)] // nix's replacement (Flock) takes ownership of the File we keep using.
    match nix::fcntl::flock(
        file.as_raw_fd(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    ) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EWOULDBLOCK) => Err(LockError::Held(holder(file))),
        Err(e) => Err(LockError::Io(e.into())),
    }
}

#[derive(Debug)]
pub enum LockError {
    /// Someone else owns the pool; the text names them as well as we can tell.
    Held(String),
    Io(io::Error),
}

/// Finds the process holding a flock on the file, from `/proc/locks`.
///
/// The kernel prints that file a page at a time from a list other processes change as they
/// lock and unlock, so one read can skip the line we want; a few reads make that unlikely.
fn holder(file: &File) -> String {
    let Ok(meta) = file.metadata() else {
        return "another owner".into();
    };
    let (ino, dev) = (meta.ino(), meta.dev());
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    for _ in 0..4 {
        let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
        if let Some(found) = holder_in(&locks, major, minor, ino) {
            return found;
        }
    }
    "held by another owner".into()
}

/// The holder of the flock on `major:minor:ino` in a `/proc/locks` text, if listed.
fn holder_in(locks: &str, major: u64, minor: u64, ino: u64) -> Option<String> {
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || fields[1] != "FLOCK" {
            continue;
        }
        let mut id = fields[5].split(':');
        let (Some(ma), Some(mi), Some(inode)) = (id.next(), id.next(), id.next()) else {
            continue;
        };
        let matches = u64::from_str_radix(ma, 16).ok() == Some(major)
            && u64::from_str_radix(mi, 16).ok() == Some(minor)
            && inode.parse::<u64>().ok() == Some(ino);
        if matches {
            let pid = fields[4];
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .trim()
                        .to_string()
                })
                .unwrap_or_default();
            return Some(if cmd.is_empty() {
                format!("held by pid {pid}")
            } else {
                format!("held by pid {pid} ({cmd})")
            });
        }
    }
    None
}
