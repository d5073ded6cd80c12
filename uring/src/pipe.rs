//! A bounded per-core pool of pipes for splice file → pipe → socket.
//!
//! A pipe goes back into the pool only when it is empty. The driver counts
//! the bytes in each pipe from splice completions (`held_bytes`), so a pipe
//! that still holds bytes after an error or a cancelled splice is closed on
//! drop instead of leaking stale bytes into the next response. The pipe's
//! fds are not exposed, so nothing can move bytes behind that count.
//!
//! The pool grows to what the busiest moment needed and shrinks again: an
//! owner that sets an idle time ([`PipePool::closing_idle_after`]) calls
//! [`PipePool::close_idle`] on each tick of its loop, which closes the pipes
//! that sat unused for that long. Without it a burst (repairs sent
//! to a peer that came back) kept its pipes, two descriptors each, for the
//! life of the process.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::errno::Errno;

/// Default pipe size: 1 MiB, the default `pipe-max-size`, so one splice
/// moves up to 1 MiB per round trip.
pub const PIPE_BYTES_DEFAULT: usize = 1 << 20;
/// Default bound on pipes per core (idle plus in use).
pub const PIPES_MAX_DEFAULT: usize = 256;

struct PipeFds {
    read: OwnedFd,
    write: OwnedFd,
    capacity_bytes: usize,
}

/// An empty pipe in the pool, and since when (the owner's tick before it
/// came back: see [`PoolInner::now`]).
struct IdlePipe {
    fds: PipeFds,
    since: Instant,
}

struct PoolInner {
    /// Empty pipes ready for reuse, in the order they came back (the last is
    /// taken first, so the first has waited longest); capacity `pipes_max`,
    /// never exceeded.
    idle: Vec<IdlePipe>,
    pipes_max: usize,
    /// Pipes handed out and not yet dropped.
    out: usize,
    pipe_bytes: usize,
    /// Pipes closed because they held bytes when dropped.
    closed_dirty: u64,
    /// Pipes closed by [`PipePool::close_idle`].
    closed_idle: u64,
    /// How long an empty pipe may wait before [`PipePool::close_idle`]
    /// closes it; `None`: never.
    idle_for: Option<Duration>,
    /// The time of the owner's last [`PipePool::close_idle`] call (its tick),
    /// stamped on each pipe that comes back, so a return reads no clock. A
    /// pipe may so be closed up to one tick before it has waited `idle_for`.
    now: Instant,
}

/// Per-core pipe pool. Clone shares the pool; not `Send`.
#[derive(Clone)]
pub struct PipePool {
    inner: Rc<RefCell<PoolInner>>,
}

/// Statistics for `/metrics` and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipePoolStats {
    /// Empty pipes waiting in the pool.
    pub idle: usize,
    /// Pipes in use.
    pub out: usize,
    /// Pipes closed (not reused) because they still held bytes.
    pub closed_dirty: u64,
    /// Pipes closed because they sat unused ([`PipePool::close_idle`]).
    pub closed_idle: u64,
    /// The size requested for each pipe after clamping, in bytes.
    pub pipe_bytes: usize,
}

impl PipePool {
    /// A pool of at most `pipes_max` pipes of `pipe_bytes` each. The size is
    /// clamped to `pipe_max_size_bytes` (from `/proc/sys/fs/pipe-max-size`,
    /// see [`crate::ProbeReport::pipe_max_size_bytes`]) when given, and to at
    /// least one page. No pipe is created until first use.
    pub fn new(pipes_max: usize, pipe_bytes: usize, pipe_max_size_bytes: Option<u64>) -> PipePool {
        let clamp = pipe_max_size_bytes
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(usize::MAX);
        let pipe_bytes = pipe_bytes.min(clamp).max(4096);
        PipePool {
            inner: Rc::new(RefCell::new(PoolInner {
                idle: Vec::with_capacity(pipes_max),
                pipes_max,
                out: 0,
                pipe_bytes,
                closed_dirty: 0,
                closed_idle: 0,
                idle_for: None,
                now: Instant::now(),
            })),
        }
    }

    /// The same pool, whose [`PipePool::close_idle`] closes the empty pipes
    /// that waited `idle_for` or longer.
    pub fn closing_idle_after(self, idle_for: Duration) -> PipePool {
        self.inner.borrow_mut().idle_for = Some(idle_for);
        self
    }

    /// Takes an empty pipe: an idle one, or a new one while under the bound.
    /// `Err(EAGAIN)` when `pipes_max` pipes are in use (the caller pushes
    /// back or falls back to copying); other errnos come from `pipe2`.
    pub fn take(&self) -> Result<Pipe, Errno> {
        let mut inner = self.inner.borrow_mut();
        let fds = match inner.idle.pop() {
            Some(idle) => idle.fds,
            None => {
                if inner.out >= inner.pipes_max {
                    return Err(Errno::EAGAIN);
                }
                new_pipe(inner.pipe_bytes)?
            }
        };
        inner.out += 1;
        Ok(Pipe {
            fds: Some(fds),
            pool: Rc::clone(&self.inner),
            held_bytes: 0,
        })
    }

