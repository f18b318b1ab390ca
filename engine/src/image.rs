//! Thin images: raw and sparse image files copied into and out of thins, holes kept.
//!
//! Import reads only the file's data extents (`SEEK_DATA`/`SEEK_HOLE`) and discards the
//! thin's ranges that are holes in the file, so a hole never allocates a data block; a
//! whole data block of zeros inside a data extent is discarded instead of written, for the
//! same reason. Export seeks over every all-zero 4 KiB piece instead of writing it, so
//! ranges the thin does not map (they read as zeros) and zero ranges stay holes in the
//! output file. Both go through [`PoolControl`], so they work on a pool this process owns
//! and through the pool's daemon alike.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::activate::PoolControl;
use crate::error::Error;
use crate::units::{ThinId, SECTOR_SIZE};

/// Bytes moved per read or write of the thin.
const CHUNK: u64 = 1 << 20;
/// The granularity export looks for zeros at (a page: what a file system can leave as a
/// hole).
const ZERO_PIECE: usize = 4096;

/// What an import or export did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageReport {
    /// Bytes of the image (the file's length on import, the thin's size on export).
    pub bytes: u64,
    /// Bytes actually written (to the thin on import, to the file on export).
    pub written: u64,
    /// Bytes left as holes (discarded in the thin on import, skipped in the file on export).
    pub holes: u64,
}

/// Why an import or export failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading the image file failed.
    #[error("failed to read the image at byte {offset}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// Writing the image file failed.
    #[error("failed to write the image at byte {offset}")]
    Write {
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The image is longer than the thin.
    #[error("the image ({len} bytes) does not fit in thin {id} ({size} bytes)")]
    TooBig { id: ThinId, len: u64, size: u64 },
    /// The pool refused or failed.
    #[error(transparent)]
    Pool(#[from] Error),
}

/// Progress: bytes done and in all.
pub type Progress<'a> = dyn FnMut(u64, u64) + 'a;

/// The data extents of the first `len` bytes of `file`, in order. A file system without
/// `SEEK_DATA` (or a device) gives one extent: everything.
pub fn data_extents(file: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    use nix::errno::Errno;
    use nix::unistd::{lseek, Whence};
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(at) => at as u64,
            // No data past `pos`.
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) if pos == 0 => {
                return Ok(std::iter::once(0..len).collect())
            }
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            break;
        }
        let end = match lseek(fd, start as i64, Whence::SeekHole) {
            Ok(at) => (at as u64).min(len),
            Err(e) => return Err(e.into()),
        };
        extents.push(start..end);
        pos = end;
    }
    Ok(extents)
}

/// Copies `file` (its whole length) into thin `id` from byte 0; see the module docs for
/// holes. The thin past the file's length is left as it was.
///
/// * `Err(TooBig)`: the file is longer than the thin; nothing was written.
/// * `Err(Read | Pool)`: what came before the failure is written (not flushed).
pub fn import(
    pool: &mut dyn PoolControl,
    id: ThinId,
    file: &File,
    progress: &mut Progress<'_>,
) -> Result<ImageReport, ImageError> {
    let read_err = |offset| move |source| ImageError::Read { offset, source };
    let len = file.metadata().map_err(read_err(0))?.len();
    let size = pool.size_of(id)?;
    if len > size {
        return Err(ImageError::TooBig { id, len, size });
    }
    let block = u64::from(pool.status()?.status.data_block_sectors) * SECTOR_SIZE;
    let extents = data_extents(file, len).map_err(read_err(0))?;
    let mut report = ImageReport {
        bytes: len,
        ..ImageReport::default()
    };
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    for extent in extents.iter().cloned().chain(std::iter::once(len..len)) {
        if extent.start > pos {
            pool.discard(id, pos, extent.start - pos)?;
            report.holes += extent.start - pos;
        }
        let mut at = extent.start;
        while at < extent.end {
            // Chunks end on block boundaries, so whole zero blocks can be told apart.
            let n = (CHUNK - at % block).min(extent.end - at);
            let chunk = &mut buf[..n as usize];
            file.read_exact_at(chunk, at).map_err(read_err(at))?;
            copy_chunk(pool, id, at, chunk, block, &mut report)?;
            at += n;
            progress(at, len);
        }
        pos = pos.max(extent.end);
    }
    pool.flush()?;
    Ok(report)
}

