//! Sinks: where a finished batch goes.
//!
//! Object sinks (`file`, `s3`) get a staged object file and its key, and either store it durably
//! under that key or fail; putting the same key twice must be harmless, since a batch is retried
//! under the same key. The record sink (`kinesis`) gets the batch's records and puts them all,
//! resending only what failed.

pub mod aws;
pub mod file;
pub mod kinesis;
pub mod kpl;
pub mod s3;

use std::path::{Path, PathBuf};

use crate::config::{DestinationConfig, SinkConfig};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// An error from (or on the way to) a remote service, described for the log.
    #[error("{0}")]
    Remote(String),
}

impl SinkError {
    /// Whether trying again later may succeed. Every error so far is: a full disk empties, a
    /// mount returns, a permission or a credential gets fixed, a bucket gets created. The
    /// destination keeps the data meanwhile.
    pub fn is_retriable(&self) -> bool {
        true
    }
}

pub enum Sink {
    File(file::FileSink),
    S3(s3::S3Sink),
    Kinesis(kinesis::KinesisSink),
}

impl Sink {
    /// `staging` is a directory on the buffer's file system for remote sinks' staged objects.
    pub async fn new(config: &DestinationConfig, staging: &Path) -> Self {
        match &config.sink {
            SinkConfig::File { root, bucket } => Sink::File(file::FileSink::new(root, bucket)),
            SinkConfig::S3(s3) => {
                Sink::S3(s3::S3Sink::new(s3, config.batching.compression, staging).await)
            }
            SinkConfig::Kinesis(k) => Sink::Kinesis(kinesis::KinesisSink::new(k).await),
        }
    }

    /// Where the batcher writes the object body for destination `name` before `put`.
    pub fn staging_path(&self, name: &str) -> PathBuf {
        match self {
            Sink::File(s) => s.staging_path(name),
            Sink::S3(s) => s.staging_path(name),
            Sink::Kinesis(_) => PathBuf::new(),
        }
    }

    /// A short description for logs: where objects go.
    pub fn describe(&self) -> String {
        match self {
            Sink::File(s) => s.describe(),
            Sink::S3(s) => s.describe(),
            Sink::Kinesis(s) => s.describe(),
        }
    }

    /// Checks at start that the destination is there and reachable.
    pub async fn check(&self) -> Result<(), SinkError> {
        match self {
            Sink::File(_) => Ok(()),
            Sink::S3(s) => s.check().await,
            Sink::Kinesis(s) => s.check().await,
        }
    }

    /// Puts one staged object under `key` (object sinks only).
    pub async fn put(&self, staged: &Path, key: &str) -> Result<(), SinkError> {
        match self {
            Sink::File(s) => s.put(staged, key).await,
            Sink::S3(s) => {
                s.put(staged, key).await?;
                let _ = tokio::fs::remove_file(staged).await;
                Ok(())
            }
            Sink::Kinesis(_) => Err(SinkError::Remote(
                "a Kinesis destination takes records, not objects".into(),
            )),
        }
    }
}
