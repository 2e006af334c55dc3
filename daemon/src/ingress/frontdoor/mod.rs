//! The front door: edgehose's own MQTT listener (3.1.1 and 5 on one port), so that a PUBACK
//! means "committed to SQLite". Packets are parsed and written by rumqttc's `mqttbytes` codecs
//! ([`codec`]); each connection is a task ([`connection`]); a client id has at most one live
//! connection, the newest ([`Sessions`]); committed messages reach local subscribers through
//! [`pubsub`], its filters indexed by [`filter_index`]; persistent sessions and retained
//! messages are saved in the buffer file ([`persist`]). Beside the plain listener, an MQTT over
//! TLS one ([`tls`]); who a device is and what it may do is [`crate::ingress::auth`]'s.

pub mod codec;
pub mod connection;
pub mod filter_index;
pub mod limits;
pub mod persist;
pub mod pubsub;
pub mod tls;
pub mod tls_stream;
pub mod wake;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::buffer::sessions::Saved;
use crate::buffer::Control;
use crate::config::{FrontDoorConfig, Limits};
use crate::ingress::auth::Auth;
use crate::message::Envelope;
use crate::routing::Router;
use crate::shutdown::Shutdown;
use wake::Wake;

/// What every connection shares.
pub struct Shared {
    pub router: Arc<Router>,
    pub ingest: mpsc::Sender<Envelope>,
    pub receive_maximum: u16,
    pub connect_timeout: Duration,
    pub packet_timeout: Duration,
    /// KiB all connections may hold in packets still arriving, beyond `connection::FREE_PARTIAL`
    /// each.
    pub partial_budget: Arc<tokio::sync::Semaphore>,
    /// Largest packet read; larger ones end the connection (MQTT 5: Packet too large).
    pub max_packet: usize,
    pub sessions: Sessions,
    pub pubsub: Arc<pubsub::PubSub>,
    pub auth: Arc<Auth>,
    /// Bytes per second one connection may send (0: no limit).
    pub max_bytes_per_second: u64,
}

/// Live connections by client id. Registering an id that is live tells the older connection
/// to close; at shutdown every live connection is told to finish.
#[derive(Default)]
pub struct Sessions {
    live: Mutex<Live>,
    next: AtomicU64,
}

#[derive(Default)]
struct Live {
    by_id: HashMap<String, (u64, Arc<Wake>)>,
    shutting_down: bool,
}

impl Sessions {
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers the connection woken by `wake` as `client_id`'s; returns its registration.
    pub fn register(&self, client_id: &str, wake: &Arc<Wake>) -> u64 {
        let id = self.next_id();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.shutting_down {
            wake.raise(wake::SHUTDOWN);
        }
        let old = live
            .by_id
            .insert(client_id.to_string(), (id, Arc::clone(wake)));
        if let Some((_, older)) = old {
            older.raise(wake::TAKEN_OVER);
        }
        id
    }

    pub fn unregister(&self, client_id: &str, id: u64) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.by_id.get(client_id).is_some_and(|(i, _)| *i == id) {
            live.by_id.remove(client_id);
        }
    }

    /// Tells every live connection, and any registering from now on, to finish.
    pub fn shut_down(&self) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.shutting_down = true;
        for (_, wake) in live.by_id.values() {
            wake.raise(wake::SHUTDOWN);
        }
    }
}

/// One listening socket: plain MQTT, or MQTT over TLS.
struct Listener {
    socket: TcpListener,
    tls: Option<Arc<tls::Tls>>,
    anonymous: bool,
    per_address: Arc<limits::PerAddress>,
}

pub struct FrontDoor {
    listeners: Vec<Listener>,
    shared: Arc<Shared>,
    max_connections: usize,
    /// The buffer writer, which saves sessions.
    control: mpsc::Sender<Control>,
}

/// What SIGHUP reloads in the front door: the TLS files, the password file and the policies.
#[derive(Clone)]
pub struct Reloadable {
    tls: Option<Arc<tls::Tls>>,
    auth: Arc<Auth>,
}

impl Reloadable {
    pub fn reload(&self) {
        if let Some(t) = &self.tls {
            t.reload();
        }
        self.auth.reload();
    }
}

