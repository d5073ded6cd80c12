//! The load generator: N keep-alive connections, each on its own thread with blocking I/O,
//! either closed loop (send the next request when the previous one completes, as wrk) or open
//! loop at a fixed rate with latency measured from each request's intended send time (wrk2's
//! coordinated-omission correction).
//!
//! Decision: one thread per connection rather than an event loop. At the concurrencies this
//! tool is for (1–a few hundred) a blocked thread costs nothing, and blocking reads of 256 KiB
//! or splices keep the per-byte cost at the kernel's, which is what lets the tool run faster
//! than the servers it measures.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{Connection, ErrorKind, ReceiveOptions};
use crate::report::{new_latency_histogram, record_latency_us, LatencyHistogram};
use crate::request::RequestSet;
use crate::sys;

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this long of measurement (warm-up excluded). Requests in flight at the end are
    /// completed and counted; the elapsed time runs to the last completion.
    Duration(Duration),
    /// After this many measured requests (successful or failed), shared by all connections.
    Requests(u64),
}

/// Configuration of one run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Concurrent keep-alive connections (one thread each). Default 1.
    pub connections: usize,
    /// When to stop.
    pub stop: Stop,
    /// Time at the start whose requests are sent but not counted. Default 0.
    pub warmup: Duration,
    /// Open loop: total requests per second across all connections. `None` is closed loop.
    pub rate_per_sec: Option<f64>,
    /// Socket timeout for each read or write; no progress for this long is a `timeout` error.
    pub timeout: Duration,
    /// Receive options (digest verification, splicing).
    pub receive: ReceiveOptions,
    /// CPUs to pin connection threads to, round-robin; empty means no pinning.
    pub cpus: Vec<usize>,
    /// Print a progress line on stderr once a second (only when stderr is a terminal).
    pub progress: bool,
}

impl Default for RunConfig {
    fn default() -> RunConfig {
        RunConfig {
            connections: 1,
            stop: Stop::Duration(Duration::from_secs(10)),
            warmup: Duration::ZERO,
            rate_per_sec: None,
            timeout: Duration::from_secs(10),
            receive: ReceiveOptions {
                verify_sha256: false,
                splice: true,
            },
            cpus: Vec::new(),
            progress: true,
        }
    }
}

/// Counts per error kind, indexed by [`ErrorKind::index`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorCounts(pub [u64; 6]);

impl ErrorCounts {
    /// Count of one kind.
    pub fn get(&self, kind: ErrorKind) -> u64 {
        self.0[kind.index()]
    }

    /// Sum over all kinds.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// Latency of successful measured requests, microseconds.
    pub histogram: LatencyHistogram,
    /// Successful measured requests.
    pub requests_ok: u64,
    /// Failed measured requests, by kind.
    pub errors: ErrorCounts,
    /// Body bytes of successful measured requests (received for GET, sent for PUT).
    pub body_bytes: u64,
    /// From the end of warm-up to the last measured completion.
    pub elapsed: Duration,
    /// Connections opened, warm-up included (1 per connection plus reconnects).
    pub connects: u64,
    /// Requests sent a second time on a fresh connection because a reused one died before
    /// any byte of the response (the keep-alive race); not errors.
    pub retries: u64,
    /// Latency of successful measured requests by the second of the run they were due in
    /// (intended send time), from the end of warm-up: the signal over time, beside the
    /// whole-run histogram. At most [`PER_SECOND_MAX`] seconds.
    pub per_second: Vec<LatencyHistogram>,
}

/// Seconds of a run kept in [`RunResult::per_second`].
pub const PER_SECOND_MAX: usize = 3600;

impl Default for RunResult {
    /// Nothing measured yet: what a run's counts start from.
    fn default() -> RunResult {
        RunResult {
            histogram: new_latency_histogram(),
            requests_ok: 0,
            errors: ErrorCounts::default(),
            body_bytes: 0,
            elapsed: Duration::ZERO,
            connects: 0,
            retries: 0,
            per_second: Vec::new(),
        }
    }
}