    /// Current counts.
    pub fn stats(&self) -> PipePoolStats {
        let inner = self.inner.borrow();
        PipePoolStats {
            idle: inner.idle.len(),
            out: inner.out,
            closed_dirty: inner.closed_dirty,
            closed_idle: inner.closed_idle,
            pipe_bytes: inner.pipe_bytes,
        }
    }

    /// The owner's tick at `now`: closes the empty pipes that have waited in
    /// the pool for the idle time set by [`PipePool::closing_idle_after`] or
    /// longer (none if no time was set); returns how many. Pipes in use are
    /// not touched.
    pub fn close_idle(&self, now: Instant) -> usize {
        let mut inner = self.inner.borrow_mut();
        inner.now = now;
        let Some(idle_for) = inner.idle_for else {
            return 0;
        };
        let stale = inner
            .idle
            .iter()
            .take_while(|p| now.saturating_duration_since(p.since) >= idle_for)
            .count();
        inner.idle.drain(..stale);
        inner.closed_idle += stale as u64;
        stale
    }
}

fn new_pipe(pipe_bytes: usize) -> Result<PipeFds, Errno> {
    let mut fds: [RawFd; 2] = [-1, -1];
    // Blocking pipes on purpose: io_uring punts a splice that would block to
    // its worker pool; an O_NONBLOCK pipe would turn that into EAGAIN.
    // SAFETY: `fds` is a valid, writable array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Errno::from_io(&std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let want = libc::c_int::try_from(pipe_bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_SETPIPE_SZ takes an int argument; the fd is open.
    let set = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    // A refusal (EPERM: the per-user pipe buffer limit) keeps the default
    // size; the pipe still works, splices are just shorter.
    let capacity_bytes = if set > 0 {
        usize::try_from(set).unwrap_or(pipe_bytes)
    } else {
        // SAFETY: F_GETPIPE_SZ takes no argument; the fd is open.
        let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        usize::try_from(got).unwrap_or(4096)
    };
    Ok(PipeFds {
        read,
        write,
        capacity_bytes,
    })
}

/// A pipe leased from a [`PipePool`]. On drop it returns to the pool if it
/// is empty and the pool has room, and is closed otherwise.
pub struct Pipe {
    /// Always `Some` until drop.
    fds: Option<PipeFds>,
    pool: Rc<RefCell<PoolInner>>,
    held_bytes: usize,
}

impl Pipe {
    /// Bytes spliced into the pipe and not yet out of it.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// The pipe's buffer size in bytes (after `F_SETPIPE_SZ`).
    pub fn capacity_bytes(&self) -> usize {
        self.fds.as_ref().map_or(0, |f| f.capacity_bytes)
    }

    /// Splice up to `len` bytes of `file` at `offset` into the pipe, on
    /// this thread, without io_uring. A splice from a regular file cannot be
    /// done without blocking, so on a ring it always goes to an io-wq worker
    /// thread: a thread hand-off and a completion per chunk. From the page
    /// cache the same copy-free move costs less done here (as nginx's
    /// sendfile does). Returns the bytes moved (0 at end of file).
    pub fn fill_from_file(
        &mut self,
        file: &impl AsRawFd,
        offset: u64,
        len: usize,
    ) -> Result<usize, Errno> {
        let room = self.capacity_bytes().saturating_sub(self.held_bytes);
        let len = len.min(room);
        if len == 0 {
            return Ok(0);
        }
        let mut off = libc::loff_t::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
        let moved = retry_on_eintr(|| {
            // SAFETY: both fds are open (the pipe's write end lives as long as
            // `self`, `file` is borrowed for the call); `off` is a valid,
            // writable loff_t that outlives the call; no buffer is involved.
            unsafe {
                libc::splice(
                    file.as_raw_fd(),
                    &mut off,
                    self.write_fd(),
                    std::ptr::null_mut(),
                    len,
                    libc::SPLICE_F_MOVE,
                )
            }
        })?;
        self.note_filled(moved);
        Ok(moved)
    }

