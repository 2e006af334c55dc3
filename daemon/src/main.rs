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
    /// Validate a config file and the files it names (TLS certificates and keys, password
    /// file, policies); exit non-zero naming the key or file and the problem.
    CheckConfig {
        #[arg(long, short, default_value = "config/edgehose.toml")]
        config: PathBuf,
    },
    /// Make a CA, the gateway's server certificate and device certificates for mutual TLS
    /// (ECDSA P-256; keys written 0600; an existing CA in DIR is reused).
    Certs {
        /// Where to write: DIR/ca.crt, DIR/server.crt, DIR/devices/ID.crt...
        #[arg(long)]
        dir: PathBuf,
        /// A DNS name or IP address devices use to reach the gateway (repeat; the first is the
        /// server certificate's common name). Without any, a missing server certificate is
        /// made for localhost, 127.0.0.1, ::1 and this host's name.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// A device certificate to make, its common name (= thing name) ID (repeat).
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Revoke a device's certificate: adds it to DIR/revoked.txt and DIR/ca.crl (repeat).
        #[arg(long)]
        revoke: Vec<String>,
        /// Validity of the new certificates in days (the CA: at least 10 years).
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// IoT policies: check what a device may do before deploying a policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Answer ALLOW or DENY, with the statement that decided, for one request under the
    /// config's policies (`ingress.frontdoor.auth.policies`). Exit 0 when allowed, 1 when
    /// denied, 2 on an error.
    Test {
        #[arg(long, short, default_value = "config/edgehose.toml")]
        config: PathBuf,
        /// The device's MQTT client id (${iot:ClientId}).
        #[arg(long)]
        client_id: String,
        /// Its certificate (PEM): gives the thing name (subject CN) and the fingerprint.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Its thing name, when it has no certificate (a password user's username).
        #[arg(long)]
        thing: Option<String>,
        /// connect, publish, retain-publish, subscribe or receive.
        action: String,
        /// The topic (publish, receive), topic filter (subscribe) or client id (connect;
        /// default: --client-id).
        name: Option<String>,
    },
}

fn policy_test(
    config: &std::path::Path,
    client_id: String,
    cert: Option<PathBuf>,
    thing: Option<String>,
    action: &str,
    name: Option<String>,
) -> anyhow::Result<edgehose::ingress::auth::policy::Decision> {
    use edgehose::ingress::auth::{self, policy};
    let config = edgehose::config::load(config)?;
    let edgehose::config::IngressMode::FrontDoor(door) = &config.ingress.mode else {
        anyhow::bail!("policies apply to ingress.mode = \"frontdoor\" only");
    };
    let action = match action {
        "connect" => policy::Action::Connect,
        "publish" => policy::Action::Publish,
        "retain-publish" => policy::Action::RetainPublish,
        "subscribe" => policy::Action::Subscribe,
        "receive" => policy::Action::Receive,
        other => {
            anyhow::bail!("{other:?} is not connect, publish, retain-publish, subscribe or receive")
        }
    };
    let (common_name, fingerprint) = match &cert {
        Some(path) => {
            let der = std::fs::read(path)
                .ok()
                .and_then(|pem| {
                    <rustls::pki_types::CertificateDer<'static> as rustls::pki_types::pem::PemObject>::from_pem_slice(&pem).ok()
                })
                .ok_or_else(|| anyhow::anyhow!("{}: not a PEM certificate", path.display()))?;
            (
                auth::x509::subject_common_name(&der),
                Some(auth::x509::fingerprint(&der)),
            )
        }
        None => (None, None),
    };
    // The thing a certificate is attached to (`tls.things`), else its common name.
    let attached = match (
        &fingerprint,
        door.tls.as_ref().and_then(|t| t.things.as_ref()),
    ) {
        (Some(fp), Some(path)) => edgehose::ingress::frontdoor::tls::read_things(path)?.remove(fp),
        _ => None,
    };
    let who = policy::Principal {
        client_id: client_id.clone(),
        thing_name: attached.or_else(|| common_name.clone()).or(thing),
        common_name,
    };
    let loaded = auth::Auth::load(door.auth.clone())?;
    let id = auth::Identity::for_test(&loaded, who, fingerprint);
    let name = name.unwrap_or(client_id);
    Ok(id.check(action, &name))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Certs {
            dir,
            hosts,
            devices,
            revoke,
            days,
        } => {
            let req = edgehose::certs::Request {
                dir,
                hosts,
                devices,
                revoke,
                days,
            };
            match edgehose::certs::run(&req) {
                Ok(lines) => {
                    for l in lines {
                        println!("{l}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edgehose certs: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Policy {
            command:
                PolicyCommand::Test {
                    config,
                    client_id,
                    cert,
                    thing,
                    action,
                    name,
                },
        } => match policy_test(&config, client_id, cert, thing, &action, name) {
            Ok(d) => {
                println!("{d}");
                if d.allowed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("edgehose policy test: {e:#}");
                ExitCode::from(2)
            }
        },
        Command::CheckConfig { config } => match edgehose::config::load(&config)
            .and_then(|c| edgehose::check_files(&c).map(|()| c))
        {
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
