//! Configuration: the TOML file as written (`Raw*`, serde, unknown keys rejected) and the typed,
//! validated [`Config`] the rest of the daemon uses. Every error names the key and the problem.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use crate::rules::Rule;
use crate::templates::topic::{PartitionKeyTemplate, TopicFilter};

mod destinations;
mod frontdoor;
pub use destinations::*;
pub use frontdoor::*;

/// IoT Core's payload limit (AWS-SEMANTICS 18).
pub const DEFAULT_MAX_PAYLOAD: u64 = 128 * 1024;
/// IoT Core's topic limits (AWS-SEMANTICS 18).
pub const DEFAULT_MAX_TOPIC_LENGTH: usize = 256;
pub const DEFAULT_MAX_TOPIC_LEVELS: usize = 8;

/// A configuration problem, always tied to the key it is about.
#[derive(Debug, thiserror::Error)]
#[error("config key `{key}`: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    pub(crate) fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// Loads and validates a config file. Relative paths in it are taken relative to the current
/// directory, so the checked-in default runs from a checkout.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
    Ok(parse(&text)?)
}

/// Parses and validates config text.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let de =
        toml::Deserializer::parse(text).map_err(|e| ConfigError::new("(file)", e.message()))?;
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        ConfigError::new(
            if key == "." {
                "(top level)".into()
            } else {
                key
            },
            inner.message(),
        )
    })?;
    raw.validate()
}

