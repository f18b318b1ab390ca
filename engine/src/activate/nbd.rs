//! An NBD server for thins: the newstyle fixed handshake and simple replies, from the
//! protocol description (NetworkBlockDevice/nbd doc/proto.md).
//!
//! Each connection is served by [`WORKERS`] threads taking turns at reading: the thread that
//! reads a request runs it and replies, while the next one reads. A client with many
//! requests in flight (a queue depth above one) gets them served at once, each reply sent
//! as its request completes (simple replies carry the request's cookie, and the protocol
//! lets them come back in any order); at queue depth one no request changes threads, so
//! there is no hand-off in its path. Payloads of requests in flight are bounded
//! ([`MAX_IN_FLIGHT_BYTES`]): a client cannot make the server hold more. Every export is one
//! thin, opened for the connection's lifetime. A flush (or a FUA request) commits the pool:
//! commits are pool-wide, so a flush covers every write any connection completed before it,
//! which is what the protocol asks, and exports advertise CAN_MULTI_CONN. A listener serves
//! at most [`MAX_CONNECTIONS`] connections at once and closes more as they come.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::thin::device::Thin;
use crate::thin::pool::Pool;
use crate::units::ThinId;

// ---- protocol constants ----------------------------------------------------------------

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

// Option replies.
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

// Info types.
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
const TF_HAS_FLAGS: u16 = 1 << 0;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TF_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands and command flags.
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1 << 0;

// Errors in replies (Linux errno values, as the protocol fixes them).
const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// The largest READ or WRITE payload accepted (and advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 << 20;
/// Requests of one connection served at once.
pub const WORKERS: usize = 8;
/// Bytes of payload (written or to be read back) one connection may have in flight.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// Connections one listener serves at once; more are closed before the handshake. Each
/// takes up to [`WORKERS`] threads and [`MAX_IN_FLIGHT_BYTES`], so this bounds a listener
/// at 256 threads and 2 GiB of payload, where unlimited idle connections could exhaust
/// either. Clients that open several connections for throughput use a few each (nbdcopy
/// opens 4 by default).
pub const MAX_CONNECTIONS: usize = 32;
/// The largest option payload accepted in the handshake; longer ones end the connection.
const MAX_OPTION: u32 = 64 << 10;
/// Zeros are written this much at a time for WRITE_ZEROES.
const ZERO_CHUNK: usize = 1 << 20;

/// One exported thin.
#[derive(Clone, Debug)]
pub struct Export {
    pub id: ThinId,
    /// The thin's name in the volume store, also accepted as an export name.
    pub alias: Option<String>,
    pub size: u64,
    pub read_only: bool,
}

impl Export {
    fn flags(&self) -> u16 {
        let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN;
        if self.read_only {
            flags |= TF_READ_ONLY;
        } else {
            flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
        }
        flags
    }
}

/// What every connection shares: the pool and the exports.
pub struct Server {
    pool: Arc<Pool>,
    exports: Vec<Export>,
}

