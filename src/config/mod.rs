//! Configuration: loading, layering and validation.
//!
//! Every key has a default and may be set, from lowest to highest precedence, in a TOML file
//! (`--config FILE`), in the environment as `SLUICE_<KEY IN CAPITALS>`, and (for the keys listed
//! on [`Overrides`]) by a command-line flag: flag > env > file > default. After all layers are
//! applied, combinations are checked (TLS pair, URI vs head limit, shutdown budgets, anonymous
//! writes on a public address).
//!
//! How it is built, so that a key is written down once:
//!
//! - [`Config`] is plain data with serde's derive (`deny_unknown_fields`, `default`). Its fields
//!   are the keys, in the order `check-config` prints them; its [`Default`] holds the defaults;
//!   its `Serialize` is what [`Config::to_toml`] prints. The key list, the `SLUICE_*` names and
//!   the allowed keys quoted in errors all come from the derive (see `names` in `de.rs`).
//! - Each layer (the file's top-level table, the `SLUICE_*` variables, the flags on
//!   [`Overrides`]) is a list of entries (key, raw value, source), deserialised into a `Config`
//!   by one serde deserializer, `ValueDe` (`de.rs`). It reads env and flag text the way the
//!   module docs below say (`yes` for a bool, `10GiB` for a byte count, keywords in any case)
//!   and, when serde refuses a value, ties the refusal to its key, value and source.
//! - `rules` (`rules.rs`) has one line per key: whether the value is allowed and the text that
//!   says what is. serde's refusals quote the same text, so it is the one place a key's limits
//!   live.
//! - Every layer is deserialised and checked on its own before it is merged (`layer.rs`), so a
//!   bad value is refused even when a higher layer replaces it.
//!
//! Where things are: this file holds the public types and their defaults; `layer.rs` the
//! loading (defaults < file < `SLUICE_*` < flags); `rules.rs` what each key accepts, the checks
//! on `[namespaces.*]` and `[[tokens]]` and the combinations; `addresses.rs` the parsers for
//! `host:port`, peer lists and tier URLs; `error.rs` [`ConfigError`] and [`Source`]; `de.rs`
//! the serde adapter; `tests.rs` the tests.
//!
//! Adding a key: a field on [`Config`] with its doc comment (unit, default, range), its value
//! in `impl Default`, and its line in `rules` (the check and the words for what is allowed);
//! a byte count also takes `#[serde(deserialize_with = "bytes")]`. The file key, the
//! `SLUICE_*` variable, `check-config` and the error texts follow. A flag is one more field
//! with the key's name on [`Overrides`]. A key inside `[[tokens]]` or `[namespaces.NAME]` is a
//! field on [`TokenConfig`] or [`NamespaceConfig`] (with `#[serde(default)]` unless it is
//! required), its words in `table_expected`, and any check serde cannot make in
//! `check_tables` (both in `rules.rs`). Then a row in `docs/operations.md`.
//!
//! Decisions written down here because nothing else specifies them:
//!
//! - **Errors, not defaults.** An unknown key, an unknown `SLUICE_*` variable, a value of the
//!   wrong type or out of range is a [`ConfigError`] whose `Display` names the key, the value,
//!   where it came from and what is allowed. Nothing is clamped or ignored.
//! - **Reserved variables.** `SLUICE_LOG` is not a config key: it is a `tracing` filter
//!   directive (like `RUST_LOG`) read by the binary when it sets up logging, and when set it
//!   overrides `log_level`. `SLUICE_CONFIG` names the config file (the binary's `--config`).
//!   `SLUICE_UPGRADE_FD` is set by an old process for its successor during a binary upgrade
//!   (`lifecycle`). All three are skipped by the unknown-variable check, as is every variable
//!   named by a token's `secret_env`, so a secret may live in e.g. `SLUICE_CI_TOKEN`.
//! - **Env values** have surrounding ASCII whitespace trimmed (a stray newline from a
//!   `$(cat file)` is not worth a refusal); an empty value is an error, as for any bad value:
//!   unset the variable to fall back to the file or default.
//! - **Keyword values** (`fsync`, `engine`, `log_level`, ...) are matched ignoring ASCII case.
//! - **Byte sizes** (`*_bytes_max`) are whole numbers of bytes, or, in a TOML string or an env
//!   value, a number with a suffix: `B`, IEC binary `KiB` `MiB` `GiB` `TiB` (powers of 1024) or SI
//!   decimal `kB`/`KB` `MB` `GB` `TB` (powers of 1000, as SI defines them), ignoring case, with
//!   an optional space: `"10GiB"`, `"512 MiB"`, `SLUICE_STORE_BYTES_MAX=2TB`.
//! - **Booleans** in env or flags: `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`.
//! - **`listen`** must be an IP literal and a port (`127.0.0.1:8080`, `[::1]:8080`, port 0 for an
//!   ephemeral port); host names are refused because resolving at start hides which address
//!   is really bound.
//! - **Namespaces and tokens** are set only in the file: they are structured, and secrets do
//!   not belong on command lines. A token's secret may come from `secret_env`, which names a
//!   variable in the environment given to [`load`].
//! - **Token values**: name matches `[A-Za-z0-9][A-Za-z0-9_.-]{0,63}` and is unique; the
//!   secret is 16 to 1024 bytes of visible ASCII (`!`..`~`), so it can be sent in an
//!   `Authorization` header; two tokens may not share one secret (its access would be
//!   ambiguous); `access` is required (`"ro"` or `"rw"`): no silent default for a grant.
//! - **Token scopes**: `namespaces = ["a", "b"]` limits a token to those namespaces (writes,
//!   and reads of `read = "token"` namespaces); without the key a token covers every
//!   namespace. The list holds 1 to 1024 names, each a valid namespace name listed once. An
//!   empty list is an error, not "no namespaces": a token that can do nothing is a mistake,
//!   and "all" must be spelled by leaving the key out. A duplicate is an error too: it is
//!   harmless to the check but is usually a copy-paste slip hiding a missing name. The Bazel
//!   routes are named by the namespace they store into (`ac`, `cas`, whatever the instance
//!   prefix), Gradle's `/cache/` by `gradle`.
//! - **TLS files** are not opened here: the front end reports an unreadable certificate or key
//!   when it loads them, with the path.
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

