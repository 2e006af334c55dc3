//! Benchmark baseline: one MQTT subscriber (rumqttc) to `#` at QoS 1 that does nothing with
//! what it receives, for the relay baseline through Debian's mosquitto.
//!
//!   null-sub PORT EXPECTED [IDLE_SECS=5]
//!
//! Prints "ready" on stderr once subscribed; exits once EXPECTED messages arrived (or after
//! IDLE_SECS without one) and prints {"received", "first_ms", "last_ms"} (epoch ms) on stdout.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || anyhow::anyhow!("usage: null-sub PORT EXPECTED [IDLE_SECS]");
    let port: u16 = args.get(1).ok_or_else(usage)?.parse()?;
    let expected: u64 = args.get(2).ok_or_else(usage)?.parse()?;
    let idle = Duration::from_secs(args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(5));
    let mut opts = MqttOptions::new("null-sub", "127.0.0.1", port);
    opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    client.subscribe("#", QoS::AtLeastOnce).await?;
    let (mut received, mut first, mut last) = (0u64, 0u128, 0u128);
    while received < expected {
        match tokio::time::timeout(idle, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => eprintln!("ready"),
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                received += 1;
                last = edgehose_tests::epoch_ms();
                if first == 0 {
                    first = last;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("connection: {e}"),
            Err(_) => break,
        }
    }
    println!("{}", edgehose_tests::relay_summary(received, first, last));
    Ok(())
}
