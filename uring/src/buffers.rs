//! Buffer memory the kernel writes into: one pool of fixed buffers (for
//! `read_fixed`/`write_fixed`, sends and receives) and provided-buffer rings
//! for multishot receives.
//!
//! # Ownership
//!
//! Both are reserved once, at start, and never grow past that: the memory is an anonymous
//! mapping, so a page costs nothing until something writes it. The fixed pool registers a
//! sparse table with the ring at start and each buffer only when it is first leased
//! ([`FixedBufferPool::register_upto`]), so the pinned (resident) part of the pool is as
//! large as the most buffers ever leased at once, not the whole pool (two rings pinned
//! 32 MiB at start before, most of an idle server's RSS). A buffer is handed out
//! as an RAII lease ([`FixedLease`], [`BufLease`]); a lease is the only way
//! to reach the buffer's bytes, and the driver takes the lease *by value*
//! into the [`crate::Op`] that uses it, so while the kernel may write into a
//! buffer no safe code can read or free it. Dropping a lease returns its
//! buffer to the free list (fixed pool) or to the kernel's ring (provided
//! buffers). The backing memory is reference-counted by the leases and the
//! [`crate::Driver`], so it outlives the ring's registration.

use std::alloc::Layout;
use std::cell::{Cell, RefCell};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};

use crate::errno::Errno;

/// Alignment of every buffer region: a page, because registered buffers are
/// pinned page by page and provided-buffer rings must be page-aligned.
const PAGE_BYTES: usize = 4096;

/// Upper bound on fixed buffers: the kernel's IORING_MAX_REG_BUFFERS.
pub const FIXED_BUFFERS_COUNT_MAX: u16 = 16384;
/// Upper bound on one fixed buffer: 1 GiB, the kernel's per-iovec limit.
pub const FIXED_BUFFER_BYTES_MAX: usize = 1 << 30;
/// Upper bound on entries in a provided-buffer ring (kernel limit 32768).
pub const BUF_RING_ENTRIES_MAX: u16 = 32768;

/// A zeroed, page-aligned anonymous mapping that is unmapped on drop. Its pages are
/// faulted in (and count as resident) only when first written or pinned, so reserving a
/// pool costs address space, not memory.
///
/// Invariant: `ptr` is the start of a private anonymous mapping of `len` bytes made by
/// `mmap`, and nothing else unmaps it.
pub(crate) struct PageAlloc {
    ptr: NonNull<u8>,
    len: usize,
}

