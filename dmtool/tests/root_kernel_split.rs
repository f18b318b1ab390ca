//! A pool on one device split into metadata and data regions, handed to the real kernel's
//! dm-thin under qemu (`fixtures::kernel`): `pool start --backend kernel --device` puts a
//! `linear` device over each region and the `thin-pool` on them.
//!
//! The host makes the pool on one sparse file with dmtool and writes a thin; the guest gets
//! the file as `/dev/vda`, reads the thin through the kernel, writes and snapshots through
//! dmtool verbs, sees the offline tools and resizes refused, and stops the pool.
//! Back on the host, our reader gives the guest's checksums, the data region is where the
//! split says, and both checkers are clean on the metadata region. Privileged and slow.

use std::path::Path;

use fixtures::kernel;

mod common;

use common::{ok_stdout, run, DMTOOL};

const MIB: u64 = 1 << 20;
const THIN_BYTES: u64 = 8 * MIB;
const METADATA_BYTES: u64 = 8 * MIB;

const GUEST: &str = r#"
L="--device /dev/vda --state-dir /tmp/state"
mkdir -p /tmp/state
cat > /tmp/state/volumes.json <<'VOLUMES_EOF'
@VOLUMES@
VOLUMES_EOF

dmtool pool start --backend kernel $L
echo "KV mapper $(ls /dev/mapper | tr '\n' ' ')"
echo "BEGIN tables"
dmsetup table
echo "END tables"
dev=$(dmtool thin activate $L 1)
echo "KV dev1 $dev"
emit_sha t1 "$dev"

pattern guest-split 131072 > /tmp/p
dmtool thin write $L 1 --offset 1M --input /tmp/p
dmtool thin snap $L 2 1 --name snap
emit_sha t1_after "$(dmtool thin activate $L 1)"
emit_sha t2 "$(dmtool thin activate $L 2 --read-only)"

refused check_owned dmtool check /dev/vda
refused trim_owned dmtool trim $L
refused resize_meta dmtool pool resize $L --metadata-size 16M
refused resize_data dmtool pool resize $L --data-size 256M

dmtool pool stop --force $L
echo "KV mapper_after_stop $(ls /dev/mapper | tr '\n' ' ')"
dmtool check /dev/vda > /dev/null && echo "KV check ok"
echo "BEGIN volumes"
cat /tmp/state/volumes.json
echo "END volumes"
"#;

#[test]
fn root_kernel_takes_a_split_device_through_linear_regions() {
    if let Err(why) = kernel::available() {
        eprintln!("skipped: the kernel harness is unavailable: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let state = dir.path().join("state");
    let loc = [
        "--device",
        disk.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let dmtool = |verb: &[&str], rest: &[&str]| {
        let all: Vec<&str> = verb
            .iter()
            .chain(loc.iter())
            .chain(rest.iter())
            .copied()
            .collect();
        ok_stdout(run(&all), &all.join(" "))
    };

    dmtool(
        &["pool", "create"],
        &["--metadata-size", "8M", "--data-size", "128M"],
    );
    dmtool(
        &["thin", "create"],
        &["1", "--size", &THIN_BYTES.to_string(), "--name", "base"],
    );
    let input = dir.path().join("input");
    let origin = kernel::pattern("host-split", 3 * MIB as usize);
    std::fs::write(&input, &origin).unwrap();
    dmtool(
        &["thin", "write"],
        &["1", "--input", input.to_str().unwrap()],
    );
    let mut t1 = vec![0u8; THIN_BYTES as usize];
    t1[..origin.len()].copy_from_slice(&origin);

    let volumes = std::fs::read_to_string(state.join("volumes.json")).unwrap();
    let script = GUEST.replace("@VOLUMES@", volumes.trim_end());
    let guest = kernel::run_guest(&script, &[&disk], &[Path::new(DMTOOL)]).unwrap();
    assert!(guest.ok, "the guest failed\n{}", guest.report());
    let out = guest.output.clone();
    let report = guest.report();
    let sha = kernel::parse_sha_lines(&out).unwrap();
    let kv = kernel::kvs(&out);

    // The kernel's pool sits on one linear device per region, of the regions' sizes.
    assert!(
        kv["mapper"].contains("-tmeta") && kv["mapper"].contains("-tdata"),
        "{report}"
    );
    let tables = kernel::section(&out, "tables");
    let line = |suffix: &str| {
        tables
            .lines()
            .find(|l| l.contains(&format!("{suffix}: ")))
            .unwrap_or_else(|| panic!("no {suffix} in {tables}"))
            .split_once(": ")
            .unwrap()
            .1
            .to_string()
    };
    // `start length linear major:minor offset`, in sectors; the data region starts at the
    // first 64 KiB boundary after the metadata, here right after it.
    let meta = line("-tmeta");
    let data = line("-tdata");
    assert!(
        meta.starts_with(&format!("0 {} linear ", METADATA_BYTES / 512)) && meta.ends_with(" 0"),
        "{meta}"
    );
    assert!(
        data.starts_with(&format!("0 {} linear ", 128 * MIB / 512))
            && data.ends_with(&format!(" {}", METADATA_BYTES / 512)),
        "{data}"
    );
    assert!(kv["dev1"].starts_with("/dev/mapper/thinbox-"), "{report}");
    assert_eq!(
        sha["t1"],
        kernel::sha256_hex(&t1),
        "the kernel reads our thin\n{report}"
    );
    let before = t1.clone();
    t1[MIB as usize..MIB as usize + 131072]
        .copy_from_slice(&kernel::pattern("guest-split", 131072));
    assert_eq!(sha["t1_after"], kernel::sha256_hex(&t1), "{report}");
    assert_eq!(sha["t2"], kernel::sha256_hex(&t1), "the snapshot\n{report}");
    for (key, needle) in [
        ("check_owned", "active in the kernel"),
        ("trim_owned", "active in the kernel"),
        ("resize_meta", "cannot grow"),
        ("resize_data", "cannot grow while the kernel has it"),
    ] {
        let v = &kv[key];
        assert!(
            !v.starts_with("UNEXPECTED-SUCCESS") && v.contains(needle),
            "{key}: {v}\n{report}"
        );
    }
    assert!(!kv["mapper_after_stop"].contains("thinbox-"), "{report}");
    assert_eq!(kv["check"], "ok", "{report}");
    assert_ne!(before, t1);

    // Back on the host: the split reads back from what the kernel left.
    std::fs::write(state.join("volumes.json"), kernel::section(&out, "volumes")).unwrap();
    let read = |id: &str| kernel::sha256_hex(&dmtool(&["thin", "read"], &[id]));
    assert_eq!(read("1"), sha["t1_after"]);
    assert_eq!(read("2"), sha["t2"]);
    ok_stdout(run(&["check", disk.to_str().unwrap()]), "dmtool check");
    if fixtures::tools::available() {
        let region = dir.path().join("metadata-region");
        let bytes = std::fs::read(&disk).unwrap();
        std::fs::write(&region, &bytes[..METADATA_BYTES as usize]).unwrap();
        let tc = fixtures::tools::thin_check(&region, &[]);
        assert_eq!(tc.rc, 0, "thin_check: {tc:?}");
    }
}
