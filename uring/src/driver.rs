//! The safe level: a [`Driver`] that owns every resource an operation uses
//! until the kernel's final completion for it arrives. See the crate docs
//! for the ownership rules, the `user_data` layout and cancel/drop.

use std::ffi::CString;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types};

use crate::buffers::{BufLease, BufRing, FixedBufferPool, FixedLease, RegistrationRefused};
use crate::errno::Errno;
use crate::pipe::Pipe;
use crate::ring::{QueueFull, Ring, RingConfig, SetupFlags};
use crate::stamp::{MsgBox, RxStamp};

/// An fd shared between the caller and the operations that use it. The fd is
/// closed when the last clone is dropped, so it cannot be closed (and its
/// number reused) while an operation still refers to it.
pub type SharedFd = Rc<OwnedFd>;

/// Default bound on operations in flight per driver.
pub const OPS_MAX_DEFAULT: u32 = 4096;
/// Hard bound on `ops_max`: the slot index must fit the user_data layout and
/// the table is allocated up front.
pub const OPS_MAX_LIMIT: u32 = 1 << 20;
/// Default number of fixed buffers.
pub const FIXED_BUFFERS_COUNT_DEFAULT: u16 = 64;
/// Default size of one fixed buffer: 64 KiB.
pub const FIXED_BUFFER_BYTES_DEFAULT: usize = 64 * 1024;
/// Default bound on provided-buffer rings per driver.
pub const BUF_RINGS_MAX_DEFAULT: u16 = 8;
/// How long dropping a driver waits for cancelled operations to complete
/// before it leaks their resources on purpose.
pub const DROP_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// user_data layout: the only place that defines it.
//
//   bits 63..56  tag: an OpKind (1..=0x7f) or a reserved tag (0x80..)
//   bits 55..32  generation of the slot (24 bits, wrapping)
//   bits 31..0   slot index
//
// Tag 0 is never used, so a zeroed user_data cannot match anything.
// ---------------------------------------------------------------------------

/// Reserved tags: completions the driver consumes itself.
mod tag {
    /// The wake-up eventfd read.
    pub const WAKE: u8 = 0x80;
    /// An AsyncCancel the driver issued; its own result is not reported.
    pub const CANCEL: u8 = 0x81;
    /// A linked timeout; its slot is the operation it guards.
    pub const LINK_TIMEOUT: u8 = 0x82;
}

const GENERATION_MASK: u32 = (1 << 24) - 1;

// ---------------------------------------------------------------------------
// Tokens: the caller's u64, declared here beside the driver's own tags so
// that every reserved value lives in one place.
//
// `Driver::submit` takes a `token` that comes back in every completion of
// the operation; an epoll loop carries the same u64 in each event. The
// engines give it one layout:
//
//   u64::MAX        Listener   the multishot accept, or an epoll set's listener
//   u64::MAX - 1    ReadAhead  a hint no connection waits for
//   u64::MAX - 2    Waker      an epoll set's eventfd (a ring's is the WAKE tag)
//   bit 63 clear    Conn       generation:31 << 32 | slot
//   bit 63 set      Task       generation:31 << 32 | slot, under the bit
//
// The reserved values are checked before bit 63, so a slot index must stay
// below `u32::MAX - 2`; engines bound their tables far below that.
// ---------------------------------------------------------------------------

/// What a completion (or an epoll event) is for: a typed caller token,
/// packed into the u64 that [`Driver::submit`] carries (see the layout
/// above). A completion for a reused slot is told apart by its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Token {
    /// The listening socket: the multishot accept on a ring, the listener's
    /// readiness in an epoll set.
    Listener,
    /// A read-ahead hint (`fadvise(WILLNEED)`) no connection waits for.
    ReadAhead,
    /// The waker's eventfd in an epoll set.
    Waker,
    /// An operation of a connection: its slot and the slot's generation.
    Conn { slot: u32, generation: u32 },
    /// An operation of an outgoing task: its slot and the slot's generation.
    Task { slot: u32, generation: u32 },
}

impl Token {
    /// Generations are 31 bits: bit 63 tells tasks from connections.
    pub const GENERATION_MASK: u32 = 0x7fff_ffff;
    const LISTENER: u64 = u64::MAX;
    const READ_AHEAD: u64 = u64::MAX - 1;
    const WAKER: u64 = u64::MAX - 2;
    const TASK_BIT: u64 = 1 << 63;

    /// The generation after `generation` for a slot being reused: wraps
    /// within [`Token::GENERATION_MASK`] and skips 0, so a fresh table's
    /// zeroed state never matches.
    pub fn next_generation(generation: u32) -> u32 {
        (generation.wrapping_add(1) & Self::GENERATION_MASK).max(1)
    }

    /// Packs into the u64 a submission or an epoll event carries.
    pub fn pack(self) -> u64 {
        let slot_bits =
            |slot: u32, generation: u32| (u64::from(generation) << 32) | u64::from(slot);
        match self {
            Token::Listener => Self::LISTENER,
            Token::ReadAhead => Self::READ_AHEAD,
            Token::Waker => Self::WAKER,
            Token::Conn { slot, generation } => slot_bits(slot, generation & Self::GENERATION_MASK),
            Token::Task { slot, generation } => {
                Self::TASK_BIT | slot_bits(slot, generation & Self::GENERATION_MASK)
            }
        }
    }

    /// Unpacks a u64 from a completion or an epoll event.
    pub fn unpack(raw: u64) -> Token {
        let slot = (raw & 0xffff_ffff) as u32;
        let generation = ((raw >> 32) as u32) & Self::GENERATION_MASK;
        match raw {
            Self::LISTENER => Token::Listener,
            Self::READ_AHEAD => Token::ReadAhead,
            Self::WAKER => Token::Waker,
            _ if raw & Self::TASK_BIT != 0 => Token::Task { slot, generation },
            _ => Token::Conn { slot, generation },
        }
    }
}

/// A typed `user_data` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UserData {
    /// Index into the slot table.
    pub slot: u32,
    /// The slot's generation when the operation was submitted (24 bits).
    pub generation: u32,
    /// An [`OpKind`] as u8 or a reserved tag.
    pub tag: u8,
}

impl UserData {
    /// Packs into the u64 the kernel carries.
    pub fn pack(self) -> u64 {
        (u64::from(self.tag) << 56)
            | (u64::from(self.generation & GENERATION_MASK) << 32)
            | u64::from(self.slot)
    }

    /// Unpacks a u64 from a completion.
    pub fn unpack(raw: u64) -> UserData {
        UserData {
            slot: (raw & 0xffff_ffff) as u32,
            generation: ((raw >> 32) as u32) & GENERATION_MASK,
            tag: (raw >> 56) as u8,
        }
    }
}

/// What an operation is, as carried in `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpKind {
    AcceptMulti = 1,
    Recv = 2,
    RecvMulti = 3,
    Send = 4,
    SpliceToPipe = 5,
    SpliceFromPipe = 6,
    ReadFixed = 7,
    WriteFixed = 8,
    OpenAt = 9,
    Statx = 10,
    Close = 11,
    Timeout = 12,
    Nop = 13,
    Connect = 14,
    PollAdd = 15,
    Fadvise = 16,
    RecvMsg = 17,
    Fsync = 18,
    SyncFileRange = 19,
}

impl OpKind {
    fn from_tag(tag: u8) -> Option<OpKind> {
        use OpKind::*;
        Some(match tag {
            1 => AcceptMulti,
            2 => Recv,
            3 => RecvMulti,
            4 => Send,
            5 => SpliceToPipe,
            6 => SpliceFromPipe,
            7 => ReadFixed,
            8 => WriteFixed,
            9 => OpenAt,
            10 => Statx,
            11 => Close,
            12 => Timeout,
            13 => Nop,
            14 => Connect,
            15 => PollAdd,
            16 => Fadvise,
            17 => RecvMsg,
            18 => Fsync,
            19 => SyncFileRange,
            _ => return None,
        })
    }
}

/// Identifies one submitted operation: a packed [`UserData`]. Stale ids
/// (operation finished, slot reused) are recognised by the generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpId(u64);

impl OpId {
    /// The packed `user_data`.
    pub fn user_data(self) -> UserData {
        UserData::unpack(self.0)
    }

    /// The raw u64 the kernel carries for this op (for the raw level).
    pub fn raw(self) -> u64 {
        self.0
    }
}

