//! The process a container runs: the image config's Entrypoint, Cmd, Env, WorkingDir and
//! User, with `run`'s flags overriding them as Docker does, and the user resolved against the
//! container's own `/etc/passwd` and `/etc/group`.

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Docker's default PATH, set when neither the image nor `-e` sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What `create`/`run` were told.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// `-e KEY=VALUE` (or `-e KEY`, taking the value from thinbox's environment).
    pub env: Vec<String>,
    /// `--entrypoint` (`Some("")` clears the image's).
    pub entrypoint: Option<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// The arguments after the image.
    pub cmd: Vec<String>,
    pub hostname: String,
    pub tty: bool,
}

/// The image config's `config` object, the fields a container uses.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageProcess {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

impl ImageProcess {
    /// From an image config blob.
    pub fn from_config(bytes: &[u8]) -> anyhow::Result<ImageProcess> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).context("the image config is malformed")?;
        Ok(match v.get("config") {
            Some(c) if !c.is_null() => {
                serde_json::from_value(c.clone()).context("the image config is malformed")?
            }
            _ => ImageProcess::default(),
        })
    }
}

/// The container's `Config` as Docker keeps it: the image config's `config` object with
/// `create`'s flags applied (Cmd, Entrypoint, Env, WorkingDir, User); the rest (Labels,
/// ExposedPorts, StopSignal, ...) as the image had it. `commit` starts from this, as Docker's
/// does, so a committed image runs what its container ran.
pub fn container_config(image_config: &[u8], opts: &RunOptions) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_slice(image_config).context("the image config is malformed")?;
    let mut config = match v.get("config") {
        Some(Value::Object(c)) => c.clone(),
        _ => Map::new(),
    };
    if let Some(e) = &opts.entrypoint {
        let entrypoint = if e.is_empty() {
            Value::Null
        } else {
            json!([e])
        };
        config.insert("Entrypoint".into(), entrypoint);
        config.insert("Cmd".into(), Value::Null);
    }
    if !opts.cmd.is_empty() {
        config.insert("Cmd".into(), json!(opts.cmd));
    }
    if !opts.env.is_empty() {
        let mut env: Vec<String> = config
            .get("Env")
            .and_then(|e| serde_json::from_value(e.clone()).ok())
            .unwrap_or_default();
        for e in &opts.env {
            if e.contains('=') {
                set_env(&mut env, e.clone());
            } else if let Ok(value) = std::env::var(e) {
                set_env(&mut env, format!("{e}={value}"));
            }
        }
        config.insert("Env".into(), json!(env));
    }
    if let Some(w) = &opts.workdir {
        config.insert("WorkingDir".into(), json!(w));
    }
    if let Some(u) = &opts.user {
        config.insert("User".into(), json!(u));
    }
    config.insert("Hostname".into(), json!(opts.hostname));
    config.insert("Tty".into(), json!(opts.tty));
    Ok(Value::Object(config))
}

/// The process, resolved (except for the user, resolved inside the rootfs at start).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// Entrypoint then Cmd; never empty.
    pub args: Vec<String>,
    pub env: Vec<String>,
    /// Absolute.
    pub cwd: String,
    /// `USER[:GROUP]`, names or numbers; empty for root.
    pub user: String,
}

fn key_of(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(k, _)| k)
}

/// Sets `entry` (`K=V`) in `env`, replacing an entry with the same key.
pub fn set_env(env: &mut Vec<String>, entry: String) {
    let key = key_of(&entry).to_string();
    match env.iter_mut().find(|e| key_of(e) == key) {
        Some(slot) => *slot = entry,
        None => env.push(entry),
    }
}

