//! `tools::check` and `tools::dump` against the fixture images: the dump must equal what the
//! real thin_dump 0.9.0 printed, byte for byte; the check must pass every fixture and agree
//! with thin_check and the independent reader; and damaged images must be reported (with the
//! block and the damage) without a panic, a hang or an unbounded allocation.

use std::time::{Duration, Instant};

use engine::block::{checksum, seal, BlockKind, BLOCK_SIZE};
use engine::io::{BlockDevice, MemDevice};
use engine::tools::check::{check, CheckOptions, Report};
use engine::tools::dump::{dump, DumpError, DumpFormat, DumpOptions};
use engine::{Damage, Error};
use fixtures::thin::{self, ToolRun};
use serde_json::Value as Json;

// ---- helpers -------------------------------------------------------------------------------

fn device(name: &str) -> MemDevice {
    MemDevice::from_bytes(&thin::metadata_image(name))
}

fn dump_to_string(dev: &dyn BlockDevice, opts: &DumpOptions) -> Result<String, DumpError> {
    let mut out = Vec::new();
    dump(dev, opts, &mut out)?;
    Ok(String::from_utf8(out).expect("the dump is ascii"))
}

fn json_u64(v: &Json) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("expected a number in expect.json, got {v}"))
}

fn held_root(name: &str) -> u64 {
    json_u64(&thin::expect(name)["superblock"]["held_root"])
}

/// Our dump options for a recorded `thin_dump` command line, or `None` when our API cannot
/// express it (`-mN` naming a block other than the held root, which thin_dump refuses).
fn dump_options(command: &str, held_root: u64) -> Option<DumpOptions> {
    let mut words = command.split_whitespace();
    if words.next()? != "thin_dump" {
        return None;
    }
    let words: Vec<&str> = words.collect();
    let (_file, flags) = words.split_last()?;
    let mut opts = DumpOptions::default();
    let mut it = flags.iter();
    while let Some(&w) = it.next() {
        match w {
            "-f" | "--format" => {
                opts.format = match *it.next()? {
                    "human_readable" => DumpFormat::HumanReadable,
                    "xml" => DumpFormat::Xml,
                    _ => return None,
                }
            }
            "-m" | "--metadata-snap" => opts.use_metadata_snap = true,
            "--skip-mappings" => opts.skip_mappings = true,
            "--dev-id" => opts.dev_id = Some(it.next()?.parse().ok()?),
            w => {
                let block: u64 = w.strip_prefix("-m")?.parse().ok()?;
                if block != held_root {
                    return None;
                }
                opts.use_metadata_snap = true;
            }
        }
    }
    Some(opts)
}

fn describe(report: &Report) -> String {
    let mut s = format!(
        "transaction {:?}, {} findings ({} errors suppressed):\n",
        report.transaction_id,
        report.findings.len(),
        report.suppressed_errors
    );
    for f in &report.findings {
        s.push_str(&format!("  {f}\n"));
    }
    s
}

/// Asserts that `report` has an error at `block` whose damage satisfies `pred`.
fn assert_error(report: &Report, block: u64, pred: impl Fn(&Damage) -> bool) {
    assert!(
        !report.is_clean(),
        "damage went unnoticed: {}",
        describe(report)
    );
    let found = report
        .errors()
        .any(|f| f.block == Some(block) && pred(&f.damage));
    assert!(
        found,
        "no matching error at block {block}; {}",
        describe(report)
    );
}

fn space_map_says(text: &'static str) -> impl Fn(&Damage) -> bool {
    move |d| matches!(d, Damage::SpaceMap(s) if s.contains(text))
}

/// A fixture image to damage.
struct Image {
    bytes: Vec<u8>,
}

impl Image {
    fn new(name: &str) -> Image {
        Image {
            bytes: thin::metadata_image(name),
        }
    }

    fn block_mut(&mut self, loc: u64) -> &mut [u8; BLOCK_SIZE] {
        let at = loc as usize * BLOCK_SIZE;
        (&mut self.bytes[at..at + BLOCK_SIZE])
            .try_into()
            .expect("one block")
    }

