//! The buffer as a destination sees it: a read-only SQLite connection for its reads (run on the
//! blocking pool) and the writer's control channel for the intent/delivered protocol.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::engine::{Backlog, Journal};
use super::DeliveryError;
use crate::buffer::{store, BufferError, Control};

/// A destination's read connection, opened on first use (an error opening it is retried like
/// any read error).
#[derive(Clone)]
pub struct Reader {
    path: PathBuf,
    conn: Arc<Mutex<Option<Connection>>>,
}

impl Reader {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            conn: Arc::new(Mutex::new(None)),
        }
    }

    /// Runs a blocking read on the blocking pool.
    pub async fn read<T: Send + 'static, E>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, DeliveryError>
    where
        DeliveryError: From<E>,
        E: Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = this.conn.lock().unwrap_or_else(|p| p.into_inner());
            if guard.is_none() {
                *guard = Some(store::open_reader(&this.path)?);
            }
            let conn = guard.as_ref().expect("opened above");
            f(conn).map_err(DeliveryError::from)
        })
        .await
        .unwrap_or_else(|e| Err(DeliveryError::Stage(std::io::Error::other(e))))
    }
}

/// [`Journal`] over the real buffer.
pub struct BufferJournal {
    /// The destination's index (config order), as the writer knows it.
    pub index: usize,
    pub reader: Reader,
    /// Stream ids in the file.
    pub streams: Vec<i64>,
    pub newline: bool,
    pub control: mpsc::Sender<Control>,
}

impl BufferJournal {
    async fn request(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), BufferError>>) -> Control,
    ) -> Result<(), DeliveryError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(make(tx))
            .await
            .map_err(|_| BufferError::WriterGone)?;
        rx.await.map_err(|_| BufferError::WriterGone)??;
        Ok(())
    }
}

impl Journal for BufferJournal {
    async fn backlog(&mut self, after: i64) -> Result<Backlog, DeliveryError> {
        let streams = self.streams.clone();
        let newline = u64::from(self.newline);
        self.reader
            .read(move |c| store::backlog(c, &streams, after))
            .await
            .map(|(records, bytes, oldest)| Backlog {
                records,
                bytes: bytes + newline * records,
                oldest_arrival_ms: oldest,
            })
    }

    async fn intent(&mut self, last_id: i64, version: i64) -> Result<(), DeliveryError> {
        let dest = self.index;
        self.request(|done| Control::Intent {
            dest,
            last_id,
            key: format!("version:{version}"),
            done,
        })
        .await
    }

    async fn delivered(&mut self, last_id: i64) -> Result<(), DeliveryError> {
        let dest = self.index;
        self.request(|done| Control::Delivered {
            dest,
            last_id,
            done,
        })
        .await
    }
}
