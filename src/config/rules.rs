//! What each key accepts, and the checks made after serde: one rule per scalar key (`rules`),
//! the words for the keys inside `[namespaces.*]` and `[[tokens]]` (`table_expected`), the
//! checks serde's types cannot make on those tables (`check_tables`), and the combinations
//! checked once every layer is applied (`validate`). Every refusal names the key, the value as
//! given, where it came from and what is allowed.
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::addresses::{is_endpoint, is_host_port, is_tier_url};
use super::de::{names, truncate, Entry};
use super::{
    env_name, scalar_keys, Config, ConfigError, EngineChoice, FileServingMode, FsyncPolicy,
    LogFormat, LogLevel, NamespaceRead, ReplicationScheduling, Secret, Source, TierWrite,
    TokenAccess, ENV_CONFIG, ENV_LOG, KIB, MIB, NAMESPACES_MAX, PEERS_MAX, SECRET_BYTES_MAX,
    SECRET_BYTES_MIN, TIB, TOKENS_MAX, TOKEN_NAMESPACES_MAX,
};

/// Upper bound of the body limits: far above any artifact, small enough to catch a typo.
const BODY_BYTES_LIMIT: u64 = TIB;
/// Upper bound of every `_ms` key: one hour.
const TIMEOUT_MS_LIMIT: u64 = 3_600_000;

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
/// the text that says what is. A test checks that every key has its line. The lines are in
/// the order of the keys on [`Config`], grouped by what the keys are about; when one layer
/// sets several bad values, the first here is the one reported.
pub(super) fn rules(c: &Config) -> Vec<Rule> {
    [
        listen_and_store_rules(c),
        request_rules(c),
        replication_rules(c),
        tier_rules(c),
        engine_rules(c),
        process_rules(c),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// An optional path, when given, must not be empty.
fn path_ok(path: &Option<PathBuf>) -> bool {
    path.as_ref().is_none_or(|p| !p.as_os_str().is_empty())
}

/// Where the server listens and what it stores: address, data directory, TLS files, anonymous
/// writes, store size and fsync.
fn listen_and_store_rules(c: &Config) -> Vec<Rule> {
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
            "hot_set_bytes",
            c.hot_set_bytes == 0 || within(c.hot_set_bytes, MIB, TIB),
            "a byte count, 0 to turn the hot set off or from 1 MiB to 1 TiB, e.g. \"64MiB\"",
        ),
    ]
}

/// Limits on one request and its connection: head, URI and body sizes, timeouts, lingering
/// and the per-address cap.
fn request_rules(c: &Config) -> Vec<Rule> {
    vec![
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
        Rule::any(
            "ac_completeness_check",
            "true or false (env and flags also take 1/0, yes/no, on/off)",
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
    ]
}

/// Replication: the peers, the secret between them, the outbox, anti-entropy, the limiter
/// and read-through.
fn replication_rules(c: &Config) -> Vec<Rule> {
    vec![
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
        Rule::new(
            "public_latency_sample_us",
            within(c.public_latency_sample_us, 0, 1_000_000),
            "a whole number of microseconds from 0 (off) to 1000000",
        ),
        Rule::keyword::<ReplicationScheduling>("replication_scheduling"),
        Rule::any(
            "replication_cgroup",
            "a path to a cgroup v2 directory (its cgroup.threads must be writable)",
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
    ]
}

/// The object-store tier.
fn tier_rules(c: &Config) -> Vec<Rule> {
    vec![
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
    ]
}

/// Which engine serves, with how many threads and connections.
fn engine_rules(c: &Config) -> Vec<Rule> {
    vec![
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
    ]
}

/// Shutdown budgets, the upgrade hand-off, the pid file and logging: the process around
/// the serving.
fn process_rules(c: &Config) -> Vec<Rule> {
    vec![
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
pub(super) struct Rule {
    pub(super) key: &'static str,
    pub(super) ok: bool,
    pub(super) expected: String,
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
pub(super) fn expected(key: &str) -> String {
    match rules(&Config::default())
        .into_iter()
        .find(|rule| rule.key == key)
    {
        Some(rule) => rule.expected,
        None => table_expected(key),
    }
}

/// The checks serde's types do not make on `[namespaces.*]` and `[[tokens]]`, and each
/// `secret_env` read from `env` into its token's secret.
pub(super) fn check_tables(
    c: &mut Config,
    path: &Path,
    env: &[(String, String)],
) -> Result<(), ConfigError> {
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
pub(super) fn validate(c: &mut Config, set: &[Entry]) -> Result<(), ConfigError> {
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
