//! `commit` and the walkthrough end to end, as root, against real peers on 127.0.0.1: pull
//! from `docker-registry`, run a container that installs, changes and deletes files, commit
//! it with `-c 'CMD [...]'`, inspect, tag, push, remove everything, pull back, run the new
//! default command, save, load on a fresh root and run again; `skopeo` reads what we push
//! and save. Then commits of a running container, paused (the cgroup freezer) and not.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{skopeo, Env};
use fixtures::registry::RegistryAuth;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn root_walkthrough_pull_run_commit_push_pull_save_load() {
    let env = Env::new(RegistryAuth::None);
    let (a, b) = (&env.roots[0], &env.roots[1]);
    let host = env.host();
    let base = format!("{host}/test/busybox:base");
    let hello = format!("{host}/test/hello:v1");
    a.ok(&["pull", "-q", &base]);

    // A container that installs a file, changes one and deletes one.
    a.ok(&[
        "run",
        "--name",
        "builder",
        "-e",
        "GREETING=hi",
        &base,
        "sh",
        "-c",
        "mkdir -p /opt/app && echo hello from thinbox > /opt/app/hello && \
         echo edited > /data/keep.txt && rm /data/delete-me.txt",
    ]);
    let c = a.inspect("builder");
    assert_eq!(c["Name"], "/builder");
    assert_eq!(c["State"]["Status"], "exited");
    assert_eq!(c["State"]["ExitCode"], 0);
    assert_eq!(c["Path"], "sh");
    assert_eq!(c["Config"]["Image"], base.as_str());
    assert!(
        c["Config"]["Env"].to_string().contains("GREETING=hi"),
        "{c}"
    );
    assert_eq!(c["GraphDriver"]["Name"], "devicemapper");
    assert_eq!(
        a.ok(&["inspect", "--type", "image", "--format", "{{.Id}}", &base])
            .trim(),
        a.id(&base)
    );
    let diff = a.ok(&["diff", "builder"]);
    for line in [
        "A /opt",
        "A /opt/app",
        "A /opt/app/hello",
        "C /data/keep.txt",
        "D /data/delete-me.txt",
    ] {
        assert!(
            diff.lines().any(|l| l == line),
            "{line} not in diff:\n{diff}"
        );
    }

    // A bad change is refused before anything is made.
    let layers_before = fs::read_to_string(a.root.join("layers.json")).unwrap();
    let err = a.fails(&["commit", "-c", "RUN rm -rf /", "builder", &hello]);
    assert!(err.contains("not a valid change command"), "{err}");
    assert_eq!(
        fs::read_to_string(a.root.join("layers.json")).unwrap(),
        layers_before
    );

    let out = a.ok(&[
        "commit",
        "-a",
        "Jane <jane@example.com>",
        "-m",
        "add hello",
        "-c",
        r#"CMD ["cat", "/opt/app/hello"]"#,
        "-c",
        "ENV STAGE=committed",
        "-c",
        "LABEL org.example.kind=demo",
        "builder",
        &hello,
    ]);
    let id = out.trim().to_string();
    assert!(id.starts_with("sha256:") && id.len() == 71, "{out}");

    let info = a.inspect(&hello);
    assert_eq!(info["Id"], id.as_str());
    assert_eq!(
        info["Config"]["Cmd"],
        serde_json::json!(["cat", "/opt/app/hello"])
    );
    let env_list = info["Config"]["Env"].to_string();
    for var in ["PATH=/bin", "GREETING=hi", "STAGE=committed"] {
        assert!(env_list.contains(var), "{var} not in {env_list}");
    }
    assert_eq!(info["Config"]["Labels"]["org.example.kind"], "demo");
    assert_eq!(info["Author"], "Jane <jane@example.com>");
    assert_eq!(info["Comment"], "add hello");
    assert_eq!(info["RootFS"]["Layers"].as_array().unwrap().len(), 2);
    assert_eq!(info["GraphDriver"]["Name"], "devicemapper");
    let base_info = a.inspect(&base);
    assert_ne!(
        info["GraphDriver"]["Data"]["DeviceId"],
        base_info["GraphDriver"]["Data"]["DeviceId"]
    );
    let history = a.ok(&["history", "--no-trunc", &hello]);
    assert!(history.contains("add hello"), "{history}");

    // The new default command, and the changes, in a new container.
    assert_eq!(a.ok(&["run", "--rm", &hello]), "hello from thinbox\n");
    assert_eq!(
        a.ok(&[
            "run",
            "--rm",
            &hello,
            "sh",
            "-c",
            "cat /data/keep.txt; ls /data"
        ]),
        "edited\nkeep.txt\nopaque\n"
    );

    a.ok(&["tag", &hello, &format!("{host}/test/hello:latest")]);
    a.ok(&["push", &hello]);
    let pushed = json(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--config",
        &format!("docker://{hello}"),
    ]));
    assert_eq!(pushed["config"]["Cmd"], info["Config"]["Cmd"]);
    assert_eq!(
        pushed["rootfs"]["diff_ids"],
        serde_json::json!(info["RootFS"]["Layers"])
    );

    // Everything local goes; the image comes back from the registry.
    a.ok(&["rm", "builder"]);
    a.ok(&["rmi", &hello, &format!("{host}/test/hello:latest"), &base]);
    assert_eq!(a.ok(&["images", "-q"]), "");
    a.ok(&["pull", "-q", &hello]);
    assert_eq!(a.id(&hello), id, "the pulled config is the committed one");
    assert_eq!(a.ok(&["run", "--rm", &hello]), "hello from thinbox\n");
    assert_eq!(
        a.ok(&["run", "--rm", &hello, "ls", "/data"]),
        "keep.txt\nopaque\n",
        "the whiteout came through the registry"
    );

    // Save, load on a fresh root, run again; skopeo reads the archive too.
    let archive = env.path("hello.tar");
    a.ok(&["save", "-o", archive.to_str().unwrap(), &hello]);
    let from_archive = json(&skopeo(&[
        "inspect",
        "--config",
        &format!("docker-archive:{}", archive.display()),
    ]));
    assert_eq!(from_archive["config"]["Cmd"], info["Config"]["Cmd"]);
    b.ok(&["load", "-i", archive.to_str().unwrap()]);
    assert_eq!(b.id(&hello), id);
    assert_eq!(b.ok(&["run", "--rm", &hello]), "hello from thinbox\n");
}

