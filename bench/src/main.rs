//! `sluice-bench` command line: `run`, `plot`, `loopback-bound`, `disk-bound`, `compare`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};

use sluice_bench::client::ReceiveOptions;
use sluice_bench::compare::{self, CompareConfig, Pairing};
use sluice_bench::h2load::Transport;
use sluice_bench::loopback::{self, LoopbackConfig};
use sluice_bench::peers::parse_peers;
use sluice_bench::plot::{load_series, plot_svg, Series};
use sluice_bench::record::{summary_text, RunDescription, RunRecord};
use sluice_bench::report::hgrm_text;
use sluice_bench::request::{parse_bytes, Method, RequestSet};
use sluice_bench::run::{run, RunConfig, Stop};

#[derive(Parser)]
#[command(
    name = "sluice-bench",
    version,
    about = "HTTP/1.1 load generator with HdrHistogram reports"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load a server and report throughput, errors and latency percentiles.
    Run(RunArgs),
    /// Overlay the latency-by-percentile curves of several runs (JSON records or .hgrm files).
    Plot {
        /// Output SVG file.
        #[arg(short, long, default_value = "latency.svg")]
        out: PathBuf,
        /// Plot title.
        #[arg(long, default_value = "Latency by percentile")]
        title: String,
        /// Run records (.json) or percentile distributions (.hgrm).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Measure this machine's zero-copy loopback bound (sendfile -> loopback TCP -> splice to /dev/null).
    LoopbackBound {
        /// Seconds to run.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
        /// Parallel streams.
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Size of the cached file sent repeatedly (suffixes k, m, g).
        #[arg(long, default_value = "64m")]
        file_bytes: String,
        /// Bytes per sendfile call and pipe size (suffixes k, m, g).
        #[arg(long, default_value = "1m")]
        chunk_bytes: String,
        /// Print a JSON object instead of a line.
        #[arg(long)]
        json: bool,
    },
    /// Measure the disk's bound for durable uploads: writers each writing a body to a new file,
    /// fdatasync, rename over the last (`dd conv=fdatasync` per file, with a store's publish).
    DiskBound {
        /// Directory to write in (on the filesystem whose bound is wanted); created if missing.
        #[arg(long, default_value = "bench/out/disk-bound")]
        dir: PathBuf,
        /// Body size per file (suffixes k, m, g).
        #[arg(long, default_value = "64m")]
        bytes: String,
        /// Parallel writers.
        #[arg(long, default_value_t = 1)]
        writers: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 3.0)]
        secs: f64,
    },
    /// REAPI over gRPC against HTTP on the same sluice: FindMissingBlobs, BatchReadBlobs vs
    /// HTTP/1.1 GETs, ByteStream.Read vs an HTTP/2 GET, zstd on the wire.
    Grpc {
        /// The sluice binary (release build).
        #[arg(long, default_value = "target/release/sluice")]
        sluice_bin: PathBuf,
        /// Output directory (server data and log, report.md).
        #[arg(long, default_value = "bench/out/grpc")]
        out: PathBuf,
        /// Alternating repeats of each comparison.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Length of each throughput run (e.g. 3s).
        #[arg(long, default_value = "3s")]
        run_time: String,
        /// Run only these sections (fmb, batch, stream, zstd, disk), e.g. to profile one.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Side-by-side: sluice vs nginx, h2o, caddy (or sluice splice vs copy) over sizes and
    /// concurrencies, GET and PUT.
    Compare(CompareArgs),
    /// A cold CI fleet's upload burst: distinct CAS blobs PUT once each, against the disk's
    /// bound and each sluice given, alone and with two peers, alternating.
    Burst(BurstArgs),
    /// The floor of sluice's HTTP/2 stack (`compare --peers h2-floor`): the h2 crate and
    /// rustls without hyper, every GET answered from memory. Runs until killed.
    H2Floor {
        /// Loopback port for h2c (prior knowledge) and HTTP/1.1 probes.
        #[arg(long)]
        port: u16,
        /// Loopback port for TLS (ALPN h2); needs --cert and --key.
        #[arg(long, requires_all = ["cert", "key"])]
        tls_port: Option<u16>,
        /// Certificate chain (PEM).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Private key (PEM).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Directory whose files are served.
        #[arg(long)]
        www: PathBuf,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Send h2's writes as they come (once per stream) instead of once per turn.
        #[arg(long)]
        no_coalesce: bool,
    },
}

