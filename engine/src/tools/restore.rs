//! `restore`: builds a fresh pool on a metadata device from `thin_dump` XML, as
//! `thin_restore` does, but validates the whole input before it touches the device.
//!
//! The input is the format [`super::dump`] writes (`docs`: thin-metadata-format 12.1):
//!
//! ```text
//! <superblock uuid="" time="1" transaction="5" flags="0" version="2" data_block_size="128" nr_data_blocks="1024">
//!   <device dev_id="1" mapped_blocks="110" transaction="0" creation_time="0" snap_time="1">
//!     <range_mapping origin_begin="0" data_begin="0" length="100" time="0"/>
//!     <single_mapping origin_block="200" data_block="150" time="0"/>
//!   </device>
//! </superblock>
//! ```
//!
//! Rules (each broken one is an [`RestoreError::Input`] naming the line):
//! - one `superblock` element holding `device` elements holding mapping elements; an XML
//!   declaration, comments and whitespace are allowed, nothing else (no text, no
//!   `def`/`ref` shared subtrees, no unknown elements or attributes);
//! - numbers are plain decimal; `flags` is 0 or 1 (NEEDS_CHECK), `version` 1 or 2 (we always
//!   write 2), `uuid` must be empty (0.9.0 never prints one), `metadata_snap` is refused:
//!   `thin_restore` 0.9.0 copies it blindly into `held_root`, producing broken metadata;
//! - `data_block_size` is what the kernel accepts (128..2097152 sectors, a multiple of 128);
//! - device ids fit 24 bits and appear once; times fit 24 bits and are at most the pool's;
//! - mappings have a length of at least 1, stay below `nr_data_blocks` and do not overlap
//!   within their device (data blocks may be shared: each mapping adds one reference);
//! - `mapped_blocks` must parse but is recomputed from the mappings, as `thin_restore` does.
//!
//! Sizes are checked against the metadata device before anything is allocated: a data space
//! map or a number of mappings the device cannot hold is refused up front.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::Arc;

use crate::error::Error;
use crate::io::BlockDevice;
use crate::pdata::space_map::nr_bitmaps;
use crate::thin::metadata::{metadata_blocks_for, BlockTime, DeviceDetails, Metadata};
use crate::units::{DataBlockSize, ThinId, MAX_DATA_BLOCKS, MAX_TIME};

