//! The b-tree node decoder on any bytes: header validation, then every accessor a lookup uses.
#![no_main]

use engine::block::{self, BLOCK_SIZE};
use engine::pdata::btree::node::{validate_header, Node};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = block::zeroed();
    let n = data.len().min(BLOCK_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    if validate_header(&b).is_err() {
        return;
    }
    let node = Node::new(&b);
    for i in 0..node.nr_entries() {
        let _ = node.key(i);
        let _ = node.value(i);
    }
    let probe = data
        .get(..8)
        .map_or(0, |k| u64::from_le_bytes(k.try_into().unwrap()));
    let _ = node.search(probe);
    let _ = node.lower_bound(probe);
});
