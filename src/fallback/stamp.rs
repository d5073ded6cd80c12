//! The kernel's receive time of a request's first bytes on the fallback.
//!
//! The listeners ask the kernel to stamp received packets (`SO_TIMESTAMPING`,
//! see `sluice_uring::stamp`); [`StampedTcp`] reads the socket with
//! `recvmsg` and a control buffer while the connection waits for a request
//! that the worker's sampler chose (`public_latency_sample_us`: one per gap
//! per worker thread, as on an engine thread; plain reads otherwise, so
//! unsampled requests and request bodies cost nothing extra), and keeps the
//! stamp in the connection's [`Activity`]. The guard marks where a head
//! starts (HTTP/1: the first read after the previous request; HTTP/2: a read
//! carrying a HEADERS frame), and the service hands that arrival to the
//! handler in the request's extensions ([`Arrival`]). Below TLS, the stamp
//! is that of the TLS record that carried the bytes.

use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::guard::Activity;

/// The kernel's receive time of a request's first bytes, when known.
#[derive(Clone, Copy, Debug, Default)]
pub struct Arrival(pub Option<sluice_uring::RxStamp>);

/// A TCP stream whose reads, while its connection waits for a request,
/// bring the kernel's receive time.
pub struct StampedTcp {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl StampedTcp {
    pub fn new(inner: TcpStream, activity: Arc<Activity>) -> StampedTcp {
        StampedTcp { inner, activity }
    }
}

impl AsyncRead for StampedTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.activity.wants_stamp() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        loop {
            match this.inner.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            let dst = buf.initialize_unfilled();
            if dst.is_empty() {
                return Poll::Ready(Ok(()));
            }
            let inner = &this.inner;
            let read = inner.try_io(Interest::READABLE, || {
                sluice_uring::recv_stamped_into(inner.as_fd(), dst, libc::MSG_DONTWAIT)
                    .map_err(|e| io::Error::from_raw_os_error(e.0))
            });
            match read {
                Ok((n, stamp)) => {
                    if n > 0 {
                        this.activity.stamped(stamp);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for StampedTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
