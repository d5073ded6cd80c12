//! Serving file bodies on a ring: splice file -> pipe -> socket on this
//! thread while the page cache holds the body, `POLLOUT` waits on the ring
//! when the socket is full, and cold bodies read through the ring (io-wq)
//! into registered buffers, with read-ahead, so no engine thread waits for
//! the disk. Copy mode (`file_serving_mode = "copy"`) reads into registered
//! buffers and sends.

use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use sluice_uring::{residency, FixedLease, IoBuf, Op, Pipe, Residency, SharedFd, Token};

use super::core_loop::{live_slot, CoreLoop, Xfer};
use super::{FileServingMode, READAHEADS_PER_CORE_MAX, READAHEAD_CHUNKS};
use crate::engine::conn::Next;
use crate::engine::threads::PUMP_BYTES_PER_TURN;
use crate::metrics::BytePath;

impl CoreLoop {
    /// Send `len` bytes of the connection's artifact from `offset`: by
    /// splice through a pooled pipe (waiting for one when all are busy), by
    /// a read into a registered buffer in copy mode, or, for a body found
    /// cold, by reads through the ring.
    pub(super) fn send_file(&mut self, index: u32, offset: u64, len: u64) {
        // A body found cold goes on by the ring's reads (see `pump`),
        // never by an inline splice.
        let cold = self
            .slots
            .get(index as usize)
            .and_then(Option::as_ref)
            .is_some_and(|s| s.cold_body && s.file.is_some());
        if cold && self.copy_cold(index, offset, len) {
            return;
        }
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let fd = Rc::clone(&slot.fd);
        if slot.file.is_none() {
            slot.cold_body = false;
            // Ring operations hold their fd as an `Rc<OwnedFd>`: a
            // large body takes its own (small ones never get here).
            slot.file = slot
                .conn
                .take_file()
                .and_then(|a| a.into_file().ok())
                .map(|f| {
                    // No kernel read-ahead on files the engine reads:
                    // it would run inside the engine's own splice of a
                    // cached chunk (an async read-ahead mark on a page)
                    // and wait there for block-map metadata from the
                    // disk (bench/cold: hot p99 1 s). The engine reads
                    // ahead itself, through the ring (`read_cold`). The
                    // flag is on the open file description, which the
                    // fallback never shares.
                    let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::Random);
                    Rc::new(OwnedFd::from(f))
                });
        }
        let Some(file) = slot.file.clone() else {
            self.close(index);
            return;
        };
        if self.settings.mode == FileServingMode::Copy {
            slot.want = (offset, len);
            if let Some(lease) = self.driver.fixed_buffers().lease() {
                // `chunk` holds the most this read may use: a range
                // ends before the file does.
                slot.xfer = Xfer::Copy {
                    chunk: usize::try_from(len).unwrap_or(usize::MAX),
                    sent: 0,
                };
                self.submit(
                    index,
                    Op::ReadFixed {
                        file,
                        offset,
                        buf: lease,
                    },
                );
                return;
            }
        }
        slot.want = (offset, len);
        if !slot.nonblocking {
            // The engine's own pipe -> socket splices must not block;
            // ring recv and send still wait (io_uring polls itself).
            if rustix::io::ioctl_fionbio(&*fd, true).is_err() {
                self.close(index);
                return;
            }
            slot.nonblocking = true;
        }
        if slot.pipe.is_none() {
            match self.pipes.take() {
                Ok(pipe) => {
                    // Corked while the body holds its pipe, as nginx's
                    // `tcp_nopush` does around sendfile: the connection
                    // is TCP_NODELAY, so without it every splice ends in
                    // a push of a part-filled segment and the loopback
                    // receiver wakes per chunk (64 MiB GET at c=1:
                    // 35 -> 25 ms, docs/benchmarks.md). `pump` uncorks
                    // when the pipe goes back. A failure only costs
                    // that gain, so it is not an error.
                    let _ = rustix::net::sockopt::set_tcp_cork(&*fd, true);
                    slot.pipe = Some(pipe);
                }
                Err(_) => {
                    // Every pipe is busy: wait for one (bounded by the
                    // number of connections).
                    let generation = slot.generation;
                    self.pipe_waiters
                        .push_back((index, generation, offset, len));
                    return;
                }
            }
        }
        drop(file);
        self.pump(index);
    }

    /// Read the next chunk of a body that is not in the page cache through
    /// the ring: the kernel runs the splice file -> pipe on an io-wq worker
    /// and this thread goes on serving. Read-ahead for the chunks after it
    /// goes out at the same time, so the disk is busy while the client
    /// takes this one.
    fn read_cold(&mut self, index: u32, offset: u64, chunk: usize) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let (Some(file), Some(pipe)) = (slot.file.clone(), slot.pipe.take()) else {
            self.close(index);
            return;
        };
        let remaining = slot.want.1;
        slot.cold_since = Some(Instant::now());
        let op = Op::SpliceToPipe {
            fd_in: Rc::clone(&file),
            offset_in: offset,
            pipe,
            len: u32::try_from(chunk).unwrap_or(u32::MAX),
        };
        self.submit(index, op);
        if self.slots.get(index as usize).is_none_or(Option::is_none) {
            // Refused: `submit` closed the connection; its pipe went back.
            self.release_pipe_waiter();
            return;
        }
        if let Some(s) = self.stats.get(self.core) {
            s.cold_reads_total.fetch_add(1, Ordering::Relaxed);
        }
        let ahead_len = remaining
            .saturating_sub(chunk as u64)
            .min(READAHEAD_CHUNKS * self.settings.pipe_bytes as u64);
        self.read_ahead(file, offset + chunk as u64, ahead_len);
    }

    /// `fadvise(WILLNEED)` through the ring for `len` bytes of `file` from
    /// `offset`, within the per-core bound on hints in flight.
    fn read_ahead(&mut self, file: SharedFd, offset: u64, len: u64) {
        self.hint(
            len,
            Op::Fadvise {
                file,
                offset,
                len: u32::try_from(len).unwrap_or(u32::MAX),
                advice: libc::POSIX_FADV_WILLNEED,
            },
        );
    }

    /// Submit `op`, a hint no connection waits for (a read-ahead, a
    /// write-back) covering `len` bytes, within the per-core bound on hints
    /// in flight. A hint the ring cannot take is only a missed hint.
    fn hint(&mut self, len: u64, op: Op) {
        if len == 0 || self.readaheads_in_flight >= READAHEADS_PER_CORE_MAX {
            return;
        }
        if self.driver.submit(op, Token::ReadAhead.pack()).is_ok() {
            self.readaheads_in_flight += 1;
        }
    }

    /// Start write-back of `len` bytes of an upload's file from `offset`
    /// through the ring (`sync_file_range(SYNC_FILE_RANGE_WRITE)` on an io-wq
    /// worker), so the final sync of a large body finds little left to write
    /// and this thread never waits for the device's queue. A hint like a
    /// read-ahead, within the same bound: one the ring cannot take only
    /// leaves more for the final sync.
    pub(super) fn write_back(&mut self, file: SharedFd, offset: u64, len: u64) {
        self.hint(
            len,
            Op::SyncFileRange {
                file,
                offset,
                len: u32::try_from(len).unwrap_or(u32::MAX),
                flags: libc::SYNC_FILE_RANGE_WRITE,
            },
        );
    }

    /// Read the next part of a body that is not in the page cache into a
    /// registered buffer through the ring, then send it (the copy path of
    /// `file_serving_mode = "copy"`, for this part only). False when no
    /// buffer is free.
    pub(super) fn copy_cold(&mut self, index: u32, offset: u64, len: u64) -> bool {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return true;
        };
        let Some(file) = slot.file.clone() else {
            return false;
        };
        let Some(lease) = self.driver.fixed_buffers().lease() else {
            return false;
        };
        let chunk = usize::try_from(len).unwrap_or(usize::MAX);
        slot.want = (offset, len);
        slot.xfer = Xfer::Copy { chunk, sent: 0 };
        slot.cold_since = Some(Instant::now());
        if let Some(s) = self.stats.get(self.core) {
            s.cold_reads_total.fetch_add(1, Ordering::Relaxed);
        }
        let read_bytes = lease.capacity() as u64;
        let ahead_len = len
            .saturating_sub(read_bytes)
            .min(READAHEAD_CHUNKS * read_bytes);
        self.submit(
            index,
            Op::ReadFixed {
                file: Rc::clone(&file),
                offset,
                buf: lease,
            },
        );
        self.read_ahead(file, offset + read_bytes, ahead_len);
        true
    }

    /// A body's part went out by the copy path while the connection holds a
    /// splice pipe: when the body is done, the pipe goes back and the
    /// socket is uncorked, as at the end of a spliced body.
    fn release_body_pipe(&mut self, index: u32) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        if slot.pipe.take().is_some() {
            let _ = rustix::net::sockopt::set_tcp_cork(&*slot.fd, false);
            self.release_pipe_waiter();
        }
    }

    /// A cold chunk is in the pipe (or the read failed): send it on.
    pub(super) fn on_cold_read(&mut self, index: u32, pipe: Pipe, result: Result<usize, i32>) {
        let now = Instant::now();
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        if let (Some(since), Some(s)) = (slot.cold_since.take(), self.stats.get(self.core)) {
            s.cold_wait_us_total
                .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        match result {
            Ok(n) if n > 0 && pipe.held_bytes() > 0 => {
                if let Some(s) = self.stats.get(self.core) {
                    s.cold_read_bytes_total
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                slot.pipe = Some(pipe);
                slot.xfer = Xfer::Splice { chunk: n as u64 };
                self.pump(index);
            }
            // EOF before the body's end (the file was cut short behind the
            // store's back) or a read error: the response cannot be
            // completed, so the connection closes.
            _ => {
                drop(pipe);
                slot.xfer = Xfer::None;
                let next = slot.conn.on_file_sent(Err(libc::EIO), now);
                self.issue(index, next);
                self.release_pipe_waiter();
            }
        }
    }

    /// Move the file body to the socket: file -> pipe and pipe -> socket by
    /// non-blocking splices on this thread (see `Pipe::fill_from_file` and
    /// `Pipe::drain_to` for why not on the ring), waiting on the ring with
    /// `POLLOUT` when the socket is full. At most `PUMP_BYTES_PER_TURN`
    /// move before the connection yields to the others.
    pub(super) fn pump(&mut self, index: u32) {
        let now = Instant::now();
        let mut moved_bytes = 0u64;
        loop {
            let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
                return;
            };
            let (Some(file), Some(pipe)) = (slot.file.as_ref(), slot.pipe.as_mut()) else {
                self.close(index);
                return;
            };
            if pipe.held_bytes() == 0 {
                let (offset, len) = slot.want;
                let chunk = len.min(pipe.capacity_bytes() as u64) as usize;
                // A chunk the page cache does not hold whole would block this
                // thread in the splice below: read it through the ring.
                // Unknown (no cachestat, before Linux 6.5) keeps the inline
                // splice, as before.
                if residency(&**file, offset, chunk as u64) == Residency::NotResident {
                    // The body is cold: from here on it is read through the
                    // ring into registered buffers and sent (io_uring's
                    // buffered read goes to io-wq only for what the cache
                    // lacks), not spliced on this thread. Measured in
                    // bench/cold, hot 4 KiB p99 while cold bodies streamed:
                    // io-wq splice into the pipe for cold chunks and inline
                    // splice for the chunks found resident 0.7-1.4 s; ring
                    // reads for every chunk of a cold body 1-20 ms. Without a
                    // free buffer, the splice on io-wq.
                    slot.cold_body = true;
                    if !self.copy_cold(index, offset, len) {
                        self.read_cold(index, offset, chunk);
                    }
                    return;
                }
                match pipe.fill_from_file(&**file, offset, chunk) {
                    Ok(n) if n > 0 => slot.xfer = Xfer::Splice { chunk: n as u64 },
                    _ => {
                        slot.pipe = None;
                        let next = slot.conn.on_file_sent(Err(libc::EIO), now);
                        self.issue(index, next);
                        self.release_pipe_waiter();
                        return;
                    }
                }
            }
            let held = pipe.held_bytes();
            match pipe.drain_to(&*slot.fd, held) {
                Ok(n) if n > 0 => {
                    if pipe.held_bytes() > 0 {
                        continue;
                    }
                    let Xfer::Splice { chunk } = std::mem::replace(&mut slot.xfer, Xfer::None)
                    else {
                        self.close(index);
                        return;
                    };
                    self.app
                        .metrics
                        .add_response_bytes(BytePath::RingSplice, chunk);
                    moved_bytes += chunk;
                    match slot.conn.on_file_sent(Ok(chunk), now) {
                        Next::SendFile { offset, len } => {
                            slot.want = (offset, len);
                            if moved_bytes >= PUMP_BYTES_PER_TURN {
                                self.wait_writable(index);
                                return;
                            }
                        }
                        next => {
                            // The body is out: uncorking pushes its last
                            // part-filled segment now, not after the kernel's
                            // 200 ms cork timer.
                            let _ = rustix::net::sockopt::set_tcp_cork(&*slot.fd, false);
                            // The (empty) pipe goes back.
                            slot.pipe = None;
                            slot.file = None;
                            self.issue(index, next);
                            self.release_pipe_waiter();
                            return;
                        }
                    }
                }
                Err(e) if e.0 == libc::EAGAIN => {
                    self.wait_writable(index);
                    return;
                }
                _ => {
                    // The client went away: a pipe with bytes in it is
                    // closed on drop, never reused.
                    slot.pipe = None;
                    slot.xfer = Xfer::None;
                    let next = slot.conn.on_file_sent(Err(libc::EPIPE), now);
                    self.issue(index, next);
                    self.release_pipe_waiter();
                    return;
                }
            }
        }
    }

    fn wait_writable(&mut self, index: u32) {
        let Some(slot) = self.slots.get(index as usize).and_then(Option::as_ref) else {
            return;
        };
        let fd = Rc::clone(&slot.fd);
        self.submit(
            index,
            Op::PollAdd {
                fd,
                events: libc::POLLOUT as u32,
            },
        );
    }

    pub(super) fn on_pollout(&mut self, index: u32, result: Result<usize, i32>) {
        match result {
            Ok(_) => self.pump(index),
            Err(e) if e == libc::EINTR || e == libc::EAGAIN => self.wait_writable(index),
            Err(_) => self.close(index),
        }
    }

    /// A pipe went back to the pool: let the longest-waiting connection use it.
    fn release_pipe_waiter(&mut self) {
        while let Some((index, generation, offset, len)) = self.pipe_waiters.pop_front() {
            if live_slot(&mut self.slots, index, generation).is_some() {
                self.issue(index, Next::SendFile { offset, len });
                return;
            }
        }
    }

    pub(super) fn on_copy_read(
        &mut self,
        index: u32,
        lease: FixedLease,
        result: Result<usize, i32>,
        now: Instant,
    ) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let limit = match slot.xfer {
            Xfer::Copy { chunk, .. } => chunk,
            _ => 0,
        };
        if let Some(since) = slot.cold_since.take() {
            if let Some(s) = self.stats.get(self.core) {
                s.cold_wait_us_total
                    .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
                if let Ok(n) = result {
                    s.cold_read_bytes_total
                        .fetch_add(n.min(limit) as u64, Ordering::Relaxed);
                }
            }
        }
        match result {
            Ok(n) if n > 0 && limit > 0 => {
                slot.xfer = Xfer::Copy {
                    chunk: n.min(limit),
                    sent: 0,
                };
                let mut lease = lease;
                lease.set_len(n.min(limit));
                let fd = Rc::clone(&slot.fd);
                self.submit(
                    index,
                    Op::Send {
                        fd,
                        buf: IoBuf::Fixed(lease),
                        offset: 0,
                        flags: libc::MSG_NOSIGNAL,
                    },
                );
            }
            Err(e) if e == libc::EINTR || e == libc::EAGAIN => {
                // Nothing was read: read the same part again.
                drop(lease);
                let (offset, len) = slot.want;
                self.issue(index, Next::SendFile { offset, len });
            }
            _ => {
                drop(lease);
                let next = slot.conn.on_file_sent(Err(libc::EIO), now);
                self.release_body_pipe(index);
                self.issue(index, next);
            }
        }
    }

    pub(super) fn on_copy_sent(
        &mut self,
        index: u32,
        lease: FixedLease,
        result: Result<usize, i32>,
        now: Instant,
    ) {
        let Some(slot) = self.slots.get_mut(index as usize).and_then(Option::as_mut) else {
            return;
        };
        let Xfer::Copy { chunk, sent } = &mut slot.xfer else {
            return;
        };
        match result {
            Ok(n) if n > 0 => *sent += n,
            Err(e) if e == libc::EINTR || e == libc::EAGAIN => {}
            _ => {
                slot.xfer = Xfer::None;
                slot.file = None;
                let next = slot.conn.on_file_sent(Err(libc::EPIPE), now);
                self.release_body_pipe(index);
                self.issue(index, next);
                return;
            }
        }
        if *sent < *chunk {
            let offset = *sent;
            let fd = Rc::clone(&slot.fd);
            self.submit(
                index,
                Op::Send {
                    fd,
                    buf: IoBuf::Fixed(lease),
                    offset,
                    flags: libc::MSG_NOSIGNAL,
                },
            );
            return;
        }
        let done = *chunk as u64;
        slot.xfer = Xfer::None;
        drop(lease);
        self.app
            .metrics
            .add_response_bytes(BytePath::RingCopy, done);
        let next = slot.conn.on_file_sent(Ok(done), now);
        if !matches!(next, Next::SendFile { .. }) {
            slot.file = None;
            self.release_body_pipe(index);
        }
        self.issue(index, next);
    }
}