// ---------------------------------------------------------------------------------------------
// The file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    ingress: RawIngress,
    #[serde(default)]
    buffer: RawBuffer,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    shutdown: RawShutdown,
    streams: BTreeMap<String, RawStream>,
    destinations: BTreeMap<String, toml::Table>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIngress {
    mode: Option<String>,
    max_payload: Option<ByteSize>,
    max_topic_length: Option<usize>,
    max_topic_levels: Option<usize>,
    #[serde(default)]
    frontdoor: RawFrontDoor,
    #[serde(default)]
    broker: RawBroker,
    client: Option<RawClient>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    listen: Option<String>,
    listen_v5: Option<String>,
    max_connections: Option<usize>,
    log_segment_size: Option<ByteSize>,
    log_segment_count: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    host: String,
    port: Option<u16>,
    client_id: Option<String>,
    topics: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    keep_alive: Option<Duration>,
    max_inflight: Option<u16>,
    username: Option<String>,
    password: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBuffer {
    path: Option<PathBuf>,
    max_size: Option<ByteSize>,
    when_full: Option<String>,
    #[serde(default, with = "humantime_serde")]
    commit_interval: Option<Duration>,
    commit_max_records: Option<usize>,
    commit_linger_records: Option<usize>,
    synchronous: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    filter: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStream {
    #[serde(default)]
    topics: Vec<String>,
    sql: Option<String>,
    error_stream: Option<String>,
    #[serde(default, with = "humantime_serde")]
    allowed_lateness: Option<Duration>,
    destinations: Vec<String>,
    partition_key: Option<String>,
    payload_format: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The typed config.

#[derive(Debug, Clone)]
pub struct Config {
    pub ingress: IngressConfig,
    pub buffer: BufferConfig,
    pub admin: AdminConfig,
    pub shutdown_timeout: Duration,
    pub streams: Vec<StreamConfig>,
    pub destinations: Vec<DestinationConfig>,
    /// The log filter (`tracing` syntax); `EDGEHOSE_LOG` overrides it.
    pub log_filter: String,
}

/// rumqttd logs every device disconnect at ERROR from these two modules; what matters of them
/// (messages it dropped) edgehose counts and logs itself.
pub const DEFAULT_LOG_FILTER: &str =
    "info,rumqttd=warn,rumqttd::router::routing=off,rumqttd::server::broker=off";

#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub mode: IngressMode,
    pub limits: Limits,
}

/// What ingress accepts; anything else is rejected and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_payload: usize,
    pub max_topic_length: usize,
    pub max_topic_levels: usize,
}

#[derive(Debug, Clone)]
pub enum IngressMode {
    /// edgehose's own MQTT listener: PUBACK after the commit.
    FrontDoor(FrontDoorConfig),
    /// The embedded rumqttd broker, read through a local link.
    Broker(BrokerConfig),
    /// A client of an external broker, acking QoS 1 after the commit.
    Client(ClientConfig),
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    pub listen_v5: Option<SocketAddr>,
    pub max_connections: usize,
    pub log_segment_size: usize,
    pub log_segment_count: usize,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub topics: Vec<TopicFilter>,
    pub keep_alive: Duration,
    pub max_inflight: u16,
    pub credentials: Option<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    Block,
    DropOldest,
    RejectNew,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync the WAL at every commit: a committed record survives power loss.
    Full,
    /// fsync only at checkpoints: survives a process crash, may lose the last commits on power loss.
    Normal,
}

/// Group commit defaults, chosen for SD cards: at 10,000 msg/s from 100 devices they make groups
/// of up to 128 records, which write 2.3 bytes per payload byte with a PUBACK p99 of ~6 ms;
/// 5 ms / 64 wrote 3.2 (BENCHMARKS.md, "Disk writes"). Under heavy load groups fill by
/// themselves; a lone sender whose window is below the linger is recognised after three groups
/// (see `buffer::writer::Linger`).
pub const DEFAULT_COMMIT_INTERVAL: Duration = Duration::from_millis(10);
pub const DEFAULT_COMMIT_LINGER_RECORDS: usize = 128;

#[derive(Debug, Clone)]
pub struct BufferConfig {
    pub path: PathBuf,
    pub max_size: u64,
    pub when_full: WhenFull,
    pub commit_interval: Duration,
    pub commit_max_records: usize,
    /// A group smaller than this waits up to `commit_interval` for more records (unless nothing
    /// arrives for a quarter of it); a bigger one commits as soon as nothing more is waiting. Larger means fewer, bigger commits at light
    /// load (less written to the disk) and longer acknowledgement latency.
    pub commit_linger_records: usize,
    pub synchronous: Synchronous,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    /// A file holding a bearer token every request must carry (`Authorization: Bearer ...`).
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// Payload must parse as JSON; anything else is rejected as malformed.
    Json,
    /// Any bytes.
    Binary,
}

#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub name: String,
    pub topics: Vec<TopicFilter>,
    pub destinations: Vec<String>,
    pub partition_key: PartitionKeyTemplate,
    pub payload_format: PayloadFormat,
    /// `sql`: the IoT rule that selects and reshapes this stream's records (its FROM filter is
    /// `topics`).
    pub rule: Option<std::sync::Arc<Rule>>,
    /// `error_stream`: the stream (by index) that gets IoT Core's error-action message for each
    /// message the rule failed on; None: such a message is refused.
    pub error_stream: Option<usize>,
    /// A windowed rule's stream: the (hidden) stream, by index, that holds its input rows; this
    /// stream gets the closed windows' rows.
    pub window_input: Option<usize>,
    /// A windowed rule's `allowed_lateness`: how long after its end a window waits for records
    /// stamped inside it before it is emitted.
    pub allowed_lateness: Duration,
}

/// How long a window waits past its end by default (see `allowed_lateness`).
pub const DEFAULT_ALLOWED_LATENESS: Duration = Duration::from_secs(2);

/// The name of a windowed stream's input stream (a colon: no configured name has one).
pub fn window_input_name(stream: &str) -> String {
    format!("window:{stream}")
}

// ---------------------------------------------------------------------------------------------
// Validation.

fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|e| ConfigError::new(key, format!("{value:?} is not an address:port ({e})")))
}

pub(crate) fn one_of<T: Copy>(
    key: &str,
    value: Option<&str>,
    default: T,
    choices: &[(&str, T)],
) -> Result<T, ConfigError> {
    let Some(value) = value else {
        return Ok(default);
    };
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<_> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
            ConfigError::new(key, format!("{value:?} is not one of {}", names.join(", ")))
        })
}

pub(crate) fn valid_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!("{name:?} must be 1-64 characters of A-Z, a-z, 0-9, '-', '_', '.'"),
        ))
    }
}