impl FrontDoor {
    pub async fn bind(
        cfg: &FrontDoorConfig,
        limits: &Limits,
        router: Arc<Router>,
        ingest: mpsc::Sender<Envelope>,
        saved: Saved,
        control: mpsc::Sender<Control>,
    ) -> anyhow::Result<Self> {
        let auth = Auth::load(cfg.auth.clone())?;
        let per_address = |listen| {
            Arc::new(limits::PerAddress::new(
                cfg.max_connections_per_address,
                cfg.limit_loopback,
                listen,
            ))
        };
        let mut listeners = Vec::new();
        if let Some(listen) = cfg.listen {
            let socket = TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen for MQTT on {listen}"))?;
            info!(%listen, anonymous = cfg.anonymous, "MQTT front door listening (3.1.1 and 5; PUBACK after commit)");
            listeners.push(Listener {
                socket,
                tls: None,
                anonymous: cfg.anonymous,
                per_address: per_address(listen),
            });
        }
        if let Some(t) = &cfg.tls {
            let loaded = Arc::new(tls::Tls::load(t)?);
            let socket = TcpListener::bind(t.listen)
                .await
                .with_context(|| format!("cannot listen for MQTT over TLS on {}", t.listen))?;
            info!(listen = %t.listen, client_certs = ?t.client_certs, anonymous = t.anonymous, "MQTT over TLS listening");
            listeners.push(Listener {
                socket,
                tls: Some(loaded),
                anonymous: t.anonymous,
                per_address: per_address(t.listen),
            });
        }
        let pubsub = Arc::new(pubsub::PubSub::default());
        let (sessions, retained) = pubsub.restore(saved);
        if sessions + retained > 0 {
            info!(
                sessions,
                retained, "restored persistent MQTT sessions and retained messages"
            );
        }
        Ok(Self {
            control,
            listeners,
            max_connections: cfg.max_connections,
            shared: Arc::new(Shared {
                router,
                ingest,
                receive_maximum: cfg.receive_maximum,
                connect_timeout: cfg.connect_timeout,
                packet_timeout: cfg.packet_timeout,
                partial_budget: Arc::new(tokio::sync::Semaphore::new(
                    (cfg.partial_packet_budget / 1024) as usize,
                )),
                // Room for the topic and headers around the largest accepted payload, so an
                // oversized payload is refused with a reason rather than a disconnect.
                max_packet: (limits.max_payload * 2 + 64 * 1024).min(256 * 1024 * 1024),
                sessions: Sessions::default(),
                pubsub,
                auth,
                max_bytes_per_second: cfg.max_bytes_per_second,
            }),
        })
    }

    /// What SIGHUP reloads.
    pub fn reloadable(&self) -> Reloadable {
        Reloadable {
            tls: self.listeners.iter().find_map(|l| l.tls.clone()),
            auth: Arc::clone(&self.shared.auth),
        }
    }

    /// The addresses listened on, plain first (tests bind port 0).
    pub fn local_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.socket.local_addr().ok())
            .collect()
    }

    /// Accepts connections until shutdown, then waits for every connection to finish.
    pub async fn run(self, shutdown: Shutdown) {
        let permits = Arc::new(Semaphore::new(self.max_connections));
        // Local fan-out, off the buffer writer's thread; it ends with the front door.
        let fanout = {
            let pubsub = Arc::clone(&self.shared.pubsub);
            tokio::spawn(async move { pubsub.run_fanout().await })
        };
        let saver = tokio::spawn(persist::run(
            Arc::clone(&self.shared.pubsub),
            self.control.clone(),
        ));
        let mut accepting = JoinSet::new();
        for listener in self.listeners {
            accepting.spawn(accept_loop(
                listener,
                Arc::clone(&self.shared),
                Arc::clone(&permits),
                self.max_connections,
                shutdown.clone(),
            ));
        }
        // At shutdown each accept loop hands back its connections, which are finishing.
        while let Some(r) = accepting.join_next().await {
            if let Ok(mut set) = r {
                while set.join_next().await.is_some() {}
            }
        }
        let pubsub = Arc::clone(&self.shared.pubsub);
        drop(self.shared);
        fanout.abort();
        // Every connection has put back what it had in flight: save the sessions as they are.
        saver.abort();
        persist::save(&pubsub, &self.control).await;
        info!("MQTT front door stopped");
    }
}

/// One TLS connection: the handshake (its state boxed, freed once done), then the device.
async fn serve_tls<H: Send + 'static>(
    tls: Arc<tls::Tls>,
    start: Box<connection::Start<tokio::net::TcpStream, H>>,
) {
    let connection::Start {
        stream,
        mut peer,
        shared,
        held,
    } = *start;
    let addr = peer.addr;
    let deadline = peer.deadline;
    // No limit on handshakes in progress beyond the connection limits: one waiting for a
    // silent client costs a socket and this boxed state, and a turn-taking limit would let a
    // few silent clients stall everyone's handshake (measured: it did not lower the peak
    // memory of a 10,000-device storm either).
    let handshake = Box::pin(tls.accept(stream));
    let accepted = tokio::time::timeout_at(deadline, handshake).await;
    // Taken apart in a function of its own: the handshake's result (the TLS stream, over a KiB)
    // is not kept in the task beside the connection it was moved into.
    let Some((stream, cert)) = handshake_done(accepted, addr) else {
        drop(held);
        return;
    };
    peer.certificate = cert.map(Box::new);
    let start = Box::new(connection::Start {
        stream,
        peer,
        shared,
        held,
    });
    connection::serve(start).await;
}

