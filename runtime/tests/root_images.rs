//! `thinbox push`, `tag`, `history`, `system df`, `save` and `load` end to end, as root,
//! against real peers on 127.0.0.1: `docker-registry` with no auth, basic auth and bearer
//! tokens (our token server, peers.md §1c), `skopeo` and `umoci` reading what we write
//! and writing what we read. The images are busybox images built from the host's
//! busybox-static (`fixtures::registry::busybox_layout`).
//!
//! Each test has its own temporary directory; every thinbox state directory (`--root`,
//! `THINBOX_RUN_ROOT`) a test uses lives there, and a guard stops their pool daemons,
//! unmounts and detaches what is left and kills the peers, even when the test fails.

mod common;

use std::fs;
use std::process::Command;
use std::time::Instant;

use common::{docker_archive, file, layer_tar, sha256_hex, skopeo, Env};
use fixtures::registry::{run, RegistryAuth};
use tar::EntryType;

fn diff_ids(config: &serde_json::Value) -> Vec<String> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

fn layers_of(info: &serde_json::Value) -> Vec<String> {
    info["RootFS"]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

/// The `sha256:…` after `digest: ` in push output.
fn pushed_digest(out: &str) -> String {
    let line = out
        .lines()
        .find(|l| l.contains(": digest: "))
        .unwrap_or_else(|| panic!("no digest line in {out}"));
    line.split_whitespace().nth(2).unwrap().to_string()
}

#[test]
fn root_push_mounts_skips_uploads_and_pulls_back_by_digest() {
    let mut env = Env::new(RegistryAuth::None);
    let host = env.host();
    let a = &env.roots[0];
    let v2 = format!("{host}/test/busybox:v2");
    let out = a.ok(&["pull", &v2]);
    let pulled_digest = out
        .lines()
        .find_map(|l| l.strip_prefix("Digest: "))
        .unwrap()
        .to_string();

    // tag, history, system df on what was pulled.
    let copy = format!("{host}/test/copy:v2");
    a.ok(&["tag", &v2, &copy]);
    assert_eq!(a.id(&copy), a.id(&v2));
    let history = a.ok(&["history", &copy]);
    let header = history.lines().next().unwrap();
    for col in ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"] {
        assert!(header.contains(col), "{history}");
    }
    assert!(history.contains("<missing>"), "{history}");
    assert!(history.contains("1.98"), "busybox layer size: {history}");
    let df = a.ok(&["system", "df"]);
    assert!(df.starts_with("TYPE"), "{df}");
    for row in [
        "Images          1",
        "Containers",
        "Local Volumes",
        "Build Cache",
    ] {
        assert!(df.contains(row), "{row} in {df}");
    }

    // Every blob test/busybox has is mounted into test/copy, nothing uploaded; the
    // manifest is the pulled one, byte for byte.
    let t = Instant::now();
    let out = a.ok(&["push", &copy]);
    eprintln!("push by mount: {:?}", t.elapsed());
    assert!(
        out.starts_with(&format!("The push refers to repository [{host}/test/copy]")),
        "{out}"
    );
    assert_eq!(
        out.matches(": Mounted from test/busybox").count(),
        2,
        "{out}"
    );
    assert_eq!(pushed_digest(&out), pulled_digest, "{out}");
    assert!(out.contains("v2: digest: sha256:"), "{out}");
    // Pushing again: every layer is there.
    let out = a.ok(&["push", &copy]);
    assert_eq!(out.matches(": Layer already exists").count(), 2, "{out}");

    // A second registry knows nothing: every layer uploaded, in chunks (PATCH) for the
    // big one when the chunk size is small.
    let second = env.start_registry(RegistryAuth::None);
    let host2 = env.registries[second].host();
    let a = &env.roots[0];
    let far = format!("{host2}/test/far:v2");
    a.ok(&["tag", &v2, &far]);
    let mut command = a.command(&["push", &far]);
    command.env("THINBOX_PUSH_CHUNK_SIZE", "262144");
    let t = Instant::now();
    let out = a.check(&["push", &far], a.output(command, None));
    eprintln!("push by upload (chunked, 1 MB + 10 KB): {:?}", t.elapsed());
    assert_eq!(out.matches(": Pushed").count(), 2, "{out}");
    assert_eq!(pushed_digest(&out), pulled_digest);

    // Pulled back by digest into a fresh root: the same image.
    let b = &env.roots[1];
    let by_digest = format!("{host2}/test/far@{pulled_digest}");
    let out = b.ok(&["pull", &by_digest]);
    assert!(out.contains(&format!("Digest: {pulled_digest}")), "{out}");
    assert_eq!(b.id(&by_digest), env.roots[0].id(&v2));
    let copy_back = format!("{host}/test/copy@{pulled_digest}");
    b.ok(&["pull", &copy_back]);
    assert_eq!(b.ok(&["images", "-q"]).lines().count(), 1);
}