mod addresses;
mod de;
mod error;
mod layer;
mod rules;

use addresses::peer_list;
use de::{bytes, names};

pub use addresses::PEERS_MAX;
pub use error::{ConfigError, Source};
pub use layer::{load, load_text};
pub use rules::{is_valid_namespace, SHUTDOWN_BUDGET_MAX_MS};

/// Prefix of every environment variable sluice reads.
pub const ENV_PREFIX: &str = "SLUICE_";
/// Log filter directive (tracing `EnvFilter` syntax); overrides `log_level` when set. Not a key.
pub const ENV_LOG: &str = "SLUICE_LOG";
/// Path of the config file, the environment form of `--config`. Not a key.
pub const ENV_CONFIG: &str = "SLUICE_CONFIG";
/// Set by an old process for the new one during a binary upgrade: the fd number of the
/// hand-off socket (see `lifecycle`). Not a config key.
pub const ENV_UPGRADE_FD: &str = "SLUICE_UPGRADE_FD";
/// Shortest accepted token secret, in bytes: shorter ones are guessable.
pub const SECRET_BYTES_MIN: usize = 16;
/// Longest accepted token secret, in bytes: it must fit comfortably in a request head.
pub const SECRET_BYTES_MAX: usize = 1024;
/// Most `[[tokens]]` entries; every check compares against all of them.
pub const TOKENS_MAX: usize = 1024;
/// Most `[namespaces.NAME]` tables.
pub const NAMESPACES_MAX: usize = 1024;
/// Most names in one token's `namespaces` list.
pub const TOKEN_NAMESPACES_MAX: usize = 1024;
/// Longest value quoted back in an error message, in bytes.
const ERROR_VALUE_BYTES_MAX: usize = 200;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

/// When the store calls `fsync` (key `fsync`, default `always`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Before a write is acknowledged, the file and its directory are synced: an
    /// acknowledged artifact survives power loss.
    Always,
    /// Never sync; the page cache decides. Faster, loses recent writes on power loss.
    Never,
}

/// Which front end serves plaintext HTTP/1 (key `engine`, default `auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// io_uring when the kernel allows it, otherwise the epoll engine.
    Auto,
    /// io_uring or refuse to start.
    Uring,
    /// The same HTTP/1 core on epoll threads (what `auto` uses without io_uring); TLS and
    /// HTTP/2 on the fallback.
    Epoll,
    /// The portable hyper front end only.
    Fallback,
}

