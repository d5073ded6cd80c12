//! The object-store client: `object_store`'s S3 implementation, configured
//! from `tier_url`, `tier_endpoint` and the standard AWS environment and
//! files. Every call here is async and runs on the tier's own tokio runtime
//! (`sluice-tier`), never on an engine thread.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, AttributeValue, Attributes, ClientOptions, GetOptions, GetResult, ObjectStore,
    PutMultipartOptions, PutPayload, RetryConfig, WriteMultipart,
};

use crate::store::Artifact;

/// Bodies up to this size go up in one PUT; larger ones as a multipart
/// upload of parts this size (S3's smallest part is 5 MiB).
pub const PART_BYTES: usize = 8 << 20;
/// Parts of one multipart upload in flight at once: with the upload window
/// this bounds the memory uploads use (`UPLOADS_IN_FLIGHT_MAX` × (1 + this)
/// × `PART_BYTES`).
pub const PARTS_IN_FLIGHT_MAX: usize = 2;
/// Reads from the artifact file, bytes at a time.
const READ_CHUNK_BYTES: usize = 1 << 20;
/// The slowest transfer a request that moves a body is given time for, on
/// top of `tier_timeout_ms`: an 8 MiB part may take 32 s more, a 4 KiB
/// artifact 16 ms more. (A fixed 30 s for every body let a hung object
/// store hold each small upload, `failures` 0 and state "up", for 30 s.)
const BODY_BYTES_PER_SEC_MIN: u64 = 256 * 1024;

/// `timeout` plus the time `bytes` take at [`BODY_BYTES_PER_SEC_MIN`].
fn body_deadline(timeout: Duration, bytes: u64) -> Duration {
    timeout + Duration::from_millis(bytes.saturating_mul(1000) / BODY_BYTES_PER_SEC_MIN)
}

/// Object metadata names (`x-amz-meta-…` on S3).
pub const META_SHA256: &str = "sha256";
pub const META_WRITE_TIME_MS: &str = "write-time-ms";
/// The response headers an artifact keeps (Turborepo's `x-artifact-*`),
/// as `store::format::Meta::to_header_value` writes them; absent when none.
pub const META_KEPT: &str = "sluice-meta";

/// What a ranged GET brought.
#[derive(Debug)]
pub struct RangeRead {
    /// The whole object's length.
    pub total: u64,
    /// Offset of `bytes[0]`.
    pub start: u64,
    /// The sha256 metadata, hex, if the object carries it.
    pub sha256: Option<String>,
    pub bytes: Bytes,
}

/// Why a tier request failed.
#[derive(Debug)]
pub enum TierError {
    /// The object is not there.
    NotFound,
    /// Anything else: the tier is down, slow, refused, or the local file
    /// could not be read.
    Failed(String),
}

impl std::fmt::Display for TierError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TierError::NotFound => f.write_str("not found"),
            TierError::Failed(why) => f.write_str(why),
        }
    }
}

fn failed(err: impl std::fmt::Display) -> TierError {
    TierError::Failed(err.to_string())
}

fn from_store(err: object_store::Error) -> TierError {
    match err {
        object_store::Error::NotFound { .. } => TierError::NotFound,
        other => failed(other),
    }
}

