//! Damaged metadata never makes the pool panic or hang: every byte of the fixture images'
//! blocks is changed (and the block resealed, so the damage gets past the checksum into the
//! structure), then the pool is opened, every thin read, written and snapshotted, and
//! committed. Each step may fail with an error; none may panic.

use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::block::{self, BlockKind};
use engine::io::{BlockDevice, MemDevice};
use engine::{Pool, PoolOptions, ThinId};

fn exercise(image: &[u8], data_bytes: u64) {
    let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(image));
    let data: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(data_bytes));
    let Ok(pool) = Pool::open(meta, data, PoolOptions::default()) else {
        return;
    };
    let mut buf = vec![0u8; 300_000];
    for id in pool.thin_ids() {
        let Ok(thin) = pool.open_thin(id) else {
            continue;
        };
        let _ = thin.read(&mut buf, 0);
        let _ = thin.read(&mut buf, 150 * 65536);
        let _ = thin.write(&buf[..70_000], 5 * 65536 + 17);
        let _ = thin.discard(0, 3 * 65536);
    }
    if let Some(&first) = pool.thin_ids().first() {
        let _ = pool.create_snap(ThinId::new(4000).unwrap(), first);
        let _ = pool.delete(first);
    }
    let _ = pool.create_thin(ThinId::new(4001).unwrap());
    let _ = pool.commit();
    let _ = pool.release_metadata_snap();
}

/// `DAMAGE_STEP=1` sweeps every byte (slow; the default samples).
fn sweep(name: &str, step: usize) {
    let step = std::env::var("DAMAGE_STEP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(step);
    let image = fixtures::thin::metadata_image(name);
    let expect = fixtures::thin::expect(name);
    let data_bytes = expect["data_sm_root"]["nr_blocks"].as_u64().unwrap() * 65536;
    let kinds: Vec<(usize, BlockKind)> = (0..image.len() / 4096)
        .filter_map(|b| {
            let blk: &[u8; 4096] = image[b * 4096..(b + 1) * 4096].try_into().unwrap();
            BlockKind::identify(blk).map(|k| (b, k))
        })
        .collect();
    let mut cases = 0;
    let mut slowest = Duration::ZERO;
    for &(b, kind) in &kinds {
        for offset in (4..4096).step_by(step) {
            for xor in [0x01u8, 0x80, 0xFF] {
                let mut damaged = image.clone();
                let blk: &mut [u8; 4096] =
                    (&mut damaged[b * 4096..(b + 1) * 4096]).try_into().unwrap();
                blk[offset] ^= xor;
                block::seal(blk, b as u64, kind);
                let started = Instant::now();
                exercise(&damaged, data_bytes);
                slowest = slowest.max(started.elapsed());
                cases += 1;
            }
        }
    }
    eprintln!(
        "{name}: {cases} damaged images over {} blocks, slowest {slowest:?}",
        kinds.len()
    );
    // A hang guard, not a speed goal (healthy cases take milliseconds).
    assert!(
        slowest < Duration::from_secs(30),
        "a damaged image took {slowest:?}: a hang in the making"
    );
}

#[test]
fn two_devs_every_header_and_sampled_bytes() {
    sweep("two-devs", 13);
}

#[test]
fn kernel_scenario_sampled_bytes() {
    sweep("kernel-scenario", 37);
}

/// Found by the `metadata` fuzz target: a data space map root claiming 2^64 blocks made the
/// open allocate for all of them.
#[test]
fn an_absurd_data_space_map_size_is_an_error_not_an_allocation() {
    let mut image = fixtures::thin::metadata_image("two-devs");
    let sb: &mut [u8; 4096] = (&mut image[..4096]).try_into().unwrap();
    sb[64..72].copy_from_slice(&u64::MAX.to_le_bytes());
    block::seal(sb, 0, BlockKind::Superblock);
    let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_bytes(&image));
    let data: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    let err = Pool::open(meta, data, PoolOptions::default())
        .err()
        .expect("refused");
    assert!(matches!(err, engine::Error::Corrupt { .. }), "{err}");
}

