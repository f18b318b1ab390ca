//! Starting a pool daemon, shared by every binary that can host one (`dmtool pool start`,
//! `thinbox`'s hidden `pool-daemon` verb).
//!
//! [`spawn_detached`] runs a command that re-executes the caller's binary in daemon mode, with
//! its output in the run directory's `daemon.log`, and returns once the daemon answers on its
//! socket. That command ends up in [`serve_in_foreground`], which (in a session of its own
//! when detached, so no terminal hang-up or exiting shell takes it down) blocks SIGTERM,
//! SIGINT and SIGHUP before any thread starts, so one thread can wait for them with sigwait
//! and ask for a clean stop: every thin deactivated, the pool committed, the FUSE export
//! unmounted, the socket removed.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};

use super::{Daemon, DaemonConfig, RunDir};
use crate::activate::PoolControl;
use crate::error::{Error, Result};

/// How long a new daemon gets to answer, and a stopping one to go.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn launch_err(what: impl std::fmt::Display) -> Error {
    Error::Activation(what.to_string())
}

/// Runs `command` (which must end up in [`serve_in_foreground`] for `run`) detached, with
/// stdin closed and stdout and stderr appended to `daemon.log`, and waits until the daemon
/// answers on its socket. Returns its pid. If it exits first, the error quotes the log's tail.
pub fn spawn_detached(run: &RunDir, mut command: Command) -> Result<u32> {
    run.prepare()?;
    let log_path = run.log_file();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&log_path)
        .map_err(|e| launch_err(format_args!("failed to open {}: {e}", log_path.display())))?;
    let log_out = log
        .try_clone()
        .map_err(|e| launch_err(format_args!("failed to share the log file: {e}")))?;
    command.stdin(Stdio::null()).stdout(log_out).stderr(log);
    let mut child = command
        .spawn()
        .map_err(|e| launch_err(format_args!("failed to start the pool daemon: {e}")))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let exited = child
            .try_wait()
            .map_err(|e| launch_err(format_args!("failed to watch the pool daemon: {e}")))?;
        if let Some(status) = exited {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(launch_err(format_args!(
                "the pool daemon exited ({status}) before it was ready:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        }
        if let Some(mut client) = run.connect()? {
            if client.status().is_ok() {
                return Ok(child.id());
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(launch_err(format_args!(
                "the pool daemon did not answer within {} s (see {})",
                READY_TIMEOUT.as_secs(),
                log_path.display()
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Serves the pool of `config` until SIGTERM, SIGINT or SIGHUP arrives or a client asks the
/// daemon to stop, then shuts it down cleanly. `own_session`: start a new session first (the
/// detached child of [`spawn_detached`]). Call it before this process starts any thread: the
/// signal mask is inherited, and a thread started earlier would take the signals instead.
pub fn serve_in_foreground(config: DaemonConfig, own_session: bool) -> Result<()> {
    if own_session {
        nix::unistd::setsid()
            .map_err(|e| launch_err(format_args!("failed to start a session: {e}")))?;
    }
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals.thread_block().map_err(|e| {
        launch_err(format_args!(
            "failed to block SIGTERM, SIGINT and SIGHUP: {e}"
        ))
    })?;
    let daemon = Daemon::start(config)?;
    {
        let daemon = daemon.clone();
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Ok(signal) = signals.wait() {
                    tracing::info!("{signal:?}: stopping");
                    daemon.request_stop();
                }
            })
            .map_err(|e| launch_err(format_args!("failed to start the signal thread: {e}")))?;
    }
    tracing::info!(pid = std::process::id(), "pool daemon ready");
    daemon.wait_for_stop();
    daemon.shutdown()?;
    tracing::info!("pool daemon stopped; everything is committed");
    Ok(())
}

/// Asks the daemon in `run` to stop and waits until its process and socket are gone.
/// `Ok(false)` when no daemon runs there.
pub fn stop(run: &RunDir, force: bool) -> Result<bool> {
    let Some(mut client) = run.connect()? else {
        return Ok(false);
    };
    let pid = client.status().ok().and_then(|s| s.daemon_pid);
    client.stop(force)?;
    drop(client);
    // Done when the process is gone (it removes its socket before it exits).
    let deadline = Instant::now() + READY_TIMEOUT;
    while pid.is_some_and(|p| PathBuf::from(format!("/proc/{p}")).exists()) || run.socket().exists()
    {
        if Instant::now() > deadline {
            return Err(launch_err(format_args!(
                "the pool daemon did not stop within {} s (see {})",
                READY_TIMEOUT.as_secs(),
                run.log_file().display()
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(true)
}
