//! The supervisor: mounts a container's rootfs, starts its process, copies its output to
//! the json-file log (and to the terminal when attached), forwards signals, waits, records
//! the exit code, unmounts and deactivates, and removes the container when it was made with
//! `--rm`. The foreground `run`/`start -a` is the supervisor; `run -d`/`start` launch a
//! detached one (`thinbox container-shim`, in a session of its own).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use anyhow::{bail, Context};
use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::logs::{LineSplitter, LogWriter};
use super::runner::{self, ChildStdio, StartError, Started};
use super::{oci, rootfs, spec, sys, Container, Status};
use crate::cli::Global;
use crate::storage::Storage;
use crate::store::Store;

/// Where the container's streams go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach {
    /// To our stdout/stderr (and stdin to the container with `-i`).
    Foreground,
    /// To the log only.
    Detached,
}

/// Runs container `id` to its end; its exit code. `started` is called once the process
/// runs (the detached supervisor reports to its launcher there).
pub fn supervise(
    global: &Global,
    id: &str,
    attach: Attach,
    started: impl FnOnce(&Container),
) -> anyhow::Result<i32> {
    let root = &global.root;
    let mut c = Container::load(root, id)?.refresh();
    match c.status() {
        Status::Running => bail!("container {} is already running", c.name),
        Status::Creating | Status::Dead => {
            bail!(
                "container {} is not in a state to start (remove it)",
                c.name
            )
        }
        Status::Created | Status::Exited => {}
    }
    let layers = Store::load(root)?.image_layers(&c.image_id)?;
    let storage = Storage::open(global)?;
    let mountpoint = storage.mount_container(&layers, &c, root)?;
    let result = start_and_wait(global, &mut c, &mountpoint, attach, started);
    // Whatever happened, the rootfs is unmounted (and a thin deactivated).
    let unmounted = storage.unmount_container(&c, root);
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            let mut failed = Container::load(root, id)?;
            failed.state.error = Some(format!("{e:#}"));
            failed.save(root)?;
            if c.auto_remove {
                let _ = remove(global, &failed);
            }
            return Err(e);
        }
    };
    let mut done = Container::load(root, id)?;
    done.state.status = Some(Status::Exited);
    done.state.exit_code = Some(code);
    done.state.finished_at = Some(super::now_rfc3339());
    done.state.pid = None;
    done.state.pid_start = None;
    done.state.supervisor_pid = None;
    match unmounted {
        Ok(true) => {}
        Ok(false) => done.state.error = Some("deactivation deferred: device busy".into()),
        Err(e) => done.state.error = Some(format!("{e:#}")),
    }
    done.save(root)?;
    if done.auto_remove {
        remove(global, &done)?;
    }
    Ok(code)
}

