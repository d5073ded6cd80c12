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
//! A failed sync covers nobody: its leader gets the error, and the followers
//! it would have covered go on waiting, one of them leading a new attempt
//! (which then answers for itself). So an error never acknowledges a write,
//! and one bad sync does not fail writes another sync can still cover.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// The tickets and syncs of one file or directory.
#[derive(Debug, Default)]
pub struct GroupSync {
    state: Mutex<State>,
    cond: Condvar,
    syncs_total: AtomicU64,
    writes_total: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// Writes registered so far (the last ticket handed out).
    registered: u64,
    /// Every ticket up to this one is covered by a completed sync.
    synced: u64,
    /// A leader is syncing now.
    syncing: bool,
    /// Threads inside [`GroupSync::wait`].
    waiters: u32,
}

/// A registered write: wait on it with [`GroupSync::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ticket(u64);

impl GroupSync {
    pub fn new() -> GroupSync {
        GroupSync::default()
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
    /// completed. When no sync is running, this thread runs `sync` for
    /// everyone registered so far; its error is returned to this thread
    /// only (see the module docs).
    pub fn wait<E>(&self, ticket: Ticket, sync: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let mut state = self.lock();
        state.waiters += 1;
        let mut sync = Some(sync);
        let result = loop {
            if state.synced >= ticket.0 {
                break Ok(());
            }
            if state.syncing {
                state = self
                    .cond
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let Some(run) = sync.take() else {
                // Our own attempt failed already and returned; unreachable,
                // but waiting again is the safe answer.
                state = self
                    .cond
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            };
            state.syncing = true;
            let target = state.registered;
            drop(state);
            let outcome = run();
            self.syncs_total.fetch_add(1, Ordering::Relaxed);
            state = self.lock();
            state.syncing = false;
            if outcome.is_ok() {
                state.synced = state.synced.max(target);
            }
            self.cond.notify_all();
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
        state.waiters == 0 && !state.syncing && state.synced >= state.registered
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
}
