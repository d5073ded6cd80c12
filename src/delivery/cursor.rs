//! One target's position in a durable outbox, sans-IO: what to send next,
//! what is in flight, what failed and goes first, and the durable
//! acknowledged offset. The peers and the object-store tier both use it.

use std::collections::BTreeMap;

use super::Lag;

/// One peer's position in the outbox log (byte offsets). Entries are sent
/// in order, several at once; they may complete out of order, and a failed
/// one is sent again before anything new. The durable cursor is the lowest
/// offset not yet acknowledged: everything before it has been taken by the
/// peer. A crash re-sends from there, which is harmless (re-applying a
/// replicated write changes nothing).
#[derive(Clone, Debug, Default)]
pub struct OutboxCursor {
    /// Next unsent offset.
    read_pos: u64,
    /// Sent, no answer yet: start → (end, what the entry owes the target).
    in_flight: BTreeMap<u64, (u64, Lag)>,
    /// Failed, to send again first: start → (end, what it owes).
    retry: BTreeMap<u64, (u64, Lag)>,
    /// Artifact bytes of the entries in flight.
    in_flight_bytes: u64,
}

/// What the cursor wants sent next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The entry at `start` again (its end is known).
    Again { start: u64, end: u64 },
    /// The entry at `start` (the driver reads it to learn its end).
    New { start: u64 },
}

impl OutboxCursor {
    pub fn at(pos: u64) -> OutboxCursor {
        OutboxCursor {
            read_pos: pos,
            ..OutboxCursor::default()
        }
    }