#[test]
fn root_push_with_basic_auth_needs_login_and_never_shows_the_password() {
    let env = Env::new(RegistryAuth::Basic {
        user: "alice".into(),
        password: "s3cret".into(),
    });
    let host = env.host();
    let a = &env.roots[0];
    a.ok(&["login", "-u", "alice", "-p", "s3cret", &host]);
    a.ok(&["pull", &format!("{host}/test/busybox:base")]);
    let target = format!("{host}/test/pushed:base");
    a.ok(&["tag", &format!("{host}/test/busybox:base"), &target]);
    let (code, out) = a.status_and_output(&["-vv", "push", &target]);
    let ok = code == Some(0);
    assert!(ok, "{out}");
    assert!(out.contains("Mounted from test/busybox"), "{out}");
    assert!(
        !out.contains("s3cret") && !out.contains("YWxpY2U6czNjcmV0"),
        "{out}"
    );

    a.ok(&["logout", &host]);
    let err = a.fails(&["push", &target]);
    assert!(err.contains("credentials"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn root_push_and_pull_with_token_auth() {
    let env = Env::new(RegistryAuth::Token {
        user: "alice".into(),
        password: "s3cret".into(),
    });
    let host = env.host();
    let a = &env.roots[0];
    // Anonymous tokens can pull.
    let base = format!("{host}/test/busybox:base");
    a.ok(&["pull", &base]);
    let requests = env.registry().token_requests();
    assert!(
        requests.contains("user=- scopes=repository:test/busybox:pull"),
        "{requests}"
    );
    // ... and not push.
    let target = format!("{host}/test/pushed:base");
    a.ok(&["tag", &base, &target]);
    let (code, out) = a.status_and_output(&["push", &target]);
    let ok = code == Some(0);
    assert!(!ok, "{out}");
    assert!(
        out.contains("denied") || out.contains("credentials"),
        "{out}"
    );

    a.ok(&["login", "-u", "alice", "-p", "s3cret", &host]);
    let (code, out) = a.status_and_output(&["-vvv", "push", &target]);
    let ok = code == Some(0);
    assert!(ok, "{out}");
    // Neither the password nor a token (a JWT: "eyJ…") shows, even at trace level.
    assert!(!out.contains("s3cret") && !out.contains("eyJ"), "{out}");
    assert!(out.contains("Mounted from test/busybox"), "{out}");
    let requests = env.registry().token_requests();
    // The mount asked for push here and pull on the source repository in one token (the
    // registry names the scopes, and the actions within one, in no fixed order).
    assert!(
        requests.lines().any(|l| l.contains("user=alice")
            && (l.contains("repository:test/pushed:pull,push")
                || l.contains("repository:test/pushed:push,pull"))
            && l.contains("repository:test/busybox:pull")),
        "{requests}"
    );
    // Pulled back into a fresh root with a token for alice.
    let b = &env.roots[1];
    b.ok(&["login", "-u", "alice", "-p", "s3cret", &host]);
    b.ok(&["pull", &target]);
    assert_eq!(b.id(&target), a.id(&base));
}

#[test]
fn root_save_is_read_by_skopeo_and_loads_back_with_the_same_ids() {
    let env = Env::new(RegistryAuth::None);
    let host = env.host();
    let (a, b) = (&env.roots[0], &env.roots[1]);
    let v2 = format!("{host}/test/busybox:v2");
    a.ok(&["pull", &v2]);
    let info = a.inspect(&v2);
    let pulled_digest = info["RepoDigests"][0]
        .as_str()
        .unwrap()
        .split('@')
        .nth(1)
        .unwrap()
        .to_string();

    let tar = env.path("v2.tar");
    let tar_s = tar.to_str().unwrap();
    let t = Instant::now();
    a.ok(&["save", "-o", tar_s, &v2]);
    eprintln!(
        "save: {:?}, {} bytes",
        t.elapsed(),
        fs::metadata(&tar).unwrap().len()
    );

    // skopeo reads it as a Docker archive and as an OCI archive; the OCI part is the
    // pulled image to the byte (same manifest digest, same layer digests).
    let inspected: serde_json::Value =
        serde_json::from_str(&skopeo(&["inspect", &format!("docker-archive:{tar_s}")])).unwrap();
    // (skopeo shows no RepoTags for archives; the layers it lists are the diff ids.)
    let archive_layers: Vec<String> = inspected["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    assert_eq!(archive_layers, layers_of(&info), "{inspected}");
    let oci: serde_json::Value =
        serde_json::from_str(&skopeo(&["inspect", &format!("oci-archive:{tar_s}")])).unwrap();
    assert_eq!(oci["Digest"], pulled_digest.as_str());
    let registry_manifest = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{v2}"),
    ]);
    let registry_manifest: serde_json::Value = serde_json::from_str(&registry_manifest).unwrap();
    let registry_layers: Vec<&str> = registry_manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    let saved_layers: Vec<&str> = oci["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(saved_layers, registry_layers);

    // skopeo copies it into an OCI layout with the same diff ids.
    let oci_dir = env.path("from-save");
    skopeo(&[
        "--insecure-policy",
        "copy",
        "-q",
        &format!("docker-archive:{tar_s}"),
        &format!("oci:{}:v2", oci_dir.display()),
    ]);
    let config: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--config",
        &format!("oci:{}:v2", oci_dir.display()),
    ]))
    .unwrap();
    assert_eq!(diff_ids(&config), layers_of(&info));

    // Loaded on a fresh root: the same image id; saving it again gives the same archive.
    let t = Instant::now();
    let out = b.ok(&["load", "-i", tar_s]);
    eprintln!("load on a fresh root (creates the pool): {:?}", t.elapsed());
    assert_eq!(out.trim(), format!("Loaded image: {v2}"));
    assert_eq!(b.id(&v2), info["Id"].as_str().unwrap());
    assert_eq!(layers_of(&b.inspect(&v2)), layers_of(&info));
    let again = env.path("again.tar");
    b.ok(&["save", "-o", again.to_str().unwrap(), &v2]);
    assert_eq!(fs::read(&again).unwrap(), fs::read(&tar).unwrap());

    // Without -o the archive goes to stdout, the same bytes.
    let out = a.output(a.command(&["save", &v2]), None);
    assert!(out.status.success());
    assert_eq!(out.stdout, fs::read(&tar).unwrap());

    // .gz: gzip output, loaded from stdin on a third root.
    let gz = env.path("v2.tar.gz");
    a.ok(&["save", "-o", gz.to_str().unwrap(), &v2]);
    let bytes = fs::read(&gz).unwrap();
    assert_eq!(&bytes[..2], &[0x1f, 0x8b]);
    let c = &env.roots[2];
    let out = c.check(&["load"], c.output(c.command(&["load"]), Some(&bytes)));
    assert!(out.contains(&format!("Loaded image: {v2}")), "{out}");
    assert_eq!(c.id(&v2), info["Id"].as_str().unwrap());
    // Two images in one archive: the shared layer once; both load.
    let base = format!("{host}/test/busybox:base");
    a.ok(&["pull", &base]);
    let both = env.path("both.tar");
    a.ok(&["save", "-o", both.to_str().unwrap(), &base, &v2]);
    let listing = run(Command::new("tar").arg("tf").arg(&both));
    let blobs = listing
        .lines()
        .filter(|l| l.starts_with("blobs/sha256/") && l.len() > 14);
    // base: layer, config, manifest; v2: one more layer, its config and manifest.
    assert_eq!(blobs.count(), 6, "{listing}");
    let out = c.ok(&["load", "-i", both.to_str().unwrap()]);
    assert!(out.contains(&format!("Loaded image: {base}")), "{out}");
    assert_eq!(c.id(&base), a.id(&base));

    // Saving by id names no image.
    let by_id = env.path("by-id.tar");
    a.ok(&[
        "save",
        "-o",
        by_id.to_str().unwrap(),
        &info["Id"].as_str().unwrap()[7..19],
    ]);
    let out = c.ok(&["load", "-i", by_id.to_str().unwrap()]);
    assert_eq!(
        out.trim(),
        format!("Loaded image ID: {}", info["Id"].as_str().unwrap())
    );
}