/// Found by review: a data space map claiming 2^64 blocks, whose index names the last of the
/// bitmaps such a map would have; the checker's block numbers (bitmap × entries + entry)
/// passed 2^64.
#[test]
fn check_reports_a_bitmap_numbered_past_40_bit_blocks_without_overflowing() {
    use engine::pdata::btree::node::{Node, NodeMut};
    use engine::pdata::space_map::ENTRIES_PER_BITMAP;
    use engine::tools::check::{check, CheckOptions};

    let mut image = fixtures::thin::metadata_image("two-devs");
    let index_root = {
        let sb: &mut [u8; 4096] = (&mut image[..4096]).try_into().unwrap();
        sb[64..72].copy_from_slice(&u64::MAX.to_le_bytes());
        block::seal(sb, 0, BlockKind::Superblock);
        u64::from_le_bytes(sb[80..88].try_into().unwrap()) as usize
    };
    let leaf: &mut [u8; 4096] = (&mut image[index_root * 4096..(index_root + 1) * 4096])
        .try_into()
        .unwrap();
    assert!(Node::new(leaf).is_leaf() && Node::new(leaf).nr_entries() == 1);
    NodeMut::new(leaf).set_key(0, u64::MAX.div_ceil(ENTRIES_PER_BITMAP) - 1);
    block::seal(leaf, index_root as u64, BlockKind::Node);

    let report = check(&MemDevice::from_bytes(&image), &CheckOptions::default());
    assert!(!report.is_clean());
    let errors: Vec<String> = report.errors().map(|f| format!("{f:?}")).collect();
    assert!(
        errors.iter().any(|e| e.contains("40-bit")),
        "the superblock's size is named: {errors:?}"
    );
}

/// Found by review: repair rebuilt a pool whose damaged superblock claimed 2^40 - 1 data
/// blocks, and formatting its space map asked for about 275 GB.
#[test]
fn repair_refuses_a_data_size_the_metadata_device_cannot_map() {
    use engine::tools::repair::{repair, RepairError, RepairOptions};

    let mut image = fixtures::thin::metadata_image("two-devs");
    let sb: &mut [u8; 4096] = (&mut image[..4096]).try_into().unwrap();
    sb[64..72].copy_from_slice(&((1u64 << 40) - 1).to_le_bytes());
    block::seal(sb, 0, BlockKind::Superblock);
    let input = MemDevice::from_bytes(&image);
    let output: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(image.len() as u64));
    let Err(err) = repair(&input, output, &RepairOptions::default(), &mut |_, _| {}) else {
        panic!("repaired a pool whose space map cannot fit");
    };
    assert!(matches!(err, RepairError::Write(_)), "{err}");
    let chain = error_chain(&err);
    assert!(chain.contains("space map blocks"), "{chain}");
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s += &format!(": {c}");
        cause = c.source();
    }
    s
}

