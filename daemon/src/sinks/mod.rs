//! Sinks: where a finished batch goes.
//!
//! Object sinks ([`ObjectSink`]: `file`, `s3`) get a staged object file and its key, and either
//! store it durably under that key or fail; putting the same key twice must be harmless, since a
//! batch is retried under the same key. The record sink ([`kinesis`]) puts one request's worth
//! of a batch's records at a time and says which failed; the destination loop
//! (`batching::engine`) decides when to try again.

pub mod aws;
pub mod file;
pub mod kinesis;
pub mod kpl;
pub mod s3;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{DestinationConfig, SinkConfig};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// An error from (or on the way to) a remote service, described for the log.
    #[error("{0}")]
    Remote(String),
    /// The service asks to slow down (S3 503 SlowDown, Kinesis throughput exceeded); the data
    /// is fine and is sent again after `retry_after` (or a backoff).
    #[error("throttled: {message}")]
    Throttled {
        message: String,
        retry_after: Option<Duration>,
    },
}

/// What a destination is built with.
pub enum Sink {
    Object(ObjectSink),
    Kinesis(kinesis::KinesisSink),
}

impl Sink {
    /// `staging` is a directory on the buffer's file system for remote sinks' staged objects.
    pub async fn new(config: &DestinationConfig, staging: &Path) -> Self {
        match &config.sink {
            SinkConfig::File { root, bucket } => {
                Sink::Object(ObjectSink::File(file::FileSink::new(root, bucket)))
            }
            SinkConfig::S3(s3) => Sink::Object(ObjectSink::S3(
                s3::S3Sink::new(
                    s3,
                    config.batching.compression,
                    staging,
                    config.put_concurrency,
                )
                .await,
            )),
            SinkConfig::Kinesis(k) => Sink::Kinesis(kinesis::KinesisSink::new(k).await),
        }
    }

    /// A short description for logs: where records go.
    pub fn describe(&self) -> String {
        match self {
            Sink::Object(s) => s.describe(),
            Sink::Kinesis(s) => s.describe(),
        }
    }
}

/// A sink that takes whole objects under keys.
pub enum ObjectSink {
    File(file::FileSink),
    S3(s3::S3Sink),
}

impl ObjectSink {
    /// Where the batcher writes the object bodies for destination `name` before `put`.
    pub fn staging_path(&self, name: &str) -> PathBuf {
        match self {
            ObjectSink::File(s) => s.staging_path(name),
            ObjectSink::S3(s) => s.staging_path(name),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ObjectSink::File(s) => s.describe(),
            ObjectSink::S3(s) => s.describe(),
        }
    }

    /// A cheap check that the destination is there and reachable (at start, and as the probe
    /// while it is down).
    pub async fn check(&self) -> Result<(), SinkError> {
        match self {
            ObjectSink::File(s) => s.check().await,
            ObjectSink::S3(s) => s.check().await,
        }
    }

    /// Puts one staged object under `key`.
    pub async fn put(&self, staged: &Path, key: &str) -> Result<(), SinkError> {
        match self {
            ObjectSink::File(s) => s.put(staged, key).await,
            ObjectSink::S3(s) => {
                s.put(staged, key).await?;
                let _ = tokio::fs::remove_file(staged).await;
                Ok(())
            }
        }
    }
}
