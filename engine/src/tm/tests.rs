//! White-box transaction manager tests: what a spill (the early write-out of dirty blocks)
//! may and may not change.

use std::sync::Arc;

use super::*;
use crate::io::MemDevice;
use crate::pdata::btree::{self, node::NodeMut, TreeType};

const PLAIN: TreeType = TreeType {
    value_size: 8,
    refs: ValueRefs::None,
};

fn new_tm(dev: &Arc<MemDevice>, dirty_limit: usize) -> TransactionManager {
    let blocks = dev.size() / BLOCK_SIZE as u64;
    let mut meta = SpaceMap::new(blocks);
    meta.set(0, 1).unwrap();
    let mut tm = TransactionManager::new(dev.clone(), meta, SpaceMap::new(1));
    tm.set_dirty_limit(dirty_limit);
    tm
}

fn value(tm: &mut TransactionManager, root: u64, key: u64) -> Option<u64> {
    btree::lookup(tm, root, key, PLAIN)
        .unwrap()
        .map(|v| v.as_u64())
}

#[test]
fn a_node_written_out_by_a_spill_stays_writable() {
    let dev = Arc::new(MemDevice::new(1024 * BLOCK_SIZE as u64));
    let mut tm = new_tm(&dev, 4);
    let a = btree::empty(&mut tm, 8).unwrap();
    NodeMut::new(tm.write(a).unwrap()).insert_at(0, 7, &42u64.to_le_bytes());
    // Each new block may spill; allocate until a spill has taken `a`.
    let mut others = 0;
    while tm.dirty.contains_key(&a) {
        btree::empty(&mut tm, 8).unwrap();
        others += 1;
        assert!(others < 100, "no spill took block {a}");
        assert!(tm.nr_dirty() <= 4, "{} blocks dirty", tm.nr_dirty());
    }
    // Still allocated in this transaction with one owner: changed in place, not copied.
    assert!(tm.is_writable(a));
    NodeMut::new(tm.write(a).unwrap()).insert_at(1, 9, &43u64.to_le_bytes());
    assert_eq!(tm.shadow(a, ValueRefs::None).unwrap(), a);
    assert_eq!(value(&mut tm, a, 7), Some(42));
    assert_eq!(value(&mut tm, a, 9), Some(43));
    tm.commit(&mut block::zeroed()).unwrap();

    // What the device holds, read through a cold transaction manager.
    let mut cold = new_tm(&dev, 4);
    cold.meta_sm = tm.meta_sm.clone();
    assert_eq!(value(&mut cold, a, 7), Some(42));
    assert_eq!(value(&mut cold, a, 9), Some(43));
}

#[test]
fn a_block_freed_after_a_spill_is_not_writable() {
    let dev = Arc::new(MemDevice::new(1024 * BLOCK_SIZE as u64));
    let mut tm = new_tm(&dev, 4);
    let a = btree::empty(&mut tm, 8).unwrap();
    while tm.dirty.contains_key(&a) {
        btree::empty(&mut tm, 8).unwrap();
    }
    tm.dec(a).unwrap();
    let err = tm.write(a).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Corrupt {
                damage: Damage::UnexpectedSharing,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn space_map_blocks_are_spilled_too_so_dirty_blocks_stay_bounded() {
    // A data space map growing by millions of blocks dirties a bitmap per 16320 of them and
    // few nodes: spilling nodes alone left every bitmap in memory.
    let dev = Arc::new(MemDevice::new(1024 * BLOCK_SIZE as u64));
    let mut tm = new_tm(&dev, 8);
    let mut written = vec![];
    for i in 0..200u8 {
        let at = tm.new_block(BlockKind::Bitmap).unwrap();
        let mut b = block::zeroed();
        b[100] = i;
        tm.put_block(at, b, BlockKind::Bitmap);
        assert!(tm.nr_dirty() <= 8, "{} blocks dirty", tm.nr_dirty());
        written.push((at, i));
    }
    tm.commit(&mut block::zeroed()).unwrap();
    for (at, i) in written {
        assert_eq!(
            tm.read_raw(at, BlockKind::Bitmap).unwrap()[100],
            i,
            "block {at}"
        );
    }
}
