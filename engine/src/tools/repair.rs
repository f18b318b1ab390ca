//! `repair`: rebuilds usable metadata from a damaged metadata device, as `thin_repair` does,
//! keeping every mapping that can be trusted.
//!
//! 1. **Superblock.** Block 0 is used when its checksum and magic are good. Otherwise the
//!    data block size and data space size come from the options (or from a held
//!    metadata-snapshot copy found by the scan), and the roots are found by scanning.
//! 2. **Tolerant walks.** The device-details tree, the top-level mapping tree and every
//!    device's mapping tree are walked; a node that fails its checksum, location, header,
//!    key-range or depth rules is skipped and leaves a *gap*: the key range its parent gave
//!    it. Everything reachable through good nodes is kept.
//! 3. **Scan.** When something is missing, every block of the device is read and each valid
//!    b-tree node noted. A valid subtree nothing points at (an *orphan*, e.g. the children
//!    of a broken internal node) is adopted into the one gap its keys fit, provided the old
//!    metadata space map still counts its root as in use. When that space map cannot be
//!    read, an orphan is adopted only if no other orphan overlaps it: copy-on-write leaves
//!    old copies of nodes behind, and an old copy overlaps the live one. Devices that lost
//!    their mapping root are matched with orphan roots by their details' `mapped_blocks`.
//! 4. **Write.** The kept devices and mappings are written to the output as a fresh pool,
//!    the way `restore` writes one: new trees, both space maps computed from the mappings.
//!
//! Nothing read is trusted: pointers are bounds-checked before they are followed, every
//! walk remembers the nodes it entered (a cycle ends there), depth is bounded by
//! [`MAX_DEPTH`], and nothing is allocated in proportion to a number read from disk.
//! A held metadata snapshot is not carried over (its trees are only read to tell them apart
//! from the live ones).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::block::{self, read_u64, Block, BlockKind, BLOCK_SIZE};
use crate::error::{Damage, Error};
use crate::io::BlockDevice;
use crate::pdata::btree::node::{self, Node};
use crate::pdata::btree::MAX_DEPTH;
use crate::pdata::space_map::disk::{decode_bitmap, IndexEntry, MAX_METADATA_BITMAPS};
use crate::pdata::space_map::{Bitmap, ENTRIES_PER_BITMAP};
use crate::thin::metadata::superblock::MAGIC;
use crate::thin::metadata::{metadata_blocks_for, BlockTime, DeviceDetails, Superblock};
use crate::units::{DataBlockSize, ThinId, MAX_DATA_BLOCKS, MAX_THIN_ID};

use super::raw;
use super::restore::{self, Device, Pool};

/// What the caller knows that a destroyed superblock would have said. Each given value
/// overrides the superblock's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepairOptions {
    /// The pool's data block size. Needed when the superblock is unreadable and no held
    /// metadata-snapshot copy is found.
    pub data_block_size: Option<DataBlockSize>,
    /// Data blocks in the pool. Without it and without a superblock, the highest mapped
    /// data block + 1 is used (a pool opened on its data device grows to the device).
    pub nr_data_blocks: Option<u64>,
    /// The pool's transaction id. Without it and without a superblock, the highest
    /// transaction id in the device details is used.
    pub transaction_id: Option<u64>,
}

/// A range of a thin's virtual blocks whose mappings could not be recovered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LostRange {
    pub thin_id: u64,
    /// First virtual block of the range.
    pub begin: u64,
    /// One past the last; `None`: to the end of the thin.
    pub end: Option<u64>,
}

impl LostRange {
    /// Whether virtual block `v` lies in the range.
    pub fn contains(&self, v: u64) -> bool {
        v >= self.begin && self.end.is_none_or(|e| v < e)
    }
}

/// What a repair found and wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairReport {
    /// Block 0 was a good superblock (its geometry and roots were used).
    pub superblock_intact: bool,
    /// Devices written.
    pub nr_devices: u64,
    /// Mappings written, over all devices.
    pub nr_mappings: u64,
    /// Of those, mappings recovered from orphaned subtrees found by the scan.
    pub nr_adopted_mappings: u64,
    /// Mappings dropped because their data block lies past the data space.
    pub nr_dropped_mappings: u64,
    /// Distinct metadata blocks found damaged while walking the trees.
    pub nr_damaged_nodes: u64,
    /// Virtual block ranges whose mappings are lost (a damaged node nothing could replace).
    pub lost: Vec<LostRange>,
    /// Devices in a mapping tree without details (written with details made up: created at
    /// time 0, snapshotted now, so every old block is copied before it is written).
    pub devices_without_details: Vec<u64>,
    /// Devices with details (and mappings) whose mapping tree was not found (written
    /// without mappings).
    pub devices_without_mappings: Vec<u64>,
    /// Whether a metadata snapshot was held (it is not carried over).
    pub dropped_metadata_snap: bool,
    /// Metadata blocks read by the scan (0 when the walks found everything).
    pub nr_blocks_scanned: u64,
    pub data_block_size: DataBlockSize,
    pub nr_data_blocks: u64,
    pub transaction_id: u64,
    pub time: u32,
}

/// Why a repair failed. The input is never written.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    /// The superblock is unreadable and nothing says what the data block size is.
    #[error("the superblock is damaged ({0}) and the data block size is unknown: give it")]
    NeedDataBlockSize(Damage),
    /// Neither the superblock nor the scan found a device-details or mapping tree.
    #[error("no device-details or mapping tree was found on the device")]
    NothingFound,
    /// Writing the new metadata failed; the output's superblock was cleared (best effort).
    #[error("failed to write the repaired metadata")]
    Write(#[source] Error),
}

/// Progress of the scan: blocks read so far and in all.
pub type Progress<'a> = dyn FnMut(u64, u64) + 'a;

