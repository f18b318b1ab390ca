//! A window `[offset, offset + len)` over another device, so that one raw device can hold a
//! pool's metadata and its data side by side. Every access is checked against the window
//! before it reaches the device underneath: a region can never read, write or discard a byte
//! of its neighbour.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::BlockDevice;

/// Part of another device, addressed from 0.
///
/// Only a region that ends where its device ends may grow (the device grows with it, where
/// it can); one with a neighbour after it keeps its length.
pub struct RegionDevice {
    inner: Arc<dyn BlockDevice>,
    offset: u64,
    len: AtomicU64,
    /// Whether the region runs to the end of `inner` and may follow it when it grows.
    at_end: bool,
    /// What the region holds, for messages: `metadata region`, `data region`.
    what: &'static str,
    resizing: parking_lot::Mutex<()>,
}

impl RegionDevice {
    /// The window of `len` bytes at `offset` on `inner`, named `what` in messages.
    ///
    /// Fails if the window does not lie inside `inner`. `at_end`: the window may grow with
    /// `inner` (it must then be the last thing on it).
    pub fn new(
        inner: Arc<dyn BlockDevice>,
        offset: u64,
        len: u64,
        at_end: bool,
        what: &'static str,
    ) -> io::Result<RegionDevice> {
        match offset.checked_add(len) {
            Some(end) if end <= inner.size() => Ok(RegionDevice {
                inner,
                offset,
                len: AtomicU64::new(len),
                at_end,
                what,
                resizing: parking_lot::Mutex::new(()),
            }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{what} of {len} bytes at {offset} does not fit in {} ({} bytes)",
                    inner.describe(),
                    inner.size()
                ),
            )),
        }
    }

    /// Where the region starts on the device underneath, in bytes.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The device underneath.
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    /// The device offset of `len` bytes at `offset` in the region, or an error naming the
    /// region when they reach outside it.
    fn translate(&self, offset: u64, len: u64) -> io::Result<u64> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(self.offset + offset),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "access of {len} bytes at {offset} is past the end of the {} ({size} bytes)",
                    self.what
                ),
            )),
        }
    }
}

impl BlockDevice for RegionDevice {
    fn size(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let at = self.translate(offset, buf.len() as u64)?;
        self.inner.read_at(buf, at)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let at = self.translate(offset, buf.len() as u64)?;
        self.inner.write_at(buf, at)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn start_writeback(&self) -> io::Result<()> {
        self.inner.start_writeback()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let at = self.translate(offset, len)?;
        self.inner.discard(at, len)
    }

    fn grow(&self, new_size: u64) -> io::Result<()> {
        let _resizing = self.resizing.lock();
        if new_size <= self.size() {
            return Ok(());
        }
        if !self.at_end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the {} of {} cannot grow to {new_size} bytes: the next region follows it \
                     at byte {}",
                    self.what,
                    self.inner.describe(),
                    self.offset + self.size()
                ),
            ));
        }
        let end = self.offset.checked_add(new_size).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{new_size} bytes at {} overflow", self.offset),
            )
        })?;
        self.inner.grow(end)?;
        self.len.store(new_size, Ordering::Release);
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "{} {} (bytes {}..{})",
            self.inner.describe(),
            self.what,
            self.offset,
            self.offset + self.size()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemDevice;

    fn split(dev: &Arc<MemDevice>) -> (RegionDevice, RegionDevice) {
        let inner: Arc<dyn BlockDevice> = dev.clone();
        let meta = RegionDevice::new(inner.clone(), 0, 8192, false, "metadata region").unwrap();
        let data = RegionDevice::new(inner, 8192, 16384, true, "data region").unwrap();
        (meta, data)
    }

    #[test]
    fn region_io_lands_at_its_offset() {
        let dev = Arc::new(MemDevice::new(24576));
        let (meta, data) = split(&dev);
        data.write_at(&[7; 4096], 0).unwrap();
        meta.write_at(&[9; 4096], 4096).unwrap();
        let all = dev.to_bytes();
        assert!(all[4096..8192].iter().all(|&b| b == 9));
        assert!(all[8192..12288].iter().all(|&b| b == 7));
        let mut back = [0; 4096];
        data.read_at(&mut back, 0).unwrap();
        assert_eq!(back, [7; 4096]);
    }

    #[test]
    fn access_past_a_region_is_refused_and_touches_nothing() {
        let dev = Arc::new(MemDevice::new(24576));
        let (meta, data) = split(&dev);
        data.write_at(&[7; 4096], 0).unwrap();
        assert!(meta.write_at(&[1; 4096], 8192).is_err());
        assert!(meta.write_at(&[1; 2], 8191).is_err());
        assert!(meta.read_at(&mut [0; 1], 8192).is_err());
        assert!(meta.discard(4096, 8192).is_err());
        assert!(data.write_at(&[1; 1], 16384).is_err());
        assert!(data.write_at(&[1; 1], u64::MAX).is_err());
        assert!(data.discard(u64::MAX, 2).is_err());
        let all = dev.to_bytes();
        assert!(all[8192..12288].iter().all(|&b| b == 7));
        assert!(all[..8192].iter().all(|&b| b == 0));
    }

    #[test]
    fn discard_in_the_data_region_spares_the_metadata() {
        let dev = Arc::new(MemDevice::new(24576));
        let (meta, data) = split(&dev);
        meta.write_at(&[5; 8192], 0).unwrap();
        data.write_at(&[6; 16384], 0).unwrap();
        data.discard(0, 16384).unwrap();
        let all = dev.to_bytes();
        assert!(all[..8192].iter().all(|&b| b == 5));
        assert!(all[8192..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_region_with_a_neighbour_never_grows() {
        let dev = Arc::new(MemDevice::new(24576));
        let (meta, data) = split(&dev);
        let err = meta.grow(12288).unwrap_err();
        assert!(err.to_string().contains("metadata region"), "{err}");
        assert_eq!(meta.size(), 8192);
        meta.grow(4096).unwrap();
        assert_eq!(meta.size(), 8192);
        // The last region grows with its device (a memory device always can).
        data.grow(32768).unwrap();
        assert_eq!(data.size(), 32768);
        assert_eq!(dev.size(), 8192 + 32768);
    }

    #[test]
    fn a_window_outside_its_device_is_refused() {
        let inner: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4096));
        assert!(RegionDevice::new(inner.clone(), 4096, 1, false, "data region").is_err());
        assert!(RegionDevice::new(inner.clone(), u64::MAX, 2, false, "data region").is_err());
        assert!(RegionDevice::new(inner, 0, 4096, false, "metadata region").is_ok());
    }
}