/// A buffer owned by an operation.
#[derive(Debug)]
pub enum IoBuf {
    /// A heap buffer. A receive fills its spare capacity (`len..capacity`)
    /// and extends `len`; a send sends `buf[offset..len]`.
    Vec(Vec<u8>),
    /// A fixed buffer. A receive fills `len..capacity`; a send sends
    /// `as_slice()[offset..]`.
    Fixed(FixedLease),
}

impl IoBuf {
    /// The bytes that hold data.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            IoBuf::Vec(v) => v,
            IoBuf::Fixed(f) => f.as_slice(),
        }
    }

    /// Bytes that hold data.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True when no bytes hold data.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn spare(&mut self) -> (*mut u8, usize) {
        match self {
            IoBuf::Vec(v) => {
                let spare = v.spare_capacity_mut();
                (spare.as_mut_ptr().cast::<u8>(), spare.len())
            }
            IoBuf::Fixed(f) => {
                let len = f.len();
                let cap = f.as_mut_capacity();
                let spare = &mut cap[len..];
                (spare.as_mut_ptr(), spare.len())
            }
        }
    }

    /// Records `n` received bytes written into the spare capacity.
    fn advance(&mut self, n: usize) {
        match self {
            IoBuf::Vec(v) => {
                let n = n.min(v.capacity() - v.len());
                // SAFETY: the kernel initialised `n` bytes of the spare
                // capacity (the completion's result), and n is clamped to the
                // spare capacity, so len + n <= capacity.
                unsafe { v.set_len(v.len() + n) };
            }
            IoBuf::Fixed(f) => f.set_len(f.len() + n),
        }
    }
}

/// An operation and every resource it uses. Submitting moves it into the
/// driver; the resources come back in [`Completion::resources`].
#[derive(Debug)]
pub enum Op {
    /// Multishot accept: one completion per connection (`Returned::Fd`,
    /// accepted with `SOCK_CLOEXEC`), `more` while it stays armed.
    AcceptMulti { listener: SharedFd },
    /// Receive into the buffer's spare capacity. `flags` are `MSG_*`
    /// (e.g. `libc::MSG_PEEK`). The buffer comes back as `Returned::Buf`.
    Recv {
        fd: SharedFd,
        buf: IoBuf,
        flags: i32,
    },
    /// Receive into the buffer's spare capacity as [`Op::Recv`] does, by
    /// `IORING_OP_RECVMSG` with a control buffer, so the kernel's receive
    /// timestamp comes back with the bytes (`Returned::Stamped`; `None`
    /// when the socket has no `SO_TIMESTAMPING`, see [`crate::stamp`]).
    RecvMsg {
        fd: SharedFd,
        buf: IoBuf,
        flags: i32,
    },
    /// Multishot receive with buffers from `ring` (`Returned::Provided`).
    /// Ends with `Err(ENOBUFS)` when the ring is empty: drop leases, re-arm.
    RecvMulti {
        fd: SharedFd,
        ring: BufRing,
        flags: i32,
    },
    /// Send `buf[offset..]` with `flags` (`MSG_MORE`, `MSG_NOSIGNAL`, ...).
    /// A short send returns the count; resubmit with a larger offset.
    Send {
        fd: SharedFd,
        buf: IoBuf,
        offset: usize,
        flags: i32,
    },
    /// Splice up to `len` bytes from `fd_in` at `offset_in` into the pipe.
    SpliceToPipe {
        fd_in: SharedFd,
        offset_in: u64,
        pipe: Pipe,
        len: u32,
    },
    /// Splice up to `len` bytes out of the pipe into `fd_out`.
    SpliceFromPipe {
        pipe: Pipe,
        fd_out: SharedFd,
        len: u32,
    },
    /// Read up to the buffer's capacity from `file` at `offset`; sets the
    /// lease's len. `READ_FIXED` when the pool is registered with this
    /// driver's ring, plain `READ` otherwise.
    ReadFixed {
        file: SharedFd,
        offset: u64,
        buf: FixedLease,
    },
    /// Write the lease's bytes to `file` at `offset` (`WRITE_FIXED` or `WRITE`).
    WriteFixed {
        file: SharedFd,
        offset: u64,
        buf: FixedLease,
    },
    /// `openat(dir or AT_FDCWD, path, flags | O_CLOEXEC, mode)`; the new fd
    /// comes back as `Returned::Fd`.
    OpenAt {
        dir: Option<SharedFd>,
        path: CString,
        flags: i32,
        mode: u32,
    },
    /// `statx(dir or AT_FDCWD, path, flags, mask)`; `Returned::Statx`. For an
    /// open fd use an empty path and `libc::AT_EMPTY_PATH`.
    Statx {
        dir: Option<SharedFd>,
        path: CString,
        flags: i32,
        mask: u32,
    },
    /// Close the fd on the ring.
    Close { fd: OwnedFd },
    /// Complete with `Err(ETIME)` after `duration`.
    Timeout { duration: Duration },
    /// Does nothing; completes with `Ok(0)`.
    Nop,
    /// Connect the socket `fd` to `addr` (outgoing tasks: replication,
    /// read-through). `Ok(0)` once connected.
    Connect { fd: SharedFd, addr: SocketAddr },
    /// Complete once `fd` is ready for `events` (`libc::POLLOUT`, …); the
    /// result is the ready mask. Lets the engine do a non-blocking syscall
    /// itself and wait on the ring only when it would block.
    PollAdd { fd: SharedFd, events: u32 },
    /// `fsync(file)` (or `fdatasync` with `datasync`) through the ring: the
    /// kernel runs it on an io-wq worker, so the submitting thread never
    /// waits for the disk, and the completion says the data (and, without
    /// `datasync`, all metadata) of `file` is on stable storage. Several can
    /// be in flight at once; the device merges their cache flushes.
    Fsync { file: SharedFd, datasync: bool },
    /// `sync_file_range(file, offset, len, flags)` through the ring. With
    /// `SYNC_FILE_RANGE_WRITE` it starts write-back of the range's dirty
    /// pages and returns, so a later `fdatasync` has little left to wait
    /// for; it promises nothing about durability (no metadata, no cache
    /// flush). `len` 0 means to the end of the file.
    SyncFileRange {
        file: SharedFd,
        offset: u64,
        len: u32,
        flags: u32,
    },
    /// `posix_fadvise(file, offset, len, advice)` through the ring. With
    /// `POSIX_FADV_WILLNEED` the kernel starts reading the range into the
    /// page cache on an io-wq worker: read-ahead that never blocks the
    /// submitting thread.
    Fadvise {
        file: SharedFd,
        offset: u64,
        len: u32,
        advice: i32,
    },
}

impl Op {
    /// The kind carried in `user_data`.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::AcceptMulti { .. } => OpKind::AcceptMulti,
            Op::Recv { .. } => OpKind::Recv,
            Op::RecvMsg { .. } => OpKind::RecvMsg,
            Op::RecvMulti { .. } => OpKind::RecvMulti,
            Op::Send { .. } => OpKind::Send,
            Op::SpliceToPipe { .. } => OpKind::SpliceToPipe,
            Op::SpliceFromPipe { .. } => OpKind::SpliceFromPipe,
            Op::ReadFixed { .. } => OpKind::ReadFixed,
            Op::WriteFixed { .. } => OpKind::WriteFixed,
            Op::OpenAt { .. } => OpKind::OpenAt,
            Op::Statx { .. } => OpKind::Statx,
            Op::Close { .. } => OpKind::Close,
            Op::Timeout { .. } => OpKind::Timeout,
            Op::Nop => OpKind::Nop,
            Op::Connect { .. } => OpKind::Connect,
            Op::PollAdd { .. } => OpKind::PollAdd,
            Op::Fadvise { .. } => OpKind::Fadvise,
            Op::Fsync { .. } => OpKind::Fsync,
            Op::SyncFileRange { .. } => OpKind::SyncFileRange,
        }
    }
}

