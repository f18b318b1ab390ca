//! Capabilities a container's processes keep: Docker's default set (`CapBnd
//! 00000000a80425fb`), changed by `--cap-add` and `--cap-drop` (names with or without `CAP_`,
//! any case, or `ALL`). The built-in runner drops the rest from the bounding set and, for
//! root, from the effective, permitted and inheritable sets; a non-root user starts with none
//! effective (as Docker since 20.10); the OCI bundle carries the same list.

use anyhow::bail;

/// Capability names by number (linux/capability.h, up to CAP_CHECKPOINT_RESTORE).
const NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Docker's default capabilities.
const DEFAULT: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Every capability this table knows.
const ALL: u64 = (1 << NAMES.len()) - 1;

fn number(name: &str) -> anyhow::Result<u64> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    match NAMES.iter().position(|n| *n == bare) {
        Some(i) => Ok(i as u64),
        None => bail!("unknown capability: {name:?}"),
    }
}

fn mask_of(names: &[&str]) -> u64 {
    names
        .iter()
        .filter_map(|n| number(n).ok())
        .fold(0, |m, n| m | 1 << n)
}

/// The set a container keeps, by Docker's rules: with `ALL` in `add`, everything but `drop`;
/// with `ALL` in `drop`, exactly `add`; otherwise the default minus `drop` plus `add`.
pub fn resolve(add: &[String], drop: &[String]) -> anyhow::Result<u64> {
    let is_all = |n: &String| n.eq_ignore_ascii_case("ALL");
    let mask_of_list = |list: &[String]| -> anyhow::Result<u64> {
        list.iter()
            .filter(|n| !is_all(n))
            .try_fold(0, |m, n| Ok(m | 1 << number(n)?))
    };
    let (add_mask, drop_mask) = (mask_of_list(add)?, mask_of_list(drop)?);
    Ok(if add.iter().any(is_all) {
        ALL & !drop_mask
    } else if drop.iter().any(is_all) {
        add_mask
    } else {
        (mask_of(&DEFAULT) & !drop_mask) | add_mask
    })
}

/// `CAP_*` names of `mask`, by number (the OCI spec's form).
pub fn names(mask: u64) -> Vec<String> {
    NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, n)| format!("CAP_{n}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_dockers_bounding_set() {
        assert_eq!(resolve(&[], &[]).unwrap(), 0xa804_25fb);
    }

    #[test]
    fn add_and_drop_take_names_in_any_form() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mask = resolve(&s(&["sys_admin"]), &s(&["CAP_NET_RAW", "mknod"])).unwrap();
        assert_ne!(mask & (1 << 21), 0);
        assert_eq!(mask & (1 << 13 | 1 << 27), 0);
        assert_eq!(resolve(&s(&["CHOWN"]), &s(&["ALL"])).unwrap(), 1);
        assert_eq!(resolve(&s(&["ALL"]), &[]).unwrap(), ALL);
        // ALL in --cap-add still loses what --cap-drop names.
        assert_eq!(
            resolve(&s(&["ALL"]), &s(&["NET_RAW"])).unwrap(),
            ALL & !(1 << 13)
        );
        assert!(resolve(&s(&["NOPE"]), &[]).is_err());
        assert_eq!(names(1 | 1 << 21), ["CAP_CHOWN", "CAP_SYS_ADMIN"]);
    }
}
