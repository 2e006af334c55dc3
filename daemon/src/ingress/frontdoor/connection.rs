//! One device connection of the front door. A QoS 1 PUBLISH is answered with PUBACK only after
//! the buffer committed it; at most `receive_maximum` such publishes wait per connection, and
//! while that window is full the socket is not read (TCP backpressure), so a fast device is slowed,
//! never dropped.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::codec::{
    self, Codec, CodecError, ConnRefusal, DisconnectReason, In, Out, Refusal, Version,
};
use super::pubsub::{Delivery, SUBSCRIBER_QUEUE};
use super::Shared;
use crate::message::{Ack, Outcome};
use crate::metrics as m;
use crate::routing::{Reject, TopicFilter};
use crate::shutdown::Shutdown;

/// How long a connection waits at shutdown for its last acks.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(5);

/// An ack completion on its way back to the connection: (packet id, outcome), or None when the
/// buffer could not store the message (the connection then closes so the device resends it).
type AckEvent = (u16, Option<Outcome>);

/// Completes into the connection's channel; if dropped uncompleted, says so.
struct AckGuard {
    tx: Option<mpsc::UnboundedSender<AckEvent>>,
    pkid: u16,
}

impl AckGuard {
    fn complete(mut self, outcome: Outcome) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.pkid, Some(outcome)));
        }
    }
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.pkid, None));
        }
    }
}

fn refusal(reason: Reject) -> Refusal {
    match reason {
        Reject::BufferFull => Refusal::QuotaExceeded,
        Reject::BadTopic => Refusal::TopicNameInvalid,
        Reject::MalformedPayload => Refusal::PayloadFormatInvalid,
        Reject::NoRoute => Refusal::NoMatchingSubscribers,
        Reject::PayloadTooLarge => Refusal::ImplementationSpecific,
    }
}

enum End {
    /// The device sent DISCONNECT: no will.
    Clean,
    /// Anything else: the will is published.
    Abnormal(&'static str),
}

pub async fn serve(stream: TcpStream, shared: Arc<Shared>, mut shutdown: Shutdown) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    let (mut rd, mut wr) = stream.into_split();
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    let mut outbuf = BytesMut::with_capacity(4 * 1024);

    // CONNECT, within the connect timeout.
    let connect = tokio::time::timeout(shared.connect_timeout, async {
        loop {
            if let Some(version) = codec::detect(&inbuf)? {
                let codec = Codec {
                    version,
                    max_packet: shared.max_packet,
                };
                if let Some(p) = codec.read(&mut inbuf)? {
                    return Ok::<_, CodecError>(Some((codec, p)));
                }
            }
            if rd.read_buf(&mut inbuf).await.unwrap_or(0) == 0 {
                return Ok(None);
            }
        }
    })
    .await;
    let (codec, packet) = match connect {
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            debug!(?peer, error = %e, "refused a connection before CONNECT");
            return;
        }
        Err(_) => {
            debug!(?peer, "no CONNECT within the connect timeout");
            return;
        }
    };
    let In::Connect {
        client_id,
        keep_alive,
        clean,
        will,
        ..
    } = packet
    else {
        return;
    };

    // An empty client id gets one assigned (MQTT 5, or 3.1.1 with a clean session).
    let mut assigned = None;
    let client_id = if client_id.is_empty() {
        if codec.version == Version::V311 && !clean {
            let _ = send(
                &codec,
                &mut wr,
                &mut outbuf,
                connack(&shared, Some(ConnRefusal::BadClientId), None),
            )
            .await;
            return;
        }
        let id = format!("edgehose-{}", shared.sessions.next_id());
        assigned = Some(id.clone());
        id
    } else {
        client_id
    };
    if client_id.len() > 128 || client_id.contains(['+', '#', '/', '\0']) {
        let _ = send(
            &codec,
            &mut wr,
            &mut outbuf,
            connack(&shared, Some(ConnRefusal::BadClientId), None),
        )
        .await;
        return;
    }
    // The newer connection wins, as in IoT Core.
    let (session, taken_over) = shared.sessions.register(&client_id);
    if send(
        &codec,
        &mut wr,
        &mut outbuf,
        connack(&shared, None, assigned),
    )
    .await
    .is_err()
    {
        shared.sessions.unregister(&client_id, session);
        return;
    }
    metrics::counter!(m::CONNECTIONS).increment(1);
    // No session outlives its connection (session_present is always false): subscriptions end
    // with the connection, and a device's unacknowledged publishes are its own to resend.
    let _ = clean;

    let mut c = Connection {
        shared: Arc::clone(&shared),
        codec,
        client_id: client_id.clone(),
        session,
        inflight: 0,
        acks: mpsc::unbounded_channel(),
        delivery_tx: None,
        new_deliveries: None,
    };
    let end = c
        .run(
            &mut rd,
            &mut wr,
            &mut inbuf,
            &mut outbuf,
            keep_alive,
            &taken_over,
            &mut shutdown,
        )
        .await;
    if let End::Abnormal(why) = end {
        debug!(client_id = %client_id, why, "connection ended");
        if let Some(w) = will {
            // The will is a message like any other: checked, routed, committed.
            let env = super::super::admit(
                &shared.router,
                &w.topic,
                &w.payload,
                Some(&client_id),
                Ack::none(),
            );
            let _ = shared.ingest.send(env).await;
        }
    }
    let _ = wr.shutdown().await;
    shared.pubsub.remove(session);
    shared.sessions.unregister(&client_id, session);
}

