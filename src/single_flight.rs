//! One fetch per key, however many ask: the coalescing and the negative
//! cache of a read-through, sans-IO.
//!
//! A caller that misses joins the key's flight: the first becomes the
//! leader (it starts the one fetch), later ones wait as followers; when the
//! fetch ends, [`SingleFlight::complete`] hands back every waiter to be
//! woken. A fetch that found nothing can be remembered for a while
//! (`negative_ttl`): joins within it are answered at once, without a fetch.
//!
//! Generic over the key and the waiter (a callback, a channel, a slot id),
//! with the clock passed in and no lock, thread or sleep inside: the peer
//! read-through (`replication::read_through`) wraps one in a mutex, and an
//! object-store tier can wrap another. Every table is bounded.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How a join went.
#[derive(Debug, PartialEq, Eq)]
pub enum Join<W> {
    /// First for this key: start the fetch and call `complete` when done.
    Leader,
    /// A fetch for this key is under way; the waiter is kept.
    Follower,
    /// The key was found absent within `negative_ttl`: nothing to wait for.
    Negative(W),
    /// A bound is reached (flights or waiters): the waiter is given back.
    Full(W),
}

/// The bounds of a [`SingleFlight`].
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Keys being fetched at once.
    pub flights_max: usize,
    /// Waiters on one key (the leader included).
    pub waiters_per_flight_max: usize,
    /// Keys remembered as absent; the oldest is forgotten first.
    pub negative_max: usize,
}

struct Flight<W> {
    waiters: Vec<W>,
    started: Instant,
}

/// The flights and the negative cache.
pub struct SingleFlight<K, W> {
    bounds: Bounds,
    negative_ttl: Duration,
    flights: HashMap<K, Flight<W>>,
    /// Absent keys and when they stop being remembered.
    negative: HashMap<K, Instant>,
    /// Negative entries in insertion order, to forget the oldest first.
    negative_order: VecDeque<(K, Instant)>,
}

impl<K: Hash + Eq + Clone, W> SingleFlight<K, W> {
    pub fn new(bounds: Bounds, negative_ttl: Duration) -> Self {
        SingleFlight {
            bounds,
            negative_ttl,
            flights: HashMap::new(),
            negative: HashMap::new(),
            negative_order: VecDeque::new(),
        }
    }

    /// Whether `key` is remembered as absent at `now`.
    pub fn is_negative(&mut self, key: &K, now: Instant) -> bool {
        self.expire(now);
        self.negative.get(key).is_some_and(|&until| now < until)
    }

    /// Ask for `key` with `waiter`.
    pub fn join(&mut self, key: K, now: Instant, waiter: W) -> Join<W> {
        if self.is_negative(&key, now) {
            return Join::Negative(waiter);
        }
        if let Some(flight) = self.flights.get_mut(&key) {
            if flight.waiters.len() >= self.bounds.waiters_per_flight_max {
                return Join::Full(waiter);
            }
            flight.waiters.push(waiter);
            return Join::Follower;
        }
        if self.flights.len() >= self.bounds.flights_max {
            return Join::Full(waiter);
        }
        self.flights.insert(
            key,
            Flight {
                waiters: vec![waiter],
                started: now,
            },
        );
        Join::Leader
    }

    /// The fetch of `key` ended; `absent`: nothing was found (remember it).
    /// Returns the waiters to wake, leader first.
    pub fn complete(&mut self, key: &K, now: Instant, absent: bool) -> Vec<W> {
        let waiters = self
            .flights
            .remove(key)
            .map(|f| f.waiters)
            .unwrap_or_default();
        if absent && !self.negative_ttl.is_zero() {
            self.expire(now);
            while self.negative.len() >= self.bounds.negative_max {
                match self.negative_order.pop_front() {
                    Some((old, until)) => {
                        if self.negative.get(&old) == Some(&until) {
                            self.negative.remove(&old);
                        }
                    }
                    None => break,
                }
            }
            let until = now + self.negative_ttl;
            self.negative.insert(key.clone(), until);
            self.negative_order.push_back((key.clone(), until));
        }
        waiters
    }

