//! Per-RPC metrics: count by method and status code, request and response bytes, and
//! duration, beside the HTTP series. A table allocated at start and bumped with relaxed
//! atomics; the label sets are closed (the methods sluice serves, `other` for any other
//! path; the 17 gRPC codes).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Method labels, `Service.Method`, in table order; the last is every other path.
pub const METHODS: [&str; 18] = [
    "Capabilities.GetCapabilities",
    "ActionCache.GetActionResult",
    "ActionCache.UpdateActionResult",
    "ContentAddressableStorage.FindMissingBlobs",
    "ContentAddressableStorage.BatchUpdateBlobs",
    "ContentAddressableStorage.BatchReadBlobs",
    "ContentAddressableStorage.GetTree",
    "ContentAddressableStorage.SplitBlob",
    "ContentAddressableStorage.SpliceBlob",
    "ContentAddressableStorage.GetChunkMapping",
    "ContentAddressableStorage.RegisterChunkMapping",
    "ByteStream.Read",
    "ByteStream.Write",
    "ByteStream.QueryWriteStatus",
    "Execution.Execute",
    "Execution.WaitExecution",
    "Operations",
    "other",
];

/// gRPC status code names, by code (0..=16).
pub const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Upper bounds of the duration buckets, seconds: RPCs run from microseconds
/// (FindMissingBlobs of a few digests) to minutes (a multi-GB ByteStream).
pub const DURATION_BUCKETS_SECS: [f64; 14] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0, 300.0,
];

/// The method label index of a request path `/package.Service/Method`.
pub fn method_index(path: &str) -> usize {
    let other = METHODS.len() - 1;
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return other;
    };
    let short = match service {
        "build.bazel.remote.execution.v2.Capabilities" => "Capabilities",
        "build.bazel.remote.execution.v2.ActionCache" => "ActionCache",
        "build.bazel.remote.execution.v2.ContentAddressableStorage" => "ContentAddressableStorage",
        "build.bazel.remote.execution.v2.Execution" => "Execution",
        "google.bytestream.ByteStream" => "ByteStream",
        "google.longrunning.Operations" => return METHODS.len() - 2,
        _ => return other,
    };
    METHODS
        .iter()
        .position(|label| {
            label
                .strip_prefix(short)
                .and_then(|rest| rest.strip_prefix('.'))
                == Some(method)
        })
        .unwrap_or(other)
}

struct PerMethod {
    by_code: [AtomicU64; CODES.len()],
    request_bytes: AtomicU64,
    response_bytes: AtomicU64,
    /// One slot per bucket plus `+Inf`.
    buckets: [AtomicU64; DURATION_BUCKETS_SECS.len() + 1],
    duration_sum_ns: AtomicU64,
}

/// The table.
pub struct RpcMetrics {
    methods: Box<[PerMethod]>,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        RpcMetrics {
            methods: (0..METHODS.len())
                .map(|_| PerMethod {
                    by_code: Default::default(),
                    request_bytes: AtomicU64::new(0),
                    response_bytes: AtomicU64::new(0),
                    buckets: Default::default(),
                    duration_sum_ns: AtomicU64::new(0),
                })
                .collect(),
        }
    }
}

