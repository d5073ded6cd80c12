//! REAPI v2 over gRPC: Bazel's, Buck2's and every REAPI client's remote cache, on the same
//! port as HTTP (h2c by prior knowledge, TLS with ALPN h2), over the same store.
//!
//! A front like the ring engine and the fallback: it turns each RPC into the requests
//! [`App`] already decides (`GET`/`PUT` of `/cas/{hash}` and `/ac/{hash}`), so tokens and
//! scopes, the read-through from peers and the tier, the commit hooks (replication's outbox,
//! the tier's queue) and eviction treat a gRPC write exactly as an HTTP one, and HTTP and
//! gRPC see the same blobs. Only what HTTP has no words for is decided here: digests and
//! resource names, zstd, batching, trees, resumable writes.
//!
//! ```text
//!  fallback (hyper, HTTP/2) ──content-type: application/grpc──► Reapi::serve (glue.rs)
//!     │ anything else: AppHandler                                │ tonic Routes
//!     ▼                                                          ▼
//!  App::handle ◄──────── access.rs: RequestInfo for /cas/ and /ac/, fleet waits ◄── services
//!                                                      (capabilities, action cache, CAS, ByteStream)
//! ```
//!
//! Blobs are kept on disk as they are (not compressed): HTTP GETs keep their splice path
//! and ETags, and a zstd read compresses on the way out (docs/benchmarks.md has what each
//! choice costs).

mod access;
mod action_cache;
mod bytestream;
mod cas;
pub mod glue;
pub mod parked;
pub mod resource;
pub mod rpc_metrics;

use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::bytestream::byte_stream_server::ByteStreamServer;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::{Request, Response};
use tower::ServiceExt as _;

use crate::app::App;
use glue::{CountingBody, Recorder, RpcBody};
use rpc_metrics::RpcMetrics;

/// The response body the fallback sends.
pub type ResponseBody = BoxBody<Bytes, io::Error>;

/// Largest total of blob bytes in one `BatchUpdateBlobs` or `BatchReadBlobs`, announced in
/// the capabilities: 4 MiB (the default gRPC message limit of every client) less room for
/// the framing of the digests.
pub const BATCH_TOTAL_BYTES_MAX: u64 = 4 * 1024 * 1024 - 64 * 1024;

/// Largest message decoded from a client, bytes: a full batch with its framing, or one
/// ByteStream chunk (clients send 16 KiB to 4 MiB).
pub const MESSAGE_BYTES_MAX: usize = 8 * 1024 * 1024;

/// What the gRPC front takes from the config.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Longest wait for the next message of a ByteStream write (`body_read_timeout_ms`).
    pub message_read_timeout: Duration,
    /// Largest blob accepted (`body_bytes_max`), bytes; announced as `max_cas_blob_size_bytes`.
    pub blob_bytes_max: u64,
}

impl Settings {
    pub fn from_config(config: &crate::config::Config) -> Settings {
        Settings {
            message_read_timeout: Duration::from_millis(config.body_read_timeout_ms),
            blob_bytes_max: match config.store_bytes_max {
                0 => config.body_bytes_max,
                store => config.body_bytes_max.min(store),
            },
        }
    }
}

/// The REAPI services, shared by every fallback worker.
pub struct Reapi {
    routes: tonic::service::Routes,
    metrics: Arc<RpcMetrics>,
    app: Arc<App>,
}

impl Reapi {
    /// The services over `app`; their metrics join `/metrics`.
    pub fn new(app: Arc<App>, settings: Settings) -> Arc<Reapi> {
        let shared = Arc::new(access::Shared::new(Arc::clone(&app), settings));
        let routes = tonic::service::Routes::new(re::capabilities_server::CapabilitiesServer::new(
            action_cache::Capabilities(Arc::clone(&shared)),
        ))
        .add_service(
            re::action_cache_server::ActionCacheServer::new(action_cache::ActionCache(Arc::clone(
                &shared,
            )))
            .max_decoding_message_size(MESSAGE_BYTES_MAX),
        )
        .add_service(
            re::content_addressable_storage_server::ContentAddressableStorageServer::new(cas::Cas(
                Arc::clone(&shared),
            ))
            .max_decoding_message_size(MESSAGE_BYTES_MAX),
        )
        .add_service(
            ByteStreamServer::new(bytestream::ByteStream(shared))
                .max_decoding_message_size(MESSAGE_BYTES_MAX),
        )
        .prepare();
        let metrics = Arc::new(RpcMetrics::default());
        {
            let metrics = Arc::clone(&metrics);
            app.add_metrics_source(move |out| metrics.render(out));
        }
        Arc::new(Reapi {
            routes,
            metrics,
            app,
        })
    }

    /// The per-RPC counters.
    pub fn metrics(&self) -> &RpcMetrics {
        &self.metrics
    }

    /// Whether `req` is gRPC (and so for [`Reapi::serve`]).
    pub fn accepts<B>(req: &Request<B>) -> bool {
        glue::is_grpc(req)
    }

    /// Serve one gRPC request. Unknown services and methods answer UNIMPLEMENTED; a
    /// `grpc-timeout` deadline that passes before the response starts answers
    /// DEADLINE_EXCEEDED.
    pub async fn serve(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let started = Instant::now();
        let method = rpc_metrics::method_index(req.uri().path());
        let deadline = glue::grpc_timeout(&req);
        let request_bytes = Arc::new(AtomicU64::new(0));
        let req = req.map(|body| CountingBody::new(body, Arc::clone(&request_bytes)));
        let recorder = Recorder {
            metrics: Arc::clone(&self.metrics),
            method,
            started,
            request_bytes,
            _public: Some(self.app.metrics.pressure.begin()),
        };
        let call = self.routes.clone().oneshot(req);
        let response = match deadline {
            None => call.await,
            Some(deadline) => match tokio::time::timeout(deadline, call).await {
                Ok(response) => response,
                // Dropping the call cancels the handler; a parked upload stays resumable.
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the call's deadline ({deadline:?}) passed"
                ))
                .into_http()),
            },
        };
        let response = match response {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let header_code = glue::status_code(response.headers());
        response.map(|body| RpcBody::new(body, header_code, recorder).boxed())
    }
}