/// Resources handed back with a completion.
#[derive(Debug)]
pub enum Returned {
    /// Nothing to give back (fd clones held by the op are simply dropped).
    Nothing,
    /// The buffer of a recv, send, read or write.
    Buf(IoBuf),
    /// The buffer of a [`Op::RecvMsg`] and the kernel's receive timestamp
    /// of the bytes it read, if the socket stamps them.
    Stamped { buf: IoBuf, stamp: Option<RxStamp> },
    /// The fixed buffer of a `ReadFixed`/`WriteFixed`.
    Fixed(FixedLease),
    /// A provided buffer from a multishot receive; drop it to recycle it.
    Provided(BufLease),
    /// The pipe of a splice, with its byte count updated.
    Pipe(Pipe),
    /// A new fd (accept, openat), or the fd of a `Close` that was cancelled
    /// before it ran.
    Fd(OwnedFd),
    /// The result of a statx.
    Statx(Box<Statx>),
}

/// The buffer a statx fills (`struct statx`).
pub struct Statx(pub libc::statx);

impl Statx {
    /// File size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.0.stx_size
    }

    /// File type and mode bits.
    pub fn mode(&self) -> u32 {
        u32::from(self.0.stx_mode)
    }

    /// Last modification time: seconds and nanoseconds since the epoch.
    pub fn mtime(&self) -> (i64, u32) {
        (self.0.stx_mtime.tv_sec, self.0.stx_mtime.tv_nsec)
    }

    /// Inode number.
    pub fn ino(&self) -> u64 {
        self.0.stx_ino
    }
}

impl std::fmt::Debug for Statx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Statx")
            .field("size_bytes", &self.size_bytes())
            .field("mode", &format_args!("{:o}", self.mode()))
            .field("ino", &self.ino())
            .finish()
    }
}

/// One completion for the caller.
#[derive(Debug)]
pub struct Completion {
    /// The caller's token from [`Driver::submit`].
    pub token: u64,
    /// The operation's id.
    pub op_id: OpId,
    /// The operation's kind.
    pub kind: OpKind,
    /// The kernel's result: a count, an fd number, or an errno.
    pub result: Result<u32, Errno>,
    /// True when a multishot operation stays armed (more completions come).
    pub more: bool,
    /// Resources handed back; for a final completion, everything the op owned
    /// that is worth returning.
    pub resources: Returned,
}

/// Why a submission was refused. The operation comes back untouched.
#[derive(Debug)]
pub struct SubmitError {
    /// The reason.
    pub kind: SubmitErrorKind,
    /// The operation, with all its resources.
    pub op: Op,
}

/// Why [`Driver::submit_linked`] refused a pair. Both operations come back
/// untouched.
#[derive(Debug)]
pub struct LinkedSubmitError {
    /// The reason.
    pub kind: SubmitErrorKind,
    /// The first operation, with all its resources.
    pub first: Op,
    /// The second, with all its resources.
    pub then: Op,
}

/// Reasons for [`SubmitError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitErrorKind {
    /// `ops_max` operations are in flight.
    SlotsFull,
    /// The SQ is full even after flushing it.
    QueueFull,
    /// The driver is shutting down.
    ShuttingDown,
    /// The operation is malformed (empty receive buffer, offset past the end,
    /// an offset beyond i64).
    Invalid,
}

/// Why a cancel was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelError {
    /// The id is not in flight (completed, or stale).
    NotInFlight,
    /// The SQ is full even after flushing it.
    QueueFull,
}

/// Sizes and bounds for a [`Driver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverConfig {
    /// Ring sizes.
    pub ring: RingConfig,
    /// Operations in flight at most; default [`OPS_MAX_DEFAULT`].
    pub ops_max: u32,
    /// Fixed buffers in the pool; default [`FIXED_BUFFERS_COUNT_DEFAULT`].
    pub fixed_buffers_count: u16,
    /// Bytes per fixed buffer; default [`FIXED_BUFFER_BYTES_DEFAULT`].
    pub fixed_buffer_bytes: usize,
    /// Whether to try registering the pool with the ring; default true. When
    /// false or refused the pool works unregistered.
    pub register_fixed_buffers: bool,
    /// Provided-buffer rings at most; default [`BUF_RINGS_MAX_DEFAULT`].
    pub buf_rings_max: u16,
    /// I/O priority (`ioprio_set` encoding) of `ReadFixed` reads, the bulk file reads; 0
    /// leaves the submitting thread's. Default 0.
    pub read_ioprio: u16,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            ring: RingConfig::default(),
            ops_max: OPS_MAX_DEFAULT,
            fixed_buffers_count: FIXED_BUFFERS_COUNT_DEFAULT,
            fixed_buffer_bytes: FIXED_BUFFER_BYTES_DEFAULT,
            register_fixed_buffers: true,
            buf_rings_max: BUF_RINGS_MAX_DEFAULT,
            read_ioprio: 0,
        }
    }
}

impl DriverConfig {
    /// Checks every bound; the message names the key, the value and what is
    /// allowed.
    pub fn validate(&self) -> Result<(), String> {
        self.ring.validate()?;
        if self.ops_max == 0 || self.ops_max > OPS_MAX_LIMIT {
            return Err(format!(
                "ops_max = {}: must be from 1 to {OPS_MAX_LIMIT}",
                self.ops_max
            ));
        }
        if self.fixed_buffers_count == 0
            || self.fixed_buffers_count > crate::buffers::FIXED_BUFFERS_COUNT_MAX
        {
            return Err(format!(
                "fixed_buffers_count = {}: must be from 1 to {}",
                self.fixed_buffers_count,
                crate::buffers::FIXED_BUFFERS_COUNT_MAX
            ));
        }
        if self.fixed_buffer_bytes == 0
            || self.fixed_buffer_bytes > crate::buffers::FIXED_BUFFER_BYTES_MAX
        {
            return Err(format!(
                "fixed_buffer_bytes = {}: must be from 1 to {}",
                self.fixed_buffer_bytes,
                crate::buffers::FIXED_BUFFER_BYTES_MAX
            ));
        }
        Ok(())
    }
}

/// Counters for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// SQEs pushed (including cancels, linked timeouts and wake re-arms).
    pub submissions: u64,
    /// CQEs consumed.
    pub completions: u64,
    /// Submissions refused because the SQ was full.
    pub sq_full: u64,
    /// Submissions refused because `ops_max` ops were in flight.
    pub slots_full: u64,
    /// CQEs ignored because their generation or kind did not match the slot.
    pub stale_completions: u64,
    /// Provided-buffer ids from the kernel that were out of range or repeated.
    pub bad_buffer_ids: u64,
    /// Wake-ups received through the eventfd.
    pub wakeups: u64,
    /// The kernel's CQ overflow counter.
    pub cq_overflow: u32,
}

/// Wakes a [`Driver`] blocked in [`Driver::wait`] from any thread.
#[derive(Clone, Debug)]
pub struct Waker {
    eventfd: Arc<OwnedFd>,
}

impl Waker {
    /// A waker for any loop that watches `eventfd` itself (the portable
    /// epoll engine): [`Waker::wake`] adds one to its counter.
    pub fn from_eventfd(eventfd: Arc<OwnedFd>) -> Waker {
        Waker { eventfd }
    }

