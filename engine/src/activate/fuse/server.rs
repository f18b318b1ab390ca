//! The request loop: each worker reads requests from its own `/dev/fuse` fd into a buffer it
//! owns, serves them against the shared file table and writes each reply with one `write`.
//!
//! Nothing on the READ/WRITE path allocates: READ data goes from the pool straight into the
//! reply buffer after its header, WRITE data goes to the pool straight from the request buffer.
//! Every length and offset in a request is checked before use; a malformed request gets EINVAL
//! (or EIO) and never a panic.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use parking_lot::{Condvar, Mutex, RwLock};

use super::proto::{self, op, Attr, InHeader, Reader, Writer};
use crate::error::Error;
use crate::thin::device::Thin;

/// The inode number of the mount's root directory (`FUSE_ROOT_ID`).
pub(super) const ROOT_INO: u64 = 1;

/// How long the kernel may cache a file's attributes. A file's size and mode never change
/// while it is published (a re-added name is a new inode), so a second is safe and saves
/// GETATTRs; only `st_blocks` may lag by that much.
const ATTR_VALID: Duration = Duration::from_secs(1);

/// One published file.
pub(super) struct Node {
    pub ino: u64,
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    /// `None` once the file is removed: requests on handles still open fail with EIO.
    pub thin: RwLock<Option<Thin>>,
    /// OPENs not yet RELEASEd.
    pub open: AtomicUsize,
    /// The kernel's lookup count (LOOKUPs answered minus FORGETs). Changed only under the
    /// file table's lock: increments under the read lock, decrements under the write lock.
    pub lookups: AtomicU64,
    pub removed: AtomicBool,
}

/// The directory: names for lookup, and inodes the kernel may still hold (a removed file's
/// inode stays until the kernel forgets it, so late requests get EIO rather than ESTALE).
#[derive(Default)]
pub(super) struct Files {
    pub names: HashMap<String, Arc<Node>>,
    pub nodes: HashMap<u64, Arc<Node>>,
}

/// What INIT settled, for `FuseExport::mount` to wait on.
pub(super) enum InitState {
    Pending,
    Done,
    Failed(String),
}

/// State shared by the workers and the `FuseExport` handle.
pub(super) struct Shared {
    pub files: RwLock<Files>,
    pub next_ino: AtomicU64,
    dirs: Mutex<HashMap<u64, Arc<[DirEntry]>>>,
    next_dir_fh: AtomicU64,
    pub init: Mutex<InitState>,
    pub init_done: Condvar,
    /// Every timestamp the mount shows: when it was mounted.
    time_secs: u64,
}

struct DirEntry {
    ino: u64,
    kind: u32,
    name: String,
}

/// What a handler answers.
enum Reply {
    /// Nothing goes back (FORGET, INTERRUPT).
    None,
    /// Success with this many payload bytes already in the reply buffer.
    Ok(usize),
    Err(Errno),
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            files: RwLock::new(Files::default()),
            next_ino: AtomicU64::new(ROOT_INO + 1),
            dirs: Mutex::new(HashMap::new()),
            next_dir_fh: AtomicU64::new(1),
            init: Mutex::new(InitState::Pending),
            init_done: Condvar::new(),
            time_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    fn node(&self, ino: u64) -> Option<Arc<Node>> {
        self.files.read().nodes.get(&ino).cloned()
    }

    fn root_attr(&self) -> Attr {
        Attr {
            ino: ROOT_INO,
            size: 0,
            blocks: 0,
            time_secs: self.time_secs,
            mode: proto::S_IFDIR | 0o755,
            nlink: 2,
        }
    }

    fn file_attr(&self, node: &Node, with_blocks: bool) -> Attr {
        let blocks = if with_blocks {
            node.thin.read().as_ref().map_or(0, |thin| {
                let bs = thin.pool().block_size().bytes();
                thin.mapped_blocks()
                    .map_or(0, |n| n.saturating_mul(bs) / 512)
            })
        } else {
            0
        };
        Attr {
            ino: node.ino,
            size: node.size,
            blocks,
            time_secs: self.time_secs,
            mode: proto::S_IFREG | if node.read_only { 0o400 } else { 0o600 },
            nlink: if node.removed.load(Ordering::Relaxed) {
                0
            } else {
                1
            },
        }
    }

    fn set_init(&self, state: InitState) {
        *self.init.lock() = state;
        self.init_done.notify_all();
    }
}