/// How the ring engine moves file bytes to sockets (key `file_serving_mode`, default `splice`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileServingMode {
    /// file → pipe → socket, no user-space copy.
    Splice,
    /// read into a buffer, then send; for comparison in benchmarks.
    Copy,
}

/// The scheduling class of the threads doing replication's CPU work (key
/// `replication_scheduling`, default `idle`): receiving, hashing and writing peer bodies,
/// anti-entropy walks, the blocking senders and the tier's write-behind uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplicationScheduling {
    /// `SCHED_IDLE`: runs only on CPU time no normal thread wants.
    Idle,
    /// `SCHED_OTHER` at nice 19: a small share (about 1.5 % against one busy nice-0 thread)
    /// rather than none, for hosts where other tenants keep the CPUs busy.
    Nice,
    /// The same class as public work (what sluice did before; for comparison).
    Normal,
}

/// When a write reaches the object-store tier (key `tier_write`, default `behind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TierWrite {
    /// The 2xx follows the local durable write; the upload is queued in the tier's durable
    /// outbox and retried with backoff.
    Behind,
    /// The 2xx waits for the tier to hold the artifact.
    Through,
}

/// Least severe level logged (key `log_level`, default `info`); `SLUICE_LOG` overrides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// Start-up facts, degradations, and the above.
    Info,
    /// Per-connection detail.
    Debug,
    /// Everything.
    Trace,
}

/// The spelling used in config files, e.g. `info` (an `EnvFilter` directive too).
impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match toml::Value::try_from(self) {
            Ok(toml::Value::String(name)) => f.write_str(&name),
            _ => write!(f, "{self:?}"),
        }
    }
}

/// How log lines are written on stderr (key `log_format`, default `text`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event; coloured only when stderr is a terminal.
    Text,
    /// One JSON object per line, for log shippers (journald, Loki, Elasticsearch).
    Json,
}

/// Who may read a namespace (`[namespaces.NAME] read = ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NamespaceRead {
    /// Anyone, with or without credentials.
    Public,
    /// Any configured token, read-only or read-write.
    Token,
}

/// What a token grants (`[[tokens]] access = ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum TokenAccess {
    /// Reads of `token` namespaces; writes are refused with 403.
    #[serde(rename = "ro")]
    ReadOnly,
    /// Reads and writes.
    #[serde(rename = "rw")]
    ReadWrite,
}

/// A token secret. Its `Debug` never shows the bytes, so a config can be logged; it is never
/// serialised. The default is "not given", which is not the same as an empty secret.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(Option<String>);

impl Secret {
    /// Wraps a secret; validation happens in [`load`].
    pub fn new(secret: String) -> Self {
        Self(Some(secret))
    }

    /// The secret bytes (none when not given). Only the authoriser should call this.
    pub fn expose(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default().as_bytes()
    }

    pub fn is_given(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Compared in constant time, in case a comparison ever runs on attacker input.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose().ct_eq(other.expose()).into()
    }
}

impl Eq for Secret {}

/// One `[[tokens]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Unique name, used in logs instead of the secret.
    pub name: String,
    /// The secret presented as `Bearer <secret>` or as a Basic password: `secret = "..."` in
    /// the file, or, after [`load`], the value of the variable `secret_env` names. Never
    /// printed.
    #[serde(default, skip_serializing)]
    pub secret: Secret,
    /// `secret_env = "VAR"`: the environment variable the secret was read from; `None` when
    /// the secret is inline. [`Config::to_toml`] prints it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// What the token grants.
    pub access: TokenAccess,
    /// The namespaces the token is limited to (`namespaces = [...]`), in the order written,
    /// each valid and listed once, 1 to [`TOKEN_NAMESPACES_MAX`] of them. `None` (the key
    /// left out, the default) covers every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<Vec<String>>,
}

/// One `[namespaces.NAME]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Who may read. Namespaces without a table are public.
    pub read: NamespaceRead,
}

