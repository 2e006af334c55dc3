//! The embedded broker: rumqttd (MQTT 3.1.1, and 5 on a second listener), read in-process
//! through a local link subscribed to `#`.
//!
//! rumqttd sends PUBACK before this link sees the message, and drops its oldest log segment
//! when the link falls behind. So here a PUBACK means "rumqttd has it in memory", not "durable":
//! the link is drained in batches, `Unschedule` is answered at once, the log is sized by
//! `ingress.broker.log_segment_*`, and every message rumqttd dropped before we read it is counted
//! (`edgehose_broker_dropped_total`, from gaps in the log offsets) and logged at ERROR.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::{BrokerConfig, Limits};
use crate::message::{Ack, Envelope};
use crate::metrics as m;
use crate::routing::Router;
use crate::shutdown::Shutdown;

/// How long ingress keeps draining rumqttd after shutdown begins, for messages it already acked.
const DRAIN_GRACE: Duration = Duration::from_millis(300);

pub struct EmbeddedBroker {
    // Kept so the link stays registered with the router.
    _tx: LinkTx,
    rx: LinkRx,
}

fn server(name: &str, listen: SocketAddr, limits: &Limits) -> ServerSettings {
    ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            // Larger than our own limit, so oversized messages reach `admit` and are counted
            // rather than cutting the device's connection.
            max_payload_size: (limits.max_payload * 4 + 64 * 1024).min(256 * 1024 * 1024),
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// Starts rumqttd on its own threads and returns the link edgehose reads from.
pub fn start(cfg: &BrokerConfig, limits: &Limits) -> anyhow::Result<EmbeddedBroker> {
    // rumqttd reports a failed bind only in its log, from its own thread: check first.
    for addr in std::iter::once(cfg.listen).chain(cfg.listen_v5) {
        TcpListener::bind(addr).with_context(|| format!("cannot listen for MQTT on {addr}"))?;
    }
    let mut v4 = HashMap::new();
    v4.insert("v4".to_string(), server("mqtt-v4", cfg.listen, limits));
    let v5 = cfg.listen_v5.map(|addr| {
        let mut v5 = HashMap::new();
        v5.insert("v5".to_string(), server("mqtt-v5", addr, limits));
        v5
    });
    let config = rumqttd::Config {
        id: 0,
        router: RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: 4096,
            max_segment_size: cfg.log_segment_size,
            max_segment_count: cfg.log_segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        v5,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let mut broker = Broker::new(config);
    let (mut tx, rx) = broker
        .link("edgehose-ingress")
        .context("cannot open rumqttd's local link")?;
    tx.subscribe("#")
        .context("cannot subscribe the local link")?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                error!(error = %e, "embedded broker stopped");
            }
        })?;
    info!(listen = %cfg.listen, listen_v5 = ?cfg.listen_v5, "embedded MQTT broker started");
    Ok(EmbeddedBroker { _tx: tx, rx })
}

impl EmbeddedBroker {
    /// Reads the link until shutdown, then drains what rumqttd already acknowledged.
    pub async fn run(
        mut self,
        router: Arc<Router>,
        ingest: mpsc::Sender<Envelope>,
        mut shutdown: Shutdown,
    ) {
        let mut next_offset: Option<u64> = None;
        loop {
            let notification = tokio::select! {
                n = self.rx.next() => n,
                _ = shutdown.wait() => break,
            };
            if !self
                .handle(notification, &router, &ingest, &mut next_offset)
                .await
            {
                return;
            }
        }
        // rumqttd cannot be told to stop accepting; take what it already acknowledged.
        let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
        while let Ok(n) = tokio::time::timeout_at(deadline, self.rx.next()).await {
            if !self.handle(n, &router, &ingest, &mut next_offset).await {
                return;
            }
        }
        info!("embedded broker ingress stopped");
    }

    async fn handle(
        &mut self,
        notification: Result<Option<Notification>, rumqttd::local::LinkError>,
        router: &Router,
        ingest: &mpsc::Sender<Envelope>,
        next_offset: &mut Option<u64>,
    ) -> bool {
        match notification {
            Ok(Some(Notification::Forward(forward))) => {
                if let Some((_, offset)) = forward.cursor {
                    if let Some(expected) = *next_offset {
                        if offset > expected {
                            let lost = offset - expected;
                            metrics::counter!(m::BROKER_DROPPED).increment(lost);
                            error!(
                                lost,
                                "rumqttd dropped acknowledged messages before edgehose read them \
                                 (its in-memory log overflowed); raise ingress.broker.log_segment_*"
                            );
                        }
                    }
                    *next_offset = Some(offset + 1);
                }
                let p = forward.publish;
                let env = super::admit(router, &p.topic, &p.payload, None, Ack::none());
                if ingest.send(env).await.is_err() {
                    warn!("buffer closed; embedded broker ingress stops");
                    return false;
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                if let Err(e) = self.rx.wake().await {
                    error!(error = %e, "cannot reschedule rumqttd's local link");
                    return false;
                }
            }
            Ok(Some(_)) | Ok(None) => {}
            Err(e) => {
                error!(error = %e, "rumqttd's local link failed; embedded ingress stops");
                return false;
            }
        }
        true
    }
}
