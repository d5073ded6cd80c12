//! The replication limiter: a token bucket on background body bytes (peer
//! sends and repairs, the tier's write-behind uploads) whose rate yields to
//! public pressure. Sans-IO: [`TokenBucket`] and [`Pressure`]
//! take the clock and the signals as arguments and decide; [`Limiter`] is
//! the node's one shared instance (a lock around both, taken by the
//! replication thread and the peer API, never by the public request path,
//! which only bumps the atomics of [`crate::pressure::PublicPressure`]).
//!
//! The rule (docs/replication.md states it for operators):
//!
//! - every [`CONTROL_STEP`] (100 ms) the controller looks at the window of
//!   public TTFB samples since the last step (its p99) and at the public
//!   requests in flight now;
//! - **latency**: window p99 over the target → the rate halves
//!   ([`DECREASE`]), at most once per step, and may not rise again for
//!   [`HOLD`] (1 s); window p99 under [`RECOVER_BELOW`] × target (80%), or
//!   no sample at all → it rises by limit/16 per step ([`INCREASE_STEPS`]:
//!   floor to full in 1.6 s); between 80% and 100% of the target it holds;
//! - **in flight**: the rate never exceeds limit / (1 + in_flight / 8)
//!   ([`IN_FLIGHT_HALVING`]): 8 public requests in flight halve it, 56 cut
//!   it to an eighth; this cap applies at once on the way down, and on the
//!   way up the rate climbs back by the same additive steps;
//! - never below limit / 64 ([`FLOOR_DIVISOR`]), so the outbox always
//!   drains a little and anti-entropy is never starved.
//!
//! Fast down, slow up, a dead band and a hold time: the rate does not
//! oscillate with a signal that sits near the target (see the tests).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::pressure::{PublicPressure, TtfbWindow};

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

/// The pressure controller: the effective rate from the signals.
#[derive(Clone, Debug)]
pub struct Pressure {
    limit: f64,
    target: Duration,
    rate: f64,
    next_step: Instant,
    hold_until: Instant,
    /// The last window's p99 and in-flight count (for the metrics).
    pub last_window: TtfbWindow,
    pub last_in_flight: u64,
}

impl Pressure {
    pub fn new(limit: u64, target: Duration, now: Instant) -> Pressure {
        Pressure {
            limit: limit as f64,
            target,
            rate: limit as f64,
            next_step: now + CONTROL_STEP,
            hold_until: now,
            last_window: TtfbWindow::default(),
            last_in_flight: 0,
        }
    }

    /// The effective rate, bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Whether a control step is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_step
    }

    /// One control step with the window since the last one and the public
    /// requests in flight now.
    pub fn step(&mut self, now: Instant, window: TtfbWindow, in_flight: u64) {
        self.next_step = now + CONTROL_STEP;
        self.last_window = window;
        self.last_in_flight = in_flight;
        let floor = self.limit / FLOOR_DIVISOR;
        let target = self.target.as_secs_f64();
        match window.p99.map(|d| d.as_secs_f64()) {
            Some(p99) if p99 > target => {
                self.rate *= DECREASE;
                self.hold_until = now + HOLD;
            }
            Some(p99) if p99 >= target * RECOVER_BELOW => {} // the dead band: hold
            _ if now < self.hold_until => {}
            _ => self.rate += self.limit / INCREASE_STEPS,
        }
        let in_flight_cap = self.limit / (1.0 + in_flight as f64 / IN_FLIGHT_HALVING);
        self.rate = self.rate.min(in_flight_cap).min(self.limit).max(floor);
    }
}

