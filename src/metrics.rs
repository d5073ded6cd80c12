//! Request counters and latency histograms, rendered as Prometheus text.
//!
//! Every series lives in a table allocated at start and updated with relaxed
//! atomics, so recording from an engine thread takes no lock and allocates
//! nothing. The label sets are closed (routes, methods and statuses sluice
//! can produce), which keeps the table bounded: a status outside the list is
//! counted under `status="other"`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Route labels, in table order. `peer` is the replication peer API
/// (`/_peer/`); `none` counts requests that matched no route or failed
/// before classification.
pub const ROUTES: [&str; 12] = [
    "ac", "cas", "gradle", "generic", "turbo", "nx", "up", "ready", "metrics", "status", "peer",
    "none",
];
/// Method labels, in table order: the methods HTTP defines (RFC 9110 and
/// PATCH) and the two WebDAV methods sluice answers, so a POST to an artifact path is counted as what it is; any
/// other token, or a head that failed before its method was known, is
/// `OTHER` (the set stays closed whatever clients send).
pub const METHODS: [&str; 12] = [
    "GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT", "PROPFIND",
    "MKCOL", "OTHER",
];

/// The metrics label of a method token: itself for a method in
/// [`METHODS`], `OTHER` for anything else (methods are case-sensitive).
pub fn method_label(method: &str) -> &'static str {
    METHODS[index_of(&METHODS, &method, METHODS.len() - 1)]
}
/// Status codes sluice produces; anything else is `other`.
pub const STATUSES: [u16; 30] = [
    100, 200, 201, 202, 204, 206, 207, 304, 400, 401, 403, 404, 405, 408, 409, 411, 412, 413, 414,
    415, 416, 417, 429, 431, 500, 501, 503, 505, 507, 0,
];

/// How the bytes of a response body left the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BytePath {
    /// Through the hyper + rustls fallback.
    Fallback = 0,
    /// From the page cache to the socket by splice on a ring.
    RingSplice = 1,
    /// Read into a buffer and sent, on a ring.
    RingCopy = 2,
}

const BYTE_PATHS: [&str; 3] = ["fallback", "ring_splice", "ring_copy"];

/// Upper bounds of the time-to-first-byte histogram buckets, in seconds.
pub const TTFB_BUCKETS_SECS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// The server's counters. Shared by every front end through an `Arc`.
pub struct Metrics {
    requests: Box<[AtomicU64]>,
    response_bytes: [AtomicU64; 3],
    /// One slot per bucket plus `+Inf`.
    ttfb_buckets: [AtomicU64; TTFB_BUCKETS_SECS.len() + 1],
    ttfb_sum_ns: AtomicU64,
    /// Requests whose PUT body was refused (413, 400 digest mismatch, abort).
    put_aborted_total: AtomicU64,
    /// Public requests in flight and public read TTFB: what replication
    /// yields to.
    pub pressure: std::sync::Arc<crate::pressure::PublicPressure>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn index_of<T: PartialEq>(table: &[T], value: &T, fallback: usize) -> usize {
    table.iter().position(|v| v == value).unwrap_or(fallback)
}

impl Metrics {
    pub fn new() -> Metrics {
        let cells = ROUTES.len() * METHODS.len() * STATUSES.len();
        Metrics {
            requests: (0..cells).map(|_| AtomicU64::new(0)).collect(),
            response_bytes: Default::default(),
            ttfb_buckets: Default::default(),
            ttfb_sum_ns: AtomicU64::new(0),
            put_aborted_total: AtomicU64::new(0),
            pressure: std::sync::Arc::default(),
        }
    }

    fn cell(route: &str, method: &str, status: u16) -> usize {
        let r = index_of(&ROUTES, &route, ROUTES.len() - 1);
        let m = index_of(&METHODS, &method, METHODS.len() - 1);
        let s = index_of(&STATUSES, &status, STATUSES.len() - 1);
        (r * METHODS.len() + m) * STATUSES.len() + s
    }

    /// Count one finished request.
    pub fn record_request(&self, route: &str, method: &str, status: u16) {
        self.requests[Self::cell(route, method, status)].fetch_add(1, Ordering::Relaxed);
    }

    /// How many requests were counted with exactly these labels.
    pub fn requests(&self, route: &str, method: &str, status: u16) -> u64 {
        self.requests[Self::cell(route, method, status)].load(Ordering::Relaxed)
    }

