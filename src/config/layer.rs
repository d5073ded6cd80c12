//! Loading: the defaults, then the file, then the `SLUICE_*` variables, then the flags. Each
//! layer is a list of entries (key, raw value, source), deserialised and checked on its own
//! before it is merged, so a bad value is refused even when a higher layer replaces it.
use std::path::Path;

use serde::Deserialize;

use super::de::{truncate, Entry, MapDe, Raw};
use super::rules::{check_tables, expected, rules, validate};
use super::{
    env_name, scalar_keys, Config, ConfigError, Overrides, Source, TokenConfig, ENV_CONFIG,
    ENV_LOG, ENV_PREFIX, ENV_UPGRADE_FD, TABLE_KEYS,
};

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
        .map_err(|error| error.into_config_error(expected))?;
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