    fn u32_at(&self, loc: u64, offset: usize) -> u32 {
        let at = loc as usize * BLOCK_SIZE + offset;
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(&self, loc: u64, offset: usize) -> u64 {
        let at = loc as usize * BLOCK_SIZE + offset;
        u64::from_le_bytes(self.bytes[at..at + 8].try_into().expect("8 bytes"))
    }

    fn put_u32(&mut self, loc: u64, offset: usize, v: u32) {
        self.block_mut(loc)[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u64(&mut self, loc: u64, offset: usize, v: u64) {
        self.block_mut(loc)[offset..offset + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Byte offset of value `i` of the node at `loc`.
    fn value_offset(&self, loc: u64, i: usize) -> usize {
        let max = self.u32_at(loc, 20) as usize;
        let value_size = self.u32_at(loc, 24) as usize;
        32 + 8 * max + value_size * i
    }

    fn key_offset(i: usize) -> usize {
        32 + 8 * i
    }

    fn reseal(&mut self, loc: u64, kind: BlockKind) {
        seal(self.block_mut(loc), loc, kind);
    }

    fn device(&self) -> MemDevice {
        MemDevice::from_bytes(&self.bytes)
    }

    fn check(&self) -> Report {
        check(&self.device(), &CheckOptions::default())
    }

    fn dump(&self) -> Result<String, DumpError> {
        dump_to_string(&self.device(), &DumpOptions::default())
    }
}

fn assert_dump_corrupt(image: &Image, pred: impl Fn(u64, &Damage) -> bool) {
    match image.dump() {
        Err(DumpError::Metadata(Error::Corrupt { block, damage })) if pred(block.0, &damage) => {}
        other => panic!("unexpected dump result: {other:?}"),
    }
}

// ---- fixtures ------------------------------------------------------------------------------

#[test]
fn every_fixture_is_present() {
    let names = thin::names();
    assert_eq!(names.len(), 12, "{names:?}");
    for name in &names {
        assert!(
            !thin::tool_runs(name).is_empty(),
            "{name} has no recorded tool runs"
        );
    }
    assert!(thin::data_image("kernel-scenario").is_some());
    assert!(thin::data_image("two-devs").is_none());
}

#[test]
fn dump_equals_the_recorded_thin_dump_output() {
    let mut compared = 0;
    for name in thin::names() {
        let dev = device(&name);
        let held = held_root(&name);
        let mut formats = Vec::new();
        for run in thin::tool_runs(&name) {
            if run.rc != 0 {
                continue;
            }
            let Some(opts) = dump_options(&run.command, held) else {
                continue;
            };
            let ours = dump_to_string(&dev, &opts)
                .unwrap_or_else(|e| panic!("{name}: `{}` failed: {e}", run.command));
            assert_eq!(ours, run.stdout, "{name}: `{}` differs", run.command);
            formats.push(opts.format);
            compared += 1;
        }
        assert!(
            formats.contains(&DumpFormat::Xml),
            "{name}: no xml dump was compared"
        );
        if name != "big" && name != "kernel-scenario" {
            assert!(
                formats.contains(&DumpFormat::HumanReadable),
                "{name}: no human_readable dump was compared"
            );
        }
    }
    // 12 xml, 10 human_readable, and the -m runs of metadata-snap (2) and kernel-scenario.
    assert_eq!(compared, 25);
}

#[test]
fn dump_of_metadata_snap_needs_a_held_snapshot() {
    let opts = DumpOptions {
        use_metadata_snap: true,
        ..DumpOptions::default()
    };
    match dump_to_string(&device("two-devs"), &opts) {
        Err(DumpError::Metadata(Error::NoMetadataSnap)) => {}
        other => panic!("unexpected: {other:?}"),
    }
}

#[test]
fn dump_selects_one_device_and_skips_mappings() {
    let dev = device("two-devs");
    let only7 = DumpOptions {
        dev_id: Some(7),
        ..DumpOptions::default()
    };
    assert_eq!(
        dump_to_string(&dev, &only7).expect("dump"),
        "<superblock uuid=\"\" time=\"1\" transaction=\"5\" flags=\"0\" version=\"1\" \
         data_block_size=\"128\" nr_data_blocks=\"1024\">\n  <device dev_id=\"7\" \
         mapped_blocks=\"0\" transaction=\"4\" creation_time=\"1\" snap_time=\"1\">\n  \
         </device>\n</superblock>\n"
    );
    let skip = DumpOptions {
        skip_mappings: true,
        format: DumpFormat::HumanReadable,
        ..DumpOptions::default()
    };
    let text = dump_to_string(&dev, &skip).expect("dump");
    assert!(!text.contains("->"), "{text}");
    assert!(text.ends_with("snap time: 1\n\nend superblock\n"), "{text}");
}

/// The real tools, where installed, for what the recordings do not cover: human_readable for
/// `big` and `kernel-scenario`, `--skip-mappings`, `--dev-id`, `-m`.
#[test]
fn dump_equals_the_live_thin_dump() {
    if !fixtures::tools::available() {
        eprintln!("thin-provisioning-tools not installed: skipped");
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    for name in thin::names() {
        let path = thin::write_image(&name, tmp.path());
        let dev = device(&name);
        let mut variants: Vec<Vec<&str>> = vec![
            vec!["-f", "human_readable"],
            vec!["--skip-mappings"],
            vec!["--dev-id", "2"],
            vec!["--dev-id", "2", "-f", "human_readable"],
        ];
        if held_root(&name) != 0 {
            variants.push(vec!["-m"]);
            variants.push(vec!["-m", "-f", "human_readable"]);
        }
        for args in variants {
            let real: ToolRun = fixtures::tools::thin_dump(&path, &args);
            assert_eq!(
                real.rc, 0,
                "{name}: {} failed: {}",
                real.command, real.stderr
            );
            let opts = dump_options(&format!("thin_dump {} x", args.join(" ")), 0)
                .expect("options we can express");
            let ours = dump_to_string(&dev, &opts).expect("our dump");
            assert_eq!(ours, real.stdout, "{name}: {} differs", real.command);
        }
    }
}

#[test]
fn check_passes_every_fixture_and_agrees_with_thin_check() {
    for name in thin::names() {
        let dev = device(&name);
        let expect = thin::expect(&name);
        let report = check(&dev, &CheckOptions::default());
        assert!(report.is_clean(), "{name}: {}", describe(&report));
        let tx = json_u64(&expect["superblock"]["trans_id"]);
        assert_eq!(report.transaction_id, Some(tx), "{name}");
        let flags = json_u64(&expect["superblock"]["flags"]);
        assert_eq!(report.needs_check, flags & 1 == 1, "{name}");

        // The metadata free count is the one the bitmaps give (the reader's counts).
        let nr_blocks = json_u64(&expect["metadata_sm_root"]["nr_blocks"]);
        let used: u64 = expect["metadata_ref_counts_rle"]
            .as_array()
            .expect("rle list")
            .iter()
            .map(|run| json_u64(&run[1]))
            .sum();
        assert_eq!(report.metadata_nr_blocks, Some(nr_blocks), "{name}");
        assert_eq!(
            report.metadata_free_blocks,
            Some(nr_blocks - used),
            "{name}"
        );

        // Warnings exactly where the reader saw thin_restore's hint quirks (and NEEDS_CHECK).
        let quirks = expect["reader_warnings"]
            .as_array()
            .expect("warning list")
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("nr_allocated")));
        let hint_warnings = report
            .warnings()
            .filter(|f| matches!(f.damage, Damage::SpaceMap(_)))
            .count();
        assert_eq!(hint_warnings > 0, quirks, "{name}: {}", describe(&report));
        let other_warnings = report.warnings().count() - hint_warnings;
        assert_eq!(
            other_warnings,
            usize::from(report.needs_check),
            "{name}: {}",
            describe(&report)
        );

        for run in thin::tool_runs(&name) {
            let Some(args) = run.command.strip_prefix("thin_check ") else {
                continue;
            };
            let snap = args.split_whitespace().any(|a| a == "-m");
            let opts = CheckOptions {
                use_metadata_snap: snap,
                ..CheckOptions::default()
            };
            let ours = if snap {
                check(&dev, &opts)
            } else {
                report.clone()
            };
            assert_eq!(ours.is_clean(), run.rc == 0, "{name}: `{}`", run.command);
            let nr = ours.metadata_nr_blocks.expect("superblock read");
            let stdout = format!(
                "TRANSACTION_ID={}\nMETADATA_FREE_BLOCKS={}\n",
                ours.transaction_id.expect("transaction id"),
                nr - 1
            );
            assert_eq!(stdout, run.stdout, "{name}: `{}`", run.command);
        }
    }
}

#[test]
fn check_of_the_metadata_snapshot_reads_the_held_copy() {
    let opts = CheckOptions {
        use_metadata_snap: true,
        ..CheckOptions::default()
    };
    let report = check(&device("kernel-scenario"), &opts);
    assert!(report.is_clean(), "{}", describe(&report));
    assert_eq!(report.transaction_id, Some(7));

    let report = check(&device("two-devs"), &opts);
    assert!(!report.is_clean());
    assert_eq!(report.transaction_id, None);
}

#[test]
fn check_with_skip_mappings_passes_every_fixture() {
    let opts = CheckOptions {
        skip_mappings: true,
        ..CheckOptions::default()
    };
    for name in thin::names() {
        let report = check(&device(&name), &opts);
        assert!(report.is_clean(), "{name}: {}", describe(&report));
    }
}

#[test]
fn needs_check_is_a_warning_not_an_error() {
    let report = check(&device("needs-check"), &CheckOptions::default());
    assert!(report.is_clean());
    assert!(report.needs_check);
    assert!(report.warnings().any(|f| f.block == Some(0)));
}

// ---- corruption ----------------------------------------------------------------------------

// two-devs: 0 superblock, 1 metadata index, 2 metadata ref-count tree, 3 metadata bitmap,
// 4 data index tree, 5 data ref-count tree, 6 details leaf, 7 top-level leaf, 8 device 7's
// empty root, 9 data bitmap, 10 and 11 the mapping leaves of devices 1 and 2.
// kernel-snap-base: device 1's root is internal node 10 over leaves 11..14.

#[test]
fn flipped_byte_in_a_node_is_a_bad_checksum() {
    let mut image = Image::new("two-devs");
    image.block_mut(10)[100] ^= 0xff;
    let report = image.check();
    assert_error(&report, 10, |d| {
        matches!(
            d,
            Damage::BadChecksum {
                kind: "btree node",
                ..
            }
        )
    });
    assert_dump_corrupt(&image, |b, d| {
        b == 10 && matches!(d, Damage::BadChecksum { .. })
    });
}

#[test]
fn node_sealed_with_the_bitmap_salt_is_a_bad_checksum() {
    let mut image = Image::new("two-devs");
    image.reseal(10, BlockKind::Bitmap);
    assert_error(&image.check(), 10, |d| {
        matches!(d, Damage::BadChecksum { .. })
    });
}

#[test]
fn bitmap_and_index_checksums_are_checked() {
    for (loc, kind) in [
        (3, BlockKind::Node),
        (9, BlockKind::Index),
        (1, BlockKind::Bitmap),
    ] {
        let mut image = Image::new("two-devs");
        image.reseal(loc, kind);
        assert_error(&image.check(), loc, |d| {
            matches!(d, Damage::BadChecksum { .. })
        });
    }
}

#[test]
fn node_claiming_another_location_is_reported() {
    let mut image = Image::new("two-devs");
    image.put_u64(10, 8, 99);
    let csum = checksum(image.block_mut(10), BlockKind::Node);
    image.put_u32(10, 0, csum);
    assert_error(&image.check(), 10, |d| {
        matches!(d, Damage::WrongLocation { found: 99, .. })
    });
    assert_dump_corrupt(&image, |b, d| {
        b == 10 && matches!(d, Damage::WrongLocation { .. })
    });
}

#[test]
fn superblock_checksum_and_location_are_checked() {
    let mut image = Image::new("two-devs");
    image.block_mut(0)[44] ^= 1;
    let report = image.check();
    assert_error(&report, 0, |d| {
        matches!(
            d,
            Damage::BadChecksum {
                kind: "superblock",
                ..
            }
        )
    });
    assert_eq!(report.transaction_id, None);

    let mut image = Image::new("two-devs");
    image.put_u64(0, 8, 3);
    let csum = checksum(image.block_mut(0), BlockKind::Superblock);
    image.put_u32(0, 0, csum);
    let report = image.check();
    assert_error(&report, 0, |d| {
        matches!(d, Damage::WrongLocation { found: 3, .. })
    });
    assert_eq!(report.transaction_id, Some(5), "the rest is still checked");
}

#[test]
fn child_pointer_past_the_end_is_reported() {
    let mut image = Image::new("kernel-snap-base");
    let at = image.value_offset(10, 1);
    image.put_u64(10, at, 5000);
    image.reseal(10, BlockKind::Node);
    assert_error(&image.check(), 10, |d| *d == Damage::PointerPastEnd(5000));
    assert_dump_corrupt(&image, |b, d| b == 10 && *d == Damage::PointerPastEnd(5000));

    // A device root in the top-level leaf.
    let mut image = Image::new("two-devs");
    let at = image.value_offset(7, 0);
    image.put_u64(7, at, 1 << 40);
    image.reseal(7, BlockKind::Node);
    assert_error(&image.check(), 7, |d| *d == Damage::PointerPastEnd(1 << 40));
    assert_dump_corrupt(&image, |b, d| {
        b == 7 && *d == Damage::PointerPastEnd(1 << 40)
    });
}

#[test]
fn child_pointer_to_the_superblock_is_reported() {
    let mut image = Image::new("kernel-snap-base");
    let at = image.value_offset(10, 2);
    image.put_u64(10, at, 0);
    image.reseal(10, BlockKind::Node);
    assert_error(&image.check(), 10, |d| *d == Damage::PointerToSuperblock);
    assert_dump_corrupt(&image, |b, d| b == 10 && *d == Damage::PointerToSuperblock);
}

#[test]
fn cycle_through_an_ancestor_is_reported() {
    let mut image = Image::new("kernel-snap-base");
    let at = image.value_offset(10, 1);
    image.put_u64(10, at, 10);
    image.reseal(10, BlockKind::Node);
    let report = image.check();
    assert_error(&report, 10, |d| *d == Damage::TooDeep);
    assert!(image.dump().is_err());

    // A device root that is the top-level leaf itself.
    let mut image = Image::new("two-devs");
    let at = image.value_offset(7, 1);
    image.put_u64(7, at, 7);
    image.reseal(7, BlockKind::Node);
    assert_error(&image.check(), 7, |d| *d == Damage::UnexpectedSharing);
    assert!(image.dump().is_err());
}

#[test]
fn subtree_reached_twice_within_one_tree_is_reported() {
    let mut image = Image::new("kernel-snap-base");
    let first = image.u64_at(10, image.value_offset(10, 0));
    let at = image.value_offset(10, 1);
    image.put_u64(10, at, first);
    image.reseal(10, BlockKind::Node);
    assert_error(&image.check(), 10, |d| *d == Damage::UnexpectedSharing);
    assert!(image.dump().is_err());
}

#[test]
fn swapped_keys_are_out_of_order() {
    let mut image = Image::new("two-devs");
    let (k0, k1) = (
        image.u64_at(10, Image::key_offset(0)),
        image.u64_at(10, Image::key_offset(1)),
    );
    image.put_u64(10, Image::key_offset(0), k1);
    image.put_u64(10, Image::key_offset(1), k0);
    image.reseal(10, BlockKind::Node);
    assert_error(&image.check(), 10, |d| *d == Damage::KeysOutOfOrder);
    assert_dump_corrupt(&image, |b, d| b == 10 && *d == Damage::KeysOutOfOrder);
}

#[test]
fn separator_above_the_child_is_reported() {
    let mut image = Image::new("kernel-snap-base");
    let child = image.u64_at(10, image.value_offset(10, 1));
    let key = image.u64_at(10, Image::key_offset(1));
    image.put_u64(10, Image::key_offset(1), key + 1);
    image.reseal(10, BlockKind::Node);
    assert_error(
        &image.check(),
        child,
        |d| matches!(d, Damage::KeyOutsideParentRange { key: k, .. } if *k == key),
    );
    assert_dump_corrupt(&image, |b, d| {
        b == child && matches!(d, Damage::KeyOutsideParentRange { .. })
    });
}

#[test]
fn underfull_leaf_below_the_root_is_reported() {
    let mut image = Image::new("kernel-snap-base");
    image.put_u32(12, 16, 1);
    image.reseal(12, BlockKind::Node);
    assert_error(&image.check(), 12, |d| {
        *d == Damage::TooFewEntries { nr: 1, min: 84 }
    });
}

#[test]
fn wrong_leaf_value_size_is_reported() {
    let mut image = Image::new("two-devs");
    // The details leaf turned into a leaf of 8-byte values (still a valid header).
    image.put_u32(6, 20, 252);
    image.put_u32(6, 24, 8);
    image.reseal(6, BlockKind::Node);
    let expected = Damage::ValueSizeMismatch {
        expected: 24,
        found: 8,
    };
    assert_error(&image.check(), 6, |d| *d == expected);
    assert_dump_corrupt(&image, |b, d| b == 6 && *d == expected);
}

#[test]
fn mapping_past_the_data_device_is_reported() {
    let mut image = Image::new("two-devs");
    let at = image.value_offset(10, 3);
    image.put_u64(10, at, 5000 << 24);
    image.reseal(10, BlockKind::Node);
    assert_error(&image.check(), 10, |d| *d == Damage::DataBlockPastEnd(5000));
}

#[test]
fn wrong_mapped_blocks_is_reported() {
    let mut image = Image::new("two-devs");
    let at = image.value_offset(6, 0);
    image.put_u64(6, at, 111);
    image.reseal(6, BlockKind::Node);
    assert_error(
        &image.check(),
        6,
        |d| matches!(d, Damage::Other(s) if s.contains("mapped_blocks")),
    );
}

#[test]
fn device_missing_from_the_mapping_tree_is_reported() {
    let mut image = Image::new("two-devs");
    // Drop device 7 (the last entry) from the top-level leaf: its root becomes a leak too.
    image.put_u32(7, 16, 2);
    image.reseal(7, BlockKind::Node);
    let report = image.check();
    assert_error(
        &report,
        6,
        |d| matches!(d, Damage::Other(s) if s.contains("device 7")),
    );
    assert_error(&report, 8, space_map_says("leaked"));
    assert_dump_corrupt(&image, |b, d| b == 7 && matches!(d, Damage::Other(_)));
}

#[test]
fn metadata_overflow_count_too_high_is_reported() {
    // three-snaps: root 10 is shared by four devices, so it has count 4 in the metadata
    // ref-count tree (block 2, one entry).
    let mut image = Image::new("three-snaps");
    assert_eq!(image.u64_at(2, Image::key_offset(0)), 10);
    let at = image.value_offset(2, 0);
    assert_eq!(image.u32_at(2, at), 4);
    image.put_u32(2, at, 5);
    image.reseal(2, BlockKind::Node);
    assert_error(
        &image.check(),
        10,
        space_map_says("reference count 5, expected 4"),
    );
}

#[test]
fn data_overflow_count_too_high_is_reported() {
    // shared-overflow: data blocks 16200.. have counts 3 and 4 in the data ref-count tree.
    let mut image = Image::new("shared-overflow");
    let expect = thin::expect("shared-overflow");
    let root = json_u64(&expect["data_sm_root"]["ref_count_root"]);
    assert_eq!(
        image.u32_at(root, 24),
        4,
        "the data ref-count root is a leaf"
    );
    let block = image.u64_at(root, Image::key_offset(0));
    let bitmap = json_u64(&expect["data_index_entries"][(block / 16320) as usize]["blocknr"]);
    let at = image.value_offset(root, 0);
    let count = image.u32_at(root, at);
    image.put_u32(root, at, count + 1);
    image.reseal(root, BlockKind::Node);
    let text = format!(
        "data block {block} has reference count {}, expected {count}",
        count + 1
    );
    let report = image.check();
    assert_error(
        &report,
        bitmap,
        |d| matches!(d, Damage::SpaceMap(s) if *s == text),
    );
}

/// Sets entry `e` of the bitmap at `loc` to `value` with the on-disk bit order (high bit at
/// bit 2j, low bit at 2j+1), and reseals it.
fn set_bitmap_entry(image: &mut Image, loc: u64, e: usize, value: u64) {
    let at = 16 + 8 * (e / 32);
    let j = 2 * (e % 32);
    let mut word = image.u64_at(loc, at);
    word &= !(0b11 << j);
    word |= (value >> 1) << j | (value & 1) << (j + 1);
    image.put_u64(loc, at, word);
    image.reseal(loc, BlockKind::Bitmap);
}

#[test]
fn leaked_metadata_block_is_reported() {
    let mut image = Image::new("two-devs");
    set_bitmap_entry(&mut image, 3, 100, 1);
    assert_error(
        &image.check(),
        100,
        space_map_says("metadata block 100 is leaked"),
    );
}

#[test]
fn leaked_data_block_is_reported() {
    let mut image = Image::new("two-devs");
    set_bitmap_entry(&mut image, 9, 900, 1);
    assert_error(
        &image.check(),
        9,
        space_map_says("data block 900 is leaked"),
    );
}

#[test]
fn wrong_reference_counts_are_reported_both_ways() {
    // Metadata block 10 is referenced once; a count of 2 or 0 is wrong.
    let mut image = Image::new("two-devs");
    set_bitmap_entry(&mut image, 3, 10, 2);
    assert_error(
        &image.check(),
        10,
        space_map_says("reference count 2, expected 1"),
    );
    let mut image = Image::new("two-devs");
    set_bitmap_entry(&mut image, 3, 11, 0);
    assert_error(&image.check(), 11, space_map_says("marked free"));
    // Data block 0 is mapped by devices 1 and 2 (count 2); thin_check 0.9.0 misses this.
    let mut image = Image::new("two-devs");
    set_bitmap_entry(&mut image, 9, 0, 1);
    assert_error(
        &image.check(),
        9,
        space_map_says("data block 0 has reference count 1"),
    );
}

#[test]
fn bitmap_value_three_without_an_overflow_entry_is_reported() {
    let mut image = Image::new("two-devs");
    set_bitmap_entry(&mut image, 9, 0, 3);
    assert_error(&image.check(), 9, space_map_says("no ref-count tree entry"));
}

#[test]
fn hint_quirks_are_warnings() {
    let mut image = Image::new("two-devs");
    // nr_allocated of the metadata space map root one too high, as thin_restore writes it.
    image.put_u64(0, 192 + 8, 13);
    image.reseal(0, BlockKind::Superblock);
    let report = image.check();
    assert!(report.is_clean(), "{}", describe(&report));
    assert!(report
        .warnings()
        .any(|f| matches!(&f.damage, Damage::SpaceMap(s) if s.contains("nr_allocated is 13"))));
}

#[test]
fn tiny_or_empty_devices_are_reported_not_panicked_on() {
    for size in [0, 100, BLOCK_SIZE as u64, 3 * BLOCK_SIZE as u64] {
        let dev = MemDevice::new(size);
        let report = check(&dev, &CheckOptions::default());
        assert!(!report.is_clean(), "size {size}");
        assert!(
            dump_to_string(&dev, &DumpOptions::default()).is_err(),
            "size {size}"
        );
    }
    // A real superblock on a device cut short after it.
    let bytes = thin::metadata_image("two-devs");
    let dev = MemDevice::from_bytes(&bytes[..3 * BLOCK_SIZE]);
    let report = check(&dev, &CheckOptions::default());
    assert!(!report.is_clean());
    assert!(report
        .errors()
        .any(|f| matches!(f.damage, Damage::BadSuperblock(_))));
    assert!(dump_to_string(&dev, &DumpOptions::default()).is_err());
}

// ---- sweep ---------------------------------------------------------------------------------

/// The kind of each block two-devs uses, from the independent reader.
fn used_blocks(name: &str) -> Vec<(u64, BlockKind)> {
    let expect = thin::expect(name);
    let kinds = expect["block_kinds"].as_object().expect("block_kinds");
    let mut blocks: Vec<(u64, BlockKind)> = kinds
        .iter()
        .map(|(loc, kind)| {
            let kind = match kind.as_str() {
                Some("superblock") => BlockKind::Superblock,
                Some("node") => BlockKind::Node,
                Some("bitmap") => BlockKind::Bitmap,
                Some("index") => BlockKind::Index,
                other => panic!("unknown block kind {other:?}"),
            };
            (loc.parse().expect("block number"), kind)
        })
        .collect();
    blocks.sort_by_key(|&(loc, _)| loc);
    blocks
}

/// Runs check and dump on `dev` and returns how long that took and what they said.
fn check_and_dump(dev: &MemDevice) -> (Duration, Report, Result<String, DumpError>) {
    let start = Instant::now();
    let report = check(dev, &CheckOptions::default());
    let dumped = dump_to_string(dev, &DumpOptions::default());
    (start.elapsed(), report, dumped)
}

/// Applies single-byte changes to every `step`-th byte, and every header byte (16..32), of
/// every block fixture `name` uses:
/// as a bare flip (which breaks the checksum, so check must always notice, and dump must
/// either fail or print exactly the clean dump; when `dumped_blocks` lists the blocks the
/// dump reads, it must fail exactly for those), and resealed with the block's own salt, so
/// that the structural rules are what stands between the damage and a panic. Resealed
/// changes to unused node slots, padding or unused superblock bytes are harmless; changes to
/// a bitmap's counts or to a node header never are. Returns the number of images checked.
fn sweep(name: &str, step: usize, dumped_blocks: Option<&[u64]>) -> usize {
    let original = thin::metadata_image(name);
    let dev = MemDevice::from_bytes(&original);
    let clean_dump = dump_to_string(&dev, &DumpOptions::default()).expect("clean dump");
    let mut slowest = Duration::ZERO;
    let mut runs = 0;
    for (loc, kind) in used_blocks(name) {
        let at = loc as usize * BLOCK_SIZE;
        let pristine: [u8; BLOCK_SIZE] =
            original[at..at + BLOCK_SIZE].try_into().expect("one block");
        for offset in (0..BLOCK_SIZE).filter(|o| o % step == 0 || (16..32).contains(o)) {
            let mut b = pristine;
            b[offset] ^= 0xff;
            dev.write_at(&b, at as u64).expect("write");
            let (took, report, dumped) = check_and_dump(&dev);
            slowest = slowest.max(took);
            runs += 1;
            let place = format!("{name} block {loc} byte {offset}");
            assert!(!report.is_clean(), "flip of {place} went unnoticed");
            match (dumped, dumped_blocks) {
                (Err(_), Some(read)) => assert!(read.contains(&loc), "dump failed on {place}"),
                (Ok(text), Some(read)) => {
                    assert!(!read.contains(&loc), "dump read past a flip of {place}");
                    assert_eq!(text, clean_dump, "{place}");
                }
                (Err(_), None) => {}
                (Ok(text), None) => assert_eq!(text, clean_dump, "{place}"),
            }

            // The reseal rewrites the checksum and the location.
            if offset < 4 || (8..16).contains(&offset) {
                continue;
            }
            for mask in [0x01, 0x80, 0xff] {
                let mut b = pristine;
                b[offset] ^= mask;
                seal(&mut b, loc, kind);
                dev.write_at(&b, at as u64).expect("write");
                let (took, report, _) = check_and_dump(&dev);
                slowest = slowest.max(took);
                runs += 1;
                let must_notice = match kind {
                    BlockKind::Bitmap => offset >= 16,
                    BlockKind::Node => (16..28).contains(&offset),
                    BlockKind::Superblock | BlockKind::Index => false,
                };
                assert!(
                    !(must_notice && report.is_clean()),
                    "resealed change {mask:#x} of {place} went unnoticed"
                );
            }
        }
        dev.write_at(&pristine, at as u64).expect("restore");
    }
    // A hang guard, not a speed goal: a damaged image must not send check or dump round a
    // cycle; a healthy run takes milliseconds, so only a runaway walk gets near this.
    assert!(
        slowest < Duration::from_secs(30),
        "{name}: slowest check+dump took {slowest:?}"
    );
    runs
}

#[test]
fn every_single_byte_change_is_survived() {
    // The blocks the dump reads: superblock, details leaf, top-level leaf, the three device
    // roots (the other six blocks belong to the space maps).
    let runs = sweep("two-devs", 1, Some(&[0, 6, 7, 8, 10, 11]));
    assert!(runs > 12 * 4096 * 3, "{runs}");
}

#[test]
fn sampled_byte_changes_in_shared_trees_are_survived() {
    // Internal nodes, leaves shared between devices, a held root with its own copies. Every
    // fifth byte keeps the run short and still hits every 8-byte key, value and root.
    sweep("metadata-snap", 5, None);
}

#[test]
fn too_many_entries_is_reported() {
    // Leaf 10 of kernel-snap-base holds 8-byte values (max 252): claim 253.
    let mut image = Image::new("kernel-snap-base");
    image.put_u32(10, 16, 253);
    image.reseal(10, BlockKind::Node);
    assert_error(&image.check(), 10, |d| {
        matches!(d, Damage::TooManyEntries { nr: 253, max: 252 })
    });
    assert!(image.dump().is_err());
}

#[test]
fn a_bad_metadata_snapshot_pointer_is_reported() {
    // metadata-snap holds its snapshot at block 17: point the superblock at a b-tree node.
    let mut image = Image::new("metadata-snap");
    assert_eq!(held_root("metadata-snap"), 17);
    image.put_u64(0, 56, 10);
    image.reseal(0, BlockKind::Superblock);
    let report = image.check();
    assert!(
        !report.is_clean(),
        "a held root at a b-tree node went unnoticed"
    );
    assert!(
        report.errors().any(|f| f.block == Some(10)),
        "the finding names the bad held root: {}",
        describe(&report)
    );
    // And one past the end of the device.
    let mut image = Image::new("metadata-snap");
    image.put_u64(0, 56, 1 << 30);
    image.reseal(0, BlockKind::Superblock);
    assert!(!image.check().is_clean());
}