    /// Wakes the driver. Never blocks; wake-ups coalesce.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd this Waker
        // keeps open. An error (EAGAIN when the counter is saturated) means
        // a wake-up is already pending, so it is ignored.
        let _ = unsafe { libc::write(self.eventfd.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
    }
}

/// Extra memory the kernel reads or writes for an op, kept beside it.
#[derive(Default)]
struct Extra {
    /// The address a connect reads; boxed so it does not move while the
    /// kernel may read it.
    sockaddr: Option<Box<(libc::sockaddr_storage, libc::socklen_t)>>,
    statx: Option<Box<Statx>>,
    timespec: Option<Box<types::Timespec>>,
    link_timespec: Option<Box<types::Timespec>>,
    /// A recvmsg's header, iovec and control buffer; boxed so the pointers
    /// the kernel follows (and writes through at completion) stay put.
    msg: Option<Box<MsgBox>>,
}

struct InFlight {
    kind: OpKind,
    token: u64,
    op: Op,
    extra: Extra,
    /// A linked timeout was submitted and its CQE has not arrived.
    link_pending: bool,
}

enum SlotState {
    Free,
    /// An op is in flight; the slot owns everything it uses.
    InFlight(Box<InFlight>),
    /// The op completed but its linked timeout's CQE is still due; the
    /// slot (and the timespec) stay reserved so the generation stays valid.
    AwaitingLinkTimeout {
        /// Kept, not read: the kernel may still refer to it.
        _timespec: Option<Box<types::Timespec>>,
    },
}

struct Slot {
    generation: u32,
    state: SlotState,
}

static NEXT_DRIVER_ID: AtomicU64 = AtomicU64::new(1);

/// Owns a ring, the slot table of operations in flight, the fixed-buffer
/// pool, provided-buffer rings and the wake-up eventfd. Not `Send`: one
/// driver per engine thread (the ring may be SINGLE_ISSUER).
pub struct Driver {
    // Field order matters for drop: the ring is closed before the memory
    // it may have referenced (pools, buf rings, wake buffer) is freed.
    ring: Ring,
    slots: Vec<Slot>,
    /// Free slot indexes; capacity `ops_max`, never exceeded.
    free: Vec<u32>,
    in_flight: usize,
    pool: FixedBufferPool,
    buf_rings: Vec<BufRing>,
    buf_rings_max: u16,
    eventfd: Arc<OwnedFd>,
    /// The eventfd read's target; the kernel writes 8 bytes here.
    wake_buf: Box<u64>,
    wake_armed: bool,
    woken: bool,
    shutting_down: bool,
    id: u64,
    stats: DriverStats,
    read_ioprio: u16,
}

impl Driver {
    /// Sets up the ring, allocates the slot table and the fixed-buffer pool,
    /// registers the pool (falling back to unregistered, see
    /// [`Driver::fixed_buffers_refused`]) and arms the wake-up eventfd.
    /// `EINVAL` for a config that fails [`DriverConfig::validate`].
    pub fn new(config: DriverConfig) -> Result<Driver, Errno> {
        config.validate().map_err(|_| Errno::EINVAL)?;
        let ring = Ring::new(config.ring)?;
        let pool = FixedBufferPool::new(config.fixed_buffers_count, config.fixed_buffer_bytes)?;
        // SAFETY: eventfd takes no pointers.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(Errno::from_io(&std::io::Error::last_os_error()));
        }
        // SAFETY: eventfd succeeded, so `raw` is an open fd owned by nobody else.
        let eventfd = Arc::new(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
        let ops_max = config.ops_max;
        let mut driver = Driver {
            ring,
            slots: (0..ops_max)
                .map(|_| Slot {
                    generation: 0,
                    state: SlotState::Free,
                })
                .collect(),
            free: (0..ops_max).rev().collect(),
            in_flight: 0,
            pool,
            buf_rings: Vec::with_capacity(usize::from(config.buf_rings_max)),
            buf_rings_max: config.buf_rings_max,
            eventfd,
            wake_buf: Box::new(0),
            wake_armed: false,
            woken: false,
            shutting_down: false,
            id: NEXT_DRIVER_ID.fetch_add(1, Ordering::Relaxed),
            stats: DriverStats::default(),
            read_ioprio: config.read_ioprio,
        };
        if config.register_fixed_buffers {
            // A refusal is remembered in the pool; the driver works either way.
            let _ = driver.register_fixed_buffers();
        }
        driver.arm_wake().map_err(|_| Errno::EAGAIN)?;
        Ok(driver)
    }

    /// Tries to register the fixed-buffer pool with this ring. On refusal
    /// (memlock, EPERM, ENOMEM, EBUSY) the pool stays unregistered and usable
    /// and the reason is kept for [`Driver::fixed_buffers_refused`].
    pub fn register_fixed_buffers(&mut self) -> Result<(), RegistrationRefused> {
        if self.pool.registered_to() == Some(self.id) {
            return Ok(());
        }
        let result = self.pool.register(&self.ring.inner_ref().submitter());
        self.pool
            .set_registered_to(result.is_ok().then_some(self.id));
        result
    }

    /// The flags the ring was created with.
    pub fn setup_flags(&self) -> SetupFlags {
        self.ring.flags()
    }

    /// The fixed-buffer pool (lease buffers from it).
    pub fn fixed_buffers(&self) -> &FixedBufferPool {
        &self.pool
    }

    /// `None` when fixed buffers are registered; else why not.
    pub fn fixed_buffers_refused(&self) -> Option<RegistrationRefused> {
        if self.pool.registered_to() == Some(self.id) {
            // The table is registered; a buffer registered on its first lease may still
            // have been refused (memlock), and the ones after it stay unregistered.
            self.pool.refused()
        } else {
            self.pool.refused().or_else(|| {
                Some(RegistrationRefused {
                    errno: Errno::EINVAL,
                    reason: "fixed buffers were not registered (disabled in the config)"
                        .to_string(),
                })
            })
        }
    }

    /// A waker for other threads.
    pub fn waker(&self) -> Waker {
        Waker {
            eventfd: Arc::clone(&self.eventfd),
        }
    }

    /// Returns and clears whether a wake-up arrived since the last call.
    pub fn take_woken(&mut self) -> bool {
        std::mem::take(&mut self.woken)
    }

    /// Operations in flight (not counting the driver's own wake-up read).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Counters.
    pub fn stats(&mut self) -> DriverStats {
        let mut stats = self.stats;
        stats.cq_overflow = self.ring.cq_overflow();
        stats
    }

    /// Bounds the io-wq worker threads the kernel may start for this ring:
    /// `bounded` for work on regular files and block devices, `unbounded`
    /// for the rest (a splice into a pipe counts as unbounded: the pipe is
    /// the op's target). Zero leaves a class as it is. Returns the limits
    /// now in force. Without this a storm of cold reads could start
    /// hundreds of kernel threads (the default unbounded limit is
    /// `RLIMIT_NPROC`).
    pub fn limit_iowq_workers(&mut self, bounded: u32, unbounded: u32) -> Result<[u32; 2], Errno> {
        let mut limits = [bounded, unbounded];
        self.ring
            .inner_ref()
            .submitter()
            .register_iowq_max_workers(&mut limits)
            .map_err(|e| Errno::from_io(&e))?;
        // The kernel answers with the previous limits; read them back.
        let mut now = [0u32; 2];
        self.ring
            .inner_ref()
            .submitter()
            .register_iowq_max_workers(&mut now)
            .map_err(|e| Errno::from_io(&e))?;
        Ok(now)
    }

    /// Allocates and registers a provided-buffer ring of `entries` (a power
    /// of two up to 32768) buffers of `buf_bytes` each, for
    /// [`Op::RecvMulti`]. Bounded by `buf_rings_max` (`EAGAIN` beyond it).
    pub fn register_buf_ring(&mut self, entries: u16, buf_bytes: u32) -> Result<BufRing, Errno> {
        if self.buf_rings.len() >= usize::from(self.buf_rings_max) {
            return Err(Errno::EAGAIN);
        }
        let bgid = u16::try_from(self.buf_rings.len()).map_err(|_| Errno::EAGAIN)?;
        let ring = BufRing::new(bgid, entries, buf_bytes)?;
        // SAFETY: the ring memory is page-aligned, holds `entries` entries,
        // and stays alive for as long as the kernel can read it: the driver
        // keeps a clone in `buf_rings` until after the io_uring is closed
        // (field order), and every op using the group holds a clone too.
        unsafe {
            self.ring
                .inner_ref()
                .submitter()
                .register_buf_ring_with_flags(ring.ring_addr(), entries, bgid, 0)
        }
        .map_err(|e| Errno::from_io(&e))?;
        self.buf_rings.push(ring.clone());
        Ok(ring)
    }

    /// The raw level: push an SQE the driver does not track.
    ///
    /// # Safety
    ///
    /// As [`Ring::push`]: everything the entry points to must stay valid
    /// until its final completion, and its `user_data` must either be a
    /// stale [`OpId::raw`] (a finished op: the driver then counts and
    /// ignores the completion) or use a tag the driver does not decode as a
    /// live op. Completions for it are otherwise ignored by the driver.
    pub unsafe fn push_raw(&mut self, entry: &squeue::Entry) -> Result<(), QueueFull> {
        // SAFETY: forwarded contract.
        let pushed = unsafe { self.ring.push(entry) };
        if pushed.is_ok() {
            self.stats.submissions += 1;
        }
        pushed
    }

    /// Submits `op`; `token` comes back in every completion for it.
    pub fn submit(&mut self, op: Op, token: u64) -> Result<OpId, SubmitError> {
        self.submit_inner(op, token, None)
    }

    /// Submits `op` linked to a timeout: if it has not completed after
    /// `timeout`, the kernel cancels it (its completion is `Err(ECANCELED)`,
    /// or a short result for a partially done transfer).
    pub fn submit_with_timeout(
        &mut self,
        op: Op,
        token: u64,
        timeout: Duration,
    ) -> Result<OpId, SubmitError> {
        self.submit_inner(op, token, Some(timeout))
    }

