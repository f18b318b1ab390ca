//! Capabilities as root: Docker's default set in the built-in runner, in `exec` and under
//! runc; `--cap-add`/`--cap-drop`; a non-root user with none effective.

mod common;

use common::Env;
use fixtures::registry::RegistryAuth;

fn caps_field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

/// `CapBnd` and `CapEff` of the container's process, as `/proc/self/status` shows them;
/// its inheritable and ambient sets must be empty and its permitted set its effective one.
fn caps(out: &str) -> (String, String) {
    let field = |name: &str| caps_field(out, name);
    assert_eq!(field("CapInh:"), "0000000000000000", "{out}");
    assert_eq!(field("CapAmb:"), "0000000000000000", "{out}");
    assert_eq!(field("CapPrm:"), field("CapEff:"), "{out}");
    (field("CapBnd:"), field("CapEff:"))
}

#[test]
fn root_containers_keep_dockers_capabilities() {
    let env = Env::new(RegistryAuth::None);
    let r = &env.roots[0];
    let image = format!("{}/test/busybox:base", env.host());
    r.ok(&["pull", "-q", &image]);
    let status = ["cat", "/proc/self/status"];
    let run = |flags: &[&str]| {
        let mut args = vec!["run", "--rm"];
        args.extend_from_slice(flags);
        args.push(&image);
        args.extend_from_slice(&status);
        caps(&r.ok(&args))
    };
    let docker_default = "00000000a80425fb".to_string();
    assert_eq!(run(&[]), (docker_default.clone(), docker_default.clone()));
    assert_eq!(
        run(&["-u", "1000"]),
        (docker_default.clone(), "0000000000000000".into())
    );
    assert_eq!(
        run(&["--cap-drop", "ALL", "--cap-add", "chown"]),
        ("0000000000000001".into(), "0000000000000001".into())
    );
    assert_eq!(run(&["--cap-add", "SYS_ADMIN"]).0, "00000000a82425fb");
    // ALL is what this host's bounding set still has (a sandbox may lack some).
    let host = std::fs::read_to_string("/proc/self/status").unwrap();
    let host_bounding = u64::from_str_radix(&caps_field(&host, "CapBnd:"), 16).unwrap();
    assert_eq!(
        run(&["--cap-add", "ALL", "--cap-drop", "NET_RAW"]).0,
        format!("{:016x}", host_bounding & !(1 << 13)),
        "ALL in --cap-add still loses what --cap-drop names"
    );
    assert_eq!(
        run(&["--runtime", "runc"]),
        (docker_default.clone(), docker_default.clone())
    );
    let err = r.fails(&["run", "--rm", "--cap-add", "NOPE", &image, "true"]);
    assert!(err.contains("unknown capability"), "{err}");

    r.ok(&[
        "run",
        "-d",
        "--name",
        "capped",
        "--cap-drop",
        "NET_RAW",
        &image,
        "sleep",
        "60",
    ]);
    let (bounding, _) = caps(&r.ok(&["exec", "capped", "cat", "/proc/self/status"]));
    assert_eq!(
        bounding, "00000000a80405fb",
        "exec keeps the container's set"
    );
    r.ok(&["rm", "-f", "capped"]);
}
