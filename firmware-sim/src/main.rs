//! firmware-sim: a simulated device fleet. Each device is its own MQTT connection and client id,
//! publishing JSON telemetry (device id, per-device sequence number, timestamp, readings) on
//! `sensors/<device-id>/telemetry`. Prints a summary, or JSON with `--json`.
//!
//! This is the simple publisher the gateway core needs; sensor drivers against embedded-hal,
//! profiles and fault injection come with the full simulator.

mod raw;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
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
    /// Messages each device publishes before it disconnects.
    #[arg(long, short = 'm', default_value_t = 100)]
    messages: u64,
    /// MQTT QoS: 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Messages per second per device; 0 publishes as fast as the broker accepts.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
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
    elapsed_s: f64,
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
}

/// One telemetry reading, as the device firmware would send it.
fn payload(device: &str, seq: u64, pad_to: usize) -> Vec<u8> {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // A smooth daily-ish curve, so the data looks like a sensor rather than a counter.
    let phase = (seq as f64 / 600.0).sin();
    let mut body = format!(
        r#"{{"device":"{device}","seq":{seq},"ts":{ts},"temperature_c":{:.2},"humidity_pct":{:.2}"#,
        21.0 + 4.0 * phase,
        45.0 - 10.0 * phase
    );
    let close = r#","pad":""}"#;
    if body.len() + close.len() < pad_to {
        body.push_str(r#","pad":""#);
        body.extend(std::iter::repeat_n('x', pad_to - body.len() - 2));
        body.push_str(r#""}"#);
    } else {
        body.push('}');
    }
    body.into_bytes()
}

async fn device(
    args: Arc<Args>,
    n: usize,
    counters: Arc<Counters>,
    start: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let id = format!("{}-{}", args.device_prefix, n);
    let topic = format!("sensors/{id}/telemetry");
    let mut opts = MqttOptions::new(&id, &args.host, args.port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(args.inflight)
        .set_max_packet_size(1024 * 1024, 1024 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let total = args.messages;
    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));

    // Publisher: paces the messages and hands them to the event loop.
    let publisher = {
        let client = client.clone();
        let args = Arc::clone(&args);
        let id = id.clone();
        tokio::spawn(async move {
            // Spread start-up over the first interval so the broker sees no thundering herd.
            if let Some(i) = interval {
                let offset = i.mul_f64((n % 1000) as f64 / 1000.0);
                tokio::time::sleep(offset).await;
            }
            let mut tick = interval.map(tokio::time::interval);
            for seq in 0..total {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let body = payload(&id, seq, args.payload_size);
                if client.publish(&topic, qos, false, body).await.is_err() {
                    return;
                }
            }
        })
    };

    let mut sent_at: std::collections::HashMap<u16, Instant> = Default::default();
    let mut latencies = Vec::new();
    let mut outgoing = 0u64;
    let mut acked = 0u64;
    let deadline = start + Duration::from_secs(args.timeout_secs);
    loop {
        let done = outgoing == total && (qos == QoS::AtMostOnce || acked == total);
        if done {
            break;
        }
        let event = tokio::time::timeout_at(deadline.into(), eventloop.poll())
            .await
            .context("timed out")?
            .with_context(|| format!("{id}: connection failed"))?;
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                outgoing += 1;
                counters.published.fetch_add(1, Ordering::Relaxed);
                if qos == QoS::AtLeastOnce {
                    sent_at.insert(pkid, Instant::now());
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                acked += 1;
                counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                if let Some(t) = sent_at.remove(&ack.pkid) {
                    latencies.push(t.elapsed());
                }
            }
            _ => {}
        }
    }
    publisher.abort();
    client.disconnect().await.ok();
    // Let the DISCONNECT go out.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(e) = eventloop.poll().await {
            if matches!(e, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    Ok(latencies)
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
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let progress = {
        let counters = Arc::clone(&counters);
        let quiet = args.json;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                if !quiet {
                    eprintln!(
                        "[{:>5.1}s] published {} acknowledged {}",
                        start.elapsed().as_secs_f64(),
                        counters.published.load(Ordering::Relaxed),
                        counters.acknowledged.load(Ordering::Relaxed)
                    );
                }
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.devices {
        let (args, n, counters) = (
            Arc::clone(&args),
            args.first_device + i,
            Arc::clone(&counters),
        );
        match args.engine {
            Engine::Rumqttc => tasks.spawn(device(args, n, counters, start)),
            Engine::Raw => tasks.spawn(raw::device(args, n, counters, start)),
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
        elapsed_s: elapsed,
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

    #[test]
    fn payload_is_json_with_device_and_seq_and_padded() {
        let p = payload("dev-3", 42, 200);
        assert!(p.len() >= 200, "{}", p.len());
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["device"], "dev-3");
        assert_eq!(v["seq"], 42);
        let small = payload("d", 1, 10);
        serde_json::from_slice::<serde_json::Value>(&small).unwrap();
    }
}
