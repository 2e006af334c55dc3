//! One simulated device on the network: its firmware (sensors read through the drivers on a
//! simulated bus), the payload faults injected for the gateway's sake, and the default MQTT
//! engine (a rumqttc client per device, reconnecting with backoff and jitter; what it has not
//! sent waits in its queue meanwhile and sequence numbers carry on).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

use crate::{Args, Counters};
use firmware_sim::firmware::{Firmware, NoDelay, SensorKind};
use firmware_sim::simbus::{Environment, Faults, SimBus};

/// Everything that makes one device.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub n: usize,
    pub id: String,
    /// Messages per second; 0: as fast as the gateway acknowledges.
    pub rate: f64,
    /// Messages to publish before disconnecting.
    pub messages: u64,
    pub sensors: Vec<SensorKind>,
    pub environment: Environment,
    pub faults: Faults,
}

impl DeviceSpec {
    pub fn topic(&self) -> String {
        format!("sensors/{}/telemetry", self.id)
    }
}

/// IoT Core's payload limit; oversized payloads are made just over it.
const OVERSIZED: usize = 128 * 1024 + 1024;

/// Firmware that can be asked for the next telemetry payload.
pub trait Sampler: Send {
    fn next_sample(&mut self, seq: u64, ts_ms: u64) -> Vec<u8>;
}

impl Sampler for Firmware<SimBus, NoDelay> {
    fn next_sample(&mut self, seq: u64, ts_ms: u64) -> Vec<u8> {
        self.bus_mut().set_time(ts_ms as f64 / 1000.0);
        self.sample(seq, ts_ms)
    }
}

#[cfg(feature = "hardware")]
impl Sampler for Firmware<linux_embedded_hal::I2cdev, linux_embedded_hal::Delay> {
    fn next_sample(&mut self, seq: u64, ts_ms: u64) -> Vec<u8> {
        self.sample(seq, ts_ms)
    }
}

/// Produces a device's payloads: a sensor sample, sometimes broken on purpose.
pub struct Source {
    firmware: Box<dyn Sampler>,
    malformed: f64,
    oversized: f64,
    rng: SmallRng,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Source {
    /// The device's firmware on a simulated bus, or (with the `hardware` feature and
    /// `--i2c-bus`) on a real one.
    pub fn new(spec: &DeviceSpec, args: &Args) -> anyhow::Result<Self> {
        let seed = args.seed ^ (spec.n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let (id, sensors) = (spec.id.clone(), spec.sensors.clone());
        #[cfg(feature = "hardware")]
        if let Some(path) = &args.i2c_bus {
            let bus = linux_embedded_hal::I2cdev::new(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let firmware = Firmware::new(
                id,
                bus,
                linux_embedded_hal::Delay,
                sensors,
                args.payload_size,
            );
            return Ok(Self::with(Box::new(firmware), args, seed));
        }
        let bus = SimBus::new(spec.environment, spec.faults, seed);
        let firmware = Firmware::new(id, bus, NoDelay, sensors, args.payload_size);
        Ok(Self::with(Box::new(firmware), args, seed))
    }

    fn with(firmware: Box<dyn Sampler>, args: &Args, seed: u64) -> Self {
        Self {
            firmware,
            malformed: args.malformed_share,
            oversized: args.oversized_share,
            rng: SmallRng::seed_from_u64(seed.rotate_left(17)),
        }
    }

    pub fn next(&mut self, seq: u64) -> Vec<u8> {
        let mut body = self.firmware.next_sample(seq, now_ms());
        let roll: f64 = self.rng.random();
        if roll < self.malformed {
            // Cut mid-document: not JSON any more.
            body.truncate(body.len() / 2);
        } else if roll < self.malformed + self.oversized {
            body.resize(OVERSIZED, b' ');
        }
        body
    }
}

pub async fn device(
    args: Arc<Args>,
    spec: DeviceSpec,
    counters: Arc<Counters>,
    start: Instant,
) -> anyhow::Result<Vec<Duration>> {
    let id = spec.id.clone();
    let topic = spec.topic();
    let mut opts = MqttOptions::new(&id, &args.host, args.port);
    opts.set_keep_alive(Duration::from_secs(30))
        .set_inflight(args.inflight)
        .set_max_packet_size(1024 * 1024, 1024 * 1024);
    if let (Some(user), Some(pass)) = (&args.username, &args.password) {
        opts.set_credentials(user, pass);
    }
    if let Some(ca) = &args.tls_ca {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        };
        let client_auth = match args.client_cert(&id) {
            Some((cert, key)) => Some((read(&cert)?, read(&key)?)),
            None => None,
        };
        opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Simple {
            ca: read(ca)?,
            alpn: None,
            client_auth,
        }));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let total = spec.messages;
    let interval = (spec.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / spec.rate));

