//! Ingress: MQTT messages in, [`Envelope`]s out to the buffer. Three modes: [`frontdoor`],
//! edgehose's own MQTT listener (PUBACK after commit; the default), [`broker`], the embedded
//! rumqttd (PUBACK before commit), and [`client`], a client of an external broker. All check
//! and route every message here, in [`admit`]. The front door checks who a device is and what it
//! may do through [`auth`].

pub mod auth;
#[cfg(feature = "broker")]
pub mod broker;
pub mod client;
pub mod frontdoor;

use tracing::warn;

use crate::clock::now_ms;
use crate::message::{Ack, Envelope, NewRecord};
use crate::routing::Router;

/// Checks and routes one message. A refused message still becomes an envelope, so its ack
/// completes in arrival order after the messages before it are committed.
pub fn admit(
    router: &Router,
    topic: &[u8],
    payload: &bytes::Bytes,
    client_id: Option<&str>,
    ack: Ack,
) -> Envelope {
    router.received.increment(1);
    let arrival_ms = now_ms();
    let records = std::str::from_utf8(topic)
        .map_err(|_| crate::routing::Reject::BadTopic)
        .and_then(|topic| {
            let routes = router.route(topic, payload, client_id, arrival_ms)?;
            Ok(routes
                .into_iter()
                .map(|r| NewRecord {
                    stream: r.stream,
                    arrival_ms,
                    partition_key: r.partition_key,
                    payload: r
                        .payload
                        .map_or_else(|| payload.clone(), bytes::Bytes::from),
                })
                .collect())
        });
    if let Err(reason) = &records {
        log_rejection(reason.label(), topic, payload.len());
    }
    Envelope::new(records, ack)
}

/// Logs a refused message at WARN at most once a second; the metric counts every one.
fn log_rejection(reason: &str, topic: &[u8], payload_len: usize) {
    static LOG: crate::ratelimit::LogLimit = crate::ratelimit::LogLimit::new();
    if let Some(suppressed) = LOG.allow() {
        warn!(
            reason,
            topic = ?String::from_utf8_lossy(&topic[..topic.len().min(300)]),
            payload_len,
            suppressed,
            "message rejected (further rejections this second are only counted in edgehose_messages_rejected_total)"
        );
    }
}
