//! A reader under the tar reader that follows the archive's block structure and refuses a
//! PAX or GNU long-name record larger than a limit before the tar reader buffers it (the
//! `tar` crate reads those records whole into memory, whatever size the header claims).
//!
//! It reads headers only where the tar reader will, using the same rules: 512-byte blocks,
//! data rounded up to a block, a PAX `size` record overriding the next entry's size, GNU
//! sparse extension blocks after their header. On anything it cannot parse it stops
//! watching and leaves the verdict to the tar reader, which refuses the same header.

use std::io::{self, Read};

const BLOCK: u64 = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// The next captured block is an entry header.
    Header,
    /// The next captured block is a GNU sparse extension; the entry's data (this many bytes)
    /// follows the last one.
    SparseExt(u64),
}

pub struct TarGuard<R> {
    inner: R,
    max_record: u64,
    /// Offset of the next byte `inner` gives.
    pos: u64,
    /// Offset of the next block to capture.
    next: u64,
    kind: Next,
    block: [u8; BLOCK as usize],
    fill: usize,
    /// A PAX record being collected: where its data starts, its length, the bytes so far.
    pax: Option<(u64, u64, Vec<u8>)>,
    /// The size the last PAX record gives the next entry.
    pax_size: Option<u64>,
    done: bool,
}

impl<R: Read> TarGuard<R> {
    pub fn new(inner: R, max_record: u64) -> TarGuard<R> {
        TarGuard {
            inner,
            max_record,
            pos: 0,
            next: 0,
            kind: Next::Header,
            block: [0; BLOCK as usize],
            fill: 0,
            pax: None,
            pax_size: None,
            done: false,
        }
    }

    fn scan(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut i = 0usize;
        while i < bytes.len() && !self.done {
            let at = self.pos + i as u64;
            if at < self.next {
                let take = (self.next - at).min((bytes.len() - i) as u64) as usize;
                if let Some((start, len, data)) = &mut self.pax {
                    let end = *start + *len;
                    let from = at.max(*start);
                    let to = (at + take as u64).min(end);
                    if from < to {
                        let a = (from - at) as usize + i;
                        let b = (to - at) as usize + i;
                        data.extend_from_slice(&bytes[a..b]);
                    }
                }
                i += take;
                continue;
            }
            let take = (BLOCK as usize - self.fill).min(bytes.len() - i);
            self.block[self.fill..self.fill + take].copy_from_slice(&bytes[i..i + take]);
            self.fill += take;
            i += take;
            if self.fill == BLOCK as usize {
                self.fill = 0;
                let block_at = self.next;
                self.on_block(block_at)?;
            }
        }
        Ok(())
    }

    fn on_block(&mut self, at: u64) -> io::Result<()> {
        let after = at + BLOCK;
        match self.kind {
            Next::SparseExt(data) => {
                if self.block[504] != 0 {
                    self.next = after;
                } else {
                    self.kind = Next::Header;
                    self.next = self.skip(after, data);
                }
                return Ok(());
            }
            Next::Header => {}
        }
        if self.block.iter().all(|&b| b == 0) {
            // The end of the archive for the tar reader (it does not read past zeros).
            self.done = true;
            return Ok(());
        }
        if let Some((_, _, data)) = self.pax.take() {
            self.pax_size = pax_size(&data);
        }
        let kind = self.block[156];
        let Some(mut size) = number(&self.block[124..136]) else {
            self.done = true;
            return Ok(());
        };
        let extension = matches!(kind, b'x' | b'g' | b'L' | b'K');
        if extension {
            if matches!(kind, b'x' | b'L' | b'K') && size > self.max_record {
                return Err(io::Error::other(format!(
                    "a tar {} record of {size} bytes is larger than the {} allowed: refused \
                     (THINBOX_MAX_TAR_RECORD_BYTES)",
                    if kind == b'x' { "PAX" } else { "GNU long name" },
                    self.max_record
                )));
            }
            if kind == b'x' {
                self.pax = Some((after, size, Vec::new()));
            }
        } else if let Some(s) = self.pax_size.take() {
            size = s;
        }
        if kind == b'S' && self.block[482] != 0 {
            self.kind = Next::SparseExt(size);
            self.next = after;
        } else {
            self.next = self.skip(after, size);
        }
        Ok(())
    }

    /// Where the block after `size` data bytes starting at `from` is; past it all when the
    /// size is absurd (the tar reader refuses it).
    fn skip(&mut self, from: u64, size: u64) -> u64 {
        match size
            .checked_add(BLOCK - 1)
            .and_then(|s| from.checked_add(s & !(BLOCK - 1)))
        {
            Some(n) => n,
            None => {
                self.done = true;
                u64::MAX
            }
        }
    }
}

/// A tar numeric field: octal text, or base-256 when the high bit of the first byte is set.
fn number(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut n: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            n = n.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(n);
    }
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let text = std::str::from_utf8(&field[..end]).ok()?.trim();
    u64::from_str_radix(text, 8).ok()
}

/// The `size` a PAX record sets, if it sets one.
fn pax_size(data: &[u8]) -> Option<u64> {
    let mut rest = data;
    let mut found = None;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if len <= space || len > rest.len() {
            return found;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(value) = record.strip_prefix(b"size=") {
            found = std::str::from_utf8(value).ok()?.parse().ok();
        }
        rest = &rest[len..];
    }
    found
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if !self.done {
            self.scan(&buf[..n])?;
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_pax_sizes_parse() {
        assert_eq!(number(b"00000000017\0"), Some(15));
        assert_eq!(number(b"     17 \0\0\0\0"), Some(15));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 5;
        assert_eq!(number(&big), Some(5));
        assert_eq!(pax_size(b"12 size=999\n19 path=a/b/c/d/e\n"), Some(999));
        assert_eq!(pax_size(b"13 path=abcd\n"), None);
    }
}
