//! What the runtime's privileged tests share: thinbox state directories (`--root` plus its
//! `THINBOX_RUN_ROOT`) inside a test's temporary directory, the fixture busybox images in a
//! real `docker-registry` on 127.0.0.1, and a guard that, even when the test fails, kills
//! what containers left running, unmounts, stops the pool daemons, detaches loop devices and
//! kills the peers.

#![allow(dead_code)] // each test file uses its own part

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use engine::activate::daemon::{Client, RunDir};
use engine::activate::PoolControl;
use engine::{PoolPaths, ThinId};
use fixtures::registry::{busybox_layout, run, Registry, RegistryAuth};

pub const THINBOX: &str = env!("CARGO_BIN_EXE_thinbox");

/// Small sizes keep mkfs and the pool quick.
pub const STORAGE_OPTS: [&str; 4] = [
    "--storage-opt=dm.basesize=512M",
    "--storage-opt=dm.loopdatasize=4G",
    "--storage-opt=dm.loopmetadatasize=64M",
    "--storage-opt=dm.min_free_space=1%",
];

/// One thinbox state directory and its run directory.
pub struct Root {
    pub root: PathBuf,
    pub run_root: PathBuf,
    /// `--storage-driver overlay` instead of devicemapper (with the small pool options).
    pub overlay: bool,
    /// More `--storage-opt`s for devicemapper, after the small pool options.
    pub storage_opts: Vec<String>,
}

