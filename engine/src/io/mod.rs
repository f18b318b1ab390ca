//! The block I/O layer: the only code in the engine that touches file descriptors.
//!
//! A pool lives on two [`BlockDevice`]s, metadata and data. Both are addressed in bytes;
//! the layers above always read and write whole metadata blocks or whole (or partial) data
//! blocks, never past [`BlockDevice::size`].

mod file;
pub mod lock;
mod mem;
mod region;

use std::io;

pub use file::{FileDevice, OpenMode};
pub use mem::MemDevice;
pub use region::RegionDevice;

/// A device the pool's metadata or data lives on.
///
/// Contracts every implementation keeps:
/// - `read_at` fills the whole buffer or fails; reading past `size()` is an error, never a
///   short read.
/// - `write_at` is not durable until a later `sync` returns `Ok`; writes that completed before
///   `sync` was called are durable when it returns.
/// - `discard` forgets a range: later reads of it return zeros or the old bytes (never anyone
///   else's), and a file or a device that can gives the space back to its host.
/// - `size` changes only through `grow`.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// Starts writing what was written so far towards the device, without waiting for it or
    /// flushing anything: a hint that a `sync` follows (devices without such a notion do
    /// nothing).
    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }
    /// Releases a byte range (a hole punched in a file, a discard on a device).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Grows the device to `new_size` bytes where the device can (sparse files can); a raw
    /// device that is already that large succeeds without change.
    fn grow(&self, new_size: u64) -> io::Result<()>;
    /// A name for error messages: a path, or `memory`.
    fn describe(&self) -> String;
}

/// Checks that `len` bytes at `offset` lie inside a device of `size` bytes.
pub(crate) fn check_range(size: u64, offset: u64, len: usize) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "access of {len} bytes at {offset} is past the end of the device ({size} bytes)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests;
