//! A reader under the tar reader that follows the archive's block structure and refuses a
//! PAX or GNU long-name record larger than a limit before the tar reader buffers it (the
//! `tar` crate reads those records whole into memory, whatever size the header claims).
//!
//! It reads headers only where the tar reader will, so it must read them exactly as the
//! `tar` crate (0.4.46, `archive.rs` `next_entry`/`next_entry_raw`/`parse_sparse_header`)
//! does: any disagreement about where an entry ends lets a later, oversized record pass
//! unseen. The crate's rules, mirrored here:
//! - a header's size is octal text, or base-256 of its last 8 bytes when the high bit is set;
//! - only `x`, `L` and `K` headers with the ustar or GNU magic are read whole as extensions;
//!   any other header (a `g`, or an `x`/`L`/`K` of another magic) is an entry of its own;
//! - a PAX `x` record's first well-formed `size` key (a malformed record before it voids
//!   the lookup) overrides the size of the next header whose type is not an extension type,
//!   and the record is used up by the first header that is not read whole as an extension;
//! - GNU sparse extension blocks follow their header while their `isextended` byte is 1.
//!
//! On anything it cannot parse it stops watching and leaves the verdict to the tar reader,
//! which refuses the same header.

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
    /// The last PAX `x` record, until a header uses it up: where its data starts, its
    /// length, the bytes so far (all of them once the next header is reached).
    pax: Option<(u64, u64, Vec<u8>)>,
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
                if self.block[504] == 1 {
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
        let kind = self.block[156];
        let Some(mut size) = entry_size(&self.block[124..136]) else {
            self.done = true;
            return Ok(());
        };
        let extension_type = matches!(kind, b'x' | b'g' | b'L' | b'K');
        if !extension_type {
            if let Some(s) = self.pax.as_ref().and_then(|(_, _, data)| pax_size(data)) {
                size = s;
            }
        }
        let read_whole = has_tar_magic(&self.block) && matches!(kind, b'x' | b'L' | b'K');
        if read_whole {
            if size > self.max_record {
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
        } else {
            // The tar reader hands this header out as an entry, with the PAX record it held.
            self.pax = None;
        }
        if kind == b'S' && self.block[482] == 1 {
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

/// Whether a header has the ustar (`ustar\0` `00`) or GNU (`ustar ` ` \0`) magic and version:
/// the tar crate reads extension records only from those (`is_recognized_header`).
fn has_tar_magic(header: &[u8; BLOCK as usize]) -> bool {
    matches!(&header[257..265], b"ustar\x0000" | b"ustar  \0")
}

/// A header's size field as the tar crate reads it (`num_field_wrapper_from`): octal text up
/// to the first NUL, trimmed, or, when the high bit of the first byte is set, base-256 of the
/// last 8 bytes (the crate ignores the first 4 bytes of a 12-byte field).
fn entry_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let last8 = &field[field.len() - 8..];
        return Some(last8.iter().fold(0u64, |n, &b| n << 8 | u64::from(b)));
    }
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    let text = std::str::from_utf8(&field[..end]).ok()?;
    u64::from_str_radix(text.trim(), 8).ok()
}

/// The `size` a PAX record gives the next entry, as the tar crate finds it
/// (`pax_extensions_value`): records are lines `LEN KEY=VALUE`; the first with key `size`
/// decides (a value that is not a number gives none); a malformed line before it, or an
/// empty line, ends the search with none.
fn pax_size(data: &[u8]) -> Option<u64> {
    for line in data.split(|&b| b == b'\n') {
        if line.is_empty() {
            return None;
        }
        let space = line.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&line[..space]).ok()?.parse().ok()?;
        if line.len() + 1 != len {
            return None;
        }
        let record = &line[space + 1..];
        let equals = record.iter().position(|&b| b == b'=')?;
        if &record[..equals] == b"size" {
            return std::str::from_utf8(&record[equals + 1..])
                .ok()?
                .parse()
                .ok();
        }
    }
    None
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

    const LIMIT: u64 = 64 << 10;

    /// A header block: `magic` is the 8 bytes of magic and version.
    fn header(name: &str, kind: u8, size: u64, magic: &[u8; 8]) -> tar::Header {
        let mut h = tar::Header::new_old();
        let bytes = h.as_mut_bytes();
        bytes[..name.len()].copy_from_slice(name.as_bytes());
        bytes[257..265].copy_from_slice(magic);
        h.set_mode(0o644);
        h.set_size(size);
        h.set_entry_type(tar::EntryType::new(kind));
        h
    }

    const USTAR: &[u8; 8] = b"ustar\x0000";
    const V7: &[u8; 8] = &[0; 8];

    /// Appends `h` (its checksum set) and `data`, padded to a block.
    fn push(out: &mut Vec<u8>, mut h: tar::Header, data: &[u8]) {
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }

    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let rest = key.len() + value.len() + 3;
        let mut len = rest + 1;
        while len.to_string().len() + rest != len {
            len += 1;
        }
        let mut r = format!("{len} {key}=").into_bytes();
        r.extend_from_slice(value);
        r.push(b'\n');
        r
    }

    /// `prefix`, then a PAX record of `record_bytes` (a comment) for an empty file, then the
    /// end of the archive.
    fn with_record(mut prefix: Vec<u8>, record_bytes: usize) -> Vec<u8> {
        let record = pax_record("comment", &vec![b'x'; record_bytes - 20]);
        push(
            &mut prefix,
            header("PaxHeaders/b", b'x', record.len() as u64, USTAR),
            &record,
        );
        push(&mut prefix, header("b", b'0', 0, USTAR), &[]);
        prefix.resize(prefix.len() + 1024, 0);
        prefix
    }

    /// Reads every entry to its end through the guard, as the unpackers do.
    fn read_guarded(bytes: &[u8]) -> io::Result<()> {
        let mut archive = tar::Archive::new(TarGuard::new(bytes, LIMIT));
        for entry in archive.entries()? {
            io::copy(&mut entry?, &mut io::sink())?;
        }
        Ok(())
    }

    #[test]
    fn numbers_and_pax_sizes_parse_as_the_tar_crate_reads_them() {
        assert_eq!(entry_size(b"00000000017\0"), Some(15));
        assert_eq!(entry_size(b"     17 \0\0\0\0"), Some(15));
        let mut big = [0u8; 12];
        big[0] = 0x80;
        big[11] = 5;
        assert_eq!(entry_size(&big), Some(5));
        // The crate reads only the last 8 bytes of a base-256 field.
        big[1] = 0xff;
        assert_eq!(entry_size(&big), Some(5));
        assert_eq!(pax_size(b"12 size=999\n19 path=a/b/c/d/e\n"), Some(999));
        assert_eq!(pax_size(b"13 path=abcd\n"), None);
        // The first size counts; a malformed record before it voids the lookup.
        assert_eq!(pax_size(b"10 size=0\n20 size=99999999999\n"), Some(0));
        assert_eq!(pax_size(b"99 path=a\n10 size=7\n"), None);
        assert_eq!(pax_size(b"10 size=x\n10 size=7\n"), None);
    }

    /// Archives the old guard read differently from the tar crate: each hides an oversized
    /// PAX record behind a header whose end the two placed apart. The guard must see it.
    #[test]
    fn oversized_records_behind_disagreeing_headers_are_refused() {
        let refused = |name: &str, prefix: Vec<u8>| {
            if let Err(e) = read_guarded(&with_record(prefix.clone(), 1024)) {
                panic!("{name}: the control (a small record) is refused: {e}");
            }
            let err = read_guarded(&with_record(prefix, LIMIT as usize * 4))
                .expect_err(name)
                .to_string();
            assert!(
                err.contains("THINBOX_MAX_TAR_RECORD_BYTES"),
                "{name}: {err}"
            );
        };

        // Two size records: the tar crate takes the first (s4_pax_desync.py).
        let mut t = Vec::new();
        let mut pax = pax_record("size", b"0");
        pax.extend(pax_record("size", b"99999999999"));
        push(
            &mut t,
            header("PaxHeaders/a", b'x', pax.len() as u64, USTAR),
            &pax,
        );
        push(&mut t, header("a", b'0', 0, USTAR), &[]);
        refused("duplicate size", t);

        // A base-256 size whose ignored leading bytes are not zero.
        let mut t = Vec::new();
        let mut h = header("a", b'0', 0, USTAR);
        h.as_old_mut().size = [0x80, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        push(&mut t, h, &[]);
        refused("base-256 size", t);

        // An `x` header without the ustar magic: an entry of its own, its size record
        // applies to nothing.
        let mut t = Vec::new();
        let pax = pax_record("size", b"99999999999");
        push(
            &mut t,
            header("PaxHeaders/a", b'x', pax.len() as u64, V7),
            &pax,
        );
        push(&mut t, header("a", b'0', 0, USTAR), &[]);
        refused("v7 x header", t);

        // A `g` header between the record and its file uses the record up.
        let mut t = Vec::new();
        let pax = pax_record("size", b"99999999999");
        push(
            &mut t,
            header("PaxHeaders/a", b'x', pax.len() as u64, USTAR),
            &pax,
        );
        push(&mut t, header("GlobalHead", b'g', 0, USTAR), &[]);
        push(&mut t, header("a", b'0', 0, USTAR), &[]);
        refused("global header between", t);

        // A sparse header whose `isextended` byte is neither 0 nor 1: no extension blocks.
        let mut t = Vec::new();
        let mut h = header("a", b'S', 0, b"ustar  \0");
        h.as_gnu_mut().unwrap().set_real_size(0);
        h.as_mut_bytes()[482] = 2;
        push(&mut t, h, &[]);
        refused("sparse isextended 2", t);
    }
}
