//! Benchmark baseline: a standalone rumqttd 0.20 with an in-process subscriber to `#` that does
//! nothing with what it receives. Devices get their PUBACK from rumqttd as soon as it has the
//! message in memory (nothing durable): the ceiling of an MQTT relay on this machine.
//!
//!   rumqttd-relay PORT EXPECTED [IDLE_SECS=5]
//!
//! Once EXPECTED messages reached the subscriber (or after IDLE_SECS without one) it prints
//! {"received", "first_ms", "last_ms"} (epoch ms) on stdout and keeps serving until killed.
//! "ready" on stderr means the listener is up.

use std::collections::HashMap;
use std::time::Duration;

use rumqttd::{Broker, ConnectionSettings, Notification, RouterConfig, ServerSettings};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || anyhow::anyhow!("usage: rumqttd-relay PORT EXPECTED [IDLE_SECS]");
    let port: u16 = args.get(1).ok_or_else(usage)?.parse()?;
    let expected: u64 = args.get(2).ok_or_else(usage)?.parse()?;
    let idle = Duration::from_secs(args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(5));
    let mut v4 = HashMap::new();
    v4.insert(
        "v4".to_string(),
        ServerSettings {
            name: "v4".into(),
            listen: ([127, 0, 0, 1], port).into(),
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: 10_000,
                max_payload_size: 1024 * 1024,
                max_inflight_count: 1000,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        },
    );
    let config = rumqttd::Config {
        id: 0,
        router: RouterConfig {
            max_connections: 20_000,
            max_outgoing_packet_count: 4096,
            max_segment_size: 32 * 1024 * 1024,
            max_segment_count: 8,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let mut broker = Broker::new(config);
    let (mut tx, mut rx) = broker.link("null-subscriber")?;
    tx.subscribe("#")?;
    std::thread::spawn(move || {
        if let Err(e) = broker.start() {
            eprintln!("rumqttd stopped: {e}");
        }
    });
    eprintln!("ready");
    let (mut received, mut first, mut last) = (0u64, 0u128, 0u128);
    while received < expected {
        match tokio::time::timeout(idle, rx.next()).await {
            Ok(Ok(Some(Notification::Forward(_)))) => {
                received += 1;
                last = edgehose_tests::epoch_ms();
                if first == 0 {
                    first = last;
                }
            }
            Ok(Ok(Some(Notification::Unschedule))) => {
                rx.wake().await?;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("local link: {e}"),
            Err(_) => break,
        }
    }
    println!("{}", edgehose_tests::relay_summary(received, first, last));
    // Keep serving: the last publishers still wait for their PUBACKs and disconnect cleanly.
    // The caller kills the relay once its load generator has finished.
    use std::io::Write;
    std::io::stdout().flush()?;
    drop(tx);
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
