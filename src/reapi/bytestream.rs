//! `google.bytestream.ByteStream` over the CAS: Read (with offset and limit, plain or zstd),
//! Write (plain or zstd, resumable: an interrupted upload is parked for its client), and
//! QueryWriteStatus.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bazel_remote_apis::google::bytestream::{
    byte_stream_server, QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest,
    ReadResponse, WriteRequest, WriteResponse,
};
use futures::Stream;
use tonic::{Request, Response, Status, Streaming};
use zstd::stream::raw::{Decoder, InBuffer, Operation as _, OutBuffer};

use super::access::Stored;
use super::access::{commit, Caller, Shared};
use super::cas::ZSTD_LEVEL;
use super::resource::{self, Resource};
use crate::action_result::Blob;
use crate::app::PutSink;
use crate::auth::Access;

/// Bytes of a blob read per `ReadResponse` (each read is one positioned read on the
/// blocking pool; messages stay well under clients' 4 MiB limit).
pub const READ_CHUNK_BYTES: u64 = 1024 * 1024;
/// Messages read ahead of the client (bounded channel between the reader and tonic).
const READ_AHEAD_MESSAGES: usize = 2;
/// Scratch for decompressing one piece of a zstd upload, bytes.
const DECODE_SCRATCH_BYTES: usize = 128 * 1024;

fn invalid(why: impl Into<String>) -> Status {
    Status::invalid_argument(why.into())
}

pub struct ByteStream(pub Arc<Shared>);

/// A ByteStream write in progress: what it has received, and where it goes.
pub struct Upload {
    sink: PutSink,
    /// The blob, once uncompressed.
    blob: Blob,
    /// For `compressed-blobs/zstd/`: the decoder, its scratch, and whether the last frame
    /// ended.
    zstd: Option<(Decoder<'static>, Vec<u8>, bool)>,
    /// Bytes of the resource processed: the next `write_offset` (compressed bytes for zstd).
    committed: u64,
    /// Uncompressed bytes given to the store.
    written: u64,
}

impl Upload {
    fn begin(shared: &Shared, caller: &Caller, res: &Resource<'_>) -> Result<Upload, Status> {
        let blob = Blob {
            hash: res.hash.to_string(),
            size_bytes: res.size_bytes,
        };
        let sink = shared.begin_put(caller, "cas", &blob.hash, blob.size_bytes)?;
        let zstd = match res.zstd {
            true => Some((
                Decoder::new().map_err(|e| Status::internal(format!("zstd: {e}")))?,
                vec![0u8; DECODE_SCRATCH_BYTES],
                false,
            )),
            false => None,
        };
        Ok(Upload {
            sink,
            blob,
            zstd,
            committed: 0,
            written: 0,
        })
    }