    /// Flights started before `deadline`: their fetches overran (the
    /// driver completes them as failed).
    pub fn overdue(&self, started_before: Instant) -> Vec<K> {
        self.flights
            .iter()
            .filter(|(_, f)| f.started < started_before)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Keys being fetched.
    pub fn flights(&self) -> usize {
        self.flights.len()
    }

    /// Keys remembered as absent (expired ones included until the next
    /// look).
    pub fn negatives(&self) -> usize {
        self.negative.len()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((key, until)) = self.negative_order.front() {
            if *until > now {
                break;
            }
            if self.negative.get(key) == Some(until) {
                self.negative.remove(key);
            }
            self.negative_order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        flights_max: 2,
        waiters_per_flight_max: 100,
        negative_max: 3,
    };

    #[test]
    fn one_leader_many_followers_all_woken_once() {
        let t0 = Instant::now();
        let mut sf: SingleFlight<&str, u32> = SingleFlight::new(BOUNDS, Duration::from_secs(1));
        assert_eq!(sf.join("k", t0, 0), Join::Leader);
        for i in 1..100 {
            assert_eq!(sf.join("k", t0, i), Join::Follower);
        }
        assert_eq!(sf.join("k", t0, 100), Join::Full(100), "waiters bounded");
        let woken = sf.complete(&"k", t0, false);
        assert_eq!(woken, (0..100).collect::<Vec<_>>());
        assert!(sf.complete(&"k", t0, false).is_empty(), "woken once");
        // Found: not remembered as absent; the next miss fetches again.
        assert_eq!(sf.join("k", t0, 7), Join::Leader);
    }

    #[test]
    fn absent_keys_are_remembered_for_the_ttl_only() {
        let t0 = Instant::now();
        let ttl = Duration::from_millis(1000);
        let mut sf: SingleFlight<&str, u32> = SingleFlight::new(BOUNDS, ttl);
        assert_eq!(sf.join("gone", t0, 1), Join::Leader);
        assert_eq!(sf.join("gone", t0, 2), Join::Follower);
        assert_eq!(sf.complete(&"gone", t0, true), vec![1, 2]);
        // A storm within the window costs nothing.
        for i in 0..1000 {
            let at = t0 + Duration::from_micros(i * 999);
            assert_eq!(sf.join("gone", at, 3), Join::Negative(3));
        }
        assert_eq!(sf.join("gone", t0 + ttl, 4), Join::Leader, "window over");
    }

    #[test]
    fn flights_and_negatives_are_bounded() {
        let t0 = Instant::now();
        let mut sf: SingleFlight<u32, u32> = SingleFlight::new(BOUNDS, Duration::from_secs(60));
        assert_eq!(sf.join(1, t0, 0), Join::Leader);
        assert_eq!(sf.join(2, t0, 0), Join::Leader);
        assert_eq!(sf.join(3, t0, 9), Join::Full(9));
        sf.complete(&1, t0, true);
        sf.complete(&2, t0, true);
        for k in 10..20 {
            assert_eq!(sf.join(k, t0, 0), Join::Leader);
            sf.complete(&k, t0, true);
        }
        assert_eq!(sf.negatives(), 3);
        assert_eq!(sf.join(19, t0, 0), Join::Negative(0), "newest kept");
        assert_eq!(sf.join(10, t0, 0), Join::Leader, "oldest forgotten");
    }

    #[test]
    fn zero_ttl_remembers_nothing_and_overdue_flights_are_found() {
        let t0 = Instant::now();
        let mut sf: SingleFlight<u32, u32> = SingleFlight::new(BOUNDS, Duration::ZERO);
        assert_eq!(sf.join(1, t0, 0), Join::Leader);
        assert_eq!(sf.overdue(t0), Vec::<u32>::new());
        assert_eq!(sf.overdue(t0 + Duration::from_millis(1)), vec![1]);
        sf.complete(&1, t0, true);
        assert_eq!(sf.join(1, t0, 0), Join::Leader);
    }
}
