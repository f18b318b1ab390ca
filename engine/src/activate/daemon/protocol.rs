//! The daemon's wire protocol on its unix socket.
//!
//! A connection carries any number of request/reply exchanges, one at a time. Each message
//! is one line of JSON. Two carry raw bytes right after their line: a `write` request is
//! followed by exactly `length` bytes, and the reply to a `read` is followed by exactly
//! `length` bytes when it is `ok`. Nothing else is ever on the wire, so a client can always
//! tell where the next message starts.
//!
//! The operations are the kernel's pool messages (`create_thin`, `create_snap`, `delete`,
//! `set_transaction_id`, `reserve_metadata_snap`, `release_metadata_snap`) plus status,
//! listing, byte IO, activation and stop.

use std::io::{self, BufRead, Read, Write};

use serde::{Deserialize, Serialize};

use crate::activate::control::{Activation, ControlStatus, ThinInfo};
use crate::activate::nbd::Listen;
use crate::error::Error;
use crate::units::ThinId;

/// Longest JSON line either side accepts (a listing of many thins fits easily).
pub const MAX_LINE: usize = 16 << 20;

/// Largest byte payload of one read or write.
pub const MAX_PAYLOAD: u64 = 16 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    List,
    CreateThin {
        id: u64,
        size_bytes: u64,
        name: Option<String>,
    },
    CreateSnap {
        id: u64,
        origin: u64,
        name: Option<String>,
    },
    Delete {
        id: u64,
    },
    Rename {
        id: u64,
        name: Option<String>,
    },
    SetTransactionId {
        old: u64,
        new: u64,
    },
    ReserveMetadataSnap,
    ReleaseMetadataSnap,
    ResizePool {
        data_bytes: Option<u64>,
        metadata_bytes: Option<u64>,
    },
    SizeOf {
        id: u64,
    },
    /// Reply: `ok` then `length` bytes.
    Read {
        id: u64,
        offset: u64,
        length: u64,
    },
    /// Followed by `length` bytes.
    Write {
        id: u64,
        offset: u64,
        length: u64,
    },
    Discard {
        id: u64,
        offset: u64,
        length: u64,
    },
    Flush,
    Activate {
        id: u64,
        read_only: bool,
    },
    Deactivate {
        id: u64,
        deferred: bool,
    },
    /// Serves thins `ids` (every thin when empty) over NBD at `listen` for as long as this
    /// connection stays open. Reply: `exports`, the names served.
    ServeNbd {
        listen: Listen,
        ids: Vec<u64>,
        read_only: bool,
    },
    /// Stops the daemon after deactivating every thin. Without `force` it is refused while
    /// any active thin is in use; with it, busy thins are detached when their users close
    /// them and their filesystems see IO errors once the daemon is gone.
    Stop {
        force: bool,
    },
}

/// A reply. Exactly one of the optional fields is set on success, as the request implies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RemoteError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ControlStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thins: Option<Vec<ThinInfo>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exports: Option<String>,
    /// Bytes that follow the line (a `read`'s data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            ..Reply::default()
        }
    }

    pub fn failed(e: &Error) -> Reply {
        Reply {
            ok: false,
            error: Some(RemoteError::from(e)),
            ..Reply::default()
        }
    }
}

/// An engine error as it crosses the socket: the kinds callers decide on keep their type,
/// the rest travel as text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RemoteError {
    NoSuchThin { id: u64 },
    ThinExists { id: u64 },
    ThinBusy { id: u64 },
    Busy { what: String, holder: String },
    NoDataSpace,
    NoMetadataSpace,
    ReadOnly { reason: String },
    NeedsCheck,
    InvalidArgument { message: String },
    TransactionIdMismatch { expected: u64, actual: u64 },
    MetadataSnapExists,
    NoMetadataSnap,
    Other { message: String },
}