/// The errno a failed engine call becomes.
fn errno_of(e: &Error) -> Errno {
    match e {
        Error::NoDataSpace | Error::NoMetadataSpace => Errno::ENOSPC,
        Error::ReadOnly(_) | Error::NeedsCheck => Errno::EROFS,
        Error::InvalidArgument(_) => Errno::EINVAL,
        _ => Errno::EIO,
    }
}

/// One worker thread: its fd (its own clone where the kernel allows) and its buffers.
pub(super) struct Worker {
    fd: Arc<OwnedFd>,
    shared: Arc<Shared>,
    request: Vec<u8>,
    reply: Vec<u8>,
}

impl Worker {
    pub fn new(fd: Arc<OwnedFd>, shared: Arc<Shared>) -> Worker {
        Worker {
            fd,
            shared,
            request: vec![0; proto::REQUEST_BUFFER],
            reply: vec![0; proto::OUT_HEADER_LEN + proto::MAX_WRITE],
        }
    }

    /// Serves requests until the kernel ends the connection (unmount or abort).
    pub fn run(mut self) {
        loop {
            let n = match nix::unistd::read(self.fd.as_raw_fd(), &mut self.request) {
                Ok(n) => n,
                // ENOENT: the request was interrupted before we read it.
                Err(Errno::EINTR | Errno::EAGAIN | Errno::ENOENT) => continue,
                Err(Errno::ENODEV) => break,
                Err(e) => {
                    tracing::error!(error = %e, "reading /dev/fuse failed; worker stops");
                    self.shared
                        .set_init(InitState::Failed(format!("reading /dev/fuse: {e}")));
                    break;
                }
            };
            if !self.serve(n) {
                break;
            }
        }
        tracing::trace!("fuse worker done");
    }

    /// Serves one request of `n` bytes; false when the connection is gone.
    fn serve(&mut self, n: usize) -> bool {
        let Some(header) = InHeader::parse(&self.request[..n]) else {
            tracing::warn!(len = n, "short fuse request ignored");
            return true;
        };
        let end = (header.len as usize).min(n);
        if end < proto::IN_HEADER_LEN {
            return self.send(header.unique, Reply::Err(Errno::EINVAL));
        }
        let body = &self.request[proto::IN_HEADER_LEN..end];
        let out = &mut self.reply[proto::OUT_HEADER_LEN..];
        let shared = &self.shared;
        // A bug below (in the engine, say) must not take the worker down with it: a mount
        // whose workers are gone hangs every process that touches it.
        let reply =
            std::panic::catch_unwind(AssertUnwindSafe(|| dispatch(shared, &header, body, out)))
                .unwrap_or_else(|_| {
                    tracing::error!(opcode = header.opcode, "fuse request handler panicked");
                    Reply::Err(Errno::EIO)
                });
        self.send(header.unique, reply)
    }

    /// Writes the reply header in front of the payload and sends both in one write.
    fn send(&mut self, unique: u64, reply: Reply) -> bool {
        let (error, payload) = match reply {
            Reply::None => return true,
            Reply::Ok(len) => (0, len),
            Reply::Err(e) => (-(e as i32), 0),
        };
        let len = proto::OUT_HEADER_LEN + payload;
        Writer::new(&mut self.reply[..proto::OUT_HEADER_LEN])
            .u32(len as u32)
            .u32(error as u32)
            .u64(unique);
        match nix::unistd::write(&*self.fd, &self.reply[..len]) {
            Ok(_) => true,
            // The request was interrupted or aborted meanwhile: nobody waits for the answer.
            Err(Errno::ENOENT) => true,
            Err(Errno::ENODEV) => false,
            Err(e) => {
                tracing::warn!(unique, error = %e, "writing a fuse reply failed");
                true
            }
        }
    }
}