impl RpcMetrics {
    /// Count one finished RPC. `code` outside 0..=16 counts as UNKNOWN.
    pub fn record(
        &self,
        method: usize,
        code: i32,
        request_bytes: u64,
        response_bytes: u64,
        took: Duration,
    ) {
        let Some(m) = self.methods.get(method) else {
            return;
        };
        let code = usize::try_from(code)
            .ok()
            .filter(|c| *c < CODES.len())
            .unwrap_or(2);
        m.by_code[code].fetch_add(1, Ordering::Relaxed);
        m.request_bytes.fetch_add(request_bytes, Ordering::Relaxed);
        m.response_bytes
            .fetch_add(response_bytes, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = DURATION_BUCKETS_SECS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(DURATION_BUCKETS_SECS.len());
        m.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        m.duration_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// RPCs counted for `method` (a label of [`METHODS`]) with `code` (a name of [`CODES`]).
    pub fn count(&self, method: &str, code: &str) -> u64 {
        let (Some(m), Some(c)) = (
            METHODS.iter().position(|l| *l == method),
            CODES.iter().position(|l| *l == code),
        ) else {
            return 0;
        };
        self.methods[m].by_code[c].load(Ordering::Relaxed)
    }

    /// Append the series in the Prometheus text format. Methods never called are left out.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP sluice_grpc_requests_total gRPC calls answered, by method and status code.\n# TYPE sluice_grpc_requests_total counter\n");
        for (label, m) in METHODS.iter().zip(self.methods.iter()) {
            for (code, n) in CODES.iter().zip(&m.by_code) {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "sluice_grpc_requests_total{{method=\"{label}\",code=\"{code}\"}} {n}"
                    );
                }
            }
        }
        let called = |m: &PerMethod| m.by_code.iter().any(|n| n.load(Ordering::Relaxed) > 0);
        for (name, help, pick) in [
            (
                "sluice_grpc_request_bytes_total",
                "gRPC request bytes received (framed messages), by method.",
                (|m: &PerMethod| &m.request_bytes) as fn(&PerMethod) -> &AtomicU64,
            ),
            (
                "sluice_grpc_response_bytes_total",
                "gRPC response bytes sent (framed messages), by method.",
                |m: &PerMethod| &m.response_bytes,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (label, m) in METHODS.iter().zip(self.methods.iter()) {
                if called(m) {
                    let n = pick(m).load(Ordering::Relaxed);
                    let _ = writeln!(out, "{name}{{method=\"{label}\"}} {n}");
                }
            }
        }
        out.push_str("# HELP sluice_grpc_request_duration_seconds Time from a gRPC request's headers to the end of its response, by method.\n# TYPE sluice_grpc_request_duration_seconds histogram\n");
        for (label, m) in METHODS.iter().zip(self.methods.iter()) {
            if !called(m) {
                continue;
            }
            let mut cumulative = 0u64;
            for (i, le) in DURATION_BUCKETS_SECS.iter().enumerate() {
                cumulative += m.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "sluice_grpc_request_duration_seconds_bucket{{method=\"{label}\",le=\"{le}\"}} {cumulative}"
                );
            }
            cumulative += m.buckets[DURATION_BUCKETS_SECS.len()].load(Ordering::Relaxed);
            let sum = m.duration_sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "sluice_grpc_request_duration_seconds_bucket{{method=\"{label}\",le=\"+Inf\"}} {cumulative}\n\
                 sluice_grpc_request_duration_seconds_sum{{method=\"{label}\"}} {sum}\n\
                 sluice_grpc_request_duration_seconds_count{{method=\"{label}\"}} {cumulative}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels() {
        let cases = [
            (
                "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
                "Capabilities.GetCapabilities",
            ),
            (
                "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
                "ActionCache.GetActionResult",
            ),
            (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
                "ContentAddressableStorage.GetTree",
            ),
            ("/google.bytestream.ByteStream/Read", "ByteStream.Read"),
            ("/google.bytestream.ByteStream/Nope", "other"),
            ("/google.longrunning.Operations/GetOperation", "Operations"),
            ("/x.Y/Z", "other"),
            ("", "other"),
        ];
        for (path, label) in cases {
            assert_eq!(METHODS[method_index(path)], label, "{path}");
        }
    }

    #[test]
    fn records_and_renders() {
        let m = RpcMetrics::default();
        let read = method_index("/google.bytestream.ByteStream/Read");
        m.record(read, 0, 100, 4096, Duration::from_micros(800));
        m.record(read, 5, 90, 0, Duration::from_secs(400));
        m.record(read, 99, 0, 0, Duration::ZERO);
        assert_eq!(m.count("ByteStream.Read", "OK"), 1);
        assert_eq!(m.count("ByteStream.Read", "NOT_FOUND"), 1);
        assert_eq!(m.count("ByteStream.Read", "UNKNOWN"), 1);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("sluice_grpc_requests_total{method=\"ByteStream.Read\",code=\"OK\"} 1\n")
        );
        assert!(out.contains("sluice_grpc_response_bytes_total{method=\"ByteStream.Read\"} 4096\n"));
        assert!(out.contains("sluice_grpc_request_bytes_total{method=\"ByteStream.Read\"} 190\n"));
        assert!(out.contains(
            "sluice_grpc_request_duration_seconds_bucket{method=\"ByteStream.Read\",le=\"0.001\"} 2\n"
        ));
        assert!(out.contains(
            "sluice_grpc_request_duration_seconds_bucket{method=\"ByteStream.Read\",le=\"+Inf\"} 3\n"
        ));
        assert!(!out.contains("ByteStream.Write"));
    }
}