    /// Take the next piece of the resource.
    fn feed(&mut self, data: &[u8]) -> Result<(), Status> {
        self.committed += data.len() as u64;
        match self.zstd.as_mut() {
            None => {
                self.written += data.len() as u64;
                if self.written > self.blob.size_bytes {
                    return Err(invalid(format!(
                        "more than the blob's {} bytes sent",
                        self.blob.size_bytes
                    )));
                }
                self.sink
                    .write(data)
                    .map_err(|reply| super::access::status_of(&reply))
            }
            Some((decoder, scratch, frame_done)) => {
                let mut input = InBuffer::around(data);
                loop {
                    let mut output = OutBuffer::around(&mut scratch[..]);
                    let hint = decoder
                        .run(&mut input, &mut output)
                        .map_err(|e| invalid(format!("zstd data does not decode: {e}")))?;
                    let produced = output.pos();
                    *frame_done = hint == 0;
                    self.written += produced as u64;
                    if self.written > self.blob.size_bytes {
                        return Err(invalid(format!(
                            "the zstd data decodes to more than the blob's {} bytes",
                            self.blob.size_bytes
                        )));
                    }
                    self.sink
                        .write(&scratch[..produced])
                        .map_err(|reply| super::access::status_of(&reply))?;
                    if input.pos() == data.len() && produced < scratch.len() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// The client said `finish_write`: check the length (and the zstd frame) and commit.
    async fn finish(self) -> Result<(), Status> {
        if let Some((_, _, false)) = &self.zstd {
            return Err(invalid("the zstd data ends inside a frame"));
        }
        if self.written != self.blob.size_bytes {
            return Err(invalid(format!(
                "{} bytes written for a blob of {} bytes",
                self.written, self.blob.size_bytes
            )));
        }
        // The store checks the sha256 at the commit: INVALID_ARGUMENT on a mismatch.
        commit(self.sink).await
    }
}

/// The next message of a write, or DEADLINE_EXCEEDED after `timeout` without one.
async fn next_message(
    stream: &mut Streaming<WriteRequest>,
    timeout: Duration,
) -> Result<Option<WriteRequest>, Status> {
    match tokio::time::timeout(timeout, stream.message()).await {
        Ok(Err(status)) if from_the_connection(&status) => Err(Status::cancelled(format!(
            "the client ended the write: {}",
            status.message()
        ))),
        Ok(message) => message,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no write message for {} ms (body_read_timeout_ms)",
            timeout.as_millis()
        ))),
    }
}

/// Whether a failed read of the request stream failed in HTTP/2 (the client reset the
/// stream or the connection went) rather than in decoding a message: tonic reports both as
/// INTERNAL, gRPC calls the first CANCELLED.
fn from_the_connection(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<hyper::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// The messages of a read, from a producer task through a bounded channel.
pub struct ReadStream(tokio::sync::mpsc::Receiver<Result<ReadResponse, Status>>);

impl Stream for ReadStream {
    type Item = Result<ReadResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// Send `start..end` of `artifact`'s body, plain or as one zstd frame, one message per
/// [`READ_CHUNK_BYTES`] read; stops when the client goes.
async fn produce(
    artifact: Option<Stored>,
    start: u64,
    end: u64,
    zstd: bool,
    tx: tokio::sync::mpsc::Sender<Result<ReadResponse, Status>>,
) {
    let mut encoder = match zstd {
        true => match zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL) {
            Ok(mut encoder) => {
                let _ = encoder.set_pledged_src_size(Some(end - start));
                let _ = encoder.include_contentsize(true);
                Some(encoder)
            }
            Err(e) => {
                let _ = tx.send(Err(Status::internal(format!("zstd: {e}")))).await;
                return;
            }
        },
        false => None,
    };
    let mut at = start;
    loop {
        let want = (end - at).min(READ_CHUNK_BYTES);
        let last = at + want == end;
        let source = artifact.clone();
        // The read (and the compression) on the blocking pool: a cold blob waits for the
        // disk there, not on a fallback worker.
        let step = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let mut data = vec![0u8; want as usize];
            if let Some(source) = source {
                source.read_exact_at(&mut data, at)?;
            }
            match encoder {
                None => Ok((data, None)),
                Some(mut encoder) => {
                    encoder.write_all(&data)?;
                    if last {
                        Ok((encoder.finish()?, None))
                    } else {
                        let out = std::mem::take(encoder.get_mut());
                        Ok((out, Some(encoder)))
                    }
                }
            }
        })
        .await;
        let (data, next_encoder) = match step {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                let _ = tx
                    .send(Err(Status::internal(format!("cannot read the blob: {e}"))))
                    .await;
                return;
            }
            Err(_) => {
                let _ = tx.send(Err(Status::internal("the read failed"))).await;
                return;
            }
        };
        encoder = next_encoder;
        at += want;
        // A compressed piece may be empty while the encoder buffers: send only bytes,
        // except that an empty blob still gets its one (empty) message.
        if (!data.is_empty() || (last && start == end))
            && tx.send(Ok(ReadResponse { data })).await.is_err()
        {
            return; // the client went
        }
        if last {
            return;
        }
    }
}

#[tonic::async_trait]
impl byte_stream_server::ByteStream for ByteStream {
    type ReadStream = ReadStream;