    /// Splice up to `len` bytes out of the pipe into `fd` (a socket) on
    /// this thread, without waiting: `Err(EAGAIN)` when `fd` has no room
    /// (wait for `POLLOUT` on the ring, then call again). A ring splice
    /// would always run on an io-wq worker, and block one while the client
    /// is slow. Returns the bytes moved.
    pub fn drain_to(&mut self, fd: &impl AsRawFd, len: usize) -> Result<usize, Errno> {
        let len = len.min(self.held_bytes);
        if len == 0 {
            return Ok(0);
        }
        let moved = retry_on_eintr(|| {
            // SAFETY: both fds are open (the pipe's read end lives as long as
            // `self`, `fd` is borrowed for the call); null offsets are what
            // splice requires for a pipe and a socket; no buffer is involved.
            unsafe {
                libc::splice(
                    self.read_fd(),
                    std::ptr::null_mut(),
                    fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    len,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            }
        })?;
        self.note_drained(moved);
        Ok(moved)
    }

    pub(crate) fn read_fd(&self) -> RawFd {
        self.fds.as_ref().map_or(-1, |f| f.read.as_raw_fd())
    }

    pub(crate) fn write_fd(&self) -> RawFd {
        self.fds.as_ref().map_or(-1, |f| f.write.as_raw_fd())
    }

    pub(crate) fn note_filled(&mut self, bytes: usize) {
        self.held_bytes = self.held_bytes.saturating_add(bytes);
    }

    pub(crate) fn note_drained(&mut self, bytes: usize) {
        self.held_bytes = self.held_bytes.saturating_sub(bytes);
    }

    /// Forget the count and treat the pipe as dirty: used when a splice
    /// failed in a way that leaves the content unknown.
    pub(crate) fn mark_dirty(&mut self) {
        self.held_bytes = self.held_bytes.max(1);
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let Some(fds) = self.fds.take() else { return };
        let mut pool = self.pool.borrow_mut();
        pool.out = pool.out.saturating_sub(1);
        if self.held_bytes > 0 {
            pool.closed_dirty += 1;
            drop(fds);
        } else if pool.idle.len() < pool.pipes_max {
            let since = pool.now;
            pool.idle.push(IdlePipe { fds, since });
        }
    }
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe")
            .field("read_fd", &self.read_fd())
            .field("held_bytes", &self.held_bytes)
            .finish()
    }
}

/// Calls `splice` (a system call that returns a byte count, or -1 with errno set) again for as
/// long as a signal interrupts it (EINTR); returns the count or the errno.
fn retry_on_eintr(mut splice: impl FnMut() -> isize) -> Result<usize, Errno> {
    loop {
        let moved = splice();
        if moved >= 0 {
            return Ok(moved as usize);
        }
        let err = Errno::from_io(&std::io::Error::last_os_error());
        if err.0 != libc::EINTR {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_is_bounded_and_reuses_empty_pipes() {
        let pool = PipePool::new(2, 64 * 1024, Some(1 << 20));
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert!(a.capacity_bytes() >= 64 * 1024);
        assert_eq!(pool.take().err(), Some(Errno::EAGAIN));
        let a_fd = a.read_fd();
        drop(a);
        assert_eq!(pool.stats().idle, 1);
        let again = pool.take().unwrap();
        assert_eq!(again.read_fd(), a_fd, "an empty pipe is reused");
        drop(b);
        drop(again);
        assert_eq!(
            pool.stats(),
            PipePoolStats {
                idle: 2,
                out: 0,
                closed_dirty: 0,
                closed_idle: 0,
                pipe_bytes: 64 * 1024
            }
        );
    }

    #[test]
    fn pipes_unused_for_the_idle_time_are_closed_and_the_rest_kept() {
        let idle_for = Duration::from_secs(60);
        let pool = PipePool::new(4, 4096, None).closing_idle_after(idle_for);
        let now = Instant::now();
        assert_eq!(pool.close_idle(now), 0);
        let (a, b, c) = (
            pool.take().unwrap(),
            pool.take().unwrap(),
            pool.take().unwrap(),
        );
        let in_use_fd = c.read_fd();
        drop(a);
        drop(b);
        // Nothing has waited a minute yet.
        assert_eq!(pool.close_idle(now + idle_for / 2), 0);
        assert_eq!(pool.stats().idle, 2);
        // A minute after the tick they came back in, both idle pipes go; the
        // one in use stays open.
        assert_eq!(pool.close_idle(now + idle_for), 2);
        let stats = pool.stats();
        assert_eq!((stats.idle, stats.out, stats.closed_idle), (0, 1, 2));
        assert_eq!(c.read_fd(), in_use_fd);
        // A pipe that came back since (after the last tick) is stamped with
        // that tick, and kept until a tick `idle_for` after it.
        drop(c);
        assert_eq!(pool.close_idle(now + idle_for * 3 / 2), 0);
        assert_eq!(pool.close_idle(now + idle_for * 2), 1);
        assert_eq!(pool.stats().idle, 0);
    }

    #[test]
    fn a_pool_without_an_idle_time_keeps_its_pipes() {
        let pool = PipePool::new(2, 4096, None);
        drop(pool.take().unwrap());
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(pool.close_idle(later), 0);
        assert_eq!(pool.stats().idle, 1);
    }

    #[test]
    fn pipe_with_bytes_left_is_closed() {
        let pool = PipePool::new(1, 4096, None);
        let mut pipe = pool.take().unwrap();
        pipe.note_filled(10);
        pipe.note_drained(4);
        assert_eq!(pipe.held_bytes(), 6);
        drop(pipe);
        let stats = pool.stats();
        assert_eq!((stats.idle, stats.out, stats.closed_dirty), (0, 0, 1));
    }

    #[test]
    fn size_is_clamped_to_pipe_max_size() {
        let pool = PipePool::new(1, 8 << 20, Some(1 << 20));
        assert_eq!(pool.stats().pipe_bytes, 1 << 20);
        let pool = PipePool::new(1, 1, None);
        assert_eq!(pool.stats().pipe_bytes, 4096);
    }
}
