//! `tools::repair` on damaged copies of the fixtures and of engine-built pools with known
//! content: a destroyed superblock, a broken leaf, a broken internal node, lost space maps.
//! The repaired metadata passes the real `thin_check` and ours; every mapping in an intact
//! node is kept (compared with the dump of the undamaged original, and for engine pools by
//! reading the thins' data back); what the real `thin_repair` recovers from the same damage
//! is counted and never more than ours.

use std::collections::BTreeMap;
use std::sync::Arc;

use engine::block::{read_u32, read_u64, BLOCK_SIZE};
use engine::io::{BlockDevice, MemDevice};
use engine::pdata::btree::node::Node;
use engine::thin::metadata::Superblock;
use engine::tools::check::{check, CheckOptions};
use engine::tools::dump::{device_details, dump, DumpOptions};
use engine::tools::repair::{repair, RepairError, RepairOptions, RepairReport};
use engine::{DataBlockSize, Pool, PoolOptions};
use fixtures::pools::{id, mem_pool};
use fixtures::thin;

/// (thin id, virtual block) -> (data block, time).
type Mappings = BTreeMap<(u64, u64), (u64, u64)>;

fn attr(line: &str, name: &str) -> u64 {
    let at = line.find(&format!(" {name}=\"")).expect("attribute") + name.len() + 3;
    line[at..at + line[at..].find('"').unwrap()]
        .parse()
        .unwrap()
}

/// Every mapping of the metadata on `dev`, from our dump (equal to thin_dump's).
fn mappings_of(dev: &dyn BlockDevice) -> Mappings {
    mappings_in(dev, false)
}

/// Every mapping of the live trees, or of the held metadata snapshot's.
fn mappings_in(dev: &dyn BlockDevice, use_metadata_snap: bool) -> Mappings {
    let mut out = Vec::new();
    let opts = DumpOptions {
        use_metadata_snap,
        ..DumpOptions::default()
    };
    dump(dev, &opts, &mut out).expect("dump");
    parse_mappings(&String::from_utf8(out).unwrap())
}

fn parse_mappings(xml: &str) -> Mappings {
    let mut m = Mappings::new();
    let mut dev = 0;
    for line in xml.lines() {
        let l = line.trim_start();
        if l.starts_with("<device ") {
            dev = attr(l, "dev_id");
        } else if l.starts_with("<single_mapping ") {
            m.insert(
                (dev, attr(l, "origin_block")),
                (attr(l, "data_block"), attr(l, "time")),
            );
        } else if l.starts_with("<range_mapping ") {
            let (v, d, t) = (
                attr(l, "origin_begin"),
                attr(l, "data_begin"),
                attr(l, "time"),
            );
            for i in 0..attr(l, "length") {
                m.insert((dev, v + i), (d + i, t));
            }
        }
    }
    m
}

/// Device ids with (transaction, creation time, snapshot time).
fn details_of(dev: &dyn BlockDevice) -> BTreeMap<u64, (u64, u32, u32)> {
    details_in(dev, false)
}

fn details_in(dev: &dyn BlockDevice, use_metadata_snap: bool) -> BTreeMap<u64, (u64, u32, u32)> {
    let (_, details) = device_details(dev, use_metadata_snap).expect("details");
    details
        .into_iter()
        .map(|(id, d)| (id, (d.transaction_id, d.creation_time, d.snapshotted_time)))
        .collect()
}

fn block(img: &[u8], loc: u64) -> &[u8] {
    &img[loc as usize * BLOCK_SIZE..(loc as usize + 1) * BLOCK_SIZE]
}

/// A node of some device's mapping tree in an undamaged image.
#[derive(Clone, Copy, Debug)]
struct TreeNode {
    loc: u64,
    leaf: bool,
    depth: usize,
}

/// The live devices of an undamaged image: id, root, the nodes of its tree, and for each
/// mapping the leaf holding it.
struct Layout {
    sb: Superblock,
    devices: BTreeMap<u64, (u64, Vec<TreeNode>)>,
    leaf_of: BTreeMap<(u64, u64), u64>,
}