impl RunResult {
    /// Adds `other`'s counts and latencies to this result; `elapsed` is left as it is. Fails
    /// only if the histograms' bounds differ (every one comes from [`new_latency_histogram`]).
    pub fn add(&mut self, other: &RunResult) -> Result<(), String> {
        self.requests_ok += other.requests_ok;
        for (total, n) in self.errors.0.iter_mut().zip(other.errors.0) {
            *total += n;
        }
        self.body_bytes += other.body_bytes;
        self.connects += other.connects;
        self.retries += other.retries;
        for (i, h) in other.per_second.iter().enumerate() {
            if self.per_second.len() <= i {
                self.per_second.resize_with(i + 1, new_latency_histogram);
            }
            self.per_second[i]
                .add(h)
                .map_err(|e| format!("merging histograms: {e:?}"))?;
        }
        self.histogram
            .add(&other.histogram)
            .map_err(|e| format!("merging histograms: {e:?}"))
    }

    /// Successful requests per second.
    pub fn requests_per_sec(&self) -> f64 {
        per_sec(self.requests_ok as f64, self.elapsed)
    }

    /// Body megabytes (10^6 bytes) per second.
    pub fn mb_per_sec(&self) -> f64 {
        per_sec(self.body_bytes as f64 / 1e6, self.elapsed)
    }
}

fn per_sec(x: f64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        x / s
    } else {
        0.0
    }
}

struct Shared {
    set: RequestSet,
    cfg: RunConfig,
    measure_start: Instant,
    stop_flag: AtomicBool,
    // Tickets for Stop::Requests: each measured attempt takes one.
    tickets_taken: AtomicU64,
    progress_done: AtomicU64,
    /// Next entry of a set sent once ([`RequestSet::once`]), shared by every connection.
    next_entry: AtomicUsize,
}

/// What one connection thread measured (its `elapsed` unused) and when its last measured
/// request completed: the run's elapsed time runs to the latest of them.
struct ThreadResult {
    measured: RunResult,
    last_done: Option<Instant>,
}

/// Runs the load described by `cfg` against `set` and returns what was measured.
pub fn run(set: RequestSet, cfg: RunConfig) -> Result<RunResult, String> {
    if set.requests.is_empty() {
        return Err("the request set is empty".into());
    }
    if cfg.connections == 0 {
        return Err("connections must be at least 1".into());
    }
    if let Some(r) = cfg.rate_per_sec {
        if !(r > 0.0 && r.is_finite()) {
            return Err(format!(
                "rate {r} must be a positive number of requests per second"
            ));
        }
    }
    let start = Instant::now();
    let shared = Arc::new(Shared {
        measure_start: start + cfg.warmup,
        set,
        cfg,
        stop_flag: AtomicBool::new(false),
        tickets_taken: AtomicU64::new(0),
        progress_done: AtomicU64::new(0),
        next_entry: AtomicUsize::new(0),
    });
    let mut handles = Vec::with_capacity(shared.cfg.connections);
    for index in 0..shared.cfg.connections {
        let shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("conn-{index}"))
            .spawn(move || connection_loop(&shared, index, start))
            .map_err(|e| format!("spawning connection thread {index}: {e}"))?;
        handles.push(handle);
    }
    supervise(&shared, start);
    let mut total = RunResult::default();
    let mut last_done = None;
    for h in handles {
        let r = h
            .join()
            .map_err(|_| "a connection thread panicked".to_string())?;
        total.add(&r.measured)?;
        last_done = last_done.max(r.last_done);
    }
    total.elapsed = last_done
        .map(|t| t.saturating_duration_since(shared.measure_start))
        .unwrap_or_default();
    Ok(total)
}

