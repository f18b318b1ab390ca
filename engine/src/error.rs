//! The engine's one public error type, sized to the decisions callers make.

use std::io;

use crate::units::{MetaBlock, ThinId};

/// Which of the pool's two devices an I/O error happened on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRole {
    Metadata,
    Data,
}

impl std::fmt::Display for DeviceRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceRole::Metadata => "metadata device",
            DeviceRole::Data => "data device",
        })
    }
}

/// What is wrong with a metadata block. Also the vocabulary of the checker's findings.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("bad checksum in {kind} (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum {
        kind: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{kind} says it is block {found}")]
    WrongLocation { kind: &'static str, found: u64 },
    #[error("bad superblock magic {0}")]
    BadMagic(u64),
    #[error("unsupported feature flags (incompat {incompat:#x}, compat_ro {compat_ro:#x})")]
    UnsupportedFeatures { incompat: u32, compat_ro: u32 },
    #[error("bad superblock field: {0}")]
    BadSuperblock(String),
    #[error("btree node flags {0} are neither internal nor leaf")]
    BadNodeFlags(u32),
    #[error("btree node max_entries {0} is impossible")]
    BadMaxEntries(u32),
    #[error("btree node has {nr} entries, more than its max {max}")]
    TooManyEntries { nr: u32, max: u32 },
    #[error("btree node has {nr} entries, expected at least {min}")]
    TooFewEntries { nr: u32, min: u32 },
    #[error("btree node value size {found}, expected {expected}")]
    ValueSizeMismatch { expected: u32, found: u32 },
    #[error("btree keys are out of order")]
    KeysOutOfOrder,
    #[error("btree key {key} lies outside the range its parent gives ({low}..{high})")]
    KeyOutsideParentRange { key: u64, low: u64, high: u64 },
    #[error("btree leaves are at different depths")]
    UnevenDepth,
    #[error("btree is deeper than any real tree can be (a cycle?)")]
    TooDeep,
    #[error("pointer to block {0}, past the end of the metadata device")]
    PointerPastEnd(u64),
    #[error("pointer to the superblock")]
    PointerToSuperblock,
    #[error("data block {0} is past the end of the data device")]
    DataBlockPastEnd(u64),
    #[error("block is reachable twice in a tree that may not share")]
    UnexpectedSharing,
    #[error("space map is inconsistent: {0}")]
    SpaceMap(String),
    #[error("{0}")]
    Other(String),
}

/// Errors from the engine's public API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("i/o error on the {role} ({device}) at byte {offset}")]
    Io {
        role: DeviceRole,
        device: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("metadata block {block} is damaged: {damage}")]
    Corrupt { block: MetaBlock, damage: Damage },
    #[error("out of data space")]
    NoDataSpace,
    #[error("out of metadata space")]
    NoMetadataSpace,
    #[error("thin device {0} does not exist")]
    NoSuchThin(ThinId),
    #[error("thin device {0} already exists")]
    ThinExists(ThinId),
    #[error("thin device id {0} is out of range (ids are 0..=16777215)")]
    BadThinId(u64),
    #[error("thin device {0} is open")]
    ThinBusy(ThinId),
    #[error("pool is read-only: {0}")]
    ReadOnly(String),
    #[error("metadata needs checking (needs_check is set): run check and repair first")]
    NeedsCheck,
    #[error("{what} is busy: {holder}")]
    Busy { what: String, holder: String },
    #[error("transaction id is {actual}, not {expected}")]
    TransactionIdMismatch { expected: u64, actual: u64 },
    #[error("a metadata snapshot is already held")]
    MetadataSnapExists,
    #[error("no metadata snapshot is held")]
    NoMetadataSnap,
    #[error("the pool's time (snapshot clock) has reached its 24-bit limit")]
    TimeExhausted,
    #[error("{0}")]
    InvalidArgument(String),
    /// Activation failed: a loop, FUSE or device-mapper step, or the pool daemon.
    #[error("{0}")]
    Activation(String),
    #[error("state store {path}: {message}")]
    Store { path: String, message: String },
    /// The kernel's device-mapper refused or failed an operation ([`crate::activate::dm`]).
    #[error("device-mapper: {0}")]
    Dm(#[from] crate::activate::dm::DmError),
    /// A system call of an activation backend failed (mount, `/dev/fuse`).
    #[error("{what}")]
    ActivationIo {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn corrupt(block: u64, damage: Damage) -> Error {
        Error::Corrupt {
            block: MetaBlock(block),
            damage,
        }
    }

    /// Whether this error came from a device failing (as opposed to a refusal or damage).
    pub fn is_io(&self) -> bool {
        matches!(self, Error::Io { .. })
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
