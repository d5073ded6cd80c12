//! The config tests: loading, each key's rule, the table checks and the combinations.
use std::fmt;
use std::path::{Path, PathBuf};

use super::de::parse_bytes;
use super::rules::rules;
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

/// Asserts that `message` holds each of `needles`; `case` says which input it came from.
fn assert_mentions<S: AsRef<str>>(
    message: &str,
    needles: impl IntoIterator<Item = S>,
    case: &dyn fmt::Debug,
) {
    for needle in needles {
        let needle = needle.as_ref();
        assert!(
            message.contains(needle),
            "{case:?}: {needle:?} not in {message}"
        );
    }
}

/// Asserts that `check` gives each row's answer for the row's input.
fn assert_each<T: PartialEq + fmt::Debug>(rows: &[(&str, T)], check: impl Fn(&str) -> T) {
    for (input, want) in rows {
        assert_eq!(check(input), *want, "{input:?}");
    }
}

/// Asserts that the message refusing a value names the key, the value as quoted, where it
/// came from and (a part of) what is allowed.
fn assert_bad_value(message: &str, key: &str, value: &str, source: &str, allowed: &str) {
    let needles = [
        format!("config key `{key}`"),
        format!("= `{value}`"),
        format!("(from {source})"),
        allowed.to_owned(),
    ];
    assert_mentions(message, needles, &(key, value));
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
    #[rustfmt::skip] // one row a line, so the table reads as a table
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
        ("replication_outbox_bytes_max", "4095", "from 4096 (4 KiB) to 1 TiB"),
        ("anti_entropy_interval_ms", "999", "from 1000 to 86400000"),
        ("tombstone_retention_ms", "59999", "from 60000 (one minute)"),
        ("peer_probe_interval_ms", "0", "from 100 to 3600000"),
        ("replication_request_timeout_ms", "50", "from 100 to 3600000"),
        ("replication_bytes_per_second", "1000", "0 (no limit) or a byte rate from 65536"),
        ("replication_bytes_per_second", "-1", "0 (no limit)"),
        ("replication_burst_bytes", "100", "from 4096 (4 KiB) to 1 TiB"),
        ("replication_public_latency_target_ms", "0", "from 1 to 60000"),
        ("read_through", "maybe", "true or false"),
        ("read_through_timeout_ms", "0", "from 1 to 3600000"),
        ("read_through_negative_ms", "-5", "from 0 to 3600000"),
        ("tier_url", "http://bucket", "s3://bucket or s3://bucket/prefix"),
        ("tier_url", "s3://B", "s3://bucket or s3://bucket/prefix"),
        ("tier_url", "s3://bucket//x", "s3://bucket or s3://bucket/prefix"),
        ("tier_endpoint", "127.0.0.1:8333", "http://host:port"),
        ("tier_endpoint", "http://h:1/path", "http://host:port"),
        ("tier_write", "sometimes", "one of behind, through"),
        ("tier_timeout_ms", "99", "from 100 to 3600000"),
        ("send_timeout_ms", "3600001", "from 1 to 3600000"),
        ("connections_per_ip_max", "1000001", "from 0 to 1000000 (0 = no cap)"),
        ("connections_per_ip_max", "-1", "from 0 to 1000000 (0 = no cap)"),
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
        ("shutdown_teardown_ms", "1e3", "a whole number of milliseconds"),
        ("shutdown_replication_ms", "1.5", "a whole number of milliseconds"),
        ("upgrade_ready_timeout_ms", "0", "from 1 to 3600000"),
        ("pid_file", "", "a non-empty file path"),
        ("shutdown_grace_ms", "forever", "clamped to one day"),
        ("log_level", "verbose", "one of error, warn, info, debug, trace"),
        ("log_format", "logfmt", "one of text, json"),
    ];
    for (key, value, allowed) in rows {
        let var = env_name(key);
        let message = err(from_env(&[(&var, value)]));
        assert_bad_value(&message, key, value, &var, allowed);
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
    #[rustfmt::skip] // one row a line, so the table reads as a table
    let rows: &[(&str, &str, &str, &str)] = &[
        ("listen = 8080", "listen", "8080", "an IP address and port"),
        ("data_dir = \"\"", "data_dir", "\"\"", "non-empty directory path"),
        ("tls_cert = 1", "tls_cert", "1", "non-empty path"),
        ("allow_anonymous_writes = \"yes\"", "allow_anonymous_writes", "\"yes\"", "true or false"),
        ("store_bytes_max = \"10 parsecs\"", "store_bytes_max", "\"10 parsecs\"", "0 for unlimited"),
        ("store_bytes_max = -1", "store_bytes_max", "-1", "0 for unlimited"),
        ("fsync = true", "fsync", "true", "one of always, never"),
        ("head_bytes_max = 1.5", "head_bytes_max", "1.5", "from 1024 to 1048576"),
        ("engine_threads = \"4\"", "engine_threads", "\"4\"", "from 0 to 256"),
        ("engine = [\"uring\"]", "engine", "an array of 1 items", "one of auto, uring"),
        ("log_level = 1979-05-27", "log_level", "1979-05-27", "one of error"),
        ("data_dir = 1979-05-27", "data_dir", "1979-05-27", "non-empty directory path"),
        ("[namespaces]\nac = [\"token\"]", "namespaces.ac", "an array of 1 items", "a table with key `read`"),
        ("tokens = [3]", "tokens[0]", "3", "a table with keys name"),
        ("[namespaces.Bad]\nread = \"public\"", "namespaces", "Bad", "[a-z0-9][a-z0-9_-]{0,63}"),
        ("[namespaces.ac]\nread = \"private\"", "namespaces.ac.read", "\"private\"", "one of public, token"),
        ("namespaces = 3", "namespaces", "3", "[namespaces.NAME]"),
        ("tokens = 3", "tokens", "3", "[[tokens]]"),
    ];
    #[rustfmt::skip] // the TOML on the row's first line, what the error names on its second
    let token_rows: &[(&str, &str, &str, &str)] = &[
        ("[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"admin\"",
            "tokens[0].access", "\"admin\"", "one of ro, rw"),
        ("[[tokens]]\nname = \"bad name\"\nsecret = \"0123456789abcdef\"\naccess = \"ro\"",
            "tokens[0].name", "\"bad name\"", "[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"),
        ("[[tokens]]\nname = \"ci\"\nsecret = \"short\"\naccess = \"ro\"",
            "tokens[0].secret", "<redacted, 5 bytes>", "16 to 1024 bytes"),
        ("[[tokens]]\nname = \"ci\"\nsecret = \"\"\naccess = \"ro\"",
            "tokens[0].secret", "<redacted, 0 bytes>", "16 to 1024 bytes"),
        ("[[tokens]]\nname = \"ci\"\nsecret = \"has a space in it!\"\naccess = \"ro\"",
            "tokens[0].secret", "<redacted, 18 bytes>", "visible ASCII"),
        ("[[tokens]]\nname = \"a\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
          [[tokens]]\nname = \"a\"\nsecret = \"fedcba9876543210\"\naccess = \"rw\"",
            "tokens[1].name", "\"a\"", "a name no other token uses"),
        ("[[tokens]]\nname = \"ci\"\nsecret_env = \"SLUICE_LISTEN\"\naccess = \"ro\"",
            "tokens[0].secret_env", "\"SLUICE_LISTEN\"", "not itself a sluice setting"),
        ("[[tokens]]\nname = \"ci\"\nsecret_env = \"NOT_SET\"\naccess = \"ro\"",
            "tokens[0].secret_env", "\"NOT_SET\"", "it is not set"),
        ("[[tokens]]\nname = \"a\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n\
          [[tokens]]\nname = \"b\"\nsecret = \"fedcba9876543210\"\naccess = \"ro\"\n\
          namespaces = [\"ac\", \"cas\", \"ac\"]",
            "tokens[1].namespaces[2]", "\"ac\"", "a namespace not already listed for this token"),
    ];
    // The read-write token `ci` with one more line: its `namespaces` key.
    let ci_rw = "[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"rw\"\n";
    #[rustfmt::skip] // the line on the row's first line, what the error names on its second
    let scope_rows: &[(&str, &str, &str, &str)] = &[
        ("namespaces = []",
            "tokens[0].namespaces", "[]",
            "at least one namespace name; leave the key out for every namespace"),
        ("namespaces = \"team-a\"",
            "tokens[0].namespaces", "\"team-a\"", "an array of namespace names"),
        ("[tokens.namespaces]\nteam-a = true",
            "tokens[0].namespaces", "a table", "an array of namespace names"),
        ("namespaces = [\"team-a\", \"Team-B\"]",
            "tokens[0].namespaces[1]", "\"Team-B\"", "[a-z0-9][a-z0-9_-]{0,63}"),
        ("namespaces = [\"a/b\"]",
            "tokens[0].namespaces[0]", "\"a/b\"", "`ac` and `cas`"),
        ("namespaces = [\"\"]",
            "tokens[0].namespaces[0]", "\"\"", "a namespace name matching"),
        ("namespaces = [\"ac\", 7]",
            "tokens[0].namespaces[1]", "7", "a namespace name matching"),
        ("namespaces = [\"ac\", [\"cas\"]]",
            "tokens[0].namespaces[1]", "an array of 1 items", "a namespace name matching"),
    ];
    let scoped = scope_rows
        .iter()
        .map(|&(line, key, value, allowed)| (format!("{ci_rw}{line}"), key, value, allowed));
    let texts = rows.iter().chain(token_rows);
    let texts = texts.map(|&(text, key, value, allowed)| (text.to_owned(), key, value, allowed));
    for (text, key, value, allowed) in texts.chain(scoped) {
        let message = err(from_file(&text));
        assert_bad_value(&message, key, value, "sluice.toml", allowed);
    }
}

