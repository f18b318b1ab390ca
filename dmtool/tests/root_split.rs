//! A pool on one raw device (a real loop device) split into metadata and data regions, as
//! root: create, activate a thin through the pool daemon, ext4 on it, mount, write, unmount,
//! stop, check clean, trim, and the files still there after a second activation.
//!
//! Everything lives under the test's temporary directory (the loop device's backing file,
//! the daemon's `THINBOX_RUN_ROOT`, the mount point); a guard unmounts, kills the daemon and
//! detaches the loop devices even when the test fails, so it can run again at once.

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

mod common;

use common::Env;

#[track_caller]
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{} cannot run: {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sha256_file(path: &Path) -> Vec<u8> {
    Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

#[test]
fn root_split_loop_device_serves_an_ext4_thin() {
    let env = Env::new();
    let backing = env.path("disk.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    let device = sh(&["losetup", "-f", "--show", backing.to_str().unwrap()]);
    let state = env.path("state");
    let loc = [
        "--device",
        device.as_str(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let with = |verb: &[&str], rest: &[&str]| -> String {
        let args: Vec<&str> = verb
            .iter()
            .chain(loc.iter())
            .chain(rest.iter())
            .copied()
            .collect();
        env.ok(&args)
    };

    // A block device keeps its own size: 4 MiB of metadata, 92 MiB of data.
    with(&["pool", "create"], &["--metadata-size", "4M"]);
    let status: serde_json::Value =
        serde_json::from_str(&with(&["pool", "status"], &["--json"])).unwrap();
    assert_eq!(status["metadata_space"]["total_bytes"], 4u64 << 20);
    assert_eq!(status["data_space"]["total_bytes"], 92u64 << 20);
    with(&["thin", "create"], &["1", "--size", "64M", "--name", "fs"]);

    // Through the pool daemon (the kernel backend does not take split devices yet).
    let thin = with(&["thin", "activate"], &["1"]).trim().to_string();
    assert!(thin.starts_with("/dev/"), "{thin}");
    sh(&["mkfs.ext4", "-q", "-F", &thin]);
    let mnt = env.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&["mount", "-t", "ext4", &thin, mnt.to_str().unwrap()]);
    let bytes: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 253) as u8 ^ 0x3c).collect();
    std::fs::write(mnt.join("payload"), &bytes).unwrap();
    std::fs::write(mnt.join("hello"), b"split device\n").unwrap();
    sh(&["sync", "-f", mnt.join("payload").to_str().unwrap()]);
    let want = sha256_file(&mnt.join("payload"));
    sh(&["umount", mnt.to_str().unwrap()]);
    with(&["thin", "deactivate"], &["1"]);
    with(&["pool", "stop"], &[]);

    // Offline: the metadata at the start of the raw device checks clean, trim discards in
    // the data region only, and the pool still checks clean.
    env.ok(&["check", &device]);
    with(&["trim"], &[]);
    env.ok(&["check", &device]);

    // A second activation (a new daemon reopening the split) sees the files.
    let thin = with(&["thin", "activate"], &["1"]).trim().to_string();
    sh(&[
        "mount",
        "-t",
        "ext4",
        "-o",
        "ro",
        &thin,
        mnt.to_str().unwrap(),
    ]);
    assert_eq!(sha256_file(&mnt.join("payload")), want);
    assert_eq!(std::fs::read(mnt.join("hello")).unwrap(), b"split device\n");
    sh(&["umount", mnt.to_str().unwrap()]);
    with(&["pool", "stop"], &[]);
    env.ok(&["check", &device]);
    sh(&["losetup", "-d", &device]);
}
