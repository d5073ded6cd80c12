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

/// A small range a request on a local miss asked for is served from a
/// ranged GET to the tier, without waiting for the whole object (which is
/// fetched meanwhile). Ranges up to this size qualify.
pub const SMALL_RANGE_BYTES_MAX: u64 = 1 << 20;
/// Bytes of fetched ranges kept at once for the requests that asked.
pub const RANGES_BYTES_MAX: usize = 16 << 20;
/// How long a fetched range waits for its request to decide again.
pub const RANGE_TTL_MS: u64 = 5_000;

/// One fetched range of an object.
#[derive(Clone, Debug)]
pub struct Piece {
    pub id: String,
    pub start: u64,
    pub end_inclusive: u64,
    /// The whole object's length.
    pub total: u64,
    /// The object's sha256 (hex), when the tier carries it.
    pub sha256: Option<String>,
    pub bytes: bytes::Bytes,
    pub at: Instant,
}

/// Ranges wanted by waiting requests, and the pieces fetched for them,
/// bounded in bytes and time.
#[derive(Debug, Default)]
pub struct Ranges {
    wanted: HashMap<String, (u64, u64, Instant)>,
    pieces: VecDeque<Piece>,
    bytes: usize,
}

impl Ranges {
    /// A request waits for `start..=end_inclusive` of `id`.
    /// (A request whose artifact turns out to be local after all leaves its
    /// wish behind: wishes expire after [`RANGE_TTL_MS`].)
    pub fn want(&mut self, id: &str, start: u64, end_inclusive: u64, now: Instant) {
        if self.wanted.len() >= FETCHES_MAX {
            self.wanted
                .retain(|_, (_, _, at)| now.saturating_duration_since(*at) < ms(RANGE_TTL_MS));
        }
        if self.wanted.len() < FETCHES_MAX {
            self.wanted
                .insert(id.to_string(), (start, end_inclusive, now));
        }
    }

    /// The range wanted for `id`, if any (taken: one ranged GET serves it).
    pub fn take_wanted(&mut self, id: &str, now: Instant) -> Option<(u64, u64)> {
        let (start, end, at) = self.wanted.remove(id)?;
        (now.saturating_duration_since(at) < ms(RANGE_TTL_MS)).then_some((start, end))
    }

    pub fn insert(&mut self, piece: Piece, now: Instant) {
        self.expire(now);
        if piece.bytes.len() > RANGES_BYTES_MAX {
            return;
        }
        self.bytes += piece.bytes.len();
        self.pieces.push_back(piece);
        while self.bytes > RANGES_BYTES_MAX {
            match self.pieces.pop_front() {
                Some(old) => self.bytes -= old.bytes.len(),
                None => break,
            }
        }
    }

    /// A fetched piece of `id` that covers `start..=end_inclusive`.
    pub fn find(
        &mut self,
        id: &str,
        start: u64,
        end_inclusive: u64,
        now: Instant,
    ) -> Option<Piece> {
        self.expire(now);
        self.pieces
            .iter()
            .find(|p| p.id == id && p.start <= start && end_inclusive <= p.end_inclusive)
            .cloned()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(p) = self.pieces.front() {
            if now.saturating_duration_since(p.at) < ms(RANGE_TTL_MS) {
                break;
            }
            if let Some(old) = self.pieces.pop_front() {
                self.bytes -= old.bytes.len();
            }
        }
    }
}

/// `start..=end_inclusive` when `range` is one explicit byte range of at
/// most [`SMALL_RANGE_BYTES_MAX`] (open-ended and suffix ranges need the
/// object's length, so they wait for the whole object).
pub fn small_range(range: &[u8]) -> Option<(u64, u64)> {
    match crate::http1::parse_range(range, u64::MAX) {
        crate::http1::RangeOutcome::Partial {
            start,
            end_inclusive,
        } if end_inclusive < u64::MAX - 1 && end_inclusive - start < SMALL_RANGE_BYTES_MAX => {
            Some((start, end_inclusive))
        }
        _ => None,
    }
}

#[cfg(test)]
mod range_tests {
    use super::*;

    #[test]
    fn only_small_explicit_ranges_qualify() {
        assert_eq!(small_range(b"bytes=0-99"), Some((0, 99)));
        assert_eq!(small_range(b"bytes=5-5"), Some((5, 5)));
        assert_eq!(small_range(b"bytes=0-1048575"), Some((0, 1048575)), "1 MiB");
        assert_eq!(small_range(b"bytes=0-1048576"), None);
        assert_eq!(small_range(b"bytes=100-"), None);
        assert_eq!(small_range(b"bytes=-100"), None);
        assert_eq!(small_range(b"bytes=0-1,5-6"), None);
        assert_eq!(small_range(b"items=0-1"), None);
    }

    #[test]
    fn pieces_are_bounded_and_expire() {
        let t0 = Instant::now();
        let mut r = Ranges::default();
        let piece = |id: &str, at| Piece {
            id: id.to_string(),
            start: 0,
            end_inclusive: (1 << 20) - 1,
            total: 1 << 30,
            sha256: None,
            bytes: bytes::Bytes::from(vec![0u8; 1 << 20]),
            at,
        };
        for i in 0..40 {
            r.insert(piece(&format!("k{i}"), t0), t0);
        }
        assert!(r.bytes <= RANGES_BYTES_MAX);
        assert!(r.find("k39", 10, 20, t0).is_some());
        assert!(r.find("k0", 10, 20, t0).is_none(), "the oldest went first");
        assert!(r.find("k39", 10, 1 << 20, t0).is_none(), "not covered");
        assert!(r.find("k39", 10, 20, t0 + ms(RANGE_TTL_MS)).is_none());
        r.want("a", 1, 2, t0);
        assert_eq!(r.take_wanted("a", t0), Some((1, 2)));
        assert_eq!(r.take_wanted("a", t0), None);
        r.want("b", 1, 2, t0);
        assert_eq!(r.take_wanted("b", t0 + ms(RANGE_TTL_MS)), None, "stale");
        for i in 0..FETCHES_MAX + 5 {
            r.want(&format!("w{i}"), 0, 1, t0 + ms(i as u64 * 100));
        }
        assert!(r.wanted.len() <= FETCHES_MAX);
    }
}
