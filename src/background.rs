//! Background work yields the CPU by construction: the threads that do
//! replication's CPU work (receiving, hashing and writing peer bodies,
//! anti-entropy walks, the blocking senders, the tier's write-behind
//! uploads) put themselves in a lower scheduling class when they start, so a
//! public request that wants a CPU gets it at once instead of waiting for a
//! time slice to end. The rate limiter (`delivery::limiter`) still bounds the
//! bytes; this bounds the CPU. The replication thread itself stays in the
//! normal class: it does no work per byte, and it keeps the peers' state
//! (probes, timeouts, backoff) current, which must not wait for an idle CPU.
//!
//! The class is `replication_scheduling` (`idle` = `SCHED_IDLE` by default,
//! `nice` = nice 19, `normal`), set once for the process at start
//! ([`configure`]); with `replication_cgroup` each thread also joins that
//! cgroup (its `cpu.weight` is the operator's). A thread that cannot change
//! (a seccomp filter, a cgroup that refuses it) keeps its class, says so
//! once in the log and counts in `/status`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::config::{Config, ReplicationScheduling};

/// The process's choice, set once at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Background {
    pub scheduling: ReplicationScheduling,
    pub cgroup: Option<PathBuf>,
}

static CHOSEN: OnceLock<Background> = OnceLock::new();
static ENTERED: AtomicU64 = AtomicU64::new(0);
static REFUSED: AtomicU64 = AtomicU64::new(0);
static THREADS: Mutex<Vec<(String, u32)>> = Mutex::new(Vec::new());
/// Background threads remembered for `/status` (there are a few dozen at most).
const THREADS_LISTED_MAX: usize = 256;

/// Set the class for the process from the config (the first call wins; a
/// process that never calls it leaves its threads as they are, as unit
/// tests do).
pub fn configure(config: &Config) {
    let _ = CHOSEN.set(Background {
        scheduling: config.replication_scheduling,
        cgroup: config.replication_cgroup.clone(),
    });
}

/// The calling thread does background work: put it in the configured class
/// (and cgroup). Call once, first thing, on the thread itself.
pub fn enter(what: &str) {
    let Some(chosen) = CHOSEN.get() else {
        return;
    };
    let applied = match chosen.scheduling {
        ReplicationScheduling::Idle => sluice_uring::sched::set_current_thread_idle(),
        ReplicationScheduling::Nice => sluice_uring::sched::set_current_thread_nice(19),
        ReplicationScheduling::Normal => Ok(()),
    };
    let tid = sluice_uring::sched::current_thread_id();
    let joined = chosen.cgroup.as_ref().map(|dir| {
        std::fs::write(dir.join("cgroup.threads"), tid.to_string()).map_err(|e| (dir, e))
    });
    match (applied, joined) {
        (Ok(()), None | Some(Ok(()))) => {
            ENTERED.fetch_add(1, Ordering::Relaxed);
        }
        (Err(errno), _) => {
            if REFUSED.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(thread = what, errno = errno.0, scheduling = ?chosen.scheduling,
                    "cannot lower the scheduling class of a background thread; it competes with public work");
            }
        }
        (_, Some(Err((dir, err)))) => {
            if REFUSED.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(thread = what, cgroup = %dir.display(), %err,
                    "cannot move a background thread into replication_cgroup");
            }
        }
    }
    let mut threads = THREADS.lock().unwrap_or_else(PoisonError::into_inner);
    if threads.len() < THREADS_LISTED_MAX {
        threads.push((what.to_string(), tid));
    }
}

/// The `/status` section: the class, and how many threads entered it.
pub fn status() -> serde_json::Value {
    let chosen = CHOSEN.get();
    let threads = THREADS.lock().unwrap_or_else(PoisonError::into_inner);
    serde_json::json!({
        "scheduling": chosen.map(|c| c.scheduling),
        "cgroup": chosen.and_then(|c| c.cgroup.as_ref()).map(|p| p.display().to_string()),
        "threads_entered": ENTERED.load(Ordering::Relaxed),
        "threads_refused": REFUSED.load(Ordering::Relaxed),
        "threads": threads.iter().map(|(name, tid)| serde_json::json!({"name": name, "tid": tid})).collect::<Vec<_>>(),
    })
}