/// Sleeps until the end of a timed run (raising the stop flag) or until the threads finish a
/// counted one, printing progress on a terminal.
fn supervise(shared: &Shared, start: Instant) {
    let show = shared.cfg.progress && std::io::stderr().is_terminal();
    let total = match shared.cfg.stop {
        Stop::Duration(d) => Some(shared.cfg.warmup + d),
        Stop::Requests(_) => None,
    };
    // Progress only for runs long enough that silence would be confusing.
    let show = show && total.is_none_or(|t| t > Duration::from_secs(3));
    let mut last_print = start;
    let mut last_done = 0u64;
    loop {
        let now = Instant::now();
        if let Some(t) = total {
            if now >= start + t {
                shared.stop_flag.store(true, Ordering::Relaxed);
                break;
            }
        }
        if shared.stop_flag.load(Ordering::Relaxed) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        if show && now.duration_since(last_print) >= Duration::from_secs(1) {
            let done = shared.progress_done.load(Ordering::Relaxed);
            let rate = (done - last_done) as f64 / now.duration_since(last_print).as_secs_f64();
            let phase = if now < shared.measure_start {
                "warm-up"
            } else {
                "measuring"
            };
            let of = total.map_or(String::new(), |t| format!("/{:.0}s", t.as_secs_f64()));
            eprint!(
                "\r{phase} {:>5.0}s{of}  {done} requests  {rate:.0} req/s      ",
                now.duration_since(start).as_secs_f64()
            );
            last_print = now;
            last_done = done;
        }
    }
    if show {
        eprintln!();
    }
}

/// Small per-connection PRNG for weighted picks (xorshift64*): no shared state between threads.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Status errors reported on stderr per connection; the rest are only counted.
const STATUS_REPORTS_MAX: u64 = 5;

/// Opens a connection into `conn` and runs `req` on it.
fn connect_and_exchange(
    authority: &str,
    cfg: &RunConfig,
    conn: &mut Option<Connection>,
    out: &mut RunResult,
    req: &crate::request::Request,
) -> Result<crate::client::Exchange, ErrorKind> {
    match Connection::connect(authority, cfg.timeout, cfg.receive) {
        Ok(c) => {
            out.connects += 1;
            conn.insert(c).exchange(req)
        }
        Err(_) => Err(ErrorKind::Connect),
    }
}

