//! `thinbox pull` and friends end to end, as root, against a real `docker-registry` on
//! 127.0.0.1 with busybox images built from the host's busybox-static: the pool daemon,
//! real loop devices, FUSE, mkfs and mounts. CI runs these one at a time (`root_`).
//!
//! Each test has its own temporary `--root` and `THINBOX_RUN_ROOT`; a guard stops the pool
//! daemon, unmounts and detaches whatever is left, and kills the registry, even when the
//! test fails, so every test can run again right away.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use engine::activate::PoolControl;
use fixtures::registry::{run, Registry, RegistryAuth};

mod common;

use common::{sha256_hex, Root};

/// The first root of a [`common::Env`], whose registry holds `test/busybox:base` and
/// `test/busybox:v2`.
struct Pull(common::Env);

impl std::ops::Deref for Pull {
    type Target = Root;
    fn deref(&self) -> &Root {
        &self.0.roots[0]
    }
}

impl Pull {
    fn registry(&self) -> &Registry {
        self.0.registry()
    }
}

fn env_with_images(auth: RegistryAuth) -> Pull {
    Pull(common::Env::new(auth))
}

fn device_id(info: &serde_json::Value) -> u64 {
    info["GraphDriver"]["Data"]["DeviceId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn root_pull_stores_layers_as_snapshots_and_rmi_frees_them() {
    let env = env_with_images(RegistryAuth::None);
    let host = env.registry().host();
    let base = format!("{host}/test/busybox:base");
    let v2 = format!("{host}/test/busybox:v2");

    let t = Instant::now();
    let out = env.ok(&["pull", &base]);
    eprintln!(
        "first pull (creates the pool and base device): {:?}",
        t.elapsed()
    );
    assert!(out.contains("Pull complete"), "{out}");
    assert!(out.trim_end().ends_with(&base), "{out}");

    let images = env.ok(&["images"]);
    let header = images.lines().next().unwrap();
    assert!(header.starts_with("REPOSITORY"), "{images}");
    for col in ["TAG", "IMAGE ID", "CREATED", "SIZE"] {
        assert!(header.contains(col), "{images}");
    }
    assert!(images.contains(&format!("{host}/test/busybox")), "{images}");
    assert!(images.contains("base"), "{images}");

    let info = env.inspect(&base);
    assert_eq!(info["RepoTags"][0], base.as_str());
    assert!(info["RepoDigests"][0]
        .as_str()
        .unwrap()
        .contains("@sha256:"));
    assert_eq!(info["Config"]["Cmd"][2], "cat /data/keep.txt");
    assert_eq!(info["Config"]["Env"][0], "PATH=/bin");
    assert_eq!(info["RootFS"]["Type"], "layers");
    assert_eq!(info["RootFS"]["Layers"].as_array().unwrap().len(), 1);
    assert_eq!(info["GraphDriver"]["Name"], "devicemapper");
    assert_eq!(
        info["GraphDriver"]["Data"]["DeviceSize"],
        (512u64 << 20).to_string()
    );
    let base_thin = device_id(&info);

    // The layer device holds the files: busybox byte for byte.
    let host_busybox = sha256_hex(&fs::read("/bin/busybox").unwrap());
    env.with_thin(base_thin, |mnt| {
        assert_eq!(
            sha256_hex(&fs::read(mnt.join("bin/busybox")).unwrap()),
            host_busybox
        );
        assert_eq!(
            fs::read_link(mnt.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(
            fs::read_to_string(mnt.join("data/keep.txt")).unwrap(),
            "original\n"
        );
        assert!(mnt.join("data/opaque/a").exists());
    });

    // The second image shares the first layer: stored once, one thin for it.
    let t = Instant::now();
    let out = env.ok(&["pull", &v2]);
    eprintln!("second pull (one new 10 KiB layer): {:?}", t.elapsed());
    assert!(out.contains("Already exists"), "{out}");
    let info2 = env.inspect(&v2);
    assert_eq!(info2["RootFS"]["Layers"].as_array().unwrap().len(), 2);
    assert_eq!(info2["RootFS"]["Layers"][0], info["RootFS"]["Layers"][0]);
    assert_eq!(info2["Config"]["Cmd"][0], "/bin/cat");
    let names = env.thin_names();
    assert_eq!(
        names.len(),
        3,
        "base device + one thin per layer: {names:?}"
    );
    let v2_thin = device_id(&info2);
    assert_ne!(v2_thin, base_thin);
    env.with_thin(v2_thin, |mnt| {
        assert_eq!(
            sha256_hex(&fs::read(mnt.join("bin/busybox")).unwrap()),
            host_busybox
        );
        assert_eq!(
            fs::read_to_string(mnt.join("data/keep.txt")).unwrap(),
            "changed\n"
        );
        assert!(!mnt.join("data/delete-me.txt").exists(), "whiteout applied");
        assert!(!mnt.join("data/opaque/a").exists(), "opaque dir applied");
        assert!(!mnt.join("data/opaque/b").exists(), "opaque dir applied");
        assert_eq!(
            fs::read_to_string(mnt.join("data/opaque/c")).unwrap(),
            "c\n"
        );
        assert!(!mnt.join("data/opaque/.wh..wh..opq").exists());
    });
    // The lower layer did not change.
    env.with_thin(base_thin, |mnt| {
        assert_eq!(
            fs::read_to_string(mnt.join("data/keep.txt")).unwrap(),
            "original\n"
        );
    });

    // The base device and both layers gave their ext4 journal log back to the pool: the
    // log is there to find, and trimming it again frees nothing more.
    let mut client = env.client();
    let mapped = |client: &mut engine::activate::daemon::Client, id: u64| {
        let thins = client.list().unwrap();
        thins.iter().find(|t| t.id == id).unwrap().mapped_blocks
    };
    let base_device = client
        .list()
        .unwrap()
        .iter()
        .find(|t| t.name.as_deref() == Some("thinbox-base"))
        .unwrap()
        .id;
    for id in [base_device, base_thin, v2_thin] {
        let before = mapped(&mut client, id);
        let thin = engine::ThinId::new(id).unwrap();
        let trim = engine::journal::trim_ext4_journal(&mut client, thin).unwrap();
        let engine::journal::JournalTrim::Trimmed { discarded, .. } = trim else {
            panic!("thin {id}: {trim:?}");
        };
        assert!(discarded > 0, "thin {id}");
        assert_eq!(
            mapped(&mut client, id),
            before,
            "thin {id} kept a journal log"
        );
    }
    drop(client);

    // Pulling again changes nothing.
    let out = env.ok(&["pull", &v2]);
    assert!(out.contains("Image is up to date"), "{out}");

    let info_out = env.ok(&["info"]);
    for field in [
        "Storage Driver: devicemapper",
        "Pool Name:",
        "Pool Blocksize: 65.54kB",
        "Base Device Size: 536.9MB",
        "Backing Filesystem: extfs",
        "Data file:",
        "Metadata file:",
        "Data Space Used:",
        "Data Space Total:",
        "Data Space Available:",
        "Metadata Space Used:",
        "Metadata Space Total:",
        "Metadata Space Available:",
        "Thin Pool Minimum Free Space:",
        "Deferred Removal Enabled: true",
    ] {
        assert!(info_out.contains(field), "{field} missing in {info_out}");
    }
    let used_before = env.used_data_blocks();

    // rmi of v2 frees its own layer only; rmi of base frees the shared one.
    let out = env.ok(&["rmi", &v2]);
    assert!(out.contains(&format!("Untagged: {v2}")), "{out}");
    assert_eq!(env.thin_names().len(), 2, "{:?}", env.thin_names());
    assert_eq!(env.ok(&["images", "-q"]).lines().count(), 1);
    env.ok(&["rmi", &base]);
    assert_eq!(env.thin_names(), ["thinbox-base"]);
    assert_eq!(env.ok(&["images", "-q"]), "");
    let used_after = env.used_data_blocks();
    assert!(used_after < used_before, "{used_after} < {used_before}");
    let fails = env.fails(&["inspect", &base]);
    assert!(fails.contains("No such object"), "{fails}");
    let fails = env.fails(&["inspect", "--type", "image", &base]);
    assert!(fails.contains("No such image"), "{fails}");
}

#[test]
fn root_pull_with_basic_auth_needs_login() {
    let env = env_with_images(RegistryAuth::Basic {
        user: "alice".into(),
        password: "s3cret".into(),
    });
    let host = env.registry().host();
    let base = format!("{host}/test/busybox:base");
    let err = env.fails(&["pull", &base]);
    assert!(err.contains("credentials"), "{err}");

    let err = env.fails(&["login", "-u", "alice", "-p", "wrong", &host]);
    assert!(err.contains("login"), "{err}");
    let out = env.ok(&["login", "-u", "alice", "-p", "s3cret", &host]);
    assert!(out.contains("Login Succeeded"), "{out}");
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(env.root.join("auth.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    env.ok(&["pull", &base]);
    assert!(env.ok(&["images"]).contains("base"));

    let out = env.ok(&["logout", &host]);
    assert!(out.contains("Removing login credentials"), "{out}");
    let err = env.fails(&["pull", &format!("{host}/test/busybox:v2")]);
    assert!(err.contains("credentials"), "{err}");
}

#[test]
fn root_pull_refuses_a_blob_with_the_wrong_digest() {
    let env = env_with_images(RegistryAuth::None);
    let host = env.registry().host();
    let base = format!("{host}/test/busybox:base");
    // Find the layer blob through the registry's manifest, then flip a byte in its storage
    // (same size, other content).
    let manifest = run(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{base}"),
    ]));
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let file = env
        .registry()
        .blob_file(layer.strip_prefix("sha256:").unwrap());
    let mut bytes = fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&file, &bytes).unwrap();

    let err = env.fails(&["pull", &base]);
    assert!(err.contains("digest mismatch"), "{err}");
    // Nothing kept: no image, no layer thin, no blob, no partial download.
    assert_eq!(env.ok(&["images", "-q"]), "");
    assert_eq!(env.thin_names(), ["thinbox-base"]);
    let left: Vec<_> = fs::read_dir(env.root.join("blobs/sha256"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let layers = fs::read_to_string(env.root.join("layers.json")).unwrap_or_default();
    assert!(!layers.contains("sha256"), "{layers}");
}