/// Rebuilds the metadata on `input` onto `output` (formatted anew; its size is the new
/// metadata device's size) and reports what was kept and lost. `progress` is called as the
/// scan reads the device, when a scan is needed.
///
/// Precondition: `input` and `output` are different devices, and nobody changes `input`
/// meanwhile. `input` is only read.
pub fn repair(
    input: &dyn BlockDevice,
    output: Arc<dyn BlockDevice>,
    opts: &RepairOptions,
    progress: &mut Progress<'_>,
) -> Result<RepairReport, RepairError> {
    let mut r = Repairer::new(input);
    let pool = r.recover(opts, progress)?;
    let report = r.report(&pool);
    restore::write(&pool, output.clone()).map_err(|e| {
        // Best effort: a half-written pool must not look like a good one.
        let zero = block::zeroed();
        let _ = output.write_at(&zero[..], 0).and_then(|_| output.sync());
        match e {
            restore::RestoreError::Metadata(e) => RepairError::Write(e),
            other => RepairError::Write(Error::InvalidArgument(other.to_string())),
        }
    })?;
    Ok(report)
}

// ---- the tolerant walk ---------------------------------------------------------------------

/// Key range a parent gives a child, and the child's depth.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    low: u64,
    /// Exclusive; `None`: unbounded.
    high: Option<u64>,
    depth: usize,
}

impl Bounds {
    const ROOT: Bounds = Bounds {
        low: 0,
        high: None,
        depth: 0,
    };

    fn holds(&self, key: u64) -> bool {
        key >= self.low && self.high.is_none_or(|h| key < h)
    }
}

/// A skipped subtree: the key range its parent gave it, and the block that was skipped
/// (a node shared by several devices leaves the same gap in each).
#[derive(Clone, Copy, Debug)]
struct Gap {
    low: u64,
    high: Option<u64>,
    block: u64,
}

/// The result of walking one tree.
#[derive(Default)]
struct Walked {
    gaps: Vec<Gap>,
    /// The root itself was unusable (nothing of the tree was read).
    root_lost: bool,
    /// Every node kept, in walk order.
    nodes: Vec<u64>,
}

/// Reads nodes for the walks and remembers what was kept and what was damaged.
struct Walker<'a> {
    dev: &'a dyn BlockDevice,
    end: u64,
    /// Every node kept by some walk.
    reached: HashSet<u64>,
    damaged: BTreeSet<u64>,
}

impl Walker<'_> {
    /// Reads and judges the node at `loc` for a place with bounds `at`.
    fn node(&self, loc: u64, leaf_value_size: u32, at: Bounds) -> Result<Box<Block>, Damage> {
        raw::check_pointer(loc, self.end)?;
        let b = raw::read_block(self.dev, loc)
            .map_err(|e| Damage::Other(format!("read failed: {e}")))?;
        raw::validate_node(&b, loc, leaf_value_size)?;
        let n = Node::new(&b);
        for i in 0..n.nr_entries() {
            let key = n.key(i);
            if !at.holds(key) {
                return Err(Damage::KeyOutsideParentRange {
                    key,
                    low: at.low,
                    high: at.high.unwrap_or(u64::MAX),
                });
            }
        }
        Ok(b)
    }

    /// Calls `visit(key, value)` for every entry reachable from `root` through good nodes,
    /// in key order, and returns the gaps left by bad ones.
    fn walk(
        &mut self,
        root: u64,
        leaf_value_size: u32,
        visit: &mut dyn FnMut(u64, &[u8]),
    ) -> Walked {
        let mut state = WalkState {
            visited: HashSet::new(),
            leaf_depth: None,
            walked: Walked::default(),
        };
        self.walk_at(&mut state, root, leaf_value_size, Bounds::ROOT, visit);
        state.walked
    }

    fn walk_at(
        &mut self,
        s: &mut WalkState,
        loc: u64,
        leaf_value_size: u32,
        at: Bounds,
        visit: &mut dyn FnMut(u64, &[u8]),
    ) {
        let skip = |s: &mut WalkState| {
            s.walked.gaps.push(Gap {
                low: at.low,
                high: at.high,
                block: loc,
            });
            if at.depth == 0 {
                s.walked.root_lost = true;
            }
        };
        // A node seen twice in one tree, or a tree deeper than any real one, is a cycle or
        // a misdirected pointer: the pointer is not followed.
        if at.depth > MAX_DEPTH || !s.visited.insert(loc) {
            skip(s);
            return;
        }
        let b = match self.node(loc, leaf_value_size, at) {
            Ok(b) => b,
            Err(damage) => {
                tracing::debug!(block = loc, %damage, "repair: skipping a damaged node");
                if loc != 0 && loc < self.end {
                    self.damaged.insert(loc);
                }
                skip(s);
                return;
            }
        };
        let n = Node::new(&b);
        if n.is_leaf() {
            if *s.leaf_depth.get_or_insert(at.depth) != at.depth {
                self.damaged.insert(loc);
                skip(s);
                return;
            }
            self.reached.insert(loc);
            s.walked.nodes.push(loc);
            for i in 0..n.nr_entries() {
                visit(n.key(i), n.value(i));
            }
            return;
        }
        self.reached.insert(loc);
        s.walked.nodes.push(loc);
        let nr = n.nr_entries();
        for i in 0..nr {
            let child = Bounds {
                low: n.key(i),
                high: if i + 1 < nr {
                    Some(n.key(i + 1))
                } else {
                    at.high
                },
                depth: at.depth + 1,
            };
            self.walk_at(s, n.value_u64(i), leaf_value_size, child, visit);
        }
    }
}

struct WalkState {
    visited: HashSet<u64>,
    leaf_depth: Option<usize>,
    walked: Walked,
}

// ---- the scan ------------------------------------------------------------------------------

/// What the scan keeps of a valid node.
struct Scanned {
    leaf: bool,
    /// The leaves' value size (internal nodes: 8).
    value_size: u32,
    /// First and last key; `None` for an empty node.
    keys: Option<(u64, u64)>,
    /// Entries in use.
    nr: u32,
    /// Internal nodes: (key, child) pairs.
    children: Vec<(u64, u64)>,
    /// Leaves with 8-byte values that could all be metadata block numbers: the values (a
    /// top-level mapping leaf's device roots, if that is what this is).
    pointers: Vec<u64>,
}

/// A valid subtree: every node good, keys inside their separators, leaves at one depth.
#[derive(Clone, Copy, Debug)]
struct Subtree {
    leaf_value_size: u32,
    height: u32,
    keys: Option<(u64, u64)>,
    entries: u64,
}

/// Blocks read per device read during the scan.
const SCAN_CHUNK: u64 = 256;

