//! `ContentAddressableStorage`: FindMissingBlobs, the batch calls and GetTree. The CAS
//! chunking calls (SplitBlob, SpliceBlob, GetChunkMapping, RegisterChunkMapping) answer
//! UNIMPLEMENTED, and the capabilities say they are not supported.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::google::rpc::Status as RpcStatus;
use futures::{Stream, StreamExt as _};
use prost::Message as _;
use tonic::{Code, Request, Response, Status, Streaming};

use super::access::{accept, blob_of, commit, read_all, Caller, Shared};
use super::BATCH_TOTAL_BYTES_MAX;
use crate::action_result::Blob;
use crate::auth::Access;

/// Digests one FindMissingBlobs may ask about (a 10,000-digest call is about 1 MB).
pub const FIND_MISSING_DIGESTS_MAX: usize = 100_000;
/// Blob uploads of one BatchUpdateBlobs committed at once: their syncs are grouped.
const BATCH_UPDATES_IN_FLIGHT_MAX: usize = 64;
/// zstd level of compressed reads: the fastest; the blobs are read far more often than
/// written, and the wire saving of higher levels is small next to their CPU cost.
pub const ZSTD_LEVEL: i32 = 1;
/// Blobs smaller than this are never sent compressed (a zstd frame costs more than it saves).
const COMPRESS_BYTES_MIN: u64 = 256;
/// Directories one GetTree walks, at most (a tree larger than this is answered in part,
/// which REAPI allows for a tree not wholly present).
const TREE_DIRECTORIES_MAX: usize = 1 << 20;
/// Directories per GetTree page unless the client asks for fewer.
const TREE_PAGE_DIRECTORIES_MAX: usize = 1000;
/// Bytes of directories per GetTree page, so a page stays under clients' 4 MiB messages.
const TREE_PAGE_BYTES_MAX: usize = 2 * 1024 * 1024;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn rpc_status(status: Result<(), Status>) -> Option<RpcStatus> {
    Some(match status {
        Ok(()) => RpcStatus::default(),
        Err(status) => RpcStatus {
            code: status.code() as i32,
            message: status.message().to_string(),
            details: Vec::new(),
        },
    })
}

pub struct Cas(pub Arc<Shared>);

impl Cas {
    /// Store one blob of a batch (already decompressed).
    async fn update_one(&self, caller: &Caller, blob: &Blob, data: &[u8]) -> Result<(), Status> {
        if data.len() as u64 != blob.size_bytes {
            return Err(Status::invalid_argument(format!(
                "{} bytes sent for a blob of {} bytes",
                data.len(),
                blob.size_bytes
            )));
        }
        if self.0.has_blob(blob) {
            // Content-addressed: what is here is what was sent (if the digest is right).
            return Ok(());
        }
        let mut sink = self
            .0
            .begin_put(caller, "cas", &blob.hash, blob.size_bytes)?;
        sink.write(data)
            .map_err(|reply| super::access::status_of(&reply))?;
        commit(sink).await
    }

    /// Read one blob of a batch: its bytes and compressor.
    async fn read_one(
        &self,
        caller: &Caller,
        blob: &Blob,
        zstd_ok: bool,
    ) -> Result<(Vec<u8>, i32), Status> {
        use re::compressor::Value as Compressor;
        let data = if blob.is_empty() {
            Vec::new()
        } else {
            match self.0.open_blob(caller, blob).await? {
                Some(artifact) => read_all(&artifact)?,
                None => return Err(Status::not_found("blob not found")),
            }
        };
        if zstd_ok && blob.size_bytes >= COMPRESS_BYTES_MIN {
            if let Ok(packed) = zstd::bulk::compress(&data, ZSTD_LEVEL) {
                if packed.len() < data.len() {
                    return Ok((packed, Compressor::Zstd as i32));
                }
            }
        }
        Ok((data, Compressor::Identity as i32))
    }
}

/// The blob bytes of a batch entry, decompressed, or why not.
fn batch_data(blob: &Blob, compressor: i32, data: Vec<u8>) -> Result<Vec<u8>, Status> {
    use re::compressor::Value as Compressor;
    if compressor == Compressor::Identity as i32 {
        return Ok(data);
    }
    if compressor != Compressor::Zstd as i32 {
        return Err(Status::invalid_argument(format!(
            "compressor {compressor} is not supported (identity or zstd)"
        )));
    }
    // The capacity bounds what a small frame may expand to: at most the digest's size.
    let plain = zstd::bulk::decompress(&data, blob.size_bytes as usize).map_err(|e| {
        Status::invalid_argument(format!(
            "zstd data does not decompress to at most {} bytes: {e}",
            blob.size_bytes
        ))
    })?;
    Ok(plain)
}

