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
//!   the allowed keys quoted in errors all come from the derive (see `names`).
//! - Each layer (the file's top-level table, the `SLUICE_*` variables, the flags on
//!   [`Overrides`]) is a list of entries (key, raw value, source), deserialised into a `Config`
//!   by one serde deserializer, `ValueDe`. It reads env and flag text the way the module docs
//!   below say (`yes` for a bool, `10GiB` for a byte count, keywords in any case) and, when
//!   serde refuses a value, ties the refusal to its key, value and source.
//! - `rules` has one line per key: whether the value is allowed and the text that says what
//!   is. serde's refusals quote the same text, so it is the one place a key's limits live.
//! - Every layer is deserialised and checked on its own before it is merged, so a bad value is
//!   refused even when a higher layer replaces it.
//!
//! Adding a key: a field on [`Config`] with its doc comment (unit, default, range), its value
//! in `impl Default`, and its line in `rules` (the check and the words for what is allowed);
//! a byte count also takes `#[serde(deserialize_with = "bytes")]`. The file key, the
//! `SLUICE_*` variable, `check-config` and the error texts follow. A flag is one more field
//! with the key's name on [`Overrides`]. A key inside `[[tokens]]` or `[namespaces.NAME]` is a
//! field on [`TokenConfig`] or [`NamespaceConfig`] (with `#[serde(default)]` unless it is
//! required), its words in `table_expected`, and any check serde cannot make in
//! `check_tables`. Then a row in `docs/operations.md`.
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
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

mod de;
use de::{bytes, names, truncate, DeError, Entry, MapDe, Raw};

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
/// Upper bound of the body limits: far above any artifact, small enough to catch a typo.
const BODY_BYTES_LIMIT: u64 = TIB;
/// Upper bound of every `_ms` key: one hour.
const TIMEOUT_MS_LIMIT: u64 = 3_600_000;

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
            read_through: true,
            read_through_timeout_ms: 3_000,
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

const MS_EXPECTED: &str = "a whole number of milliseconds from 0 to 3600000";
const BUDGET_EXPECTED: &str =
    "a whole number of milliseconds (above 86400000, one day, it is clamped to one day)";
/// Longest shutdown phase or ceiling: a larger budget is clamped to it with a warning, since a
/// shutdown that waits for days is a typo, not a plan.
pub const SHUTDOWN_BUDGET_MAX_MS: u64 = 86_400_000;
const MS_POSITIVE_EXPECTED: &str = "a whole number of milliseconds from 1 to 3600000";
const BODY_EXPECTED: &str = "a byte count from 1 byte to 1 TiB: a whole number, or a string \
                             with a suffix B, KiB, MiB, GiB, TiB (1024-based) or kB, MB, GB, TB \
                             (1000-based), e.g. \"100MiB\"";
const CONNECTIONS_EXPECTED: &str = "a whole number from 1 to 1000000";

/// What each key accepts: one line per key of [`Config`], whether `c`'s value is allowed and
/// the text that says what is. A test checks that every key has its line.
fn rules(c: &Config) -> Vec<Rule> {
    let path_ok = |path: &Option<PathBuf>| path.as_ref().is_none_or(|p| !p.as_os_str().is_empty());
    vec![
        Rule::any(
            "listen",
            "an IP address and port, e.g. 127.0.0.1:8080 or [::1]:8080 (host names are not \
             resolved)",
        ),
        Rule::new(
            "data_dir",
            !c.data_dir.as_os_str().is_empty(),
            "a non-empty directory path",
        ),
        Rule::new(
            "tls_cert",
            path_ok(&c.tls_cert),
            "a non-empty path to a PEM certificate chain",
        ),
        Rule::new(
            "tls_key",
            path_ok(&c.tls_key),
            "a non-empty path to a PEM private key",
        ),
        Rule::any(
            "allow_anonymous_writes",
            "true or false (env and flags also take 1/0, yes/no, on/off)",
        ),
        Rule::any(
            "store_bytes_max",
            "a byte count, 0 for unlimited: a whole number, or a string with a suffix B, KiB, \
             MiB, GiB, TiB (1024-based) or kB, MB, GB, TB (1000-based), e.g. \"10GiB\"",
        ),
        Rule::keyword::<FsyncPolicy>("fsync"),
        Rule::new(
            "head_bytes_max",
            within(c.head_bytes_max, 1024, MIB),
            "a byte count from 1024 to 1048576 (1 MiB), e.g. 16384 or \"16KiB\"",
        ),
        Rule::new(
            "uri_bytes_max",
            within(c.uri_bytes_max, 64, MIB),
            "a byte count from 64 to 1048576 (1 MiB), and at most head_bytes_max",
        ),
        Rule::new(
            "body_bytes_max",
            within(c.body_bytes_max, 1, BODY_BYTES_LIMIT),
            BODY_EXPECTED,
        ),
        Rule::new(
            "gradle_body_bytes_max",
            within(c.gradle_body_bytes_max, 1, BODY_BYTES_LIMIT),
            BODY_EXPECTED,
        ),
        Rule::new(
            "header_read_timeout_ms",
            within(c.header_read_timeout_ms, 1, TIMEOUT_MS_LIMIT),
            MS_POSITIVE_EXPECTED,
        ),
        Rule::new(
            "idle_timeout_ms",
            within(c.idle_timeout_ms, 1, TIMEOUT_MS_LIMIT),
            MS_POSITIVE_EXPECTED,
        ),
        Rule::new(
            "lingering_time_ms",
            within(c.lingering_time_ms, 0, TIMEOUT_MS_LIMIT),
            MS_EXPECTED,
        ),
        Rule::new(
            "lingering_timeout_ms",
            within(c.lingering_timeout_ms, 1, TIMEOUT_MS_LIMIT),
            MS_POSITIVE_EXPECTED,
        ),
        Rule::new(
            "lingering_bytes_max",
            within(c.lingering_bytes_max, 0, BODY_BYTES_LIMIT),
            "a byte count from 0 to 1 TiB: a whole number, or a string such as \"256MiB\"",
        ),
        Rule::new(
            "body_read_timeout_ms",
            within(c.body_read_timeout_ms, 1, TIMEOUT_MS_LIMIT),
            MS_POSITIVE_EXPECTED,
        ),
        Rule::new(
            "send_timeout_ms",
            within(c.send_timeout_ms, 1, TIMEOUT_MS_LIMIT),
            MS_POSITIVE_EXPECTED,
        ),
        Rule::new(
            "connections_per_ip_max",
            within(c.connections_per_ip_max, 0, 1_000_000),
            "a whole number from 0 to 1000000 (0 = no cap)",
        ),
        Rule::new(
            "peers",
            c.peers.len() <= PEERS_MAX && c.peers.iter().all(|p| is_host_port(p)),
            "a list of peers, each host:port (port 1 to 65535), at most 256: a TOML array of \
             strings, or one comma-separated string (env, flag)",
        ),
        Rule::new(
            "peers_dns",
            c.peers_dns.as_deref().is_none_or(is_host_port),
            "a DNS name and port, name:port, e.g. sluice-headless.default.svc:8080",
        ),
        Rule::new(
            "peer_refresh_ms",
            within(c.peer_refresh_ms, 100, TIMEOUT_MS_LIMIT),
            "a whole number of milliseconds from 100 to 3600000",
        ),
        Rule::new(
            "peer_secret",
            !c.peer_secret.is_given()
                || ((SECRET_BYTES_MIN..=SECRET_BYTES_MAX).contains(&c.peer_secret.expose().len())
                    && c.peer_secret.expose().iter().all(u8::is_ascii_graphic)),
            "a secret of 16 to 1024 bytes of visible ASCII (! to ~), the same on every node",
        ),
        Rule::new(
            "replication_outbox_bytes_max",
            within(c.replication_outbox_bytes_max, 4 * KIB, BODY_BYTES_LIMIT),
            "a byte count from 4096 (4 KiB) to 1 TiB: a whole number, or a string with a \
             suffix, e.g. \"1GiB\"",
        ),
        Rule::new(
            "anti_entropy_interval_ms",
            within(c.anti_entropy_interval_ms, 1_000, 86_400_000),
            "a whole number of milliseconds from 1000 to 86400000 (one day)",
        ),
        Rule::new(
            "tombstone_retention_ms",
            within(c.tombstone_retention_ms, 60_000, 31_536_000_000),
            "a whole number of milliseconds from 60000 (one minute) to 31536000000 (365 days)",
        ),
        Rule::new(
            "peer_probe_interval_ms",
            within(c.peer_probe_interval_ms, 100, TIMEOUT_MS_LIMIT),
            "a whole number of milliseconds from 100 to 3600000",
        ),
        Rule::new(
            "replication_request_timeout_ms",
            within(c.replication_request_timeout_ms, 100, TIMEOUT_MS_LIMIT),
            "a whole number of milliseconds from 100 to 3600000",
        ),
        Rule::new(
            "replication_bytes_per_second",
            c.replication_bytes_per_second == 0
                || within(c.replication_bytes_per_second, 64 * KIB, BODY_BYTES_LIMIT),
            "0 (no limit) or a byte rate from 65536 (64 KiB) to 1 TiB per second: a whole \
             number, or a string with a suffix, e.g. \"512MiB\"",
        ),
        Rule::new(
            "replication_burst_bytes",
            c.replication_burst_bytes == 0
                || within(c.replication_burst_bytes, 4 * KIB, BODY_BYTES_LIMIT),
            "0 (a quarter second of replication_bytes_per_second) or a byte count from 4096 \
             (4 KiB) to 1 TiB, e.g. \"128MiB\"",
        ),
        Rule::new(
            "replication_public_latency_target_ms",
            within(c.replication_public_latency_target_ms, 1, 60_000),
            "a whole number of milliseconds from 1 to 60000",
        ),
        Rule::any(
            "read_through",
            "true or false (env and flags also take 1/0, yes/no, on/off)",
        ),
        Rule::new(
            "read_through_timeout_ms",
            within(c.read_through_timeout_ms, 1, TIMEOUT_MS_LIMIT),
            "a whole number of milliseconds from 1 to 3600000",
        ),
        Rule::new(
            "read_through_negative_ms",
            within(c.read_through_negative_ms, 0, TIMEOUT_MS_LIMIT),
            "a whole number of milliseconds from 0 to 3600000 (0 = misses are not remembered)",
        ),
        Rule::new(
            "tier_url",
            c.tier_url.as_deref().is_none_or(is_tier_url),
            "an object-store URL s3://bucket or s3://bucket/prefix (bucket 3 to 63 of a-z 0-9 . -)",
        ),
        Rule::new(
            "tier_endpoint",
            c.tier_endpoint.as_deref().is_none_or(is_endpoint),
            "an endpoint URL, http://host:port or https://host[:port], e.g. http://127.0.0.1:8333",
        ),
        Rule::keyword::<TierWrite>("tier_write"),
        Rule::new(
            "tier_timeout_ms",
            within(c.tier_timeout_ms, 100, TIMEOUT_MS_LIMIT),
            "a whole number of milliseconds from 100 to 3600000",
        ),
        Rule::keyword::<EngineChoice>("engine"),
        Rule::new(
            "engine_threads",
            within(c.engine_threads, 0, 256),
            "a whole number from 0 to 256 (0 = one per core)",
        ),
        Rule::new(
            "fallback_threads",
            within(c.fallback_threads, 0, 256),
            "a whole number from 0 to 256 (0 = as many as engine threads)",
        ),
        Rule::keyword::<FileServingMode>("file_serving_mode"),
        Rule::new(
            "engine_spin_us",
            within(c.engine_spin_us, 0, 10_000),
            "a whole number of microseconds from 0 to 10000 (0 = never poll)",
        ),
        Rule::new(
            "connections_per_core_max",
            within(c.connections_per_core_max, 1, 1_000_000),
            CONNECTIONS_EXPECTED,
        ),
        Rule::new(
            "fallback_connections_max",
            within(c.fallback_connections_max, 1, 1_000_000),
            CONNECTIONS_EXPECTED,
        ),
        Rule::new(
            "shutdown_pre_drain_ms",
            true, // any whole number; above a day it is clamped (see `validate`)
            BUDGET_EXPECTED,
        ),
        Rule::new(
            "shutdown_drain_ms",
            true, // any whole number; above a day it is clamped (see `validate`)
            BUDGET_EXPECTED,
        ),
        Rule::new(
            "shutdown_replication_ms",
            true, // any whole number; above a day it is clamped (see `validate`)
            BUDGET_EXPECTED,
        ),
        Rule::new(
            "shutdown_teardown_ms",
            true, // any whole number; above a day it is clamped (see `validate`)
            BUDGET_EXPECTED,
        ),
        Rule::new(
            "shutdown_grace_ms",
            true, // any whole number; above a day it is clamped (see `validate`)
            BUDGET_EXPECTED,
        ),
        Rule::new(
            "upgrade_ready_timeout_ms",
            within(c.upgrade_ready_timeout_ms, 1, TIMEOUT_MS_LIMIT),
            MS_POSITIVE_EXPECTED,
        ),
        Rule::new("pid_file", path_ok(&c.pid_file), "a non-empty file path"),
        Rule::keyword::<LogLevel>("log_level"),
        Rule::keyword::<LogFormat>("log_format"),
    ]
}