type Handshake = Result<
    Result<
        (
            tls_stream::TlsStream,
            Option<crate::ingress::auth::PeerCertificate>,
        ),
        tls::HandshakeError,
    >,
    tokio::time::error::Elapsed,
>;

/// The handshake's stream and client certificate; a failure is counted and logged.
fn handshake_done(
    accepted: Handshake,
    addr: Option<std::net::SocketAddr>,
) -> Option<(
    tls_stream::TlsStream,
    Option<crate::ingress::auth::PeerCertificate>,
)> {
    match accepted {
        Ok(Ok(done)) => Some(done),
        Ok(Err(e)) => {
            let reason = match &e {
                tls::HandshakeError::Revoked { .. } => "revoked",
                tls::HandshakeError::Failed(_) => "tls_handshake",
            };
            metrics::counter!(crate::metrics::AUTH_REFUSED, "action" => "connect", "reason" => reason)
                .increment(1);
            static LOG: crate::ratelimit::LogLimit = crate::ratelimit::LogLimit::new();
            if let Some(suppressed) = LOG.allow() {
                warn!(peer = ?addr, error = %e, suppressed, "TLS connection refused");
            }
            None
        }
        Err(_) => {
            metrics::counter!(crate::metrics::AUTH_REFUSED, "action" => "connect", "reason" => "tls_handshake_timeout")
                .increment(1);
            debug!(peer = ?addr, "no TLS handshake within the connect timeout");
            None
        }
    }
}

/// Accepts on one listener until shutdown; returns its connections, still running.
async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    max_connections: usize,
    mut shutdown: Shutdown,
) -> JoinSet<()> {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.socket.accept() => a,
            _ = shutdown.wait() => {
                shared.sessions.shut_down();
                break;
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            static LOG: crate::ratelimit::LogLimit = crate::ratelimit::LogLimit::new();
            if let Some(suppressed) = LOG.allow() {
                warn!(
                    max = max_connections,
                    suppressed, "connection refused: ingress.frontdoor.max_connections reached"
                );
            }
            drop(stream);
            continue;
        };
        let Some(slot) = listener.per_address.admit(addr.ip()) else {
            metrics::counter!(crate::metrics::AUTH_REFUSED, "action" => "accept", "reason" => "per_address_limit").increment(1);
            drop(stream);
            continue;
        };
        let shared = Arc::clone(&shared);
        let _ = stream.set_nodelay(true);
        // The TLS handshake and CONNECT together within the connect timeout: a slow or silent
        // client cannot hold its slot longer than that.
        let peer = connection::Peer {
            addr: Some(addr),
            certificate: None,
            anonymous: listener.anonymous,
            deadline: tokio::time::Instant::now() + shared.connect_timeout,
        };
        let start = Box::new(connection::Start {
            stream,
            peer,
            shared,
            held: (slot, permit),
        });
        // One task type per kind of listener, each no bigger than its own path needs (10,000
        // idle devices are 10,000 of them).
        match &listener.tls {
            None => connections.spawn(connection::serve(start)),
            Some(tls) => connections.spawn(serve_tls(Arc::clone(tls), start)),
        };
    }
    drop(listener);
    connections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_connection_of_a_client_id_wins() {
        let s = Sessions::default();
        let (wa, wb) = (Arc::new(Wake::default()), Arc::new(Wake::default()));
        let a = s.register("dev", &wa);
        let b = s.register("dev", &wb);
        // The older one was told to close, the newer one was not.
        assert_eq!(wa.take(), wake::TAKEN_OVER);
        assert_eq!(wb.take(), 0);
        // The older one leaving does not remove the newer one.
        s.unregister("dev", a);
        assert!(s.live.lock().unwrap().by_id.contains_key("dev"));
        s.unregister("dev", b);
        assert!(!s.live.lock().unwrap().by_id.contains_key("dev"));
    }

    #[test]
    fn shutdown_reaches_live_connections_and_late_ones() {
        let s = Sessions::default();
        let (wa, wb) = (Arc::new(Wake::default()), Arc::new(Wake::default()));
        s.register("a", &wa);
        s.shut_down();
        assert_eq!(wa.take(), wake::SHUTDOWN);
        // One that was still in its CONNECT exchange is told as it registers.
        s.register("b", &wb);
        assert_eq!(wb.take(), wake::SHUTDOWN);
    }
}
