//! How the services reach the store: as requests [`App`] decides, so auth, read-through,
//! commit hooks and the completeness check are the HTTP routes' own. Also the mapping of
//! HTTP statuses to gRPC codes, and the caller's credentials.

use std::os::unix::fs::FileExt as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use tonic::{Code, Status};

use super::bytestream::Upload;
use super::parked::{Parked, PARKED_UPLOADS_MAX, PARKED_UPLOAD_TTL};
use super::Settings;
use crate::action_result::Blob;
use crate::app::{App, Decision, PutSink, Reply, ReplyBody, RequestInfo};
use crate::auth::{Access, Denied};
use crate::store::Artifact;

/// A stored blob as a read found it: its open file, or its body in memory (a hot-set hit).
#[derive(Clone)]
pub enum Stored {
    File(Arc<Artifact>),
    Memory(bytes::Bytes),
}

impl Stored {
    /// The body's length, bytes.
    pub fn len(&self) -> u64 {
        match self {
            Stored::File(artifact) => artifact.len,
            Stored::Memory(bytes) => bytes.len() as u64,
        }
    }

    /// Fill `buf` from the body at `at`; an error when the body is shorter.
    pub fn read_exact_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        match self {
            Stored::File(artifact) => artifact.file.read_exact_at(buf, artifact.body_offset + at),
            Stored::Memory(bytes) => {
                let from = usize::try_from(at).unwrap_or(usize::MAX);
                let piece = from
                    .checked_add(buf.len())
                    .and_then(|to| bytes.get(from..to))
                    .ok_or(std::io::ErrorKind::UnexpectedEof)?;
                buf.copy_from_slice(piece);
                Ok(())
            }
        }
    }
}

/// What every service holds.
pub struct Shared {
    pub app: Arc<App>,
    pub settings: Settings,
    /// Interrupted ByteStream writes, for resuming.
    pub parked: Mutex<Parked<Upload>>,
}

/// Who is calling: the `authorization` metadata (`Bearer …` or `Basic …`), as HTTP's header.
#[derive(Clone, Debug, Default)]
pub struct Caller {
    authorization: Option<Vec<u8>>,
}

impl Caller {
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        Caller {
            authorization: request
                .metadata()
                .get("authorization")
                .map(|v| v.as_bytes().to_vec()),
        }
    }

    fn header(&self) -> Option<&[u8]> {
        self.authorization.as_deref()
    }
}

/// The gRPC status for an HTTP reply that is not a success, with the reply's reason.
pub fn status_of(reply: &Reply) -> Status {
    let code = match reply.status {
        400 | 411 | 413 | 414 | 416 | 431 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        408 => Code::DeadlineExceeded,
        412 => Code::FailedPrecondition,
        429 | 507 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        _ => Code::Internal,
    };
    let message = match &reply.body {
        ReplyBody::Bytes(text) => String::from_utf8_lossy(text).trim().to_string(),
        _ => format!("HTTP status {}", reply.status),
    };
    Status::new(code, message)
}

fn denied(denied: Denied, ns: &str) -> Status {
    match denied {
        Denied::Unauthorized => Status::unauthenticated(
            "a valid token is required (authorization metadata: Bearer or Basic)",
        ),
        Denied::Forbidden => Status::permission_denied("this token may not write"),
        Denied::OutOfScope => {
            Status::permission_denied(format!("this token is not scoped to namespace {ns}"))
        }
    }
}

impl Shared {
    pub fn new(app: Arc<App>, settings: Settings) -> Shared {
        Shared {
            app,
            settings,
            parked: Mutex::new(Parked::new(PARKED_UPLOADS_MAX, PARKED_UPLOAD_TTL)),
        }
    }

    /// Whether `caller` may `access` namespace `ns` (`ac` or `cas`), as on HTTP.
    pub fn authorize(&self, caller: &Caller, ns: &str, access: Access) -> Result<(), Status> {
        self.app
            .auth
            .check(ns, access, caller.header())
            .map_err(|d| denied(d, ns))
    }

