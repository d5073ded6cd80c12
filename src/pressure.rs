//! Public pressure: what replication yields to.
//!
//! Signals recorded by every front end on its own thread with relaxed
//! atomics (no lock, no allocation on the request path):
//!
//! - **in flight**: public requests from the moment the front has their
//!   first bytes to the drop of their response (the last body byte handed
//!   to the kernel, or the connection closing), so a long download counts
//!   the whole time;
//! - **latency from arrival** of sampled public reads (GET and HEAD): from
//!   the kernel's receive timestamp of the request's first bytes
//!   (`SO_TIMESTAMPING`, see `sluice_uring::stamp`) to the moment the first
//!   byte of the response was handed to the kernel. It sees what the
//!   parse-to-reply time cannot: requests queued in the socket, behind a
//!   busy engine thread, or for a CPU. Sampled by [`LatencySampler`] so its
//!   cost per second is bounded. A healthy 64 MiB download is one fast
//!   sample: the clock stops at the response head, not at the body's end;
//! - **time to first byte** of public reads, from the parsed head to the
//!   response head being ready (every read; the limiter's signal before it
//!   could see arrival times, kept with its meaning for the metric).
//!   Uploads are sampled by neither: their "first byte" comes after the
//!   whole request body.
//!
//! Beside them, [`PsiReader`] reads the kernel's own pressure stall
//! information for CPU and I/O (`/proc/pressure/`, or the cgroup's files).
//!
//! The replication limiter (`delivery::limiter`) takes the windows (and
//! resets them) at each control step. Only the artifact routes are public
//! pressure ([`is_public_route`]).

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

/// 2^((sub + 1) / 4) for the four sub-buckets of an octave, in millionths.
const SUB_BUCKET_MILLIONTHS: [u64; SUB_BUCKETS] = [1_189_207, 1_414_214, 1_681_793, 2_000_000];

/// Every bucket's upper bound, µs, computed once at compile time: recording a
/// sample is a binary search in this table (it used to take a `powf` per
/// bucket tried, about 1,400 instructions a sample in the callgrind profile
/// of docs/benchmarks.md).
const BUCKET_BOUNDS_US: [u64; TTFB_WINDOW_BUCKETS] = {
    let mut bounds = [0u64; TTFB_WINDOW_BUCKETS];
    let mut i = 0;
    while i < TTFB_WINDOW_BUCKETS {
        let base = FIRST_BOUND_US << (i / SUB_BUCKETS);
        bounds[i] = base * SUB_BUCKET_MILLIONTHS[i % SUB_BUCKETS] / 1_000_000;
        i += 1;
    }
    bounds
};

/// Upper bound of bucket `i`, µs.
pub fn bucket_bound_us(i: usize) -> u64 {
    BUCKET_BOUNDS_US[i.min(TTFB_WINDOW_BUCKETS - 1)]
}

fn bucket_of(us: u64) -> usize {
    BUCKET_BOUNDS_US
        .partition_point(|&bound| bound < us)
        .min(TTFB_WINDOW_BUCKETS - 1)
}

/// A window of duration samples: a fixed histogram of atomics, bumped by
/// any thread (relaxed, no lock, no allocation) and taken whole by the
/// limiter at each step.
pub struct SampleWindow {
    buckets: [AtomicU64; TTFB_WINDOW_BUCKETS],
    total: AtomicU64,
}

impl Default for SampleWindow {
    fn default() -> Self {
        SampleWindow {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            total: AtomicU64::new(0),
        }
    }
}

impl SampleWindow {
    /// One sample.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// Samples ever recorded.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The samples since the last call, and a fresh window. A sample racing
    /// with the swap lands in one window or the next, never in neither.
    pub fn take(&self) -> TtfbWindow {
        let mut counts = [0u64; TTFB_WINDOW_BUCKETS];
        for (c, slot) in counts.iter_mut().zip(&self.buckets) {
            *c = slot.swap(0, Ordering::Relaxed);
        }
        window_of(&counts)
    }
}