impl RawConfig {
    fn validate(self) -> Result<Config, ConfigError> {
        let ingress = self.ingress.validate()?;
        let buffer = self.buffer.validate()?;
        let admin = AdminConfig {
            listen: match self.admin.listen.as_deref() {
                None => Some(parse_addr("admin.listen", "127.0.0.1:9464")?),
                Some("") | Some("off") => None,
                Some(v) => Some(parse_addr("admin.listen", v)?),
            },
            token_file: self.admin.token_file,
        };
        let shutdown_timeout = self.shutdown.timeout.unwrap_or(Duration::from_secs(30));

        if self.destinations.is_empty() {
            return Err(ConfigError::new(
                "destinations",
                "at least one destination is required",
            ));
        }
        let mut destinations = Vec::new();
        for (name, raw) in self.destinations {
            destinations.push(destinations::parse(&name, raw)?);
        }

        if self.streams.is_empty() {
            return Err(ConfigError::new(
                "streams",
                "at least one stream is required",
            ));
        }
        let mut streams = Vec::new();
        let mut error_streams = Vec::new();
        for (name, raw) in self.streams {
            let key = format!("streams.{name}");
            valid_name(&key, &name)?;
            let rule = match &raw.sql {
                Some(_) if !raw.topics.is_empty() => {
                    return Err(ConfigError::new(
                        format!("{key}.topics"),
                        "a stream with sql reads the topics of its FROM clause; \
                         remove topics (or the sql)",
                    ));
                }
                Some(sql) => {
                    Some(std::sync::Arc::new(Rule::parse(sql).map_err(|e| {
                        ConfigError::new(format!("{key}.sql"), e.to_string())
                    })?))
                }
                // Checked below: only another stream's error_stream may have no topics.
                None => None,
            };
            let topics = match &rule {
                Some(rule) => vec![rule.filter().clone()],
                None => raw
                    .topics
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        TopicFilter::parse(t)
                            .map_err(|p| ConfigError::new(format!("{key}.topics[{i}]"), p))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            if raw.destinations.is_empty() {
                return Err(ConfigError::new(
                    format!("{key}.destinations"),
                    "at least one destination is required",
                ));
            }
            for (i, d) in raw.destinations.iter().enumerate() {
                if !destinations.iter().any(|dest| &dest.name == d) {
                    return Err(ConfigError::new(
                        format!("{key}.destinations[{i}]"),
                        format!("no destination named {d:?} (define [destinations.{d}])"),
                    ));
                }
            }
            let partition_key =
                PartitionKeyTemplate::parse(raw.partition_key.as_deref().unwrap_or("${topic()}"))
                    .map_err(|p| ConfigError::new(format!("{key}.partition_key"), p))?;
            if partition_key.uses_client_id() && !matches!(ingress.mode, IngressMode::FrontDoor(_))
            {
                return Err(ConfigError::new(
                    format!("{key}.partition_key"),
                    "${clientid()} needs the publisher's client id, which only \
                     ingress.mode = \"frontdoor\" knows (rumqttd's local link and MQTT \
                     subscriptions do not carry it); use a topic level such as ${topic(2)}",
                ));
            }
            let payload_format = one_of(
                &format!("{key}.payload_format"),
                raw.payload_format.as_deref(),
                PayloadFormat::Json,
                &[
                    ("json", PayloadFormat::Json),
                    ("binary", PayloadFormat::Binary),
                ],
            )?;
            if raw.allowed_lateness.is_some() && rule.as_ref().is_none_or(|r| r.window().is_none())
            {
                return Err(ConfigError::new(
                    format!("{key}.allowed_lateness"),
                    "only a windowed rule (GROUP BY ..., STEP(...)) has windows to wait for",
                ));
            }
            let allowed_lateness = raw.allowed_lateness.unwrap_or(DEFAULT_ALLOWED_LATENESS);
            if allowed_lateness > Duration::from_secs(3600) {
                return Err(ConfigError::new(
                    format!("{key}.allowed_lateness"),
                    "at most 1h",
                ));
            }
            streams.push(StreamConfig {
                name,
                topics,
                destinations: raw.destinations,
                partition_key,
                payload_format,
                rule,
                error_stream: None,
                window_input: None,
                allowed_lateness,
            });
            error_streams.push(raw.error_stream);
        }
        // Streams are in name order (the index is the stream's id in the buffer); error streams
        // refer to them by name.
        for (i, error_stream) in error_streams.into_iter().enumerate() {
            let Some(target) = error_stream else { continue };
            let key = format!("streams.{}.error_stream", streams[i].name);
            if streams[i].rule.is_none() {
                return Err(ConfigError::new(
                    key,
                    "only a stream with an sql rule has rule failures to send",
                ));
            }
            let Some(j) = streams.iter().position(|s| s.name == target) else {
                return Err(ConfigError::new(
                    key,
                    format!("no stream named {target:?} (define [streams.{target}])"),
                ));
            };
            if j == i {
                return Err(ConfigError::new(
                    key,
                    "a stream cannot be its own error stream",
                ));
            }
            streams[i].error_stream = Some(j);
        }
        // Every windowed rule gets a stream of its own for its input rows, after the
        // configured ones (stream indexes of the config stay as they were).
        for i in 0..streams.len() {
            if streams[i]
                .rule
                .as_ref()
                .is_some_and(|r| r.window().is_some())
            {
                let input = StreamConfig {
                    name: window_input_name(&streams[i].name),
                    topics: Vec::new(),
                    destinations: Vec::new(),
                    partition_key: streams[i].partition_key.clone(),
                    payload_format: PayloadFormat::Binary,
                    rule: None,
                    error_stream: None,
                    window_input: None,
                    allowed_lateness: Duration::ZERO,
                };
                streams[i].window_input = Some(streams.len());
                streams.push(input);
            }
        }
        for (i, s) in streams.iter().enumerate() {
            if s.topics.is_empty()
                && !streams
                    .iter()
                    .any(|o| o.error_stream == Some(i) || o.window_input == Some(i))
            {
                return Err(ConfigError::new(
                    format!("streams.{}.topics", s.name),
                    "at least one topic filter (or an sql rule) is required, unless the \
                     stream is another stream's error_stream",
                ));
            }
        }
        for dest in &destinations {
            if !streams.iter().any(|s| s.destinations.contains(&dest.name)) {
                return Err(ConfigError::new(
                    format!("destinations.{}", dest.name),
                    "no stream feeds this destination",
                ));
            }
        }
        if let IngressMode::Client(client) = &ingress.mode {
            if client.topics.is_empty() {
                return Err(ConfigError::new(
                    "ingress.client.topics",
                    "at least one topic filter is required",
                ));
            }
        }

        let log_filter = self
            .log
            .filter
            .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_string());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_filter) {
            return Err(ConfigError::new(
                "log.filter",
                format!("{log_filter:?} is not a log filter: {e}"),
            ));
        }
        Ok(Config {
            ingress,
            buffer,
            admin,
            shutdown_timeout,
            streams,
            destinations,
            log_filter,
        })
    }
}