/// What a restore wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub nr_devices: u64,
    /// Mappings written (virtual blocks mapped, over all devices).
    pub nr_mappings: u64,
    pub nr_data_blocks: u64,
    pub transaction_id: u64,
}

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The XML is malformed or breaks a rule; nothing was written to the device.
    #[error("line {line}: {message}")]
    Input { line: u64, message: String },
    /// Reading the input failed.
    #[error("failed to read the input")]
    Read(#[source] io::Error),
    /// Writing the pool failed; the superblock was cleared (best effort), so the device does
    /// not hold a half-restored pool.
    #[error("failed to write the restored metadata")]
    Metadata(#[source] Error),
}

impl RestoreError {
    /// The input line an [`RestoreError::Input`] names.
    pub fn line(&self) -> Option<u64> {
        match self {
            RestoreError::Input { line, .. } => Some(*line),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, RestoreError>;

/// The error for an element that has no place inside `<context>`.
fn unexpected<T>(token: Token<'_>, context: &str) -> Result<T> {
    match token {
        Token::Start {
            name: name @ ("def" | "ref"),
            line,
            ..
        } => input_err(line, format!("<{name}> (shared subtrees) is not supported")),
        Token::Start { name, line, .. } => {
            input_err(line, format!("unexpected <{name}> in <{context}>"))
        }
        Token::End { name, line } => {
            input_err(line, format!("unexpected </{name}> in <{context}>"))
        }
        Token::Eof { line } => input_err(line, format!("unexpected end of input in <{context}>")),
    }
}

fn input_err<T>(line: u64, message: impl Into<String>) -> Result<T> {
    Err(RestoreError::Input {
        line,
        message: message.into(),
    })
}

/// Reads all of `input` and restores it onto `dev` (see [`restore_bytes`]).
pub fn restore(mut input: impl Read, dev: Arc<dyn BlockDevice>) -> Result<RestoreReport> {
    let mut buf = Vec::new();
    input.read_to_end(&mut buf).map_err(RestoreError::Read)?;
    restore_bytes(&buf, dev)
}

/// Validates the XML `xml`, then formats a new pool on the metadata device `dev` holding
/// exactly the devices, details and mappings it describes, and commits it. On an input error
/// the device is untouched.
pub fn restore_bytes(xml: &[u8], dev: Arc<dyn BlockDevice>) -> Result<RestoreReport> {
    let nr_meta = metadata_blocks_for(dev.size());
    let pool = parse(xml, nr_meta)?;
    write(&pool, dev.clone()).inspect_err(|_| {
        // Best effort: a partly written pool must not look like a good one.
        let zero = crate::block::zeroed();
        let _ = dev.write_at(&zero[..], 0).and_then(|_| dev.sync());
    })
}

// ---- the model -----------------------------------------------------------------------------

/// A pool to write: what the XML describes, or what `repair` recovered.
pub(super) struct Pool {
    pub(super) time: u32,
    pub(super) transaction: u64,
    pub(super) needs_check: bool,
    pub(super) data_block_size: DataBlockSize,
    pub(super) nr_data_blocks: u64,
    pub(super) devices: BTreeMap<ThinId, Device>,
    pub(super) nr_mappings: u64,
}

/// One device of a [`Pool`]: its details (`mapped_blocks` is recomputed) and mappings.
pub(super) struct Device {
    pub(super) transaction: u64,
    pub(super) creation_time: u32,
    pub(super) snap_time: u32,
    /// Runs by first virtual block: (data block, length, time).
    pub(super) runs: BTreeMap<u64, (u64, u64, u32)>,
}

// ---- the tokenizer -------------------------------------------------------------------------

/// At most this many attributes on one element (the widest has 7).
const MAX_ATTRS: usize = 16;
/// Longest attribute value accepted (numbers have at most 20 digits).
const MAX_VALUE: usize = 64;

enum Token<'a> {
    Start {
        name: &'a str,
        attrs: Vec<(&'a str, String)>,
        empty: bool,
        line: u64,
    },
    End {
        name: &'a str,
        line: u64,
    },
    Eof {
        line: u64,
    },
}

struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
    line: u64,
    seen_element: bool,
}

fn is_name_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_name_char(c: u8) -> bool {
    is_name_start(c) || c.is_ascii_digit() || c == b'-' || c == b'.'
}

fn describe_byte(c: u8) -> String {
    if c.is_ascii_graphic() {
        format!("'{}'", c as char)
    } else {
        format!("byte 0x{c:02x}")
    }
}

impl<'a> Lexer<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.pos += 1;
        if c == b'\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.bump();
        }
    }

    fn starts_with(&self, p: &[u8]) -> bool {
        self.s[self.pos..].starts_with(p)
    }

    /// Skips past `end`, or fails at the end of input.
    fn skip_past(&mut self, end: &[u8], what: &str, line: u64) -> Result<()> {
        while !self.starts_with(end) {
            if self.bump().is_none() {
                return input_err(line, format!("{what} is not closed"));
            }
        }
        for _ in 0..end.len() {
            self.bump();
        }
        Ok(())
    }

    fn name(&mut self) -> Result<&'a str> {
        let start = self.pos;
        match self.peek() {
            Some(c) if is_name_start(c) => {}
            Some(c) => {
                return input_err(
                    self.line,
                    format!("expected a name, found {}", describe_byte(c)),
                )
            }
            None => return input_err(self.line, "unexpected end of input in a tag"),
        }
        while self.peek().is_some_and(is_name_char) {
            self.bump();
        }
        // Name characters are ASCII.
        Ok(std::str::from_utf8(&self.s[start..self.pos]).unwrap_or(""))
    }

    fn expect(&mut self, c: u8, what: &str) -> Result<()> {
        match self.peek() {
            Some(x) if x == c => {
                self.bump();
                Ok(())
            }
            Some(x) => input_err(
                self.line,
                format!("expected {what}, found {}", describe_byte(x)),
            ),
            None => input_err(
                self.line,
                format!("unexpected end of input, expected {what}"),
            ),
        }
    }

    fn value(&mut self) -> Result<String> {
        let quote = match self.peek() {
            Some(q @ (b'"' | b'\'')) => q,
            Some(x) => {
                return input_err(
                    self.line,
                    format!("expected a quoted value, found {}", describe_byte(x)),
                )
            }
            None => return input_err(self.line, "unexpected end of input in a tag"),
        };
        self.bump();
        let mut v = String::new();
        loop {
            let c = match self.bump() {
                None => return input_err(self.line, "unexpected end of input in a value"),
                Some(c) if c == quote => break,
                Some(b'<') => return input_err(self.line, "'<' in an attribute value"),
                Some(b'&') => {
                    let entities: [(&[u8], char); 5] = [
                        (b"amp;", '&'),
                        (b"lt;", '<'),
                        (b"gt;", '>'),
                        (b"quot;", '"'),
                        (b"apos;", '\''),
                    ];
                    let Some((e, ch)) = entities.iter().find(|(e, _)| self.starts_with(e)) else {
                        return input_err(self.line, "unknown entity in an attribute value");
                    };
                    self.pos += e.len();
                    *ch
                }
                Some(c) if c.is_ascii() && !c.is_ascii_control() => c as char,
                Some(c) => {
                    return input_err(
                        self.line,
                        format!("{} in an attribute value", describe_byte(c)),
                    )
                }
            };
            if v.len() >= MAX_VALUE {
                return input_err(self.line, "attribute value too long");
            }
            v.push(c);
        }
        Ok(v)
    }

    fn next(&mut self) -> Result<Token<'a>> {
        loop {
            self.skip_ws();
            let line = self.line;
            let Some(c) = self.peek() else {
                return Ok(Token::Eof { line });
            };
            if c != b'<' {
                return input_err(line, format!("unexpected text: {}", describe_byte(c)));
            }
            if self.starts_with(b"<!--") {
                self.pos += 4;
                self.skip_past(b"-->", "comment", line)?;
                continue;
            }
            if self.starts_with(b"<?") {
                if self.seen_element {
                    return input_err(line, "processing instruction after the first element");
                }
                self.pos += 2;
                self.skip_past(b"?>", "XML declaration", line)?;
                continue;
            }
            if self.starts_with(b"<!") {
                return input_err(
                    line,
                    "DOCTYPE, CDATA and other declarations are not supported",
                );
            }
            self.bump();
            self.seen_element = true;
            if self.peek() == Some(b'/') {
                self.bump();
                let name = self.name()?;
                self.skip_ws();
                self.expect(b'>', "'>'")?;
                return Ok(Token::End { name, line });
            }
            let name = self.name()?;
            let mut attrs: Vec<(&'a str, String)> = Vec::new();
            loop {
                let had_ws = matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n'));
                self.skip_ws();
                match self.peek() {
                    Some(b'/') => {
                        self.bump();
                        self.expect(b'>', "'>' after '/'")?;
                        return Ok(Token::Start {
                            name,
                            attrs,
                            empty: true,
                            line,
                        });
                    }
                    Some(b'>') => {
                        self.bump();
                        return Ok(Token::Start {
                            name,
                            attrs,
                            empty: false,
                            line,
                        });
                    }
                    _ => {}
                }
                if !had_ws {
                    return input_err(self.line, format!("malformed tag <{name}>"));
                }
                let attr = self.name()?;
                self.skip_ws();
                self.expect(b'=', "'='")?;
                self.skip_ws();
                let v = self.value()?;
                if attrs.iter().any(|(a, _)| *a == attr) {
                    return input_err(line, format!("attribute {attr} repeated on <{name}>"));
                }
                if attrs.len() >= MAX_ATTRS {
                    return input_err(line, format!("too many attributes on <{name}>"));
                }
                attrs.push((attr, v));
            }
        }
    }
}

