//! Offline metadata tools: check, dump, restore, repair, trim, and the reports
//! thin-provisioning-tools gives besides (ls, delta, rmap, metadata size). They read
//! metadata blocks straight from a device and trust nothing they read.
//!
//! - [`check`] validates everything reachable from the superblock (checksums, node rules,
//!   the device trees, both space maps and every reference count) and returns a
//!   [`check::Report`] of findings; it never stops at the first damage.
//! - [`dump`] prints devices and mappings byte for byte as `thin_dump` 0.9.0 does, and
//!   stops with an error at the first damage it cannot read past.
//! - [`restore`] writes a fresh pool from `thin_dump` XML.
//! - [`trim`] discards the data blocks the data space map says are free.
//! - [`repair`] rebuilds a fresh pool from damaged metadata, keeping every mapping that can
//!   be trusted (tolerant walks, then a scan of the whole device for orphaned subtrees).
//! - [`ls`], [`delta`] and [`rmap`] compute what `thin_ls`, `thin_delta` and `thin_rmap`
//!   print, as typed values (the CLI formats them); [`metadata_size`] is
//!   `thin_metadata_size`'s estimate.
//!
//! None may panic, loop or allocate without bound on damaged input: every pointer is
//! checked against the device before it is followed, and every walk remembers what it has
//! entered ([`walk`] is the one tree reader they share).

pub mod check;
pub mod delta;
pub mod dump;
pub mod ls;
pub mod metadata_size;
mod raw;
pub mod repair;
pub mod restore;
pub mod rmap;
pub mod trim;
mod walk;

pub use walk::MetadataRoot;
