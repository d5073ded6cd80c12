//! One write per connection turn on HTTP/2: [`CoalesceIo`] holds what h2 writes during one
//! poll of the connection's task and sends it in one go on the next.
//!
//! h2 flushes after every stream it hands out (`poll_accept` advances the connection, which
//! flushes what the previous stream queued), so ten requests that arrived in one read left as
//! ten `writev`s, or over TLS as ten record batches (`strace -c` of TLS h2 4 KiB: one `writev`
//! per response, docs/benchmarks.md, issue 20). Below h2 this layer copies small writes into a
//! bounded buffer and answers the first flush of a turn with `Pending` after waking the task:
//! the task finishes its turn (every stream that arrived is answered into the buffer), is
//! polled again at once, and that poll's flush writes the lot. h2 retries a pending flush on
//! every poll (it is how it waits for a slow socket), so nothing is left behind.
//!
//! The turn is counted by [`TurnCounter`], which the connection's driver bumps on each poll of
//! hyper's connection future. A write that would overflow the buffer sends what is held first;
//! a large one on a socket that takes vectored writes goes out with the held bytes in one
//! `writev`, uncopied.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one HTTP/2 connection holds between flushes, at most: ten 4 KiB responses with their
/// frames fit, so a batch of small answers leaves in one write (over TLS, four 16 KiB
/// records in one `writev`). Allocated only while bytes are held.
pub const H2_COALESCE_BYTES_MAX: usize = 64 * 1024;
/// A write at least this large goes straight to a socket that takes vectored writes, with the
/// held bytes in front of it, instead of being copied (a 16 KiB DATA frame of a large body).
const PASS_THROUGH_BYTES: usize = 8 * 1024;
/// Slices of one vectored write passed on at most (h2 writes a frame head and a payload).
const SLICES_MAX: usize = 8;

/// Empty buffers kept per worker thread for the next connection with bytes to hold, at most.
/// A connection holds one only between a write and the flush of the next turn, so a worker
/// needs about as many as it has connections writing at once.
const POOLED_BUFFERS_MAX: usize = 32;

thread_local! {
    /// This worker's free buffers ([`H2_COALESCE_BYTES_MAX`] of capacity each). A connection
    /// stays on its worker (one current-thread runtime each), so the pool needs no lock.
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn take_buffer() -> Vec<u8> {
    POOL.with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(H2_COALESCE_BYTES_MAX))
}

fn give_back(mut buf: Vec<u8>) {
    if buf.capacity() != H2_COALESCE_BYTES_MAX {
        return;
    }
    buf.clear();
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOLED_BUFFERS_MAX {
            pool.push(buf);
        }
    });
}

/// Counts the polls of a connection's task, so [`CoalesceIo`] knows when a new turn began.
#[derive(Clone, Default)]
pub struct TurnCounter(Arc<AtomicU64>);

impl TurnCounter {
    /// A new turn of the connection's task begins.
    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Holds small writes until the flush of the task's next turn; see the module docs.
pub struct CoalesceIo<I> {
    inner: I,
    /// Bytes written into the buffer; `held[sent..]` are not on the socket yet.
    held: Vec<u8>,
    /// Bytes at the front of `held` already written: a partial write advances this rather than
    /// moving the rest to the front.
    sent: usize,
    turns: TurnCounter,
    /// The turn whose first flush was put off, if a flush is put off.
    deferred_in: Option<u64>,
}

impl<I> Drop for CoalesceIo<I> {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.held));
    }
}

impl<I> CoalesceIo<I> {
    pub fn new(inner: I, turns: TurnCounter) -> CoalesceIo<I> {
        CoalesceIo {
            inner,
            held: Vec::new(),
            sent: 0,
            turns,
            deferred_in: None,
        }
    }
}