// ---- attributes ----------------------------------------------------------------------------

struct Attrs<'a> {
    elem: &'a str,
    line: u64,
    list: Vec<(&'a str, String)>,
}

impl Attrs<'_> {
    fn take(&mut self, name: &str) -> Option<String> {
        let i = self.list.iter().position(|(a, _)| *a == name)?;
        Some(self.list.swap_remove(i).1)
    }

    fn number(&self, name: &str, v: &str, max: u64) -> Result<u64> {
        let bad = |why: &str| {
            input_err(
                self.line,
                format!("{name}=\"{v}\" on <{}>: {why}", self.elem),
            )
        };
        if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
            return bad("not a decimal number");
        }
        match v.parse::<u64>() {
            Ok(n) if n <= max => Ok(n),
            _ => bad(&format!("more than {max}")),
        }
    }

    fn opt(&mut self, name: &str, max: u64) -> Result<Option<u64>> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => self.number(name, &v, max).map(Some),
        }
    }

    fn req(&mut self, name: &str, max: u64) -> Result<u64> {
        match self.opt(name, max)? {
            Some(n) => Ok(n),
            None => input_err(
                self.line,
                format!("<{}> lacks the {name} attribute", self.elem),
            ),
        }
    }

    fn time(&mut self, name: &str, pool_time: u32) -> Result<u32> {
        let t = self.req(name, u64::from(MAX_TIME))? as u32;
        if t > pool_time {
            return input_err(
                self.line,
                format!(
                    "{name}=\"{t}\" on <{}> is later than the superblock's time {pool_time}",
                    self.elem
                ),
            );
        }
        Ok(t)
    }

    /// Fails on any attribute not taken.
    fn finish(self) -> Result<()> {
        match self.list.first() {
            None => Ok(()),
            Some((a, _)) => input_err(
                self.line,
                format!("unknown attribute {a} on <{}>", self.elem),
            ),
        }
    }
}

