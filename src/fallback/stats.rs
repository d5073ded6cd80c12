//! What the fallback counts: [`FallbackStats`], the snapshot `/metrics` renders, and the
//! counters behind it, which the accept paths, the connections and the guard add to.

use std::sync::atomic::{AtomicU64, Ordering};

/// Snapshot of the fallback's gauges and counters for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FallbackStats {
    /// Connections open now (gauge), including queued hand-offs.
    pub connections: usize,
    /// Connections served as TLS with ALPN `h2`.
    pub accepted_tls_h2_total: u64,
    /// Connections served as TLS with HTTP/1.1 (ALPN `http/1.1` or none).
    pub accepted_tls_http1_total: u64,
    /// Connections served as h2c (prior knowledge).
    pub accepted_h2c_total: u64,
    /// Connections served as plaintext HTTP/1.1.
    pub accepted_http1_total: u64,
    /// Hand-offs refused (at capacity, queue full or shut down); the caller got the socket back.
    pub handoff_refused_total: u64,
    /// Connections closed before serving: peer closed or timed out before classification or
    /// handshake, failed handshake, or TLS while TLS is not configured.
    pub rejected_total: u64,
    /// Idle connections closed to admit a new one while all slots were taken.
    pub shed_idle_total: u64,
    /// Connections refused because every slot served a request (503 for HTTP/1, else closed).
    pub refused_full_total: u64,
    /// Connections refused because their address held `connections_per_ip_max`.
    pub refused_per_ip_total: u64,
    /// Connections closed because the client did not read a response for `send_timeout_ms`
    /// (or ignored a graceful close for as long).
    pub send_timeout_total: u64,
    /// HTTP/1 heads not complete within `header_read_timeout_ms` (answered 408).
    pub head_timeout_total: u64,
    /// HTTP/1 request targets over `uri_bytes_max` refused before hyper parsed them (414).
    pub uri_too_long_total: u64,
    /// HTTP/2 connections sent GOAWAY ENHANCE_YOUR_CALM for resetting streams too often.
    pub h2_reset_flood_total: u64,
    /// HTTP/1 requests the sans-IO core's framing rules refused before hyper saw their head
    /// (answered 400, 417, 431, 414 or 505 and closed, as on the ring).
    pub head_refused_total: u64,
}

/// The fallback's counters, shared by every task; [`Counters::snapshot`] reads them.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) tls_h2: AtomicU64,
    pub(super) tls_http1: AtomicU64,
    pub(super) h2c: AtomicU64,
    pub(super) http1: AtomicU64,
    pub(super) handoff_refused: AtomicU64,
    pub(super) rejected: AtomicU64,
    pub(super) shed_idle: AtomicU64,
    pub(super) refused_full: AtomicU64,
    pub(super) refused_per_ip: AtomicU64,
    pub(super) send_timeout: AtomicU64,
    pub(super) head_timeout: AtomicU64,
    pub(super) uri_too_long: AtomicU64,
    pub(super) head_refused: AtomicU64,
    pub(super) h2_calm: AtomicU64,
}

impl Counters {
    /// The counters now, with `connections` as the gauge.
    pub(super) fn snapshot(&self, connections: usize) -> FallbackStats {
        let c = self;
        FallbackStats {
            connections,
            accepted_tls_h2_total: c.tls_h2.load(Ordering::Relaxed),
            accepted_tls_http1_total: c.tls_http1.load(Ordering::Relaxed),
            accepted_h2c_total: c.h2c.load(Ordering::Relaxed),
            accepted_http1_total: c.http1.load(Ordering::Relaxed),
            handoff_refused_total: c.handoff_refused.load(Ordering::Relaxed),
            rejected_total: c.rejected.load(Ordering::Relaxed),
            shed_idle_total: c.shed_idle.load(Ordering::Relaxed),
            refused_full_total: c.refused_full.load(Ordering::Relaxed),
            refused_per_ip_total: c.refused_per_ip.load(Ordering::Relaxed),
            send_timeout_total: c.send_timeout.load(Ordering::Relaxed),
            head_timeout_total: c.head_timeout.load(Ordering::Relaxed),
            uri_too_long_total: c.uri_too_long.load(Ordering::Relaxed),
            head_refused_total: c.head_refused.load(Ordering::Relaxed),
            h2_reset_flood_total: c.h2_calm.load(Ordering::Relaxed),
        }
    }
}