impl<I: AsyncWrite + Unpin> CoalesceIo<I> {
    /// Writes out everything held; `Ready(Ok)` once nothing is.
    fn poll_write_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let n = ready(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            let Some(n) = n else {
                return Poll::Pending;
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.consumed(n);
        }
        // The buffer goes back to this worker's pool while the connection idles: most of
        // them do most of the time, and a fresh 64 KiB per turn cost page faults.
        give_back(std::mem::take(&mut self.held));
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// The held bytes and then `bufs` in one vectored write; the count is of `bufs`' bytes taken
    /// (0 when only held bytes went).
    fn poll_write_through(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); SLICES_MAX + 1];
        let mut count = 0;
        if !self.held.is_empty() {
            slices[0] = IoSlice::new(&self.held[self.sent..]);
            count = 1;
        }
        for b in bufs.iter().filter(|b| !b.is_empty()).take(SLICES_MAX) {
            slices[count] = IoSlice::new(b);
            count += 1;
        }
        let Some(n) = ready(Pin::new(&mut self.inner).poll_write_vectored(cx, &slices[..count]))?
        else {
            return Poll::Pending;
        };
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        let from_held = n.min(self.held.len() - self.sent);
        self.consumed(from_held);
        Poll::Ready(Ok(n - from_held))
    }

    /// `n` more held bytes reached the socket; an emptied buffer starts again at its front.
    fn consumed(&mut self, n: usize) {
        self.sent += n;
        if self.sent >= self.held.len() {
            self.held.clear();
            self.sent = 0;
        }
    }
}

