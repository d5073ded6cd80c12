//! Completeness checking of action-cache entries against the local CAS, for every front:
//! the HTTP `/ac/` GET decides through [`App::handle`], the gRPC `GetActionResult` asks
//! [`App::action_result_missing`]. The rules are in [`crate::action_result`].

use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicU64, Ordering};

use bazel_remote_apis::build::bazel::remote::execution::v2::ActionResult;

use crate::action_result::{self, Blob, Cas, Completeness};
use crate::exchange::Reply;
use crate::store::{Artifact, Store, StoreError};

use super::App;

/// Largest action-cache entry whose blobs are checked, in bytes. Real ones are a few KiB;
/// a larger entry is served unchecked rather than read whole on a request's thread.
pub const AC_CHECKED_BYTES_MAX: u64 = 16 << 20;

/// Blobs of an incomplete result read through from the fleet in the background when an HTTP
/// GET finds them missing, at most.
const BACKGROUND_FILLS_MAX: usize = 64;

/// Counters of the completeness check.
#[derive(Default)]
pub(super) struct AcChecks {
    /// Action results answered as misses because a blob they name is missing.
    incomplete_total: AtomicU64,
    /// Blobs found missing by those checks.
    missing_blobs_total: AtomicU64,
}

/// The local CAS as the completeness check sees it. `nowait`: a lookup that would wait for
/// the disk fails with [`StoreError::WouldBlock`] (the ring asks again from its opener).
pub struct StoreCas<'a> {
    pub store: &'a Store,
    pub nowait: bool,
}

impl Cas for StoreCas<'_> {
    type Error = StoreError;

    fn contains(&mut self, blob: &Blob) -> Result<bool, StoreError> {
        let found = self.store.contains("cas", &blob.hash, self.nowait)?;
        Ok(found == Some(blob.size_bytes))
    }

    fn read(&mut self, blob: &Blob) -> Result<Option<Vec<u8>>, StoreError> {
        let opened = if self.nowait {
            self.store.get_nowait("cas", &blob.hash)?
        } else {
            self.store.get("cas", &blob.hash)?
        };
        match opened {
            Some(artifact) if artifact.len == blob.size_bytes => {
                read_body(&artifact, action_result::TREE_BYTES_MAX, self.nowait)
            }
            _ => Ok(None),
        }
    }
}

/// The body of `artifact` when it is at most `len_max` bytes; `nowait` reads only from the
/// page cache.
fn read_body(
    artifact: &Artifact,
    len_max: u64,
    nowait: bool,
) -> Result<Option<Vec<u8>>, StoreError> {
    if artifact.len > len_max {
        return Ok(None);
    }
    let mut body = vec![0u8; artifact.len as usize];
    if nowait {
        let mut done = 0;
        while done < body.len() {
            let at = artifact.body_offset + done as u64;
            match rustix::io::preadv2(
                &*artifact.file,
                &mut [std::io::IoSliceMut::new(&mut body[done..])],
                at,
                rustix::io::ReadWriteFlags::NOWAIT,
            ) {
                Ok(0) => return Ok(None),
                Ok(n) => done += n,
                Err(_) => return Err(StoreError::WouldBlock),
            }
        }
    } else if artifact
        .file
        .read_exact_at(&mut body, artifact.body_offset)
        .is_err()
    {
        return Ok(None);
    }
    Ok(Some(body))
}

impl App {
    /// Whether action-cache lookups check that the blobs a result names are present
    /// (`ac_completeness_check`).
    pub fn ac_completeness_check(&self) -> bool {
        self.limits.ac_completeness_check
    }

    /// The blobs `result` names that the local CAS lacks (empty: complete, or too large to
    /// judge). Blocking: reads output directory trees from the disk.
    pub fn action_result_missing(&self, result: &ActionResult) -> Result<Vec<Blob>, StoreError> {
        let mut cas = StoreCas {
            store: &self.store,
            nowait: false,
        };
        match action_result::check(result, &mut cas)? {
            Completeness::Missing(missing) => Ok(missing),
            Completeness::Complete | Completeness::TooLarge => Ok(Vec::new()),
        }
    }

    /// Count an action result answered as a miss because `missing` blobs are missing.
    pub fn count_incomplete(&self, missing: usize) {
        self.ac_checks
            .incomplete_total
            .fetch_add(1, Ordering::Relaxed);
        self.ac_checks
            .missing_blobs_total
            .fetch_add(missing as u64, Ordering::Relaxed);
    }

    /// On an HTTP `/ac/` hit: the 404 to send instead when the result names a blob the CAS
    /// lacks, `None` to serve it. An entry that is not an action result is served as it is.
    pub(super) fn ac_incomplete(
        &self,
        artifact: &Artifact,
        nowait: bool,
    ) -> Result<Option<Reply>, StoreError> {
        let Some(body) = read_body(artifact, AC_CHECKED_BYTES_MAX, nowait)? else {
            return Ok(None);
        };
        let Some(result) = action_result::decode(&body) else {
            return Ok(None);
        };
        let mut cas = StoreCas {
            store: &self.store,
            nowait,
        };
        let missing = match action_result::check(&result, &mut cas)? {
            Completeness::Missing(missing) => missing,
            Completeness::Complete | Completeness::TooLarge => return Ok(None),
        };
        self.count_incomplete(missing.len());
        self.fill_in_background(&missing);
        Ok(Some(Reply::error(
            404,
            &format!(
                "the action result names {} blob(s) the CAS does not hold, e.g. {}/{}",
                missing.len(),
                missing[0].hash,
                missing[0].size_bytes
            ),
        )))
    }

    /// Ask the fleet (peers, then the tier) for missing blobs without waiting, so a node
    /// that holds an action result but not yet its outputs (a write that reached another
    /// node first, a fresh node over a tier) serves it complete next time.
    fn fill_in_background(&self, missing: &[Blob]) {
        for blob in missing.iter().take(BACKGROUND_FILLS_MAX) {
            if let Some(peers) = self.miss_fetcher() {
                if !peers.known_absent("cas", &blob.hash) {
                    peers.request("cas", &blob.hash, Box::new(|| {}));
                    continue;
                }
            }
            if let Some(tier) = self.miss_reader() {
                std::sync::Arc::clone(tier).fill("cas".into(), blob.hash.clone(), Box::new(|| {}));
            }
        }
    }

    pub(super) fn render_ac_checks(&self, out: &mut String) {
        crate::metrics::write_metric(
            out,
            "sluice_ac_incomplete_total",
            "counter",
            "Action results answered as misses (HTTP 404, gRPC NOT_FOUND) because a blob they name is missing from the CAS.",
            self.ac_checks.incomplete_total.load(Ordering::Relaxed),
        );
        crate::metrics::write_metric(
            out,
            "sluice_ac_missing_blobs_total",
            "counter",
            "Blobs found missing by the completeness check of action results.",
            self.ac_checks.missing_blobs_total.load(Ordering::Relaxed),
        );
    }
}