struct Scan {
    nodes: HashMap<u64, Scanned>,
    /// Held superblock copies (metadata snapshots) found at other locations.
    held: Vec<Superblock>,
    /// Every block that is a valid block of some kind (checksum and location good).
    valid: HashSet<u64>,
    subtrees: HashMap<u64, Option<Subtree>>,
    blocks: u64,
}

impl Scan {
    fn run(dev: &dyn BlockDevice, end: u64, progress: &mut Progress<'_>) -> Scan {
        let mut scan = Scan {
            nodes: HashMap::new(),
            held: Vec::new(),
            valid: HashSet::new(),
            subtrees: HashMap::new(),
            blocks: 0,
        };
        let mut buf = vec![0u8; (SCAN_CHUNK as usize) * BLOCK_SIZE];
        let mut at = 1;
        while at < end {
            let n = SCAN_CHUNK.min(end - at);
            let bytes = &mut buf[..n as usize * BLOCK_SIZE];
            if dev.read_at(bytes, at * BLOCK_SIZE as u64).is_err() {
                // Read what can be read one block at a time.
                for i in 0..n {
                    if let Ok(b) = raw::read_block(dev, at + i) {
                        scan.note(at + i, &b, end);
                    }
                }
            } else {
                for (i, chunk) in bytes.chunks_exact(BLOCK_SIZE).enumerate() {
                    let b: &Block = chunk.try_into().expect("chunks are one block");
                    scan.note(at + i as u64, b, end);
                }
            }
            at += n;
            scan.blocks = at;
            progress(at, end);
        }
        scan
    }

    fn note(&mut self, loc: u64, b: &Block, end: u64) {
        let kind = BlockKind::identify(b);
        if kind.is_some() && read_u64(b, 8) == loc {
            self.valid.insert(loc);
        }
        match kind {
            Some(BlockKind::Node) => {
                if read_u64(b, 8) != loc || node::validate_header(b).is_err() {
                    return;
                }
                let n = Node::new(b);
                let nr = n.nr_entries();
                let keys = (nr > 0).then(|| (n.key(0), n.key(nr - 1)));
                let children: Vec<(u64, u64)> = if n.is_internal() {
                    (0..nr).map(|i| (n.key(i), n.value_u64(i))).collect()
                } else {
                    Vec::new()
                };
                let mut pointers = Vec::new();
                if n.is_leaf() && n.value_size() == 8 {
                    let values = (0..nr).map(|i| n.value_u64(i));
                    if values.clone().all(|v| v != 0 && v < end) {
                        pointers = values.collect();
                    }
                }
                self.nodes.insert(
                    loc,
                    Scanned {
                        leaf: n.is_leaf(),
                        value_size: n.value_size() as u32,
                        keys,
                        nr: nr as u32,
                        children,
                        pointers,
                    },
                );
            }
            Some(BlockKind::Superblock) if read_u64(b, 8) == loc && read_u64(b, 32) == MAGIC => {
                self.held.push(Superblock::decode(b));
            }
            _ => {}
        }
    }

    /// The valid subtree rooted at `loc`, if it is one (memoized).
    fn subtree(&mut self, loc: u64) -> Option<Subtree> {
        let mut in_progress = HashSet::new();
        self.subtree_at(loc, 0, &mut in_progress)
    }

    fn subtree_at(
        &mut self,
        loc: u64,
        depth: usize,
        in_progress: &mut HashSet<u64>,
    ) -> Option<Subtree> {
        if let Some(&known) = self.subtrees.get(&loc) {
            return known;
        }
        if depth > MAX_DEPTH || !in_progress.insert(loc) {
            return None;
        }
        let result = self.compute(loc, depth, in_progress);
        in_progress.remove(&loc);
        self.subtrees.insert(loc, result);
        result
    }

    fn compute(
        &mut self,
        loc: u64,
        depth: usize,
        in_progress: &mut HashSet<u64>,
    ) -> Option<Subtree> {
        let node = self.nodes.get(&loc)?;
        if node.leaf {
            return Some(Subtree {
                leaf_value_size: node.value_size,
                height: 0,
                keys: node.keys,
                entries: u64::from(node.nr),
            });
        }
        let children = node.children.clone();
        let mut first: Option<Subtree> = None;
        let (mut entries, mut min_key, mut max_key) = (0u64, None, None);
        for (i, &(key, child)) in children.iter().enumerate() {
            let high = children.get(i + 1).map(|&(k, _)| k);
            let sub = self.subtree_at(child, depth + 1, in_progress)?;
            if let Some((lo, hi)) = sub.keys {
                if lo < key || high.is_some_and(|h| hi >= h) {
                    return None;
                }
                min_key = min_key.or(Some(lo));
                max_key = Some(hi);
            }
            match first {
                None => first = Some(sub),
                Some(f) if f.height != sub.height || f.leaf_value_size != sub.leaf_value_size => {
                    return None;
                }
                Some(_) => {}
            }
            entries += sub.entries;
        }
        let f = first?;
        Some(Subtree {
            leaf_value_size: f.leaf_value_size,
            height: f.height + 1,
            keys: min_key.zip(max_key),
            entries,
        })
    }
}

// ---- the metadata space map of the damaged pool, as an oracle of liveness ------------------

/// The old metadata space map, read only to tell live blocks from stale copies.
struct Liveness {
    bitmaps: Vec<Option<Bitmap>>,
}

impl Liveness {
    fn read(dev: &dyn BlockDevice, end: u64, sb: &Superblock) -> Liveness {
        let root = &sb.metadata_sm_root;
        let n = root
            .nr_blocks
            .div_ceil(ENTRIES_PER_BITMAP)
            .min(MAX_METADATA_BITMAPS as u64);
        Liveness::from_index(dev, end, root.bitmap_root, Some(n))
    }