    /// Submits `first` and `then` linked (`IOSQE_IO_LINK`): the kernel
    /// starts `then` only once `first` has completed successfully (a short
    /// read or write counts as a failure), and completes `then` with
    /// `Err(ECANCELED)` otherwise. Each has its own completion, with its own
    /// resources, both carrying `token`. A write and the sync that must
    /// follow it go to the kernel in one submission, and the submitting
    /// thread waits for neither.
    pub fn submit_linked(
        &mut self,
        first: Op,
        then: Op,
        token: u64,
    ) -> Result<(OpId, OpId), LinkedSubmitError> {
        let refuse = |kind, first, then| Err(LinkedSubmitError { kind, first, then });
        if self.shutting_down {
            return refuse(SubmitErrorKind::ShuttingDown, first, then);
        }
        if self.ring.sq_space_left() < 2 {
            let _ = self.ring.submit();
            if self.ring.sq_space_left() < 2 {
                self.stats.sq_full += 1;
                return refuse(SubmitErrorKind::QueueFull, first, then);
            }
        }
        if self.free.len() < 2 {
            self.stats.slots_full += 1;
            return refuse(SubmitErrorKind::SlotsFull, first, then);
        }
        let flight = |op: Op| {
            Box::new(InFlight {
                kind: op.kind(),
                token,
                op,
                extra: Extra::default(),
                link_pending: false,
            })
        };
        let (mut a, mut b) = (flight(first), flight(then));
        let (Some(entry_a), Some(entry_b)) = (self.build_entry(&mut a), self.build_entry(&mut b))
        else {
            return refuse(SubmitErrorKind::Invalid, a.op, b.op);
        };
        // Two free slots were checked above.
        let (Some(index_a), Some(index_b)) = (self.free.pop(), self.free.pop()) else {
            return refuse(SubmitErrorKind::SlotsFull, a.op, b.op);
        };
        let user_data = |slots: &[Slot], index: u32, kind: OpKind| {
            slots.get(index as usize).map(|slot| UserData {
                slot: index,
                generation: slot.generation,
                tag: kind as u8,
            })
        };
        let (Some(ud_a), Some(ud_b)) = (
            user_data(&self.slots, index_a, a.kind),
            user_data(&self.slots, index_b, b.kind),
        ) else {
            self.free.push(index_b);
            self.free.push(index_a);
            return refuse(SubmitErrorKind::SlotsFull, a.op, b.op);
        };
        let entry_a = entry_a.user_data(ud_a.pack()).flags(squeue::Flags::IO_LINK);
        let entry_b = entry_b.user_data(ud_b.pack());
        // Everything the entries point to now lives in the two InFlights
        // (heap memory that does not move when the Boxes move into the slots).
        if let Some(slot) = self.slots.get_mut(index_a as usize) {
            slot.state = SlotState::InFlight(a);
        }
        if let Some(slot) = self.slots.get_mut(index_b as usize) {
            slot.state = SlotState::InFlight(b);
        }
        // SAFETY: as in `submit_inner`: each entry points only into memory
        // owned by its InFlight, now in its slot until its final CQE (a
        // cancelled second op still completes, with ECANCELED), and carries
        // its slot's current generation. Space for both was checked above
        // and nothing was pushed in between, so the link cannot be left
        // dangling by a failed second push.
        let pushed_a = unsafe { self.ring.push(&entry_a) };
        let pushed_b = match pushed_a {
            // SAFETY: as above, for the second entry.
            Ok(()) => unsafe { self.ring.push(&entry_b) },
            Err(e) => Err(e),
        };
        if pushed_a.is_err() || pushed_b.is_err() {
            // Unreachable (space was checked); keep the books straight if it
            // ever happens: an entry already pushed stays the kernel's.
            let mut ops = Vec::new();
            for (index, pushed) in [(index_a, pushed_a.is_ok()), (index_b, false)] {
                if pushed {
                    continue;
                }
                if let Some(slot) = self.slots.get_mut(index as usize) {
                    if let SlotState::InFlight(f) =
                        std::mem::replace(&mut slot.state, SlotState::Free)
                    {
                        ops.push(f.op);
                    }
                }
                self.free.push(index);
            }
            self.stats.sq_full += 1;
            if pushed_a.is_ok() {
                self.in_flight += 1;
                self.stats.submissions += 1;
            }
            let then = ops.pop();
            let first = ops.pop();
            return match (first, then) {
                (Some(first), Some(then)) => refuse(SubmitErrorKind::QueueFull, first, then),
                (None, Some(then)) => refuse(SubmitErrorKind::QueueFull, Op::Nop, then),
                _ => refuse(SubmitErrorKind::QueueFull, Op::Nop, Op::Nop),
            };
        }
        self.stats.submissions += 2;
        self.in_flight += 2;
        Ok((OpId(ud_a.pack()), OpId(ud_b.pack())))
    }

    fn submit_inner(
        &mut self,
        op: Op,
        token: u64,
        link: Option<Duration>,
    ) -> Result<OpId, SubmitError> {
        if self.shutting_down {
            return Err(SubmitError {
                kind: SubmitErrorKind::ShuttingDown,
                op,
            });
        }
        // A fixed buffer leased for the first time goes into the ring's sparse table now
        // (see `FixedBufferPool::register_upto`); if that is refused the op reads or
        // writes the same memory with the plain opcode.
        if let Op::ReadFixed { buf, .. } | Op::WriteFixed { buf, .. } = &op {
            if self.pool.registered_to() == Some(self.id) {
                self.pool
                    .register_upto(&self.ring.inner_ref().submitter(), buf.index());
            }
        }
        let need = if link.is_some() { 2 } else { 1 };
        if self.ring.sq_space_left() < need {
            let _ = self.ring.submit();
            if self.ring.sq_space_left() < need {
                self.stats.sq_full += 1;
                return Err(SubmitError {
                    kind: SubmitErrorKind::QueueFull,
                    op,
                });
            }
        }
        let Some(index) = self.free.pop() else {
            self.stats.slots_full += 1;
            return Err(SubmitError {
                kind: SubmitErrorKind::SlotsFull,
                op,
            });
        };
        let kind = op.kind();
        let mut flight = Box::new(InFlight {
            kind,
            token,
            op,
            extra: Extra::default(),
            link_pending: link.is_some(),
        });
        let Some(entry) = self.build_entry(&mut flight) else {
            self.free.push(index);
            return Err(SubmitError {
                kind: SubmitErrorKind::Invalid,
                op: flight.op,
            });
        };
        let Some(slot) = self.slots.get_mut(index as usize) else {
            self.free.push(index);
            return Err(SubmitError {
                kind: SubmitErrorKind::SlotsFull,
                op: flight.op,
            });
        };
        let ud = UserData {
            slot: index,
            generation: slot.generation,
            tag: kind as u8,
        };
        let mut entry = entry.user_data(ud.pack());
        let mut link_entry = None;
        if let Some(timeout) = link {
            entry = entry.flags(squeue::Flags::IO_LINK);
            let ts = Box::new(types::Timespec::from(timeout));
            let lt = opcode::LinkTimeout::new(&*ts as *const types::Timespec)
                .build()
                .user_data(
                    UserData {
                        tag: tag::LINK_TIMEOUT,
                        ..ud
                    }
                    .pack(),
                );
            flight.extra.link_timespec = Some(ts);
            link_entry = Some(lt);
        }
        // Everything the entries point to now lives in `flight` (heap
        // memory that does not move when the Box moves into the slot).
        slot.state = SlotState::InFlight(flight);
        // SAFETY: the entry points only into memory owned by the InFlight now
        // stored in the slot (buffers, path, statx, timespec and recvmsg header boxes;
        // a recvmsg header points only into its own box and the op's buffer) or
        // into fds it holds; the slot keeps it until the final CQE for this
        // user_data arrives (or, at drop, leaks it). The user_data is this
        // slot's current generation, so no other live op shares it.
        let first = unsafe { self.ring.push(&entry) };
        let second = match (&first, &link_entry) {
            // SAFETY: the timespec lives in the same InFlight (see above),
            // and the slot stays reserved until this entry's CQE arrives
            // (SlotState::AwaitingLinkTimeout).
            (Ok(()), Some(lt)) => unsafe { self.ring.push(lt) },
            _ => Ok(()),
        };
        // Space for `need` entries was checked above and nothing pushed in
        // between, so neither push can fail; the branches below keep the
        // books straight if that reasoning is ever broken.
        if first.is_err() {
            if let Some(slot) = self.slots.get_mut(index as usize) {
                if let SlotState::InFlight(flight) =
                    std::mem::replace(&mut slot.state, SlotState::Free)
                {
                    self.free.push(index);
                    self.stats.sq_full += 1;
                    return Err(SubmitError {
                        kind: SubmitErrorKind::QueueFull,
                        op: flight.op,
                    });
                }
            }
        }
        if second.is_err() {
            // The op is queued without its timeout: no timeout CQE will come,
            // so the slot must not wait for one.
            if let Some(Slot {
                state: SlotState::InFlight(flight),
                ..
            }) = self.slots.get_mut(index as usize)
            {
                flight.link_pending = false;
            }
        }
        self.stats.submissions += need as u64;
        self.in_flight += 1;
        Ok(OpId(ud.pack()))
    }

