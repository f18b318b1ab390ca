//! Device-mapper through its ioctls on `/dev/mapper/control`: no dmsetup, no libdevmapper.
//!
//! Owns the encoding of `struct dm_ioctl` requests and the decoding of the kernel's replies,
//! plus the `/dev/mapper/NAME` nodes (there may be no udev to make them). May use `nix` and
//! the file system; knows nothing about thin pools (that is [`super::kernel`]).
//! Invariant: every reply is bounds-checked before it is read, so a malformed or truncated
//! reply is a [`DmError::BadReply`], never a panic or an out-of-bounds read.
//!
//! The wire format is the kernel's `include/uapi/linux/dm-ioctl.h` (interface version 4):
//! every command takes one buffer that starts with a 312-byte `struct dm_ioctl` header and
//! continues with a command-specific payload at `data_start`. The integers are in the host's
//! byte order (this is an ioctl, not an on-disk format). A reply that does not fit comes back
//! with `DM_BUFFER_FULL_FLAG`; read-only commands are then retried with a larger buffer.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;

//------------------------------------------------------------------------------------------------
// The interface, from include/uapi/linux/dm-ioctl.h

/// The ioctl type byte of every DM command (`DM_IOCTL`).
const DM_IOCTL: u8 = 0xfd;
/// The interface version we speak. The kernel accepts any request whose major matches and
/// whose minor is not newer than its own, and writes its own version back. 4.0.0 is the
/// oldest; the flags we use from later minors (DM_DEFERRED_REMOVE, 4.27) are honoured
/// whatever minor the request names.
const INTERFACE_VERSION: [u32; 3] = [4, 0, 0];

/// `sizeof(struct dm_ioctl)`.
pub const DM_IOCTL_SIZE: usize = 312;
/// `sizeof(struct dm_target_spec)`: the header of each target in a table or status payload.
pub const DM_TARGET_SPEC_SIZE: usize = 40;
/// `offsetof(struct dm_name_list, name)`: the fixed part of each DM_LIST_DEVICES record
/// (`sizeof` is 16 with its tail padding).
pub const DM_NAME_LIST_NAME_OFFSET: usize = 12;
/// `sizeof(struct dm_target_versions)`: the fixed part of each DM_LIST_VERSIONS record.
pub const DM_TARGET_VERSIONS_SIZE: usize = 16;
/// `sizeof(struct dm_target_msg)`: the sector before a target message.
pub const DM_TARGET_MSG_SIZE: usize = 8;
/// `DM_NAME_LEN`: a device name, its NUL included.
pub const DM_NAME_LEN: usize = 128;
/// `DM_UUID_LEN`: a device uuid, its NUL included.
pub const DM_UUID_LEN: usize = 129;
/// `DM_MAX_TYPE_NAME`: a target type name, its NUL included.
pub const DM_MAX_TYPE_NAME: usize = 16;

// Field offsets in struct dm_ioctl.
const OFF_VERSION: usize = 0;
const OFF_DATA_SIZE: usize = 12;
const OFF_DATA_START: usize = 16;
const OFF_TARGET_COUNT: usize = 20;
const OFF_OPEN_COUNT: usize = 24;
const OFF_FLAGS: usize = 28;
const OFF_EVENT_NR: usize = 32;
const OFF_DEV: usize = 40;
const OFF_NAME: usize = 48;
const OFF_UUID: usize = OFF_NAME + DM_NAME_LEN;
/// `offsetof(struct dm_ioctl, data)`: the smallest `data_size` the kernel accepts, and what it
/// reports for a reply without payload.
const OFF_DATA: usize = OFF_UUID + DM_UUID_LEN;

// Command numbers (the `DM_*_CMD` enum).
const CMD_VERSION: u8 = 0;
const CMD_LIST_DEVICES: u8 = 2;
const CMD_DEV_CREATE: u8 = 3;
const CMD_DEV_REMOVE: u8 = 4;
const CMD_DEV_SUSPEND: u8 = 6;
const CMD_DEV_STATUS: u8 = 7;
const CMD_TABLE_LOAD: u8 = 9;
const CMD_TABLE_STATUS: u8 = 12;
const CMD_LIST_VERSIONS: u8 = 13;
const CMD_TARGET_MSG: u8 = 14;
/// Added in interface 4.41: the version of one target type, loading its module if needed.
const CMD_GET_TARGET_VERSION: u8 = 17;

// Flags (the `DM_*_FLAG` bits).
const FLAG_READONLY: u32 = 1 << 0;
const FLAG_SUSPEND: u32 = 1 << 1;
const FLAG_STATUS_TABLE: u32 = 1 << 4;
const FLAG_ACTIVE_PRESENT: u32 = 1 << 5;
const FLAG_INACTIVE_PRESENT: u32 = 1 << 6;
const FLAG_BUFFER_FULL: u32 = 1 << 8;
const FLAG_DATA_OUT: u32 = 1 << 16;
const FLAG_DEFERRED_REMOVE: u32 = 1 << 17;

/// Where the control node lives.
pub const CONTROL_PATH: &str = "/dev/mapper/control";
/// Where device nodes are made.
pub const MAPPER_DIR: &str = "/dev/mapper";