#[derive(clap::Args)]
struct BurstArgs {
    /// A sluice binary to measure, as LABEL=PATH (repeat for a before/after in one run).
    /// Default: after=target/release/sluice.
    #[arg(long = "sluice")]
    sluice: Vec<String>,
    /// Distinct blobs per burst.
    #[arg(long, default_value_t = 10_000)]
    blobs: usize,
    /// Smallest blob (suffixes k, m, g).
    #[arg(long, default_value = "1k")]
    min_bytes: String,
    /// Largest blob (suffixes k, m, g).
    #[arg(long, default_value = "1m")]
    max_bytes: String,
    /// Client connections (and disk-bound writers).
    #[arg(short, long, default_value_t = 16)]
    connections: usize,
    /// Rounds of every cell, alternating.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Only the cells with two peers (and the disk bound).
    #[arg(long, conflicts_with = "no_peers")]
    peers_only: bool,
    /// Only the cells without peers (and the disk bound).
    #[arg(long)]
    no_peers: bool,
    /// Output directory, on the disk under test (data directories, logs, table.md).
    #[arg(long, default_value = "bench/out/burst")]
    out: PathBuf,
    /// Seed of the blobs' sizes and contents.
    #[arg(long, default_value_t = 23)]
    seed: u64,
    /// Seconds to wait after a cell's files are deleted (and synced) before the next cell:
    /// ext4 without a journal skips inodes freed in the last 60 s, reading their blocks to
    /// check, so a cell started sooner pays for the last one's clean-up. 0 does not wait.
    #[arg(long, default_value_t = 61)]
    settle_secs: u64,
}

fn cmd_burst(a: BurstArgs) -> Result<(), String> {
    let mut sluice = Vec::new();
    for spec in &a.sluice {
        let (label, path) = spec
            .split_once('=')
            .ok_or_else(|| format!("--sluice {spec}: expected LABEL=PATH"))?;
        sluice.push((label.to_string(), PathBuf::from(path)));
    }
    if sluice.is_empty() {
        sluice.push(("after".to_string(), PathBuf::from("target/release/sluice")));
    }
    let cfg = sluice_bench::burst::BurstConfig {
        sluice,
        blobs: a.blobs,
        size_min: parse_bytes(&a.min_bytes)?,
        size_max: parse_bytes(&a.max_bytes)?,
        connections: a.connections,
        repeats: a.repeats.max(1),
        alone: !a.peers_only,
        peers: !a.no_peers,
        out_dir: a.out,
        seed: a.seed,
        settle: std::time::Duration::from_secs(a.settle_secs),
    };
    let report = sluice_bench::burst::run_burst(&cfg)?;
    print!("{report}");
    Ok(())
}