#[test]
fn root_load_reads_skopeo_archives_and_oci_layouts() {
    let env = Env::new(RegistryAuth::None);
    let host = env.host();
    let a = &env.roots[0];

    // skopeo's Docker archive (the layout before Docker 25: layers named by diff id, legacy
    // directories with symbolic links).
    let archive = env.path("skopeo-docker.tar");
    let name = format!("{host}/test/archived:v2");
    skopeo(&[
        "--insecure-policy",
        "copy",
        "-q",
        "--src-tls-verify=false",
        &format!("docker://{host}/test/busybox:v2"),
        &format!("docker-archive:{}:{name}", archive.display()),
    ]);
    let t = Instant::now();
    let out = a.ok(&["load", "-i", archive.to_str().unwrap()]);
    eprintln!(
        "load of skopeo's docker-archive (creates the pool): {:?}",
        t.elapsed()
    );
    assert_eq!(out.trim(), format!("Loaded image: {name}"));
    let config: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--config",
        "--tls-verify=false",
        &format!("docker://{host}/test/busybox:v2"),
    ]))
    .unwrap();
    assert_eq!(layers_of(&a.inspect(&name)), diff_ids(&config));

    // Pushed from there (layers as the archive had them, uncompressed; a manifest made for
    // them) and pulled back by digest elsewhere: the same image.
    let out = a.ok(&["push", &name]);
    assert_eq!(out.matches(": Pushed").count(), 2, "{out}");
    let digest = pushed_digest(&out);
    let b = &env.roots[1];
    let back = format!("{host}/test/archived@{digest}");
    b.ok(&["pull", &back]);
    assert_eq!(b.id(&back), a.id(&name));

    // umoci's OCI layout directory: two images, tagged only by bare ref names.
    let out = a.ok(&["load", "-i", env.layout.to_str().unwrap()]);
    assert_eq!(out.matches("Loaded image ID: sha256:").count(), 2, "{out}");

    // skopeo's OCI archive with a full name as its ref.
    let oci = env.path("skopeo-oci.tar");
    let oci_name = format!("{host}/test/ociarchive:v1");
    skopeo(&[
        "--insecure-policy",
        "copy",
        "-q",
        &format!("oci:{}:base", env.layout.display()),
        &format!("oci-archive:{}:{oci_name}", oci.display()),
    ]);
    let out = a.ok(&["load", "-i", oci.to_str().unwrap()]);
    assert_eq!(out.trim(), format!("Loaded image: {oci_name}"));
    let images = a.ok(&["images", "-q"]);
    assert_eq!(images.lines().count(), 2, "{images}");
}