    /// The space map whose index block is at `index`, with `nr_bitmaps` entries (`None`:
    /// up to the first empty entry).
    fn from_index(
        dev: &dyn BlockDevice,
        end: u64,
        index: u64,
        nr_bitmaps: Option<u64>,
    ) -> Liveness {
        let mut bitmaps = Vec::new();
        let block = raw::check_pointer(index, end)
            .ok()
            .and_then(|()| raw::read_block(dev, index).ok())
            .filter(|b| block::verify(b, index, BlockKind::Index).is_ok());
        if let Some(block) = block {
            let n = nr_bitmaps.unwrap_or(MAX_METADATA_BITMAPS as u64) as usize;
            for i in 0..n.min(MAX_METADATA_BITMAPS) {
                let entry = IndexEntry::decode(&block[16 + 16 * i..32 + 16 * i]);
                if nr_bitmaps.is_none() && entry.blocknr == 0 {
                    break;
                }
                let bitmap = raw::check_pointer(entry.blocknr, end)
                    .ok()
                    .and_then(|()| raw::read_block(dev, entry.blocknr).ok())
                    .filter(|b| block::verify(b, entry.blocknr, BlockKind::Bitmap).is_ok())
                    .map(|b| decode_bitmap(&b));
                bitmaps.push(bitmap);
            }
        }
        Liveness { bitmaps }
    }

    /// Whether every bitmap was read.
    fn complete(&self) -> bool {
        !self.bitmaps.is_empty() && self.bitmaps.iter().all(Option::is_some)
    }

    fn none() -> Liveness {
        Liveness {
            bitmaps: Vec::new(),
        }
    }

    /// The old space map's 2-bit count of `loc` (3 meaning "3 or more"), or `None` if it
    /// cannot say.
    fn count(&self, loc: u64) -> Option<u32> {
        let i = (loc / ENTRIES_PER_BITMAP) as usize;
        let bitmap = self.bitmaps.get(i)?.as_ref()?;
        Some(bitmap.get((loc % ENTRIES_PER_BITMAP) as usize))
    }

    /// `Some(true)` if the old space map counts `loc` as used, `Some(false)` if free, `None`
    /// if it cannot say.
    fn live(&self, loc: u64) -> Option<bool> {
        self.count(loc).map(|c| c != 0)
    }
}

// ---- choosing among trees found by the scan -------------------------------------------------

/// A device-details or top-level mapping tree: found by the scan (`loc`), or the one the
/// superblock gave (`loc: None`, only its ids matter).
struct Candidate {
    loc: Option<u64>,
    ids: BTreeSet<u64>,
    /// The old metadata space map counts its root as used.
    live: bool,
    /// Details trees: the highest transaction id of a device.
    newest: u64,
    /// A metadata snapshot's copy of the superblock points at it.
    held: bool,
}

impl Candidate {
    fn known(ids: BTreeSet<u64>) -> Candidate {
        Candidate {
            loc: None,
            ids,
            live: true,
            newest: 0,
            held: false,
        }
    }
}

/// The top-level and details trees that belong together best: the fewest devices in one
/// but not the other (the live pair holds the same devices; an old copy left by
/// copy-on-write usually differs), then trees a metadata snapshot holds (copy-on-write
/// keeps everything they reference intact, so they are safe even if the pool changed
/// after the snapshot), then the most devices in both, then trees the old space map counts
/// as used, then the newest devices. Either side may be missing.
fn best_pair<'c>(
    tops: &'c [Candidate],
    dets: &'c [Candidate],
) -> Option<(Option<&'c Candidate>, Option<&'c Candidate>)> {
    let tops: Vec<Option<&Candidate>> = if tops.is_empty() {
        vec![None]
    } else {
        tops.iter().map(Some).collect()
    };
    let dets: Vec<Option<&Candidate>> = if dets.is_empty() {
        vec![None]
    } else {
        dets.iter().map(Some).collect()
    };
    let empty = BTreeSet::new();
    let mut best = None;
    for &t in &tops {
        for &d in &dets {
            let (ti, di) = (t.map_or(&empty, |c| &c.ids), d.map_or(&empty, |c| &c.ids));
            let score = (
                std::cmp::Reverse(ti.symmetric_difference(di).count()),
                u8::from(t.is_some_and(|c| c.held)) + u8::from(d.is_some_and(|c| c.held)),
                ti.intersection(di).count(),
                u8::from(t.is_some_and(|c| c.live)) + u8::from(d.is_some_and(|c| c.live)),
                d.map_or(0, |c| c.newest),
                ti.len() + di.len(),
            );
            if best.as_ref().is_none_or(|(s, _)| score > *s) {
                best = Some((score, (t, d)));
            }
        }
    }
    best.map(|(_, pair)| pair)
        .filter(|(t, d)| t.is_some() || d.is_some())
}

// ---- the repair ----------------------------------------------------------------------------

struct Repairer<'a> {
    walker: Walker<'a>,
    scan: Option<Scan>,
    liveness: Liveness,
    superblock_intact: bool,
    nr_adopted: u64,
    nr_dropped: u64,
    lost: Vec<LostRange>,
    without_details: Vec<u64>,
    without_mappings: Vec<u64>,
    dropped_metadata_snap: bool,
    /// Roots the intact superblock points at (each one reference).
    sb_roots: Vec<u64>,
    /// Nodes of the top-level mapping trees kept.
    top_nodes: HashSet<u64>,
}

/// An orphan that fits a gap: its root, first and last key, and whether the old space map
/// counts it as used (`None`: cannot say).
type Fit = (u64, (u64, u64), Option<bool>);

/// Which of `fits` share a key with another (their ranges are inclusive). By the start of
/// their ranges: a range overlaps an earlier one when it starts at or before the furthest end
/// so far, and a later one when the next start is at or before its end. A scan may find
/// millions of orphans; comparing each with every other took minutes.
fn overlapping(fits: &[Fit]) -> Vec<bool> {
    let mut order: Vec<usize> = (0..fits.len()).collect();
    order.sort_unstable_by_key(|&j| fits[j].1);
    let mut out = vec![false; fits.len()];
    let mut furthest: Option<u64> = None;
    for (n, &j) in order.iter().enumerate() {
        let (lo, hi) = fits[j].1;
        let with_earlier = furthest.is_some_and(|end| lo <= end);
        let with_later = order.get(n + 1).is_some_and(|&k| fits[k].1 .0 <= hi);
        out[j] = with_earlier || with_later;
        furthest = Some(furthest.map_or(hi, |end| end.max(hi)));
    }
    out
}

/// What the walks collected for one device.
#[derive(Default)]
struct Found {
    mappings: BTreeMap<u64, BlockTime>,
    gaps: Vec<Gap>,
}