    async fn read(&self, request: Request<ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let res =
            resource::parse(&request.resource_name, resource::Access::Read).map_err(invalid)?;
        let blob = Blob {
            hash: res.hash.to_string(),
            size_bytes: res.size_bytes,
        };
        if request.read_limit < 0 {
            return Err(invalid("read_limit is negative"));
        }
        if res.zstd && request.read_limit != 0 {
            return Err(invalid("read_limit must be 0 for compressed-blobs (REAPI)"));
        }
        let offset = u64::try_from(request.read_offset)
            .ok()
            .filter(|o| *o <= blob.size_bytes)
            .ok_or_else(|| {
                Status::out_of_range(format!(
                    "read_offset {} is outside the blob's {} bytes",
                    request.read_offset, blob.size_bytes
                ))
            })?;
        let artifact = if blob.is_empty() {
            self.0.authorize(&caller, "cas", Access::Read)?;
            None
        } else {
            Some(self.0.open_blob(&caller, &blob).await?.ok_or_else(|| {
                Status::not_found(format!(
                    "blob {}/{} is not in the CAS",
                    blob.hash, blob.size_bytes
                ))
            })?)
        };
        let end = match request.read_limit {
            0 => blob.size_bytes,
            limit => blob.size_bytes.min(offset.saturating_add(limit as u64)),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD_MESSAGES);
        tokio::spawn(produce(artifact, offset, end, res.zstd, tx));
        Ok(Response::new(ReadStream(rx)))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let caller = Caller::of(&request);
        let timeout = self.0.settings.message_read_timeout;
        let mut stream = request.into_inner();
        let first = next_message(&mut stream, timeout)
            .await?
            .ok_or_else(|| invalid("a write with no message"))?;
        let name = first.resource_name.clone();
        let res = resource::parse(&name, resource::Access::Write).map_err(invalid)?;
        self.0.authorize(&caller, "cas", Access::Write)?;
        if res.size_bytes > self.0.settings.blob_bytes_max {
            return Err(invalid(format!(
                "the blob is {} bytes; at most {} (max_cas_blob_size_bytes)",
                res.size_bytes, self.0.settings.blob_bytes_max
            )));
        }
        let blob = Blob {
            hash: res.hash.to_string(),
            size_bytes: res.size_bytes,
        };
        if self.0.has_blob(&blob) {
            // Already stored: done at once (REAPI: the full size, or -1 for a compressed one).
            let committed_size = if res.zstd { -1 } else { blob.size_bytes as i64 };
            return Ok(Response::new(WriteResponse { committed_size }));
        }
        let now = self.0.now();
        let parked = self.0.parked().take(&name, now);
        let mut upload = match (u64::try_from(first.write_offset), parked) {
            (Ok(0), _) => Upload::begin(&self.0, &caller, &res)?,
            (Ok(offset), Some((upload, committed))) if offset == committed => upload,
            (_, Some((upload, committed))) => {
                self.0.parked().park(&name, upload, committed, now);
                return Err(invalid(format!(
                    "write_offset {} does not resume this upload: {committed} bytes are committed (QueryWriteStatus)",
                    first.write_offset
                )));
            }
            (_, None) => {
                return Err(invalid(format!(
                    "write_offset {} with no upload of {name:?} to resume",
                    first.write_offset
                )))
            }
        };
        let mut message = first;
        loop {
            if !message.resource_name.is_empty() && message.resource_name != name {
                return Err(invalid("a write's messages name different resources"));
            }
            if u64::try_from(message.write_offset) != Ok(upload.committed) {
                return Err(invalid(format!(
                    "write_offset {} where {} was expected",
                    message.write_offset, upload.committed
                )));
            }
            upload.feed(&message.data)?;
            if message.finish_write {
                break;
            }
            match next_message(&mut stream, timeout).await {
                Ok(Some(next)) => message = next,
                // Closed without finish_write: keep it for the client to resume.
                Ok(None) => {
                    let committed = upload.committed;
                    self.0.parked().park(&name, upload, committed, self.0.now());
                    return Ok(Response::new(WriteResponse {
                        committed_size: committed as i64,
                    }));
                }
                // Cut off or stalled: resumable all the same.
                Err(status) => {
                    let committed = upload.committed;
                    self.0.parked().park(&name, upload, committed, self.0.now());
                    return Err(status);
                }
            }
        }
        let committed = upload.committed;
        upload.finish().await?;
        Ok(Response::new(WriteResponse {
            committed_size: committed as i64,
        }))
    }

    async fn query_write_status(
        &self,
        request: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        let caller = Caller::of(&request);
        let name = request.into_inner().resource_name;
        let res = resource::parse(&name, resource::Access::Write).map_err(invalid)?;
        self.0.authorize(&caller, "cas", Access::Write)?;
        if let Some(committed) = self.0.parked().committed(&name, self.0.now()) {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: committed as i64,
                complete: false,
            }));
        }
        let blob = Blob {
            hash: res.hash.to_string(),
            size_bytes: res.size_bytes,
        };
        if self.0.has_blob(&blob) {
            return Ok(Response::new(QueryWriteStatusResponse {
                committed_size: blob.size_bytes as i64,
                complete: true,
            }));
        }
        Err(Status::not_found(format!(
            "no upload of {name:?} in progress, and the blob is not in the CAS"
        )))
    }
}
