//! The fallback's connection slots: admission, shedding of idle connections, and the cap per
//! client address. Plain data behind one mutex: no sockets and no clock of its own (the caller
//! passes what it knows about each connection), so the policy is tested without a runtime.
//!
//! When all `connections_max` slots are taken, a new connection is admitted by closing the
//! open connection that has been idle longest: one with no request in flight (an HTTP/1
//! keep-alive between requests, an HTTP/2 connection with no open stream, or a connection
//! still before its first request), as nginx reuses keep-alive connections when
//! `worker_connections` run out. Connections that serve a request are never shed; their time
//! is bounded by the header, body and send timeouts instead.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::address_cap::AddressCap;

/// Connections asked to close for room that have not closed yet, at most. Shedding is
/// asynchronous (the victim's task must run to close), so admissions by shedding may briefly
/// exceed `connections_max`; this bounds by how much.
pub const SHEDDING_MAX: usize = 64;

/// What the table needs to know of one open connection to choose a victim.
pub trait Sheddable: Send + Sync {
    /// True while a request is in flight (a handler runs or a response body is being sent).
    fn busy(&self) -> bool;
    /// Time since the connection last moved a byte either way.
    fn idle_for(&self) -> Duration;
    /// Asks the connection to close now (it closes on its own task).
    fn shed(&self);
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot serves a request and nothing idle can be closed.
    Full,
    /// The client's address holds `connections_per_ip_max` connections.
    PerIp,
    /// The fallback is shutting down.
    Closed,
}

/// How a connection was admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admitted {
    /// A slot was free.
    Free,
    /// The longest-idle connection was asked to close to make room.
    Shed,
}

struct Open<C> {
    ip: IpAddr,
    conn: Arc<C>,
    shed: AtomicBool,
}

/// Open connections by id, bounded by `connections_max` (+ [`SHEDDING_MAX`] while victims close).
pub struct SlotTable<C> {
    connections_max: usize,
    per_ip: AddressCap,
    open: HashMap<u64, Open<C>>,
    shedding: usize,
    next_id: u64,
    closed: bool,
}

impl<C: Sheddable> SlotTable<C> {
    /// An empty table of `connections_max` slots, `per_ip_max` per address (0 = no cap).
    pub fn new(connections_max: usize, per_ip_max: usize) -> SlotTable<C> {
        SlotTable {
            connections_max,
            per_ip: AddressCap::new(per_ip_max),
            open: HashMap::with_capacity(connections_max.min(4096)),
            shedding: 0,
            next_id: 1,
            closed: false,
        }
    }

    /// Admits `conn` from `ip`, shedding the longest-idle connection when full. Returns the id
    /// to [`SlotTable::release`] when the connection closes.
    pub fn admit(&mut self, ip: IpAddr, conn: Arc<C>) -> Result<(u64, Admitted), Refusal> {
        if self.closed {
            return Err(Refusal::Closed);
        }
        if self.per_ip.count(ip) >= self.per_ip_cap() {
            return Err(Refusal::PerIp);
        }
        let live = self.open.len() - self.shedding;
        let admitted = if live < self.connections_max {
            Admitted::Free
        } else {
            if self.shedding >= SHEDDING_MAX {
                return Err(Refusal::Full);
            }
            let victim = pick_victim(
                self.open
                    .iter()
                    .filter(|(_, o)| !o.shed.load(Ordering::Relaxed))
                    .map(|(id, o)| (*id, o.conn.busy(), o.conn.idle_for())),
            );
            let Some(victim) = victim.and_then(|id| self.open.get(&id)) else {
                return Err(Refusal::Full);
            };
            victim.shed.store(true, Ordering::Relaxed);
            victim.conn.shed();
            self.shedding += 1;
            Admitted::Shed
        };
        if !self.per_ip.try_add(ip) {
            return Err(Refusal::PerIp);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.open.insert(
            id,
            Open {
                ip,
                conn,
                shed: AtomicBool::new(false),
            },
        );
        Ok((id, admitted))
    }

    /// The connection `id` closed.
    pub fn release(&mut self, id: u64) {
        if let Some(open) = self.open.remove(&id) {
            self.per_ip.remove(open.ip);
            if open.shed.load(Ordering::Relaxed) {
                self.shedding = self.shedding.saturating_sub(1);
            }
        }
    }

    /// Refuses every later admission (shutdown).
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Open connections, counting victims that have not closed yet.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.len()
    }