/// Deletes a stopped container: its thin (deactivated first, if something left it active),
/// its directory. A thin still busy leaves the container `Dead`, for `rm` to finish.
pub fn remove(global: &Global, c: &Container) -> anyhow::Result<()> {
    let root = &global.root;
    if let Some(storage) = Storage::open_existing(global)? {
        let deactivated = storage.unmount_container(c, root)?;
        if !deactivated {
            let mut dead = c.clone();
            dead.state.status = Some(Status::Dead);
            dead.state.error = Some("removal deferred: the device is busy".into());
            dead.save(root)?;
            bail!(
                "container {}: its device is busy; removal deferred (run rm again)",
                c.name
            );
        }
        storage.remove_container(c)?;
    }
    if let Some(runtime) = &c.runtime {
        let _ = super::oci::runtime_command(runtime, &runtime_state(root, runtime))
            .args(["delete", "--force", &c.id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    let dir = c.dir(root);
    fs::remove_dir_all(&dir).with_context(|| format!("failed to remove {}", dir.display()))
}

/// The external runtime's state directory (`--root` of runc/crun).
pub fn runtime_state(root: &Path, runtime: &str) -> std::path::PathBuf {
    root.join("runtime").join(runtime)
}

fn start_and_wait(
    global: &Global,
    c: &mut Container,
    rootfs_path: &Path,
    attach: Attach,
    started: impl FnOnce(&Container),
) -> anyhow::Result<i32> {
    let root = &global.root;
    let user = spec::resolve_user(rootfs_path, &c.process.user).map_err(|e| StartError {
        code: 126,
        message: format!("{e:#}"),
    })?;
    let bind_files = rootfs::etc_files(c, root)?;
    let foreground = attach == Attach::Foreground;

    // The container's streams, and our ends of them.
    let stdin_fd: OwnedFd = if foreground && c.open_stdin && !c.tty {
        io::stdin().as_fd().try_clone_to_owned()?
    } else {
        File::open("/dev/null")?.into()
    };
    let (stdio, outputs, pty_master) = if c.tty {
        let (master, slave, slave_path) = sys::open_pty(io::stdin().as_fd())?;
        let stdio = ChildStdio {
            stdin: slave.try_clone()?,
            stdout: slave.try_clone()?,
            stderr: slave,
            tty: Some(slave_path),
        };
        let reader = File::from(master.try_clone()?);
        (stdio, vec![("stdout", reader)], Some(master))
    } else {
        let (out_r, out_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let stdio = ChildStdio {
            stdin: stdin_fd,
            stdout: out_w,
            stderr: err_w,
            tty: None,
        };
        (
            stdio,
            vec![("stdout", File::from(out_r)), ("stderr", File::from(err_r))],
            None,
        )
    };

    // Signals sent to us go to the container; block them before any thread starts.
    sys::block_forwarded_signals()?;
    let process: Started = match &c.runtime {
        None => {
            let started = runner::start_builtin(c, rootfs_path, bind_files, user, &stdio)?;
            // Only the container holds the write ends now (their EOF ends the pumps).
            drop(stdio);
            started
        }
        Some(runtime) => {
            let rt = oci::Runtime {
                name: runtime.clone(),
                bundle: c.dir(root).join("bundle"),
                state_root: runtime_state(root, runtime),
            };
            runner::start_oci(c, &rt, rootfs_path, bind_files, user, stdio)?
        }
    };
    let pid = process.pid;
    c.state.status = Some(Status::Running);
    c.state.pid = Some(pid);
    c.state.pid_start = super::process_start_time(pid);
    c.state.supervisor_pid = Some(std::process::id());
    c.state.started_at = Some(super::now_rfc3339());
    c.state.finished_at = None;
    c.state.exit_code = None;
    c.state.error = None;
    c.save(root)?;
    started(c);

    thread::spawn(move || loop {
        if let Ok(signal) = sys::forwarded_signals().wait() {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    });
    let log = Arc::new(Mutex::new(LogWriter::open(&c.log_path(root))?));
    let pumps: Vec<JoinHandle<()>> = outputs
        .into_iter()
        .map(|(stream, reader)| {
            let log = Arc::clone(&log);
            thread::spawn(move || pump(reader, stream, foreground, &log))
        })
        .collect();
    let raw = match (&pty_master, foreground) {
        (Some(master), true) => {
            let raw = RawTerminal::enter();
            if c.open_stdin {
                let mut to_container = File::from(master.try_clone()?);
                thread::spawn(move || {
                    let _ = io::copy(&mut io::stdin(), &mut to_container);
                });
            }
            raw
        }
        _ => None,
    };
    drop(pty_master);
    let code = process.wait();
    for p in pumps {
        let _ = p.join();
    }
    drop(raw);
    code
}

/// Copies one output stream to the log (a line per entry) and, attached, to our own stream.
fn pump(mut reader: File, stream: &'static str, attached: bool, log: &Mutex<LogWriter>) {
    let mut lines = LineSplitter::default();
    let mut buf = vec![0u8; 32 * 1024];
    let log_entries = |entries: Vec<Vec<u8>>| {
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        for e in entries {
            if let Err(err) = log.write(stream, &e) {
                tracing::warn!("failed to write the container's log: {err}");
            }
        }
    };
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A pty master reads EIO once the last slave closes.
            Err(_) => break,
        };
        if attached {
            let _ = if stream == "stderr" {
                let mut err = io::stderr().lock();
                err.write_all(&buf[..n]).and_then(|()| err.flush())
            } else {
                let mut out = io::stdout().lock();
                out.write_all(&buf[..n]).and_then(|()| out.flush())
            };
        }
        log_entries(lines.push(&buf[..n]));
    }
    if let Some(rest) = lines.finish() {
        log_entries(vec![rest]);
    }
}

/// Our terminal in raw mode while a `-t` container is attached; restored on drop.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            io::stdin().as_fd(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// Launches a detached supervisor for container `id` (`thinbox container-shim`) and waits
/// until it reports that the process runs, or why it could not start it.
pub fn spawn_detached(global: &Global, id: &str) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("failed to find the thinbox binary")?;
    let mut command = Command::new(exe);
    command.arg("--root").arg(&global.root);
    for opt in &global.storage_opts {
        command.arg("--storage-opt").arg(opt);
    }
    command
        .args(["container-shim", id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = command
        .spawn()
        .context("failed to start the container's supervisor")?;
    let mut report = String::new();
    child
        .stdout
        .take()
        .context("no pipe to the supervisor")?
        .read_to_string(&mut report)?;
    if report.starts_with("ok") {
        return Ok(());
    }
    let _ = child.wait();
    match report.strip_prefix("error ") {
        Some(rest) => {
            let (code, message) = rest.split_once(' ').unwrap_or(("125", rest));
            Err(StartError {
                code: code.parse().unwrap_or(125),
                message: message.trim_end().to_string(),
            }
            .into())
        }
        None => bail!(
            "the container's supervisor exited before starting it (see {})",
            super::containers_dir(&global.root)
                .join(id)
                .join("shim.log")
                .display()
        ),
    }
}

/// The detached supervisor's body: a session of its own, diagnostics to `shim.log`, the
/// report on stdout (then closed), and the container run to its end.
pub fn run_detached(global: &Global, id: &str) -> anyhow::Result<i32> {
    let _ = nix::unistd::setsid();
    let c = Container::load(&global.root, id)?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(c.dir(&global.root).join("shim.log"))?;
    sys::redirect(log.as_fd(), 2)?;
    let mut reported = false;
    let result = supervise(global, id, Attach::Detached, |_| {
        report("ok\n");
        reported = true;
    });
    if !reported {
        match &result {
            Ok(_) => report("error 125 the container exited before it was reported\n"),
            Err(e) => {
                let code = e.downcast_ref::<StartError>().map_or(125, |s| s.code);
                report(&format!("error {code} {e:#}\n"));
            }
        }
    }
    if let Err(e) = &result {
        eprintln!("thinbox container-shim {id}: {e:#}");
    }
    result
}

/// Writes the report to stdout and points stdout at /dev/null (so the launcher reads EOF).
fn report(text: &str) {
    let mut out = io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    if let Ok(null) = File::options().write(true).open("/dev/null") {
        let _ = sys::redirect(null.as_fd(), 1);
    }
}