impl Root {
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(THINBOX);
        c.arg("--root").arg(&self.root);
        if self.overlay {
            c.args(["--storage-driver", "overlay"]);
        } else {
            c.args(STORAGE_OPTS);
            c.args(
                self.storage_opts
                    .iter()
                    .map(|o| format!("--storage-opt={o}")),
            );
        }
        c.args(args)
            .env("THINBOX_RUN_ROOT", &self.run_root)
            .env_remove("RUST_LOG")
            .env_remove("THINBOX_PUSH_CHUNK_SIZE");
        c
    }

    pub fn output(&self, mut command: Command, stdin: Option<&[u8]>) -> Output {
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("thinbox runs");
        if let Some(bytes) = stdin {
            child.stdin.take().unwrap().write_all(bytes).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    #[track_caller]
    pub fn check(&self, args: &[&str], out: Output) -> String {
        assert!(
            out.status.success(),
            "thinbox {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.output(self.command(args), None);
        self.check(args, out)
    }

    /// Runs and returns the exit code and stdout and stderr together.
    pub fn status_and_output(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = self.output(self.command(args), None);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    #[track_caller]
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.output(self.command(args), None);
        assert_eq!(
            out.status.code(),
            Some(1),
            "thinbox {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn inspect(&self, name: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["inspect", name])).unwrap();
        v[0].clone()
    }

    /// The thin of image `name`'s top layer (`GraphDriver.Data.DeviceId`).
    pub fn layer_thin(&self, name: &str) -> u64 {
        self.inspect(name)["GraphDriver"]["Data"]["DeviceId"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn id(&self, name: &str) -> String {
        self.inspect(name)["Id"].as_str().unwrap().to_string()
    }

    /// Every blob file in the content store.
    pub fn blobs(&self) -> Vec<String> {
        fs::read_dir(self.root.join("blobs/sha256"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs thinbox with `input` on its stdin; the raw output.
    pub fn with_input(&self, args: &[&str], input: &[u8]) -> Output {
        self.output(self.command(args), Some(input))
    }

    /// Runs and returns the exit code, stdout and stderr.
    pub fn code(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.output(self.command(args), None);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The devicemapper pool daemon's run directory.
    pub fn run_dir(&self) -> RunDir {
        let paths = PoolPaths::in_dir(&self.root.join("devicemapper"));
        let key = engine::activate::daemon::pool_key(&paths);
        RunDir::new(self.run_root.join(format!("pool-{key}")))
    }

    /// A client of the running pool daemon.
    pub fn client(&self) -> Client {
        Client::connect(&self.run_dir().socket())
            .unwrap()
            .expect("the pool daemon runs")
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        fs::read_to_string(self.run_dir().pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn used_data_blocks(&self) -> u64 {
        self.client().status().unwrap().status.used_data_blocks
    }

    /// Names of the thins in the pool, sorted.
    pub fn thin_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .client()
            .list()
            .unwrap()
            .into_iter()
            .map(|t| t.name.unwrap_or_default())
            .collect();
        names.sort();
        names
    }

    /// Thins with a block device.
    pub fn active_thins(&self) -> usize {
        self.client()
            .list()
            .unwrap()
            .iter()
            .filter(|t| t.active.is_some())
            .count()
    }

    /// Activates thin `id` read-only, mounts it under ROOT/test-mnt, runs `check` on the
    /// mount, cleans up (the guard unmounts it if `check` panics).
    pub fn with_thin<T>(&self, id: u64, check: impl FnOnce(&Path) -> T) -> T {
        let id = ThinId::new(id).unwrap();
        let mut client = self.client();
        let activation = client.activate(id, true).unwrap();
        let mnt = self.root.join("test-mnt").join(id.to_string());
        fs::create_dir_all(&mnt).unwrap();
        // Without replaying a journal, which a read-only look must not do.
        let options = if self.storage_opts.iter().any(|o| o == "dm.fs=xfs") {
            "ro,norecovery,nouuid"
        } else {
            "ro,noload"
        };
        run(Command::new("mount")
            .args(["-o", options])
            .arg(&activation.device)
            .arg(&mnt));
        let result = check(&mnt);
        run(Command::new("umount").arg(&mnt));
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.deactivate(id, false).is_err() {
            assert!(Instant::now() < deadline, "thin {id} stays busy");
            std::thread::sleep(Duration::from_millis(50));
        }
        result
    }

    /// Mount points under ROOT.
    pub fn mounts(&self) -> Vec<String> {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = self.root.to_str().unwrap().to_string();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&root))
            .map(str::to_string)
            .collect()
    }

    /// Ids of the containers with a record.
    pub fn container_ids(&self) -> Vec<String> {
        fs::read_dir(self.root.join("containers"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.len() == 64)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A container's record (`config.v2.json`).
    pub fn record(&self, id: &str) -> serde_json::Value {
        let path = self.root.join("containers").join(id).join("config.v2.json");
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    /// Waits until `ps -a` shows `name` with a status starting with `prefix`.
    #[track_caller]
    pub fn wait_status(&self, name: &str, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self
                .ok(&["ps", "-a", "--format", "{{.Names}}|{{.Status}}"])
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}|")).map(str::to_string))
                .unwrap_or_default();
            if status.starts_with(prefix) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {status:?}, not {prefix:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops what a test left: container processes and supervisors, external runtimes'
    /// state, the freezer cgroups of an interrupted commit, mounts, the pool daemon, loops.
    pub fn cleanup(&self) {
        if let Ok(entries) = fs::read_dir(self.root.join("containers")) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                kill_container(&self.root, &id, &entry.path().join("config.v2.json"));
            }
        }
        fixtures::activation::unmount_under(&self.root.join("test-mnt"));
        fixtures::activation::unmount_under(&self.root.join("mnt"));
        fixtures::activation::unmount_under(&self.root.join("overlay2"));
        let _ = Command::new(THINBOX)
            .arg("--root")
            .arg(&self.root)
            .args(["pool-daemon", "stop", "--force"])
            .env("THINBOX_RUN_ROOT", &self.run_root)
            .stdin(Stdio::null())
            .output();
        fixtures::activation::clean_up_run_root(&self.run_root);
    }
}

fn kill_container(root: &Path, id: &str, record: &Path) {
    // A frozen rootfs would keep its superblock alive past the unmount.
    let _ = Command::new("fsfreeze")
        .arg("--unfreeze")
        .arg(root.join("mnt").join(id))
        .stderr(Stdio::null())
        .status();
    let pause_cgroups = || {
        [
            "/sys/fs/cgroup/freezer",
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/unified",
        ]
        .map(|h| Path::new(h).join(format!("thinbox-pause-{id}")))
    };
    for cgroup in pause_cgroups() {
        if cgroup.exists() {
            let _ = fs::write(cgroup.join("freezer.state"), "THAWED");
            let _ = fs::write(cgroup.join("cgroup.freeze"), "0");
        }
    }
    if let Ok(v) = fs::read(record)
        .map_err(drop)
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(drop))
    {
        for key in ["pid", "supervisor_pid"] {
            if let Some(pid) = v["state"][key].as_u64() {
                let _ = Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    for runtime in ["runc", "crun"] {
        let _ = Command::new(runtime)
            .arg("--root")
            .arg(root.join("runtime").join(runtime))
            .args(["delete", "--force", id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    for cgroup in pause_cgroups() {
        let _ = fs::remove_dir(cgroup);
    }
}

/// A test's temporary directory, its thinbox roots and its registries.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub roots: Vec<Root>,
    pub layout: PathBuf,
    // Fields drop after Drop::drop's body: the peers are killed after the cleanup.
    pub registries: Vec<Registry>,
}

impl Env {
    /// A fixture layout (`base`, `v2`), a registry holding both as `test/busybox`, and
    /// three roots (`a`, `b`, `c`).
    pub fn new(auth: RegistryAuth) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let layout = busybox_layout(dir.path());
        let mut env = Env {
            dir,
            roots: Vec::new(),
            layout,
            registries: Vec::new(),
        };
        let registry = env.start_registry(auth);
        let l = env.layout.display().to_string();
        env.registries[registry].push(&format!("oci:{l}:base"), "test/busybox:base");
        env.registries[registry].push(&format!("oci:{l}:v2"), "test/busybox:v2");
        for name in ["a", "b", "c"] {
            env.roots.push(Root {
                root: env.dir.path().join(format!("root-{name}")),
                run_root: env.dir.path().join(format!("run-{name}")),
                overlay: false,
                storage_opts: Vec::new(),
            });
        }
        env
    }

    /// Adds a root with the overlay driver; its index in `roots`.
    pub fn add_overlay_root(&mut self, name: &str) -> usize {
        self.add_root(name, true, &[])
    }

    /// Adds a devicemapper root with more storage options (`dm.fs=xfs`); its index in
    /// `roots`.
    pub fn add_root_with(&mut self, name: &str, storage_opts: &[&str]) -> usize {
        self.add_root(name, false, storage_opts)
    }

    fn add_root(&mut self, name: &str, overlay: bool, storage_opts: &[&str]) -> usize {
        self.roots.push(Root {
            root: self.dir.path().join(format!("root-{name}")),
            run_root: self.dir.path().join(format!("run-{name}")),
            overlay,
            storage_opts: storage_opts.iter().map(|o| o.to_string()).collect(),
        });
        self.roots.len() - 1
    }

    pub fn start_registry(&mut self, auth: RegistryAuth) -> usize {
        let n = self.registries.len();
        let dir = self.dir.path().join(format!("registry-{n}"));
        fs::create_dir_all(&dir).unwrap();
        self.registries.push(Registry::start(&dir, auth));
        n
    }

    pub fn registry(&self) -> &Registry {
        &self.registries[0]
    }

    pub fn host(&self) -> String {
        self.registry().host()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for r in &self.roots {
            r.cleanup();
        }
    }
}

/// One root with no registry, in a temporary directory of its own; its cleanup runs even
/// when the test fails.
pub struct LoneRoot {
    // Dropped after Drop::drop's body: the directory goes after the cleanup.
    pub dir: tempfile::TempDir,
    /// The root; its fields are the `LoneRoot`'s too (`Deref`).
    pub thinbox: Root,
}

impl LoneRoot {
    pub fn new(overlay: bool) -> LoneRoot {
        let dir = tempfile::tempdir().unwrap();
        let thinbox = Root {
            root: dir.path().join("root"),
            run_root: dir.path().join("run"),
            overlay,
            storage_opts: Vec::new(),
        };
        LoneRoot { dir, thinbox }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl std::ops::Deref for LoneRoot {
    type Target = Root;
    fn deref(&self) -> &Root {
        &self.thinbox
    }
}

impl Drop for LoneRoot {
    fn drop(&mut self) {
        self.thinbox.cleanup();
    }
}

/// An entry of a test layer: path, type, mode and content.
pub type LayerEntry<'a> = (&'a str, tar::EntryType, u32, &'a [u8]);

/// A plain 0644 file for [`layer_tar`].
pub fn file<'a>(path: &'a str, content: &'a [u8]) -> LayerEntry<'a> {
    (path, tar::EntryType::Regular, 0o644, content)
}

/// A layer tar of `entries`, each path written as given (`..` and all: the `tar` crate
/// refuses to build those itself), owned by root; character devices are 1:3, `/dev/null`'s
/// numbers.
pub fn layer_tar(entries: &[LayerEntry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for &(path, kind, mode, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1);
        if kind == tar::EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// The config of an image of `layers`, and its id.
pub fn image_config(layers: &[Vec<u8>]) -> (Vec<u8>, String) {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let id = format!("sha256:{}", sha256_hex(&config));
    (config, id)
}

/// A `docker save` archive in the layout before Docker 25 (`manifest.json`, `<hex>.json`
/// configs, `<hex>/layer.tar`) of `images`: each its `RepoTags` and its layers.
pub fn docker_archive(images: &[(&[&str], Vec<Vec<u8>>)]) -> Vec<u8> {
    let mut files = std::collections::BTreeMap::new();
    let mut manifest = Vec::new();
    for (tags, layers) in images {
        let (config, _) = image_config(layers);
        let config_name = format!("{}.json", sha256_hex(&config));
        files.insert(config_name.clone(), config);
        let mut names = Vec::new();
        for layer in layers {
            let name = format!("{}/layer.tar", sha256_hex(layer));
            files.insert(name.clone(), layer.clone());
            names.push(name);
        }
        manifest.push(serde_json::json!({
            "Config": config_name,
            "RepoTags": tags,
            "Layers": names,
        }));
    }
    files.insert(
        "manifest.json".to_string(),
        serde_json::to_vec(&manifest).unwrap(),
    );
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

/// What a store holds: its record files, its blobs and, with devicemapper, the pool's thins.
#[derive(Debug, PartialEq, Eq)]
pub struct StoreState {
    pub records: Vec<(String, String)>,
    pub blobs: Vec<String>,
    pub thins: Vec<String>,
    pub overlay_dirs: Vec<String>,
}

impl Root {
    /// The store as it is now, to compare with what it was.
    pub fn state(&self) -> StoreState {
        let records = ["layers.json", "images.json", "repositories.json"]
            .iter()
            .map(|f| {
                let text = fs::read_to_string(self.root.join(f)).unwrap_or_default();
                (f.to_string(), text)
            })
            .collect();
        let mut blobs = self.blobs();
        blobs.sort();
        let thins = if self.overlay {
            Vec::new()
        } else {
            self.thin_names()
        };
        let mut overlay_dirs: Vec<String> = fs::read_dir(self.root.join("overlay2"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        overlay_dirs.sort();
        StoreState {
            records,
            blobs,
            thins,
            overlay_dirs,
        }
    }
}

pub fn skopeo(args: &[&str]) -> String {
    run(Command::new("skopeo").args(args))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
