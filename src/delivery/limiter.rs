//! The replication limiter: a token bucket on background body bytes (peer
//! sends and repairs, the tier's write-behind uploads) whose rate yields to
//! public pressure. Sans-IO: [`TokenBucket`] and [`Pressure`] take the clock
//! and the signals as arguments and decide; [`Limiter`] is the node's one
//! shared instance (a lock around both, taken by the replication thread,
//! the tier's uploads and the peer API, never by the public request path,
//! which only bumps the atomics of [`crate::pressure::PublicPressure`]).
//!
//! The rule (docs/replication.md states it for operators), every
//! [`CONTROL_STEP`] (100 ms), from the windows of public samples since the
//! last step, the public requests in flight now and the kernel's CPU and
//! I/O pressure over the step:
//!
//! - **latency** is the larger of two window p99s: the time from the
//!   kernel's receive timestamp of a request's first bytes to its response's
//!   first byte handed to the kernel (sampled; what a client sees, queueing
//!   in front of the parser included) and the parse-to-reply TTFB (every
//!   read; the only one when receive stamps are off). Over the target → the
//!   rate halves ([`DECREASE`]) and may not rise for [`HOLD`] (1 s). A
//!   window of fewer than [`SAMPLES_FOR_P99`] samples has its maximum as its
//!   p99, so one lone slow request would decide it: such a window cuts only
//!   when the one before it was over the target too, or when it is over
//!   [`LONE_SPIKE_FACTOR`] × the target;
//! - between [`RECOVER_BELOW`] (80%) and 100% of the target: the dead band,
//!   nothing moves; with CPU or I/O pressure at [`PSI_HIGH`] or more while
//!   public requests are served there, the queue is building: × [`EASE`]
//!   and the hold;
//! - under 80%: the rate rises by limit/16 per step ([`INCREASE_STEPS`]),
//!   unless latency is above [`PSI_QUIET_BELOW`] (50%) of the target while
//!   the kernel reports pressure at [`PSI_HIGH`] or more (then it holds).
//!   Pressure alone never cuts: replication's own threads, which run in a
//!   lower scheduling class and wait for the CPU by design, are part of it;
//! - **in flight**: the rate never exceeds limit / (1 + in_flight / 8)
//!   ([`IN_FLIGHT_HALVING`]), applied at once; a long healthy download
//!   counts as in flight (a gentle cap), never as latency (its sample is
//!   its response head);
//! - **no public traffic** in a step (no sample, nothing in flight): the
//!   hold is over and the rate rises by limit/8 per step, so replication is
//!   back at its limit within a second of the public load stopping;
//! - never below limit / 64 ([`FLOOR_DIVISOR`]), so the outbox always
//!   drains a little and anti-entropy is never starved.
//!
//! Fast down, slow up, a dead band, a hold time and a confirmation for
//! windows too small to have a p99: the rate does not oscillate with a
//! signal that is noisy or sits near the target (see the tests).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::pressure::{PsiPaths, PsiReader, PsiReading, PublicPressure, Windows};

/// How often the rate is recomputed.
pub const CONTROL_STEP: Duration = Duration::from_millis(100);
/// Factor applied to the rate when the window p99 is over the target.
pub const DECREASE: f64 = 0.5;
/// After a decrease, no increase for this long.
pub const HOLD: Duration = Duration::from_secs(1);
/// Steps from the floor back to the full limit (+limit/16 per step).
pub const INCREASE_STEPS: f64 = 16.0;
/// The rate rises only while the window p99 is under this share of the target.
pub const RECOVER_BELOW: f64 = 0.8;
/// Steps from the floor back to the full limit when no public request was
/// seen in the step (+limit/8 per step: under a second).
pub const IDLE_INCREASE_STEPS: f64 = 8.0;
/// A window with fewer samples has its largest as its p99; see the module docs.
pub const SAMPLES_FOR_P99: u64 = 100;
/// A small window over this many times the target cuts without confirmation.
pub const LONE_SPIKE_FACTOR: f64 = 2.0;
/// CPU or I/O stall share (PSI `some`, over one step) that counts as pressure.
pub const PSI_HIGH: f64 = 0.5;
/// Under this share of the target, latency is low enough that pressure does
/// not hold the rate (the stall is someone else's, or replication's own).
pub const PSI_QUIET_BELOW: f64 = 0.5;
/// Factor applied in the dead band when pressure says the queue is building.
pub const EASE: f64 = 0.75;
/// Public requests in flight that halve the rate.
pub const IN_FLIGHT_HALVING: f64 = 8.0;
/// The rate never falls below limit / this.
pub const FLOOR_DIVISOR: f64 = 64.0;
/// A bucket in debt (big bodies, reads served to peers) owes at most this
/// many seconds of the limit.
pub const DEBT_SECS_MAX: f64 = 10.0;

