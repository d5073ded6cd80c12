//! The replication policies, sans-IO: membership and each peer's decisions
//! (over `crate::delivery`'s backoff and outbox cursor). Each is a plain struct driven by events and a clock passed
//! in (`now: Instant`); none opens a socket, reads a file or sleeps. The
//! replication thread drives them with the real clock, the unit tests below
//! with a fake one (a week of flapping peers in milliseconds, from a seed).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::delivery::{Backoff, Next, OutboxCursor, Rng};

/// Requests in flight to one healthy peer. While a peer is failing, one.
/// Enough that a peer's round trip (a sync on its side, a few thread hops
/// on a busy host) is not the write rate's ceiling: at 8, a 40 ms round
/// trip capped a peer at 200 small writes a second.
pub const SEND_WINDOW_MAX: usize = 32;
/// Artifact bytes in flight to one peer: past this no new entry starts
/// until an answer comes (a single larger one goes alone), so a window of
/// large artifacts does not hold 32 of them open at once.
pub const SEND_BYTES_IN_FLIGHT_MAX: u64 = 64 * 1024 * 1024;
/// Longest wait between probes of a down peer, and between retries of a
/// full one (each jittered), however long its backoff has grown: a heal is
/// noticed within this, not a minute later. A probe is a `hello` with no
/// body; a full peer's retry is one write at a time. 3 s (3.3 s with the
/// jitter) keeps the lag gauge's promise: a write the peer holds but whose
/// answer a fault lost reads 0 within 5 s of the heal, when the retry is
/// acknowledged (5 s let it take 5.5 s: tests/fleet.rs, packet loss).
pub const DOWN_RETRY_MAX_MS: u64 = 3_000;

/// What membership knows of a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Not heard from since start (or since it joined the set).
    Unknown,
    Up,
    Down,
    /// It answers, but its store has no room (it answered a write 507):
    /// writes wait for it with its backoff, one at a time, until one is
    /// taken. Not bad input, and not down: probes do not clear it.
    Full,
    /// It answered with this node's own id: never a peer.
    Myself,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Unknown => "unknown",
            PeerState::Up => "up",
            PeerState::Down => "down",
            PeerState::Full => "full",
            PeerState::Myself => "self",
        }
    }
}

/// A real change of membership, the only thing that reconciles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    Joined(String),
    Left(String),
    Changed {
        peer: String,
        from: PeerState,
        to: PeerState,
    },
}

/// The peer set and each peer's state. Repeating the known state (a probe
/// that finds an up peer up, a resolve that returns the same set) returns
/// no transition: nothing reconciles, nothing is logged.
#[derive(Clone, Debug, Default)]
pub struct Membership {
    peers: BTreeMap<String, PeerState>,
    /// Transitions returned so far (`sluice_membership_reconciles_total`).
    pub reconciles_total: u64,
}

impl Membership {
    pub fn peers(&self) -> impl Iterator<Item = (&str, PeerState)> {
        self.peers.iter().map(|(k, v)| (k.as_str(), *v))
    }

    pub fn state(&self, peer: &str) -> Option<PeerState> {
        self.peers.get(peer).copied()
    }

    /// The set is now `set` (resolved from the static list and DNS).
    pub fn set_peers(&mut self, set: &[String]) -> Vec<Transition> {
        let mut out = Vec::new();
        let gone: Vec<String> = self
            .peers
            .keys()
            .filter(|p| !set.contains(p))
            .cloned()
            .collect();
        for peer in gone {
            self.peers.remove(&peer);
            out.push(Transition::Left(peer));
        }
        for peer in set {
            if !self.peers.contains_key(peer) {
                self.peers.insert(peer.clone(), PeerState::Unknown);
                out.push(Transition::Joined(peer.clone()));
            }
        }
        self.reconciles_total += out.len() as u64;
        out
    }