fn dispatch(shared: &Shared, h: &InHeader, body: &[u8], out: &mut [u8]) -> Reply {
    match h.opcode {
        op::READ => read(shared, h, body, out),
        op::WRITE => write(shared, h, body, out),
        op::INIT => init(shared, body, out),
        op::DESTROY => Reply::Ok(0),
        op::LOOKUP => lookup(shared, h, body, out),
        op::FORGET => {
            if let Some(n) = Reader::new(body).u64() {
                forget(shared, h.nodeid, n);
            }
            Reply::None
        }
        op::BATCH_FORGET => {
            batch_forget(shared, body);
            Reply::None
        }
        op::GETATTR | op::SETATTR => attr(shared, h, body, out),
        op::OPEN => open(shared, h, body, out),
        op::RELEASE => {
            if let Some(node) = shared.node(h.nodeid) {
                // Saturating: a RELEASE without its OPEN would be a kernel bug, not a panic.
                let _ = node
                    .open
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            }
            Reply::Ok(0)
        }
        op::FLUSH | op::FSYNCDIR => Reply::Ok(0),
        op::FSYNC => fsync(shared, h),
        op::FALLOCATE => fallocate(shared, h, body),
        op::STATFS => statfs(shared, out),
        op::OPENDIR => opendir(shared, h, out),
        op::READDIR => readdir(shared, body, out),
        op::RELEASEDIR => {
            if let Some(fh) = Reader::new(body).u64() {
                shared.dirs.lock().remove(&fh);
            }
            Reply::Ok(0)
        }
        op::ACCESS => access(shared, h, body),
        // Requests run to completion quickly; an interrupt changes nothing.
        op::INTERRUPT | op::NOTIFY_REPLY => Reply::None,
        _ => Reply::Err(Errno::ENOSYS),
    }
}

fn init(shared: &Shared, body: &[u8], out: &mut [u8]) -> Reply {
    let mut r = Reader::new(body);
    let (Some(major), Some(minor), Some(max_readahead), Some(flags)) =
        (r.u32(), r.u32(), r.u32(), r.u32())
    else {
        return Reply::Err(Errno::EINVAL);
    };
    if major > proto::KERNEL_VERSION {
        // The kernel offers a newer major: answer with ours and it asks again in our terms.
        let mut w = Writer::new(out);
        w.u32(proto::KERNEL_VERSION).zeros(proto::INIT_OUT_LEN - 4);
        return Reply::Ok(w.len());
    }
    if major < proto::KERNEL_VERSION || minor < proto::MIN_MINOR {
        shared.set_init(InitState::Failed(format!(
            "kernel fuse protocol {major}.{minor} is older than 7.{}",
            proto::MIN_MINOR
        )));
        return Reply::Err(Errno::EPROTO);
    }
    let minor = minor.min(proto::MAX_MINOR);
    let wanted = proto::init::ASYNC_READ
        | proto::init::BIG_WRITES
        | proto::init::ASYNC_DIO
        | proto::init::PARALLEL_DIROPS
        | proto::init::MAX_PAGES;
    let mut w = Writer::new(out);
    w.u32(proto::KERNEL_VERSION)
        .u32(minor)
        .u32(max_readahead)
        .u32(flags & wanted)
        // max_background, congestion_threshold: loop's async direct IO is background work,
        // so this caps the requests in flight (fio at iodepth 32 fits).
        .u16(64)
        .u16(48)
        .u32(proto::MAX_WRITE as u32)
        // time_gran: nanoseconds.
        .u32(1)
        .u16(proto::MAX_PAGES);
    // map_alignment, flags2, max_stack_depth, request_timeout, unused.
    w.zeros(proto::INIT_OUT_LEN - w.len());
    tracing::debug!(
        major,
        minor,
        kernel_flags = format_args!("{flags:#x}"),
        granted = format_args!("{:#x}", flags & wanted),
        "fuse init"
    );
    shared.set_init(InitState::Done);
    Reply::Ok(w.len())
}

/// The name in a LOOKUP body: NUL-terminated.
fn name_of(body: &[u8]) -> Option<&str> {
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    std::str::from_utf8(&body[..end]).ok()
}

fn entry_out(w: &mut Writer<'_>, attr: &Attr) {
    // nodeid, generation (inode numbers are never reused, so one generation serves all),
    // entry_valid 0 (a removed or re-added name shows at once), attr_valid.
    w.u64(attr.ino)
        .u64(1)
        .u64(0)
        .u64(ATTR_VALID.as_secs())
        .u32(0)
        .u32(ATTR_VALID.subsec_nanos());
    attr.write(w);
}

