//! `[destinations.NAME]`: each destination type owns its settings. The file's `type` key picks
//! the variant (serde's internally tagged enum), so a setting another type has is refused as an
//! unknown field naming the key, with no hand-written "applies only to" lists.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::{one_of, valid_name, ConfigError};
use crate::templates::keys::{KeyPattern, PrefixKind, PrefixTemplate, PROCESSING_FAILED};

/// Firehose's buffering-hint bounds and defaults (AWS-SEMANTICS 1).
pub const MIN_BUFFER_SIZE: u64 = 1024 * 1024;
pub const MAX_BUFFER_SIZE: u64 = 128 * 1024 * 1024;
pub const DEFAULT_BUFFER_SIZE: u64 = 5 * 1024 * 1024;
pub const MAX_BUFFER_INTERVAL: Duration = Duration::from_secs(900);
pub const DEFAULT_BUFFER_INTERVAL: Duration = Duration::from_secs(300);
/// A Kinesis destination is near-real-time: a batch is one full PutRecords request (5 MiB) or
/// one second, whichever comes first.
pub const DEFAULT_KINESIS_BUFFER_SIZE: u64 = 5 * 1024 * 1024;
pub const DEFAULT_KINESIS_BUFFER_INTERVAL: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// The file as written.

/// A destination table as written: its `type` picks which settings it may have.
#[derive(Debug)]
pub(super) enum RawDestination {
    File(RawFile),
    S3(RawS3),
    Kinesis(RawKinesis),
}

/// Buffering hints, which every type has.
#[derive(Debug, Default)]
struct RawHints {
    buffer_size: Option<ByteSize>,
    buffer_interval: Option<Duration>,
}

/// How objects are named and encoded (`file`, `s3`).
#[derive(Debug, Default)]
struct RawObjects {
    delivery_stream: Option<String>,
    prefix: Option<String>,
    error_output_prefix: Option<String>,
    compression: Option<String>,
    record_delimiter: Option<String>,
    file_extension: Option<String>,
    put_concurrency: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    root: PathBuf,
    bucket: Option<String>,
    buffer_size: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    buffer_interval: Option<Duration>,
    delivery_stream: Option<String>,
    prefix: Option<String>,
    error_output_prefix: Option<String>,
    compression: Option<String>,
    record_delimiter: Option<String>,
    file_extension: Option<String>,
    put_concurrency: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawS3 {
    bucket: String,
    region: Option<String>,
    endpoint: Option<String>,
    force_path_style: Option<bool>,
    multipart_threshold: Option<ByteSize>,
    buffer_size: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    buffer_interval: Option<Duration>,
    delivery_stream: Option<String>,
    prefix: Option<String>,
    error_output_prefix: Option<String>,
    compression: Option<String>,
    record_delimiter: Option<String>,
    file_extension: Option<String>,
    put_concurrency: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKinesis {
    stream: String,
    region: Option<String>,
    endpoint: Option<String>,
    aggregation: Option<bool>,
    aggregate_size: Option<ByteSize>,
    ordering: Option<String>,
    error_output_root: Option<PathBuf>,
    buffer_size: Option<ByteSize>,
    #[serde(default, with = "humantime_serde")]
    buffer_interval: Option<Duration>,
}

// ---------------------------------------------------------------------------------------------
// The typed config.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    /// Snappy's framing format, as Firehose writes `.snappy` objects.
    Snappy,
}

impl Compression {
    /// The extension Firehose gives objects with this compression (AWS-SEMANTICS 7).
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip => ".gz",
            Compression::Snappy => ".snappy",
        }
    }

    /// The S3 `Content-Encoding` header for objects with this compression.
    pub fn content_encoding(self) -> Option<&'static str> {
        match self {
            Compression::Gzip => Some("gzip"),
            Compression::None | Compression::Snappy => None,
        }
    }
}

/// Objects of one batch put at once, by default and at most.
pub const DEFAULT_PUT_CONCURRENCY: usize = 4;
pub const MAX_PUT_CONCURRENCY: usize = 64;

#[derive(Debug, Clone)]
pub struct DestinationConfig {
    pub name: String,
    /// Objects of one batch (dynamic partitions, the error object) put at once.
    pub put_concurrency: usize,
    pub sink: SinkConfig,
    pub batching: BatchingConfig,
    pub keys: KeyPattern,
}

#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// A local directory laid out like an S3 bucket: `<root>/<bucket>/<key>`.
    File { root: PathBuf, bucket: String },
    /// An S3 bucket (or an emulator of one) through aws-sdk-s3.
    S3(S3Config),
    /// A Kinesis data stream (or an emulator of one) through aws-sdk-kinesis.
    Kinesis(KinesisConfig),
}