    /// Builds the SQE (without user_data) for an op whose resources are
    /// already in `flight`. `None` when the op is malformed.
    fn build_entry(&self, flight: &mut InFlight) -> Option<squeue::Entry> {
        let registered = self.pool.registered_to() == Some(self.id);
        let extra = &mut flight.extra;
        Some(match &mut flight.op {
            Op::AcceptMulti { listener } => {
                opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
                    .flags(libc::SOCK_CLOEXEC)
                    .build()
            }
            Op::Recv { fd, buf, flags } => {
                let (ptr, len) = buf.spare();
                if len == 0 {
                    return None;
                }
                let len = u32::try_from(len).unwrap_or(u32::MAX);
                opcode::Recv::new(types::Fd(fd.as_raw_fd()), ptr, len)
                    .flags(*flags)
                    .build()
            }
            Op::RecvMsg { fd, buf, flags } => {
                let (ptr, len) = buf.spare();
                if len == 0 {
                    return None;
                }
                let msg = extra.msg.insert(MsgBox::new_boxed());
                let hdr = msg.prepare(ptr, len);
                opcode::RecvMsg::new(types::Fd(fd.as_raw_fd()), hdr)
                    .flags(*flags as u32)
                    .build()
            }
            Op::RecvMulti { fd, ring, flags } => {
                opcode::RecvMulti::new(types::Fd(fd.as_raw_fd()), ring.bgid())
                    .flags(*flags)
                    .build()
            }
            Op::Send {
                fd,
                buf,
                offset,
                flags,
            } => {
                let rest = buf.as_slice().get(*offset..)?;
                let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
                opcode::Send::new(types::Fd(fd.as_raw_fd()), rest.as_ptr(), len)
                    .flags(*flags)
                    .build()
            }
            Op::SpliceToPipe {
                fd_in,
                offset_in,
                pipe,
                len,
            } => {
                let off = i64::try_from(*offset_in).ok()?;
                opcode::Splice::new(
                    types::Fd(fd_in.as_raw_fd()),
                    off,
                    types::Fd(pipe.write_fd()),
                    -1,
                    *len,
                )
                .build()
            }
            Op::SpliceFromPipe { pipe, fd_out, len } => opcode::Splice::new(
                types::Fd(pipe.read_fd()),
                -1,
                types::Fd(fd_out.as_raw_fd()),
                -1,
                *len,
            )
            .build(),
            Op::ReadFixed { file, offset, buf } => {
                let cap = u32::try_from(buf.capacity()).unwrap_or(u32::MAX);
                let ptr = buf.ptr();
                if registered && self.pool.index_registered(buf.index()) {
                    opcode::ReadFixed::new(types::Fd(file.as_raw_fd()), ptr, cap, buf.index())
                        .offset(*offset)
                        .ioprio(self.read_ioprio)
                        .build()
                } else {
                    opcode::Read::new(types::Fd(file.as_raw_fd()), ptr, cap)
                        .offset(*offset)
                        .ioprio(self.read_ioprio)
                        .build()
                }
            }
            Op::WriteFixed { file, offset, buf } => {
                let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
                let ptr = buf.ptr().cast_const();
                if registered && self.pool.index_registered(buf.index()) {
                    opcode::WriteFixed::new(types::Fd(file.as_raw_fd()), ptr, len, buf.index())
                        .offset(*offset)
                        .build()
                } else {
                    opcode::Write::new(types::Fd(file.as_raw_fd()), ptr, len)
                        .offset(*offset)
                        .build()
                }
            }
            Op::OpenAt {
                dir,
                path,
                flags,
                mode,
            } => opcode::OpenAt::new(types::Fd(dir_fd(dir)), path.as_ptr())
                .flags(*flags | libc::O_CLOEXEC)
                .mode(*mode)
                .build(),
            Op::Statx {
                dir,
                path,
                flags,
                mask,
            } => {
                // SAFETY: libc::statx is plain old data; all-zero is valid.
                let mut stx: Box<Statx> = Box::new(Statx(unsafe { std::mem::zeroed() }));
                let ptr = (&mut stx.0 as *mut libc::statx).cast::<types::statx>();
                extra.statx = Some(stx);
                opcode::Statx::new(types::Fd(dir_fd(dir)), path.as_ptr(), ptr)
                    .flags(*flags)
                    .mask(*mask)
                    .build()
            }
            Op::Close { fd } => opcode::Close::new(types::Fd(fd.as_raw_fd())).build(),
            Op::Timeout { duration } => {
                let ts = Box::new(types::Timespec::from(*duration));
                let ptr = &*ts as *const types::Timespec;
                extra.timespec = Some(ts);
                opcode::Timeout::new(ptr).build()
            }
            Op::Nop => opcode::Nop::new().build(),
            Op::Connect { fd, addr } => {
                let boxed = Box::new(sockaddr_of(addr));
                let ptr = (&boxed.0 as *const libc::sockaddr_storage).cast::<libc::sockaddr>();
                let len = boxed.1;
                extra.sockaddr = Some(boxed);
                opcode::Connect::new(types::Fd(fd.as_raw_fd()), ptr, len).build()
            }
            Op::Fadvise {
                file,
                offset,
                len,
                advice,
            } => opcode::Fadvise::new(types::Fd(file.as_raw_fd()), *len as libc::off_t, *advice)
                .offset(*offset)
                .build(),
            Op::PollAdd { fd, events } => {
                opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), *events).build()
            }
            Op::Fsync { file, datasync } => {
                let flags = if *datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                    .flags(flags)
                    .build()
            }
            Op::SyncFileRange {
                file,
                offset,
                len,
                flags,
            } => {
                i64::try_from(*offset).ok()?;
                opcode::SyncFileRange::new(types::Fd(file.as_raw_fd()), *len)
                    .offset(*offset)
                    .flags(*flags)
                    .build()
            }
        })
    }

    /// Asks the kernel to cancel `id`. Its resources stay in the slot until
    /// the op's own completion arrives (usually `Err(ECANCELED)`), which
    /// hands them back as usual. Cancelling twice is harmless.
    pub fn cancel(&mut self, id: OpId) -> Result<(), CancelError> {
        let ud = id.user_data();
        let live = matches!(
            self.slots.get(ud.slot as usize),
            Some(Slot { generation, state: SlotState::InFlight(f) })
                if *generation == ud.generation && f.kind as u8 == ud.tag
        );
        if !live {
            return Err(CancelError::NotInFlight);
        }
        self.push_cancel(id.0, ud)
            .map_err(|_| CancelError::QueueFull)
    }

    fn push_cancel(&mut self, target: u64, ud: UserData) -> Result<(), QueueFull> {
        let entry = opcode::AsyncCancel::new(target).build().user_data(
            UserData {
                tag: tag::CANCEL,
                ..ud
            }
            .pack(),
        );
        // SAFETY: AsyncCancel points to no memory; its user_data carries the
        // reserved CANCEL tag, which never matches a live op.
        let pushed = unsafe { self.ring.push(&entry) };
        if pushed.is_ok() {
            self.stats.submissions += 1;
        } else {
            self.stats.sq_full += 1;
        }
        pushed
    }

    fn arm_wake(&mut self) -> Result<(), QueueFull> {
        let ptr = (&mut *self.wake_buf as *mut u64).cast::<u8>();
        let entry = opcode::Read::new(types::Fd(self.eventfd.as_raw_fd()), ptr, 8)
            .build()
            .user_data(
                UserData {
                    slot: 0,
                    generation: 0,
                    tag: tag::WAKE,
                }
                .pack(),
            );
        // SAFETY: the read targets `wake_buf`, a Box owned by the driver that
        // is not touched while `wake_armed` is true and is only freed after
        // the wake read's final CQE (or leaked at drop); the eventfd is kept
        // open by the driver's Arc.
        let pushed = unsafe { self.ring.push(&entry) };
        if pushed.is_ok() {
            self.wake_armed = true;
            self.stats.submissions += 1;
        }
        pushed
    }

    /// Submits what is queued and waits until at least `min_complete`
    /// completions are ready or `timeout` passes (`None`: no limit). With
    /// `min_complete = 0` it only submits and runs pending task work, which
    /// a DEFER_TASKRUN ring needs before completions become visible. A wake
    /// through [`Waker`] counts as a completion (consumed by
    /// [`Driver::complete`], reported by [`Driver::take_woken`]).
    pub fn wait(&mut self, min_complete: usize, timeout: Option<Duration>) -> Result<(), Errno> {
        self.ring.submit_and_wait(min_complete, timeout)
    }

    /// Like [`Driver::wait`] for one completion, but first polls the ring
    /// for up to `spin`, yielding the CPU between polls, before it sleeps.
    /// A thread that sleeps in the kernel pays a wake-up (an IPI, and on a
    /// VM an exit from idle) for the next completion; one that polls while
    /// traffic is flowing does not. `sched_yield` between polls lets any
    /// other runnable thread on this CPU go first, so the spin only uses
    /// time nothing else wanted.
    pub fn wait_spinning(
        &mut self,
        spin: Duration,
        timeout: Option<Duration>,
    ) -> Result<(), Errno> {
        let start = std::time::Instant::now();
        loop {
            self.ring.submit_and_wait(0, None)?;
            if !self.ring.inner().completion().is_empty() {
                return Ok(());
            }
            if start.elapsed() >= spin {
                break;
            }
            std::thread::yield_now();
        }
        let timeout = timeout.map(|t| t.saturating_sub(start.elapsed()));
        self.ring.submit_and_wait(1, timeout)
    }

    /// Drains ready CQEs into `out`, adding at most `max` completions, and
    /// returns how many were added. Driver-internal CQEs (wake-ups, cancel
    /// results, linked timeouts, stale ones) are consumed without being
    /// added. Does not enter the kernel: call [`Driver::wait`] first.
    pub fn complete(&mut self, out: &mut Vec<Completion>, max: usize) -> usize {
        let mut added = 0;
        while added < max {
            let cqe = {
                let mut cq = self.ring.inner().completion();
                cq.next()
            };
            let Some(cqe) = cqe else { break };
            self.stats.completions += 1;
            if let Some(completion) = self.on_cqe(cqe.user_data(), cqe.result(), cqe.flags()) {
                out.push(completion);
                added += 1;
            }
        }
        added
    }

    fn on_cqe(&mut self, raw: u64, res: i32, flags: u32) -> Option<Completion> {
        let ud = UserData::unpack(raw);
        match ud.tag {
            tag::WAKE => {
                self.wake_armed = false;
                if res >= 0 {
                    self.woken = true;
                    self.stats.wakeups += 1;
                }
                if !self.shutting_down && Errno::from_result(res) != Err(Errno::ECANCELED) {
                    // If the SQ is full now, the next wait() flushes it and
                    // the wake-up is re-armed at the next turn.
                    if self.arm_wake().is_err() {
                        let _ = self.ring.submit();
                        let _ = self.arm_wake();
                    }
                }
                return None;
            }
            tag::CANCEL => return None,
            tag::LINK_TIMEOUT => {
                let slot = self.slots.get_mut(ud.slot as usize)?;
                if slot.generation != ud.generation {
                    self.stats.stale_completions += 1;
                    return None;
                }
                match &mut slot.state {
                    SlotState::InFlight(flight) => flight.link_pending = false,
                    SlotState::AwaitingLinkTimeout { .. } => {
                        self.release_slot(ud.slot);
                    }
                    SlotState::Free => self.stats.stale_completions += 1,
                }
                return None;
            }
            _ => {}
        }
        let Some(kind) = OpKind::from_tag(ud.tag) else {
            self.stats.stale_completions += 1;
            return None;
        };
        let live = matches!(
            self.slots.get(ud.slot as usize),
            Some(Slot { generation, state: SlotState::InFlight(f) })
                if *generation == ud.generation && f.kind == kind
        );
        if !live {
            self.stats.stale_completions += 1;
            return None;
        }
        let result = Errno::from_result(res);
        let more = cqueue::more(flags);
        let op_id = OpId(raw);
        if more {
            return self.on_multishot(ud, op_id, kind, result, flags);
        }
        // Final completion: take everything out of the slot.
        let slot = self.slots.get_mut(ud.slot as usize)?;
        let SlotState::InFlight(flight) = std::mem::replace(&mut slot.state, SlotState::Free)
        else {
            return None;
        };
        let InFlight {
            token,
            op,
            extra,
            link_pending,
            ..
        } = *flight;
        if link_pending {
            slot.state = SlotState::AwaitingLinkTimeout {
                _timespec: extra.link_timespec,
            };
        } else {
            self.release_slot(ud.slot);
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        let resources = self.returned(op, extra.statx, extra.msg, result, flags);
        Some(Completion {
            token,
            op_id,
            kind,
            result,
            more: false,
            resources,
        })
    }

    /// A completion of a multishot op that stays armed.
    fn on_multishot(
        &mut self,
        ud: UserData,
        op_id: OpId,
        kind: OpKind,
        result: Result<u32, Errno>,
        flags: u32,
    ) -> Option<Completion> {
        let Slot {
            state: SlotState::InFlight(flight),
            ..
        } = self.slots.get_mut(ud.slot as usize)?
        else {
            return None;
        };
        let token = flight.token;
        let resources = match (&flight.op, result) {
            (Op::AcceptMulti { .. }, Ok(fd)) => accepted_fd(fd),
            (Op::RecvMulti { ring, .. }, Ok(len)) => {
                let ring = ring.clone();
                self.provided(&ring, len, flags)
            }
            _ => Returned::Nothing,
        };
        Some(Completion {
            token,
            op_id,
            kind,
            result,
            more: true,
            resources,
        })
    }

    fn provided(&mut self, ring: &BufRing, len: u32, flags: u32) -> Returned {
        match cqueue::buffer_select(flags) {
            Some(bid) => match ring.take(bid, len) {
                Some(lease) => Returned::Provided(lease),
                None => {
                    self.stats.bad_buffer_ids += 1;
                    Returned::Nothing
                }
            },
            None => Returned::Nothing,
        }
    }

    /// The resources a final completion hands back.
    fn returned(
        &mut self,
        op: Op,
        statx: Option<Box<Statx>>,
        msg: Option<Box<MsgBox>>,
        result: Result<u32, Errno>,
        flags: u32,
    ) -> Returned {
        match op {
            Op::AcceptMulti { .. } => match result {
                Ok(fd) => accepted_fd(fd),
                Err(_) => Returned::Nothing,
            },
            Op::Recv { mut buf, .. } => {
                if let Ok(n) = result {
                    buf.advance(n as usize);
                }
                Returned::Buf(buf)
            }
            Op::RecvMsg { mut buf, .. } => {
                let mut stamp = None;
                if let Ok(n) = result {
                    buf.advance(n as usize);
                    stamp = msg.and_then(|m| m.stamp());
                }
                Returned::Stamped { buf, stamp }
            }
            Op::RecvMulti { ring, .. } => match result {
                Ok(len) => self.provided(&ring, len, flags),
                Err(_) => Returned::Nothing,
            },
            Op::Send { buf, .. } => Returned::Buf(buf),
            Op::SpliceToPipe { mut pipe, .. } => {
                note_splice(&mut pipe, result, Pipe::note_filled);
                Returned::Pipe(pipe)
            }
            Op::SpliceFromPipe { mut pipe, .. } => {
                note_splice(&mut pipe, result, Pipe::note_drained);
                Returned::Pipe(pipe)
            }
            Op::ReadFixed { mut buf, .. } => {
                if let Ok(n) = result {
                    buf.set_len(n as usize);
                }
                Returned::Fixed(buf)
            }
            Op::WriteFixed { buf, .. } => Returned::Fixed(buf),
            Op::OpenAt { .. } => match result {
                Ok(fd) => accepted_fd(fd),
                Err(_) => Returned::Nothing,
            },
            Op::Statx { .. } => match (result, statx) {
                (Ok(_), Some(stx)) => Returned::Statx(stx),
                _ => Returned::Nothing,
            },
            Op::Close { fd } => {
                if result == Err(Errno::ECANCELED) {
                    // Cancelled before it ran: the fd is still open and ours.
                    Returned::Fd(fd)
                } else {
                    // The kernel closed it (on error too, as close(2) does on
                    // Linux); do not close the number a second time.
                    let _ = fd.into_raw_fd();
                    Returned::Nothing
                }
            }
            Op::Timeout { .. }
            | Op::Nop
            | Op::Connect { .. }
            | Op::PollAdd { .. }
            | Op::Fadvise { .. }
            | Op::Fsync { .. }
            | Op::SyncFileRange { .. } => Returned::Nothing,
        }
    }

    fn release_slot(&mut self, index: u32) {
        if let Some(slot) = self.slots.get_mut(index as usize) {
            slot.state = SlotState::Free;
            // A new generation makes every outstanding user_data for the old
            // occupant stale.
            slot.generation = (slot.generation + 1) & GENERATION_MASK;
            self.free.push(index);
        }
    }

    /// Cancels every operation in flight and waits up to `timeout` for their
    /// completions, dropping the resources they hand back. Afterwards the
    /// driver refuses new submissions. `Ok` when nothing is left in flight,
    /// else `Err(n)` with the number still owned by the kernel.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<(), usize> {
        self.shutting_down = true;
        let deadline = Instant::now() + timeout;
        let mut targets: Vec<u64> = Vec::with_capacity(self.in_flight + 1);
        for (index, slot) in self.slots.iter().enumerate() {
            if let SlotState::InFlight(flight) = &slot.state {
                let ud = UserData {
                    slot: index as u32,
                    generation: slot.generation,
                    tag: flight.kind as u8,
                };
                targets.push(ud.pack());
            }
        }
        if self.wake_armed {
            targets.push(
                UserData {
                    slot: 0,
                    generation: 0,
                    tag: tag::WAKE,
                }
                .pack(),
            );
        }
        let mut scratch: Vec<Completion> = Vec::with_capacity(64);
        for target in targets {
            while self.push_cancel(target, UserData::unpack(target)).is_err() {
                // The SQ stays full only if the kernel refuses to take
                // entries; give up on cancelling then and just wait.
                if self.ring.submit().is_err() || Instant::now() >= deadline {
                    break;
                }
            }
        }
        while self.outstanding() > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if self.ring.submit_and_wait(1, Some(deadline - now)).is_err() {
                break;
            }
            while self.complete(&mut scratch, 64) > 0 {
                scratch.clear();
            }
        }
        match self.outstanding() {
            0 => Ok(()),
            n => Err(n),
        }
    }

    /// Ops and internal reads whose CQE has not arrived.
    fn outstanding(&self) -> usize {
        let awaiting = self
            .slots
            .iter()
            .filter(|s| matches!(s.state, SlotState::AwaitingLinkTimeout { .. }))
            .count();
        self.in_flight + awaiting + usize::from(self.wake_armed)
    }
}

