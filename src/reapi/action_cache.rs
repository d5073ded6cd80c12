//! `Capabilities` and `ActionCache`.

use std::sync::Arc;

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use bazel_remote_apis::build::bazel::semver::SemVer;
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::access::{accept, blob_of, check_instance, commit, read_all, Caller, Shared, Stored};
use super::BATCH_TOTAL_BYTES_MAX;
use crate::action_result::{self, Blob};
use crate::auth::Access;

/// Inline bytes (stdout, stderr, output files) one `GetActionResult` answer carries at most:
/// the rest is left for the client to download, as REAPI allows.
const INLINE_BYTES_MAX: u64 = 1024 * 1024;

fn semver(major: i32, minor: i32) -> Option<SemVer> {
    Some(SemVer {
        major,
        minor,
        patch: 0,
        prerelease: String::new(),
    })
}

/// The capabilities sluice has: SHA-256, an action cache the caller may or may not update,
/// zstd for ByteStream and the batch calls, batches up to [`BATCH_TOTAL_BYTES_MAX`], blobs
/// up to `blob_bytes_max`, no remote execution, API 2.0 to 2.3.
pub fn capabilities(update_enabled: bool, blob_bytes_max: u64) -> re::ServerCapabilities {
    use re::compressor::Value as Compressor;
    re::ServerCapabilities {
        cache_capabilities: Some(re::CacheCapabilities {
            digest_functions: vec![re::digest_function::Value::Sha256 as i32],
            action_cache_update_capabilities: Some(re::ActionCacheUpdateCapabilities {
                update_enabled,
            }),
            cache_priority_capabilities: Some(re::PriorityCapabilities {
                priorities: vec![re::priority_capabilities::PriorityRange {
                    min_priority: 0,
                    max_priority: 0,
                }],
            }),
            max_batch_total_size_bytes: BATCH_TOTAL_BYTES_MAX as i64,
            symlink_absolute_path_strategy: re::symlink_absolute_path_strategy::Value::Allowed
                as i32,
            supported_compressors: vec![Compressor::Zstd as i32],
            supported_batch_update_compressors: vec![Compressor::Zstd as i32],
            max_cas_blob_size_bytes: i64::try_from(blob_bytes_max).unwrap_or(i64::MAX),
            ..Default::default()
        }),
        execution_capabilities: None,
        deprecated_api_version: None,
        low_api_version: semver(2, 0),
        high_api_version: semver(2, 3),
    }
}

pub struct Capabilities(pub Arc<Shared>);

#[tonic::async_trait]
impl re::capabilities_server::Capabilities for Capabilities {
    async fn get_capabilities(
        &self,
        request: Request<re::GetCapabilitiesRequest>,
    ) -> Result<Response<re::ServerCapabilities>, Status> {
        check_instance(&request.get_ref().instance_name)?;
        // Answered to anyone (clients ask before anything else); `update_enabled` says
        // whether this caller's credentials may write action results, so a read-only token
        // learns it up front (Bazel then needs --noremote_upload_local_results).
        let caller = Caller::of(&request);
        let update_enabled = self.0.authorize(&caller, "ac", Access::Write).is_ok();
        Ok(Response::new(capabilities(
            update_enabled,
            self.0.settings.blob_bytes_max,
        )))
    }
}

pub struct ActionCache(pub Arc<Shared>);

impl ActionCache {
    /// The stored action result of `action`, complete (every blob it names is here, after
    /// asking the fleet for the missing ones), or `None`.
    async fn lookup(
        &self,
        caller: &Caller,
        action: &Blob,
    ) -> Result<Option<re::ActionResult>, Status> {
        let shared = &self.0;
        let mut artifact = shared.open(caller, "ac", &action.hash).await?;
        let app = &shared.app;
        if artifact.is_none()
            && app.ac_completeness_check()
            && (app.miss_fetcher().is_some() || app.miss_reader().is_some())
        {
            // Incomplete here, perhaps not in the fleet: bring the missing blobs, ask again.
            if let Ok(Some(stored)) = app.store.get("ac", &action.hash) {
                if stored.len <= crate::app::AC_CHECKED_BYTES_MAX {
                    if let Some(result) =
                        action_result::decode(&read_all(&Stored::File(Arc::new(stored)))?)
                    {
                        shared.missing_after_fill(&result).await?;
                        artifact = shared.open(caller, "ac", &action.hash).await?;
                    }
                }
            }
        }
        let Some(artifact) = artifact else {
            return Ok(None);
        };
        if artifact.len() > crate::app::AC_CHECKED_BYTES_MAX {
            return Err(Status::resource_exhausted(format!(
                "the stored action result is {} bytes; at most {} are served",
                artifact.len(),
                crate::app::AC_CHECKED_BYTES_MAX
            )));
        }
        // An entry an HTTP client stored that is not an action result: a miss for REAPI.
        Ok(action_result::decode(&read_all(&artifact)?))
    }

