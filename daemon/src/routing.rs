//! Routing: which named streams a message belongs to (MQTT topic filters), its partition key
//! (IoT Core substitution templates), and the checks every message passes before it is buffered.

use crate::config::{Limits, PayloadFormat, StreamConfig};
use crate::templates::topic::TopicFilter;

/// Why ingress refused a message. The label is the `reason` of the rejected-messages metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    PayloadTooLarge,
    BadTopic,
    MalformedPayload,
    NoRoute,
    BufferFull,
}

impl Reject {
    pub fn label(self) -> &'static str {
        match self {
            Reject::PayloadTooLarge => "payload_too_large",
            Reject::BadTopic => "bad_topic",
            Reject::MalformedPayload => "malformed_payload",
            Reject::NoRoute => "no_route",
            Reject::BufferFull => "buffer_full",
        }
    }
}

/// Checks a publish topic against IoT Core's rules (AWS-SEMANTICS 18).
pub fn check_topic(topic: &str, limits: &Limits) -> Result<(), Reject> {
    if topic.is_empty()
        || topic.len() > limits.max_topic_length
        || topic.starts_with('$')
        || topic.contains(['+', '#', '\0'])
        || topic.split('/').count() > limits.max_topic_levels
    {
        return Err(Reject::BadTopic);
    }
    Ok(())
}

/// One stream a message was routed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub stream: usize,
    pub partition_key: String,
}

/// The streams of the config, matched in order.
#[derive(Debug, Clone)]
pub struct Router {
    streams: Vec<StreamConfig>,
    limits: Limits,
    /// `edgehose_messages_received_total`, looked up once: a lookup per message cost 2% of the
    /// daemon's CPU at max rate.
    pub(crate) received: metrics::Counter,
}

impl Router {
    /// Build it after the metrics recorder is installed (it keeps a counter handle).
    pub fn new(streams: Vec<StreamConfig>, limits: Limits) -> Self {
        Self {
            streams,
            limits,
            received: metrics::counter!(crate::metrics::RECEIVED),
        }
    }

    /// Every filter any stream listens to (for subscribing at the broker).
    pub fn filters(&self) -> impl Iterator<Item = &TopicFilter> {
        self.streams.iter().flat_map(|s| s.topics.iter())
    }

    /// Checks a message and finds its streams. A message that matches several streams goes to
    /// each of them, like an IoT Core message that several rules select.
    pub fn route(
        &self,
        topic: &str,
        payload: &[u8],
        client_id: Option<&str>,
        arrival_ms: i64,
    ) -> Result<Vec<Route>, Reject> {
        if payload.len() > self.limits.max_payload {
            return Err(Reject::PayloadTooLarge);
        }
        check_topic(topic, &self.limits)?;
        let mut routes = Vec::new();
        let mut json_checked = false;
        for (index, stream) in self.streams.iter().enumerate() {
            if !stream.topics.iter().any(|f| f.matches(topic)) {
                continue;
            }
            if stream.payload_format == PayloadFormat::Json && !json_checked {
                serde_json::from_slice::<serde::de::IgnoredAny>(payload)
                    .map_err(|_| Reject::MalformedPayload)?;
                json_checked = true;
            }
            routes.push(Route {
                stream: index,
                partition_key: stream.partition_key.render(topic, client_id, arrival_ms),
            });
        }
        if routes.is_empty() {
            return Err(Reject::NoRoute);
        }
        Ok(routes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::templates::topic::{PartitionKeyTemplate, TopicFilter};

    fn limits() -> Limits {
        Limits {
            max_payload: 16,
            max_topic_length: 256,
            max_topic_levels: 8,
        }
    }

    #[test]
    fn topics_are_checked_against_iot_core_limits() {
        let l = limits();
        assert!(check_topic("sensors/d1/telemetry", &l).is_ok());
        assert_eq!(check_topic("$aws/things", &l), Err(Reject::BadTopic));
        assert_eq!(check_topic("a/+/b", &l), Err(Reject::BadTopic));
        assert_eq!(check_topic("", &l), Err(Reject::BadTopic));
        assert_eq!(check_topic("1/2/3/4/5/6/7/8/9", &l), Err(Reject::BadTopic));
        assert!(check_topic("1/2/3/4/5/6/7/8", &l).is_ok());
        assert_eq!(check_topic(&"x".repeat(257), &l), Err(Reject::BadTopic));
    }

    fn router() -> Router {
        let stream = |name: &str, filter: &str, format| StreamConfig {
            name: name.into(),
            topics: vec![TopicFilter::parse(filter).unwrap()],
            destinations: vec!["d".into()],
            partition_key: PartitionKeyTemplate::parse("${topic(2)}").unwrap(),
            payload_format: format,
        };
        Router::new(
            vec![
                stream("json", "sensors/#", PayloadFormat::Json),
                stream("raw", "raw/#", PayloadFormat::Binary),
                stream("both", "sensors/+/telemetry", PayloadFormat::Binary),
            ],
            limits(),
        )
    }

    #[test]
    fn routing_checks_then_routes_to_every_matching_stream() {
        let r = router();
        let routes = r.route("sensors/d1/telemetry", b"{}", None, 0).unwrap();
        assert_eq!(routes.iter().map(|r| r.stream).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(routes[0].partition_key, "d1");
        assert_eq!(r.route("raw/x", b"\xff\x00", None, 0).unwrap()[0].stream, 1);
        assert_eq!(
            r.route("sensors/d1", b"{not json", None, 0),
            Err(Reject::MalformedPayload)
        );
        assert_eq!(r.route("other", b"{}", None, 0), Err(Reject::NoRoute));
        assert_eq!(
            r.route("raw/x", &[0u8; 17], None, 0),
            Err(Reject::PayloadTooLarge)
        );
        assert_eq!(r.route("raw/+", b"", None, 0), Err(Reject::BadTopic));
    }
}
