//! MQTT topic filters and IoT Core substitution templates (`${topic(2)}`): parsed by the config,
//! evaluated by routing and the front door's subscriptions.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
