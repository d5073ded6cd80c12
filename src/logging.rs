//! Log set-up: human-readable lines on stderr.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber. `SLUICE_LOG` (an `EnvFilter` directive
/// such as `sluice=debug`) wins over the config's `log_level`.
pub fn init(log_level: &str, env: &[(String, String)]) {
    let directive = env
        .iter()
        .find(|(k, _)| k == "SLUICE_LOG")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| log_level.to_string());
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