/// A token bucket in bytes. `rate` is passed in at each call, since it
/// follows public pressure; tokens accrue at the rate in force at the time
/// of the call (the controller changes it every 100 ms, so the error is one
/// step's worth).
#[derive(Clone, Debug)]
pub struct TokenBucket {
    tokens: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` bytes.
    pub fn new(burst: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst as f64,
            burst: burst as f64,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * rate).min(self.burst);
    }

    /// Take `n` bytes now, or say when to ask again. A request larger than
    /// the burst goes once the bucket is full and leaves it in debt, so a
    /// large artifact is paced like many small ones and never starves.
    pub fn acquire(&mut self, now: Instant, rate: f64, n: u64) -> Result<(), Instant> {
        self.refill(now, rate);
        let need = (n as f64).min(self.burst);
        if self.tokens >= need {
            self.tokens -= n as f64;
            return Ok(());
        }
        let secs = (need - self.tokens) / rate.max(1.0);
        Err(now + Duration::from_secs_f64(secs.min(3600.0)).max(Duration::from_millis(1)))
    }

    /// Bytes that went without asking (a read served to a peer, whose
    /// client is waiting): they leave the bucket in debt, so background
    /// replication pays for them. Debt is bounded by [`DEBT_SECS_MAX`].
    pub fn charge(&mut self, now: Instant, rate: f64, n: u64) {
        self.refill(now, rate);
        self.tokens = (self.tokens - n as f64).max(-DEBT_SECS_MAX * rate.max(1.0));
    }

    pub fn tokens(&self) -> f64 {
        self.tokens
    }
}

/// What the controller was doing, for the time-in-state metric
/// (`sluice_replication_limiter_seconds_total{state}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// At the configured limit.
    Full,
    /// Climbing back towards the limit.
    Rising,
    /// Not rising: latency in the dead band, or pressure with public traffic.
    Holding,
    /// Lowered by latency (or pressure near the target), in the hold after it.
    BackingOff,
    /// Held down by public requests in flight.
    Capped,
    /// At the floor (limit / 64).
    Floor,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Full,
        State::Rising,
        State::Holding,
        State::BackingOff,
        State::Capped,
        State::Floor,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            State::Full => "full",
            State::Rising => "rising",
            State::Holding => "holding",
            State::BackingOff => "backing_off",
            State::Capped => "capped",
            State::Floor => "floor",
        }
    }

    fn index(self) -> usize {
        State::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// The inputs of one control step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Signals {
    /// The public latency windows since the last step.
    pub windows: Windows,
    /// Public requests in flight now.
    pub in_flight: u64,
    /// CPU and I/O stall shares over the step (`None`: PSI unreadable).
    pub psi: Option<PsiReading>,
}

impl Signals {
    /// The latency the rule acts on: the larger window p99, with the size of
    /// the window it comes from.
    fn latency(&self) -> Option<(Duration, u64)> {
        let w = self.windows;
        [w.latency, w.ttfb]
            .into_iter()
            .filter_map(|w| w.p99.map(|p| (p, w.samples)))
            .max_by_key(|(p, _)| *p)
    }

    /// Public traffic was there in the step.
    fn public(&self) -> bool {
        self.in_flight > 0 || self.windows.latency.samples > 0 || self.windows.ttfb.samples > 0
    }

    /// The larger stall share, 0 without PSI.
    fn stall(&self) -> f64 {
        self.psi.map_or(0.0, |p| p.cpu_some.max(p.io_some))
    }
}

/// The pressure controller: the effective rate from the signals.
#[derive(Clone, Debug)]
pub struct Pressure {
    limit: f64,
    target: Duration,
    rate: f64,
    next_step: Instant,
    last_step: Instant,
    hold_until: Instant,
    /// The last window was over the target (confirms a small window).
    over_last: bool,
    state: State,
    /// Seconds spent in each state ([`State::ALL`] order).
    state_secs: [f64; 6],
    /// The last step's signals (for the metrics).
    pub last: Signals,
}

