//! Containers: each one a writable thin snapshot of its image's top layer, with a record in
//! `ROOT/containers/<id>/config.v2.json` (Docker's file name), its json-file log beside it, and
//! the files bind-mounted over the rootfs' `/etc/hostname`, `/etc/hosts` and
//! `/etc/resolv.conf` (so that they never show in `diff` or `commit`).
//!
//! Life of a container:
//! - `create`: the record is written `Creating`, the thin is snapshotted, the record becomes
//!   `Created` (an interrupted create leaves `Creating`, which `rm` removes like any other);
//! - `start` (by `run`, `start`, or the detached supervisor): the thin is activated and
//!   mounted on `ROOT/mnt/<id>`, the process is started in new namespaces
//!   ([`runner`]), the record becomes `Running` with its pid;
//! - exit: the supervisor records the exit code, unmounts and deactivates, the record becomes
//!   `Exited`; with `--rm` the container is removed;
//! - `rm`: the thin is deleted (the space returns to the pool) and the directory goes.
//!
//! The supervisor of a running container is the `thinbox run`/`start -a` process in the
//! foreground, or a detached `thinbox container-shim` (`run -d`, `start`). When it dies
//! without recording the exit, [`Container::refresh`] notices that the pid is gone.

pub mod caps;
pub mod create;
pub mod diff;
pub mod logs;
pub mod oci;
pub mod pause;
pub mod rootfs;
pub mod runner;
pub mod spec;
pub mod supervise;
pub(crate) mod sys;

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::image::Digest;
use crate::store::write_atomic;

pub use spec::{ProcessSpec, RunOptions};
pub use sys::spawn_exec;

/// Where a container is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// The record exists; the thin may not yet.
    Creating,
    Created,
    Running,
    Exited,
    /// Removal started and did not finish (a busy device); `rm` finishes it.
    Dead,
}

impl Status {
    /// Docker's lower-case name (`inspect`'s `State.Status`).
    pub fn name(self) -> &'static str {
        match self {
            Status::Creating | Status::Created => "created",
            Status::Running => "running",
            Status::Exited => "exited",
            Status::Dead => "dead",
        }
    }
}

/// What is running, when it started and how it ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub status: Option<Status>,
    /// The container's first process, as the host sees it.
    pub pid: Option<u32>,
    /// Its start time (`/proc/PID/stat` field 22), so that a reused pid is not mistaken for it.
    pub pid_start: Option<u64>,
    /// The process that waits for it and records its exit.
    pub supervisor_pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// Why the last start failed, or why removal was deferred.
    pub error: Option<String>,
}

/// One container's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Container {
    /// 64 hex digits.
    pub id: String,
    pub name: String,
    /// The image as the user named it.
    pub image: String,
    pub image_id: Digest,
    pub created: String,
    /// The process to run, resolved from the image's config and the flags.
    pub process: ProcessSpec,
    pub hostname: String,
    pub tty: bool,
    pub open_stdin: bool,
    pub auto_remove: bool,
    /// `runc` or `crun`; `None` for the built-in runner.
    pub runtime: Option<String>,
    /// The container's thin (a snapshot of `origin_thin_id`).
    pub thin_id: u64,
    pub device_name: String,
    pub origin_thin_id: u64,
    /// Docker's `Config` of the container ([`spec::container_config`]); records written
    /// before it was kept have none, and `commit` then starts from the image's.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// `--cap-add` and `--cap-drop` ([`caps`]).
    #[serde(default)]
    pub cap_add: Vec<String>,
    #[serde(default)]
    pub cap_drop: Vec<String>,
    pub state: State,
}

/// `ROOT/containers`.
pub fn containers_dir(root: &Path) -> PathBuf {
    root.join("containers")
}

impl Container {
    pub fn dir(&self, root: &Path) -> PathBuf {
        containers_dir(root).join(&self.id)
    }

    pub fn record_path(&self, root: &Path) -> PathBuf {
        self.dir(root).join("config.v2.json")
    }

    /// The json-file log, `<id>-json.log` as Docker names it.
    pub fn log_path(&self, root: &Path) -> PathBuf {
        self.dir(root).join(format!("{}-json.log", self.id))
    }