impl RawIngress {
    fn validate(self) -> Result<IngressConfig, ConfigError> {
        let max_payload = self
            .max_payload
            .map(|b| b.as_u64())
            .unwrap_or(DEFAULT_MAX_PAYLOAD);
        if max_payload == 0 || max_payload > 256 * 1024 * 1024 {
            return Err(ConfigError::new(
                "ingress.max_payload",
                "must be between 1 byte and 256MiB (MQTT's packet limit)",
            ));
        }
        let limits = Limits {
            max_payload: max_payload as usize,
            max_topic_length: self.max_topic_length.unwrap_or(DEFAULT_MAX_TOPIC_LENGTH),
            max_topic_levels: self.max_topic_levels.unwrap_or(DEFAULT_MAX_TOPIC_LEVELS),
        };
        if limits.max_topic_length == 0 || limits.max_topic_length > 65535 {
            return Err(ConfigError::new(
                "ingress.max_topic_length",
                "must be between 1 and 65535",
            ));
        }
        if limits.max_topic_levels == 0 {
            return Err(ConfigError::new(
                "ingress.max_topic_levels",
                "must be at least 1",
            ));
        }
        let mode = match self.mode.as_deref().unwrap_or("frontdoor") {
            "frontdoor" => IngressMode::FrontDoor(self.frontdoor.validate()?),
            "broker" if cfg!(feature = "broker") => IngressMode::Broker(self.broker.validate()?),
            "broker" => {
                return Err(ConfigError::new(
                    "ingress.mode",
                    "\"broker\" (the embedded rumqttd) is not in this build (built without the \
                     `broker` feature, as the Raspberry Pi builds are); use \"frontdoor\"",
                ))
            }
            "client" => {
                let Some(c) = self.client else {
                    return Err(ConfigError::new(
                        "ingress.client",
                        "ingress.mode = \"client\" needs an [ingress.client] table with host and topics",
                    ));
                };
                IngressMode::Client(c.validate()?)
            }
            other => {
                return Err(ConfigError::new(
                    "ingress.mode",
                    format!("{other:?} is not one of \"frontdoor\", \"broker\", \"client\""),
                ))
            }
        };
        Ok(IngressConfig { mode, limits })
    }
}