/// The public pressure signals of one node.
#[derive(Default)]
pub struct PublicPressure {
    in_flight: AtomicU64,
    /// TTFB samples (parsed head to response head ready) since the last take.
    ttfb: SampleWindow,
    /// Public latency samples (the kernel's receive time of the request's
    /// first bytes to the response's first byte handed to the kernel) since
    /// the last take. Sampled: see [`LatencySampler`].
    latency: SampleWindow,
}

/// One window of TTFB samples, taken by the limiter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TtfbWindow {
    pub samples: u64,
    /// 99th percentile (the bound of its bucket); `None` without samples.
    pub p99: Option<Duration>,
}

impl TtfbWindow {
    /// The p99 in seconds, 0 without samples (for gauges).
    pub fn p99_secs(&self) -> f64 {
        self.p99.map_or(0.0, |d| d.as_secs_f64())
    }
}

/// Both latency windows of one limiter step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Windows {
    /// Head parsed to response head ready, every public read.
    pub ttfb: TtfbWindow,
    /// Kernel receive time to response head handed to the kernel, sampled.
    pub latency: TtfbWindow,
}

impl PublicPressure {
    /// A public request has begun: it counts as in flight until the
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
        self.ttfb.record(ttfb);
    }

    /// A sampled public read's first response byte went to the kernel
    /// `latency` after the kernel received the request's first bytes.
    pub fn answered_after_arrival(&self, latency: Duration) {
        self.latency.record(latency);
    }

    /// TTFB samples ever taken.
    pub fn ttfb_samples_total(&self) -> u64 {
        self.ttfb.total()
    }

    /// Latency-from-arrival samples ever taken.
    pub fn latency_samples_total(&self) -> u64 {
        self.latency.total()
    }

    /// The TTFB samples since the last take, and a fresh window.
    pub fn take_window(&self) -> TtfbWindow {
        self.ttfb.take()
    }

    /// Both windows since the last take, and fresh ones.
    pub fn take_windows(&self) -> Windows {
        Windows {
            ttfb: self.ttfb.take(),
            latency: self.latency.take(),
        }
    }
}

/// Decides which requests an engine thread measures from the kernel's
/// receive time: at most one receive per `gap` is asked for its stamp (a
/// `recvmsg` with a control buffer instead of a plain `recv`), so the cost
/// per second is bounded whatever the request rate, and at low rates every
/// request is measured. The choice is made before the bytes arrive, so it
/// cannot favour fast or slow requests. One per engine thread; `gap` zero
/// turns sampling off.
#[derive(Clone, Copy, Debug)]
pub struct LatencySampler {
    gap: Duration,
    next: Option<std::time::Instant>,
}

impl LatencySampler {
    /// A sampler taking at most one request per `gap` (zero: none).
    pub fn new(gap: Duration) -> LatencySampler {
        LatencySampler { gap, next: None }
    }

    /// Whether the receive about to be issued at `now` for the start of a
    /// request should carry the kernel's stamp.
    pub fn take(&mut self, now: std::time::Instant) -> bool {
        if self.gap.is_zero() {
            return false;
        }
        if self.next.is_some_and(|next| now < next) {
            return false;
        }
        self.next = Some(now + self.gap);
        true
    }

    /// The receive [`take`](Self::take) chose found no bytes yet (a
    /// nonblocking read met `EAGAIN`): the sample is still due, for the
    /// next receive. Without this a front whose first read of a request
    /// often finds nothing (epoll on a loaded machine) sampled nothing.
    pub fn give_back(&mut self) {
        self.next = None;
    }
}

