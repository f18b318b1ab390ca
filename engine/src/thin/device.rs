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

/// Blocks written under one set of stripe locks: 16 MiB of 64 KiB blocks.
const WRITE_BATCH_BLOCKS: usize = 256;

thread_local! {
    /// A block-sized buffer for copies and zero-fills, reused instead of allocated per write.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Gathers pieces that are contiguous both on the data device and in the caller's buffer, so
/// each run is one read or write.
#[derive(Default)]
struct Runs {
    /// (device offset, buffer offset, length)
    current: Option<(u64, usize, usize)>,
}

impl Runs {
    fn push(
        &mut self,
        dev_off: u64,
        at: usize,
        len: usize,
        io: impl FnMut(u64, usize, usize) -> Result<()>,
    ) -> Result<()> {
        if let Some((start, run_at, run_len)) = &mut self.current {
            if *start + *run_len as u64 == dev_off && *run_at + *run_len == at {
                *run_len += len;
                return Ok(());
            }
        }
        self.flush(io)?;
        self.current = Some((dev_off, at, len));
        Ok(())
    }

    fn flush(&mut self, mut io: impl FnMut(u64, usize, usize) -> Result<()>) -> Result<()> {
        match self.current.take() {
            Some((dev_off, at, len)) => io(dev_off, at, len),
            None => Ok(()),
        }
    }
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
        // Reads take no IO gate: a snapshot taken meanwhile changes no mapping they see.
        let block_size = self.pool.block_size();
        let bs = block_size.bytes();
        let (first, within) = block_size.split(offset);
        if within + buf.len() as u64 <= bs {
            return self.read_one(buf, first, within);
        }
        let last = (offset + buf.len() as u64).div_ceil(bs);
        // Hold every block of the request against discard-and-reuse while reading it.
        let stripes = self.pool.stripes_for(self.id, first..last);
        let _guards: Vec<_> = stripes.iter().map(|s| s.read()).collect();
        let mappings = self.lookup_range(first, last)?;
        let mut next = mappings.iter().peekable();
        // Merge runs of blocks that are consecutive on the data device into one read.
        let mut runs = Runs::default();
        for p in pieces(offset, buf.len(), bs) {
            while next.peek().is_some_and(|(v, _)| *v < p.vblock) {
                next.next();
            }
            match next.peek() {
                Some((v, bt)) if *v == p.vblock => runs.push(
                    bt.block * bs + p.within as u64,
                    p.at,
                    p.len,
                    |off, at, len| self.read_data(&mut buf[at..at + len], off),
                )?,
                _ => {
                    runs.flush(|off, at, len| self.read_data(&mut buf[at..at + len], off))?;
                    buf[p.at..p.at + p.len].fill(0);
                }
            }
        }
        runs.flush(|off, at, len| self.read_data(&mut buf[at..at + len], off))
    }

    /// A read within one block: one lookup, no allocation (the common 4 KiB case).
    fn read_one(&self, buf: &mut [u8], vblock: u64, within: u64) -> Result<()> {
        let bs = self.pool.block_size().bytes();
        let table = &self.gate.table;
        // A cached block is read without the stripe lock; if a block of this thin was freed
        // meanwhile, it may have been reused, and the read is done again under the stripe
        // (see `thin::cache`).
        let frees = table.frees();
        if let Some(block) = table.get(vblock) {
            self.read_data(buf, block * bs + within)?;
            if table.unchanged_since(frees) {
                return Ok(());
            }
        }
        let _stripe = self.pool.stripe(self.id, vblock).read();
        if let Some(block) = table.get(vblock) {
            return self.read_data(buf, block * bs + within);
        }
        // The epoch is read under the metadata lock, with the lookup (see `thin::cache`).
        let (mapping, snapshotted_time, epoch) = self.pool.on_metadata(|md| {
            let epoch = table.epoch();
            let mapping = md.lookup(self.id, vblock)?;
            Ok((mapping, md.device(self.id)?.snapshotted_time, epoch))
        })?;
        match mapping {
            Some(bt) => {
                let own = bt.time >= snapshotted_time;
                table.insert(&self.pool.mappings, vblock, bt.block, own, epoch);
                self.read_data(buf, bt.block * bs + within)
            }
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.pool
            .data_dev()
            .read_at(buf, offset)
            .map_err(|e| self.pool.data_io_error(offset, e))
    }

    fn write_data(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.pool
            .data_dev()
            .write_at(buf, offset)
            .map_err(|e| self.pool.data_io_error(offset, e))
    }

    fn lookup_range(&self, first: u64, last: u64) -> Result<Vec<(u64, BlockTime)>> {
        self.pool
            .on_metadata(|md| md.lookup_range(self.id, first, last, usize::MAX))
    }

    /// Writes `buf` at `offset`, provisioning and copying blocks as needed.
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_span(offset, buf.len())?;
        self.pool.check_writable()?;
        if buf.is_empty() {
            return Ok(());
        }
        let _io = self.gate.io.read_recursive();
        let block_size = self.pool.block_size();
        let bs = block_size.bytes();
        let (first, within) = block_size.split(offset);
        if within + buf.len() as u64 <= bs && self.write_own(buf, first, within)? {
            return Ok(());
        }
        let all: Vec<Piece> = pieces(offset, buf.len(), bs).collect();
        // Batches bound the stripes held and the blocks allocated at once.
        for batch in all.chunks(WRITE_BATCH_BLOCKS) {
            self.write_batch(buf, batch)?;
        }
        Ok(())
    }

    /// A write within one block that the mapping cache knows to be the thin's own: in place,
    /// with no metadata work (the common overwrite). False when the cache cannot tell; the
    /// caller then takes the general path.
    fn write_own(&self, buf: &[u8], vblock: u64, within: u64) -> Result<bool> {
        let bs = self.pool.block_size().bytes();
        let _stripe = self.pool.stripe(self.id, vblock).write();
        match self.gate.table.get_own(vblock) {
            Some(block) => self.write_data(buf, block * bs + within).map(|()| true),
            None => Ok(false),
        }
    }

    /// Writes the pieces of one batch (consecutive blocks): blocks this thin owns are written
    /// in place, the others are provisioned together (allocated, filled, then mapped), and
    /// neighbouring blocks that are neighbours on the data device go out in one write.
    fn write_batch(&self, buf: &[u8], batch: &[Piece]) -> Result<()> {
        let pool = &*self.pool;
        let bs = pool.block_size().bytes();
        let (first, last) = (batch[0].vblock, batch[batch.len() - 1].vblock + 1);
        let stripes = pool.stripes_for(self.id, first..last);
        let _guards: Vec<_> = stripes.iter().map(|s| s.write()).collect();
        let (mappings, snapshotted_time, epoch) = pool.on_metadata(|md| {
            let snap_time = md.device(self.id)?.snapshotted_time;
            Ok((
                md.lookup_range(self.id, first, last, usize::MAX)?,
                snap_time,
                self.gate.table.epoch(),
            ))
        })?;
        let mut mapped = mappings.iter().peekable();
        let mut in_place = Runs::default();
        let mut to_provision: Vec<(&Piece, Option<BlockTime>)> = Vec::new();
        for p in batch {
            while mapped.peek().is_some_and(|(v, _)| *v < p.vblock) {
                mapped.next();
            }
            let old = mapped
                .peek()
                .filter(|(v, _)| *v == p.vblock)
                .map(|(_, bt)| *bt);
            match old {
                // Mapped after this thin's latest snapshot: nobody else sees it, write in place
                // (and let the next write to it know so without asking the metadata).
                Some(bt) if bt.time >= snapshotted_time => {
                    self.gate
                        .table
                        .insert(&pool.mappings, p.vblock, bt.block, true, epoch);
                    in_place.push(
                        bt.block * bs + p.within as u64,
                        p.at,
                        p.len,
                        |off, at, len| self.write_data(&buf[at..at + len], off),
                    )?;
                }
                // Unmapped, or shared with a snapshot: a new block.
                shared_or_unmapped => to_provision.push((p, shared_or_unmapped)),
            }
        }
        in_place.flush(|off, at, len| self.write_data(&buf[at..at + len], off))?;
        if to_provision.is_empty() {
            return Ok(());
        }
        self.provision(buf, &to_provision)
    }

    /// Allocates a block for each piece, fills it (the write, merged into a copy of the
    /// shared block it replaces or into zeros), and only then maps it, so a crash can leak an
    /// allocation but never expose stale data.
    fn provision(&self, buf: &[u8], pieces: &[(&Piece, Option<BlockTime>)]) -> Result<()> {
        let pool = &*self.pool;
        let (_provisioning, blocks, time) = self.alloc_data_blocks(pieces.len())?;
        let filled = self.fill(buf, pieces, &blocks);
        let mut md = pool.metadata();
        if let Err(e) = filled {
            // Give the blocks back; nothing points at them.
            for &b in &blocks {
                let _ = md.free_data_block(b);
            }
            return Err(e);
        }
        let epoch = self.gate.table.epoch();
        for ((p, old), &block) in pieces.iter().zip(&blocks) {
            self.gate.table.invalidate(p.vblock);
            let r = md.insert(self.id, p.vblock, BlockTime { block, time });
            if let Err(e) = r {
                pool.metadata_failed(&mut md, &e);
                return Err(e);
            }
            if old.is_some_and(|old| md.data_block_count(old.block) == 0) {
                // The copied block was ours alone after all (its snapshot is gone).
                self.gate.table.freed();
            }
            // Made now, after any snapshot of this thin: its own.
            self.gate
                .table
                .insert(&pool.mappings, p.vblock, block, true, epoch);
        }
        Ok(())
    }

    /// Writes the new blocks' contents.
    fn fill(
        &self,
        buf: &[u8],
        pieces: &[(&Piece, Option<BlockTime>)],
        blocks: &[u64],
    ) -> Result<()> {
        let pool = &*self.pool;
        let bs = pool.block_size().bytes();
        let mut whole = Runs::default();
        for ((p, old), &block) in pieces.iter().zip(blocks) {
            let off = block * bs;
            if p.len as u64 == bs {
                whole.push(off, p.at, p.len, |o, at, len| {
                    self.write_data(&buf[at..at + len], o)
                })?;
                continue;
            }
            let data = &buf[p.at..p.at + p.len];
            if old.is_none() && !pool.options().zero_new_blocks {
                // skip_block_zeroing: the rest of the block keeps whatever the device held.
                self.write_data(data, off + p.within as u64)?;
                continue;
            }
            SCRATCH.with(|scratch| {
                let mut block_buf = scratch.borrow_mut();
                block_buf.clear();
                block_buf.resize(bs as usize, 0);
                if let Some(bt) = old {
                    self.read_data(&mut block_buf, bt.block * bs)?;
                }
                block_buf[p.within..p.within + p.len].copy_from_slice(data);
                self.write_data(&block_buf, off)
            })?;
        }
        whole.flush(|o, at, len| self.write_data(&buf[at..at + len], o))
    }

    /// Allocates `n` data blocks, all or none, and returns them with the mapping time and the
    /// provisioning gate, which the caller holds until the blocks are mapped.
    fn alloc_data_blocks(&self, n: usize) -> Result<(RwLockReadGuard<'_, ()>, Vec<u64>, u32)> {
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
            if pool.metadata_space_short(&md) {
                drop(md);
                drop(gate);
                return Err(pool.out_of_metadata_space());
            }
            let mut blocks = Vec::with_capacity(n);
            while blocks.len() < n {
                match md.alloc_data_block() {
                    Some(b) => blocks.push(b),
                    None => break,
                }
            }
            if blocks.len() == n {
                let (time, free) = (md.time(), md.free_data_blocks());
                drop(md);
                pool.after_alloc(free);
                return Ok((gate, blocks, time));
            }
            for b in blocks {
                md.free_data_block(b)?;
            }
            let freed_in_transaction = md.free_data_blocks() >= n as u64;
            drop(md);
            drop(gate);
            if freed_in_transaction && !committed_for_space {
                // Enough blocks were freed in the running transaction, and may only be
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
                .on_metadata(|md| md.lookup_range(self.id, v, last_full, 1024))?;
            let Some(&(last_seen, _)) = mapped.last() else {
                break;
            };
            for (vb, _) in mapped {
                let _stripe = self.pool.stripe(self.id, vb).write();
                let mut md = self.pool.metadata();
                self.gate.table.invalidate(vb);
                match md.remove(self.id, vb) {
                    Ok(Some((_, freed))) => {
                        if freed {
                            self.gate.table.freed();
                        }
                        freed_any |= freed;
                    }
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

    /// Writes within one block (the partial-block zeroing of a discard).
    fn write_block(&self, vblock: u64, within: usize, data: &[u8]) -> Result<()> {
        let bs = self.pool.block_size().bytes();
        let piece = Piece {
            vblock,
            within,
            at: 0,
            len: data.len(),
        };
        debug_assert!(within + data.len() <= bs as usize);
        self.write_batch(data, std::slice::from_ref(&piece))
    }

    /// Zeroes the provisioned parts of a range that covers no whole block. Unprovisioned
    /// blocks already read as zeros and stay unprovisioned.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let bs = self.pool.block_size().bytes();
        let zeros = vec![0u8; len as usize];
        for p in pieces(offset, zeros.len(), bs) {
            let mapped = self.pool.on_metadata(|md| md.lookup(self.id, p.vblock))?;
            if mapped.is_some() {
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