/// The value of `key` in `env`.
pub fn get_env<'e>(env: &'e [String], key: &str) -> Option<&'e str> {
    env.iter()
        .filter_map(|e| e.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

impl ProcessSpec {
    /// Docker's rules: `--entrypoint` replaces the image's Entrypoint and drops its Cmd;
    /// arguments after the image replace Cmd; `-e` overrides the image's Env by key; then
    /// PATH (if unset), HOSTNAME and, with a tty, TERM are added.
    pub fn resolve(image: &ImageProcess, opts: &RunOptions) -> anyhow::Result<ProcessSpec> {
        let (entrypoint, image_cmd) = match &opts.entrypoint {
            Some(e) if e.is_empty() => (Vec::new(), Vec::new()),
            Some(e) => (vec![e.clone()], Vec::new()),
            None => (
                image.entrypoint.clone().unwrap_or_default(),
                image.cmd.clone().unwrap_or_default(),
            ),
        };
        let cmd = if opts.cmd.is_empty() {
            image_cmd
        } else {
            opts.cmd.clone()
        };
        let args: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
        if args.is_empty() {
            bail!("No command specified");
        }

        let mut env = image.env.clone().unwrap_or_default();
        for e in &opts.env {
            if e.contains('=') {
                set_env(&mut env, e.clone());
            } else if let Ok(value) = std::env::var(e) {
                set_env(&mut env, format!("{e}={value}"));
            }
        }
        if get_env(&env, "PATH").is_none() {
            env.insert(0, format!("PATH={DEFAULT_PATH}"));
        }
        set_env(&mut env, format!("HOSTNAME={}", opts.hostname));
        if opts.tty && get_env(&env, "TERM").is_none() {
            env.push("TERM=xterm".to_string());
        }

        let cwd = opts
            .workdir
            .clone()
            .or_else(|| image.working_dir.clone())
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".to_string());
        if !cwd.starts_with('/') {
            bail!("the working directory '{cwd}' is invalid, it needs to be an absolute path");
        }
        let user = opts
            .user
            .clone()
            .or_else(|| image.user.clone())
            .unwrap_or_default();
        Ok(ProcessSpec {
            args,
            env,
            cwd,
            user,
        })
    }
}

/// A user resolved to numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// From the passwd entry, for HOME.
    pub home: Option<String>,
}

fn read_rootfs_file(rootfs: &Path, file: &str) -> String {
    // The files of an image are the image's business: a missing one is an empty one.
    std::fs::read_to_string(rootfs.join(file)).unwrap_or_default()
}

/// Resolves `USER[:GROUP]` (names or numbers) against the rootfs' `/etc/passwd` and
/// `/etc/group`, as Docker (runc's libcontainer/user) does: a name must exist; a number
/// need not (its group is then 0).
pub fn resolve_user(rootfs: &Path, spec: &str) -> anyhow::Result<ResolvedUser> {
    let passwd = read_rootfs_file(rootfs, "etc/passwd");
    let group = read_rootfs_file(rootfs, "etc/group");
    resolve_user_in(spec, &passwd, &group)
}

