//! Group commit: one sync covers every write that finished before it began.
//!
//! A writer first does its write (a rename into a directory, a line appended
//! to a log) and then [`GroupSync::register`]s it, which hands out a ticket:
//! the count of writes finished so far. [`GroupSync::wait`] returns once a
//! sync that *started* after the ticket was handed out has completed, so the
//! write is on stable storage. The first waiter that finds no sync running
//! becomes the leader and runs the sync itself (the closure it passes);
//! everyone who registered before the leader began is covered by it, and
//! those who register while it runs wait for the next one, which the next
//! leader starts as soon as this one ends. Under load a sync covers all the
//! writes made during the previous one: the classic group commit of database
//! logs, with no thread of its own and no timer.
//!
//! One sync at a time makes a closed-loop client pay one and a half syncs
//! on average (the rest of the one running, then its own), and a group of
//! clients alternate between two half groups. So a group may allow a few
//! syncs in flight at once ([`GroupSync::with_syncs_in_flight`]): a waiter
//! no running sync covers starts its own while fewer than that run, and
//! waits otherwise. A sync covers every write registered before it began,
//! whatever order the syncs end in.
//!
//! A failed sync covers nobody: its leader gets the error, and the followers
//! it would have covered go on waiting, one of them leading a new attempt
//! (which then answers for itself). So an error never acknowledges a write,
//! and one bad sync does not fail writes another sync can still cover.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::{Thread, ThreadId};

/// Most syncs one group runs at once.
pub const SYNCS_IN_FLIGHT_MAX: usize = 16;

/// The tickets and syncs of one file or directory.
#[derive(Debug)]
pub struct GroupSync {
    state: Mutex<State>,
    /// Syncs allowed at once (1..=[`SYNCS_IN_FLIGHT_MAX`]).
    in_flight_max: usize,
    syncs_total: AtomicU64,
    writes_total: AtomicU64,
}

impl Default for GroupSync {
    fn default() -> Self {
        GroupSync::new()
    }
}

#[derive(Debug, Default)]
struct State {
    /// Writes registered so far (the last ticket handed out).
    registered: u64,
    /// Every ticket up to this one is covered by a completed sync.
    synced: u64,
    /// The targets of the syncs running now (each covers tickets up to its
    /// target once it completes).
    running: Vec<u64>,
    /// Threads inside [`GroupSync::wait`].
    waiters: u32,
    /// The waiters asleep, with their tickets: a sync's end wakes only the
    /// ones it covered and, when another sync may start, one to lead it.
    /// (A condvar's `notify_all` woke every waiter at every sync's end, and
    /// most went back to sleep: 8 switches per durable 4 KiB PUT.)
    asleep: Vec<Sleeper>,
}

#[derive(Debug)]
struct Sleeper {
    ticket: u64,
    thread: Thread,
}

impl State {
    /// A sync has ended: wake the sleepers it covered, and one that no
    /// running sync covers when another sync may start (it leads the next,
    /// which covers everyone registered by then).
    fn wake_after_sync(&mut self, in_flight_max: usize) {
        let synced = self.synced;
        self.asleep.retain(|s| {
            let covered = s.ticket <= synced;
            if covered {
                s.thread.unpark();
            }
            !covered
        });
        if self.running.len() >= in_flight_max {
            return;
        }
        let running_max = self.running.iter().copied().max().unwrap_or(0);
        if let Some(at) = self.asleep.iter().position(|s| s.ticket > running_max) {
            self.asleep.swap_remove(at).thread.unpark();
        }
    }

    fn forget_sleeper(&mut self, id: ThreadId) {
        if let Some(at) = self.asleep.iter().position(|s| s.thread.id() == id) {
            self.asleep.swap_remove(at);
        }
    }
}

/// A registered write: wait on it with [`GroupSync::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

impl GroupSync {
    /// One sync at a time.
    pub fn new() -> GroupSync {
        GroupSync::with_syncs_in_flight(1)
    }