/// What the values inside `[namespaces.*]` and `[[tokens]]` accept, by key (`tokens[3].name`).
/// The checks serde's types do not make are in `check_tables`.
fn table_expected(key: &str) -> String {
    let text = match key.split_once(['.', '[']) {
        None if key == "namespaces" => "a table of [namespaces.NAME] tables",
        None if key == "tokens" => "an array of [[tokens]] tables",
        Some(("namespaces", _)) if key.ends_with(".read") => return one_of::<NamespaceRead>(),
        Some(("namespaces", _)) => "a table with key `read`",
        Some(("tokens", rest)) => match rest.split_once("].").map(|(_, field)| field) {
            None => "a table with keys name, secret or secret_env, access",
            Some("name") => TOKEN_NAME_EXPECTED,
            Some("secret") => SECRET_EXPECTED,
            Some("secret_env") => "the name of an environment variable",
            Some("access") => return one_of::<TokenAccess>(),
            Some("namespaces") => {
                "an array of namespace names, e.g. [\"ac\", \"cas\"]; leave the key out for \
                 every namespace"
            }
            Some(field) if field.starts_with("namespaces[") => TOKEN_NAMESPACE_EXPECTED,
            Some(_) => "a value of the documented type",
        },
        _ => "a value of the documented type",
    };
    text.to_owned()
}

const NAMESPACE_NAME_EXPECTED: &str = "a namespace name matching [a-z0-9][a-z0-9_-]{0,63}";
const TOKEN_NAMESPACE_EXPECTED: &str = "a namespace name matching [a-z0-9][a-z0-9_-]{0,63} \
     (the Bazel routes /ac/ and /cas/, with or without an instance name, are `ac` and `cas`; \
     Gradle's /cache/ is `gradle`)";
const TOKEN_NAME_EXPECTED: &str = "a token name matching [A-Za-z0-9][A-Za-z0-9_.-]{0,63}";
const SECRET_EXPECTED: &str = "16 to 1024 bytes of visible ASCII (! to ~, no spaces)";

/// One line of [`rules`].
struct Rule {
    key: &'static str,
    ok: bool,
    expected: String,
}

impl Rule {
    fn new(key: &'static str, ok: bool, expected: &str) -> Self {
        let expected = expected.to_owned();
        Self { key, ok, expected }
    }

    /// A key whose every well-typed value is allowed.
    fn any(key: &'static str, expected: &str) -> Self {
        Self::new(key, true, expected)
    }

    /// A keyword key: its variants, from serde, are what is allowed.
    fn keyword<T: DeserializeOwned>(key: &'static str) -> Self {
        Self::new(key, true, &one_of::<T>())
    }
}

fn one_of<T: DeserializeOwned>() -> String {
    format!("one of {}", names::<T>().join(", "))
}

fn within(value: impl TryInto<u64>, min: u64, max: u64) -> bool {
    value.try_into().is_ok_and(|v| (min..=max).contains(&v))
}

/// What `key` accepts, for an error message.
fn expected(key: &str) -> String {
    match rules(&Config::default())
        .into_iter()
        .find(|rule| rule.key == key)
    {
        Some(rule) => rule.expected,
        None => table_expected(key),
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

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

impl Config {
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

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// The config file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// This command-line flag, e.g. `--listen`.
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("default"),
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Env(name) => f.write_str(name),
            Self::Flag(flag) => f.write_str(flag),
        }
    }
}

/// Why a configuration was refused. `Display` is the message for the operator.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The config file is not valid TOML.
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A key the table does not have.
    UnknownKey {
        /// The key as written.
        key: String,
        /// The table, e.g. `top level`, `[namespaces.ac]`, `[[tokens]] entry 0`.
        table: String,
        /// The file.
        path: PathBuf,
        /// The keys that table allows.
        allowed: Vec<&'static str>,
    },
    /// A `SLUICE_*` variable that names no key.
    UnknownEnv {
        /// The variable.
        name: String,
        /// The variables that are allowed.
        allowed: Vec<String>,
    },
    /// A required key is absent.
    MissingKey {
        /// The full key, e.g. `tokens[0].access`.
        key: String,
        /// The file.
        path: PathBuf,
        /// What the key accepts.
        expected: String,
    },
    /// A value of the wrong type, out of range or malformed.
    BadValue {
        /// The full key, e.g. `engine_threads` or `tokens[1].secret`.
        key: String,
        /// The value as given (secrets are replaced by their length).
        value: String,
        /// Where it came from.
        source: Source,
        /// What is allowed.
        expected: String,
    },
    /// Values that are fine alone but impossible together; the message names them all.
    Conflict {
        /// The explanation, naming keys, values and sources.
        message: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, error } => {
                write!(f, "cannot read config file `{}`: {error}", path.display())
            }
            Self::Syntax { path, message } => {
                write!(
                    f,
                    "config file `{}` is not valid TOML: {message}",
                    path.display()
                )
            }
            Self::UnknownKey {
                key,
                table,
                path,
                allowed,
            } => write!(
                f,
                "unknown config key `{key}` in {table} of `{}`; allowed keys there: {}",
                path.display(),
                allowed.join(", ")
            ),
            Self::UnknownEnv { name, allowed } => write!(
                f,
                "unknown environment variable `{name}`: variables starting with {ENV_PREFIX} \
                 must name a config key; allowed: {}, and {ENV_LOG} (log filter), \
                 {ENV_CONFIG} (config file path)",
                allowed.join(", ")
            ),
            Self::MissingKey {
                key,
                path,
                expected,
            } => write!(
                f,
                "config key `{key}` is missing in `{}`: expected {expected}",
                path.display()
            ),
            Self::BadValue {
                key,
                value,
                source,
                expected,
            } => write!(
                f,
                "config key `{key}` = `{value}` (from {source}): expected {expected}"
            ),
            Self::Conflict { message } => f.write_str(message),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Loads the configuration: defaults, then `file` (if any), then the `SLUICE_*` variables in
/// `env` (the binary passes the process environment), then `overrides`; then checks the
/// combinations. `env` may hold unrelated variables; they are ignored.
pub fn load(
    file: Option<&Path>,
    env: &[(String, String)],
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let text = match file {
        Some(path) => Some((
            path,
            std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                path: path.to_path_buf(),
                error,
            })?,
        )),
        None => None,
    };
    load_text(
        text.as_ref().map(|(path, text)| (*path, text.as_str())),
        env,
        overrides,
    )
}

/// [`load`] with the file's text already read: `file` is its path (for messages) and text.
pub fn load_text(
    file: Option<(&Path, &str)>,
    env: &[(String, String)],
    overrides: &Overrides,
) -> Result<Config, ConfigError> {
    let path = file.map_or(Path::new(""), |(path, _)| path);
    // Every scalar key set so far, with its value as given and where; a later layer replaces.
    let mut set: Vec<Entry> = Vec::new();
    let mut tables = Config::default();
    if let Some((path, text)) = file {
        let table: toml::Table =
            text.parse()
                .map_err(|error: toml::de::Error| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    message: syntax_message(text, &error),
                })?;
        let source = Source::File(path.to_path_buf());
        let layer: Vec<Entry> = table
            .into_iter()
            .map(|(key, value)| Entry::new(key, Raw::Toml(value), source.clone()))
            .collect();
        tables = check_layer(&layer, path)?;
        check_tables(&mut tables, path, env)?;
        merge(&mut set, layer);
    }
    let layer = env_layer(env, &tables.tokens)?;
    check_layer(&layer, path)?;
    merge(&mut set, layer);
    let layer = flag_layer(overrides);
    check_layer(&layer, path)?;
    merge(&mut set, layer);

    let mut config = check_layer(&set, path)?;
    config.namespaces = tables.namespaces;
    config.tokens = tables.tokens;
    validate(&mut config, &set)?;
    Ok(config)
}