fn lookup(shared: &Shared, h: &InHeader, body: &[u8], out: &mut [u8]) -> Reply {
    if h.nodeid != ROOT_INO {
        return Reply::Err(Errno::ENOTDIR);
    }
    let Some(name) = name_of(body) else {
        return Reply::Err(Errno::ENOENT);
    };
    let node = {
        let files = shared.files.read();
        let Some(node) = files.names.get(name) else {
            return Reply::Err(Errno::ENOENT);
        };
        node.lookups.fetch_add(1, Ordering::AcqRel);
        node.clone()
    };
    let attr = shared.file_attr(&node, false);
    let mut w = Writer::new(out);
    entry_out(&mut w, &attr);
    debug_assert_eq!(w.len(), proto::ENTRY_OUT_LEN);
    Reply::Ok(w.len())
}

fn forget(shared: &Shared, ino: u64, n: u64) {
    if ino == ROOT_INO {
        return;
    }
    let mut files = shared.files.write();
    let Some(node) = files.nodes.get(&ino) else {
        return;
    };
    let left = node.lookups.load(Ordering::Acquire).saturating_sub(n);
    node.lookups.store(left, Ordering::Release);
    if left == 0 && node.removed.load(Ordering::Acquire) {
        files.nodes.remove(&ino);
    }
}

fn batch_forget(shared: &Shared, body: &[u8]) {
    let mut r = Reader::new(body);
    let Some(count) = r.u32() else {
        return;
    };
    if r.skip(4).is_none() {
        return;
    }
    for _ in 0..count {
        let (Some(ino), Some(n)) = (r.u64(), r.u64()) else {
            return;
        };
        forget(shared, ino, n);
    }
}

/// GETATTR, and SETATTR, which changes nothing: a thin file's size is fixed (a size change
/// is refused with EPERM, the same size is accepted, as `open(O_TRUNC)` of an empty file
/// needs), and mode, owner and times are not stored, so the reply shows the attributes as
/// they are.
fn attr(shared: &Shared, h: &InHeader, body: &[u8], out: &mut [u8]) -> Reply {
    let attr = if h.nodeid == ROOT_INO {
        shared.root_attr()
    } else {
        let Some(node) = shared.node(h.nodeid) else {
            return Reply::Err(Errno::ENOENT);
        };
        if h.opcode == op::SETATTR {
            let mut r = Reader::new(body);
            let Some(valid) = r.u32() else {
                return Reply::Err(Errno::EINVAL);
            };
            // padding, fh, then size.
            let size = r.skip(12).and_then(|()| r.u64());
            if valid & proto::FATTR_SIZE != 0 {
                match size {
                    Some(s) if s == node.size => {}
                    Some(_) => return Reply::Err(Errno::EPERM),
                    None => return Reply::Err(Errno::EINVAL),
                }
            }
        }
        shared.file_attr(&node, true)
    };
    let mut w = Writer::new(out);
    w.u64(ATTR_VALID.as_secs())
        .u32(ATTR_VALID.subsec_nanos())
        .u32(0);
    attr.write(&mut w);
    debug_assert_eq!(w.len(), proto::ATTR_OUT_LEN);
    Reply::Ok(w.len())
}

fn open(shared: &Shared, h: &InHeader, body: &[u8], out: &mut [u8]) -> Reply {
    let Some(flags) = Reader::new(body).u32() else {
        return Reply::Err(Errno::EINVAL);
    };
    let Some(node) = shared.node(h.nodeid) else {
        return Reply::Err(Errno::ENOENT);
    };
    if node.removed.load(Ordering::Acquire) {
        return Reply::Err(Errno::ENOENT);
    }
    let writable = flags & nix::libc::O_ACCMODE as u32 != nix::libc::O_RDONLY as u32;
    if writable && node.read_only {
        return Reply::Err(Errno::EROFS);
    }
    node.open.fetch_add(1, Ordering::AcqRel);
    let mut w = Writer::new(out);
    // The page cache is bypassed (the pool is the one copy of the data), and direct writes
    // run in parallel instead of one at a time under the inode lock.
    w.u64(node.ino)
        .u32(proto::FOPEN_DIRECT_IO | proto::FOPEN_PARALLEL_DIRECT_WRITES)
        .u32(0);
    Reply::Ok(w.len())
}

/// The thin behind a file for IO: EIO once the file is removed.
fn with_thin<T>(node: &Node, f: impl FnOnce(&Thin) -> Result<T, Error>) -> Result<T, Errno> {
    let thin = node.thin.read();
    let Some(thin) = thin.as_ref() else {
        return Err(Errno::EIO);
    };
    f(thin).map_err(|e| errno_of(&e))
}