#[test]
fn root_load_refuses_a_tampered_archive_and_keeps_nothing() {
    let env = Env::new(RegistryAuth::None);
    let host = env.host();
    let (a, b) = (&env.roots[0], &env.roots[1]);
    let v2 = format!("{host}/test/busybox:v2");
    a.ok(&["pull", &v2]);
    let tar = env.path("v2.tar");
    a.ok(&["save", "-o", tar.to_str().unwrap(), &v2]);

    // One byte flipped inside the big layer (the first gzip stream).
    let mut bytes = fs::read(&tar).unwrap();
    let start = bytes.windows(2).position(|w| w == [0x1f, 0x8b]).unwrap();
    bytes[start + 400_000] ^= 0x01;
    let bad = env.path("bad.tar");
    fs::write(&bad, &bytes).unwrap();
    let err = b.fails(&["load", "-i", bad.to_str().unwrap()]);
    assert!(err.contains("refused"), "{err}");
    assert_eq!(b.ok(&["images", "-q"]), "");
    assert!(b.blobs().is_empty(), "{:?}", b.blobs());
    let layers = fs::read_to_string(b.root.join("layers.json")).unwrap_or_default();
    assert!(!layers.contains("sha256"), "{layers}");

    // The same with skopeo's uncompressed layout: caught by the diff id.
    let archive = env.path("skopeo.tar");
    skopeo(&[
        "--insecure-policy",
        "copy",
        "-q",
        "--src-tls-verify=false",
        &format!("docker://{v2}"),
        &format!("docker-archive:{}:{v2}", archive.display()),
    ]);
    let mut bytes = fs::read(&archive).unwrap();
    let at = bytes
        .windows(7)
        .position(|w| w == b"busybox")
        .expect("busybox in the layer");
    bytes[at + 100_000] ^= 0x01;
    fs::write(&bad, &bytes).unwrap();
    let err = b.fails(&["load", "-i", bad.to_str().unwrap()]);
    assert!(err.contains("digest mismatch"), "{err}");
    assert_eq!(b.ok(&["images", "-q"]), "");
    assert!(b.blobs().is_empty(), "{:?}", b.blobs());
}

