//! `check`: validates a pool's metadata the way `thin_check` does, and more.
//!
//! Everything reachable from the superblock is read straight from the device (never through
//! the transaction manager) and judged: checksums with the salt of each block's type and the
//! block's own location; the node rules (header, key order, separators, minimum fill of
//! non-root nodes, uniform leaf depth, value sizes); pointers (never to block 0, never past
//! the metadata space map or the device); the device-details and two-level mapping trees
//! (every device in both, `mapped_blocks` exact, data blocks inside the data space map); the
//! held metadata snapshot; both space maps (bitmaps, index block or index tree, ref-count
//! trees). Reference counts are rederived with the sharing-aware walk of the format's
//! section 5.1 (a node counts one per distinct referrer, and only its first visit walks on)
//! and compared with the on-disk space maps, both metadata and data (thin_check 0.9.0 skips
//! the data counts).
//!
//! The checker never stops at the first damage and never panics: every block is entered at
//! most once (which also breaks cycles), trees are at most `MAX_DEPTH` deep, nothing is
//! allocated in proportion to a number read from disk, and findings are capped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use crate::block::{self, read_u32, read_u64, Block, BlockKind};
use crate::error::Damage;
use crate::io::BlockDevice;
use crate::pdata::btree::node::{min_entries, Node};
use crate::pdata::btree::{Value, MAX_DEPTH};
use crate::pdata::space_map::disk::{
    decode_bitmap, IndexEntry, SmRoot, MAX_METADATA_BITMAPS, MAX_METADATA_BLOCKS,
};
use crate::pdata::space_map::{SpaceMap, ENTRIES_PER_BITMAP};
use crate::thin::metadata::superblock::MAGIC;
use crate::thin::metadata::{BlockTime, DeviceDetails, Superblock};
use crate::units::{DataBlockSize, MAX_DATA_BLOCKS, MAX_TIME};

use super::raw;

/// What to check; the fields mirror `thin_check`'s options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// `--skip-mappings`: walk the top level of the mapping tree but not the devices'
    /// mapping trees. Reference counts are then unknown, so they are not compared (the space
    /// maps' own structure still is).
    pub skip_mappings: bool,
    /// `-m`: check the trees of the held metadata snapshot instead of the live ones. As with
    /// `thin_check -m`, the space maps are not checked.
    pub use_metadata_snap: bool,
}

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Worth knowing, harmless to the kernel and the tools: allocator hints that are off
    /// (`thin_restore` 0.9.0 writes some), NEEDS_CHECK, an unknown version.
    Warning,
    /// The metadata is damaged: the kernel could refuse it or corrupt data through it.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Whether the pool is damaged (error) or merely odd (warning).
    pub severity: Severity,
    /// The metadata block the problem is in: for a bad pointer the block holding it; for a
    /// wrong metadata reference count the block whose count is wrong; for a wrong data
    /// reference count the data bitmap holding it. `None` when no block is to blame.
    pub block: Option<u64>,
    /// Which structure, and any detail the damage itself does not say.
    pub what: String,
    /// What is wrong, in the engine's damage vocabulary.
    pub damage: Damage,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.severity)?;
        if let Some(b) = self.block {
            write!(f, "block {b}: ")?;
        }
        write!(f, "{}: {}", self.what, self.damage)
    }
}

/// The result of a check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The checked superblock's transaction id (the held copy's with `use_metadata_snap`);
    /// `None` when it could not be read. `thin_check` prints it as `TRANSACTION_ID=`.
    pub transaction_id: Option<u64>,
    /// Whether the superblock's NEEDS_CHECK flag is set (also a warning finding).
    pub needs_check: bool,
    /// Blocks the metadata space map manages; `None` when the superblock could not be read.
    /// `thin_check` 0.9.0 prints this minus one as `METADATA_FREE_BLOCKS=` (an artefact of
    /// its implementation, not the free count).
    pub metadata_nr_blocks: Option<u64>,
    /// Free metadata blocks according to the metadata bitmaps (not the root's
    /// `nr_allocated` hint); `None` when the space map was not checked or not fully readable.
    pub metadata_free_blocks: Option<u64>,
    /// Findings in the order they were found, at most `MAX_FINDINGS` of them.
    pub findings: Vec<Finding>,
    /// Errors found after the findings list was full.
    pub suppressed_errors: u64,
    /// Warnings found after the findings list was full.
    pub suppressed_warnings: u64,
}

/// Findings kept in a report; past this, damage is only counted (one wrong bitmap can
/// otherwise yield 16320 findings, and a damaged superblock many bitmaps' worth).
pub const MAX_FINDINGS: usize = 10_000;

impl Report {
    /// No errors (warnings allowed).
    pub fn is_clean(&self) -> bool {
        self.nr_errors() == 0
    }

    /// Errors found, including those past the findings cap.
    pub fn nr_errors(&self) -> u64 {
        let listed = self
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count();
        listed as u64 + self.suppressed_errors
    }

    /// The error findings.
    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
    }

    /// The warning findings.
    pub fn warnings(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Warning)
    }

    fn add(&mut self, severity: Severity, block: Option<u64>, what: String, damage: Damage) {
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(Finding {
                severity,
                block,
                what,
                damage,
            });
        } else if severity == Severity::Error {
            self.suppressed_errors += 1;
        } else {
            self.suppressed_warnings += 1;
        }
    }

    fn error(&mut self, block: Option<u64>, what: impl fmt::Display, damage: Damage) {
        self.add(Severity::Error, block, what.to_string(), damage);
    }

    fn warn(&mut self, block: Option<u64>, what: impl fmt::Display, damage: Damage) {
        self.add(Severity::Warning, block, what.to_string(), damage);
    }
}

