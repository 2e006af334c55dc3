//! Routing: which named streams a message belongs to (MQTT topic filters), its partition key
//! (IoT Core substitution templates), and the checks every message passes before it is buffered.

use crate::config::{Limits, PayloadFormat, StreamConfig};

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

/// A parsed MQTT topic filter (`+` one level, `#` the rest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    text: String,
}

impl TopicFilter {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("a topic filter must not be empty".into());
        }
        let levels: Vec<&str> = text.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
                return Err(format!(
                    "{text:?}: '#' must be a whole level and the last one"
                ));
            }
            if level.contains('+') && *level != "+" {
                return Err(format!("{text:?}: '+' must be a whole level"));
            }
        }
        Ok(Self { text: text.into() })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// MQTT 3.1.1 §4.7: wildcards at the first level do not match `$`-topics.
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && !self.text.starts_with('$') {
            return false;
        }
        let mut f = self.text.split('/');
        let mut t = topic.split('/');
        loop {
            match (f.next(), t.next()) {
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(fl), Some(tl)) if fl == tl => {}
                (None, None) => return true,
                _ => return false,
            }
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

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// `${topic()}` is the whole topic, `${topic(n)}` the n-th level (1-based).
    Topic(Option<usize>),
    ClientId,
    Timestamp,
}

/// An IoT Core substitution template such as `${topic(2)}-${timestamp()}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionKeyTemplate {
    parts: Vec<Part>,
}

impl PartitionKeyTemplate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            if start > 0 {
                parts.push(Part::Literal(rest[..start].into()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unterminated \"${{\" in {text:?}"))?;
            let expr = after[..end].trim();
            parts.push(match expr {
                "topic()" => Part::Topic(None),
                "clientid()" => Part::ClientId,
                "timestamp()" => Part::Timestamp,
                _ => {
                    let n = expr
                        .strip_prefix("topic(")
                        .and_then(|s| s.strip_suffix(')'))
                        .and_then(|n| n.trim().parse::<usize>().ok())
                        .filter(|n| *n >= 1)
                        .ok_or_else(|| {
                            format!(
                                "unknown expression \"${{{expr}}}\"; supported: ${{topic()}}, \
                                 ${{topic(n)}} (n >= 1), ${{clientid()}}, ${{timestamp()}}"
                            )
                        })?;
                    Part::Topic(Some(n))
                }
            });
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.into()));
        }
        if parts.is_empty() {
            return Err("must not be empty".into());
        }
        Ok(Self { parts })
    }

    pub fn uses_client_id(&self) -> bool {
        self.parts.contains(&Part::ClientId)
    }

    /// Evaluates the template. A missing topic level evaluates to an empty string, as in IoT Core.
    /// The result is cut to 256 characters, Kinesis's partition-key limit (AWS-SEMANTICS 11).
    pub fn render(&self, topic: &str, client_id: Option<&str>, timestamp_ms: i64) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Topic(None) => out.push_str(topic),
                Part::Topic(Some(n)) => out.push_str(topic.split('/').nth(n - 1).unwrap_or("")),
                Part::ClientId => out.push_str(client_id.unwrap_or("")),
                Part::Timestamp => out.push_str(&timestamp_ms.to_string()),
            }
        }
        if let Some((cut, _)) = out.char_indices().nth(256) {
            out.truncate(cut);
        }
        out
    }
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

    fn limits() -> Limits {
        Limits {
            max_payload: 16,
            max_topic_length: 256,
            max_topic_levels: 8,
        }
    }

    #[test]
    fn filters_match_like_mqtt() {
        let f = |s| TopicFilter::parse(s).unwrap();
        assert!(f("sensors/+/telemetry").matches("sensors/d1/telemetry"));
        assert!(!f("sensors/+/telemetry").matches("sensors/d1/x/telemetry"));
        assert!(f("sensors/#").matches("sensors"));
        assert!(f("sensors/#").matches("sensors/a/b"));
        assert!(f("#").matches("a"));
        assert!(!f("#").matches("$SYS/x"));
        assert!(!f("+/x").matches("$aws/x"));
        assert!(!f("a/b").matches("a/b/c"));
        assert!(f("a/+").matches("a/"));
    }

    #[test]
    fn bad_filters_are_refused() {
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b#").is_err());
        assert!(TopicFilter::parse("a/+b").is_err());
        assert!(TopicFilter::parse("").is_err());
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

    #[test]
    fn templates_substitute_like_iot_core() {
        let t = PartitionKeyTemplate::parse("${topic(2)}/${clientid()}@${timestamp()}").unwrap();
        assert_eq!(t.render("sensors/d7/telemetry", Some("c1"), 42), "d7/c1@42");
        let t = PartitionKeyTemplate::parse("${topic(9)}x").unwrap();
        assert_eq!(t.render("a/b", None, 0), "x");
        let t = PartitionKeyTemplate::parse("${topic()}").unwrap();
        assert_eq!(t.render("a/b", None, 0), "a/b");
        assert!(PartitionKeyTemplate::parse("${topic(0)}").is_err());
        assert!(PartitionKeyTemplate::parse("${newuuid()}").is_err());
        assert!(PartitionKeyTemplate::parse("${topic(1)").is_err());
        let long = PartitionKeyTemplate::parse("${topic()}").unwrap();
        assert_eq!(long.render(&"é".repeat(300), None, 0).chars().count(), 256);
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
