//! Public pressure: what replication yields to.
//!
//! Two signals, recorded by every front end on its own thread with relaxed
//! atomics (no lock, no allocation on the request path):
//!
//! - **in flight**: public requests from the moment their head is complete
//!   to the drop of their response (the last body byte handed to the kernel,
//!   or the connection closing), so a long download counts the whole time;
//! - **time to first byte** of public reads (GET and HEAD), sampled when the
//!   response head is ready to go out, never after the body: a healthy
//!   64 MiB download is not a slow one. Uploads are not sampled: their
//!   "first byte" comes after the whole request body.
//!
//! The replication limiter (`replication::limiter`) reads a window of TTFB
//! samples (and resets it) at each control step. Only the artifact routes
//! are public pressure ([`is_public_route`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Whether requests on the route with metrics label `route` are public
/// pressure: the artifact routes. The peer API is replication itself, and
/// `/metrics`, `/status`, `/up`, `/ready` are the operator's, not the builds'.
pub fn is_public_route(route: &str) -> bool {
    matches!(route, "ac" | "cas" | "gradle" | "generic" | "turbo" | "nx")
}

/// Sub-buckets per power of two of the TTFB window histogram: bucket
/// bounds grow by 2^(1/4) ≈ 1.19, so a window's p99 is known within 19%.
const SUB_BUCKETS: usize = 4;
/// Smallest bucket bound, µs. Anything faster counts as this.
const FIRST_BOUND_US: u64 = 64;
/// Buckets: 64 µs × 2^(80/4) ≈ 67 s at the top; slower lands in the last.
pub const TTFB_WINDOW_BUCKETS: usize = 80;

/// Upper bound of bucket `i`, µs.
pub fn bucket_bound_us(i: usize) -> u64 {
    let octave = (i / SUB_BUCKETS) as u32;
    let sub = (i % SUB_BUCKETS) as f64;
    let base = FIRST_BOUND_US.saturating_mul(1u64 << octave.min(40));
    (base as f64 * 2f64.powf((sub + 1.0) / SUB_BUCKETS as f64)) as u64
}

fn bucket_of(us: u64) -> usize {
    (0..TTFB_WINDOW_BUCKETS)
        .find(|&i| us <= bucket_bound_us(i))
        .unwrap_or(TTFB_WINDOW_BUCKETS - 1)
}

/// The public pressure signals of one node.
pub struct PublicPressure {
    in_flight: AtomicU64,
    /// TTFB samples since the last [`PublicPressure::take_window`].
    window: [AtomicU64; TTFB_WINDOW_BUCKETS],
    ttfb_samples_total: AtomicU64,
}

impl Default for PublicPressure {
    fn default() -> Self {
        PublicPressure {
            in_flight: AtomicU64::new(0),
            window: std::array::from_fn(|_| AtomicU64::new(0)),
            ttfb_samples_total: AtomicU64::new(0),
        }
    }
}

/// One window of TTFB samples, taken by the limiter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TtfbWindow {
    pub samples: u64,
    /// 99th percentile (the bound of its bucket); `None` without samples.
    pub p99: Option<Duration>,
}

impl PublicPressure {
    /// A public request's head is complete: it counts as in flight until the
    /// returned guard drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// Public requests in flight now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A public read's response head is ready after `ttfb`.
    pub fn head_ready(&self, ttfb: Duration) {
        let us = u64::try_from(ttfb.as_micros()).unwrap_or(u64::MAX);
        self.window[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.ttfb_samples_total.fetch_add(1, Ordering::Relaxed);
    }

    /// TTFB samples ever taken.
    pub fn ttfb_samples_total(&self) -> u64 {
        self.ttfb_samples_total.load(Ordering::Relaxed)
    }

    /// The samples since the last call, and a fresh window. A sample racing
    /// with the swap lands in one window or the next, never in neither.
    pub fn take_window(&self) -> TtfbWindow {
        let mut counts = [0u64; TTFB_WINDOW_BUCKETS];
        for (c, slot) in counts.iter_mut().zip(&self.window) {
            *c = slot.swap(0, Ordering::Relaxed);
        }
        window_of(&counts)
    }
}

/// The p99 of a bucket histogram.
pub fn window_of(counts: &[u64; TTFB_WINDOW_BUCKETS]) -> TtfbWindow {
    let samples: u64 = counts.iter().sum();
    if samples == 0 {
        return TtfbWindow::default();
    }
    // The rank of the 99th percentile, 1-based: ceil(0.99 n).
    let rank = (samples * 99).div_ceil(100).max(1);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return TtfbWindow {
                samples,
                p99: Some(Duration::from_micros(bucket_bound_us(i))),
            };
        }
    }
    TtfbWindow {
        samples,
        p99: Some(Duration::from_micros(bucket_bound_us(
            TTFB_WINDOW_BUCKETS - 1,
        ))),
    }
}

/// A public request in flight; dropping it ends it.
pub struct InFlight(Arc<PublicPressure>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_grow_and_cover_a_minute() {
        for i in 1..TTFB_WINDOW_BUCKETS {
            assert!(bucket_bound_us(i) > bucket_bound_us(i - 1), "{i}");
        }
        assert!(bucket_bound_us(TTFB_WINDOW_BUCKETS - 1) > 60_000_000);
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(u64::MAX), TTFB_WINDOW_BUCKETS - 1);
    }

    #[test]
    fn window_p99_and_reset() {
        let p = Arc::new(PublicPressure::default());
        assert_eq!(p.take_window(), TtfbWindow::default());
        for _ in 0..99 {
            p.head_ready(Duration::from_micros(300));
        }
        p.head_ready(Duration::from_millis(80));
        let w = p.take_window();
        assert_eq!(w.samples, 100);
        let p99 = w.p99.expect("samples");
        // The 99th of 100 is a 300 µs sample, within one bucket (19%).
        assert!(
            p99 >= Duration::from_micros(300) && p99 < Duration::from_micros(360),
            "{p99:?}"
        );
        assert_eq!(p.take_window().samples, 0, "taken windows start empty");
        for _ in 0..10 {
            p.head_ready(Duration::from_millis(80));
        }
        let p99 = p.take_window().p99.expect("samples");
        assert!(
            p99 >= Duration::from_millis(80) && p99 < Duration::from_millis(96),
            "{p99:?}"
        );
    }

    #[test]
    fn in_flight_counts_until_the_guard_drops() {
        let p = Arc::new(PublicPressure::default());
        let a = p.begin();
        let b = p.begin();
        assert_eq!(p.in_flight(), 2);
        drop(a);
        assert_eq!(p.in_flight(), 1);
        drop(b);
        assert_eq!(p.in_flight(), 0);
    }
}
