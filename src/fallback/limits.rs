//! The fallback's bounds: [`FallbackLimits`], which the server sets from the config, and the
//! fixed bounds of the runtime and of each protocol.

use crate::config::ConnTimeouts;
use std::io;
use std::time::Duration;

/// Worker threads of [`FallbackLimits::default`] (the server sizes the runtime from the config).
pub const WORKER_THREADS: usize = 2;
/// Upper bound on tokio's blocking pool (file I/O from handlers runs there).
pub const BLOCKING_THREADS_MAX: usize = 16;
/// Bound on connections queued between [`Fallback::handoff`](super::Fallback::handoff) / the
/// accept loop and the runtime.
pub const HANDOFF_QUEUE_MAX: usize = 1024;
/// Largest HTTP/1 request head in bytes; a larger head answers 431 and closes.
pub const HTTP1_HEAD_BYTES_MAX: usize = 64 * 1024;
/// HTTP/1 read and write buffer bound per connection, in bytes. Larger than the head limit so
/// upload bodies arrive in big reads.
pub const HTTP1_BUF_BYTES_MAX: usize = 256 * 1024;
/// HTTP/2 concurrent streams a client may open per connection.
pub const H2_STREAMS_MAX: u32 = 128;
/// HTTP/2 bound on the decoded header list of one request, in bytes.
pub const H2_HEADER_LIST_BYTES_MAX: u32 = 64 * 1024;
/// HTTP/2 receive window per stream, in bytes. The 64 KiB protocol default caps an upload at
/// one window per round trip; 1 MiB keeps large artifact PUTs near line rate on a LAN.
pub const H2_STREAM_WINDOW_BYTES: u32 = 1024 * 1024;
/// HTTP/2 receive window per connection, in bytes (bounds buffered upload data per connection).
pub const H2_CONNECTION_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
/// HTTP/2 streams the client reset before the server accepted them, at most at once (h2's
/// burst rapid-reset guard; over it, GOAWAY ENHANCE_YOUR_CALM). hyper's default is 20.
pub const H2_PENDING_ACCEPT_RESETS_MAX: usize = 20;
/// HTTP/2 streams the server reset for the client's protocol errors before GOAWAY
/// ENHANCE_YOUR_CALM (h2's guard against provoking resets). hyper's default is 1024.
pub const H2_LOCAL_ERROR_RESETS_MAX: usize = 256;
/// Refused connections answered at once (peek, 503 for HTTP/1, close), at most; past it a
/// refused connection is closed without a status.
pub const REFUSALS_IN_FLIGHT_MAX: usize = 64;

// hyper panics on a read buffer under 8 KiB, and the head must fit in the buffer.
const _: () = assert!(HTTP1_BUF_BYTES_MAX >= 8192 && HTTP1_BUF_BYTES_MAX >= HTTP1_HEAD_BYTES_MAX);
// HTTP/2 requires the connection window to hold at least one stream window to be useful.
const _: () = assert!(H2_CONNECTION_WINDOW_BYTES >= H2_STREAM_WINDOW_BYTES);

/// Bounds of the fallback. Zero is rejected by [`Fallback::start`](super::Fallback::start) except for
/// `connections_per_ip_max`, where it means no cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FallbackLimits {
    /// Open connections at most, counting those queued after hand-off.
    pub connections_max: usize,
    /// Open connections one client address may hold (0 = no cap).
    pub connections_per_ip_max: usize,
    /// The timeouts every front applies alike. Here `header_read_timeout_ms` runs from accept
    /// to a classified connection with a finished TLS handshake and the first HTTP/1 request
    /// head, then for each later head from its first byte (408); `idle_timeout_ms` is time
    /// without socket progress while no request is in flight (then a graceful close);
    /// `send_timeout_ms` also bounds a graceful close (GOAWAY and its PING) the client ignores.
    pub timeouts: ConnTimeouts,
    /// Longest HTTP/1 request target in bytes (414 above).
    pub uri_bytes_max: usize,
    /// Longest HTTP/1 request head in bytes (431 above), as the ring's `head_bytes_max`.
    pub head_bytes_max: usize,
    /// Worker threads of the runtime (`fallback_threads`; the server passes the engine's
    /// thread count when it is 0).
    pub worker_threads: usize,
    /// `public_latency_sample_us`: each worker measures at most one request per this from
    /// the kernel's receive time (zero: none).
    pub latency_sample: Duration,
}

impl Default for FallbackLimits {
    /// The config's defaults, and [`WORKER_THREADS`] workers.
    fn default() -> Self {
        FallbackLimits {
            connections_max: 1024,
            connections_per_ip_max: 0,
            timeouts: ConnTimeouts::default(),
            uri_bytes_max: 8192,
            head_bytes_max: 16 * 1024,
            worker_threads: WORKER_THREADS,
            latency_sample: Duration::from_micros(250),
        }
    }
}

impl FallbackLimits {
    /// Refuses a zero limit, naming its config key (`connections_per_ip_max` may be 0).
    pub(super) fn check(&self) -> Result<(), io::Error> {
        for (key, value) in [
            ("connections_max", self.connections_max as u64),
            (
                "header_read_timeout_ms",
                self.timeouts.header_read_timeout_ms,
            ),
            ("idle_timeout_ms", self.timeouts.idle_timeout_ms),
            ("send_timeout_ms", self.timeouts.send_timeout_ms),
            ("uri_bytes_max", self.uri_bytes_max as u64),
            ("head_bytes_max", self.head_bytes_max as u64),
            ("fallback_threads", self.worker_threads as u64),
        ] {
            if value == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("fallback limit {key} = 0: must be at least 1"),
                ));
            }
        }
        Ok(())
    }
}
