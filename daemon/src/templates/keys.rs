//! Object keys exactly as Firehose writes them (AWS-SEMANTICS 2-4):
//! `<evaluated prefix><stream>-<version>-yyyy-MM-dd-HH-mm-ss-<random><ext>`, in UTC.
//!
//! The "random" part is a UUID derived from the batch's identity (destination, version and the
//! ids of its first and last record), and the timestamps come from the arrival time of the
//! batch's oldest record. So a batch retried after a crash gets the very same key, and a retry
//! overwrites rather than duplicates.

use chrono::{DateTime, Datelike, Timelike, Utc};

/// Firehose's limit on an evaluated prefix.
pub const MAX_PREFIX_LEN: usize = 512;
/// The prefix Firehose uses, or appends to a prefix with no timestamp expression.
pub const DEFAULT_PREFIX: &str = "yyyy/MM/dd/HH/";

#[derive(Debug, Clone, PartialEq, Eq)]
enum PrefixPart {
    Literal(String),
    Timestamp(JavaPattern),
    RandomString,
    /// `!{partitionKeyFromQuery:NAME}`: index into the template's partition names.
    PartitionKey(usize),
    ErrorOutputType,
}

/// Which prefix a template is: the object prefix, or the error output prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixKind {
    Object,
    Error,
}

/// The most partition keys Firehose allows (AWS-SEMANTICS 8).
pub const MAX_PARTITION_KEYS: usize = 50;

/// A parsed Firehose S3 prefix with its `!{...}` expressions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixTemplate {
    parts: Vec<PrefixPart>,
    /// Dynamic partitioning keys, in order of first use.
    partition_names: Vec<String>,
}

impl PrefixTemplate {
    /// Parses a custom prefix; an empty one means Firehose's default `yyyy/MM/dd/HH/`, and one
    /// without a timestamp expression gets `yyyy/MM/dd/HH/` appended, as Firehose does.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_as(text, PrefixKind::Object)
    }

    /// Parses an object prefix or an error output prefix; the latter must contain
    /// `!{firehose:error-output-type}` and may not partition.
    pub fn parse_as(text: &str, kind: PrefixKind) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut partition_names: Vec<String> = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find("!{") {
            if start > 0 {
                parts.push(PrefixPart::Literal(rest[..start].into()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .ok_or_else(|| format!("unterminated \"!{{\" in {text:?}"))?;
            let expr = &after[..end];
            let part = if let Some(pattern) = expr.strip_prefix("timestamp:") {
                PrefixPart::Timestamp(JavaPattern::parse(pattern)?)
            } else if expr == "firehose:random-string" {
                PrefixPart::RandomString
            } else if expr == "firehose:error-output-type" {
                if kind != PrefixKind::Error {
                    return Err(
                        "!{firehose:error-output-type} is only allowed in an error output prefix"
                            .into(),
                    );
                }
                PrefixPart::ErrorOutputType
            } else if let Some(name) = expr.strip_prefix("partitionKeyFromQuery:") {
                if kind == PrefixKind::Error {
                    return Err(
                        "!{partitionKeyFromQuery:...} is not allowed in an error output prefix"
                            .into(),
                    );
                }
                let ok = !name.is_empty()
                    && name.split('.').all(|p| {
                        !p.is_empty()
                            && p.chars()
                                .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
                    });
                if !ok {
                    return Err(format!(
                        "!{{partitionKeyFromQuery:{name}}}: the key must name a JSON field (letters, digits, '_', '-', nested with '.')"
                    ));
                }
                let index = match partition_names.iter().position(|n| n == name) {
                    Some(i) => i,
                    None => {
                        partition_names.push(name.to_string());
                        partition_names.len() - 1
                    }
                };
                if partition_names.len() > MAX_PARTITION_KEYS {
                    return Err(format!(
                        "more than {MAX_PARTITION_KEYS} partition keys (Firehose's limit)"
                    ));
                }
                PrefixPart::PartitionKey(index)
            } else if expr.starts_with("partitionKeyFromLambda") {
                return Err(format!(
                    "!{{{expr}}} needs a transformation Lambda, which edgehose does not run; use !{{partitionKeyFromQuery:FIELD}}"
                ));
            } else {
                return Err(format!(
                    "unknown expression \"!{{{expr}}}\"; supported: !{{timestamp:PATTERN}}, !{{firehose:random-string}}, !{{partitionKeyFromQuery:FIELD}}"
                ));
            };
            parts.push(part);
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(PrefixPart::Literal(rest.into()));
        }
        if kind == PrefixKind::Error && !parts.contains(&PrefixPart::ErrorOutputType) {
            return Err("an error output prefix must contain !{firehose:error-output-type}".into());
        }
        if !parts.iter().any(|p| matches!(p, PrefixPart::Timestamp(_))) {
            parts.push(PrefixPart::Timestamp(JavaPattern::parse(DEFAULT_PREFIX)?));
        }
        Ok(Self {
            parts,
            partition_names,
        })
    }

    /// The JSON fields dynamic partitioning reads, in the order `evaluate` takes their values.
    pub fn partition_names(&self) -> &[String] {
        &self.partition_names
    }

    /// Evaluates the prefix for one object. Every timestamp expression gets the same instant.
    /// `partition` holds one value per [`Self::partition_names`].
    pub fn evaluate(
        &self,
        at: DateTime<Utc>,
        random: &str,
        partition: &[String],
        error_type: &str,
    ) -> Result<String, KeyError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                PrefixPart::Literal(s) => out.push_str(s),
                PrefixPart::Timestamp(p) => p.format_into(at, &mut out),
                PrefixPart::RandomString => out.push_str(random),
                PrefixPart::PartitionKey(i) => {
                    out.push_str(partition.get(*i).map(String::as_str).unwrap_or(""))
                }
                PrefixPart::ErrorOutputType => out.push_str(error_type),
            }
        }
        if out.chars().count() > MAX_PREFIX_LEN {
            return Err(KeyError::PrefixTooLong(out.chars().count()));
        }
        Ok(out)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("evaluated prefix is {0} characters; Firehose's limit is 512")]
    PrefixTooLong(usize),
}