fn log_io_error(node: &Node, what: &str, offset: u64, len: u64, e: Errno) {
    tracing::warn!(file = %node.name, offset, len, errno = %e, "fuse {what} failed");
}

/// READ: served up to the file's end (a short read there, like a regular file).
fn read(shared: &Shared, h: &InHeader, body: &[u8], out: &mut [u8]) -> Reply {
    let mut r = Reader::new(body);
    let (Some(_fh), Some(offset), Some(size)) = (r.u64(), r.u64(), r.u32()) else {
        return Reply::Err(Errno::EINVAL);
    };
    let Some(node) = shared.node(h.nodeid) else {
        return Reply::Err(Errno::EIO);
    };
    let len = (size as usize).min(out.len()).min(
        node.size
            .saturating_sub(offset)
            .try_into()
            .unwrap_or(usize::MAX),
    );
    if len == 0 {
        return Reply::Ok(0);
    }
    match with_thin(&node, |thin| thin.read(&mut out[..len], offset)) {
        Ok(()) => Reply::Ok(len),
        Err(e) => {
            log_io_error(&node, "read", offset, len as u64, e);
            Reply::Err(e)
        }
    }
}

/// WRITE: a write that starts at or past the file's end fails with EFBIG (the file cannot
/// grow: its size is the thin's); one that crosses the end is cut short there.
fn write(shared: &Shared, h: &InHeader, body: &[u8], out: &mut [u8]) -> Reply {
    let mut r = Reader::new(body);
    let (Some(_fh), Some(offset), Some(size)) = (r.u64(), r.u64(), r.u32()) else {
        return Reply::Err(Errno::EINVAL);
    };
    // write_flags, lock_owner, flags, padding: 20 bytes, then the data.
    if r.skip(20).is_none() {
        return Reply::Err(Errno::EINVAL);
    }
    let Some(data) = r.rest().get(..size as usize) else {
        return Reply::Err(Errno::EINVAL);
    };
    let Some(node) = shared.node(h.nodeid) else {
        return Reply::Err(Errno::EIO);
    };
    if node.read_only {
        return Reply::Err(Errno::EROFS);
    }
    if data.is_empty() {
        return write_out(out, 0);
    }
    if offset >= node.size {
        return Reply::Err(Errno::EFBIG);
    }
    let len = data
        .len()
        .min((node.size - offset).try_into().unwrap_or(usize::MAX));
    match with_thin(&node, |thin| thin.write(&data[..len], offset)) {
        Ok(()) => write_out(out, len as u32),
        Err(e) => {
            log_io_error(&node, "write", offset, len as u64, e);
            Reply::Err(e)
        }
    }
}

fn write_out(out: &mut [u8], size: u32) -> Reply {
    let mut w = Writer::new(out);
    w.u32(size).u32(0);
    Reply::Ok(w.len())
}

fn fsync(shared: &Shared, h: &InHeader) -> Reply {
    let Some(node) = shared.node(h.nodeid) else {
        return Reply::Err(Errno::EIO);
    };
    let start = Instant::now();
    match with_thin(&node, |thin| thin.flush()) {
        Ok(()) => {
            tracing::trace!(file = %node.name, us = start.elapsed().as_micros() as u64, "fsync");
            Reply::Ok(0)
        }
        Err(e) => {
            log_io_error(&node, "fsync", 0, 0, e);
            Reply::Err(e)
        }
    }
}

/// FALLOCATE: PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE discard the range (whole blocks are
/// unmapped, partial ones zeroed; either way it reads as zeros). Allocating modes get
/// EOPNOTSUPP: a thin provisions on write, there is nothing to reserve. The part of a range
/// past the file's end is ignored under KEEP_SIZE and refused with EFBIG without it.
fn fallocate(shared: &Shared, h: &InHeader, body: &[u8]) -> Reply {
    let mut r = Reader::new(body);
    let (Some(_fh), Some(offset), Some(length), Some(mode)) = (r.u64(), r.u64(), r.u64(), r.u32())
    else {
        return Reply::Err(Errno::EINVAL);
    };
    let Some(node) = shared.node(h.nodeid) else {
        return Reply::Err(Errno::EIO);
    };
    let keep_size = mode & proto::FALLOC_FL_KEEP_SIZE != 0;
    let discard = match mode & !proto::FALLOC_FL_KEEP_SIZE {
        proto::FALLOC_FL_PUNCH_HOLE => keep_size,
        proto::FALLOC_FL_ZERO_RANGE => true,
        _ => false,
    };
    if !discard {
        return Reply::Err(Errno::EOPNOTSUPP);
    }
    if node.read_only {
        return Reply::Err(Errno::EROFS);
    }
    let Some(end) = offset.checked_add(length) else {
        return Reply::Err(Errno::EINVAL);
    };
    if end > node.size && !keep_size {
        return Reply::Err(Errno::EFBIG);
    }
    let end = end.min(node.size);
    if offset >= end {
        return Reply::Ok(0);
    }
    match with_thin(&node, |thin| thin.discard(offset, end - offset)) {
        Ok(()) => Reply::Ok(0),
        Err(e) => {
            log_io_error(&node, "discard", offset, end - offset, e);
            Reply::Err(e)
        }
    }
}

