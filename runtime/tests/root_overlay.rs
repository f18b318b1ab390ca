//! The overlay driver (`--storage-driver overlay`) as root, against the real registry: the
//! same images and verbs as with devicemapper, and images moving between a root of each
//! driver with the same ids and content.

mod common;

use std::fs;

use common::Env;
use fixtures::registry::RegistryAuth;

#[test]
fn root_overlay_driver_pulls_runs_commits_and_agrees_with_devicemapper() {
    let mut env = Env::new(RegistryAuth::None);
    let o = env.add_overlay_root("overlay");
    let host = env.host();
    let base = format!("{host}/test/busybox:base");
    let v2 = format!("{host}/test/busybox:v2");
    let (ov, dm) = (&env.roots[o], &env.roots[0]);

    // Layers with whiteouts and an opaque directory read the same on both drivers.
    for r in [ov, dm] {
        r.ok(&["pull", "-q", &v2]);
    }
    let listing = "cat /data/keep.txt; ls /data /data/opaque";
    let on_overlay = ov.ok(&["run", "--rm", &v2, "sh", "-c", listing]);
    assert_eq!(
        on_overlay,
        dm.ok(&["run", "--rm", &v2, "sh", "-c", listing])
    );
    assert_eq!(
        on_overlay,
        "changed\n/data:\nkeep.txt\nopaque\n\n/data/opaque:\nc\n"
    );
    assert_eq!(ov.id(&v2), dm.id(&v2));

    let info = ov.ok(&["info"]);
    assert!(info.contains("Storage Driver: overlay2"), "{info}");
    let layer_dirs = ov.inspect(&v2)["GraphDriver"].clone();
    assert_eq!(layer_dirs["Name"], "overlay2");
    assert!(
        fs::metadata(layer_dirs["Data"]["UpperDir"].as_str().unwrap()).is_ok(),
        "{layer_dirs}"
    );

    // A container writes to its own upper directory only.
    ov.ok(&["pull", "-q", &base]);
    ov.ok(&[
        "run",
        "--name",
        "builder",
        &base,
        "sh",
        "-c",
        "echo from overlay > /data/new.txt && echo edited > /data/keep.txt && \
         rm /data/delete-me.txt",
    ]);
    assert_eq!(
        ov.ok(&[
            "run",
            "--rm",
            &base,
            "sh",
            "-c",
            "cat /data/keep.txt; ls /data"
        ]),
        "original\ndelete-me.txt\nkeep.txt\nopaque\n",
        "another container sees the image unchanged"
    );
    let diff = ov.ok(&["diff", "builder"]);
    for line in [
        "C /data",
        "A /data/new.txt",
        "C /data/keep.txt",
        "D /data/delete-me.txt",
    ] {
        assert!(diff.lines().any(|l| l == line), "{line} not in:\n{diff}");
    }
    let c = ov.inspect("builder");
    assert_eq!(c["GraphDriver"]["Name"], "overlay2");
    let upper = c["GraphDriver"]["Data"]["UpperDir"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        fs::read_to_string(format!("{upper}/data/new.txt")).unwrap(),
        "from overlay\n"
    );

    // Commit, then the committed image runs here, and in the devicemapper root after a push
    // and a pull: the same id, the same files.
    let hello = format!("{host}/test/overlay-made:v1");
    ov.ok(&[
        "commit",
        "-c",
        r#"CMD ["cat", "/data/new.txt"]"#,
        "builder",
        &hello,
    ]);
    assert_eq!(ov.ok(&["run", "--rm", &hello]), "from overlay\n");
    let check = "cat /data/keep.txt; ls /data";
    let expected = "edited\nkeep.txt\nnew.txt\nopaque\n";
    assert_eq!(ov.ok(&["run", "--rm", &hello, "sh", "-c", check]), expected);
    ov.ok(&["push", &hello]);
    dm.ok(&["pull", "-q", &hello]);
    assert_eq!(dm.id(&hello), ov.id(&hello));
    assert_eq!(dm.ok(&["run", "--rm", &hello, "sh", "-c", check]), expected);

    // A running container commits paused and runs on.
    ov.ok(&[
        "run",
        "-d",
        "--name",
        "live",
        &base,
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /data/.n; mv /data/.n /data/n; sleep 0.02; done",
    ]);
    let first = counter_above(ov, "live", 0);
    ov.ok(&["commit", "live", "live:snap"]);
    let saved: u64 = ov
        .ok(&["run", "--rm", "live:snap", "cat", "/data/n"])
        .trim()
        .parse()
        .unwrap();
    assert!(saved >= first);
    let now = counter_above(ov, "live", 0);
    counter_above(ov, "live", now);
    ov.ok(&["rm", "-f", "live"]);
    ov.ok(&["rmi", "live:snap"]);

    // Removal leaves no directory behind; the other driver cannot take over this root.
    ov.ok(&["rm", "builder"]);
    assert!(!std::path::Path::new(&upper).exists());
    ov.ok(&["rmi", &hello, &base, &v2]);
    let left: Vec<String> = fs::read_dir(ov.root.join("overlay2"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !["l", "empty", "config.json"].contains(&n.as_str()))
        .collect();
    assert!(left.is_empty(), "left in overlay2: {left:?}");
    let out = std::process::Command::new(common::THINBOX)
        .arg("--root")
        .arg(&ov.root)
        .args(["--storage-driver", "devicemapper", "info"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("was created with the overlay2 storage driver"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn root_zstd_layers_pull_on_both_drivers() {
    let mut env = Env::new(RegistryAuth::None);
    let o = env.add_overlay_root("overlay");
    let host = env.host();
    let zstd = format!("{host}/test/zstd:v2");
    let layout = zstd_layout(&env.layout, &env.path("zstd-layout"), "v2");
    fixtures::registry::run(std::process::Command::new("skopeo").args([
        "--insecure-policy",
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &format!("oci:{}:v2", layout.display()),
        &format!("docker://{zstd}"),
    ]));
    let manifest = common::skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{zstd}"),
    ]);
    assert!(manifest.contains("tar+zstd"), "skopeo pushed: {manifest}");
    for r in [&env.roots[o], &env.roots[0]] {
        r.ok(&["pull", "-q", &zstd]);
        assert_eq!(
            r.ok(&[
                "run",
                "--rm",
                &zstd,
                "sh",
                "-c",
                "cat /data/keep.txt; ls /data/opaque"
            ]),
            "changed\nc\n"
        );
    }
    let v2 = format!("{host}/test/busybox:v2");
    env.roots[0].ok(&["pull", "-q", &v2]);
    assert_eq!(
        env.roots[0].inspect(&zstd)["RootFS"],
        env.roots[0].inspect(&v2)["RootFS"],
        "the same diff ids, whatever the compression"
    );
}

/// A copy of OCI layout `from` whose image `tag` has its layers recompressed with zstd
/// (skopeo 1.9 copies blobs as they are; it cannot recompress into a registry).
fn zstd_layout(from: &std::path::Path, to: &std::path::Path, tag: &str) -> std::path::PathBuf {
    use std::io::Read;
    fixtures::registry::run(std::process::Command::new("cp").arg("-a").arg(from).arg(to));
    let blob = |digest: &str| {
        to.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let put = |bytes: &[u8]| -> (String, usize) {
        let hex = common::sha256_hex(bytes);
        fs::write(to.join("blobs/sha256").join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(to.join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(entry["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    for layer in manifest["layers"].as_array_mut().unwrap() {
        let gz = fs::read(blob(layer["digest"].as_str().unwrap())).unwrap();
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_end(&mut tar)
            .unwrap();
        let (digest, size) = put(&zstd::encode_all(tar.as_slice(), 3).unwrap());
        layer["digest"] = digest.into();
        layer["size"] = size.into();
        layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd".into();
    }
    let (digest, size) = put(&serde_json::to_vec(&manifest).unwrap());
    entry["digest"] = digest.into();
    entry["size"] = size.into();
    fs::write(to.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    to.to_path_buf()
}

/// Waits (up to 20 s) until the container's `/data/n` holds a number above `floor`.
fn counter_above(r: &common::Root, name: &str, floor: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, out) = r.status_and_output(&["exec", name, "cat", "/data/n"]);
        if let Ok(n) = out.trim().parse::<u64>() {
            if n > floor {
                return n;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the counter stays at {out:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
