//! Backoff after a failed delivery, sans-IO: a target that fails is tried
//! again after 2 s, doubling to 60 s, with jitter; the first success clears
//! it. Driven with a clock passed in, so the tests run a week of failures in
//! a moment. The peers and the object-store tier both use it.

use std::time::{Duration, Instant};

/// First backoff after a failure.
pub const BACKOFF_FIRST_MS: u64 = 2_000;
/// Backoff never grows past this (jitter included).
pub const BACKOFF_MAX_MS: u64 = 60_000;
/// Jitter: each delay is scaled by a factor drawn in `1 ± JITTER_PERMILLE/1000`,
/// so peers that failed together do not retry together.
pub const JITTER_PERMILLE: u64 = 100;

/// A small deterministic generator (xorshift64*): jitter needs no quality,
/// and the tests need runs that repeat from a seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Per-peer backoff: 2 s after the first failure, doubling to at most 60 s,
/// with jitter; the first success clears it.
#[derive(Clone, Debug, Default)]
pub struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    /// The next attempt may start now.
    pub fn ready(&self, now: Instant) -> bool {
        self.until.is_none_or(|t| now >= t)
    }

    /// When the next attempt may start, if it has to wait.
    pub fn until(&self) -> Option<Instant> {
        self.until
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The current window (0 when healthy), for `sluice_peer_backoff_seconds`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.until
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }

    /// A failure at `now`: returns when the next attempt may start.
    pub fn on_failure(&mut self, now: Instant, rng: &mut Rng) -> Instant {
        self.failures = self.failures.saturating_add(1);
        let doublings = self.failures.saturating_sub(1).min(16);
        let base_ms = BACKOFF_FIRST_MS
            .saturating_mul(1u64 << doublings)
            .min(BACKOFF_MAX_MS);
        let factor = 1000 - JITTER_PERMILLE + rng.below(2 * JITTER_PERMILLE + 1);
        let delay_ms = (base_ms * factor / 1000).min(BACKOFF_MAX_MS);
        let until = now + Duration::from_millis(delay_ms);
        self.until = Some(until);
        until
    }

    /// Bring the next attempt forward to at most `cap_ms` (jittered) from
    /// `now`, keeping the failure count: for attempts that cost almost
    /// nothing or that a heal must not wait a minute for (a probe of a down
    /// peer, one write to a full one). Returns when the next attempt may
    /// start.
    pub fn cap(&mut self, now: Instant, cap_ms: u64, rng: &mut Rng) -> Instant {
        let factor = 1000 - JITTER_PERMILLE + rng.below(2 * JITTER_PERMILLE + 1);
        let capped = now + Duration::from_millis(cap_ms * factor / 1000);
        let until = self.until.map_or(capped, |t| t.min(capped));
        self.until = Some(until);
        until
    }

    pub fn on_success(&mut self) {
        self.failures = 0;
        self.until = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_clears() {
        let t0 = Instant::now();
        let mut rng = Rng::new(7);
        let mut b = Backoff::default();
        assert!(b.ready(t0));
        let mut expected_ms = BACKOFF_FIRST_MS;
        for _ in 0..12 {
            let until = b.on_failure(t0, &mut rng);
            let got = until.duration_since(t0).as_millis() as u64;
            let low = expected_ms * (1000 - JITTER_PERMILLE) / 1000;
            let high = (expected_ms * (1000 + JITTER_PERMILLE) / 1000).min(BACKOFF_MAX_MS);
            assert!((low..=high).contains(&got), "{got} not in {low}..={high}");
            assert!(!b.ready(t0));
            assert!(b.ready(until));
            expected_ms = (expected_ms * 2).min(BACKOFF_MAX_MS);
        }
        // Capped: the count stays (the next uncapped failure doubles on).
        let capped = b.cap(t0, 5_000, &mut rng).duration_since(t0).as_millis() as u64;
        assert!((4_500..=5_500).contains(&capped), "{capped}");
        assert_eq!(b.failures(), 12);
        b.on_success();
        assert!(b.ready(t0));
        let again = b.on_failure(t0, &mut rng).duration_since(t0).as_millis() as u64;
        assert!(again <= BACKOFF_FIRST_MS * 11 / 10);
    }
}
