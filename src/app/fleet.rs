//! What the application asks of the layers built on top of it.
//!
//! The application core decides what a request means from the local store.
//! A fleet of nodes (replication, read-through from peers, the object-store
//! tier) adds to that: a miss may be filled from elsewhere, an acknowledged
//! write must be recorded for others, a reserved path prefix is served for
//! the peers. The core defines those needs here as small traits; the fleet
//! implements them and `crate::server` plugs them in at start, so the core
//! never imports what is built on it (pingora's `ProxyHttp`, hyper's
//! `Service`: the layer below defines the interface).

use std::sync::Arc;
use std::time::Duration;

use crate::exchange::{AfterCommit, CommitHook, Decision, Reply, RequestInfo};
use crate::route::ArtifactKind;

use super::App;

/// Every path under this prefix is served by the attached [`PeerService`]
/// (404 without one). Public routes never start with it: a namespace or key
/// cannot start with `_`, and no fixed route does.
pub const PEER_PREFIX: &str = "/_peer/";

/// Called once a fetch a request waits for has ended, from any thread.
pub type Waiter = Box<dyn FnOnce() + Send>;

/// A miss the request waits for with a [`Waiter`] ([`Decision::Fetch`]):
/// the peers' read-through.
pub trait MissFetcher: Send + Sync {
    /// Whether `ns/key` is known absent elsewhere right now (answer 404
    /// without waiting).
    fn known_absent(&self, ns: &str, key: &str) -> bool;
    /// Fetch `ns/key` (or join the fetch running); `done` is called when it
    /// has ended, or at once when there is nothing to wait for. Never blocks.
    fn request(&self, ns: &str, key: &str, done: Waiter);
    /// How long a fetch may take at most.
    fn timeout(&self) -> Duration;
}

/// A miss answered off the engine thread, on the cold-open path
/// ([`Decision::Cold`]): the object-store tier.
pub trait MissReader: Send + Sync {
    /// On a local miss: the reply when it is already decided (a recent
    /// outcome, a piece of a small range), `None` when the request must wait
    /// for [`MissReader::fill`].
    fn answer_miss(
        &self,
        kind: ArtifactKind,
        ns: &str,
        key: &str,
        range: Option<&[u8]>,
        conditional: bool,
    ) -> Option<Reply>;
    /// The artifact could not be looked up without the disk: a small range
    /// may be answered (or asked for) now.
    fn on_cold(
        &self,
        ns: &str,
        key: &str,
        range: Option<&[u8]>,
        conditional: bool,
    ) -> Option<Reply>;
    /// Fetch `ns/key` into the store (or join the fetch running), then call
    /// `done`, from another thread. Never blocks the caller.
    fn fill(self: Arc<Self>, ns: String, key: String, done: Waiter);
}

impl dyn MissReader {
    /// [`MissReader::fill`] with a closure of one (empty) argument, as the
    /// engines' completion callbacks are written.
    pub fn read_through_then(
        self: &Arc<Self>,
        ns: String,
        key: String,
        then: impl FnOnce(()) + Send + 'static,
    ) {
        Arc::clone(self).fill(ns, key, Box::new(move || then(())));
    }
}

/// What a [`WriteListener`] does with a client PUT once it is committed.
pub enum PutFollowUp {
    /// Nothing to add.
    None,
    /// Runs after the commit, before the 2xx (an outbox append): `Some` is
    /// the reply the client gets instead (the write is visible but not
    /// acknowledged).
    OnCommit(CommitHook),
    /// The reply waits for this step, run off the committing thread (a
    /// write-through to the tier).
    AfterCommit(AfterCommit),
}

/// Hears about acknowledged writes and deletes (the peers' outbox, the
/// tier's upload queue).
pub trait WriteListener: Send + Sync {
    /// Refuse a client PUT before its body is read (a queue at its bound).
    fn refuse_put(&self) -> Option<Reply> {
        None
    }
    /// A client PUT of `ns/key` is about to receive its body (the store has
    /// begun it): what to do at its commit. Called before the commit, so a
    /// listener can protect the new artifact from eviction until then.
    fn begin_put(self: Arc<Self>, ns: &str, key: &str) -> PutFollowUp;
    /// An acknowledged DELETE of `ns/key` at `time_ms` (its tombstone is
    /// written). `Err` is the reply instead of the 204.
    #[allow(clippy::result_large_err)] // the error is the reply, as in `App`
    fn deleted(&self, ns: &str, key: &str, time_ms: u64) -> Result<(), Reply>;
}

/// Serves the requests under [`PEER_PREFIX`] (the peer API).
pub trait PeerService: Send + Sync {
    /// `rest` is the path after the prefix.
    fn handle(self: Arc<Self>, app: &App, req: &RequestInfo<'_>, rest: &str) -> Decision;
}

/// The parts a fleet plugs into the application, each set once at start.
#[derive(Default)]
pub(super) struct Fleet {
    pub peer_service: std::sync::OnceLock<Arc<dyn PeerService>>,
    pub miss_fetcher: std::sync::OnceLock<Arc<dyn MissFetcher>>,
    pub miss_reader: std::sync::OnceLock<Arc<dyn MissReader>>,
    /// In the order their commit steps run (peers' outbox, then the tier).
    pub writes: std::sync::RwLock<Vec<Arc<dyn WriteListener>>>,
}
