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
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    listen: Option<String>,
    /// Directory holding the artifacts.
    #[arg(long)]
    data_dir: Option<String>,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long)]
    tls_cert: Option<String>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long)]
    tls_key: Option<String>,
    /// Allow anonymous writes on a non-loopback address.
    #[arg(long)]
    allow_anonymous_writes: bool,
    /// auto, uring or fallback.
    #[arg(long)]
    engine: Option<String>,
    /// Engine threads (0 = one per core).
    #[arg(long)]
    engine_threads: Option<String>,
    /// splice or copy.
    #[arg(long)]
    file_serving_mode: Option<String>,
    /// Replication peers, host:port,host:port (or SLUICE_PEERS).
    #[arg(long)]
    peers: Option<String>,
    /// A DNS name listing the peers, name:port, re-resolved every peer_refresh_ms.
    #[arg(long)]
    peers_dns: Option<String>,
    /// The secret peers present to each other (or SLUICE_PEER_SECRET; 16+ bytes).
    #[arg(long)]
    peer_secret: Option<String>,
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
            let overrides = Overrides {
                listen: args.listen,
                data_dir: args.data_dir,
                tls_cert: args.tls_cert,
                tls_key: args.tls_key,
                allow_anonymous_writes: args.allow_anonymous_writes.then_some(true),
                engine: args.engine,
                engine_threads: args.engine_threads,
                file_serving_mode: args.file_serving_mode,
                peers: args.peers,
                peers_dns: args.peers_dns,
                peer_secret: args.peer_secret,
            };
            // --config, else SLUICE_CONFIG (the environment form of the flag).
            let config_path = args.config.or_else(|| {
                env.iter()
                    .find(|(k, _)| k == config::ENV_CONFIG)
                    .map(|(_, v)| PathBuf::from(v))
            });
            let config = match config::load(config_path.as_deref(), &env, &overrides) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("sluice: {err}");
                    return ExitCode::from(2);
                }
            };
            sluice::logging::init(config.log_level.as_str(), &env);
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
