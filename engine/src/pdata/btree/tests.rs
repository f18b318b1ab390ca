//! White-box b-tree tests: random inserts and removes against a `BTreeMap`, with every
//! structural rule and every reference count checked after each batch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use proptest::prelude::*;

use super::node::{min_entries, Node};
use super::*;
use crate::io::MemDevice;
use crate::pdata::space_map::SpaceMap;

const PLAIN: TreeType = TreeType {
    value_size: 8,
    refs: ValueRefs::None,
};

fn new_tm(blocks: u64) -> TransactionManager {
    let dev = Arc::new(MemDevice::new(blocks * 4096));
    let mut meta = SpaceMap::new(blocks);
    meta.set(0, 1).unwrap();
    TransactionManager::new(dev, meta, SpaceMap::new(1 << 20))
}

#[allow(clippy::too_many_arguments)] // a recursive walk's state, kept explicit
/// Walks a tree checking the format rules; adds one to `counts` for each node reference.
fn validate(
    tm: &mut TransactionManager,
    location: u64,
    low: u64,
    high: Option<u64>,
    is_root: bool,
    depth: usize,
    leaf_depth: &mut Option<usize>,
    counts: &mut HashMap<u64, u32>,
    out: &mut Vec<(u64, u64)>,
) {
    let first_visit = {
        let c = counts.entry(location).or_insert(0);
        *c += 1;
        *c == 1
    };
    if !first_visit {
        return;
    }
    let b = tm.read_node(location).unwrap();
    let n = Node::new(&b);
    if !is_root {
        assert!(
            n.nr_entries() >= min_entries(n.max_entries() as u32) as usize,
            "node {location} has {} entries",
            n.nr_entries()
        );
    }
    for i in 0..n.nr_entries() {
        let k = n.key(i);
        assert!(k >= low, "key {k} below separator {low}");
        if let Some(h) = high {
            assert!(k < h, "key {k} not below next separator {h}");
        }
    }
    if n.is_leaf() {
        match leaf_depth {
            Some(d) => assert_eq!(*d, depth, "leaves at different depths"),
            None => *leaf_depth = Some(depth),
        }
        for i in 0..n.nr_entries() {
            out.push((n.key(i), n.value_u64(i)));
        }
        return;
    }
    for i in 0..n.nr_entries() {
        let next = if i + 1 < n.nr_entries() {
            Some(n.key(i + 1))
        } else {
            high
        };
        let child = n.value_u64(i);
        validate(
            tm,
            child,
            n.key(i),
            next,
            false,
            depth + 1,
            leaf_depth,
            counts,
            out,
        );
    }
}

fn contents(tm: &mut TransactionManager, roots: &[u64]) -> Vec<Vec<(u64, u64)>> {
    let mut counts = HashMap::new();
    counts.insert(0, 1);
    let mut all = vec![];
    for &root in roots {
        let mut out = vec![];
        validate(tm, root, 0, None, true, 0, &mut None, &mut counts, &mut out);
        all.push(out);
    }
    // Every reachable block's count matches the references found; nothing else is allocated.
    for (&b, &c) in &counts {
        assert_eq!(tm.meta_sm.count(b).unwrap(), c, "count of block {b}");
    }
    assert_eq!(
        tm.meta_sm.nr_allocated(),
        counts.len() as u64,
        "leaked metadata blocks"
    );
    all
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u64, u64),
    Remove(u64),
}

fn ops(key_space: u64) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            3 => (0..key_space, any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
            2 => (0..key_space).prop_map(Op::Remove),
        ],
        0..3000,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn matches_a_btreemap(ops in ops(5000)) {
        let mut tm = new_tm(4096);
        let mut root = empty(&mut tm, 8).unwrap();
        let mut model = BTreeMap::new();
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Insert(k, v) => {
                    let (r, old) = insert(&mut tm, root, k, &v.to_le_bytes(), PLAIN).unwrap();
                    root = r;
                    prop_assert_eq!(old.map(|o| o.as_u64()), model.insert(k, v));
                }
                Op::Remove(k) => {
                    let (r, old) = remove(&mut tm, root, k, PLAIN).unwrap();
                    root = r;
                    prop_assert_eq!(old.map(|o| o.as_u64()), model.remove(&k));
                }
            }
            if i % 500 == 0 {
                tm.meta_sm.commit();
            }
        }
        let got = contents(&mut tm, &[root]).remove(0);
        let want: Vec<_> = model.into_iter().collect();
        prop_assert_eq!(got, want);
    }
}

#[test]
fn grows_and_shrinks_through_several_levels() {
    let mut tm = new_tm(16384);
    let mut root = empty(&mut tm, 8).unwrap();
    let n = 100_000u64;
    for k in 0..n {
        root = insert(&mut tm, root, k * 7, &k.to_le_bytes(), PLAIN)
            .unwrap()
            .0;
    }
    let depth = {
        let mut d = 0;
        let mut loc = root;
        loop {
            let b = tm.read_node(loc).unwrap();
            let node = Node::new(&b);
            if node.is_leaf() {
                break d;
            }
            loc = node.value_u64(0);
            d += 1;
        }
    };
    assert!(
        depth >= 2,
        "100k keys need an internal level or two (depth {depth})"
    );
    assert_eq!(contents(&mut tm, &[root])[0].len(), n as usize);
    for k in (0..n).rev() {
        let (r, old) = remove(&mut tm, root, k * 7, PLAIN).unwrap();
        root = r;
        assert_eq!(old.unwrap().as_u64(), k);
        if k % 9973 == 0 {
            contents(&mut tm, &[root]);
        }
    }
    let b = tm.read_node(root).unwrap();
    assert!(Node::new(&b).is_leaf());
    assert_eq!(Node::new(&b).nr_entries(), 0);
    assert_eq!(
        tm.meta_sm.nr_allocated(),
        2,
        "only the superblock and the empty root remain"
    );
}

