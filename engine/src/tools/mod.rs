//! Offline metadata tools: check, dump, restore, and the reports thin-provisioning-tools
//! gives besides (ls, delta, rmap, metadata size). They read metadata blocks straight from a
//! device and trust nothing they read.
//!
//! - [`check`] validates everything reachable from the superblock (checksums, node rules,
//!   the device trees, both space maps and every reference count) and returns a
//!   [`check::Report`] of findings; it never stops at the first damage.
//! - [`dump`] prints devices and mappings byte for byte as `thin_dump` 0.9.0 does, and
//!   stops with an error at the first damage it cannot read past.
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
pub mod restore;
pub mod rmap;
mod walk;

pub use walk::MetadataRoot;