fn layout(img: &[u8]) -> Layout {
    let sb = Superblock::decode(block(img, 0).try_into().unwrap());
    let mut roots = Vec::new();
    walk(
        img,
        sb.data_mapping_root,
        0,
        &mut Vec::new(),
        &mut |_, k, v| roots.push((k, v)),
    );
    let mut devices = BTreeMap::new();
    let mut leaf_of = BTreeMap::new();
    for (dev, root) in roots {
        let mut nodes = Vec::new();
        walk(img, root, 0, &mut nodes, &mut |leaf, v, _| {
            leaf_of.insert((dev, v), leaf);
        });
        devices.insert(dev, (root, nodes));
    }
    Layout {
        sb,
        devices,
        leaf_of,
    }
}

fn walk(
    img: &[u8],
    loc: u64,
    depth: usize,
    nodes: &mut Vec<TreeNode>,
    f: &mut dyn FnMut(u64, u64, u64),
) {
    let b: &[u8; BLOCK_SIZE] = block(img, loc).try_into().unwrap();
    let n = Node::new(b);
    nodes.push(TreeNode {
        loc,
        leaf: n.is_leaf(),
        depth,
    });
    for i in 0..n.nr_entries() {
        if n.is_leaf() {
            f(loc, n.key(i), n.value_u64(i));
        } else {
            walk(img, n.value_u64(i), depth + 1, nodes, f);
        }
    }
}

/// Flips a byte in the middle of block `loc`: its checksum no longer matches.
fn break_block(img: &mut [u8], loc: u64) {
    img[loc as usize * BLOCK_SIZE + 2000] ^= 0x5a;
}

fn zero_block(img: &mut [u8], loc: u64) {
    img[loc as usize * BLOCK_SIZE..(loc as usize + 1) * BLOCK_SIZE].fill(0);
}

/// Zeroes both space maps: the metadata index block and bitmaps, the data index tree and
/// bitmaps, and both ref-count trees' roots.
fn lose_space_maps(img: &mut [u8], sb: &Superblock) {
    let index = sb.metadata_sm_root.bitmap_root;
    let nr = sb.metadata_sm_root.nr_blocks.div_ceil(16320);
    for i in 0..nr as usize {
        let b = read_u64(block(img, index), 16 + 16 * i);
        zero_block(img, b);
    }
    zero_block(img, index);
    let data_index = sb.data_sm_root.bitmap_root;
    let mut bitmaps = Vec::new();
    let mut nodes = Vec::new();
    walk_values16(img, data_index, &mut nodes, &mut bitmaps);
    for b in bitmaps.into_iter().chain(nodes) {
        zero_block(img, b);
    }
    zero_block(img, sb.data_sm_root.ref_count_root);
    zero_block(img, sb.metadata_sm_root.ref_count_root);
}

/// The data space map's index tree: its nodes and the bitmaps its entries name.
fn walk_values16(img: &[u8], loc: u64, nodes: &mut Vec<u64>, bitmaps: &mut Vec<u64>) {
    let b: &[u8; BLOCK_SIZE] = block(img, loc).try_into().unwrap();
    let n = Node::new(b);
    nodes.push(loc);
    for i in 0..n.nr_entries() {
        if n.is_leaf() {
            bitmaps.push(read_u64(n.value(i), 0));
        } else {
            walk_values16(img, n.value_u64(i), nodes, bitmaps);
        }
    }
}

/// Our repair of `img` onto a fresh device of the same size; the result passes both
/// checkers.
fn repaired(
    name: &str,
    img: &[u8],
    opts: &RepairOptions,
) -> Result<(Arc<MemDevice>, RepairReport), RepairError> {
    let input = MemDevice::from_bytes(img);
    let out = Arc::new(MemDevice::new(img.len() as u64));
    let report = repair(&input, out.clone(), opts, &mut |_, _| {})?;
    let r = check(&*out, &CheckOptions::default());
    assert!(
        r.is_clean(),
        "{name}: our check of the repair: {:?}",
        r.findings
    );
    if fixtures::tools::available() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("repaired");
        std::fs::write(&p, out.to_bytes()).unwrap();
        let c = fixtures::tools::thin_check(&p, &[]);
        assert_eq!(c.rc, 0, "{name}: thin_check of the repair: {}", c.stderr);
    }
    Ok((out, report))
}

