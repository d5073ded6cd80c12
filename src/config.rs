//! Configuration: loading, layering and validation.
//!
//! Every key has a default and may be set, from lowest to highest precedence, in a TOML file
//! (`--config FILE`), in the environment as `SLUICE_<KEY IN CAPITALS>`, and (for the keys listed
//! on [`Overrides`]) by a command-line flag: flag > env > file > default. After all layers are
//! applied, combinations are checked (TLS pair, URI vs head limit, shutdown budgets, anonymous
//! writes on a public address).
//!
//! Decisions written down here because nothing else specifies them:
//!
//! - **Errors, not defaults.** An unknown key, an unknown `SLUICE_*` variable, a value of the
//!   wrong type or out of range is a [`ConfigError`] whose `Display` names the key, the value,
//!   where it came from and what is allowed. Nothing is clamped or ignored.
//! - **Reserved variables.** `SLUICE_LOG` is not a config key: it is a `tracing` filter
//!   directive (like `RUST_LOG`) read by the binary when it sets up logging, and when set it
//!   overrides `log_level`. `SLUICE_CONFIG` names the config file (the binary's `--config`).
//!   Both are skipped by the unknown-variable check, as is every variable named by a token's
//!   `secret_env`, so a secret may live in e.g. `SLUICE_CI_TOKEN`.
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
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;

/// Prefix of every environment variable sluice reads.
pub const ENV_PREFIX: &str = "SLUICE_";
/// Log filter directive (tracing `EnvFilter` syntax); overrides `log_level` when set. Not a key.
pub const ENV_LOG: &str = "SLUICE_LOG";
/// Path of the config file, the environment form of `--config`. Not a key.
pub const ENV_CONFIG: &str = "SLUICE_CONFIG";
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

macro_rules! keyword_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every accepted spelling, in documentation order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            /// The spelling used in config files and in [`Config::to_toml`].
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }

            /// Parses a spelling, ignoring ASCII case.
            pub fn from_name(text: &str) -> Option<Self> {
                $(if text.eq_ignore_ascii_case($text) {
                    return Some(Self::$variant);
                })+
                None
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

keyword_enum! {
    /// When the store calls `fsync` (key `fsync`, default `always`).
    FsyncPolicy {
        /// Before a write is acknowledged, the file and its directory are synced: an
        /// acknowledged artifact survives power loss.
        Always = "always",
        /// Never sync; the page cache decides. Faster, loses recent writes on power loss.
        Never = "never",
    }
}

keyword_enum! {
    /// Which front end serves plaintext HTTP/1 (key `engine`, default `auto`).
    EngineChoice {
        /// io_uring when the kernel allows it, otherwise the portable fallback.
        Auto = "auto",
        /// io_uring or refuse to start.
        Uring = "uring",
        /// The portable hyper front end only.
        Fallback = "fallback",
    }
}

keyword_enum! {
    /// How the ring engine moves file bytes to sockets (key `file_serving_mode`, default `splice`).
    FileServingMode {
        /// file → pipe → socket, no user-space copy.
        Splice = "splice",
        /// read into a buffer, then send; for comparison in benchmarks.
        Copy = "copy",
    }
}

keyword_enum! {
    /// Least severe level logged (key `log_level`, default `info`); `SLUICE_LOG` overrides it.
    LogLevel {
        /// Errors only.
        Error = "error",
        /// Warnings and errors.
        Warn = "warn",
        /// Start-up facts, degradations, and the above.
        Info = "info",
        /// Per-connection detail.
        Debug = "debug",
        /// Everything.
        Trace = "trace",
    }
}

keyword_enum! {
    /// Who may read a namespace (`[namespaces.NAME] read = ...`).
    NamespaceRead {
        /// Anyone, with or without credentials.
        Public = "public",
        /// Any configured token, read-only or read-write.
        Token = "token",
    }
}

keyword_enum! {
    /// What a token grants (`[[tokens]] access = ...`).
    TokenAccess {
        /// Reads of `token` namespaces; writes are refused with 403.
        ReadOnly = "ro",
        /// Reads and writes.
        ReadWrite = "rw",
    }
}

/// A token secret. Its `Debug` never shows the bytes, so a config can be logged.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret; validation happens in [`load`].
    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    /// The secret bytes. Only the authoriser should call this.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
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

/// Where a token's secret was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `secret = "..."` in the file.
    Inline,
    /// `secret_env = "VAR"`: read from this environment variable.
    Env(String),
}

/// One `[[tokens]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    /// Unique name, used in logs instead of the secret.
    pub name: String,
    /// The secret presented as `Bearer <secret>` or as a Basic password.
    pub secret: Secret,
    /// Where the secret came from; [`Config::to_toml`] prints `secret_env` back.
    pub secret_source: SecretSource,
    /// What the token grants.
    pub access: TokenAccess,
    /// The namespaces the token is limited to (`namespaces = [...]`), in the order written,
    /// each valid and listed once, 1 to [`TOKEN_NAMESPACES_MAX`] of them. `None` (the key
    /// left out, the default) covers every namespace.
    pub namespaces: Option<Vec<String>>,
}

/// One `[namespaces.NAME]` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceConfig {
    /// Who may read. Namespaces without a table are public.
    pub read: NamespaceRead,
}