/// Adds a layer's scalar keys to `set`, replacing what lower layers set.
fn merge(set: &mut Vec<Entry>, layer: Vec<Entry>) {
    for entry in layer {
        if !TABLE_KEYS.contains(&entry.key.as_str()) {
            set.retain(|old| old.key != entry.key);
            set.push(entry);
        }
    }
}

/// The `SLUICE_*` variables in `env`, as entries; an unknown one is an error.
fn env_layer(env: &[(String, String)], tokens: &[TokenConfig]) -> Result<Vec<Entry>, ConfigError> {
    let keys = scalar_keys();
    let mut layer = Vec::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let is_secret = tokens.iter().any(|t| t.secret_env.as_ref() == Some(name));
        if name == ENV_LOG || name == ENV_CONFIG || name == ENV_UPGRADE_FD || is_secret {
            continue;
        }
        // Exact capitals only: `SLUICE_listen` is more likely a typo than intent.
        let Some(key) = keys.iter().find(|key| key.to_ascii_uppercase() == rest) else {
            return Err(ConfigError::UnknownEnv {
                name: name.clone(),
                allowed: keys.iter().map(|key| env_name(key)).collect(),
            });
        };
        let entry = Entry::new(
            (*key).to_owned(),
            Raw::Text(value.clone()),
            Source::Env(name.clone()),
        );
        merge(&mut layer, vec![entry]);
    }
    Ok(layer)
}

/// The flags that were given, as entries: text like env values, and a bare flag as `true`.
fn flag_layer(overrides: &Overrides) -> Vec<Entry> {
    // `None` fields are left out of the table.
    let table = toml::Table::try_from(overrides).unwrap_or_default();
    table
        .into_iter()
        .map(|(key, value)| {
            let raw = match value {
                toml::Value::String(text) => Raw::Text(text),
                other => Raw::Toml(other),
            };
            let flag = format!("--{}", key.replace('_', "-"));
            Entry::new(key, raw, Source::Flag(flag))
        })
        .collect()
}

/// Deserialises one layer alone and checks each key it sets against its rule.
fn check_layer(layer: &[Entry], file: &Path) -> Result<Config, ConfigError> {
    let items = layer.iter().map(|e| (e.key.as_str(), e.raw(), &e.source));
    let config = Config::deserialize(MapDe::new(String::new(), items.collect(), file))
        .map_err(DeError::into_config_error)?;
    for rule in rules(&config).into_iter().filter(|rule| !rule.ok) {
        if let Some(entry) = layer.iter().find(|e| e.key == rule.key) {
            return Err(ConfigError::BadValue {
                key: rule.key.to_owned(),
                value: shown_value(entry),
                source: entry.source.clone(),
                expected: rule.expected,
            });
        }
    }
    Ok(config)
}

/// A value as quoted back in an error: the peer secret only by its length.
fn shown_value(entry: &Entry) -> String {
    if entry.key != "peer_secret" {
        return entry.raw().display();
    }
    match &entry.raw {
        Raw::Text(text) => format!("({} bytes, not shown)", text.len()),
        Raw::Toml(toml::Value::String(text)) => format!("({} bytes, not shown)", text.len()),
        Raw::Toml(_) => "(not a string)".to_owned(),
    }
}

/// Most entries in `peers`.
pub const PEERS_MAX: usize = 256;