/// A bad flag value: the [`Overrides`] with only `$field` set to `$value`, the key, the value
/// and the flag the error must name.
macro_rules! flag_row {
    ($field:ident, $value:expr, $flag:expr) => {
        (
            Overrides {
                $field: Some($value.into()),
                ..Overrides::default()
            },
            stringify!($field),
            $value,
            $flag,
        )
    };
}

#[test]
fn bad_flag_values_name_the_flag() {
    let rows: &[(Overrides, &str, &str, &str)] = &[
        flag_row!(listen, "nowhere", "--listen"),
        flag_row!(data_dir, "", "--data-dir"),
        flag_row!(engine, "warp", "--engine"),
        flag_row!(engine_threads, "abc", "--engine-threads"),
        flag_row!(file_serving_mode, "mmap", "--file-serving-mode"),
        flag_row!(body_read_timeout_ms, "0", "--body-read-timeout-ms"),
        flag_row!(send_timeout_ms, "1s", "--send-timeout-ms"),
        flag_row!(connections_per_ip_max, "-1", "--connections-per-ip-max"),
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
    #[rustfmt::skip] // the TOML on the row's first line, what the error names on its second
    let rows: &[(&str, &str, &str, &str)] = &[
        ("lisen = \"127.0.0.1:1\"",
            "`lisen`", "the top level", "listen, data_dir"),
        ("[namespaces.ac]\nread = \"token\"\nwrite = \"token\"",
            "`write`", "`[namespaces.ac]`", "read"),
        ("[[tokens]]\nname = \"ci\"\nsecret = \"0123456789abcdef\"\naccess = \"ro\"\nscope = \"x\"",
            "`scope`", "`[[tokens]]` entry 0", "name, secret, secret_env, access"),
    ];
    for (text, key, table, allowed) in rows {
        let message = err(from_file(text));
        let needles = [*key, *table, *allowed, "sluice.toml", "unknown config key"];
        assert_mentions(&message, needles, text);
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
    assert_each(rows, parse_bytes);
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
                let needles = [
                    listen,
                    "access = \"rw\"",
                    "--allow-anonymous-writes",
                    "allow_anonymous_writes = true",
                ];
                assert_mentions(&error.to_string(), needles, &text);
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
        assert_mentions(&message, *needles, text);
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
    let needles = [
        "config key `tokens[0].namespaces`",
        "= `1025 names`",
        "at most 1024 namespace names",
    ];
    assert_mentions(&message, needles, &"1025 names");
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
    assert_each(rows, is_valid_namespace);
}