impl Pressure {
    pub fn new(limit: u64, target: Duration, now: Instant) -> Pressure {
        Pressure {
            limit: limit as f64,
            target,
            rate: limit as f64,
            next_step: now + CONTROL_STEP,
            last_step: now,
            hold_until: now,
            over_last: false,
            state: State::Full,
            state_secs: [0.0; 6],
            last: Signals::default(),
        }
    }

    /// The effective rate, bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The state decided at the last step.
    pub fn state(&self) -> State {
        self.state
    }

    /// Seconds spent in each state up to the last step.
    pub fn state_secs(&self) -> impl Iterator<Item = (State, f64)> + '_ {
        State::ALL.iter().map(|s| (*s, self.state_secs[s.index()]))
    }

    /// Whether a control step is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_step
    }

    /// One control step with the signals since the last one.
    pub fn step(&mut self, now: Instant, signals: Signals) {
        let elapsed = now.saturating_duration_since(self.last_step).as_secs_f64();
        self.state_secs[self.state.index()] += elapsed;
        self.last_step = self.last_step.max(now);
        self.next_step = now + CONTROL_STEP;
        self.last = signals;
        let before = self.rate;
        let floor = self.limit / FLOOR_DIVISOR;
        let target = self.target.as_secs_f64();
        let stalled = signals.public() && signals.stall() >= PSI_HIGH;
        let latency = signals.latency();
        let over = latency.is_some_and(|(p99, _)| p99.as_secs_f64() > target);
        let mut held = false;
        let mut cut = false;
        match latency.map(|(p99, n)| (p99.as_secs_f64(), n)) {
            Some((p99, n))
                if p99 > target
                    && (n >= SAMPLES_FOR_P99
                        || self.over_last
                        || p99 > target * LONE_SPIKE_FACTOR) =>
            {
                self.rate *= DECREASE;
                self.hold_until = now + HOLD;
                cut = true;
            }
            // A lone slow request in a small window: wait for the next one.
            Some((p99, _)) if p99 > target => held = true,
            Some((p99, _)) if p99 >= target * RECOVER_BELOW => {
                if stalled {
                    self.rate *= EASE;
                    self.hold_until = now + HOLD;
                    cut = true;
                } else {
                    held = true; // the dead band
                }
            }
            _ if !signals.public() => {
                // Nobody to protect: the hold is over and the climb is fast.
                self.hold_until = now;
                self.rate += self.limit / IDLE_INCREASE_STEPS;
            }
            _ if now < self.hold_until => held = true,
            Some((p99, _)) if stalled && p99 >= target * PSI_QUIET_BELOW => held = true,
            _ => self.rate += self.limit / INCREASE_STEPS,
        }
        self.over_last = over;
        let in_flight_cap = self.limit / (1.0 + signals.in_flight as f64 / IN_FLIGHT_HALVING);
        let capped = self.rate > in_flight_cap;
        self.rate = self.rate.min(in_flight_cap).min(self.limit).max(floor);
        self.state = if self.rate <= floor {
            State::Floor
        } else if self.rate >= self.limit {
            State::Full
        } else if cut || now < self.hold_until {
            State::BackingOff
        } else if capped {
            State::Capped
        } else if held || self.rate <= before {
            State::Holding
        } else {
            State::Rising
        };
    }
}

/// What the limiter shows: the rate in force, the last step's signals and
/// the time spent in each state.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// Effective bytes per second (0: no limit).
    pub effective: u64,
    pub signals: Signals,
    pub state: Option<State>,
    pub state_secs: Vec<(State, f64)>,
    /// Where pressure stall information is read (`"host"`, `"cgroup ..."`)
    /// and how many reads failed.
    pub psi_scope: String,
    pub psi_failures: u64,
}

/// The node's limiter, shared by the replication thread (outbox sends and
/// anti-entropy repairs ask before they go), the tier's uploads and the
/// peer API (reads served to peers are charged).
pub struct Limiter {
    /// Configured bytes per second; 0 = no limit.
    pub limit: u64,
    pub burst: u64,
    pressure: Arc<PublicPressure>,
    state: Mutex<LimiterState>,
}

struct LimiterState {
    bucket: TokenBucket,
    /// Peer bodies this node receives (`acquire_inbound`): the same rate,
    /// a bucket of their own, so receiving does not starve sending.
    inbound: TokenBucket,
    control: Pressure,
    psi: PsiReader,
}