/// How a destination names its objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPattern {
    pub prefix: PrefixTemplate,
    /// Where records that cannot be delivered go (Firehose's ErrorOutputPrefix).
    pub error_prefix: Option<PrefixTemplate>,
    /// The Firehose delivery-stream name that starts every object name.
    pub delivery_stream: String,
    /// `.gz` for gzip unless a file extension was configured.
    pub extension: String,
}

/// What identifies a batch, and so its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchId<'a> {
    pub destination: &'a str,
    pub version: i64,
    pub first_id: i64,
    pub last_id: i64,
    /// Arrival time (epoch ms) of the batch's oldest record.
    pub oldest_arrival_ms: i64,
}

/// The error output type Firehose writes for records that failed processing (AWS-SEMANTICS 5).
pub const PROCESSING_FAILED: &str = "processing-failed";

impl KeyPattern {
    /// The key of a batch's object (one partition of it, with dynamic partitioning).
    pub fn object_key(&self, batch: BatchId<'_>) -> Result<String, KeyError> {
        self.key(&self.prefix, batch, &[], "")
    }

    /// The key of one partition's object of a batch.
    pub fn partition_key(
        &self,
        batch: BatchId<'_>,
        partition: &[String],
    ) -> Result<String, KeyError> {
        self.key(&self.prefix, batch, partition, "")
    }

    /// The key of a batch's error object, when an error prefix is configured.
    pub fn error_key(&self, batch: BatchId<'_>) -> Option<Result<String, KeyError>> {
        let prefix = self.error_prefix.as_ref()?;
        Some(self.key(prefix, batch, &[], PROCESSING_FAILED))
    }

    fn key(
        &self,
        template: &PrefixTemplate,
        batch: BatchId<'_>,
        partition: &[String],
        error_type: &str,
    ) -> Result<String, KeyError> {
        let mut seed = format!(
            "{}/{}/{}/{}",
            batch.destination, batch.version, batch.first_id, batch.last_id
        );
        // Partition values and the error type make each object of a batch its own identity.
        for v in partition {
            seed.push('\0');
            seed.push_str(v);
        }
        if !error_type.is_empty() {
            seed.push('\u{1}');
            seed.push_str(error_type);
        }
        let uuid = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, seed.as_bytes());
        let at = DateTime::from_timestamp_millis(batch.oldest_arrival_ms).unwrap_or_default();
        // Firehose's random-string is 11 characters; take them from the same identity.
        let random: String = uuid.simple().to_string().chars().rev().take(11).collect();
        let prefix = template.evaluate(at, &random, partition, error_type)?;
        Ok(format!(
            "{prefix}{}-{}-{}-{}{}",
            self.delivery_stream,
            batch.version,
            at.format("%Y-%m-%d-%H-%M-%S"),
            uuid.hyphenated(),
            self.extension
        ))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternItem {
    Literal(String),
    /// A pattern letter and how many times it was repeated.
    Field(char, usize),
}

/// The subset of Java's `DateTimeFormatter` patterns that S3 prefixes use: `y`, `M`, `d`, `H`,
/// `m`, `s`, `S` (fraction), `D` (day of year), quoted literals, and any non-letter as itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JavaPattern {
    items: Vec<PatternItem>,
}