/// Checks the metadata on `dev`. Never fails and never panics: every problem, including an
/// unreadable device, is a finding in the report.
pub fn check(dev: &dyn BlockDevice, opts: &CheckOptions) -> Report {
    check_with_progress(dev, opts, &mut |_, _| {})
}

/// [`check`], telling `progress` now and then how many metadata blocks it has visited and
/// how many the metadata space map says are in use (0 until the superblock is read).
pub fn check_with_progress(
    dev: &dyn BlockDevice,
    opts: &CheckOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Report {
    let mut c = Checker {
        progress,
        dev,
        opts: *opts,
        meta_end: 0,
        data_end: 0,
        meta_refs: Vec::new(),
        data_refs: BTreeMap::new(),
        seen: HashMap::new(),
        meta_sm: DiskSm::default(),
        data_sm: DiskSm::default(),
        time: 0,
        hidden: false,
        report: Report::default(),
    };
    c.run();
    let visited = c.seen.len() as u64;
    (c.progress)(visited, visited);
    c.report
}

/// The trees of dm-thin metadata; a node belongs to exactly one kind (sharing between
/// devices, or between the live trees and the metadata snapshot, stays within a kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TreeKind {
    Details,
    Top,
    Mapping,
    DataIndex,
    MetadataRefCount,
    DataRefCount,
}

impl TreeKind {
    /// Value size of the kind's leaves (format section 4.2).
    fn leaf_value_size(self) -> u32 {
        match self {
            TreeKind::Details => 24,
            TreeKind::Top | TreeKind::Mapping => 8,
            TreeKind::DataIndex => 16,
            TreeKind::MetadataRefCount | TreeKind::DataRefCount => 4,
        }
    }

    fn name(self) -> &'static str {
        match self {
            TreeKind::Details => "device details tree",
            TreeKind::Top => "mapping tree (top level)",
            TreeKind::Mapping => "mapping tree",
            TreeKind::DataIndex => "data space map index tree",
            TreeKind::MetadataRefCount => "metadata space map ref-count tree",
            TreeKind::DataRefCount => "data space map ref-count tree",
        }
    }
}

/// A tree being walked, for messages.
#[derive(Clone, Copy)]
struct Tree {
    kind: TreeKind,
    /// The device, for a bottom-level mapping tree.
    dev: Option<u64>,
    /// Reached from the metadata snapshot.
    snap: bool,
}

impl fmt::Display for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.snap {
            f.write_str("metadata snapshot: ")?;
        }
        f.write_str(self.kind.name())?;
        match self.dev {
            Some(d) => write!(f, " of device {d}"),
            None => Ok(()),
        }
    }
}

/// What a block is used as; one block may only ever be one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Superblock,
    SnapshotSuperblock,
    MetadataIndex,
    Bitmap,
    Node(TreeKind),
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Superblock => f.write_str("the superblock"),
            Role::SnapshotSuperblock => f.write_str("the metadata snapshot superblock"),
            Role::MetadataIndex => f.write_str("the metadata space map index"),
            Role::Bitmap => f.write_str("a space map bitmap"),
            Role::Node(k) => write!(f, "a node of the {}", k.name()),
        }
    }
}

enum State {
    /// A node whose subtree is being walked: meeting it again is a cycle.
    InProgress,
    /// A node walked completely.
    Done(Summary),
    /// A node that could not be read or broke the header rules (already reported).
    Damaged,
    /// A block that is not a b-tree node.
    Accepted,
}

struct Seen {
    role: Role,
    state: State,
}

/// What a parent needs to know of a subtree, kept so that a shared subtree is judged from
/// each of its parents without being walked again.
#[derive(Clone, Default)]
struct Summary {
    /// 0 for a leaf.
    height: usize,
    first_key: Option<u64>,
    last_key: Option<u64>,
    /// Leaf entries in the subtree (a device's mapping count).
    leaf_entries: u64,
    /// Every node below was read and walked.
    complete: bool,
    /// The leaf entries themselves, for the small trees whose contents are cross-checked
    /// (details and top level); empty for the others.
    entries: Vec<Entry>,
}

#[derive(Clone, Copy)]
struct Entry {
    key: u64,
    value: Value,
    /// The leaf holding it.
    leaf: u64,
}

/// Which space map.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SmKind {
    Metadata,
    Data,
}

impl SmKind {
    fn name(self) -> &'static str {
        match self {
            SmKind::Metadata => "metadata space map",
            SmKind::Data => "data space map",
        }
    }
}

/// An on-disk space map as read.
#[derive(Default)]
struct DiskSm {
    root: SmRoot,
    /// Bitmap number → its index entry and raw counts.
    bitmaps: BTreeMap<u64, IndexedBitmap>,
    /// Ref-count tree entries: block → (count, leaf holding it).
    overflow: BTreeMap<u64, (u32, u64)>,
    /// The index and every bitmap were read.
    bitmaps_complete: bool,
    /// The whole ref-count tree was read.
    overflow_complete: bool,
}