/// The limiter's burst: `replication_burst_bytes`, or a quarter second of the rate.
pub fn burst_bytes(config: &Config) -> u64 {
    match config.replication_burst_bytes {
        0 => (config.replication_bytes_per_second / 4).max(64 * 1024),
        n => n,
    }
}

impl Limiter {
    /// The node's limiter from `replication_bytes_per_second`,
    /// `replication_burst_bytes` and `replication_public_latency_target_ms`.
    pub fn from_config(config: &Config, pressure: Arc<PublicPressure>) -> Limiter {
        Limiter::new(
            config.replication_bytes_per_second,
            burst_bytes(config),
            Duration::from_millis(config.replication_public_latency_target_ms),
            pressure,
        )
    }

    pub fn new(limit: u64, burst: u64, target: Duration, pressure: Arc<PublicPressure>) -> Limiter {
        Limiter::with_psi(
            limit,
            burst,
            target,
            pressure,
            PsiReader::new(PsiPaths::for_this_process()),
        )
    }

    /// As [`Limiter::new`], reading pressure stall information from `psi`.
    pub fn with_psi(
        limit: u64,
        burst: u64,
        target: Duration,
        pressure: Arc<PublicPressure>,
        psi: PsiReader,
    ) -> Limiter {
        let now = Instant::now();
        Limiter {
            limit,
            burst,
            pressure,
            state: Mutex::new(LimiterState {
                bucket: TokenBucket::new(burst, now),
                inbound: TokenBucket::new(burst, now),
                control: Pressure::new(limit.max(1), target, now),
                psi,
            }),
        }
    }

    fn with<T>(&self, now: Instant, f: impl FnOnce(&mut TokenBucket, f64) -> T) -> T {
        self.with_both(now, |bucket, _, rate| f(bucket, rate))
    }

    fn with_both<T>(
        &self,
        now: Instant,
        f: impl FnOnce(&mut TokenBucket, &mut TokenBucket, f64) -> T,
    ) -> T {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let LimiterState {
            bucket,
            inbound,
            control,
            psi,
        } = &mut *guard;
        // Steps missed while nobody asked are one step over the whole gap:
        // the windows and the pressure shares cover it, and in-flight is a
        // level, not a history.
        if control.due(now) {
            // Accrue at the old rate up to now before the rate changes.
            bucket.refill(now, control.rate());
            inbound.refill(now, control.rate());
            let signals = Signals {
                windows: self.pressure.take_windows(),
                in_flight: self.pressure.in_flight(),
                psi: psi.read(now),
            };
            control.step(now, signals);
        }
        f(bucket, inbound, control.rate())
    }

    /// Ask for `n` body bytes: `Err(t)` says wait until `t`.
    pub fn acquire(&self, now: Instant, n: u64) -> Result<(), Instant> {
        if self.limit == 0 || n == 0 {
            return Ok(());
        }
        self.with(now, |bucket, rate| bucket.acquire(now, rate, n))
    }

    /// Ask to read `n` bytes of a peer's body this node receives: `Err(t)`
    /// says read nothing more before `t`. The same rate as sending (this
    /// node's public pressure), its own bucket.
    pub fn acquire_inbound(&self, now: Instant, n: u64) -> Result<(), Instant> {
        if self.limit == 0 || n == 0 {
            return Ok(());
        }
        self.with_both(now, |_, inbound, rate| inbound.acquire(now, rate, n))
    }

    /// Count `n` body bytes that went without asking.
    pub fn charge(&self, now: Instant, n: u64) {
        if self.limit == 0 || n == 0 {
            return;
        }
        self.with(now, |bucket, rate| bucket.charge(now, rate, n));
    }

    /// Public reads measured from the kernel's receive time, ever.
    pub fn latency_samples_total(&self) -> u64 {
        self.pressure.latency_samples_total()
    }