impl Server {
    pub fn new(pool: Arc<Pool>, exports: Vec<Export>) -> Server {
        Server { pool, exports }
    }

    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    /// An export by id or by name; the empty (default) name means the first export.
    fn find(&self, name: &str) -> Option<&Export> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports
            .iter()
            .find(|e| e.id.to_string() == name || e.alias.as_deref() == Some(name))
    }

    fn preferred_block_size(&self) -> u32 {
        let bs = self.pool.block_size().bytes();
        if bs.is_power_of_two() && bs <= u64::from(MAX_REQUEST) {
            bs as u32
        } else {
            4096
        }
    }

    /// Serves one connection to its end: the handshake, then requests until the client
    /// disconnects. Errors are the connection's (a peer gone, a protocol violation).
    pub fn serve<S: NbdStream>(&self, stream: &mut S) -> io::Result<()> {
        let Some(export) = self.handshake(stream)? else {
            return Ok(());
        };
        let thin = self
            .pool
            .open_thin(export.id)
            .map_err(|e| io::Error::other(format!("cannot open thin {}: {e}", export.id)))?;
        let conn = Connection {
            export,
            thin,
            dirty: AtomicBool::new(false),
        };
        let result = conn.transmit(stream);
        // Writes the client never flushed are committed when it goes; flushes are what make
        // them durable by the protocol, this only narrows the window.
        if conn.dirty.load(Ordering::Acquire) {
            if let Err(e) = conn.thin.flush() {
                tracing::warn!(thin = %export.id, "commit after disconnect failed: {e}");
            }
        }
        result
    }

    /// The handshake. Returns the export chosen by NBD_OPT_GO or NBD_OPT_EXPORT_NAME, or
    /// None when the client aborted or the connection should close.
    fn handshake<S: Read + Write>(&self, s: &mut S) -> io::Result<Option<&Export>> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello)?;
        s.flush()?;
        let client_flags = read_u32(s)?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            tracing::debug!("client sent unknown flags {client_flags:#x}; closing");
            return Ok(None);
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        loop {
            if read_u64(s)? != IHAVEOPT {
                tracing::debug!("bad option magic; closing");
                return Ok(None);
            }
            let opt = read_u32(s)?;
            let len = read_u32(s)?;
            if len > MAX_OPTION {
                tracing::debug!("option {opt} of {len} bytes is too long; closing");
                return Ok(None);
            }
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data)?;
            match opt {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data);
                    let Some(export) = self.find(&name) else {
                        tracing::debug!("unknown export {name:?} (EXPORT_NAME); closing");
                        return Ok(None);
                    };
                    let mut reply = Vec::with_capacity(134);
                    reply.extend_from_slice(&export.size.to_be_bytes());
                    reply.extend_from_slice(&export.flags().to_be_bytes());
                    if !no_zeroes {
                        reply.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&reply)?;
                    s.flush()?;
                    return Ok(Some(export));
                }
                OPT_ABORT => {
                    // The client need not wait for this; a failure to send it is no matter.
                    let _ = opt_reply(s, opt, REP_ACK, &[]);
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        opt_reply(s, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    for e in &self.exports {
                        let id = e.id.to_string();
                        let names = std::iter::once(id.as_str()).chain(e.alias.as_deref());
                        for name in names {
                            let mut body = Vec::with_capacity(4 + name.len());
                            body.extend_from_slice(&(name.len() as u32).to_be_bytes());
                            body.extend_from_slice(name.as_bytes());
                            opt_reply(s, opt, REP_SERVER, &body)?;
                        }
                    }
                    opt_reply(s, opt, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    let Some((name, _requests)) = parse_info_request(&data) else {
                        opt_reply(s, opt, REP_ERR_INVALID, b"malformed info request")?;
                        continue;
                    };
                    let Some(export) = self.find(&name) else {
                        let msg = format!("no export named {name:?}");
                        opt_reply(s, opt, REP_ERR_UNKNOWN, msg.as_bytes())?;
                        continue;
                    };
                    let mut info = Vec::with_capacity(12);
                    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                    info.extend_from_slice(&export.size.to_be_bytes());
                    info.extend_from_slice(&export.flags().to_be_bytes());
                    opt_reply(s, opt, REP_INFO, &info)?;
                    // Any alignment is served (minimum 1), so sending this unasked is safe.
                    let mut sizes = Vec::with_capacity(14);
                    sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    sizes.extend_from_slice(&1u32.to_be_bytes());
                    sizes.extend_from_slice(&self.preferred_block_size().to_be_bytes());
                    sizes.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    opt_reply(s, opt, REP_INFO, &sizes)?;
                    opt_reply(s, opt, REP_ACK, &[])?;
                    if opt == OPT_GO {
                        return Ok(Some(export));
                    }
                }
                _ => {
                    opt_reply(s, opt, REP_ERR_UNSUP, b"option not supported")?;
                }
            }
        }
    }
}

/// `u32 name length, name, u16 count, count × u16` → (name, requested info types).
fn parse_info_request(data: &[u8]) -> Option<(String, Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return None;
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((String::from_utf8(name.to_vec()).ok()?, requests))
}

fn opt_reply<S: Write>(s: &mut S, opt: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&opt.to_be_bytes());
    buf.extend_from_slice(&reply.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    s.write_all(&buf)?;
    s.flush()
}

fn read_u32<S: Read>(s: &mut S) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64<S: Read>(s: &mut S) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// The errno a failed engine call is reported as.
fn errno(e: &Error) -> u32 {
    match e {
        Error::NoDataSpace | Error::NoMetadataSpace => ENOSPC,
        Error::ReadOnly(_) => EPERM,
        Error::InvalidArgument(_) => EINVAL,
        _ => EIO,
    }
}

