//! The ext4 journal log of a cleanly unmounted file system, found and given back to the pool:
//! checked against what e2fsprogs (`mkfs.ext4`, `debugfs`, `e2fsck`) say of real file
//! systems. Needs e2fsprogs; no root (file systems are made in plain files).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use engine::activate::{Local, PoolControl};
use engine::journal::{
    ext4_journal_log, own_ext4_journal_superblock, trim_ext4_journal, JournalError, JournalTrim,
    SkipReason,
};
use engine::{DataBlockSize, NewPool, PoolOptions, PoolPaths, ThinId, Volumes};

const MIB: u64 = 1 << 20;

fn mkfs(cmd: &str, path: &Path, size: u64, args: &[&str]) {
    File::create(path).unwrap().set_len(size).unwrap();
    let out = Command::new(cmd)
        .args(["-q", "-F"])
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The journal inode's extents as `debugfs` lists them: (logical, physical, len) in blocks.
fn debugfs_extents(path: &Path) -> Vec<(u64, u64, u64)> {
    let out = Command::new("debugfs")
        .args(["-R", "dump_extents -l <8>"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    // "Level Entries  Logical  Physical Length Flags", then per leaf extent:
    // " 1/ 1   1/  8      0 -  32767 360448 - 393215  32768".
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| -> u64 { f[i].parse().unwrap() };
            (n(4), n(7), n(10))
        })
        .collect()
}

fn read_file(file: &File) -> impl FnMut(u64, &mut [u8]) -> engine::Result<()> + '_ {
    move |offset, buf| {
        file.read_exact_at(buf, offset)
            .map_err(|e| engine::Error::InvalidArgument(e.to_string()))
    }
}

fn log_of(path: &Path) -> Result<engine::journal::JournalLog, SkipReason> {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    let found = ext4_journal_log(len, &mut read_file(&file)).unwrap();
    found
}

#[test]
fn the_log_found_is_the_journal_debugfs_lists_less_its_superblock() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, u64, &[&str])] = &[
        // 64 MiB journal, one extent.
        ("default", 2048 * MIB, &[]),
        // 1 KiB blocks: the superblock is in block 1, descriptors in block 2.
        ("1k", 256 * MIB, &["-b", "1024"]),
        // A 1 GiB journal needs 8 extents of 32768 blocks: a tree of depth 1.
        (
            "deep",
            3 * 1024 * MIB,
            &["-J", "size=1024", "-E", "lazy_journal_init=1"],
        ),
        ("32bit", 512 * MIB, &["-O", "^64bit"]),
    ];
    for (name, size, args) in cases {
        let path = dir.path().join(name);
        mkfs("mkfs.ext4", &path, *size, args);
        let bs = if *name == "1k" { 1024 } else { 4096 };
        let extents = debugfs_extents(&path);
        if *name == "deep" {
            assert!(extents.len() > 4, "{name}: {extents:?}");
        }
        let log = log_of(&path).unwrap_or_else(|r| panic!("{name}: {r}"));
        let (l0, p0, _) = extents.iter().find(|e| e.0 == 0).copied().unwrap();
        assert_eq!(l0, 0);
        assert_eq!(log.superblock, p0 * bs..(p0 + 1) * bs, "{name}");
        let mut expected = Vec::new();
        for &(l, p, n) in &extents {
            let (p, n) = if l == 0 { (p + 1, n - 1) } else { (p, n) };
            expected.push(p * bs..(p + n) * bs);
        }
        assert_eq!(log.log, expected, "{name}");
    }
}

