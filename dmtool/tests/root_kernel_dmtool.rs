//! dmtool's kernel backend against the real kernel: one boot of Linux with dm-thin under qemu
//! (`fixtures::kernel`), no dmsetup on our side.
//!
//! The host makes a pool with `dmtool pool create` on two sparse files and writes thins with
//! `dmtool thin write`; the guest gets the files as `/dev/vda` and `/dev/vdb`, the dmtool binary,
//! and the host's volume store (embedded in the guest script), and drives the pool through
//! `dmtool` verbs only, with the kernel as the owner. It prints the sha256 of every thin and the
//! volume store it ends with. Back on the host the volume store is put back, and `dmtool thin
//! read` must give exactly the guest's checksums, with `dmtool check` and `thin_check` clean.
//!
//! The other direction (a pool the kernel formatted opens with our engine) is
//! engine/tests/fixtures_pool.rs. Privileged and slow: named `root_`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fixtures::kernel;

mod common;

use common::{ok_stdout, run_in, DMTOOL};

const MIB: u64 = 1 << 20;
/// Each thin's size. Small, because the emulated CPU hashes slowly.
const THIN_BYTES: u64 = 16 * MIB;
const BS: usize = 64 << 10;

const GUEST: &str = r#"
L="--metadata /dev/vda --data /dev/vdb --state-dir /tmp/state"
mkdir -p /tmp/state
cat > /tmp/state/volumes.json <<'VOLUMES_EOF'
@VOLUMES@
VOLUMES_EOF

start=$(date +%s)
dmtool pool start --backend kernel $L
echo "BEGIN status"
dmtool pool status $L
echo "END status"

for t in 1 2 3; do
  dev=$(dmtool thin activate $L $t)
  echo "KV dev$t $dev"
  emit_sha t$t "$dev"
done

# New thin, written and read through dmtool (the kernel's device under the hood).
dmtool thin create $L 4 --size 16M --name fresh
pattern guest-four 262144 > /tmp/p4
dmtool thin write $L 4 --offset 1M --input /tmp/p4
dmtool thin read $L 4 > /tmp/t4
emit_sha t4_read /tmp/t4
echo "KV t4_active_after_io $(ls /dev/mapper | grep -c -- '-4$' || true)"

# Snapshot of an active origin, then the origin moves on.
dmtool thin snap $L 5 1 --name snap-of-base
pattern after-snap 65536 > /tmp/p1
dmtool thin write $L 1 --input /tmp/p1
emit_sha t1_after "$(dmtool thin activate $L 1)"
dev5=$(dmtool thin activate $L 5 --read-only)
emit_sha t5 "$dev5"

# Discard four whole blocks of thin 4 from 1M+128k: two it mapped (freed), two it did not.
dev4=$(dmtool thin activate $L 4)
blkdiscard -o 1179648 -l 262144 "$dev4"
emit_sha t4 "$dev4"

# Delete: refused while active, done after deactivating.
refused delete_active dmtool thin delete $L 3
dmtool thin deactivate $L 3
dmtool thin delete $L 3

echo "BEGIN ls"
dmtool thin ls --json $L
echo "END ls"

# A busy thin refuses deactivation; the offline checker refuses a kernel-owned pool.
exec 3<"$dev5"
refused deactivate_busy dmtool thin deactivate $L 5
exec 3<&-
refused check_owned dmtool check /dev/vda
refused stop_active dmtool pool stop $L

for t in 1 2 4 5; do dmtool thin deactivate $L $t; done
dmtool pool stop $L
echo "KV mapper_after_stop $(ls /dev/mapper | tr '\n' ' ')"
# A pool on regular files: loop devices attached at start, found again by backing file,
# detached at stop (--force deactivates the idle thin).
F="--pool /tmp/filepool"
dmtool pool create $F --data-size 64M --metadata-size 8M
dmtool thin create $F 1 --size 4M
dmtool pool start --backend kernel $F
echo "KV file_loops $(cat /sys/block/loop*/loop/backing_file 2>/dev/null | tr '\n' ' ')"
echo "KV file_dev $(dmtool thin activate $F 1)"
dmtool pool stop --force $F
echo "KV file_loops_after $(cat /sys/block/loop*/loop/backing_file 2>/dev/null | tr '\n' ' ')"
dmtool check /tmp/filepool/metadata > /dev/null && echo "KV file_check ok"
echo "KV guest_seconds $(( $(date +%s) - start ))"
echo "BEGIN volumes"
cat /tmp/state/volumes.json
echo "END volumes"
"#;