/// `host:port` with a non-empty host of name or IP characters (or a bracketed IPv6 literal)
/// and a port from 1 to 65535.
fn is_host_port(text: &str) -> bool {
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && (host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            || (host.starts_with('[') && host.ends_with(']')));
    host_ok && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// `tier_url`: `s3://bucket[/prefix]` with an S3 bucket name and a prefix of key characters.
fn is_tier_url(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("s3://") else {
        return false;
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let prefix_ok = prefix.len() <= 512
        && !prefix.starts_with('/')
        && !prefix.contains("//")
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
    bucket_ok && prefix_ok
}

/// `tier_endpoint`: `http://` or `https://`, then `host[:port]` and nothing else but a `/`.
fn is_endpoint(text: &str) -> bool {
    let Some(rest) = text
        .strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
    else {
        return false;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains('/') {
        return false;
    }
    is_host_port(rest) || (!rest.contains(':') && is_host_port(&format!("{rest}:443")))
}

/// `peers`: a TOML array of strings, or one comma-separated string (the form an environment
/// variable or a flag can carry); empty items are dropped.
fn peer_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct Peers;
    impl<'de> serde::de::Visitor<'de> for Peers {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of host:port")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Vec<String>, E> {
            Ok(text
                .split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                out.push(item);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_any(Peers)
}

/// The checks serde's types do not make on `[namespaces.*]` and `[[tokens]]`, and each
/// `secret_env` read from `env` into its token's secret.
fn check_tables(c: &mut Config, path: &Path, env: &[(String, String)]) -> Result<(), ConfigError> {
    let source = Source::File(path.to_path_buf());
    let bad = |key: String, value: String, expected: &str| ConfigError::BadValue {
        key,
        value,
        source: source.clone(),
        expected: expected.to_owned(),
    };
    if c.namespaces.len() > NAMESPACES_MAX {
        let count = format!("{} tables", c.namespaces.len());
        return Err(bad("namespaces".into(), count, "at most 1024 namespaces"));
    }
    if let Some(name) = c.namespaces.keys().find(|name| !is_valid_namespace(name)) {
        let name = truncate(name.clone());
        return Err(bad("namespaces".into(), name, NAMESPACE_NAME_EXPECTED));
    }
    if c.tokens.len() > TOKENS_MAX {
        let count = format!("{} entries", c.tokens.len());
        return Err(bad("tokens".into(), count, "at most 1024 tokens"));
    }
    let settings: Vec<String> = scalar_keys().iter().map(|key| env_name(key)).collect();
    for index in 0..c.tokens.len() {
        let (earlier, rest) = c.tokens.split_at_mut(index);
        let token = &mut rest[0];
        let prefix = format!("tokens[{index}]");
        let quoted = truncate(format!("{:?}", token.name));
        if !is_valid_token_name(&token.name) {
            return Err(bad(format!("{prefix}.name"), quoted, TOKEN_NAME_EXPECTED));
        }
        if earlier.iter().any(|t| t.name == token.name) {
            let expected = "a name no other token uses";
            return Err(bad(format!("{prefix}.name"), quoted, expected));
        }
        if let Some(names) = &token.namespaces {
            check_scope(&format!("{prefix}.namespaces"), names)
                .map_err(|(key, value, expected)| bad(key, value, expected))?;
        }
        let mut secret_key = format!("{prefix}.secret");
        let mut secret_source = source.clone();
        match (&token.secret_env, !token.secret.is_given()) {
            (Some(_), false) => {
                return Err(ConfigError::Conflict {
                    message: format!(
                        "config keys `{prefix}.secret` and `{prefix}.secret_env` are both set \
                         in `{}`: give the secret inline or name the environment variable \
                         holding it, not both",
                        path.display()
                    ),
                })
            }
            (None, true) => {
                return Err(ConfigError::MissingKey {
                    key: secret_key,
                    path: path.to_path_buf(),
                    expected: "`secret` (the secret itself) or `secret_env` (the environment \
                               variable holding it)"
                        .to_owned(),
                })
            }
            (None, false) => {}
            (Some(var), true) => {
                secret_key = format!("{prefix}.secret_env");
                let quoted = format!("{var:?}");
                if var == ENV_LOG || var == ENV_CONFIG || settings.contains(var) {
                    let expected = "a variable that is not itself a sluice setting";
                    return Err(bad(secret_key, quoted, expected));
                }
                let Some((_, secret)) = env.iter().rev().find(|(k, _)| k == var) else {
                    let expected = "the name of a variable set in the environment; it is not set";
                    return Err(bad(secret_key, quoted, expected));
                };
                secret_source = Source::Env(var.clone());
                token.secret = Secret::new(secret.clone());
            }
        }
        let secret = token.secret.expose();
        let secret_ok = (SECRET_BYTES_MIN..=SECRET_BYTES_MAX).contains(&secret.len())
            && secret.iter().all(u8::is_ascii_graphic);
        if !secret_ok {
            // Never quote a secret, even a bad one: it may be a real one mistyped.
            return Err(ConfigError::BadValue {
                key: secret_key,
                value: format!("<redacted, {} bytes>", secret.len()),
                source: secret_source,
                expected: SECRET_EXPECTED.to_owned(),
            });
        }
        if let Some(twin) = earlier.iter().find(|t| t.secret == token.secret) {
            return Err(ConfigError::Conflict {
                message: format!(
                    "tokens `{}` and `{}` in `{}` have the same secret: each token needs its \
                     own, or which access applies would be ambiguous",
                    twin.name,
                    token.name,
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// Checks a token's `namespaces = [...]` (see the module docs; serde has checked that it is an
/// array of strings): on error, the key down to the element at fault, the value as shown, and
/// what is allowed.
fn check_scope(key: &str, names: &[String]) -> Result<(), (String, String, &'static str)> {
    if names.is_empty() {
        let expected = "at least one namespace name; leave the key out for every namespace";
        return Err((key.to_owned(), "[]".to_owned(), expected));
    }
    if names.len() > TOKEN_NAMESPACES_MAX {
        let count = format!("{} names", names.len());
        return Err((key.to_owned(), count, "at most 1024 namespace names"));
    }
    for (index, name) in names.iter().enumerate() {
        let key = format!("{key}[{index}]");
        let quoted = truncate(format!("{name:?}"));
        if !is_valid_namespace(name) {
            return Err((key, quoted, TOKEN_NAMESPACE_EXPECTED));
        }
        if names[..index].contains(name) {
            return Err((key, quoted, "a namespace not already listed for this token"));
        }
    }
    Ok(())
}

/// Checks the combinations, once every layer is applied; `set` is where each key came from.
fn validate(c: &mut Config, set: &[Entry]) -> Result<(), ConfigError> {
    let source_of = |key: &str| {
        let entry = set.iter().find(|entry| entry.key == key);
        entry.map_or(Source::Default, |entry| entry.source.clone())
    };
    if !set.iter().any(|entry| entry.key == "uri_bytes_max") {
        // When only head_bytes_max was lowered, the default URI limit follows it rather
        // than making the operator set both.
        c.uri_bytes_max = c.uri_bytes_max.min(c.head_bytes_max);
    }
    let conflict = |message: String| Err(ConfigError::Conflict { message });

    if (!c.peers.is_empty() || c.peers_dns.is_some()) && !c.peer_secret.is_given() {
        return conflict(format!(
            "config key `peers` (from {}) or `peers_dns` (from {}) is set but `peer_secret` \
             is not: every peer API request must carry it; set peer_secret (16 to 1024 \
             bytes, the same on every node) with --peer-secret or SLUICE_PEER_SECRET",
            source_of("peers"),
            source_of("peers_dns")
        ));
    }

    if let (None, Some(endpoint)) = (&c.tier_url, &c.tier_endpoint) {
        return conflict(format!(
            "config key `tier_endpoint` = `{endpoint}` (from {}) is set but `tier_url` is not: \
             the endpoint says where the object store is, tier_url which bucket to use; set \
             tier_url (s3://bucket/prefix) with --tier-url or SLUICE_TIER_URL",
            source_of("tier_endpoint")
        ));
    }

    match (&c.tls_cert, &c.tls_key) {
        (Some(path), None) => {
            return conflict(format!(
                "config key `tls_cert` = `{}` (from {}) is set but `tls_key` is not: set both \
                 to serve TLS, or neither to serve plaintext only",
                path.display(),
                source_of("tls_cert")
            ))
        }
        (None, Some(path)) => {
            return conflict(format!(
                "config key `tls_key` = `{}` (from {}) is set but `tls_cert` is not: set both \
                 to serve TLS, or neither to serve plaintext only",
                path.display(),
                source_of("tls_key")
            ))
        }
        _ => {}
    }

    if c.uri_bytes_max > c.head_bytes_max {
        return conflict(format!(
            "config key `uri_bytes_max` = `{}` (from {}) exceeds `head_bytes_max` = `{}` \
             (from {}): the URI is part of the request head, so uri_bytes_max must be at most \
             head_bytes_max",
            c.uri_bytes_max,
            source_of("uri_bytes_max"),
            c.head_bytes_max,
            source_of("head_bytes_max")
        ));
    }

    let budgets = [
        ("shutdown_pre_drain_ms", &mut c.shutdown_pre_drain_ms),
        ("shutdown_drain_ms", &mut c.shutdown_drain_ms),
        ("shutdown_replication_ms", &mut c.shutdown_replication_ms),
        ("shutdown_teardown_ms", &mut c.shutdown_teardown_ms),
        ("shutdown_grace_ms", &mut c.shutdown_grace_ms),
    ];
    let mut warnings = Vec::new();
    for (key, value) in budgets {
        if *value > SHUTDOWN_BUDGET_MAX_MS {
            warnings.push(format!(
                "config key `{key}` = `{value}` (from {}) is longer than one day: clamped to {SHUTDOWN_BUDGET_MAX_MS} ms",
                source_of(key)
            ));
            *value = SHUTDOWN_BUDGET_MAX_MS;
        }
    }
    c.warnings.extend(warnings);
    let phases_ms = c
        .shutdown_pre_drain_ms
        .saturating_add(c.shutdown_drain_ms)
        .saturating_add(c.shutdown_replication_ms)
        .saturating_add(c.shutdown_teardown_ms);
    if phases_ms > c.shutdown_grace_ms {
        return conflict(format!(
            "shutdown phases exceed the grace ceiling: `shutdown_pre_drain_ms` = `{}` (from \
             {}) + `shutdown_drain_ms` = `{}` (from {}) + `shutdown_replication_ms` = `{}` \
             (from {}) + `shutdown_teardown_ms` = `{}` (from {}) = {phases_ms} ms, but \
             `shutdown_grace_ms` = `{}` (from {}); shorten a phase or raise shutdown_grace_ms \
             to at least {phases_ms}",
            c.shutdown_pre_drain_ms,
            source_of("shutdown_pre_drain_ms"),
            c.shutdown_drain_ms,
            source_of("shutdown_drain_ms"),
            c.shutdown_replication_ms,
            source_of("shutdown_replication_ms"),
            c.shutdown_teardown_ms,
            source_of("shutdown_teardown_ms"),
            c.shutdown_grace_ms,
            source_of("shutdown_grace_ms"),
        ));
    }

    // `to_canonical` so that an IPv4-mapped loopback (::ffff:127.0.0.1) counts as loopback.
    let loopback = c.listen.ip().to_canonical().is_loopback();
    if !loopback && c.anonymous_writes() && !c.allow_anonymous_writes {
        return conflict(format!(
            "refusing to listen on `{}` (config key `listen`, from {}) with anonymous writes: \
             no token with access = \"rw\" is configured, so anyone who can reach this \
             address could write to the cache. Either add a [[tokens]] entry with access = \
             \"rw\" to the config file (writes then need that token), or accept anonymous \
             writes explicitly with --allow-anonymous-writes \
             (SLUICE_ALLOW_ANONYMOUS_WRITES=true, or allow_anonymous_writes = true)",
            c.listen,
            source_of("listen")
        ));
    }
    Ok(())
}

/// The parser's complaint as one bounded line: where (line and column), why,
/// and an excerpt of at most 60 characters around the spot. The parser's own
/// text quotes the whole offending line, which a single long line (a pasted
/// blob, a file that is not TOML at all) turns into a log line of any size
/// (found by the `config` fuzz target: 6 KB from a 2.5 KB file).
fn syntax_message(text: &str, error: &toml::de::Error) -> String {
    let reason = truncate(error.message().trim().replace('\n', " "));
    let Some(span) = error.span() else {
        return reason;
    };
    let mut at = span.start.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let column = text[line_start..at].chars().count() + 1;
    let excerpt: String = text[line_start..line_end]
        .chars()
        .skip(column.saturating_sub(31))
        .take(60)
        .collect();
    format!(
        "line {line}, column {column}: {reason} (near `{}`)",
        truncate(excerpt.escape_debug().to_string())
    )
}

/// `[a-z0-9][a-z0-9_-]{0,63}`: safe as a directory name and in a URL path segment.
pub fn is_valid_namespace(name: &str) -> bool {
    let bytes = name.as_bytes();
    matches!(bytes.first(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.len() <= 64
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

fn is_valid_token_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    matches!(bytes.first(), Some(b) if b.is_ascii_alphanumeric())
        && bytes.len() <= 64
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::de::parse_bytes;
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn from_file(text: &str) -> Result<Config, ConfigError> {
        load_text(
            Some((Path::new("sluice.toml"), text)),
            &[],
            &Overrides::default(),
        )
    }

    fn from_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        load_text(None, &env(pairs), &Overrides::default())
    }

    fn err(result: Result<Config, ConfigError>) -> String {
        match result {
            Ok(config) => panic!("expected an error, got {config:?}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn no_input_gives_the_defaults() {
        let config = load_text(None, &[], &Overrides::default()).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.data_dir, PathBuf::from("./sluice-data"));
        assert_eq!(config.body_bytes_max, 16 * GIB);
        assert_eq!(config.gradle_body_bytes_max, 100 * MIB);
        assert!(config.anonymous_writes());
    }

    #[test]
    fn engine_threads_message_matches_the_documented_form() {
        assert_eq!(
            err(from_env(&[("SLUICE_ENGINE_THREADS", "abc")])),
            "config key `engine_threads` = `abc` (from SLUICE_ENGINE_THREADS): expected a whole \
             number from 0 to 256 (0 = one per core)"
        );
    }

    /// One row per value rule, through the environment: (key, bad value, allowed text).
    #[test]
    fn bad_env_values_name_key_value_source_and_allowed() {
        let rows: &[(&str, &str, &str)] = &[
            ("listen", "localhost:8080", "an IP address and port"),
            ("listen", "127.0.0.1", "an IP address and port"),
            ("listen", "127.0.0.1:65536", "an IP address and port"),
            ("data_dir", "", "a non-empty directory path"),
            ("tls_cert", " ", "a non-empty path"),
            ("tls_key", "", "a non-empty path"),
            ("allow_anonymous_writes", "maybe", "true or false"),
            ("store_bytes_max", "10XB", "0 for unlimited"),
            ("store_bytes_max", "-1", "0 for unlimited"),
            ("store_bytes_max", "99999999999TiB", "0 for unlimited"),
            ("store_bytes_max", "1.5GiB", "0 for unlimited"),
            ("fsync", "sometimes", "one of always, never"),
            ("head_bytes_max", "1023", "from 1024 to 1048576"),
            ("head_bytes_max", "2MiB", "from 1024 to 1048576"),
            ("uri_bytes_max", "63", "from 64 to 1048576"),
            ("body_bytes_max", "0", "from 1 byte to 1 TiB"),
            ("body_bytes_max", "2TiB", "from 1 byte to 1 TiB"),
            ("gradle_body_bytes_max", "0", "from 1 byte to 1 TiB"),
            ("header_read_timeout_ms", "0", "from 1 to 3600000"),
            ("header_read_timeout_ms", "10s", "from 1 to 3600000"),
            ("idle_timeout_ms", "3600001", "from 1 to 3600000"),
            ("lingering_time_ms", "-1", "from 0 to 3600000"),
            ("lingering_timeout_ms", "0", "from 1 to 3600000"),
            ("lingering_bytes_max", "2TiB", "from 0 to 1 TiB"),
            ("body_read_timeout_ms", "0", "from 1 to 3600000"),
            ("peers", "127.0.0.1", "each host:port"),
            ("peers", "a:1,b:0", "each host:port"),
            ("peers", "a b:1", "each host:port"),
            ("peers_dns", "sluice-headless", "name:port"),
            ("peer_refresh_ms", "99", "from 100 to 3600000"),
            (
                "replication_outbox_bytes_max",
                "4095",
                "from 4096 (4 KiB) to 1 TiB",
            ),
            ("anti_entropy_interval_ms", "999", "from 1000 to 86400000"),
            ("tombstone_retention_ms", "59999", "from 60000 (one minute)"),
            ("peer_probe_interval_ms", "0", "from 100 to 3600000"),
            (
                "replication_request_timeout_ms",
                "50",
                "from 100 to 3600000",
            ),
            (
                "replication_bytes_per_second",
                "1000",
                "0 (no limit) or a byte rate from 65536",
            ),
            ("replication_bytes_per_second", "-1", "0 (no limit)"),
            (
                "replication_burst_bytes",
                "100",
                "from 4096 (4 KiB) to 1 TiB",
            ),
            (
                "replication_public_latency_target_ms",
                "0",
                "from 1 to 60000",
            ),
            ("read_through", "maybe", "true or false"),
            ("read_through_timeout_ms", "0", "from 1 to 3600000"),
            ("read_through_negative_ms", "-5", "from 0 to 3600000"),
            (
                "tier_url",
                "http://bucket",
                "s3://bucket or s3://bucket/prefix",
            ),
            ("tier_url", "s3://B", "s3://bucket or s3://bucket/prefix"),
            (
                "tier_url",
                "s3://bucket//x",
                "s3://bucket or s3://bucket/prefix",
            ),
            ("tier_endpoint", "127.0.0.1:8333", "http://host:port"),
            ("tier_endpoint", "http://h:1/path", "http://host:port"),
            ("tier_write", "sometimes", "one of behind, through"),
            ("tier_timeout_ms", "99", "from 100 to 3600000"),
            ("send_timeout_ms", "3600001", "from 1 to 3600000"),
            (
                "connections_per_ip_max",
                "1000001",
                "from 0 to 1000000 (0 = no cap)",
            ),
            (
                "connections_per_ip_max",
                "-1",
                "from 0 to 1000000 (0 = no cap)",
            ),
            ("engine_spin_us", "10001", "from 0 to 10000"),
            ("engine_spin_us", "-1", "from 0 to 10000"),
            ("engine", "turbo", "one of auto, uring, epoll, fallback"),
            ("engine_threads", "257", "from 0 to 256"),
            ("engine_threads", "-1", "from 0 to 256"),
            ("engine_threads", "+4", "from 0 to 256"),
            ("engine_threads", "0x10", "from 0 to 256"),
            ("fallback_threads", "257", "from 0 to 256"),
            ("fallback_threads", "-2", "from 0 to 256"),
            ("file_serving_mode", "sendfile", "one of splice, copy"),
            ("connections_per_core_max", "0", "from 1 to 1000000"),
            ("connections_per_core_max", "1000001", "from 1 to 1000000"),
            ("fallback_connections_max", "0", "from 1 to 1000000"),
            ("shutdown_pre_drain_ms", "-5", "clamped to one day"),
            (
                "shutdown_teardown_ms",
                "1e3",
                "a whole number of milliseconds",
            ),
            (
                "shutdown_replication_ms",
                "1.5",
                "a whole number of milliseconds",
            ),
            ("upgrade_ready_timeout_ms", "0", "from 1 to 3600000"),
            ("pid_file", "", "a non-empty file path"),
            ("shutdown_grace_ms", "forever", "clamped to one day"),
            (
                "log_level",
                "verbose",
                "one of error, warn, info, debug, trace",
            ),
            ("log_format", "logfmt", "one of text, json"),
        ];
        for (key, value, allowed) in rows {
            let var = env_name(key);
            let message = err(from_env(&[(&var, value)]));
            for needle in [
                format!("config key `{key}`"),
                format!("= `{value}`"),
                format!("(from {var})"),
                (*allowed).to_owned(),
            ] {
                assert!(
                    message.contains(&needle),
                    "{key}={value:?}: {needle:?} not in {message}"
                );
            }
        }
    }

    /// Every scalar key appears in some row above or below, so none goes untested.
    #[test]
    fn every_key_has_an_expected_text_and_env_name() {
        let rules = rules(&Config::default());
        let keys = scalar_keys();
        assert!(keys.len() >= 24, "{keys:?}");
        for key in keys {
            let rule = rules.iter().find(|rule| rule.key == key);
            let rule = rule.unwrap_or_else(|| panic!("`{key}` has no line in rules()"));
            assert!(rule.ok, "the default of `{key}` breaks its rule");
            assert!(!rule.expected.is_empty(), "{key}");
            assert_eq!(env_name(key), format!("SLUICE_{}", key.to_uppercase()));
        }
        // And no rule for a key that does not exist.
        for rule in &rules {
            assert!(scalar_keys().contains(&rule.key), "{}", rule.key);
        }
    }

    /// One row per value rule in the file: (TOML, key, value as quoted, allowed text).
    #[test]
    fn bad_file_values_name_key_value_source_and_allowed() {
        let rows: &[(&str, &str, &str, &str)] = &[
            ("listen = 8080", "listen", "8080", "an IP address and port"),
            (
                "data_dir = \"\"",
                "data_dir",
                "\"\"",
                "non-empty directory path",
            ),
            ("tls_cert = 1", "tls_cert", "1", "non-empty path"),
            (
                "allow_anonymous_writes = \"yes\"",
                "allow_anonymous_writes",
                "\"yes\"",
                "true or false",
            ),
            (
                "store_bytes_max = \"10 parsecs\"",
                "store_bytes_max",
                "\"10 parsecs\"",
                "0 for unlimited",
            ),
            (
                "store_bytes_max = -1",
                "store_bytes_max",
                "-1",
                "0 for unlimited",
            ),
            ("fsync = true", "fsync", "true", "one of always, never"),
            (
                "head_bytes_max = 1.5",
                "head_bytes_max",
                "1.5",
                "from 1024 to 1048576",
            ),
            (
                "engine_threads = \"4\"",
                "engine_threads",
                "\"4\"",
                "from 0 to 256",
            ),
            (
                "engine = [\"uring\"]",
                "engine",
                "an array of 1 items",
                "one of auto, uring",
            ),
            (
                "log_level = 1979-05-27",
                "log_level",
                "1979-05-27",
                "one of error",
            ),
            (
                "data_dir = 1979-05-27",
                "data_dir",
                "1979-05-27",
                "non-empty directory path",
            ),
            (
                "[namespaces]\nac = [\"token\"]",
                "namespaces.ac",
                "an array of 1 items",
                "a table with key `read`",
            ),
            ("tokens = [3]", "tokens[0]", "3", "a table with keys name"),
            (
                "[namespaces.Bad]\nread = \"public\"",
                "namespaces",
                "Bad",
                "[a-z0-9][a-z0-9_-]{0,63}",
            ),
            (
                "[namespaces.ac]\nread = \"private\"",
                "namespaces.ac.read",
                "\"private\"",
                "one of public, token",
            ),
            ("namespaces = 3", "namespaces", "3", "[namespaces.NAME]"),
            ("tokens = 3", "tokens", "3", "[[tokens]]"),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"admin\"",
                "tokens[0].access",
                "\"admin\"",
                "one of ro, rw",
            ),
            (
                "[[tokens]]\nname = \"bad name\"\nsecret = \"0123456789abcdef\"\naccess = \"ro\"",
                "tokens[0].name",
                "\"bad name\"",
                "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"short\"\naccess = \"ro\"",
                "tokens[0].secret",
                "<redacted, 5 bytes>",
                "16 to 1024 bytes",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"\"\naccess = \"ro\"",
                "tokens[0].secret",
                "<redacted, 0 bytes>",
                "16 to 1024 bytes",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"has a space in it!\"\naccess = \"ro\"",
                "tokens[0].secret",
                "<redacted, 18 bytes>",
                "visible ASCII",
            ),
            (
                "[[tokens]]\nname = \"a\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
                 [[tokens]]\nname = \"a\"\nsecret = \"fedcba9876543210\"\naccess = \"rw\"",
                "tokens[1].name",
                "\"a\"",
                "a name no other token uses",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret_env = \"SLUICE_LISTEN\"\naccess = \"ro\"",
                "tokens[0].secret_env",
                "\"SLUICE_LISTEN\"",
                "not itself a sluice setting",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret_env = \"NOT_SET\"\naccess = \"ro\"",
                "tokens[0].secret_env",
                "\"NOT_SET\"",
                "it is not set",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
                 namespaces = []",
                "tokens[0].namespaces",
                "[]",
                "at least one namespace name; leave the key out for every namespace",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
                 namespaces = \"team-a\"",
                "tokens[0].namespaces",
                "\"team-a\"",
                "an array of namespace names",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
                 [tokens.namespaces]\nteam-a = true",
                "tokens[0].namespaces",
                "a table",
                "an array of namespace names",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
                 namespaces = [\"team-a\", \"Team-B\"]",
                "tokens[0].namespaces[1]",
                "\"Team-B\"",
                "[a-z0-9][a-z0-9_-]{0,63}",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
                 namespaces = [\"a/b\"]",
                "tokens[0].namespaces[0]",
                "\"a/b\"",
                "`ac` and `cas`",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
                 namespaces = [\"\"]",
                "tokens[0].namespaces[0]",
                "\"\"",
                "a namespace name matching",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
                 namespaces = [\"ac\", 7]",
                "tokens[0].namespaces[1]",
                "7",
                "a namespace name matching",
            ),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
                 namespaces = [\"ac\", [\"cas\"]]",
                "tokens[0].namespaces[1]",
                "an array of 1 items",
                "a namespace name matching",
            ),
            (
                "[[tokens]]\nname = \"a\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
                 [[tokens]]\nname = \"b\"\nsecret = \"fedcba9876543210\"\naccess = \"ro\"\n\
                 namespaces = [\"ac\", \"cas\", \"ac\"]",
                "tokens[1].namespaces[2]",
                "\"ac\"",
                "a namespace not already listed for this token",
            ),
        ];
        for (text, key, value, allowed) in rows {
            let message = err(from_file(text));
            for needle in [
                format!("config key `{key}`"),
                format!("= `{value}`"),
                "(from sluice.toml)".to_owned(),
                (*allowed).to_owned(),
            ] {
                assert!(
                    message.contains(&needle),
                    "{text:?}: {needle:?} not in {message}"
                );
            }
        }
    }

    #[test]
    fn bad_flag_values_name_the_flag() {
        let rows: &[(Overrides, &str, &str, &str)] = &[
            (
                Overrides {
                    listen: Some("nowhere".into()),
                    ..Overrides::default()
                },
                "listen",
                "nowhere",
                "--listen",
            ),
            (
                Overrides {
                    data_dir: Some(String::new()),
                    ..Overrides::default()
                },
                "data_dir",
                "",
                "--data-dir",
            ),
            (
                Overrides {
                    engine: Some("warp".into()),
                    ..Overrides::default()
                },
                "engine",
                "warp",
                "--engine",
            ),
            (
                Overrides {
                    engine_threads: Some("abc".into()),
                    ..Overrides::default()
                },
                "engine_threads",
                "abc",
                "--engine-threads",
            ),
            (
                Overrides {
                    file_serving_mode: Some("mmap".into()),
                    ..Overrides::default()
                },
                "file_serving_mode",
                "mmap",
                "--file-serving-mode",
            ),
            (
                Overrides {
                    body_read_timeout_ms: Some("0".into()),
                    ..Overrides::default()
                },
                "body_read_timeout_ms",
                "0",
                "--body-read-timeout-ms",
            ),
            (
                Overrides {
                    send_timeout_ms: Some("1s".into()),
                    ..Overrides::default()
                },
                "send_timeout_ms",
                "1s",
                "--send-timeout-ms",
            ),
            (
                Overrides {
                    connections_per_ip_max: Some("-1".into()),
                    ..Overrides::default()
                },
                "connections_per_ip_max",
                "-1",
                "--connections-per-ip-max",
            ),
        ];
        for (overrides, key, value, flag) in rows {
            let message = err(load_text(None, &[], overrides));
            let needle = format!("config key `{key}` = `{value}` (from {flag}): expected");
            assert!(message.contains(&needle), "{needle:?} not in {message}");
        }
    }

    /// An endpoint alone names no bucket: refused, naming both keys.
    #[test]
    fn tier_endpoint_needs_tier_url() {
        let message = err(from_env(&[(
            "SLUICE_TIER_ENDPOINT",
            "http://127.0.0.1:8333",
        )]));
        assert!(message.contains("`tier_endpoint`"), "{message}");
        assert!(message.contains("`tier_url` is not"), "{message}");
        let config = from_env(&[
            ("SLUICE_TIER_ENDPOINT", "http://127.0.0.1:8333"),
            ("SLUICE_TIER_URL", "s3://bucket/prefix"),
            ("SLUICE_TIER_WRITE", "through"),
        ])
        .unwrap();
        assert_eq!(config.tier_write, TierWrite::Through);
        assert_eq!(config.tier_url.as_deref(), Some("s3://bucket/prefix"));
    }

    /// The peer secret: 16 bytes at least, visible ASCII, never quoted back,
    /// never printed by check-config, and required once peers are set.
    #[test]
    fn peer_secret_rules() {
        for bad in ["short", "sixteen bytes!!!", "ab\u{e9}cdefghijklmnopq"] {
            let message = err(load_text(
                None,
                &env(&[("SLUICE_PEER_SECRET", bad)]),
                &Overrides::default(),
            ));
            assert!(message.contains("config key `peer_secret`"), "{message}");
            assert!(message.contains("16 to 1024 bytes"), "{message}");
            assert!(
                !message.contains(bad),
                "the secret is quoted back: {message}"
            );
        }
        let message = err(load_text(
            None,
            &env(&[("SLUICE_PEERS", "127.0.0.1:9001")]),
            &Overrides::default(),
        ));
        assert!(message.contains("`peer_secret`"), "{message}");
        let config = load_text(
            None,
            &env(&[
                ("SLUICE_PEERS", "127.0.0.1:9001, 127.0.0.1:9002"),
                ("SLUICE_PEER_SECRET", "0123456789abcdef"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.peers, ["127.0.0.1:9001", "127.0.0.1:9002"]);
        assert_eq!(config.peer_secret.expose(), b"0123456789abcdef");
        let toml = config.to_toml();
        assert!(!toml.contains("0123456789abcdef"), "{toml}");
        assert!(toml.contains("# peer_secret = (redacted)"), "{toml}");
        assert!(!format!("{config:?}").contains("0123456789abcdef"));
        let from_file = load_text(
            Some((
                Path::new("f.toml"),
                "peers = [\"a.example:8080\", \"[::1]:8080\"]\npeer_secret = \"0123456789abcdef\"\n",
            )),
            &[],
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(from_file.peers, ["a.example:8080", "[::1]:8080"]);
        let overrides = Overrides {
            peers: Some("127.0.0.1:1,127.0.0.1:2".into()),
            peer_secret: Some("0123456789abcdef".into()),
            ..Overrides::default()
        };
        let from_flags = load_text(None, &[], &overrides).unwrap();
        assert_eq!(from_flags.peers.len(), 2);
    }

    #[test]
    fn time_and_slot_flags_set_their_keys() {
        let overrides = Overrides {
            body_read_timeout_ms: Some("1500".into()),
            send_timeout_ms: Some("2500".into()),
            connections_per_ip_max: Some("0".into()),
            ..Overrides::default()
        };
        let config = load_text(None, &[], &overrides).unwrap();
        assert_eq!(config.body_read_timeout_ms, 1500);
        assert_eq!(config.send_timeout_ms, 2500);
        assert_eq!(config.connections_per_ip_max, 0);
    }

    #[test]
    fn secrets_never_appear_in_errors_debug_or_toml() {
        let secret = "sup3r-s3cret-value";
        let config = from_file(&format!(
            "[[tokens]]\nname = \"ci\"\nsecret = \"{secret}\"\naccess = \"rw\""
        ))
        .unwrap();
        assert_eq!(config.tokens[0].secret.expose(), secret.as_bytes());
        assert!(!format!("{config:?}").contains(secret));
        assert!(!config.to_toml().contains(secret));
        assert!(config.to_toml().contains("# secret = (redacted)"));

        let short = "tiny-secret";
        let message = err(from_file(&format!(
            "[[tokens]]\nname = \"ci\"\nsecret = \"{short}\"\naccess = \"rw\""
        )));
        assert!(!message.contains(short), "{message}");
    }

    /// Each row: which layers set `listen` (file, env, flag) and which value wins.
    #[test]
    fn precedence_is_flag_then_env_then_file_then_default() {
        let file = "127.0.0.1:1001";
        let from_env = "127.0.0.1:1002";
        let flag = "127.0.0.1:1003";
        let rows: &[(bool, bool, bool, &str)] = &[
            (false, false, false, "127.0.0.1:8080"),
            (true, false, false, file),
            (false, true, false, from_env),
            (true, true, false, from_env),
            (false, false, true, flag),
            (true, false, true, flag),
            (false, true, true, flag),
            (true, true, true, flag),
        ];
        for &(in_file, in_env, in_flag, want) in rows {
            let text = format!("listen = \"{file}\"\nengine_threads = 3");
            let vars = if in_env {
                env(&[("SLUICE_LISTEN", from_env)])
            } else {
                Vec::new()
            };
            let overrides = Overrides {
                listen: in_flag.then(|| flag.to_owned()),
                ..Overrides::default()
            };
            let file_arg = in_file.then(|| (Path::new("f.toml"), text.as_str()));
            let config = load_text(file_arg, &vars, &overrides).unwrap();
            assert_eq!(
                config.listen.to_string(),
                want,
                "{in_file} {in_env} {in_flag}"
            );
        }
    }

    /// Each layer is checked alone: a bad value is an error even where a higher layer would
    /// replace it.
    #[test]
    fn overridden_bad_values_are_still_errors() {
        let overrides = Overrides {
            engine_threads: Some("4".into()),
            ..Overrides::default()
        };
        let message = err(load_text(
            Some((Path::new("f.toml"), "engine_threads = \"many\"")),
            &env(&[("SLUICE_ENGINE_THREADS", "2")]),
            &overrides,
        ));
        assert!(
            message.contains("`engine_threads` = `\"many\"` (from f.toml)"),
            "{message}"
        );
        let message = err(load_text(
            None,
            &env(&[("SLUICE_ENGINE_THREADS", "999")]),
            &overrides,
        ));
        assert!(
            message.contains("(from SLUICE_ENGINE_THREADS)"),
            "{message}"
        );
        // The flag wins when every layer is well-formed, and a bare flag reads as true.
        let overrides = Overrides {
            allow_anonymous_writes: Some(true),
            ..overrides
        };
        let config = load_text(None, &env(&[("SLUICE_ENGINE_THREADS", "2")]), &overrides).unwrap();
        assert_eq!(config.engine_threads, 4);
        assert!(config.allow_anonymous_writes);
    }

    #[test]
    fn env_and_flags_cover_every_overridable_key() {
        let vars = env(&[
            ("SLUICE_DATA_DIR", "/env/data"),
            ("SLUICE_TLS_CERT", "/env/cert.pem"),
            ("SLUICE_TLS_KEY", "/env/key.pem"),
            ("SLUICE_ENGINE", "uring"),
            ("SLUICE_FSYNC", "NEVER"),
            ("SLUICE_STORE_BYTES_MAX", " 10GiB\n"),
            ("SLUICE_ALLOW_ANONYMOUS_WRITES", "yes"),
            ("PATH", "/usr/bin"),
        ]);
        let overrides = Overrides {
            listen: Some("0.0.0.0:9000".into()),
            data_dir: Some("/flag/data".into()),
            tls_cert: Some("/flag/cert.pem".into()),
            tls_key: Some("/flag/key.pem".into()),
            allow_anonymous_writes: Some(true),
            engine: Some("fallback".into()),
            engine_threads: Some("8".into()),
            file_serving_mode: Some("copy".into()),
            ..Overrides::default()
        };
        let config = load_text(None, &vars, &overrides).unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:9000");
        assert_eq!(config.data_dir, PathBuf::from("/flag/data"));
        assert_eq!(config.tls_cert, Some(PathBuf::from("/flag/cert.pem")));
        assert_eq!(config.tls_key, Some(PathBuf::from("/flag/key.pem")));
        assert_eq!(config.engine, EngineChoice::Fallback);
        assert_eq!(config.engine_threads, 8);
        assert_eq!(config.engine_threads_effective(), 8);
        assert_eq!(config.file_serving_mode, FileServingMode::Copy);
        assert_eq!(config.fsync, FsyncPolicy::Never);
        assert_eq!(config.store_bytes_max, 10 * GIB);
        assert!(config.allow_anonymous_writes);
    }

    #[test]
    fn unknown_file_keys_are_named_with_their_table_and_the_allowed_keys() {
        let rows: &[(&str, &str, &str, &str)] = &[
            ("lisen = \"127.0.0.1:1\"", "`lisen`", "the top level", "listen, data_dir"),
            ("[namespaces.ac]\nread = \"token\"\nwrite = \"token\"", "`write`", "`[namespaces.ac]`", "read"),
            (
                "[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"ro\"\nscope = \"x\"",
                "`scope`",
                "`[[tokens]]` entry 0",
                "name, secret, secret_env, access",
            ),
        ];
        for (text, key, table, allowed) in rows {
            let message = err(from_file(text));
            for needle in [*key, *table, *allowed, "sluice.toml", "unknown config key"] {
                assert!(
                    message.contains(needle),
                    "{text:?}: {needle:?} not in {message}"
                );
            }
        }
    }

    #[test]
    fn unknown_env_variables_are_errors_except_reserved_ones() {
        let message = err(from_env(&[("SLUICE_LISTN", "127.0.0.1:1")]));
        assert!(message.contains("`SLUICE_LISTN`"), "{message}");
        assert!(message.contains("SLUICE_LISTEN"), "{message}");
        assert!(message.contains("SLUICE_LOG"), "{message}");
        // Exact capitals only.
        assert!(err(from_env(&[("SLUICE_listen", "127.0.0.1:1")])).contains("`SLUICE_listen`"));
        assert!(err(from_env(&[("SLUICE_TOKENS", "x")])).contains("`SLUICE_TOKENS`"));

        // Reserved names and unrelated variables pass.
        from_env(&[
            ("SLUICE_LOG", "sluice=debug"),
            ("SLUICE_CONFIG", "/etc/sluice.toml"),
            ("sluice_whatever", "x"),
            ("HOME", "/root"),
        ])
        .unwrap();

        // A variable named by `secret_env` is not a stray config variable.
        let config = load_text(
            Some((
                Path::new("f.toml"),
                "[[tokens]]\nname = \"ci\"\nsecret_env = \"SLUICE_CI_SECRET\"\naccess = \"rw\"",
            )),
            &env(&[("SLUICE_CI_SECRET", "0123456789abcdef")]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.tokens[0].secret.expose(), b"0123456789abcdef");
        assert_eq!(
            config.tokens[0].secret_env.as_deref(),
            Some("SLUICE_CI_SECRET")
        );
    }

    #[test]
    fn byte_sizes_take_suffixes() {
        let rows: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("123", Some(123)),
            ("123B", Some(123)),
            ("1KiB", Some(1024)),
            ("1kib", Some(1024)),
            ("512 MiB", Some(512 * MIB)),
            ("10GiB", Some(10 * GIB)),
            ("2TiB", Some(2 * TIB)),
            ("1kB", Some(1000)),
            ("1KB", Some(1000)),
            ("5MB", Some(5_000_000)),
            ("3GB", Some(3_000_000_000)),
            ("1TB", Some(1_000_000_000_000)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("16777216TiB", None),
            ("", None),
            ("GiB", None),
            ("1.5GiB", None),
            ("-1", None),
            ("+1", None),
            ("1 G", None),
            ("1GiBs", None),
            ("0x10", None),
            (" 1", None),
        ];
        for (text, want) in rows {
            assert_eq!(parse_bytes(text), *want, "{text:?}");
        }
        let config = from_file(
            "store_bytes_max = \"10GiB\"\nbody_bytes_max = 1048576\n\
             gradle_body_bytes_max = \"50MB\"\nhead_bytes_max = \"32KiB\"",
        )
        .unwrap();
        assert_eq!(config.store_bytes_max, 10 * GIB);
        assert_eq!(config.body_bytes_max, MIB);
        assert_eq!(config.gradle_body_bytes_max, 50_000_000);
        assert_eq!(config.head_bytes_max, 32 * 1024);
    }

    #[test]
    fn uri_default_follows_a_lower_head_limit() {
        let config = from_env(&[("SLUICE_HEAD_BYTES_MAX", "4096")]).unwrap();
        assert_eq!(config.uri_bytes_max, 4096);
        let config = from_env(&[("SLUICE_HEAD_BYTES_MAX", "64KiB")]).unwrap();
        assert_eq!(config.uri_bytes_max, 8192);
    }

    #[test]
    fn range_bounds_are_inclusive() {
        let rows: &[(&str, &str)] = &[
            ("SLUICE_HEAD_BYTES_MAX", "1024"),
            ("SLUICE_URI_BYTES_MAX", "64"),
            ("SLUICE_HEAD_BYTES_MAX", "1MiB"),
            ("SLUICE_ENGINE_THREADS", "256"),
            ("SLUICE_ENGINE_THREADS", "0"),
            ("SLUICE_CONNECTIONS_PER_CORE_MAX", "1000000"),
            ("SLUICE_BODY_BYTES_MAX", "1TiB"),
            ("SLUICE_IDLE_TIMEOUT_MS", "3600000"),
            ("SLUICE_ALLOW_ANONYMOUS_WRITES", "off"),
            ("SLUICE_LOG_LEVEL", "TRACE"),
        ];
        for (var, value) in rows {
            from_env(&[(var, value)]).unwrap_or_else(|e| panic!("{var}={value}: {e}"));
        }
    }

    /// Each row: listen address, tokens configured, allow flag, whether loading succeeds.
    #[test]
    fn public_listen_with_anonymous_writes_needs_consent() {
        let ro = "[[tokens]]\nname = \"r\"\nsecret = \"0123456789abcdef\"\naccess = \"ro\"\n";
        let rw = "[[tokens]]\nname = \"w\"\nsecret = \"fedcba9876543210\"\naccess = \"rw\"\n";
        let rows: &[(&str, &str, bool, bool)] = &[
            ("127.0.0.1:8080", "", false, true),
            ("127.0.0.2:8080", "", false, true),
            ("[::1]:8080", "", false, true),
            ("[::ffff:127.0.0.1]:8080", "", false, true),
            ("0.0.0.0:8080", "", false, false),
            ("[::]:8080", "", false, false),
            ("10.0.0.1:8080", "", false, false),
            ("0.0.0.0:8080", ro, false, false),
            ("0.0.0.0:8080", rw, false, true),
            ("0.0.0.0:8080", "", true, true),
            ("0.0.0.0:8080", ro, true, true),
        ];
        for &(listen, tokens, allow, ok) in rows {
            let text = format!("listen = \"{listen}\"\nallow_anonymous_writes = {allow}\n{tokens}");
            match from_file(&text) {
                Ok(_) => assert!(ok, "{listen} {tokens:?} {allow} loaded"),
                Err(error) => {
                    assert!(!ok, "{listen} {tokens:?} {allow}: {error}");
                    let message = error.to_string();
                    for needle in [
                        listen,
                        "access = \"rw\"",
                        "--allow-anonymous-writes",
                        "allow_anonymous_writes = true",
                    ] {
                        assert!(message.contains(needle), "{needle:?} not in {message}");
                    }
                }
            }
        }
        let flag = Overrides {
            listen: Some("0.0.0.0:0".into()),
            allow_anonymous_writes: Some(true),
            ..Overrides::default()
        };
        assert!(load_text(None, &[], &flag).is_ok());
    }

    #[test]
    fn anonymous_writes_exactly_when_no_rw_token() {
        let rows: &[(&[TokenAccess], bool)] = &[
            (&[], true),
            (&[TokenAccess::ReadOnly], true),
            (&[TokenAccess::ReadWrite], false),
            (&[TokenAccess::ReadOnly, TokenAccess::ReadWrite], false),
        ];
        for (accesses, anonymous) in rows {
            let config = Config {
                tokens: accesses
                    .iter()
                    .enumerate()
                    .map(|(i, access)| TokenConfig {
                        name: format!("t{i}"),
                        secret: Secret::new(format!("secret-number-{i:04}")),
                        secret_env: None,
                        access: *access,
                        namespaces: None,
                    })
                    .collect(),
                ..Config::default()
            };
            assert_eq!(config.anonymous_writes(), *anonymous, "{accesses:?}");
            // A scope narrows what a token may write; it does not make anyone else's
            // writes anonymous.
            let scoped = Config {
                tokens: config
                    .tokens
                    .iter()
                    .map(|token| TokenConfig {
                        namespaces: Some(vec!["team-a".to_owned()]),
                        ..token.clone()
                    })
                    .collect(),
                ..config.clone()
            };
            assert_eq!(scoped.anonymous_writes(), *anonymous, "{accesses:?}");
        }
    }

    /// File text, env pairs, substrings of the error.
    type ConflictRow<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);

    /// One row per combination rule.
    #[test]
    fn impossible_combinations_are_errors() {
        let rows: &[ConflictRow<'_>] = &[
            ("tls_cert = \"c.pem\"", &[], &["`tls_cert` = `c.pem`", "`tls_key` is not", "both"]),
            ("", &[("SLUICE_TLS_KEY", "k.pem")], &["`tls_key` = `k.pem` (from SLUICE_TLS_KEY)", "`tls_cert` is not"]),
            (
                "head_bytes_max = 4096",
                &[("SLUICE_URI_BYTES_MAX", "8192")],
                &["`uri_bytes_max` = `8192` (from SLUICE_URI_BYTES_MAX)", "`head_bytes_max` = `4096` (from f.toml)"],
            ),
            ("uri_bytes_max = 20000", &[], &["`uri_bytes_max` = `20000` (from f.toml)", "`head_bytes_max` = `16384` (from default)"]),
            (
                "shutdown_pre_drain_ms = 5000\nshutdown_drain_ms = 20000\nshutdown_teardown_ms = 6000",
                &[],
                &[
                    "`shutdown_pre_drain_ms` = `5000`",
                    "`shutdown_drain_ms` = `20000`",
                    "`shutdown_teardown_ms` = `6000`",
                    "= 31000 ms",
                ],
            ),
            (
                "shutdown_drain_ms = 20000\nshutdown_teardown_ms = 6000",
                &[("SLUICE_SHUTDOWN_REPLICATION_MS", "5000")],
                &[
                    "`shutdown_replication_ms` = `5000` (from SLUICE_SHUTDOWN_REPLICATION_MS)",
                    "= 31000 ms",
                    "`shutdown_grace_ms` = `30000` (from default)",
                ],
            ),
            ("shutdown_grace_ms = 0", &[], &["`shutdown_grace_ms` = `0`", "12000"]),
            (
                "[[tokens]]\nname = \"a\"\nsecret = \"0123456789abcdef\"\nsecret_env = \"X\"\naccess = \"ro\"",
                &[("X", "fedcba9876543210")],
                &["`tokens[0].secret`", "`tokens[0].secret_env`", "not both"],
            ),
            (
                "[[tokens]]\nname = \"a\"\nsecret = \"\"\nsecret_env = \"X\"\naccess = \"ro\"",
                &[("X", "fedcba9876543210")],
                &["`tokens[0].secret`", "`tokens[0].secret_env`", "not both"],
            ),
            (
                "[[tokens]]\nname = \"a\"\nsecret = \"0123456789abcdef\"\naccess = \"ro\"\n\
                 [[tokens]]\nname = \"b\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"",
                &[],
                &["tokens `a` and `b`", "same secret"],
            ),
        ];
        for (text, vars, needles) in rows {
            let message = err(load_text(
                Some((Path::new("f.toml"), text)),
                &env(vars),
                &Overrides::default(),
            ));
            for needle in *needles {
                assert!(
                    message.contains(needle),
                    "{text:?}: {needle:?} not in {message}"
                );
            }
        }
        // Both TLS paths, and budgets that exactly fit, are fine.
        from_file(
            "tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nshutdown_pre_drain_ms = 1000\n\
             shutdown_drain_ms = 2000\nshutdown_teardown_ms = 3000\nshutdown_grace_ms = 6000\n\
             head_bytes_max = 8192\nuri_bytes_max = 8192",
        )
        .unwrap();
    }

    /// A shutdown budget over a day is clamped to a day, with a warning naming the key, the
    /// value and where it came from; the grace check then sees the clamped values.
    #[test]
    fn shutdown_budgets_over_a_day_are_clamped_with_a_warning() {
        let config = from_file(
            "shutdown_drain_ms = 90000000
shutdown_teardown_ms = 0
             shutdown_grace_ms = 100000000000",
        )
        .unwrap();
        assert_eq!(config.shutdown_drain_ms, SHUTDOWN_BUDGET_MAX_MS);
        assert_eq!(config.shutdown_grace_ms, SHUTDOWN_BUDGET_MAX_MS);
        assert_eq!(config.warnings.len(), 2, "{:?}", config.warnings);
        assert!(config.warnings[0].contains("`shutdown_drain_ms` = `90000000`"));
        assert!(
            config.warnings[0].contains("clamped to 86400000 ms"),
            "{}",
            config.warnings[0]
        );
        assert!(config.warnings[1].contains("`shutdown_grace_ms` = `100000000000`"));
        // Within a day: no warning.
        assert!(from_file(
            "shutdown_drain_ms = 86400000
shutdown_teardown_ms = 0
shutdown_grace_ms = 86400000"
        )
        .unwrap()
        .warnings
        .is_empty());
        // Clamped, the phases can still exceed the (clamped) ceiling: refused with the sums.
        let message = err(from_file(
            "shutdown_drain_ms = 90000000
shutdown_grace_ms = 100000000",
        ));
        assert!(
            message.contains("shutdown phases exceed the grace ceiling"),
            "{message}"
        );
    }

    #[test]
    fn missing_required_keys_are_named() {
        let rows: &[(&str, &str)] = &[
            ("[namespaces.ac]", "`namespaces.ac.read` is missing"),
            (
                "[[tokens]]\nsecret = \"0123456789abcdef\"\naccess = \"ro\"",
                "`tokens[0].name` is missing",
            ),
            (
                "[[tokens]]\nname = \"a\"\nsecret = \"0123456789abcdef\"",
                "`tokens[0].access` is missing",
            ),
            (
                "[[tokens]]\nname = \"a\"\naccess = \"ro\"",
                "`tokens[0].secret` is missing",
            ),
        ];
        for (text, needle) in rows {
            let message = err(from_file(text));
            assert!(message.contains(needle), "{needle:?} not in {message}");
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let message = err(from_file("listen = "));
        assert!(
            message.contains("`sluice.toml` is not valid TOML"),
            "{message}"
        );
        assert!(message.contains("line 1, column"), "{message}");

        // One enormous bad line still makes a short message, with where it is
        // (fuzz/regressions/config/long-line-syntax-error).
        let long = format!(
            "engine = \"fallback\"\nstore = {}\u{e9}=\n",
            "\\x".repeat(3000)
        );
        let message = err(from_file(&long));
        assert!(message.len() < 600, "{} bytes: {message}", message.len());
        assert!(message.contains("line 2, column"), "{message}");

        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.toml");
        let message = err(load(Some(&missing), &[], &Overrides::default()));
        assert!(message.contains("cannot read config file"), "{message}");
        assert!(message.contains("absent.toml"), "{message}");

        let present = dir.path().join("sluice.toml");
        std::fs::write(&present, "engine = \"fallback\"\n").unwrap();
        let config = load(Some(&present), &[], &Overrides::default()).unwrap();
        assert_eq!(config.engine, EngineChoice::Fallback);
    }

    #[test]
    fn to_toml_loads_back_into_the_same_config() {
        let text = "listen = \"[::1]:0\"\ndata_dir = \"/var/lib/sluice \\\"x\\\"\"\n\
                    tls_cert = \"c.pem\"\ntls_key = \"k.pem\"\nstore_bytes_max = \"1GiB\"\n\
                    fsync = \"never\"\nengine = \"uring\"\nengine_threads = 4\n\
                    file_serving_mode = \"copy\"\nlog_level = \"debug\"\n\
                    [namespaces.ac]\nread = \"token\"\n[namespaces.gradle]\nread = \"public\"\n\
                    [[tokens]]\nname = \"ci\"\nsecret_env = \"CI_SECRET\"\naccess = \"rw\"\n\
                    [[tokens]]\nname = \"team-a\"\nsecret_env = \"TEAM_A_SECRET\"\n\
                    access = \"rw\"\nnamespaces = [\"team-a\", \"ac\", \"cas\"]\n";
        let vars = env(&[
            ("CI_SECRET", "0123456789abcdef"),
            ("TEAM_A_SECRET", "fedcba9876543210"),
        ]);
        let config = load_text(
            Some((Path::new("a.toml"), text)),
            &vars,
            &Overrides::default(),
        )
        .unwrap();
        let printed = config.to_toml();
        let again = load_text(
            Some((Path::new("b.toml"), &printed)),
            &vars,
            &Overrides::default(),
        )
        .unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!(config, again, "{printed}");
        assert!(printed.contains("secret_env = \"CI_SECRET\""), "{printed}");
        assert!(
            printed.contains("namespaces = [\"team-a\", \"ac\", \"cas\"]"),
            "{printed}"
        );
        assert!(!printed.contains("0123456789abcdef"), "{printed}");

        let defaults = Config::default().to_toml();
        assert!(defaults.contains("# tls_cert is not set"), "{defaults}");
        assert_eq!(from_file(&defaults).unwrap(), Config::default());
    }

    #[test]
    fn engine_threads_effective_is_bounded() {
        let auto = Config::default().engine_threads_effective();
        assert!((1..=256).contains(&auto), "{auto}");
        let fixed = Config {
            engine_threads: 3,
            ..Config::default()
        };
        assert_eq!(fixed.engine_threads_effective(), 3);
    }

    /// `namespaces` on a token: left out covers every namespace; written, it is kept in the
    /// order given (reserved Bazel/Gradle names included); past the bound it is refused.
    #[test]
    fn token_namespaces_default_to_all_and_keep_their_order() {
        let config = from_file(
            "[[tokens]]\nname = \"all\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
             [[tokens]]\nname = \"team\"\nsecret = \"fedcba9876543210\"\naccess = \"ro\"\n\
             namespaces = [\"team-b\", \"gradle\", \"ac\", \"cas\", \"0_x\"]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.tokens[0].namespaces, None);
        assert_eq!(
            config.tokens[1].namespaces.as_deref(),
            Some(&["team-b", "gradle", "ac", "cas", "0_x"].map(String::from)[..])
        );

        let names = |count: usize| {
            (0..count)
                .map(|i| format!("\"n{i}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let token = |list: String| {
            format!(
                "[[tokens]]\nname = \"t\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
                 namespaces = [{list}]\n"
            )
        };
        let most = from_file(&token(names(TOKEN_NAMESPACES_MAX))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            most.tokens[0].namespaces.as_ref().map(Vec::len),
            Some(TOKEN_NAMESPACES_MAX)
        );
        let message = err(from_file(&token(names(TOKEN_NAMESPACES_MAX + 1))));
        for needle in [
            "config key `tokens[0].namespaces`",
            "= `1025 names`",
            "at most 1024 namespace names",
        ] {
            assert!(message.contains(needle), "{needle:?} not in {message}");
        }
    }

    #[test]
    fn namespace_names_follow_the_pattern() {
        let long_ok = "a".repeat(64);
        let long_bad = "a".repeat(65);
        let rows: &[(&str, bool)] = &[
            ("ac", true),
            ("cas", true),
            ("gradle", true),
            ("0-a_b", true),
            (&long_ok, true),
            (&long_bad, false),
            ("", false),
            ("-a", false),
            ("_a", false),
            ("A", false),
            ("a.b", false),
            ("a/b", false),
        ];
        for (name, ok) in rows {
            assert_eq!(is_valid_namespace(name), *ok, "{name:?}");
        }
    }
}