/// First buffer size for commands with a reply (libdevmapper starts at 16 KiB too).
const INITIAL_BUFFER: usize = 16 * 1024;
/// Retries double the buffer up to this; a reply larger than this is refused, not chased.
const MAX_BUFFER: usize = 64 * 1024 * 1024;
/// Buffer for target messages. Messages are not retried (see [`DmControl::message`]), so
/// the first buffer must hold any reply we expect.
const MESSAGE_BUFFER: usize = 64 * 1024;

//------------------------------------------------------------------------------------------------
// Errors

/// What went wrong talking to device-mapper.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DmError {
    /// The control node is missing or cannot be opened (no dm-mod, no permission).
    #[error("cannot open the device-mapper control node {path}: {source}")]
    NoControl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The control node opened but does not answer DM_VERSION (not a DM node, too old).
    #[error("{path} does not answer DM_VERSION: {errno}")]
    VersionFailed { path: PathBuf, errno: Errno },
    /// A name, uuid, target type or message the kernel would refuse or truncate.
    #[error("invalid device-mapper {what} {value:?}: {reason}")]
    InvalidArgument {
        what: &'static str,
        value: String,
        reason: String,
    },
    /// No device of this name exists.
    #[error("device-mapper device {0} does not exist")]
    NoSuchDevice(String),
    /// A device of this name already exists.
    #[error("device-mapper device {0} already exists")]
    DeviceExists(String),
    /// The device is open, so it cannot be removed now.
    #[error("device-mapper device {device} is busy (open count {open_count})")]
    DeviceBusy { device: String, open_count: u32 },
    /// The kernel refused a table (its reason is in the kernel log).
    #[error(
        "the kernel refused table {table:?} for device-mapper device {device}: {errno}; \
         the kernel log says why"
    )]
    TableRejected {
        device: String,
        table: String,
        errno: Errno,
    },
    /// The target refused a message (its reason is in the kernel log).
    #[error(
        "message {message:?} to device-mapper device {device} failed: {errno}; the kernel \
         log says why"
    )]
    MessageFailed {
        device: String,
        message: String,
        errno: Errno,
    },
    /// Any other failing command.
    #[error("{op} on device-mapper device {device} failed: {errno}")]
    Ioctl {
        op: &'static str,
        device: String,
        errno: Errno,
    },
    /// A reply that does not follow the interface.
    #[error("malformed {op} reply from the kernel: {reason}")]
    BadReply { op: &'static str, reason: String },
    /// A reply larger than we are willing to read (or a message reply that did not fit).
    #[error("{op} reply for {device} does not fit in {limit} bytes")]
    ReplyTooLarge {
        op: &'static str,
        device: String,
        limit: usize,
    },
    /// Making or removing a `/dev/mapper` node failed.
    #[error("cannot {action} device node {path}: {source}")]
    Node {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A status line that does not parse.
    #[error("cannot parse the {target} status of {device}: {reason} (status {line:?})")]
    BadStatus {
        target: &'static str,
        device: String,
        line: String,
        reason: String,
    },
    /// The kernel backend needs block devices, and this path is not one.
    #[error("{role} {path} is not a block device (attach it to a loop device first)")]
    NotBlockDevice { role: &'static str, path: PathBuf },
    /// An operation failed and so did undoing it.
    #[error("{cause}; undoing it failed too: {cleanup}")]
    CleanupFailed {
        cause: Box<crate::Error>,
        cleanup: Box<crate::Error>,
    },
}

//------------------------------------------------------------------------------------------------
// Values

/// A block device number as the kernel reports it in `dm_ioctl.dev` (`huge_encode_dev`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

impl DevId {
    /// Decodes the kernel's `huge_encode_dev` form: minor bits 0-7 and 20-39, major bits 8-19.
    pub fn from_kernel(dev: u64) -> DevId {
        DevId {
            major: ((dev >> 8) & 0xfff) as u32,
            minor: ((dev & 0xff) | ((dev >> 12) & 0xfff_ff00)) as u32,
        }
    }

    /// The kernel's `huge_encode_dev` form.
    pub fn to_kernel(self) -> u64 {
        let (major, minor) = (u64::from(self.major), u64::from(self.minor));
        (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
    }

    /// The C library's `dev_t` (for `mknod` and comparing with `stat`).
    pub fn dev_t(self) -> nix::libc::dev_t {
        nix::sys::stat::makedev(u64::from(self.major), u64::from(self.minor))
    }
}

impl std::fmt::Display for DevId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One target of a table: a range of the device's sectors and what maps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    pub start_sector: u64,
    pub length_sectors: u64,
    /// The target type, e.g. `thin-pool`, `thin`, `linear` (at most 15 bytes).
    pub target_type: String,
    /// The target's constructor arguments, as in a `dmsetup table` line.
    pub params: String,
}

impl std::fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {}",
            self.start_sector, self.length_sectors, self.target_type, self.params
        )
    }
}

/// One target's status, as in a `dmsetup status` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetStatus {
    pub start_sector: u64,
    pub length_sectors: u64,
    pub target_type: String,
    /// The target's status text (for thin-pool, see [`super::kernel::KernelPoolStatus`]).
    pub params: String,
}

/// What DM_DEV_STATUS says about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    /// The uuid given at creation, if any.
    pub uuid: Option<String>,
    pub dev: DevId,
    /// How many openers the device has (a snapshot of a moving number).
    pub open_count: u32,
    pub event_nr: u32,
    /// Targets in the live table (0 before the first resume).
    pub target_count: u32,
    pub suspended: bool,
    pub read_only: bool,
    /// A live table is present.
    pub active_table: bool,
    /// A loaded table waits for the next resume.
    pub inactive_table: bool,
    /// A deferred remove is pending (the device goes when its last opener closes it).
    pub deferred_remove: bool,
}