struct IndexedBitmap {
    entry: IndexEntry,
    /// The block holding the index entry (index block or index-tree leaf).
    holder: u64,
    /// The bitmap's raw 2-bit values as a one-bitmap space map without overflow, so a
    /// value of 3 reads as 3; `None` if the bitmap could not be read.
    counts: Option<SpaceMap>,
}

impl DiskSm {
    fn raw_value(&self, b: u64) -> Option<u32> {
        let counts = self
            .bitmaps
            .get(&(b / ENTRIES_PER_BITMAP))?
            .counts
            .as_ref()?;
        counts.count(b % ENTRIES_PER_BITMAP).ok()
    }

    /// The on-disk count of block `b`, or `None` where the space map could not be read (or
    /// is inconsistent there, which is reported separately).
    fn count(&self, b: u64) -> Option<u32> {
        match self.raw_value(b)? {
            3 => self.overflow.get(&b).map(|&(count, _)| count),
            v => Some(v),
        }
    }

    fn bitmap_location(&self, b: u64) -> Option<u64> {
        self.bitmaps
            .get(&(b / ENTRIES_PER_BITMAP))
            .map(|ib| ib.entry.blocknr)
    }
}

struct Checker<'a> {
    dev: &'a dyn BlockDevice,
    progress: &'a mut dyn FnMut(u64, u64),
    opts: CheckOptions,
    /// First metadata block a pointer may not name: the metadata space map's size, or the
    /// device's if smaller.
    meta_end: u64,
    /// First data block a mapping may not name (the data space map's size).
    data_end: u64,
    /// Metadata reference counts derived from the walk, indexed by block (`meta_end` long).
    meta_refs: Vec<u32>,
    /// Data reference counts derived from the walk.
    data_refs: BTreeMap<u64, u32>,
    seen: HashMap<u64, Seen>,
    meta_sm: DiskSm,
    data_sm: DiskSm,
    /// The time of the superblock whose trees are being walked: no mapping or device can be
    /// from later (the kernel stamps them with the current time, which only grows).
    time: u32,
    /// A block that points at others could not be read or judged, so what it references
    /// went uncounted and the derived counts are only lower bounds.
    hidden: bool,
    report: Report,
}