/// The effective configuration. Build it with [`load`]; [`Default`] gives every default.
///
/// Each field is a key (file `key = ...`, env `SLUICE_KEY`); what each accepts is in `rules`.
/// Byte counts opt into size suffixes with `deserialize_with = "bytes"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Public listening address, IP literal and port. Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Directory holding artifacts. Default `./sluice-data`.
    pub data_dir: PathBuf,
    /// PEM certificate chain; set together with `tls_key` to serve TLS. Default unset.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key; set together with `tls_cert`. Default unset.
    pub tls_key: Option<PathBuf>,
    /// Allow anonymous writes on a non-loopback `listen`. Default false. See
    /// [`Config::anonymous_writes`].
    pub allow_anonymous_writes: bool,
    /// Store size limit in bytes before eviction; 0 = unlimited. Default 0.
    #[serde(deserialize_with = "bytes")]
    pub store_bytes_max: u64,
    /// Sync policy for acknowledged writes. Default `always`.
    pub fsync: FsyncPolicy,
    /// Memory for the hot set, bytes: artifacts asked for often (bodies up to 64 KiB, and the
    /// headers and open files of larger ones) served from process memory, admitted by
    /// frequency so a scan cannot push them out. 0 = off. Default 64 MiB; 0 or 1 MiB..=1 TiB.
    #[serde(deserialize_with = "bytes")]
    pub hot_set_bytes: u64,
    /// Largest request head in bytes (431 above). Default 16384, range 1024..=1 MiB.
    #[serde(deserialize_with = "bytes")]
    pub head_bytes_max: usize,
    /// Longest request URI in bytes (414 above). Default 8192, or `head_bytes_max` when that
    /// is set lower and this is not set; range 64..=1 MiB, at most `head_bytes_max`.
    #[serde(deserialize_with = "bytes")]
    pub uri_bytes_max: usize,
    /// Largest PUT body in bytes for `ac`, `cas` and generic routes (413 above).
    /// Default 16 GiB, range 1 byte..=1 TiB.
    #[serde(deserialize_with = "bytes")]
    pub body_bytes_max: u64,
    /// Largest PUT body in bytes for Gradle `/cache/` (413 above). Default 100 MiB,
    /// range 1 byte..=1 TiB.
    #[serde(deserialize_with = "bytes")]
    pub gradle_body_bytes_max: u64,
    /// An action-cache lookup (HTTP `/ac/` GET and HEAD, gRPC `GetActionResult`) is a hit
    /// only when every blob the action result names (output files, stdout, stderr, output
    /// directory trees and their files) is in the CAS; otherwise it answers 404 / NOT_FOUND.
    /// Default true.
    pub ac_completeness_check: bool,
    /// Time allowed to receive a whole request head, in ms (408 after). Default 10000.
    pub header_read_timeout_ms: u64,
    /// Time an idle keep-alive connection is kept, in ms. Default 60000.
    pub idle_timeout_ms: u64,
    /// After an early error on a request whose body is still arriving (413, 400), the
    /// longest the body is read and discarded before closing, in ms, so a client that
    /// writes its whole body before reading sees the status, not a reset (nginx's
    /// `lingering_time`). 0 closes at once. Default 30000.
    pub lingering_time_ms: u64,
    /// Longest wait for more of a discarded body, in ms (nginx's `lingering_timeout`).
    /// Default 5000, range 1..=3600000.
    pub lingering_timeout_ms: u64,
    /// Most body bytes discarded after an early error before closing. 0 closes at once.
    /// Default 256 MiB, range 0..=1 TiB.
    #[serde(deserialize_with = "bytes")]
    pub lingering_bytes_max: u64,
    /// Longest wait for the next bytes of a request body, in ms (idle time between body
    /// bytes, not the whole upload); past it the request answers 408 (HTTP/2: the stream is
    /// answered or reset). Default 30000, range 1..=3600000.
    pub body_read_timeout_ms: u64,
    /// Longest time a response may make no progress because the client does not read, in ms
    /// (nginx's `send_timeout`); past it the connection is closed. Also bounds how long an
    /// HTTP/2 PING answer is awaited. Default 30000, range 1..=3600000.
    pub send_timeout_ms: u64,
    /// Connections one client address may hold on each front (per ring engine thread, and in
    /// the fallback); 0 = no cap. Default 256, range 0..=1000000.
    pub connections_per_ip_max: usize,
    /// Static replication peers, `host:port` each (a TOML array; env `SLUICE_PEERS` and flag
    /// `--peers` take one comma-separated string). Default empty: no replication. At most 256.
    #[serde(deserialize_with = "peer_list")]
    pub peers: Vec<String>,
    /// A DNS name listing the peers, `name:port`, re-resolved every `peer_refresh_ms` (flag
    /// `--peers-dns`). Default unset.
    pub peers_dns: Option<String>,
    /// How often `peers_dns` is re-resolved, in ms. Default 2000, range 100..=3600000.
    pub peer_refresh_ms: u64,
    /// The secret every peer API request carries (flag `--peer-secret`, env
    /// `SLUICE_PEER_SECRET`): 16 to 1024 bytes of visible ASCII, the same on every node.
    /// Required with peers. Never printed or quoted back.
    #[serde(default, skip_serializing)]
    pub peer_secret: Secret,
    /// Bound on each peer's outbox backlog, in bytes on disk; past it the peer is repaired by
    /// anti-entropy instead. Default 1 GiB, range 4 KiB..=1 TiB.
    #[serde(deserialize_with = "bytes")]
    pub replication_outbox_bytes_max: u64,
    /// Period of anti-entropy with each peer, in ms. Default 600000 (10 min),
    /// range 1000..=86400000.
    pub anti_entropy_interval_ms: u64,
    /// How long a replicated delete's tombstone is kept, in ms: a peer that
    /// missed the delete and returns within it cannot bring the artifact back.
    /// Default 604800000 (7 days), range 60000..=31536000000 (365 days).
    pub tombstone_retention_ms: u64,
    /// How often an up peer is probed, in ms. Default 1000, range 100..=3600000.
    pub peer_probe_interval_ms: u64,
    /// Deadline of one replication request, in ms. Default 30000, range 100..=3600000.
    pub replication_request_timeout_ms: u64,
    /// The replication limiter's rate: peer body bytes per second this node sends (outbox,
    /// anti-entropy repairs, reads served to peers), before public pressure lowers it.
    /// Default 512 MiB; 0 = no limit; else 64 KiB..=1 TiB, size suffixes accepted.
    #[serde(deserialize_with = "bytes")]
    pub replication_bytes_per_second: u64,
    /// The limiter's burst, in bytes; 0 = a quarter second of `replication_bytes_per_second`.
    /// Default 0; else 4 KiB..=1 TiB, size suffixes accepted.
    #[serde(deserialize_with = "bytes")]
    pub replication_burst_bytes: u64,
    /// Public time to first byte (p99 over 100 ms windows) above which replication slows
    /// down, in ms. Default 50, range 1..=60000.
    pub replication_public_latency_target_ms: u64,
    /// At most one public request per this many microseconds and engine thread is measured
    /// from the kernel's receive time of its first bytes (0: none; the limiter then has the
    /// parse-to-reply time only). Default 250, range 0..=1000000.
    pub public_latency_sample_us: u64,
    /// The scheduling class of replication's CPU work. Default `idle`.
    pub replication_scheduling: ReplicationScheduling,
    /// A cgroup v2 directory the operator made for replication's threads (threaded, with
    /// the `cpu` controller and a `cpu.weight` of the operator's choice); they join it at
    /// start. Default unset (they stay in the server's cgroup).
    pub replication_cgroup: Option<PathBuf>,
    /// A GET or HEAD that misses locally asks the peers for the artifact (only with peers).
    /// Default true.
    pub read_through: bool,
    /// Longest a read-through waits for the peers before answering 404, in ms. Default 3000,
    /// range 1..=3600000.
    pub read_through_timeout_ms: u64,
    /// How long a key no peer holds is remembered as absent, in ms; 0 = not remembered.
    /// Default 1000, range 0..=3600000.
    pub read_through_negative_ms: u64,
    /// The object-store tier under this node, `s3://bucket[/prefix]` (flag `--tier-url`).
    /// Credentials and region come from the standard AWS environment variables and files.
    /// Default unset: no tier.
    pub tier_url: Option<String>,
    /// Endpoint of an S3-compatible store (SeaweedFS, MinIO, Ceph RGW), `http[s]://host[:port]`
    /// (flag `--tier-endpoint`); when set, requests use path-style addressing. Default unset:
    /// AWS S3 itself.
    pub tier_endpoint: Option<String>,
    /// When a write reaches the tier: `behind` (queued durably, default) or `through` (the
    /// 2xx waits for the tier).
    pub tier_write: TierWrite,
    /// Longest a read waits for the tier, in ms: a read-through's answer, then each piece of
    /// its body; also the connect timeout. Uploads give each request at least 30 s (a part is
    /// 8 MiB). Past it a read is answered without the tier. Default 5000, range 100..=3600000.
    pub tier_timeout_ms: u64,
    /// Which front end serves plaintext HTTP/1. Default `auto`.
    pub engine: EngineChoice,
    /// Engine threads; 0 = one per core. Default 0, at most 256.
    pub engine_threads: usize,
    /// How the ring engine moves file bytes. Default `splice`.
    pub file_serving_mode: FileServingMode,
    /// How long an engine thread polls its ring, in µs, after a turn that
    /// had completions, before it sleeps in the kernel. 0 = never poll.
    /// Default 50, at most 10000.
    pub engine_spin_us: u64,
    /// Connections per engine thread before new ones wait or go to the fallback.
    /// Default 4096, range 1..=1_000_000.
    pub connections_per_core_max: usize,
    /// Connections the fallback front end serves at once. Default 1024, range 1..=1_000_000.
    pub fallback_connections_max: usize,
    /// Worker threads of the fallback front end (TLS, HTTP/2, and all plaintext when io_uring
    /// is off); 0 = as many as the engine uses (`engine_threads`, effective). Default 0, at
    /// most 256.
    pub fallback_threads: usize,
    /// Shutdown phase 1, in ms: readiness answers 503 while serving goes on. Default 0.
    pub shutdown_pre_drain_ms: u64,
    /// Shutdown phase 2, in ms: in-flight requests finish. Default 10000.
    pub shutdown_drain_ms: u64,
    /// Shutdown phase 3, in ms: in-flight peer sends finish (the replication outbox keeps the
    /// rest). Default 0; above one day it is clamped to one day with a warning.
    pub shutdown_replication_ms: u64,
    /// Shutdown margin, in ms, for flushing and exit. Default 2000.
    pub shutdown_teardown_ms: u64,
    /// Ceiling in ms on the whole shutdown; pre-drain + drain + replication + teardown must
    /// fit. Past it the process exits with status 1 whatever is left. Default 30000.
    pub shutdown_grace_ms: u64,
    /// How long a binary upgrade (SIGUSR2) waits for the new process to report ready, in ms;
    /// past it the new process is stopped and the old one keeps serving. Default 30000, range
    /// 1..=3600000.
    pub upgrade_ready_timeout_ms: u64,
    /// What loading the configuration changed and the operator should hear (a shutdown
    /// budget clamped to a day): logged once logging is up, printed by `check-config`.
    /// Not a key.
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// File holding the pid of the process that owns the listeners (rewritten by the new
    /// process after an upgrade, removed at a clean exit). Default unset: no pid file.
    pub pid_file: Option<PathBuf>,
    /// Least severe level logged. Default `info`.
    pub log_level: LogLevel,
    /// How log lines are written: `text` or `json` (one object a line). Default `text`.
    pub log_format: LogFormat,
    /// Namespaces with an explicit read policy; unlisted namespaces are public. The Bazel
    /// routes use `ac` and `cas`, Gradle's `/cache/` uses `gradle`, generic routes their own.
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    /// Access tokens, at most [`TOKENS_MAX`].
    pub tokens: Vec<TokenConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080),
            data_dir: PathBuf::from("./sluice-data"),
            tls_cert: None,
            tls_key: None,
            allow_anonymous_writes: false,
            store_bytes_max: 0,
            fsync: FsyncPolicy::Always,
            hot_set_bytes: 64 * MIB,
            head_bytes_max: 16384,
            uri_bytes_max: 8192,
            body_bytes_max: 16 * GIB,
            gradle_body_bytes_max: 100 * MIB,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            lingering_time_ms: 30_000,
            lingering_timeout_ms: 5_000,
            lingering_bytes_max: 256 * MIB,
            body_read_timeout_ms: 30_000,
            send_timeout_ms: 30_000,
            connections_per_ip_max: 256,
            peers: Vec::new(),
            peers_dns: None,
            peer_refresh_ms: 2_000,
            peer_secret: Secret::default(),
            replication_outbox_bytes_max: GIB,
            anti_entropy_interval_ms: 600_000,
            tombstone_retention_ms: 604_800_000,
            peer_probe_interval_ms: 1_000,
            replication_request_timeout_ms: 30_000,
            replication_bytes_per_second: 512 * MIB,
            replication_burst_bytes: 0,
            replication_public_latency_target_ms: 50,
            public_latency_sample_us: 250,
            replication_scheduling: ReplicationScheduling::Idle,
            replication_cgroup: None,
            read_through: true,
            read_through_timeout_ms: 3_000,
            ac_completeness_check: true,
            read_through_negative_ms: 1_000,
            tier_url: None,
            tier_endpoint: None,
            tier_write: TierWrite::Behind,
            tier_timeout_ms: 5_000,
            engine: EngineChoice::Auto,
            engine_threads: 0,
            file_serving_mode: FileServingMode::Splice,
            engine_spin_us: 50,
            connections_per_core_max: 4096,
            fallback_connections_max: 1024,
            fallback_threads: 0,
            shutdown_pre_drain_ms: 0,
            shutdown_drain_ms: 10_000,
            shutdown_replication_ms: 0,
            shutdown_teardown_ms: 2_000,
            shutdown_grace_ms: 30_000,
            upgrade_ready_timeout_ms: 30_000,
            pid_file: None,
            warnings: Vec::new(),
            log_level: LogLevel::Info,
            log_format: LogFormat::Text,
            namespaces: BTreeMap::new(),
            tokens: Vec::new(),
        }
    }
}