/// STATFS: the pool's data space, in 4 KiB units, of the first published file's pool (a
/// mount normally serves one pool); an empty mount shows zeros.
fn statfs(shared: &Shared, out: &mut [u8]) -> Reply {
    let (nr_files, pool) = {
        let files = shared.files.read();
        let pool = files
            .names
            .values()
            .find_map(|n| n.thin.read().as_ref().map(|t| t.pool().clone()));
        (files.names.len() as u64, pool)
    };
    let (blocks, free) = pool.map_or((0, 0), |pool| {
        let status = pool.status();
        let per = pool.block_size().bytes() / 4096;
        (
            status.total_data_blocks * per,
            status
                .total_data_blocks
                .saturating_sub(status.used_data_blocks)
                * per,
        )
    });
    let mut w = Writer::new(out);
    // blocks, bfree, bavail, files, ffree, then bsize, namelen, frsize, padding, spare[6].
    w.u64(blocks).u64(free).u64(free).u64(nr_files).u64(0);
    w.u32(4096).u32(255).u32(4096).zeros(4 + 24);
    debug_assert_eq!(w.len(), proto::STATFS_OUT_LEN);
    Reply::Ok(w.len())
}

fn opendir(shared: &Shared, h: &InHeader, out: &mut [u8]) -> Reply {
    if h.nodeid != ROOT_INO {
        return Reply::Err(Errno::ENOTDIR);
    }
    // A snapshot at OPENDIR, so READDIR offsets stay meaningful while files come and go.
    let mut entries = vec![
        DirEntry {
            ino: ROOT_INO,
            kind: proto::DT_DIR,
            name: ".".into(),
        },
        DirEntry {
            ino: ROOT_INO,
            kind: proto::DT_DIR,
            name: "..".into(),
        },
    ];
    let mut files: Vec<DirEntry> = shared
        .files
        .read()
        .names
        .values()
        .map(|n| DirEntry {
            ino: n.ino,
            kind: proto::DT_REG,
            name: n.name.clone(),
        })
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    entries.extend(files);
    let fh = shared.next_dir_fh.fetch_add(1, Ordering::Relaxed);
    shared.dirs.lock().insert(fh, entries.into());
    let mut w = Writer::new(out);
    w.u64(fh).u32(0).u32(0);
    Reply::Ok(w.len())
}

fn readdir(shared: &Shared, body: &[u8], out: &mut [u8]) -> Reply {
    let mut r = Reader::new(body);
    let (Some(fh), Some(offset), Some(size)) = (r.u64(), r.u64(), r.u32()) else {
        return Reply::Err(Errno::EINVAL);
    };
    let Some(entries) = shared.dirs.lock().get(&fh).cloned() else {
        return Reply::Err(Errno::EBADF);
    };
    let limit = (size as usize).min(out.len());
    let mut w = Writer::new(&mut out[..limit]);
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, e) in entries.iter().enumerate().skip(start) {
        let name = e.name.as_bytes();
        let padded = (proto::DIRENT_LEN + name.len()).next_multiple_of(8);
        if w.len() + padded > limit {
            break;
        }
        // ino, off (of the next entry), namelen, type, name, padding to 8 bytes.
        w.u64(e.ino)
            .u64(i as u64 + 1)
            .u32(name.len() as u32)
            .u32(e.kind)
            .bytes(name)
            .zeros(padded - proto::DIRENT_LEN - name.len());
    }
    Reply::Ok(w.len())
}

