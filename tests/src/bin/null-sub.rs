//! Benchmark baseline: one MQTT subscriber to `#` that does nothing with what it receives, for
//! the relay baseline through Debian's mosquitto. It is a lean reader (a plain socket and
//! rumqttc's MQTT 3.1.1 codec, no client state machine), so that the subscriber is not what
//! limits the relay: it reports its own CPU time, which the benchmark prints beside the rate.
//!
//!   null-sub PORT EXPECTED [IDLE_SECS=5] [QOS=0]
//!
//! QOS is the subscription's: 0 (the default, the relay's cheapest outbound path: mosquitto
//! still acknowledges every QoS 1 publish on receipt) or 1 (PUBACKs sent back in batches).
//! Prints "ready" on stderr once subscribed; exits once EXPECTED messages arrived (or after
//! IDLE_SECS without one) and prints {"received", "first_ms", "last_ms", "cpu_s"} (epoch ms)
//! on stdout.

use std::time::Duration;

use anyhow::bail;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Subscribe};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_PACKET: usize = 1024 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || anyhow::anyhow!("usage: null-sub PORT EXPECTED [IDLE_SECS] [QOS]");
    let port: u16 = args.get(1).ok_or_else(usage)?.parse()?;
    let expected: u64 = args.get(2).ok_or_else(usage)?.parse()?;
    let idle = Duration::from_secs(args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(5));
    let qos = match args.get(4).map(String::as_str) {
        None | Some("0") => QoS::AtMostOnce,
        Some("1") => QoS::AtLeastOnce,
        Some(other) => bail!("QOS must be 0 or 1, not {other}"),
    };
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut inbuf = BytesMut::with_capacity(256 * 1024);
    let mut connect = Connect::new("null-sub");
    connect.keep_alive = 600;
    Packet::Connect(connect).write(&mut out, MAX_PACKET)?;
    let mut subscribe = Subscribe::new("#", qos);
    subscribe.pkid = 1;
    Packet::Subscribe(subscribe).write(&mut out, MAX_PACKET)?;
    stream.write_all(&out).await?;
    out.clear();
    let (mut received, mut first, mut last) = (0u64, 0u128, 0u128);
    while received < expected {
        match tokio::time::timeout(idle, stream.read_buf(&mut inbuf)).await {
            Ok(Ok(0)) => bail!("the broker closed the connection"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("connection: {e}"),
            Err(_) => break,
        }
        let before = received;
        loop {
            match Packet::read(&mut inbuf, MAX_PACKET) {
                Ok(Packet::Publish(p)) => {
                    received += 1;
                    if p.qos == QoS::AtLeastOnce {
                        Packet::PubAck(PubAck::new(p.pkid)).write(&mut out, MAX_PACKET)?;
                    }
                }
                Ok(Packet::SubAck(_)) => eprintln!("ready"),
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => bail!("bad packet from the broker: {e}"),
            }
        }
        if received > before {
            last = edgehose_tests::epoch_ms();
            if first == 0 {
                first = last;
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
    }
    let cpu = cpu_seconds();
    let summary = edgehose_tests::relay_summary(received, first, last);
    println!("{},\"cpu_s\":{cpu:.3}}}", summary.trim_end_matches('}'));
    Ok(())
}

/// User + system CPU time of this process so far, from /proc/self/stat (in clock ticks of
/// 1/100 s, the Linux default).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}
