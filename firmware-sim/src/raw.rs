//! The `raw` engine: one device as a plain TCP connection speaking MQTT 3.1.1 through rumqttc's
//! `mqttbytes` codec, without rumqttc's event loop. It keeps up to `--inflight` QoS 1 publishes
//! unacknowledged and writes them in batches, so a load test spends its CPU on the gateway, not
//! on the load generator. Same payloads, counters and latency measure as the default engine.
//! With `--tls-ca` (and `--tls-cert`/`--tls-key` for mutual TLS) it speaks MQTT over TLS
//! (rustls, ring), a full handshake per device.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fleet::{DeviceSpec, Source};
use crate::{Args, Counters};

const MAX_PACKET: usize = 1024 * 1024;

/// A connection: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The TLS client configuration: one for the whole fleet (its files read once), or one per
/// device with `--tls-cert-dir`.
fn connector(args: &Args, id: &str) -> anyhow::Result<tokio_rustls::TlsConnector> {
    static CONNECTOR: OnceLock<tokio_rustls::TlsConnector> = OnceLock::new();
    let shared = args.tls_cert_dir.is_none();
    if let Some(c) = CONNECTOR.get().filter(|_| shared) {
        return Ok(c.clone());
    }
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let ca = args.tls_ca.as_ref().expect("called with --tls-ca");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("cannot read {}", ca.display()))?
    {
        roots.add(c?)?;
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match args.client_cert(id) {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(&cert)
                .with_context(|| format!("cannot read {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(&key)
                .with_context(|| format!("cannot read {}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    if !shared {
        return Ok(connector);
    }
    Ok(CONNECTOR.get_or_init(|| connector).clone())
}

async fn connect(args: &Args, id: &str) -> anyhow::Result<Box<dyn Io>> {
    let tcp = TcpStream::connect((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("{id}: cannot connect"))?;
    tcp.set_nodelay(true)?;
    if args.tls_ca.is_none() {
        return Ok(Box::new(tcp));
    }
    let name = rustls::pki_types::ServerName::try_from(args.host.clone())
        .with_context(|| format!("{:?} is not a server name", args.host))?;
    let tls = connector(args, id)?
        .connect(name, tcp)
        .await
        .with_context(|| format!("{id}: TLS handshake failed"))?;
    Ok(Box::new(tls))
}

async fn read_packet(stream: &mut Box<dyn Io>, buf: &mut BytesMut) -> anyhow::Result<Packet> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => return Ok(p),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => bail!("bad packet from the broker: {e}"),
        }
        if stream.read_buf(buf).await? == 0 {
            bail!("the broker closed the connection");
        }
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
    let mut source = Source::new(&spec, &args)?;
    let mut stream = connect(&args, &id).await?;
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut inbuf = BytesMut::with_capacity(64 * 1024);
    let mut connect = Connect::new(&id);
    if let (Some(user), Some(pass)) = (&args.username, &args.password) {
        connect.set_login(user, pass);
    }
    connect.keep_alive = 60;
    Packet::Connect(connect).write(&mut out, MAX_PACKET)?;
    stream.write_all(&out).await?;
    out.clear();
    match read_packet(&mut stream, &mut inbuf).await? {
        Packet::ConnAck(ack) if ack.code == rumqttc::mqttbytes::v4::ConnectReturnCode::Success => {}
        other => bail!("{id}: connection refused: {other:?}"),
    }
    counters.connected.fetch_add(1, Ordering::Relaxed);
    counters
        .last_connack_ms
        .fetch_max(start.elapsed().as_millis() as u64, Ordering::Relaxed);

    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let total = spec.messages;
    let window = args.inflight.max(1) as usize;
    // Paced: message `seq` is due at `began + seq / rate`; whatever is due goes in one write.
    let rate = (spec.rate > 0.0).then_some(spec.rate);
    let began = tokio::time::Instant::now();
    let due_at = |seq: u64| match rate {
        Some(r) => began + Duration::from_secs_f64(seq as f64 / r),
        None => began,
    };
    let deadline = tokio::time::Instant::from_std(start + Duration::from_secs(args.timeout_secs));
    let mut sent_at: HashMap<u16, Instant> = HashMap::with_capacity(window);
    let mut latencies = Vec::with_capacity(total as usize);
    let (mut seq, mut acked, mut next_pkid) = (0u64, 0u64, 0u16);
    loop {
        let done = match qos {
            QoS::AtMostOnce => seq == total,
            _ => acked == total,
        };
        if done {
            break;
        }
        let can_send = seq < total && sent_at.len() < window;
        tokio::select! {
            biased;
            r = stream.read_buf(&mut inbuf), if !sent_at.is_empty() => {
                if r? == 0 {
                    bail!("{id}: the broker closed the connection");
                }
                loop {
                    match Packet::read(&mut inbuf, MAX_PACKET) {
                        Ok(Packet::PubAck(ack)) => {
                            if let Some(t) = sent_at.remove(&ack.pkid) {
                                latencies.push(t.elapsed());
                                acked += 1;
                                counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(_) => {}
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(e) => bail!("{id}: bad packet from the broker: {e}"),
                    }
                }
            }
            _ = tokio::time::sleep_until(due_at(seq)), if can_send => {
                // Everything due (unpaced: everything), as far as the window allows.
                let due = match rate {
                    Some(r) => ((began.elapsed().as_secs_f64() * r) as u64 + 1).min(total),
                    None => total,
                };
                let n = ((due - seq) as usize).min(window - sent_at.len());
                for _ in 0..n {
                    let mut p = Publish::new(&topic, qos, source.next(seq));
                    if qos == QoS::AtLeastOnce {
                        next_pkid = next_pkid.wrapping_add(1).max(1);
                        p.pkid = next_pkid;
                        sent_at.insert(next_pkid, Instant::now());
                    }
                    Packet::Publish(p).write(&mut out, MAX_PACKET)?;
                    seq += 1;
                }
                counters.published.fetch_add(n as u64, Ordering::Relaxed);
                stream.write_all(&out).await?;
                out.clear();
            }
            _ = tokio::time::sleep_until(deadline) => bail!("{id}: timed out"),
        }
    }
    Packet::Disconnect.write(&mut out, MAX_PACKET)?;
    let _ = stream.write_all(&out).await;
    Ok(latencies)
}