impl Drop for Driver {
    /// Cancels everything and waits up to [`DROP_DRAIN_TIMEOUT`]. What the
    /// kernel still owns after that is leaked on purpose: freeing memory the
    /// kernel may still write into would be undefined behaviour, a leak at
    /// teardown is not.
    fn drop(&mut self) {
        if self.shutdown(DROP_DRAIN_TIMEOUT).is_ok() {
            return;
        }
        for slot in &mut self.slots {
            let state = std::mem::replace(&mut slot.state, SlotState::Free);
            // Leases, pipes and boxes inside hold Rc clones of the pools, so
            // forgetting them also keeps the pool memory alive forever.
            std::mem::forget(state);
        }
        if self.wake_armed {
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
        }
        // The registered pool and buffer rings: a leaked op may still use
        // them, so keep them alive too.
        std::mem::forget(self.pool.clone());
        for ring in &self.buf_rings {
            std::mem::forget(ring.clone());
        }
    }
}

/// Updates a pipe's byte count from a splice result. splice(2) reports
/// either the bytes it moved or an error when it moved nothing, so the count
/// stays exact; the one exception is a cancelled splice, whose outcome we do
/// not trust: the pipe is marked dirty so it is closed instead of reused.
fn note_splice(pipe: &mut Pipe, result: Result<u32, Errno>, note: fn(&mut Pipe, usize)) {
    match result {
        Ok(n) => note(pipe, n as usize),
        Err(e) if e == Errno::ECANCELED => pipe.mark_dirty(),
        Err(_) => {}
    }
}