    /// A probe (or a send) found `peer` in state `to`.
    pub fn observe(&mut self, peer: &str, to: PeerState) -> Option<Transition> {
        let state = self.peers.get_mut(peer)?;
        if *state == to || *state == PeerState::Myself {
            return None;
        }
        let from = std::mem::replace(state, to);
        self.reconciles_total += 1;
        Some(Transition::Changed {
            peer: peer.to_string(),
            from,
            to,
        })
    }
}

/// How a send failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The peer answered but did not take it (a 5xx, a 408, a 429): try
    /// again after the backoff.
    Unwell,
    /// The connection itself failed: the peer is down.
    Down,
    /// The peer has no room for it (507): full until a write is taken.
    Full,
}

/// What the driver should do for one peer now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Probe,
    Send(Next),
    AntiEntropy,
    /// Nothing until this time (or an event).
    WaitUntil(Instant),
    /// Nothing until an event.
    Idle,
}

/// Everything the replication thread decides for one peer.
#[derive(Clone, Debug)]
pub struct PeerPolicy {
    pub state: PeerState,
    pub backoff: Backoff,
    pub cursor: OutboxCursor,
    probe_in_flight: bool,
    next_probe_at: Instant,
    probe_interval: Duration,
    /// Anti-entropy is due (peer returned, overflow, period).
    pub anti_entropy_due: bool,
    /// Bumped each time the peer is found down: sends started before are
    /// given up for lost (sent again), and their late failures change
    /// nothing ([`PeerPolicy::is_current`]).
    pub generation: u64,
    anti_entropy_running: bool,
    next_anti_entropy_at: Instant,
    anti_entropy_interval: Duration,
    /// Sends still in flight that started before the peer was found full:
    /// their answers say nothing about its room now, so they do not make it
    /// up again (only a write sent while it is full does).
    sent_before_full: usize,
}

impl PeerPolicy {
    pub fn new(
        now: Instant,
        acked: u64,
        probe_interval: Duration,
        anti_entropy_interval: Duration,
    ) -> PeerPolicy {
        PeerPolicy {
            state: PeerState::Unknown,
            backoff: Backoff::default(),
            cursor: OutboxCursor::at(acked),
            probe_in_flight: false,
            next_probe_at: now,
            probe_interval,
            anti_entropy_due: false,
            generation: 0,
            anti_entropy_running: false,
            next_anti_entropy_at: now + anti_entropy_interval,
            anti_entropy_interval,
            sent_before_full: 0,
        }
    }

    /// What to do now, given the outbox's end offset. Call repeatedly until
    /// it answers `WaitUntil` or `Idle`; each `Probe`/`Send`/`AntiEntropy`
    /// must be followed by the matching `on_*` call.
    pub fn next(&mut self, now: Instant, end: u64) -> Action {
        if self.state == PeerState::Myself {
            return Action::Idle;
        }
        if now >= self.next_anti_entropy_at {
            self.anti_entropy_due = true;
            self.next_anti_entropy_at = now + self.anti_entropy_interval;
        }
        if !self.backoff.ready(now) {
            return self.backoff.until().map_or(Action::Idle, Action::WaitUntil);
        }
        let attempt_in_flight = self.probe_in_flight || self.cursor.in_flight() > 0;
        if self.state != PeerState::Up && self.state != PeerState::Full {
            // One attempt at a time while the peer is not known up: a dead
            // peer costs one connection per backoff window, whatever the
            // backlog.
            if attempt_in_flight {
                return Action::Idle;
            }
            self.probe_in_flight = true;
            return Action::Probe;
        }
        if now >= self.next_probe_at && !self.probe_in_flight {
            self.probe_in_flight = true;
            return Action::Probe;
        }
        if self.anti_entropy_due
            && !self.anti_entropy_running
            && self.backoff.failures() == 0
            && self.state == PeerState::Up
        {
            self.anti_entropy_running = true;
            self.anti_entropy_due = false;
            return Action::AntiEntropy;
        }
        let window = if self.backoff.failures() > 0 {
            1
        } else if self.cursor.in_flight_bytes() >= SEND_BYTES_IN_FLIGHT_MAX {
            self.cursor.in_flight()
        } else {
            SEND_WINDOW_MAX
        };
        match self.cursor.next(end, window) {
            Some(next) => Action::Send(next),
            None => Action::WaitUntil(self.next_probe_at.min(self.next_anti_entropy_at)),
        }
    }

