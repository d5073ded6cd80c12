//! How hyper's HTTP/2 server runs a stream: [`InlineFirstPoll`], an executor that polls each
//! stream once on the connection's own task and spawns it only if it must wait.
//!
//! hyper hands every HTTP/2 stream (the handler's future, then sending the response) to its
//! executor. With tokio's plain `spawn` that is a task per stream: an allocation, a trip
//! through the scheduler, and a wake-up of the connection task from another poll to write
//! what the stream queued. The profile of TLS h2 at 4 KiB (docs/benchmarks.md, issue 20) had
//! the fallback's time in exactly those hand-offs, not in sluice's handler. A GET served from
//! the page cache or memory needs no waiting at all: its handler answers at once, h2 takes the
//! whole response (headers and a body that fits the flow-control window), and the stream is
//! done within its first poll. Polling it there, on the connection task, means the frames are
//! written by the same poll that read the request, as h2o and nginx do. Only a stream that
//! waits (a PUT receiving its body, a large file read on the blocking pool, a peer read-
//! through, no flow-control window yet) becomes a task of its own.

use std::future::Future;
use std::task::{Context, Poll, Waker};

/// Polls a future once in place; spawns it on the current tokio runtime if it is not done.
///
/// The first poll sees a no-op waker, so whatever the future registers then is forgotten;
/// that is sound because a future must register its waker again on every poll that returns
/// `Pending`, and the spawned task polls it again at once with its real waker (an event that
/// arrived in between is seen by that poll). Must be called from within a tokio runtime, as
/// hyper calls it (from the connection's poll).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct InlineFirstPoll;

impl<F> hyper::rt::Executor<F> for InlineFirstPoll
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        run_or_spawn(fut, |rest| {
            tokio::spawn(rest);
        });
    }
}

/// The policy of [`InlineFirstPoll`] with the spawning passed in: polls `fut` once and hands
/// what is left to `spawn`. Returns whether it finished in that poll.
fn run_or_spawn<F>(fut: F, spawn: impl FnOnce(std::pin::Pin<Box<F>>)) -> bool
where
    F: Future<Output = ()>,
{
    let mut fut = Box::pin(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(()) => true,
        Poll::Pending => {
            spawn(fut);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Pending `waits` times, then done; counts its polls.
    struct Waits {
        waits: usize,
        polls: Arc<AtomicUsize>,
    }

    impl Future for Waits {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.waits == 0 {
                return Poll::Ready(());
            }
            self.waits -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn a_ready_future_runs_in_place_and_a_waiting_one_is_spawned() {
        for (waits, inline) in [(0, true), (1, false), (3, false)] {
            let polls = Arc::new(AtomicUsize::new(0));
            let mut spawned = None;
            let fut = Waits {
                waits,
                polls: polls.clone(),
            };
            let done = run_or_spawn(fut, |rest| spawned = Some(rest));
            assert_eq!(done, inline, "waits {waits}");
            assert_eq!(polls.load(Ordering::Relaxed), 1, "one poll in place");
            assert_eq!(spawned.is_some(), !inline, "waits {waits}");
        }
    }

    #[test]
    fn a_spawned_future_finishes_with_its_real_waker() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            // Waits on a channel whose sender fires only after the first, no-op-waker poll:
            // the spawned task must have registered its own waker to see it.
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            hyper::rt::Executor::execute(&InlineFirstPoll, async move {
                let _ = rx.await;
                let _ = done_tx.send(());
            });
            tokio::task::yield_now().await;
            let _ = tx.send(());
            tokio::time::timeout(std::time::Duration::from_secs(5), done_rx)
                .await
                .expect("the spawned stream finished")
                .expect("sent");
        });
    }
}
