//! An OCI bundle for an external runtime (`runc`, `crun`): `config.json` built from
//! oci-spec's defaults (the same as `runc spec`'s: /proc, a tmpfs /dev with devpts, shm and
//! mqueue, a read-only /sys, masked and read-only paths, default capabilities), changed to
//! what the built-in runner gives: new mount, PID, UTS and IPC namespaces (the host's
//! network), the container's process, hostname and `/etc` files, and the mounted thin as
//! the root.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use oci_spec::runtime::Spec;
use serde_json::{json, Value};

use super::spec::ResolvedUser;
use super::Container;

/// An external runtime and where its files go.
pub struct Runtime {
    /// `runc` or `crun`.
    pub name: String,
    /// The bundle directory (`config.json`, the pid file).
    pub bundle: PathBuf,
    /// The runtime's `--root` (its state).
    pub state_root: PathBuf,
}

/// The pieces of the bundle that are not in the container's record.
pub struct Bundle<'a> {
    pub rootfs: &'a Path,
    pub user: &'a ResolvedUser,
    pub env: &'a [String],
    pub bind_files: &'a [(PathBuf, &'static str)],
}

/// The runtime's `config.json` for `c`.
pub fn config(c: &Container, b: &Bundle<'_>) -> anyhow::Result<Value> {
    let mut spec = serde_json::to_value(Spec::default())?;
    spec["root"] = json!({ "path": b.rootfs, "readonly": false });
    spec["hostname"] = json!(c.hostname);
    let process = &mut spec["process"];
    process["terminal"] = json!(false);
    process["args"] = json!(c.process.args);
    process["env"] = json!(b.env);
    process["cwd"] = json!(c.process.cwd);
    process["user"] = json!({
        "uid": b.user.uid,
        "gid": b.user.gid,
        "additionalGids": b.user.additional_gids,
    });
    // Docker's containers may gain privileges (setuid binaries work as in the built-in runner).
    process["noNewPrivileges"] = json!(false);
    // The same capabilities as the built-in runner: a non-root user gets none effective,
    // nobody any inheritable.
    let caps = super::caps::names(c.capabilities()?);
    let effective = if b.user.uid == 0 {
        caps.clone()
    } else {
        Vec::new()
    };
    process["capabilities"] = json!({
        "bounding": caps,
        "permitted": effective,
        "effective": effective,
        "inheritable": [],
        "ambient": [],
    });
    spec["linux"]["namespaces"] = json!([
        { "type": "pid" },
        { "type": "ipc" },
        { "type": "uts" },
        { "type": "mount" },
    ]);
    if let Some(mounts) = spec["mounts"].as_array_mut() {
        for (source, target) in b.bind_files {
            mounts.push(json!({
                "destination": format!("/{target}"),
                "type": "bind",
                "source": source,
                "options": ["rbind", "rprivate"],
            }));
        }
    }
    // The shape is checked by reading it back as oci-spec's type.
    serde_json::from_value::<Spec>(spec.clone()).context("the OCI runtime config is malformed")?;
    Ok(spec)
}

/// Writes the bundle (`DIR/config.json`; the root is the mounted thin, outside it).
pub fn write_bundle(dir: &Path, c: &Container, b: &Bundle<'_>) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let config = config(c, b)?;
    fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)
        .with_context(|| format!("failed to write {}/config.json", dir.display()))
}

/// The runtime's command line prefix. crun refuses this machine's hybrid cgroup layout while
/// the cgroup2 mount has a controller; it runs in a mount namespace of its own without that
/// mount (shared/design/peers.md, 3c).
pub fn runtime_command(runtime: &str, state_root: &Path) -> std::process::Command {
    let mut command = if runtime == "crun" {
        let mut c = std::process::Command::new("unshare");
        c.args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "umount /sys/fs/cgroup/unified 2>/dev/null; exec crun \"$@\"",
            "crun",
        ]);
        c
    } else {
        std::process::Command::new(runtime)
    };
    command.arg("--root").arg(state_root);
    command
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::{ProcessSpec, State};

    #[test]
    fn the_config_carries_the_process_and_four_namespaces() {
        let c = Container {
            id: "a".repeat(64),
            name: "x".into(),
            image: "busybox".into(),
            image_id: crate::image::Digest::of(b""),
            created: String::new(),
            process: ProcessSpec {
                args: vec!["echo".into(), "hi".into()],
                env: vec!["PATH=/bin".into()],
                cwd: "/data".into(),
                user: String::new(),
            },
            hostname: "box".into(),
            tty: false,
            open_stdin: false,
            auto_remove: false,
            runtime: Some("runc".into()),
            thin_id: 3,
            device_name: String::new(),
            origin_thin_id: 2,
            config: None,
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            state: State::default(),
        };
        let user = ResolvedUser {
            uid: 1,
            gid: 2,
            additional_gids: vec![3],
            home: None,
        };
        let binds = [(PathBuf::from("/h/hosts"), "etc/hosts")];
        let env = ["PATH=/bin".to_string()];
        let v = config(
            &c,
            &Bundle {
                rootfs: Path::new("/mnt/r"),
                user: &user,
                env: &env,
                bind_files: &binds,
            },
        )
        .unwrap();
        assert_eq!(v["root"]["path"], "/mnt/r");
        assert_eq!(v["process"]["args"], json!(["echo", "hi"]));
        assert_eq!(v["process"]["cwd"], "/data");
        assert_eq!(v["process"]["user"]["uid"], 1);
        assert_eq!(v["hostname"], "box");
        let ns: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount"]);
        let mounts = v["mounts"].as_array().unwrap();
        assert!(mounts.iter().any(|m| m["destination"] == "/etc/hosts"));
        assert!(mounts.iter().any(|m| m["destination"] == "/proc"));
    }
}