    /// A probe answered (`Some(true)`: up; `Some(false)`: it is this node)
    /// or failed (`None`). Returns the membership state to record.
    pub fn on_probe(&mut self, now: Instant, outcome: Option<bool>, rng: &mut Rng) -> PeerState {
        self.probe_in_flight = false;
        self.next_probe_at = now + self.probe_interval;
        match outcome {
            Some(false) => self.state = PeerState::Myself,
            // A full peer answers probes: only a write it takes clears it
            // (and its backoff).
            Some(true) if self.state == PeerState::Full => {}
            Some(true) => {
                self.backoff.on_success();
                if self.state == PeerState::Down {
                    // Back after being down: what it missed beyond the
                    // outbox (an overflow, a crash of ours) is found by
                    // comparing summaries.
                    self.anti_entropy_due = true;
                }
                self.state = PeerState::Up;
            }
            None => {
                self.backoff.on_failure(now, rng);
                self.backoff.cap(now, DOWN_RETRY_MAX_MS, rng);
                self.went_down();
            }
        }
        self.state
    }

    /// A send of `start` finished. `Ok(())`: the peer took it (or refused
    /// it for good); `Err(how)`: it failed, and how. (A repair is a send
    /// with no outbox offset: pass `u64::MAX`.)
    pub fn on_send(
        &mut self,
        now: Instant,
        start: u64,
        outcome: Result<(), Failure>,
        rng: &mut Rng,
    ) -> PeerState {
        let sent_before_full = self.state == PeerState::Full && self.sent_before_full > 0;
        if sent_before_full {
            self.sent_before_full -= 1;
        }
        match outcome {
            Ok(()) => {
                self.cursor.on_ack(start);
                if !sent_before_full {
                    self.backoff.on_success();
                    if self.state == PeerState::Full {
                        self.state = PeerState::Up;
                    }
                }
            }
            Err(how) => {
                self.cursor.on_fail(start);
                // Several sends in flight may fail together: one failure
                // per window, not one doubling per request.
                if self.backoff.ready(now) {
                    self.backoff.on_failure(now, rng);
                }
                match how {
                    Failure::Down => self.went_down(),
                    Failure::Full if self.state == PeerState::Up => {
                        self.state = PeerState::Full;
                        self.sent_before_full = self.cursor.in_flight();
                    }
                    Failure::Full if self.state != PeerState::Down => self.state = PeerState::Full,
                    Failure::Full | Failure::Unwell => {}
                }
                if how != Failure::Unwell {
                    self.backoff.cap(now, DOWN_RETRY_MAX_MS, rng);
                }
            }
        }
        self.state
    }

    /// The peer does not answer: what is in flight to it may sit in a stuck
    /// connection for its whole timeout (a silent drop), so it is given up
    /// for lost and sent again, first, once the peer answers; meanwhile
    /// probes go on (one at a time, nothing else in flight).
    fn went_down(&mut self) {
        if self.cursor.in_flight() > 0 || self.state != PeerState::Down {
            self.cursor.requeue_in_flight();
            self.generation += 1;
        }
        self.state = PeerState::Down;
    }

    /// Whether an answer to a send started in `generation` still counts as
    /// the send's outcome (its peer has not been found down since).
    pub fn is_current(&self, generation: u64) -> bool {
        generation == self.generation
    }