/// A connection's stream: the workers read requests from it in turn and write replies to a
/// second handle on it.
pub trait NbdStream: Read + Write + Send + Sized {
    fn try_clone_stream(&self) -> io::Result<Self>;
}

impl NbdStream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl NbdStream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// A request read off the wire, with a WRITE's payload.
struct Request {
    kind: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: Vec<u8>,
    /// Bytes counted against the connection's in-flight budget.
    charged: usize,
}

/// Bytes in flight on a connection, bounded: the reader waits for room before taking on a
/// request. One request alone may take more than the bound (up to [`MAX_REQUEST`]), so a big
/// request never waits forever.
struct InFlight {
    bytes: Mutex<usize>,
    room: Condvar,
}

impl InFlight {
    fn new() -> InFlight {
        InFlight {
            bytes: Mutex::new(0),
            room: Condvar::new(),
        }
    }

    fn take(&self, n: usize) {
        let mut bytes = self.bytes.lock();
        while *bytes > 0 && *bytes + n > MAX_IN_FLIGHT_BYTES {
            self.room.wait(&mut bytes);
        }
        *bytes += n;
    }

    fn give_back(&self, n: usize) {
        *self.bytes.lock() -= n;
        self.room.notify_all();
    }
}

/// The reading side of a connection, taken in turns; `end` is set by the worker that saw
/// the connection end (and how).
struct Requests<'s, S> {
    stream: &'s mut S,
    end: Option<io::Result<()>>,
}

/// Reads the next request (with a WRITE's payload, once the in-flight budget has room for
/// it). `None` at NBD_CMD_DISC or at the client's end of file.
fn read_request<S: Read>(s: &mut S, in_flight: &InFlight) -> io::Result<Option<Request>> {
    let mut hdr = [0u8; 28];
    match s.read_exact(&mut hdr) {
        Ok(()) => {}
        // A client that just goes away ends the connection like NBD_CMD_DISC.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let magic = u32::from_be_bytes(hdr[0..4].try_into().unwrap());
    if magic != REQUEST_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad request magic {magic:#x}"),
        ));
    }
    let mut request = Request {
        flags: u16::from_be_bytes(hdr[4..6].try_into().unwrap()),
        kind: u16::from_be_bytes(hdr[6..8].try_into().unwrap()),
        cookie: u64::from_be_bytes(hdr[8..16].try_into().unwrap()),
        offset: u64::from_be_bytes(hdr[16..24].try_into().unwrap()),
        len: u32::from_be_bytes(hdr[24..28].try_into().unwrap()),
        payload: Vec::new(),
        charged: 0,
    };
    match request.kind {
        CMD_DISC => return Ok(None),
        CMD_WRITE if request.len > MAX_REQUEST => {
            // Drained, not held: a hostile length costs time, not memory. `run` answers
            // EINVAL for it.
            io::copy(&mut s.take(u64::from(request.len)), &mut io::sink())?;
        }
        CMD_WRITE => {
            request.charged = request.len as usize;
            in_flight.take(request.charged);
            request.payload = vec![0u8; request.len as usize];
            if let Err(e) = s.read_exact(&mut request.payload) {
                in_flight.give_back(request.charged);
                return Err(e);
            }
        }
        CMD_READ if request.len <= MAX_REQUEST => {
            // The data to send back is allocated by `run`.
            request.charged = request.len as usize;
            in_flight.take(request.charged);
        }
        _ => {}
    }
    Ok(Some(request))
}

struct Connection<'a> {
    export: &'a Export,
    thin: Thin,
    /// Something was written since the last commit this connection made.
    dirty: AtomicBool,
}