impl Checker<'_> {
    fn run(&mut self) {
        let Some(sb) = self.superblock() else {
            return;
        };
        if self.opts.use_metadata_snap {
            self.report.transaction_id = None;
            if sb.held_root == 0 {
                let why = "no metadata snapshot is held".to_string();
                self.report.error(Some(0), "superblock", Damage::Other(why));
                return;
            }
            if let Some(held) = self.snapshot_superblock(sb.held_root) {
                self.report.transaction_id = Some(held.transaction_id);
                self.trees(&held, sb.held_root, true);
            }
            return;
        }
        self.metadata_space_map(&sb.metadata_sm_root);
        self.data_space_map(&sb.data_sm_root);
        self.trees(&sb, 0, false);
        if sb.held_root != 0 {
            match self.snapshot_superblock(sb.held_root) {
                Some(held) => self.trees(&held, sb.held_root, true),
                None => self.hidden = true,
            }
        }
        if !self.opts.skip_mappings {
            // With part of the metadata unwalked only counts below the derived ones are sure
            // to be wrong; blocks that look leaked may be referenced from the unread part.
            let exact = !self.hidden;
            if !exact {
                let why = "only under-counts were looked for, because damage hides part of \
                           the trees"
                    .to_string();
                self.report
                    .warn(None, "reference counts", Damage::Other(why));
            }
            self.compare_counts(SmKind::Metadata, exact);
            self.compare_counts(SmKind::Data, exact);
        }
    }

    // ---- blocks ------------------------------------------------------------------------

    /// Follows a pointer held by block `from`: judges it and counts the reference.
    fn reference(&mut self, from: u64, loc: u64, what: &dyn fmt::Display) -> bool {
        if let Err(d) = raw::check_pointer(loc, self.meta_end) {
            self.report.error(Some(from), what, d);
            return false;
        }
        if let Some(c) = self.meta_refs.get_mut(loc as usize) {
            *c = c.saturating_add(1);
        }
        true
    }

    /// Records that `loc` is used as `role`, which is only allowed once for blocks that are
    /// not b-tree nodes.
    fn claim(&mut self, loc: u64, role: Role, what: &dyn fmt::Display) -> bool {
        if let Some(seen) = self.seen.get(&loc) {
            let also = format!("{what} (the block is also {})", seen.role);
            self.report
                .error(Some(loc), also, Damage::UnexpectedSharing);
            return false;
        }
        self.seen.insert(
            loc,
            Seen {
                role,
                state: State::Accepted,
            },
        );
        true
    }

    fn read(&mut self, loc: u64, what: &dyn fmt::Display) -> Option<Box<Block>> {
        match raw::read_block(self.dev, loc) {
            Ok(b) => Some(b),
            Err(e) => {
                self.report
                    .error(Some(loc), what, Damage::Other(format!("read failed: {e}")));
                None
            }
        }
    }

    /// Reads a checksummed block that is not a node and verifies checksum and location.
    fn read_verified(
        &mut self,
        loc: u64,
        kind: BlockKind,
        what: &dyn fmt::Display,
    ) -> Option<Box<Block>> {
        let b = self.read(loc, what)?;
        match block::verify(&b, loc, kind) {
            Ok(()) => Some(b),
            Err(d) => {
                self.report.error(Some(loc), what, d);
                None
            }
        }
    }

    // ---- superblocks -------------------------------------------------------------------

    fn superblock(&mut self) -> Option<Superblock> {
        let what = "superblock";
        let dev_blocks = raw::device_blocks(self.dev);
        if dev_blocks == 0 {
            let why = "the metadata device is smaller than one block".to_string();
            self.report.error(Some(0), what, Damage::Other(why));
            return None;
        }
        let b = self.read(0, &what)?;
        match block::verify(&b, 0, BlockKind::Superblock) {
            Ok(()) => {}
            // The contents are intact (the checksum matched): keep checking.
            Err(d @ Damage::WrongLocation { .. }) => self.report.error(Some(0), what, d),
            Err(d) => {
                self.report.error(Some(0), what, d);
                return None;
            }
        }
        let magic = read_u64(&b[..], 32);
        if magic != MAGIC {
            self.report.error(Some(0), what, Damage::BadMagic(magic));
            return None;
        }
        let sb = Superblock::decode(&b);
        self.report.transaction_id = Some(sb.transaction_id);
        self.report.needs_check = sb.needs_check();
        let bad = |s: String| Damage::BadSuperblock(s);
        if sb.needs_check() {
            let why = "NEEDS_CHECK is set: the kernel met a metadata error and keeps the pool \
                       read-only until the flag is cleared";
            self.report
                .warn(Some(0), what, Damage::Other(why.to_string()));
        }
        if sb.incompat_flags != 0 || sb.compat_ro_flags != 0 {
            let damage = Damage::UnsupportedFeatures {
                incompat: sb.incompat_flags,
                compat_ro: sb.compat_ro_flags,
            };
            self.report.error(Some(0), what, damage);
        }
        if !(1..=2).contains(&sb.version) {
            self.report.warn(
                Some(0),
                what,
                bad(format!("unknown version {}", sb.version)),
            );
        }
        let block_sectors = read_u32(&b[..], 340);
        if block_sectors != 8 {
            let why = format!("metadata block size of {block_sectors} sectors (must be 8)");
            self.report.error(Some(0), what, bad(why));
        }
        if DataBlockSize::from_sectors(sb.data_block_size).is_none() {
            let why = format!(
                "data block size of {} sectors (the kernel takes multiples of 128 from 128 \
                 to 2097152)",
                sb.data_block_size
            );
            self.report.error(Some(0), what, bad(why));
        }
        if sb.time > MAX_TIME {
            let why = format!("time {} does not fit the 24 bits of a mapping", sb.time);
            self.report.error(Some(0), what, bad(why));
        }

        let meta = sb.metadata_sm_root.nr_blocks;
        self.meta_end = if meta == 0 || meta > MAX_METADATA_BLOCKS {
            let why = format!("metadata space map of {meta} blocks");
            self.report.error(Some(0), what, bad(why));
            dev_blocks.min(MAX_METADATA_BLOCKS)
        } else if meta > dev_blocks {
            let why = format!("metadata space map of {meta} blocks on a device of {dev_blocks}");
            self.report.error(Some(0), what, bad(why));
            dev_blocks
        } else {
            meta
        };
        self.report.metadata_nr_blocks = Some(meta);
        let data = sb.data_sm_root.nr_blocks;
        if data > MAX_DATA_BLOCKS {
            let why = format!("data space map of {data} blocks, past 40-bit block numbers");
            self.report.error(Some(0), what, bad(why));
        }
        self.data_end = data.min(MAX_DATA_BLOCKS);
        // Bounded by MAX_METADATA_BLOCKS (16 MiB of counts at most).
        self.meta_refs = vec![0; self.meta_end as usize];
        if let Some(c) = self.meta_refs.first_mut() {
            *c = 1;
        }
        self.seen.insert(
            0,
            Seen {
                role: Role::Superblock,
                state: State::Accepted,
            },
        );
        Some(sb)
    }

    /// Reads the held superblock copy at `loc` (format section 9).
    fn snapshot_superblock(&mut self, loc: u64) -> Option<Superblock> {
        let what = "metadata snapshot superblock";
        if !self.reference(0, loc, &what) || !self.claim(loc, Role::SnapshotSuperblock, &what) {
            return None;
        }
        let b = self.read_verified(loc, BlockKind::Superblock, &what)?;
        let magic = read_u64(&b[..], 32);
        if magic != MAGIC {
            self.report.error(Some(loc), what, Damage::BadMagic(magic));
            return None;
        }
        Some(Superblock::decode(&b))
    }

    // ---- device trees ------------------------------------------------------------------

    /// Walks the details and mapping trees of a superblock (the live one at 0, or the held
    /// copy at `from`) and checks that they agree.
    fn trees(&mut self, sb: &Superblock, from: u64, snap: bool) {
        self.time = sb.time;
        let details_tree = Tree {
            kind: TreeKind::Details,
            dev: None,
            snap,
        };
        let top_tree = Tree {
            kind: TreeKind::Top,
            dev: None,
            snap,
        };
        let details = self.visit_root(from, sb.device_details_root, details_tree);
        let top = self.visit_root(from, sb.data_mapping_root, top_tree);
        let (Some(details), Some(top)) = (details, top) else {
            return;
        };
        // Missing entries would be reported as missing devices.
        if !details.complete || !top.complete {
            return;
        }
        let roots: BTreeMap<u64, Entry> = top.entries.iter().map(|e| (e.key, *e)).collect();
        let mut in_details = HashSet::new();
        for e in &details.entries {
            in_details.insert(e.key);
            let dev = e.key;
            let Some(top_entry) = roots.get(&dev) else {
                let why =
                    format!("device {dev} is in the details tree but not in the mapping tree");
                self.report
                    .error(Some(e.leaf), details_tree, Damage::Other(why));
                continue;
            };
            if self.opts.skip_mappings {
                continue;
            }
            let Some(nr_mappings) = self.mapping_count(top_entry.value.as_u64()) else {
                continue;
            };
            let mapped = DeviceDetails::decode(e.value.as_bytes()).mapped_blocks;
            if mapped != nr_mappings {
                let why = format!(
                    "device {dev}: mapped_blocks is {mapped}, but its mapping tree holds \
                     {nr_mappings} mappings"
                );
                self.report
                    .error(Some(e.leaf), details_tree, Damage::Other(why));
            }
        }
        for (dev, e) in roots {
            if !in_details.contains(&dev) {
                let why =
                    format!("device {dev} is in the mapping tree but not in the details tree");
                self.report
                    .error(Some(e.leaf), top_tree, Damage::Other(why));
            }
        }
    }

    /// Mappings under a device's root, if its whole tree was walked.
    fn mapping_count(&self, root: u64) -> Option<u64> {
        match self.seen.get(&root) {
            Some(Seen {
                role: Role::Node(TreeKind::Mapping),
                state: State::Done(s),
            }) if s.complete => Some(s.leaf_entries),
            _ => None,
        }
    }

    fn visit_root(&mut self, from: u64, root: u64, tree: Tree) -> Option<Summary> {
        self.visit_node(from, root, tree, 0, true, &mut HashSet::new())
    }

    /// A block that could not be read or trusted: remembered as damaged, and whatever it
    /// pointed at is now unknown (so leaks cannot be told from hidden references).
    fn give_up_on(&mut self, loc: u64, role: Role) {
        self.seen.insert(
            loc,
            Seen {
                role,
                state: State::Damaged,
            },
        );
        self.hidden = true;
    }

    /// Visits the node at `loc`, pointed at by block `from`: counts the reference and, on
    /// the first visit, validates the node and walks its subtree. `walk` holds the nodes
    /// already reached in this tree, where a node may appear once only (trees share
    /// subtrees with other trees, never with themselves).
    ///
    /// Returns the subtree's summary, or `None` if it could not be walked (reported).
    fn visit_node(
        &mut self,
        from: u64,
        loc: u64,
        tree: Tree,
        depth: usize,
        is_root: bool,
        walk: &mut HashSet<u64>,
    ) -> Option<Summary> {
        if !self.reference(from, loc, &tree) {
            return None;
        }
        let role = Role::Node(tree.kind);
        if let Some(seen) = self.seen.get(&loc) {
            if seen.role != role {
                let also = format!("{tree} (the block is also {})", seen.role);
                self.report
                    .error(Some(loc), also, Damage::UnexpectedSharing);
                return None;
            }
            match &seen.state {
                State::InProgress => {
                    let cycle = format!("{tree}: pointer to block {loc}, its own ancestor");
                    self.report.error(Some(from), cycle, Damage::TooDeep);
                    return None;
                }
                // Shared with another tree: judged from here by its summary, not walked again.
                State::Done(s) => {
                    if walk.insert(loc) {
                        return Some(s.clone());
                    }
                    let twice = format!("{tree}: second pointer to block {loc}");
                    self.report
                        .error(Some(from), twice, Damage::UnexpectedSharing);
                    return None;
                }
                State::Damaged | State::Accepted => return None,
            }
        }
        walk.insert(loc);
        if depth > MAX_DEPTH {
            self.report.error(Some(loc), tree, Damage::TooDeep);
            self.give_up_on(loc, role);
            return None;
        }
        let checked = self.read(loc, &tree).and_then(|b| {
            match raw::validate_node(&b, loc, tree.kind.leaf_value_size()) {
                Ok(()) => Some(b),
                Err(d) => {
                    self.report.error(Some(loc), tree, d);
                    None
                }
            }
        });
        let Some(b) = checked else {
            self.give_up_on(loc, role);
            return None;
        };
        let n = Node::new(&b);
        let (nr, max) = (n.nr_entries() as u32, n.max_entries() as u32);
        if !is_root && nr < min_entries(max) {
            let damage = Damage::TooFewEntries {
                nr,
                min: min_entries(max),
            };
            self.report.error(Some(loc), tree, damage);
        }
        self.seen.insert(
            loc,
            Seen {
                role,
                state: State::InProgress,
            },
        );
        if self.seen.len().is_multiple_of(1024) {
            (self.progress)(self.seen.len() as u64, self.meta_sm.root.nr_allocated);
        }
        let summary = if n.is_internal() {
            self.internal(loc, &n, tree, depth, walk)
        } else {
            self.leaf(loc, &n, tree)
        };
        self.seen.insert(
            loc,
            Seen {
                role,
                state: State::Done(summary.clone()),
            },
        );
        Some(summary)
    }

    fn internal(
        &mut self,
        loc: u64,
        n: &Node<'_>,
        tree: Tree,
        depth: usize,
        walk: &mut HashSet<u64>,
    ) -> Summary {
        let nr = n.nr_entries();
        let mut s = Summary {
            height: 1,
            complete: nr > 0,
            ..Summary::default()
        };
        if nr == 0 {
            // Only a leaf may be empty (an empty tree is an empty leaf).
            self.report
                .error(Some(loc), tree, Damage::TooFewEntries { nr: 0, min: 1 });
            return s;
        }
        let mut child_height = None;
        for i in 0..nr {
            let (key, child) = (n.key(i), n.value_u64(i));
            let next = (i + 1 < nr).then(|| n.key(i + 1));
            let Some(c) = self.visit_node(loc, child, tree, depth + 1, false, walk) else {
                s.complete = false;
                continue;
            };
            // A separator may be below its child's first key (the kernel does not raise it
            // when that key goes) but never above it, and the child must stay below the next
            // separator.
            let high = next.unwrap_or(u64::MAX);
            let first_below = c.first_key.filter(|&k| k < key);
            let last_above = c.last_key.filter(|&k| next.is_some_and(|nx| k >= nx));
            for k in first_below.into_iter().chain(last_above) {
                let what = format!("{tree}: child {i} of block {loc}");
                let damage = Damage::KeyOutsideParentRange {
                    key: k,
                    low: key,
                    high,
                };
                self.report.error(Some(child), what, damage);
            }
            match child_height {
                None => child_height = Some(c.height),
                Some(h) if h != c.height && s.complete => {
                    self.report.error(Some(loc), tree, Damage::UnevenDepth);
                    s.complete = false;
                }
                Some(_) => {}
            }
            s.first_key = s.first_key.into_iter().chain(c.first_key).min();
            s.last_key = s.last_key.into_iter().chain(c.last_key).max();
            s.leaf_entries = s.leaf_entries.saturating_add(c.leaf_entries);
            s.complete &= c.complete;
            s.entries.extend(c.entries);
        }
        s.height = child_height.map_or(1, |h| h + 1);
        s
    }

    fn leaf(&mut self, loc: u64, n: &Node<'_>, tree: Tree) -> Summary {
        let nr = n.nr_entries();
        let mut s = Summary {
            height: 0,
            first_key: (nr > 0).then(|| n.key(0)),
            last_key: nr.checked_sub(1).map(|last| n.key(last)),
            leaf_entries: nr as u64,
            complete: true,
            entries: Vec::new(),
        };
        for i in 0..nr {
            let key = n.key(i);
            match tree.kind {
                TreeKind::Mapping => {
                    let BlockTime {
                        block: data_block,
                        time,
                    } = BlockTime::decode(n.value_u64(i));
                    let what = || format!("{tree}: virtual block {key}");
                    // A time from the future makes the kernel take a shared block for an
                    // exclusive one and overwrite it under a snapshot.
                    if time > self.time {
                        let why =
                            format!("mapping time {time} is after the pool's time {}", self.time);
                        self.report.error(Some(loc), what(), Damage::Other(why));
                    }
                    if data_block >= self.data_end {
                        self.report
                            .error(Some(loc), what(), Damage::DataBlockPastEnd(data_block));
                    } else {
                        let c = self.data_refs.entry(data_block).or_insert(0);
                        *c = c.saturating_add(1);
                    }
                }
                TreeKind::Details => {
                    let d = DeviceDetails::decode(n.value(i));
                    if d.creation_time > self.time || d.snapshotted_time > self.time {
                        let why = format!(
                            "device {key}: creation time {} or snapshot time {} is after the \
                             pool's time {}",
                            d.creation_time, d.snapshotted_time, self.time
                        );
                        self.report.error(Some(loc), tree, Damage::Other(why));
                    }
                    s.entries.push(Entry {
                        key,
                        value: Value::new(n.value(i)),
                        leaf: loc,
                    });
                }
                TreeKind::Top => {
                    s.entries.push(Entry {
                        key,
                        value: Value::new(n.value(i)),
                        leaf: loc,
                    });
                    if !self.opts.skip_mappings {
                        let dev_tree = Tree {
                            kind: TreeKind::Mapping,
                            dev: Some(key),
                            ..tree
                        };
                        self.visit_root(loc, n.value_u64(i), dev_tree);
                    }
                }
                TreeKind::DataIndex => {
                    let entry = IndexEntry::decode(n.value(i));
                    let counts = self.visit_bitmap(loc, entry.blocknr, SmKind::Data);
                    let ib = IndexedBitmap {
                        entry,
                        holder: loc,
                        counts,
                    };
                    self.data_sm.bitmaps.insert(key, ib);
                }
                TreeKind::MetadataRefCount => {
                    self.meta_sm
                        .overflow
                        .insert(key, (read_u32(n.value(i), 0), loc));
                }
                TreeKind::DataRefCount => {
                    self.data_sm
                        .overflow
                        .insert(key, (read_u32(n.value(i), 0), loc));
                }
            }
        }
        s
    }

    // ---- space maps --------------------------------------------------------------------

    fn visit_bitmap(&mut self, from: u64, loc: u64, sm: SmKind) -> Option<SpaceMap> {
        let what = format!("{} bitmap", sm.name());
        if !self.reference(from, loc, &what) || !self.claim(loc, Role::Bitmap, &what) {
            return None;
        }
        let b = self.read_verified(loc, BlockKind::Bitmap, &what)?;
        let raw = vec![decode_bitmap(&b)];
        Some(SpaceMap::from_parts(
            ENTRIES_PER_BITMAP,
            raw,
            BTreeMap::new(),
        ))
    }

    /// Reads the metadata space map: its index block, bitmaps and ref-count tree.
    fn metadata_space_map(&mut self, root: &SmRoot) {
        let sm = SmKind::Metadata;
        self.meta_sm.root = *root;
        self.meta_sm.bitmaps_complete = true;
        let what = "metadata space map index";
        let index = if self.reference(0, root.bitmap_root, &what)
            && self.claim(root.bitmap_root, Role::MetadataIndex, &what)
        {
            self.read_verified(root.bitmap_root, BlockKind::Index, &what)
        } else {
            None
        };
        match index {
            None => {
                self.meta_sm.bitmaps_complete = false;
                self.hidden = true;
            }
            Some(index) => {
                // Past 255 bitmaps the superblock was already reported.
                let n = root
                    .nr_blocks
                    .div_ceil(ENTRIES_PER_BITMAP)
                    .min(MAX_METADATA_BITMAPS as u64);
                for i in 0..MAX_METADATA_BITMAPS {
                    let bytes = &index[16 + 16 * i..32 + 16 * i];
                    if i as u64 >= n {
                        if bytes.iter().any(|&x| x != 0) {
                            let why = format!("unused index entry {i} is not zero");
                            self.report
                                .warn(Some(root.bitmap_root), what, Damage::SpaceMap(why));
                        }
                        continue;
                    }
                    let entry = IndexEntry::decode(bytes);
                    let counts = self.visit_bitmap(root.bitmap_root, entry.blocknr, sm);
                    self.meta_sm.bitmaps_complete &= counts.is_some();
                    let ib = IndexedBitmap {
                        entry,
                        holder: root.bitmap_root,
                        counts,
                    };
                    self.meta_sm.bitmaps.insert(i as u64, ib);
                }
            }
        }
        let tree = Tree {
            kind: TreeKind::MetadataRefCount,
            dev: None,
            snap: false,
        };
        let overflow = self.visit_root(0, root.ref_count_root, tree);
        self.meta_sm.overflow_complete = overflow.is_some_and(|s| s.complete);
        let allocated = consistency(&self.meta_sm, sm, &mut self.report);
        self.report.metadata_free_blocks = allocated.map(|a| root.nr_blocks.saturating_sub(a));
    }

    /// Reads the data space map: its index tree, bitmaps and ref-count tree.
    fn data_space_map(&mut self, root: &SmRoot) {
        let sm = SmKind::Data;
        self.data_sm.root = *root;
        let tree = Tree {
            kind: TreeKind::DataIndex,
            dev: None,
            snap: false,
        };
        let index = self.visit_root(0, root.bitmap_root, tree);
        // From the clamped end: a superblock claiming more than 40-bit block numbers was
        // reported already, and bitmaps numbered past them would overflow block numbers.
        let n = self.data_end.div_ceil(ENTRIES_PER_BITMAP);
        let beyond: Vec<(u64, u64)> = self
            .data_sm
            .bitmaps
            .range(n..)
            .map(|(&i, ib)| (i, ib.holder))
            .collect();
        for (i, holder) in beyond {
            let why = format!("index entry for bitmap {i}, past the {n} bitmaps of the map");
            self.report.error(Some(holder), tree, Damage::SpaceMap(why));
            self.data_sm.bitmaps.remove(&i);
        }
        let indexed = self.data_sm.bitmaps.len() as u64;
        let index_complete = index.is_some_and(|s| s.complete);
        if index_complete && indexed < n {
            let first = (0..n)
                .find(|i| !self.data_sm.bitmaps.contains_key(i))
                .unwrap_or(0);
            let why = format!(
                "the index lists {indexed} of the {n} bitmaps (the first missing is bitmap \
                 {first})"
            );
            self.report
                .error(Some(root.bitmap_root), tree, Damage::SpaceMap(why));
        }
        self.data_sm.bitmaps_complete = index_complete
            && indexed == n
            && self.data_sm.bitmaps.values().all(|ib| ib.counts.is_some());
        let tree = Tree {
            kind: TreeKind::DataRefCount,
            dev: None,
            snap: false,
        };
        let overflow = self.visit_root(0, root.ref_count_root, tree);
        self.data_sm.overflow_complete = overflow.is_some_and(|s| s.complete);
        consistency(&self.data_sm, sm, &mut self.report);
    }

    /// Compares the derived reference counts with the on-disk ones. With `exact` false the
    /// derived counts are lower bounds, so only on-disk counts below them are reported.
    fn compare_counts(&mut self, kind: SmKind, exact: bool) {
        let (sm, report) = match kind {
            SmKind::Metadata => (&self.meta_sm, &mut self.report),
            SmKind::Data => (&self.data_sm, &mut self.report),
        };
        let (meta_refs, data_refs) = (&self.meta_refs, &self.data_refs);
        let expected = |b: u64| match kind {
            SmKind::Metadata => meta_refs.get(b as usize).copied().unwrap_or(0),
            SmKind::Data => data_refs.get(&b).copied().unwrap_or(0),
        };
        let derived: Box<dyn Iterator<Item = (u64, u32)> + '_> = match kind {
            SmKind::Metadata => Box::new(
                meta_refs
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c > 0)
                    .map(|(b, &c)| (b as u64, c)),
            ),
            SmKind::Data => Box::new(data_refs.iter().map(|(&b, &c)| (b, c))),
        };
        let unit = match kind {
            SmKind::Metadata => "metadata",
            SmKind::Data => "data",
        };
        let blame = |b: u64| match kind {
            SmKind::Metadata => Some(b),
            SmKind::Data => sm.bitmap_location(b),
        };
        for (b, want) in derived {
            // Blocks past the end were reported as bad pointers or data blocks.
            if b >= sm.root.nr_blocks {
                continue;
            }
            let Some(have) = sm.count(b) else {
                continue;
            };
            if have == want || (!exact && have > want) {
                continue;
            }
            let why = if have == 0 {
                format!("{unit} block {b} is referenced {want} times but marked free")
            } else {
                format!("{unit} block {b} has reference count {have}, expected {want}")
            };
            report.error(blame(b), kind.name(), Damage::SpaceMap(why));
        }
        if !exact {
            return;
        }
        for (&i, ib) in &sm.bitmaps {
            let Some(counts) = &ib.counts else {
                continue;
            };
            for (e, value) in counts.iter_counts() {
                let b = i * ENTRIES_PER_BITMAP + e;
                if b >= sm.root.nr_blocks || expected(b) != 0 {
                    continue;
                }
                let have = sm.count(b).unwrap_or(value);
                let why = format!(
                    "{unit} block {b} is leaked: its count is {have} but nothing \
                                   references it"
                );
                report.error(blame(b), kind.name(), Damage::SpaceMap(why));
            }
        }
    }
}

