//! Pausing a running container for `commit`, as Docker does, with the cgroup freezer: the
//! processes stop where they are without being told (no SIGSTOP a shell would notice).
//!
//! The built-in runner gives a container its own PID namespace but no cgroup, so pausing
//! moves every process of that namespace into a cgroup of its own (`thinbox-pause-<id>`,
//! the v1 freezer hierarchy when there is one, else cgroup v2), freezes it, and on resume
//! thaws it and puts each process back where it was. Containers run by runc or crun are
//! paused by their runtime (`runc pause`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::{oci, rootfs, supervise, sys, Container};

/// A paused container; resumed by [`Paused::resume`] or, failing that, when dropped.
pub struct Paused {
    how: How,
    resumed: bool,
}

enum How {
    Freezer {
        cgroup: Cgroup,
        /// Each moved process and the cgroup (relative to the hierarchy) it came from.
        origins: BTreeMap<u32, String>,
    },
    Runtime {
        runtime: String,
        state_root: PathBuf,
        id: String,
    },
}

/// A freezer cgroup: the v1 `freezer` controller or a cgroup v2 directory.
struct Cgroup {
    hierarchy: PathBuf,
    dir: PathBuf,
    v1: bool,
}

/// Where a freezer is on this machine: `/sys/fs/cgroup/freezer` (v1), else the cgroup v2
/// mount.
fn freezer_hierarchy() -> anyhow::Result<(PathBuf, bool)> {
    let v1 = Path::new("/sys/fs/cgroup/freezer");
    if v1.join("cgroup.procs").exists() {
        return Ok((v1.to_path_buf(), true));
    }
    for v2 in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if Path::new(v2).join("cgroup.controllers").exists() {
            return Ok((PathBuf::from(v2), false));
        }
    }
    bail!("no cgroup freezer on this machine (use -p=false to commit without pausing)")
}

/// The processes in the PID namespace of `init` (a host pid), `init` included.
fn namespace_members(init: u32) -> anyhow::Result<BTreeSet<u32>> {
    let ns = fs::read_link(format!("/proc/{init}/ns/pid"))
        .with_context(|| format!("the container's process {init} is gone"))?;
    let mut members = BTreeSet::new();
    for entry in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() == Some(&ns) {
            members.insert(pid);
        }
    }
    Ok(members)
}

/// Where the parent of `pid` was before the pause, if it was moved.
fn parent_origin(pid: u32, origins: &BTreeMap<u32, String>) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ppid: u32 = stat[stat.rfind(')')? + 2..]
        .split(' ')
        .nth(1)?
        .parse()
        .ok()?;
    origins.get(&ppid).cloned()
}

/// The cgroup of `pid` in the hierarchy (v1 `freezer`, or v2's `0::`).
fn cgroup_of(pid: u32, v1: bool) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = if v1 {
            controllers.split(',').any(|c| c == "freezer")
        } else {
            controllers.is_empty()
        };
        wanted.then(|| path.to_string())
    })
}

