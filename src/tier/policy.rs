//! The tier's read-side policy, sans-IO: one fetch per key however many
//! requests miss it at once, a short memory of what the last fetch found
//! (so the request that waited, and the next ones, get their answer without
//! another round trip), and the tier's health as reads see it. Driven with a
//! clock passed in; the unit tests below use a fake one.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long the outcome of a fetch answers later misses of the same key.
/// Short: the tier may get the artifact any moment (another node's upload).
pub const OUTCOME_TTL_MS: u64 = 1_000;
/// Outcomes remembered at once; the oldest go first.
pub const OUTCOMES_MAX: usize = 4_096;
/// Fetches in flight at once; a miss past it is answered as unavailable.
pub const FETCHES_MAX: usize = 256;
/// While the tier is failing, at most one read probes it per this window;
/// the others are answered at once instead of waiting for a timeout each.
pub const DOWN_PROBE_MS: u64 = 1_000;

/// What a fetch from the tier found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Fetched, verified and stored locally.
    Stored,
    /// The tier does not hold it.
    NotFound,
    /// The tier's copy failed verification (digest, length) or is too large:
    /// nothing was stored.
    Refused,
    /// The tier did not answer in time, or failed.
    Unavailable,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Stored => "stored",
            Outcome::NotFound => "not_found",
            Outcome::Refused => "refused",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// What to do with a local miss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    /// Start the fetch (this caller owns it and must report `on_done`).
    Fetch,
    /// A fetch for this key is running: wait for it.
    Join,
    /// Answer from a recent outcome without asking the tier.
    Answer(Outcome),
}

/// Single-flight table, recent outcomes and read-side health.
#[derive(Debug, Default)]
pub struct Reads {
    in_flight: HashMap<String, u64>,
    recent: HashMap<String, (Outcome, Instant)>,
    order: VecDeque<(String, Instant)>,
    /// The last fetch failed for the tier's sake (not the key's).
    down_since: Option<Instant>,
    last_probe: Option<Instant>,
    generation: u64,
}

impl Reads {
    /// A local miss of `key` at `now`.
    pub fn on_miss(&mut self, key: &str, now: Instant) -> Miss {
        self.expire(now);
        if self.in_flight.contains_key(key) {
            return Miss::Join;
        }
        if let Some((outcome, _)) = self.recent.get(key) {
            // A stored artifact that is missing again was evicted or deleted
            // since: fetch it again.
            if *outcome != Outcome::Stored {
                return Miss::Answer(*outcome);
            }
        }
        if self.down_since.is_some() {
            let probed_recently = self
                .last_probe
                .is_some_and(|t| now.saturating_duration_since(t) < ms(DOWN_PROBE_MS));
            if probed_recently {
                return Miss::Answer(Outcome::Unavailable);
            }
            self.last_probe = Some(now);
        }
        if self.in_flight.len() >= FETCHES_MAX {
            return Miss::Answer(Outcome::Unavailable);
        }
        self.generation += 1;
        self.in_flight.insert(key.to_string(), self.generation);
        Miss::Fetch
    }

    /// What a local miss of `key` should answer without a fetch, if
    /// anything: a recent outcome other than `Stored`, or `Unavailable`
    /// while the tier is failing and was probed within the window. `None`:
    /// the miss needs [`Reads::on_miss`] (a fetch, or joining one).
    pub fn peek(&mut self, key: &str, now: Instant) -> Option<Outcome> {
        self.expire(now);
        if self.in_flight.contains_key(key) {
            return None;
        }
        if let Some((outcome, _)) = self.recent.get(key) {
            if *outcome != Outcome::Stored {
                return Some(*outcome);
            }
        }
        let probed_recently = self
            .last_probe
            .is_some_and(|t| now.saturating_duration_since(t) < ms(DOWN_PROBE_MS));
        (self.down_since.is_some() && probed_recently).then_some(Outcome::Unavailable)
    }

    /// The recent outcome of `key`, if one is remembered.
    pub fn outcome(&self, key: &str) -> Option<Outcome> {
        self.recent.get(key).map(|(o, _)| *o)
    }

    /// Whether a fetch of `key` is running.
    pub fn fetching(&self, key: &str) -> bool {
        self.in_flight.contains_key(key)
    }