impl<'a> Repairer<'a> {
    fn new(dev: &'a dyn BlockDevice) -> Repairer<'a> {
        Repairer {
            walker: Walker {
                dev,
                end: metadata_blocks_for(dev.size()),
                reached: HashSet::new(),
                damaged: BTreeSet::new(),
            },
            scan: None,
            liveness: Liveness::none(),
            superblock_intact: false,
            nr_adopted: 0,
            nr_dropped: 0,
            lost: Vec::new(),
            without_details: Vec::new(),
            without_mappings: Vec::new(),
            dropped_metadata_snap: false,
            sb_roots: Vec::new(),
            top_nodes: HashSet::new(),
        }
    }

    fn dev(&self) -> &'a dyn BlockDevice {
        self.walker.dev
    }

    /// The superblock at block 0, if its checksum, location and magic are good.
    fn superblock(&self) -> Result<Superblock, Damage> {
        if self.walker.end == 0 {
            return Err(Damage::PointerPastEnd(0));
        }
        let b = raw::read_block(self.dev(), 0)
            .map_err(|e| Damage::Other(format!("read failed: {e}")))?;
        block::verify(&b, 0, BlockKind::Superblock)?;
        let magic = read_u64(&b[..], 32);
        if magic != MAGIC {
            return Err(Damage::BadMagic(magic));
        }
        Ok(Superblock::decode(&b))
    }

    fn ensure_scan(&mut self, progress: &mut Progress<'_>) -> &mut Scan {
        if self.scan.is_none() {
            self.scan = Some(Scan::run(self.dev(), self.walker.end, progress));
        }
        self.scan.as_mut().expect("just scanned")
    }

    fn recover(
        &mut self,
        opts: &RepairOptions,
        progress: &mut Progress<'_>,
    ) -> Result<Pool, RepairError> {
        let sb = self.superblock();
        let sb = match sb {
            Ok(sb) => {
                self.superblock_intact = true;
                self.dropped_metadata_snap = sb.held_root != 0;
                self.liveness = Liveness::read(self.dev(), self.walker.end, &sb);
                self.sb_roots = vec![
                    sb.data_mapping_root,
                    sb.device_details_root,
                    sb.data_sm_root.bitmap_root,
                    sb.data_sm_root.ref_count_root,
                    sb.metadata_sm_root.ref_count_root,
                ];
                Some(sb)
            }
            Err(damage) => {
                tracing::debug!(%damage, "repair: superblock unusable, scanning for the trees");
                if opts.data_block_size.is_none() {
                    let held = self
                        .ensure_scan(progress)
                        .held
                        .first()
                        .map(|h| h.data_block_size);
                    if held.and_then(DataBlockSize::from_sectors).is_none() {
                        return Err(RepairError::NeedDataBlockSize(damage));
                    }
                }
                None
            }
        };
        // The device-details tree and the top-level mapping tree.
        let mut details: BTreeMap<u64, DeviceDetails> = BTreeMap::new();
        let mut roots: BTreeMap<u64, u64> = BTreeMap::new();
        let (mut details_walked, mut top_walked) = (None, None);
        if let Some(sb) = &sb {
            details_walked = Some(self.walker.walk(sb.device_details_root, 24, &mut |k, v| {
                details.insert(k, DeviceDetails::decode(v));
            }));
            top_walked = Some(self.walker.walk(sb.data_mapping_root, 8, &mut |k, v| {
                roots.insert(k, read_u64(v, 0));
            }));
        }
        let details_lost = details_walked.as_ref().is_none_or(|w| w.root_lost);
        let top_lost = top_walked.as_ref().is_none_or(|w| w.root_lost);
        if let Some(w) = &top_walked {
            self.top_nodes.extend(&w.nodes);
        }
        if top_lost || details_lost {
            let known_top: BTreeSet<u64> = roots.keys().copied().collect();
            let known_details: BTreeSet<u64> = details.keys().copied().collect();
            self.ensure_scan(progress);
            let tops = if top_lost {
                self.top_candidates()
            } else {
                vec![Candidate::known(known_top)]
            };
            let dets = if details_lost {
                self.details_candidates()
            } else {
                vec![Candidate::known(known_details)]
            };
            if let Some((top, det)) = best_pair(&tops, &dets) {
                if let (true, Some(loc)) = (top_lost, top.and_then(|t| t.loc)) {
                    let w = self.walker.walk(loc, 8, &mut |k, v| {
                        roots.insert(k, read_u64(v, 0));
                    });
                    self.top_nodes.extend(&w.nodes);
                }
                if let (true, Some(loc)) = (details_lost, det.and_then(|d| d.loc)) {
                    self.walker.walk(loc, 24, &mut |k, v| {
                        details.insert(k, DeviceDetails::decode(v));
                    });
                }
            }
        }
        roots.retain(|&id, _| id <= MAX_THIN_ID);
        details.retain(|&id, _| id <= MAX_THIN_ID);
        if roots.is_empty() && details.is_empty() && sb.is_none() {
            return Err(RepairError::NothingFound);
        }

        // Every device's mappings.
        let mut found: BTreeMap<u64, Found> = BTreeMap::new();
        for (&id, &root) in &roots {
            let mut f = Found::default();
            let walked = self.walker.walk(root, 8, &mut |k, v| {
                f.mappings.insert(k, BlockTime::decode(read_u64(v, 0)));
            });
            f.gaps = walked.gaps;
            found.insert(id, f);
        }

        // Devices whose mapping root was lost with a top-level node: match orphan roots by
        // their mapped_blocks.
        let missing: Vec<u64> = details
            .keys()
            .filter(|id| !roots.contains_key(id))
            .copied()
            .collect();
        if !missing.is_empty() {
            self.adopt_roots(&missing, &details, &mut found, progress);
        }

        // Gaps inside the devices' mapping trees: adopt orphaned subtrees.
        if found.values().any(|f| !f.gaps.is_empty()) {
            self.adopt_subtrees(&mut found, progress);
        }

        // Geometry.
        let data_block_size = match (opts.data_block_size, &sb) {
            (Some(bs), _) => bs,
            (None, Some(sb)) => DataBlockSize::from_sectors(sb.data_block_size).ok_or(
                RepairError::NeedDataBlockSize(Damage::BadSuperblock(format!(
                    "data block size {} sectors",
                    sb.data_block_size
                ))),
            )?,
            (None, None) => self
                .scan
                .as_ref()
                .and_then(|s| s.held.first())
                .and_then(|h| DataBlockSize::from_sectors(h.data_block_size))
                .ok_or(RepairError::NeedDataBlockSize(Damage::Other(
                    "superblock unreadable".into(),
                )))?,
        };
        let max_mapped = found
            .values()
            .filter_map(|f| f.mappings.values().map(|bt| bt.block).max())
            .max();
        let nr_data_blocks = match (opts.nr_data_blocks, &sb) {
            (Some(n), _) => n,
            (None, Some(sb)) => sb.data_sm_root.nr_blocks,
            (None, None) => max_mapped.map_or(0, |m| m + 1),
        }
        .min(MAX_DATA_BLOCKS);

        // Assemble the model.
        let mut time = sb.as_ref().map_or(0, |sb| sb.time);
        let mut transaction = sb.as_ref().map_or(0, |sb| sb.transaction_id);
        for d in details.values() {
            time = time.max(d.creation_time).max(d.snapshotted_time);
            if sb.is_none() {
                transaction = transaction.max(d.transaction_id);
            }
        }
        for f in found.values() {
            for bt in f.mappings.values() {
                time = time.max(bt.time);
            }
        }
        let time = time.min(crate::units::MAX_TIME);
        let transaction = opts.transaction_id.unwrap_or(transaction);

        let mut devices = BTreeMap::new();
        let mut nr_mappings = 0;
        let ids: BTreeSet<u64> = details.keys().chain(found.keys()).copied().collect();
        for id in ids {
            let Some(thin_id) = ThinId::new(id) else {
                continue;
            };
            let d = match details.get(&id) {
                Some(d) => *d,
                None => {
                    self.without_details.push(id);
                    DeviceDetails {
                        mapped_blocks: 0,
                        transaction_id: transaction,
                        creation_time: 0,
                        snapshotted_time: time,
                    }
                }
            };
            let f = found.remove(&id);
            // A device that mapped nothing lost nothing with its (empty) tree.
            if f.is_none() && d.mapped_blocks > 0 {
                self.without_mappings.push(id);
            }
            let f = f.unwrap_or_default();
            for g in &f.gaps {
                self.lost.push(LostRange {
                    thin_id: id,
                    begin: g.low,
                    end: g.high,
                });
            }
            let mut runs: BTreeMap<u64, (u64, u64, u32)> = BTreeMap::new();
            let mut last: Option<(u64, u64)> = None;
            for (&v, bt) in &f.mappings {
                if bt.block >= nr_data_blocks {
                    self.nr_dropped += 1;
                    continue;
                }
                nr_mappings += 1;
                // Extend the run that ends right before this mapping, if it can.
                if let Some((start, len)) = last {
                    let run = runs.get_mut(&start).expect("last run exists");
                    if start + len == v && run.0 + len == bt.block && run.2 == bt.time {
                        run.1 += 1;
                        last = Some((start, len + 1));
                        continue;
                    }
                }
                runs.insert(v, (bt.block, 1, bt.time));
                last = Some((v, 1));
            }
            devices.insert(
                thin_id,
                Device {
                    transaction: d.transaction_id,
                    creation_time: d.creation_time.min(time),
                    snap_time: d.snapshotted_time.min(time),
                    runs,
                },
            );
        }
        Ok(Pool {
            time,
            transaction,
            needs_check: false,
            data_block_size,
            nr_data_blocks,
            devices,
            nr_mappings,
        })
    }