fn connection_loop(shared: &Shared, index: usize, start: Instant) -> ThreadResult {
    let cfg = &shared.cfg;
    if !cfg.cpus.is_empty() {
        let cpu = cfg.cpus[index % cfg.cpus.len()];
        if let Err(e) = sys::pin_current_thread(cpu) {
            eprintln!(
                "sluice-bench: pinning connection {index} to cpu {cpu}: {e} (running unpinned)"
            );
        }
    }
    let mut out = RunResult::default();
    let mut last_done = None;
    let set = &shared.set;
    let weight_total: u64 = set.requests.iter().map(|r| u64::from(r.weight)).sum();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((index as u64 + 1) << 32));
    let mut next_index = index % set.requests.len();
    // Open loop: each connection sends every `interval`, phases spread across connections so
    // the aggregate is an even rate rather than bursts of N.
    let interval = cfg
        .rate_per_sec
        .map(|r| Duration::from_secs_f64(cfg.connections as f64 / r));
    let mut intended = interval.map(|i| start + i.mul_f64(index as f64 / cfg.connections as f64));
    let mut conn: Option<Connection> = None;

    loop {
        if shared.stop_flag.load(Ordering::Relaxed) {
            break;
        }
        // Pace the open loop; the latency clock starts at the intended time even when we are
        // late (a late send is the server's fault, which is exactly what CO correction keeps).
        let send_at = match (intended, interval) {
            (Some(t), Some(i)) => {
                // Sleep in slices of at most 50 ms so a stop is seen promptly even at low
                // rates (one interval can be seconds), never sending past the end.
                loop {
                    let now = Instant::now();
                    if t <= now || shared.stop_flag.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep((t - now).min(Duration::from_millis(50)));
                }
                if shared.stop_flag.load(Ordering::Relaxed) {
                    break;
                }
                intended = Some(t + i);
                t
            }
            _ => Instant::now(),
        };
        let measured = send_at >= shared.measure_start;
        if let (true, Stop::Requests(n)) = (measured, cfg.stop) {
            if shared.tickets_taken.fetch_add(1, Ordering::Relaxed) >= n {
                shared.stop_flag.store(true, Ordering::Relaxed);
                break;
            }
        }
        let pick = if set.once {
            // Dealt from one counter: each entry goes once over all connections, and the run
            // ends when the last has been sent (the others finish what they are sending).
            let i = shared.next_entry.fetch_add(1, Ordering::Relaxed);
            if i >= set.requests.len() {
                shared.stop_flag.store(true, Ordering::Relaxed);
                break;
            }
            i
        } else if set.weighted {
            let mut x = rng.next() % weight_total.max(1);
            let mut chosen = 0;
            for (i, r) in set.requests.iter().enumerate() {
                if x < u64::from(r.weight) {
                    chosen = i;
                    break;
                }
                x -= u64::from(r.weight);
            }
            chosen
        } else {
            let i = next_index;
            next_index = (next_index + 1) % set.requests.len();
            i
        };
        let req = &set.requests[pick];

        if conn.as_ref().is_some_and(Connection::peer_closed) {
            conn = None;
        }
        let reused = conn.is_some();
        let mut outcome = match conn.as_mut() {
            Some(c) => c.exchange(req),
            None => connect_and_exchange(&set.authority, cfg, &mut conn, &mut out, req),
        };
        // The keep-alive race: the server closed the connection while this request was on
        // its way. curl ("Connection died, retrying a fresh connect") and browsers send it
        // once more on a new connection; so does the bench, counting it in `retries`.
        if reused
            && matches!(outcome, Err(ErrorKind::Read))
            && conn.as_ref().is_some_and(Connection::received_nothing)
        {
            conn = None;
            out.retries += 1;
            outcome = connect_and_exchange(&set.authority, cfg, &mut conn, &mut out, req);
        }
        let done = Instant::now();
        match outcome {
            Ok(x) => {
                if !x.keep_alive {
                    conn = None;
                }
                if measured {
                    out.requests_ok += 1;
                    out.body_bytes += x.body_bytes;
                    let latency = done.saturating_duration_since(send_at);
                    record_latency_us(&mut out.histogram, latency.as_micros() as u64);
                    let second = send_at
                        .saturating_duration_since(shared.measure_start)
                        .as_secs() as usize;
                    if second < PER_SECOND_MAX {
                        if out.per_second.len() <= second {
                            out.per_second
                                .resize_with(second + 1, new_latency_histogram);
                        }
                        record_latency_us(&mut out.per_second[second], latency.as_micros() as u64);
                    }
                }
            }
            Err(kind) => {
                // After a status or digest error the response was fully read and framing holds;
                // anything else leaves the stream in doubt.
                if !matches!(kind, ErrorKind::Status | ErrorKind::Digest) {
                    conn = None;
                }
                if measured {
                    out.errors.0[kind.index()] += 1;
                    // Which status, for the first few: the counts alone do not say.
                    if kind == ErrorKind::Status && out.errors.0[kind.index()] <= STATUS_REPORTS_MAX
                    {
                        let status = conn.as_ref().map_or(0, |c| c.last_status);
                        eprintln!(
                            "sluice-bench: {:?} {} answered {status}",
                            req.method, req.path
                        );
                    }
                }
                if kind == ErrorKind::Connect {
                    // Do not spin on a dead server; a refused connect returns at once.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        if measured {
            last_done = Some(done);
        }
        shared.progress_done.fetch_add(1, Ordering::Relaxed);
    }
    ThreadResult {
        measured: out,
        last_done,
    }
}