/// The effective configuration. Build it with [`load`]; [`Default`] gives every default.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub store_bytes_max: u64,
    /// Sync policy for acknowledged writes. Default `always`.
    pub fsync: FsyncPolicy,
    /// Largest request head in bytes (431 above). Default 16384, range 1024..=1 MiB.
    pub head_bytes_max: usize,
    /// Longest request URI in bytes (414 above). Default 8192, or `head_bytes_max` when that
    /// is set lower and this is not set; range 64..=1 MiB, at most `head_bytes_max`.
    pub uri_bytes_max: usize,
    /// Largest PUT body in bytes for `ac`, `cas` and generic routes (413 above).
    /// Default 16 GiB, range 1 byte..=1 TiB.
    pub body_bytes_max: u64,
    /// Largest PUT body in bytes for Gradle `/cache/` (413 above). Default 100 MiB,
    /// range 1 byte..=1 TiB.
    pub gradle_body_bytes_max: u64,
    /// Time allowed to receive a whole request head, in ms (408 after). Default 10000.
    pub header_read_timeout_ms: u64,
    /// Time an idle keep-alive connection is kept, in ms. Default 60000.
    pub idle_timeout_ms: u64,
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
    /// Shutdown phase 1, in ms: readiness answers 503 while serving goes on. Default 0.
    pub shutdown_pre_drain_ms: u64,
    /// Shutdown phase 2, in ms: in-flight requests finish. Default 10000.
    pub shutdown_drain_ms: u64,
    /// Shutdown margin, in ms, for flushing and exit. Default 2000.
    pub shutdown_teardown_ms: u64,
    /// Ceiling in ms on the whole shutdown; pre-drain + drain + teardown must fit. Default 30000.
    pub shutdown_grace_ms: u64,
    /// Least severe level logged. Default `info`.
    pub log_level: LogLevel,
    /// Static replication peers, `host:port` each (key `peers`, flag `--peers a:1,b:2`, env
    /// `SLUICE_PEERS`, comma-separated). Default empty: no replication. At most 256.
    pub peers: Vec<String>,
    /// A DNS name listing the peers, `name:port`, re-resolved every `peer_refresh_ms` (key
    /// `peers_dns`, flag `--peers-dns`). Default unset.
    pub peers_dns: Option<String>,
    /// How often `peers_dns` is re-resolved, in ms. Default 2000, range 100..=3600000.
    pub peer_refresh_ms: u64,
    /// The secret every peer API request carries (key `peer_secret`, flag `--peer-secret`, env
    /// `SLUICE_PEER_SECRET`): 16 to 1024 bytes of visible ASCII. Required with peers.
    pub peer_secret: Option<String>,
    /// Bound on each peer's outbox backlog, in bytes on disk; past it the peer is repaired by
    /// anti-entropy instead. Default 1 GiB, range 4 KiB..=1 TiB.
    pub replication_outbox_bytes_max: u64,
    /// Period of anti-entropy with each peer, in ms. Default 600000 (10 min),
    /// range 1000..=86400000.
    pub anti_entropy_interval_ms: u64,
    /// How often an up peer is probed, in ms. Default 1000, range 100..=3600000.
    pub peer_probe_interval_ms: u64,
    /// Deadline of one replication request, in ms. Default 30000, range 100..=3600000.
    pub replication_request_timeout_ms: u64,
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
            engine: EngineChoice::Auto,
            engine_threads: 0,
            file_serving_mode: FileServingMode::Splice,
            engine_spin_us: 50,
            connections_per_core_max: 4096,
            fallback_connections_max: 1024,
            shutdown_pre_drain_ms: 0,
            shutdown_drain_ms: 10_000,
            shutdown_teardown_ms: 2_000,
            shutdown_grace_ms: 30_000,
            log_level: LogLevel::Info,
            peers: Vec::new(),
            peers_dns: None,
            peer_refresh_ms: 2_000,
            peer_secret: None,
            replication_outbox_bytes_max: GIB,
            anti_entropy_interval_ms: 600_000,
            peer_probe_interval_ms: 1_000,
            replication_request_timeout_ms: 30_000,
            namespaces: BTreeMap::new(),
            tokens: Vec::new(),
        }
    }
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

    /// The effective configuration as TOML, for `sluice check-config`. Inline token secrets are
    /// replaced by a comment; `secret_env` tokens show the variable name. Without inline
    /// secrets the output loads back into an equal `Config`. Non-UTF-8 paths are shown lossily.
    pub fn to_toml(&self) -> String {
        let mut out = String::from("# sluice effective configuration\n");
        for spec in KEYS {
            match (spec.render)(self) {
                None if spec.name == "peer_secret" && self.peer_secret.is_some() => {
                    out.push_str("# peer_secret = (redacted)\n");
                }
                Some(value) => {
                    out.push_str(spec.name);
                    out.push_str(" = ");
                    out.push_str(&value);
                    out.push('\n');
                }
                None => {
                    out.push_str("# ");
                    out.push_str(spec.name);
                    out.push_str(" is not set\n");
                }
            }
        }
        for (name, namespace) in &self.namespaces {
            out.push_str("\n[namespaces.");
            out.push_str(name);
            out.push_str("]\nread = ");
            out.push_str(&toml_string(namespace.read.as_str()));
            out.push('\n');
        }
        for token in &self.tokens {
            out.push_str("\n[[tokens]]\nname = ");
            out.push_str(&toml_string(&token.name));
            out.push('\n');
            match &token.secret_source {
                SecretSource::Inline => out.push_str("# secret = (redacted)\n"),
                SecretSource::Env(var) => {
                    out.push_str("secret_env = ");
                    out.push_str(&toml_string(var));
                    out.push('\n');
                }
            }
            out.push_str("access = ");
            out.push_str(&toml_string(token.access.as_str()));
            out.push('\n');
            if let Some(namespaces) = &token.namespaces {
                out.push_str("namespaces = [");
                for (i, name) in namespaces.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(&toml_string(name));
                }
                out.push_str("]\n");
            }
        }
        out
    }
}

/// Values given on the command line; each overrides the environment and the file. Values are
/// text, parsed and validated exactly as environment values are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--listen ADDR`.
    pub listen: Option<String>,
    /// `--data-dir DIR`.
    pub data_dir: Option<String>,
    /// `--tls-cert PEM`.
    pub tls_cert: Option<String>,
    /// `--tls-key PEM`.
    pub tls_key: Option<String>,
    /// `--allow-anonymous-writes`: `Some(true)` when the flag is given, `None` otherwise.
    pub allow_anonymous_writes: Option<bool>,
    /// `--engine auto|uring|fallback`.
    pub engine: Option<String>,
    /// `--engine-threads N`.
    pub engine_threads: Option<String>,
    /// `--file-serving-mode splice|copy`.
    pub file_serving_mode: Option<String>,
    /// `--peers host:port,host:port`.
    pub peers: Option<String>,
    /// `--peers-dns name:port`.
    pub peers_dns: Option<String>,
    /// `--peer-secret SECRET`.
    pub peer_secret: Option<String>,
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
    Flag(&'static str),
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
    let mut loader = Loader {
        config: Config::default(),
        provenance: HashMap::new(),
        secret_env_names: Vec::new(),
    };
    if let Some((path, text)) = file {
        loader.apply_file(path, text, env)?;
    }
    loader.apply_env(env)?;
    loader.apply_overrides(overrides)?;
    loader.validate()?;
    Ok(loader.config)
}

