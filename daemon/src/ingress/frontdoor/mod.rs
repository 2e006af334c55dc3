//! The front door: edgehose's own MQTT listener (3.1.1 and 5 on one port), so that a PUBACK
//! means "committed to SQLite". Packets are parsed and written by rumqttc's `mqttbytes` codecs
//! ([`codec`]); each connection is a task ([`connection`]); a client id has at most one live
//! connection, the newest ([`Sessions`]); committed messages reach local subscribers through
//! [`pubsub`], its filters indexed by [`filter_index`]; persistent sessions and retained
//! messages are saved in the buffer file ([`persist`]).

pub mod codec;
pub mod connection;
pub mod filter_index;
pub mod persist;
pub mod pubsub;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::buffer::sessions::Saved;
use crate::buffer::Control;
use crate::config::{FrontDoorConfig, Limits};
use crate::message::Envelope;
use crate::routing::Router;
use crate::shutdown::Shutdown;

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
}

/// Live connections by client id. Registering an id that is live tells the older connection
/// to close.
#[derive(Default)]
pub struct Sessions {
    live: Mutex<HashMap<String, (u64, Arc<Notify>)>>,
    next: AtomicU64,
}

impl Sessions {
    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    pub fn register(&self, client_id: &str) -> (u64, Arc<Notify>) {
        let id = self.next_id();
        let notify = Arc::new(Notify::new());
        let old = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_id.to_string(), (id, Arc::clone(&notify)));
        if let Some((_, older)) = old {
            older.notify_one();
        }
        (id, notify)
    }

    pub fn unregister(&self, client_id: &str, id: u64) {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.get(client_id).is_some_and(|(i, _)| *i == id) {
            live.remove(client_id);
        }
    }
}

pub struct FrontDoor {
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
    /// The buffer writer, which saves sessions.
    control: mpsc::Sender<Control>,
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
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("cannot listen for MQTT on {}", cfg.listen))?;
        let pubsub = Arc::new(pubsub::PubSub::default());
        let (sessions, retained) = pubsub.restore(saved);
        if sessions + retained > 0 {
            info!(
                sessions,
                retained, "restored persistent MQTT sessions and retained messages"
            );
        }
        info!(listen = %cfg.listen, "MQTT front door listening (3.1.1 and 5; PUBACK after commit)");
        Ok(Self {
            control,
            listener,
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
            }),
        })
    }

    /// Accepts connections until shutdown, then waits for every connection to finish.
    pub async fn run(self, mut shutdown: Shutdown) {
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let mut connections = JoinSet::new();
        // Local fan-out, off the buffer writer's thread; it ends with the front door.
        let fanout = {
            let pubsub = Arc::clone(&self.shared.pubsub);
            tokio::spawn(async move { pubsub.run_fanout().await })
        };
        let saver = tokio::spawn(persist::run(
            Arc::clone(&self.shared.pubsub),
            self.control.clone(),
        ));
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = shutdown.wait() => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let (stream, _) = match accepted {
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
                        max = self.max_connections,
                        suppressed, "connection refused: ingress.frontdoor.max_connections reached"
                    );
                }
                drop(stream);
                continue;
            };
            let shared = Arc::clone(&self.shared);
            let shutdown = shutdown.clone();
            connections.spawn(async move {
                connection::serve(stream, shared, shutdown).await;
                drop(permit);
            });
        }
        drop(self.listener);
        let pubsub = Arc::clone(&self.shared.pubsub);
        drop(self.shared);
        while connections.join_next().await.is_some() {}
        fanout.abort();
        // Every connection has put back what it had in flight: save the sessions as they are.
        saver.abort();
        persist::save(&pubsub, &self.control).await;
        info!("MQTT front door stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_connection_of_a_client_id_wins() {
        use std::future::Future;
        let s = Sessions::default();
        let (a, a_notify) = s.register("dev");
        let (b, _) = s.register("dev");
        // The older one was told to close (a permit is stored for it).
        let fut = a_notify.notified();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut fut = std::pin::pin!(fut);
        assert!(fut.as_mut().poll(&mut cx).is_ready());
        // The older one leaving does not remove the newer one.
        s.unregister("dev", a);
        assert!(s.live.lock().unwrap().contains_key("dev"));
        s.unregister("dev", b);
        assert!(!s.live.lock().unwrap().contains_key("dev"));
    }
}
