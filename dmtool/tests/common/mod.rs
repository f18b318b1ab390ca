//! What dmtool's tests share: running dmtool and judging its output, test data; and for the
//! privileged tests a temporary directory with the daemon's run directory
//! (`THINBOX_RUN_ROOT`) inside it, dmtool run against it, and a guard that, even when the
//! test fails, unmounts what the test mounted under `mnt/`, stops the daemon with its loop
//! devices and FUSE mount, and detaches loop devices backed by the test's files.

#![allow(dead_code)] // each test file uses its own part

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};

pub const DMTOOL: &str = env!("CARGO_BIN_EXE_dmtool");

pub fn run(args: &[&str]) -> Output {
    run_with_stdin(args, &[])
}

pub fn run_with_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut cmd = Command::new(DMTOOL);
    cmd.args(args);
    feed(cmd, input)
}

/// Runs `cmd` with `input` on its stdin.
fn feed(mut cmd: Command, input: &[u8]) -> Output {
    let mut child = cmd
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dmtool starts");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // Feed stdin from a thread: dmtool may stop reading early (and refuse the rest).
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("dmtool runs");
    feeder.join().unwrap();
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// dmtool with `args`, stdin empty, and `THINBOX_RUN_ROOT` set to `run_root`.
pub fn run_in(args: &[&str], run_root: &Path) -> Output {
    let mut cmd = Command::new(DMTOOL);
    cmd.args(args).env("THINBOX_RUN_ROOT", run_root);
    feed(cmd, &[])
}

/// The stdout of a run that must have succeeded; `what` names it if it did not.
#[track_caller]
pub fn ok_stdout(o: Output, what: &str) -> Vec<u8> {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}",
        o.status,
        stderr(&o)
    );
    o.stdout
}

#[track_caller]
pub fn ok(o: Output) -> Output {
    assert_eq!(o.status.code(), Some(0), "stderr: {}", stderr(&o));
    o
}

#[track_caller]
pub fn fails(o: &Output, code: i32, needle: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
    assert!(
        stderr(o).contains(needle),
        "stderr lacks {needle:?}: {}",
        stderr(o)
    );
}

pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub run_root: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let run_root = dir.path().join("run");
        Env { dir, run_root }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dmtool(&self, args: &[&str]) -> Output {
        run_in(args, &self.run_root)
    }

    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_with_stdin(args, &[])
    }

    /// [`Self::ok`] with `input` on dmtool's stdin.
    #[track_caller]
    pub fn ok_with_stdin(&self, args: &[&str], input: &[u8]) -> String {
        let mut cmd = Command::new(DMTOOL);
        cmd.args(args).env("THINBOX_RUN_ROOT", &self.run_root);
        let out = ok_stdout(feed(cmd, input), &format!("dmtool {args:?}"));
        String::from_utf8_lossy(&out).into_owned()
    }

    #[track_caller]
    pub fn fails(&self, args: &[&str], needle: &str) {
        let out = self.dmtool(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "dmtool {args:?}: {err}");
        assert!(
            err.contains(needle),
            "dmtool {args:?}: {err} lacks {needle:?}"
        );
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Our filesystems first (their loop devices sit on the daemon's FUSE files), then the
        // daemon with its loop devices and FUSE mount, then loops on the test's own files.
        fixtures::activation::unmount_under(&self.path("mnt"));
        fixtures::activation::clean_up_run_root(&self.run_root);
        fixtures::activation::detach_loops_under(self.dir.path());
    }
}