// ---- the parser ----------------------------------------------------------------------------

/// Upper bound on the mapping entries one metadata block can hold (a full leaf), so a device
/// of `nr_meta` blocks holds fewer than `nr_meta * MAX_LEAF_ENTRIES` mappings.
const MAX_LEAF_ENTRIES: u64 = (4096 - 32) / 16;

fn parse(xml: &[u8], nr_meta: u64) -> Result<Pool> {
    let mut lx = Lexer {
        s: xml,
        pos: 0,
        line: 1,
        seen_element: false,
    };
    // The root.
    let (pool, sb_line, sb_empty) = match lx.next()? {
        Token::Start {
            name: "superblock",
            attrs,
            empty,
            line,
        } => (superblock(attrs, line, nr_meta)?, line, empty),
        Token::Start { name, line, .. } => {
            return input_err(line, format!("expected <superblock>, found <{name}>"))
        }
        Token::End { name, line } => {
            return input_err(line, format!("expected <superblock>, found </{name}>"))
        }
        Token::Eof { line } => return input_err(line, "no <superblock> element (empty input)"),
    };
    let mut pool = pool;
    let max_mappings = nr_meta.saturating_mul(MAX_LEAF_ENTRIES);
    if !sb_empty {
        loop {
            match lx.next()? {
                Token::End {
                    name: "superblock", ..
                } => break,
                Token::Start {
                    name: "device",
                    attrs,
                    empty,
                    line,
                } => device(&mut lx, &mut pool, attrs, empty, line, max_mappings)?,
                other @ (Token::Start { .. } | Token::End { .. }) => {
                    return unexpected(other, "superblock")
                }
                Token::Eof { line } => {
                    return input_err(
                        line,
                        format!(
                            "unexpected end of input: <superblock> of line {sb_line} is not \
                             closed"
                        ),
                    )
                }
            }
        }
    }
    match lx.next()? {
        Token::Eof { .. } => Ok(pool),
        Token::Start { line, .. } | Token::End { line, .. } => {
            input_err(line, "content after the end of <superblock>")
        }
    }
}

