//! The superblock decoder on any bytes. The input is sealed with the superblock's checksum
//! first, so the fuzzer explores the fields rather than the CRC.
#![no_main]

use engine::block::{self, BlockKind, BLOCK_SIZE};
use engine::thin::metadata::Superblock;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = block::zeroed();
    let n = data.len().min(BLOCK_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    block::seal(&mut b, 0, BlockKind::Superblock);
    if let Ok(sb) = Superblock::read(&b, 0) {
        // Whatever decodes must encode to the same fields.
        let mut again = sb.encode();
        block::seal(&mut again, 0, BlockKind::Superblock);
        assert_eq!(Superblock::read(&again, 0).ok(), Some(sb));
    }
});
