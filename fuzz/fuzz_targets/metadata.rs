//! Whole metadata images: the fuzzer writes blocks, each resealed as the kind its first byte
//! names (so checksums never stop it), over a real pool's image as a starting point. Then the
//! pool opens it, reads and writes every thin and commits, and check and dump walk it: any of
//! these may fail with an error, none may panic or hang.
#![no_main]

use std::sync::{Arc, OnceLock};

use engine::block::{self, BlockKind, BLOCK_SIZE};
use engine::io::{BlockDevice, MemDevice};
use engine::tools::check::{check, CheckOptions};
use engine::tools::dump::{dump, DumpOptions};
use engine::{DataBlockSize, Pool, PoolOptions, ThinId};
use libfuzzer_sys::fuzz_target;

const META_BLOCKS: usize = 64;
const DATA_BLOCKS: u64 = 256;

/// A small real pool: two thins, a snapshot, a few hundred mappings.
fn base_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let meta = Arc::new(MemDevice::new((META_BLOCKS * BLOCK_SIZE) as u64));
        let m: Arc<dyn BlockDevice> = meta.clone();
        let d: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(DATA_BLOCKS * 65536));
        let pool = Pool::format(m, d, DataBlockSize::DEFAULT, PoolOptions::default()).unwrap();
        let t = |n| ThinId::new(n).unwrap();
        pool.create_thin(t(1)).unwrap();
        let thin = pool.open_thin(t(1)).unwrap();
        for v in 0..150u64 {
            thin.write(&[v as u8; 16], v * 65536 * 3 / 2).unwrap();
        }
        drop(thin);
        pool.create_snap(t(2), t(1)).unwrap();
        pool.open_thin(t(2)).unwrap().write(&[9; 16], 0).unwrap();
        pool.commit().unwrap();
        drop(pool);
        meta.to_bytes()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut image = base_image().to_vec();
    // Input: records of (block index, kind, offset hi, offset lo, byte count, bytes...).
    let mut rest = data;
    while rest.len() >= 5 {
        let blk = rest[0] as usize % META_BLOCKS;
        let kind = [
            BlockKind::Superblock,
            BlockKind::Node,
            BlockKind::Bitmap,
            BlockKind::Index,
        ][rest[1] as usize % 4];
        let off = (usize::from(rest[2]) << 8 | usize::from(rest[3])) % BLOCK_SIZE;
        let len = (rest[4] as usize).min(rest.len() - 5).min(BLOCK_SIZE - off);
        let b: &mut [u8; BLOCK_SIZE] = (&mut image[blk * BLOCK_SIZE..(blk + 1) * BLOCK_SIZE])
            .try_into()
            .unwrap();
        b[off..off + len].copy_from_slice(&rest[5..5 + len]);
        block::seal(b, blk as u64, kind);
        rest = &rest[5 + len..];
    }
    let meta = MemDevice::from_bytes(&image);
    let _ = check(&meta, &CheckOptions::default());
    let _ = dump(&meta, &DumpOptions::default(), &mut std::io::sink());
    let m: Arc<dyn BlockDevice> = Arc::new(meta);
    let d: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(DATA_BLOCKS * 65536));
    if let Ok(pool) = Pool::open(m, d, PoolOptions::default()) {
        let mut buf = vec![0u8; 200_000];
        for id in pool.thin_ids() {
            if let Ok(thin) = pool.open_thin(id) {
                let _ = thin.read(&mut buf, 0);
                let _ = thin.write(&buf[..70_000], 65_000);
                let _ = thin.discard(0, 200_000);
            }
        }
        let _ = pool.create_thin(ThinId::new(77).unwrap());
        let _ = pool.commit();
    }
});