    /// Record a time to first byte (from a complete request head to the
    /// first byte of the response handed to the kernel).
    pub fn record_ttfb(&self, ttfb: Duration) {
        let secs = ttfb.as_secs_f64();
        let bucket = TTFB_BUCKETS_SECS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(TTFB_BUCKETS_SECS.len());
        self.ttfb_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(ttfb.as_nanos()).unwrap_or(u64::MAX);
        self.ttfb_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Count response body bytes that left by `path`.
    pub fn add_response_bytes(&self, path: BytePath, bytes: u64) {
        self.response_bytes[path as usize].fetch_add(bytes, Ordering::Relaxed);
    }

    /// Response body bytes that left by `path`.
    pub fn response_bytes(&self, path: BytePath) -> u64 {
        self.response_bytes[path as usize].load(Ordering::Relaxed)
    }

    /// Count a PUT whose body was refused or cut short.
    pub fn count_put_aborted(&self) {
        self.put_aborted_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Total requests counted (all labels).
    pub fn requests_total(&self) -> u64 {
        self.requests
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Append this registry's series in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP sluice_requests_total Requests answered, by route, method and status.\n",
        );
        out.push_str("# TYPE sluice_requests_total counter\n");
        for (r, route) in ROUTES.iter().enumerate() {
            for (m, method) in METHODS.iter().enumerate() {
                for (s, status) in STATUSES.iter().enumerate() {
                    let n = self.requests[(r * METHODS.len() + m) * STATUSES.len() + s]
                        .load(Ordering::Relaxed);
                    if n == 0 {
                        continue;
                    }
                    let _ = if *status == 0 {
                        writeln!(
                            out,
                            "sluice_requests_total{{route=\"{route}\",method=\"{method}\",status=\"other\"}} {n}"
                        )
                    } else {
                        writeln!(
                            out,
                            "sluice_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} {n}"
                        )
                    };
                }
            }
        }
        out.push_str("# HELP sluice_response_bytes_total Response body bytes, by how they left the server.\n");
        out.push_str("# TYPE sluice_response_bytes_total counter\n");
        for (i, path) in BYTE_PATHS.iter().enumerate() {
            let n = self.response_bytes[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "sluice_response_bytes_total{{path=\"{path}\"}} {n}");
        }
        out.push_str("# HELP sluice_request_ttfb_seconds Time from a complete request head to the first response byte.\n");
        out.push_str("# TYPE sluice_request_ttfb_seconds histogram\n");
        let mut cumulative = 0u64;
        for (i, le) in TTFB_BUCKETS_SECS.iter().enumerate() {
            cumulative += self.ttfb_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "sluice_request_ttfb_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += self.ttfb_buckets[TTFB_BUCKETS_SECS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "sluice_request_ttfb_seconds_bucket{{le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.ttfb_sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "sluice_request_ttfb_seconds_sum {sum}");
        let _ = writeln!(out, "sluice_request_ttfb_seconds_count {cumulative}");
        out.push_str("# HELP sluice_put_aborted_total PUT bodies refused or cut short; nothing was stored.\n");
        out.push_str("# TYPE sluice_put_aborted_total counter\n");
        let _ = writeln!(
            out,
            "sluice_put_aborted_total {}",
            self.put_aborted_total.load(Ordering::Relaxed)
        );
    }
}

/// Append one gauge or counter with its HELP and TYPE lines.
pub fn write_metric(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    value: impl std::fmt::Display,
) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_renders() {
        let m = Metrics::new();
        m.record_request("cas", "GET", 200);
        m.record_request("cas", "GET", 200);
        m.record_request("weird", "BREW", 418);
        m.add_response_bytes(BytePath::RingSplice, 4096);
        m.record_ttfb(Duration::from_micros(300));
        m.record_ttfb(Duration::from_secs(20));
        assert_eq!(m.requests("cas", "GET", 200), 2);
        assert_eq!(m.requests("none", "OTHER", 0), 1);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("sluice_requests_total{route=\"cas\",method=\"GET\",status=\"200\"} 2\n")
        );
        assert!(out.contains(
            "sluice_requests_total{route=\"none\",method=\"OTHER\",status=\"other\"} 1\n"
        ));
        assert!(out.contains("sluice_response_bytes_total{path=\"ring_splice\"} 4096\n"));
        assert!(out.contains("sluice_response_bytes_total{path=\"fallback\"} 0\n"));
        assert!(out.contains("sluice_request_ttfb_seconds_bucket{le=\"0.0005\"} 1\n"));
        assert!(out.contains("sluice_request_ttfb_seconds_bucket{le=\"10\"} 1\n"));
        assert!(out.contains("sluice_request_ttfb_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(out.contains("sluice_request_ttfb_seconds_count 2\n"));
    }
}
