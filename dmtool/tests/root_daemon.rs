//! The pool daemon and activation end to end, as root: real loop devices, real FUSE, real
//! mkfs, mount and fstrim. CI runs these one at a time (`-- --test-threads=1 root_`).
//!
//! Every test keeps its daemon's run directory under a temporary `THINBOX_RUN_ROOT`, and a
//! guard that, even when the test fails, unmounts what the test mounted, kills the daemon,
//! detaches loop devices pointing into the run directory and detaches the FUSE mount.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

mod common;

use common::DMTOOL;

struct Env {
    dir: tempfile::TempDir,
    run_root: PathBuf,
    mounts: std::cell::RefCell<Vec<PathBuf>>,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let run_root = dir.path().join("run");
        Env {
            dir,
            run_root,
            mounts: Default::default(),
        }
    }

    fn pool(&self) -> String {
        self.dir.path().join("pool").display().to_string()
    }

    fn dmtool(&self, args: &[&str]) -> Output {
        common::run_in(args, &self.run_root)
    }

    /// Runs a pool verb (`--pool` appended) and asserts success; returns stdout.
    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.ok_bytes(args)).into_owned()
    }

    #[track_caller]
    fn ok_bytes(&self, args: &[&str]) -> Vec<u8> {
        let mut all = args.to_vec();
        let pool = self.pool();
        all.extend(["--pool", &pool]);
        let out = self.dmtool(&all);
        assert!(
            out.status.success(),
            "dmtool {all:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Runs a pool verb expecting exit 1; returns stderr.
    #[track_caller]
    fn fails(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        let pool = self.pool();
        all.extend(["--pool", &pool]);
        let out = self.dmtool(&all);
        assert_eq!(
            out.status.code(),
            Some(1),
            "dmtool {all:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn mount(&self, device: &str, fs_type: &str) -> PathBuf {
        let mnt = self
            .dir
            .path()
            .join(format!("mnt-{}", self.mounts.borrow().len()));
        fs::create_dir_all(&mnt).unwrap();
        sh(&["mount", "-t", fs_type, device, mnt.to_str().unwrap()]);
        self.mounts.borrow_mut().push(mnt.clone());
        mnt
    }

    fn umount(&self, mnt: &Path) {
        sh(&["umount", mnt.to_str().unwrap()]);
        self.mounts.borrow_mut().retain(|m| m != mnt);
    }

    fn daemon_pid(&self) -> Option<u32> {
        let dirs = fs::read_dir(&self.run_root).ok()?;
        for d in dirs.flatten() {
            if let Ok(text) = fs::read_to_string(d.path().join("daemon.pid")) {
                return text.trim().parse().ok();
            }
        }
        None
    }

    fn status_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["pool", "status", "--json"])).unwrap()
    }

    fn used_data_blocks(&self) -> u64 {
        self.status_json()["status"]["used_data_blocks"]
            .as_u64()
            .unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for mnt in self.mounts.borrow().iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(mnt).status();
        }
        fixtures::activation::clean_up_run_root(&self.run_root);
    }
}