/// A value before parsing: from the TOML file, or text from the environment or a flag.
enum Raw<'a> {
    Toml(&'a toml::Value),
    Text(&'a str),
}

impl Raw<'_> {
    /// The value as quoted back in an error, bounded in length.
    fn display(&self) -> String {
        let shown = match self {
            Raw::Text(text) => (*text).to_owned(),
            Raw::Toml(value) => describe_toml(value),
        };
        truncate(shown)
    }

    /// A string value: a TOML string, or env/flag text trimmed of surrounding whitespace.
    fn text(&self) -> Option<&str> {
        match self {
            Raw::Toml(toml::Value::String(text)) => Some(text),
            Raw::Toml(_) => None,
            Raw::Text(text) => Some(text.trim_ascii()),
        }
    }

    /// A whole number in `min..=max`: a TOML integer, or decimal digits in text.
    fn uint(&self, min: u64, max: u64) -> Option<u64> {
        let value = match self {
            Raw::Toml(toml::Value::Integer(n)) => u64::try_from(*n).ok()?,
            Raw::Toml(_) => return None,
            Raw::Text(_) => parse_digits(self.text()?)?,
        };
        (min..=max).contains(&value).then_some(value)
    }

    /// A byte count in `min..=max`: a TOML integer, or text with an optional size suffix.
    fn bytes(&self, min: u64, max: u64) -> Option<u64> {
        let value = match self {
            Raw::Toml(toml::Value::Integer(n)) => u64::try_from(*n).ok()?,
            _ => parse_bytes(self.text()?)?,
        };
        (min..=max).contains(&value).then_some(value)
    }

    /// A boolean: a TOML boolean, or one of the accepted words in text.
    fn boolean(&self) -> Option<bool> {
        match self {
            Raw::Toml(toml::Value::Boolean(b)) => Some(*b),
            Raw::Toml(_) => None,
            Raw::Text(_) => {
                let text = self.text()?;
                ["true", "1", "yes", "on"]
                    .iter()
                    .any(|word| text.eq_ignore_ascii_case(word))
                    .then_some(true)
                    .or_else(|| {
                        ["false", "0", "no", "off"]
                            .iter()
                            .any(|word| text.eq_ignore_ascii_case(word))
                            .then_some(false)
                    })
            }
        }
    }

    /// A non-empty path.
    fn path(&self) -> Option<PathBuf> {
        let text = self.text()?;
        (!text.is_empty()).then(|| PathBuf::from(text))
    }

    fn keyword<T>(&self, parse: fn(&str) -> Option<T>) -> Option<T> {
        parse(self.text()?)
    }
}

/// Describes a TOML value for an error message without serialising it (which could fail).
fn describe_toml(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => format!("{text:?}"),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(dt) => dt.to_string(),
        toml::Value::Array(items) => format!("an array of {} items", items.len()),
        toml::Value::Table(_) => "a table".to_owned(),
    }
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

