//! Thin device IO: reads, writes and discards at any byte offset and length.
//!
//! - Unmapped blocks read as zeros.
//! - The first write to a block provisions it: a new data block is allocated, filled (the
//!   write merged into zeros when it does not cover the block, unless zeroing is off), and
//!   only then mapped, so a crash can leak an allocation but never expose stale data.
//! - A write to a block shared with a snapshot (mapped before this thin's latest snapshot)
//!   copies that one block, merges the write into the copy and remaps it.
//! - Discard unmaps whole blocks; partial blocks at the ends are zeroed in place when they are
//!   provisioned (reads of a discarded range return zeros either way).

use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLockReadGuard;

use crate::error::{Error, Result};
use crate::thin::metadata::BlockTime;
use crate::thin::pool::{NoSpacePolicy, Pool, PoolMode, ThinGate};
use crate::units::ThinId;

/// An open thin device. Dropping it closes it.
pub struct Thin {
    pool: Arc<Pool>,
    id: ThinId,
    gate: Arc<ThinGate>,
}

/// One block's part of a request.
struct Piece {
    vblock: u64,
    /// Offset within the block.
    within: usize,
    /// Offset within the caller's buffer.
    at: usize,
    len: usize,
}

fn pieces(offset: u64, len: usize, block_size: u64) -> impl Iterator<Item = Piece> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let pos = offset + done as u64;
        let within = (pos % block_size) as usize;
        let n = (block_size as usize - within).min(len - done);
        let p = Piece {
            vblock: pos / block_size,
            within,
            at: done,
            len: n,
        };
        done += n;
        Some(p)
    })
}

fn check_span(offset: u64, len: usize) -> Result<()> {
    offset.checked_add(len as u64).map(|_| ()).ok_or_else(|| {
        Error::InvalidArgument(format!("range of {len} bytes at {offset} overflows"))
    })
}

impl Thin {
    pub(crate) fn new(pool: Arc<Pool>, id: ThinId, gate: Arc<ThinGate>) -> Thin {
        Thin { pool, id, gate }
    }

    pub fn id(&self) -> ThinId {
        self.id
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Reads `buf.len()` bytes at `offset`. Unprovisioned ranges read as zeros.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_span(offset, buf.len())?;
        let _io = self.gate.io.read_recursive();
        let bs = self.pool.block_size().bytes();
        let first = offset / bs;
        let last = (offset + buf.len() as u64).div_ceil(bs);
        // Hold every block of the request against discard-and-reuse while reading it.
        let mut guards = Vec::with_capacity((last - first) as usize);
        for v in first..last {
            guards.push(self.pool.stripe(self.id, v).read_recursive());
        }
        let mappings = {
            let mut md = self.pool.metadata();
            md.lookup_range(self.id, first, last, usize::MAX)
                .inspect_err(|e| self.pool.metadata_failed(&mut md, e))?
        };
        let mut next = mappings.iter().peekable();
        // Merge runs of blocks that are consecutive on the data device into one read.
        let mut run: Option<(u64, usize, usize)> = None; // (data offset, buf start, len)
        let data = self.pool.data_dev();
        let flush = |run: &mut Option<(u64, usize, usize)>, buf: &mut [u8]| -> Result<()> {
            if let Some((dev_off, at, len)) = run.take() {
                data.read_at(&mut buf[at..at + len], dev_off)
                    .map_err(|e| self.pool.data_io_error(dev_off, e))?;
            }
            Ok(())
        };
        for p in pieces(offset, buf.len(), bs) {
            while next.peek().is_some_and(|(v, _)| *v < p.vblock) {
                next.next();
            }
            match next.peek() {
                Some((v, bt)) if *v == p.vblock => {
                    let dev_off = bt.block * bs + p.within as u64;
                    match &mut run {
                        Some((start, at, len))
                            if *start + *len as u64 == dev_off && *at + *len == p.at =>
                        {
                            *len += p.len
                        }
                        _ => {
                            flush(&mut run, buf)?;
                            run = Some((dev_off, p.at, p.len));
                        }
                    }
                }
                _ => {
                    flush(&mut run, buf)?;
                    buf[p.at..p.at + p.len].fill(0);
                }
            }
        }
        flush(&mut run, buf)
    }