    /// App's decision on `info`, after waiting (bounded) for the peers, then the tier, to
    /// fill a local miss, as the fallback waits.
    async fn decide(&self, mut info: RequestInfo<'_>) -> Decision {
        let app = &self.app;
        let mut decision = handle_cached(app, &info);
        if let Decision::Fetch { namespace, key } = &decision {
            if let Some(peers) = app.miss_fetcher() {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                peers.request(
                    namespace,
                    key,
                    Box::new(move || {
                        let _ = tx.send(());
                    }),
                );
                // The read-through ends every fetch by its timeout; the margin only guards
                // against a waiter never called.
                let _ = tokio::time::timeout(peers.timeout() + Duration::from_secs(1), rx).await;
            }
            info.read_through = false;
            decision = handle_cached(app, &info);
        }
        if let (Decision::Cold { namespace, key }, Some(tier)) = (&decision, app.miss_reader()) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tier.read_through_then(namespace.clone(), key.clone(), move |()| {
                let _ = tx.send(());
            });
            let _ = rx.await;
            decision = app.handle(&info);
        }
        decision
    }

    /// Open `ns/key` for `caller` (auth, read-through and, for `ac`, the completeness check
    /// as for an HTTP GET). `None` on a miss.
    pub async fn open(
        &self,
        caller: &Caller,
        ns: &str,
        key: &str,
    ) -> Result<Option<Stored>, Status> {
        let path = format!("/{ns}/{key}");
        let info = RequestInfo {
            method: "GET",
            path: &path,
            authorization: caller.header(),
            read_through: true,
            ..RequestInfo::default()
        };
        match self.decide(info).await {
            Decision::Reply(Reply {
                status: 200,
                body: ReplyBody::File { artifact, .. },
                ..
            }) => Ok(Some(Stored::File(Arc::new(artifact)))),
            // A hot-set hit: the whole body (the request named no range).
            Decision::Reply(Reply {
                status: 200,
                body: ReplyBody::Memory(bytes),
                ..
            }) => Ok(Some(Stored::Memory(bytes))),
            Decision::Reply(reply) if reply.status == 404 => Ok(None),
            Decision::Reply(reply) => Err(status_of(&reply)),
            Decision::Fetch { .. } => Ok(None),
            Decision::Cold { .. } => Err(Status::unavailable("blob not ready; try again")),
            Decision::ReceiveBody(_) => Err(Status::internal("a read was answered as a write")),
        }
    }

    /// Open the CAS blob `blob` for `caller`; `None` when absent or stored with another size.
    pub async fn open_blob(&self, caller: &Caller, blob: &Blob) -> Result<Option<Stored>, Status> {
        Ok(self
            .open(caller, "cas", &blob.hash)
            .await?
            .filter(|stored| stored.len() == blob.size_bytes))
    }

    /// Start a write of `len` bytes to `ns/key` for `caller` (auth, limits, the fleet's
    /// commit hooks, as for an HTTP PUT).
    pub fn begin_put(
        &self,
        caller: &Caller,
        ns: &str,
        key: &str,
        len: u64,
    ) -> Result<PutSink, Status> {
        let path = format!("/{ns}/{key}");
        let info = RequestInfo {
            method: "PUT",
            path: &path,
            authorization: caller.header(),
            content_length: Some(len),
            ..RequestInfo::default()
        };
        match self.app.handle(&info) {
            Decision::ReceiveBody(sink) => Ok(sink),
            Decision::Reply(reply) => Err(status_of(&reply)),
            _ => Err(Status::internal("a write was answered as a read")),
        }
    }

    /// Whether the local CAS holds `blob` (the empty blob always).
    pub fn has_blob(&self, blob: &Blob) -> bool {
        blob.is_empty()
            || self
                .app
                .store
                .contains("cas", &blob.hash, false)
                .is_ok_and(|len| len == Some(blob.size_bytes))
    }

    /// Ask the fleet (peers, then the tier) to bring `blobs` here, and wait (bounded by their
    /// timeouts). Returns at once on a node without a fleet.
    pub async fn fill(&self, blobs: &[Blob]) {
        let app = &self.app;
        if app.miss_fetcher().is_none() && app.miss_reader().is_none() {
            return;
        }
        let fills = blobs.iter().take(FILLS_MAX).map(|blob| async move {
            if let Some(peers) = app.miss_fetcher() {
                if !peers.known_absent("cas", &blob.hash) {
                    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                    peers.request(
                        "cas",
                        &blob.hash,
                        Box::new(move || {
                            let _ = tx.send(());
                        }),
                    );
                    let _ =
                        tokio::time::timeout(peers.timeout() + Duration::from_secs(1), rx).await;
                }
            }
            if self.has_blob(blob) {
                return;
            }
            if let Some(tier) = app.miss_reader() {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tier.read_through_then("cas".into(), blob.hash.clone(), move |()| {
                    let _ = tx.send(());
                });
                let _ = rx.await;
            }
        });
        futures::future::join_all(fills).await;
    }

    /// The blobs an action result names that are missing here after asking the fleet.
    pub async fn missing_after_fill(&self, result: &re::ActionResult) -> Result<Vec<Blob>, Status> {
        let mut missing = Vec::new();
        // A filled tree may name files that are missing in turn: a few rounds at most.
        for _ in 0..FILL_ROUNDS_MAX {
            missing = self
                .app
                .action_result_missing(result)
                .map_err(|e| status_of(&crate::app::store_error(&e)))?;
            if missing.is_empty()
                || (self.app.miss_fetcher().is_none() && self.app.miss_reader().is_none())
            {
                break;
            }
            self.fill(&missing).await;
        }
        Ok(missing)
    }

    /// Interrupted uploads, locked.
    pub fn parked(&self) -> std::sync::MutexGuard<'_, Parked<Upload>> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Now, for the parked-upload policy.
    pub fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Open blobs kept per worker thread for gRPC reads, at most.