/// `tier_url` split: bucket and key prefix (no slashes at its ends).
pub fn parse_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("s3://")?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    Some((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// The shared credentials and config files (`~/.aws/credentials`,
/// `~/.aws/config`, or `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE`),
/// profile `AWS_PROFILE` or `default`: `object_store` reads the environment,
/// web identity and instance metadata but not these files.
fn shared_files(builder: AmazonS3Builder) -> AmazonS3Builder {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let home = env("HOME").unwrap_or_default();
    let profile = env("AWS_PROFILE").unwrap_or_else(|| "default".to_string());
    let mut builder = builder;
    if env("AWS_ACCESS_KEY_ID").is_none() {
        let file = env("AWS_SHARED_CREDENTIALS_FILE")
            .unwrap_or_else(|| format!("{home}/.aws/credentials"));
        let section = ini_section(&file, &profile);
        if let (Some(id), Some(secret)) = (
            section.get("aws_access_key_id"),
            section.get("aws_secret_access_key"),
        ) {
            builder = builder
                .with_access_key_id(id)
                .with_secret_access_key(secret);
            if let Some(token) = section.get("aws_session_token") {
                builder = builder.with_token(token);
            }
        }
    }
    if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
        let file = env("AWS_CONFIG_FILE").unwrap_or_else(|| format!("{home}/.aws/config"));
        let name = if profile == "default" {
            profile.clone()
        } else {
            format!("profile {profile}")
        };
        if let Some(region) = ini_section(&file, &name).get("region") {
            builder = builder.with_region(region);
        }
    }
    builder
}

/// `key = value` lines of section `[name]` of an INI file (empty when the
/// file or the section is missing).
fn ini_section(file: &str, name: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let Ok(text) = std::fs::read_to_string(file) else {
        return out;
    };
    let mut inside = false;
    for line in text.lines().map(str::trim) {
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = header.trim() == name;
        } else if inside {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
    }
    out
}

/// The tier's object store and where sluice's objects live in it.
pub struct Client {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    timeout: Duration,
}

impl Client {
    /// Build the client (no request is made). `Err` names what is wrong.
    pub fn build(url: &str, endpoint: Option<&str>, timeout: Duration) -> Result<Client, String> {
        let (bucket, prefix) =
            parse_url(url).ok_or_else(|| format!("tier_url {url:?} is not s3://bucket/prefix"))?;
        // sluice retries on its own terms (the outbox's backoff, the read
        // path's timeout): the crate's own retries would hide a down tier
        // behind minutes of attempts.
        let retry = RetryConfig {
            max_retries: 1,
            retry_timeout: timeout,
            ..RetryConfig::default()
        };
        let options = ClientOptions::new()
            .with_connect_timeout(timeout)
            // Whole-request deadlines are set per call below: a large
            // download may stream for longer than any fixed bound.
            .with_timeout_disabled();
        // Client options first: they carry `allow_http`, which the endpoint sets.
        let mut builder = shared_files(AmazonS3Builder::from_env())
            .with_client_options(options)
            .with_retry(retry)
            .with_bucket_name(bucket);
        if let Some(endpoint) = endpoint {
            builder = builder
                .with_endpoint(endpoint.trim_end_matches('/'))
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = builder
            .build()
            .map_err(|e| format!("cannot configure the object-store client: {e}"))?;
        Ok(Client {
            store: Arc::new(store),
            prefix,
            timeout,
        })
    }

    /// The object of `ns/key`: `{prefix}/{ns}/{key}`, so `/cas/` objects are
    /// named by their digest in the bucket too.
    pub fn path(&self, ns: &str, key: &str) -> Result<ObjectPath, TierError> {
        let text = if self.prefix.is_empty() {
            format!("{ns}/{key}")
        } else {
            format!("{}/{ns}/{key}", self.prefix)
        };
        ObjectPath::parse(text).map_err(failed)
    }

    /// The deadline of a request that moves `bytes` of body.
    fn body_timeout(&self, bytes: u64) -> Duration {
        body_deadline(self.timeout, bytes)
    }

    /// Upload `artifact` as `ns/key`, with its sha256 and write time as
    /// metadata; multipart above [`PART_BYTES`].
    pub async fn upload(
        &self,
        ns: &str,
        key: &str,
        artifact: &Artifact,
        write_time_ms: u64,
    ) -> Result<(), TierError> {
        let path = self.path(ns, key)?;
        let mut attributes = Attributes::new();
        attributes.insert(
            Attribute::Metadata(META_SHA256.into()),
            AttributeValue::from(hex::encode(artifact.sha256)),
        );
        attributes.insert(
            Attribute::Metadata(META_WRITE_TIME_MS.into()),
            AttributeValue::from(write_time_ms.to_string()),
        );
        if let Some(meta) = &artifact.meta {
            attributes.insert(
                Attribute::Metadata(META_KEPT.into()),
                AttributeValue::from(meta.to_header_value()),
            );
        }
        if artifact.len <= PART_BYTES as u64 {
            let deadline = self.body_timeout(artifact.len);
            let body = read_at(artifact, 0, artifact.len as usize)?;
            let opts = object_store::PutOptions {
                attributes,
                ..Default::default()
            };
            let put = self.store.put_opts(&path, PutPayload::from(body), opts);
            return match tokio::time::timeout(deadline, put).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(err)) => Err(from_store(err)),
                Err(_) => Err(failed("upload timed out")),
            };
        }
        let opts = PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        // Each wait below covers at most the parts in flight.
        let deadline = self.body_timeout((PART_BYTES * PARTS_IN_FLIGHT_MAX) as u64);
        let upload =
            match tokio::time::timeout(self.timeout, self.store.put_multipart_opts(&path, opts))
                .await
            {
                Ok(Ok(upload)) => upload,
                Ok(Err(err)) => return Err(from_store(err)),
                Err(_) => return Err(failed("starting a multipart upload timed out")),
            };
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut offset = 0u64;
        while offset < artifact.len {
            let n = (artifact.len - offset).min(READ_CHUNK_BYTES as u64) as usize;
            let chunk = match read_at(artifact, offset, n) {
                Ok(chunk) => chunk,
                Err(err) => {
                    let _ = writer.abort().await;
                    return Err(err);
                }
            };
            writer.put(chunk);
            offset += n as u64;
            match tokio::time::timeout(deadline, writer.wait_for_capacity(PARTS_IN_FLIGHT_MAX))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    let _ = writer.abort().await;
                    return Err(from_store(err));
                }
                Err(_) => {
                    let _ = writer.abort().await;
                    return Err(failed("multipart upload timed out"));
                }
            }
        }
        match tokio::time::timeout(deadline, writer.finish()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(from_store(err)),
            Err(_) => Err(failed("finishing a multipart upload timed out")),
        }
    }

    /// Is the tier answering? A HEAD of an object sluice never writes
    /// (`{prefix}/.sluice-probe`): "not found" is a healthy answer.
    pub async fn probe(&self) -> Result<(), TierError> {
        let text = if self.prefix.is_empty() {
            ".sluice-probe".to_string()
        } else {
            format!("{}/.sluice-probe", self.prefix)
        };
        let path = ObjectPath::parse(text).map_err(failed)?;
        match tokio::time::timeout(self.timeout, self.store.head(&path)).await {
            Ok(Ok(_)) | Ok(Err(object_store::Error::NotFound { .. })) => Ok(()),
            Ok(Err(err)) => Err(from_store(err)),
            Err(_) => Err(failed("no answer within tier_timeout_ms")),
        }
    }

    /// Delete `ns/key` (a missing object is fine).
    pub async fn delete(&self, ns: &str, key: &str) -> Result<(), TierError> {
        let path = self.path(ns, key)?;
        match tokio::time::timeout(self.timeout, self.store.delete(&path)).await {
            Ok(Ok(())) | Ok(Err(object_store::Error::NotFound { .. })) => Ok(()),
            Ok(Err(err)) => Err(from_store(err)),
            Err(_) => Err(failed("delete timed out")),
        }
    }

    /// Start a GET of `ns/key`: the answer's head within `tier_timeout_ms`.
    pub async fn get(&self, ns: &str, key: &str) -> Result<GetResult, TierError> {
        let path = self.path(ns, key)?;
        match tokio::time::timeout(
            self.timeout,
            self.store.get_opts(&path, GetOptions::default()),
        )
        .await
        {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(err)) => Err(from_store(err)),
            Err(_) => Err(failed(format!(
                "no answer within tier_timeout_ms ({} ms)",
                self.timeout.as_millis()
            ))),
        }
    }

    /// `start..=end_inclusive` of `ns/key` (fewer bytes at the object's
    /// end), head and body within `tier_timeout_ms`.
    pub async fn get_range(
        &self,
        ns: &str,
        key: &str,
        start: u64,
        end_inclusive: u64,
    ) -> Result<RangeRead, TierError> {
        let path = self.path(ns, key)?;
        let options = GetOptions {
            range: Some(object_store::GetRange::Bounded(start..end_inclusive + 1)),
            ..GetOptions::default()
        };
        let fetch = async {
            let result = self.store.get_opts(&path, options).await?;
            let total = result.meta.size;
            let range = result.range.clone();
            let sha256 = result
                .attributes
                .get(&Attribute::Metadata(META_SHA256.into()))
                .map(|v| v.as_ref().to_string());
            let bytes = result.bytes().await?;
            Ok::<_, object_store::Error>(RangeRead {
                total,
                start: range.start,
                sha256,
                bytes,
            })
        };
        match tokio::time::timeout(self.timeout, fetch).await {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(err)) => Err(from_store(err)),
            Err(_) => Err(failed("a ranged read took longer than tier_timeout_ms")),
        }
    }

    /// The body of a GET, piece by piece; each piece must come within
    /// `tier_timeout_ms` of the one before (a slow tier fails the read, a
    /// large object that keeps flowing does not).
    pub async fn for_each_chunk(
        &self,
        result: GetResult,
        mut each: impl FnMut(&[u8]) -> Result<(), TierError>,
    ) -> Result<(), TierError> {
        let mut stream = result.into_stream();
        loop {
            match tokio::time::timeout(self.timeout, stream.next()).await {
                Err(_) => return Err(failed("the object's body stalled past tier_timeout_ms")),
                Ok(None) => return Ok(()),
                Ok(Some(Err(err))) => return Err(from_store(err)),
                Ok(Some(Ok(bytes))) => each(&bytes)?,
            }
        }
    }
}