/// Where and how to reach an AWS service. Anything unset comes from the SDK's default chain
/// (AWS_REGION, AWS_PROFILE, AWS_ENDPOINT_URL[_S3|_KINESIS], credentials chain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsConfig {
    pub region: Option<String>,
    /// An explicit endpoint beats every environment variable (AWS-SEMANTICS 22).
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    pub aws: AwsConfig,
    /// Path-style addressing (emulators); None = on when an endpoint is configured anywhere.
    pub force_path_style: Option<bool>,
    /// Objects larger than this go up in parts of this size.
    pub multipart_threshold: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// A PutRecords request never holds two entries one partial failure could reorder: one
    /// entry per partition key (per shard when aggregating).
    PerKey,
    /// Requests are filled regardless of keys; a partial failure may reorder a key's records.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KinesisConfig {
    pub stream: String,
    pub aws: AwsConfig,
    /// KPL aggregation: many records per Kinesis record, grouped by shard.
    pub aggregation: bool,
    /// Largest aggregated record (KPL's default is 50 KiB; Kinesis's limit 1 MiB).
    pub aggregate_size: u64,
    pub ordering: Ordering,
    /// Records Kinesis can never take (over 1 MiB) are written here, in Firehose's error-record
    /// shape, in the S3 layout.
    pub error_output_root: PathBuf,
}

/// S3's smallest multipart part (the last part may be smaller).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Kinesis limits (AWS-SEMANTICS 11).
pub const KINESIS_MAX_RECORD: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct BatchingConfig {
    /// Flush once this many bytes (before compression) are pending.
    pub size: u64,
    /// Flush once the oldest pending record is this old.
    pub interval: Duration,
    pub compression: Compression,
    /// Append `\n` after every record (Firehose's AppendDelimiterToRecord).
    pub newline: bool,
}

impl DestinationConfig {
    /// A fingerprint of everything that shapes this destination's output; a change bumps the
    /// Firehose version number in object names (AWS-SEMANTICS 2).
    pub fn fingerprint(&self) -> String {
        format!("{:?}|{:?}|{:?}", self.sink, self.batching, self.keys)
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.

/// Parses and validates `[destinations.NAME]`: its `type` picks the table's shape, and serde
/// (unknown fields refused) reads the rest, so every error names its key.
pub(super) fn parse(name: &str, mut table: toml::Table) -> Result<DestinationConfig, ConfigError> {
    let key = format!("destinations.{name}");
    let kind = match table.remove("type") {
        Some(toml::Value::String(s)) => s,
        Some(_) => return Err(ConfigError::new(format!("{key}.type"), "must be a string")),
        None => {
            return Err(ConfigError::new(
                format!("{key}.type"),
                "is required (\"file\", \"s3\" or \"kinesis\")",
            ))
        }
    };
    let raw = match kind.as_str() {
        "file" => RawDestination::File(table_as(&key, table)?),
        "s3" => RawDestination::S3(table_as(&key, table)?),
        "kinesis" => RawDestination::Kinesis(table_as(&key, table)?),
        other => {
            return Err(ConfigError::new(
                format!("{key}.type"),
                format!(
                    "{other:?} is not a destination type this build knows (\"file\", \"s3\", \"kinesis\")"
                ),
            ))
        }
    };
    raw.validate(name)
}

/// Reads a table into one type's settings; an error names the key it is about.
fn table_as<T: serde::de::DeserializeOwned>(
    key: &str,
    table: toml::Table,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().message().to_string();
        // A missing field is reported on the table; name the field.
        let field = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
            .map(str::to_string);
        let key = match (path.as_str(), field) {
            (".", Some(f)) => format!("{key}.{f}"),
            (".", None) => key.to_string(),
            (p, _) => format!("{key}.{p}"),
        };
        ConfigError::new(key, message)
    })
}

