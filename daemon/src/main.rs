//! The `edgehose` command: parse the command line, load and check the config, start logging,
//! and hand over to [`edgehose::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

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
    /// Run the gateway until SIGTERM or SIGINT; SIGHUP reloads what can change live.
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
            let config = match edgehose::config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e:#}", path.display());
                    return ExitCode::FAILURE;
                }
            };
            // EDGEHOSE_LOG beats the config's `log.filter`, at start and at every reload.
            let env_filter = std::env::var("EDGEHOSE_LOG").ok();
            let filter = |text: &str| tracing_subscriber::EnvFilter::new(text);
            let initial = filter(env_filter.as_deref().unwrap_or(&config.log_filter));
            let (filter_layer, handle) = tracing_subscriber::reload::Layer::new(initial);
            let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
            let output = if edgehose::service::logging_to_journal() {
                output
                    .with_ansi(false)
                    .event_format(edgehose::service::JournalFormat)
                    .boxed()
            } else {
                output
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .boxed()
            };
            tracing_subscriber::registry()
                .with(filter_layer)
                .with(output)
                .init();
            let set_log_filter = Box::new(move |text: &str| {
                if env_filter.is_some() {
                    return Ok(false);
                }
                handle
                    .reload(filter(text))
                    .map(|()| true)
                    .map_err(|e| e.to_string())
            });
            // Every device is a socket: take the hard limit on open files (systemd's LimitNOFILE).
            if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
                tracing::warn!(error = %e, "cannot raise the open-files limit");
            }
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
            let reload = edgehose::Reload {
                path,
                set_log_filter,
            };
            match runtime.block_on(edgehose::run(config, Some(reload))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