    /// The fetch of `key` ended with `outcome`.
    pub fn on_done(&mut self, key: &str, outcome: Outcome, now: Instant) {
        self.in_flight.remove(key);
        match outcome {
            Outcome::Unavailable => {
                self.down_since.get_or_insert(now);
            }
            _ => self.down_since = None,
        }
        self.recent.insert(key.to_string(), (outcome, now));
        self.order.push_back((key.to_string(), now));
        while self.order.len() > OUTCOMES_MAX {
            if let Some((old, at)) = self.order.pop_front() {
                self.forget(&old, at);
            }
        }
    }

    /// The tier answered something else (an upload): it is up again.
    pub fn on_tier_ok(&mut self) {
        self.down_since = None;
    }

    /// Since when reads have found the tier failing, if they do.
    pub fn down_since(&self) -> Option<Instant> {
        self.down_since
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((_, at)) = self.order.front() {
            if now.saturating_duration_since(*at) < ms(OUTCOME_TTL_MS) {
                break;
            }
            if let Some((old, at)) = self.order.pop_front() {
                self.forget(&old, at);
            }
        }
    }

    /// Drop `key`'s outcome if it is the one recorded at `at` (a newer one stays).
    fn forget(&mut self, key: &str, at: Instant) {
        if self.recent.get(key).is_some_and(|(_, t)| *t == at) {
            self.recent.remove(key);
        }
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_fetch_per_key_then_the_outcome_answers_for_a_while() {
        let t0 = Instant::now();
        let mut r = Reads::default();
        assert_eq!(r.on_miss("a", t0), Miss::Fetch);
        assert_eq!(r.on_miss("a", t0), Miss::Join);
        assert_eq!(r.on_miss("b", t0), Miss::Fetch);
        r.on_done("a", Outcome::NotFound, t0);
        assert_eq!(r.on_miss("a", t0 + ms(10)), Miss::Answer(Outcome::NotFound));
        assert_eq!(r.on_miss("a", t0 + ms(OUTCOME_TTL_MS + 1)), Miss::Fetch);
        // Stored but missing again (evicted): fetch again.
        r.on_done("b", Outcome::Stored, t0);
        assert_eq!(r.on_miss("b", t0 + ms(1)), Miss::Fetch);
    }

    #[test]
    fn a_failing_tier_is_probed_once_per_window_and_cleared_by_success() {
        let t0 = Instant::now();
        let mut r = Reads::default();
        assert_eq!(r.on_miss("a", t0), Miss::Fetch);
        r.on_done("a", Outcome::Unavailable, t0);
        assert!(r.down_since().is_some());
        // Another key probes once, the rest are answered at once.
        assert_eq!(r.on_miss("b", t0 + ms(1)), Miss::Fetch);
        assert_eq!(
            r.on_miss("c", t0 + ms(2)),
            Miss::Answer(Outcome::Unavailable)
        );
        assert_eq!(
            r.on_miss("d", t0 + ms(DOWN_PROBE_MS + 2)),
            Miss::Fetch,
            "the next window probes again"
        );
        r.on_done("d", Outcome::Stored, t0 + ms(DOWN_PROBE_MS + 3));
        assert!(r.down_since().is_none());
        assert_eq!(r.on_miss("c", t0 + ms(DOWN_PROBE_MS + 4)), Miss::Fetch);
    }

    #[test]
    fn outcomes_and_fetches_are_bounded() {
        let t0 = Instant::now();
        let mut r = Reads::default();
        for i in 0..OUTCOMES_MAX + 10 {
            let key = format!("k{i}");
            assert_eq!(r.on_miss(&key, t0), Miss::Fetch);
            r.on_done(&key, Outcome::NotFound, t0);
        }
        assert!(r.recent.len() <= OUTCOMES_MAX && r.order.len() <= OUTCOMES_MAX);
        for i in 0..FETCHES_MAX {
            assert_eq!(r.on_miss(&format!("f{i}"), t0), Miss::Fetch);
        }
        assert_eq!(
            r.on_miss("one-more", t0),
            Miss::Answer(Outcome::Unavailable)
        );
        // A week of misses in fake time keeps the tables bounded.
        let mut now = t0;
        for i in 0..100_000u64 {
            now += ms(7);
            let key = format!("w{}", i % 5000);
            if r.on_miss(&key, now) == Miss::Fetch {
                r.on_done(&key, Outcome::NotFound, now);
            }
        }
        assert!(r.order.len() <= OUTCOMES_MAX);
    }
}