    // Publisher: samples the sensors at the device's rate and queues each message.
    let publisher = {
        let client = client.clone();
        let mut source = Source::new(&spec, &args)?;
        let spread = args.spread;
        let (burst_every, burst_size) = (args.burst_every_secs, args.burst_size);
        let n = spec.n;
        tokio::spawn(async move {
            // Spread start-up so the gateway sees no thundering herd (unless --spread 0).
            if let Some(i) = interval {
                let offset = i
                    .min(Duration::from_secs_f64(spread))
                    .mul_f64((n % 1000) as f64 / 1000.0);
                tokio::time::sleep(offset).await;
            }
            let mut tick = interval.map(tokio::time::interval);
            let burst_every = (burst_every > 0.0).then(|| Duration::from_secs_f64(burst_every));
            let mut next_burst = burst_every.map(|b| tokio::time::Instant::now() + b);
            let mut burst_left = 0u64;
            for seq in 0..total {
                if burst_left > 0 {
                    burst_left -= 1;
                } else if let Some(t) = tick.as_mut() {
                    t.tick().await;
                    if let (Some(at), Some(every)) = (next_burst, burst_every) {
                        if tokio::time::Instant::now() >= at {
                            burst_left = burst_size;
                            next_burst = Some(at + every);
                        }
                    }
                }
                if client
                    .publish(&topic, qos, false, source.next(seq))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };

    let mut sent_at: HashMap<u16, Instant> = HashMap::new();
    let mut latencies = Vec::new();
    let mut outgoing = 0u64;
    let mut acked = 0u64;
    let mut failures = 0u32;
    let deadline = start + Duration::from_secs(args.timeout_secs);
    let mut rng = SmallRng::seed_from_u64(spec.n as u64);
    // What was sent but not acknowledged, or queued, when the connection dropped. rumqttc 0.25
    // discards it when the server answers CONNACK without a session (always, with a clean
    // session) and loses a publish parked on a packet-id collision
    // (bytebeamio/rumqtt#1056), so the device keeps it here and hands it back after CONNACK,
    // as a firmware that resends what was not acknowledged does.
    let mut unacknowledged: Vec<rumqttc::Request> = Vec::new();
    loop {
        let done = outgoing >= total && (qos == QoS::AtMostOnce || acked >= total);
        if done {
            break;
        }
        let event = tokio::time::timeout_at(deadline.into(), eventloop.poll())
            .await
            .with_context(|| format!("{id}: timed out"))?;
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                eventloop.pending.extend(unacknowledged.drain(..));
                if failures > 0 {
                    counters.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                failures = 0;
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                outgoing += 1;
                counters.published.fetch_add(1, Ordering::Relaxed);
                if qos == QoS::AtLeastOnce {
                    sent_at.insert(pkid, Instant::now());
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(t) = sent_at.remove(&ack.pkid) {
                    acked += 1;
                    counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                    latencies.push(t.elapsed());
                }
            }
            Ok(_) => {}
            Err(e) => {
                // Offline: rumqttc keeps what it has not sent and resends what was not
                // acknowledged once it reconnects. Back off, with jitter, and try again.
                unacknowledged.extend(
                    eventloop
                        .state
                        .collision
                        .take()
                        .map(rumqttc::Request::Publish),
                );
                unacknowledged.extend(eventloop.pending.drain(..));
                failures += 1;
                if args.max_reconnects > 0 && failures > args.max_reconnects {
                    return Err(e).with_context(|| format!("{id}: gave up reconnecting"));
                }
                let base = Duration::from_millis(100 * 2u64.pow(failures.min(7)));
                let wait = base
                    .mul_f64(rng.random_range(0.5..1.5))
                    .min(Duration::from_secs(10));
                tokio::time::sleep(wait).await;
            }
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