fn truncate(mut text: String) -> String {
    if text.len() > ERROR_VALUE_BYTES_MAX {
        let mut end = ERROR_VALUE_BYTES_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// Decimal digits only: no sign, no spaces, no `0x`; `None` on overflow.
fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A byte count: digits, then optionally spaces and a suffix (see the module docs).
fn parse_bytes(text: &str) -> Option<u64> {
    let digits_end = text
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(text.len());
    let number = parse_digits(&text[..digits_end])?;
    let suffix = text[digits_end..].trim_start_matches(' ');
    const SUFFIXES: &[(&str, u64)] = &[
        ("", 1),
        ("b", 1),
        ("kib", KIB),
        ("mib", MIB),
        ("gib", GIB),
        ("tib", TIB),
        ("kb", 1000),
        ("mb", 1000 * 1000),
        ("gb", 1000 * 1000 * 1000),
        ("tb", 1000 * 1000 * 1000 * 1000),
    ];
    let (_, unit) = SUFFIXES
        .iter()
        .find(|(name, _)| suffix.eq_ignore_ascii_case(name))?;
    number.checked_mul(*unit)
}

/// A TOML basic string literal.
fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn toml_path(path: &Path) -> String {
    toml_string(&path.to_string_lossy())
}

/// One scalar key: its name, flag, what it accepts, how to set it and how to print it.
struct KeySpec {
    name: &'static str,
    /// The command-line flag, for keys on [`Overrides`].
    flag: Option<&'static str>,
    /// Completes "expected ..." in error messages.
    expected: &'static str,
    /// Parses and stores the value; `None` means the value is bad.
    apply: fn(&mut Config, &Raw<'_>) -> Option<()>,
    /// The value as a TOML literal; `None` when unset.
    render: fn(&Config) -> Option<String>,
}

const fn key(
    name: &'static str,
    expected: &'static str,
    apply: fn(&mut Config, &Raw<'_>) -> Option<()>,
    render: fn(&Config) -> Option<String>,
) -> KeySpec {
    KeySpec {
        name,
        flag: None,
        expected,
        apply,
        render,
    }
}

const fn flag_key(
    name: &'static str,
    flag: &'static str,
    expected: &'static str,
    apply: fn(&mut Config, &Raw<'_>) -> Option<()>,
    render: fn(&Config) -> Option<String>,
) -> KeySpec {
    KeySpec {
        name,
        flag: Some(flag),
        expected,
        apply,
        render,
    }
}

const MS_EXPECTED: &str = "a whole number of milliseconds from 0 to 3600000";
const MS_POSITIVE_EXPECTED: &str = "a whole number of milliseconds from 1 to 3600000";
const BODY_EXPECTED: &str = "a byte count from 1 byte to 1 TiB: a whole number, or a string \
                             with a suffix B, KiB, MiB, GiB, TiB (1024-based) or kB, MB, GB, TB \
                             (1000-based), e.g. \"100MiB\"";

/// Every scalar key, in the order `to_toml` prints them.
static KEYS: &[KeySpec] = &[
    flag_key(
        "listen",
        "--listen",
        "an IP address and port, e.g. 127.0.0.1:8080 or [::1]:8080 (host names are not resolved)",
        |c, r| {
            c.listen = r.text()?.parse().ok()?;
            Some(())
        },
        |c| Some(toml_string(&c.listen.to_string())),
    ),
    flag_key(
        "data_dir",
        "--data-dir",
        "a non-empty directory path",
        |c, r| {
            c.data_dir = r.path()?;
            Some(())
        },
        |c| Some(toml_path(&c.data_dir)),
    ),
    flag_key(
        "tls_cert",
        "--tls-cert",
        "a non-empty path to a PEM certificate chain",
        |c, r| {
            c.tls_cert = Some(r.path()?);
            Some(())
        },
        |c| c.tls_cert.as_deref().map(toml_path),
    ),
    flag_key(
        "tls_key",
        "--tls-key",
        "a non-empty path to a PEM private key",
        |c, r| {
            c.tls_key = Some(r.path()?);
            Some(())
        },
        |c| c.tls_key.as_deref().map(toml_path),
    ),
    flag_key(
        "allow_anonymous_writes",
        "--allow-anonymous-writes",
        "true or false (env and flags also take 1/0, yes/no, on/off)",
        |c, r| {
            c.allow_anonymous_writes = r.boolean()?;
            Some(())
        },
        |c| Some(c.allow_anonymous_writes.to_string()),
    ),
    key(
        "store_bytes_max",
        "a byte count, 0 for unlimited: a whole number, or a string with a suffix B, KiB, \
         MiB, GiB, TiB (1024-based) or kB, MB, GB, TB (1000-based), e.g. \"10GiB\"",
        |c, r| {
            c.store_bytes_max = r.bytes(0, u64::MAX)?;
            Some(())
        },
        |c| Some(c.store_bytes_max.to_string()),
    ),
    key(
        "fsync",
        "one of always, never",
        |c, r| {
            c.fsync = r.keyword(FsyncPolicy::from_name)?;
            Some(())
        },
        |c| Some(toml_string(c.fsync.as_str())),
    ),
    key(
        "head_bytes_max",
        "a byte count from 1024 to 1048576 (1 MiB), e.g. 16384 or \"16KiB\"",
        |c, r| {
            c.head_bytes_max = usize::try_from(r.bytes(1024, MIB)?).ok()?;
            Some(())
        },
        |c| Some(c.head_bytes_max.to_string()),
    ),
    key(
        "uri_bytes_max",
        "a byte count from 64 to 1048576 (1 MiB), and at most head_bytes_max",
        |c, r| {
            c.uri_bytes_max = usize::try_from(r.bytes(64, MIB)?).ok()?;
            Some(())
        },
        |c| Some(c.uri_bytes_max.to_string()),
    ),
    key(
        "body_bytes_max",
        BODY_EXPECTED,
        |c, r| {
            c.body_bytes_max = r.bytes(1, BODY_BYTES_LIMIT)?;
            Some(())
        },
        |c| Some(c.body_bytes_max.to_string()),
    ),
    key(
        "gradle_body_bytes_max",
        BODY_EXPECTED,
        |c, r| {
            c.gradle_body_bytes_max = r.bytes(1, BODY_BYTES_LIMIT)?;
            Some(())
        },
        |c| Some(c.gradle_body_bytes_max.to_string()),
    ),
    key(
        "header_read_timeout_ms",
        MS_POSITIVE_EXPECTED,
        |c, r| {
            c.header_read_timeout_ms = r.uint(1, TIMEOUT_MS_LIMIT)?;
            Some(())
        },
        |c| Some(c.header_read_timeout_ms.to_string()),
    ),
    key(
        "idle_timeout_ms",
        MS_POSITIVE_EXPECTED,
        |c, r| {
            c.idle_timeout_ms = r.uint(1, TIMEOUT_MS_LIMIT)?;
            Some(())
        },
        |c| Some(c.idle_timeout_ms.to_string()),
    ),
    flag_key(
        "engine",
        "--engine",
        "one of auto, uring, fallback",
        |c, r| {
            c.engine = r.keyword(EngineChoice::from_name)?;
            Some(())
        },
        |c| Some(toml_string(c.engine.as_str())),
    ),
    flag_key(
        "engine_threads",
        "--engine-threads",
        "a whole number from 0 to 256 (0 = one per core)",
        |c, r| {
            c.engine_threads = usize::try_from(r.uint(0, 256)?).ok()?;
            Some(())
        },
        |c| Some(c.engine_threads.to_string()),
    ),
    flag_key(
        "file_serving_mode",
        "--file-serving-mode",
        "one of splice, copy",
        |c, r| {
            c.file_serving_mode = r.keyword(FileServingMode::from_name)?;
            Some(())
        },
        |c| Some(toml_string(c.file_serving_mode.as_str())),
    ),
    key(
        "engine_spin_us",
        "a whole number of microseconds from 0 to 10000 (0 = never poll)",
        |c, r| {
            c.engine_spin_us = r.uint(0, 10_000)?;
            Some(())
        },
        |c| Some(c.engine_spin_us.to_string()),
    ),
    key(
        "connections_per_core_max",
        "a whole number from 1 to 1000000",
        |c, r| {
            c.connections_per_core_max = usize::try_from(r.uint(1, 1_000_000)?).ok()?;
            Some(())
        },
        |c| Some(c.connections_per_core_max.to_string()),
    ),
    key(
        "fallback_connections_max",
        "a whole number from 1 to 1000000",
        |c, r| {
            c.fallback_connections_max = usize::try_from(r.uint(1, 1_000_000)?).ok()?;
            Some(())
        },
        |c| Some(c.fallback_connections_max.to_string()),
    ),
    key(
        "shutdown_pre_drain_ms",
        MS_EXPECTED,
        |c, r| {
            c.shutdown_pre_drain_ms = r.uint(0, TIMEOUT_MS_LIMIT)?;
            Some(())
        },
        |c| Some(c.shutdown_pre_drain_ms.to_string()),
    ),
    key(
        "shutdown_drain_ms",
        MS_EXPECTED,
        |c, r| {
            c.shutdown_drain_ms = r.uint(0, TIMEOUT_MS_LIMIT)?;
            Some(())
        },
        |c| Some(c.shutdown_drain_ms.to_string()),
    ),
    key(
        "shutdown_teardown_ms",
        MS_EXPECTED,
        |c, r| {
            c.shutdown_teardown_ms = r.uint(0, TIMEOUT_MS_LIMIT)?;
            Some(())
        },
        |c| Some(c.shutdown_teardown_ms.to_string()),
    ),
    key(
        "shutdown_grace_ms",
        MS_EXPECTED,
        |c, r| {
            c.shutdown_grace_ms = r.uint(0, TIMEOUT_MS_LIMIT)?;
            Some(())
        },
        |c| Some(c.shutdown_grace_ms.to_string()),
    ),
    key(
        "log_level",
        "one of error, warn, info, debug, trace",
        |c, r| {
            c.log_level = r.keyword(LogLevel::from_name)?;
            Some(())
        },
        |c| Some(toml_string(c.log_level.as_str())),
    ),
    flag_key(
        "peers",
        "--peers",
        "a list of peers, each host:port (port 1 to 65535), at most 256: a TOML array of \
         strings, or one comma-separated string (env, flag)",
        |c, r| {
            let list: Vec<String> = match r {
                Raw::Toml(toml::Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<_>>()?,
                _ => r
                    .text()?
                    .split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
            };
            if list.len() > PEERS_MAX || !list.iter().all(|p| is_host_port(p)) {
                return None;
            }
            c.peers = list;
            Some(())
        },
        |c| {
            Some(format!(
                "[{}]",
                c.peers
                    .iter()
                    .map(|p| toml_string(p))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        },
    ),
    flag_key(
        "peers_dns",
        "--peers-dns",
        "a DNS name and port, name:port, e.g. sluice-headless.default.svc:8080",
        |c, r| {
            let text = r.text()?;
            is_host_port(text).then(|| c.peers_dns = Some(text.to_string()))
        },
        |c| c.peers_dns.as_deref().map(toml_string),
    ),
    key(
        "peer_refresh_ms",
        "a whole number of milliseconds from 100 to 3600000",
        |c, r| {
            c.peer_refresh_ms = r.uint(100, TIMEOUT_MS_LIMIT)?;
            Some(())
        },
        |c| Some(c.peer_refresh_ms.to_string()),
    ),
    flag_key(
        "peer_secret",
        "--peer-secret",
        "a secret of 16 to 1024 bytes of visible ASCII (! to ~), the same on every node",
        |c, r| {
            let text = r.text()?;
            let ok = (SECRET_BYTES_MIN..=SECRET_BYTES_MAX).contains(&text.len())
                && text.bytes().all(|b| b.is_ascii_graphic());
            ok.then(|| c.peer_secret = Some(text.to_string()))
        },
        // A secret is never printed back.
        |_| None,
    ),
    key(
        "replication_outbox_bytes_max",
        "a byte count from 4096 (4 KiB) to 1 TiB: a whole number, or a string with a suffix, \
         e.g. \"1GiB\"",
        |c, r| {
            c.replication_outbox_bytes_max = r.bytes(4 * KIB, TIB)?;
            Some(())
        },
        |c| Some(c.replication_outbox_bytes_max.to_string()),
    ),
    key(
        "anti_entropy_interval_ms",
        "a whole number of milliseconds from 1000 to 86400000 (one day)",
        |c, r| {
            c.anti_entropy_interval_ms = r.uint(1_000, 86_400_000)?;
            Some(())
        },
        |c| Some(c.anti_entropy_interval_ms.to_string()),
    ),
    key(
        "peer_probe_interval_ms",
        "a whole number of milliseconds from 100 to 3600000",
        |c, r| {
            c.peer_probe_interval_ms = r.uint(100, TIMEOUT_MS_LIMIT)?;
            Some(())
        },
        |c| Some(c.peer_probe_interval_ms.to_string()),
    ),
    key(
        "replication_request_timeout_ms",
        "a whole number of milliseconds from 100 to 3600000",
        |c, r| {
            c.replication_request_timeout_ms = r.uint(100, TIMEOUT_MS_LIMIT)?;
            Some(())
        },
        |c| Some(c.replication_request_timeout_ms.to_string()),
    ),
];

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

const NAMESPACE_KEYS: &[&str] = &["read"];
const TOKEN_KEYS: &[&str] = &["name", "secret", "secret_env", "access", "namespaces"];
const NAMESPACE_NAME_EXPECTED: &str = "a namespace name matching [a-z0-9][a-z0-9_-]{0,63}";
const TOKEN_NAMESPACE_EXPECTED: &str = "a namespace name matching [a-z0-9][a-z0-9_-]{0,63} \
     (the Bazel routes /ac/ and /cas/, with or without an instance name, are `ac` and `cas`; \
     Gradle's /cache/ is `gradle`)";
const TOKEN_NAME_EXPECTED: &str = "a token name matching [A-Za-z0-9][A-Za-z0-9_.-]{0,63}";

fn find_key(name: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|spec| spec.name == name)
}

fn top_level_keys() -> Vec<&'static str> {
    KEYS.iter()
        .map(|spec| spec.name)
        .chain(["namespaces", "tokens"])
        .collect()
}

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
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

/// Validates a token's `namespaces = [...]` (see the module docs): on error, the key (down to
/// the list element at fault), the value as shown to the operator, and what is allowed.
fn token_namespaces(
    prefix: &str,
    value: &toml::Value,
) -> Result<Vec<String>, (String, String, &'static str)> {
    let key = format!("{prefix}.namespaces");
    let toml::Value::Array(items) = value else {
        return Err((
            key,
            truncate(describe_toml(value)),
            "an array of namespace names, e.g. [\"ac\", \"cas\"]; leave the key out for \
             every namespace",
        ));
    };
    if items.is_empty() {
        return Err((
            key,
            "[]".to_owned(),
            "at least one namespace name; leave the key out for every namespace",
        ));
    }
    if items.len() > TOKEN_NAMESPACES_MAX {
        return Err((
            key,
            format!("{} names", items.len()),
            "at most 1024 namespace names",
        ));
    }
    let mut names: Vec<String> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let key = format!("{key}[{index}]");
        let name = match item {
            toml::Value::String(name) if is_valid_namespace(name) => name,
            other => {
                return Err((
                    key,
                    truncate(describe_toml(other)),
                    TOKEN_NAMESPACE_EXPECTED,
                ))
            }
        };
        if names.contains(name) {
            return Err((
                key,
                format!("{name:?}"),
                "a namespace not already listed for this token",
            ));
        }
        names.push(name.clone());
    }
    Ok(names)
}

fn is_valid_token_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    matches!(bytes.first(), Some(b) if b.is_ascii_alphanumeric())
        && bytes.len() <= 64
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

struct Loader {
    config: Config,
    /// Where each scalar key was last set; absent = default.
    provenance: HashMap<&'static str, Source>,
    /// Variables named by `secret_env`, exempt from the unknown-variable check.
    secret_env_names: Vec<String>,
}

impl Loader {
    fn apply(&mut self, spec: &KeySpec, raw: &Raw<'_>, source: Source) -> Result<(), ConfigError> {
        match (spec.apply)(&mut self.config, raw) {
            Some(()) => {
                self.provenance.insert(spec.name, source);
                Ok(())
            }
            None => Err(ConfigError::BadValue {
                key: spec.name.to_owned(),
                value: if spec.name == "peer_secret" {
                    match raw.text() {
                        Some(text) => format!("({} bytes, not shown)", text.len()),
                        None => "(not a string)".to_string(),
                    }
                } else {
                    raw.display()
                },
                source,
                expected: spec.expected.to_owned(),
            }),
        }
    }

    fn source_of(&self, key: &str) -> Source {
        self.provenance.get(key).cloned().unwrap_or(Source::Default)
    }

    fn apply_file(
        &mut self,
        path: &Path,
        text: &str,
        env: &[(String, String)],
    ) -> Result<(), ConfigError> {
        let table: toml::Table =
            text.parse()
                .map_err(|error: toml::de::Error| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    message: syntax_message(text, &error),
                })?;
        let source = Source::File(path.to_path_buf());
        for (name, value) in &table {
            match name.as_str() {
                "namespaces" => self.apply_namespaces(path, value)?,
                "tokens" => self.apply_tokens(path, value, env)?,
                _ => match find_key(name) {
                    Some(spec) => self.apply(spec, &Raw::Toml(value), source.clone())?,
                    None => {
                        return Err(ConfigError::UnknownKey {
                            key: name.clone(),
                            table: "the top level".to_owned(),
                            path: path.to_path_buf(),
                            allowed: top_level_keys(),
                        })
                    }
                },
            }
        }
        Ok(())
    }

    fn apply_namespaces(&mut self, path: &Path, value: &toml::Value) -> Result<(), ConfigError> {
        let source = Source::File(path.to_path_buf());
        let bad = |key: String, value: String, expected: &str| ConfigError::BadValue {
            key,
            value,
            source: source.clone(),
            expected: expected.to_owned(),
        };
        let toml::Value::Table(namespaces) = value else {
            return Err(bad(
                "namespaces".to_owned(),
                describe_toml(value),
                "a table of [namespaces.NAME] tables",
            ));
        };
        if namespaces.len() > NAMESPACES_MAX {
            return Err(bad(
                "namespaces".to_owned(),
                format!("{} tables", namespaces.len()),
                "at most 1024 namespaces",
            ));
        }
        for (name, body) in namespaces {
            if !is_valid_namespace(name) {
                return Err(bad(
                    "namespaces".to_owned(),
                    truncate(name.clone()),
                    NAMESPACE_NAME_EXPECTED,
                ));
            }
            let key = format!("namespaces.{name}");
            let toml::Value::Table(body) = body else {
                return Err(bad(key, describe_toml(body), "a table with key `read`"));
            };
            if let Some(unknown) = body.keys().find(|k| !NAMESPACE_KEYS.contains(&k.as_str())) {
                return Err(ConfigError::UnknownKey {
                    key: unknown.clone(),
                    table: format!("table `[{key}]`"),
                    path: path.to_path_buf(),
                    allowed: NAMESPACE_KEYS.to_vec(),
                });
            }
            let read_key = format!("{key}.read");
            let read_expected = "one of public, token";
            let read = match body.get("read") {
                None => {
                    return Err(ConfigError::MissingKey {
                        key: read_key,
                        path: path.to_path_buf(),
                        expected: read_expected.to_owned(),
                    })
                }
                Some(read) => Raw::Toml(read)
                    .keyword(NamespaceRead::from_name)
                    .ok_or_else(|| bad(read_key, describe_toml(read), read_expected))?,
            };
            self.config
                .namespaces
                .insert(name.clone(), NamespaceConfig { read });
        }
        Ok(())
    }

    fn apply_tokens(
        &mut self,
        path: &Path,
        value: &toml::Value,
        env: &[(String, String)],
    ) -> Result<(), ConfigError> {
        let source = Source::File(path.to_path_buf());
        let bad = |key: String, value: String, expected: &str| ConfigError::BadValue {
            key,
            value,
            source: source.clone(),
            expected: expected.to_owned(),
        };
        let missing = |key: String, expected: &str| ConfigError::MissingKey {
            key,
            path: path.to_path_buf(),
            expected: expected.to_owned(),
        };
        let toml::Value::Array(entries) = value else {
            return Err(bad(
                "tokens".to_owned(),
                describe_toml(value),
                "an array of [[tokens]] tables",
            ));
        };
        if entries.len() > TOKENS_MAX {
            return Err(bad(
                "tokens".to_owned(),
                format!("{} entries", entries.len()),
                "at most 1024 tokens",
            ));
        }
        let secret_expected = "16 to 1024 bytes of visible ASCII (! to ~, no spaces)";
        for (index, entry) in entries.iter().enumerate() {
            let prefix = format!("tokens[{index}]");
            let toml::Value::Table(entry) = entry else {
                return Err(bad(
                    prefix,
                    describe_toml(entry),
                    "a table with keys name, secret or secret_env, access",
                ));
            };
            if let Some(unknown) = entry.keys().find(|k| !TOKEN_KEYS.contains(&k.as_str())) {
                return Err(ConfigError::UnknownKey {
                    key: unknown.clone(),
                    table: format!("`[[tokens]]` entry {index}"),
                    path: path.to_path_buf(),
                    allowed: TOKEN_KEYS.to_vec(),
                });
            }

            let name_key = format!("{prefix}.name");
            let name = match entry.get("name") {
                None => return Err(missing(name_key, TOKEN_NAME_EXPECTED)),
                Some(toml::Value::String(name)) if is_valid_token_name(name) => name.clone(),
                Some(other) => {
                    return Err(bad(name_key, describe_toml(other), TOKEN_NAME_EXPECTED))
                }
            };
            if self.config.tokens.iter().any(|t| t.name == name) {
                return Err(bad(
                    name_key,
                    format!("{name:?}"),
                    "a name no other token uses",
                ));
            }

            let access_key = format!("{prefix}.access");
            let access_expected = "one of ro, rw";
            let access = match entry.get("access") {
                None => return Err(missing(access_key, access_expected)),
                Some(access) => Raw::Toml(access)
                    .keyword(TokenAccess::from_name)
                    .ok_or_else(|| bad(access_key, describe_toml(access), access_expected))?,
            };
            let namespaces = match entry.get("namespaces") {
                None => None,
                Some(value) => Some(
                    token_namespaces(&prefix, value)
                        .map_err(|(key, value, expected)| bad(key, value, expected))?,
                ),
            };

            let (secret_key, secret, secret_source) =
                match (entry.get("secret"), entry.get("secret_env")) {
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::Conflict {
                            message: format!(
                                "config keys `{prefix}.secret` and `{prefix}.secret_env` are both \
                                 set in `{}`: give the secret inline or name the environment \
                                 variable holding it, not both",
                                path.display()
                            ),
                        })
                    }
                    (None, None) => {
                        return Err(missing(
                            format!("{prefix}.secret"),
                            "`secret` (the secret itself) or `secret_env` (the environment \
                             variable holding it)",
                        ))
                    }
                    (Some(secret), None) => {
                        let key = format!("{prefix}.secret");
                        let toml::Value::String(secret) = secret else {
                            return Err(bad(key, describe_toml(secret), secret_expected));
                        };
                        (key, secret.clone(), SecretSource::Inline)
                    }
                    (None, Some(var)) => {
                        let key = format!("{prefix}.secret_env");
                        let toml::Value::String(var) = var else {
                            return Err(bad(
                                key,
                                describe_toml(var),
                                "the name of an environment variable",
                            ));
                        };
                        if var == ENV_LOG
                            || var == ENV_CONFIG
                            || KEYS.iter().any(|spec| env_name(spec.name) == *var)
                        {
                            return Err(bad(
                                key,
                                format!("{var:?}"),
                                "a variable that is not itself a sluice setting",
                            ));
                        }
                        let Some((_, secret)) = env.iter().rev().find(|(k, _)| k == var) else {
                            return Err(bad(
                                key,
                                format!("{var:?}"),
                                "the name of a variable set in the environment; it is not set",
                            ));
                        };
                        self.secret_env_names.push(var.clone());
                        (
                            format!("{prefix}.secret_env"),
                            secret.clone(),
                            SecretSource::Env(var.clone()),
                        )
                    }
                };
            let secret_ok = (SECRET_BYTES_MIN..=SECRET_BYTES_MAX).contains(&secret.len())
                && secret.bytes().all(|b| b.is_ascii_graphic());
            if !secret_ok {
                // Never quote a secret, even a bad one: it may be a real one mistyped.
                return Err(ConfigError::BadValue {
                    key: secret_key,
                    value: format!("<redacted, {} bytes>", secret.len()),
                    source: match &secret_source {
                        SecretSource::Inline => source.clone(),
                        SecretSource::Env(var) => Source::Env(var.clone()),
                    },
                    expected: secret_expected.to_owned(),
                });
            }
            let secret = Secret::new(secret);
            if let Some(twin) = self.config.tokens.iter().find(|t| t.secret == secret) {
                return Err(ConfigError::Conflict {
                    message: format!(
                        "tokens `{}` and `{name}` in `{}` have the same secret: each token needs \
                         its own, or which access applies would be ambiguous",
                        twin.name,
                        path.display()
                    ),
                });
            }
            self.config.tokens.push(TokenConfig {
                name,
                secret,
                secret_source,
                access,
                namespaces,
            });
        }
        Ok(())
    }

    fn apply_env(&mut self, env: &[(String, String)]) -> Result<(), ConfigError> {
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if name == ENV_LOG || name == ENV_CONFIG || self.secret_env_names.contains(name) {
                continue;
            }
            // Exact capitals only: `SLUICE_listen` is more likely a typo than intent.
            let spec = KEYS
                .iter()
                .find(|spec| spec.name.to_ascii_uppercase() == rest);
            match spec {
                Some(spec) => self.apply(spec, &Raw::Text(value), Source::Env(name.clone()))?,
                None => {
                    return Err(ConfigError::UnknownEnv {
                        name: name.clone(),
                        allowed: KEYS.iter().map(|spec| env_name(spec.name)).collect(),
                    })
                }
            }
        }
        Ok(())
    }

    fn apply_overrides(&mut self, overrides: &Overrides) -> Result<(), ConfigError> {
        let texts = [
            ("listen", &overrides.listen),
            ("data_dir", &overrides.data_dir),
            ("tls_cert", &overrides.tls_cert),
            ("tls_key", &overrides.tls_key),
            ("engine", &overrides.engine),
            ("engine_threads", &overrides.engine_threads),
            ("file_serving_mode", &overrides.file_serving_mode),
            ("peers", &overrides.peers),
            ("peers_dns", &overrides.peers_dns),
            ("peer_secret", &overrides.peer_secret),
        ];
        for (name, value) in texts {
            let Some(value) = value else { continue };
            let Some(spec) = find_key(name) else { continue };
            let flag = spec.flag.unwrap_or(spec.name);
            self.apply(spec, &Raw::Text(value), Source::Flag(flag))?;
        }
        if let Some(allow) = overrides.allow_anonymous_writes {
            self.config.allow_anonymous_writes = allow;
            self.provenance.insert(
                "allow_anonymous_writes",
                Source::Flag("--allow-anonymous-writes"),
            );
        }
        Ok(())
    }

    /// Checks the combinations, once every layer is applied.
    fn validate(&mut self) -> Result<(), ConfigError> {
        if !self.provenance.contains_key("uri_bytes_max") {
            // When only head_bytes_max was lowered, the default URI limit follows it rather
            // than making the operator set both.
            self.config.uri_bytes_max = self.config.uri_bytes_max.min(self.config.head_bytes_max);
        }
        let c = &self.config;
        let conflict = |message: String| Err(ConfigError::Conflict { message });

        match (&c.tls_cert, &c.tls_key) {
            (Some(path), None) => {
                return conflict(format!(
                    "config key `tls_cert` = `{}` (from {}) is set but `tls_key` is not: set both \
                     to serve TLS, or neither to serve plaintext only",
                    path.display(),
                    self.source_of("tls_cert")
                ))
            }
            (None, Some(path)) => {
                return conflict(format!(
                    "config key `tls_key` = `{}` (from {}) is set but `tls_cert` is not: set both \
                     to serve TLS, or neither to serve plaintext only",
                    path.display(),
                    self.source_of("tls_key")
                ))
            }
            _ => {}
        }

        if (!c.peers.is_empty() || c.peers_dns.is_some()) && c.peer_secret.is_none() {
            return conflict(format!(
                "config key `peers` (from {}) or `peers_dns` (from {}) is set but `peer_secret` \
                 is not: every peer API request must carry it; set peer_secret (16 to 1024 \
                 bytes, the same on every node) with --peer-secret or SLUICE_PEER_SECRET",
                self.source_of("peers"),
                self.source_of("peers_dns")
            ));
        }

        if c.uri_bytes_max > c.head_bytes_max {
            return conflict(format!(
                "config key `uri_bytes_max` = `{}` (from {}) exceeds `head_bytes_max` = `{}` \
                 (from {}): the URI is part of the request head, so uri_bytes_max must be at most \
                 head_bytes_max",
                c.uri_bytes_max,
                self.source_of("uri_bytes_max"),
                c.head_bytes_max,
                self.source_of("head_bytes_max")
            ));
        }

        let phases_ms = c
            .shutdown_pre_drain_ms
            .saturating_add(c.shutdown_drain_ms)
            .saturating_add(c.shutdown_teardown_ms);
        if phases_ms > c.shutdown_grace_ms {
            return conflict(format!(
                "shutdown phases exceed the grace ceiling: `shutdown_pre_drain_ms` = `{}` (from \
                 {}) + `shutdown_drain_ms` = `{}` (from {}) + `shutdown_teardown_ms` = `{}` (from \
                 {}) = {phases_ms} ms, but `shutdown_grace_ms` = `{}` (from {}); shorten a phase \
                 or raise shutdown_grace_ms to at least {phases_ms}",
                c.shutdown_pre_drain_ms,
                self.source_of("shutdown_pre_drain_ms"),
                c.shutdown_drain_ms,
                self.source_of("shutdown_drain_ms"),
                c.shutdown_teardown_ms,
                self.source_of("shutdown_teardown_ms"),
                c.shutdown_grace_ms,
                self.source_of("shutdown_grace_ms"),
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
                self.source_of("listen")
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
            ("engine_spin_us", "10001", "from 0 to 10000"),
            ("engine_spin_us", "-1", "from 0 to 10000"),
            ("engine", "turbo", "one of auto, uring, fallback"),
            ("engine_threads", "257", "from 0 to 256"),
            ("engine_threads", "-1", "from 0 to 256"),
            ("engine_threads", "+4", "from 0 to 256"),
            ("engine_threads", "0x10", "from 0 to 256"),
            ("file_serving_mode", "sendfile", "one of splice, copy"),
            ("connections_per_core_max", "0", "from 1 to 1000000"),
            ("connections_per_core_max", "1000001", "from 1 to 1000000"),
            ("fallback_connections_max", "0", "from 1 to 1000000"),
            ("shutdown_pre_drain_ms", "-5", "from 0 to 3600000"),
            ("shutdown_drain_ms", "3600001", "from 0 to 3600000"),
            ("shutdown_teardown_ms", "1e3", "from 0 to 3600000"),
            ("shutdown_grace_ms", "forever", "from 0 to 3600000"),
            (
                "log_level",
                "verbose",
                "one of error, warn, info, debug, trace",
            ),
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
            ("peer_probe_interval_ms", "0", "from 100 to 3600000"),
            (
                "replication_request_timeout_ms",
                "50",
                "from 100 to 3600000",
            ),
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

    /// The peer secret: 16 bytes at least, visible ASCII, never quoted back,
    /// never printed by check-config, and required once peers are set.
    #[test]
    fn peer_secret_rules() {
        for bad in ["short", "sixteen bytes!!!", "ab\u{e9}cdefghijklmnopq"] {
            let message = err(from_env(&[("SLUICE_PEER_SECRET", bad)]));
            assert!(message.contains("config key `peer_secret`"), "{message}");
            assert!(message.contains("16 to 1024 bytes"), "{message}");
            assert!(
                !message.contains(bad),
                "the secret is quoted back: {message}"
            );
        }
        let message = err(from_env(&[("SLUICE_PEERS", "127.0.0.1:9001")]));
        assert!(message.contains("`peer_secret`"), "{message}");
        let config = from_env(&[
            ("SLUICE_PEERS", "127.0.0.1:9001, 127.0.0.1:9002"),
            ("SLUICE_PEER_SECRET", "0123456789abcdef"),
        ])
        .unwrap();
        assert_eq!(config.peers, ["127.0.0.1:9001", "127.0.0.1:9002"]);
        let toml = config.to_toml();
        assert!(!toml.contains("0123456789abcdef"), "{toml}");
        assert!(toml.contains("# peer_secret = (redacted)"), "{toml}");
        let from_file = from_file(
            "peers = [\"a.example:8080\", \"[::1]:8080\"]\npeer_secret = \"0123456789abcdef\"\n",
        )
        .unwrap();
        assert_eq!(from_file.peers, ["a.example:8080", "[::1]:8080"]);
    }

    /// Every scalar key appears in some row above or below, so none goes untested.
    #[test]
    fn every_key_has_an_expected_text_and_env_name() {
        for spec in KEYS {
            assert!(!spec.expected.is_empty(), "{}", spec.name);
            assert_eq!(
                env_name(spec.name),
                format!("SLUICE_{}", spec.name.to_uppercase())
            );
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
        ];
        for (overrides, key, value, flag) in rows {
            let message = err(load_text(None, &[], overrides));
            let needle = format!("config key `{key}` = `{value}` (from {flag}): expected");
            assert!(message.contains(&needle), "{needle:?} not in {message}");
        }
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
            config.tokens[0].secret_source,
            SecretSource::Env("SLUICE_CI_SECRET".into())
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
                        secret_source: SecretSource::Inline,
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
