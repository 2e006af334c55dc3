//! Sinks: where a finished batch goes.
//!
//! Object sinks ([`ObjectSink`]: `file`, `s3`) get a staged object (a file, or bytes in memory)
//! and its key, and either store it durably under that key or fail; putting the same key twice
//! must be harmless, since a batch is retried under the same key. The record sink
//! ([`kinesis`]) puts one request's worth of a batch's records at a time and says which failed;
//! the destination loop (`batching::engine`) decides when to try again.

#[cfg(feature = "aws")]
pub mod aws;
pub mod file;
#[cfg(feature = "aws")]
pub mod kinesis;
pub mod kpl;
#[cfg(feature = "aws")]
pub mod s3;

use std::path::{Path, PathBuf};

use bytes::Bytes;
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

/// Where a staged object's body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Staging {
    /// A file beside the buffer (the `file` sink's objects, and a remote sink's past the
    /// batch's memory allowance).
    File(PathBuf),
    /// Held in memory (a remote sink's objects while the batch's allowance lasts).
    Memory(Bytes),
}

/// What a destination is built with.
pub enum Sink {
    Object(ObjectSink),
    #[cfg(feature = "aws")]
    Kinesis(kinesis::KinesisSink),
}

impl Sink {
    /// `staging` is a directory on the buffer's file system for remote sinks' staged objects.
    /// Fails only for a destination type this build leaves out (which config validation
    /// refuses first).
    pub async fn new(config: &DestinationConfig, staging: &Path) -> anyhow::Result<Self> {
        let _ = staging;
        Ok(match &config.sink {
            SinkConfig::File { root, bucket } => {
                Sink::Object(ObjectSink::File(file::FileSink::new(root, bucket)))
            }
            #[cfg(feature = "aws")]
            SinkConfig::S3(s3) => Sink::Object(ObjectSink::S3(
                s3::S3Sink::new(
                    s3,
                    config.batching.compression,
                    staging,
                    config.put_concurrency,
                )
                .await,
            )),
            #[cfg(feature = "aws")]
            SinkConfig::Kinesis(k) => Sink::Kinesis(kinesis::KinesisSink::new(k).await),
            #[cfg(not(feature = "aws"))]
            SinkConfig::S3(_) | SinkConfig::Kinesis(_) => anyhow::bail!(
                "destination {}: this build has no AWS destinations (the `aws` feature)",
                config.name
            ),
        })
    }

    /// A short description for logs: where records go.
    pub fn describe(&self) -> String {
        match self {
            Sink::Object(s) => s.describe(),
            #[cfg(feature = "aws")]
            Sink::Kinesis(s) => s.describe(),
        }
    }
}

/// A sink that takes whole objects under keys.
pub enum ObjectSink {
    File(file::FileSink),
    #[cfg(feature = "aws")]
    S3(s3::S3Sink),
}

impl ObjectSink {
    /// Where the batcher writes the object bodies for destination `name` before `put`.
    pub fn staging_path(&self, name: &str) -> PathBuf {
        match self {
            ObjectSink::File(s) => s.staging_path(name),
            #[cfg(feature = "aws")]
            ObjectSink::S3(s) => s.staging_path(name),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ObjectSink::File(s) => s.describe(),
            #[cfg(feature = "aws")]
            ObjectSink::S3(s) => s.describe(),
        }
    }

    /// A cheap check that the destination is there and reachable (at start, and as the probe
    /// while it is down).
    pub async fn check(&self) -> Result<(), SinkError> {
        match self {
            ObjectSink::File(s) => s.check().await,
            #[cfg(feature = "aws")]
            ObjectSink::S3(s) => s.check().await,
        }
    }

    /// Puts one staged object under `key`.
    pub async fn put(&self, staged: &Staging, key: &str) -> Result<(), SinkError> {
        match self {
            ObjectSink::File(s) => s.put(staged, key).await,
            #[cfg(feature = "aws")]
            ObjectSink::S3(s) => {
                s.put(staged, key).await?;
                if let Staging::File(path) = staged {
                    let _ = tokio::fs::remove_file(path).await;
                }
                Ok(())
            }
        }
    }
}