impl Connection<'_> {
    /// The transmission phase, on [`WORKERS`] threads (this one among them). Ends at
    /// NBD_CMD_DISC, at the client's end of file, or at a protocol error; requests already
    /// read are answered first.
    fn transmit<S: NbdStream>(&self, s: &mut S) -> io::Result<()> {
        let replies = Mutex::new(s.try_clone_stream()?);
        let requests = Mutex::new(Requests {
            stream: s,
            end: None,
        });
        let in_flight = InFlight::new();
        thread::scope(|scope| {
            for _ in 1..WORKERS {
                scope.spawn(|| self.work(&requests, &replies, &in_flight));
            }
            self.work(&requests, &replies, &in_flight);
        });
        requests.into_inner().end.unwrap_or(Ok(()))
    }

    /// One worker: read a request (holding the reader's turn), run it, reply; until the
    /// connection ends.
    fn work<S: NbdStream>(
        &self,
        requests: &Mutex<Requests<'_, S>>,
        replies: &Mutex<S>,
        in_flight: &InFlight,
    ) {
        loop {
            let request = {
                let mut turn = requests.lock();
                if turn.end.is_some() {
                    return;
                }
                match read_request(turn.stream, in_flight) {
                    Ok(Some(request)) => request,
                    Ok(None) => {
                        turn.end = Some(Ok(()));
                        return;
                    }
                    Err(e) => {
                        turn.end = Some(Err(e));
                        return;
                    }
                }
            };
            let charged = request.charged;
            let reply = self.run(request);
            // A reply that cannot be sent means the peer is gone: the reader sees that too
            // and ends the connection.
            let mut out = replies.lock();
            if let Err(e) = out.write_all(&reply).and_then(|()| out.flush()) {
                tracing::debug!(thin = %self.export.id, "reply not sent: {e}");
            }
            drop(out);
            in_flight.give_back(charged);
        }
    }

    /// Runs one request; returns the whole reply (header, and data for a read).
    fn run(&self, r: Request) -> Vec<u8> {
        let fua = r.flags & CMD_FLAG_FUA != 0;
        let error = match r.kind {
            CMD_READ => return self.read(r.cookie, r.offset, r.len),
            CMD_WRITE => self.write(&r.payload, r.offset, r.len, fua),
            CMD_FLUSH => self.flush(),
            CMD_TRIM => self
                .check_change(r.offset, r.len)
                .or_else(|| self.done(self.thin.discard(r.offset, u64::from(r.len)), fua)),
            CMD_WRITE_ZEROES => self
                .check_change(r.offset, r.len)
                .or_else(|| self.done(self.write_zeroes(r.offset, r.len), fua)),
            _ => Some(EINVAL),
        };
        reply_bytes(r.cookie, error, &[])
    }

    /// EINVAL for a range past the export's end.
    fn check_range(&self, offset: u64, len: u32) -> Option<u32> {
        match offset.checked_add(u64::from(len)) {
            Some(end) if end <= self.export.size => None,
            _ => Some(EINVAL),
        }
    }

    /// EPERM on a read-only export, else as [`Connection::check_range`].
    fn check_change(&self, offset: u64, len: u32) -> Option<u32> {
        if self.export.read_only {
            return Some(EPERM);
        }
        self.check_range(offset, len)
    }

    /// After a change: marks the connection dirty, commits for FUA, and gives the errno.
    fn done(&self, result: crate::Result<()>, fua: bool) -> Option<u32> {
        self.dirty.store(true, Ordering::Release);
        if let Err(e) = result {
            tracing::warn!(thin = %self.export.id, "request failed: {e}");
            return Some(errno(&e));
        }
        if fua {
            return self.flush();
        }
        None
    }

    fn flush(&self) -> Option<u32> {
        // Cleared before the commit: a write completing meanwhile sets it again.
        self.dirty.store(false, Ordering::Release);
        match self.thin.flush() {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(thin = %self.export.id, "flush failed: {e}");
                Some(errno(&e))
            }
        }
    }

    fn read(&self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        if len > MAX_REQUEST {
            return reply_bytes(cookie, EINVAL, &[]);
        }
        if let Some(error) = self.check_range(offset, len) {
            return reply_bytes(cookie, error, &[]);
        }
        let mut buf = vec![0u8; 16 + len as usize];
        if let Err(e) = self.thin.read(&mut buf[16..], offset) {
            tracing::warn!(thin = %self.export.id, "read failed: {e}");
            return reply_bytes(cookie, errno(&e), &[]);
        }
        put_reply_header(&mut buf[..16], cookie, 0);
        buf
    }

    /// A WRITE whose payload was read (one past [`MAX_REQUEST`] was drained: EINVAL).
    fn write(&self, data: &[u8], offset: u64, len: u32, fua: bool) -> Option<u32> {
        if len > MAX_REQUEST {
            return Some(EINVAL);
        }
        if let Some(error) = self.check_change(offset, len) {
            return Some(error);
        }
        self.done(self.thin.write(data, offset), fua)
    }

    fn write_zeroes(&self, offset: u64, len: u32) -> crate::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut at = 0u64;
        while at < u64::from(len) {
            let n = (u64::from(len) - at).min(zeros.len() as u64) as usize;
            self.thin.write(&zeros[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }
}

fn put_reply_header(buf: &mut [u8], cookie: u64, error: u32) {
    buf[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    buf[4..8].copy_from_slice(&error.to_be_bytes());
    buf[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// A simple reply: the header, then `data`.
fn reply_bytes(cookie: u64, error: impl Into<Option<u32>>, data: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; 16 + data.len()];
    put_reply_header(&mut buf[..16], cookie, error.into().unwrap_or(0));
    buf[16..].copy_from_slice(data);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parses() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_info_request(&d), Some(("abc".to_string(), vec![3])));
        assert_eq!(parse_info_request(&d[..d.len() - 1]), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 9]), None);
    }

    /// Found by review: every connection got its threads, however many were open. Those past
    /// the cap are closed before the greeting, and a place freed is taken again.
    #[test]
    fn connections_past_the_cap_are_closed_and_the_listener_still_serves() {
        use std::time::{Duration, Instant};

        use crate::io::{BlockDevice, MemDevice};
        use crate::thin::pool::PoolOptions;
        use crate::units::DataBlockSize;

        let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20));
        let data: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(16 << 20));
        let pool =
            Pool::format(meta, data, DataBlockSize::DEFAULT, PoolOptions::default()).unwrap();
        let export = Export {
            id: ThinId::new(1).unwrap(),
            alias: None,
            size: 1 << 20,
            read_only: false,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let listener = NbdListener::start(
            Arc::new(Server::new(pool, vec![export])),
            &Listen::Unix(path.clone()),
        )
        .unwrap();
        // The server's greeting, or None when the connection was closed without one.
        let greeted = || {
            let mut s = UnixStream::connect(&path).unwrap();
            let mut hello = [0u8; 18];
            match s.read_exact(&mut hello) {
                Ok(()) => {
                    assert_eq!(hello[..8], NBDMAGIC.to_be_bytes());
                    Some(s)
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => None,
                Err(e) => panic!("{e}"),
            }
        };
        // Each one greeted is counted in before the next connects.
        let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| greeted().expect("served"))
            .collect();
        assert!(greeted().is_none(), "a connection past the cap was served");

        // The place of a closed connection is free once its thread has seen the end.
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(30);
        while greeted().is_none() {
            assert!(Instant::now() < deadline, "no place was freed");
            thread::sleep(Duration::from_millis(10));
        }
        drop(held);
        listener.stop();
    }
}