/// Keys that are tables in the file; nothing else may set them.
const TABLE_KEYS: [&str; 2] = ["namespaces", "tokens"];

/// The keys the environment (and the flags) may set, in declaration order.
fn scalar_keys() -> Vec<&'static str> {
    names::<Config>()
        .iter()
        .copied()
        .filter(|key| !TABLE_KEYS.contains(key))
        .collect()
}

/// The environment variable that sets `key`: `SLUICE_` and the key in capitals.
fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

/// The per-connection timeouts every front applies alike (the ring, the
/// epoll engine and the fallback), taken from the config in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnTimeouts {
    /// From accept (or a request's first byte) to a complete head: 408 after.
    pub header_read_timeout_ms: u64,
    /// A keep-alive connection with no request in flight closes after this.
    pub idle_timeout_ms: u64,
    /// A response that makes no progress because the client does not read
    /// closes the connection after this.
    pub send_timeout_ms: u64,
    /// Idle time allowed between the bytes of a request body (408 after).
    pub body_read_timeout_ms: u64,
}

impl Default for ConnTimeouts {
    /// The config's defaults.
    fn default() -> Self {
        Config::default().conn_timeouts()
    }
}

impl Config {
    /// The per-connection timeouts (`header_read_timeout_ms`,
    /// `idle_timeout_ms`, `send_timeout_ms`, `body_read_timeout_ms`).
    pub fn conn_timeouts(&self) -> ConnTimeouts {
        ConnTimeouts {
            header_read_timeout_ms: self.header_read_timeout_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            send_timeout_ms: self.send_timeout_ms,
            body_read_timeout_ms: self.body_read_timeout_ms,
        }
    }

