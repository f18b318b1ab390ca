//! `dump`: prints a pool's devices and mappings exactly as `thin_dump` 0.9.0 does, in its
//! XML or `human_readable` format.
//!
//! The dump reads the superblock (or the held metadata snapshot copy), the device-details
//! tree and the mapping trees straight from the device. It does not read the space maps and
//! does not judge reference counts (that is `check`'s job), but it refuses to follow
//! anything it cannot read correctly: a bad checksum or location, a node breaking the
//! header rules, keys out of order or outside their parent's range, uneven leaf depth, a
//! pointer past the device or back into the tree being walked.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, BufWriter, Write};

use crate::block::{self, read_u64, BlockKind};
use crate::error::{Damage, DeviceRole, Error};
use crate::io::BlockDevice;
use crate::pdata::btree::node::Node;
use crate::pdata::btree::MAX_DEPTH;
use crate::thin::metadata::superblock::MAGIC;
use crate::thin::metadata::{BlockTime, DeviceDetails, Superblock};

use super::raw;

/// The output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DumpFormat {
    /// `thin_dump`'s default XML, which `thin_restore` reads back.
    #[default]
    Xml,
    /// `thin_dump -f human_readable`.
    HumanReadable,
}

/// What to dump and how; the fields mirror `thin_dump`'s options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpOptions {
    /// XML (the default) or `-f human_readable`.
    pub format: DumpFormat,
    /// `-m`: dump the trees of the held metadata snapshot instead of the live ones. The
    /// snapshot copy's space-map roots are zero, so `nr_data_blocks` is printed as 0.
    pub use_metadata_snap: bool,
    /// `--skip-mappings`: print devices without their mappings.
    pub skip_mappings: bool,
    /// `--dev-id`: print only this device (nothing but the superblock if it does not exist).
    pub dev_id: Option<u64>,
}

/// Why a dump failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The metadata could not be read or is damaged; also [`Error::NoMetadataSnap`] for
    /// `use_metadata_snap` without a held snapshot.
    #[error(transparent)]
    Metadata(#[from] Error),
    /// Writing to the output failed (a broken pipe, a full disk).
    #[error("failed to write the dump")]
    Output(#[source] io::Error),
}

/// The superblock and the device-details tree (thin id and details, in id order), read
/// straight from `dev` like [`dump`]: from the held metadata snapshot with
/// `use_metadata_snap`, else from the live superblock.
///
/// This is how a pool the kernel owns is read: reserve a metadata snapshot (a pool message),
/// read through its root, release it (the kernel's `thin-provisioning.rst` endorses reading
/// the metadata this way while the pool is live).
///
/// * `Err(NoMetadataSnap)`: `use_metadata_snap` without a held snapshot.
/// * `Err(Corrupt | Io)`: as for [`dump`].
pub fn device_details(
    dev: &dyn BlockDevice,
    use_metadata_snap: bool,
) -> Result<(Superblock, Vec<(u64, DeviceDetails)>), Error> {
    let mut reader = Reader::new(dev);
    let (sb, sb_loc) = reader.chosen_superblock(use_metadata_snap)?;
    match reader.details(sb_loc, &sb) {
        Ok(details) => Ok((sb, details)),
        Err(DumpError::Metadata(e)) => Err(e),
        // Reading details writes nothing.
        Err(DumpError::Output(e)) => unreachable!("no output while reading details: {e}"),
    }
}

/// Dumps the metadata on `dev` to `out`.
///
/// `Ok` means the whole dump was written; the bytes equal what `thin_dump` 0.9.0 prints
/// with the same options. On `Err` a partial dump may have been written. Damaged metadata
/// is an `Err`, never a panic, and every tree walk is bounded by the device's size.
pub fn dump(
    dev: &dyn BlockDevice,
    opts: &DumpOptions,
    out: &mut dyn Write,
) -> Result<(), DumpError> {
    let mut reader = Reader::new(dev);
    let (sb, sb_loc) = reader.chosen_superblock(opts.use_metadata_snap)?;
    // The held copy's space-map roots are zero, so this prints 0 for `-m`, as thin_dump does.
    let nr_data_blocks = sb.data_sm_root.nr_blocks;

    let details = reader.details(sb_loc, &sb)?;
    let mut roots = BTreeMap::new();
    if !opts.skip_mappings {
        reader.walk(
            sb_loc,
            sb.data_mapping_root,
            TreeKind::Top,
            &mut |leaf, dev_id, v| {
                roots.insert(dev_id, (leaf, read_u64(v, 0)));
                Ok(())
            },
        )?;
    }

    let mut em = Emitter {
        out: BufWriter::new(out),
        format: opts.format,
        run: None,
    };
    em.begin(&sb, nr_data_blocks)?;
    for (dev_id, d) in details {
        if opts.dev_id.is_some_and(|want| want != dev_id) {
            continue;
        }
        em.begin_device(dev_id, &d)?;
        if !opts.skip_mappings {
            let Some(&(leaf, root)) = roots.get(&dev_id) else {
                return Err(Error::corrupt(
                    sb.data_mapping_root,
                    Damage::Other(format!(
                        "device {dev_id} is in the details tree but not in the mapping tree"
                    )),
                )
                .into());
            };
            let mapping = TreeKind::Mapping;
            reader.walk(leaf, root, mapping, &mut |_, vblock, v| {
                em.mapping(vblock, read_u64(v, 0))
            })?;
        }
        em.end_device()?;
    }
    em.end()
}

/// The trees the dump reads. Mapping trees may share nodes (snapshots), but no node may
/// be in two kinds of tree.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TreeKind {
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

/// Reads and judges metadata for the dump.
struct Reader<'a> {
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
type Visit<'f> = dyn FnMut(u64, u64, &[u8]) -> Result<(), DumpError> + 'f;

/// State of one tree walk.
struct Walk<'f> {
    kind: TreeKind,
    /// Nodes already entered: a tree never reaches a node twice, and this keeps a damaged
    /// tree that does (a cycle, a shared child) from looping or blowing up.
    visited: HashSet<u64>,
    leaf_depth: Option<usize>,
    f: &'f mut Visit<'f>,
}

