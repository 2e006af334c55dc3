//! One device connection of the front door. A QoS 1 PUBLISH is answered with PUBACK only after
//! the buffer committed it; at most `receive_maximum` such publishes wait per connection, and
//! while that window is full the socket is not read (TCP backpressure), so a fast device is slowed,
//! never dropped.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, AcquireError, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::codec::{
    self, Codec, CodecError, ConnRefusal, DisconnectReason, In, Out, Refusal, SubRefused, Version,
    Will,
};
use super::pubsub::{Delivery, Opened};
use super::wake::{self, Wake};
use super::Shared;
use crate::ingress::auth::policy::Action;
use crate::ingress::auth::{Authenticated, Identity, PeerCertificate};
use crate::message::{Ack, Envelope, Outcome};
use crate::metrics as m;
use crate::ratelimit::LogLimit;
use crate::routing::Reject;
use crate::templates::topic::TopicFilter;

/// A connection reads at least this much at a time, and at most [`MAX_READ`]: a device that
/// fills its reads gets bigger ones, so fast publishers need few system calls while 10,000 slow
/// ones keep small buffers (256 bytes, a telemetry message: 10,000 idle devices hold 7.5 MiB
/// less than with 1 KiB). Payloads share the read buffer until their commit, so a buffer
/// lives as long as its slowest message: 16 KiB (~60 telemetry messages) keeps 100 busy devices
/// at a few hundred KiB where 64 KiB held several MiB, at the same rate (BENCHMARKS.md).
const MIN_READ: usize = 256;
const MAX_READ: usize = 16 * 1024;

/// A device's byte stream. A connection reads and writes it in turn, from its one task, so it
/// is not split into halves (a plain socket's halves share an allocation per connection).
pub trait Device: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Resolves once a read would not wait: until then an idle device holds no read buffer.
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl Device for tokio::net::TcpStream {
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        // The socket's own reader waker, as reads use: a pointer in the task, where
        // `TcpStream::readable`'s waiter would take 168 bytes.
        std::future::poll_fn(move |cx| self.poll_read_ready(cx))
    }
}

/// TLS: readable once plaintext or a whole record is waiting, or the socket has bytes; an idle
/// device holds no buffer here either (nor in its record layer).
impl Device for super::tls_stream::TlsStream {
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        std::future::poll_fn(move |cx| self.poll_readable(cx))
    }
}

/// Reads what the socket has, growing the read size while reads come back full. With nothing
/// left unparsed, the buffer is let go until bytes arrive (10,000 idle devices hold no read
/// buffers; what they sent and is not committed yet keeps its own part of the old one).
async fn read_some<S: Device>(
    io: &mut S,
    buf: &mut BytesMut,
    size: &mut usize,
) -> std::io::Result<usize> {
    if buf.is_empty() {
        *buf = BytesMut::new();
        io.readable().await?;
    }
    buf.reserve(*size);
    let room = buf.capacity() - buf.len();
    let n = io.read_buf(buf).await?;
    if n == room {
        *size = (*size * 2).min(MAX_READ);
    }
    Ok(n)
}

/// Writes `buf` and flushes: a TLS stream may hold the tail of its records until flushed.
async fn write_out<W: AsyncWrite + Unpin>(io: &mut W, buf: &[u8]) -> std::io::Result<()> {
    io.write_all(buf).await?;
    io.flush().await
}

