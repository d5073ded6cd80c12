//! The `sluice` command: `serve`, `check-config`, `doctor`, `upgrade`.

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
    /// Upgrade a running server to the binary now at its path (sends it SIGUSR2) and wait
    /// until the pid file names the new process. Exit status 0 once it does, 1 if the
    /// upgrade did not happen within the wait (the old process keeps serving; its log says
    /// why).
    Upgrade {
        /// The server's pid file (config key `pid_file`).
        #[arg(long)]
        pid_file: PathBuf,
        /// Longest wait for the new process, in ms; keep it above the server's
        /// upgrade_ready_timeout_ms.
        #[arg(long, default_value_t = 60_000)]
        wait_ms: u64,
    },
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
    // Before anything else: an upgrade re-runs this path, and the file behind it may be
    // replaced later (see `Launch`).
    let launch = sluice::lifecycle::Launch::current();
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
            for warning in &config.warnings {
                tracing::warn!("{warning}");
            }
            match sluice::server::run_with(config, &launch, &env) {
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
                    for warning in &config.warnings {
                        eprintln!("sluice: warning: {warning}");
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
        Command::Upgrade { pid_file, wait_ms } => upgrade(&pid_file, wait_ms),
    }
}

/// `sluice upgrade`: SIGUSR2 to the pid in `pid_file`, then wait for the file to name
/// another live process (the new one writes it once the old one hands over).
fn upgrade(pid_file: &std::path::Path, wait_ms: u64) -> ExitCode {
    use rustix::process::{kill_process, test_kill_process, Pid, Signal};
    let Some(old) = sluice::lifecycle::read_pid_file(pid_file) else {
        eprintln!("sluice: no pid in {}", pid_file.display());
        return ExitCode::from(2);
    };
    let Some(old_pid) = i32::try_from(old).ok().and_then(Pid::from_raw) else {
        eprintln!("sluice: {} holds no valid pid", pid_file.display());
        return ExitCode::from(2);
    };
    if let Err(e) = kill_process(old_pid, Signal::USR2) {
        eprintln!("sluice: cannot signal pid {old}: {e}");
        return ExitCode::FAILURE;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
    while std::time::Instant::now() < deadline {
        let new = sluice::lifecycle::read_pid_file(pid_file);
        if let Some(new) = new.filter(|&p| p != old) {
            let alive = i32::try_from(new)
                .ok()
                .and_then(Pid::from_raw)
                .is_some_and(|p| test_kill_process(p).is_ok());
            if alive {
                println!("upgraded: pid {old} -> {new}");
                return ExitCode::SUCCESS;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!(
        "sluice: pid {old} was not replaced within {wait_ms} ms; it keeps serving (its log says why)"
    );
    ExitCode::FAILURE
}
