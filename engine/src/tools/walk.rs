//! The tools' one reader of the device and mapping trees: reads the superblock (or a held
//! metadata snapshot copy), the device-details tree, the top-level mapping tree and each
//! device's mapping tree straight from the device, judging every node it enters.
//!
//! It does not read the space maps and does not judge reference counts (that is `check`'s
//! job), but it refuses to follow anything it cannot read correctly: a bad checksum or
//! location, a node breaking the header rules, keys out of order or outside their parent's
//! range, uneven leaf depth, a pointer past the device or back into the tree being walked, a
//! node in two kinds of tree. Every walk is bounded by the device's size.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::block::{self, read_u64, BlockKind};
use crate::error::{Damage, DeviceRole, Error};
use crate::io::BlockDevice;
use crate::pdata::btree::node::Node;
use crate::pdata::btree::MAX_DEPTH;
use crate::thin::metadata::superblock::MAGIC;
use crate::thin::metadata::{DeviceDetails, Superblock};

use super::raw;

/// Which superblock a tool reads the trees of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MetadataRoot {
    /// The live superblock (block 0).
    #[default]
    Live,
    /// The held metadata snapshot the live superblock points at (`-m`).
    HeldSnap,
    /// The held metadata snapshot, which must be at this block (`-mBLOCK`): a different
    /// block than the live superblock's `held_root` is refused.
    HeldSnapAt(u64),
}

/// The trees the tools read. Mapping trees may share nodes (snapshots), but no node may be in
/// two kinds of tree.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum TreeKind {
    Details,
    Top,
    Mapping,
}

impl TreeKind {
    fn leaf_value_size(self) -> u32 {
        match self {
            TreeKind::Details => 24,
            TreeKind::Top | TreeKind::Mapping => 8,
        }
    }
}

/// Reads and judges metadata for the tools.
pub(super) struct Reader<'a> {
    dev: &'a dyn BlockDevice,
    /// First block past the device.
    end: u64,
    /// The kind of tree each node entered belongs to.
    trees: HashMap<u64, TreeKind>,
}

/// Where a walk is: the key range its parent allows and how deep it is.
#[derive(Clone, Copy)]
struct Bounds {
    low: u64,
    /// Exclusive; `None` for the last child of the right-most path.
    high: Option<u64>,
    depth: usize,
}

/// Receives `(leaf, key, value)` for each entry of a tree walk.
pub(super) type Visit<'f, E> = dyn FnMut(u64, u64, &[u8]) -> Result<(), E> + 'f;

/// State of one tree walk.
struct Walk<'f, 's, E> {
    kind: TreeKind,
    /// Nodes already entered: a tree never reaches a node twice, and this keeps a damaged
    /// tree that does (a cycle, a shared child) from looping or blowing up.
    visited: HashSet<u64>,
    /// Nodes entered by earlier walks that this walk skips silently (with their subtrees):
    /// `thin_rmap` reports each shared subtree once, under the first device that reaches it.
    seen: Option<&'s mut HashSet<u64>>,
    leaf_depth: Option<usize>,
    f: &'f mut Visit<'f, E>,
}