fn connack(shared: &Shared, refused: Option<ConnRefusal>, assigned: Option<String>) -> Out {
    Out::ConnAck {
        session_present: false,
        refused,
        receive_maximum: shared.receive_maximum,
        max_packet_size: shared.max_packet as u32,
        assigned_client_id: assigned,
    }
}

async fn send(
    codec: &Codec,
    wr: &mut OwnedWriteHalf,
    buf: &mut BytesMut,
    out: Out,
) -> std::io::Result<()> {
    codec
        .write(out, buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    wr.write_all(buf).await?;
    buf.clear();
    Ok(())
}

struct Connection {
    shared: Arc<Shared>,
    codec: Codec,
    client_id: String,
    /// This connection's id in `Sessions` and `PubSub`.
    session: u64,
    /// QoS 1 publishes handed to the buffer and not yet acknowledged.
    inflight: usize,
    acks: (
        mpsc::UnboundedSender<AckEvent>,
        mpsc::UnboundedReceiver<AckEvent>,
    ),
    /// Set at the first SUBSCRIBE: the queue local publishes arrive on.
    delivery_tx: Option<mpsc::Sender<Delivery>>,
    new_deliveries: Option<mpsc::Receiver<Delivery>>,
}

async fn next_delivery(rx: &mut Option<mpsc::Receiver<Delivery>>) -> Option<Delivery> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Connection {
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &mut self,
        rd: &mut tokio::net::tcp::OwnedReadHalf,
        wr: &mut OwnedWriteHalf,
        inbuf: &mut BytesMut,
        outbuf: &mut BytesMut,
        keep_alive: u16,
        taken_over: &Notify,
        shutdown: &mut Shutdown,
    ) -> End {
        // MQTT: the server closes a connection silent for 1.5 x keep-alive.
        let grace = Duration::from_millis(keep_alive as u64 * 1500);
        let mut deadline = Instant::now() + grace;
        let window = self.shared.receive_maximum as usize;
        let mut deliveries: Option<mpsc::Receiver<Delivery>> = None;
        loop {
            // Handle every whole packet already read, while the window has room.
            while self.inflight < window {
                match self.codec.read(inbuf) {
                    Ok(Some(p)) => {
                        if let Err(end) = self.handle(p, outbuf).await {
                            let _ = wr.write_all(outbuf).await;
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(CodecError::TooLarge(n)) => {
                        metrics::counter!(m::REJECTED, "reason" => Reject::PayloadTooLarge.label())
                            .increment(1);
                        warn!(client_id = %self.client_id, bytes = n, "packet over the size limit; disconnecting");
                        let _ = self
                            .codec
                            .write(Out::Disconnect(DisconnectReason::PacketTooLarge), outbuf);
                        let _ = wr.write_all(outbuf).await;
                        return End::Abnormal("packet too large");
                    }
                    Err(e) => {
                        warn!(client_id = %self.client_id, error = %e, "malformed packet; disconnecting");
                        let _ = self
                            .codec
                            .write(Out::Disconnect(DisconnectReason::ProtocolError), outbuf);
                        let _ = wr.write_all(outbuf).await;
                        return End::Abnormal("malformed packet");
                    }
                }
            }
            if let Some(rx) = self.new_deliveries.take() {
                deliveries = Some(rx);
            }
            if !outbuf.is_empty() {
                if wr.write_all(outbuf).await.is_err() {
                    return End::Abnormal("write failed");
                }
                outbuf.clear();
            }
            let reading = self.inflight < window;
            tokio::select! {
                biased;
                _ = taken_over.notified() => {
                    let _ = self.codec.write(Out::Disconnect(DisconnectReason::SessionTakenOver), outbuf);
                    let _ = wr.write_all(outbuf).await;
                    return End::Abnormal("taken over by a newer connection with the same client id");
                }
                Some(event) = self.acks.1.recv() => {
                    if let Err(end) = self.acked(event, outbuf) {
                        let _ = wr.write_all(outbuf).await;
                        return end;
                    }
                }
                Some(d) = next_delivery(&mut deliveries) => {
                    let _ = self.codec.write(
                        Out::Publish { topic: d.topic, payload: d.payload, qos: 0, pkid: 0, retain: d.retain },
                        outbuf,
                    );
                }
                r = rd.read_buf(inbuf), if reading => match r {
                    Ok(0) | Err(_) => return End::Abnormal("connection closed without DISCONNECT"),
                    Ok(_) => deadline = Instant::now() + grace,
                },
                _ = tokio::time::sleep_until(deadline), if keep_alive > 0 => {
                    let _ = self.codec.write(Out::Disconnect(DisconnectReason::KeepAliveTimeout), outbuf);
                    let _ = wr.write_all(outbuf).await;
                    return End::Abnormal("keep-alive timeout");
                }
                _ = shutdown.wait() => {
                    // Stop reading; send the acks of what was taken; then say goodbye.
                    let until = Instant::now() + SHUTDOWN_ACK_WAIT;
                    while self.inflight > 0 {
                        match tokio::time::timeout_at(until, self.acks.1.recv()).await {
                            Ok(Some(event)) => {
                                if self.acked(event, outbuf).is_err() {
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                    let _ = self.codec.write(Out::Disconnect(DisconnectReason::ServerShuttingDown), outbuf);
                    let _ = wr.write_all(outbuf).await;
                    // Shutdown is not the device's fault: no will.
                    return End::Clean;
                }
            }
        }
    }

    /// Writes the PUBACK for a completed message (and any others already completed).
    fn acked(&mut self, first: AckEvent, outbuf: &mut BytesMut) -> Result<(), End> {
        let mut event = Some(first);
        while let Some((pkid, outcome)) = event {
            self.inflight -= 1;
            let refused = match outcome {
                Some(Outcome::Committed) => None,
                Some(Outcome::Rejected(reason)) => Some(refusal(reason)),
                None => return Err(End::Abnormal("the buffer could not store a message")),
            };
            let _ = self.codec.write(Out::PubAck { pkid, refused }, outbuf);
            event = self.acks.1.try_recv().ok();
        }
        Ok(())
    }

    async fn handle(&mut self, packet: In, outbuf: &mut BytesMut) -> Result<(), End> {
        match packet {
            In::Publish {
                topic,
                payload,
                qos,
                pkid,
                retain,
            } => {
                if qos > 1 {
                    metrics::counter!(m::REJECTED, "reason" => "qos2").increment(1);
                    let _ = self
                        .codec
                        .write(Out::Disconnect(DisconnectReason::QoSNotSupported), outbuf);
                    return Err(End::Abnormal("QoS 2 is not supported"));
                }
                // Local subscribers get the message once it is committed.
                let fanout = self.shared.pubsub.wants(retain).then(|| {
                    let shared = Arc::clone(&self.shared);
                    let (topic, payload) = (topic.clone(), payload.clone());
                    move |outcome: Outcome| {
                        if outcome == Outcome::Committed {
                            shared.pubsub.publish(topic, payload, retain);
                        }
                    }
                });
                let ack = if qos == 1 {
                    self.inflight += 1;
                    let guard = AckGuard {
                        tx: Some(self.acks.0.clone()),
                        pkid,
                    };
                    Ack::new(move |outcome| {
                        if let Some(f) = fanout {
                            f(outcome);
                        }
                        guard.complete(outcome)
                    })
                } else if let Some(f) = fanout {
                    Ack::new(f)
                } else {
                    Ack::none()
                };
                let env = super::super::admit(
                    &self.shared.router,
                    &topic,
                    &payload,
                    Some(&self.client_id),
                    ack,
                );
                // Waiting here stops reading this socket: backpressure to the device.
                if self.shared.ingest.send(env).await.is_err() {
                    return Err(End::Abnormal("the buffer has stopped"));
                }
            }
            In::PingReq => {
                let _ = self.codec.write(Out::PingResp, outbuf);
            }
            In::Subscribe { pkid, filters } => {
                // Granted at QoS 0: local fan-out never holds publishers back.
                let parsed: Vec<Option<TopicFilter>> = filters
                    .iter()
                    .map(|(f, _)| TopicFilter::parse(f).ok())
                    .collect();
                let granted = parsed.iter().map(|p| p.as_ref().map(|_| 0)).collect();
                let valid: Vec<TopicFilter> = parsed.into_iter().flatten().collect();
                let tx = self.delivery_tx.get_or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
                    self.new_deliveries = Some(rx);
                    tx
                });
                let retained = self.shared.pubsub.subscribe(self.session, &valid, tx);
                let _ = self.codec.write(Out::SubAck { pkid, granted }, outbuf);
                for d in retained {
                    let _ = self.codec.write(
                        Out::Publish {
                            topic: d.topic,
                            payload: d.payload,
                            qos: 0,
                            pkid: 0,
                            retain: true,
                        },
                        outbuf,
                    );
                }
            }
            In::Unsubscribe { pkid, filters } => {
                self.shared.pubsub.unsubscribe(self.session, &filters);
                let _ = self.codec.write(
                    Out::UnsubAck {
                        pkid,
                        count: filters.len(),
                    },
                    outbuf,
                );
            }
            In::PubAck { .. } => {}
            In::Disconnect { with_will } => {
                return Err(if with_will {
                    End::Abnormal("DISCONNECT with will")
                } else {
                    End::Clean
                })
            }
            In::Connect { .. } => {
                let _ = self
                    .codec
                    .write(Out::Disconnect(DisconnectReason::ProtocolError), outbuf);
                return Err(End::Abnormal("a second CONNECT"));
            }
            In::Unexpected(what) => {
                let _ = self
                    .codec
                    .write(Out::Disconnect(DisconnectReason::ProtocolError), outbuf);
                return Err(End::Abnormal(what));
            }
        }
        Ok(())
    }
}