    fn per_ip_cap(&self) -> usize {
        match self.per_ip_max() {
            0 => usize::MAX,
            cap => cap,
        }
    }

    fn per_ip_max(&self) -> usize {
        self.per_ip.per_ip_max()
    }
}

/// The connection to shed: the one idle longest among those with no request in flight.
/// Candidates are `(id, busy, idle_for)`.
pub fn pick_victim(candidates: impl Iterator<Item = (u64, bool, Duration)>) -> Option<u64> {
    candidates
        .filter(|(_, busy, _)| !busy)
        .max_by_key(|(id, _, idle)| (*idle, std::cmp::Reverse(*id)))
        .map(|(id, _, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Fake {
        busy: bool,
        idle_ms: u64,
        shed: AtomicUsize,
    }

    impl Sheddable for Fake {
        fn busy(&self) -> bool {
            self.busy
        }
        fn idle_for(&self) -> Duration {
            Duration::from_millis(self.idle_ms)
        }
        fn shed(&self) {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn fake(busy: bool, idle_ms: u64) -> Arc<Fake> {
        Arc::new(Fake {
            busy,
            idle_ms,
            shed: AtomicUsize::new(0),
        })
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn victim_is_the_longest_idle_that_is_not_busy() {
        let ms = Duration::from_millis;
        // (id, busy, idle ms) candidates and the victim expected.
        type Row<'a> = (&'a [(u64, bool, u64)], Option<u64>);
        let rows: &[Row] = &[
            (&[], None),
            (&[(1, true, 900)], None),
            (&[(1, true, 900), (2, false, 10), (3, false, 20)], Some(3)),
            (&[(1, false, 20), (2, false, 20)], Some(1)),
        ];
        for (candidates, want) in rows {
            let got = pick_victim(candidates.iter().map(|&(id, b, i)| (id, b, ms(i))));
            assert_eq!(got, *want, "{candidates:?}");
        }
    }

    #[test]
    fn full_table_sheds_idle_then_refuses_when_all_are_busy() {
        let mut table = SlotTable::new(2, 0);
        let old_idle = fake(false, 5_000);
        let busy = fake(true, 9_000);
        let (a, how) = table.admit(ip(1), old_idle.clone()).unwrap();
        assert_eq!(how, Admitted::Free);
        let (_b, _) = table.admit(ip(2), busy.clone()).unwrap();
        let (c, how) = table.admit(ip(3), fake(true, 0)).unwrap();
        assert_eq!(how, Admitted::Shed);
        assert_eq!(old_idle.shed.load(Ordering::Relaxed), 1);
        assert_eq!(busy.shed.load(Ordering::Relaxed), 0, "busy never shed");
        assert_eq!(table.len(), 3, "the victim holds its entry until it closes");
        // Everything left is busy (or already shed): refuse.
        assert_eq!(table.admit(ip(4), fake(false, 0)), Err(Refusal::Full));
        table.release(a);
        assert_eq!(table.len(), 2);
        assert_eq!(table.admit(ip(4), fake(false, 0)), Err(Refusal::Full));
        table.release(c);
        assert!(table.admit(ip(4), fake(false, 0)).is_ok());
    }

    #[test]
    fn per_ip_cap_and_close() {
        let mut table = SlotTable::new(10, 2);
        let (a, _) = table.admit(ip(1), fake(false, 0)).unwrap();
        table.admit(ip(1), fake(false, 0)).unwrap();
        assert_eq!(table.admit(ip(1), fake(false, 0)), Err(Refusal::PerIp));
        assert!(table.admit(ip(2), fake(false, 0)).is_ok());
        table.release(a);
        assert!(table.admit(ip(1), fake(false, 0)).is_ok());
        table.close();
        assert_eq!(table.admit(ip(3), fake(false, 0)), Err(Refusal::Closed));
    }

    #[test]
    fn shedding_in_flight_is_bounded() {
        let mut table = SlotTable::new(1, 0);
        let mut ids = Vec::new();
        ids.push(table.admit(ip(1), fake(false, 1)).unwrap().0);
        for n in 0..SHEDDING_MAX {
            let (id, how) = table.admit(ip(1), fake(false, 1)).unwrap();
            assert_eq!(how, Admitted::Shed, "admission {n}");
            ids.push(id);
        }
        assert_eq!(table.admit(ip(1), fake(false, 1)), Err(Refusal::Full));
        assert_eq!(table.len(), SHEDDING_MAX + 1);
    }
}