/// ACCESS (sent only without `default_permissions`): write access to a read-only file is
/// EROFS, everything else is allowed.
fn access(shared: &Shared, h: &InHeader, body: &[u8]) -> Reply {
    let Some(mask) = Reader::new(body).u32() else {
        return Reply::Err(Errno::EINVAL);
    };
    if h.nodeid == ROOT_INO {
        return Reply::Ok(0);
    }
    match shared.node(h.nodeid) {
        Some(node) if node.read_only && mask & nix::libc::W_OK as u32 != 0 => {
            Reply::Err(Errno::EROFS)
        }
        Some(_) => Reply::Ok(0),
        None => Reply::Err(Errno::ENOENT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{BlockDevice, MemDevice};
    use crate::thin::pool::{Pool, PoolOptions};
    use crate::units::{DataBlockSize, ThinId};

    /// A table with one 1 MiB file, ino 2, on a memory pool.
    fn shared_with_a_file() -> Shared {
        let meta: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20));
        let data: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 * 65536));
        let pool =
            Pool::format(meta, data, DataBlockSize::DEFAULT, PoolOptions::default()).unwrap();
        let id = ThinId::new(1).unwrap();
        pool.create_thin(id).unwrap();
        let shared = Shared::new();
        let node = Arc::new(Node {
            ino: 2,
            name: "1".into(),
            size: 1 << 20,
            read_only: false,
            thin: RwLock::new(Some(pool.open_thin(id).unwrap())),
            open: AtomicUsize::new(0),
            lookups: AtomicU64::new(0),
            removed: AtomicBool::new(false),
        });
        let mut files = shared.files.write();
        files.names.insert("1".into(), node.clone());
        files.nodes.insert(2, node);
        drop(files);
        shared
    }

    #[test]
    fn truncated_and_garbage_requests_get_errors_not_panics() {
        let shared = shared_with_a_file();
        let mut out = vec![0u8; proto::MAX_WRITE];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for opcode in 0..64 {
            for nodeid in [0, ROOT_INO, 2, 3, u64::MAX] {
                for len in (0..130).chain([4096, 8192]) {
                    let body: Vec<u8> = (0..len)
                        .map(|_| {
                            // xorshift: enough to hit huge sizes, offsets and counts.
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            seed as u8
                        })
                        .collect();
                    let h = InHeader {
                        len: (proto::IN_HEADER_LEN + len) as u32,
                        opcode,
                        unique: 1,
                        nodeid,
                    };
                    if opcode == op::INIT || opcode == op::DESTROY {
                        continue;
                    }
                    if let Reply::Ok(n) = dispatch(&shared, &h, &body, &mut out) {
                        assert!(n <= out.len());
                    }
                }
            }
        }
    }

    #[test]
    fn reads_and_writes_stop_at_the_end_of_the_file() {
        let shared = shared_with_a_file();
        let mut out = vec![0u8; proto::MAX_WRITE];
        let header = |opcode| InHeader {
            len: 0,
            opcode,
            unique: 1,
            nodeid: 2,
        };
        let mut read = Vec::new();
        read.extend_from_slice(&0u64.to_ne_bytes());
        read.extend_from_slice(&((1u64 << 20) - 100).to_ne_bytes());
        read.extend_from_slice(&4096u32.to_ne_bytes());
        read.extend_from_slice(&[0u8; 20]);
        assert!(matches!(
            dispatch(&shared, &header(op::READ), &read, &mut out),
            Reply::Ok(100)
        ));

        let mut write = Vec::new();
        write.extend_from_slice(&0u64.to_ne_bytes());
        write.extend_from_slice(&(1u64 << 20).to_ne_bytes());
        write.extend_from_slice(&512u32.to_ne_bytes());
        write.extend_from_slice(&[0u8; 20]);
        write.extend_from_slice(&[7u8; 512]);
        assert!(matches!(
            dispatch(&shared, &header(op::WRITE), &write, &mut out),
            Reply::Err(Errno::EFBIG)
        ));
        // Claiming more data than the request carries is refused.
        write[16..20].copy_from_slice(&513u32.to_ne_bytes());
        write[8..16].copy_from_slice(&0u64.to_ne_bytes());
        assert!(matches!(
            dispatch(&shared, &header(op::WRITE), &write, &mut out),
            Reply::Err(Errno::EINVAL)
        ));
    }
}