/// [`LatencySampler::take`] for a front whose connections are tasks on a few
/// threads (the fallback's runtime workers): one sampler per thread, shared by
/// the thread's connections, so the fallback stamps at most one request per
/// `gap` on each of its threads as an engine thread does.
pub fn sample_on_this_thread(gap: Duration, now: std::time::Instant) -> bool {
    thread_local! {
        static NEXT: std::cell::Cell<Option<std::time::Instant>> =
            const { std::cell::Cell::new(None) };
    }
    NEXT.with(|next| {
        let mut sampler = LatencySampler {
            gap,
            next: next.get(),
        };
        let taken = sampler.take(now);
        next.set(sampler.next);
        taken
    })
}

/// The cumulative stall counters of one PSI resource (`/proc/pressure/cpu`
/// or a cgroup's `cpu.pressure`): microseconds during which at least one
/// task (`some`) or every task (`full`) waited for the resource.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PsiTotals {
    pub some_us: u64,
    pub full_us: u64,
}

/// Parses a PSI file: lines `some avg10=.. avg60=.. avg300=.. total=N` and
/// `full ...` (the `full` line is absent for CPU on kernels before 5.13).
pub fn parse_psi(text: &str) -> Option<PsiTotals> {
    let mut totals = PsiTotals::default();
    let mut some = false;
    for line in text.lines() {
        let mut words = line.split_ascii_whitespace();
        let kind = words.next()?;
        let total = words
            .find_map(|w| w.strip_prefix("total="))
            .and_then(|t| t.parse::<u64>().ok())?;
        match kind {
            "some" => {
                totals.some_us = total;
                some = true;
            }
            "full" => totals.full_us = total,
            _ => {}
        }
    }
    some.then_some(totals)
}

/// The share of `elapsed` some task stalled on the resource, from two
/// readings of its totals: 0 to 1.
pub fn stall_share(before: PsiTotals, after: PsiTotals, elapsed: Duration) -> f64 {
    let us = elapsed.as_micros() as f64;
    if us <= 0.0 {
        return 0.0;
    }
    (after.some_us.saturating_sub(before.some_us) as f64 / us).clamp(0.0, 1.0)
}

/// Where the server's pressure stall information is: the cgroup's own
/// `cpu.pressure` and `io.pressure` when the process runs in a cgroup v2
/// (not the root) that has them, else the host's `/proc/pressure/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PsiPaths {
    pub cpu: std::path::PathBuf,
    pub io: std::path::PathBuf,
    /// `"cgroup <path>"` or `"host"`, for `/status`.
    pub scope: String,
}

impl PsiPaths {
    /// The files to read, from `/proc/self/cgroup`'s contents and the
    /// cgroup v2 mount points to try (`/sys/fs/cgroup`, and the hybrid
    /// layout's `/sys/fs/cgroup/unified`). Sans-IO but for `exists`.
    pub fn choose(
        proc_self_cgroup: &str,
        mounts: &[&str],
        exists: impl Fn(&std::path::Path) -> bool,
    ) -> PsiPaths {
        let v2 = proc_self_cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::trim)
            .filter(|p| p.starts_with('/') && *p != "/" && !p.contains(".."));
        if let Some(rel) = v2 {
            for mount in mounts {
                let dir = std::path::Path::new(mount).join(rel.trim_start_matches('/'));
                let (cpu, io) = (dir.join("cpu.pressure"), dir.join("io.pressure"));
                if exists(&cpu) && exists(&io) {
                    return PsiPaths {
                        cpu,
                        io,
                        scope: format!("cgroup {rel}"),
                    };
                }
            }
        }
        PsiPaths {
            cpu: "/proc/pressure/cpu".into(),
            io: "/proc/pressure/io".into(),
            scope: "host".into(),
        }
    }

    /// This process's files.
    pub fn for_this_process() -> PsiPaths {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        PsiPaths::choose(
            &cgroup,
            &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"],
            |p| p.exists(),
        )
    }
}

/// CPU and I/O stall shares since the last reading.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PsiReading {
    /// Share of the interval some task waited for a CPU, 0 to 1.
    pub cpu_some: f64,
    /// Share of the interval some task waited for I/O, 0 to 1.
    pub io_some: f64,
}