    /// Whether a request may start now besides what the cursor asks for (a
    /// repair): the peer answers, its backoff is over, and while it fails
    /// nothing else is in flight (one attempt at a time, as for the outbox).
    pub fn may_send_more(&self, now: Instant, in_flight: usize) -> bool {
        matches!(self.state, PeerState::Up | PeerState::Full)
            && self.backoff.ready(now)
            && (self.backoff.failures() == 0 || in_flight == 0)
    }

    pub fn on_anti_entropy(&mut self, now: Instant, ok: bool, rng: &mut Rng) {
        self.anti_entropy_running = false;
        if !ok {
            self.anti_entropy_due = true;
            if self.backoff.ready(now) {
                self.backoff.on_failure(now, rng);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::backoff::{BACKOFF_FIRST_MS, JITTER_PERMILLE};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn membership_reconciles_only_on_transitions() {
        let mut m = Membership::default();
        let set = vec!["a:1".to_string(), "b:1".to_string()];
        assert_eq!(m.set_peers(&set).len(), 2);
        assert!(m.set_peers(&set).is_empty(), "same set: nothing");
        assert!(m.observe("a:1", PeerState::Up).is_some());
        for _ in 0..10_000 {
            assert!(m.observe("a:1", PeerState::Up).is_none());
        }
        assert_eq!(m.reconciles_total, 3);
        assert!(m.observe("a:1", PeerState::Down).is_some());
        assert_eq!(m.set_peers(&["b:1".to_string()]).len(), 1);
        assert_eq!(m.state("a:1"), None);
        assert!(
            m.observe("a:1", PeerState::Up).is_none(),
            "gone peers are ignored"
        );
        assert!(m.observe("b:1", PeerState::Myself).is_some());
        assert!(m.observe("b:1", PeerState::Up).is_none(), "self stays self");
    }

    /// A healthy peer gets a window of sends at once, bounded by count and
    /// by bytes; a failing one gets one at a time.
    #[test]
    fn the_send_window_is_bounded_by_count_and_bytes() {
        let t0 = Instant::now();
        let mut rng = Rng::new(3);
        let rows: &[(u64, usize)] = &[
            // (artifact bytes per entry, sends the policy starts at once)
            (4096, SEND_WINDOW_MAX),
            (SEND_BYTES_IN_FLIGHT_MAX / 4, 4),
            (SEND_BYTES_IN_FLIGHT_MAX * 2, 1),
        ];
        for &(bytes, want) in rows {
            let mut p = PeerPolicy::new(t0, 0, ms(1000), ms(600_000));
            assert_eq!(p.next(t0, 1_000_000), Action::Probe);
            p.on_probe(t0, Some(true), &mut rng);
            let mut started = 0;
            while let Action::Send(Next::New { start }) = p.next(t0, 1_000_000) {
                p.cursor
                    .on_sent(start, start + 10, crate::delivery::Lag::one(bytes, 1));
                started += 1;
                assert!(started <= SEND_WINDOW_MAX, "unbounded");
            }
            assert_eq!(started, want, "entries of {bytes} bytes");
            // A failure: one at a time until a success.
            p.on_send(t0, 0, Err(Failure::Unwell), &mut rng);
            let later = t0 + ms(61_000);
            let mut again = 0;
            while let Action::Send(next) = p.next(later, 1_000_000) {
                let (start, end) = match next {
                    Next::Again { start, end } => (start, end),
                    Next::New { start } => (start, start + 10),
                };
                p.cursor
                    .on_sent(start, end, crate::delivery::Lag::one(bytes, 1));
                again += 1;
                assert!(again <= 1);
            }
            assert!(p.cursor.in_flight() <= want.max(1));
        }
    }

    /// A 507 makes the peer full: its writes go one at a time after its
    /// backoff, probes that find it answering do not clear it, anti-entropy
    /// waits, and the first write it takes makes it up again.
    #[test]
    fn a_full_peer_is_a_state_retried_with_backoff() {
        let t0 = Instant::now();
        let mut rng = Rng::new(9);
        let owed = crate::delivery::Lag::one(10, 1);
        let mut p = PeerPolicy::new(t0, 0, ms(1000), ms(600_000));
        assert_eq!(p.next(t0, 100), Action::Probe);
        p.on_probe(t0, Some(true), &mut rng);
        assert_eq!(p.next(t0, 100), Action::Send(Next::New { start: 0 }));
        p.cursor.on_sent(0, 10, owed);
        assert_eq!(
            p.on_send(t0, 0, Err(Failure::Full), &mut rng),
            PeerState::Full
        );
        assert_eq!(p.cursor.retrying(), 1, "kept for the retry");
        assert!(!p.may_send_more(t0, 0), "backoff first");
        let Action::WaitUntil(until) = p.next(t0, 100) else {
            panic!("waits for the backoff");
        };
        assert!(until >= t0 + ms(BACKOFF_FIRST_MS * 9 / 10));
        // A probe answers: still full, still backing off.
        p.anti_entropy_due = true;
        let t1 = until;
        assert_eq!(p.next(t1, 100), Action::Probe);
        assert_eq!(p.on_probe(t1, Some(true), &mut rng), PeerState::Full);
        assert!(p.backoff.failures() > 0);
        // The retry goes alone; anti-entropy waits for room.
        assert_eq!(
            p.next(t1, 100),
            Action::Send(Next::Again { start: 0, end: 10 })
        );
        p.cursor.on_sent(0, 10, owed);
        assert!(
            matches!(p.next(t1, 100), Action::WaitUntil(_)),
            "one at a time"
        );
        assert!(!p.may_send_more(t1, 1));
        assert_eq!(
            p.on_send(t1, 0, Err(Failure::Full), &mut rng),
            PeerState::Full
        );
        let t2 = p.backoff.until().expect("backing off");
        assert!(t2 > t1 + ms(BACKOFF_FIRST_MS), "doubled");
        assert!(
            t2 <= t1 + ms(DOWN_RETRY_MAX_MS * 11 / 10),
            "a full peer is retried within the cap"
        );
        assert!(p.may_send_more(t2, 0));
        let mut next = p.next(t2, 100);
        if next == Action::Probe {
            assert_eq!(p.on_probe(t2, Some(true), &mut rng), PeerState::Full);
            next = p.next(t2, 100);
        }
        assert_eq!(next, Action::Send(Next::Again { start: 0, end: 10 }));
        p.cursor.on_sent(0, 10, owed);
        assert_eq!(p.on_send(t2, 0, Ok(()), &mut rng), PeerState::Up);
        assert_eq!(p.backoff.failures(), 0);
        assert_eq!(p.next(t2, 100), Action::AntiEntropy);
    }

    /// Writes in flight when a 507 arrives were sent before the peer was
    /// full: their successes (it took them while it had room) do not make it
    /// up again, which made the state flap full/up a dozen times a second.
    #[test]
    fn answers_to_writes_sent_before_the_peer_was_full_do_not_clear_it() {
        let t0 = Instant::now();
        let mut rng = Rng::new(3);
        let owed = crate::delivery::Lag::one(10, 1);
        let mut p = PeerPolicy::new(t0, 0, ms(1000), ms(600_000));
        assert_eq!(p.next(t0, 100), Action::Probe);
        p.on_probe(t0, Some(true), &mut rng);
        for start in [0, 10, 20] {
            assert_eq!(p.next(t0, 100), Action::Send(Next::New { start }));
            p.cursor.on_sent(start, start + 10, owed);
        }
        assert_eq!(
            p.on_send(t0, 10, Err(Failure::Full), &mut rng),
            PeerState::Full
        );
        assert_eq!(p.on_send(t0, 0, Ok(()), &mut rng), PeerState::Full);
        assert_eq!(p.on_send(t0, 20, Ok(()), &mut rng), PeerState::Full);
        assert!(p.backoff.failures() > 0, "still backing off");
        // The retry sent while full is what tells.
        let t1 = p.backoff.until().expect("backing off");
        let mut next = p.next(t1, 30);
        if next == Action::Probe {
            assert_eq!(p.on_probe(t1, Some(true), &mut rng), PeerState::Full);
            next = p.next(t1, 30);
        }
        assert_eq!(next, Action::Send(Next::Again { start: 10, end: 20 }));
        p.cursor.on_sent(10, 20, owed);
        assert_eq!(p.on_send(t1, 10, Ok(()), &mut rng), PeerState::Up);
    }

    /// A peer found down (a silent drop: its connections hang until their
    /// timeout) gets what was in flight again, first, as soon as a probe
    /// finds it back; late failures of the lost sends count for nothing.
    #[test]
    fn sends_in_flight_to_a_peer_found_down_go_again_when_it_returns() {
        let t0 = Instant::now();
        let mut rng = Rng::new(5);
        let owed = crate::delivery::Lag::one(10, 1);
        let mut p = PeerPolicy::new(t0, 0, ms(1000), ms(600_000));
        assert_eq!(p.next(t0, 100), Action::Probe);
        p.on_probe(t0, Some(true), &mut rng);
        for i in 0..3 {
            assert_eq!(p.next(t0, 100), Action::Send(Next::New { start: i * 10 }));
            p.cursor.on_sent(i * 10, i * 10 + 10, owed);
        }
        let before = p.generation;
        let t1 = t0 + ms(1000);
        assert_eq!(p.next(t1, 100), Action::Probe);
        assert_eq!(p.on_probe(t1, None, &mut rng), PeerState::Down);
        assert!(!p.is_current(before));
        assert_eq!((p.cursor.in_flight(), p.cursor.retrying()), (0, 3));
        assert_eq!(p.cursor.pending().writes, 3, "still owed");
        // Probes go on while the lost sends hang, at most DOWN_RETRY_MAX_MS apart.
        let t2 = p.backoff.until().unwrap();
        assert!(t2 <= t1 + ms(DOWN_RETRY_MAX_MS * 11 / 10));
        assert_eq!(p.next(t2, 100), Action::Probe);
        p.on_probe(t2, None, &mut rng);
        let t3 = p.backoff.until().unwrap();
        assert!(t3 <= t2 + ms(DOWN_RETRY_MAX_MS * 11 / 10));
        assert_eq!(p.next(t3, 100), Action::Probe);
        assert_eq!(p.on_probe(t3, Some(true), &mut rng), PeerState::Up);
        // Back after being down: a comparison is due too, and runs beside.
        assert_eq!(p.next(t3, 100), Action::AntiEntropy);
        assert_eq!(
            p.next(t3, 100),
            Action::Send(Next::Again { start: 0, end: 10 })
        );
    }

    /// A simulated peer over a week, flapping from a seed; the node must
    /// (1) never make more than one connection attempt per backoff window
    /// while the peer is not up, (2) never attempt inside a window, (3)
    /// never lose an entry: everything appended is acknowledged in the end,
    /// and (4) reconcile only on transitions.
    #[test]
    fn a_week_of_flapping_peers() {
        for seed in 1..=4u64 {
            simulate_week(seed);
        }
    }

    fn simulate_week(seed: u64) {
        let t0 = Instant::now();
        let week = Duration::from_secs(7 * 24 * 3600);
        let mut rng = Rng::new(seed);
        let mut world = Rng::new(seed ^ 0xdead_beef);
        let mut p = PeerPolicy::new(t0, 0, ms(1000), ms(600_000));
        let mut m = Membership::default();
        m.set_peers(&["p:1".to_string()]);
        let mut now = t0;
        let mut end = 0u64;
        let mut peer_up = true;
        let mut next_flip = t0 + ms(world.below(3_600_000));
        let mut acked_by_peer = std::collections::BTreeSet::new();
        let mut appended = std::collections::BTreeSet::new();
        let mut attempts_while_down: Vec<Instant> = Vec::new();
        let mut transitions = 0u64;
        let mut last_state = PeerState::Unknown;
        while now < t0 + week {
            if now >= next_flip {
                peer_up = !peer_up;
                next_flip = now + ms(1 + world.below(if peer_up { 3_600_000 } else { 600_000 }));
            }
            if world.below(10) == 0 {
                appended.insert(end);
                end += 10;
            }
            let mut wait = now + ms(1000);
            loop {
                match p.next(now, end) {
                    Action::Probe => {
                        if !peer_up {
                            attempts_while_down.push(now);
                        }
                        let s = p.on_probe(now, peer_up.then_some(true), &mut rng);
                        if let Some(t) = m.observe("p:1", s) {
                            transitions += 1;
                            let _ = t;
                        }
                    }
                    Action::Send(next) => {
                        let (start, stop) = match next {
                            Next::Again { start, end } => (start, end),
                            Next::New { start } => (start, start + 10),
                        };
                        assert!(p.backoff.ready(now), "no attempt inside a window");
                        p.cursor
                            .on_sent(start, stop, crate::delivery::Lag::one(1, 1));
                        if !peer_up {
                            attempts_while_down.push(now);
                        }
                        // Answers come back at once in this model.
                        let outcome = if peer_up { Ok(()) } else { Err(Failure::Down) };
                        if outcome.is_ok() {
                            acked_by_peer.insert(start);
                        }
                        let s = p.on_send(now, start, outcome, &mut rng);
                        if m.observe("p:1", s).is_some() {
                            transitions += 1;
                        }
                    }
                    Action::AntiEntropy => p.on_anti_entropy(now, peer_up, &mut rng),
                    Action::WaitUntil(t) => {
                        wait = wait.min(t.max(now + ms(1)));
                        break;
                    }
                    Action::Idle => break,
                }
                if p.state != last_state {
                    last_state = p.state;
                }
            }
            now = wait;
        }
        // Let the peer come back and drain.
        let mut guard = 0;
        while p.cursor.acked() < end && guard < 100_000 {
            guard += 1;
            match p.next(now, end) {
                Action::Probe => {
                    let s = p.on_probe(now, Some(true), &mut rng);
                    if m.observe("p:1", s).is_some() {
                        transitions += 1;
                    }
                }
                Action::Send(next) => {
                    let (start, stop) = match next {
                        Next::Again { start, end } => (start, end),
                        Next::New { start } => (start, start + 10),
                    };
                    p.cursor
                        .on_sent(start, stop, crate::delivery::Lag::one(1, 1));
                    acked_by_peer.insert(start);
                    p.on_send(now, start, Ok(()), &mut rng);
                }
                Action::AntiEntropy => p.on_anti_entropy(now, true, &mut rng),
                Action::WaitUntil(t) => now = t.max(now + ms(1)),
                Action::Idle => now += ms(100),
            }
        }
        assert_eq!(
            p.cursor.acked(),
            end,
            "seed {seed}: everything acknowledged"
        );
        assert!(
            appended.is_subset(&acked_by_peer),
            "seed {seed}: an entry was never taken"
        );
        // Attempts while the peer was down are spaced by at least the
        // shortest window (2 s less jitter): one per window.
        for pair in attempts_while_down.windows(2) {
            let gap = pair[1].duration_since(pair[0]);
            assert!(
                gap >= ms(BACKOFF_FIRST_MS * (1000 - JITTER_PERMILLE) / 1000),
                "seed {seed}: two attempts {gap:?} apart while down"
            );
        }
        assert_eq!(m.reconciles_total, transitions + 1, "seed {seed}");
    }
}
