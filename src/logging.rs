//! Log set-up: lines on stderr, human-readable or JSON.
//!
//! Colour codes are written only when stderr is a terminal: redirected to a
//! file or to journald they would be noise in every line (`\x1b[2m…`). The
//! JSON format writes one object a line (timestamp, level, message, fields
//! and spans) for log shippers that should not parse text.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global subscriber. `SLUICE_LOG` (an `EnvFilter` directive
/// such as `sluice=debug`) wins over the config's `log_level`.
pub fn init(log_level: &str, format: LogFormat, env: &[(String, String)]) {
    let directive = env
        .iter()
        .find(|(k, _)| k == "SLUICE_LOG")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| log_level.to_string());
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(ansi_wanted(std::io::stderr().is_terminal(), env))
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// Colour only on a terminal, and never when `NO_COLOR` is set to anything
/// (<https://no-color.org>).
fn ansi_wanted(stderr_is_terminal: bool, env: &[(String, String)]) -> bool {
    stderr_is_terminal && !env.iter().any(|(k, v)| k == "NO_COLOR" && !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        let no_color = [("NO_COLOR".to_string(), "1".to_string())];
        assert!(ansi_wanted(true, &[]));
        assert!(!ansi_wanted(false, &[]));
        assert!(!ansi_wanted(true, &no_color));
        assert!(ansi_wanted(
            true,
            &[("NO_COLOR".to_string(), String::new())]
        ));
    }
}