#[test]
fn root_pull_picks_linux_amd64_from_an_index_and_by_digest() {
    let env = Env::new(RegistryAuth::None);
    let host = env.host();
    let a = &env.roots[0];
    let l = env.layout.display().to_string();
    // An arm64 variant of base (another config), both pushed, then an index over them,
    // arm64 first.
    run(Command::new("umoci").args([
        "config",
        "--image",
        &format!("{l}:base"),
        "--tag",
        "arm",
        "--architecture",
        "arm64",
    ]));
    env.registry()
        .push(&format!("oci:{l}:arm"), "test/multi:arm64");
    env.registry()
        .push(&format!("oci:{l}:base"), "test/multi:amd64");
    let descriptor = |tag: &str, arch: &str| {
        let raw = skopeo(&[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{host}/test/multi:{tag}"),
        ]);
        let digest = format!("sha256:{}", sha256_hex(raw.as_bytes()));
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": raw.len(),
            "platform": {"architecture": arch, "os": "linux"},
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [descriptor("arm64", "arm64"), descriptor("amd64", "amd64")],
    });
    env.registry().put_manifest(
        "test/multi",
        "latest",
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
    let amd64_digest = index["manifests"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    let multi = format!("{host}/test/multi:latest");
    let out = a.ok(&["pull", &multi]);
    // Docker's repo digest of a multi-arch image is the index's.
    let index_digest = format!(
        "sha256:{}",
        sha256_hex(
            skopeo(&[
                "inspect",
                "--raw",
                "--tls-verify=false",
                &format!("docker://{multi}")
            ])
            .as_bytes()
        )
    );
    assert!(out.contains(&format!("Digest: {index_digest}")), "{out}");
    let info = a.inspect(&multi);
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(
        info["RepoDigests"][0],
        format!("{host}/test/multi@{index_digest}")
    );
    let by_index = format!("{host}/test/multi@{index_digest}");
    let out = a.ok(&["pull", &by_index]);
    assert!(out.contains("Already exists"), "{out}");
    assert_eq!(a.id(&by_index), info["Id"].as_str().unwrap());

    // By digest: the amd64 manifest itself, and the same image.
    let by_digest = format!("{host}/test/busybox@{amd64_digest}");
    a.ok(&["pull", &by_digest]);
    assert_eq!(a.id(&by_digest), info["Id"].as_str().unwrap());
    // A digest the registry does not have is refused.
    let missing = format!("{host}/test/busybox@sha256:{}", "0".repeat(64));
    a.fails(&["pull", &missing]);
}

#[test]
fn root_load_of_a_layer_that_fails_to_apply_keeps_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::Root {
        root: dir.path().join("root"),
        run_root: dir.path().join("run"),
        overlay: false,
        storage_opts: Vec::new(),
    };
    struct Guard<'r>(&'r common::Root);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            self.0.cleanup();
        }
    }
    let _guard = Guard(&root);
    // Layer 1 a plain file; layer 2 a symlink to a directory outside, then a file through
    // it. The digests are right: only applying the second layer can refuse it.
    let d = dir.path();
    let outside = d.join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::create_dir_all(d.join("l1/data")).unwrap();
    fs::write(d.join("l1/data/ok.txt"), "ok\n").unwrap();
    fs::create_dir_all(d.join("l2a")).unwrap();
    std::os::unix::fs::symlink(&outside, d.join("l2a/evil")).unwrap();
    fs::create_dir_all(d.join("l2b/evil")).unwrap();
    fs::write(d.join("l2b/evil/x"), "escaped\n").unwrap();
    let archive = d.join("archive");
    fs::create_dir_all(&archive).unwrap();
    let tar = |args: &[&str]| run(Command::new("tar").current_dir(d).args(args));
    tar(&[
        "--owner=0",
        "--group=0",
        "-cf",
        "archive/l1.tar",
        "-C",
        "l1",
        "data",
    ]);
    tar(&[
        "--owner=0",
        "--group=0",
        "-cf",
        "archive/l2.tar",
        "-C",
        "l2a",
        "evil",
    ]);
    tar(&[
        "--owner=0",
        "--group=0",
        "-rf",
        "archive/l2.tar",
        "-C",
        "l2b",
        "evil/x",
    ]);
    let diff = |name: &str| {
        format!(
            "sha256:{}",
            sha256_hex(&fs::read(archive.join(name)).unwrap())
        )
    };
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff("l1.tar"), diff("l2.tar")]},
    });
    fs::write(
        archive.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": ["hostile/image:v1"],
        "Layers": ["l1.tar", "l2.tar"],
    }]);
    fs::write(
        archive.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    tar(&[
        "-cf",
        "hostile.tar",
        "-C",
        "archive",
        "config.json",
        "manifest.json",
        "l1.tar",
        "l2.tar",
    ]);

    // The link resolves inside the layer's root (as in Docker's chroot), where its target
    // does not exist: the entry through it is refused, naming it.
    let err = root.fails(&["load", "-i", d.join("hostile.tar").to_str().unwrap()]);
    assert!(err.contains("/evil/x"), "{err}");
    assert!(
        !outside.join("x").exists(),
        "a file was written through the link"
    );
    assert_eq!(root.ok(&["images", "-q"]), "");
    assert!(root.blobs().is_empty(), "{:?}", root.blobs());
    let layers = fs::read_to_string(root.root.join("layers.json")).unwrap_or_default();
    assert!(
        !layers.contains("sha256"),
        "the first layer went too: {layers}"
    );
}