    /// The lingering close after an early error (`lingering_time_ms`,
    /// `lingering_timeout_ms`, `lingering_bytes_max`), as every front applies it.
    pub fn linger_limits(&self) -> crate::http1::LingerLimits {
        crate::http1::LingerLimits {
            time_ms: self.lingering_time_ms,
            timeout_ms: self.lingering_timeout_ms,
            bytes_max: self.lingering_bytes_max,
        }
    }

    /// Whether writes need no credentials.
    ///
    /// The rule: writes are anonymous exactly when no token with `access = "rw"` is configured.
    /// Configuring one rw token turns on write protection everywhere; read-only tokens alone
    /// only guard reads of `read = "token"` namespaces. `allow_anonymous_writes` does not change
    /// this answer: it only permits anonymous writes on a non-loopback `listen`.
    pub fn anonymous_writes(&self) -> bool {
        !self
            .tokens
            .iter()
            .any(|token| token.access == TokenAccess::ReadWrite)
    }

    /// Engine threads to start: `engine_threads`, or when it is 0 the number of CPUs this
    /// process may run on (1 if that cannot be read), never more than 256.
    pub fn engine_threads_effective(&self) -> usize {
        let threads = if self.engine_threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.engine_threads
        };
        threads.clamp(1, 256)
    }

    /// Fallback worker threads to start: `fallback_threads`, or when it is 0 as many as
    /// [`Config::engine_threads_effective`], so the portable path uses every core the ring
    /// engine would have.
    pub fn fallback_threads_effective(&self) -> usize {
        if self.fallback_threads == 0 {
            self.engine_threads_effective()
        } else {
            self.fallback_threads
        }
    }

    /// The effective configuration as TOML, for `sluice check-config`: the derived
    /// `Serialize`, every key in declaration order, with a comment for keys that are unset.
    /// Inline token secrets are replaced by a comment; `secret_env` tokens show the variable
    /// name. Without inline secrets the output loads back into an equal `Config`.
    pub fn to_toml(&self) -> String {
        let mut out = String::from("# sluice effective configuration\n");
        let table = match toml::Table::try_from(self) {
            Ok(table) => table,
            // Only a non-UTF-8 path, which no loaded config holds, can fail.
            Err(error) => return format!("{out}# cannot be shown: {error}\n"),
        };
        for key in scalar_keys() {
            if key == "peer_secret" && self.peer_secret.is_given() {
                let _ = writeln!(out, "# peer_secret = (redacted)");
                continue;
            }
            let _ = match table.get(key) {
                Some(value) => writeln!(out, "{key} = {value}"),
                None => writeln!(out, "# {key} is not set"),
            };
        }
        for (name, namespace) in &self.namespaces {
            let _ = write!(out, "\n[namespaces.{name}]\n{}", toml_body(namespace));
        }
        for token in &self.tokens {
            let body = toml_body(token);
            // The comment goes where `secret` would be: after `name`, the first field.
            let _ = match body.split_once('\n') {
                Some((name, rest)) if token.secret_env.is_none() => {
                    write!(out, "\n[[tokens]]\n{name}\n# secret = (redacted)\n{rest}")
                }
                _ => write!(out, "\n[[tokens]]\n{body}"),
            };
        }
        out
    }
}