/// Waiting for partial-packet budget.
type BudgetWait = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// Waits for the budget being waited for (a branch enabled only while there is one).
async fn wait_for(w: &mut Option<BudgetWait>) -> Result<OwnedSemaphorePermit, AcquireError> {
    match w {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Bytes of a packet still arriving that a connection may hold without drawing on the shared
/// `partial_packet_budget` (telemetry never gets near it).
pub const FREE_PARTIAL: usize = 16 * 1024;

/// How long a connection waits at shutdown for its last acks.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(5);

/// Completes into the connection's queue; if dropped uncompleted, says so.
struct AckGuard {
    queue: Option<Arc<Wake>>,
    pkid: u16,
}

impl AckGuard {
    fn complete(mut self, outcome: Outcome) {
        if let Some(q) = self.queue.take() {
            q.push_ack((self.pkid, Some(outcome)));
        }
    }
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        if let Some(q) = self.queue.take() {
            q.push_ack((self.pkid, None));
        }
    }
}

fn refusal(reason: Reject) -> Refusal {
    match reason {
        Reject::BufferFull => Refusal::QuotaExceeded,
        Reject::BadTopic => Refusal::TopicNameInvalid,
        Reject::MalformedPayload => Refusal::PayloadFormatInvalid,
        Reject::NoRoute => Refusal::NoMatchingSubscribers,
        Reject::PayloadTooLarge | Reject::RuleFailed => Refusal::ImplementationSpecific,
    }
}

enum End {
    /// The device sent DISCONNECT: no will.
    Clean,
    /// Anything else: the will is published.
    Abnormal(&'static str),
}

/// What the listener knows of a connection before its CONNECT.
pub struct Peer {
    pub addr: Option<std::net::SocketAddr>,
    /// The device certificate the TLS handshake verified.
    pub certificate: Option<Box<PeerCertificate>>,
    /// Whether a client without certificate or credentials may connect on this listener.
    pub anonymous: bool,
    /// CONNECT must have arrived by then (the connect timeout from accept, TLS included).
    pub deadline: Instant,
}

/// What a connection starts from: its stream, what the listener knows, what it holds (its
/// connection slots) until it ends.
pub struct Start<S, H> {
    pub stream: S,
    pub peer: Peer,
    pub shared: Arc<Shared>,
    pub held: H,
}

/// Serves one connection, from CONNECT to its end. One boxed argument: a task keeps its async
/// fn's arguments for its whole life beside what its body moved them into (10,000 idle
/// devices are 10,000 tasks).
pub async fn serve<S: Device, H>(start: Box<Start<S, H>>) {
    let Start {
        stream: mut io,
        peer,
        shared,
        held,
    } = *start;
    // Small to start: 10,000 idle devices must not cost 10,000 large buffers. They grow as needed.
    let mut inbuf = BytesMut::with_capacity(MIN_READ);
    // Allocated by the first packet written (the CONNACK), as large as it needs.
    let mut outbuf = BytesMut::new();
    // The CONNECT exchange in a future of its own: what it needs (the CONNECT packet, the
    // credentials, the certificate) is gone once the device is connected, instead of being
    // kept in every connection's task beside the connection's own loop; boxed, so that the
    // task is as small as the connected device's loop needs.
    let Some(Opening {
        mut c,
        keep_alive,
        will,
        session,
        opened,
    }) = Box::pin(open(&mut io, &mut inbuf, &mut outbuf, peer, &shared)).await
    else {
        return;
    };
    let end = c.run(&mut io, &mut inbuf, &mut outbuf, keep_alive).await;
    if let End::Abnormal(why) = end {
        debug!(client_id = ?c.client_id, why, "connection ended");
        if let Some(w) = will.filter(|w| c.may_publish(&w.topic, w.retain)) {
            // The will is a message like any other: checked, routed, committed.
            let env = crate::ingress::admit(
                &shared.router,
                &w.topic,
                &w.payload,
                Some(&c.client_id),
                Ack::none(),
            );
            let _ = c.submit(env).await;
        }
    }
    let _ = io.shutdown().await;
    let unacked = std::mem::take(&mut c.outgoing)
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    shared
        .pubsub
        .close(&c.client_id, opened.generation, unacked);
    shared.sessions.unregister(&c.client_id, session);
    drop(held);
}

/// A connected device, once its CONNECT was accepted and answered.
struct Opening {
    c: Connection,
    keep_alive: u16,
    /// Boxed: most devices have none, and every idle task would have room for one.
    will: Option<Box<Will>>,
    session: u64,
    opened: Opened,
}

/// Reads the CONNECT (within the connect timeout), identifies and authorizes the device,
/// registers its session and sends the CONNACK. None when the connection ends there.
async fn open<S: Device>(
    io: &mut S,
    inbuf: &mut BytesMut,
    outbuf: &mut BytesMut,
    peer: Peer,
    shared: &Arc<Shared>,
) -> Option<Opening> {
    let Peer {
        addr: peer,
        certificate,
        anonymous,
        deadline,
    } = peer;
    // CONNECT, within the connect timeout.
    let connect = tokio::time::timeout_at(deadline, async {
        loop {
            if let Some(version) = codec::detect(inbuf)? {
                let codec = Codec {
                    version,
                    max_packet: shared.max_packet,
                };
                if let Some(p) = codec.read(inbuf)? {
                    return Ok::<_, CodecError>(Some((codec, p)));
                }
            }
            if io.read_buf(inbuf).await.unwrap_or(0) == 0 {
                return Ok(None);
            }
        }
    })
    .await;
    let (codec, packet) = match connect {
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            debug!(?peer, error = %e, "refused a connection before CONNECT");
            return None;
        }
        Err(_) => {
            debug!(?peer, "no CONNECT within the connect timeout");
            return None;
        }
    };
    let In::Connect {
        client_id,
        keep_alive,
        clean,
        will,
        receive_maximum,
        session_expiry,
        login,
    } = packet
    else {
        return None;
    };

    // An empty client id gets one assigned (MQTT 5, or 3.1.1 with a clean session). An id that
    // could widen a topic filter (`+`, `#`, `/`) is refused (AWS-SEMANTICS 21).
    let mut assigned = None;
    let client_id = if client_id.is_empty() && (codec.version == Version::V5 || clean) {
        let id = format!("edgehose-{}", shared.sessions.next_id());
        assigned = Some(id.clone());
        id
    } else {
        client_id
    };
    if client_id.is_empty() || client_id.len() > 128 || client_id.contains(['+', '#', '/', '\0']) {
        let refusal = connack(shared, Some(ConnRefusal::BadClientId), None, false);
        let _ = send(&codec, io, outbuf, refusal).await;
        return None;
    }
    // Who it is, and whether it may connect (before it can take over anyone's session).
    let identity = match shared.auth.connect(
        &client_id,
        certificate.as_deref(),
        login.as_ref().map(|(u, p)| (u.as_str(), p.as_bytes())),
        anonymous,
    ) {
        Authenticated::Yes(id) => id,
        refused => {
            let (refusal, reason, why) = match refused {
                Authenticated::BadCredentials => (
                    ConnRefusal::BadCredentials,
                    "bad_credentials",
                    "wrong username or password".to_string(),
                ),
                Authenticated::NotAuthorized(why) => {
                    (ConnRefusal::NotAuthorized, "not_authorized", why)
                }
                Authenticated::Yes(_) => unreachable!("matched above"),
            };
            metrics::counter!(m::AUTH_REFUSED, "action" => "connect", "reason" => reason)
                .increment(1);
            static LOG: LogLimit = LogLimit::new();
            if let Some(suppressed) = LOG.allow() {
                warn!(?peer, client_id = ?client_id, username = ?login.as_ref().map(|l| &l.0), why, suppressed, "connection refused");
            }
            let refusal = connack(shared, Some(refusal), None, false);
            let _ = send(&codec, io, outbuf, refusal).await;
            return None;
        }
    };
    drop(login);
    // The newer connection wins, as in IoT Core.
    let wake = Arc::new(Wake::default());
    let session = shared.sessions.register(&client_id, &wake);
    // A session outlives its connection when the device asks: 3.1.1 clean_session = 0,
    // MQTT 5 a session expiry above 0.
    let persistent = match codec.version {
        Version::V311 => !clean,
        Version::V5 => session_expiry.unwrap_or(0) > 0,
    };
    let opened = shared.pubsub.open(
        &client_id,
        persistent && !(clean && codec.version == Version::V5),
        &wake,
    );
    if send(
        &codec,
        io,
        outbuf,
        connack(shared, None, assigned, opened.present),
    )
    .await
    .is_err()
    {
        shared
            .pubsub
            .close(&client_id, opened.generation, Vec::new());
        shared.sessions.unregister(&client_id, session);
        return None;
    }
    metrics::counter!(m::CONNECTIONS).increment(1);

    let c = Connection {
        shared: Arc::clone(shared),
        codec,
        client_id,
        inflight: 0,
        wake,
        // Unacknowledged QoS 1 messages we send the device: its Receive Maximum, or 32.
        out_window: receive_maximum.unwrap_or(32).clamp(1, 1024) as usize,
        outgoing: Vec::new(),
        next_pkid: 0,
        wake_queue: false,
        identity,
        open_generation: None,
        allowed: Vec::new(),
    };
    Some(Opening {
        c,
        keep_alive,
        will: will.map(Box::new),
        session,
        opened,
    })
}

fn connack(
    shared: &Shared,
    refused: Option<ConnRefusal>,
    assigned: Option<String>,
    session_present: bool,
) -> Out {
    Out::ConnAck {
        session_present,
        refused,
        receive_maximum: shared.receive_maximum,
        max_packet_size: shared.max_packet as u32,
        assigned_client_id: assigned,
    }
}

async fn send<W: AsyncWrite + Unpin>(
    codec: &Codec,
    wr: &mut W,
    buf: &mut BytesMut,
    out: Out,
) -> std::io::Result<()> {
    codec
        .write(out, buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    write_out(wr, buf).await?;
    *buf = BytesMut::new();
    Ok(())
}

struct Connection {
    shared: Arc<Shared>,
    codec: Codec,
    client_id: String,
    /// QoS 1 publishes handed to the buffer and not yet acknowledged.
    inflight: usize,
    /// Wakes the connection: acks, its session's queue, a takeover, shutdown.
    wake: Arc<Wake>,
    /// How many QoS 1 messages we may have unacknowledged at the device.
    out_window: usize,
    /// QoS 1 messages sent to the device and not yet acknowledged, in sending order.
    outgoing: Vec<(u16, Delivery)>,
    next_pkid: u16,
    /// A PUBACK freed room in the window: look at the session's queue again.
    wake_queue: bool,
    identity: Identity,
    /// The policy generation at which no policy was configured, if that is the current one.
    open_generation: Option<u64>,
    /// Topics this device was last allowed to publish to, with the policy generation of the
    /// answer (a device publishes to a few topics: the policy is evaluated once for each).
    allowed: Vec<(Bytes, bool, u64)>,
}

/// How many topics a connection remembers as allowed.
const ALLOWED_CACHE: usize = 8;

impl Connection {
    async fn run<S: Device>(
        &mut self,
        io: &mut S,
        inbuf: &mut BytesMut,
        outbuf: &mut BytesMut,
        keep_alive: u16,
    ) -> End {
        // MQTT: the server closes a connection silent for 1.5 x keep-alive.
        let grace = Duration::from_millis(keep_alive as u64 * 1500);
        let mut deadline = Instant::now() + grace;
        let window = self.shared.receive_maximum as usize;
        let mut read_size = MIN_READ;
        // When the packet now in `inbuf` started to arrive, while it is incomplete.
        let mut partial_since: Option<Instant> = None;
        // KiB of the shared budget held for that packet, and how many more it waits for.
        let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
        // The connection's inbound byte rate, and when it may be read again once over it.
        let mut rate =
            super::limits::ByteRate::new(self.shared.max_bytes_per_second, Instant::now());
        let mut paused_until: Option<Instant> = None;
        loop {
            // Handle every whole packet already read, while the window has room.
            while self.inflight < window {
                // Decided without waiting, then awaited outside the match: what the codec
                // returned is not kept in the task while a message waits for the buffer.
                let step = match self.codec.read(inbuf) {
                    Ok(Some(p)) => {
                        partial_since = None;
                        self.handle(p, outbuf)
                    }
                    Ok(None) => {
                        if inbuf.is_empty() {
                            partial_since = None;
                        } else {
                            partial_since.get_or_insert_with(Instant::now);
                        }
                        break;
                    }
                    Err(CodecError::TooLarge(n)) => {
                        metrics::counter!(m::REJECTED, "reason" => Reject::PayloadTooLarge.label())
                            .increment(1);
                        static LOG: LogLimit = LogLimit::new();
                        if let Some(suppressed) = LOG.allow() {
                            warn!(client_id = ?self.client_id, bytes = n, suppressed, "packet over the size limit; disconnecting");
                        }
                        let _ = self
                            .codec
                            .write(Out::Disconnect(DisconnectReason::PacketTooLarge), outbuf);
                        Err(End::Abnormal("packet too large"))
                    }
                    Err(e) => {
                        static LOG: LogLimit = LogLimit::new();
                        if let Some(suppressed) = LOG.allow() {
                            warn!(client_id = ?self.client_id, error = %e, suppressed, "malformed packet; disconnecting");
                        }
                        let _ = self
                            .codec
                            .write(Out::Disconnect(DisconnectReason::ProtocolError), outbuf);
                        Err(End::Abnormal("malformed packet"))
                    }
                };
                let step = match step {
                    Ok(Some(env)) => self.submit(env).await,
                    Ok(None) => Ok(()),
                    Err(end) => Err(end),
                };
                if let Err(end) = step {
                    let _ = write_out(io, outbuf).await;
                    return end;
                }
            }
            if std::mem::take(&mut self.wake_queue) {
                self.send_queued(outbuf);
            }
            if !outbuf.is_empty() {
                if write_out(io, outbuf).await.is_err() {
                    return End::Abnormal("write failed");
                }
                // Let go: an idle device holds no output buffer (the next write allocates
                // what it needs).
                *outbuf = BytesMut::new();
            }
            // A packet still arriving holds budget for what it holds beyond the allowance.
            let want = match partial_since {
                Some(_) => inbuf.len().saturating_sub(FREE_PARTIAL).div_ceil(1024) as u32,
                None => 0,
            };
            let have = held.as_ref().map_or(0, |p| p.num_permits() as u32);
            let mut starved: u32 = 0;
            // Waiting for budget is rare: its future is boxed, not room in every task.
            let mut budget: Option<BudgetWait> = None;
            if want == 0 {
                held = None;
            } else if want > have {
                match Arc::clone(&self.shared.partial_budget).try_acquire_many_owned(want - have) {
                    Ok(p) => match &mut held {
                        Some(h) => h.merge(p),
                        None => held = Some(p),
                    },
                    Err(_) => {
                        starved = want - have;
                        metrics::counter!(m::PARTIAL_BUDGET_WAITS).increment(1);
                        budget = Some(Box::pin(
                            Arc::clone(&self.shared.partial_budget).acquire_many_owned(starved),
                        ));
                    }
                }
            }
            let reading = self.inflight < window && starved == 0 && paused_until.is_none();
            // One timer for three deadlines (a pause ending, a packet's time running out, the
            // keep-alive): every idle device's task has room for one, not three.
            let partial_due = partial_since
                .filter(|_| self.inflight < window)
                .map(|p| p + self.shared.packet_timeout);
            let wake_at = [
                paused_until,
                partial_due,
                (keep_alive > 0).then_some(deadline),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                biased;
                _ = self.wake.wait() => {
                    let raised = self.wake.take();
                    if raised & wake::TAKEN_OVER != 0 {
                        let _ = self.codec.write(Out::Disconnect(DisconnectReason::SessionTakenOver), outbuf);
                        let _ = write_out(io, outbuf).await;
                        return End::Abnormal("taken over by a newer connection with the same client id");
                    }
                    if let Err(end) = self.acked(outbuf) {
                        let _ = write_out(io, outbuf).await;
                        return end;
                    }
                    if raised & wake::SHUTDOWN != 0 {
                        return self.finish(io, outbuf).await;
                    }
                    if raised & wake::QUEUED != 0 {
                        self.send_queued(outbuf);
                    }
                }
                r = read_some(io, inbuf, &mut read_size), if reading => match r {
                    Ok(0) | Err(_) => return End::Abnormal("connection closed without DISCONNECT"),
                    Ok(n) => {
                        let now = Instant::now();
                        deadline = now + grace;
                        if let Some(r) = rate.as_mut() {
                            paused_until = r.take(n, now);
                            if paused_until.is_some() {
                                metrics::counter!(m::RATE_LIMITED).increment(1);
                            }
                        }
                    }
                },
                p = wait_for(&mut budget), if budget.is_some() => {
                    if let Ok(p) = p {
                        match &mut held {
                            Some(h) => h.merge(p),
                            None => held = Some(p),
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake_at.unwrap_or(deadline)), if wake_at.is_some() => {
                    let now = Instant::now();
                    if paused_until.is_some_and(|p| now >= p) {
                        paused_until = None;
                        // The pause is the server's doing: not counted against the keep-alive.
                        deadline = now + grace;
                    } else if partial_due.is_some_and(|p| now >= p) {
                        static LOG: LogLimit = LogLimit::new();
                        if let Some(suppressed) = LOG.allow() {
                            warn!(client_id = ?self.client_id, timeout = ?self.shared.packet_timeout, suppressed, "a packet was not completed in time; disconnecting");
                        }
                        return End::Abnormal("packet not completed within ingress.frontdoor.packet_timeout");
                    } else if keep_alive > 0 && now >= deadline {
                        let _ = self.codec.write(Out::Disconnect(DisconnectReason::KeepAliveTimeout), outbuf);
                        let _ = write_out(io, outbuf).await;
                        return End::Abnormal("keep-alive timeout");
                    }
                }
            }
        }
    }

    /// Shutdown: stop reading; send the acks of what was taken; then say goodbye.
    async fn finish<S: Device>(&mut self, io: &mut S, outbuf: &mut BytesMut) -> End {
        let until = Instant::now() + SHUTDOWN_ACK_WAIT;
        while self.inflight > 0 {
            if self.acked(outbuf).is_err() || self.inflight == 0 {
                break;
            }
            let wake = Arc::clone(&self.wake);
            if tokio::time::timeout_at(until, wake.wait()).await.is_err() {
                break;
            }
        }
        let _ = self.codec.write(
            Out::Disconnect(DisconnectReason::ServerShuttingDown),
            outbuf,
        );
        let _ = write_out(io, outbuf).await;
        // Shutdown is not the device's fault: no will.
        End::Clean
    }

    /// Sends queued messages of this connection's session, QoS 1 ones while the device's window
    /// has room. Wakes itself again if more wait.
    fn send_queued(&mut self, outbuf: &mut BytesMut) {
        const BATCH: usize = 256;
        let room = self.out_window.saturating_sub(self.outgoing.len());
        if room == 0 {
            return; // A PUBACK from the device will wake us.
        }
        let batch = self.shared.pubsub.take(&self.client_id, room.min(BATCH));
        let full = batch.len() == room.min(BATCH);
        for d in batch {
            if !self.may_receive(&d.topic) {
                // Not delivered, as IoT Core does; a QoS 1 one leaves the session's queue.
                if d.qos > 0 {
                    self.shared.pubsub.acked(&self.client_id, d.seq);
                }
                continue;
            }
            let pkid = if d.qos > 0 { self.pkid() } else { 0 };
            let _ = self.codec.write(
                Out::Publish {
                    topic: d.topic.clone(),
                    payload: d.payload.clone(),
                    qos: d.qos,
                    pkid,
                    retain: d.retain,
                    dup: d.dup,
                },
                outbuf,
            );
            if d.qos > 0 {
                self.outgoing.push((pkid, d));
            }
        }
        if full {
            self.wake.raise(wake::QUEUED);
        }
    }

    /// May this device publish to `topic` (`iot:Publish`, and `iot:RetainPublish` for a
    /// retained message)? Refusals are counted and logged (rate-limited).
    fn may_publish(&mut self, topic: &[u8], retain: bool) -> bool {
        let generation = self.identity.generation();
        if self.unchecked(generation) {
            return true;
        }
        // Only plain publishes are remembered (a retained one needs a second action).
        if let Some(&(_, ok, _)) = self
            .allowed
            .iter()
            .find(|(t, _, g)| !retain && *g == generation && t.as_ref() == topic)
        {
            return ok;
        }
        let name = String::from_utf8_lossy(topic);
        let mut d = self.identity.check(Action::Publish, &name);
        if d.allowed && retain {
            d = self.identity.check(Action::RetainPublish, &name);
        }
        let ok = d.allowed;
        if !retain {
            if self.allowed.len() >= ALLOWED_CACHE {
                self.allowed.remove(0);
            }
            self.allowed
                .push((Bytes::copy_from_slice(topic), ok, generation));
        }
        if !ok {
            self.refused(
                if retain { "retain_publish" } else { "publish" },
                &name,
                &d.reason,
            );
        }
        ok
    }

    fn may_receive(&mut self, topic: &[u8]) -> bool {
        if self.unchecked(self.identity.generation()) {
            return true;
        }
        let name = String::from_utf8_lossy(topic);
        let d = self.identity.check(Action::Receive, &name);
        if !d.allowed {
            self.refused("receive", &name, &d.reason);
        }
        d.allowed
    }

    /// True when no policy is configured as of `generation` (remembered per generation, so
    /// that a gateway without policies costs a connection nothing per message).
    fn unchecked(&mut self, generation: u64) -> bool {
        if self.open_generation == Some(generation) {
            return true;
        }
        if self.identity.enforced() {
            return false;
        }
        self.open_generation = Some(generation);
        true
    }

    fn refused(&self, action: &'static str, name: &str, why: &str) {
        metrics::counter!(m::AUTH_REFUSED, "action" => action, "reason" => "not_authorized")
            .increment(1);
        static LOG: LogLimit = LogLimit::new();
        if let Some(suppressed) = LOG.allow() {
            warn!(client_id = ?self.client_id, action, name = ?name, why, suppressed, "not authorized");
        }
    }

    /// The next packet id not in use by an unacknowledged message.
    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.outgoing.iter().any(|(p, _)| *p == self.next_pkid) {
                return self.next_pkid;
            }
        }
    }

    /// Writes the PUBACK for a completed message (and any others already completed).
    fn acked(&mut self, outbuf: &mut BytesMut) -> Result<(), End> {
        while let Some((pkid, outcome)) = self.wake.pop_ack() {
            self.inflight -= 1;
            let refused = match outcome {
                Some(Outcome::Committed) => None,
                Some(Outcome::Rejected(reason)) => Some(refusal(reason)),
                // Not stored: an MQTT 5 device is told so (and may try again); a 3.1.1 device
                // can only be told by closing the connection, after which it resends.
                None if self.codec.version == Version::V5 => Some(Refusal::NotStored),
                None => return Err(End::Abnormal("the buffer could not store a message")),
            };
            let _ = self.codec.write(Out::PubAck { pkid, refused }, outbuf);
        }
        Ok(())
    }

    /// Hands a message to the buffer. Waiting (the channel full) stops reading this socket:
    /// backpressure to the device. Tried without waiting first; only a full channel waits, for
    /// a reservation, in a boxed future (the wait and the envelope inside it are what every
    /// idle connection's task would otherwise have room for).
    async fn submit(&self, env: Envelope) -> Result<(), End> {
        match self.shared.ingest.try_send(env) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(env)) => {
                Box::pin(Self::submit_when_room(&self.shared.ingest, env)).await
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(End::Abnormal("the buffer has stopped"))
            }
        }
    }

    async fn submit_when_room(ingest: &mpsc::Sender<Envelope>, env: Envelope) -> Result<(), End> {
        match ingest.reserve().await {
            Ok(permit) => {
                permit.send(env);
                Ok(())
            }
            Err(_) => Err(End::Abnormal("the buffer has stopped")),
        }
    }

    /// Handles one packet; a publish to store comes back as its envelope, for [`Self::submit`].
    fn handle(&mut self, packet: In, outbuf: &mut BytesMut) -> Result<Option<Envelope>, End> {
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
                if !self.may_publish(&topic, retain) {
                    // MQTT 5 says so in the PUBACK; a 3.1.1 device can only be disconnected
                    // (what IoT Core does); a QoS 0 message is dropped.
                    return match (self.codec.version, qos) {
                        (Version::V5, 1) => {
                            let _ = self.codec.write(
                                Out::PubAck {
                                    pkid,
                                    refused: Some(Refusal::NotAuthorized),
                                },
                                outbuf,
                            );
                            Ok(None)
                        }
                        (Version::V5, _) => Ok(None),
                        (Version::V311, _) => Err(End::Abnormal("publish not authorized")),
                    };
                }
                // Local subscribers get the message once it is committed.
                let fanout = self.shared.pubsub.wants(retain).then(|| {
                    let shared = Arc::clone(&self.shared);
                    let (topic, payload) = (topic.clone(), payload.clone());
                    move |outcome: Outcome| {
                        if outcome == Outcome::Committed {
                            shared.pubsub.committed(topic, payload, qos, retain);
                        }
                    }
                });
                let ack = if qos == 1 {
                    self.inflight += 1;
                    let guard = AckGuard {
                        queue: Some(Arc::clone(&self.wake)),
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
                return Ok(Some(crate::ingress::admit(
                    &self.shared.router,
                    &topic,
                    &payload,
                    Some(&self.client_id),
                    ack,
                )));
            }
            In::PingReq => {
                let _ = self.codec.write(Out::PingResp, outbuf);
            }
            In::Subscribe { pkid, filters } => {
                // QoS 0 and 1 are granted as asked (QoS 2 as 1); invalid filters are refused,
                // and so are new ones past the session's quota (IoT Core's 50).
                let mut room = self.shared.pubsub.filter_room(&self.client_id);
                let parsed: Vec<Result<(TopicFilter, u8), SubRefused>> = filters
                    .iter()
                    .map(|(f, q)| {
                        let parsed = TopicFilter::parse(f).map_err(|_| SubRefused::Invalid)?;
                        let d = self.identity.check(Action::Subscribe, f);
                        if !d.allowed {
                            self.refused("subscribe", f, &d.reason);
                            return Err(SubRefused::NotAuthorized);
                        }
                        let f = parsed;
                        if !self.shared.pubsub.has_filter(&self.client_id, &f) {
                            if room == 0 {
                                return Err(SubRefused::Quota);
                            }
                            room -= 1;
                        }
                        Ok((f, (*q).min(1)))
                    })
                    .collect();
                let refused = parsed.iter().filter(|p| p.is_err()).count();
                if refused > 0 {
                    metrics::counter!(m::SUBSCRIPTIONS_REFUSED).increment(refused as u64);
                }
                let granted = parsed
                    .iter()
                    .map(|p| p.as_ref().map(|(_, q)| *q).map_err(|e| *e))
                    .collect();
                let valid: Vec<(TopicFilter, u8)> = parsed.into_iter().flatten().collect();
                // The SUBACK goes out before any retained message the subscription matches.
                let _ = self.codec.write(Out::SubAck { pkid, granted }, outbuf);
                self.shared.pubsub.subscribe(&self.client_id, &valid);
            }
            In::Unsubscribe { pkid, filters } => {
                self.shared.pubsub.unsubscribe(&self.client_id, &filters);
                let _ = self.codec.write(
                    Out::UnsubAck {
                        pkid,
                        count: filters.len(),
                    },
                    outbuf,
                );
            }
            In::PubAck { pkid } => {
                if let Some(i) = self.outgoing.iter().position(|(p, _)| *p == pkid) {
                    let (_, d) = self.outgoing.remove(i);
                    self.shared.pubsub.acked(&self.client_id, d.seq);
                }
                // Room in the window: send what waits.
                self.wake_queue = true;
            }
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
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[tokio::test]
    async fn a_device_waiting_to_send_holds_no_read_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut device = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut io, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::with_capacity(MIN_READ);
        let mut size = MIN_READ;
        // tokio counts a new socket as readable until a read finds nothing (as the CONNECT
        // exchange's reads do before this loop's first wait).
        assert_eq!(
            io.try_read(&mut [0u8; 8]).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        {
            // Nothing sent: the read waits, and holds no buffer while it does.
            let read = std::pin::pin!(read_some(&mut io, &mut buf, &mut size));
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(read.poll(&mut cx).is_pending());
        }
        assert_eq!(buf.capacity(), 0);
        // Bytes arrive: a buffer is taken for them.
        device.write_all(b"\x30\x03\x00\x01t").await.unwrap();
        let n = read_some(&mut io, &mut buf, &mut size).await.unwrap();
        assert_eq!(&buf[..n], b"\x30\x03\x00\x01t");
        // Bytes not parsed yet are kept: the next read appends to them.
        device.write_all(b"x").await.unwrap();
        read_some(&mut io, &mut buf, &mut size).await.unwrap();
        assert_eq!(&buf[..], b"\x30\x03\x00\x01tx");
    }
}