fn superblock(list: Vec<(&str, String)>, line: u64, nr_meta: u64) -> Result<Pool> {
    let mut a = Attrs {
        elem: "superblock",
        line,
        list,
    };
    if a.take("metadata_snap").is_some() {
        return input_err(
            line,
            "the metadata_snap attribute is refused: a metadata snapshot cannot be restored \
             (thin_restore 0.9.0 writes it into the superblock blindly and breaks the \
             metadata); remove the attribute",
        );
    }
    match a.take("uuid") {
        Some(u) if !u.is_empty() => {
            return input_err(
                line,
                format!("uuid=\"{u}\": only an empty uuid is supported"),
            )
        }
        _ => {}
    }
    let time = a.req("time", u64::from(MAX_TIME))? as u32;
    let transaction = a.req("transaction", u64::MAX)?;
    let flags = a.opt("flags", u64::from(u32::MAX))?.unwrap_or(0);
    if flags > 1 {
        return input_err(
            line,
            format!("flags=\"{flags}\": only 0 and 1 (needs_check) are defined"),
        );
    }
    let version = a.opt("version", u64::from(u32::MAX))?.unwrap_or(1);
    if !(1..=2).contains(&version) {
        return input_err(line, format!("version=\"{version}\": only 1 and 2 exist"));
    }
    let dbs = a.req("data_block_size", u64::from(u32::MAX))?;
    let Some(data_block_size) = DataBlockSize::from_sectors(dbs as u32) else {
        return input_err(
            line,
            format!(
                "data_block_size=\"{dbs}\": must be 128 to 2097152 sectors and a multiple of 128"
            ),
        );
    };
    let nr_data_blocks = a.req("nr_data_blocks", MAX_DATA_BLOCKS)?;
    a.finish()?;
    // Each bitmap of the data space map takes a metadata block, plus its index and the pool's
    // trees: refuse what cannot fit before allocating the in-memory map.
    let bitmaps = nr_bitmaps(nr_data_blocks) as u64;
    if bitmaps.saturating_add(8) > nr_meta {
        return input_err(
            line,
            format!(
                "nr_data_blocks=\"{nr_data_blocks}\" needs {bitmaps} space map blocks; the \
                 metadata device has {nr_meta} blocks"
            ),
        );
    }
    Ok(Pool {
        time,
        transaction,
        needs_check: flags == 1,
        data_block_size,
        nr_data_blocks,
        devices: BTreeMap::new(),
        nr_mappings: 0,
    })
}

fn device<'a>(
    lx: &mut Lexer<'a>,
    pool: &mut Pool,
    list: Vec<(&str, String)>,
    empty: bool,
    line: u64,
    max_mappings: u64,
) -> Result<()> {
    let mut a = Attrs {
        elem: "device",
        line,
        list,
    };
    let raw_id = a.req("dev_id", u64::MAX)?;
    let Some(id) = ThinId::new(raw_id) else {
        return input_err(
            line,
            format!("dev_id=\"{raw_id}\": device ids are at most 16777215 (24 bits)"),
        );
    };
    if pool.devices.contains_key(&id) {
        return input_err(line, format!("device {raw_id} appears twice"));
    }
    // Recomputed from the mappings, as thin_restore does; it must still be a number.
    a.opt("mapped_blocks", u64::MAX)?;
    let transaction = a.req("transaction", u64::MAX)?;
    let creation_time = a.time("creation_time", pool.time)?;
    let snap_time = a.time("snap_time", pool.time)?;
    a.finish()?;
    let mut dev = Device {
        transaction,
        creation_time,
        snap_time,
        runs: BTreeMap::new(),
    };
    if !empty {
        loop {
            match lx.next()? {
                Token::End { name: "device", .. } => break,
                Token::Start {
                    name: name @ ("single_mapping" | "range_mapping"),
                    attrs,
                    empty,
                    line,
                } => {
                    mapping(pool, &mut dev, name, attrs, line, max_mappings)?;
                    if !empty {
                        match lx.next()? {
                            Token::End { name: n, .. } if n == name => {}
                            Token::Start { line, .. }
                            | Token::End { line, .. }
                            | Token::Eof { line } => {
                                return input_err(line, format!("<{name}> must be empty"))
                            }
                        }
                    }
                }
                other @ (Token::Start { .. } | Token::End { .. }) => {
                    return unexpected(other, "device")
                }
                Token::Eof { line: eof } => {
                    return input_err(
                        eof,
                        format!("unexpected end of input: <device> of line {line} is not closed"),
                    )
                }
            }
        }
    }
    pool.devices.insert(id, dev);
    Ok(())
}