    /// Everything before this offset has been acknowledged.
    pub fn acked(&self) -> u64 {
        let mut low = self.read_pos;
        if let Some((&s, _)) = self.in_flight.first_key_value() {
            low = low.min(s);
        }
        if let Some((&s, _)) = self.retry.first_key_value() {
            low = low.min(s);
        }
        low
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Artifact bytes of the entries in flight.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    /// Entries failed and waiting to be sent again.
    pub fn retrying(&self) -> usize {
        self.retry.len()
    }

    /// The next offset never sent: everything from here to the outbox's
    /// end is still queued.
    pub fn read_pos(&self) -> u64 {
        self.read_pos
    }

    /// What the entries sent but not acknowledged (in flight, or failed
    /// and waiting) owe the target. With the outbox's own count from
    /// [`OutboxCursor::read_pos`] to its end, this is everything the
    /// outbox holds for the target.
    pub fn pending(&self) -> Lag {
        let mut lag = Lag::default();
        for (_, owed) in self.in_flight.values().chain(self.retry.values()) {
            lag.add(*owed);
        }
        lag
    }

    /// What to send next, if `window` allows and there is anything before `end`.
    pub fn next(&self, end: u64, window: usize) -> Option<Next> {
        if self.in_flight.len() >= window {
            return None;
        }
        if let Some((&start, &(stop, _))) = self.retry.first_key_value() {
            return Some(Next::Again { start, end: stop });
        }
        (self.read_pos < end).then_some(Next::New {
            start: self.read_pos,
        })
    }

    /// The entry `start..end` is on its way; `owed` is what it stands for
    /// (one write, its bytes, when it was acknowledged).
    pub fn on_sent(&mut self, start: u64, end: u64, owed: Lag) {
        self.retry.remove(&start);
        if let Some((_, old)) = self.in_flight.insert(start, (end, owed)) {
            self.in_flight_bytes = self.in_flight_bytes.saturating_sub(old.bytes);
        }
        self.in_flight_bytes = self.in_flight_bytes.saturating_add(owed.bytes);
        if start == self.read_pos {
            self.read_pos = end;
        }
    }

    /// The entry `start..end` needs no sending (its artifact is gone, or it
    /// was already handled): as good as acknowledged.
    pub fn skip(&mut self, start: u64, end: u64) {
        self.retry.remove(&start);
        self.take_in_flight(start);
        if start == self.read_pos {
            self.read_pos = end;
        }
    }

    /// The target took the entry at `start` (from this send, or from an
    /// earlier one whose answer came late: it may be waiting for a retry).
    pub fn on_ack(&mut self, start: u64) {
        self.take_in_flight(start);
        self.retry.remove(&start);
    }

    /// Whether the entry at `start` is in flight.
    pub fn is_in_flight(&self, start: u64) -> bool {
        self.in_flight.contains_key(&start)
    }

    /// Every entry in flight is given up for lost (the target stopped
    /// answering: their connections may be stuck for their whole timeout)
    /// and waits to be sent again, first.
    pub fn requeue_in_flight(&mut self) {
        self.retry.append(&mut self.in_flight);
        self.in_flight_bytes = 0;
    }

    /// The entry `start` waiting for a retry stands for `parts` (start,
    /// end, owed each): they wait instead, each on its own (a batch the
    /// target does not take, to be sent one by one).
    pub fn split_retry(&mut self, start: u64, parts: impl Iterator<Item = (u64, u64, Lag)>) {
        if self.retry.remove(&start).is_none() {
            return;
        }
        for (s, e, owed) in parts {
            self.retry.insert(s, (e, owed));
        }
    }

    pub fn on_fail(&mut self, start: u64) {
        if let Some(entry) = self.take_in_flight(start) {
            self.retry.insert(start, entry);
        }
    }

    fn take_in_flight(&mut self, start: u64) -> Option<(u64, Lag)> {
        let entry = self.in_flight.remove(&start)?;
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(entry.1.bytes);
        Some(entry)
    }

    /// Nothing before `pos` needs sending any more (the peer overflowed and
    /// anti-entropy covers it). Answers to entries before `pos` still in
    /// flight are ignored when they come.
    pub fn jump(&mut self, pos: u64) {
        self.read_pos = self.read_pos.max(pos);
        self.retry.retain(|&s, _| s >= pos);
        self.in_flight.retain(|&s, _| s >= pos);
        self.in_flight_bytes = self.in_flight.values().map(|(_, l)| l.bytes).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_the_target_refuses_is_retried_entry_by_entry() {
        let mut c = OutboxCursor::at(0);
        let owed = |i: u64| Lag::one(100, 1000 + i);
        let mut batch = Lag::default();
        for i in 0..3 {
            batch.add(owed(i));
        }
        // Three entries of 10 bytes in one request.
        c.on_sent(0, 30, batch);
        assert_eq!(c.read_pos(), 30);
        assert_eq!(c.pending().writes, 3);
        c.on_fail(0);
        c.split_retry(0, (0..3).map(|i| (i * 10, i * 10 + 10, owed(i))));
        assert_eq!(c.retrying(), 3);
        assert_eq!(c.pending(), batch, "the same writes still owed");
        for i in 0..3 {
            assert_eq!(
                c.next(100, 8),
                Some(Next::Again {
                    start: i * 10,
                    end: i * 10 + 10
                })
            );
            c.on_sent(i * 10, i * 10 + 10, owed(i));
        }
        c.on_ack(10);
        assert_eq!(c.acked(), 0);
        c.on_ack(0);
        c.on_ack(20);
        assert_eq!(c.acked(), 30);
        // Not waiting for a retry: nothing to split.
        c.split_retry(30, std::iter::once((30, 40, owed(3))));
        assert_eq!(c.retrying(), 0);
    }

    #[test]
    fn cursor_acks_out_of_order_and_retries_first() {
        let mut c = OutboxCursor::at(0);
        // Entries of 10 bytes each, for writes of 100 bytes acknowledged at 1000 + i.
        let owed = |i: u64| Lag::one(100, 1000 + i);
        for i in 0..4 {
            assert_eq!(c.next(100, 8), Some(Next::New { start: i * 10 }));
            c.on_sent(i * 10, i * 10 + 10, owed(i));
        }
        assert_eq!(c.next(100, 4), None, "window full");
        assert_eq!(c.pending().writes, 4);
        assert_eq!(c.in_flight_bytes(), 400);
        c.on_ack(10);
        c.on_ack(30);
        assert_eq!(c.acked(), 0);
        c.on_fail(0);
        assert_eq!(c.retrying(), 1);
        assert_eq!(c.in_flight_bytes(), 100, "entry 2 only");
        // Failed and waiting still owes: two entries, the oldest is entry 0.
        assert_eq!(
            c.pending(),
            Lag {
                writes: 2,
                bytes: 200,
                oldest_ms: 1000
            }
        );
        assert_eq!(c.next(100, 8), Some(Next::Again { start: 0, end: 10 }));
        c.on_sent(0, 10, owed(0));
        c.on_ack(0);
        assert_eq!(c.acked(), 20);
        assert_eq!(c.pending(), owed(2));
        c.on_ack(20);
        assert_eq!(c.acked(), 40);
        assert!(c.pending().is_zero());
        assert_eq!(c.read_pos(), 40);
        c.skip(40, 55);
        assert_eq!(c.acked(), 55);
        c.on_sent(55, 60, owed(5));
        c.jump(80);
        assert_eq!(c.acked(), 80);
        assert!(
            c.pending().is_zero(),
            "jumped over: anti-entropy owes it now"
        );
        c.on_ack(55); // late answer before the jump: ignored
        assert_eq!(c.acked(), 80);
        // Lost in flight: sent again first; a late answer of the lost send
        // still counts.
        c.on_sent(80, 90, owed(8));
        c.on_sent(90, 95, owed(9));
        c.requeue_in_flight();
        assert_eq!(
            (c.in_flight(), c.retrying(), c.in_flight_bytes()),
            (0, 2, 0)
        );
        assert_eq!(c.pending().writes, 2);
        assert_eq!(c.next(100, 8), Some(Next::Again { start: 80, end: 90 }));
        c.on_ack(90);
        assert_eq!(c.retrying(), 1);
        assert!(!c.is_in_flight(80));
    }
}