/// The node's limiter, shared by the replication thread (outbox sends and
/// anti-entropy repairs ask before they go) and the peer API (reads served
/// to peers are charged).
pub struct Limiter {
    /// Configured bytes per second; 0 = no limit.
    pub limit: u64,
    pub burst: u64,
    pressure: Arc<PublicPressure>,
    state: Mutex<(TokenBucket, Pressure)>,
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
        let now = Instant::now();
        Limiter {
            limit,
            burst,
            pressure,
            state: Mutex::new((
                TokenBucket::new(burst, now),
                Pressure::new(limit, target, now),
            )),
        }
    }

    fn with<T>(&self, now: Instant, f: impl FnOnce(&mut TokenBucket, f64) -> T) -> T {
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (bucket, pressure) = &mut *guard;
        // Steps missed while nobody asked are one step over the whole gap:
        // the window covers it, and in-flight is a level, not a history.
        if pressure.due(now) {
            // Accrue at the old rate up to now before the rate changes.
            bucket.refill(now, pressure.rate());
            pressure.step(now, self.pressure.take_window(), self.pressure.in_flight());
        }
        f(bucket, pressure.rate())
    }

    /// Ask for `n` body bytes: `Err(t)` says wait until `t`.
    pub fn acquire(&self, now: Instant, n: u64) -> Result<(), Instant> {
        if self.limit == 0 || n == 0 {
            return Ok(());
        }
        self.with(now, |bucket, rate| bucket.acquire(now, rate, n))
    }

    /// Count `n` body bytes that went without asking.
    pub fn charge(&self, now: Instant, n: u64) {
        if self.limit == 0 || n == 0 {
            return;
        }
        self.with(now, |bucket, rate| bucket.charge(now, rate, n));
    }

    /// `(effective rate, last window p99 (s), last in-flight)`, stepping the
    /// controller if due so an idle node's gauges are current.
    pub fn observe(&self, now: Instant) -> (u64, f64, u64) {
        if self.limit == 0 {
            let w = self.pressure.take_window();
            return (
                0,
                w.p99.map_or(0.0, |d| d.as_secs_f64()),
                self.pressure.in_flight(),
            );
        }
        self.with(now, |_, _| ());
        let guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let p = &guard.1;
        (
            p.rate() as u64,
            p.last_window.p99.map_or(0.0, |d| d.as_secs_f64()),
            p.last_in_flight,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn window(p99_ms: Option<u64>) -> TtfbWindow {
        TtfbWindow {
            samples: u64::from(p99_ms.is_some()) * 100,
            p99: p99_ms.map(Duration::from_millis),
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
        let t0 = Instant::now();
        let limit = 512 * MIB;
        let mut p = Pressure::new(limit, Duration::from_millis(50), t0);
        let mut now = t0;
        let mut step = |p: &mut Pressure, w: TtfbWindow, inflight: u64| {
            now += CONTROL_STEP;
            p.step(now, w, inflight);
            p.rate()
        };
        assert_eq!(step(&mut p, window(Some(1)), 0), limit as f64);
        assert_eq!(step(&mut p, window(Some(80)), 0), limit as f64 / 2.0);
        assert_eq!(step(&mut p, window(Some(80)), 0), limit as f64 / 4.0);
        // Ten more bad windows: down to the floor and no further.
        for _ in 0..10 {
            step(&mut p, window(Some(200)), 0);
        }
        assert_eq!(p.rate(), limit as f64 / FLOOR_DIVISOR);
        // Healthy again: nothing for the hold time, then a monotone climb
        // of limit/16 per step back to the limit, never past it.
        let floor = p.rate();
        for _ in 0..9 {
            assert_eq!(
                step(&mut p, window(Some(1)), 0),
                floor,
                "held after a decrease"
            );
        }
        let mut last = floor;
        let mut steps = 0;
        while p.rate() < limit as f64 {
            let r = step(&mut p, window(None), 0);
            assert!(r > last, "monotone recovery");
            last = r;
            steps += 1;
        }
        assert!(steps <= INCREASE_STEPS as usize + 1, "{steps}");
        assert_eq!(step(&mut p, window(Some(1)), 0), limit as f64);
    }

    #[test]
    fn a_signal_in_the_dead_band_holds_the_rate_still() {
        let t0 = Instant::now();
        let limit = 512 * MIB;
        let mut p = Pressure::new(limit, Duration::from_millis(50), t0);
        let mut now = t0 + CONTROL_STEP;
        p.step(now, window(Some(60)), 0);
        let after_decrease = p.rate();
        // A p99 wandering between 41 and 50 ms (80–100% of the target) for
        // a simulated minute: the rate never moves, so nothing oscillates.
        for i in 0..600u64 {
            now += CONTROL_STEP;
            p.step(now, window(Some(41 + i % 10)), 0);
            assert_eq!(p.rate(), after_decrease, "step {i}");
        }
    }

    #[test]
    fn in_flight_caps_at_once_and_recovers_by_steps() {
        let t0 = Instant::now();
        let limit = 512 * MIB;
        let mut p = Pressure::new(limit, Duration::from_millis(50), t0);
        let mut now = t0 + CONTROL_STEP;
        p.step(now, window(Some(1)), 8);
        assert_eq!(p.rate(), limit as f64 / 2.0);
        now += CONTROL_STEP;
        p.step(now, window(Some(1)), 56);
        assert_eq!(p.rate(), limit as f64 / 8.0);
        now += CONTROL_STEP;
        p.step(now, window(Some(1)), 10_000);
        assert_eq!(p.rate(), limit as f64 / FLOOR_DIVISOR);
        // Load gone: back by limit/16 per step, not in one jump.
        now += CONTROL_STEP;
        p.step(now, window(None), 0);
        let r = p.rate();
        assert!(r < limit as f64 / 8.0, "{r}");
        // A flickering 0/1 in flight barely moves it (1/8 of a halving).
        for i in 0..100u64 {
            now += CONTROL_STEP;
            p.step(now, window(Some(1)), i % 2);
        }
        assert!(p.rate() >= limit as f64 / 1.125 - 1.0, "{}", p.rate());
    }

    #[test]
    fn the_limiter_off_grants_everything() {
        let l = Limiter::new(
            0,
            0,
            Duration::from_millis(50),
            Arc::new(PublicPressure::default()),
        );
        assert_eq!(l.acquire(Instant::now(), u64::MAX), Ok(()));
    }

    #[test]
    fn the_limiter_slows_when_public_ttfb_is_over_target() {
        let pressure = Arc::new(PublicPressure::default());
        let l = Limiter::new(
            100 * MIB,
            25 * MIB,
            Duration::from_millis(50),
            Arc::clone(&pressure),
        );
        let t0 = Instant::now();
        let moved_in = |l: &Limiter, from: Instant, slow: bool| {
            let mut now = from;
            let mut moved = 0u64;
            while now < from + Duration::from_secs(5) {
                if slow {
                    pressure.head_ready(Duration::from_millis(200));
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
