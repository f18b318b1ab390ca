//! Offline metadata tools: check and dump. They read metadata blocks straight from a device
//! and trust nothing they read.
//!
//! - [`check`] validates everything reachable from the superblock (checksums, node rules,
//!   the device trees, both space maps and every reference count) and returns a
//!   [`check::Report`] of findings; it never stops at the first damage.
//! - [`dump`] prints devices and mappings byte for byte as `thin_dump` 0.9.0 does, and
//!   stops with an error at the first damage it cannot read past.
//!
//! Neither may panic, loop or allocate without bound on damaged input: every pointer is
//! checked against the device before it is followed, and every walk remembers what it has
//! entered.

pub mod check;
pub mod dump;
mod raw;
pub mod restore;