    /// The rate in force and the signals, stepping the controller if due so
    /// an idle node's gauges are current. With no limit the controller still
    /// steps (the signals are shown), and the effective rate is 0.
    pub fn observe(&self, now: Instant) -> Observation {
        self.with(now, |_, _| ());
        let guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let c = &guard.control;
        Observation {
            effective: if self.limit == 0 { 0 } else { c.rate() as u64 },
            signals: c.last,
            state: (self.limit != 0).then_some(c.state()),
            state_secs: if self.limit == 0 {
                Vec::new()
            } else {
                c.state_secs().collect()
            },
            psi_scope: guard.psi.paths().scope.clone(),
            psi_failures: guard.psi.failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pressure::TtfbWindow;

    const MIB: u64 = 1024 * 1024;
    const LIMIT: u64 = 512 * MIB;
    const TARGET: Duration = Duration::from_millis(50);

    fn window(p99_ms: Option<u64>) -> TtfbWindow {
        window_of_n(p99_ms.map(Duration::from_millis), 100)
    }

    fn window_of_n(p99: Option<Duration>, samples: u64) -> TtfbWindow {
        TtfbWindow {
            samples: if p99.is_some() { samples } else { 0 },
            p99,
        }
    }

    /// Signals with a latency-from-arrival window (the TTFB one empty).
    fn sig(p99_ms: Option<u64>, in_flight: u64) -> Signals {
        Signals {
            windows: Windows {
                ttfb: TtfbWindow::default(),
                latency: window(p99_ms),
            },
            in_flight,
            psi: None,
        }
    }

    /// A controller and a clock that advances one step per call.
    struct Sim {
        p: Pressure,
        now: Instant,
    }

    impl Sim {
        fn new() -> Sim {
            let now = Instant::now();
            Sim {
                p: Pressure::new(LIMIT, TARGET, now),
                now,
            }
        }

        fn step(&mut self, s: Signals) -> f64 {
            self.now += CONTROL_STEP;
            self.p.step(self.now, s);
            self.p.rate()
        }
    }

    /// A small deterministic generator for the noisy signals (xorshift).
    struct Noise(u64);

    impl Noise {
        fn unit(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn bucket_paces_to_the_rate_and_lets_big_bodies_through() {
        let t0 = Instant::now();
        let rate = 10.0 * MIB as f64;
        let mut b = TokenBucket::new(MIB, t0);
        assert_eq!(b.acquire(t0, rate, MIB), Ok(()));
        // Empty: the next MiB waits ~100 ms.
        let wait = b.acquire(t0, rate, MIB).expect_err("empty");
        let ms = wait.duration_since(t0).as_millis();
        assert!((99..=101).contains(&ms), "{ms}");
        assert_eq!(b.acquire(wait, rate, MIB), Ok(()));
        // 100 MiB, far over the burst, goes once the bucket is full and
        // leaves it 99 MiB in debt: ten seconds before the next byte.
        let full = wait + Duration::from_millis(100);
        assert_eq!(b.acquire(full, rate, 100 * MIB), Ok(()));
        let next = b.acquire(full, rate, 1).expect_err("in debt");
        let secs = next.duration_since(full).as_secs_f64();
        assert!((9.8..=10.0).contains(&secs), "{secs}");
        // Over a simulated minute the bucket moves rate × time (+ burst).
        let mut now = t0;
        let mut b = TokenBucket::new(MIB, t0);
        let mut moved = 0u64;
        while now < t0 + Duration::from_secs(60) {
            match b.acquire(now, rate, 256 * 1024) {
                Ok(()) => moved += 256 * 1024,
                Err(t) => now = t,
            }
        }
        let expect = 60.0 * rate + MIB as f64;
        assert!(
            (moved as f64 - expect).abs() <= 256.0 * 1024.0 + 1.0,
            "{moved} vs {expect}"
        );
    }

    #[test]
    fn charged_debt_is_bounded() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(MIB, t0);
        b.charge(t0, MIB as f64, 1 << 40);
        assert_eq!(b.tokens(), -DEBT_SECS_MAX * MIB as f64);
    }

    #[test]
    fn latency_over_target_halves_and_recovery_is_slow_and_monotone() {
        let mut sim = Sim::new();
        let limit = LIMIT as f64;
        assert_eq!(sim.step(sig(Some(1), 0)), limit);
        assert_eq!(sim.step(sig(Some(80), 0)), limit / 2.0);
        assert_eq!(sim.p.state(), State::BackingOff);
        assert_eq!(sim.step(sig(Some(80), 0)), limit / 4.0);
        // Ten more bad windows: down to the floor and no further.
        for _ in 0..10 {
            sim.step(sig(Some(200), 0));
        }
        assert_eq!(sim.p.rate(), limit / FLOOR_DIVISOR);
        assert_eq!(sim.p.state(), State::Floor);
        // Healthy public traffic again: nothing for the hold time, then a
        // monotone climb of limit/16 per step back to the limit.
        let floor = sim.p.rate();
        for _ in 0..9 {
            assert_eq!(sim.step(sig(Some(1), 0)), floor, "held after a decrease");
        }
        let mut last = floor;
        let mut steps = 0;
        while sim.p.rate() < limit {
            let r = sim.step(sig(Some(1), 0));
            assert!(r > last, "monotone recovery");
            last = r;
            steps += 1;
            if r < limit {
                assert_eq!(sim.p.state(), State::Rising);
            }
        }
        assert!(steps <= INCREASE_STEPS as usize + 1, "{steps}");
        assert_eq!(sim.step(sig(Some(1), 0)), limit);
        assert_eq!(sim.p.state(), State::Full);
    }

    /// The goal: back to the configured rate within 2 s of the public load
    /// ending, even right after a cut at the floor.
    #[test]
    fn back_to_full_within_a_second_of_the_public_load_stopping() {
        let mut sim = Sim::new();
        for _ in 0..20 {
            sim.step(sig(Some(500), 30));
        }
        assert_eq!(sim.p.rate(), LIMIT as f64 / FLOOR_DIVISOR);
        // The load stops: no samples, nothing in flight. No hold applies.
        let mut steps = 0;
        while sim.p.rate() < LIMIT as f64 {
            sim.step(sig(None, 0));
            steps += 1;
        }
        assert!(
            Duration::from_millis(100) * steps <= Duration::from_secs(1),
            "{steps} steps"
        );
    }

    #[test]
    fn a_signal_in_the_dead_band_holds_the_rate_still() {
        let mut sim = Sim::new();
        sim.step(sig(Some(60), 0));
        let after_decrease = sim.p.rate();
        // A p99 wandering between 41 and 50 ms (80–100% of the target) for
        // a simulated minute: the rate never moves, so nothing oscillates.
        for i in 0..600u64 {
            assert_eq!(
                sim.step(sig(Some(41 + i % 10), 0)),
                after_decrease,
                "step {i}"
            );
        }
    }

    /// A window of a few samples has its slowest as its p99: one slow
    /// request alone (a cold open, a GC pause in the client) must not halve
    /// replication; the same in two windows running, or far over the
    /// target, does.
    #[test]
    fn a_lone_slow_request_in_a_small_window_waits_for_confirmation() {
        let small = |ms: u64| Signals {
            windows: Windows {
                latency: window_of_n(Some(Duration::from_millis(ms)), 5),
                ..Windows::default()
            },
            ..Signals::default()
        };
        let mut sim = Sim::new();
        let limit = LIMIT as f64;
        assert_eq!(sim.step(small(70)), limit, "a lone spike");
        assert_eq!(sim.step(small(5)), limit);
        assert_eq!(sim.step(small(70)), limit, "another lone spike");
        assert_eq!(sim.step(small(70)), limit / 2.0, "confirmed");
        let mut sim = Sim::new();
        assert_eq!(sim.step(small(120)), limit / 2.0, "over twice the target");
        // A full window acts at once.
        let mut sim = Sim::new();
        assert_eq!(sim.step(sig(Some(70), 0)), limit / 2.0);
    }

    /// No oscillation on a noisy signal: a p99 jumping between 20% and 95%
    /// of the target in small windows, with a lone spike over it in one
    /// window out of twenty, for ten simulated minutes: the rate never
    /// leaves the limit. Then a persistent overload with noise (50–150% of
    /// the target in full windows): the rate comes down and stays down, and
    /// changes direction only a few times a minute.
    #[test]
    fn a_noisy_signal_does_not_make_the_rate_oscillate() {
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        let mut sim = Sim::new();
        let target_ms = TARGET.as_secs_f64() * 1000.0;
        let mut last_spike = false;
        for i in 0..6000 {
            let spike = !last_spike && noise.unit() < 0.05;
            last_spike = spike;
            let ms = if spike {
                target_ms * 1.5
            } else {
                target_ms * (0.2 + 0.6 * noise.unit())
            };
            let s = Signals {
                windows: Windows {
                    latency: window_of_n(Some(Duration::from_secs_f64(ms / 1000.0)), 20),
                    ..Windows::default()
                },
                in_flight: 0,
                psi: Some(PsiReading {
                    cpu_some: noise.unit() * 0.4,
                    io_some: 0.0,
                }),
            };
            assert_eq!(sim.step(s), LIMIT as f64, "step {i}: {ms} ms");
        }
        let mut sim = Sim::new();
        let mut reversals = 0;
        let mut direction = 0i8;
        let mut last = sim.p.rate();
        for i in 0..600 {
            let ms = target_ms * (0.5 + noise.unit());
            let r = sim.step(Signals {
                windows: Windows {
                    latency: window_of_n(Some(Duration::from_secs_f64(ms / 1000.0)), 200),
                    ..Windows::default()
                },
                ..Signals::default()
            });
            let d = (r > last) as i8 - (r < last) as i8;
            if d != 0 && direction != 0 && d != direction {
                reversals += 1;
            }
            if d != 0 {
                direction = d;
            }
            last = r;
            if i >= 20 {
                assert!(r <= LIMIT as f64 / 4.0, "step {i}: stays down ({r})");
            }
        }
        assert!(reversals <= 4, "{reversals} reversals in a minute");
    }

    #[test]
    fn in_flight_caps_at_once_and_recovers_by_steps() {
        let mut sim = Sim::new();
        let limit = LIMIT as f64;
        assert_eq!(sim.step(sig(Some(1), 8)), limit / 2.0);
        assert_eq!(sim.p.state(), State::Capped);
        assert_eq!(sim.step(sig(Some(1), 56)), limit / 8.0);
        assert_eq!(sim.step(sig(Some(1), 10_000)), limit / FLOOR_DIVISOR);
        // Load gone: back by steps (limit/8 each), not in one jump.
        let r = sim.step(sig(None, 0));
        assert_eq!(r, limit / FLOOR_DIVISOR + limit / IDLE_INCREASE_STEPS);
        // A flickering 0/1 in flight barely moves it (1/8 of a halving).
        for i in 0..100u64 {
            sim.step(sig(Some(1), i % 2));
        }
        assert!(sim.p.rate() >= limit / 1.125 - 1.0, "{}", sim.p.rate());
    }

    /// What Kura learned: a long healthy public download in progress must
    /// not, by itself, push replication to the floor. It counts as in flight
    /// (a gentle cap) and gives one fast latency sample, at its head; its
    /// minute of body is no sample at all.
    #[test]
    fn a_long_healthy_download_does_not_push_replication_to_the_floor() {
        let mut sim = Sim::new();
        // Its head: one fast sample.
        sim.step(sig(Some(1), 1));
        for i in 0..600 {
            let r = sim.step(sig(None, 1));
            assert!(r >= LIMIT as f64 / 1.125 - 1.0, "step {i}: {r}");
        }
        // Through the real signals: the download holds its in-flight guard
        // for a simulated minute while the replication thread asks for
        // tokens; the rate never drops under limit / 1.125.
        let pressure = Arc::new(PublicPressure::default());
        let l = Limiter::with_psi(
            LIMIT,
            LIMIT / 4,
            TARGET,
            Arc::clone(&pressure),
            PsiReader::new(PsiPaths {
                cpu: "/nonexistent/cpu".into(),
                io: "/nonexistent/io".into(),
                scope: "test".into(),
            }),
        );
        let download = pressure.begin();
        pressure.head_ready(Duration::from_micros(200));
        let t0 = Instant::now();
        let mut now = t0;
        while now < t0 + Duration::from_secs(60) {
            now += CONTROL_STEP;
            let _ = l.acquire(now, MIB);
            let o = l.observe(now);
            assert!(o.effective as f64 >= LIMIT as f64 / 1.125 - 1.0, "{o:?}");
            assert_ne!(o.state, Some(State::Floor));
        }
        drop(download);
        assert_eq!(pressure.in_flight(), 0);
    }

    #[test]
    fn pressure_holds_or_eases_only_with_public_traffic_and_latency_near_the_target() {
        let psi = |share: f64| {
            Some(PsiReading {
                cpu_some: share,
                io_some: 0.0,
            })
        };
        let with = |ms: Option<u64>, in_flight: u64, p: Option<PsiReading>| Signals {
            psi: p,
            ..sig(ms, in_flight)
        };
        let limit = LIMIT as f64;
        // Pressure alone, latency low: still rises (replication's own idle
        // threads waiting for the CPU are part of the stall).
        let mut sim = Sim::new();
        sim.step(sig(Some(80), 0));
        sim.now += HOLD;
        let r = sim.p.rate();
        assert!(sim.step(with(Some(5), 0, psi(0.9))) > r);
        // Latency at 60% of the target with pressure: holds.
        let r = sim.p.rate();
        assert_eq!(sim.step(with(Some(30), 0, psi(0.9))), r);
        assert_eq!(sim.p.state(), State::Holding);
        // The same latency without pressure: rises.
        assert!(sim.step(with(Some(30), 0, psi(0.1))) > r);
        // In the dead band with pressure: eases by a quarter and holds.
        let r = sim.p.rate();
        assert_eq!(sim.step(with(Some(45), 0, psi(0.7))), r * EASE);
        assert_eq!(sim.p.state(), State::BackingOff);
        // Pressure with no public traffic at all: ignored, the climb is fast.
        let r = sim.p.rate();
        assert_eq!(
            sim.step(with(None, 0, psi(1.0))),
            (r + limit / IDLE_INCREASE_STEPS).min(limit)
        );
        // I/O pressure counts as CPU pressure does.
        let mut sim = Sim::new();
        sim.step(sig(Some(80), 0));
        let r = sim.p.rate();
        sim.step(Signals {
            psi: Some(PsiReading {
                cpu_some: 0.0,
                io_some: 0.8,
            }),
            ..sig(Some(45), 0)
        });
        assert_eq!(sim.p.rate(), r * EASE);
    }

    /// The larger p99 of the two windows decides: arrival latency when the
    /// engine took long to get to the request, TTFB when stamps are off.
    #[test]
    fn the_larger_window_decides() {
        let mut sim = Sim::new();
        let both = |ttfb: u64, latency: u64| Signals {
            windows: Windows {
                ttfb: window(Some(ttfb)),
                latency: window(Some(latency)),
            },
            ..Signals::default()
        };
        assert_eq!(
            sim.step(both(1, 300)),
            LIMIT as f64 / 2.0,
            "queueing before the parser"
        );
        let mut sim = Sim::new();
        assert_eq!(sim.step(both(300, 1)), LIMIT as f64 / 2.0);
        let mut sim = Sim::new();
        let ttfb_only = Signals {
            windows: Windows {
                ttfb: window(Some(300)),
                latency: TtfbWindow::default(),
            },
            ..Signals::default()
        };
        assert_eq!(sim.step(ttfb_only), LIMIT as f64 / 2.0);
    }

    #[test]
    fn time_in_each_state_adds_up_to_the_time_observed() {
        let mut sim = Sim::new();
        for _ in 0..10 {
            sim.step(sig(Some(1), 0)); // full
        }
        for _ in 0..10 {
            sim.step(sig(Some(300), 0)); // cutting to the floor
        }
        for _ in 0..20 {
            sim.step(sig(None, 0)); // back up
        }
        let secs: std::collections::HashMap<State, f64> = sim.p.state_secs().collect();
        let total: f64 = secs.values().sum();
        assert!((total - 4.0).abs() < 1e-6, "{secs:?}");
        assert!(secs[&State::Full] >= 1.0, "{secs:?}");
        assert!(
            secs[&State::BackingOff] + secs[&State::Floor] >= 0.9,
            "{secs:?}"
        );
        assert!(secs[&State::Rising] > 0.0, "{secs:?}");
    }

    #[test]
    fn the_limiter_off_grants_everything() {
        let l = Limiter::new(0, 0, TARGET, Arc::new(PublicPressure::default()));
        assert_eq!(l.acquire(Instant::now(), u64::MAX), Ok(()));
        let o = l.observe(Instant::now());
        assert_eq!((o.effective, o.state), (0, None));
    }

    #[test]
    fn the_limiter_slows_when_public_latency_is_over_target() {
        let pressure = Arc::new(PublicPressure::default());
        let l = Limiter::new(100 * MIB, 25 * MIB, TARGET, Arc::clone(&pressure));
        let t0 = Instant::now();
        let moved_in = |l: &Limiter, from: Instant, slow: bool| {
            let mut now = from;
            let mut moved = 0u64;
            while now < from + Duration::from_secs(5) {
                if slow {
                    for _ in 0..100 {
                        pressure.answered_after_arrival(Duration::from_millis(200));
                    }
                }
                match l.acquire(now, MIB) {
                    Ok(()) => moved += MIB,
                    Err(t) => now = t.min(now + CONTROL_STEP),
                }
            }
            moved
        };
        let healthy = moved_in(&l, t0, false);
        let loaded = moved_in(&l, t0 + Duration::from_secs(5), true);
        assert!(loaded * 4 < healthy, "healthy {healthy}, loaded {loaded}");
    }
}