impl<'a> Reader<'a> {
    pub(super) fn new(dev: &'a dyn BlockDevice) -> Reader<'a> {
        Reader {
            dev,
            end: raw::device_blocks(dev),
            trees: HashMap::new(),
        }
    }

    fn read(&self, from: u64, loc: u64) -> Result<Box<crate::block::Block>, Error> {
        raw::check_pointer(loc, self.end).map_err(|d| Error::corrupt(from, d))?;
        raw::read_block(self.dev, loc).map_err(|source| Error::Io {
            role: DeviceRole::Metadata,
            device: self.dev.describe(),
            offset: raw::offset(loc).unwrap_or(u64::MAX),
            source,
        })
    }

    /// The superblock to read from, and its location.
    ///
    /// * `Err(NoMetadataSnap)`: a held snapshot was asked for and none is held;
    /// * `Err(InvalidArgument)`: [`MetadataRoot::HeldSnapAt`] names another block than the
    ///   held one.
    pub(super) fn chosen_superblock(&self, root: MetadataRoot) -> Result<(Superblock, u64), Error> {
        let live = self.superblock(0, 0)?;
        let at = match root {
            MetadataRoot::Live => return Ok((live, 0)),
            MetadataRoot::HeldSnap => live.held_root,
            MetadataRoot::HeldSnapAt(block) => {
                if live.held_root != 0 && block != live.held_root {
                    return Err(Error::InvalidArgument(format!(
                        "metadata snapshot block {block} is not the held one ({})",
                        live.held_root
                    )));
                }
                live.held_root
            }
        };
        if at == 0 {
            return Err(Error::NoMetadataSnap);
        }
        Ok((self.superblock(0, at)?, at))
    }

    fn superblock(&self, from: u64, loc: u64) -> Result<Superblock, Error> {
        let b = if loc == 0 {
            if self.end == 0 {
                return Err(Error::corrupt(0, Damage::PointerPastEnd(0)));
            }
            raw::read_block(self.dev, 0).map_err(|source| Error::Io {
                role: DeviceRole::Metadata,
                device: self.dev.describe(),
                offset: 0,
                source,
            })?
        } else {
            self.read(from, loc)?
        };
        block::verify(&b, loc, BlockKind::Superblock).map_err(|d| Error::corrupt(loc, d))?;
        let magic = read_u64(&b[..], 32);
        if magic != MAGIC {
            return Err(Error::corrupt(loc, Damage::BadMagic(magic)));
        }
        Ok(Superblock::decode(&b))
    }

    /// The device-details tree of `sb` (at `sb_loc`), in id order.
    pub(super) fn details(
        &mut self,
        sb_loc: u64,
        sb: &Superblock,
    ) -> Result<Vec<(u64, DeviceDetails)>, Error> {
        let mut details = Vec::new();
        self.walk(
            sb_loc,
            sb.device_details_root,
            TreeKind::Details,
            None,
            &mut |_, dev_id, v| {
                details.push((dev_id, DeviceDetails::decode(v)));
                Ok::<(), Error>(())
            },
        )?;
        Ok(details)
    }

    /// The top-level mapping tree of `sb` (at `sb_loc`): each device's `(leaf, root)`, the
    /// leaf being the top-level node that points at the device's mapping tree.
    pub(super) fn mapping_roots(
        &mut self,
        sb_loc: u64,
        sb: &Superblock,
    ) -> Result<BTreeMap<u64, (u64, u64)>, Error> {
        let mut roots = BTreeMap::new();
        self.walk(
            sb_loc,
            sb.data_mapping_root,
            TreeKind::Top,
            None,
            &mut |leaf, dev_id, v| {
                roots.insert(dev_id, (leaf, read_u64(v, 0)));
                Ok::<(), Error>(())
            },
        )?;
        Ok(roots)
    }

    /// Calls `f(leaf, key, value)` for every entry of the tree at `root` (pointed at by block
    /// `from`) in key order. With `seen`, nodes in it are skipped with their subtrees, and
    /// every node entered is added to it.
    pub(super) fn walk<E: From<Error>>(
        &mut self,
        from: u64,
        root: u64,
        kind: TreeKind,
        seen: Option<&mut HashSet<u64>>,
        f: &mut Visit<'_, E>,
    ) -> Result<(), E> {
        let mut w = Walk {
            kind,
            visited: HashSet::new(),
            seen,
            leaf_depth: None,
            f,
        };
        self.walk_at(
            &mut w,
            from,
            root,
            Bounds {
                low: 0,
                high: None,
                depth: 0,
            },
        )
    }

    fn walk_at<E: From<Error>>(
        &mut self,
        w: &mut Walk<'_, '_, E>,
        from: u64,
        loc: u64,
        at: Bounds,
    ) -> Result<(), E> {
        if at.depth > MAX_DEPTH {
            return Err(Error::corrupt(from, Damage::TooDeep).into());
        }
        if let Some(seen) = w.seen.as_deref_mut() {
            if !seen.insert(loc) {
                return Ok(());
            }
        }
        if !w.visited.insert(loc) || *self.trees.entry(loc).or_insert(w.kind) != w.kind {
            return Err(Error::corrupt(from, Damage::UnexpectedSharing).into());
        }
        let b = self.read(from, loc)?;
        raw::validate_node(&b, loc, w.kind.leaf_value_size())
            .map_err(|d| Error::corrupt(loc, d))?;
        let n = Node::new(&b);
        let nr = n.nr_entries();
        for i in 0..nr {
            let key = n.key(i);
            if key < at.low || at.high.is_some_and(|h| key >= h) {
                let damage = Damage::KeyOutsideParentRange {
                    key,
                    low: at.low,
                    high: at.high.unwrap_or(u64::MAX),
                };
                return Err(Error::corrupt(loc, damage).into());
            }
        }
        if n.is_leaf() {
            if *w.leaf_depth.get_or_insert(at.depth) != at.depth {
                return Err(Error::corrupt(loc, Damage::UnevenDepth).into());
            }
            for i in 0..nr {
                (w.f)(loc, n.key(i), n.value(i))?;
            }
            return Ok(());
        }
        for i in 0..nr {
            let high = if i + 1 < nr {
                Some(n.key(i + 1))
            } else {
                at.high
            };
            let child = Bounds {
                low: n.key(i),
                high,
                depth: at.depth + 1,
            };
            self.walk_at(w, loc, n.value_u64(i), child)?;
        }
        Ok(())
    }
}

/// The error for a device that the details tree lists but the mapping tree lacks.
pub(super) fn missing_mapping(sb: &Superblock, dev_id: u64) -> Error {
    Error::corrupt(
        sb.data_mapping_root,
        Damage::Other(format!(
            "device {dev_id} is in the details tree but not in the mapping tree"
        )),
    )
}
