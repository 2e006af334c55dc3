//! Local publish/subscribe for devices on the front door: what a device publishes reaches the
//! local subscribers whose filters match, *after* it is committed; retained messages are kept
//! (the last per topic; an empty payload clears it) and sent to new matching subscriptions.
//!
//! Delivery to subscribers is QoS 0 and never slows publishers: each subscriber has a bounded
//! queue, and what does not fit is counted (`edgehose_local_fanout_dropped_total`).
//!
//! Why not rumqttd's local links, as first planned: rumqttd 0.20 gives an embedder no way to
//! disconnect a local link (each closed subscriber would hold a router slot forever), subscribes
//! local links with `RetainForwardRule::Never` (retained messages never reach them), and offers
//! no clean-session choice for them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::metrics as m;
use crate::routing::TopicFilter;

/// Messages queued per subscribing connection before fan-out drops for it.
pub const SUBSCRIBER_QUEUE: usize = 1024;

#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: Bytes,
    pub payload: Bytes,
    pub retain: bool,
}

struct Subscriber {
    filters: Vec<TopicFilter>,
    tx: mpsc::Sender<Delivery>,
}

#[derive(Default)]
pub struct PubSub {
    inner: Mutex<Inner>,
    /// Connections with at least one subscription: lets publishers skip the lock.
    subscribers: AtomicUsize,
}

#[derive(Default)]
struct Inner {
    subscribers: HashMap<u64, Subscriber>,
    retained: HashMap<Bytes, Bytes>,
}

impl PubSub {
    /// Whether a committed message with this retain flag needs `publish`.
    pub fn wants(&self, retain: bool) -> bool {
        retain || self.subscribers.load(Ordering::Relaxed) > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fans a committed message out to matching subscribers and keeps it if retained.
    pub fn publish(&self, topic: Bytes, payload: Bytes, retain: bool) {
        let mut inner = self.lock();
        if retain {
            if payload.is_empty() {
                inner.retained.remove(&topic);
            } else {
                inner.retained.insert(topic.clone(), payload.clone());
            }
        }
        let Ok(text) = std::str::from_utf8(&topic) else {
            return;
        };
        let mut dropped = 0u64;
        for sub in inner.subscribers.values() {
            if sub.filters.iter().any(|f| f.matches(text)) {
                let d = Delivery {
                    topic: topic.clone(),
                    payload: payload.clone(),
                    retain: false,
                };
                if sub.tx.try_send(d).is_err() {
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            metrics::counter!(m::LOCAL_FANOUT_DROPPED).increment(dropped);
        }
    }

    /// Adds filters for a connection; returns the retained messages they match (to send after
    /// the SUBACK).
    pub fn subscribe(
        &self,
        conn: u64,
        filters: &[TopicFilter],
        tx: &mpsc::Sender<Delivery>,
    ) -> Vec<Delivery> {
        let mut inner = self.lock();
        let sub = inner.subscribers.entry(conn).or_insert_with(|| {
            self.subscribers.fetch_add(1, Ordering::Relaxed);
            Subscriber {
                filters: Vec::new(),
                tx: tx.clone(),
            }
        });
        for f in filters {
            if !sub.filters.contains(f) {
                sub.filters.push(f.clone());
            }
        }
        let mut out = Vec::new();
        for (topic, payload) in &inner.retained {
            let Ok(text) = std::str::from_utf8(topic) else {
                continue;
            };
            if filters.iter().any(|f| f.matches(text)) {
                out.push(Delivery {
                    topic: topic.clone(),
                    payload: payload.clone(),
                    retain: true,
                });
            }
        }
        out
    }

    pub fn unsubscribe(&self, conn: u64, filters: &[String]) {
        let mut inner = self.lock();
        if let Some(sub) = inner.subscribers.get_mut(&conn) {
            sub.filters
                .retain(|f| !filters.iter().any(|u| u == f.as_str()));
        }
    }

    pub fn remove(&self, conn: u64) {
        if self.lock().subscribers.remove(&conn).is_some() {
            self.subscribers.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    #[tokio::test]
    async fn matching_subscribers_get_committed_messages_and_retained_ones_on_subscribe() {
        let ps = PubSub::default();
        assert!(!ps.wants(false));
        let (tx, mut rx) = mpsc::channel(4);
        assert!(ps.subscribe(1, &[f("sensors/+/telemetry")], &tx).is_empty());
        assert!(ps.wants(false));
        ps.publish(
            Bytes::from_static(b"sensors/d1/telemetry"),
            Bytes::from_static(b"a"),
            false,
        );
        ps.publish(
            Bytes::from_static(b"other"),
            Bytes::from_static(b"b"),
            false,
        );
        ps.publish(
            Bytes::from_static(b"config/d1"),
            Bytes::from_static(b"v1"),
            true,
        );
        let d = rx.try_recv().unwrap();
        assert_eq!(&d.payload[..], b"a");
        assert!(rx.try_recv().is_err());

        let (tx2, _rx2) = mpsc::channel(4);
        let retained = ps.subscribe(2, &[f("config/#")], &tx2);
        assert_eq!(retained.len(), 1);
        assert!(retained[0].retain);
        // An empty retained payload clears it.
        ps.publish(Bytes::from_static(b"config/d1"), Bytes::new(), true);
        assert!(ps.subscribe(3, &[f("config/#")], &tx2).is_empty());

        ps.unsubscribe(1, &["sensors/+/telemetry".into()]);
        ps.publish(
            Bytes::from_static(b"sensors/d1/telemetry"),
            Bytes::from_static(b"c"),
            false,
        );
        assert!(rx.try_recv().is_err());
        ps.remove(1);
        ps.remove(2);
        ps.remove(3);
        assert!(!ps.wants(false));
    }

    #[test]
    fn a_full_subscriber_queue_drops_for_that_subscriber_only() {
        let ps = PubSub::default();
        let (slow, _keep) = mpsc::channel(1);
        let (fast, mut fast_rx) = mpsc::channel(8);
        ps.subscribe(1, &[f("#")], &slow);
        ps.subscribe(2, &[f("#")], &fast);
        for _ in 0..3 {
            ps.publish(Bytes::from_static(b"t"), Bytes::from_static(b"x"), false);
        }
        let mut n = 0;
        while fast_rx.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 3);
    }
}
