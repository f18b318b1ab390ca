//! Containers end to end, as root: the fixture busybox image pulled from a real
//! `docker-registry` on 127.0.0.1, then `run`, `create`, `start`, `ps`, `logs`, `exec`,
//! `stop`, `kill`, `rm` on real thins (the pool daemon, loop devices over FUSE, ext4
//! mounts), real namespaces, and runc/crun for `--runtime`.
//!
//! Each test has its own temporary `--root` and `THINBOX_RUN_ROOT`. The guard kills what
//! the containers left running (their processes and supervisors), unmounts, stops the pool
//! daemon, detaches loop devices and kills the registry, even when the test fails, so every
//! test can run again right away.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use engine::activate::PoolControl;
use fixtures::registry::{run, RegistryAuth};

mod common;

use common::{Root, THINBOX};

/// The first root of a [`common::Env`], with the fixture busybox image pulled into it.
struct Env {
    env: common::Env,
    image: String,
}

impl std::ops::Deref for Env {
    type Target = Root;
    fn deref(&self) -> &Root {
        &self.env.roots[0]
    }
}

impl Env {
    fn new() -> Env {
        let env = common::Env::new(RegistryAuth::None);
        let image = format!("{}/test/busybox:base", env.host());
        let env = Env { env, image };
        env.ok(&["pull", "-q", &env.image]);
        env
    }

    /// The thin of the image's top layer.
    fn image_thin(&self) -> u64 {
        self.layer_thin(&self.image)
    }
}

