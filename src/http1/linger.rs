//! The lingering close: after a response that closes the connection while the
//! request's body may still be arriving, read and discard input for a bounded
//! while before closing.
//!
//! Closing a socket with unread input makes the kernel send a reset, and a
//! reset that reaches the client before it reads the response discards the
//! response too. Clients that write their whole body before reading (Gradle
//! 4.x's HTTP client, most simple ones) then see `Broken pipe` instead of the
//! 413 or 400, retry, and give up on the cache. nginx's `lingering_close`
//! solves this with the same three bounds (`lingering_time`,
//! `lingering_timeout`, and here also a byte cap). This is the policy alone,
//! with the clock passed in; the ring engine and the hyper front drive it.

use std::time::{Duration, Instant};

/// Bounds on a lingering close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LingerLimits {
    /// Longest linger in all, in ms (`lingering_time_ms`, default 30000);
    /// 0 closes at once.
    pub time_ms: u64,
    /// Longest wait for the next input, in ms (`lingering_timeout_ms`,
    /// default 5000).
    pub timeout_ms: u64,
    /// Most bytes discarded (`lingering_bytes_max`, default 256 MiB); 0
    /// closes at once.
    pub bytes_max: u64,
}

impl Default for LingerLimits {
    fn default() -> Self {
        LingerLimits {
            time_ms: 30_000,
            timeout_ms: 5_000,
            bytes_max: 256 * 1024 * 1024,
        }
    }
}

/// One connection's lingering close in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Linger {
    limits: LingerLimits,
    until: Instant,
    discarded_bytes: u64,
}

/// What to do after a read (or at the start).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LingerStep {
    /// Read again; close if nothing arrives by `deadline`.
    ReadUntil(Instant),
    /// Close now: the client closed, or a bound was reached.
    Close,
}

impl Linger {
    /// Starts lingering at `now`, or `None` when the limits turn it off.
    pub fn start(limits: LingerLimits, now: Instant) -> Option<(Linger, LingerStep)> {
        if limits.time_ms == 0 || limits.bytes_max == 0 {
            return None;
        }
        let linger = Linger {
            limits,
            until: now + Duration::from_millis(limits.time_ms),
            discarded_bytes: 0,
        };
        let step = linger.next_read(now);
        Some((linger, step))
    }

    /// `received` bytes were read and discarded at `now` (0: the client
    /// closed its side).
    pub fn on_read(&mut self, received: usize, now: Instant) -> LingerStep {
        self.discarded_bytes = self.discarded_bytes.saturating_add(received as u64);
        if received == 0 || self.discarded_bytes >= self.limits.bytes_max || now >= self.until {
            return LingerStep::Close;
        }
        self.next_read(now)
    }

    /// Bytes discarded so far.
    pub fn discarded_bytes(&self) -> u64 {
        self.discarded_bytes
    }

    fn next_read(&self, now: Instant) -> LingerStep {
        let idle = now + Duration::from_millis(self.limits.timeout_ms);
        LingerStep::ReadUntil(idle.min(self.until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: LingerLimits = LingerLimits {
        time_ms: 1_000,
        timeout_ms: 300,
        bytes_max: 1_000,
    };

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn each_read_waits_the_idle_time_within_the_total() {
        let t0 = Instant::now();
        let (mut linger, step) = Linger::start(LIMITS, t0).expect("on");
        assert_eq!(step, LingerStep::ReadUntil(ms(t0, 300)));
        assert_eq!(
            linger.on_read(10, ms(t0, 200)),
            LingerStep::ReadUntil(ms(t0, 500))
        );
        // Near the end, the total time caps the idle wait.
        assert_eq!(
            linger.on_read(10, ms(t0, 900)),
            LingerStep::ReadUntil(ms(t0, 1_000))
        );
        assert_eq!(linger.on_read(10, ms(t0, 1_000)), LingerStep::Close);
        assert_eq!(linger.discarded_bytes(), 30);
    }

    #[test]
    fn the_client_closing_or_the_byte_cap_ends_it() {
        let t0 = Instant::now();
        let (mut linger, _) = Linger::start(LIMITS, t0).expect("on");
        assert_eq!(linger.on_read(0, t0), LingerStep::Close);
        let (mut linger, _) = Linger::start(LIMITS, t0).expect("on");
        assert!(matches!(linger.on_read(999, t0), LingerStep::ReadUntil(_)));
        assert_eq!(linger.on_read(1, t0), LingerStep::Close);
    }

    #[test]
    fn zero_time_or_bytes_turns_it_off() {
        let t0 = Instant::now();
        for limits in [
            LingerLimits {
                time_ms: 0,
                ..LIMITS
            },
            LingerLimits {
                bytes_max: 0,
                ..LIMITS
            },
        ] {
            assert_eq!(Linger::start(limits, t0), None, "{limits:?}");
        }
    }
}