    fn report(&self, pool: &Pool) -> RepairReport {
        RepairReport {
            superblock_intact: self.superblock_intact,
            nr_devices: pool.devices.len() as u64,
            nr_mappings: pool.nr_mappings,
            nr_adopted_mappings: self.nr_adopted,
            nr_dropped_mappings: self.nr_dropped,
            nr_damaged_nodes: self.walker.damaged.len() as u64,
            lost: self.lost.clone(),
            devices_without_details: self.without_details.clone(),
            devices_without_mappings: self.without_mappings.clone(),
            dropped_metadata_snap: self.dropped_metadata_snap,
            nr_blocks_scanned: self.scan.as_ref().map_or(0, |s| s.blocks),
            data_block_size: pool.data_block_size,
            nr_data_blocks: pool.nr_data_blocks,
            transaction_id: pool.transaction,
            time: pool.time,
        }
    }

    /// Roots of valid subtrees that lost a parent to the damage, with leaves of
    /// `leaf_value_size`. With the old space map, a node has lost a parent when it counts
    /// more references than the live nodes found by the scan (and the superblock) hold; a
    /// node it calls free is a stale copy and never qualifies. Without it, a node qualifies
    /// when no valid node points at it and no walk kept it. With `tree_roots` (looking for
    /// whole trees without a superblock) the references of metadata-snapshot copies are not
    /// counted, so a snapshot's trees are candidates too. With a superblock they are not:
    /// a lost live root is rebuilt from its devices' orphaned trees instead, which keeps
    /// later changes and does not bring back devices deleted since the snapshot.
    fn orphans(&mut self, leaf_value_size: u32, tree_roots: bool) -> Vec<(u64, Subtree)> {
        let Some(scan) = self.scan.as_mut() else {
            return Vec::new();
        };
        // Roots held by metadata-snapshot copies: old trees, never the live ones.
        let held_roots: HashSet<u64> = scan
            .held
            .iter()
            .flat_map(|h| [h.data_mapping_root, h.device_details_root])
            .collect();
        // Looking for whole trees, a snapshot's roots are candidates like any other.
        let held_roots = if tree_roots {
            &HashSet::new()
        } else {
            &held_roots
        };
        let liveness = &self.liveness;
        let mut referrers: HashMap<u64, u32> = HashMap::new();
        for &root in self.sb_roots.iter().chain(held_roots) {
            *referrers.entry(root).or_default() += 1;
        }
        for (&loc, n) in &scan.nodes {
            // A stale copy of a parent (left by copy-on-write, free in the old space map)
            // does not hold a reference.
            if liveness.live(loc) == Some(false) {
                continue;
            }
            for &(_, child) in &n.children {
                *referrers.entry(child).or_default() += 1;
            }
            // A top-level mapping leaf holds one reference per device root: a leaf of a
            // top-level tree kept, or one whose values all name mapping nodes or damaged
            // blocks (at least one a node).
            let names_mapping_node = |p: &u64| scan.nodes.get(p).is_some_and(|c| c.value_size == 8);
            let top_leaf = self.top_nodes.contains(&loc)
                || (n.pointers.iter().any(names_mapping_node)
                    && n.pointers
                        .iter()
                        .all(|p| names_mapping_node(p) || !scan.nodes.contains_key(p)));
            if !n.pointers.is_empty() && top_leaf {
                for &p in &n.pointers {
                    *referrers.entry(p).or_default() += 1;
                }
            }
        }
        let mut locs: Vec<u64> = scan
            .nodes
            .keys()
            .filter(|&loc| {
                let refs = referrers.get(loc).copied().unwrap_or(0);
                match liveness.count(*loc) {
                    Some(0) => false,
                    Some(c @ (1 | 2)) => c > refs,
                    Some(_) if refs < 3 => true,
                    _ => refs == 0 && !self.walker.reached.contains(loc),
                }
            })
            .copied()
            .collect();
        locs.sort_unstable();
        let mut out = Vec::new();
        for loc in locs {
            if let Some(sub) = scan.subtree(loc) {
                if sub.leaf_value_size == leaf_value_size && sub.keys.is_some() {
                    out.push((loc, sub));
                }
            }
        }
        out
    }