#[test]
fn root_run_passes_output_exit_codes_and_settings() {
    let env = Env::new();
    let image = env.image.as_str();

    // The image's own command, then an explicit one.
    assert_eq!(env.ok(&["run", image]), "original\n");
    assert_eq!(env.ok(&["run", image, "echo", "hello"]), "hello\n");

    // Exit codes pass through; a death by signal is 128 + n.
    assert_eq!(env.code(&["run", image, "sh", "-c", "exit 3"]).0, 3);
    let (code, _, _) = env.code(&["run", image, "sh", "-c", "sh -c 'kill -9 $$'; exit $?"]);
    assert_eq!(code, 137);
    let (code, _, err) = env.code(&["run", image, "no-such-command"]);
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("executable file not found"), "{err}");

    // -e, -w, -u, --hostname take effect; the image's PATH stays; HOME comes from passwd.
    let out = env.ok(&[
        "run",
        "-e",
        "GREETING=hi there",
        "-w",
        "/tmp/work",
        "-u",
        "1000:1000",
        "--hostname",
        "boxy",
        image,
        "sh",
        "-c",
        "id -u; id -g; pwd; busybox hostname; cat /etc/hostname; env",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        &lines[..5],
        ["1000", "1000", "/tmp/work", "boxy", "boxy"],
        "{out}"
    );
    for var in ["GREETING=hi there", "PATH=/bin", "HOSTNAME=boxy", "HOME=/"] {
        assert!(lines.contains(&var), "{var} missing in {out}");
    }
    let out = env.ok(&["run", "-u", "root", image, "sh", "-c", "id -u; echo $HOME"]);
    assert_eq!(out, "0\n/root\n");
    // --entrypoint replaces the image's and drops its Cmd; the arguments follow it.
    assert_eq!(
        env.ok(&["run", "--entrypoint", "/bin/echo", image, "a", "b"]),
        "a b\n"
    );
    // The default hostname is the short id; /etc/hosts names it.
    let out = env.ok(&[
        "run",
        "--name",
        "named",
        image,
        "sh",
        "-c",
        "busybox hostname; cat /etc/hosts",
    ]);
    let short = out.lines().next().unwrap().to_string();
    assert_eq!(short.len(), 12, "{out}");
    assert!(out.contains(&format!("127.0.1.1\t{short}")), "{out}");
    assert!(out.contains("localhost"), "{out}");

    // A PID namespace (the command is pid 1, alone), /proc and a minimal /dev.
    let out = env.ok(&[
        "run",
        image,
        "sh",
        "-c",
        "echo $$; ls /proc | grep -c '^[0-9]'; ls /dev; echo x > /dev/null; head -c 4 /dev/zero | wc -c",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1", "{out}");
    assert!(lines[1].parse::<u32>().unwrap() <= 3, "{out}");
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm",
    ] {
        assert!(lines.contains(&dev), "/dev/{dev} missing: {out}");
    }
    // UTS and IPC namespaces are new, the mount namespace too.
    let out = env.ok(&[
        "run",
        image,
        "sh",
        "-c",
        "for ns in uts ipc mnt pid; do readlink /proc/1/ns/$ns; done",
    ]);
    for (ns, line) in ["uts", "ipc", "mnt", "pid"].iter().zip(out.lines()) {
        let host = fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(Path::new(line), host, "{ns} namespace shared with the host");
    }

    // -i passes piped stdin; without it the container reads nothing.
    let out = env.with_input(&["run", "-i", image, "cat"], b"through stdin\n");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "through stdin\n");
    let out = env.with_input(&["run", image, "cat"], b"ignored\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    // -t gives a terminal (script provides ours).
    let cmd = format!(
        "{THINBOX} --root {} run -t {image} sh -c 'test -t 0 && test -t 1 && echo tty:$TERM'",
        env.root.display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("THINBOX_RUN_ROOT", &env.run_root)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("tty:xterm"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Clear errors.
    let (code, _, err) = env.code(&["run", "nope/none:latest", "true"]);
    assert_eq!(code, 1);
    assert!(err.contains("No such image"), "{err}");
    let (code, _, err) = env.code(&["run", "--name", "named", image, "true"]);
    assert_eq!(code, 1);
    assert!(err.contains("is already in use"), "{err}");
    let (code, _, err) = env.code(&["logs", "no-such-container"]);
    assert_eq!(code, 1);
    assert!(err.contains("No such container"), "{err}");

    // Every container is recorded and stopped; nothing is left mounted or active.
    let ps = env.ok(&["ps", "-a"]);
    let header = ps.lines().next().unwrap();
    for col in [
        "CONTAINER ID",
        "IMAGE",
        "COMMAND",
        "CREATED",
        "STATUS",
        "PORTS",
        "NAMES",
    ] {
        assert!(header.contains(col), "{ps}");
    }
    assert!(ps.contains("Exited (3)"), "{ps}");
    assert!(ps.contains("Exited (137)"), "{ps}");
    assert_eq!(env.ok(&["ps", "-q"]), "", "nothing runs");
    assert!(env.mounts().is_empty(), "{:?}", env.mounts());
    assert_eq!(env.active_thins(), 0);
}

#[test]
fn root_containers_write_to_their_own_snapshots() {
    let env = Env::new();
    let image = env.image.as_str();
    let image_thin = env.image_thin();

    env.ok(&[
        "run",
        "--name",
        "ca",
        image,
        "sh",
        "-c",
        "echo from-a > /data/new.txt; echo changed > /data/keep.txt",
    ]);
    let out = env.ok(&[
        "run",
        "--name",
        "cb",
        image,
        "sh",
        "-c",
        "cat /data/keep.txt; test -e /data/new.txt && echo leaked || echo absent",
    ]);
    assert_eq!(
        out, "original\nabsent\n",
        "b sees the image, not a's writes"
    );

    // a's files are still there when it starts again (attached: its exit code comes back).
    // A new container owns one block from the start: its journal superblock's, which its
    // first commit would otherwise copy while a write waits.
    let used = env.used_data_blocks();
    let id = env.ok(&["create", "--name", "cc", image, "cat", "/data/keep.txt"]);
    assert_eq!(id.trim().len(), 64);
    assert_eq!(env.used_data_blocks(), used + 1);
    assert!(env.ok(&["ps", "-a"]).contains("Created"));
    assert_eq!(env.ok(&["start", "-a", "cc"]), "original\n");
    let out = env.ok(&["start", "-a", "ca"]);
    assert_eq!(out, "", "a's command writes only");
    let a_id = env.ok(&["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}}"]);
    let a_id = a_id
        .lines()
        .find_map(|l| l.strip_suffix(" ca"))
        .unwrap()
        .to_string();
    let a_thin = env.record(&a_id)["thin_id"].as_u64().unwrap();
    env.with_thin(a_thin, |mnt| {
        assert_eq!(
            fs::read_to_string(mnt.join("data/new.txt")).unwrap(),
            "from-a\n"
        );
        assert_eq!(
            fs::read_to_string(mnt.join("data/keep.txt")).unwrap(),
            "changed\n"
        );
    });
    // diff: A/C/D against the image, without the runner's mount points.
    let diff = env.ok(&["diff", "ca"]);
    let lines: Vec<&str> = diff.lines().collect();
    assert_eq!(
        lines,
        ["C /data", "C /data/keep.txt", "A /data/new.txt"],
        "{diff}"
    );
    let diff = env.ok(&["diff", "cc"]);
    assert_eq!(diff, "", "cc only read");
    // The image's layer did not change.
    env.with_thin(image_thin, |mnt| {
        assert_eq!(
            fs::read_to_string(mnt.join("data/keep.txt")).unwrap(),
            "original\n"
        );
        assert!(!mnt.join("data/new.txt").exists());
        assert!(!mnt.join("etc/hostname").exists());
    });
}

#[test]
fn root_detached_containers_run_log_exec_stop_and_kill() {
    let env = Env::new();
    let image = env.image.as_str();

    let id = env.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        image,
        "sh",
        "-c",
        "echo started; echo warn >&2; echo inside > /tmp/mark; while true; do sleep 1; done",
    ]);
    let id = id.trim();
    assert_eq!(id.len(), 64, "{id}");
    env.wait_status("web", "Up");
    let ps = env.ok(&["ps"]);
    assert!(ps.contains(&id[..12]) && ps.contains("web"), "{ps}");

    // logs: stdout to stdout, stderr to stderr, the file in Docker's json-file shape.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.ok(&["logs", "web"]).contains("started") {
        assert!(Instant::now() < deadline, "no output in the log");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = fs::read_to_string(
        env.root
            .join("containers")
            .join(id)
            .join(format!("{id}-json.log")),
    )
    .unwrap();
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert!(first["log"].as_str().unwrap().ends_with('\n'));
    assert!(first["time"].as_str().is_some());
    assert!(log.contains(r#""stream":"stderr""#), "{log}");
    let (_, _, err) = env.code(&["logs", "web"]);
    assert_eq!(err, "warn\n");

    // exec runs inside: the container's files, its PID namespace, its hostname.
    assert_eq!(env.ok(&["exec", "web", "cat", "/tmp/mark"]), "inside\n");
    let out = env.ok(&[
        "exec",
        "web",
        "sh",
        "-c",
        "busybox tr '\\0' ' ' < /proc/1/cmdline; echo; busybox hostname",
    ]);
    assert!(
        out.starts_with("sh -c echo started;"),
        "pid 1 is the container's: {out}"
    );
    assert!(out.ends_with(&format!("\n{}\n", &id[..12])), "{out}");
    assert_eq!(env.code(&["exec", "web", "sh", "-c", "exit 7"]).0, 7);
    env.ok(&["exec", "web", "sh", "-c", "echo persisted > /tmp/p"]);
    let out = env.with_input(&["exec", "-i", "web", "cat"], b"piped\n");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped\n");

    // rm refuses a running container; stop sends SIGTERM (sh as pid 1 ignores it), then KILL.
    let (code, _, err) = env.code(&["rm", "web"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot remove a running container"), "{err}");
    let t = Instant::now();
    assert_eq!(env.ok(&["stop", "-t", "1", "web"]), "web\n");
    assert!(t.elapsed() < Duration::from_secs(10));
    let status = env.wait_status("web", "Exited");
    assert!(status.starts_with("Exited (137)"), "{status}");
    assert!(env.mounts().is_empty(), "{:?}", env.mounts());
    assert_eq!(env.active_thins(), 0);
    let (code, _, _) = env.code(&["exec", "web", "true"]);
    assert_eq!(code, 1, "exec into a stopped container fails");

    // start brings it back (same thin: what exec wrote is still there), kill -s TERM is ignored by
    // pid 1 without a handler, the default KILL is not.
    assert_eq!(env.ok(&["start", "web"]), "web\n");
    env.wait_status("web", "Up");
    assert_eq!(env.ok(&["exec", "web", "cat", "/tmp/p"]), "persisted\n");
    env.ok(&["kill", "web"]);
    env.wait_status("web", "Exited (137)");
    let (code, _, err) = env.code(&["kill", "web"]);
    assert_eq!(code, 1);
    assert!(err.contains("is not running"), "{err}");

    // A foreground container killed from outside: thinbox run exits 128 + 9.
    let child = env
        .command(&[
            "run",
            "--name",
            "fg",
            image,
            "sh",
            "-c",
            "echo up; exec sleep 60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    env.wait_status("fg", "Up");
    env.ok(&["kill", "-s", "KILL", "fg"]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(137));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "up\n");
    // A signal thinbox gets goes to the container. The shell says when its trap is set: a
    // TERM before that reaches a pid 1 without a handler, which ignores it, and the
    // container would loop on (seen once, on a loaded machine).
    let mut child = env
        .command(&[
            "run",
            "--name",
            "fg2",
            image,
            "sh",
            "-c",
            "trap 'exit 42' TERM; echo trapped; while true; do sleep 1; done",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "trapped\n");
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = env.code(&["kill", "fg2"]);
            let _ = child.wait();
            panic!("thinbox run did not exit within 60 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(42),
        "SIGTERM forwarded to the container"
    );

    // rm -f kills and removes.
    env.ok(&["start", "web"]);
    env.wait_status("web", "Up");
    assert_eq!(env.ok(&["rm", "-f", "web"]), "web\n");
    assert!(!env.ok(&["ps", "-a"]).contains("web"));
    assert!(env.mounts().is_empty(), "{:?}", env.mounts());
    assert_eq!(env.active_thins(), 0);
}

#[test]
fn root_rm_returns_pool_space_and_rm_flag_leaves_nothing() {
    let env = Env::new();
    let image = env.image.as_str();
    let names_before = env.thin_names();
    let used_before = env.used_data_blocks();
    let block = 64 * 1024;
    let image_thin = env.image_thin();
    let mapped = env
        .client()
        .list()
        .unwrap()
        .into_iter()
        .find(|t| t.id == image_thin)
        .unwrap()
        .mapped_blocks;

    // Creation time: a snapshot of the image's thin, whatever it maps.
    let mut creates = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        env.ok(&["create", "--name", &format!("t{i}"), image, "true"]);
        creates.push(t.elapsed());
    }
    creates.sort();
    eprintln!(
        "create from an image mapping {} MiB: median {:?} (min {:?}, max {:?})",
        mapped * block / (1 << 20),
        creates[2],
        creates[0],
        creates[4]
    );
    // Run to exit: create, activate, mount, namespaces, exec, wait, unmount, deactivate.
    let mut runs = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        env.ok(&["run", "--rm", image, "true"]);
        runs.push(t.elapsed());
    }
    runs.sort();
    eprintln!(
        "run --rm true to exit: median {:?} (min {:?}, max {:?})",
        runs[2], runs[0], runs[4]
    );
    let mut starts = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        env.ok(&["start", "-a", &format!("t{i}")]);
        starts.push(t.elapsed());
    }
    starts.sort();
    eprintln!(
        "start -a of a created container to exit: median {:?}",
        starts[2]
    );
    // The image of existing containers is not removed: not by its last name without -f,
    // never by id while they exist without -f.
    let (code, _, err) = env.code(&["rmi", image]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("conflict: unable to remove repository reference")
            && err.contains("is using its referenced image"),
        "{err}"
    );
    let image_id = env.ok(&["inspect", "--format", "{{.Id}}", image]);
    let (code, _, err) = env.code(&["rmi", image_id.trim()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("(must be forced) - image is being used by stopped container"),
        "{err}"
    );
    assert!(env
        .ok(&["images", "-q"])
        .contains(&image_id.trim()["sha256:".len()..][..12]));
    for i in 0..5 {
        env.ok(&["rm", &format!("t{i}")]);
    }

    // A container that writes 32 MiB takes pool space; rm gives it back.
    let id = env.ok(&[
        "run",
        "--name",
        "big",
        image,
        "sh",
        "-c",
        "head -c 33554432 /dev/urandom > /data/big; sync",
    ]);
    assert_eq!(id, "");
    let used_with = env.used_data_blocks();
    assert!(
        (used_with - used_before) * block >= 32 << 20,
        "{used_before} -> {used_with} blocks"
    );
    let big_id = env.container_ids().pop().unwrap();
    let device = format!("thinbox-{big_id}");
    assert!(env.thin_names().contains(&device));
    env.ok(&["rm", "big"]);
    let used_after = env.used_data_blocks();
    assert!(
        used_after <= used_before + 1,
        "{used_before} -> {used_with} -> {used_after} blocks"
    );
    assert!(!env.thin_names().contains(&device));
    assert!(!env.root.join("containers").join(&big_id).exists());

    // --rm leaves nothing: no record, no thin, no mount, no activation; detached too.
    env.ok(&["run", "--rm", image, "sh", "-c", "echo x > /data/x"]);
    let id = env.ok(&["run", "-d", "--rm", image, "sleep", "1"]);
    let id = id.trim();
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.root.join("containers").join(id).exists() {
        assert!(Instant::now() < deadline, "--rm -d container not removed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(env.ok(&["ps", "-a", "-q"]), "");
    assert!(env.container_ids().is_empty());
    let mut names = env.thin_names();
    names.sort();
    let mut before = names_before.clone();
    before.sort();
    assert_eq!(names, before);
    assert!(env.mounts().is_empty(), "{:?}", env.mounts());
    assert_eq!(env.active_thins(), 0);
    assert!(env.used_data_blocks() <= used_before + 1);
}

#[test]
fn root_external_runtimes_run_the_bundle() {
    let env = Env::new();
    let image = env.image.as_str();
    for runtime in ["runc", "crun"] {
        let name = format!("on-{runtime}");
        let (code, out, err) = env.code(&[
            "run",
            "--runtime",
            runtime,
            "--name",
            &name,
            "--hostname",
            runtime,
            "-e",
            "X=1",
            "-w",
            "/data",
            image,
            "sh",
            "-c",
            "echo $$; busybox hostname; pwd; echo $X; cat keep.txt; echo w > /data/w; exit 5",
        ]);
        assert_eq!(code, 5, "{runtime}: {out}{err}");
        assert_eq!(
            out,
            format!("1\n{runtime}\n/data\n1\noriginal\n"),
            "{runtime}: {err}"
        );
        let status = env.wait_status(&name, "Exited");
        assert!(status.starts_with("Exited (5)"), "{status}");
        // Detached, with exec and stop.
        let d = format!("{runtime}-d");
        env.ok(&[
            "run",
            "-d",
            "--runtime",
            runtime,
            "--name",
            &d,
            image,
            "sh",
            "-c",
            "echo hi; echo m > /tmp/m; exec sleep 60",
        ]);
        env.wait_status(&d, "Up");
        assert_eq!(env.ok(&["exec", &d, "cat", "/tmp/m"]), "m\n");
        env.ok(&["stop", "-t", "1", &d]);
        env.wait_status(&d, "Exited");
        assert!(env.ok(&["logs", &d]).contains("hi"));
        env.ok(&["rm", &name, &d]);
    }
    assert!(env.mounts().is_empty(), "{:?}", env.mounts());
    assert_eq!(env.active_thins(), 0);
}

/// `dm.fs=xfs` (Docker's devicemapper default): the base device, every layer and every
/// container are xfs. Layers with whiteouts apply; two containers of one image run at once
/// (each carries the image's xfs UUID, so each is mounted `nouuid`); a commit makes a layer
/// that runs; removal gives the pool's space back and leaves no mount or activation.
#[test]
fn root_xfs_base_device_runs_commits_and_removes() {
    let mut env = common::Env::new(RegistryAuth::None);
    let x = env.add_root_with("xfs", &["dm.fs=xfs"]);
    let host = env.host();
    let r = &env.roots[x];
    let base = format!("{host}/test/busybox:base");
    let v2 = format!("{host}/test/busybox:v2");

    r.ok(&["pull", "-q", &v2]);
    let info = r.ok(&["info"]);
    assert!(info.contains("Backing Filesystem: xfs"), "{info}");
    assert_eq!(
        r.ok(&[
            "run",
            "--rm",
            &v2,
            "sh",
            "-c",
            "cat /data/keep.txt; ls /data /data/opaque"
        ]),
        "changed\n/data:\nkeep.txt\nopaque\n\n/data/opaque:\nc\n",
        "v2's whiteouts and opaque directory, applied on xfs"
    );

    r.ok(&["pull", "-q", &base]);
    let used_before = r.used_data_blocks();
    r.ok(&[
        "run",
        "-d",
        "--name",
        "live",
        &base,
        "sh",
        "-c",
        "echo live > /data/live.txt; sleep 600",
    ]);
    // Only once `live` has written does the second container's "absent" say something.
    let deadline = Instant::now() + Duration::from_secs(20);
    while r
        .status_and_output(&["exec", "live", "cat", "/data/live.txt"])
        .1
        != "live\n"
    {
        assert!(Instant::now() < deadline, "live never wrote its file");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        r.ok(&[
            "run",
            "--rm",
            &base,
            "sh",
            "-c",
            "stat -f -c %T /; cat /data/keep.txt; test -e /data/live.txt && echo leaked || echo absent",
        ]),
        "xfs\noriginal\nabsent\n",
        "a second container of the image, beside a running one"
    );

    r.ok(&[
        "run",
        "--name",
        "builder",
        &base,
        "sh",
        "-c",
        "echo from xfs > /data/new.txt && rm /data/delete-me.txt",
    ]);
    let made = format!("{host}/test/xfs-made:v1");
    r.ok(&[
        "commit",
        "-c",
        r#"CMD ["cat", "/data/new.txt"]"#,
        "builder",
        &made,
    ]);
    assert_eq!(r.ok(&["run", "--rm", &made]), "from xfs\n");
    r.with_thin(r.layer_thin(&made), |mnt| {
        assert_eq!(
            fs::read_to_string(mnt.join("data/new.txt")).unwrap(),
            "from xfs\n"
        );
        assert!(!mnt.join("data/delete-me.txt").exists());
    });
    assert_eq!(
        r.ok(&["run", "--rm", &made, "ls", "/data"]),
        "keep.txt\nnew.txt\nopaque\n"
    );

    r.ok(&["rm", "-f", "live"]);
    r.ok(&["rm", "builder"]);
    r.ok(&["rmi", &made]);
    assert_eq!(r.ok(&["ps", "-a", "-q"]), "");
    assert!(r.mounts().is_empty(), "{:?}", r.mounts());
    assert_eq!(r.active_thins(), 0);
    let used_after = r.used_data_blocks();
    assert!(
        used_after <= used_before + 1,
        "{used_before} -> {used_after} blocks"
    );
}