/// The exports for thins `ids` of `volumes` (every thin with a record when `ids` is empty),
/// named by id and by their names.
pub fn exports_for(
    volumes: &crate::store::Volumes,
    ids: &[ThinId],
    read_only: bool,
) -> Result<Vec<Export>> {
    let read_only = read_only || volumes.pool().options().read_only;
    let ids: Vec<ThinId> = if ids.is_empty() {
        let mut all: Vec<ThinId> = volumes.store().volumes().map(|v| v.id).collect();
        all.sort();
        all
    } else {
        ids.to_vec()
    };
    if ids.is_empty() {
        return Err(Error::InvalidArgument(
            "the pool has no thins to export".into(),
        ));
    }
    ids.into_iter()
        .map(|id| {
            let volume = volumes.volume(id)?;
            Ok(Export {
                id,
                alias: volume.name.clone(),
                size: volume.size_bytes,
                read_only,
            })
        })
        .collect()
}

/// How exports are named in messages: `1 (base), 2`.
pub fn describe(exports: &[Export]) -> String {
    exports
        .iter()
        .map(|e| match &e.alias {
            Some(n) => format!("{} ({n})", e.id),
            None => e.id.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---- listening --------------------------------------------------------------------------

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Listen {
    Unix(PathBuf),
    /// `HOST:PORT`.
    Tcp(String),
}

impl Listen {
    /// `unix:PATH` or `tcp:HOST:PORT`.
    pub fn parse(text: &str) -> Option<Listen> {
        if let Some(path) = text.strip_prefix("unix:") {
            (!path.is_empty()).then(|| Listen::Unix(PathBuf::from(path)))
        } else if let Some(addr) = text.strip_prefix("tcp:") {
            addr.rsplit_once(':').map(|_| Listen::Tcp(addr.to_string()))
        } else {
            None
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A listening NBD server: one thread accepts, one per connection serves. [`NbdListener::stop`]
/// (or dropping it) stops accepting and removes a unix socket; connections already open
/// run on until their clients disconnect.
pub struct NbdListener {
    listen: Listen,
    stopping: Arc<AtomicBool>,
}

fn listen_error(listen: &Listen, e: io::Error) -> Error {
    Error::ActivationIo {
        what: format!("failed to listen on {listen}"),
        source: e,
    }
}

impl NbdListener {
    /// Listens on `listen` and serves `server` there. A unix socket left behind by a server
    /// that died is replaced; any other file in the way is refused.
    pub fn start(server: Arc<Server>, listen: &Listen) -> Result<NbdListener> {
        let stopping = Arc::new(AtomicBool::new(false));
        match listen {
            Listen::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        return Err(Error::InvalidArgument(format!(
                            "{} exists and is not a socket",
                            path.display()
                        )));
                    }
                    if UnixStream::connect(path).is_ok() {
                        return Err(Error::Busy {
                            what: path.display().to_string(),
                            holder: "another server listens there".into(),
                        });
                    }
                    std::fs::remove_file(path).map_err(|e| listen_error(listen, e))?;
                }
                let listener = UnixListener::bind(path).map_err(|e| listen_error(listen, e))?;
                // An export reads and writes a thin: only its user (and root) may connect.
                // The mode bars others from then on; a peer that connected before the chmod
                // is refused by its credentials.
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| listen_error(listen, e))?;
                let stop = stopping.clone();
                spawn_acceptor(
                    move || loop {
                        let (stream, _) = listener.accept()?;
                        if super::peer_is_trusted(&stream) {
                            return Ok((!stop.load(Ordering::Acquire)).then_some(stream));
                        }
                        tracing::warn!("refused an NBD client of another user");
                    },
                    server,
                )?;
            }
            Listen::Tcp(addr) => {
                let listener = TcpListener::bind(addr).map_err(|e| listen_error(listen, e))?;
                let stop = stopping.clone();
                spawn_acceptor(
                    move || {
                        let (stream, _) = listener.accept()?;
                        let _ = stream.set_nodelay(true);
                        Ok((!stop.load(Ordering::Acquire)).then_some(stream))
                    },
                    server,
                )?;
            }
        }
        Ok(NbdListener {
            listen: listen.clone(),
            stopping,
        })
    }

    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// Stops accepting (the accept thread is woken by one last connection of ours).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for NbdListener {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        match &self.listen {
            Listen::Unix(path) => {
                let _ = UnixStream::connect(path);
                let _ = std::fs::remove_file(path);
            }
            Listen::Tcp(addr) => {
                let _ = TcpStream::connect(addr);
            }
        }
    }
}

