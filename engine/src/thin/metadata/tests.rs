//! White-box metadata tests that need the transaction manager's dirty limit lowered.

use std::sync::Arc;

use super::*;
use crate::io::MemDevice;
use crate::pdata::space_map::ENTRIES_PER_BITMAP;
use crate::tools::check::{check, CheckOptions};

#[test]
fn growing_the_data_space_map_across_spills_passes_check() {
    // A commit that adds more data space map bitmaps than the dirty limit (64Ki at full
    // scale: a 64 TiB pool of 64 KiB blocks) spills nodes of the bitmap index tree that its
    // inserts made writable a moment before.
    let dev = Arc::new(MemDevice::new(16 << 20));
    let mut md = Metadata::format(dev.clone(), DataBlockSize::DEFAULT, 1000).unwrap();
    md.tm.set_dirty_limit(16);
    let id = ThinId::new(1).unwrap();
    md.create_thin(id).unwrap();
    let nr_data_blocks = 2000 * ENTRIES_PER_BITMAP - 5;
    md.resize_data(nr_data_blocks).unwrap();
    // Mappings all over the data space dirty bitmaps that already exist, too.
    let mapped: Vec<(u64, u64)> = (0..3000u64)
        .map(|v| (v * 7, (v * 1_000_003) % nr_data_blocks))
        .collect();
    for &(v, data) in &mapped {
        md.reference_data_block(data).unwrap();
        md.insert(
            id,
            v,
            BlockTime {
                block: data,
                time: 0,
            },
        )
        .unwrap();
    }
    md.commit().unwrap();

    let report = check(&*dev, &CheckOptions::default());
    assert!(
        report.is_clean(),
        "{:?}",
        report.errors().collect::<Vec<_>>()
    );
    let mut md = Metadata::open(dev).unwrap();
    assert_eq!(md.nr_data_blocks(), nr_data_blocks);
    assert_eq!(md.free_data_blocks(), nr_data_blocks - mapped.len() as u64);
    for &(v, data) in &mapped {
        assert_eq!(md.lookup(id, v).unwrap().map(|bt| bt.block), Some(data));
    }
}
