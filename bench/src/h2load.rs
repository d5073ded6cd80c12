//! Runs of nghttp2's `h2load` for the transports sluice-bench's own client does not speak
//! (TLS and HTTP/2): `compare --tls`, `--h2`. h2load is the load generator nginx and h2o are
//! usually measured with, so a TLS or h2 cell compares the two servers under one well-known
//! client. It reports no latency distribution, so those cells have throughput and CPU only.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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
    let duration = ["-D".to_string(), format!("{}ms", time.as_millis().max(1))];
    let streams = H2_STREAMS_PER_CONNECTION;
    let mut args = leading_args(transport, connections, threads, duration, streams);
    args.push(url.to_string());
    args
}

/// Bodies from this size on are fetched over HTTP/2 with one stream per connection and a fixed
/// count ([`count_args`]): ten 64 MiB streams per connection put 640 MiB per connection in
/// flight, and a duration run (`-D`) counts only the responses that finish inside it, so such
/// a cell read the run's length rather than the server (docs/benchmarks.md). One stream per
/// connection also shows that flow control lets a single stream run at what the link carries.
pub const H2_LARGE_BODY_BYTES: u64 = 1 << 20;

/// Whether a GET of `size` bytes over `transport` runs as [`count_args`] rather than [`args`].
pub fn counted_get(transport: Transport, size: u64) -> bool {
    matches!(transport, Transport::TlsH2 | Transport::H2c) && size >= H2_LARGE_BODY_BYTES
}

/// The h2load arguments of a GET run of `requests` requests, one stream per connection on
/// HTTP/2 (see [`H2_LARGE_BODY_BYTES`]).
pub fn count_args(
    transport: Transport,
    url: &str,
    connections: usize,
    requests: u64,
    threads: usize,
) -> Vec<String> {
    let count = [
        "-n".to_string(),
        requests.max(connections as u64).to_string(),
    ];
    let mut args = leading_args(transport, connections, threads, count, 1);
    args.push(url.to_string());
    args
}

/// The arguments every run starts with: `threads` client threads (at most one per connection),
/// `connections` connections, how the run ends (`-D` and a time, or `-n` and a count), and the
/// protocol: `--h1`, or h2 with `h2_streams` concurrent streams per connection.
fn leading_args(
    transport: Transport,
    connections: usize,
    threads: usize,
    end: [String; 2],
    h2_streams: usize,
) -> Vec<String> {
    let mut args = vec![
        "-t".to_string(),
        threads.clamp(1, connections.max(1)).to_string(),
        "-c".to_string(),
        connections.to_string(),
    ];
    args.extend(end);
    match transport {
        Transport::Plain | Transport::TlsHttp1 => args.push("--h1".into()),
        Transport::TlsH2 | Transport::H2c => {
            args.extend(["-m".to_string(), h2_streams.to_string()]);
        }
    }
    args
}

/// The h2load arguments of an upload run: `requests` PUTs (a fixed count, not a duration, so
/// a large body in flight at the end is not dropped from the count: the run ends with its
/// last completion, as sluice-bench's own runs do) whose body is the file `data` (`-d` makes
/// requests POSTs with the file as body; `-H ':method: PUT'` overrides the method, for
/// HTTP/1.1 as for h2). Over h2, one stream per connection: `connections` uploads in flight,
/// as over HTTP/1.1.
pub fn put_args(
    transport: Transport,
    url: &str,
    connections: usize,
    requests: u64,
    threads: usize,
    data: &Path,
) -> Vec<String> {
    let count = [
        "-n".to_string(),
        requests.max(connections as u64).to_string(),
    ];
    let mut args = leading_args(transport, connections, threads, count, 1);
    args.extend([
        "-d".to_string(),
        data.display().to_string(),
        "-H".to_string(),
        ":method: PUT".to_string(),
        url.to_string(),
    ]);
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
    run_args(&args(transport, url, connections, time, threads), url, size)
}

/// Runs h2load for `requests` GETs of `url` (`size` bytes each), see [`count_args`].
pub fn run_count(
    transport: Transport,
    url: &str,
    connections: usize,
    requests: u64,
    size: u64,
) -> Result<RunResult, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    run_args(
        &count_args(transport, url, connections, requests, threads),
        url,
        size,
    )
}

/// Runs h2load for `requests` PUTs of the file `data` (`size` bytes) to `url`.
pub fn run_put(
    transport: Transport,
    url: &str,
    connections: usize,
    requests: u64,
    size: u64,
    data: &Path,
) -> Result<RunResult, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let args = put_args(transport, url, connections, requests, threads, data);
    run_args(&args, url, size)
}

/// Longest an h2load run may take past what it was asked for before it is killed and run
/// again once: h2load 1.52 sometimes never ends a duration run (seen against nginx over TLS h2
/// at 20 connections, its connections open and idle), which stopped a whole comparison.
const H2LOAD_GRACE: Duration = Duration::from_secs(60);