const OPEN_BLOBS_PER_WORKER_MAX: usize = 256;
/// Lookups between two sweeps of a worker's cache (which drop replaced or deleted blobs).
const OPEN_BLOBS_SWEEP_LOOKUPS: u32 = 1024;

thread_local! {
    /// This worker's open blobs: a batch of small blobs otherwise pays an open, a stat, a
    /// header read and a close per blob (the largest share of BatchReadBlobs' server time in
    /// the profile, docs/benchmarks.md). The fallback keeps its own the same way.
    static OPEN_BLOBS: std::cell::RefCell<(crate::store::OpenCache, u32)> =
        std::cell::RefCell::new((crate::store::OpenCache::new(OPEN_BLOBS_PER_WORKER_MAX), 0));
}

/// [`App::handle_with`] through this worker's open-blob cache (never reentered; should it
/// be, without the cache).
fn handle_cached(app: &App, info: &RequestInfo<'_>) -> Decision {
    OPEN_BLOBS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut guard) => {
            let (files, lookups) = &mut *guard;
            *lookups += 1;
            if *lookups >= OPEN_BLOBS_SWEEP_LOOKUPS {
                *lookups = 0;
                app.store.sweep_cache(files);
            }
            app.handle_with(info, Some(files))
        }
        Err(_) => app.handle(info),
    })
}

/// Blobs of one action result asked of the fleet at once, at most.
const FILLS_MAX: usize = 256;
/// Rounds of asking the fleet for an action result's blobs (a tree, then its files).
const FILL_ROUNDS_MAX: usize = 3;

