//! Runs of nghttp2's `h2load` for the transports sluice-bench's own client does not speak
//! (TLS and HTTP/2): `compare --tls`, `--h2`. h2load is the load generator nginx and h2o are
//! usually measured with, so a TLS or h2 cell compares the two servers under one well-known
//! client. It reports no latency distribution, so those cells have throughput and CPU only.

use std::process::Command;
use std::time::Duration;

use crate::report::new_latency_histogram;
use crate::run::{ErrorCounts, RunResult};

/// Streams per connection of an HTTP/2 run (h2load `-m`): the "10x10" of the issue.
pub const H2_STREAMS_PER_CONNECTION: usize = 10;

/// How h2load speaks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext HTTP/1.1: sluice-bench's own client, not h2load.
    Plain,
    /// TLS 1.3 with ALPN http/1.1.
    TlsHttp1,
    /// TLS 1.3 with ALPN h2.
    TlsH2,
    /// HTTP/2 with prior knowledge on plaintext.
    H2c,
}

impl Transport {
    /// Whether the server must listen with TLS.
    pub fn tls(self) -> bool {
        matches!(self, Transport::TlsHttp1 | Transport::TlsH2)
    }

    /// A short name for labels and the report.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Plain => "plaintext HTTP/1.1",
            Transport::TlsHttp1 => "TLS 1.3 HTTP/1.1",
            Transport::TlsH2 => "TLS 1.3 HTTP/2",
            Transport::H2c => "h2c",
        }
    }
}

/// The h2load arguments of one run (without the program name). One client thread per core
/// (at most one per connection): with h2load's default single thread, a 4 KiB plaintext cell
/// measured 0.8x what sluice-bench's thread-per-connection client measured on the same server,
/// with two threads within 10 % of it (docs/benchmarks.md).
pub fn args(
    transport: Transport,
    url: &str,
    connections: usize,
    time: Duration,
    threads: usize,
) -> Vec<String> {
    let mut args = vec![
        "-t".to_string(),
        threads.clamp(1, connections.max(1)).to_string(),
        "-c".to_string(),
        connections.to_string(),
        "-D".to_string(),
        format!("{}ms", time.as_millis().max(1)),
    ];
    match transport {
        Transport::Plain | Transport::TlsHttp1 => args.push("--h1".into()),
        Transport::TlsH2 | Transport::H2c => {
            args.push("-m".into());
            args.push(H2_STREAMS_PER_CONNECTION.to_string());
        }
    }
    args.push(url.to_string());
    args
}

/// Runs h2load for `time` against `url` and returns what it measured. Every successful
/// response is counted with `size` body bytes (h2load does not check lengths; the comparison
/// checks both servers' bytes before it starts).
pub fn run(
    transport: Transport,
    url: &str,
    connections: usize,
    time: Duration,
    size: u64,
) -> Result<RunResult, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let out = Command::new("h2load")
        .args(args(transport, url, connections, time, threads))
        .output()
        .map_err(|e| {
            format!("starting h2load: {e} (install it: apt-get install -y nghttp2-client)")
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "h2load {url} failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse(&text, size).ok_or_else(|| format!("cannot read h2load's output: {text}"))
}

/// Reads h2load's summary: the `finished in` line (rate) and the `requests:` line (counts).
pub fn parse(text: &str, size: u64) -> Option<RunResult> {
    let finished = text.lines().find(|l| l.starts_with("finished in"))?;
    let rate: f64 = finished
        .split(", ")
        .find(|part| part.ends_with(" req/s"))?
        .trim_end_matches(" req/s")
        .parse()
        .ok()?;
    let requests = text.lines().find(|l| l.starts_with("requests:"))?;
    let count = |what: &str| -> Option<u64> {
        requests
            .trim_start_matches("requests:")
            .split(',')
            .map(str::trim)
            .find(|part| part.ends_with(what))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let succeeded = count("succeeded")?;
    let failed = count("failed")? + count("errored")? + count("timeout")?;
    // h2load's rate is over the measured duration; the duration follows from it.
    let elapsed = if rate > 0.0 {
        Duration::from_secs_f64(succeeded as f64 / rate)
    } else {
        Duration::ZERO
    };
    let mut errors = ErrorCounts::default();
    // Failed, errored and timed-out requests all count as read errors (h2load does not say
    // more).
    errors.0[crate::client::ErrorKind::Read.index()] = failed;
    Some(RunResult {
        histogram: new_latency_histogram(),
        requests_ok: succeeded,
        errors,
        body_bytes: succeeded * size,
        elapsed,
        connects: 0,
        // h2load does not report retries.
        retries: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load_summary() {
        let text = "starting benchmark...\n\
finished in 704.93ms, 39258.00 req/s, 162.90MB/s\n\
requests: 19629 total, 19629 started, 19629 done, 19627 succeeded, 2 failed, 0 errored, 0 timeout\n\
status codes: 19629 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        let r = parse(text, 4096).expect("parsed");
        assert_eq!(r.requests_ok, 19627);
        assert_eq!(r.body_bytes, 19627 * 4096);
        assert_eq!(r.errors.total(), 2);
        assert!((r.requests_per_sec() - 39258.0).abs() < 1.0);
        assert!(parse("nothing", 1).is_none());
    }

    #[test]
    fn args_per_transport() {
        let t = Duration::from_millis(1500);
        assert_eq!(
            args(Transport::TlsHttp1, "https://h/x", 8, t, 2),
            ["-t", "2", "-c", "8", "-D", "1500ms", "--h1", "https://h/x"]
        );
        assert_eq!(
            args(Transport::H2c, "http://h/x", 1, t, 2),
            [
                "-t",
                "1",
                "-c",
                "1",
                "-D",
                "1500ms",
                "-m",
                "10",
                "http://h/x"
            ]
        );
    }
}