#[derive(clap::Args)]
struct RunArgs {
    /// Target URL (http://host:port/path). With --size-mix it must hold `{size}`.
    url: Option<String>,
    /// File of requests, one `URL [LENGTH [SHA256]]` per line. A PUT list sends each entry
    /// once across the connections and ends the run when all are sent (N keys, N uploads);
    /// GET and HEAD lists are walked round-robin for the whole run.
    #[arg(long, conflicts_with = "url")]
    list: Option<PathBuf>,
    /// With a PUT --list: walk the list round-robin for the whole run instead of sending each
    /// entry once (entries are then written again and again).
    #[arg(long, requires = "list")]
    repeat_list: bool,
    /// Size mix `SIZE[:WEIGHT],...` expanded into URL's `{size}` (suffixes k, m, g).
    #[arg(long)]
    size_mix: Option<String>,
    /// GET, HEAD or PUT.
    #[arg(short, long, default_value = "GET")]
    method: Method,
    /// Generated PUT body size when the URL or list gives none (suffixes k, m, g).
    #[arg(long, default_value = "4096")]
    body_bytes: String,
    /// Keep-alive connections (one thread each).
    #[arg(short, long, default_value_t = 1)]
    connections: usize,
    /// Measured duration (e.g. 10s, 500ms, 2m). Default 10s unless --requests is given.
    #[arg(short, long)]
    duration: Option<String>,
    /// Stop after this many measured requests instead of a duration.
    #[arg(short = 'n', long, conflicts_with = "duration")]
    requests: Option<u64>,
    /// Warm-up excluded from the figures.
    #[arg(long, default_value = "0s")]
    warmup: String,
    /// Open loop: total requests per second (latency from intended send times).
    #[arg(short, long)]
    rate: Option<f64>,
    /// Per-read/write socket timeout.
    #[arg(long, default_value = "10s")]
    timeout: String,
    /// Verify each body's SHA-256 (against the list's digest, else the first body seen).
    #[arg(long)]
    verify_sha256: bool,
    /// Read large bodies into a 256 KiB buffer instead of splicing them to /dev/null.
    #[arg(long)]
    no_splice: bool,
    /// Pin connection threads round-robin to these CPUs (e.g. 0,1).
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Write PREFIX.hgrm, PREFIX.json and PREFIX.svg, and PREFIX.seconds.csv: per second of
    /// the run (by intended send time), the requests and their p50, p99, p99.9 and max in ms.
    #[arg(short, long)]
    out: Option<PathBuf>,
    /// Label for the record and plots (default: the URL or list file).
    #[arg(long)]
    label: Option<String>,
    /// No progress line.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct CompareArgs {
    /// The sluice binary (release build).
    #[arg(long, default_value = "target/release/sluice")]
    sluice_bin: PathBuf,
    /// The nginx binary.
    #[arg(long, default_value = "nginx")]
    nginx_bin: PathBuf,
    /// The h2o binary.
    #[arg(long, default_value = "h2o")]
    h2o_bin: PathBuf,
    /// The Caddy binary.
    #[arg(long, default_value = "caddy")]
    caddy_bin: PathBuf,
    /// Servers to compare sluice with, alternating per repeat: any of nginx, h2o, caddy. With
    /// more than one, a table names the best peer per cell and gives sluice's ratio against
    /// it and against nginx.
    #[arg(long, value_delimiter = ',', default_values = ["nginx"])]
    peers: Vec<String>,
    /// Compare sluice's splice mode with its copy mode instead of sluice with nginx.
    #[arg(long)]
    modes: bool,
    /// Quick mode: 1.5 s runs after 0.5 s warm-up (about 2 minutes for the full matrix).
    #[arg(long)]
    quick: bool,
    /// Repeats per cell (each server alternately).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Measured seconds per run (default 8, quick 1.5).
    #[arg(long)]
    run_secs: Option<f64>,
    /// Warm-up seconds per run (default 2, quick 0.5).
    #[arg(long)]
    warmup_secs: Option<f64>,
    /// Artifact sizes (suffixes k, m, g).
    #[arg(long, value_delimiter = ',', default_values = ["4096", "17941067", "64m"])]
    sizes: Vec<String>,
    /// Concurrencies.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 20])]
    concurrency: Vec<usize>,
    /// Output directory.
    #[arg(long, default_value = "bench/out")]
    out_dir: PathBuf,
    /// Skip the loopback-bound measurement.
    #[arg(long)]
    no_loopback_bound: bool,
    /// Idle keep-alive connections for the RSS report (0 skips it).
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// Body sizes of the PUT cells (suffixes k, m, g; 0 skips them): sluice to /cas/{sha256}
    /// with fsync = always and = never, nginx's WebDAV PUT (when nginx is a peer) and the
    /// disk's fdatasync bound, alternating.
    #[arg(long, alias = "put-bytes", value_delimiter = ',', default_values = ["4096", "64m"])]
    put_sizes: Vec<String>,
    /// Connections of the PUT cells.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8])]
    put_concurrency: Vec<usize>,
    /// Only the PUT cells: no GET matrix, no loopback bound, no idle-connection RSS.
    #[arg(long)]
    put_only: bool,
    /// GET over TLS 1.3 (both servers with one self-signed certificate), driven by h2load.
    #[arg(long)]
    tls: bool,
    /// GET over HTTP/2 (with --tls: ALPN h2; alone: h2c), 10 streams per connection, h2load.
    #[arg(long)]
    h2: bool,
    /// Run sluice with SLUICE_ENGINE=epoll, what it runs when io_uring is refused.
    #[arg(long)]
    no_uring: bool,
}

/// Parses `10s`, `500ms`, `2m`, `1h` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    num.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .map(|x| Duration::from_secs_f64(x * scale))
        .ok_or_else(|| format!("{s:?} is not a duration (e.g. 10s, 500ms, 2m)"))
}