impl Cgroup {
    fn create(id: &str) -> anyhow::Result<Cgroup> {
        let (hierarchy, v1) = freezer_hierarchy()?;
        let dir = hierarchy.join(format!("thinbox-pause-{id}"));
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("failed to create {}", dir.display())),
        }
        Ok(Cgroup { hierarchy, dir, v1 })
    }

    fn add(&self, pid: u32) -> std::io::Result<()> {
        fs::write(self.dir.join("cgroup.procs"), pid.to_string())
    }

    fn set_frozen(&self, frozen: bool) -> anyhow::Result<()> {
        let (file, value) = match (self.v1, frozen) {
            (true, true) => ("freezer.state", "FROZEN"),
            (true, false) => ("freezer.state", "THAWED"),
            (false, true) => ("cgroup.freeze", "1"),
            (false, false) => ("cgroup.freeze", "0"),
        };
        let path = self.dir.join(file);
        fs::write(&path, value).with_context(|| format!("failed to write {}", path.display()))
    }

    fn is_frozen(&self) -> bool {
        if self.v1 {
            fs::read_to_string(self.dir.join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN")
        } else {
            fs::read_to_string(self.dir.join("cgroup.events"))
                .is_ok_and(|s| s.lines().any(|l| l.trim() == "frozen 1"))
        }
    }

    /// Removes the cgroup once it is empty (processes that exited meanwhile may linger a
    /// moment as zombies of it).
    fn remove(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Pauses the running container `c`.
pub fn pause(root: &Path, c: &Container) -> anyhow::Result<Paused> {
    if let Some(runtime) = &c.runtime {
        let state_root = supervise::runtime_state(root, runtime);
        run_runtime(runtime, &state_root, "pause", &c.id)?;
        return Ok(Paused {
            how: How::Runtime {
                runtime: runtime.clone(),
                state_root,
                id: c.id.clone(),
            },
            resumed: false,
        });
    }
    let init = c.state.pid.context("the container's record has no pid")?;
    let ns_of = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    if ns_of(&init.to_string()).is_none() || ns_of(&init.to_string()) == ns_of("self") {
        // A stale pid, or one reused by a host process: freezing its namespace would freeze
        // the host.
        bail!(
            "container {} has no process of its own to pause",
            c.short_id()
        );
    }
    // A cgroup a dead commit left is thawed and emptied first (we hold the store's lock: no
    // other commit runs).
    recover(root, c);
    let cgroup = Cgroup::create(&c.id)?;
    let mut paused = Paused {
        how: How::Freezer {
            cgroup,
            origins: BTreeMap::new(),
        },
        resumed: false,
    };
    let How::Freezer { cgroup, origins } = &mut paused.how else {
        unreachable!("made as a freezer just above");
    };
    // Processes fork while we move them: repeat until a pass finds nothing new, then
    // freeze, and move in whatever still appeared (it freezes on arrival).
    let deadline = Instant::now() + Duration::from_secs(10);
    for pass in 0.. {
        let mut moved = 0;
        for pid in namespace_members(init)? {
            if origins.contains_key(&pid) {
                continue;
            }
            let own = format!(
                "/{}",
                cgroup.dir.file_name().unwrap_or_default().to_string_lossy()
            );
            let origin = match cgroup_of(pid, cgroup.v1) {
                // Forked after its parent moved: it goes back where its parent came from.
                Some(path) if path == own => {
                    parent_origin(pid, origins).unwrap_or_else(|| "/".into())
                }
                Some(path) => path,
                None => "/".into(),
            };
            match cgroup.add(pid) {
                Ok(()) => {
                    origins.insert(pid, origin);
                    moved += 1;
                }
                // A process that exits between the listing and the move is no concern.
                Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to pause process {pid}"));
                }
            }
        }
        if pass > 0 && moved == 0 {
            break;
        }
        if pass == 0 {
            cgroup.set_frozen(true)?;
        }
        if Instant::now() > deadline {
            bail!("the container's processes kept forking; could not pause it");
        }
    }
    while !cgroup.is_frozen() {
        if Instant::now() > deadline {
            bail!("the container did not freeze within 10 seconds");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    tracing::debug!(container = %c.id, processes = origins.len(), "paused");
    Ok(paused)
}

/// Undoes what a commit that died while the container was paused left: the freezer cgroup
/// is thawed and emptied into its hierarchy's root, and the rootfs thawed. Nothing left is
/// fine; failures are logged (the caller goes on to signal the container).
pub fn recover(root: &Path, c: &Container) {
    for (hierarchy, v1) in [
        (PathBuf::from("/sys/fs/cgroup/freezer"), true),
        (PathBuf::from("/sys/fs/cgroup"), false),
        (PathBuf::from("/sys/fs/cgroup/unified"), false),
    ] {
        let dir = hierarchy.join(format!("thinbox-pause-{}", c.id));
        if !dir.is_dir() {
            continue;
        }
        tracing::warn!(container = %c.id, "thawing what an interrupted commit left frozen");
        let cgroup = Cgroup { hierarchy, dir, v1 };
        if let Err(e) = cgroup.set_frozen(false) {
            tracing::warn!("{e:#}");
        }
        if let Ok(left) = fs::read_to_string(cgroup.dir.join("cgroup.procs")) {
            for pid in left.lines() {
                let _ = fs::write(cgroup.hierarchy.join("cgroup.procs"), pid);
            }
        }
        cgroup.remove();
    }
    if let Some(runtime) = &c.runtime {
        // "Not paused" is the usual answer; nothing to report then.
        let state_root = supervise::runtime_state(root, runtime);
        let _ = run_runtime(runtime, &state_root, "resume", &c.id);
    }
    // Not frozen is the usual answer; not mounted (nothing to open) too.
    let live = c.mountpoint(root);
    if rootfs::is_mounted(&live) {
        match sys::thaw_fs(&live) {
            Ok(true) => tracing::warn!(container = %c.id, "thawed its frozen filesystem"),
            Ok(false) => {}
            Err(e) => tracing::warn!("failed to thaw {}: {e}", live.display()),
        }
    }
}

fn run_runtime(runtime: &str, state_root: &Path, verb: &str, id: &str) -> anyhow::Result<()> {
    let output = oci::runtime_command(runtime, state_root)
        .args([verb, id])
        .output()
        .with_context(|| format!("failed to run {runtime} {verb}"))?;
    if !output.status.success() {
        bail!(
            "{runtime} {verb} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

impl Paused {
    /// Thaws the container and puts its processes back in their cgroups.
    pub fn resume(mut self) -> anyhow::Result<()> {
        self.resumed = true;
        self.thaw()
    }

    fn thaw(&mut self) -> anyhow::Result<()> {
        match &self.how {
            How::Runtime {
                runtime,
                state_root,
                id,
            } => run_runtime(runtime, state_root, "resume", id),
            How::Freezer { cgroup, origins } => {
                let thawed = cgroup.set_frozen(false);
                for (pid, origin) in origins {
                    let back = cgroup
                        .hierarchy
                        .join(origin.trim_start_matches('/'))
                        .join("cgroup.procs");
                    let _ = fs::write(back, pid.to_string());
                }
                // Anything forked meanwhile is a child of a moved process: it goes back to
                // the hierarchy's root.
                if let Ok(left) = fs::read_to_string(cgroup.dir.join("cgroup.procs")) {
                    for pid in left.lines() {
                        let _ = fs::write(cgroup.hierarchy.join("cgroup.procs"), pid);
                    }
                }
                cgroup.remove();
                thawed
            }
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if !self.resumed {
            if let Err(e) = self.thaw() {
                tracing::warn!("failed to resume a paused container: {e:#}");
            }
        }
    }
}