    /// Reads the entries of a valid subtree (all of them, or nothing if it is not one).
    fn entries(&mut self, root: u64, leaf_value_size: u32) -> Option<Vec<(u64, u64)>> {
        let mut entries = Vec::new();
        let mut probe = Walker {
            dev: self.walker.dev,
            end: self.walker.end,
            reached: HashSet::new(),
            damaged: BTreeSet::new(),
        };
        let walked = probe.walk(root, leaf_value_size, &mut |k, v| {
            entries.push((k, read_u64(v, 0)));
        });
        walked.gaps.is_empty().then_some(entries)
    }

    /// Whether the subtree at `root` looks like a top-level mapping tree: its keys are thin
    /// ids and every value is the root of a valid mapping subtree.
    fn looks_like_top(&mut self, root: u64, entries: &[(u64, u64)]) -> bool {
        let Some(scan) = self.scan.as_mut() else {
            return false;
        };
        !entries.is_empty()
            && entries.iter().all(|&(k, v)| {
                k <= MAX_THIN_ID
                    && v != root
                    && scan.subtree(v).is_some_and(|s| s.leaf_value_size == 8)
            })
    }

    /// Top-level mapping trees found by the scan (see [`Self::looks_like_top`]).
    fn top_candidates(&mut self) -> Vec<Candidate> {
        let mut out = Vec::new();
        let tree_roots = !self.superblock_intact;
        for (loc, _) in self.orphans(8, tree_roots) {
            let Some(entries) = self.entries(loc, 8) else {
                continue;
            };
            if !self.looks_like_top(loc, &entries) {
                continue;
            }
            out.push(Candidate {
                loc: Some(loc),
                ids: entries.iter().map(|&(k, _)| k).collect(),
                live: self.liveness.live(loc) == Some(true),
                newest: 0,
                held: self.is_held_root(loc),
            });
        }
        out
    }

    /// Device-details trees found by the scan.
    fn details_candidates(&mut self) -> Vec<Candidate> {
        let mut out = Vec::new();
        let tree_roots = !self.superblock_intact;
        for (loc, _) in self.orphans(24, tree_roots) {
            let mut ids = BTreeSet::new();
            let mut newest = 0;
            let mut probe = self.probe();
            let walked = probe.walk(loc, 24, &mut |k, v| {
                ids.insert(k);
                newest = newest.max(DeviceDetails::decode(v).transaction_id);
            });
            if !walked.gaps.is_empty() || ids.iter().any(|&k| k > MAX_THIN_ID) {
                continue;
            }
            out.push(Candidate {
                loc: Some(loc),
                ids,
                live: self.liveness.live(loc) == Some(true),
                newest,
                held: self.is_held_root(loc),
            });
        }
        out
    }

    /// Blocks the old space map counts as used that are neither valid blocks nor known
    /// damage: `Some(0)` means every block that held anything is accounted for, so a broken
    /// node whose orphans were all adopted lost nothing more. `None` without a complete
    /// space map or a scan.
    fn unexplained(&self) -> Option<usize> {
        let scan = self.scan.as_ref()?;
        if !self.liveness.complete() {
            return None;
        }
        let n = (1..self.walker.end)
            .filter(|&b| {
                self.liveness.live(b) == Some(true)
                    && !scan.valid.contains(&b)
                    && !self.walker.damaged.contains(&b)
            })
            .count();
        Some(n)
    }

    /// Whether a metadata snapshot's superblock copy found by the scan points at `loc`.
    fn is_held_root(&self, loc: u64) -> bool {
        self.scan.as_ref().is_some_and(|s| {
            s.held
                .iter()
                .any(|h| h.data_mapping_root == loc || h.device_details_root == loc)
        })
    }