impl From<&Error> for RemoteError {
    fn from(e: &Error) -> RemoteError {
        match e {
            Error::NoSuchThin(id) => RemoteError::NoSuchThin { id: id.get() },
            Error::ThinExists(id) => RemoteError::ThinExists { id: id.get() },
            Error::ThinBusy(id) => RemoteError::ThinBusy { id: id.get() },
            Error::Busy { what, holder } => RemoteError::Busy {
                what: what.clone(),
                holder: holder.clone(),
            },
            Error::NoDataSpace => RemoteError::NoDataSpace,
            Error::NoMetadataSpace => RemoteError::NoMetadataSpace,
            Error::ReadOnly(reason) => RemoteError::ReadOnly {
                reason: reason.clone(),
            },
            Error::NeedsCheck => RemoteError::NeedsCheck,
            Error::InvalidArgument(message) => RemoteError::InvalidArgument {
                message: message.clone(),
            },
            Error::TransactionIdMismatch { expected, actual } => {
                RemoteError::TransactionIdMismatch {
                    expected: *expected,
                    actual: *actual,
                }
            }
            Error::MetadataSnapExists => RemoteError::MetadataSnapExists,
            Error::NoMetadataSnap => RemoteError::NoMetadataSnap,
            other => {
                // The whole chain: the source often holds the cause (an errno).
                let mut message = other.to_string();
                let mut source = std::error::Error::source(other);
                while let Some(cause) = source {
                    message.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                RemoteError::Other { message }
            }
        }
    }
}

impl From<RemoteError> for Error {
    fn from(e: RemoteError) -> Error {
        let id = |id: u64| ThinId::new(id).ok_or(Error::BadThinId(id));
        match e {
            RemoteError::NoSuchThin { id: n } => id(n).map_or_else(|e| e, Error::NoSuchThin),
            RemoteError::ThinExists { id: n } => id(n).map_or_else(|e| e, Error::ThinExists),
            RemoteError::ThinBusy { id: n } => id(n).map_or_else(|e| e, Error::ThinBusy),
            RemoteError::Busy { what, holder } => Error::Busy { what, holder },
            RemoteError::NoDataSpace => Error::NoDataSpace,
            RemoteError::NoMetadataSpace => Error::NoMetadataSpace,
            RemoteError::ReadOnly { reason } => Error::ReadOnly(reason),
            RemoteError::NeedsCheck => Error::NeedsCheck,
            RemoteError::InvalidArgument { message } => Error::InvalidArgument(message),
            RemoteError::TransactionIdMismatch { expected, actual } => {
                Error::TransactionIdMismatch { expected, actual }
            }
            RemoteError::MetadataSnapExists => Error::MetadataSnapExists,
            RemoteError::NoMetadataSnap => Error::NoMetadataSnap,
            RemoteError::Other { message } => Error::Activation(format!("pool daemon: {message}")),
        }
    }
}

/// Writes one message line.
pub fn send<T: Serialize>(out: &mut impl Write, message: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)
}

/// Reads one message line; `Ok(None)` at a clean end of stream.
pub fn receive<T: for<'de> Deserialize<'de>>(input: &mut impl BufRead) -> io::Result<Option<T>> {
    let mut line = Vec::new();
    let n = input
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            if n > MAX_LINE {
                "message line too long"
            } else {
                "connection closed in the middle of a message"
            },
        ));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_one_line_each() {
        let requests = [
            Request::CreateThin {
                id: 3,
                size_bytes: 1 << 30,
                name: Some("base".into()),
            },
            Request::Write {
                id: 3,
                offset: 4096,
                length: 512,
            },
            Request::Rename {
                id: 3,
                name: Some("renamed".into()),
            },
            Request::Stop { force: false },
        ];
        let mut wire = Vec::new();
        for r in &requests {
            send(&mut wire, r).unwrap();
        }
        assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), requests.len());
        let mut input = &wire[..];
        for r in &requests {
            assert_eq!(receive::<Request>(&mut input).unwrap().as_ref(), Some(r));
        }
        assert_eq!(receive::<Request>(&mut input).unwrap(), None);
    }

    #[test]
    fn typed_errors_keep_their_type_across_the_socket() {
        let id = ThinId::new(7).unwrap();
        let back = Error::from(RemoteError::from(&Error::NoSuchThin(id)));
        assert!(matches!(back, Error::NoSuchThin(i) if i == id));
        let busy = Error::Busy {
            what: "/dev/loop3".into(),
            holder: "mounted on /mnt".into(),
        };
        assert_eq!(
            Error::from(RemoteError::from(&busy)).to_string(),
            busy.to_string()
        );
    }

    #[test]
    fn garbage_and_truncation_are_errors_not_panics() {
        for wire in [
            &b"{\"op\":\"status\""[..],
            b"not json\n",
            b"{\"op\":\"nope\"}\n",
        ] {
            let mut input = wire;
            assert!(receive::<Request>(&mut input).is_err());
        }
    }
}