    /// Where the rootfs is mounted while the container runs.
    pub fn mountpoint(&self, root: &Path) -> PathBuf {
        root.join("mnt").join(&self.id)
    }

    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }

    pub fn status(&self) -> Status {
        self.state.status.unwrap_or(Status::Creating)
    }

    pub fn is_running(&self) -> bool {
        self.status() == Status::Running
    }

    pub fn save(&self, root: &Path) -> anyhow::Result<()> {
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        write_atomic(&self.record_path(root), &bytes)
    }

    pub fn load(root: &Path, id: &str) -> anyhow::Result<Container> {
        let path = containers_dir(root).join(id).join("config.v2.json");
        let bytes =
            fs::read(&path).with_context(|| format!("failed to read {}", path.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("failed to parse {}", path.display()))
    }

    /// A running record whose process is gone (its supervisor died before recording the
    /// exit) reads as exited; nothing is written.
    pub fn refresh(mut self) -> Container {
        if self.is_running() && !self.process_alive() {
            self.state.status = Some(Status::Exited);
            self.state.exit_code.get_or_insert(255);
        }
        self
    }

    /// Whether the container's first process still runs (and is the same process).
    pub fn process_alive(&self) -> bool {
        match (self.state.pid, self.state.pid_start) {
            (Some(pid), Some(start)) => process_start_time(pid) == Some(start),
            (Some(pid), None) => Path::new(&format!("/proc/{pid}")).exists(),
            _ => false,
        }
    }

    /// Waits until the record says the container is no longer running (its supervisor wrote
    /// the exit), or its process is gone and the supervisor too. `false` on timeout.
    pub fn wait_stopped(&self, root: &Path, timeout: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = Container::load(root, &self.id)?;
            if !c.is_running() {
                return Ok(true);
            }
            let supervisor_alive = c
                .state
                .supervisor_pid
                .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if !c.process_alive() && !supervisor_alive {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The capabilities its processes keep (bit N: capability N).
    pub fn capabilities(&self) -> anyhow::Result<u64> {
        caps::resolve(&self.cap_add, &self.cap_drop)
    }

    /// The command line as `ps` shows it.
    pub fn command_line(&self) -> String {
        self.process.args.join(" ")
    }
}

/// A process exit code (0-255) as thinbox's own.
pub fn exit_code(code: i32) -> std::process::ExitCode {
    std::process::ExitCode::from((code & 0xff) as u8)
}

/// Parses a signal as `kill -s` takes it: `KILL`, `SIGKILL`, `9`.
pub fn parse_signal(text: &str) -> anyhow::Result<nix::sys::signal::Signal> {
    use std::str::FromStr;
    let upper = text.to_ascii_uppercase();
    if let Ok(n) = upper.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .with_context(|| format!("invalid signal: {text}"));
    }
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    nix::sys::signal::Signal::from_str(&name).with_context(|| format!("invalid signal: {text}"))
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Every container's record, oldest first.
pub fn list(root: &Path) -> anyhow::Result<Vec<Container>> {
    let dir = containers_dir(root);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", dir.display())),
    };
    let mut all = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.len() != 64 || !entry.path().join("config.v2.json").exists() {
            continue;
        }
        match Container::load(root, &name) {
            Ok(c) => all.push(c.refresh()),
            Err(e) => tracing::warn!("skipping container {name}: {e:#}"),
        }
    }
    all.sort_by(|a, b| a.created.cmp(&b.created));
    Ok(all)
}

/// Finds a container by full id, name, or unique id prefix (Docker's order).
pub fn find(root: &Path, name: &str) -> anyhow::Result<Container> {
    let all = list(root)?;
    let name = name.strip_prefix('/').unwrap_or(name);
    if let Some(c) = all.iter().find(|c| c.id == name || c.name == name) {
        return Ok(c.clone());
    }
    let mut matches = all.iter().filter(|c| c.id.starts_with(name));
    match (matches.next(), matches.next()) {
        (Some(one), None) if !name.is_empty() => Ok(one.clone()),
        (Some(_), Some(_)) => bail!("multiple containers found with provided prefix: {name}"),
        _ => bail!("No such container: {name}"),
    }
}

/// A new random container id: 64 hex digits that do not read as a number.
pub fn new_id() -> anyhow::Result<String> {
    loop {
        let mut bytes = [0u8; 32];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .context("failed to read /dev/urandom")?;
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        // Docker avoids all-digit short ids: they would read as numbers.
        if !id[..12].bytes().all(|b| b.is_ascii_digit()) {
            return Ok(id);
        }
    }
}

/// A Docker-style name (`adjective_noun`) derived from the id, unique among `taken`.
pub fn generate_name(id: &str, taken: &[String]) -> String {
    const LEFT: [&str; 16] = [
        "admiring", "bold", "brave", "clever", "eager", "festive", "gentle", "happy", "jolly",
        "keen", "lucid", "nifty", "quirky", "serene", "vibrant", "zealous",
    ];
    const RIGHT: [&str; 16] = [
        "babbage", "curie", "darwin", "einstein", "fermi", "galileo", "hopper", "kepler",
        "lovelace", "meitner", "newton", "noether", "pasteur", "ritchie", "thompson", "turing",
    ];
    let seed = u64::from_str_radix(&id[..16], 16).unwrap_or(0);
    let base = format!(
        "{}_{}",
        LEFT[(seed % 16) as usize],
        RIGHT[((seed >> 8) % 16) as usize]
    );
    let mut name = base.clone();
    let mut n = 1;
    while taken.contains(&name) {
        n += 1;
        name = format!("{base}{n}");
    }
    name
}

/// Docker's rule for names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        bail!("Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed");
    }
    Ok(())
}

/// Now, in RFC 3339 with nanoseconds (Docker's timestamps).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

/// Seconds since an RFC 3339 timestamp of ours.
pub fn seconds_since(t: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(t).ok()?;
    Some(
        SystemTime::now()
            .duration_since(t)
            .map_or(0, |d| d.as_secs()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dockers_rule() {
        assert!(check_name("web-1").is_ok());
        assert!(check_name("a").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("a b").is_err());
    }

    #[test]
    fn generated_names_avoid_taken_ones() {
        let id = "0123456789abcdef".repeat(4);
        let first = generate_name(&id, &[]);
        let second = generate_name(&id, std::slice::from_ref(&first));
        assert_ne!(first, second);
        assert!(second.starts_with(&first));
    }

    #[test]
    fn ids_are_64_hex_digits() {
        let id = new_id().unwrap();
        assert_eq!(id.len(), 64);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn signals_parse_by_name_and_number() {
        use nix::sys::signal::Signal;
        assert_eq!(parse_signal("KILL").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("sigterm").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("15").unwrap(), Signal::SIGTERM);
        assert!(parse_signal("NOPE").is_err());
    }

    #[test]
    fn own_start_time_is_read() {
        assert!(process_start_time(std::process::id()).is_some());
    }
}