/// `len` bytes of the artifact's body from `offset`. The read blocks; it
/// runs on the tier's runtime, which serves nothing else, and is marked as
/// blocking so the runtime moves its other tasks away meanwhile.
fn read_at(artifact: &Artifact, offset: u64, len: usize) -> Result<Bytes, TierError> {
    use std::os::unix::fs::FileExt;
    tokio::task::block_in_place(|| {
        let mut buf = vec![0u8; len];
        artifact
            .file
            .read_exact_at(&mut buf, artifact.body_offset + offset)
            .map_err(|e| failed(format!("cannot read the artifact: {e}")))?;
        Ok(Bytes::from(buf))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_body_gets_about_the_timeout_and_a_part_time_to_move() {
        let t = Duration::from_secs(5);
        assert!(body_deadline(t, 4096) < t + Duration::from_millis(20));
        assert_eq!(body_deadline(t, 0), t);
        assert_eq!(
            body_deadline(t, PART_BYTES as u64),
            t + Duration::from_secs(32)
        );
    }

    #[test]
    fn urls_split_into_bucket_and_prefix() {
        assert_eq!(parse_url("s3://b"), Some(("b".into(), "".into())));
        assert_eq!(parse_url("s3://b/p/q/"), Some(("b".into(), "p/q".into())));
        assert_eq!(parse_url("gs://b"), None);
    }

    #[test]
    fn ini_sections_are_read_by_name() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("credentials");
        std::fs::write(
            &file,
            "[default]\naws_access_key_id = A\n[profile x]\nregion= eu-west-1\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        assert_eq!(ini_section(file, "default")["aws_access_key_id"], "A");
        assert_eq!(ini_section(file, "profile x")["region"], "eu-west-1");
        assert!(ini_section(file, "nope").is_empty());
        assert!(ini_section("/nonexistent", "default").is_empty());
    }
}