impl RawDestination {
    fn validate(self, name: &str) -> Result<DestinationConfig, ConfigError> {
        let key = format!("destinations.{name}");
        valid_name(&key, name)?;
        match self {
            RawDestination::File(f) => {
                let bucket = f.bucket.unwrap_or_else(|| name.to_string());
                validate_bucket(&format!("{key}.bucket"), &bucket)?;
                objects(
                    &key,
                    name,
                    SinkConfig::File {
                        root: f.root,
                        bucket,
                    },
                    RawHints {
                        buffer_size: f.buffer_size,
                        buffer_interval: f.buffer_interval,
                    },
                    RawObjects {
                        delivery_stream: f.delivery_stream,
                        prefix: f.prefix,
                        error_output_prefix: f.error_output_prefix,
                        compression: f.compression,
                        record_delimiter: f.record_delimiter,
                        file_extension: f.file_extension,
                        put_concurrency: f.put_concurrency,
                    },
                )
            }
            RawDestination::S3(s) => {
                validate_bucket(&format!("{key}.bucket"), &s.bucket)?;
                let multipart_threshold = s
                    .multipart_threshold
                    .map(|b| b.as_u64())
                    .unwrap_or(16 * 1024 * 1024);
                if multipart_threshold < MIN_PART_SIZE {
                    return Err(ConfigError::new(
                        format!("{key}.multipart_threshold"),
                        "must be at least 5MiB (S3's smallest part)",
                    ));
                }
                let sink = SinkConfig::S3(S3Config {
                    bucket: s.bucket,
                    aws: aws_config(&key, s.region, s.endpoint)?,
                    force_path_style: s.force_path_style,
                    multipart_threshold,
                });
                objects(
                    &key,
                    name,
                    sink,
                    RawHints {
                        buffer_size: s.buffer_size,
                        buffer_interval: s.buffer_interval,
                    },
                    RawObjects {
                        delivery_stream: s.delivery_stream,
                        prefix: s.prefix,
                        error_output_prefix: s.error_output_prefix,
                        compression: s.compression,
                        record_delimiter: s.record_delimiter,
                        file_extension: s.file_extension,
                        put_concurrency: s.put_concurrency,
                    },
                )
            }
            RawDestination::Kinesis(k) => kinesis(&key, name, k),
        }
    }
}

/// The buffering hints, within Firehose's bounds.
fn hints(key: &str, raw: RawHints, kinesis: bool) -> Result<(u64, Duration), ConfigError> {
    let size = raw.buffer_size.map(|b| b.as_u64()).unwrap_or(if kinesis {
        DEFAULT_KINESIS_BUFFER_SIZE
    } else {
        DEFAULT_BUFFER_SIZE
    });
    if !(MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&size) {
        return Err(ConfigError::new(
            format!("{key}.buffer_size"),
            format!("{} is outside Firehose's 1MiB..128MiB", ByteSize(size)),
        ));
    }
    let interval = raw.buffer_interval.unwrap_or(if kinesis {
        DEFAULT_KINESIS_BUFFER_INTERVAL
    } else {
        DEFAULT_BUFFER_INTERVAL
    });
    if interval > MAX_BUFFER_INTERVAL {
        return Err(ConfigError::new(
            format!("{key}.buffer_interval"),
            "must be at most 900s (Firehose's limit)",
        ));
    }
    Ok((size, interval))
}

/// An object destination (`file`, `s3`): hints, encoding and keys.
fn objects(
    key: &str,
    name: &str,
    sink: SinkConfig,
    raw_hints: RawHints,
    o: RawObjects,
) -> Result<DestinationConfig, ConfigError> {
    let (size, interval) = hints(key, raw_hints, false)?;
    let compression = one_of(
        &format!("{key}.compression"),
        o.compression.as_deref(),
        Compression::None,
        &[
            ("none", Compression::None),
            ("gzip", Compression::Gzip),
            ("snappy", Compression::Snappy),
        ],
    )?;
    let newline = one_of(
        &format!("{key}.record_delimiter"),
        o.record_delimiter.as_deref(),
        true,
        &[("newline", true), ("none", false)],
    )?;
    let prefix = PrefixTemplate::parse(o.prefix.as_deref().unwrap_or(""))
        .map_err(|p| ConfigError::new(format!("{key}.prefix"), p))?;
    // Timestamps and random strings have fixed widths, so one evaluation tells the length
    // (partition values are checked per record).
    prefix
        .evaluate(chrono::DateTime::UNIX_EPOCH, "xxxxxxxxxxx", &[], "")
        .map_err(|e| ConfigError::new(format!("{key}.prefix"), e.to_string()))?;
    let error_prefix = o
        .error_output_prefix
        .as_deref()
        .map(|t| PrefixTemplate::parse_as(t, PrefixKind::Error))
        .transpose()
        .map_err(|p| ConfigError::new(format!("{key}.error_output_prefix"), p))?;
    if let Some(e) = &error_prefix {
        e.evaluate(
            chrono::DateTime::UNIX_EPOCH,
            "xxxxxxxxxxx",
            &[],
            PROCESSING_FAILED,
        )
        .map_err(|e| ConfigError::new(format!("{key}.error_output_prefix"), e.to_string()))?;
    }
    if !prefix.partition_names().is_empty() && error_prefix.is_none() {
        return Err(ConfigError::new(
            format!("{key}.error_output_prefix"),
            "is required when the prefix uses !{partitionKeyFromQuery:...} (records without the key go there), e.g. \"errors/!{firehose:error-output-type}/\"",
        ));
    }
    let delivery_stream = o.delivery_stream.unwrap_or_else(|| name.to_string());
    valid_name(&format!("{key}.delivery_stream"), &delivery_stream)?;
    let extension = match o.file_extension {
        Some(ext) => {
            if !ext.starts_with('.') || ext.len() > 128 || ext.contains('/') {
                return Err(ConfigError::new(
                    format!("{key}.file_extension"),
                    "must start with '.', contain no '/', and be at most 128 characters",
                ));
            }
            ext
        }
        None => compression.extension().to_string(),
    };
    let put_concurrency = o.put_concurrency.unwrap_or(DEFAULT_PUT_CONCURRENCY);
    if !(1..=MAX_PUT_CONCURRENCY).contains(&put_concurrency) {
        return Err(ConfigError::new(
            format!("{key}.put_concurrency"),
            format!("must be 1..={MAX_PUT_CONCURRENCY}"),
        ));
    }
    Ok(DestinationConfig {
        name: name.to_string(),
        put_concurrency,
        sink,
        batching: BatchingConfig {
            size,
            interval,
            compression,
            newline,
        },
        keys: KeyPattern {
            prefix,
            error_prefix,
            delivery_stream,
            extension,
        },
    })
}