#[test]
fn root_a_load_that_fails_on_any_image_keeps_none() {
    let root = common::LoneRoot::new(false);
    let shared = layer_tar(&[file("shared.txt", b"shared\n")]);
    let archive = root.path("kept.tar");
    fs::write(
        &archive,
        docker_archive(&[(&["kept/img:v1"], vec![shared.clone()])]),
    )
    .unwrap();
    root.ok(&["load", "-i", archive.to_str().unwrap()]);
    let before = root.state();

    // The first image is complete (a layer the store has, one it has not); the second's
    // last layer climbs out, which only applying it finds (every digest is right).
    let first = layer_tar(&[file("first.txt", b"first\n")]);
    let second = layer_tar(&[file("second.txt", b"second\n")]);
    let bad = layer_tar(&[file("ok.txt", b"x\n"), file("../../escape.txt", b"evil\n")]);
    fs::write(
        &archive,
        docker_archive(&[
            (&["first/img:v1"], vec![shared.clone(), first]),
            (&["second/img:v1"], vec![second, bad]),
        ]),
    )
    .unwrap();
    let err = root.fails(&["load", "-i", archive.to_str().unwrap()]);
    assert!(err.contains("escape.txt"), "{err}");
    assert_eq!(root.state(), before);
    assert_eq!(
        root.ok(&["images", "--format", "{{.Repository}}"]),
        "kept/img\n"
    );

    // An archive posing as a pinned image (a digest as its name) is refused whole.
    let pinned = format!("127.0.0.1:5000/test/busybox@sha256:{}", "d".repeat(64));
    let tagged = format!("x/y:v1@sha256:{}", "d".repeat(64));
    for name in [&pinned, &tagged] {
        let layer = layer_tar(&[file("pwned", b"attacker content\n")]);
        fs::write(&archive, docker_archive(&[(&[name.as_str()], vec![layer])])).unwrap();
        let err = root.fails(&["load", "-i", archive.to_str().unwrap()]);
        assert!(
            err.contains("refusing to create a tag with a digest reference"),
            "{err}"
        );
        assert_eq!(root.state(), before);
    }
}