impl JavaPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let mut items = Vec::new();
        let chars: Vec<char> = pattern.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c == '\'' {
                // '' is a literal quote; 'text' is literal text.
                if chars.get(i + 1) == Some(&'\'') {
                    items.push(PatternItem::Literal("'".into()));
                    i += 2;
                    continue;
                }
                let close = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '\'')
                    .ok_or_else(|| {
                        format!("unterminated quote in timestamp pattern {pattern:?}")
                    })?;
                items.push(PatternItem::Literal(
                    chars[i + 1..i + 1 + close].iter().collect(),
                ));
                i += close + 2;
            } else if c.is_ascii_alphabetic() {
                let mut n = 1;
                while chars.get(i + n) == Some(&c) {
                    n += 1;
                }
                if !"yMdHmsSD".contains(c) {
                    return Err(format!(
                        "pattern letter '{c}' in {pattern:?} is not supported (supported: y M d H m s S D)"
                    ));
                }
                if c == 'M' && n > 2 {
                    return Err(format!(
                        "month names (MMM) in {pattern:?} are not supported; use MM"
                    ));
                }
                items.push(PatternItem::Field(c, n));
                i += n;
            } else {
                items.push(PatternItem::Literal(c.to_string()));
                i += 1;
            }
        }
        Ok(Self { items })
    }

    pub fn format_into(&self, at: DateTime<Utc>, out: &mut String) {
        use std::fmt::Write;
        for item in &self.items {
            match item {
                PatternItem::Literal(s) => out.push_str(s),
                PatternItem::Field(c, n) => {
                    let _ = match c {
                        'y' if *n == 2 => write!(out, "{:02}", at.year().rem_euclid(100)),
                        'y' => write!(out, "{:0n$}", at.year()),
                        'M' => write!(out, "{:0n$}", at.month()),
                        'd' => write!(out, "{:0n$}", at.day()),
                        'H' => write!(out, "{:0n$}", at.hour()),
                        'm' => write!(out, "{:0n$}", at.minute()),
                        's' => write!(out, "{:0n$}", at.second()),
                        'D' => write!(out, "{:0n$}", at.ordinal()),
                        'S' => {
                            let nanos = format!("{:09}", at.nanosecond() % 1_000_000_000);
                            let digits: String = nanos
                                .chars()
                                .chain(std::iter::repeat('0'))
                                .take(*n)
                                .collect();
                            write!(out, "{digits}")
                        }
                        _ => Ok(()),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(ms).unwrap()
    }

    // 2024-03-05T07:08:09.123Z
    const T: i64 = 1_709_622_489_123;

    fn pattern(prefix: &str) -> KeyPattern {
        KeyPattern {
            prefix: PrefixTemplate::parse(prefix).unwrap(),
            error_prefix: None,
            delivery_stream: "telemetry".into(),
            extension: "".into(),
        }
    }

    fn batch() -> BatchId<'static> {
        BatchId {
            destination: "local",
            version: 1,
            first_id: 1,
            last_id: 500,
            oldest_arrival_ms: T,
        }
    }

    #[test]
    fn default_prefix_and_name_match_firehose() {
        let key = pattern("").object_key(batch()).unwrap();
        let re_like = key.split('/').collect::<Vec<_>>();
        assert_eq!(&re_like[..4], ["2024", "03", "05", "07"]);
        let name = re_like[4];
        assert!(
            name.starts_with("telemetry-1-2024-03-05-07-08-09-"),
            "{name}"
        );
        let uuid = &name["telemetry-1-2024-03-05-07-08-09-".len()..];
        assert!(uuid::Uuid::parse_str(uuid).is_ok(), "{uuid}");
        assert_eq!(uuid.len(), 36);
    }

    #[test]
    fn keys_are_deterministic_per_batch() {
        let p = pattern("");
        assert_eq!(
            p.object_key(batch()).unwrap(),
            p.object_key(batch()).unwrap()
        );
        let other = BatchId {
            last_id: 501,
            ..batch()
        };
        assert_ne!(p.object_key(batch()).unwrap(), p.object_key(other).unwrap());
    }

    #[test]
    fn custom_prefix_without_timestamp_gets_default_appended() {
        let key = pattern("raw/").object_key(batch()).unwrap();
        assert!(key.starts_with("raw/2024/03/05/07/telemetry-1-"), "{key}");
        // Firehose appends directly, without adding a slash.
        let key = pattern("raw").object_key(batch()).unwrap();
        assert!(key.starts_with("raw2024/03/05/07/"), "{key}");
    }

    #[test]
    fn timestamp_expressions_share_one_instant() {
        let key = pattern("year=!{timestamp:yyyy}/month=!{timestamp:MM}/day=!{timestamp:dd}/hour=!{timestamp:HH}/")
            .object_key(batch())
            .unwrap();
        assert!(
            key.starts_with("year=2024/month=03/day=05/hour=07/telemetry-1-2024-03-05-07-08-09-"),
            "{key}"
        );
    }

    #[test]
    fn random_string_is_eleven_chars() {
        let key = pattern("!{firehose:random-string}/!{timestamp:yyyy}/")
            .object_key(batch())
            .unwrap();
        let (random, _) = key.split_once('/').unwrap();
        assert_eq!(random.len(), 11);
    }

    #[test]
    fn java_patterns() {
        let mut s = String::new();
        JavaPattern::parse("yy-M-d D 'at' HH:mm:ss.SSS ''")
            .unwrap()
            .format_into(at(T), &mut s);
        assert_eq!(s, "24-3-5 65 at 07:08:09.123 '");
        assert!(JavaPattern::parse("yyyy-MMM").is_err());
        assert!(JavaPattern::parse("EEE").is_err());
        assert!(JavaPattern::parse("'open").is_err());
    }

    #[test]
    fn bad_prefixes_are_refused() {
        assert!(PrefixTemplate::parse("!{firehose:error-output-type}/").is_err());
        assert!(PrefixTemplate::parse("!{partitionKeyFromLambda:device}/").is_err());
        assert!(PrefixTemplate::parse("!{partitionKeyFromQuery:}/").is_err());
        assert!(PrefixTemplate::parse_as("err/", PrefixKind::Error).is_err());
        assert!(PrefixTemplate::parse_as(
            "e/!{partitionKeyFromQuery:d}/!{firehose:error-output-type}/",
            PrefixKind::Error
        )
        .is_err());
        assert!(PrefixTemplate::parse("!{nope}/").is_err());
        assert!(PrefixTemplate::parse("!{timestamp:yyyy").is_err());
    }

    #[test]
    fn long_prefix_is_an_error() {
        let p = pattern(&format!("{}/", "a".repeat(600)));
        assert_eq!(
            p.object_key(batch()),
            Err(KeyError::PrefixTooLong(600 + 1 + DEFAULT_PREFIX.len()))
        );
    }

    #[test]
    fn hive_style_dynamic_partitioning() {
        let p = pattern("device=!{partitionKeyFromQuery:device}/site=!{partitionKeyFromQuery:loc.site}/!{timestamp:yyyy}/");
        assert_eq!(p.prefix.partition_names(), ["device", "loc.site"]);
        let values = ["d-7".to_string(), "north".to_string()];
        let key = p.partition_key(batch(), &values).unwrap();
        assert!(
            key.starts_with("device=d-7/site=north/2024/telemetry-1-2024-03-05-07-08-09-"),
            "{key}"
        );
        // Each partition of one batch is its own object.
        let other = p
            .partition_key(batch(), &["d-8".to_string(), "north".to_string()])
            .unwrap();
        assert_ne!(key.rsplit('-').next(), other.rsplit('-').next());
    }

    #[test]
    fn error_prefix_names_the_error_type() {
        let mut p = pattern("");
        assert!(p.error_key(batch()).is_none());
        p.error_prefix = Some(
            PrefixTemplate::parse_as("errors/!{firehose:error-output-type}/", PrefixKind::Error)
                .unwrap(),
        );
        let key = p.error_key(batch()).unwrap().unwrap();
        assert!(
            key.starts_with("errors/processing-failed/2024/03/05/07/telemetry-1-"),
            "{key}"
        );
        assert_ne!(key, p.object_key(batch()).unwrap());
    }

    #[test]
    fn extension_follows_the_uuid() {
        let mut p = pattern("");
        p.extension = ".gz".into();
        assert!(p.object_key(batch()).unwrap().ends_with(".gz"));
    }
}
