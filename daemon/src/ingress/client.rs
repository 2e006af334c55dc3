//! Client mode: edgehose subscribes to topic filters on an external broker with a persistent
//! session (`clean_session = false`) and manual acks. A QoS 1 message is acknowledged only after
//! the buffer committed it (or refused it, counted), so whatever was not committed when the
//! gateway died is redelivered by the broker.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{ClientConfig, Limits};
use crate::message::{Ack, Envelope};
use crate::shutdown::Shutdown;

/// Capacity of rumqttc's request channel (acks and subscriptions to send).
const REQUEST_CHANNEL_CAPACITY: usize = 1024;
/// How long shutdown waits for the last acks to reach the broker.
const ACK_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(
    cfg: ClientConfig,
    limits: Limits,
    router: Arc<crate::routing::Router>,
    ingest: mpsc::Sender<Envelope>,
    mut shutdown: Shutdown,
) {
    let mut opts = MqttOptions::new(&cfg.client_id, &cfg.host, cfg.port);
    opts.set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(cfg.keep_alive)
        .set_inflight(cfg.max_inflight)
        // Read messages larger than our limit, so they are refused and counted (and acked)
        // instead of breaking the connection over and over on redelivery.
        .set_max_packet_size(
            (limits.max_payload * 4 + 64 * 1024).min(256 * 1024 * 1024),
            1024 * 1024,
        );
    if let Some((user, pass)) = &cfg.credentials {
        opts.set_credentials(user, pass);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CHANNEL_CAPACITY);

    // Completed acks travel from the buffer writer to this task, which hands them to rumqttc
    // in commit order (= arrival order).
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<Publish>();
    let acker = {
        let client = client.clone();
        tokio::spawn(async move {
            while let Some(p) = ack_rx.recv().await {
                if client.ack(&p).await.is_err() {
                    break;
                }
            }
            let _ = client.disconnect().await;
        })
    };

    let filters: Vec<_> = cfg.topics.iter().map(|f| f.as_str().to_string()).collect();
    let mut ingest = Some(ingest);
    let mut ack_tx = Some(ack_tx);
    let mut failures = 0u32;
    let mut flush_deadline = None;
    info!(host = %cfg.host, port = cfg.port, client_id = %cfg.client_id, "connecting to the external broker");
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            _ = shutdown.wait(), if ingest.is_some() => {
                // Stop taking messages; keep polling so the last acks go out.
                ingest = None;
                ack_tx = None;
                flush_deadline = Some(tokio::time::Instant::now() + ACK_FLUSH_TIMEOUT);
                continue;
            }
            _ = sleep_until(flush_deadline) => {
                warn!("not every ack reached the broker before shutdown; it will redeliver those messages");
                break;
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                info!(
                    session_present = ack.session_present,
                    "connected to the external broker"
                );
                let subs = filters
                    .iter()
                    .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                if let Err(e) = client.try_subscribe_many(subs) {
                    warn!(error = %e, "cannot subscribe");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let (Some(ingest), Some(ack_tx)) = (&ingest, &ack_tx) else {
                    // Shutting down: not acked, so the broker redelivers it.
                    continue;
                };
                let ack = match p.qos {
                    QoS::AtMostOnce => Ack::none(),
                    _ => {
                        let tx = ack_tx.clone();
                        let publish = p.clone();
                        Ack::new(move |_| {
                            let _ = tx.send(publish);
                        })
                    }
                };
                // MQTT does not tell a subscriber who published, so there is no client id here.
                let env = super::admit(&router, p.topic.as_bytes(), &p.payload, None, ack);
                // Waiting here stops reading the socket: backpressure towards the broker.
                if ingest.send(env).await.is_err() {
                    warn!("buffer closed; client ingress stops");
                    break;
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                if flush_deadline.is_some() {
                    break;
                }
                failures += 1;
                let wait = Duration::from_millis(250 * 2u64.pow(failures.min(7)))
                    .min(Duration::from_secs(30));
                warn!(error = %e, retry_in = ?wait, "external broker connection failed");
                tokio::time::sleep(wait).await;
            }
        }
    }
    drop(ack_tx);
    acker.abort();
    info!("client ingress stopped");
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