#[test]
fn file_systems_without_a_clean_internal_extent_journal_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let zeros = dir.path().join("zeros");
    File::create(&zeros).unwrap().set_len(64 * MIB).unwrap();
    assert_eq!(log_of(&zeros), Err(SkipReason::NotExt4));

    let nojournal = dir.path().join("nojournal");
    mkfs("mkfs.ext4", &nojournal, 64 * MIB, &["-O", "^has_journal"]);
    assert_eq!(log_of(&nojournal), Err(SkipReason::NoInternalJournal));

    let ext3 = dir.path().join("ext3");
    mkfs("mkfs.ext3", &ext3, 64 * MIB, &[]);
    assert_eq!(log_of(&ext3), Err(SkipReason::NotExtentMapped));

    // The superblock's needs-recovery flag, as a crash leaves it.
    let recover = dir.path().join("recover");
    mkfs("mkfs.ext4", &recover, 64 * MIB, &[]);
    set_bits_le32(&recover, 1024 + 0x60, 0x4);
    assert_eq!(log_of(&recover), Err(SkipReason::NeedsRecovery));

    // A journal superblock whose log is not empty (s_start set).
    let busy = dir.path().join("busy");
    mkfs("mkfs.ext4", &busy, 64 * MIB, &[]);
    let jsb = log_of(&busy).unwrap().superblock.start;
    let f = OpenOptions::new().write(true).open(&busy).unwrap();
    f.write_all_at(&5u32.to_be_bytes(), jsb + 0x1c).unwrap();
    assert_eq!(log_of(&busy), Err(SkipReason::NeedsRecovery));
}

#[test]
fn a_damaged_journal_inode_is_an_error_not_a_guess() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fs");
    mkfs(
        "mkfs.ext4",
        &path,
        64 * MIB,
        &["-b", "4096", "-O", "^metadata_csum"],
    );
    // Inode 8 is the 8th of the inode table; its extent header is at 0x28.
    let out = Command::new("debugfs")
        .args(["-R", "imap <8>"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (block, offset) = parse_imap(&text);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xde, 0xad], block * 4096 + offset + 0x28)
        .unwrap();
    let file = File::open(&path).unwrap();
    let found = ext4_journal_log(64 * MIB, &mut read_file(&file));
    assert!(
        matches!(found, Err(JournalError::Malformed(_))),
        "{found:?}"
    );
}

/// "Inode 8 is part of block group 0\n\tlocated at block 1059, offset 0x0700".
fn parse_imap(text: &str) -> (u64, u64) {
    let at = text.split("located at block ").nth(1).unwrap();
    let (block, rest) = at.split_once(", offset ").unwrap();
    let offset = rest.trim().trim_start_matches("0x");
    (
        block.parse().unwrap(),
        u64::from_str_radix(offset, 16).unwrap(),
    )
}

fn set_bits_le32(path: &Path, at: u64, bits: u32) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&(u32::from_le_bytes(b) | bits).to_le_bytes(), at)
        .unwrap();
}

