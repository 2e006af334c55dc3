//! Sinks: where a finished batch goes. A sink gets a staged object file and its key, and either
//! stores it durably under that key or fails; putting the same key twice must be harmless, since
//! a batch is retried under the same key.

pub mod file;

use std::path::{Path, PathBuf};

use crate::config::SinkConfig;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl SinkError {
    /// Whether trying again later may succeed. Every error so far is: a full disk empties, a
    /// mount returns, a permission gets fixed. The destination keeps the data meanwhile.
    pub fn is_retriable(&self) -> bool {
        true
    }
}

pub enum Sink {
    File(file::FileSink),
}

impl Sink {
    pub fn new(config: &SinkConfig) -> Self {
        match config {
            SinkConfig::File { root, bucket } => Sink::File(file::FileSink::new(root, bucket)),
        }
    }

    /// Where the batcher writes the object body for destination `name` before `put`.
    pub fn staging_path(&self, name: &str) -> PathBuf {
        match self {
            Sink::File(s) => s.staging_path(name),
        }
    }

    /// A short description for logs: where objects go.
    pub fn describe(&self) -> String {
        match self {
            Sink::File(s) => s.describe(),
        }
    }

    pub async fn put(&self, staged: &Path, key: &str) -> Result<(), SinkError> {
        match self {
            Sink::File(s) => s.put(staged, key).await,
        }
    }
}