fn run_args(args: &[String], url: &str, size: u64) -> Result<RunResult, String> {
    let limit = run_limit(args);
    let out = match output_within(args, limit)? {
        Some(out) => out,
        None => {
            eprintln!(
                "sluice-bench: h2load {url} hung past {limit:?}; killed it, running it again"
            );
            output_within(args, limit)?
                .ok_or_else(|| format!("h2load {url} hung past {limit:?} twice"))?
        }
    };
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

/// How long a run of `args` may take: its `-D` duration (or, for a fixed count, ten minutes)
/// plus [`H2LOAD_GRACE`].
fn run_limit(args: &[String]) -> Duration {
    let asked = args
        .iter()
        .position(|a| a == "-D")
        .and_then(|i| args.get(i + 1))
        .and_then(|d| d.strip_suffix("ms"))
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::from_secs(600), Duration::from_millis);
    asked + H2LOAD_GRACE
}

/// Runs h2load with `args`; `None` if it had not finished within `limit` (it is killed then).
fn output_within(args: &[String], limit: Duration) -> Result<Option<Output>, String> {
    let mut child = Command::new("h2load")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("starting h2load: {e} (install it: apt-get install -y nghttp2-client)")
        })?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for h2load: {e}")),
        }
    }
    // h2load prints a few KiB at most, so its pipes never filled while it ran.
    child
        .wait_with_output()
        .map(Some)
        .map_err(|e| format!("reading h2load's output: {e}"))
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
    let answered = count("succeeded")?;
    let failed = count("failed")? + count("errored")? + count("timeout")?;
    // h2load's "succeeded" includes non-2xx answers (a 404, a 400 for a wrong digest): only 2xx
    // count here, the rest are status errors.
    let status_2xx: Option<u64> = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .and_then(|l| l.trim_start_matches("status codes:").split(',').next())
        .and_then(|p| p.trim().strip_suffix(" 2xx"))
        .and_then(|n| n.trim().parse().ok());
    let not_2xx = status_2xx.map_or(0, |ok| answered.saturating_sub(ok));
    let succeeded = answered - not_2xx;
    // h2load's rate (of all answered requests) is over the measured duration; the duration
    // follows from it.
    let elapsed = if rate > 0.0 {
        Duration::from_secs_f64(answered as f64 / rate)
    } else {
        Duration::ZERO
    };
    let mut errors = ErrorCounts::default();
    // Failed, errored and timed-out requests all count as read errors (h2load does not say
    // more).
    errors.0[crate::client::ErrorKind::Read.index()] = failed;
    errors.0[crate::client::ErrorKind::Status.index()] = not_2xx;
    Some(RunResult {
        histogram: new_latency_histogram(),
        requests_ok: succeeded,
        errors,
        body_bytes: succeeded * size,
        elapsed,
        connects: 0,
        // h2load does not report retries.
        retries: 0,
        per_second: Vec::new(),
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
        let not_found = "finished in 1.00s, 100.00 req/s, 0.01MB/s\n\
requests: 100 total, 100 started, 100 done, 100 succeeded, 0 failed, 0 errored, 0 timeout\n\
status codes: 60 2xx, 0 3xx, 40 4xx, 0 5xx\n";
        let r = parse(not_found, 10).expect("parsed");
        assert_eq!(r.requests_ok, 60);
        assert_eq!(r.errors.get(crate::client::ErrorKind::Status), 40);
        assert!((r.requests_per_sec() - 60.0).abs() < 0.1);
    }

    #[test]
    fn a_run_may_take_its_duration_and_the_grace() {
        let t = Duration::from_millis(1500);
        assert_eq!(
            run_limit(&args(Transport::H2c, "http://h/x", 8, t, 2)),
            t + H2LOAD_GRACE
        );
        assert_eq!(
            run_limit(&count_args(Transport::H2c, "http://h/x", 8, 40, 2)),
            Duration::from_secs(600) + H2LOAD_GRACE
        );
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
        assert_eq!(
            put_args(
                Transport::TlsHttp1,
                "https://h/x",
                8,
                40,
                2,
                Path::new("/b")
            ),
            [
                "-t",
                "2",
                "-c",
                "8",
                "-n",
                "40",
                "--h1",
                "-d",
                "/b",
                "-H",
                ":method: PUT",
                "https://h/x"
            ]
        );
        assert_eq!(
            count_args(Transport::H2c, "http://h/x", 8, 40, 2),
            ["-t", "2", "-c", "8", "-n", "40", "-m", "1", "http://h/x"]
        );
        assert!(counted_get(Transport::TlsH2, 64 << 20));
        assert!(!counted_get(Transport::TlsH2, 4096));
        assert!(!counted_get(Transport::TlsHttp1, 64 << 20));
        // h2: one upload in flight per connection; never fewer requests than connections.
        let a = put_args(Transport::TlsH2, "https://h/x", 8, 3, 2, Path::new("/b"));
        assert_eq!(a[4..8], ["-n", "8", "-m", "1"]);
    }
}
