//! The `sluice` command: `serve`, `check-config`, `doctor`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sluice::config::{self, Overrides};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "io_uring-native artifact cache server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// One value, parsed once at start: the size of its largest variant costs nothing, and boxing
// it would only make clap's derive harder to read.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve artifacts (defaults: 127.0.0.1:8080, data in ./sluice-data).
    // Boxed: the serve flags outweigh the other commands many times over.
    Serve(Box<ServeArgs>),
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// TOML config file.
        file: PathBuf,
    },
    /// Print what this host allows: kernel, io_uring, memlock, pipe sizes.
    Doctor,
}

/// Flags override `SLUICE_*` variables, which override the config file.
#[derive(Args)]
struct ServeArgs {
    /// TOML config file (or SLUICE_CONFIG).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The flags that set config keys.
    #[command(flatten)]
    overrides: Overrides,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Entries that are not UTF-8 cannot be sluice settings; skip them
    // rather than panic (std::env::vars would).
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    match cli.command {
        Command::Serve(args) => {
            // --config, else SLUICE_CONFIG (the environment form of the flag).
            let config_path = args.config.or_else(|| {
                env.iter()
                    .find(|(k, _)| k == config::ENV_CONFIG)
                    .map(|(_, v)| PathBuf::from(v))
            });
            let config = match config::load(config_path.as_deref(), &env, &args.overrides) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("sluice: {err}");
                    return ExitCode::from(2);
                }
            };
            sluice::logging::init(&config.log_level.to_string(), config.log_format, &env);
            match sluice::server::run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("sluice: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::CheckConfig { file } => {
            match config::load(Some(&file), &env, &Overrides::default()) {
                Ok(config) => {
                    // The PEM files are read as `serve` reads them, so a
                    // missing or unparsable certificate fails here too.
                    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
                        if let Err(err) = sluice::fallback::TlsSettings::load(cert, key) {
                            eprintln!("sluice: {err}");
                            return ExitCode::from(2);
                        }
                    }
                    print!("{}", config.to_toml());
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("sluice: {err}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Doctor => {
            print!("{}", sluice::doctor::report());
            ExitCode::SUCCESS
        }
    }
}
