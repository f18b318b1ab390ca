use std::collections::HashMap;
use std::io;

use parking_lot::RwLock;

use super::{check_range, BlockDevice};

/// Bytes per chunk of a [`MemDevice`]: chunks never written read as zeros and take no memory.
const CHUNK: u64 = 64 * 1024;

/// A sparse in-memory device for tests, fixtures and CPU-cost benchmarks. `sync` is a no-op:
/// everything written is "durable" at once (crash tests wrap it with a device that is not).
pub struct MemDevice {
    size: RwLock<u64>,
    chunks: RwLock<HashMap<u64, Box<[u8]>>>,
}

impl MemDevice {
    pub fn new(size: u64) -> MemDevice {
        MemDevice {
            size: RwLock::new(size),
            chunks: RwLock::new(HashMap::new()),
        }
    }

    /// A device holding a copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> MemDevice {
        let dev = MemDevice::new(bytes.len() as u64);
        dev.write_at(bytes, 0).expect("in range by construction");
        dev
    }

    /// The whole device as one vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0; *self.size.read() as usize];
        self.read_at(&mut out, 0).expect("in range by construction");
        out
    }

    /// Bytes of memory held by written chunks.
    pub fn allocated(&self) -> u64 {
        self.chunks.read().len() as u64 * CHUNK
    }

    fn for_each_piece(offset: u64, len: usize, mut f: impl FnMut(u64, usize, usize, usize)) {
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let chunk = pos / CHUNK;
            let within = (pos % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(len - done);
            f(chunk, within, done, n);
            done += n;
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        *self.size.read()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, buf.len())?;
        let chunks = self.chunks.read();
        Self::for_each_piece(offset, buf.len(), |chunk, within, done, n| {
            let dst = &mut buf[done..done + n];
            match chunks.get(&chunk) {
                Some(data) => dst.copy_from_slice(&data[within..within + n]),
                None => dst.fill(0),
            }
        });
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, buf.len())?;
        let mut chunks = self.chunks.write();
        Self::for_each_piece(offset, buf.len(), |chunk, within, done, n| {
            let data = chunks
                .entry(chunk)
                .or_insert_with(|| vec![0; CHUNK as usize].into_boxed_slice());
            data[within..within + n].copy_from_slice(&buf[done..done + n]);
        });
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size(), offset, len as usize)?;
        let mut chunks = self.chunks.write();
        Self::for_each_piece(offset, len as usize, |chunk, within, _, n| {
            if within == 0 && n == CHUNK as usize {
                chunks.remove(&chunk);
            } else if let Some(data) = chunks.get_mut(&chunk) {
                data[within..within + n].fill(0);
            }
        });
        Ok(())
    }

    fn grow(&self, new_size: u64) -> io::Result<()> {
        let mut size = self.size.write();
        *size = (*size).max(new_size);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_string()
    }
}
