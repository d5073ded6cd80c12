//! Why a configuration was refused ([`ConfigError`]) and where a value came from
//! ([`Source`]), with the messages the operator reads.
use std::fmt;
use std::path::PathBuf;

use super::{ENV_CONFIG, ENV_LOG, ENV_PREFIX};

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