    /// Writes `buf` at `offset`, provisioning and copying blocks as needed.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_span(offset, buf.len())?;
        self.pool.check_writable()?;
        let _io = self.gate.io.read_recursive();
        let bs = self.pool.block_size().bytes();
        for p in pieces(offset, buf.len(), bs) {
            self.write_block(p.vblock, p.within, &buf[p.at..p.at + p.len])?;
        }
        Ok(())
    }

    fn write_block(&self, vblock: u64, within: usize, data: &[u8]) -> Result<()> {
        let pool = &*self.pool;
        let bs = pool.block_size().bytes();
        let _stripe = pool.stripe(self.id, vblock).write();
        let (mapping, snapshotted_time) = {
            let mut md = pool.metadata();
            let snap_time = md.device(self.id)?.snapshotted_time;
            let mapping = md
                .lookup(self.id, vblock)
                .inspect_err(|e| pool.metadata_failed(&mut md, e))?;
            (mapping, snap_time)
        };
        let dev = pool.data_dev();
        match mapping {
            // Mapped after this thin's latest snapshot: nobody else sees it, write in place.
            Some(bt) if bt.time >= snapshotted_time => {
                let off = bt.block * bs + within as u64;
                dev.write_at(data, off)
                    .map_err(|e| pool.data_io_error(off, e))
            }
            shared_or_unmapped => self.provision(vblock, within, data, shared_or_unmapped),
        }
    }

    /// Allocates a block for `vblock`, fills it (copying the shared block it replaces, or
    /// zeros), and maps it.
    fn provision(
        &self,
        vblock: u64,
        within: usize,
        data: &[u8],
        old: Option<BlockTime>,
    ) -> Result<()> {
        let pool = &*self.pool;
        let bs = pool.block_size().bytes();
        let (_provisioning, new, time) = self.alloc_data_block()?;
        let dev = pool.data_dev();
        let off = new * bs;
        let filled = if data.len() as u64 == bs {
            dev.write_at(data, off)
        } else if old.is_none() && !pool.options().zero_new_blocks {
            dev.write_at(data, off + within as u64)
        } else {
            let mut block = vec![0u8; bs as usize];
            let copied = match old {
                Some(bt) => dev.read_at(&mut block, bt.block * bs),
                None => Ok(()),
            };
            copied.and_then(|_| {
                block[within..within + data.len()].copy_from_slice(data);
                dev.write_at(&block, off)
            })
        };
        let mut md = pool.metadata();
        if let Err(e) = filled {
            // Give the block back; nothing points at it.
            let _ = md.free_data_block(new);
            return Err(pool.data_io_error(off, e));
        }
        let r = md.insert(self.id, vblock, BlockTime { block: new, time });
        if let Err(e) = &r {
            pool.metadata_failed(&mut md, e);
        }
        r
    }

    /// Allocates a data block and returns it with the mapping time and the provisioning
    /// gate, which the caller holds until the block is mapped.
    fn alloc_data_block(&self) -> Result<(RwLockReadGuard<'_, ()>, u64, u32)> {
        let pool = &*self.pool;
        let deadline = match pool.options().no_space {
            NoSpacePolicy::Error => None,
            NoSpacePolicy::Queue { timeout } => Some(Instant::now() + timeout),
        };
        let mut committed_for_space = false;
        loop {
            let gate = pool.provisioning().read();
            let mut md = pool.metadata();
            // Checked before allocating: running out commits, and must not record a block
            // allocated but unmapped.
            pool.check_metadata_space(&mut md)?;
            if let Some(b) = md.alloc_data_block() {
                let (time, free) = (md.time(), md.free_data_blocks());
                drop(md);
                pool.after_alloc(free);
                return Ok((gate, b, time));
            }
            let freed_in_transaction = md.free_data_blocks() > 0;
            drop(md);
            drop(gate);
            if freed_in_transaction && !committed_for_space {
                // Every free block was freed in the running transaction, and may only be
                // reused once it commits: commit, as the kernel does, and try again.
                committed_for_space = true;
                pool.commit()?;
                continue;
            }
            pool.set_mode(PoolMode::OutOfDataSpace);
            match deadline {
                // queue_if_no_space: wait for the pool to grow or blocks to be freed.
                Some(deadline) if pool.wait_for_space(deadline) => {
                    committed_for_space = false;
                    pool.check_writable()?;
                }
                _ => return Err(Error::NoDataSpace),
            }
        }
    }

    /// Discards `len` bytes at `offset`: whole blocks are unmapped (and freed when nobody
    /// else maps them); the partial blocks at either end are zeroed.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_span(offset, len as usize)?;
        self.pool.check_writable()?;
        let _io = self.gate.io.read_recursive();
        let bs = self.pool.block_size().bytes();
        let end = offset + len;
        let first_full = offset.div_ceil(bs);
        let last_full = end / bs;
        if first_full >= last_full {
            return self.zero_range(offset, len);
        }
        self.zero_range(offset, first_full * bs - offset)?;
        self.zero_range(last_full * bs, end - last_full * bs)?;
        let mut freed_any = false;
        let mut v = first_full;
        while v < last_full {
            // Walk only mapped blocks, a batch at a time.
            let mapped = self
                .pool
                .metadata()
                .lookup_range(self.id, v, last_full, 1024)?;
            let Some(&(last_seen, _)) = mapped.last() else {
                break;
            };
            for (vb, _) in mapped {
                let _stripe = self.pool.stripe(self.id, vb).write();
                let mut md = self.pool.metadata();
                match md.remove(self.id, vb) {
                    Ok(Some((_, freed))) => freed_any |= freed,
                    Ok(None) => {}
                    Err(e) => {
                        self.pool.metadata_failed(&mut md, &e);
                        return Err(e);
                    }
                }
            }
            v = last_seen + 1;
        }
        if freed_any {
            self.pool.after_free();
        }
        Ok(())
    }

    /// Zeroes the provisioned parts of a range that covers no whole block. Unprovisioned
    /// blocks already read as zeros and stay unprovisioned.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let bs = self.pool.block_size().bytes();
        let zeros = vec![0u8; len as usize];
        for p in pieces(offset, zeros.len(), bs) {
            if self.pool.metadata().lookup(self.id, p.vblock)?.is_some() {
                self.write_block(p.vblock, p.within, &zeros[p.at..p.at + p.len])?;
            }
        }
        Ok(())
    }

    /// Makes every completed write durable (commits the pool).
    pub fn flush(&self) -> Result<()> {
        self.pool.commit()
    }

    /// Blocks this thin maps.
    pub fn mapped_blocks(&self) -> Result<u64> {
        Ok(self.pool.thin_details(self.id)?.mapped_blocks)
    }
}

impl Drop for Thin {
    fn drop(&mut self) {
        self.pool.close_thin(self.id);
    }
}