/// `addr` as the `sockaddr` a connect takes, with its length.
fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every
            // sockaddr type; we write one sockaddr_in at its start.
            unsafe {
                std::ptr::write(
                    (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>(),
                    sin,
                )
            };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: as above, for one sockaddr_in6.
            unsafe {
                std::ptr::write(
                    (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>(),
                    sin6,
                )
            };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn dir_fd(dir: &Option<SharedFd>) -> RawFd {
    dir.as_ref().map_or(libc::AT_FDCWD, |d| d.as_raw_fd())
}

fn accepted_fd(fd: u32) -> Returned {
    match RawFd::try_from(fd) {
        // SAFETY: the kernel created this fd for us in the completion (accept
        // or openat) and nothing else owns it.
        Ok(raw) => Returned::Fd(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }),
        Err(_) => Returned::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        let table = [
            UserData {
                slot: 0,
                generation: 0,
                tag: OpKind::Nop as u8,
            },
            UserData {
                slot: u32::MAX,
                generation: GENERATION_MASK,
                tag: tag::LINK_TIMEOUT,
            },
            UserData {
                slot: 7,
                generation: 12345,
                tag: OpKind::Recv as u8,
            },
        ];
        for ud in table {
            assert_eq!(UserData::unpack(ud.pack()), ud);
        }
        assert_eq!(UserData::unpack(0).tag, 0, "tag 0 is never a live op");
        for t in 1..=19u8 {
            assert_eq!(OpKind::from_tag(t).map(|k| k as u8), Some(t));
        }
        for t in [0u8, 20, tag::WAKE, tag::CANCEL, tag::LINK_TIMEOUT] {
            assert_eq!(OpKind::from_tag(t), None);
        }
    }

    #[test]
    fn tokens_round_trip_and_reserved_values_stay_apart() {
        let table = [
            Token::Listener,
            Token::ReadAhead,
            Token::Waker,
            Token::Conn {
                slot: 0,
                generation: 1,
            },
            Token::Conn {
                slot: 70_000,
                generation: Token::GENERATION_MASK,
            },
            Token::Task {
                slot: 63,
                generation: Token::GENERATION_MASK,
            },
            Token::Task {
                slot: 0,
                generation: 1,
            },
        ];
        for token in table {
            assert_eq!(Token::unpack(token.pack()), token);
        }
        let raw: Vec<u64> = table.iter().map(|t| t.pack()).collect();
        for (i, a) in raw.iter().enumerate() {
            assert!(
                !raw[i + 1..].contains(a),
                "{:?} packs like another",
                table[i]
            );
        }
        assert_eq!(Token::next_generation(1), 2);
        assert_eq!(Token::next_generation(Token::GENERATION_MASK), 1);
    }

    #[test]
    fn config_validation_names_the_key() {
        let bad = [
            DriverConfig {
                ops_max: 0,
                ..DriverConfig::default()
            },
            DriverConfig {
                fixed_buffers_count: 0,
                ..DriverConfig::default()
            },
            DriverConfig {
                fixed_buffer_bytes: 0,
                ..DriverConfig::default()
            },
        ];
        for (config, key) in
            bad.iter()
                .zip(["ops_max", "fixed_buffers_count", "fixed_buffer_bytes"])
        {
            let msg = config.validate().unwrap_err();
            assert!(msg.starts_with(key), "{msg}");
        }
        assert!(DriverConfig::default().validate().is_ok());
    }
}