/// Reads the PSI files at each limiter step and turns the counters into the
/// shares of the time since the previous read. The first read (and any after
/// a failure) has no interval yet and gives `None`; a host without PSI
/// (`psi=0`, a kernel before 4.20) always gives `None`, and the limiter then
/// works from the latency and in-flight signals alone.
pub struct PsiReader {
    paths: PsiPaths,
    last: Option<(std::time::Instant, PsiTotals, PsiTotals)>,
    /// Reads that failed (file missing or unparsable), for `/status`.
    pub failures: u64,
}

impl PsiReader {
    pub fn new(paths: PsiPaths) -> PsiReader {
        PsiReader {
            paths,
            last: None,
            failures: 0,
        }
    }

    /// Where it reads.
    pub fn paths(&self) -> &PsiPaths {
        &self.paths
    }

    /// The shares since the previous call.
    pub fn read(&mut self, now: std::time::Instant) -> Option<PsiReading> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .ok()
                .as_deref()
                .and_then(parse_psi)
        };
        let (Some(cpu), Some(io)) = (read(&self.paths.cpu), read(&self.paths.io)) else {
            self.failures += 1;
            self.last = None;
            return None;
        };
        let previous = self.last.replace((now, cpu, io));
        let (at, cpu0, io0) = previous?;
        let elapsed = now.saturating_duration_since(at);
        Some(PsiReading {
            cpu_some: stall_share(cpu0, cpu, elapsed),
            io_some: stall_share(io0, io, elapsed),
        })
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
            // 2^(1/4) apart, as the window's p99 promises (within 19%).
            let ratio = bucket_bound_us(i) as f64 / bucket_bound_us(i - 1) as f64;
            assert!((ratio - 2f64.powf(0.25)).abs() < 0.01, "{i}: {ratio}");
        }
        // The binary search agrees with a scan of the bounds.
        for us in [
            0,
            1,
            63,
            64,
            76,
            77,
            1_000,
            49_999,
            50_000,
            1 << 30,
            u64::MAX,
        ] {
            let scan = (0..TTFB_WINDOW_BUCKETS)
                .find(|&i| us <= bucket_bound_us(i))
                .unwrap_or(TTFB_WINDOW_BUCKETS - 1);
            assert_eq!(bucket_of(us), scan, "{us}");
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
    fn the_latency_window_is_apart_from_the_ttfb_window() {
        let p = Arc::new(PublicPressure::default());
        p.head_ready(Duration::from_micros(100));
        p.answered_after_arrival(Duration::from_millis(300));
        let w = p.take_windows();
        assert_eq!((w.ttfb.samples, w.latency.samples), (1, 1));
        assert!(w.latency.p99.expect("sample") >= Duration::from_millis(300));
        assert!(w.ttfb.p99.expect("sample") < Duration::from_millis(1));
        assert_eq!(p.take_windows(), Windows::default());
        assert_eq!((p.ttfb_samples_total(), p.latency_samples_total()), (1, 1));
    }

    #[test]
    fn the_sampler_takes_one_receive_per_gap() {
        let t0 = std::time::Instant::now();
        let mut s = LatencySampler::new(Duration::from_micros(250));
        let taken = (0..1000u64)
            .filter(|i| s.take(t0 + Duration::from_micros(i * 10)))
            .count();
        // 10 ms of receives every 10 µs: one per 250 µs.
        assert_eq!(taken, 40);
        // Slower than the gap: every one.
        let mut s = LatencySampler::new(Duration::from_micros(250));
        assert!((0..100u64).all(|i| s.take(t0 + Duration::from_millis(i))));
        // Off.
        let mut s = LatencySampler::new(Duration::ZERO);
        assert!(!s.take(t0));
    }

    #[test]
    fn a_sample_given_back_is_taken_by_the_next_receive() {
        let t0 = std::time::Instant::now();
        let mut s = LatencySampler::new(Duration::from_secs(1));
        assert!(s.take(t0));
        // That receive found nothing: the next one, soon after, carries the sample.
        s.give_back();
        assert!(s.take(t0 + Duration::from_millis(1)));
        // And the gap counts from it.
        assert!(!s.take(t0 + Duration::from_millis(500)));
        assert!(s.take(t0 + Duration::from_millis(1001)));
    }

    #[test]
    fn a_thread_shares_one_sampler_and_other_threads_have_their_own() {
        let t0 = std::time::Instant::now();
        let gap = Duration::from_micros(250);
        // Two connections' receives interleaved on one thread: one per gap in all.
        let taken = (0..1000u64)
            .filter(|i| sample_on_this_thread(gap, t0 + Duration::from_micros(i * 10)))
            .count();
        assert_eq!(taken, 40);
        // Another thread starts afresh at the same instant.
        let at = t0 + Duration::from_micros(9_995);
        assert!(std::thread::spawn(move || sample_on_this_thread(gap, at))
            .join()
            .unwrap());
        assert!(!sample_on_this_thread(
            Duration::ZERO,
            t0 + Duration::from_secs(1)
        ));
    }

    #[test]
    fn psi_files_parse() {
        let rows: &[(&str, Option<PsiTotals>)] = &[
            (
                "some avg10=55.17 avg60=46.67 avg300=27.83 total=1450339927\n\
                 full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n",
                Some(PsiTotals {
                    some_us: 1_450_339_927,
                    full_us: 7,
                }),
            ),
            // CPU before 5.13: no full line.
            (
                "some avg10=0.00 avg60=0.00 avg300=0.00 total=42\n",
                Some(PsiTotals {
                    some_us: 42,
                    full_us: 0,
                }),
            ),
            ("", None),
            ("full avg10=0.00 total=3\n", None),
            ("some avg10=0.00 avg60=0.00\n", None),
            ("some total=x\n", None),
        ];
        for (text, want) in rows {
            assert_eq!(parse_psi(text), *want, "{text:?}");
        }
        let a = PsiTotals {
            some_us: 1_000,
            full_us: 0,
        };
        let b = PsiTotals {
            some_us: 51_000,
            full_us: 0,
        };
        let share = stall_share(a, b, Duration::from_millis(100));
        assert!((share - 0.5).abs() < 1e-9, "{share}");
        assert_eq!(stall_share(b, a, Duration::from_millis(100)), 0.0);
        assert_eq!(stall_share(a, b, Duration::ZERO), 0.0);
        assert_eq!(stall_share(a, b, Duration::from_millis(10)), 1.0);
    }

    #[test]
    fn psi_paths_prefer_the_cgroup_when_it_has_the_files() {
        let mounts = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
        let only = |ok: &'static str| move |p: &std::path::Path| p.starts_with(ok);
        let p = PsiPaths::choose(
            "0::/system.slice/sluice.service\n",
            &mounts,
            only("/sys/fs/cgroup/system.slice"),
        );
        assert_eq!(
            p.cpu,
            std::path::Path::new("/sys/fs/cgroup/system.slice/sluice.service/cpu.pressure")
        );
        assert_eq!(p.scope, "cgroup /system.slice/sluice.service");
        // Hybrid layout (v1 controllers, v2 at unified/).
        let p = PsiPaths::choose(
            "4:memory:/x\n0::/x\n",
            &mounts,
            only("/sys/fs/cgroup/unified/x"),
        );
        assert_eq!(
            p.io,
            std::path::Path::new("/sys/fs/cgroup/unified/x/io.pressure")
        );
        // The root cgroup, no v2 line, or a cgroup without the files: the host's.
        for (cgroup, exists) in [("0::/\n", true), ("1:cpu:/\n", true), ("0::/x\n", false)] {
            let p = PsiPaths::choose(cgroup, &mounts, |_| exists);
            assert_eq!(
                p.cpu,
                std::path::Path::new("/proc/pressure/cpu"),
                "{cgroup}"
            );
            assert_eq!(p.scope, "host");
        }
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
