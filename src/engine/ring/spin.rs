//! Whether an engine thread polls its ring before it sleeps (`engine_spin_us`).
//!
//! Polling after a turn with work saves the wake-up of the next completion
//! when it comes soon: at 4 KiB GETs with one connection it triples the
//! request rate (docs/operations.md). When the next completion does not come
//! within the spin, the poll is lost CPU, and its `sched_yield` calls hand
//! the core to whatever else is runnable just when this thread's next
//! request may need it: with three nodes on two cores and replication
//! running, `bench/mesh`'s public p99 was 3.7–5.0 ms spinning and 1.9–3.4 ms
//! not (docs/benchmarks.md, issue 21). So the thread keeps a moving share of
//! its spins that a completion ended, and spins while that share is at least
//! half. While it does not, every 16th wait after work spins all the same,
//! to learn whether spinning pays again: a wait spent asleep cannot say, as
//! it includes the wake-up the spin exists to save. Sans-IO: the caller
//! says how each wait went.

use std::time::Duration;

/// Fixed-point scale of the share.
const SCALE: u32 = 1024;
/// Each spin moves the share by an eighth of the way to 0 or 1: about the
/// last 16 spins count.
const WEIGHT_SHIFT: u32 = 3;
/// Spin while at least half of the recent spins were ended by a completion.
const SPIN_AT: u32 = SCALE / 2;
/// While spinning does not pay, one wait after work in this many spins all
/// the same (a probe).
const PROBE_EVERY: u32 = 16;
/// A wait this short found its completion already there (the send just
/// submitted, say): it says nothing about whether spinning pays.
const IMMEDIATE: Duration = Duration::from_micros(5);

/// One engine thread's record of how its spins ended.
#[derive(Debug)]
pub(super) struct SpinGate {
    spin: Duration,
    /// Share of recent spins that a completion ended, of `SCALE`.
    caught: u32,
    /// Waits after work since the last spin, while the share is low.
    skipped: u32,
}

impl SpinGate {
    /// A gate for spins of `spin` (zero: never spin). It starts open.
    pub(super) fn new(spin: Duration) -> SpinGate {
        SpinGate {
            spin,
            caught: SCALE,
            skipped: 0,
        }
    }

    /// How long to poll before sleeping after a turn with work; zero: sleep.
    pub(super) fn spin(&mut self) -> Duration {
        if self.caught >= SPIN_AT {
            return self.spin;
        }
        self.skipped += 1;
        if self.skipped < PROBE_EVERY {
            return Duration::ZERO;
        }
        self.skipped = 0;
        self.spin
    }

    /// A wait that spun for up to [`SpinGate::spin`] took `waited` until
    /// its first completion or its timeout. (Waits that slept at once are
    /// not reported.)
    pub(super) fn spun(&mut self, waited: Duration) {
        if self.spin.is_zero() || waited < IMMEDIATE {
            return;
        }
        let caught = if waited <= self.spin { SCALE } else { 0 };
        self.caught = self.caught - (self.caught >> WEIGHT_SHIFT) + (caught >> WEIGHT_SHIFT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPIN: Duration = Duration::from_micros(50);
    const AT_ONCE: Duration = Duration::from_micros(1);
    const SOON: Duration = Duration::from_micros(20);
    const LATE: Duration = Duration::from_micros(900);

    /// Waits after work until the gate says to spin; how many it took.
    fn waits_until_a_spin(gate: &mut SpinGate) -> u32 {
        (1..=1000).find(|_| !gate.spin().is_zero()).unwrap()
    }

    #[test]
    fn a_steady_stream_keeps_the_spin_and_one_late_request_does_not_stop_it() {
        let mut gate = SpinGate::new(SPIN);
        for _ in 0..1000 {
            assert_eq!(gate.spin(), SPIN);
            gate.spun(AT_ONCE); // the send
            gate.spun(SOON); // the next request
        }
        gate.spun(LATE);
        assert_eq!(gate.spin(), SPIN);
    }

    #[test]
    fn spins_that_find_nothing_stop_it_but_for_probes_that_restart_it() {
        let mut gate = SpinGate::new(SPIN);
        // A send completes at once, then the next request is a millisecond
        // away: the sends say nothing, and every real spin is lost.
        for _ in 0..16 {
            gate.spun(AT_ONCE);
            gate.spun(LATE);
        }
        assert!(gate.caught < SPIN_AT, "{gate:?}");
        for _ in 0..10 {
            assert_eq!(waits_until_a_spin(&mut gate), PROBE_EVERY);
            gate.spun(LATE);
        }
        // Requests come within the spin again: probes find them, and a few
        // of them reopen the gate.
        let mut probes = 0;
        while gate.spin().is_zero() {
            waits_until_a_spin(&mut gate);
            gate.spun(SOON);
            probes += 1;
            assert!(probes <= 8, "still closed after {probes} caught probes");
        }
        assert_eq!(gate.spin(), SPIN);
    }

    #[test]
    fn the_share_stays_in_range_and_a_zero_spin_never_spins() {
        let mut gate = SpinGate::new(SPIN);
        for i in 0..10_000u32 {
            gate.spun(if i % 3 == 0 { LATE } else { SOON });
            assert!(gate.caught <= SCALE);
        }
        let mut never = SpinGate::new(Duration::ZERO);
        never.spun(SOON);
        assert!((0..100).all(|_| never.spin().is_zero()));
    }
}