/// Found by review: a mapping tree of 11 internal levels, each node listing one child in all
/// of its 252 entries (every node valid on its own). A 1 MiB read went down every path to
/// the bottom, 16^11 of them; now the walk stops after as many nodes as the device has
/// blocks, with an error.
#[test]
fn a_mapping_tree_that_lists_one_child_many_times_is_an_error_not_a_hang() {
    use engine::pdata::btree::node::{max_entries, NodeMut, INTERNAL_NODE, LEAF_NODE};
    use fixtures::pools::{id, mem_pool};

    let mp = mem_pool(
        4 << 20,
        64,
        engine::DataBlockSize::DEFAULT,
        PoolOptions::default(),
    );
    mp.pool.create_thin(id(1)).unwrap();
    let thin = mp.pool.open_thin(id(1)).unwrap();
    thin.write(&[7u8; 65536], 0).unwrap();
    mp.pool.commit().unwrap();
    drop(thin);
    drop(mp.pool);

    let meta = &mp.meta;
    let read = |at: u64| {
        let mut b = block::zeroed();
        meta.read_at(&mut b[..], at * 4096).unwrap();
        b
    };
    let top = u64::from_le_bytes(read(0)[320..328].try_into().unwrap());
    // The chain goes at the end of the device, far from the few blocks the pool uses.
    let last = meta.size() / 4096 - 1;
    let levels = 11;
    let mut child = last;
    let mut b = block::zeroed();
    NodeMut::new(&mut b).init(LEAF_NODE, 8);
    block::seal(&mut b, child, BlockKind::Node);
    meta.write_at(&b[..], child * 4096).unwrap();
    for level in 1..=levels {
        let at = last - level;
        let mut b = block::zeroed();
        let mut n = NodeMut::new(&mut b);
        n.init(INTERNAL_NODE, 8);
        let entries = max_entries(8) as usize;
        for i in 0..entries {
            n.set_key(i, i as u64);
            n.set_value_u64(i, child);
        }
        n.set_nr_entries(entries);
        block::seal(&mut b, at, BlockKind::Node);
        meta.write_at(&b[..], at * 4096).unwrap();
        child = at;
    }
    // Thin 1's root in the top-level tree (a single leaf) becomes the chain's top.
    let mut t = read(top);
    NodeMut::new(&mut t).set_value_u64(0, child);
    block::seal(&mut t, top, BlockKind::Node);
    meta.write_at(&t[..], top * 4096).unwrap();

    let m: Arc<dyn BlockDevice> = mp.meta.clone();
    let d: Arc<dyn BlockDevice> = mp.data.clone();
    let pool = Pool::open(m, d, PoolOptions::default()).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let err = thin.read(&mut buf, 0).expect_err("refused");
    assert!(matches!(err, engine::Error::Corrupt { .. }), "{err}");
    // A hang guard, not a speed goal: the budget is the device's 1,024 blocks.
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Found by review: a mapping tree whose root lists one leaf twice (each node valid on its
/// own, the leaf's reference count 2 as a snapshot leaves it). A discard's removal merged
/// the leaf with itself (two shadow copies of it), wrote a leaf holding every key twice,
/// freed the leaf thins 2 and 3 still map through, and committed all that. The removal now
/// refuses to merge a node with itself and changes nothing.
#[test]
fn a_removal_under_a_node_that_lists_one_child_twice_is_an_error_not_a_broken_tree() {
    discard_under_a_crafted_root(|thin2_leaf, _| [thin2_leaf, thin2_leaf]);
}

/// As above, with two different leaves whose keys overlap (both map blocks 0..4): merging
/// them wrote a leaf with its keys out of order.
#[test]
fn a_removal_merging_children_whose_keys_overlap_is_an_error_not_a_broken_tree() {
    discard_under_a_crafted_root(|thin2_leaf, thin4_leaf| [thin2_leaf, thin4_leaf]);
}

/// Builds a pool of thins 1, 2, 3 (a snapshot of 2) and 4, each mapping blocks 0..4 in a
/// single leaf; turns thin 1's leaf into an internal node whose two children `children`
/// picks from thin 2's and thin 4's leaves (keys 0 and 100); then discards block 1 of thin
/// 1, which makes the removal top up the first child by merging it with the second.
fn discard_under_a_crafted_root(children: impl Fn(u64, u64) -> [u64; 2]) {
    use engine::pdata::btree::node::{Node, NodeMut, INTERNAL_NODE};
    use fixtures::pools::{id, mem_pool};

    let mp = mem_pool(
        4 << 20,
        64,
        engine::DataBlockSize::DEFAULT,
        PoolOptions::default(),
    );
    let bs = engine::DataBlockSize::DEFAULT.bytes();
    for thin in [1, 2, 4] {
        mp.pool.create_thin(id(thin)).unwrap();
        let t = mp.pool.open_thin(id(thin)).unwrap();
        t.write(&vec![thin as u8; 4 * bs as usize], 0).unwrap();
    }
    mp.pool.commit().unwrap();
    // Thin 2's mapping leaf is now shared: reference count 2.
    mp.pool.create_snap(id(3), id(2)).unwrap();
    mp.pool.commit().unwrap();
    drop(mp.pool);

    let meta = &mp.meta;
    let read = |at: u64| {
        let mut b = block::zeroed();
        meta.read_at(&mut b[..], at * 4096).unwrap();
        b
    };
    let top_at = u64::from_le_bytes(read(0)[320..328].try_into().unwrap());
    let top = read(top_at);
    let root_of = |thin: u64| {
        let n = Node::new(&top);
        let leaf = n.value_u64(n.search(thin).expect("thin is in the top-level tree"));
        assert!(Node::new(&read(leaf)).is_leaf());
        leaf
    };
    let thin1_leaf = root_of(1);
    let [first, second] = children(root_of(2), root_of(4));
    let mut b = block::zeroed();
    let mut n = NodeMut::new(&mut b);
    n.init(INTERNAL_NODE, 8);
    n.insert_at(0, 0, &first.to_le_bytes());
    n.insert_at(1, 100, &second.to_le_bytes());
    block::seal(&mut b, thin1_leaf, BlockKind::Node);
    meta.write_at(&b[..], thin1_leaf * 4096).unwrap();
    let before = meta.to_bytes();

    let m: Arc<dyn BlockDevice> = mp.meta.clone();
    let d: Arc<dyn BlockDevice> = mp.data.clone();
    let pool = Pool::open(m, d, PoolOptions::default()).unwrap();
    let thin = pool.open_thin(id(1)).unwrap();
    let err = thin.discard(bs, bs).expect_err("refused");
    assert!(matches!(err, engine::Error::Corrupt { .. }), "{err}");
    drop(thin);
    // The transaction was thrown away: only the superblock changes (needs_check is set).
    let _ = pool.commit();
    drop(pool);
    assert!(
        meta.to_bytes()[4096..] == before[4096..],
        "blocks past the superblock changed"
    );
}
