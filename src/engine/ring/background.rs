//! The background ring: replication's body sends on a ring of their own, owned by a thread in
//! the background scheduling class (`crate::background`).
//!
//! A task's file body moves by splice (file → pipe → socket), which io_uring runs on io-wq
//! workers, and io-wq workers are threads started from the ring's thread: they take its
//! scheduling class. On the engine rings they would run at the priority of public requests
//! (and on loopback a splice to a socket also runs the receiving side's TCP processing); on
//! this ring they run in the background class, so a public request that wants their CPU gets
//! it at once (at the next preemption point, which the 128 KiB slices bound). Tasks without a
//! file body (probes, anti-entropy queries, read-through fetches, which a client may wait
//! for) stay on the engine rings, as does a body task when this ring's queue is full.

use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sluice_uring::{Driver, DriverConfig, PipePool, RingConfig, Token, Waker};

use super::tasks::TaskClient;
use super::{EngineSettings, IDLE_PIPE, IOWQ_WORKERS_MAX, TASKS_PER_CORE_MAX, TASKS_QUEUED_MAX};
use crate::engine::threads::StopSignal;
use crate::outgoing::OutgoingRequest;

/// Submission queue entries of the background ring (one op per task at most).
const SQ_ENTRIES: u32 = 256;
/// Completion queue entries of the background ring.
const CQ_ENTRIES: u32 = 1024;
const _: () = assert!(CQ_ENTRIES >= 2 * SQ_ENTRIES);
const _: () = assert!(SQ_ENTRIES as usize >= TASKS_PER_CORE_MAX);
/// Completions handled per turn.
const COMPLETIONS_PER_TURN_MAX: usize = 256;
/// How often deadlines are looked at.
const TICK: Duration = Duration::from_millis(100);

/// The background ring's thread and the queue replication submits body sends to.
pub struct BackgroundRing {
    pub(super) tx: SyncSender<OutgoingRequest>,
    pub(super) waker: Waker,
    thread: Option<JoinHandle<()>>,
}

impl BackgroundRing {
    /// Start the thread and its ring. `signal` is the engine's: the ring stops with it,
    /// letting its tasks in flight finish within the task budget.
    pub fn start(settings: &EngineSettings, signal: Arc<StopSignal>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(TASKS_QUEUED_MAX);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let pipes_max = settings.pipes_per_core_max;
        let pipe_bytes = settings.pipe_bytes;
        let thread = std::thread::Builder::new()
            .name("sluice-ring-send".into())
            .spawn(move || {
                // First: the ring and its io-wq workers are started from this thread, so
                // they are in its class.
                crate::background::enter("ring-send");
                let mut ring = match Loop::new(rx, pipes_max, pipe_bytes) {
                    Ok(ring) => ring,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(ring.driver.waker()));
                ring.run(&signal);
            })?;
        let waker = ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the background ring thread ended at start"))??;
        Ok(BackgroundRing {
            tx,
            waker,
            thread: Some(thread),
        })
    }

    /// Wait for the thread, once the engine's stop signal is up.
    pub fn join(mut self) {
        self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Loop {
    driver: Driver,
    pipes: PipePool,
    tasks: TaskClient,
}

impl Loop {
    fn new(
        rx: Receiver<OutgoingRequest>,
        pipes_max: usize,
        pipe_bytes: usize,
    ) -> std::io::Result<Loop> {
        let mut driver = Driver::new(DriverConfig {
            ring: RingConfig {
                sq_entries: SQ_ENTRIES,
                cq_entries: CQ_ENTRIES,
            },
            ops_max: u32::try_from(TASKS_PER_CORE_MAX + 1).unwrap_or(u32::MAX),
            fixed_buffers_count: 1,
            fixed_buffer_bytes: 4096,
            register_fixed_buffers: false,
            buf_rings_max: 1,
            read_ioprio: 0,
        })
        .map_err(|e| std::io::Error::from_raw_os_error(e.0))?;
        // As on the engine rings: a storm of sends must not start unbounded workers.
        let _ = driver.limit_iowq_workers(IOWQ_WORKERS_MAX, IOWQ_WORKERS_MAX);
        let pipe_max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        Ok(Loop {
            driver,
            pipes: PipePool::new(pipes_max, pipe_bytes, pipe_max).closing_idle_after(IDLE_PIPE),
            tasks: TaskClient::new(rx),
        })
    }

    fn run(&mut self, signal: &StopSignal) {
        let mut batch = Vec::with_capacity(COMPLETIONS_PER_TURN_MAX);
        let mut next_tick = Instant::now() + TICK;
        let mut stop_by: Option<Instant> = None;
        loop {
            let timeout = next_tick.saturating_duration_since(Instant::now());
            if self.driver.wait(1, Some(timeout)).is_err() {
                break;
            }
            self.driver.take_woken();
            self.driver.complete(&mut batch, COMPLETIONS_PER_TURN_MAX);
            for completion in batch.drain(..) {
                if let Token::Task { slot, generation } = Token::unpack(completion.token) {
                    self.tasks
                        .on_completion(&mut self.driver, slot, generation, completion);
                }
            }
            let now = Instant::now();
            if signal.stopping() {
                // No new send starts (their entries stay in the outbox); those in flight
                // get the task budget (`shutdown_replication_ms`) from now: this ring has
                // no public connections to drain first. (Adding the drain budget, as it
                // did, kept a send going with a budget of 0: tests/mesh.rs.)
                let by = *stop_by.get_or_insert(now + signal.tasks_budget());
                self.tasks.refuse_new();
                if self.tasks.is_idle() || now >= by || signal.is_cut() {
                    break;
                }
            }
            self.tasks.start_queued(&mut self.driver, &mut self.pipes);
            if now >= next_tick {
                next_tick = now + TICK;
                self.tasks.expire(&mut self.driver, now);
                self.pipes.close_idle(now);
            }
        }
        self.tasks.refuse_all();
        let _ = self.driver.shutdown(Duration::from_secs(2));
    }
}