#[tonic::async_trait]
impl re::content_addressable_storage_server::ContentAddressableStorage for Cas {
    async fn find_missing_blobs(
        &self,
        request: Request<re::FindMissingBlobsRequest>,
    ) -> Result<Response<re::FindMissingBlobsResponse>, Status> {
        let (caller, request) = accept(request)?;
        self.0.authorize(&caller, "cas", Access::Read)?;
        if request.blob_digests.len() > FIND_MISSING_DIGESTS_MAX {
            return Err(Status::invalid_argument(format!(
                "{} digests asked; at most {FIND_MISSING_DIGESTS_MAX} per call",
                request.blob_digests.len()
            )));
        }
        let mut missing = Vec::new();
        for digest in request.blob_digests {
            let blob = blob_of("blob", &Some(digest.clone()))?;
            // Answered from the store's index: no system call per digest.
            if !self.0.has_blob(&blob) {
                missing.push(digest);
            }
        }
        Ok(Response::new(re::FindMissingBlobsResponse {
            missing_blob_digests: missing,
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: Request<re::BatchUpdateBlobsRequest>,
    ) -> Result<Response<re::BatchUpdateBlobsResponse>, Status> {
        let (caller, request) = accept(request)?;
        self.0.authorize(&caller, "cas", Access::Write)?;
        let total: u64 = request.requests.iter().map(|r| r.data.len() as u64).sum();
        if total > BATCH_TOTAL_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "the batch carries {total} bytes; at most {BATCH_TOTAL_BYTES_MAX} (max_batch_total_size_bytes)"
            )));
        }
        let caller = &caller;
        let responses: Vec<_> = futures::stream::iter(request.requests)
            .map(|entry| async move {
                let result = async {
                    let blob = blob_of("blob", &entry.digest)?;
                    let data = batch_data(&blob, entry.compressor, entry.data)?;
                    self.update_one(caller, &blob, &data).await
                }
                .await;
                re::batch_update_blobs_response::Response {
                    digest: entry.digest,
                    status: rpc_status(result),
                }
            })
            .buffered(BATCH_UPDATES_IN_FLIGHT_MAX)
            .collect()
            .await;
        Ok(Response::new(re::BatchUpdateBlobsResponse { responses }))
    }

    async fn batch_read_blobs(
        &self,
        request: Request<re::BatchReadBlobsRequest>,
    ) -> Result<Response<re::BatchReadBlobsResponse>, Status> {
        let (caller, request) = accept(request)?;
        self.0.authorize(&caller, "cas", Access::Read)?;
        let total: u64 = request
            .digests
            .iter()
            .map(|d| u64::try_from(d.size_bytes).unwrap_or(0))
            .sum();
        if total > BATCH_TOTAL_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "the batch asks for {total} bytes; at most {BATCH_TOTAL_BYTES_MAX} (max_batch_total_size_bytes)"
            )));
        }
        let zstd_ok = request
            .acceptable_compressors
            .contains(&(re::compressor::Value::Zstd as i32));
        let mut responses = Vec::with_capacity(request.digests.len());
        for digest in request.digests {
            let read = match blob_of("blob", &Some(digest.clone())) {
                Ok(blob) => self.read_one(&caller, &blob, zstd_ok).await,
                Err(status) => Err(status),
            };
            let (data, compressor, status) = match read {
                Ok((data, compressor)) => (data, compressor, Ok(())),
                Err(status) => (Vec::new(), 0, Err(status)),
            };
            responses.push(re::batch_read_blobs_response::Response {
                digest: Some(digest),
                data,
                compressor,
                status: rpc_status(status),
            });
        }
        Ok(Response::new(re::BatchReadBlobsResponse { responses }))
    }

    type GetTreeStream = BoxStream<re::GetTreeResponse>;

    async fn get_tree(
        &self,
        request: Request<re::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        let (caller, request) = accept(request)?;
        let root = blob_of("root digest", &request.root_digest)?;
        let skip: usize = match request.page_token.as_str() {
            "" => 0,
            token => token
                .parse()
                .map_err(|_| Status::invalid_argument("page_token is not one this server gave"))?,
        };
        let page_max = match usize::try_from(request.page_size) {
            Ok(0) | Err(_) => TREE_PAGE_DIRECTORIES_MAX,
            Ok(n) => n.min(TREE_PAGE_DIRECTORIES_MAX),
        };
        let directories = self.walk(&caller, &root).await?;
        let pages = paginate(directories, skip, page_max);
        Ok(Response::new(Box::pin(futures::stream::iter(
            pages.into_iter().map(Ok),
        ))))
    }

    async fn split_blob(
        &self,
        _request: Request<re::SplitBlobRequest>,
    ) -> Result<Response<re::SplitBlobResponse>, Status> {
        Err(chunking_unimplemented())
    }

    async fn splice_blob(
        &self,
        _request: Request<re::SpliceBlobRequest>,
    ) -> Result<Response<re::SpliceBlobResponse>, Status> {
        Err(chunking_unimplemented())
    }

    type GetChunkMappingStream = BoxStream<re::GetChunkMappingResponse>;

    async fn get_chunk_mapping(
        &self,
        _request: Request<re::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(chunking_unimplemented())
    }

    async fn register_chunk_mapping(
        &self,
        _request: Request<Streaming<re::RegisterChunkMappingRequest>>,
    ) -> Result<Response<re::RegisterChunkMappingResponse>, Status> {
        Err(chunking_unimplemented())
    }
}