impl RawBroker {
    fn validate(self) -> Result<BrokerConfig, ConfigError> {
        let listen = parse_addr(
            "ingress.broker.listen",
            self.listen.as_deref().unwrap_or("127.0.0.1:1883"),
        )?;
        let listen_v5 = self
            .listen_v5
            .as_deref()
            .map(|v| parse_addr("ingress.broker.listen_v5", v))
            .transpose()?;
        let log_segment_size = self
            .log_segment_size
            .map(|b| b.as_u64())
            .unwrap_or(16 * 1024 * 1024);
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&log_segment_size) {
            return Err(ConfigError::new(
                "ingress.broker.log_segment_size",
                "must be between 64KiB and 1GiB",
            ));
        }
        let log_segment_count = self.log_segment_count.unwrap_or(4);
        if log_segment_count < 2 {
            return Err(ConfigError::new(
                "ingress.broker.log_segment_count",
                "must be at least 2",
            ));
        }
        let max_connections = self.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(ConfigError::new(
                "ingress.broker.max_connections",
                "must be at least 1",
            ));
        }
        Ok(BrokerConfig {
            listen,
            listen_v5,
            max_connections,
            log_segment_size: log_segment_size as usize,
            log_segment_count,
        })
    }
}

impl RawClient {
    fn validate(self) -> Result<ClientConfig, ConfigError> {
        if self.host.is_empty() {
            return Err(ConfigError::new("ingress.client.host", "must not be empty"));
        }
        let topics = self
            .topics
            .iter()
            .enumerate()
            .map(|(i, t)| {
                TopicFilter::parse(t)
                    .map_err(|p| ConfigError::new(format!("ingress.client.topics[{i}]"), p))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client_id = self.client_id.unwrap_or_else(|| "edgehose".into());
        if client_id.is_empty() || client_id.len() > 128 {
            return Err(ConfigError::new(
                "ingress.client.client_id",
                "must be 1-128 characters (a persistent session needs a stable id)",
            ));
        }
        let credentials = match (self.username, self.password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "ingress.client.password",
                    "is required when username is set",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "ingress.client.username",
                    "is required when password is set",
                ))
            }
        };
        let max_inflight = self.max_inflight.unwrap_or(100);
        if max_inflight == 0 {
            return Err(ConfigError::new(
                "ingress.client.max_inflight",
                "must be at least 1",
            ));
        }
        let keep_alive = self.keep_alive.unwrap_or(Duration::from_secs(30));
        if keep_alive < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "ingress.client.keep_alive",
                "must be at least 1s",
            ));
        }
        Ok(ClientConfig {
            host: self.host,
            port: self.port.unwrap_or(1883),
            client_id,
            topics,
            keep_alive,
            max_inflight,
            credentials,
        })
    }
}