    /// Up to `n` syncs at once (clamped to 1..=[`SYNCS_IN_FLIGHT_MAX`]).
    pub fn with_syncs_in_flight(n: usize) -> GroupSync {
        let n = n.clamp(1, SYNCS_IN_FLIGHT_MAX);
        GroupSync {
            state: Mutex::new(State {
                running: Vec::with_capacity(n),
                ..State::default()
            }),
            in_flight_max: n,
            syncs_total: AtomicU64::new(0),
            writes_total: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A write has finished (its bytes or its name are in the kernel): the
    /// next sync to start covers it.
    pub fn register(&self) -> Ticket {
        self.writes_total.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        state.registered += 1;
        Ticket(state.registered)
    }

    /// Returns once a sync that began after `ticket` was handed out has
    /// completed. When no running sync covers it and fewer than the group's
    /// bound run, this thread runs `sync` for everyone registered so far;
    /// its error is returned to this thread only (see the module docs).
    pub fn wait<E>(&self, ticket: Ticket, sync: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let mut state = self.lock();
        state.waiters += 1;
        let mut sync = Some(sync);
        let result = loop {
            if state.synced >= ticket.0 {
                break Ok(());
            }
            let covered = state.running.iter().any(|&target| target >= ticket.0);
            let room = state.running.len() < self.in_flight_max;
            let run = match sync.take() {
                Some(run) if !covered && room => run,
                other => {
                    // A running sync will cover us, or none may start now.
                    // (`other` is `None` only after our own sync failed and
                    // returned, which leaves this loop: unreachable.)
                    sync = other;
                    let me = std::thread::current();
                    let id = me.id();
                    state.asleep.push(Sleeper {
                        ticket: ticket.0,
                        thread: me,
                    });
                    drop(state);
                    // Woken by `wake_after_sync` (which took us off the list),
                    // or spuriously (still on it): either way, look again.
                    std::thread::park();
                    state = self.lock();
                    state.forget_sleeper(id);
                    continue;
                }
            };
            let target = state.registered;
            state.running.push(target);
            drop(state);
            let outcome = run();
            self.syncs_total.fetch_add(1, Ordering::Relaxed);
            state = self.lock();
            if let Some(at) = state.running.iter().position(|&t| t == target) {
                state.running.swap_remove(at);
            }
            if outcome.is_ok() {
                state.synced = state.synced.max(target);
            }
            state.wake_after_sync(self.in_flight_max);
            if let Err(e) = outcome {
                break Err(e);
            }
        };
        state.waiters -= 1;
        result
    }

    /// [`GroupSync::register`] then [`GroupSync::wait`].
    pub fn commit<E>(&self, sync: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let ticket = self.register();
        self.wait(ticket, sync)
    }

    /// No write waits and no sync runs: nothing would be lost by dropping
    /// this group (a table of groups may forget it).
    pub fn is_idle(&self) -> bool {
        let state = self.lock();
        state.waiters == 0 && state.running.is_empty() && state.synced >= state.registered
    }

    /// Syncs run so far.
    pub fn syncs_total(&self) -> u64 {
        self.syncs_total.load(Ordering::Relaxed)
    }

    /// Writes registered so far.
    pub fn writes_total(&self) -> u64 {
        self.writes_total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Barrier};

    #[test]
    fn a_lone_write_leads_its_own_sync() {
        let g = GroupSync::new();
        let mut ran = 0;
        g.commit(|| -> Result<(), ()> {
            ran += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!((ran, g.syncs_total(), g.writes_total()), (1, 1, 1));
        assert!(g.is_idle());
        // Already covered: a wait for an old ticket runs nothing.
        g.wait(Ticket(1), || -> Result<(), ()> { panic!("no sync needed") })
            .unwrap();
    }

    #[test]
    fn writes_registered_during_a_sync_share_the_next_one() {
        // Thread A leads a sync that blocks until B..E have registered; they
        // must all be covered by one more sync, not four.
        let g = Arc::new(GroupSync::new());
        let release = Arc::new(Barrier::new(2));
        let a = {
            let (g, release) = (Arc::clone(&g), Arc::clone(&release));
            std::thread::spawn(move || {
                g.commit(|| -> Result<(), ()> {
                    release.wait(); // others may register now
                    release.wait(); // ...and have registered
                    Ok(())
                })
            })
        };
        release.wait();
        let tickets: Vec<Ticket> = (0..4).map(|_| g.register()).collect();
        let followers: Vec<_> = tickets
            .into_iter()
            .map(|t| {
                let g = Arc::clone(&g);
                std::thread::spawn(move || g.wait(t, || -> Result<(), ()> { Ok(()) }))
            })
            .collect();
        // Let the followers reach their wait (they block on `syncing`).
        std::thread::sleep(std::time::Duration::from_millis(20));
        release.wait();
        a.join().unwrap().unwrap();
        for f in followers {
            f.join().unwrap().unwrap();
        }
        assert_eq!(g.writes_total(), 5);
        assert_eq!(
            g.syncs_total(),
            2,
            "one sync for A, one for the four after it"
        );
        assert!(g.is_idle());
    }

    #[test]
    fn with_two_in_flight_a_write_after_a_running_sync_starts_its_own() {
        // A's sync blocks; B registers after it began, so A's cannot cover
        // B: with room for two, B syncs at once instead of waiting for A.
        let g = Arc::new(GroupSync::with_syncs_in_flight(2));
        let a_started = Arc::new(Barrier::new(2));
        let release_a = Arc::new(Barrier::new(2));
        let a = {
            let (g, a_started, release_a) = (
                Arc::clone(&g),
                Arc::clone(&a_started),
                Arc::clone(&release_a),
            );
            std::thread::spawn(move || {
                g.commit(|| -> Result<(), ()> {
                    a_started.wait();
                    release_a.wait();
                    Ok(())
                })
            })
        };
        a_started.wait();
        let mut b_ran = false;
        g.commit(|| -> Result<(), ()> {
            b_ran = true;
            Ok(())
        })
        .unwrap();
        assert!(b_ran, "B led its own sync while A's ran");
        release_a.wait();
        a.join().unwrap().unwrap();
        assert_eq!(g.syncs_total(), 2);
        assert!(g.is_idle());
    }

    #[test]
    fn syncs_in_flight_stay_within_the_bound() {
        let g = Arc::new(GroupSync::with_syncs_in_flight(3));
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (g, running, most) = (Arc::clone(&g), Arc::clone(&running), Arc::clone(&most));
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        g.commit(|| -> Result<(), ()> {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_micros(300));
                            running.fetch_sub(1, Ordering::SeqCst);
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 3, "{most:?} syncs at once");
        assert_eq!(g.writes_total(), 800);
        assert!(g.is_idle());
    }

    #[test]
    fn a_failed_sync_acknowledges_nobody_and_a_follower_retries() {
        let g = Arc::new(GroupSync::new());
        let first = Arc::new(AtomicBool::new(true));
        let t1 = g.register();
        let t2 = g.register();
        // The first leader fails: its own wait reports it.
        let err = g.wait(t1, || -> Result<(), &str> {
            first.store(false, Ordering::SeqCst);
            Err("EIO")
        });
        assert_eq!(err, Err("EIO"));
        assert!(!g.is_idle(), "two writes are still not covered");
        // The second write is not covered by the failed sync: it leads a new one.
        let mut ran = false;
        g.wait(t2, || -> Result<(), &str> {
            ran = true;
            Ok(())
        })
        .unwrap();
        assert!(ran);
        // Its success covers t1 too (registered before it began).
        g.wait(t1, || -> Result<(), &str> { panic!("covered") })
            .unwrap();
        assert!(g.is_idle());
    }

    #[test]
    fn many_threads_each_covered_with_fewer_syncs_than_writes() {
        let g = Arc::new(GroupSync::new());
        let syncing = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (g, syncing) = (Arc::clone(&g), Arc::clone(&syncing));
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        g.commit(|| -> Result<(), ()> {
                            assert!(
                                !syncing.swap(true, Ordering::SeqCst),
                                "one leader at a time"
                            );
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            syncing.store(false, Ordering::SeqCst);
                            Ok(())
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(g.writes_total(), 1600);
        assert!(g.syncs_total() <= 1600);
        assert!(g.is_idle());
    }

    /// A sync's end wakes only the waiters it covered and one to lead the
    /// next: with two in flight and some syncs failing, no waiter is left
    /// asleep.
    #[test]
    fn targeted_wakes_lose_no_waiter_when_syncs_fail() {
        use std::sync::atomic::AtomicU64;
        let g = Arc::new(GroupSync::with_syncs_in_flight(2));
        let attempts = Arc::new(AtomicU64::new(0));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        for _ in 0..12 {
            let (g, attempts, done_tx) = (Arc::clone(&g), Arc::clone(&attempts), done_tx.clone());
            std::thread::spawn(move || {
                for _ in 0..150 {
                    let mut failures = 0u32;
                    let ticket = g.register();
                    loop {
                        let outcome = g.wait(ticket, || -> Result<(), ()> {
                            let n = attempts.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_micros(50 + n % 5 * 40));
                            if n % 7 == 3 {
                                Err(())
                            } else {
                                Ok(())
                            }
                        });
                        match outcome {
                            Ok(()) => break,
                            // Our own sync failed: wait again (a caller would retry or
                            // give up; the group must still cover the others).
                            Err(()) => failures += 1,
                        }
                    }
                    assert!(failures < 100);
                }
                let _ = done_tx.send(());
            });
        }
        drop(done_tx);
        for _ in 0..12 {
            done_rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("a waiter was left asleep");
        }
        assert_eq!(g.writes_total(), 1800);
        assert!(g.is_idle());
    }
}