#[test]
fn a_trimmed_journal_frees_its_blocks_and_the_file_system_stays_clean() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    mkfs("mkfs.ext4", &image, 256 * MIB, &["-b", "4096"]);
    let log = log_of(&image).unwrap();
    // What an old log leaves: blocks of a past transaction (import would skip zeros).
    let f = OpenOptions::new().write(true).open(&image).unwrap();
    for r in &log.log {
        f.write_all_at(&vec![0xa5; (r.end - r.start) as usize], r.start)
            .unwrap();
    }
    drop(f);
    let pool_dir = dir.path().join("pool");
    fs::create_dir_all(&pool_dir).unwrap();
    let paths = PoolPaths::in_dir(&pool_dir);
    let volumes = Volumes::create(
        &paths,
        &engine::VolumeStore::path_in(&pool_dir),
        NewPool::new(512 * MIB, 64 * MIB, DataBlockSize::DEFAULT),
        PoolOptions::default(),
    )
    .unwrap();
    let mut pool = Local::new(volumes);
    let id = ThinId::new(1).unwrap();
    pool.create_thin(id, 256 * MIB, None).unwrap();
    engine::image::import(&mut pool, id, &File::open(&image).unwrap(), &mut |_, _| {}).unwrap();
    let mapped = |pool: &mut Local| {
        let t = pool.list().unwrap();
        t.iter().find(|t| t.id == 1).unwrap().mapped_blocks
    };
    let before = mapped(&mut pool);

    let JournalTrim::Trimmed {
        log_bytes,
        discarded,
    } = trim_ext4_journal(&mut pool, id).unwrap()
    else {
        panic!("not trimmed");
    };
    let journal: u64 = log.log.iter().map(|r| r.end - r.start).sum();
    assert_eq!(log_bytes, journal);
    // The 64 KiB blocks wholly inside the log, counted from the bytes (the log alone was
    // filled with 0xa5), whatever extents mkfs chose: never the journal superblock's.
    let want = fs::read(&image).unwrap();
    const CHUNK: usize = 64 * 1024;
    let log_only: Vec<usize> = want
        .chunks(CHUNK)
        .enumerate()
        .filter(|(_, c)| c.iter().all(|&b| b == 0xa5))
        .map(|(i, _)| i)
        .collect();
    // mkfs makes a 16 MiB journal here.
    assert!(log_only.len() >= 250, "{log:?}");
    assert_eq!(discarded, (log_only.len() * CHUNK) as u64, "{log:?}");
    assert_eq!(before - mapped(&mut pool), log_only.len() as u64);
    // Again: the same blocks discarded (no-ops), nothing more freed.
    let after = mapped(&mut pool);
    assert!(matches!(
        trim_ext4_journal(&mut pool, id).unwrap(),
        JournalTrim::Trimmed { .. }
    ));
    assert_eq!(mapped(&mut pool), after);

    // What the thin holds now is a clean file system with its journal superblock intact.
    let out = dir.path().join("out");
    let file = File::create(&out).unwrap();
    engine::image::export(&mut pool, id, &file, &mut |_, _| {}).unwrap();
    drop(file);
    let check = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(log_of(&out), Ok(log.clone()));
    // The discarded blocks read as zeros; every other byte is the image's.
    let back = fs::read(&out).unwrap();
    assert_eq!(back.len(), want.len());
    for (i, (got, was)) in back.chunks(CHUNK).zip(want.chunks(CHUNK)).enumerate() {
        if log_only.contains(&i) {
            assert!(got.iter().all(|&b| b == 0), "block {i} still holds its log");
        } else {
            assert!(got == was, "block {i} changed, outside the log");
        }
    }
}

#[test]
fn a_snapshot_owns_its_journal_superblock_block_and_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    fs::create_dir_all(&pool_dir).unwrap();
    let volumes = Volumes::create(
        &PoolPaths::in_dir(&pool_dir),
        &engine::VolumeStore::path_in(&pool_dir),
        NewPool::new(512 * MIB, 64 * MIB, DataBlockSize::DEFAULT),
        PoolOptions::default(),
    )
    .unwrap();
    let mut pool = Local::new(volumes);
    let used = |pool: &mut Local| pool.status().unwrap().status.used_data_blocks;
    let export = |pool: &mut Local, id: ThinId, name: &str| {
        let path = dir.path().join(name);
        let file = File::create(&path).unwrap();
        engine::image::export(pool, id, &file, &mut |_, _| {}).unwrap();
        fs::read(&path).unwrap()
    };
    let (image_id, snap_id) = (ThinId::new(1).unwrap(), ThinId::new(2).unwrap());

    // No journal (ext2): nothing to own, nothing written.
    let ext2 = dir.path().join("ext2");
    mkfs("mkfs.ext2", &ext2, 64 * MIB, &[]);
    pool.create_thin(image_id, 64 * MIB, None).unwrap();
    engine::image::import(
        &mut pool,
        image_id,
        &File::open(&ext2).unwrap(),
        &mut |_, _| {},
    )
    .unwrap();
    pool.create_snap(snap_id, image_id, None).unwrap();
    let before = used(&mut pool);
    assert_eq!(
        own_ext4_journal_superblock(&mut pool, snap_id).unwrap(),
        None
    );
    assert_eq!(used(&mut pool), before);
    pool.delete(snap_id).unwrap();
    pool.delete(image_id).unwrap();

    let ext4 = dir.path().join("ext4");
    mkfs("mkfs.ext4", &ext4, 256 * MIB, &["-b", "4096"]);
    let log = log_of(&ext4).unwrap();
    pool.create_thin(image_id, 256 * MIB, None).unwrap();
    engine::image::import(
        &mut pool,
        image_id,
        &File::open(&ext4).unwrap(),
        &mut |_, _| {},
    )
    .unwrap();
    pool.create_snap(snap_id, image_id, None).unwrap();
    let before = used(&mut pool);
    let owned = own_ext4_journal_superblock(&mut pool, snap_id)
        .unwrap()
        .expect("a clean ext4 journal");
    // One whole pool block, the one holding the journal superblock, copied once.
    let block = DataBlockSize::DEFAULT.bytes();
    assert_eq!(owned.end - owned.start, block);
    assert!(owned.start <= log.superblock.start && log.superblock.end <= owned.end);
    assert_eq!(used(&mut pool), before + 1);
    assert_eq!(
        own_ext4_journal_superblock(&mut pool, snap_id).unwrap(),
        Some(owned)
    );
    assert_eq!(used(&mut pool), before + 1, "the block was copied again");
    // Same bytes as the image; the image is untouched.
    let image = export(&mut pool, image_id, "image.out");
    assert_eq!(image, fs::read(&ext4).unwrap());
    assert!(export(&mut pool, snap_id, "snap.out") == image);
}