/// A target type the kernel knows, with its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetVersion {
    pub name: String,
    pub version: [u32; 3],
}

//------------------------------------------------------------------------------------------------
// Encoding and decoding (pure; unit-tested without a kernel)

/// Refuses a device name the kernel would refuse or that cannot be a `/dev/mapper` node.
pub fn validate_name(name: &str) -> Result<(), DmError> {
    let bad = |reason: &str| {
        Err(DmError::InvalidArgument {
            what: "device name",
            value: name.to_string(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() >= DM_NAME_LEN {
        return bad(&format!(
            "it is {} bytes long, the limit is {}",
            name.len(),
            DM_NAME_LEN - 1
        ));
    }
    if name.contains('\0') {
        return bad("it contains a NUL byte");
    }
    if name.contains('/') {
        return bad("it contains '/'");
    }
    if name == "control" || name == "." || name == ".." {
        return bad("the name is reserved");
    }
    Ok(())
}

/// Refuses a uuid the kernel would truncate.
pub fn validate_uuid(uuid: &str) -> Result<(), DmError> {
    let bad = |reason: String| {
        Err(DmError::InvalidArgument {
            what: "device uuid",
            value: uuid.to_string(),
            reason,
        })
    };
    if uuid.is_empty() {
        return bad("it is empty (pass None for no uuid)".into());
    }
    if uuid.len() >= DM_UUID_LEN {
        return bad(format!(
            "it is {} bytes long, the limit is {}",
            uuid.len(),
            DM_UUID_LEN - 1
        ));
    }
    if uuid.contains('\0') {
        return bad("it contains a NUL byte".into());
    }
    Ok(())
}

fn validate_target(spec: &TargetSpec) -> Result<(), DmError> {
    let bad = |what, value: &str, reason: &str| {
        Err(DmError::InvalidArgument {
            what,
            value: value.to_string(),
            reason: reason.to_string(),
        })
    };
    let ty = &spec.target_type;
    if ty.is_empty() {
        return bad("target type", ty, "it is empty");
    }
    if ty.len() >= DM_MAX_TYPE_NAME {
        return bad(
            "target type",
            ty,
            &format!("the limit is {} bytes", DM_MAX_TYPE_NAME - 1),
        );
    }
    if ty.contains('\0') || ty.contains(char::is_whitespace) {
        return bad("target type", ty, "it contains NUL or white space");
    }
    if spec.params.contains('\0') {
        return bad("target parameters", &spec.params, "they contain a NUL byte");
    }
    Ok(())
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

/// Reads a u32 at `at`, or None past the end.
fn get_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn get_u64(buf: &[u8], at: usize) -> Option<u64> {
    let bytes = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

/// The text of a NUL-terminated string inside `field` (all of `field` if it has no NUL).
fn c_str(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// The NUL-terminated string starting at `at` in `buf`; None if it has no NUL before the end.
fn c_str_at(buf: &[u8], at: usize) -> Option<String> {
    let rest = buf.get(at..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// Builds a request buffer of `size` bytes (at least the header plus `payload`): the header
/// names the device by `name` (and `uuid` on create), the payload starts at `data_start`.
fn encode_request(
    size: usize,
    name: &str,
    uuid: Option<&str>,
    flags: u32,
    target_count: u32,
    payload: &[u8],
) -> Vec<u8> {
    let size = size.max(DM_IOCTL_SIZE + payload.len());
    assert!(
        name.len() < DM_NAME_LEN && uuid.is_none_or(|u| u.len() < DM_UUID_LEN),
        "names are validated before encoding"
    );
    let mut buf = vec![0u8; size];
    for (i, v) in INTERFACE_VERSION.iter().enumerate() {
        put_u32(&mut buf, OFF_VERSION + 4 * i, *v);
    }
    put_u32(&mut buf, OFF_DATA_SIZE, size as u32);
    put_u32(&mut buf, OFF_DATA_START, DM_IOCTL_SIZE as u32);
    put_u32(&mut buf, OFF_TARGET_COUNT, target_count);
    put_u32(&mut buf, OFF_FLAGS, flags);
    buf[OFF_NAME..OFF_NAME + name.len()].copy_from_slice(name.as_bytes());
    if let Some(uuid) = uuid {
        buf[OFF_UUID..OFF_UUID + uuid.len()].copy_from_slice(uuid.as_bytes());
    }
    buf[DM_IOCTL_SIZE..DM_IOCTL_SIZE + payload.len()].copy_from_slice(payload);
    buf
}

/// The DM_TABLE_LOAD payload: each target spec followed by its NUL-terminated parameters,
/// padded to 8 bytes; `next` is the distance from this spec to the following one.
fn encode_table(targets: &[TargetSpec]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in targets {
        let start = out.len();
        let record = align8(DM_TARGET_SPEC_SIZE + t.params.len() + 1);
        out.resize(start + record, 0);
        let spec = &mut out[start..];
        put_u64(spec, 0, t.start_sector);
        put_u64(spec, 8, t.length_sectors);
        // status (offset 16) is output only.
        put_u32(spec, 20, record as u32);
        spec[24..24 + t.target_type.len()].copy_from_slice(t.target_type.as_bytes());
        spec[DM_TARGET_SPEC_SIZE..DM_TARGET_SPEC_SIZE + t.params.len()]
            .copy_from_slice(t.params.as_bytes());
    }
    out
}

/// The DM_TARGET_MSG payload: the sector, then the NUL-terminated message.
fn encode_message(sector: u64, text: &str) -> Vec<u8> {
    let mut out = vec![0u8; DM_TARGET_MSG_SIZE + text.len() + 1];
    put_u64(&mut out, 0, sector);
    out[DM_TARGET_MSG_SIZE..DM_TARGET_MSG_SIZE + text.len()].copy_from_slice(text.as_bytes());
    out
}

/// A decoded reply header and the payload it points at.
#[derive(Debug)]
struct Reply<'a> {
    version: [u32; 3],
    flags: u32,
    target_count: u32,
    open_count: i32,
    event_nr: u32,
    dev: u64,
    name: String,
    uuid: String,
    /// `buf[data_start..data_size]`; empty when the reply carries none.
    payload: &'a [u8],
}

/// Decodes the header the kernel wrote back into `buf`, checking that `data_start` and
/// `data_size` lie inside the buffer.
fn decode_reply<'a>(op: &'static str, buf: &'a [u8]) -> Result<Reply<'a>, DmError> {
    let bad = |reason: String| Err(DmError::BadReply { op, reason });
    if buf.len() < DM_IOCTL_SIZE {
        return bad(format!(
            "{} bytes, shorter than the {DM_IOCTL_SIZE}-byte header",
            buf.len()
        ));
    }
    let u32_at = |at| get_u32(buf, at).unwrap_or(0);
    let data_size = u32_at(OFF_DATA_SIZE) as usize;
    let data_start = u32_at(OFF_DATA_START) as usize;
    if data_size > buf.len() {
        return bad(format!(
            "data_size {data_size} is past the end of the {}-byte buffer",
            buf.len()
        ));
    }
    let payload = if data_size <= OFF_DATA {
        // No payload: the kernel reports offsetof(data) for replies without one.
        &buf[0..0]
    } else if data_start < OFF_DATA || data_start > data_size {
        return bad(format!(
            "data_start {data_start} is outside the payload (data_size {data_size})"
        ));
    } else {
        &buf[data_start..data_size]
    };
    Ok(Reply {
        version: [u32_at(0), u32_at(4), u32_at(8)],
        flags: u32_at(OFF_FLAGS),
        target_count: u32_at(OFF_TARGET_COUNT),
        open_count: u32_at(OFF_OPEN_COUNT) as i32,
        event_nr: u32_at(OFF_EVENT_NR),
        dev: get_u64(buf, OFF_DEV).unwrap_or(0),
        name: c_str(&buf[OFF_NAME..OFF_NAME + DM_NAME_LEN]),
        uuid: c_str(&buf[OFF_UUID..OFF_UUID + DM_UUID_LEN]),
        payload,
    })
}

impl Reply<'_> {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: self.name.clone(),
            uuid: (!self.uuid.is_empty()).then(|| self.uuid.clone()),
            dev: DevId::from_kernel(self.dev),
            open_count: self.open_count.max(0) as u32,
            event_nr: self.event_nr,
            target_count: self.target_count,
            suspended: self.flags & FLAG_SUSPEND != 0,
            read_only: self.flags & FLAG_READONLY != 0,
            active_table: self.flags & FLAG_ACTIVE_PRESENT != 0,
            inactive_table: self.flags & FLAG_INACTIVE_PRESENT != 0,
            deferred_remove: self.flags & FLAG_DEFERRED_REMOVE != 0,
        }
    }
}

/// Parses a DM_LIST_DEVICES payload: `dm_name_list` records, each `next` bytes after the
/// previous one (0 ends the list). A first record with `dev == 0` means no devices.
fn parse_name_list(payload: &[u8]) -> Result<Vec<(String, DevId)>, DmError> {
    let bad = |reason: String| {
        Err(DmError::BadReply {
            op: "DM_LIST_DEVICES",
            reason,
        })
    };
    let mut out = Vec::new();
    if payload.is_empty() || get_u64(payload, 0) == Some(0) {
        return Ok(out);
    }
    let mut at = 0usize;
    loop {
        let (Some(dev), Some(next)) = (get_u64(payload, at), get_u32(payload, at + 8)) else {
            return bad(format!("record at {at} is cut short"));
        };
        let next = next as usize;
        // The name must end inside this record (or the payload, for the last one).
        let end = if next == 0 {
            payload.len()
        } else {
            (at + next).min(payload.len())
        };
        let Some(name) = c_str_at(&payload[..end], at + DM_NAME_LIST_NAME_OFFSET) else {
            return bad(format!("the name of the record at {at} is not terminated"));
        };
        out.push((name, DevId::from_kernel(dev)));
        if next == 0 {
            return Ok(out);
        }
        if next < DM_NAME_LIST_NAME_OFFSET + 1 || at + next >= payload.len() {
            return bad(format!(
                "record at {at} points {next} bytes on, outside the list"
            ));
        }
        at += next;
    }
}

/// Parses a DM_LIST_VERSIONS (or DM_GET_TARGET_VERSION) payload: `dm_target_versions`
/// records chained like the name list.
fn parse_versions(payload: &[u8]) -> Result<Vec<TargetVersion>, DmError> {
    let bad = |reason: String| {
        Err(DmError::BadReply {
            op: "DM_LIST_VERSIONS",
            reason,
        })
    };
    let mut out = Vec::new();
    if payload.is_empty() {
        return Ok(out);
    }
    let mut at = 0usize;
    loop {
        let (Some(next), Some(a), Some(b), Some(c)) = (
            get_u32(payload, at),
            get_u32(payload, at + 4),
            get_u32(payload, at + 8),
            get_u32(payload, at + 12),
        ) else {
            return bad(format!("record at {at} is cut short"));
        };
        let next = next as usize;
        let end = if next == 0 {
            payload.len()
        } else {
            (at + next).min(payload.len())
        };
        let Some(name) = c_str_at(&payload[..end], at + DM_TARGET_VERSIONS_SIZE) else {
            return bad(format!("the name of the record at {at} is not terminated"));
        };
        out.push(TargetVersion {
            name,
            version: [a, b, c],
        });
        if next == 0 {
            return Ok(out);
        }
        if next <= DM_TARGET_VERSIONS_SIZE || at + next >= payload.len() {
            return bad(format!(
                "record at {at} points {next} bytes on, outside the list"
            ));
        }
        at += next;
    }
}

/// Parses a DM_TABLE_STATUS payload of `count` targets: each spec is followed by its
/// NUL-terminated text; `next` is the offset of the following spec from the payload start.
/// Trailing white space of each text is dropped.
fn parse_targets(payload: &[u8], count: u32) -> Result<Vec<TargetStatus>, DmError> {
    let bad = |reason: String| {
        Err(DmError::BadReply {
            op: "DM_TABLE_STATUS",
            reason,
        })
    };
    let mut out = Vec::new();
    let mut at = 0usize;
    for i in 0..count {
        let (Some(start), Some(length), Some(next)) = (
            get_u64(payload, at),
            get_u64(payload, at + 8),
            get_u32(payload, at + 20),
        ) else {
            return bad(format!("target {i} at {at} is cut short"));
        };
        let Some(ty) = payload.get(at + 24..at + DM_TARGET_SPEC_SIZE) else {
            return bad(format!("target {i} at {at} is cut short"));
        };
        let Some(params) = c_str_at(payload, at + DM_TARGET_SPEC_SIZE) else {
            return bad(format!("the text of target {i} is not terminated"));
        };
        out.push(TargetStatus {
            start_sector: start,
            length_sectors: length,
            target_type: c_str(ty),
            // Some targets (thin-pool) end their text with a space; it means nothing to
            // the kernel's argument splitter, and dropping it lets texts compare equal.
            params: params.trim_end().to_string(),
        });
        if i + 1 < count {
            let next = next as usize;
            if next <= at || next >= payload.len() {
                return bad(format!(
                    "target {i} says the next one is at {next}, outside the payload"
                ));
            }
            at = next;
        }
    }
    Ok(out)
}

/// Runs `ioctl` on request buffers of growing size, starting at `initial` bytes and doubling
/// while the reply carries DM_BUFFER_FULL_FLAG; returns the first complete reply.
/// `Err(E2BIG)` once a buffer of MAX_BUFFER bytes was still too small.
fn query_growing(
    initial: usize,
    name: &str,
    flags: u32,
    payload: &[u8],
    mut ioctl: impl FnMut(&mut [u8]) -> Result<(), Errno>,
) -> Result<Vec<u8>, Errno> {
    let mut size = initial.clamp(DM_IOCTL_SIZE, MAX_BUFFER);
    loop {
        let mut buf = encode_request(size, name, None, flags, 0, payload);
        ioctl(&mut buf)?;
        if get_u32(&buf, OFF_FLAGS).unwrap_or(0) & FLAG_BUFFER_FULL == 0 {
            return Ok(buf);
        }
        if size >= MAX_BUFFER {
            return Err(Errno::E2BIG);
        }
        size = (size * 2).min(MAX_BUFFER);
    }
}

//------------------------------------------------------------------------------------------------
// The control node

/// An open `/dev/mapper/control`. Every method is one or a few DM ioctls; needs
/// CAP_SYS_ADMIN.
#[derive(Debug)]
pub struct DmControl {
    file: File,
    path: PathBuf,
    version: [u32; 3],
    /// First buffer size for commands with a reply.
    initial_buffer: usize,
}

impl DmControl {
    /// Opens `/dev/mapper/control` and checks that it answers DM_VERSION.
    ///
    /// * `Err(NoControl)`: the node is missing (no dm-mod loaded, no devtmpfs) or cannot be
    ///   opened (not root).
    /// * `Err(VersionFailed)`: it opened but is not a device-mapper interface we speak.
    pub fn open() -> Result<DmControl, DmError> {
        DmControl::open_at(Path::new(CONTROL_PATH))
    }

    /// As [`DmControl::open`], for a control node elsewhere.
    pub fn open_at(path: &Path) -> Result<DmControl, DmError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| DmError::NoControl {
                path: path.to_path_buf(),
                source,
            })?;
        let mut ctl = DmControl {
            file,
            path: path.to_path_buf(),
            version: [0; 3],
            initial_buffer: INITIAL_BUFFER,
        };
        let mut buf = encode_request(DM_IOCTL_SIZE, "", None, 0, 0, &[]);
        ctl.raw(CMD_VERSION, &mut buf)
            .map_err(|errno| DmError::VersionFailed {
                path: path.to_path_buf(),
                errno,
            })?;
        let reply = decode_reply("DM_VERSION", &buf)?;
        if reply.version[0] != INTERFACE_VERSION[0] {
            return Err(DmError::VersionFailed {
                path: path.to_path_buf(),
                errno: Errno::EPROTO,
            });
        }
        ctl.version = reply.version;
        Ok(ctl)
    }

    /// The kernel's DM interface version (major, minor, patch), e.g. `[4, 47, 0]`.
    pub fn version(&self) -> [u32; 3] {
        self.version
    }

    /// Starts replies in a buffer of `bytes` (at least the 312-byte header) instead of 16 KiB.
    /// Replies still grow the buffer as they need; a small start makes every listing go
    /// through the kernel's DM_BUFFER_FULL_FLAG retry, which tests use to exercise it.
    pub fn with_initial_buffer(mut self, bytes: usize) -> DmControl {
        self.initial_buffer = bytes.clamp(DM_IOCTL_SIZE, MAX_BUFFER);
        self
    }

    /// The path of the control node this talks to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One ioctl on `buf`, which holds a request built by `encode_request`.
    fn raw(&self, cmd: u8, buf: &mut [u8]) -> Result<(), Errno> {
        assert!(buf.len() >= DM_IOCTL_SIZE);
        assert_eq!(
            get_u32(buf, OFF_DATA_SIZE),
            Some(buf.len() as u32),
            "data_size must be the buffer's length: the kernel reads and writes that much"
        );
        let request = nix::request_code_readwrite!(DM_IOCTL, cmd, DM_IOCTL_SIZE);
        // Safety: `buf` is a live, exclusively borrowed buffer of `data_size` bytes (checked
        // above). The kernel copies in at most `data_size` bytes and copies back at most the
        // reply's `data_size`, which it never sets beyond the size it was given.
        #[allow(unsafe_code)]
        let rc = unsafe {
            nix::libc::ioctl(
                self.file.as_raw_fd(),
                request as _,
                buf.as_mut_ptr().cast::<nix::libc::c_void>(),
            )
        };
        Errno::result(rc).map(drop)
    }

    /// Runs a command that may have a reply payload, growing the buffer while the kernel says
    /// it was too small. Only for commands that change nothing (a retry repeats the command).
    fn query(
        &self,
        op: &'static str,
        cmd: u8,
        name: &str,
        flags: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, Errno> {
        query_growing(self.initial_buffer, name, flags, payload, |buf| {
            let r = self.raw(cmd, buf);
            if r.is_ok() && get_u32(buf, OFF_FLAGS).unwrap_or(0) & FLAG_BUFFER_FULL != 0 {
                tracing::trace!(
                    op,
                    name,
                    size = buf.len(),
                    "device-mapper reply did not fit"
                );
            }
            r
        })
    }

    /// Maps a failing command's errno to the error callers act on.
    fn fail(op: &'static str, name: &str, errno: Errno) -> DmError {
        match errno {
            Errno::ENXIO => DmError::NoSuchDevice(name.to_string()),
            Errno::E2BIG => DmError::ReplyTooLarge {
                op,
                device: name.to_string(),
                limit: MAX_BUFFER,
            },
            errno => DmError::Ioctl {
                op,
                device: name.to_string(),
                errno,
            },
        }
    }

    /// A command on one device, without payload; returns the reply's device info.
    fn device_cmd(
        &self,
        op: &'static str,
        cmd: u8,
        name: &str,
        flags: u32,
    ) -> Result<DeviceInfo, DmError> {
        validate_name(name)?;
        let mut buf = encode_request(DM_IOCTL_SIZE, name, None, flags, 0, &[]);
        self.raw(cmd, &mut buf)
            .map_err(|e| Self::fail(op, name, e))?;
        Ok(decode_reply(op, &buf)?.info())
    }

    /// Creates an empty device (no table; suspended until the first resume).
    ///
    /// * `Err(DeviceExists)`: the name (or the uuid) is taken.
    pub fn create(&self, name: &str, uuid: Option<&str>) -> Result<DeviceInfo, DmError> {
        validate_name(name)?;
        if let Some(uuid) = uuid {
            validate_uuid(uuid)?;
        }
        let mut buf = encode_request(DM_IOCTL_SIZE, name, uuid, 0, 0, &[]);
        self.raw(CMD_DEV_CREATE, &mut buf).map_err(|e| match e {
            Errno::EBUSY => DmError::DeviceExists(name.to_string()),
            e => Self::fail("DM_DEV_CREATE", name, e),
        })?;
        tracing::debug!(name, "dm create");
        Ok(decode_reply("DM_DEV_CREATE", &buf)?.info())
    }

    /// Loads `targets` as the device's inactive table; [`DmControl::resume`] makes it live.
    /// With `read_only` the table opens its devices read-only and the device refuses writes.
    ///
    /// * `Err(TableRejected)`: the kernel refused it (a target's constructor failed).
    pub fn load_table(
        &self,
        name: &str,
        targets: &[TargetSpec],
        read_only: bool,
    ) -> Result<(), DmError> {
        validate_name(name)?;
        if targets.is_empty() {
            return Err(DmError::InvalidArgument {
                what: "table",
                value: String::new(),
                reason: "it has no targets".into(),
            });
        }
        for t in targets {
            validate_target(t)?;
        }
        let payload = encode_table(targets);
        let flags = if read_only { FLAG_READONLY } else { 0 };
        let mut buf = encode_request(0, name, None, flags, targets.len() as u32, &payload);
        self.raw(CMD_TABLE_LOAD, &mut buf)
            .map_err(|errno| match errno {
                Errno::ENXIO => DmError::NoSuchDevice(name.to_string()),
                errno => DmError::TableRejected {
                    device: name.to_string(),
                    table: targets
                        .iter()
                        .map(|t| t.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                    errno,
                },
            })?;
        tracing::debug!(name, nr_targets = targets.len(), "dm load");
        Ok(())
    }

    /// Suspends the device: waits for in-flight IO, holds new IO. Suspending a suspended
    /// device is not an error.
    pub fn suspend(&self, name: &str) -> Result<DeviceInfo, DmError> {
        let info = self.device_cmd("DM_DEV_SUSPEND", CMD_DEV_SUSPEND, name, FLAG_SUSPEND)?;
        tracing::debug!(name, "dm suspend");
        Ok(info)
    }

    /// Resumes the device, first making a loaded table live. Returns its device number.
    pub fn resume(&self, name: &str) -> Result<DevId, DmError> {
        let info = self.device_cmd("DM_DEV_SUSPEND(resume)", CMD_DEV_SUSPEND, name, 0)?;
        tracing::debug!(name, dev = %info.dev, "dm resume");
        Ok(info.dev)
    }

    /// Removes the device and its `/dev/mapper` node.
    ///
    /// * `Err(DeviceBusy)`: it is open.
    /// * `Err(NoSuchDevice)`: it does not exist.
    pub fn remove(&self, name: &str) -> Result<(), DmError> {
        self.remove_with(name, 0)
    }

    /// Removes the device now if nothing has it open, or else when its last opener closes it
    /// (`DM_DEFERRED_REMOVE`). Returns true if the removal is still pending. The node is
    /// removed at once either way: openers keep their descriptors, and the name cannot be
    /// reused before the device is gone.
    pub fn remove_deferred(&self, name: &str) -> Result<bool, DmError> {
        self.remove_with(name, FLAG_DEFERRED_REMOVE)?;
        // A deferred remove of an open device succeeds and leaves the device in place.
        Ok(self.info(name)?.is_some_and(|i| i.deferred_remove))
    }

    fn remove_with(&self, name: &str, flags: u32) -> Result<(), DmError> {
        validate_name(name)?;
        let mut buf = encode_request(DM_IOCTL_SIZE, name, None, flags, 0, &[]);
        if let Err(errno) = self.raw(CMD_DEV_REMOVE, &mut buf) {
            return Err(match errno {
                Errno::EBUSY => DmError::DeviceBusy {
                    device: name.to_string(),
                    open_count: self.info(name).ok().flatten().map_or(0, |i| i.open_count),
                },
                e => Self::fail("DM_DEV_REMOVE", name, e),
            });
        }
        tracing::debug!(name, deferred = flags != 0, "dm remove");
        remove_node(name)
    }

    /// Sends `text` to the target at `sector` (e.g. `create_thin 3` to a thin-pool at 0).
    /// Returns the target's reply, if it gave one (thin-pool messages give none).
    ///
    /// Messages are sent once: a message may change state (`create_thin`), so one whose reply
    /// does not fit the 64 KiB buffer is reported as `ReplyTooLarge` rather than repeated.
    pub fn message(&self, name: &str, sector: u64, text: &str) -> Result<Option<String>, DmError> {
        validate_name(name)?;
        if text.trim().is_empty() || text.contains('\0') {
            return Err(DmError::InvalidArgument {
                what: "target message",
                value: text.to_string(),
                reason: "it is empty or contains a NUL byte".into(),
            });
        }
        let payload = encode_message(sector, text);
        let mut buf = encode_request(MESSAGE_BUFFER, name, None, 0, 0, &payload);
        self.raw(CMD_TARGET_MSG, &mut buf)
            .map_err(|errno| match errno {
                Errno::ENXIO => DmError::NoSuchDevice(name.to_string()),
                errno => DmError::MessageFailed {
                    device: name.to_string(),
                    message: text.to_string(),
                    errno,
                },
            })?;
        tracing::debug!(name, sector, message = text, "dm message");
        let reply = decode_reply("DM_TARGET_MSG", &buf)?;
        if reply.flags & FLAG_BUFFER_FULL != 0 {
            return Err(DmError::ReplyTooLarge {
                op: "DM_TARGET_MSG",
                device: name.to_string(),
                limit: MESSAGE_BUFFER,
            });
        }
        if reply.flags & FLAG_DATA_OUT == 0 {
            return Ok(None);
        }
        Ok(Some(c_str(reply.payload)))
    }

    fn table_status(&self, name: &str, flags: u32) -> Result<Vec<TargetStatus>, DmError> {
        validate_name(name)?;
        let buf = self
            .query("DM_TABLE_STATUS", CMD_TABLE_STATUS, name, flags, &[])
            .map_err(|e| Self::fail("DM_TABLE_STATUS", name, e))?;
        let reply = decode_reply("DM_TABLE_STATUS", &buf)?;
        if reply.flags & FLAG_ACTIVE_PRESENT == 0 {
            return Ok(Vec::new());
        }
        parse_targets(reply.payload, reply.target_count)
    }

    /// The status of each target of the live table (empty before the first resume).
    pub fn status(&self, name: &str) -> Result<Vec<TargetStatus>, DmError> {
        self.table_status(name, 0)
    }

    /// The live table, as it would be loaded (empty before the first resume).
    pub fn table(&self, name: &str) -> Result<Vec<TargetSpec>, DmError> {
        Ok(self
            .table_status(name, FLAG_STATUS_TABLE)?
            .into_iter()
            .map(|t| TargetSpec {
                start_sector: t.start_sector,
                length_sectors: t.length_sectors,
                target_type: t.target_type,
                params: t.params,
            })
            .collect())
    }

    /// What the kernel says about a device; `None` if it does not exist.
    pub fn info(&self, name: &str) -> Result<Option<DeviceInfo>, DmError> {
        match self.device_cmd("DM_DEV_STATUS", CMD_DEV_STATUS, name, 0) {
            Ok(info) => Ok(Some(info)),
            Err(DmError::NoSuchDevice(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every device-mapper device: its name and device number.
    pub fn list(&self) -> Result<Vec<(String, DevId)>, DmError> {
        let buf = self
            .query("DM_LIST_DEVICES", CMD_LIST_DEVICES, "", 0, &[])
            .map_err(|e| Self::fail("DM_LIST_DEVICES", "(all)", e))?;
        parse_name_list(decode_reply("DM_LIST_DEVICES", &buf)?.payload)
    }

    /// Every target type the kernel has registered (modules not yet loaded are missing).
    pub fn list_versions(&self) -> Result<Vec<TargetVersion>, DmError> {
        let buf = self
            .query("DM_LIST_VERSIONS", CMD_LIST_VERSIONS, "", 0, &[])
            .map_err(|e| Self::fail("DM_LIST_VERSIONS", "(all)", e))?;
        parse_versions(decode_reply("DM_LIST_VERSIONS", &buf)?.payload)
    }

    /// The version of one target type, asking the kernel to load its module if needed
    /// (DM_GET_TARGET_VERSION, interface 4.41 and later). `None` if the kernel does not know
    /// the type (or is too old to ask this way).
    pub fn target_version(&self, target_type: &str) -> Result<Option<TargetVersion>, DmError> {
        validate_target(&TargetSpec {
            start_sector: 0,
            length_sectors: 0,
            target_type: target_type.to_string(),
            params: String::new(),
        })?;
        // The target type travels in the name field.
        match self.query(
            "DM_GET_TARGET_VERSION",
            CMD_GET_TARGET_VERSION,
            target_type,
            0,
            &[],
        ) {
            Ok(buf) => Ok(
                parse_versions(decode_reply("DM_GET_TARGET_VERSION", &buf)?.payload)?
                    .into_iter()
                    .next(),
            ),
            Err(Errno::EINVAL | Errno::ENOTTY) => Ok(None),
            Err(e) => Err(Self::fail("DM_GET_TARGET_VERSION", target_type, e)),
        }
    }
}

//------------------------------------------------------------------------------------------------
// /dev/mapper nodes

/// `/dev/mapper/NAME`.
pub fn node_path(name: &str) -> PathBuf {
    Path::new(MAPPER_DIR).join(name)
}

/// Makes `/dev/mapper/NAME` a block node for `dev` (there is no udev in the test guest or on
/// minimal hosts). A node already there for the same device is kept; anything else at that
/// path (a stale node from an earlier device) is replaced.
pub fn make_node(name: &str, dev: DevId) -> Result<PathBuf, DmError> {
    validate_name(name)?;
    make_node_in(Path::new(MAPPER_DIR), name, dev)
}

fn make_node_in(dir: &Path, name: &str, dev: DevId) -> Result<PathBuf, DmError> {
    use nix::sys::stat::{mknod, Mode, SFlag};
    let path = dir.join(name);
    let node_err = |action, source| DmError::Node {
        action,
        path: path.clone(),
        source,
    };
    // Follows symlinks: udev makes /dev/mapper/NAME a link to ../dm-N.
    match std::fs::metadata(&path) {
        Ok(m) if m.file_type().is_block_device() && m.rdev() == dev.dev_t() => return Ok(path),
        Ok(_) => std::fs::remove_file(&path).map_err(|e| node_err("replace", e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A dangling symlink is still in the way.
            if std::fs::symlink_metadata(&path).is_ok() {
                std::fs::remove_file(&path).map_err(|e| node_err("replace", e))?;
            }
        }
        Err(e) => return Err(node_err("inspect", e)),
    }
    std::fs::create_dir_all(dir).map_err(|e| node_err("create the folder of", e))?;
    mknod(
        &path,
        SFlag::S_IFBLK,
        Mode::from_bits_truncate(0o600),
        dev.dev_t(),
    )
    .map_err(|e| node_err("make", e.into()))?;
    Ok(path)
}

/// Removes `/dev/mapper/NAME` if it is there.
pub fn remove_node(name: &str) -> Result<(), DmError> {
    let path = node_path(name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DmError::Node {
            action: "remove",
            path,
            source,
        }),
    }
}

#[cfg(test)]
mod tests;