fn chunking_unimplemented() -> Status {
    Status::new(
        Code::Unimplemented,
        "CAS chunking (split/splice) is not supported; the capabilities say so",
    )
}

impl Cas {
    /// Every directory under `root`, breadth first, each once; those missing from the CAS
    /// are left out with what lies under them. NOT_FOUND when the root itself is missing.
    async fn walk(&self, caller: &Caller, root: &Blob) -> Result<Vec<re::Directory>, Status> {
        let mut queue = VecDeque::from([root.clone()]);
        let mut seen = HashSet::from([root.clone()]);
        let mut directories = Vec::new();
        while let Some(blob) = queue.pop_front() {
            if directories.len() >= TREE_DIRECTORIES_MAX {
                break;
            }
            let bytes = if blob.is_empty() {
                Some(Vec::new())
            } else {
                match self.0.open_blob(caller, &blob).await? {
                    Some(artifact) => Some(read_all(&artifact)?),
                    None => None,
                }
            };
            let Some(bytes) = bytes else {
                if directories.is_empty() {
                    return Err(Status::not_found(format!(
                        "the tree's root {}/{} is not in the CAS",
                        root.hash, root.size_bytes
                    )));
                }
                continue;
            };
            let directory = re::Directory::decode(bytes.as_slice()).map_err(|_| {
                Status::invalid_argument(format!(
                    "blob {}/{} is not a Directory",
                    blob.hash, blob.size_bytes
                ))
            })?;
            for child in &directory.directories {
                if let Some(child) = child.digest.as_ref().and_then(Blob::from_digest) {
                    if seen.insert(child.clone()) {
                        queue.push_back(child);
                    }
                }
            }
            directories.push(directory);
        }
        Ok(directories)
    }
}

/// Pages of `directories` from index `skip`: at most `page_max` directories and about
/// [`TREE_PAGE_BYTES_MAX`] bytes each; every page but the last names where the next starts.
fn paginate(
    directories: Vec<re::Directory>,
    skip: usize,
    page_max: usize,
) -> Vec<re::GetTreeResponse> {
    let mut pages = Vec::new();
    let mut page = Vec::new();
    let mut page_bytes = 0;
    for (index, directory) in (skip..).zip(directories.into_iter().skip(skip)) {
        let len = directory.encoded_len();
        if !page.is_empty() && (page.len() >= page_max || page_bytes + len > TREE_PAGE_BYTES_MAX) {
            pages.push(re::GetTreeResponse {
                directories: std::mem::take(&mut page),
                next_page_token: index.to_string(),
            });
            page_bytes = 0;
        }
        page_bytes += len;
        page.push(directory);
    }
    pages.push(re::GetTreeResponse {
        directories: page,
        next_page_token: String::new(),
    });
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> re::Directory {
        re::Directory {
            files: vec![re::FileNode {
                name: name.to_string(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn pages_carry_the_next_index() {
        let dirs: Vec<_> = (0..5).map(|i| dir(&i.to_string())).collect();
        let pages = paginate(dirs.clone(), 0, 2);
        let tokens: Vec<_> = pages.iter().map(|p| p.next_page_token.as_str()).collect();
        assert_eq!(tokens, ["2", "4", ""]);
        assert_eq!(pages[2].directories, vec![dirs[4].clone()]);
        // Resuming from a token gives the rest.
        let rest = paginate(dirs.clone(), 2, 2);
        assert_eq!(rest[0].directories, dirs[2..4].to_vec());
        // Past the end: one empty last page.
        let none = paginate(dirs, 9, 2);
        assert_eq!(none.len(), 1);
        assert!(none[0].directories.is_empty());
    }

    #[test]
    fn batch_data_decompresses_within_the_digest_size() {
        use re::compressor::Value as C;
        let plain = vec![7u8; 10_000];
        let blob = Blob {
            hash: "0".repeat(64),
            size_bytes: plain.len() as u64,
        };
        let packed = zstd::bulk::compress(&plain, 3).unwrap();
        assert_eq!(
            batch_data(&blob, C::Zstd as i32, packed.clone()).unwrap(),
            plain
        );
        let small = Blob {
            size_bytes: 100,
            ..blob.clone()
        };
        let err = batch_data(&small, C::Zstd as i32, packed).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = batch_data(&blob, C::Brotli as i32, vec![]).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            batch_data(&blob, C::Identity as i32, vec![1]).unwrap(),
            vec![1]
        );
    }
}