impl PageAlloc {
    /// Maps `size_bytes` (rounded up to a page) zeroed bytes.
    pub(crate) fn new(size_bytes: usize) -> Result<PageAlloc, Errno> {
        let size = size_bytes
            .max(1)
            .checked_next_multiple_of(PAGE_BYTES)
            .ok_or(Errno::EINVAL)?;
        // Checked here so the layout of a mapping is always a valid allocation size.
        Layout::from_size_align(size, PAGE_BYTES).map_err(|_| Errno::EINVAL)?;
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks aliases
        // no other memory; the arguments are plain values.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Errno::from_io(&std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(raw.cast::<u8>()).ok_or(Errno(libc::ENOMEM))?;
        Ok(PageAlloc { ptr, len: size })
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(crate) fn addr_u64(&self) -> u64 {
        self.ptr.as_ptr() as usize as u64
    }
}

impl Drop for PageAlloc {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` describe our own mapping (type invariant) and this is the
        // only place that unmaps it. Callers that hand the memory to the kernel keep the
        // PageAlloc alive (through an Rc held by the Driver and every lease) until the
        // kernel is done with it.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Why the fixed buffers are not registered with the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistrationRefused {
    /// The errno of `IORING_REGISTER_BUFFERS`.
    pub errno: Errno,
    /// An operator-facing sentence: what to change to get fixed buffers.
    pub reason: String,
}

impl RegistrationRefused {
    pub(crate) fn from_errno(errno: Errno, total_bytes: usize) -> RegistrationRefused {
        let reason = match errno.0 {
            libc::ENOMEM | libc::EPERM => format!(
                "registering {total_bytes} bytes of fixed buffers was refused ({errno}): raise the \
                 memlock limit (ulimit -l, LimitMEMLOCK= in systemd) or grant CAP_IPC_LOCK; \
                 running with unregistered buffers"
            ),
            libc::EBUSY => format!("fixed buffers are already registered on this ring ({errno})"),
            _ => format!(
                "registering fixed buffers failed ({errno}); running with unregistered buffers"
            ),
        };
        RegistrationRefused { errno, reason }
    }
}

struct PoolInner {
    mem: PageAlloc,
    count: u16,
    buf_bytes: usize,
    /// Indexes not leased. Bounded by `count`; allocated at start.
    free: RefCell<Vec<u16>>,
    /// The id of the driver whose ring has the pool registered.
    registered_to: Cell<Option<u64>>,
    /// Buffers `0..registered_upto` are registered in the ring's sparse table; the rest are
    /// registered on first lease (leases hand out the lowest free index, so the buffers
    /// ever leased are always a prefix).
    registered_upto: Cell<u16>,
    /// Registering a buffer failed (memlock): the ones after it stay unregistered and are
    /// read with plain `READ` on the same memory.
    grow_refused: Cell<bool>,
    refused: RefCell<Option<RegistrationRefused>>,
}

/// A pool of `count` buffers of `buf_bytes` each, allocated once. Cloning
/// the handle shares the pool. Not `Send`: a pool belongs to one engine
/// thread, like its ring.
#[derive(Clone)]
pub struct FixedBufferPool {
    inner: Rc<PoolInner>,
}

impl FixedBufferPool {
    /// Allocates the pool (not yet registered with any ring).
    ///
    /// `count` is at most [`FIXED_BUFFERS_COUNT_MAX`], `buf_bytes` at most
    /// [`FIXED_BUFFER_BYTES_MAX`]; both must be non-zero, else `EINVAL`.
    pub fn new(count: u16, buf_bytes: usize) -> Result<FixedBufferPool, Errno> {
        if count == 0
            || count > FIXED_BUFFERS_COUNT_MAX
            || buf_bytes == 0
            || buf_bytes > FIXED_BUFFER_BYTES_MAX
        {
            return Err(Errno::EINVAL);
        }
        let total = usize::from(count)
            .checked_mul(buf_bytes)
            .ok_or(Errno::EINVAL)?;
        let mem = PageAlloc::new(total)?;
        // Hand out low indexes first (pop from the end).
        let free: Vec<u16> = (0..count).rev().collect();
        Ok(FixedBufferPool {
            inner: Rc::new(PoolInner {
                mem,
                count,
                buf_bytes,
                free: RefCell::new(free),
                registered_to: Cell::new(None),
                registered_upto: Cell::new(0),
                grow_refused: Cell::new(false),
                refused: RefCell::new(None),
            }),
        })
    }

    /// Number of buffers.
    pub fn count(&self) -> u16 {
        self.inner.count
    }

    /// Size of each buffer in bytes.
    pub fn buf_bytes(&self) -> usize {
        self.inner.buf_bytes
    }

    /// Buffers currently free.
    pub fn available(&self) -> usize {
        self.inner.free.borrow().len()
    }

    /// True when the pool is registered with a ring (reads and writes use
    /// `READ_FIXED`/`WRITE_FIXED`); false means plain `READ`/`WRITE` on the
    /// same memory.
    pub fn registered(&self) -> bool {
        self.inner.registered_to.get().is_some()
    }

    pub(crate) fn registered_to(&self) -> Option<u64> {
        self.inner.registered_to.get()
    }

    pub(crate) fn set_registered_to(&self, driver_id: Option<u64>) {
        self.inner.registered_to.set(driver_id);
    }

    /// Buffers registered (and so pinned) so far: the most ever leased at once.
    pub fn registered_count(&self) -> u16 {
        self.inner.registered_upto.get()
    }

    /// Bytes of the pool that are registered (pinned, resident).
    pub fn registered_bytes(&self) -> u64 {
        u64::from(self.registered_count()) * self.inner.buf_bytes as u64
    }

    /// Whether the buffer `index` is registered with the ring (else it is read and written
    /// with the plain opcodes).
    pub(crate) fn index_registered(&self, index: u16) -> bool {
        self.registered() && index < self.inner.registered_upto.get()
    }

    /// Registers buffers up to and including `index` in the ring's sparse table, if they
    /// are not yet. A refusal is remembered and later buffers stay unregistered.
    pub(crate) fn register_upto(&self, submitter: &io_uring::Submitter<'_>, index: u16) {
        let inner = &self.inner;
        let from = inner.registered_upto.get();
        if !self.registered() || index < from || index >= inner.count || inner.grow_refused.get() {
            return;
        }
        let iovecs: Vec<libc::iovec> = (from..=index)
            .map(|i| libc::iovec {
                // SAFETY: i < count, so the offset stays inside the allocation of
                // count * buf_bytes bytes.
                iov_base: unsafe { inner.mem.ptr().add(usize::from(i) * inner.buf_bytes) }.cast(),
                iov_len: inner.buf_bytes,
            })
            .collect();
        // SAFETY: as in `register`: every iovec covers memory owned by `inner.mem`, which
        // the Driver keeps alive until after the ring is closed.
        match unsafe { submitter.register_buffers_update(u32::from(from), &iovecs, None) } {
            Ok(()) => inner.registered_upto.set(index + 1),
            Err(err) => {
                inner.grow_refused.set(true);
                *inner.refused.borrow_mut() = Some(RegistrationRefused::from_errno(
                    Errno::from_io(&err),
                    usize::from(index + 1) * inner.buf_bytes,
                ));
            }
        }
    }

    /// Why registration was refused, if it was tried and refused.
    pub fn refused(&self) -> Option<RegistrationRefused> {
        self.inner.refused.borrow().clone()
    }

    /// Leases a free buffer, `None` when all are leased (the caller pushes
    /// back; the pool never grows).
    pub fn lease(&self) -> Option<FixedLease> {
        let index = self.inner.free.borrow_mut().pop()?;
        Some(FixedLease {
            pool: Rc::clone(&self.inner),
            index,
            len: 0,
        })
    }

    /// Registers a sparse table for the pool's buffers with `submitter`'s ring; each buffer
    /// goes into it when first leased ([`Self::register_upto`]). On failure the pool stays
    /// usable unregistered and remembers why.
    pub(crate) fn register(
        &self,
        submitter: &io_uring::Submitter<'_>,
    ) -> Result<(), RegistrationRefused> {
        let inner = &self.inner;
        inner.registered_upto.set(0);
        inner.grow_refused.set(false);
        // Nothing is pinned yet: the table's slots are empty until `register_upto`.
        let result = submitter.register_buffers_sparse(u32::from(inner.count));
        match result {
            Ok(()) => {
                *inner.refused.borrow_mut() = None;
                Ok(())
            }
            Err(err) => {
                let refused = RegistrationRefused::from_errno(
                    Errno::from_io(&err),
                    usize::from(inner.count) * inner.buf_bytes,
                );
                *inner.refused.borrow_mut() = Some(refused.clone());
                Err(refused)
            }
        }
    }
}

/// Exclusive use of one fixed buffer. Returned to the pool on drop.
///
/// Invariant: `index < pool.count`, and no other live lease has the same
/// index (the free list hands each index out once).
pub struct FixedLease {
    pool: Rc<PoolInner>,
    index: u16,
    /// Bytes of the buffer that hold data (`0..=capacity`).
    len: usize,
}

impl FixedLease {
    /// The buffer's index in the registered table.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Size of the buffer in bytes.
    pub fn capacity(&self) -> usize {
        self.pool.buf_bytes
    }

    /// Bytes that hold data.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no bytes hold data.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets how many bytes hold data; clamped to the capacity.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }

    /// Whether this buffer is registered with the ring.
    pub fn registered(&self) -> bool {
        self.pool.registered_to.get().is_some() && self.index < self.pool.registered_upto.get()
    }

    /// The bytes that hold data.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the region [index*buf_bytes, +len) lies inside the pool's
        // allocation (index < count, len <= buf_bytes), belongs to this lease
        // alone (type invariant), and the kernel cannot be writing into it:
        // an in-flight op owns the lease by value, so `&self` here means no
        // op holds it.
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len) }
    }

    /// The whole buffer, for filling by hand; follow with [`Self::set_len`].
    pub fn as_mut_capacity(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only
        // reference to the region.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.pool.buf_bytes) }
    }

    /// Copies `data` into the buffer (as much as fits) and sets the length.
    /// Returns the number of bytes copied.
    pub fn fill_from(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.capacity());
        self.as_mut_capacity()[..n].copy_from_slice(&data[..n]);
        self.len = n;
        n
    }

    pub(crate) fn ptr(&self) -> *mut u8 {
        // SAFETY: index < count (type invariant), so the offset is inside the
        // allocation of count * buf_bytes bytes.
        unsafe {
            self.pool
                .mem
                .ptr()
                .add(usize::from(self.index) * self.pool.buf_bytes)
        }
    }
}

impl Drop for FixedLease {
    fn drop(&mut self) {
        // The free list has capacity `count` and each index is out once, so
        // this push never reallocates.
        self.pool.free.borrow_mut().push(self.index);
    }
}

impl std::fmt::Debug for FixedLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedLease")
            .field("index", &self.index)
            .field("len", &self.len)
            .finish()
    }
}

/// Layout of the kernel's `struct io_uring_buf` (16 bytes). The `resv` field
/// of entry 0 is the ring's tail, which only [`BufRingInner::publish`] writes.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(std::mem::size_of::<RawBuf>() == 16);

pub(crate) struct BufRingInner {
    /// `entries` RawBuf slots shared with the kernel (it reads, we write).
    ring_mem: PageAlloc,
    /// `entries * buf_bytes` bytes of buffers the kernel writes into.
    bufs: PageAlloc,
    entries: u16,
    buf_bytes: u32,
    bgid: u16,
    /// Our copy of the tail; the kernel keeps the head to itself.
    tail: Cell<u16>,
    /// `held[bid]` is true while a [`BufLease`] for `bid` exists, so a
    /// repeated bid (a kernel bug) can never produce two leases.
    held: RefCell<Vec<bool>>,
}

impl BufRingInner {
    /// Gives buffer `bid` (back) to the kernel.
    fn publish(&self, bid: u16) {
        let tail = self.tail.get();
        let slot = usize::from(tail & (self.entries - 1));
        let addr = self.bufs.addr_u64() + u64::from(bid) * u64::from(self.buf_bytes);
        // SAFETY: slot < entries, and ring_mem holds `entries` RawBufs, so
        // `entry` is in bounds and aligned (page-aligned base, 16-byte
        // entries). The kernel only reads entries between its head and our
        // tail; this slot is at the tail, which we have not published yet,
        // so no one else accesses it. Only addr/len/bid are written, never
        // entry 0's `resv`, which is the tail.
        unsafe {
            let entry = self.ring_mem.ptr().cast::<RawBuf>().add(slot);
            std::ptr::addr_of_mut!((*entry).addr).write_volatile(addr);
            std::ptr::addr_of_mut!((*entry).len).write_volatile(self.buf_bytes);
            std::ptr::addr_of_mut!((*entry).bid).write_volatile(bid);
        }
        let next = tail.wrapping_add(1);
        self.tail.set(next);
        // SAFETY: the tail is the u16 at byte offset 14 of the page-aligned
        // ring, so the pointer is valid and 2-byte aligned for the life of
        // `ring_mem`; the kernel reads it concurrently, hence an atomic
        // store. Release ordering makes the entry written above visible to
        // the kernel before the new tail.
        let tail_atomic = unsafe { AtomicU16::from_ptr(self.ring_mem.ptr().add(14).cast::<u16>()) };
        tail_atomic.store(next, Ordering::Release);
    }
}

/// A provided-buffer ring: `entries` buffers of `buf_bytes` in buffer group
/// `bgid`, from which the kernel picks one per multishot receive completion.
/// Created by [`crate::Driver::register_buf_ring`].
#[derive(Clone)]
pub struct BufRing {
    pub(crate) inner: Rc<BufRingInner>,
}

impl std::fmt::Debug for BufRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufRing")
            .field("bgid", &self.inner.bgid)
            .field("entries", &self.inner.entries)
            .field("buf_bytes", &self.inner.buf_bytes)
            .finish()
    }
}

impl BufRing {
    /// Allocates the ring and its buffers and publishes all buffers. The
    /// caller registers `ring_addr()` with the kernel.
    pub(crate) fn new(bgid: u16, entries: u16, buf_bytes: u32) -> Result<BufRing, Errno> {
        if entries == 0
            || !entries.is_power_of_two()
            || entries > BUF_RING_ENTRIES_MAX
            || buf_bytes == 0
        {
            return Err(Errno::EINVAL);
        }
        let ring_mem = PageAlloc::new(usize::from(entries) * std::mem::size_of::<RawBuf>())?;
        let total = usize::from(entries)
            .checked_mul(usize::try_from(buf_bytes).map_err(|_| Errno::EINVAL)?)
            .ok_or(Errno::EINVAL)?;
        let bufs = PageAlloc::new(total)?;
        let inner = BufRingInner {
            ring_mem,
            bufs,
            entries,
            buf_bytes,
            bgid,
            tail: Cell::new(0),
            held: RefCell::new(vec![false; usize::from(entries)]),
        };
        for bid in 0..entries {
            inner.publish(bid);
        }
        Ok(BufRing {
            inner: Rc::new(inner),
        })
    }

    pub(crate) fn ring_addr(&self) -> u64 {
        self.inner.ring_mem.addr_u64()
    }

    /// The buffer group id to use in a multishot receive.
    pub fn bgid(&self) -> u16 {
        self.inner.bgid
    }

    /// Number of buffers.
    pub fn entries(&self) -> u16 {
        self.inner.entries
    }

    /// Size of each buffer in bytes.
    pub fn buf_bytes(&self) -> u32 {
        self.inner.buf_bytes
    }

    /// Buffers currently leased to the caller (not available to the kernel).
    pub fn leased(&self) -> usize {
        self.inner.held.borrow().iter().filter(|&&h| h).count()
    }

    /// Takes buffer `bid` from the kernel's completion, `len` bytes filled.
    /// `None` when bid or len is out of range or the bid is already leased
    /// (both would be kernel bugs; the caller counts them).
    pub(crate) fn take(&self, bid: u16, len: u32) -> Option<BufLease> {
        if bid >= self.inner.entries || len > self.inner.buf_bytes {
            return None;
        }
        let mut held = self.inner.held.borrow_mut();
        let slot = held.get_mut(usize::from(bid))?;
        if *slot {
            return None;
        }
        *slot = true;
        Some(BufLease {
            ring: Rc::clone(&self.inner),
            bid,
            len: usize::try_from(len).ok()?,
        })
    }
}

/// One provided buffer the kernel filled. Dropping it gives the buffer back
/// to the kernel's ring.
///
/// Invariant: `bid < entries`, `len <= buf_bytes`, `held[bid]` is true and
/// no other lease has this bid; the kernel does not write into the buffer
/// because it is not in the ring until this lease is dropped.
pub struct BufLease {
    ring: Rc<BufRingInner>,
    bid: u16,
    len: usize,
}

impl BufLease {
    /// The buffer id within its group.
    pub fn bid(&self) -> u16 {
        self.bid
    }

    /// The received bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the region [bid*buf_bytes, +len) is inside `bufs` (type
        // invariant), and the kernel will not write into it before this
        // lease is dropped, because the bid is not in the ring.
        unsafe {
            std::slice::from_raw_parts(
                self.ring
                    .bufs
                    .ptr()
                    .add(usize::from(self.bid) * self.ring.buf_bytes as usize),
                self.len,
            )
        }
    }

    /// Number of received bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for BufLease {
    fn drop(&mut self) {
        if let Some(slot) = self.ring.held.borrow_mut().get_mut(usize::from(self.bid)) {
            *slot = false;
        }
        self.ring.publish(self.bid);
    }
}

impl std::fmt::Debug for BufLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufLease")
            .field("bid", &self.bid)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_leases_are_bounded_and_returned() {
        let pool = FixedBufferPool::new(2, 4096).unwrap();
        let mut a = pool.lease().unwrap();
        let b = pool.lease().unwrap();
        assert_ne!(a.index(), b.index());
        assert!(pool.lease().is_none(), "pool must not grow");
        assert_eq!(a.fill_from(b"hello"), 5);
        assert_eq!(a.as_slice(), b"hello");
        drop(b);
        assert_eq!(pool.available(), 1);
        assert!(pool.lease().is_some());
        assert!(!pool.registered());
    }

    #[test]
    fn pool_rejects_bad_sizes() {
        let table: &[(u16, usize)] = &[
            (0, 4096),
            (1, 0),
            (FIXED_BUFFERS_COUNT_MAX + 1, 4096),
            (1, FIXED_BUFFER_BYTES_MAX + 1),
        ];
        for &(count, bytes) in table {
            assert_eq!(
                FixedBufferPool::new(count, bytes).err(),
                Some(Errno::EINVAL),
                "{count} x {bytes}"
            );
        }
    }

    #[test]
    fn buf_ring_tail_and_leases() {
        let ring = BufRing::new(1, 4, 64).unwrap();
        assert_eq!(ring.inner.tail.get(), 4);
        let lease = ring.take(2, 10).unwrap();
        assert!(ring.take(2, 10).is_none(), "a bid is leased once");
        assert!(ring.take(4, 10).is_none(), "bid out of range");
        assert!(ring.take(1, 65).is_none(), "len out of range");
        assert_eq!(ring.leased(), 1);
        drop(lease);
        assert_eq!(ring.leased(), 0);
        assert_eq!(ring.inner.tail.get(), 5);
        assert!(
            BufRing::new(1, 3, 64).is_err(),
            "entries must be a power of two"
        );
    }
}