/// Checks a space map against itself: bitmap entries past its end, bitmap values of 3
/// against the ref-count tree, and the allocator hints (`nr_free`, `none_free_before`,
/// `nr_allocated`), which only get warnings: they are hints, and `thin_restore` 0.9.0 gets
/// them wrong (format section 6.3). Returns the allocated blocks the bitmaps hold, if every
/// bitmap was read.
fn consistency(sm: &DiskSm, kind: SmKind, report: &mut Report) -> Option<u64> {
    let what = kind.name();
    let nr_blocks = sm.root.nr_blocks;
    let mut allocated = 0u64;
    for (&i, ib) in &sm.bitmaps {
        let Some(counts) = &ib.counts else {
            continue;
        };
        let base = i * ENTRIES_PER_BITMAP;
        let in_range = nr_blocks.saturating_sub(base).min(ENTRIES_PER_BITMAP);
        let mut used_in_range = 0u64;
        for (e, value) in counts.iter_counts() {
            let b = base + e;
            if e >= in_range {
                let why = format!("bitmap gives block {b} count {value}, past the map's end");
                report.error(Some(ib.entry.blocknr), what, Damage::SpaceMap(why));
                continue;
            }
            used_in_range += 1;
            if value == 3 && sm.overflow_complete && !sm.overflow.contains_key(&b) {
                let why = format!("block {b} has bitmap value 3 but no ref-count tree entry");
                report.error(Some(ib.entry.blocknr), what, Damage::SpaceMap(why));
            }
        }
        allocated += used_in_range;

        // The kernel counts all 16320 slots as free or not; thin_restore only those below
        // nr_blocks. Either is right.
        let bm = counts.bitmap(0);
        let nr_free = u64::from(ib.entry.nr_free);
        let (kernel_free, restore_free) = (
            ENTRIES_PER_BITMAP - u64::from(bm.used()),
            in_range - used_in_range,
        );
        if nr_free != kernel_free && nr_free != restore_free {
            let why = format!(
                "index entry of bitmap {i}: nr_free is {nr_free}, but {restore_free} of its \
                 blocks are free"
            );
            report.warn(Some(ib.holder), what, Damage::SpaceMap(why));
        }
        let first_free = u64::from(bm.first_free());
        let hint = u64::from(ib.entry.none_free_before);
        if first_free < in_range && hint > first_free {
            let why = format!(
                "index entry of bitmap {i}: none_free_before is {hint}, past free entry \
                 {first_free}"
            );
            report.warn(Some(ib.holder), what, Damage::SpaceMap(why));
        }
    }
    for (&b, &(count, leaf)) in &sm.overflow {
        if b >= nr_blocks {
            let why = format!("ref-count tree holds count {count} for block {b}, past the end");
            report.error(Some(leaf), what, Damage::SpaceMap(why));
        } else if count < 3 {
            let why = format!("ref-count tree holds count {count} for block {b} (must be 3+)");
            report.error(Some(leaf), what, Damage::SpaceMap(why));
        } else if let Some(v) = sm.raw_value(b).filter(|&v| v != 3) {
            let why = format!(
                "ref-count tree holds count {count} for block {b}, whose bitmap \
                               value is {v}, not 3"
            );
            report.error(Some(leaf), what, Damage::SpaceMap(why));
        }
    }
    if !sm.bitmaps_complete {
        return None;
    }
    if sm.root.nr_allocated != allocated {
        let why = format!(
            "nr_allocated is {}, but the bitmaps hold {allocated} allocated blocks",
            sm.root.nr_allocated
        );
        report.warn(Some(0), what, Damage::SpaceMap(why));
    }
    Some(allocated)
}
