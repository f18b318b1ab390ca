//! Aborting a transaction puts back exactly the committed devices: created ones go, deleted
//! ones return, changed details revert (the undo log that keeps commits O(changes)).

use std::sync::Arc;

use engine::io::{BlockDevice, MemDevice};
use engine::thin::metadata::Metadata;
use engine::{BlockTime, DataBlockSize, ThinId};

fn id(n: u64) -> ThinId {
    ThinId::new(n).unwrap()
}

#[test]
fn abort_restores_the_committed_devices() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20));
    let mut md = Metadata::format(dev.clone(), DataBlockSize::DEFAULT, 1000).unwrap();
    for t in [1, 2] {
        md.create_thin(id(t)).unwrap();
    }
    let b = md.alloc_data_block().unwrap();
    md.insert(id(1), 5, BlockTime { block: b, time: 0 })
        .unwrap();
    md.commit().unwrap();
    let committed: Vec<_> = md.devices().map(|(i, d)| (i, *d)).collect();

    md.create_thin(id(3)).unwrap();
    md.create_snap(id(4), id(1)).unwrap();
    let b = md.alloc_data_block().unwrap();
    md.insert(
        id(1),
        6,
        BlockTime {
            block: b,
            time: md.time(),
        },
    )
    .unwrap();
    md.remove(id(1), 5).unwrap();
    md.delete(id(2)).unwrap();
    assert_ne!(
        md.devices().map(|(i, d)| (i, *d)).collect::<Vec<_>>(),
        committed
    );
    md.abort();
    assert_eq!(
        md.devices().map(|(i, d)| (i, *d)).collect::<Vec<_>>(),
        committed
    );
    assert_eq!(md.lookup(id(1), 5).unwrap().map(|bt| bt.block), Some(0));
    assert_eq!(md.lookup(id(1), 6).unwrap(), None);
    // And the pool keeps working from there, the same as a fresh open would.
    md.create_thin(id(9)).unwrap();
    md.commit().unwrap();
    let reopened = Metadata::open(dev).unwrap();
    let ids: Vec<u64> = reopened.devices().map(|(i, _)| i.get()).collect();
    assert_eq!(ids, vec![1, 2, 9]);
}