#[test]
fn root_kernel_dmtool_drives_the_pool_through_device_mapper() {
    if let Err(why) = kernel::available() {
        eprintln!("skipped: the kernel harness is unavailable: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_root = dir.path().join("run");
    let meta = dir.path().join("metadata");
    let data = dir.path().join("data");
    let state = dir.path().join("state");
    let loc: Vec<String> = [
        "--metadata",
        meta.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|s| s.to_string())
            .chain(loc.iter().cloned())
            .collect()
    };
    let run = |args: &[&str]| {
        let all = with(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        ok_stdout(run_in(&all, &run_root), &all.join(" "))
    };

    // Host: the pool and three thins, written by our engine through dmtool.
    run(&[
        "pool",
        "create",
        "--metadata-size",
        "64M",
        "--data-size",
        "512M",
    ]);
    let size = THIN_BYTES.to_string();
    run(&["thin", "create", "1", "--size", &size, "--name", "base"]);
    run(&["thin", "create", "3", "--size", &size]);
    let input = dir.path().join("input");
    let write = |id: &str, text: &str, len: usize, offset: u64| {
        std::fs::write(&input, kernel::pattern(text, len)).unwrap();
        run(&[
            "thin",
            "write",
            id,
            "--offset",
            &offset.to_string(),
            "--input",
            input.to_str().unwrap(),
        ]);
    };
    write("1", "host-base", 40 * BS, 0);
    write(
        "1",
        "host-base-tail",
        3 * BS + 512,
        THIN_BYTES - 4 * BS as u64,
    );
    run(&["thin", "snap", "2", "1", "--name", "base-snap"]);
    write("2", "host-snap-cow", 2 * BS, 8 * BS as u64);
    write("3", "host-three", 100 * BS, 3 * MIB);
    let host_sha = |id: &str| kernel::sha256_hex(&run(&["thin", "read", id]));
    let before: BTreeMap<&str, String> = ["1", "2", "3"].map(|t| (t, host_sha(t))).into();

    let volumes = std::fs::read_to_string(state.join("volumes.json")).unwrap();
    let script = GUEST.replace("@VOLUMES@", volumes.trim_end());
    let booted = Instant::now();
    let guest = kernel::run_guest(&script, &[&meta, &data], &[Path::new(DMTOOL)]).unwrap();
    eprintln!("guest run took {:.1} s", booted.elapsed().as_secs_f64());
    assert!(guest.ok, "the guest failed\n{}", guest.report());
    let out = guest.output.clone();
    let sha = kernel::parse_sha_lines(&out).unwrap();
    let kv = kernel::kvs(&out);
    let report = guest.report();

    // The kernel read what our engine wrote.
    for t in ["1", "2", "3"] {
        assert_eq!(sha[&format!("t{t}")], before[t], "thin {t}\n{report}");
    }
    let status = kernel::section(&out, "status");
    assert!(
        status.contains("Owner:") && status.contains("kernel device-mapper, /dev/mapper/thinbox-"),
        "{status}"
    );
    assert!(
        status.lines().next().unwrap().contains(" thin-pool "),
        "{status}"
    );
    assert!(kv["dev1"].starts_with("/dev/mapper/thinbox-"), "{report}");

    // Data written in the guest, checked against what the host computes for the same writes.
    let mut t4 = vec![0u8; THIN_BYTES as usize];
    t4[MIB as usize..MIB as usize + 4 * BS].copy_from_slice(&kernel::pattern("guest-four", 4 * BS));
    assert_eq!(sha["t4_read"], kernel::sha256_hex(&t4), "{report}");
    // IO on an inactive thin activates it for the call only.
    assert_eq!(kv["t4_active_after_io"], "0", "{report}");
    let discard_at = 1179648usize;
    t4[discard_at..discard_at + 4 * BS].fill(0);
    assert_eq!(sha["t4"], kernel::sha256_hex(&t4), "{report}");
    assert_eq!(
        sha["t5"], before["1"],
        "the snapshot keeps the origin's old data\n{report}"
    );
    assert_ne!(sha["t1_after"], before["1"], "{report}");

    for (key, needle) in [
        ("delete_active", "deactivate it first"),
        ("deactivate_busy", "open"),
        (
            "check_owned",
            "active in the kernel as /dev/mapper/thinbox-",
        ),
        ("stop_active", "thin devices are active"),
    ] {
        let v = &kv[key];
        assert!(
            !v.starts_with("UNEXPECTED-SUCCESS") && v.contains(needle),
            "{key}: {v}\n{report}"
        );
    }
    assert!(!kv["mapper_after_stop"].contains("thinbox-"), "{report}");

    assert!(
        kv["file_loops"].contains("/tmp/filepool/metadata")
            && kv["file_loops"].contains("/tmp/filepool/data"),
        "{report}"
    );
    assert!(
        kv["file_dev"].starts_with("/dev/mapper/thinbox-"),
        "{report}"
    );
    assert!(
        !kv["file_loops_after"].contains("/tmp/filepool"),
        "{report}"
    );
    assert_eq!(kv["file_check"], "ok", "{report}");

    let ls: serde_json::Value = serde_json::from_str(kernel::section(&out, "ls")).unwrap();
    let rows = ls.as_array().unwrap();
    let ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [1, 2, 4, 5], "{report}");
    let row = |id: u64| rows.iter().find(|r| r["id"] == id).unwrap();
    assert_eq!(row(4)["name"], "fresh");
    assert_eq!(row(5)["origin"], 1);
    assert_eq!(row(5)["name"], "snap-of-base");
    // Thin 4: four blocks written, the last two of them discarded.
    assert_eq!(row(4)["mapped_blocks"], 2, "{report}");
    // Thin 1: 40 + 4 blocks written on the host (tail straddles 4 blocks), one rewritten.
    assert_eq!(row(1)["mapped_blocks"], 44, "{report}");
    let device = row(1)["device"].as_str().unwrap_or_default();
    assert!(device.starts_with("/dev/mapper/thinbox-"), "{report}");

    // Back on the host: the guest's volume store, our reader, both checkers.
    std::fs::write(state.join("volumes.json"), kernel::section(&out, "volumes")).unwrap();
    for (t, name) in [("1", "t1_after"), ("2", "t2"), ("4", "t4"), ("5", "t5")] {
        assert_eq!(host_sha(t), sha[name], "thin {t} read on the host");
    }
    let gone = run_in(
        &with(&["thin", "read", "3"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &run_root,
    );
    assert!(!gone.status.success(), "thin 3 was deleted in the guest");
    ok_stdout(
        run_in(&["check", meta.to_str().unwrap()], &run_root),
        "dmtool check",
    );
    if fixtures::tools::available() {
        let tc = fixtures::tools::thin_check(&meta, &[]);
        assert_eq!(tc.rc, 0, "thin_check: {tc:?}");
    } else {
        eprintln!("thin_check is not installed; only our checker ran");
    }
    let ls = String::from_utf8(run(&["thin", "ls", "--json"])).unwrap();
    assert!(ls.contains("\"fresh\""), "{ls}");
}

/// The host has no device-mapper: `--backend auto` takes the userspace daemon.
#[test]
fn root_backend_auto_falls_back_to_userspace_without_device_mapper() {
    if engine::activate::kernel::KernelPool::available() {
        eprintln!("skipped: this host has device-mapper, so auto means the kernel");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run_root = dir.path().join("run");
    let pool = dir.path().join("pool");
    let p = pool.to_str().unwrap();
    ok_stdout(
        run_in(
            &[
                "pool",
                "create",
                "--pool",
                p,
                "--data-size",
                "64M",
                "--metadata-size",
                "8M",
            ],
            &run_root,
        ),
        "pool create",
    );
    ok_stdout(
        run_in(
            &["thin", "create", "--pool", p, "1", "--size", "4M"],
            &run_root,
        ),
        "create",
    );
    let started = run_in(
        &["pool", "start", "--backend", "auto", "--pool", p],
        &run_root,
    );
    let guard = StopOnDrop(p.to_string(), run_root.clone());
    ok_stdout(started, "pool start --backend auto");
    let status = String::from_utf8(ok_stdout(
        run_in(&["pool", "status", "--pool", p], &run_root),
        "status",
    ))
    .unwrap();
    assert!(status.contains("pool daemon, pid"), "{status}");
    let dev = String::from_utf8(ok_stdout(
        run_in(&["thin", "activate", "--pool", p, "1"], &run_root),
        "activate",
    ))
    .unwrap();
    assert!(dev.trim().starts_with("/dev/loop"), "{dev}");
    ok_stdout(
        run_in(&["thin", "deactivate", "--pool", p, "1"], &run_root),
        "deactivate",
    );
    drop(guard);
}

struct StopOnDrop(String, PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = run_in(&["pool", "stop", "--force", "--pool", &self.0], &self.1);
    }
}