pub fn resolve_user_in(spec: &str, passwd: &str, group: &str) -> anyhow::Result<ResolvedUser> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    // name:x:uid:gid:gecos:home:shell
    let entries: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 6)
        .collect();
    let numeric: Option<u32> = user.parse().ok();
    let entry = entries.iter().find(|f| match numeric {
        Some(n) => f[2].parse::<u32>().ok() == Some(n),
        None => f[0] == user,
    });
    let (uid, mut gid, name, home) = match (entry, numeric) {
        (Some(f), _) => (
            f[2].parse().context("a malformed uid in /etc/passwd")?,
            f[3].parse().unwrap_or(0),
            Some(f[0]),
            Some(f[5].to_string()),
        ),
        (None, Some(n)) => (n, 0, None, None),
        (None, None) => {
            bail!("unable to find user {user}: no matching entries in passwd file")
        }
    };
    // name:x:gid:member,member
    let groups: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .collect();
    if let Some(g) = grp {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .with_context(|| {
                    format!("unable to find group {g}: no matching entries in group file")
                })?,
        };
    }
    let mut additional_gids = Vec::new();
    if grp.is_none() {
        if let Some(name) = name {
            for f in &groups {
                let members = f.get(3).copied().unwrap_or_default();
                if members.split(',').any(|m| m == name) {
                    if let Ok(n) = f[2].parse::<u32>() {
                        if n != gid && !additional_gids.contains(&n) {
                            additional_gids.push(n);
                        }
                    }
                }
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageProcess {
        ImageProcess {
            env: Some(vec!["PATH=/bin".into(), "A=1".into()]),
            cmd: Some(vec!["sh".into()]),
            entrypoint: None,
            working_dir: Some("/data".into()),
            user: None,
        }
    }

    fn opts() -> RunOptions {
        RunOptions {
            hostname: "box".into(),
            ..RunOptions::default()
        }
    }

    #[test]
    fn image_defaults_apply() {
        let p = ProcessSpec::resolve(&image(), &opts()).unwrap();
        assert_eq!(p.args, ["sh"]);
        assert_eq!(p.env, ["PATH=/bin", "A=1", "HOSTNAME=box"]);
        assert_eq!(p.cwd, "/data");
        assert_eq!(p.user, "");
    }

    #[test]
    fn flags_override_like_docker() {
        let mut o = opts();
        o.cmd = vec!["echo".into(), "hi".into()];
        o.env = vec!["A=2".into(), "B=3".into()];
        o.workdir = Some("/tmp".into());
        o.user = Some("nobody".into());
        let p = ProcessSpec::resolve(&image(), &o).unwrap();
        assert_eq!(p.args, ["echo", "hi"]);
        assert_eq!(p.env, ["PATH=/bin", "A=2", "B=3", "HOSTNAME=box"]);
        assert_eq!(p.cwd, "/tmp");
        assert_eq!(p.user, "nobody");

        // --entrypoint drops the image's Cmd; the arguments follow it.
        let mut o = opts();
        o.entrypoint = Some("/bin/echo".into());
        let p = ProcessSpec::resolve(&image(), &o).unwrap();
        assert_eq!(p.args, ["/bin/echo"]);
        o.cmd = vec!["x".into()];
        let p = ProcessSpec::resolve(&image(), &o).unwrap();
        assert_eq!(p.args, ["/bin/echo", "x"]);
    }

    #[test]
    fn missing_command_and_relative_workdir_are_refused() {
        let mut i = image();
        i.cmd = None;
        assert!(ProcessSpec::resolve(&i, &opts()).is_err());
        let mut o = opts();
        o.workdir = Some("rel".into());
        assert!(ProcessSpec::resolve(&image(), &o).is_err());
    }

    #[test]
    fn default_path_and_term() {
        let i = ImageProcess {
            cmd: Some(vec!["sh".into()]),
            ..ImageProcess::default()
        };
        let mut o = opts();
        o.tty = true;
        let p = ProcessSpec::resolve(&i, &o).unwrap();
        assert_eq!(p.env[0], format!("PATH={DEFAULT_PATH}"));
        assert!(p.env.contains(&"TERM=xterm".to_string()));
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\nalice:x:1000:1000::/home/alice:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nnogroup:x:65534:\nalice:x:1000:\nwheel:x:10:alice,bob\n";

    #[test]
    fn users_resolve_by_name_number_and_group() {
        let r = resolve_user_in("", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (0, 0));
        assert_eq!(r.home.as_deref(), Some("/root"));
        let r = resolve_user_in("alice", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid, r.additional_gids), (1000, 1000, vec![10]));
        let r = resolve_user_in("1234:55", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (1234, 55));
        let r = resolve_user_in("nobody:wheel", PASSWD, GROUP).unwrap();
        assert_eq!((r.uid, r.gid), (65534, 10));
        assert!(resolve_user_in("bob", PASSWD, GROUP).is_err());
        assert!(resolve_user_in("0:nope", PASSWD, GROUP).is_err());
    }
}
