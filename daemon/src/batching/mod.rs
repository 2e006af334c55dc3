//! Batching and delivery: one task per destination applies Firehose's buffering hints (flush
//! when the pending bytes reach the size hint or the batch has filled for the interval,
//! whichever comes first) over the committed records of its streams, and delivers each batch.
//!
//! - [`engine`]: the destination loop every destination runs: hints, backlog accounting, the
//!   intent/delivered protocol, retries, probes, health. Unit-tested with fakes.
//! - [`objects`]: delivery as objects (`file`, `s3`): [`assemble`] streams a batch from SQLite
//!   into staged files, [`crate::templates::keys`] names them the way Firehose does.
//! - [`records`]: delivery as records (Kinesis).
//! - [`journal`]: the buffer as a destination sees it.

pub mod assemble;
pub mod engine;
pub mod journal;
pub mod objects;
#[cfg(feature = "aws")]
pub mod records;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, info};

use crate::buffer::{BufferError, Committed, Control, DestinationState};
use crate::config::DestinationConfig;
#[cfg(feature = "aws")]
use crate::config::SinkConfig;
use crate::health::Health;
use crate::shutdown::Shutdown;
use crate::sinks::{Sink, SinkError};
use engine::{Engine, Inputs, Streams};
use journal::{BufferJournal, Reader};

/// Why a step of delivery failed. None of them moves a delivery position.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("reading the buffer: {0}")]
    Read(#[from] rusqlite::Error),
    #[error("staging the batch: {0}")]
    Stage(#[from] std::io::Error),
    #[error(transparent)]
    Key(#[from] crate::templates::keys::KeyError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl From<assemble::AssembleError> for DeliveryError {
    fn from(e: assemble::AssembleError) -> Self {
        match e {
            assemble::AssembleError::Sqlite(e) => DeliveryError::Read(e),
            assemble::AssembleError::Io(e) => DeliveryError::Stage(e),
        }
    }
}

impl DeliveryError {
    /// The endpoint failed (not the buffer, staging or a key): probing it tells when it is back.
    pub fn is_endpoint(&self) -> bool {
        matches!(self, DeliveryError::Sink(_))
    }

    /// The endpoint asked to slow down: Some(how long it asked for, if it said).
    pub fn throttled(&self) -> Option<Option<Duration>> {
        match self {
            DeliveryError::Sink(SinkError::Throttled { retry_after, .. }) => Some(*retry_after),
            _ => None,
        }
    }
}

/// Everything a destination task needs.
pub struct Destination {
    pub index: usize,
    pub config: DestinationConfig,
    /// The config indexes and file ids of the streams it reads.
    pub streams: Vec<usize>,
    pub stream_ids: Vec<i64>,
    pub state: DestinationState,
    pub sink: Sink,
    pub buffer_path: PathBuf,
    pub control: mpsc::Sender<Control>,
    pub committed: watch::Receiver<Committed>,
    /// Buffering hints, which a SIGHUP reload may change.
    pub hints: watch::Receiver<crate::reload::Hints>,
    pub shutdown: Shutdown,
    pub health: Health,
}

impl Destination {
    pub async fn run(self) {
        let name = self.config.name.clone();
        info!(
            destination = %name,
            sink = %self.sink.describe(),
            version = self.state.version,
            delivered_id = self.state.delivered_id,
            "destination started"
        );
        let reader = Reader::new(self.buffer_path.clone());
        let journal = BufferJournal {
            index: self.index,
            reader: reader.clone(),
            streams: self.stream_ids.clone(),
            newline: self.config.batching.newline,
            control: self.control,
        };
        let intent = self.state.intent.as_ref().map(|(last, key)| {
            // Keys depend on the version the batch was first given: a replay keeps it.
            let version = key
                .strip_prefix("version:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(self.state.version);
            (*last, version)
        });
        let inputs = Inputs {
            name: name.clone(),
            streams: Streams {
                indexes: self.streams,
                newline: self.config.batching.newline,
            },
            delivered_id: self.state.delivered_id,
            version: self.state.version,
            intent,
            committed: self.committed,
            hints: self.hints,
            shutdown: self.shutdown,
            health: self.health,
        };
        match self.sink {
            Sink::Object(sink) => {
                let checked = sink.check().await.map_err(|e| {
                    unusable(&name, &sink.describe(), &e);
                    e.to_string()
                });
                let delivery = objects::ObjectDelivery {
                    name: name.clone(),
                    sink,
                    reader,
                    streams: self.stream_ids,
                    batching: self.config.batching.clone(),
                    keys: self.config.keys.clone(),
                    concurrency: self.config.put_concurrency,
                };
                let mut engine = Engine::new(delivery, journal, inputs);
                engine.checked(checked);
                engine.run().await;
            }
            #[cfg(feature = "aws")]
            Sink::Kinesis(sink) => {
                let checked = sink.check().await.map_err(|e| {
                    unusable(&name, &sink.describe(), &e);
                    e.to_string()
                });
                let SinkConfig::Kinesis(k) = &self.config.sink else {
                    error!(destination = %name, "a Kinesis sink without a Kinesis config");
                    return;
                };
                let delivery = records::RecordDelivery {
                    name: name.clone(),
                    sink,
                    reader,
                    streams: self.stream_ids,
                    newline: self.config.batching.newline,
                    keys: self.config.keys.clone(),
                    error_output_root: k.error_output_root.clone(),
                };
                let mut engine = Engine::new(delivery, journal, inputs);
                engine.checked(checked);
                engine.run().await;
            }
        }
    }
}

fn unusable(name: &str, sink: &str, e: &SinkError) {
    error!(
        destination = %name,
        sink,
        error = %e,
        "destination is not usable yet; records stay buffered and delivery is retried"
    );
}