impl RawBuffer {
    fn validate(self) -> Result<BufferConfig, ConfigError> {
        let max_size = self
            .max_size
            .map(|b| b.as_u64())
            .unwrap_or(1024 * 1024 * 1024);
        if max_size < 1024 * 1024 {
            return Err(ConfigError::new("buffer.max_size", "must be at least 1MiB"));
        }
        let when_full = one_of(
            "buffer.when_full",
            self.when_full.as_deref(),
            WhenFull::Block,
            &[
                ("block", WhenFull::Block),
                ("drop_oldest", WhenFull::DropOldest),
                ("reject_new", WhenFull::RejectNew),
            ],
        )?;
        let commit_interval = self.commit_interval.unwrap_or(DEFAULT_COMMIT_INTERVAL);
        if commit_interval > Duration::from_secs(1) {
            return Err(ConfigError::new(
                "buffer.commit_interval",
                "must be at most 1s (it bounds ingest latency)",
            ));
        }
        let commit_max_records = self.commit_max_records.unwrap_or(4096);
        if commit_max_records == 0 {
            return Err(ConfigError::new(
                "buffer.commit_max_records",
                "must be at least 1",
            ));
        }
        let commit_linger_records = self
            .commit_linger_records
            .unwrap_or(DEFAULT_COMMIT_LINGER_RECORDS);
        if !(1..=commit_max_records).contains(&commit_linger_records) {
            return Err(ConfigError::new(
                "buffer.commit_linger_records",
                format!("must be between 1 and commit_max_records ({commit_max_records})"),
            ));
        }
        let synchronous = one_of(
            "buffer.synchronous",
            self.synchronous.as_deref(),
            Synchronous::Full,
            &[("full", Synchronous::Full), ("normal", Synchronous::Normal)],
        )?;
        Ok(BufferConfig {
            path: self
                .path
                .unwrap_or_else(|| PathBuf::from("data/edgehose.db")),
            max_size,
            when_full,
            commit_interval,
            commit_max_records,
            commit_linger_records,
            synchronous,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [streams.telemetry]
        topics = ["sensors/+/telemetry"]
        destinations = ["local"]

        [destinations.local]
        type = "file"
        root = "out"
        bucket = "telemetry"
    "#;

    fn err(text: &str) -> ConfigError {
        parse(text).expect_err("config should be rejected")
    }

    #[test]
    fn minimal_config_gets_firehose_defaults() {
        let c = parse(MINIMAL).unwrap();
        let d = &c.destinations[0];
        assert_eq!(d.batching.size, 5 * 1024 * 1024);
        assert_eq!(d.batching.interval, Duration::from_secs(300));
        assert_eq!(c.ingress.limits.max_payload, 128 * 1024);
        assert_eq!(c.buffer.when_full, WhenFull::Block);
        assert_eq!(c.buffer.synchronous, Synchronous::Full);
        assert!(
            matches!(c.ingress.mode, IngressMode::FrontDoor(ref f) if f.listen.is_some_and(|l| l.port() == 1883))
        );
    }

    #[test]
    fn the_shipped_default_config_is_valid() {
        let text = include_str!("../../../config/edgehose.toml");
        parse(text).unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!("{MINIMAL}\n[buffer]\nmax_sise = \"1MiB\"\n"));
        assert_eq!(e.key, "buffer.max_sise");
        assert!(e.problem.contains("max_sise"), "{e}");
    }

    #[test]
    fn bad_size_is_named() {
        let e = err(&format!("{MINIMAL}\n[buffer]\nmax_size = \"lots\"\n"));
        assert_eq!(e.key, "buffer.max_size", "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = err(&MINIMAL.replace(
            "type = \"file\"",
            "type = \"file\"\nbuffer_interval = \"soon\"",
        ));
        assert_eq!(e.key, "destinations.local.buffer_interval", "{e}");
    }

    #[test]
    fn firehose_bounds_are_enforced() {
        let e = err(&MINIMAL.replace(
            "type = \"file\"",
            "type = \"file\"\nbuffer_size = \"200MiB\"",
        ));
        assert_eq!(e.key, "destinations.local.buffer_size");
        let e = err(&MINIMAL.replace(
            "type = \"file\"",
            "type = \"file\"\nbuffer_interval = \"901s\"",
        ));
        assert_eq!(e.key, "destinations.local.buffer_interval");
    }

    #[test]
    fn unknown_destination_is_named() {
        let e = err(&MINIMAL.replace("destinations = [\"local\"]", "destinations = [\"nowhere\"]"));
        assert_eq!(e.key, "streams.telemetry.destinations[0]");
    }

    #[test]
    fn bad_topic_filter_is_named() {
        let e = err(&MINIMAL.replace("sensors/+/telemetry", "sensors/#/x"));
        assert_eq!(e.key, "streams.telemetry.topics[0]");
    }

    #[test]
    fn bad_policy_is_named() {
        let e = err(&format!("{MINIMAL}\n[buffer]\nwhen_full = \"panic\"\n"));
        assert_eq!(e.key, "buffer.when_full");
        assert!(e.problem.contains("drop_oldest"));
    }

    #[test]
    fn rule_streams_are_checked() {
        let rules = r#"
            [streams.hot]
            sql = "SELECT temperature AS t FROM 'sensors/+/telemetry' WHERE temperature > 30"
            error_stream = "rule_errors"
            destinations = ["local"]

            [streams.rule_errors]
            destinations = ["local"]

            [destinations.local]
            type = "file"
            root = "out"
            bucket = "telemetry"
        "#;
        let c = parse(rules).unwrap();
        let hot = c.streams.iter().find(|s| s.name == "hot").unwrap();
        assert!(hot.topics[0].matches("sensors/d/telemetry"));
        assert!(hot.rule.is_some());
        let errors = c.streams.iter().position(|s| s.name == "rule_errors");
        assert_eq!(hot.error_stream, errors);

        let e = err(&rules.replace("WHERE temperature > 30", "WHERE temperature >"));
        assert_eq!(e.key, "streams.hot.sql");
        assert!(
            e.problem
                .starts_with("at character 71: expected an expression, found the end"),
            "{e}"
        );
        let e = err(&rules.replace("error_stream = \"rule_errors\"", "error_stream = \"nope\""));
        assert_eq!(e.key, "streams.hot.error_stream");
        let e = err(&rules.replace("error_stream = \"rule_errors\"", "error_stream = \"hot\""));
        assert!(e.problem.contains("its own"), "{e}");
        let e = err(&rules.replace("sql = ", "topics = [\"a\"]\nsql = "));
        assert_eq!(e.key, "streams.hot.topics");
        let e = err(&rules.replace("error_stream = \"rule_errors\"", ""));
        assert_eq!(e.key, "streams.rule_errors.topics");
        assert!(e.problem.contains("at least one topic filter"), "{e}");
    }

    #[test]
    fn client_id_template_needs_the_front_door() {
        let with_key = MINIMAL.replace(
            "destinations = [\"local\"]",
            "destinations = [\"local\"]\npartition_key = \"${clientid()}\"",
        );
        parse(&with_key).unwrap();
        let e = err(&format!("{with_key}\n[ingress]\nmode = \"broker\"\n"));
        // Without the broker feature the mode itself is refused first.
        let want = if cfg!(feature = "broker") {
            "streams.telemetry.partition_key"
        } else {
            "ingress.mode"
        };
        assert_eq!(e.key, want);
    }

    #[test]
    fn client_mode_needs_its_table() {
        let e = err(&format!("{MINIMAL}\n[ingress]\nmode = \"client\"\n"));
        assert_eq!(e.key, "ingress.client");
    }

    #[test]
    fn bad_bucket_is_named() {
        let e = err(&MINIMAL.replace("bucket = \"telemetry\"", "bucket = \"Not_A_Bucket\""));
        assert_eq!(e.key, "destinations.local.bucket");
    }

    #[test]
    fn overlong_prefix_is_named() {
        let e = err(&MINIMAL.replace(
            "type = \"file\"",
            &format!("type = \"file\"\nprefix = \"{}/\"", "p".repeat(600)),
        ));
        assert_eq!(e.key, "destinations.local.prefix");
        assert!(e.problem.contains("512"), "{e}");
    }

    #[test]
    fn fingerprint_changes_with_output_shape() {
        let a = parse(MINIMAL).unwrap().destinations[0].fingerprint();
        let b =
            parse(&MINIMAL.replace("type = \"file\"", "type = \"file\"\ncompression = \"gzip\""))
                .unwrap()
                .destinations[0]
                .fingerprint();
        assert_ne!(a, b);
    }

    fn with_destination(body: &str) -> String {
        format!(
            "[streams.telemetry]\ntopics = [\"sensors/+/telemetry\"]\ndestinations = [\"d\"]\n\
             [destinations.d]\n{body}"
        )
    }

    #[test]
    fn s3_destination_is_parsed() {
        let c = parse(&with_destination(
            "type = \"s3\"\nbucket = \"my-bucket\"\nregion = \"eu-west-1\"\n\
             endpoint = \"http://127.0.0.1:5000\"\ncompression = \"snappy\"\n\
             prefix = \"device=!{partitionKeyFromQuery:device}/\"\n\
             error_output_prefix = \"errors/!{firehose:error-output-type}/\"\n",
        ))
        .unwrap();
        let d = &c.destinations[0];
        let SinkConfig::S3(s3) = &d.sink else {
            panic!("{:?}", d.sink)
        };
        assert_eq!(s3.bucket, "my-bucket");
        assert_eq!(s3.aws.region.as_deref(), Some("eu-west-1"));
        assert_eq!(s3.multipart_threshold, 16 * 1024 * 1024);
        assert_eq!(d.keys.extension, ".snappy");
        assert_eq!(d.keys.prefix.partition_names(), ["device"]);
    }

    #[test]
    fn kinesis_destination_gets_near_real_time_defaults() {
        let c = parse(&with_destination("type = \"kinesis\"\nstream = \"live\"\n")).unwrap();
        let d = &c.destinations[0];
        let SinkConfig::Kinesis(k) = &d.sink else {
            panic!("{:?}", d.sink)
        };
        assert_eq!(k.stream, "live");
        assert!(!k.aggregation);
        assert_eq!(k.ordering, Ordering::PerKey);
        assert_eq!(d.batching.interval, Duration::from_secs(1));
        assert!(
            !d.batching.newline,
            "Kinesis records are the payloads as sent"
        );
    }

    #[test]
    fn aws_destination_errors_name_their_key() {
        let cases = [
            ("type = \"s3\"\n", "destinations.d.bucket"),
            ("type = \"kinesis\"\n", "destinations.d.stream"),
            ("type = \"kinesis\"\nstream = \"bad name\"\n", "destinations.d.stream"),
            (
                "type = \"s3\"\nbucket = \"b-1\"\nregion = \"EU West\"\n",
                "destinations.d.region",
            ),
            (
                "type = \"s3\"\nbucket = \"b-1\"\nendpoint = \"localhost:4566\"\n",
                "destinations.d.endpoint",
            ),
            (
                "type = \"s3\"\nbucket = \"b-1\"\nmultipart_threshold = \"1MiB\"\n",
                "destinations.d.multipart_threshold",
            ),
            (
                "type = \"kinesis\"\nstream = \"s\"\naggregate_size = \"2MiB\"\n",
                "destinations.d.aggregate_size",
            ),
            (
                "type = \"kinesis\"\nstream = \"s\"\nordering = \"random\"\n",
                "destinations.d.ordering",
            ),
            (
                "type = \"kinesis\"\nstream = \"s\"\ncompression = \"gzip\"\n",
                "destinations.d.compression",
            ),
            (
                "type = \"file\"\nroot = \"o\"\nbucket = \"b-1\"\nendpoint = \"http://x\"\n",
                "destinations.d.endpoint",
            ),
            (
                "type = \"s3\"\nbucket = \"b-1\"\naggregation = true\n",
                "destinations.d.aggregation",
            ),
            (
                "type = \"s3\"\nbucket = \"b-1\"\nprefix = \"d=!{partitionKeyFromQuery:device}/\"\n",
                "destinations.d.error_output_prefix",
            ),
            (
                "type = \"s3\"\nbucket = \"b-1\"\nerror_output_prefix = \"errors/\"\n",
                "destinations.d.error_output_prefix",
            ),
        ];
        for (body, key) in cases {
            let e = err(&with_destination(body));
            assert_eq!(e.key, key, "{body}: {e}");
        }
    }
}