fn mapping(
    pool: &mut Pool,
    dev: &mut Device,
    elem: &str,
    list: Vec<(&str, String)>,
    line: u64,
    max_mappings: u64,
) -> Result<()> {
    let mut a = Attrs { elem, line, list };
    let (v, d, len) = if elem == "single_mapping" {
        let v = a.req("origin_block", u64::MAX)?;
        let d = a.req("data_block", u64::MAX)?;
        (v, d, 1)
    } else {
        let v = a.req("origin_begin", u64::MAX)?;
        let d = a.req("data_begin", u64::MAX)?;
        let len = a.req("length", u64::MAX)?;
        if len == 0 {
            return input_err(line, "length=\"0\": a range maps at least one block");
        }
        (v, d, len)
    };
    let time = a.time("time", pool.time)?;
    a.finish()?;
    let Some(v_end) = v.checked_add(len) else {
        return input_err(line, "the mapping runs past the last virtual block (2^64)");
    };
    let d_end = d.saturating_add(len);
    if d_end > pool.nr_data_blocks {
        return input_err(
            line,
            format!(
                "mapping beyond the end of the data device (data block {} >= nr_data_blocks {})",
                d_end - 1,
                pool.nr_data_blocks
            ),
        );
    }
    if let Some((&b, &(_, l, _))) = dev.runs.range(..=v).next_back() {
        if b + l > v {
            return input_err(
                line,
                format!("virtual block {v} is mapped twice in this device (a mapping from {b})"),
            );
        }
    }
    if let Some((&b, _)) = dev.runs.range(v..).next() {
        if b < v_end {
            return input_err(
                line,
                format!("virtual block {b} is mapped twice in this device"),
            );
        }
    }
    pool.nr_mappings = pool.nr_mappings.saturating_add(len);
    if pool.nr_mappings > max_mappings {
        return input_err(
            line,
            format!(
                "more mappings ({} so far) than the metadata device can hold",
                pool.nr_mappings
            ),
        );
    }
    dev.runs.insert(v, (d, len, time));
    Ok(())
}

// ---- writing -------------------------------------------------------------------------------

/// Mappings written between two commits, to bound the dirty blocks held in memory.
const COMMIT_EVERY: u64 = 1 << 18;

/// Formats `dev` and writes `pool` onto it: every device gets its own trees (nothing is
/// shared) and each mapping one reference on its data block. Precondition: the model obeys
/// the rules [`parse`] enforces (ids and times in range, mappings inside the data space map
/// and not overlapping within a device).
pub(super) fn write(pool: &Pool, dev: Arc<dyn BlockDevice>) -> Result<RestoreReport> {
    let e = RestoreError::Metadata;
    let mut md = Metadata::format(dev, pool.data_block_size, pool.nr_data_blocks).map_err(e)?;
    md.set_transaction_id(0, pool.transaction).map_err(e)?;
    let mut since_commit = 0;
    for (&id, d) in &pool.devices {
        md.create_thin(id).map_err(e)?;
        for (&v, &(data, len, time)) in &d.runs {
            for i in 0..len {
                md.reference_data_block(data + i).map_err(e)?;
                let bt = BlockTime {
                    block: data + i,
                    time,
                };
                md.insert(id, v + i, bt).map_err(e)?;
                since_commit += 1;
                if since_commit >= COMMIT_EVERY {
                    md.commit().map_err(e)?;
                    since_commit = 0;
                }
            }
        }
        let details = DeviceDetails {
            mapped_blocks: 0,
            transaction_id: d.transaction,
            creation_time: d.creation_time,
            snapshotted_time: d.snap_time,
        };
        md.restore_details(id, details).map_err(e)?;
    }
    md.restore_time(pool.time).map_err(e)?;
    if pool.needs_check {
        md.set_needs_check();
    }
    md.commit().map_err(e)?;
    Ok(RestoreReport {
        nr_devices: pool.devices.len() as u64,
        nr_mappings: pool.nr_mappings,
        nr_data_blocks: pool.nr_data_blocks,
        transaction_id: pool.transaction,
    })
}