    /// Fill in the inline contents a client asked for, within [`INLINE_BYTES_MAX`].
    async fn inline(
        &self,
        caller: &Caller,
        result: &mut re::ActionResult,
        request: &re::GetActionResultRequest,
    ) -> Result<(), Status> {
        let mut budget = INLINE_BYTES_MAX;
        let mut fetch = |digest: Option<re::Digest>| {
            let blob = digest.as_ref().and_then(Blob::from_digest);
            let take = blob.filter(|b| b.size_bytes <= budget);
            if let Some(b) = &take {
                budget -= b.size_bytes;
            }
            take
        };
        let stdout = if request.inline_stdout && result.stdout_raw.is_empty() {
            fetch(result.stdout_digest.clone())
        } else {
            None
        };
        let stderr = if request.inline_stderr && result.stderr_raw.is_empty() {
            fetch(result.stderr_digest.clone())
        } else {
            None
        };
        let mut files = Vec::new();
        for (i, file) in result.output_files.iter().enumerate() {
            if request.inline_output_files.contains(&file.path) {
                if let Some(blob) = fetch(file.digest.clone()) {
                    files.push((i, blob));
                }
            }
        }
        if let Some(blob) = stdout {
            result.stdout_raw = self.blob_bytes(caller, &blob).await?;
        }
        if let Some(blob) = stderr {
            result.stderr_raw = self.blob_bytes(caller, &blob).await?;
        }
        for (i, blob) in files {
            let bytes = self.blob_bytes(caller, &blob).await?;
            if let Some(file) = result.output_files.get_mut(i) {
                file.contents = bytes;
            }
        }
        Ok(())
    }

    async fn blob_bytes(&self, caller: &Caller, blob: &Blob) -> Result<Vec<u8>, Status> {
        if blob.is_empty() {
            return Ok(Vec::new());
        }
        match self.0.open_blob(caller, blob).await? {
            Some(artifact) => read_all(&artifact),
            // Checked present a moment ago; gone now: leave it for the client to fetch.
            None => Ok(Vec::new()),
        }
    }
}

#[tonic::async_trait]
impl re::action_cache_server::ActionCache for ActionCache {
    async fn get_action_result(
        &self,
        request: Request<re::GetActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let (caller, request) = accept(request)?;
        let action = blob_of("action digest", &request.action_digest)?;
        let Some(mut result) = self.lookup(&caller, &action).await? else {
            return Err(Status::not_found(format!(
                "no complete action result for {}/{}",
                action.hash, action.size_bytes
            )));
        };
        self.inline(&caller, &mut result, &request).await?;
        Ok(Response::new(result))
    }

    async fn update_action_result(
        &self,
        request: Request<re::UpdateActionResultRequest>,
    ) -> Result<Response<re::ActionResult>, Status> {
        let (caller, request) = accept(request)?;
        let action = blob_of("action digest", &request.action_digest)?;
        let result = request
            .action_result
            .ok_or_else(|| Status::invalid_argument("no action_result"))?;
        action_result::validate(&result).map_err(|e| Status::invalid_argument(e.0))?;
        // Refuse a caller who may not write before looking at the CAS for them.
        self.0.authorize(&caller, "ac", Access::Write)?;
        if self.0.app.ac_completeness_check() {
            let missing = self.0.missing_after_fill(&result).await?;
            if let Some(first) = missing.first() {
                return Err(Status::failed_precondition(format!(
                    "the action result names {} blob(s) the CAS does not hold, e.g. {}/{}; upload them first",
                    missing.len(),
                    first.hash,
                    first.size_bytes
                )));
            }
        }
        let bytes = result.encode_to_vec();
        let mut sink = self
            .0
            .begin_put(&caller, "ac", &action.hash, bytes.len() as u64)?;
        sink.write(&bytes)
            .map_err(|r| super::access::status_of(&r))?;
        commit(sink).await?;
        Ok(Response::new(result))
    }
}
