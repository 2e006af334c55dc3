//! Batching: one task per destination applies Firehose's buffering hints (flush when the pending
//! bytes reach the size hint or the oldest pending record reaches the interval, whichever comes
//! first) over the committed records of its streams, and hands each batch to its sink.
//!
//! A batch is never held in memory: its boundaries are chosen over the durable log, its body is
//! streamed from SQLite into a staged file ([`object`]), and its key is derived from its identity
//! ([`keys`]). Before the object can become visible the batch's last id and key are committed as
//! an intent, so a batch interrupted by a crash is rebuilt and put again under the same key.

pub mod keys;
pub mod object;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::buffer::{store, BufferError, Committed, Control, DestinationState};
use crate::config::DestinationConfig;
use crate::metrics as m;
use crate::shutdown::Shutdown;
use crate::sinks::kinesis::Rec;
use crate::sinks::{file::FileSink, Sink};
use keys::BatchId;
use object::{Selection, Staged};

/// Delivery retries back off from this...
const RETRY_MIN: Duration = Duration::from_secs(1);
/// ...to at most this, and go on for as long as the data is held.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How often a caught-up destination moves its position past other streams' records.
const IDLE_ADVANCE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error(transparent)]
    Assemble(#[from] object::AssembleError),
    #[error(transparent)]
    Buffer(#[from] BufferError),
    #[error("reading the buffer: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error(transparent)]
    Sink(#[from] crate::sinks::SinkError),
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
}

/// How much is pending, derived from the writer's cumulative counters minus what this
/// destination has taken (or found gone) so far.
#[derive(Debug, Default, Clone, Copy)]
struct Taken {
    // Signed: at start the backlog already in the file counts as taken "below zero".
    records: i64,
    bytes: i64,
}

/// What the writer has committed so far for `streams`, delimiters included.
fn cumulative(streams: &[usize], newline: bool, c: &Committed) -> Taken {
    let newline = u64::from(newline);
    let mut t = Taken::default();
    for &s in streams {
        let records = c.records.get(s).copied().unwrap_or(0);
        t.records += records as i64;
        t.bytes += (c.payload_bytes.get(s).copied().unwrap_or(0) + newline * records) as i64;
    }
    t
}

impl Destination {
    pub async fn run(mut self) {
        info!(
            destination = %self.config.name,
            sink = %self.sink.describe(),
            version = self.state.version,
            delivered_id = self.state.delivered_id,
            "destination started"
        );
        let name = self.config.name.clone();
        match self.sink.check().await {
            Ok(()) => metrics::gauge!(m::DESTINATION_UP, "destination" => name.clone()).set(1.0),
            Err(e) => {
                metrics::gauge!(m::DESTINATION_UP, "destination" => name.clone()).set(0.0);
                error!(
                    destination = %name,
                    sink = %self.sink.describe(),
                    error = %e,
                    "destination is not usable yet; records stay buffered and delivery is retried"
                );
            }
        }
        let reader = match store::open_reader(&self.buffer_path) {
            Ok(c) => Arc::new(Mutex::new(c)),
            Err(e) => {
                error!(destination = %self.config.name, error = %e, "cannot open the buffer for reading; this destination delivers nothing until restarted");
                return;
            }
        };
        // Finish a batch a crash interrupted, under the key it was given.
        if let Some((last_id, key)) = self.state.intent.take() {
            info!(destination = %self.config.name, last_id, key = %key, "replaying the batch that was in flight");
            self.flush(&reader, Some((last_id, key))).await;
        }
        // What is pending now, as a baseline against the writer's counters.
        let pending = {
            let (streams, after) = (self.stream_ids.clone(), self.state.delivered_id);
            let newline = u64::from(self.config.batching.newline);
            blocking(&reader, move |c| store::pending(c, &streams, after))
                .await
                .map(|(n, bytes)| Taken {
                    records: n as i64,
                    bytes: (bytes + newline * n) as i64,
                })
                .unwrap_or_default()
        };
        let newline = self.config.batching.newline;
        let now = cumulative(&self.streams, newline, &self.committed.borrow());
        let mut taken = Taken {
            records: now.records - pending.records,
            bytes: now.bytes - pending.bytes,
        };
        let mut oldest: Option<i64> = None;
        let mut last_advance = tokio::time::Instant::now();

        loop {
            let h = *self.hints.borrow_and_update();
            if (h.size, h.interval) != (self.config.batching.size, self.config.batching.interval) {
                info!(destination = %name, size = h.size, interval = ?h.interval, "buffering hints changed");
                self.config.batching.size = h.size;
                self.config.batching.interval = h.interval;
            }
            let (cum, last_id, ingest_closed) = {
                let c = self.committed.borrow_and_update();
                (
                    cumulative(&self.streams, newline, &c),
                    c.last_id,
                    c.ingest_closed,
                )
            };
            let pending_records = cum.records - taken.records;
            let pending_bytes = (cum.bytes - taken.bytes).max(0) as u64;
            metrics::gauge!(m::BACKLOG_RECORDS, "destination" => name.clone())
                .set(pending_records.max(0) as f64);
            let age = match oldest {
                Some(t) if pending_records > 0 => (now_ms() - t).max(0) as f64 / 1000.0,
                _ => 0.0,
            };
            metrics::gauge!(m::BACKLOG_AGE, "destination" => name.clone()).set(age);
            let stopping = self.shutdown.is_begun() && ingest_closed;
            if pending_records <= 0 {
                // Caught up: every record of its streams up to `last_id` is delivered. Saying
                // so (now and then) lets segments that also hold other streams' records go.
                if last_id > self.state.delivered_id
                    && (stopping || last_advance.elapsed() >= IDLE_ADVANCE)
                {
                    last_advance = tokio::time::Instant::now();
                    if let Err(e) = self.delivered(last_id).await {
                        warn!(destination = %self.config.name, error = %e, "cannot record the delivery position");
                    }
                }
                if stopping {
                    break;
                }
                oldest = None;
                self.wait(None).await;
                continue;
            }
            if oldest.is_none() {
                let (streams, after) = (self.stream_ids.clone(), self.state.delivered_id);
                oldest = blocking(&reader, move |c| store::oldest_arrival(c, &streams, after))
                    .await
                    .ok()
                    .flatten();
                if oldest.is_none() {
                    // Counted but gone (deleted by drop_oldest): nothing to deliver.
                    taken = cum;
                    continue;
                }
            }
            let due = oldest.unwrap_or(0) + self.config.batching.interval.as_millis() as i64;
            if stopping || pending_bytes >= self.config.batching.size || now_ms() >= due {
                let (records, bytes) = self.flush(&reader, None).await.unwrap_or((0, 0));
                if records == 0 {
                    // Nothing was there: resynchronise with the counters.
                    taken = cum;
                } else {
                    taken.records += records as i64;
                    taken.bytes += bytes as i64;
                }
                oldest = None;
                continue;
            }
            self.wait(Some(due)).await;
        }
        info!(destination = %self.config.name, delivered_id = self.state.delivered_id, "destination stopped");
    }

    /// Waits for a commit, for the flush deadline, or for shutdown to begin.
    async fn wait(&mut self, due_ms: Option<i64>) {
        let sleep = async {
            match due_ms {
                Some(due) => {
                    let ms = (due - now_ms()).max(0) as u64;
                    tokio::time::sleep(Duration::from_millis(ms)).await
                }
                None => std::future::pending().await,
            }
        };
        let shutting_down = self.shutdown.is_begun();
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            r = self.committed.changed() => {
                if r.is_err() {
                    // The writer is gone; nothing more will arrive.
                    std::future::pending::<()>().await;
                }
            }
            _ = sleep => {}
            _ = self.hints.changed() => {}
            _ = shutdown.wait(), if !shutting_down => {}
        }
    }

    /// Builds, puts and records one batch, retrying until it is delivered. `replay` rebuilds
    /// the batch an intent names. Returns (records, bytes) taken from the pending count.
    async fn flush(
        &mut self,
        reader: &Arc<Mutex<Connection>>,
        replay: Option<(i64, String)>,
    ) -> Option<(u64, u64)> {
        let mut delay = RETRY_MIN;
        loop {
            let result = if matches!(self.sink, Sink::Kinesis(_)) {
                self.try_flush_records(reader).await
            } else {
                self.try_flush(reader, replay.clone()).await
            };
            match result {
                Ok(taken) => {
                    metrics::gauge!(m::DESTINATION_UP, "destination" => self.config.name.clone())
                        .set(1.0);
                    return Some(taken);
                }
                Err(e) => {
                    metrics::counter!(m::DELIVERY_ERRORS, "destination" => self.config.name.clone())
                        .increment(1);
                    metrics::gauge!(m::DESTINATION_UP, "destination" => self.config.name.clone())
                        .set(0.0);
                    let jitter = rand::rng().random_range(0.8..1.2);
                    let wait = delay.mul_f64(jitter);
                    warn!(
                        destination = %self.config.name,
                        error = %e,
                        retry_in = ?wait,
                        "delivery failed; the batch stays buffered and will be retried"
                    );
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    async fn try_flush(
        &mut self,
        reader: &Arc<Mutex<Connection>>,
        replay: Option<(i64, String)>,
    ) -> Result<(u64, u64), FlushError> {
        let path = self.sink.staging_path(&self.config.name);
        let streams = self.stream_ids.clone();
        let after = self.state.delivered_id;
        let (until, max_bytes) = match &replay {
            Some((last, _)) => (Some(*last), None),
            None => (None, Some(self.config.batching.size)),
        };
        let batching = self.config.batching.clone();
        let prefix = self.config.keys.prefix.clone();
        let staged: Option<Staged> = blocking(reader, move |c| {
            object::assemble(
                c,
                Selection {
                    streams: &streams,
                    after,
                    until,
                    max_bytes,
                },
                &batching,
                &prefix,
                &path,
            )
        })
        .await?;
        let Some(staged) = staged else {
            if let Some((last, _)) = replay {
                // Everything the intent named is gone (dropped); move past it.
                self.delivered(last).await?;
            }
            return Ok((0, 0));
        };
        // Keys depend on the version the batch was first given: a replay keeps it.
        let version = match &replay {
            Some((_, intent)) => intent
                .strip_prefix("version:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(self.state.version),
            None => self.state.version,
        };
        let mut keyed = Vec::with_capacity(staged.parts.len());
        for part in &staged.parts {
            let batch = BatchId {
                destination: &self.config.name,
                version,
                first_id: staged.first_id,
                last_id: staged.last_id,
                oldest_arrival_ms: part.oldest_arrival_ms,
            };
            let key = if part.error {
                self.config
                    .keys
                    .error_key(batch)
                    .unwrap_or_else(|| self.config.keys.object_key(batch))?
            } else {
                self.config.keys.partition_key(batch, &part.partition)?
            };
            keyed.push((part, key));
        }
        if replay.is_none() {
            self.request(|done| Control::Intent {
                dest: self.index,
                last_id: staged.last_id,
                key: format!("version:{version}"),
                done,
            })
            .await?;
        }
        for (part, key) in &keyed {
            self.sink.put(&part.path, key).await?;
            debug!(destination = %self.config.name, key = %key, records = part.records, "object delivered");
        }
        self.delivered(staged.last_id).await?;
        let name = self.config.name.clone();
        for (code, n) in &staged.errors {
            warn!(destination = %name, code, records = n, "records went to the error output");
            metrics::counter!(m::ERROR_RECORDS, "destination" => name.clone(), "code" => *code)
                .increment(*n);
        }
        metrics::counter!(m::DELIVERED_RECORDS, "destination" => name.clone())
            .increment(staged.records);
        metrics::counter!(m::DELIVERED_BATCHES, "destination" => name.clone())
            .increment(staged.parts.len() as u64);
        metrics::counter!(m::DELIVERED_BYTES, "destination" => name).increment(staged.bytes);
        Ok((staged.records, staged.bytes))
    }

    /// One batch to a record sink (Kinesis): read into memory (at most the size hint), put
    /// until every record is in, then move the position. A crash in between sends the batch
    /// again after restart (at-least-once).
    async fn try_flush_records(
        &mut self,
        reader: &Arc<Mutex<Connection>>,
    ) -> Result<(u64, u64), FlushError> {
        let Sink::Kinesis(sink) = &self.sink else {
            unreachable!("record flush on an object sink");
        };
        let streams = self.stream_ids.clone();
        let after = self.state.delivered_id;
        let max = self.config.batching.size;
        let records: Vec<Rec> = blocking(reader, move |c| {
            let mut out = Vec::new();
            let mut bytes = 0u64;
            store::scan(c, &streams, after, None, |row| {
                let len = row.payload.len() as u64;
                if !out.is_empty() && bytes + len > max {
                    return std::ops::ControlFlow::Break(());
                }
                bytes += len;
                out.push(Rec {
                    id: row.id,
                    arrival_ms: row.arrival_ms,
                    key: row.partition_key.to_string(),
                    data: row.payload.to_vec(),
                });
                std::ops::ControlFlow::Continue(())
            })
            .map(|_| out)
        })
        .await?;
        let Some(last_id) = records.last().map(|r| r.id) else {
            return Ok((0, 0));
        };
        let n = records.len() as u64;
        let bytes: u64 = records.iter().map(|r| r.data.len() as u64).sum();
        let name = self.config.name.clone();
        let outcome = sink.deliver(records, &name).await;
        if !outcome.rejected.is_empty() {
            self.write_errors(&outcome.rejected).await?;
        }
        self.delivered(last_id).await?;
        metrics::counter!(m::DELIVERED_RECORDS, "destination" => name.clone()).increment(n);
        metrics::counter!(m::DELIVERED_BATCHES, "destination" => name.clone()).increment(1);
        metrics::counter!(m::DELIVERED_BYTES, "destination" => name.clone()).increment(bytes);
        metrics::counter!(m::KINESIS_RECORDS, "destination" => name.clone())
            .increment(outcome.kinesis_records);
        metrics::counter!(m::KINESIS_REQUESTS, "destination" => name.clone())
            .increment(outcome.requests);
        metrics::counter!(m::KINESIS_PUT_UNITS, "destination" => name.clone())
            .increment(outcome.put_units);
        metrics::counter!(m::RESENT_RECORDS, "destination" => name.clone())
            .increment(outcome.duplicates);
        debug!(destination = %name, records = n, kinesis_records = outcome.kinesis_records, requests = outcome.requests, retried = outcome.retried_entries, "batch put");
        Ok((n, bytes))
    }

    /// Writes records a Kinesis stream can never take to the destination's local error output,
    /// in Firehose's error-record shape, and counts them.
    async fn write_errors(
        &self,
        rejected: &[(Rec, &'static str, String)],
    ) -> Result<(), FlushError> {
        let crate::config::SinkConfig::Kinesis(k) = &self.config.sink else {
            return Ok(());
        };
        let sink = FileSink::new(&k.error_output_root, &self.config.name);
        let staged = sink.staging_path(&self.config.name);
        if let Some(dir) = staged.parent() {
            std::fs::create_dir_all(dir).map_err(object::AssembleError::Io)?;
        }
        let mut body = Vec::new();
        for (rec, code, why) in rejected {
            body.extend(object::error_record(rec.arrival_ms, code, why, &rec.data));
            metrics::counter!(m::ERROR_RECORDS, "destination" => self.config.name.clone(), "code" => *code)
                .increment(1);
            warn!(destination = %self.config.name, id = rec.id, code, reason = %why, "record cannot go to Kinesis; written to the error output");
        }
        let first = &rejected[0].0;
        let key = self
            .config
            .keys
            .error_key(BatchId {
                destination: &self.config.name,
                version: self.state.version,
                first_id: first.id,
                last_id: rejected[rejected.len() - 1].0.id,
                oldest_arrival_ms: first.arrival_ms,
            })
            .unwrap_or_else(|| Ok(format!("processing-failed/{}", first.id)))?;
        // Staged and fsynced here; the `file` sink renames it into place like any object.
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&staged)?;
            std::io::Write::write_all(&mut f, &body)?;
            f.sync_all()
        };
        write().map_err(object::AssembleError::Io)?;
        sink.put(&staged, &key).await?;
        Ok(())
    }

    async fn delivered(&mut self, last_id: i64) -> Result<(), BufferError> {
        self.request(|done| Control::Delivered {
            dest: self.index,
            last_id,
            done,
        })
        .await?;
        self.state.delivered_id = last_id;
        Ok(())
    }

    async fn request(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), BufferError>>) -> Control,
    ) -> Result<(), BufferError> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(make(tx))
            .await
            .map_err(|_| BufferError::WriterGone)?;
        rx.await.map_err(|_| BufferError::WriterGone)?
    }
}

/// Runs a blocking SQLite read on the blocking pool.
async fn blocking<T: Send + 'static, E>(
    reader: &Arc<Mutex<Connection>>,
    f: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
) -> Result<T, FlushError>
where
    FlushError: From<E>,
    E: Send + 'static,
{
    let reader = Arc::clone(reader);
    tokio::task::spawn_blocking(move || {
        let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(FlushError::from)
    })
    .await
    .unwrap_or_else(|e| {
        Err(FlushError::Assemble(object::AssembleError::Io(
            std::io::Error::other(e),
        )))
    })
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