/// The keys of one table, as TOML lines.
fn toml_body<T: Serialize>(value: &T) -> String {
    toml::to_string(value).unwrap_or_else(|error| format!("# cannot be shown: {error}\n"))
}

/// Values given on the command line; each overrides the environment and the file. Values are
/// text, parsed and validated exactly as environment values are. Each field is named after its
/// key, and its flag is the key with dashes (`engine_threads` is `--engine-threads`): adding a
/// field here is all it takes to give a key a flag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, clap::Args)]
pub struct Overrides {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub listen: Option<String>,
    /// Directory holding the artifacts.
    #[arg(long)]
    pub data_dir: Option<String>,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long)]
    pub tls_cert: Option<String>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long)]
    pub tls_key: Option<String>,
    /// Allow anonymous writes on a non-loopback address.
    #[arg(long, num_args = 0, default_missing_value = "true")]
    pub allow_anonymous_writes: Option<bool>,
    /// auto, uring or fallback.
    #[arg(long)]
    pub engine: Option<String>,
    /// Engine threads (0 = one per core).
    #[arg(long)]
    pub engine_threads: Option<String>,
    /// splice or copy.
    #[arg(long)]
    pub file_serving_mode: Option<String>,
    /// Longest wait for the next request-body bytes, in ms (408 after).
    #[arg(long)]
    pub body_read_timeout_ms: Option<String>,
    /// Longest time a client may not read a response, in ms (closed after).
    #[arg(long)]
    pub send_timeout_ms: Option<String>,
    /// Connections one client address may hold per front (0 = no cap).
    #[arg(long)]
    pub connections_per_ip_max: Option<String>,
    /// Replication peers, host:port,host:port (or SLUICE_PEERS).
    #[arg(long)]
    pub peers: Option<String>,
    /// A DNS name listing the peers, name:port, re-resolved every peer_refresh_ms.
    #[arg(long)]
    pub peers_dns: Option<String>,
    /// The secret peers present to each other (or SLUICE_PEER_SECRET; 16+ bytes).
    #[arg(long)]
    pub peer_secret: Option<String>,
    /// The object-store tier, s3://bucket/prefix (or SLUICE_TIER_URL).
    #[arg(long)]
    pub tier_url: Option<String>,
    /// Endpoint of an S3-compatible store, http://host:port (path-style addressing).
    #[arg(long)]
    pub tier_endpoint: Option<String>,
    /// File to hold the pid of the process that owns the listeners.
    #[arg(long)]
    pub pid_file: Option<String>,
}

#[cfg(test)]
mod tests;