/// A Kinesis destination: records as received (no delimiter, no compression); its error output
/// is a local directory in the S3 layout.
fn kinesis(key: &str, name: &str, k: RawKinesis) -> Result<DestinationConfig, ConfigError> {
    let stream = k.stream;
    let ok = !stream.is_empty()
        && stream.len() <= 128
        && stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !ok {
        return Err(ConfigError::new(
            format!("{key}.stream"),
            format!("{stream:?} is not a Kinesis stream name (1-128 of A-Z a-z 0-9 _ . -)"),
        ));
    }
    let aggregate_size = k.aggregate_size.map(|b| b.as_u64()).unwrap_or(50 * 1024);
    if !(1024..=KINESIS_MAX_RECORD).contains(&aggregate_size) {
        return Err(ConfigError::new(
            format!("{key}.aggregate_size"),
            "must be between 1KiB and 1MiB (Kinesis's record limit)",
        ));
    }
    let sink = SinkConfig::Kinesis(KinesisConfig {
        stream,
        aws: aws_config(key, k.region, k.endpoint)?,
        aggregation: k.aggregation.unwrap_or(false),
        aggregate_size,
        ordering: one_of(
            &format!("{key}.ordering"),
            k.ordering.as_deref(),
            Ordering::PerKey,
            &[("per_key", Ordering::PerKey), ("none", Ordering::None)],
        )?,
        error_output_root: k
            .error_output_root
            .unwrap_or_else(|| PathBuf::from("errors")),
    });
    let (size, interval) = hints(
        key,
        RawHints {
            buffer_size: k.buffer_size,
            buffer_interval: k.buffer_interval,
        },
        true,
    )?;
    let error_prefix =
        PrefixTemplate::parse_as("!{firehose:error-output-type}/", PrefixKind::Error)
            .map_err(|p| ConfigError::new(format!("{key}.type"), p))?;
    Ok(DestinationConfig {
        name: name.to_string(),
        put_concurrency: DEFAULT_PUT_CONCURRENCY,
        sink,
        batching: BatchingConfig {
            size,
            interval,
            compression: Compression::None,
            newline: false,
        },
        keys: KeyPattern {
            prefix: PrefixTemplate::parse("").map_err(|p| ConfigError::new(key, p))?,
            error_prefix: Some(error_prefix),
            delivery_stream: name.to_string(),
            extension: String::new(),
        },
    })
}

fn aws_config(
    key: &str,
    region: Option<String>,
    endpoint: Option<String>,
) -> Result<AwsConfig, ConfigError> {
    if !cfg!(feature = "aws") {
        return Err(ConfigError::new(
            format!("{key}.type"),
            "\"s3\" and \"kinesis\" destinations are not in this build (built without the \
             `aws` feature); use \"file\"",
        ));
    }
    if let Some(r) = &region {
        let ok = !r.is_empty()
            && r.len() <= 64
            && r.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(ConfigError::new(
                format!("{key}.region"),
                format!("{r:?} is not a region name such as \"eu-west-1\""),
            ));
        }
    }
    if let Some(e) = &endpoint {
        let ok = (e.starts_with("http://") || e.starts_with("https://"))
            && e.split("://").nth(1).is_some_and(|h| !h.is_empty());
        if !ok {
            return Err(ConfigError::new(
                format!("{key}.endpoint"),
                format!("{e:?} is not an http:// or https:// URL"),
            ));
        }
    }
    Ok(AwsConfig { region, endpoint })
}

/// S3 bucket naming rules, so a `file` destination's layout is one S3 could hold.
fn validate_bucket(key: &str, bucket: &str) -> Result<(), ConfigError> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!(
                "{bucket:?} is not a valid S3 bucket name (3-63 of a-z, 0-9, '-', '.', starting and ending with a letter or digit)"
            ),
        ))
    }
}
