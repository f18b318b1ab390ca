//! `dump`: prints a pool's devices and mappings exactly as `thin_dump` 0.9.0 does, in its
//! XML or `human_readable` format.
//!
//! The dump reads the superblock (or the held metadata snapshot copy), the device-details
//! tree and the mapping trees through [`super::walk`], which refuses to follow anything it
//! cannot read correctly.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};

use crate::block::read_u64;
use crate::error::Error;
use crate::io::BlockDevice;
use crate::thin::metadata::{BlockTime, DeviceDetails, Superblock};

use super::walk::{missing_mapping, MetadataRoot, Reader, TreeKind};

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
    let (sb, sb_loc) = reader.chosen_superblock(root_of(use_metadata_snap))?;
    let details = reader.details(sb_loc, &sb)?;
    Ok((sb, details))
}

fn root_of(use_metadata_snap: bool) -> MetadataRoot {
    if use_metadata_snap {
        MetadataRoot::HeldSnap
    } else {
        MetadataRoot::Live
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
    let (sb, sb_loc) = reader.chosen_superblock(root_of(opts.use_metadata_snap))?;
    // The held copy's space-map roots are zero, so this prints 0 for `-m`, as thin_dump does.
    let nr_data_blocks = sb.data_sm_root.nr_blocks;

    let details = reader.details(sb_loc, &sb)?;
    let roots = if opts.skip_mappings {
        BTreeMap::new()
    } else {
        reader.mapping_roots(sb_loc, &sb)?
    };

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
                return Err(missing_mapping(&sb, dev_id).into());
            };
            let mapping = TreeKind::Mapping;
            reader.walk(leaf, root, mapping, None, &mut |_, vblock, v| {
                em.mapping(vblock, read_u64(v, 0))
            })?;
        }
        em.end_device()?;
    }
    em.end()
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
