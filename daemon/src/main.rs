//! The `edgehose` command: parse the command line, load and check the config, start logging,
//! and hand over to [`edgehose::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// rumqttd logs every device disconnect at ERROR from these two modules; what matters of them
/// (messages it dropped) edgehose counts and logs itself. `EDGEHOSE_LOG` overrides this.
const DEFAULT_LOG_FILTER: &str =
    "info,rumqttd=warn,rumqttd::router::routing=off,rumqttd::server::broker=off";

#[derive(Parser)]
#[command(
    name = "edgehose",
    version,
    about = "IoT edge gateway: MQTT in, durable SQLite buffer, Firehose-style batches out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or SIGINT.
    Run {
        /// The TOML config file.
        #[arg(long, short, default_value = "config/edgehose.toml")]
        config: PathBuf,
    },
    /// Validate a config file; exit non-zero naming the key and the problem.
    CheckConfig {
        #[arg(long, short, default_value = "config/edgehose.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match edgehose::config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e:#}", config.display());
                ExitCode::FAILURE
            }
        },
        Command::Run { config: path } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("EDGEHOSE_LOG")
                        .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into()),
                )
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .init();
            // Every device is a socket: take the hard limit on open files (systemd's LimitNOFILE).
            if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
                tracing::warn!(error = %e, "cannot raise the open-files limit");
            }
            let config = match edgehose::config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e:#}", path.display());
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("edgehose")
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(edgehose::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