/// Commit a written upload (it may fsync, and a write-through waits for the tier: off the
/// async workers).
pub async fn commit(sink: PutSink) -> Result<(), Status> {
    match tokio::task::spawn_blocking(move || sink.finish()).await {
        Ok(reply) if (200..300).contains(&reply.status) => Ok(()),
        Ok(reply) => Err(status_of(&reply)),
        Err(_) => Err(Status::internal("the upload's commit failed")),
    }
}

/// The whole body of a (small) artifact.
pub fn read_all(stored: &Stored) -> Result<Vec<u8>, Status> {
    let mut body = vec![0u8; stored.len() as usize];
    stored
        .read_exact_at(&mut body, 0)
        .map_err(|e| Status::internal(format!("cannot read a stored blob: {e}")))?;
    Ok(body)
}

/// The blob a request's digest names, or INVALID_ARGUMENT saying why not.
pub fn blob_of(what: &str, digest: &Option<re::Digest>) -> Result<Blob, Status> {
    let digest = digest
        .as_ref()
        .ok_or_else(|| Status::invalid_argument(format!("{what}: no digest")))?;
    crate::action_result::checked_digest(what, digest).map_err(|e| Status::invalid_argument(e.0))
}

/// A request naming an instance and a digest function (every CAS and action-cache call).
pub trait Scoped {
    fn instance_name(&self) -> &str;
    fn digest_function(&self) -> i32;
}

macro_rules! scoped {
    ($($t:ty),*) => {$(
        impl Scoped for $t {
            fn instance_name(&self) -> &str {
                &self.instance_name
            }
            fn digest_function(&self) -> i32 {
                self.digest_function
            }
        }
    )*};
}

scoped!(
    re::GetActionResultRequest,
    re::UpdateActionResultRequest,
    re::FindMissingBlobsRequest,
    re::BatchUpdateBlobsRequest,
    re::BatchReadBlobsRequest,
    re::GetTreeRequest
);

/// The caller and the message of a scoped request whose instance name and digest function
/// sluice serves (INVALID_ARGUMENT otherwise).
pub fn accept<T: Scoped>(request: tonic::Request<T>) -> Result<(Caller, T), Status> {
    let caller = Caller::of(&request);
    let message = request.into_inner();
    check_instance(message.instance_name())?;
    check_digest_function(message.digest_function())?;
    Ok((caller, message))
}

/// INVALID_ARGUMENT unless `instance` is an instance name as the HTTP routes accept.
pub fn check_instance(instance: &str) -> Result<(), Status> {
    super::resource::check_instance(instance).map_err(Status::invalid_argument)
}

/// INVALID_ARGUMENT unless the request's digest function is SHA-256 (or unset).
pub fn check_digest_function(value: i32) -> Result<(), Status> {
    use re::digest_function::Value;
    if value == Value::Unknown as i32 || value == Value::Sha256 as i32 {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "digest function {value} is not supported (only SHA256)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_become_grpc_codes() {
        let cases = [
            (400, Code::InvalidArgument),
            (413, Code::InvalidArgument),
            (401, Code::Unauthenticated),
            (403, Code::PermissionDenied),
            (404, Code::NotFound),
            (408, Code::DeadlineExceeded),
            (412, Code::FailedPrecondition),
            (429, Code::ResourceExhausted),
            (507, Code::ResourceExhausted),
            (503, Code::Unavailable),
            (500, Code::Internal),
        ];
        for (http, code) in cases {
            let status = status_of(&Reply::error(http, "why"));
            assert_eq!(status.code(), code, "{http}");
            assert!(status.message().ends_with(": why"), "{}", status.message());
        }
        let denied_codes = [
            (Denied::Unauthorized, Code::Unauthenticated),
            (Denied::Forbidden, Code::PermissionDenied),
            (Denied::OutOfScope, Code::PermissionDenied),
        ];
        for (d, code) in denied_codes {
            assert_eq!(denied(d, "ac").code(), code);
        }
        assert!(denied(Denied::OutOfScope, "ac")
            .message()
            .contains("namespace ac"));
    }
}