fn cmd_run(a: RunArgs) -> Result<(), String> {
    let body_bytes = usize::try_from(parse_bytes(&a.body_bytes)?).map_err(|_| "body too large")?;
    let (set, default_label) = match (&a.url, &a.list, &a.size_mix) {
        (Some(url), None, Some(mix)) => (
            RequestSet::size_mix(url, mix, a.method)?,
            format!("{url} [{mix}]"),
        ),
        (Some(url), None, None) => (RequestSet::single(url, a.method, body_bytes)?, url.clone()),
        (None, Some(list), None) => {
            let text = std::fs::read_to_string(list)
                .map_err(|e| format!("reading {}: {e}", list.display()))?;
            let mut set = RequestSet::from_list(&text, a.method, body_bytes)?;
            if a.repeat_list {
                set.once = false;
            }
            (set, list.display().to_string())
        }
        _ => return Err("give a URL, a URL with --size-mix, or --list FILE".into()),
    };
    let stop = match (a.requests, &a.duration) {
        (Some(n), _) => Stop::Requests(n),
        (None, Some(d)) => Stop::Duration(parse_duration(d)?),
        (None, None) => Stop::Duration(Duration::from_secs(10)),
    };
    let cfg = RunConfig {
        connections: a.connections,
        stop,
        warmup: parse_duration(&a.warmup)?,
        rate_per_sec: a.rate,
        timeout: parse_duration(&a.timeout)?,
        receive: ReceiveOptions {
            verify_sha256: a.verify_sha256,
            splice: !a.no_splice,
        },
        cpus: a.cpus.clone(),
        progress: !a.quiet,
    };
    let desc = RunDescription {
        command: std::env::args().collect(),
        label: a.label.unwrap_or(default_label),
        started: SystemTime::now(),
        connections: cfg.connections,
        rate_per_sec: cfg.rate_per_sec,
        warmup_secs: cfg.warmup.as_secs_f64(),
    };
    let result = run(set, cfg)?;
    let record = RunRecord::new(&desc, &result);
    print!("{}", summary_text(&record));
    if let Some(prefix) = a.out {
        let with = |ext: &str| {
            let mut p = prefix.clone().into_os_string();
            p.push(ext);
            PathBuf::from(p)
        };
        std::fs::write(with(".hgrm"), hgrm_text(&result.histogram))
            .map_err(|e| format!("writing .hgrm: {e}"))?;
        let json =
            serde_json::to_string_pretty(&record).map_err(|e| format!("encoding JSON: {e}"))?;
        std::fs::write(with(".json"), json).map_err(|e| format!("writing .json: {e}"))?;
        let series = [Series {
            label: record.label.clone(),
            rows: record.percentiles.clone(),
        }];
        plot_svg(&series, "Latency by percentile", &with(".svg"))?;
        std::fs::write(with(".seconds.csv"), per_second_csv(&result.per_second))
            .map_err(|e| format!("writing .seconds.csv: {e}"))?;
    }
    Ok(())
}

/// `second,requests,p50_ms,p99_ms,p999_ms,max_ms`, one line per second of the run.
fn per_second_csv(per_second: &[sluice_bench::report::LatencyHistogram]) -> String {
    let mut out = String::from("second,requests,p50_ms,p99_ms,p999_ms,max_ms\n");
    for (second, h) in per_second.iter().enumerate() {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        out.push_str(&format!(
            "{second},{},{:.3},{:.3},{:.3},{:.3}\n",
            h.len(),
            ms(0.5),
            ms(0.99),
            ms(0.999),
            h.max() as f64 / 1000.0
        ));
    }
    out
}

