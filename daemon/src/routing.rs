//! Routing: which named streams a message belongs to (MQTT topic filters), its partition key
//! (IoT Core substitution templates), and the checks every message passes before it is buffered.

use crate::config::{Limits, PayloadFormat, StreamConfig};
use crate::rules::value::Value;
use crate::rules::{error_message, Applied, Context};
use crate::templates::topic::TopicFilter;

/// Why ingress refused a message. The label is the `reason` of the rejected-messages metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    PayloadTooLarge,
    BadTopic,
    MalformedPayload,
    NoRoute,
    BufferFull,
    /// A stream's rule failed on the message and the stream has no `error_stream`.
    RuleFailed,
}

impl Reject {
    pub fn label(self) -> &'static str {
        match self {
            Reject::PayloadTooLarge => "payload_too_large",
            Reject::BadTopic => "bad_topic",
            Reject::MalformedPayload => "malformed_payload",
            Reject::NoRoute => "no_route",
            Reject::BufferFull => "buffer_full",
            Reject::RuleFailed => "rule_failed",
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
    /// What the stream's rule made of the payload; None: the payload as it came.
    pub payload: Option<Vec<u8>>,
}

/// The streams of the config, matched in order.
#[derive(Debug, Clone)]
pub struct Router {
    streams: Vec<StreamConfig>,
    limits: Limits,
    /// `edgehose_messages_received_total`, looked up once: a lookup per message cost 2% of the
    /// daemon's CPU at max rate.
    pub(crate) received: metrics::Counter,
    /// Per stream: messages its rule dropped (WHERE), and messages it failed on.
    rule_dropped: Vec<Option<metrics::Counter>>,
    rule_failed: Vec<Option<metrics::Counter>>,
    /// The top-level payload fields the rules read (parsed; the rest is only checked); None:
    /// a rule reads them all.
    fields: Option<Vec<String>>,
}

impl Router {
    /// Build it after the metrics recorder is installed (it keeps a counter handle).
    pub fn new(streams: Vec<StreamConfig>, limits: Limits) -> Self {
        // Only streams with a rule have these counters (a stream without one never counts).
        let per_stream = |name: &'static str| {
            streams
                .iter()
                .map(|s| {
                    s.rule
                        .as_ref()
                        .map(|_| metrics::counter!(name, "stream" => s.name.clone()))
                })
                .collect()
        };
        let mut fields = Some(Vec::new());
        for rule in streams.iter().filter_map(|s| s.rule.as_ref()) {
            match (rule.reads_payload().then(|| rule.fields()), &mut fields) {
                (None, _) | (_, None) => {}
                (Some(None), f) => *f = None,
                (Some(Some(more)), Some(all)) => all.extend(more),
            }
        }
        if let Some(f) = &mut fields {
            f.sort();
            f.dedup();
        }
        Self {
            fields,
            rule_dropped: per_stream(crate::metrics::RULE_DROPPED),
            rule_failed: per_stream(crate::metrics::RULE_FAILED),
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
    /// each of them, like an IoT Core message that several rules select. A stream with a rule
    /// gets what the rule selects; a message every matching rule dropped is accepted with no
    /// route (it is not refused: the rules chose not to keep it).
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
        let mut matched = false;
        // The payload as JSON, parsed at most once for all the streams that read it.
        let mut doc: Option<Option<Value>> = None;
        for (index, stream) in self.streams.iter().enumerate() {
            if !stream.topics.iter().any(|f| f.matches(topic)) {
                continue;
            }
            matched = true;
            if stream.payload_format == PayloadFormat::Json
                || stream.rule.as_ref().is_some_and(|r| r.reads_payload())
            {
                let parsed = doc.get_or_insert_with(|| match &self.fields {
                    Some(fields) => Value::parse_fields(payload, fields).ok(),
                    None => Value::parse(payload).ok(),
                });
                if parsed.is_none() && stream.payload_format == PayloadFormat::Json {
                    return Err(Reject::MalformedPayload);
                }
            }
            let Some(rule) = &stream.rule else {
                routes.push(Route {
                    stream: index,
                    partition_key: stream.partition_key.render(topic, client_id, arrival_ms),
                    payload: None,
                });
                continue;
            };
            let ctx = Context {
                topic,
                client_id,
                timestamp_ms: arrival_ms,
            };
            let parsed = doc.as_ref().and_then(|d| d.as_ref());
            match rule.apply(parsed.unwrap_or(&Value::Undefined), &ctx) {
                Applied::Selected(out) => routes.push(Route {
                    // A windowed rule's record is an input row for its window stage.
                    stream: stream.window_input.unwrap_or(index),
                    partition_key: stream.partition_key.render(topic, client_id, arrival_ms),
                    payload: out,
                }),
                Applied::Dropped => {
                    if let Some(c) = &self.rule_dropped[index] {
                        c.increment(1);
                    }
                }
                Applied::Failed(error) => {
                    if let Some(c) = &self.rule_failed[index] {
                        c.increment(1);
                    }
                    log_rule_failure(&stream.name, topic, &error);
                    let Some(target) = stream.error_stream else {
                        return Err(Reject::RuleFailed);
                    };
                    routes.push(Route {
                        stream: target,
                        partition_key: self.streams[target]
                            .partition_key
                            .render(topic, client_id, arrival_ms),
                        payload: Some(error_message(
                            &stream.name,
                            topic,
                            client_id,
                            payload,
                            &error,
                        )),
                    });
                }
            }
        }
        if !matched {
            return Err(Reject::NoRoute);
        }
        Ok(routes)
    }
}

/// Logs a rule failure at WARN at most once a second (the metric counts every one). The error
/// quotes at most 100 characters of a value, escaped as JSON.
fn log_rule_failure(stream: &str, topic: &str, error: &str) {
    static LOG: crate::ratelimit::LogLimit = crate::ratelimit::LogLimit::new();
    if let Some(suppressed) = LOG.allow() {
        tracing::warn!(
            stream,
            topic = ?topic,
            error,
            suppressed,
            "rule failed on a message (further failures this second are only counted in edgehose_rule_failures_total)"
        );
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
            rule: None,
            error_stream: None,
            window_input: None,
            allowed_lateness: std::time::Duration::ZERO,
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

    #[test]
    fn rules_reshape_drop_and_fail() {
        let stream = |name: &str, rule: Option<&str>, error_stream| StreamConfig {
            name: name.into(),
            topics: vec![TopicFilter::parse("s/#").unwrap()],
            destinations: vec!["d".into()],
            partition_key: PartitionKeyTemplate::parse("${topic(2)}").unwrap(),
            payload_format: PayloadFormat::Json,
            rule: rule.map(|r| std::sync::Arc::new(crate::rules::Rule::parse(r).unwrap())),
            error_stream,
            window_input: None,
            allowed_lateness: std::time::Duration::ZERO,
        };
        let r = Router::new(
            vec![
                stream("errors", None, None),
                stream("hot", Some("SELECT t FROM 's/#' WHERE hot"), Some(0)),
                stream("strict", Some("SELECT * FROM 's/#' WHERE t"), None),
            ],
            Limits {
                max_payload: 1000,
                max_topic_length: 256,
                max_topic_levels: 8,
            },
        );
        let hot = Router::new(r.streams[..2].to_vec(), r.limits);
        // Selected: the rule's output; the plain stream gets the payload as it came.
        let routes = hot
            .route("s/d1", br#"{"t":35,"hot":true}"#, None, 0)
            .unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].payload, None);
        assert_eq!(routes[1].payload.as_deref(), Some(&br#"{"t":35}"#[..]));
        // Dropped by WHERE: no route for it, and the message is not refused.
        let r2 = Router::new(r.streams[1..2].to_vec(), r.limits);
        assert_eq!(
            r2.route("s/d1", br#"{"t":3,"hot":false}"#, None, 0),
            Ok(vec![])
        );
        // Failed with an error stream: IoT Core's error message goes there.
        let routes = hot.route("s/d1", br#"{"hot":7}"#, Some("c"), 0).unwrap();
        let to_errors: Vec<_> = routes.iter().filter(|r| r.stream == 0).collect();
        assert_eq!(to_errors.len(), 2, "the plain copy and the error message");
        let msg: serde_json::Value =
            serde_json::from_slice(to_errors[1].payload.as_deref().unwrap()).unwrap();
        assert_eq!(msg["ruleName"], "hot");
        assert_eq!(msg["clientId"], "c");
        // Failed without one: refused.
        assert_eq!(
            r.route("s/d1", br#"{"t":7}"#, None, 0),
            Err(Reject::RuleFailed)
        );
        // A JSON stream still refuses what is not JSON.
        assert_eq!(
            r.route("s/d1", b"{not", None, 0),
            Err(Reject::MalformedPayload)
        );
    }
}