/// One connection counted in [`MAX_CONNECTIONS`], until it is dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `accept` in a thread until it returns `Ok(None)` (stopping), serving each stream in
/// a thread of its own, at most [`MAX_CONNECTIONS`] at once.
fn spawn_acceptor<S, F>(mut accept: F, server: Arc<Server>) -> Result<()>
where
    S: NbdStream + 'static,
    F: FnMut() -> io::Result<Option<S>> + Send + 'static,
{
    let served = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || loop {
            match accept() {
                Ok(Some(mut stream)) => {
                    // Only this thread adds, so the count cannot pass the cap.
                    if served.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                        tracing::warn!(
                            "refused an nbd client: {MAX_CONNECTIONS} connections are served \
                             already"
                        );
                        continue;
                    }
                    served.fetch_add(1, Ordering::AcqRel);
                    let slot = Slot(served.clone());
                    let server = server.clone();
                    let spawned = thread::Builder::new()
                        .name("nbd-conn".into())
                        .spawn(move || {
                            let _slot = slot;
                            if let Err(e) = server.serve(&mut stream) {
                                tracing::info!("nbd connection ended: {e}");
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::warn!("failed to start an nbd connection thread: {e}");
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("nbd accept failed: {e}");
                    thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        })
        .map(drop)
        .map_err(|e| Error::ActivationIo {
            what: "failed to start the nbd accept thread".into(),
            source: e,
        })
}
