//! firmware-sim: a simulated device fleet. Each device is its own MQTT connection and client id,
//! runs firmware that reads its sensors through embedded-hal drivers (SHT3x, BMP280) on a
//! simulated I2C bus with a physical model and injectable faults, and publishes JSON telemetry
//! (device id, per-device sequence number, timestamp, readings, fault flags) on
//! `sensors/<device-id>/telemetry`. Fleets come from profiles (`config/sim/*.toml`). Prints a
//! live progress line and a summary, or the summary as JSON with `--json`.

mod fleet;
mod profile;
mod raw;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use fleet::DeviceSpec;
use profile::Profile;
use serde::Serialize;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "firmware-sim",
    version,
    about = "Simulated device fleet publishing JSON telemetry over MQTT"
)]
struct Args {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Number of devices, each with its own connection and client id.
    #[arg(long, short = 'n', default_value_t = 10)]
    devices: usize,
    /// Messages each device publishes before it disconnects (see also --duration-secs).
    #[arg(long, short = 'm', default_value_t = 100)]
    messages: u64,
    /// MQTT QoS: 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Messages per second per device, overriding the profile; 0 publishes as fast as the
    /// broker acknowledges.
    #[arg(long)]
    rate: Option<f64>,
    /// Messages per second for the whole fleet, shared equally (instead of --rate).
    #[arg(long, conflicts_with = "rate")]
    total_rate: Option<f64>,
    /// Run for this many seconds instead of a message count: each device publishes
    /// rate x seconds messages.
    #[arg(long)]
    duration_secs: Option<f64>,
    /// Fleet profile: a name from config/sim (greenhouse, cold-chain, factory-line) or a path to
    /// a TOML file. Without one, every device is a room-climate node at 1 msg/s.
    #[arg(long)]
    profile: Option<String>,
    /// Seed for the sensors' noise and faults (the same seed gives the same readings).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Spread device start-up over at most this many seconds (0: all at once, a connection storm).
    #[arg(long, default_value_t = 1.0)]
    spread: f64,
    /// Share of messages sent as malformed JSON (for the gateway's refusal path).
    #[arg(long, default_value_t = 0.0)]
    malformed_share: f64,
    /// Share of messages sent over IoT Core's 128 KB payload limit.
    #[arg(long, default_value_t = 0.0)]
    oversized_share: f64,
    /// Every this many seconds each device sends a burst of --burst-size messages at once (out
    /// of its message budget), as devices flushing a backlog do (0: no bursts).
    #[arg(long, default_value_t = 0.0)]
    burst_every_secs: f64,
    /// Messages in each burst (see --burst-every-secs).
    #[arg(long, default_value_t = 50)]
    burst_size: u64,
    /// Give every group of this many devices the same client id (0: unique ids), so the
    /// gateway's newest-connection-wins rule is exercised.
    #[arg(long, default_value_t = 0)]
    duplicate_ids: usize,
    /// MQTT username (with --password).
    #[arg(long, requires = "password")]
    username: Option<String>,
    /// MQTT password (with --username).
    #[arg(long, requires = "username")]
    password: Option<String>,
    /// Connect over TLS, trusting this CA certificate (PEM).
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for TLS client authentication, with --tls-key.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<std::path::PathBuf>,
    /// One certificate per device: DIR/<client id>.crt and DIR/<client id>.key (what
    /// `edgehose certs --device ID` writes under devices/).
    #[arg(long, requires = "tls_ca", conflicts_with_all = ["tls_cert", "tls_key"])]
    tls_cert_dir: Option<std::path::PathBuf>,
    /// Give up on a device after this many failed reconnects in a row (0: keep trying until
    /// --timeout-secs).
    #[arg(long, default_value_t = 0)]
    max_reconnects: u32,
    /// Pad each JSON payload to at least this many bytes.
    #[arg(long, default_value_t = 200)]
    payload_size: usize,
    /// Client ids and topic levels are `<prefix>-<n>`.
    #[arg(long, default_value = "dev")]
    device_prefix: String,
    /// First device number.
    #[arg(long, default_value_t = 0)]
    first_device: usize,
    /// Unacknowledged QoS 1 messages allowed per device.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// Give up if the run takes longer than this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Read real sensors on this I2C bus (e.g. /dev/i2c-1 on a Raspberry Pi) instead of the
    /// simulated one; needs --devices 1 (built with `--features hardware`).
    #[cfg(feature = "hardware")]
    #[arg(long)]
    i2c_bus: Option<std::path::PathBuf>,
    /// MQTT client per device: `rumqttc` (a full client, as devices use) or `raw` (a lean
    /// MQTT 3.1.1 writer for load tests, so the load generator takes less of the CPU).
    #[arg(long, value_enum, default_value_t = Engine::Rumqttc)]
    engine: Engine,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Engine {
    Rumqttc,
    Raw,
}

#[derive(Debug, Default, Serialize)]
struct Summary {
    devices: usize,
    published: u64,
    acknowledged: u64,
    failed_devices: u64,
    reconnects: u64,
    elapsed_s: f64,
    /// Raw engine: from start to the last device's CONNACK (a connection storm's length).
    connect_s: f64,
    connected: u64,
    rate_msg_s: f64,
    puback_latency_ms_p50: f64,
    puback_latency_ms_p99: f64,
    puback_latency_ms_max: f64,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    acknowledged: AtomicU64,
    failed: AtomicU64,
    reconnects: AtomicU64,
    /// Devices whose first CONNACK arrived (raw engine), and when the last one did (ms since
    /// start).
    connected: AtomicU64,
    last_connack_ms: AtomicU64,
}

impl Args {
    /// The client certificate and key for device `id`, if any.
    fn client_cert(&self, id: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
        match (&self.tls_cert, &self.tls_key, &self.tls_cert_dir) {
            (Some(c), Some(k), _) => Some((c.clone(), k.clone())),
            (_, _, Some(dir)) => {
                Some((dir.join(format!("{id}.crt")), dir.join(format!("{id}.key"))))
            }
            _ => None,
        }
    }
}

/// One spec per device: its group in the profile, with the command line's overrides.
fn plan(args: &Args, profile: &Profile) -> anyhow::Result<Vec<DeviceSpec>> {
    if args.duration_secs.is_some() && args.rate == Some(0.0) {
        bail!("--duration-secs needs a rate above 0");
    }
    Ok((0..args.devices)
        .map(|i| {
            let n = args.first_device + i;
            let group = profile.group_of(i, args.devices);
            let rate = args
                .total_rate
                .map(|t| t / args.devices as f64)
                .or(args.rate)
                .unwrap_or(group.rate);
            let messages = match args.duration_secs {
                Some(secs) => (rate * secs).round().max(1.0) as u64,
                None => args.messages,
            };
            let id_n = if args.duplicate_ids > 1 {
                n / args.duplicate_ids
            } else {
                n
            };
            DeviceSpec {
                n,
                id: format!("{}-{}", args.device_prefix, id_n),
                rate,
                messages,
                sensors: group.sensors.clone(),
                environment: group.environment,
                faults: group.faults,
            }
        })
        .collect())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    #[cfg(feature = "hardware")]
    if args.i2c_bus.is_some() && args.devices != 1 {
        bail!("--i2c-bus reads one real device: use --devices 1");
    }
    if args.tls_ca.is_some() {
        // rustls with the ring provider: small, and builds without a C toolchain beyond cc.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    // Thousands of devices need thousands of sockets.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let profile = match &args.profile {
        Some(name) => Profile::load(name)?,
        None => Profile::default_fleet(),
    };
    let specs = plan(&args, &profile)?;
    if !args.json {
        eprintln!(
            "{} devices ({}) -> {}:{}",
            specs.len(),
            profile.description,
            args.host,
            args.port
        );
    }
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let progress = {
        let counters = Arc::clone(&counters);
        let quiet = args.json;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0;
            loop {
                tick.tick().await;
                let published = counters.published.load(Ordering::Relaxed);
                if !quiet {
                    eprintln!(
                        "[{:>5.1}s] published {published} ({}/s) acknowledged {} reconnects {} failed devices {}",
                        start.elapsed().as_secs_f64(),
                        published - last,
                        counters.acknowledged.load(Ordering::Relaxed),
                        counters.reconnects.load(Ordering::Relaxed),
                        counters.failed.load(Ordering::Relaxed),
                    );
                }
                last = published;
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for spec in specs {
        let (args, counters) = (Arc::clone(&args), Arc::clone(&counters));
        match args.engine {
            Engine::Rumqttc => tasks.spawn(fleet::device(args, spec, counters, start)),
            Engine::Raw => tasks.spawn(raw::device(args, spec, counters, start)),
        };
    }
    let mut latencies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(l)) => latencies.extend(l),
            Ok(Err(e)) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("device failed: {e:#}");
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("device task failed: {e}");
            }
        }
    }
    progress.abort();
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    let published = counters.published.load(Ordering::Relaxed);
    let summary = Summary {
        devices: args.devices,
        published,
        acknowledged: counters.acknowledged.load(Ordering::Relaxed),
        failed_devices: counters.failed.load(Ordering::Relaxed),
        reconnects: counters.reconnects.load(Ordering::Relaxed),
        elapsed_s: elapsed,
        connect_s: counters.last_connack_ms.load(Ordering::Relaxed) as f64 / 1000.0,
        connected: counters.connected.load(Ordering::Relaxed),
        rate_msg_s: published as f64 / elapsed.max(1e-9),
        puback_latency_ms_p50: percentile(&latencies, 0.50),
        puback_latency_ms_p99: percentile(&latencies, 0.99),
        puback_latency_ms_max: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "devices {}  published {}  acknowledged {}  failed devices {}  {:.1}s  {:.0} msg/s  PUBACK latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms",
            summary.devices,
            summary.published,
            summary.acknowledged,
            summary.failed_devices,
            summary.elapsed_s,
            summary.rate_msg_s,
            summary.puback_latency_ms_p50,
            summary.puback_latency_ms_p99,
            summary.puback_latency_ms_max
        );
    }
    if summary.failed_devices > 0 {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::parse_from(["firmware-sim"].iter().chain(extra))
    }

    #[test]
    fn the_plan_follows_the_profile_and_the_overrides() {
        let profile = Profile::load("greenhouse").unwrap();
        let specs = plan(&args(&["-n", "10", "--duration-secs", "30"]), &profile).unwrap();
        assert_eq!(specs.len(), 10);
        let climate = specs.iter().filter(|s| s.sensors.len() == 2).count();
        assert_eq!(climate, 8);
        // greenhouse climate nodes publish 0.2 msg/s: 6 messages in 30 s.
        assert_eq!(specs[0].messages, 6);
        assert_eq!(specs[0].id, "dev-0");

        let specs = plan(&args(&["-n", "4", "--total-rate", "100"]), &profile).unwrap();
        assert!(specs.iter().all(|s| s.rate == 25.0));

        let specs = plan(&args(&["-n", "4", "--duplicate-ids", "2"]), &profile).unwrap();
        let ids: Vec<_> = specs.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["dev-0", "dev-0", "dev-1", "dev-1"]);
    }

    #[test]
    fn every_option_is_explained() {
        use clap::CommandFactory;
        for arg in Args::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id != "help" && id != "version" {
                assert!(arg.get_help().is_some(), "--{id} has no help text");
            }
        }
    }
}
