//! How far a target is behind: the acknowledged writes (and deletes) it is
//! not known to hold, wherever they are (queued in the outbox, in flight,
//! failed and waiting for a retry, owed by an overflow, handed to an
//! anti-entropy repair). Zero means the target acknowledged every write this
//! node knows of, and nothing else.
//!
//! Each part of the delivery machinery keeps a [`Lag`] for what it holds;
//! the gauges add them up. Adding is exact for the counts and bytes and
//! takes the oldest for the age, so a write counted in two parts at once
//! (for a moment, while it moves from one to the next) is counted twice,
//! never zero times: the gauges may over-count for a moment, never
//! under-count.

/// A set of writes a target is not known to hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lag {
    /// How many writes and deletes.
    pub writes: u64,
    /// Their artifact bytes (a delete counts 0).
    pub bytes: u64,
    /// When the oldest was acknowledged, ms since the epoch (0: none).
    pub oldest_ms: u64,
}

impl Lag {
    /// One write of `bytes`, acknowledged at `at_ms`.
    pub fn one(bytes: u64, at_ms: u64) -> Lag {
        Lag {
            writes: 1,
            bytes,
            oldest_ms: at_ms.max(1),
        }
    }

    /// Nothing owed.
    pub fn is_zero(&self) -> bool {
        self.writes == 0
    }

    /// Add `other`: counts and bytes sum, the oldest stays the oldest.
    pub fn add(&mut self, other: Lag) {
        if other.writes == 0 {
            return;
        }
        self.writes = self.writes.saturating_add(other.writes);
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.oldest_ms = match (self.oldest_ms, other.oldest_ms) {
            (0, o) | (o, 0) => o,
            (a, b) => a.min(b),
        };
    }

    /// The sum of `self` and `other`.
    pub fn plus(mut self, other: Lag) -> Lag {
        self.add(other);
        self
    }

    /// The larger of two estimates of one set of writes (counts and bytes
    /// each at their larger, the older oldest): for a set known both as a
    /// lower bound (owed by an overflow) and by a listing of part of it.
    pub fn at_least(mut self, other: Lag) -> Lag {
        if other.writes == 0 {
            return self;
        }
        if self.writes == 0 {
            return other;
        }
        self.writes = self.writes.max(other.writes);
        self.bytes = self.bytes.max(other.bytes);
        self.oldest_ms = self.oldest_ms.min(other.oldest_ms.max(1));
        self
    }

    /// Age of the oldest write at `now_ms`, ms (0 when nothing is owed).
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        if self.writes == 0 || self.oldest_ms == 0 {
            0
        } else {
            now_ms.saturating_sub(self.oldest_ms)
        }
    }

    /// `/status`'s view: writes, bytes and the oldest's age.
    pub fn to_json(self, now_ms: u64) -> serde_json::Value {
        serde_json::json!({
            "writes": self.writes,
            "bytes": self.bytes,
            "oldest_age_ms": self.age_ms(now_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lags_add_and_keep_the_oldest() {
        let rows: &[(&[Lag], Lag)] = &[
            (&[], Lag::default()),
            (&[Lag::one(10, 500)], Lag::one(10, 500)),
            (
                &[Lag::one(10, 500), Lag::one(5, 300), Lag::default()],
                Lag {
                    writes: 2,
                    bytes: 15,
                    oldest_ms: 300,
                },
            ),
            (
                &[Lag::default(), Lag::one(0, 900)],
                Lag {
                    writes: 1,
                    bytes: 0,
                    oldest_ms: 900,
                },
            ),
        ];
        for (parts, want) in rows {
            let mut sum = Lag::default();
            for p in *parts {
                sum.add(*p);
            }
            assert_eq!(sum, *want, "{parts:?}");
        }
        let l = Lag::one(7, 1_000);
        assert_eq!(l.age_ms(1_250), 250);
        assert_eq!(Lag::default().age_ms(1_250), 0);
        assert!(Lag::default().is_zero());
        // A delete at the epoch's first millisecond still counts as owed.
        assert!(!Lag::one(0, 0).is_zero());
        let owed = Lag {
            writes: 10,
            bytes: 100,
            oldest_ms: 50,
        };
        let listed = Lag {
            writes: 4,
            bytes: 200,
            oldest_ms: 20,
        };
        assert_eq!(
            owed.at_least(listed),
            Lag {
                writes: 10,
                bytes: 200,
                oldest_ms: 20
            }
        );
        assert_eq!(Lag::default().at_least(listed), listed);
        assert_eq!(owed.at_least(Lag::default()), owed);
    }
}