/// What the real thin_repair recovers from `img`: its mappings, or `None` if it failed.
fn thin_repair_mappings(img: &[u8]) -> Option<Mappings> {
    if !fixtures::tools::available() {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("damaged");
    let output = tmp.path().join("repaired");
    std::fs::write(&input, img).unwrap();
    std::fs::write(&output, vec![0u8; img.len()]).unwrap();
    let out = std::process::Command::new("thin_repair")
        .arg("-i")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dump = fixtures::tools::thin_dump(&output, &[]);
    (dump.rc == 0).then(|| parse_mappings(&dump.stdout))
}

/// Compares with thin_repair on the same damage: it never keeps a mapping of the undamaged
/// pool (`want`) that we lose. Mappings it keeps that `want` does not have (a device it
/// brought back from a metadata snapshot) are counted apart. Returns its count of mappings
/// from `want` (or -1 when it failed) for the summary line.
fn compare_with_thin_repair(name: &str, img: &[u8], ours: &Mappings, want: &Mappings) -> String {
    match thin_repair_mappings(img) {
        Some(theirs) => {
            let mut extra = 0;
            let mut kept = 0;
            for (k, v) in &theirs {
                if want.get(k) != Some(v) {
                    extra += 1;
                    continue;
                }
                kept += 1;
                if ours.get(k) != Some(v) {
                    panic!("{name}: thin_repair kept {k:?} -> {v:?}, we did not");
                }
            }
            if extra > 0 {
                format!("{kept} (+{extra} not in the pool)")
            } else {
                kept.to_string()
            }
        }
        None => "failed".to_string(),
    }
}

fn fixture_names() -> Vec<String> {
    thin::names()
}

/// Without the superblock nothing tells the live trees from the old copies copy-on-write
/// leaves behind, except a metadata snapshot's superblock copy: when there is one, its
/// trees are what comes back (everything they map is still referenced, so nothing in them
/// was reused), else the trees that agree with each other.
#[test]
fn a_destroyed_superblock_loses_no_mapping() {
    let mut summary = Vec::new();
    for name in fixture_names() {
        let img = thin::metadata_image(&name);
        let orig = MemDevice::from_bytes(&img);
        let sb = layout(&img).sb;
        let held = sb.held_root != 0;
        let want = mappings_in(&orig, held);
        let mut damaged = img.clone();
        zero_block(&mut damaged, 0);

        // Without a superblock the data block size must come from somewhere.
        let none = repaired(&name, &damaged, &RepairOptions::default());
        if sb.held_root == 0 {
            assert!(
                matches!(none, Err(RepairError::NeedDataBlockSize(_))),
                "{name}: {:?}",
                none.as_ref().err()
            );
        }
        let opts = RepairOptions {
            data_block_size: DataBlockSize::from_sectors(sb.data_block_size),
            nr_data_blocks: Some(sb.data_sm_root.nr_blocks),
            transaction_id: Some(sb.transaction_id),
        };
        let result = repaired(&name, &damaged, &opts);
        if details_of(&orig).is_empty() {
            assert!(
                matches!(result, Err(RepairError::NothingFound)),
                "{name}: {:?}",
                result.as_ref().err()
            );
            continue;
        }
        let (out, report) = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!report.superblock_intact);
        let got = mappings_of(&*out);
        assert_eq!(got.len(), want.len(), "{name}: mappings kept");
        assert_eq!(got, want, "{name}");
        assert_eq!(
            details_of(&*out),
            details_in(&orig, held),
            "{name}: details"
        );
        let theirs = compare_with_thin_repair(&name, &damaged, &got, &want);
        summary.push(format!(
            "{name}: {} of {} mappings kept{}, thin_repair {theirs}",
            got.len(),
            want.len(),
            if held {
                " (the metadata snapshot's)"
            } else {
                ""
            }
        ));
    }
    eprintln!("destroyed superblock:\n  {}", summary.join("\n  "));
}

