//! The FUSE wire protocol (the subset a flat directory of files needs): opcodes, flags and the
//! layouts of the kernel's request and reply structs.
//!
//! Every value and layout comes from the kernel's `include/uapi/linux/fuse.h` (protocol 7.x).
//! The protocol is in the host's byte order: the kernel and the server share a machine.

/// The protocol major version we speak (`FUSE_KERNEL_VERSION`).
pub(super) const KERNEL_VERSION: u32 = 7;
/// The newest minor version whose layouts this module knows (`FUSE_KERNEL_MINOR_VERSION` of
/// 7.44). Replying with min(kernel's, ours) keeps the kernel from assuming anything newer.
pub(super) const MAX_MINOR: u32 = 44;
/// The oldest minor we accept: 7.12 fixed the sizes of every struct used here.
pub(super) const MIN_MINOR: u32 = 12;

/// Largest READ or WRITE payload: 256 pages of 4 KiB (`max_pages` in `fuse_init_out`).
pub(super) const MAX_WRITE: usize = 1 << 20;
pub(super) const MAX_PAGES: u16 = 256;
/// Room for any request: `fuse_in_header` + `fuse_write_in` + a full write, rounded up to a
/// page. The kernel refuses a read buffer smaller than header + write header + `max_write`.
pub(super) const REQUEST_BUFFER: usize = MAX_WRITE + 4096;

pub(super) const IN_HEADER_LEN: usize = 40;
pub(super) const OUT_HEADER_LEN: usize = 16;

/// Opcodes (`enum fuse_opcode`).
pub(super) mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
}

/// `FUSE_INIT` flags (the low 32 bits; we need none of `flags2`).
pub(super) mod init {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const ASYNC_DIO: u32 = 1 << 15;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
}

/// `fuse_open_out.open_flags`.
pub(super) const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub(super) const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

/// `fuse_setattr_in.valid`.
pub(super) const FATTR_SIZE: u32 = 1 << 3;

/// `fallocate(2)` modes the kernel passes through.
pub(super) const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub(super) const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
pub(super) const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

/// `d_type` values of `fuse_dirent`.
pub(super) const DT_DIR: u32 = 4;
pub(super) const DT_REG: u32 = 8;

pub(super) const S_IFDIR: u32 = 0o040000;
pub(super) const S_IFREG: u32 = 0o100000;

/// `sizeof(struct fuse_attr)`.
pub(super) const ATTR_LEN: usize = 88;
/// `sizeof(struct fuse_entry_out)`.
pub(super) const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
/// `sizeof(struct fuse_attr_out)`.
pub(super) const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
/// `sizeof(struct fuse_init_out)` since 7.23.
pub(super) const INIT_OUT_LEN: usize = 64;
/// `sizeof(struct fuse_kstatfs)`.
pub(super) const STATFS_OUT_LEN: usize = 80;
/// `sizeof(struct fuse_dirent)` without the name.
pub(super) const DIRENT_LEN: usize = 24;

/// `struct fuse_in_header`.
#[derive(Clone, Copy, Debug)]
pub(super) struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(buf: &[u8]) -> Option<InHeader> {
        let mut r = Reader::new(buf);
        let h = InHeader {
            len: r.u32()?,
            opcode: r.u32()?,
            unique: r.u64()?,
            nodeid: r.u64()?,
        };
        (buf.len() >= IN_HEADER_LEN).then_some(h)
    }
}

/// Reads fixed-width fields off the front of a request body; `None` when it is too short.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.buf.split_first_chunk::<N>()?;
        self.buf = rest;
        Some(*head)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_ne_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(u64::from_ne_bytes)
    }

    pub fn skip(&mut self, n: usize) -> Option<()> {
        self.buf = self.buf.get(n..)?;
        Some(())
    }

    /// What is left after the fields read so far.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }
}

/// Writes fixed-width fields into a reply buffer. The caller sizes the buffer; writing past
/// its end is a bug in this module, so it panics.
pub(super) struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, pos: 0 }
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_ne_bytes())
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_ne_bytes())
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_ne_bytes())
    }

    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf[self.pos..self.pos + n].fill(0);
        self.pos += n;
        self
    }

    pub fn len(&self) -> usize {
        self.pos
    }
}

/// The attributes of one inode (`struct fuse_attr`).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub time_secs: u64,
    pub mode: u32,
    pub nlink: u32,
}

impl Attr {
    pub fn write(&self, w: &mut Writer<'_>) {
        let start = w.len();
        w.u64(self.ino).u64(self.size).u64(self.blocks);
        // atime, mtime, ctime, then their nanoseconds.
        w.u64(self.time_secs)
            .u64(self.time_secs)
            .u64(self.time_secs);
        w.zeros(12);
        w.u32(self.mode).u32(self.nlink);
        // uid, gid, rdev: root's files.
        w.zeros(12);
        // blksize, then flags.
        w.u32(4096).u32(0);
        debug_assert_eq!(w.len() - start, ATTR_LEN);
    }
}
