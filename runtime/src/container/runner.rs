//! Starting a container's process, with the built-in runner or an external OCI runtime, and
//! waiting for it.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use super::spec::{get_env, set_env, ResolvedUser, DEFAULT_PATH};
use super::sys::{self, Exec, InitConfig};
use super::{oci, Container};

pub use super::sys::StartError;

/// The container's standard streams as its process gets them.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// A pty slave (all three streams are it): becomes the controlling terminal and
    /// `/dev/console`.
    pub tty: Option<PathBuf>,
}

/// A started container process.
pub struct Started {
    /// The container's first process as the host sees it.
    pub pid: u32,
    waiter: Waiter,
}

enum Waiter {
    /// Our own child.
    Child(Pid),
    /// The external runtime's `run`, which exits with the container's status.
    Runtime(Child),
}

/// The exit code Docker reports for a wait status: the code, or 128 + the signal.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, signal, _) => Some(128 + signal as i32),
        _ => None,
    }
}

impl Started {
    /// Waits for the container's process to end; its exit code.
    pub fn wait(self) -> anyhow::Result<i32> {
        match self.waiter {
            Waiter::Child(pid) => loop {
                match waitpid(pid, None) {
                    Ok(status) => {
                        if let Some(code) = exit_code(status) {
                            return Ok(code);
                        }
                    }
                    Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(e).context("waitpid failed"),
                }
            },
            Waiter::Runtime(mut child) => {
                let status = child.wait().context("failed to wait for the runtime")?;
                use std::os::unix::process::ExitStatusExt;
                Ok(status
                    .code()
                    .or_else(|| status.signal().map(|s| 128 + s))
                    .unwrap_or(255))
            }
        }
    }
}

/// The environment the process gets: the record's, plus HOME from the passwd entry.
pub fn process_env(c: &Container, user: &ResolvedUser) -> Vec<String> {
    let mut env = c.process.env.clone();
    if get_env(&env, "HOME").is_none() {
        let home = user.home.clone().unwrap_or_else(|| "/".to_string());
        set_env(&mut env, format!("HOME={home}"));
    }
    env
}

fn cstrings(list: &[String]) -> anyhow::Result<Vec<CString>> {
    list.iter()
        .map(|s| CString::new(s.as_str()).with_context(|| format!("{s:?} holds a NUL byte")))
        .collect()
}

/// An [`Exec`] for `args` with `env` as `user` in `cwd`.
pub fn exec_of(
    args: &[String],
    env: &[String],
    cwd: &str,
    user: ResolvedUser,
    stdio: [i32; 3],
    tty: bool,
    caps: u64,
) -> anyhow::Result<Exec> {
    Ok(Exec {
        args: cstrings(args)?,
        env: cstrings(env)?,
        path: get_env(env, "PATH").unwrap_or(DEFAULT_PATH).to_string(),
        cwd: PathBuf::from(cwd),
        user,
        stdio,
        tty,
        caps,
    })
}

/// Starts `c`'s process on the mounted `rootfs` with the built-in runner.
pub fn start_builtin(
    c: &Container,
    rootfs: &Path,
    bind_files: Vec<(PathBuf, &'static str)>,
    user: ResolvedUser,
    stdio: &ChildStdio,
) -> anyhow::Result<Started> {
    let env = process_env(c, &user);
    let exec = exec_of(
        &c.process.args,
        &env,
        &c.process.cwd,
        user,
        [
            stdio.stdin.as_raw_fd(),
            stdio.stdout.as_raw_fd(),
            stdio.stderr.as_raw_fd(),
        ],
        stdio.tty.is_some(),
        c.capabilities()?,
    )?;
    let config = InitConfig {
        rootfs: rootfs.to_path_buf(),
        hostname: c.hostname.clone(),
        bind_files,
        console: stdio.tty.clone(),
        exec,
    };
    let pid = sys::spawn_init(&config)?;
    Ok(Started {
        pid: pid.as_raw() as u32,
        waiter: Waiter::Child(pid),
    })
}

/// Starts `c`'s process with an external runtime (`runtime run --bundle`).
pub fn start_oci(
    c: &Container,
    rt: &oci::Runtime,
    rootfs: &Path,
    bind_files: Vec<(PathBuf, &'static str)>,
    user: ResolvedUser,
    stdio: ChildStdio,
) -> anyhow::Result<Started> {
    let (runtime, state_root) = (rt.name.as_str(), rt.state_root.as_path());
    if stdio.tty.is_some() {
        bail!("-t is not supported with --runtime {runtime} (the built-in runner has it)");
    }
    let env = process_env(c, &user);
    let bundle = rt.bundle.clone();
    oci::write_bundle(
        &bundle,
        c,
        &oci::Bundle {
            rootfs,
            user: &user,
            env: &env,
            bind_files: &bind_files,
        },
    )?;
    let pid_file = bundle.join("pid");
    let _ = fs::remove_file(&pid_file);
    // A state left by a supervisor that died would make `run` refuse the id.
    let _ = oci::runtime_command(runtime, state_root)
        .args(["delete", "--force", &c.id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let mut command = oci::runtime_command(runtime, state_root);
    command
        .arg("run")
        .arg("--bundle")
        .arg(&bundle)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(&c.id)
        .stdin(Stdio::from(stdio.stdin))
        .stdout(Stdio::from(stdio.stdout))
        .stderr(Stdio::from(stdio.stderr));
    let mut child = command
        .spawn()
        .with_context(|| format!("failed to run {runtime} (is it installed?)"))?;
    drop(command);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            return Ok(Started {
                pid,
                waiter: Waiter::Runtime(child),
            });
        }
        if let Some(status) = child.try_wait()? {
            bail!("{runtime} run failed ({status}); its messages are in the container's log");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{runtime} did not start the container within 30 seconds");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