#[test]
fn lost_space_maps_are_rebuilt_from_the_mappings() {
    let mut summary = Vec::new();
    for name in fixture_names() {
        let img = thin::metadata_image(&name);
        let orig = MemDevice::from_bytes(&img);
        let sb = layout(&img).sb;
        let mut damaged = img.clone();
        lose_space_maps(&mut damaged, &sb);
        let (out, report) = repaired(&name, &damaged, &RepairOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(report.superblock_intact, "{name}");
        assert!(report.lost.is_empty(), "{name}: {:?}", report.lost);
        let got = mappings_of(&*out);
        assert_eq!(got, mappings_of(&orig), "{name}");
        assert_eq!(details_of(&*out), details_of(&orig), "{name}: details");
        assert_eq!(report.transaction_id, sb.transaction_id);
        assert_eq!(report.time, sb.time);
        let theirs = compare_with_thin_repair(&name, &damaged, &got, &mappings_of(&orig));
        summary.push(format!(
            "{name}: {} mappings kept, thin_repair {theirs}",
            got.len()
        ));
    }
    eprintln!("lost space maps:\n  {}", summary.join("\n  "));
}

#[test]
fn a_broken_leaf_loses_only_its_own_mappings() {
    let mut summary = Vec::new();
    for name in fixture_names() {
        let img = thin::metadata_image(&name);
        let orig = MemDevice::from_bytes(&img);
        let l = layout(&img);
        // The first leaf below an internal node, else the first root leaf with mappings.
        let leaves: Vec<TreeNode> = l
            .devices
            .values()
            .flat_map(|(_, nodes)| nodes.iter().copied())
            .filter(|n| n.leaf && read_u32(block(&img, n.loc), 16) > 0)
            .collect();
        let Some(victim) = leaves
            .iter()
            .find(|n| n.depth > 0)
            .or(leaves.first())
            .copied()
        else {
            continue;
        };
        let want: Mappings = mappings_of(&orig)
            .into_iter()
            .filter(|(k, _)| l.leaf_of[k] != victim.loc)
            .collect();
        let lost = mappings_of(&orig).len() - want.len();
        let mut damaged = img.clone();
        break_block(&mut damaged, victim.loc);
        let (out, report) = repaired(&name, &damaged, &RepairOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = mappings_of(&*out);
        assert_eq!(got, want, "{name}: leaf {} broken", victim.loc);
        assert_eq!(report.nr_damaged_nodes, 1, "{name}");
        // The lost ranges hold exactly the mappings that were lost.
        for (dev, v) in mappings_of(&orig).keys() {
            let in_lost = report
                .lost
                .iter()
                .any(|r| r.thin_id == *dev && r.contains(*v));
            assert_eq!(
                in_lost,
                l.leaf_of[&(*dev, *v)] == victim.loc,
                "{name}: {dev}:{v}"
            );
        }
        let theirs = compare_with_thin_repair(&name, &damaged, &got, &mappings_of(&orig));
        summary.push(format!(
            "{name}: leaf {} ({lost} mappings) broken: {} kept, thin_repair {theirs}",
            victim.loc,
            got.len()
        ));
    }
    eprintln!("broken leaf:\n  {}", summary.join("\n  "));
}

#[test]
fn a_broken_internal_node_loses_nothing_its_intact_children_hold() {
    let mut summary = Vec::new();
    let mut tried = 0;
    for name in fixture_names() {
        let img = thin::metadata_image(&name);
        let orig = MemDevice::from_bytes(&img);
        let l = layout(&img);
        let Some(victim) = l
            .devices
            .values()
            .flat_map(|(_, nodes)| nodes.iter().copied())
            .find(|n| !n.leaf)
        else {
            continue;
        };
        tried += 1;
        let want = mappings_of(&orig);
        let mut damaged = img.clone();
        break_block(&mut damaged, victim.loc);
        let (out, report) = repaired(&name, &damaged, &RepairOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = mappings_of(&*out);
        assert_eq!(got, want, "{name}: internal node {} broken", victim.loc);
        assert!(report.lost.is_empty(), "{name}: {:?}", report.lost);
        assert!(report.nr_adopted_mappings > 0, "{name}");
        let theirs = compare_with_thin_repair(&name, &damaged, &got, &want);
        summary.push(format!(
            "{name}: internal node {} broken: {} of {} kept ({} adopted), thin_repair {theirs}",
            victim.loc,
            got.len(),
            want.len(),
            report.nr_adopted_mappings
        ));
    }
    assert!(
        tried >= 2,
        "fixtures with internal mapping nodes are missing"
    );
    eprintln!("broken internal node:\n  {}", summary.join("\n  "));
}

// ---- engine-built pools with known data ----------------------------------------------------

const MIB: usize = 1 << 20;

use fixtures::data::random_bytes;

/// Thin 1: 40 MiB (640 blocks: an internal root over three leaves); thin 2: a snapshot of
/// it with three copied-on-write writes; thin 3: 3 MiB. Returns the pool and each thin's
/// bytes.
fn known_pool() -> (fixtures::pools::MemPool, BTreeMap<u64, Vec<u8>>) {
    let p = mem_pool(
        8 << 20,
        2048,
        DataBlockSize::DEFAULT,
        PoolOptions::default(),
    );
    let mut model = BTreeMap::new();
    p.pool.create_thin(id(1)).unwrap();
    let one = random_bytes(40 * MIB, 1);
    p.pool.open_thin(id(1)).unwrap().write(&one, 0).unwrap();
    p.pool.create_snap(id(2), id(1)).unwrap();
    let mut two = one.clone();
    let t2 = p.pool.open_thin(id(2)).unwrap();
    for (i, at) in [5 * 4096, 17 * MIB + 3, 39 * MIB].into_iter().enumerate() {
        let bytes = random_bytes(8192, 10 + i as u64);
        t2.write(&bytes, at as u64).unwrap();
        two[at..at + 8192].copy_from_slice(&bytes);
    }
    p.pool.create_thin(id(3)).unwrap();
    let three = random_bytes(3 * MIB, 3);
    p.pool.open_thin(id(3)).unwrap().write(&three, 0).unwrap();
    p.pool.commit().unwrap();
    model.insert(1, one);
    model.insert(2, two);
    model.insert(3, three);
    (p, model)
}

/// Opens the repaired metadata on a copy of the data device and reads every thin back:
/// ranges the report calls lost read as zeros, everything else as written.
fn read_back(
    what: &str,
    out: &MemDevice,
    data: &MemDevice,
    model: &BTreeMap<u64, Vec<u8>>,
    report: &RepairReport,
) {
    let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(&out.to_bytes()));
    let data: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(&data.to_bytes()));
    let pool = Pool::open(meta, data, PoolOptions::default()).expect("repaired pool opens");
    let block = DataBlockSize::DEFAULT.bytes() as usize;
    for (&thin, bytes) in model {
        let got = fixtures::pools::read_thin(&pool, thin, bytes.len() as u64);
        for (i, (g, w)) in got.chunks(block).zip(bytes.chunks(block)).enumerate() {
            let lost = report
                .lost
                .iter()
                .any(|r| r.thin_id == thin && r.contains(i as u64));
            if lost {
                assert!(g.iter().all(|&b| b == 0), "{what}: thin {thin} block {i}");
            } else {
                assert!(g == w, "{what}: thin {thin} block {i} differs");
            }
        }
    }
}

#[test]
fn engine_pools_read_back_after_repair() {
    let (p, model) = known_pool();
    let img = p.meta.to_bytes();
    let l = layout(&img);
    let (root1, nodes1) = &l.devices[&1];
    assert!(nodes1.len() >= 4, "thin 1 has an internal root over leaves");
    let leaf3 = l.devices[&3].1.iter().find(|n| n.leaf).unwrap().loc;
    let all_map = mappings_of(&*p.meta);
    let all = all_map.len();

    let mut cases: Vec<(&str, Vec<u8>, RepairOptions)> = Vec::new();
    let mut no_sb = img.clone();
    zero_block(&mut no_sb, 0);
    let geometry = RepairOptions {
        data_block_size: Some(DataBlockSize::DEFAULT),
        nr_data_blocks: Some(2048),
        transaction_id: None,
    };
    cases.push(("destroyed superblock", no_sb, geometry));
    let mut root = img.clone();
    break_block(&mut root, *root1);
    cases.push((
        "thin 1's internal root broken",
        root,
        RepairOptions::default(),
    ));
    let mut leaf = img.clone();
    break_block(&mut leaf, leaf3);
    cases.push(("thin 3's leaf broken", leaf, RepairOptions::default()));
    let mut sms = img.clone();
    lose_space_maps(&mut sms, &l.sb);
    cases.push(("space maps lost", sms, RepairOptions::default()));
    let mut both = img.clone();
    lose_space_maps(&mut both, &l.sb);
    break_block(&mut both, *root1);
    cases.push((
        "space maps lost and thin 1's root broken",
        both,
        RepairOptions::default(),
    ));

    let mut summary = Vec::new();
    for (what, damaged, opts) in cases {
        let (out, report) =
            repaired(what, &damaged, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
        read_back(what, &out, &p.data, &model, &report);
        let got = mappings_of(&*out);
        if what.contains("leaf") {
            assert_eq!(report.lost.len(), 1, "{what}: {:?}", report.lost);
            assert_eq!(report.lost[0].thin_id, 3);
            assert!(got.len() < all);
        } else if what.contains("space maps lost and") {
            // Without the old space map's counts, thin 1's leaves that thin 2 still points
            // at cannot be told from thin 2's own: they are reported lost for thin 1 (and
            // read back as zeros above), never guessed.
            assert!(report.lost.iter().all(|r| r.thin_id == 1), "{what}");
            assert!(report.nr_adopted_mappings > 0, "{what}");
        } else {
            assert!(report.lost.is_empty(), "{what}: {:?}", report.lost);
            assert_eq!(got.len(), all, "{what}");
        }
        let theirs = compare_with_thin_repair(what, &damaged, &got, &all_map);
        summary.push(format!(
            "{what}: {} of {all} mappings kept ({} adopted), thin_repair {theirs}",
            got.len(),
            report.nr_adopted_mappings
        ));
    }
    eprintln!("engine pool:\n  {}", summary.join("\n  "));
}

#[test]
fn garbage_and_cycles_end_without_a_panic() {
    // A device of random bytes, and an image whose internal node points at itself.
    let junk = random_bytes(2 * MIB, 7);
    let r = repaired("junk", &junk, &RepairOptions::default());
    assert!(
        matches!(r, Err(RepairError::NeedDataBlockSize(_))),
        "{:?}",
        r.as_ref().err()
    );
    let opts = RepairOptions {
        data_block_size: Some(DataBlockSize::DEFAULT),
        ..RepairOptions::default()
    };
    assert!(matches!(
        repaired("junk", &junk, &opts),
        Err(RepairError::NothingFound)
    ));

    let (p, _) = known_pool();
    let mut img = p.meta.to_bytes();
    let l = layout(&img);
    let root1 = l.devices[&1].0;
    // Point the root's second child at the root itself, and reseal it.
    let at = root1 as usize * BLOCK_SIZE;
    let values = 32 + 8 * 252;
    img[at + values + 8..at + values + 16].copy_from_slice(&root1.to_le_bytes());
    let b: &mut [u8; BLOCK_SIZE] = (&mut img[at..at + BLOCK_SIZE]).try_into().unwrap();
    engine::block::seal(b, root1, engine::block::BlockKind::Node);
    let (out, report) = repaired("cycle", &img, &RepairOptions::default()).unwrap();
    assert!(!report.lost.is_empty() || report.nr_adopted_mappings > 0);
    assert!(mappings_of(&*out).len() <= mappings_of(&*p.meta).len());
}

/// Every used block of two fixtures damaged three ways (zeroed; a byte flipped; a byte
/// flipped and the block resealed, so only its content is nonsense): repair never panics
/// or hangs, never invents a mapping, and what it writes checks clean.
#[test]
fn damage_sweep_never_panics_or_invents_mappings() {
    let mut cases = 0;
    for name in ["two-devs", "kernel-snap", "metadata-snap"] {
        let img = thin::metadata_image(name);
        let orig = mappings_of(&MemDevice::from_bytes(&img));
        let used = (1..(img.len() / BLOCK_SIZE) as u64)
            .filter(|&b| block(&img, b).iter().any(|&x| x != 0))
            .collect::<Vec<_>>();
        for &loc in &used {
            for kind in 0..3 {
                let mut d = img.clone();
                match kind {
                    0 => zero_block(&mut d, loc),
                    1 => break_block(&mut d, loc),
                    _ => {
                        // A child pointer or value slot turned into nonsense, resealed with
                        // the salt the block already had.
                        let at = loc as usize * BLOCK_SIZE;
                        let b: &mut [u8; BLOCK_SIZE] =
                            (&mut d[at..at + BLOCK_SIZE]).try_into().unwrap();
                        let kind = engine::block::BlockKind::identify(b);
                        b[2048 + (loc as usize * 8) % 1024] ^= 0x41;
                        if let Some(k) = kind {
                            engine::block::seal(b, loc, k);
                        }
                    }
                }
                cases += 1;
                let what = format!("{name} block {loc} damage {kind}");
                let input = MemDevice::from_bytes(&d);
                let out = Arc::new(MemDevice::new(d.len() as u64));
                let Ok(report) = repair(
                    &input,
                    out.clone(),
                    &RepairOptions::default(),
                    &mut |_, _| {},
                ) else {
                    continue;
                };
                let r = check(&*out, &CheckOptions::default());
                assert!(r.is_clean(), "{what}: {:?}", r.findings);
                let got = mappings_of(&*out);
                if report.superblock_intact && kind != 2 {
                    for (k, v) in &got {
                        assert_eq!(orig.get(k), Some(v), "{what}: invented {k:?}");
                    }
                }
            }
        }
    }
    assert!(cases > 50, "{cases}");
}

/// A destroyed top-level mapping root with the superblock intact: each device's mapping
/// tree is found again by the scan and matched with its details by `mapped_blocks` (the
/// match must be one to one: devices with equal counts stay empty and are reported).
#[test]
fn a_lost_top_level_root_is_rebuilt_from_the_devices_trees() {
    let mut summary = Vec::new();
    for name in [
        "kernel-snap",
        "metadata-snap",
        "shared-overflow",
        "two-devs",
    ] {
        let img = thin::metadata_image(name);
        let orig = MemDevice::from_bytes(&img);
        let sb = layout(&img).sb;
        let want = mappings_of(&orig);
        let mut damaged = img.clone();
        zero_block(&mut damaged, sb.data_mapping_root);
        let (out, report) = repaired(name, &damaged, &RepairOptions::default())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = mappings_of(&*out);
        for (k, v) in &got {
            assert_eq!(want.get(k), Some(v), "{name}: invented {k:?}");
        }
        let (_, details) = device_details(&orig, false).unwrap();
        for (id, d) in details {
            let n = got.keys().filter(|(dev, _)| *dev == id).count() as u64;
            if report.devices_without_mappings.contains(&id) {
                assert_eq!(n, 0, "{name}: thin {id}");
            } else {
                assert_eq!(n, d.mapped_blocks, "{name}: thin {id}");
            }
        }
        assert_eq!(details_of(&*out), details_of(&orig), "{name}");
        let theirs = compare_with_thin_repair(name, &damaged, &got, &want);
        summary.push(format!(
            "{name}: {} of {} mappings kept, emptied {:?}, thin_repair {theirs}",
            got.len(),
            want.len(),
            report.devices_without_mappings
        ));
    }
    eprintln!("lost top-level root:\n  {}", summary.join("\n  "));
}