/// `Poll<io::Result<T>>` as `Result<Option<T>>` for `?` (None: pending).
fn ready<T>(poll: Poll<io::Result<T>>) -> io::Result<Option<T>> {
    match poll {
        Poll::Ready(Ok(v)) => Ok(Some(v)),
        Poll::Ready(Err(err)) => Err(err),
        Poll::Pending => Ok(None),
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for CoalesceIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        loop {
            let large = total >= PASS_THROUGH_BYTES && this.inner.is_write_vectored();
            if !large && this.held.len() + total <= H2_COALESCE_BYTES_MAX {
                if this.held.capacity() == 0 {
                    this.held = take_buffer();
                }
                for b in bufs {
                    this.held.extend_from_slice(b);
                }
                return Poll::Ready(Ok(total));
            }
            if large || this.held.is_empty() {
                // Straight through, behind what is held, in one write.
                match this.poll_write_through(cx, bufs) {
                    Poll::Ready(Ok(0)) => continue,
                    other => return other,
                }
            }
            // Too much to hold: send the held bytes first.
            match this.poll_write_held(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.held.is_empty() {
            let turn = this.turns.now();
            match this.deferred_in {
                // The first flush of this turn: finish the turn first, then write it all.
                None => {
                    this.deferred_in = Some(turn);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Some(t) if t == turn => return Poll::Pending,
                Some(_) => {}
            }
            if this.poll_write_held(cx)?.is_pending() {
                return Poll::Pending;
            }
        }
        this.deferred_in = None;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.poll_write_held(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for CoalesceIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    /// A socket that records each write call and takes at most `accept` bytes per call
    /// (`None`: pending).
    struct Recorder {
        writes: Vec<Vec<u8>>,
        accept: Option<usize>,
        vectored: bool,
        flushes: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let Some(accept) = self.accept else {
                return Poll::Pending;
            };
            let n = buf.len().min(accept);
            self.writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let Some(accept) = self.accept else {
                return Poll::Pending;
            };
            let mut all = Vec::new();
            for b in bufs {
                all.extend_from_slice(b);
            }
            all.truncate(accept);
            let n = all.len();
            self.writes.push(all);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn recorder(vectored: bool) -> Recorder {
        Recorder {
            writes: Vec::new(),
            accept: Some(usize::MAX),
            vectored,
            flushes: 0,
        }
    }

    fn write(io: &mut CoalesceIo<Recorder>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(io).poll_write(&mut cx, bytes)
    }

    fn flush(io: &mut CoalesceIo<Recorder>) -> Poll<io::Result<()>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(io).poll_flush(&mut cx)
    }

    #[test]
    fn one_turn_of_small_writes_leaves_in_one_write_on_the_next_turn() {
        for vectored in [false, true] {
            let turns = TurnCounter::default();
            let mut io = CoalesceIo::new(recorder(vectored), turns.clone());
            for i in 0..10u8 {
                assert!(matches!(write(&mut io, &[i; 100]), Poll::Ready(Ok(100))));
                // Every flush of the same turn is put off.
                assert!(flush(&mut io).is_pending(), "turn 0, flush {i}");
            }
            assert!(io.inner.writes.is_empty());
            turns.bump();
            assert!(matches!(flush(&mut io), Poll::Ready(Ok(()))));
            assert_eq!(io.inner.writes.len(), 1, "vectored {vectored}");
            assert_eq!(io.inner.writes[0].len(), 1000);
            assert_eq!(io.inner.flushes, 1);
            // Nothing held: a flush goes straight on.
            assert!(matches!(flush(&mut io), Poll::Ready(Ok(()))));
            assert_eq!(io.inner.writes.len(), 1);
        }
    }

    #[test]
    fn overflow_sends_the_held_bytes_first_and_keeps_the_order() {
        for vectored in [false, true] {
            let mut io = CoalesceIo::new(recorder(vectored), TurnCounter::default());
            let mut sent = Vec::new();
            let mut i = 0u8;
            // 7 KiB writes: under the pass-through size, so all are copied; the 10th overflows.
            while sent.len() < 3 * H2_COALESCE_BYTES_MAX {
                let piece = vec![i; 7 * 1024];
                assert!(matches!(write(&mut io, &piece), Poll::Ready(Ok(n)) if n == piece.len()));
                sent.extend_from_slice(&piece);
                i = i.wrapping_add(1);
            }
            assert!(matches!(
                Pin::new(&mut io).poll_shutdown(&mut Context::from_waker(Waker::noop())),
                Poll::Ready(Ok(()))
            ));
            let wire: Vec<u8> = io.inner.writes.concat();
            assert_eq!(wire, sent, "vectored {vectored}");
            assert!(io
                .inner
                .writes
                .iter()
                .all(|w| w.len() <= H2_COALESCE_BYTES_MAX));
        }
    }

    #[test]
    fn a_large_write_on_a_vectored_socket_goes_through_behind_the_held_bytes() {
        let mut io = CoalesceIo::new(recorder(true), TurnCounter::default());
        assert!(matches!(write(&mut io, b"head"), Poll::Ready(Ok(4))));
        let large = vec![7u8; 16 * 1024];
        assert!(matches!(write(&mut io, &large), Poll::Ready(Ok(n)) if n == large.len()));
        assert_eq!(io.inner.writes.len(), 1, "one writev for both");
        assert_eq!(io.inner.writes[0].len(), 4 + large.len());
        assert!(io.held.is_empty());
    }

    #[test]
    fn a_socket_that_takes_part_or_waits_loses_nothing() {
        let turns = TurnCounter::default();
        let mut io = CoalesceIo::new(recorder(false), turns.clone());
        let mut sent = Vec::new();
        for i in 0..5u8 {
            let piece = vec![i; 3000];
            assert!(matches!(write(&mut io, &piece), Poll::Ready(Ok(3000))));
            sent.extend_from_slice(&piece);
        }
        assert!(flush(&mut io).is_pending());
        turns.bump();
        io.inner.accept = None;
        assert!(flush(&mut io).is_pending(), "the socket waits");
        io.inner.accept = Some(1000);
        assert!(matches!(flush(&mut io), Poll::Ready(Ok(()))));
        assert_eq!(io.inner.writes.concat(), sent);
        assert!(io.inner.writes.iter().all(|w| w.len() <= 1000));
    }
}