/// Real file systems with random bytes changed where the journal is found from: the
/// superblock, the group descriptors, the journal inode, its extent-tree blocks and the
/// journal superblock. Whatever the damage, an answer or an error, never a panic, and a log
/// found always lies inside the device, clear of the journal superblock.
#[test]
fn damaged_file_systems_never_panic_and_never_point_outside() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(8);
    let cases: &[(&str, u64, &[&str])] = &[
        ("small", 64 * MIB, &["-b", "4096"]),
        (
            "deep",
            3 * 1024 * MIB,
            &["-J", "size=1024", "-E", "lazy_journal_init=1"],
        ),
    ];
    for (name, size, args) in cases {
        let path = dir.path().join(name);
        mkfs("mkfs.ext4", &path, *size, args);
        let file = File::open(&path).unwrap();
        let log = log_of(&path).unwrap();
        let imap = Command::new("debugfs")
            .args(["-R", "imap <8>"])
            .arg(&path)
            .output()
            .unwrap();
        let (inode_block, inode_offset) = parse_imap(&String::from_utf8_lossy(&imap.stdout));
        let inode_at = inode_block * 4096 + inode_offset;
        // Bytes worth damaging: superblock and descriptors, the inode, the journal
        // superblock, and the first leaf of a deep tree (named by the inode's index entry).
        let mut targets = vec![1024..1024 + 1024, 4096..4096 + 64, inode_at..inode_at + 256];
        targets.push(log.superblock.start..log.superblock.start + 64);
        if *name == "deep" {
            let mut entry = [0u8; 12];
            file.read_exact_at(&mut entry, inode_at + 0x28 + 12)
                .unwrap();
            let leaf = u64::from(u32::from_le_bytes(entry[4..8].try_into().unwrap())) * 4096;
            targets.push(leaf..leaf + 4096);
        }
        for _ in 0..5000 {
            let mut damage = std::collections::HashMap::new();
            for _ in 0..rng.gen_range(1..8) {
                let t = &targets[rng.gen_range(0..targets.len())];
                damage.insert(rng.gen_range(t.clone()), rng.gen::<u8>());
            }
            let mut read = |offset: u64, buf: &mut [u8]| {
                file.read_exact_at(buf, offset)
                    .map_err(|e| engine::Error::InvalidArgument(e.to_string()))?;
                for (&at, &byte) in &damage {
                    if (offset..offset + buf.len() as u64).contains(&at) {
                        buf[(at - offset) as usize] = byte;
                    }
                }
                Ok(())
            };
            if let Ok(Ok(found)) = ext4_journal_log(*size, &mut read) {
                for r in &found.log {
                    assert!(r.start < r.end && r.end <= *size, "{name}: {found:?}");
                    assert!(
                        r.end <= found.superblock.start || r.start >= found.superblock.end,
                        "{name}: {found:?}"
                    );
                }
            }
        }
    }
}