impl<'a> Reader<'a> {
    fn read(&self, from: u64, loc: u64) -> Result<Box<crate::block::Block>, Error> {
        raw::check_pointer(loc, self.end).map_err(|d| Error::corrupt(from, d))?;
        raw::read_block(self.dev, loc).map_err(|source| Error::Io {
            role: DeviceRole::Metadata,
            device: self.dev.describe(),
            offset: raw::offset(loc).unwrap_or(u64::MAX),
            source,
        })
    }

    /// Reads the superblock at `loc` (0, or the held copy that block `from` points at).
    fn new(dev: &'a dyn BlockDevice) -> Reader<'a> {
        Reader {
            dev,
            end: raw::device_blocks(dev),
            trees: HashMap::new(),
        }
    }

    /// The superblock to read from, and its location: the held metadata snapshot's with
    /// `use_metadata_snap` (`Err(NoMetadataSnap)` without one), else the live one.
    fn chosen_superblock(&self, use_metadata_snap: bool) -> Result<(Superblock, u64), Error> {
        let live = self.superblock(0, 0)?;
        if !use_metadata_snap {
            return Ok((live, 0));
        }
        if live.held_root == 0 {
            return Err(Error::NoMetadataSnap);
        }
        Ok((self.superblock(0, live.held_root)?, live.held_root))
    }

    /// The device-details tree of `sb` (at `sb_loc`), in id order.
    fn details(
        &mut self,
        sb_loc: u64,
        sb: &Superblock,
    ) -> Result<Vec<(u64, DeviceDetails)>, DumpError> {
        let mut details = Vec::new();
        self.walk(
            sb_loc,
            sb.device_details_root,
            TreeKind::Details,
            &mut |_, dev_id, v| {
                details.push((dev_id, DeviceDetails::decode(v)));
                Ok(())
            },
        )?;
        Ok(details)
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

    /// Calls `f(leaf, key, value)` for every entry of the tree at `root` (pointed at by block
    /// `from`) in key order; the leaves' values must be `value_size` bytes.
    fn walk(
        &mut self,
        from: u64,
        root: u64,
        kind: TreeKind,
        f: &mut Visit<'_>,
    ) -> Result<(), DumpError> {
        let mut w = Walk {
            kind,
            visited: HashSet::new(),
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

    fn walk_at(
        &mut self,
        w: &mut Walk<'_>,
        from: u64,
        loc: u64,
        at: Bounds,
    ) -> Result<(), DumpError> {
        if at.depth > MAX_DEPTH {
            return Err(Error::corrupt(from, Damage::TooDeep).into());
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

/// A run of mappings with consecutive virtual and data blocks and the same time.
struct Run {
    vblock: u64,
    data_block: u64,
    len: u64,
    time: u32,
}

/// Writes the dump in `thin_dump`'s formats, coalescing mappings into runs.
struct Emitter<'w> {
    out: BufWriter<&'w mut dyn Write>,
    format: DumpFormat,
    run: Option<Run>,
}

impl Emitter<'_> {
    fn put(&mut self, args: std::fmt::Arguments<'_>) -> Result<(), DumpError> {
        self.out.write_fmt(args).map_err(DumpError::Output)
    }

    fn begin(&mut self, sb: &Superblock, nr_data_blocks: u64) -> Result<(), DumpError> {
        // 0.9.0 always prints an empty uuid, whatever the superblock holds.
        let (time, tx, flags, version, dbs) = (
            sb.time,
            sb.transaction_id,
            sb.flags,
            sb.version,
            sb.data_block_size,
        );
        match self.format {
            DumpFormat::Xml => self.put(format_args!(
                "<superblock uuid=\"\" time=\"{time}\" transaction=\"{tx}\" flags=\"{flags}\" \
                 version=\"{version}\" data_block_size=\"{dbs}\" \
                 nr_data_blocks=\"{nr_data_blocks}\">\n"
            )),
            DumpFormat::HumanReadable => self.put(format_args!(
                "begin superblock: \"\", {time}, {tx}, {flags}, {version}, {dbs}, \
                 {nr_data_blocks}\n"
            )),
        }
    }

    fn begin_device(&mut self, dev_id: u64, d: &DeviceDetails) -> Result<(), DumpError> {
        let (mapped, tx, ctime, stime) = (
            d.mapped_blocks,
            d.transaction_id,
            d.creation_time,
            d.snapshotted_time,
        );
        match self.format {
            DumpFormat::Xml => self.put(format_args!(
                "  <device dev_id=\"{dev_id}\" mapped_blocks=\"{mapped}\" transaction=\"{tx}\" \
                 creation_time=\"{ctime}\" snap_time=\"{stime}\">\n"
            )),
            DumpFormat::HumanReadable => self.put(format_args!(
                "device: {dev_id}\nmapped_blocks: {mapped}\ntransaction: {tx}\n\
                 creation time: {ctime}\nsnap time: {stime}\n"
            )),
        }
    }

    /// Adds one mapping; mappings come in ascending virtual block order.
    fn mapping(&mut self, vblock: u64, value: u64) -> Result<(), DumpError> {
        let bt = BlockTime::decode(value);
        if let Some(r) = &mut self.run {
            let extends = r.vblock.checked_add(r.len) == Some(vblock)
                && r.data_block.checked_add(r.len) == Some(bt.block)
                && r.time == bt.time;
            if extends {
                r.len += 1;
                return Ok(());
            }
            self.flush_run()?;
        }
        self.run = Some(Run {
            vblock,
            data_block: bt.block,
            len: 1,
            time: bt.time,
        });
        Ok(())
    }

    fn flush_run(&mut self) -> Result<(), DumpError> {
        let Some(Run {
            vblock: v,
            data_block: d,
            len,
            time: t,
        }) = self.run.take()
        else {
            return Ok(());
        };
        match (self.format, len) {
            (DumpFormat::Xml, 1) => self.put(format_args!(
                "    <single_mapping origin_block=\"{v}\" data_block=\"{d}\" time=\"{t}\"/>\n"
            )),
            (DumpFormat::Xml, _) => self.put(format_args!(
                "    <range_mapping origin_begin=\"{v}\" data_begin=\"{d}\" length=\"{len}\" \
                 time=\"{t}\"/>\n"
            )),
            (DumpFormat::HumanReadable, 1) => self.put(format_args!("    {v} -> {d}, {t}\n")),
            (DumpFormat::HumanReadable, _) => {
                let (v_end, d_end) = (v + (len - 1), d + (len - 1));
                self.put(format_args!("    ({v}..{v_end}) -> ({d}..{d_end}), {t}\n"))
            }
        }
    }

    fn end_device(&mut self) -> Result<(), DumpError> {
        self.flush_run()?;
        match self.format {
            DumpFormat::Xml => self.put(format_args!("  </device>\n")),
            DumpFormat::HumanReadable => self.put(format_args!("\n")),
        }
    }

    fn end(mut self) -> Result<(), DumpError> {
        match self.format {
            DumpFormat::Xml => self.put(format_args!("</superblock>\n"))?,
            DumpFormat::HumanReadable => self.put(format_args!("end superblock\n"))?,
        }
        self.out.flush().map_err(DumpError::Output)
    }
}
