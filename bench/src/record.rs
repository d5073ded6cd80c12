//! The JSON record of a run: what was run, where, when, and what it measured.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::client::ErrorKind;
use crate::report::{percentile_rows, LatencySummary, PercentileRow};
use crate::run::RunResult;

/// Facts about the machine a run came from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostFacts {
    /// `uname -r` equivalent, from `/proc/sys/kernel/osrelease`.
    pub kernel: String,
    /// Online CPUs as the scheduler sees them.
    pub cores: usize,
    /// First `model name` of `/proc/cpuinfo` ("unknown" when absent).
    pub cpu_model: String,
    /// Host name, from `/proc/sys/kernel/hostname`.
    pub hostname: String,
}

impl HostFacts {
    /// Reads the facts of this machine; unreadable ones are reported as "unknown".
    pub fn collect() -> HostFacts {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        };
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        HostFacts {
            kernel: read("/proc/sys/kernel/osrelease"),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            hostname: read("/proc/sys/kernel/hostname"),
        }
    }
}

/// The JSON record of one run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// Always "sluice-bench".
    pub tool: String,
    /// Crate version of the tool.
    pub version: String,
    /// Command line, argv as given.
    pub command: Vec<String>,
    /// Free-form label shown in plots (defaults to the target).
    pub label: String,
    /// Machine facts.
    pub host: HostFacts,
    /// Start time, seconds since the Unix epoch.
    pub start_unix_secs: u64,
    /// Start time, UTC, RFC 3339.
    pub start_utc: String,
    /// "closed" or "open".
    pub mode: String,
    /// Connections.
    pub connections: usize,
    /// Open-loop target rate, requests per second.
    pub rate_per_sec: Option<f64>,
    /// Warm-up excluded from the figures, seconds.
    pub warmup_secs: f64,
    /// Measured time, seconds.
    pub elapsed_secs: f64,
    /// Successful measured requests.
    pub requests: u64,
    /// Successful requests per second.
    pub requests_per_sec: f64,
    /// Body bytes moved by successful requests.
    pub body_bytes: u64,
    /// Body megabytes (10^6 bytes) per second.
    pub mb_per_sec: f64,
    /// Failed requests by kind (every kind present, zeros included).
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Requests retried once on a fresh connection after a reused one died before any byte
    /// of the response (the keep-alive race); they are not errors.
    #[serde(default)]
    pub retries: u64,
    /// Summary percentiles.
    pub latency: LatencySummary,
    /// The full percentile distribution (the `.hgrm` rows), for plots.
    pub percentiles: Vec<PercentileRow>,
}

/// What a run was, for the record.
#[derive(Debug, Clone)]
pub struct RunDescription {
    /// argv.
    pub command: Vec<String>,
    /// Plot label.
    pub label: String,
    /// Start of the run.
    pub started: SystemTime,
    /// Connections.
    pub connections: usize,
    /// Open-loop rate.
    pub rate_per_sec: Option<f64>,
    /// Warm-up, seconds.
    pub warmup_secs: f64,
}

impl RunRecord {
    /// Builds the record of a finished run.
    pub fn new(desc: &RunDescription, result: &RunResult) -> RunRecord {
        let start_unix_secs = desc
            .started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        RunRecord {
            tool: "sluice-bench".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            command: desc.command.clone(),
            label: desc.label.clone(),
            host: HostFacts::collect(),
            start_unix_secs,
            start_utc: rfc3339_utc(start_unix_secs),
            mode: if desc.rate_per_sec.is_some() {
                "open"
            } else {
                "closed"
            }
            .into(),
            connections: desc.connections,
            rate_per_sec: desc.rate_per_sec,
            warmup_secs: desc.warmup_secs,
            elapsed_secs: result.elapsed.as_secs_f64(),
            requests: result.requests_ok,
            requests_per_sec: result.requests_per_sec(),
            body_bytes: result.body_bytes,
            mb_per_sec: result.mb_per_sec(),
            errors: ErrorKind::ALL
                .iter()
                .map(|k| (k.name().to_string(), result.errors.get(*k)))
                .collect(),
            retries: result.retries,
            latency: LatencySummary::of(&result.histogram),
            percentiles: percentile_rows(&result.histogram, 5),
        }
    }
}

/// The human summary printed after a run.
pub fn summary_text(r: &RunRecord) -> String {
    let errors: u64 = r.errors.values().sum();
    let by_kind: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let kinds = by_kind.join(", ");
    let RunRecord {
        label,
        mode,
        connections,
        elapsed_secs,
        warmup_secs,
        requests,
        requests_per_sec,
        mb_per_sec,
        ..
    } = r;
    let LatencySummary {
        p50_ms,
        p90_ms,
        p99_ms,
        p99_9_ms,
        p99_99_ms,
        max_ms,
        ..
    } = &r.latency;
    format!(
        "{label}\n  {mode} loop, {connections} connections, {elapsed_secs:.2} s measured ({warmup_secs:.1} s warm-up excluded)\n  \
         requests {requests}  {requests_per_sec:.1} req/s  {mb_per_sec:.1} MB/s\n  errors {errors} ({kinds})\n  \
         latency ms  p50 {p50_ms:.3}  p90 {p90_ms:.3}  p99 {p99_ms:.3}  p99.9 {p99_9_ms:.3}  p99.99 {p99_99_ms:.3}  max {max_ms:.3}\n"
    )
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (Howard Hinnant's civil-from-days).
pub fn rfc3339_utc(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        let cases = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
        ];
        for (secs, want) in cases {
            assert_eq!(rfc3339_utc(secs), want);
        }
    }
}