/// The counter file a running container keeps increasing.
fn counter(env_root: &common::Root, name: &str) -> u64 {
    let out = env_root.ok(&["exec", name, "cat", "/data/counter"]);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("counter: {out:?}"))
}

fn wait_for_counter_above(r: &common::Root, name: &str, floor: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, out) = r.status_and_output(&["exec", name, "cat", "/data/counter"]);
        if let Ok(n) = out.trim().parse::<u64>() {
            if n > floor {
                return n;
            }
        }
        assert!(Instant::now() < deadline, "the counter stays at {out:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn root_commit_of_a_running_container_pauses_and_resumes_it() {
    let env = Env::new(RegistryAuth::None);
    let a = &env.roots[0];
    let base = format!("{}/test/busybox:base", env.host());
    a.ok(&["pull", "-q", &base]);
    a.ok(&[
        "run",
        "-d",
        "--name",
        "busy",
        &base,
        "sh",
        "-c",
        "i=0; while true; do i=$((i+1)); echo $i > /data/.c; mv /data/.c /data/counter; sleep 0.02; done",
    ]);
    let pid = json(
        &fs::read_to_string(
            fs::read_dir(a.root.join("containers"))
                .unwrap()
                .flatten()
                .next()
                .unwrap()
                .path()
                .join("config.v2.json"),
        )
        .unwrap(),
    )["state"]["pid"]
        .as_u64()
        .unwrap();
    let cgroup_before = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let first = wait_for_counter_above(a, "busy", 0);

    // Paused (the default), then with -p=false: both images hold a counter the container
    // had written, and the container runs on.
    for (flag, tag) in [("-p", "paused"), ("-p=false", "live")] {
        let image = format!("counter:{tag}");
        let (code, out) = a.status_and_output(&["-vv", "commit", flag, "busy", &image]);
        assert_eq!(code, Some(0), "{out}");
        // The debug log says how many processes the freezer held.
        assert_eq!(out.contains("paused"), flag == "-p", "{out}");
        let saved: u64 = a
            .ok(&["run", "--rm", &image, "cat", "/data/counter"])
            .trim()
            .parse()
            .unwrap();
        assert!(saved >= first, "{tag}: {saved} < {first}");
        let now = counter(a, "busy");
        wait_for_counter_above(a, "busy", now);
        assert!(a.ok(&["ps"]).contains("busy"));
    }
    assert_eq!(
        fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap(),
        cgroup_before,
        "the container's processes are back in their cgroups"
    );
    let leftovers: Vec<_> = fs::read_dir("/sys/fs/cgroup/freezer")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("thinbox-pause-")
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "freezer cgroups left: {leftovers:?}");

    // A stopped container commits too, and a commit with no changes since then reuses the
    // layer (the same changes on the same parent make the same layer).
    a.ok(&["stop", "-t", "1", "busy"]);
    let one = a.ok(&["commit", "busy", "counter:stopped"]);
    let layers = fs::read_to_string(a.root.join("layers.json")).unwrap();
    a.ok(&["commit", "busy", "counter:again"]);
    assert_eq!(
        fs::read_to_string(a.root.join("layers.json")).unwrap(),
        layers,
        "no new layer for the same changes"
    );
    assert!(one.starts_with("sha256:"));
    a.ok(&["rm", "busy"]);
}

#[test]
fn root_a_container_left_frozen_by_a_dead_commit_still_stops() {
    let env = Env::new(RegistryAuth::None);
    let a = &env.roots[0];
    let base = format!("{}/test/busybox:base", env.host());
    a.ok(&["pull", "-q", &base]);
    let id = a.ok(&["run", "-d", "--name", "stuck", &base, "sleep", "600"]);
    let id = id.trim();
    let record = json(
        &fs::read_to_string(a.root.join("containers").join(id).join("config.v2.json")).unwrap(),
    );
    let pid = record["state"]["pid"].as_u64().unwrap();
    // What a commit killed between its freeze and its thaw leaves: the process in a frozen
    // freezer cgroup and the rootfs frozen.
    let cgroup = std::path::Path::new("/sys/fs/cgroup/freezer").join(format!("thinbox-pause-{id}"));
    fs::create_dir(&cgroup).unwrap();
    fs::write(cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
    fs::write(cgroup.join("freezer.state"), "FROZEN").unwrap();
    let mountpoint = a.root.join("mnt").join(id);
    fixtures::registry::run(
        std::process::Command::new("fsfreeze")
            .arg("--freeze")
            .arg(&mountpoint),
    );

    a.ok(&["kill", "stuck"]);
    // `kill` thawed the filesystem: it is not frozen any more.
    let unfreeze = std::process::Command::new("fsfreeze")
        .arg("--unfreeze")
        .arg(&mountpoint)
        .output()
        .unwrap();
    assert!(
        !unfreeze.status.success(),
        "the rootfs was still frozen after kill"
    );
    a.ok(&["rm", "-f", "stuck"]);
    assert!(!cgroup.exists(), "the freezer cgroup is gone");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}