    /// A walker of its own, for reading a candidate without keeping it.
    fn probe(&self) -> Walker<'a> {
        Walker {
            dev: self.walker.dev,
            end: self.walker.end,
            reached: HashSet::new(),
            damaged: BTreeSet::new(),
        }
    }

    /// Gives devices that have details but no mapping root an orphan root with exactly
    /// their `mapped_blocks` mappings, when that match is one to one.
    fn adopt_roots(
        &mut self,
        missing: &[u64],
        details: &BTreeMap<u64, DeviceDetails>,
        found: &mut BTreeMap<u64, Found>,
        progress: &mut Progress<'_>,
    ) {
        self.ensure_scan(progress);
        let mut by_count: HashMap<u64, Vec<u64>> = HashMap::new();
        for (loc, _) in self.orphans(8, false) {
            let Some(entries) = self.entries(loc, 8) else {
                continue;
            };
            if self.looks_like_top(loc, &entries) {
                continue;
            }
            by_count.entry(entries.len() as u64).or_default().push(loc);
        }
        let mut wanted: HashMap<u64, Vec<u64>> = HashMap::new();
        for &id in missing {
            if let Some(d) = details.get(&id) {
                wanted.entry(d.mapped_blocks).or_default().push(id);
            }
        }
        for (count, ids) in wanted {
            let Some(locs) = by_count.get(&count) else {
                continue;
            };
            if ids.len() != 1 || locs.len() != 1 {
                continue;
            }
            let mut f = Found::default();
            let walked = self.walker.walk(locs[0], 8, &mut |k, v| {
                f.mappings.insert(k, BlockTime::decode(read_u64(v, 0)));
            });
            f.gaps = walked.gaps;
            self.nr_adopted += f.mappings.len() as u64;
            found.insert(ids[0], f);
        }
    }

    /// Fills the gaps of the devices' mapping trees with orphaned subtrees that fit exactly
    /// one gap (see the module docs for when an orphan is trusted).
    fn adopt_subtrees(&mut self, found: &mut BTreeMap<u64, Found>, progress: &mut Progress<'_>) {
        self.ensure_scan(progress);
        // Each device's gaps by their low key, with their index. A device's gaps never
        // overlap (each is a child's key range in a node whose keys increase), so the one
        // that can hold a key range is the last to start at or before it.
        let gaps: BTreeMap<u64, BTreeMap<u64, (usize, Gap)>> = found
            .iter()
            .map(|(&id, f)| {
                let by_low = f.gaps.iter().enumerate().map(|(i, &g)| (g.low, (i, g)));
                (id, by_low.collect())
            })
            .collect();
        let mut fits: BTreeMap<(u64, usize), Vec<Fit>> = BTreeMap::new();
        for (loc, sub) in self.orphans(8, false) {
            let Some((lo, hi)) = sub.keys else { continue };
            let homes: Vec<(u64, usize, Gap)> = gaps
                .iter()
                .filter_map(|(&id, by_low)| {
                    let (_, &(i, g)) = by_low.range(..=lo).next_back()?;
                    g.high.is_none_or(|h| hi < h).then_some((id, i, g))
                })
                .collect();
            // An orphan fits one gap, or several left by one node that devices shared.
            let Some(first) = homes.first() else { continue };
            let one_node = homes
                .iter()
                .all(|(_, _, g)| g.block == first.2.block && g.low == first.2.low);
            if !one_node {
                continue;
            }
            for &(id, i, _) in &homes {
                fits.entry((id, i))
                    .or_default()
                    .push((loc, (lo, hi), self.liveness.live(loc)));
            }
        }
        let accounted = self.unexplained() == Some(0);
        // What each gap becomes once its adopted subtrees are taken out of it.
        let mut remaining: BTreeMap<(u64, usize), Vec<Gap>> = BTreeMap::new();
        for ((id, i), candidates) in fits {
            let overlapping = overlapping(&candidates);
            let mut adopted: Vec<u64> = Vec::new();
            for (j, &(loc, _, live)) in candidates.iter().enumerate() {
                if overlapping[j] {
                    continue;
                }
                // A top-level mapping tree (a metadata snapshot's, an old copy) has 8-byte
                // values too; it is never a device's mappings.
                let Some(entries) = self.entries(loc, 8) else {
                    continue;
                };
                if self.looks_like_top(loc, &entries) {
                    continue;
                }
                if live.is_none() {
                    // Without the old space map, also refuse what maps one data block
                    // twice (no device does).
                    let blocks: HashSet<u64> = entries
                        .iter()
                        .map(|&(_, v)| BlockTime::decode(v).block)
                        .collect();
                    if blocks.len() != entries.len() {
                        continue;
                    }
                }
                adopted.push(loc);
            }
            let f = found.get_mut(&id).expect("gaps come from found devices");
            let gap = f.gaps[i];
            let mut covered: Vec<(u64, u64)> = Vec::new();
            for loc in adopted {
                let mut mappings = Vec::new();
                let walked = self.walker.walk(loc, 8, &mut |k, v| {
                    mappings.push((k, BlockTime::decode(read_u64(v, 0))));
                });
                if !walked.gaps.is_empty() {
                    continue;
                }
                if let (Some(&(lo, _)), Some(&(hi, _))) = (mappings.first(), mappings.last()) {
                    covered.push((lo, hi));
                }
                self.nr_adopted += mappings.len() as u64;
                f.mappings.extend(mappings);
            }
            // A gap that took in orphans was left by an internal node. When every block the
            // old space map counted is accounted for, those orphans were all its children
            // and nothing more is lost; otherwise what they do not cover stays lost.
            if accounted && !covered.is_empty() {
                remaining.insert((id, i), Vec::new());
                continue;
            }
            covered.sort_unstable();
            let mut rest = Vec::new();
            let mut from = Some(gap.low);
            for (lo, hi) in covered {
                if let Some(start) = from.filter(|&start| lo > start) {
                    rest.push(Gap {
                        low: start,
                        high: Some(lo),
                        block: gap.block,
                    });
                }
                from = hi.checked_add(1);
            }
            if let Some(start) = from.filter(|&start| gap.high.is_none_or(|h| start < h)) {
                rest.push(Gap {
                    low: start,
                    high: gap.high,
                    block: gap.block,
                });
            }
            remaining.insert((id, i), rest);
        }
        for (&id, f) in found.iter_mut() {
            let mut gaps = Vec::new();
            for (i, g) in f.gaps.iter().enumerate() {
                match remaining.get(&(id, i)) {
                    Some(rest) => gaps.extend_from_slice(rest),
                    None => gaps.push(*g),
                }
            }
            gaps.sort_by_key(|g| g.low);
            f.gaps = gaps;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{overlapping, Fit};

    proptest! {
        /// The sweep agrees with comparing every pair.
        #[test]
        fn overlapping_matches_every_pair(ranges in prop::collection::vec((0u64..60, 0u64..8), 0..40)) {
            let fits: Vec<Fit> = ranges
                .iter()
                .enumerate()
                .map(|(j, &(lo, len))| (j as u64, (lo, lo + len), None))
                .collect();
            let by_pairs: Vec<bool> = fits
                .iter()
                .enumerate()
                .map(|(j, &(_, (lo, hi), _))| {
                    fits.iter()
                        .enumerate()
                        .any(|(k, &(_, (l2, h2), _))| k != j && lo <= h2 && l2 <= hi)
                })
                .collect();
            prop_assert_eq!(overlapping(&fits), by_pairs);
        }
    }
}