#[track_caller]
fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_file(path: &Path) -> String {
    hex(&Sha256::digest(fs::read(path).unwrap()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

/// Waits until `cond` holds (the daemon's reaper works in the background).
#[track_caller]
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_pool_clean(env: &Env) {
    let metadata = env.dir.path().join("pool/metadata");
    let ours = env.dmtool(&["check", metadata.to_str().unwrap()]);
    assert!(
        ours.status.success(),
        "dmtool check: {}",
        String::from_utf8_lossy(&ours.stdout)
    );
    let real = fixtures::tools::thin_check(&metadata, &[]);
    assert_eq!(real.rc, 0, "thin_check: {}{}", real.stdout, real.stderr);
}

fn new_pool(env: &Env) {
    env.ok(&[
        "pool",
        "create",
        "--data-size",
        "4G",
        "--metadata-size",
        "64M",
    ]);
    env.ok(&["thin", "create", "1", "--size", "1G", "--name", "one"]);
}

#[test]
fn root_daemon_runs_every_verb_and_activates_filesystems() {
    let env = Env::new();
    new_pool(&env);
    env.ok(&["pool", "start"]);
    let pid = env.daemon_pid().expect("the daemon wrote its pid");
    assert_eq!(
        env.status_json()["daemon_pid"].as_u64(),
        Some(u64::from(pid)),
        "status goes through the daemon"
    );
    // A second daemon and offline tools are refused while it owns the pool.
    assert!(env
        .fails(&["pool", "start"])
        .contains("already has a daemon"));
    let metadata = env.dir.path().join("pool/metadata");
    let check = env.dmtool(&["check", metadata.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stderr).contains(&format!("pid {pid}")));

    // Pool messages through the daemon, and a resize.
    env.ok(&["pool", "resize", "--data-size", "5G"]);
    assert_eq!(
        env.status_json()["status"]["total_data_blocks"].as_u64(),
        Some(5 << 14),
        "the daemon's pool grew to 5 GiB of 64 KiB blocks"
    );
    env.ok(&["thin", "create", "2", "--size", "512M"]);
    let data = pattern(3 << 20, 7);
    let input = env.dir.path().join("input");
    fs::write(&input, &data).unwrap();
    env.ok(&[
        "thin",
        "write",
        "2",
        "--input",
        input.to_str().unwrap(),
        "--offset",
        "1M",
    ]);
    env.ok(&["thin", "snap", "3", "2", "--name", "snap-of-2"]);
    let read = env.ok_bytes(&["thin", "read", "3", "--offset", "1M", "--length", "3M"]);
    assert!(
        read == data,
        "the snapshot reads back what was written to its origin"
    );
    let ls: serde_json::Value = serde_json::from_str(&env.ok(&["thin", "ls", "--json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 3);

    // ext4 on thin 1: mkfs, mount, files, fsync, fstrim.
    let dev1 = env.ok(&["thin", "activate", "1"]).trim().to_string();
    assert!(dev1.starts_with("/dev/loop"), "{dev1}");
    assert_eq!(
        env.ok(&["thin", "activate", "1"]).trim(),
        dev1,
        "activating an active thin gives its device"
    );
    sh(&["mkfs.ext4", "-q", "-F", &dev1]);
    let mnt = env.mount(&dev1, "ext4");
    let big = mnt.join("big");
    fs::write(&big, pattern(64 << 20, 3)).unwrap();
    sh(&["sync", "-f", big.to_str().unwrap()]);
    let big_sha = sha256_file(&big);
    let used_full = env.used_data_blocks();
    fs::remove_file(&big).unwrap();
    // ext4 frees the file's blocks when its journal commits; only then can fstrim see them.
    sh(&["sync", "-f", mnt.to_str().unwrap()]);
    sh(&["fstrim", mnt.to_str().unwrap()]);
    let used_trimmed = env.used_data_blocks();
    assert!(
        used_trimmed + 900 < used_full,
        "fstrim freed pool blocks: {used_full} -> {used_trimmed}"
    );
    fs::write(&big, pattern(64 << 20, 3)).unwrap();
    sh(&["sync", "-f", big.to_str().unwrap()]);

    // A mounted file system's journal is live: trim-journal refuses an active thin.
    let refused = env.fails(&["thin", "trim-journal", "1"]);
    assert!(refused.contains("is active"), "{refused}");

    // Busy: mounted devices are not taken away, except by a deferred removal.
    let busy = env.fails(&["thin", "deactivate", "1"]);
    assert!(
        busy.contains("busy") && busy.contains("mounted on"),
        "{busy}"
    );
    assert!(env
        .fails(&["thin", "delete", "1"])
        .contains("deactivate it first"));
    env.ok(&["thin", "deactivate", "1", "--deferred"]);
    let ls = env.ok(&["thin", "ls", "--json"]);
    assert!(ls.contains("\"deferred_removal\": true"), "{ls}");
    env.umount(&mnt);
    wait_until("the deferred removal finished", || {
        !env.ok(&["thin", "ls", "--json"]).contains(&dev1)
    });

    // Unmounted cleanly after 64 MiB went through it, ext4's log gives blocks back; the
    // file system mounts again and keeps its file.
    let used_before_trim = env.used_data_blocks();
    let trim: serde_json::Value =
        serde_json::from_str(&env.ok(&["thin", "trim-journal", "1", "--json"])).unwrap();
    assert_eq!(trim["trimmed"], true, "{trim}");
    let discarded = trim["discarded_bytes"].as_u64().unwrap();
    assert!(discarded > 0, "{trim}");
    assert!(env.used_data_blocks() < used_before_trim);

    // Back again: the file survived, then XFS on thin 2's snapshot.
    let dev1 = env.ok(&["thin", "activate", "1"]).trim().to_string();
    let mnt = env.mount(&dev1, "ext4");
    assert_eq!(sha256_file(&mnt.join("big")), big_sha);
    fs::write(mnt.join("after-trim"), b"logged into a trimmed journal").unwrap();
    sh(&["sync", "-f", mnt.to_str().unwrap()]);
    env.umount(&mnt);
    sh(&["e2fsck", "-fn", &dev1]);
    env.ok(&["thin", "deactivate", "1"]);
    // Again: a thin that is not active is done (as for the kernel backend), so two
    // deactivations racing (a container's supervisor and `rm -f`) both succeed.
    env.ok(&["thin", "deactivate", "1"]);
    env.ok(&["thin", "deactivate", "1", "--deferred"]);

    env.ok(&["thin", "create", "4", "--size", "1G"]);
    let dev4 = env.ok(&["thin", "activate", "4"]).trim().to_string();
    sh(&["mkfs.xfs", "-q", "-f", &dev4]);
    let mnt4 = env.mount(&dev4, "xfs");
    fs::write(mnt4.join("x"), pattern(8 << 20, 9)).unwrap();
    sh(&["sync", "-f", mnt4.join("x").to_str().unwrap()]);
    env.umount(&mnt4);

    // An open device is busy too; stopping is refused while it is.
    let holder = fs::File::open(&dev4).unwrap();
    let busy = env.fails(&["thin", "deactivate", "4"]);
    assert!(
        busy.contains("busy") && busy.contains("open by pid"),
        "{busy}"
    );
    assert!(env.fails(&["pool", "stop"]).contains("in use"));
    drop(holder);

    env.ok(&["pool", "stop"]);
    assert!(
        env.daemon_pid().is_none(),
        "the daemon removed its pid file"
    );
    assert!(
        !fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(env.run_root.to_str().unwrap()),
        "the FUSE export is unmounted"
    );
    // Offline again: the same verbs open the pool directly.
    let ls = env.ok(&["thin", "ls"]);
    assert!(ls.contains("snap-of-2"), "{ls}");
    assert_pool_clean(&env);
}

#[test]
fn root_daemon_commits_on_sigterm_and_recovers_after_kill_9() {
    let env = Env::new();
    new_pool(&env);
    // Data written to the block device and never flushed: SIGTERM still commits it.
    let dev = env.ok(&["thin", "activate", "1"]).trim().to_string();
    let data = pattern(4 << 20, 5);
    let input = env.dir.path().join("input");
    fs::write(&input, &data).unwrap();
    sh(&[
        "dd",
        &format!("if={}", input.display()),
        &format!("of={dev}"),
        "bs=1M",
        "oflag=direct",
        "status=none",
    ]);
    let pid = env.daemon_pid().unwrap();
    sh(&["kill", "-TERM", &pid.to_string()]);
    wait_until("the daemon exited", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(env.daemon_pid().is_none());
    let back = env.ok_bytes(&["thin", "read", "1", "--length", "4M"]);
    assert_eq!(hex(&Sha256::digest(&back)), hex(&Sha256::digest(&data)));
    assert_pool_clean(&env);

    // kill -9 with a mounted filesystem: what was fsynced survives, and the next start
    // cleans up the dead export.
    let dev = env.ok(&["thin", "activate", "1"]).trim().to_string();
    sh(&["mkfs.ext4", "-q", "-F", &dev]);
    let mnt = env.mount(&dev, "ext4");
    let kept = mnt.join("kept");
    fs::write(&kept, pattern(16 << 20, 1)).unwrap();
    sh(&["sync", "-f", kept.to_str().unwrap()]);
    let kept_sha = sha256_file(&kept);
    let pid = env.daemon_pid().unwrap();
    sh(&["kill", "-KILL", &pid.to_string()]);
    wait_until("the daemon died", || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    let _ = Command::new("umount").arg(&mnt).status();
    env.mounts.borrow_mut().clear();
    assert_pool_clean(&env);

    let dev = env.ok(&["thin", "activate", "1"]).trim().to_string();
    let mnt = env.mount(&dev, "ext4");
    assert_eq!(sha256_file(&mnt.join("kept")), kept_sha);
    env.umount(&mnt);
    env.ok(&["pool", "stop"]);
    assert_pool_clean(&env);
}

#[test]
fn root_daemon_serves_nbd_while_serve_runs() {
    let env = Env::new();
    new_pool(&env);
    env.ok(&["pool", "start"]);
    let socket = env.dir.path().join("nbd.sock");
    let pool = env.pool();
    let mut serve = Command::new(DMTOOL)
        .args(["serve", "--pool", &pool, "--nbd"])
        .arg(format!("unix:{}", socket.display()))
        .arg("1")
        .env("THINBOX_RUN_ROOT", &env.run_root)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the daemon listens for NBD", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    });
    // Its client would be cut off: a stop without --force is refused.
    let err = env.fails(&["pool", "stop"]);
    assert!(err.contains("NBD server"), "{err}");
    let uri = format!("nbd+unix:///one?socket={}", socket.display());
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 1M 3M", "-c", "flush"])
        .arg(&uri)
        .output()
        .unwrap();
    let serve_alive = serve.try_wait().unwrap().is_none();
    let _ = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status();
    let status = serve.wait().unwrap();
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"));
    assert!(
        serve_alive && status.success(),
        "serve ran until SIGTERM: {status}"
    );
    wait_until("the daemon stopped listening", || !socket.exists());
    let back = env.ok_bytes(&["thin", "read", "1", "--offset", "1M", "--length", "3M"]);
    assert!(
        back.iter().all(|&b| b == 0x5a),
        "the daemon's pool has the NBD client's writes"
    );
    env.ok(&["pool", "stop"]);
    assert_pool_clean(&env);
}

/// A unix-socket connect as `nobody`: `Ok(reply)` with whatever the server answered to a
/// status request (empty when it hung up), `Err(why)` when the connect itself failed.
fn connect_as_nobody(socket: &Path) -> Result<String, String> {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("refused:", e.strerror); sys.exit(0)
try:
    s.sendall(b'{"op":"status"}\n')
    s.settimeout(10)
    print("reply:" + s.recv(4096).decode(errors="replace"))
except ConnectionError:
    print("reply:")
"#;
    let out = sh(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        script,
        socket.to_str().unwrap(),
    ]);
    match out.trim().strip_prefix("reply:") {
        Some(reply) => Ok(reply.to_string()),
        None => Err(out.trim().to_string()),
    }
}

/// Whoever reaches the daemon's socket can read and write every thin: the run directory is
/// 0700 and the log private even when the daemon starts under umask 000, and a peer of
/// another user that gets to the socket anyway is hung up on without an answer.
#[test]
fn root_daemon_is_out_of_reach_of_other_users_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;

    let env = Env::new();
    new_pool(&env);
    let pool = env.pool();
    let started = Command::new("sh")
        .args([
            "-c",
            "umask 000 && exec \"$0\" pool start --pool \"$1\"",
            DMTOOL,
            &pool,
        ])
        .env("THINBOX_RUN_ROOT", &env.run_root)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(started.status.success(), "{started:?}");
    let run_dir = fs::read_dir(&env.run_root)
        .unwrap()
        .flatten()
        .map(|d| d.path())
        .find(|p| p.join("daemon.sock").exists())
        .expect("the daemon's run directory");
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&run_dir), 0o700, "{}", run_dir.display());
    assert_eq!(
        mode(&env.run_root) & 0o022,
        0,
        "others cannot write the run root"
    );
    assert_eq!(mode(&run_dir.join("daemon.log")) & 0o077, 0);
    assert_eq!(mode(&run_dir.join("daemon.sock")), 0o600);

    let socket = run_dir.join("daemon.sock");
    let denied = connect_as_nobody(&socket).expect_err("nobody cannot reach the socket");
    assert!(denied.contains("Permission denied"), "{denied}");
    // Opened up by hand: the daemon still knows who connected.
    fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o711)).unwrap();
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();
    let reply = connect_as_nobody(&socket).expect("the connect itself works now");
    assert_eq!(reply, "", "hung up on without an answer");
    fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o700)).unwrap();
    // Root still gets answers.
    assert!(env.status_json()["daemon_pid"].as_u64().is_some());
    env.ok(&["pool", "stop"]);
}

