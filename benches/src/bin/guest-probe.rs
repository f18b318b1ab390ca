//! The stopwatch of `benches/kernel.rs`, run inside its qemu guest, whose busybox userland has
//! no clock finer than a second. Each command prints one figure, milliseconds with microsecond
//! digits, on stdout, and exits non-zero (with the reason on stderr) when its work failed.
//!
//! ```text
//! guest-probe write FILE OFFSET   open FILE for writing, pwrite 4 KiB at OFFSET, fsync, close:
//!                                 the cow bench's first-write probe (sys::write4k_fsync), so
//!                                 an overlayfs copy-up inside the open is counted
//! guest-probe clone SRC DST       make DST a reflink clone of SRC (FICLONE), fsync DST
//! guest-probe time CMD [ARG...]   run CMD, wait for it; fails when it fails
//! ```

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};

// FICLONE: _IOW(0x94, 9, int); the argument is the source's descriptor.
nix::ioctl_write_int!(ficlone, 0x94, 9);

fn write(path: &str, offset: &str) -> Result<f64> {
    let offset: u64 = offset.parse().context("OFFSET must be a byte count")?;
    let buf = [0x5a_u8; 4096];
    let start = Instant::now();
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {path}"))?;
    file.write_all_at(&buf, offset)
        .with_context(|| format!("write {path}"))?;
    file.sync_all().with_context(|| format!("fsync {path}"))?;
    drop(file);
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

fn clone(src: &str, dst: &str) -> Result<f64> {
    let start = Instant::now();
    let from = File::open(src).with_context(|| format!("open {src}"))?;
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .with_context(|| format!("create {dst}"))?;
    // Safety: FICLONE reads its integer argument (a descriptor, open for the whole call) and
    // no memory of ours.
    #[allow(unsafe_code)]
    unsafe { ficlone(to.as_raw_fd(), from.as_raw_fd() as nix::libc::c_ulong) }
        .with_context(|| format!("FICLONE {src} to {dst}"))?;
    to.sync_all().with_context(|| format!("fsync {dst}"))?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

fn time(cmd: &[String]) -> Result<f64> {
    let (prog, args) = cmd.split_first().context("time needs a command")?;
    let start = Instant::now();
    let status = Command::new(prog)
        .args(args)
        .status()
        .with_context(|| format!("run {prog}"))?;
    let elapsed = start.elapsed();
    if !status.success() {
        bail!("{} failed: {status}", cmd.join(" "));
    }
    Ok(elapsed.as_secs_f64() * 1e3)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["write", path, offset] => write(path, offset),
        ["clone", src, dst] => clone(src, dst),
        ["time", ..] => time(&args[1..]),
        _ => Err(anyhow::anyhow!(
            "usage: guest-probe write FILE OFFSET | clone SRC DST | time CMD [ARG...]"
        )),
    };
    match result {
        Ok(ms) => {
            println!("{ms:.3}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("guest-probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