/// Writes `chunk` at `at`, discarding the whole blocks in it that are all zeros.
fn copy_chunk(
    pool: &mut dyn PoolControl,
    id: ThinId,
    at: u64,
    chunk: &[u8],
    block: u64,
    report: &mut ImageReport,
) -> Result<(), ImageError> {
    let end = at + chunk.len() as u64;
    let mut run_start = at;
    let mut piece = at;
    while piece < end {
        let piece_end = ((piece / block + 1) * block).min(end);
        let whole = piece.is_multiple_of(block) && piece_end - piece == block;
        let bytes = &chunk[(piece - at) as usize..(piece_end - at) as usize];
        if whole && bytes.iter().all(|&b| b == 0) {
            if piece > run_start {
                let run = &chunk[(run_start - at) as usize..(piece - at) as usize];
                pool.write(id, run_start, run)?;
                report.written += run.len() as u64;
            }
            pool.discard(id, piece, block)?;
            report.holes += block;
            run_start = piece_end;
        }
        piece = piece_end;
    }
    if end > run_start {
        let run = &chunk[(run_start - at) as usize..];
        pool.write(id, run_start, run)?;
        report.written += run.len() as u64;
    }
    Ok(())
}

/// Copies all of thin `id` into `file`, which is truncated first and ends the thin's size;
/// all-zero pieces are left as holes.
pub fn export(
    pool: &mut dyn PoolControl,
    id: ThinId,
    file: &File,
    progress: &mut Progress<'_>,
) -> Result<ImageReport, ImageError> {
    let size = pool.size_of(id)?;
    let write_err = |offset| move |source| ImageError::Write { offset, source };
    file.set_len(0).map_err(write_err(0))?;
    let mut report = ImageReport {
        bytes: size,
        ..ImageReport::default()
    };
    let mut buf = vec![0u8; CHUNK as usize];
    let mut at = 0;
    while at < size {
        let n = CHUNK.min(size - at) as usize;
        let chunk = &mut buf[..n];
        pool.read(id, at, chunk)?;
        // Write each run of pieces that are not all zeros; seek over the rest.
        let mut run: Option<usize> = None;
        for (i, piece) in chunk.chunks(ZERO_PIECE).enumerate() {
            let off = i * ZERO_PIECE;
            let zero = piece.iter().all(|&b| b == 0);
            match (zero, run) {
                (false, None) => run = Some(off),
                (true, Some(start)) => {
                    write_run(file, at, &chunk[start..off], start, &mut report)?;
                    run = None;
                }
                _ => {}
            }
            if zero {
                report.holes += piece.len() as u64;
            }
        }
        if let Some(start) = run {
            write_run(file, at, &chunk[start..], start, &mut report)?;
        }
        at += n as u64;
        progress(at, size);
    }
    file.set_len(size).map_err(write_err(size))?;
    file.sync_all().map_err(write_err(size))?;
    Ok(report)
}

fn write_run(
    file: &File,
    chunk_at: u64,
    bytes: &[u8],
    start: usize,
    report: &mut ImageReport,
) -> Result<(), ImageError> {
    let offset = chunk_at + start as u64;
    file.write_all_at(bytes, offset)
        .map_err(|source| ImageError::Write { offset, source })?;
    report.written += bytes.len() as u64;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_of_a_sparse_file_skip_its_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1u8; 8192], 1 << 20).unwrap();
        f.write_all_at(&[2u8; 4096], 6 << 20).unwrap();
        let extents = data_extents(&f, 8 << 20).unwrap();
        let data: u64 = extents.iter().map(|e| e.end - e.start).sum();
        assert!(extents.len() >= 2, "{extents:?}");
        assert!(data < 1 << 20, "{extents:?}");
        assert!(extents.iter().any(|e| e.contains(&(1 << 20))));
        assert!(extents.iter().any(|e| e.contains(&(6 << 20))));
    }
}