/// Writes and discards through the daemon would go under an active thin's user (a mounted
/// file system's cache; a read-only activation's promise): refused until it is deactivated.
#[test]
fn root_daemon_refuses_writes_beside_an_active_thin() {
    let env = Env::new();
    new_pool(&env);
    env.ok(&["pool", "start"]);
    let input = env.dir.path().join("block");
    fs::write(&input, pattern(65536, 3)).unwrap();
    let input = input.to_str().unwrap();
    env.ok(&["thin", "activate", "1", "--read-only"]);
    let err = env.fails(&["thin", "write", "1", "--input", input]);
    assert!(err.contains("active"), "{err}");
    let err = env.fails(&["thin", "trim-journal", "1"]);
    assert!(err.contains("active"), "{err}");
    // Reads are fine.
    assert_eq!(
        env.ok_bytes(&["thin", "read", "1", "--length", "64K"]),
        vec![0; 65536]
    );
    env.ok(&["thin", "deactivate", "1"]);
    env.ok(&["thin", "write", "1", "--input", input]);
    assert_eq!(
        env.ok_bytes(&["thin", "read", "1", "--length", "64K"]),
        pattern(65536, 3)
    );
    env.ok(&["pool", "stop"]);
    assert_pool_clean(&env);
}

/// With `--when-full queue` a write through the daemon waits for space; the resize that
/// gives it space must get through meanwhile (it once waited for the write's 60 s queue
/// timeout, and the write then failed).
#[test]
fn root_daemon_resize_reaches_a_write_queued_for_space() {
    let env = Env::new();
    env.ok(&[
        "pool",
        "create",
        "--data-size",
        "16M",
        "--metadata-size",
        "16M",
    ]);
    env.ok(&["thin", "create", "1", "--size", "64M"]);
    env.ok(&["pool", "set", "--when-full", "queue"]);
    env.ok(&["pool", "start"]);
    let input = env.dir.path().join("fill");
    fs::write(&input, pattern(32 << 20, 5)).unwrap();
    let pool = env.pool();
    let writer = Command::new(DMTOOL)
        .args(["thin", "write", "1", "--pool", &pool, "--input"])
        .arg(&input)
        .env("THINBOX_RUN_ROOT", &env.run_root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let total = env.status_json()["status"]["total_data_blocks"]
        .as_u64()
        .unwrap();
    wait_until("the pool is full and the write waits", || {
        env.used_data_blocks() == total
    });
    env.ok(&["pool", "resize", "--data-size", "64M"]);
    let out = writer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the queued write went on: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.ok_bytes(&["thin", "read", "1", "--length", "32M"]),
        pattern(32 << 20, 5)
    );
    env.ok(&["pool", "stop"]);
    assert_pool_clean(&env);
}