/// Whether `nobody` (uid and gid 65534, no supplementary groups) can run `args`.
fn as_nobody(args: &[&str]) -> bool {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn root_layer_files_are_out_of_reach_of_other_users() {
    use std::os::unix::fs::PermissionsExt;

    for overlay in [true, false] {
        let root = common::LoneRoot::new(overlay);
        // The temporary directory is 0700: opened, only the state directory's own modes
        // stand between another user and the layers.
        fs::set_permissions(root.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let layer = layer_tar(&[
            ("suidcat", EntryType::Regular, 0o4755, b"#!/bin/sh\n"),
            ("devnode", EntryType::Char, 0o666, b""),
        ]);
        let archive = root.path("suid.tar");
        fs::write(&archive, docker_archive(&[(&["suid/img:v1"], vec![layer])])).unwrap();
        let archive = archive.to_str().unwrap();
        root.ok(&["load", "-i", archive]);

        let state = |name: &str| root.root.join(name).to_str().unwrap().to_string();
        let mode = |path: &str| fs::metadata(path).unwrap().permissions().mode() & 0o7777;
        // With overlay the layer's files themselves; with devicemapper the pool's data, which
        // holds them (layers are mounted only while applied, in `mnt`, as container roots are).
        let (driver_dir, secrets) = if overlay {
            let diff = fs::read_dir(root.root.join("overlay2"))
                .unwrap()
                .flatten()
                .map(|e| e.path().join("diff"))
                .find(|d| d.join("suidcat").exists())
                .expect("the layer's directory");
            let file = |name: &str| diff.join(name).to_str().unwrap().to_string();
            assert_eq!(mode(&file("suidcat")), 0o4755, "the image's mode is kept");
            ("overlay2", vec![file("suidcat"), file("devnode")])
        } else {
            ("devicemapper", vec![state("devicemapper/data")])
        };
        let dirs = [driver_dir, "mnt", "blobs", "containers", "tmp"];
        let out_of_reach = || {
            // The control: nobody reaches a file beside the state directory, and passes
            // through the state directory itself, without listing it.
            assert!(as_nobody(&["stat", archive]));
            assert!(as_nobody(&["stat", &state("lock")]));
            assert!(!as_nobody(&["ls", &state("")]));
            for file in &secrets {
                assert!(!as_nobody(&["stat", file]), "nobody reaches {file}");
            }
            for dir in dirs {
                assert!(!as_nobody(&["ls", &state(dir)]), "nobody lists {dir}");
                assert_eq!(mode(&state(dir)), 0o700, "{dir}");
            }
            assert_eq!(mode(&state("")), 0o711);
        };
        out_of_reach();

        // A root an older thinbox made 0755 throughout is restricted by the next command.
        for dir in [""].into_iter().chain(dirs) {
            fs::set_permissions(state(dir), fs::Permissions::from_mode(0o755)).unwrap();
        }
        assert!(
            as_nobody(&["stat", &secrets[0]]),
            "the control: 0755 lets nobody in"
        );
        root.ok(&["tag", "suid/img:v1", "suid/img:v2"]);
        out_of_reach();
    }
}

/// Layer records by state: `(ready, preparing)` chain ids.
fn layer_states(root: &common::Root) -> (Vec<String>, Vec<String>) {
    let text = fs::read_to_string(root.root.join("layers.json")).unwrap_or_default();
    let layers: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).unwrap_or_default();
    let (mut ready, mut preparing) = (Vec::new(), Vec::new());
    for (chain_id, record) in layers {
        match record["state"].as_str() {
            Some("Ready") => ready.push(chain_id),
            _ => preparing.push(chain_id),
        }
    }
    (ready, preparing)
}

#[test]
fn root_prune_removes_stopped_containers_unused_images_and_what_a_killed_load_left() {
    let root = common::LoneRoot::new(false);
    let archive = root.path("images.tar");
    let load = |images: &[(&[&str], Vec<Vec<u8>>)]| {
        fs::write(&archive, docker_archive(images)).unwrap();
        root.ok(&["load", "-i", archive.to_str().unwrap()]);
    };
    let base = layer_tar(&[file("base.txt", b"base\n")]);
    load(&[(&["keep/img:v1"], vec![base.clone()])]);
    // Loading another image under the same name leaves the first one dangling.
    load(&[(
        &["old/img:v1"],
        vec![base.clone(), layer_tar(&[file("old.txt", b"1\n")])],
    )]);
    load(&[(
        &["old/img:v1"],
        vec![base.clone(), layer_tar(&[file("old.txt", b"2\n")])],
    )]);
    let container = root.ok(&["create", "keep/img:v1", "/bin/sh"]);
    let container = container.trim();

    // A load killed part way: its first layer applied, its second (192 MiB) on the way.
    let (ready_before, _) = layer_states(&root);
    let mut big = vec![0u8; 192 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let killed = docker_archive(&[(
        &["killed/img:v1"],
        vec![
            layer_tar(&[file("first.txt", b"first\n")]),
            layer_tar(&[file("big.bin", &big)]),
        ],
    )]);
    drop(big);
    fs::write(&archive, killed).unwrap();
    let mut child = root
        .command(&["load", "-i", archive.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while layer_states(&root).0.len() <= ready_before.len() {
        assert!(child.try_wait().unwrap().is_none(), "load ended early");
        assert!(std::time::Instant::now() < deadline, "no layer was applied");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let images = root.ok(&["image", "ls", "--format", "{{.Repository}}"]);
    assert!(
        !images.contains("killed"),
        "the load finished before it was killed: {images}"
    );
    let (ready, _) = layer_states(&root);
    assert_eq!(ready.len(), ready_before.len() + 1, "{ready:?}");
    // Its extracted archive stays behind too.
    assert!(fs::read_dir(root.root.join("tmp"))
        .unwrap()
        .next()
        .is_some());
    let df = root.ok(&["system", "df", "--format", "{{.Type}} {{.Reclaimable}}"]);
    assert!(
        df.lines()
            .any(|l| l.starts_with("Images ") && !l.contains(" 0B")),
        "{df}"
    );

    // Without -f nothing happens unless the answer is yes.
    let before = root.state();
    let out = root.with_input(&["system", "prune"], b"n\n");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("WARNING! This will remove:"), "{text}");
    assert!(
        text.contains("Are you sure you want to continue? [y/N]"),
        "{text}"
    );
    assert_eq!(root.state(), before);

    let out = root.ok(&["container", "prune", "-f"]);
    assert!(
        out.contains(&format!("Deleted Containers:\n{container}\n")),
        "{out}"
    );
    assert!(root.ok(&["ps", "-aq"]).is_empty());

    let used = root.used_data_blocks();
    let out = root.ok(&["system", "prune", "-f"]);
    assert!(out.contains("Deleted Images:"), "{out}");
    assert!(!out.contains("untagged"), "a named image went: {out}");
    assert!(!out.contains("Total reclaimed space: 0B"), "{out}");
    let mut names: Vec<String> = root
        .ok(&["images", "--format", "{{.Repository}}"])
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    assert_eq!(names, ["keep/img", "old/img"]);
    assert!(root.used_data_blocks() < used);
    let (ready, preparing) = layer_states(&root);
    assert!(preparing.is_empty(), "{preparing:?}");
    // keep's one layer, and old's two.
    assert_eq!(ready.len(), 2, "{ready:?}");
    assert!(!root.thin_names().iter().any(|n| n.contains("killed")));
    assert!(fs::read_dir(root.root.join("tmp"))
        .unwrap()
        .next()
        .is_none());
    assert!(
        !root.blobs().iter().any(|b| b.ends_with(".partial")),
        "{:?}",
        root.blobs()
    );

    // -a takes every image without a container, names and all.
    let out = root.ok(&["image", "prune", "-af"]);
    assert!(out.contains("untagged: keep/img:v1"), "{out}");
    assert!(out.contains("untagged: old/img:v1"), "{out}");
    assert_eq!(root.ok(&["images", "-q"]), "");
    assert_eq!(layer_states(&root), (Vec::new(), Vec::new()));
    assert!(root.blobs().is_empty(), "{:?}", root.blobs());
    let out = root.ok(&["system", "prune", "-af"]);
    assert_eq!(out, "Total reclaimed space: 0B\n");
}

#[test]
fn root_prune_on_overlay_measures_what_it_frees() {
    let root = common::LoneRoot::new(true);
    let archive = root.path("images.tar");
    for content in [&b"1\n"[..], &[b'x'; 1 << 20]] {
        let layer = layer_tar(&[file("data", content)]);
        fs::write(&archive, docker_archive(&[(&["a/img:v1"], vec![layer])])).unwrap();
        root.ok(&["load", "-i", archive.to_str().unwrap()]);
    }
    let out = root.ok(&["image", "prune", "-f"]);
    assert!(
        out.starts_with("Deleted Images:\ndeleted: sha256:"),
        "{out}"
    );
    assert!(!out.contains("Total reclaimed space: 0B"), "{out}");
    let out = root.ok(&["image", "prune", "-af"]);
    assert!(out.contains("untagged: a/img:v1"), "{out}");
    // The 1 MiB file, its blob and the layer's directories.
    let reclaimed = out.lines().last().unwrap();
    assert!(reclaimed.ends_with("MB"), "{out}");
    // The driver's own files stay; no layer directory does.
    let mut left: Vec<String> = fs::read_dir(root.root.join("overlay2"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["config.json", "empty", "l"]);
}