#[test]
fn shared_subtrees_stay_intact_when_one_side_changes() {
    let mut tm = new_tm(8192);
    let mut a = empty(&mut tm, 8).unwrap();
    for k in 0..5000u64 {
        a = insert(&mut tm, a, k, &k.to_le_bytes(), PLAIN).unwrap().0;
    }
    tm.meta_sm.commit();
    // Share the whole tree, as create_snap does.
    tm.inc(a).unwrap();
    let mut b = a;
    for k in (0..5000u64).step_by(3) {
        b = insert(&mut tm, b, k, &(k + 1).to_le_bytes(), PLAIN)
            .unwrap()
            .0;
    }
    for k in (1..5000u64).step_by(5) {
        b = remove(&mut tm, b, k, PLAIN).unwrap().0;
    }
    let all = contents(&mut tm, &[a, b]);
    assert_eq!(
        all[0],
        (0..5000u64).map(|k| (k, k)).collect::<Vec<_>>(),
        "origin unchanged"
    );
    let want_b: Vec<_> = (0..5000u64)
        .filter(|k| k % 5 != 1)
        .map(|k| (k, if k % 3 == 0 { k + 1 } else { k }))
        .collect();
    assert_eq!(all[1], want_b);
    // Dropping one side frees exactly what only it used.
    del(&mut tm, b, PLAIN).unwrap();
    contents(&mut tm, &[a]);
}

#[test]
fn mapping_values_keep_data_counts_when_shared_leaves_are_copied() {
    let mut tm = new_tm(4096);
    let mut a = empty(&mut tm, 8).unwrap();
    for k in 0..1000u64 {
        let block = tm.data_sm.alloc().unwrap();
        a = insert(&mut tm, a, k, &(block << 24).to_le_bytes(), MAPPING_TREE)
            .unwrap()
            .0;
    }
    tm.meta_sm.commit();
    tm.inc(a).unwrap();
    // A change on one side copies one leaf: its 100-odd data blocks gain a reference.
    tm.data_inc(999_999).unwrap();
    let (b, old) = insert(
        &mut tm,
        a,
        0,
        &(999_999u64 << 24).to_le_bytes(),
        MAPPING_TREE,
    )
    .unwrap();
    // The caller drops what a replaced value referenced.
    tm.data_dec(old.unwrap().as_u64() >> 24).unwrap();
    let shared_leaf_entries = (1..1000u64)
        .filter(|&d| tm.data_sm.count(d).unwrap() == 2)
        .count();
    assert!(
        shared_leaf_entries > 80 && shared_leaf_entries < 300,
        "{shared_leaf_entries}"
    );
    del(&mut tm, b, MAPPING_TREE).unwrap();
    assert_eq!(tm.data_sm.count(999_999).unwrap(), 0);
    assert!((0..1000u64).all(|d| tm.data_sm.count(d).unwrap() == 1));
    del(&mut tm, a, MAPPING_TREE).unwrap();
    assert!((0..1000u64).all(|d| tm.data_sm.count(d).unwrap() == 0));
}

#[test]
fn a_cycle_is_an_error_not_a_hang() {
    let mut tm = new_tm(1024);
    let mut root = empty(&mut tm, 8).unwrap();
    for k in 0..1000u64 {
        root = insert(&mut tm, root, k, &k.to_le_bytes(), PLAIN).unwrap().0;
    }
    // Point the root's first child back at the root.
    node::NodeMut::new(tm.write(root).unwrap()).set_value_u64(0, root);
    assert!(matches!(
        lookup(&mut tm, root, 0, PLAIN),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        insert(&mut tm, root, 0, &[0; 8], PLAIN),
        Err(Error::Corrupt { .. })
    ));
    let mut n = 0;
    assert!(for_each(&mut tm, root, PLAIN, &mut |_, _| {
        n += 1;
        Ok(())
    })
    .is_err());
}

#[test]
fn inserts_and_removes_across_spills_keep_every_key_and_count() {
    // A dirty limit of 16 spills every 8 new blocks, in the middle of splits, merges and
    // copies of shared nodes: every node an operation made writable must stay so.
    let mut tm = new_tm(16384);
    tm.set_dirty_limit(16);
    let mut a = empty(&mut tm, 8).unwrap();
    let mut model_a = BTreeMap::new();
    for i in 0..20_000u64 {
        let k = (i * 7919) % 40_000;
        a = insert(&mut tm, a, k, &i.to_le_bytes(), PLAIN).unwrap().0;
        model_a.insert(k, i);
    }
    tm.commit(&mut crate::block::zeroed()).unwrap();
    // Share the whole tree, as create_snap does, and change one side.
    tm.inc(a).unwrap();
    let mut b = a;
    let mut model_b = model_a.clone();
    for i in 0..20_000u64 {
        let k = (i * 104_729) % 40_000;
        if i % 3 == 0 {
            b = remove(&mut tm, b, k, PLAIN).unwrap().0;
            model_b.remove(&k);
        } else {
            b = insert(&mut tm, b, k, &(i + 1).to_le_bytes(), PLAIN)
                .unwrap()
                .0;
            model_b.insert(k, i + 1);
        }
        if i == 10_000 {
            tm.commit(&mut crate::block::zeroed()).unwrap();
        }
    }
    let all = contents(&mut tm, &[a, b]);
    assert_eq!(all[0], model_a.into_iter().collect::<Vec<_>>(), "origin");
    assert_eq!(
        all[1],
        model_b.into_iter().collect::<Vec<_>>(),
        "changed side"
    );
}