fn cmd_compare(a: CompareArgs) -> Result<(), String> {
    let sizes = a
        .sizes
        .iter()
        .map(|s| parse_bytes(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut put_sizes = Vec::new();
    for s in &a.put_sizes {
        match usize::try_from(parse_bytes(s)?) {
            Ok(0) => {}
            Ok(n) => put_sizes.push(n),
            Err(_) => return Err(format!("--put-sizes {s} does not fit in memory")),
        }
    }
    let (run_default, warm_default) = if a.quick { (1.5, 0.5) } else { (8.0, 2.0) };
    let secs = |x: f64| {
        if x.is_finite() && x >= 0.0 {
            Ok(Duration::from_secs_f64(x))
        } else {
            Err(format!("{x} is not a number of seconds"))
        }
    };
    let cfg = CompareConfig {
        sluice_bin: a.sluice_bin,
        nginx_bin: a.nginx_bin,
        h2o_bin: a.h2o_bin,
        caddy_bin: a.caddy_bin,
        peers: parse_peers(&a.peers)?,
        get: !a.put_only,
        pairing: if a.modes {
            Pairing::SpliceVsCopy
        } else {
            Pairing::SluiceVsPeers
        },
        sizes,
        concurrencies: a.concurrency,
        repeats: a.repeats,
        run_time: secs(a.run_secs.unwrap_or(run_default))?,
        warmup: secs(a.warmup_secs.unwrap_or(warm_default))?,
        out_dir: a.out_dir,
        loopback_bound: !a.no_loopback_bound,
        idle_connections: a.idle_connections,
        put_sizes,
        put_concurrencies: a.put_concurrency.iter().map(|&c| c.max(1)).collect(),
        transport: match (a.tls, a.h2) {
            (false, false) => Transport::Plain,
            (true, false) => Transport::TlsHttp1,
            (true, true) => Transport::TlsH2,
            (false, true) => Transport::H2c,
        },
        no_uring: a.no_uring,
    };
    print!("{}", compare::compare(&cfg)?);
    Ok(())
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Run(a) => cmd_run(a),
        Cmd::Plot { out, title, files } => files
            .iter()
            .map(|f| load_series(f))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|series| plot_svg(&series, &title, &out)),
        Cmd::LoopbackBound {
            secs,
            streams,
            file_bytes,
            chunk_bytes,
            json,
        } => (|| {
            let cfg = LoopbackConfig {
                file_bytes: parse_bytes(&file_bytes)?,
                duration: parse_duration(&secs.to_string())?,
                streams,
                chunk_bytes: usize::try_from(parse_bytes(&chunk_bytes)?)
                    .map_err(|_| "chunk too large")?,
                ..LoopbackConfig::default()
            };
            let r = loopback::measure(&cfg)?;
            if json {
                println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            } else {
                println!(
                    "loopback bound: {:.2} GB/s ({} streams, {} bytes in {:.2} s, sendfile -> splice /dev/null)",
                    r.gb_per_sec, streams, r.bytes, r.elapsed_secs
                );
            }
            Ok(())
        })(),
        Cmd::DiskBound {
            dir,
            bytes,
            writers,
            secs,
        } => (|| {
            let len = usize::try_from(parse_bytes(&bytes)?).map_err(|_| "body too large")?;
            let body = std::sync::Arc::new(sluice_bench::request::Body::generate(len));
            let r = sluice_bench::disk::write_bound(
                &dir,
                &body,
                writers,
                parse_duration(&secs.to_string())?,
            )?;
            let ms = |q: f64| r.histogram.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "disk bound: {:.1} MB/s, {:.1} files/s ({writers} writers, {len} B each, {:.2} s; write + fdatasync + rename p50 {:.3} ms, p99 {:.3} ms)",
                r.mb_per_sec(),
                r.requests_per_sec(),
                r.elapsed.as_secs_f64(),
                ms(0.5),
                ms(0.99)
            );
            Ok(())
        })(),
        Cmd::Compare(a) => cmd_compare(a),
        Cmd::Grpc {
            sluice_bin,
            out,
            repeats,
            run_time,
            only,
        } => parse_duration(&run_time).and_then(|run_time| {
            let cfg = sluice_bench::grpc::GrpcConfig {
                sluice_bin,
                out_dir: out.clone(),
                repeats: repeats.max(1),
                run_time,
                only,
            };
            let report = sluice_bench::grpc::grpc_bench(&cfg)?;
            std::fs::write(out.join("report.md"), &report).map_err(|e| e.to_string())?;
            println!("{report}");
            Ok(())
        }),
        Cmd::Burst(a) => cmd_burst(a),
        Cmd::H2Floor {
            port,
            tls_port,
            cert,
            key,
            www,
            threads,
            no_coalesce,
        } => sluice_bench::h2floor::run(sluice_bench::h2floor::FloorConfig {
            port,
            tls: tls_port.zip(cert).zip(key).map(|((p, c), k)| (p, c, k)),
            www,
            threads,
            coalesce: !no_coalesce,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
