//! The buffer's single writer: group commits of incoming envelopes, the bound and its policy,
//! and delivery positions. It runs on its own thread, so SQLite's blocking calls (and fsync)
//! never stall the async runtime. Acks are completed only after the commit that holds them.

use std::time::Duration;

use rusqlite::{params, Connection};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::store;
use super::BufferError;
use crate::config::{BufferConfig, WhenFull};
use crate::message::{Ack, Envelope, Outcome};
use crate::metrics as m;
use crate::routing::Reject;

/// Capacity of the ingress -> writer channel, in envelopes. When it is full, ingress waits.
pub const INGEST_CHANNEL_CAPACITY: usize = 8192;
/// Capacity of the destinations -> writer channel (each destination has one request in flight).
pub const CONTROL_CHANNEL_CAPACITY: usize = 64;
/// Rows deleted per step of the `drop_oldest` policy.
const DROP_STEP: u64 = 256;

/// What has been committed so far, published after every commit. Counters are cumulative since
/// start, per stream (indexed as in the config), so each destination can tell how much is
/// pending for it without querying.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    pub last_id: i64,
    pub records: Vec<u64>,
    pub payload_bytes: Vec<u64>,
    /// Ingress has stopped and everything it sent is committed (or was refused).
    pub ingest_closed: bool,
}

/// Requests from destinations.
#[derive(Debug)]
pub enum Control {
    /// Remember a batch's boundary and object key before the object may become visible, so a
    /// retry after a crash rebuilds the same batch under the same key.
    Intent {
        dest: usize,
        last_id: i64,
        key: String,
        done: oneshot::Sender<Result<(), BufferError>>,
    },
    /// The destination holds every record of its streams up to `last_id`.
    Delivered {
        dest: usize,
        last_id: i64,
        done: oneshot::Sender<Result<(), BufferError>>,
    },
}

/// The writer's view of the destinations it keeps positions for.
pub struct DestinationSlot {
    pub name: String,
    pub delivered_id: i64,
}

pub struct Writer {
    conn: Connection,
    config: BufferConfig,
    /// Config stream index -> stream id in the file.
    stream_ids: Vec<i64>,
    /// Config stream index -> the destinations that read it.
    readers: Vec<Vec<usize>>,
    destinations: Vec<DestinationSlot>,
    /// Per stream: records up to here were deleted (or never existed).
    deleted_up_to: Vec<i64>,
    records: u64,
    bytes: u64,
    committed: watch::Sender<Committed>,
}

struct Pending {
    ack: Ack,
    outcome: Outcome,
}

impl Writer {
    pub fn new(
        conn: Connection,
        config: BufferConfig,
        stream_ids: Vec<i64>,
        readers: Vec<Vec<usize>>,
        destinations: Vec<DestinationSlot>,
        committed: watch::Sender<Committed>,
    ) -> Result<Self, BufferError> {
        let (records, bytes) = store::usage(&conn)?;
        let last_id = store::max_id(&conn)?;
        let streams = stream_ids.len();
        committed.send_modify(|c| {
            c.last_id = last_id;
            c.records = vec![0; streams];
            c.payload_bytes = vec![0; streams];
        });
        let w = Self {
            conn,
            config,
            deleted_up_to: vec![0; streams],
            stream_ids,
            readers,
            destinations,
            records,
            bytes,
            committed,
        };
        w.publish_usage();
        Ok(w)
    }

    /// Runs the writer on a thread of its own until both channels are closed.
    pub fn spawn(
        self,
        ingest: mpsc::Receiver<Envelope>,
        control: mpsc::Receiver<Control>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("buffer-writer".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        error!(error = %e, "cannot start the buffer writer's runtime");
                        return;
                    }
                };
                rt.block_on(self.run(ingest, control));
            })
    }

    fn has_room(&self) -> bool {
        self.config.when_full != WhenFull::Block || self.bytes < self.config.max_size
    }

    async fn run(
        mut self,
        mut ingest: mpsc::Receiver<Envelope>,
        mut control: mpsc::Receiver<Control>,
    ) {
        let mut held: Option<Envelope> = None;
        let mut ingest_open = true;
        let mut control_open = true;
        let mut waiting_logged = false;
        loop {
            if let Some(env) = held.take() {
                if self.has_room() {
                    waiting_logged = false;
                    ingest_open &= self.group(env, &mut ingest, &mut held).await;
                    continue;
                }
                if !control_open {
                    // Nothing can free space any more (shutdown): leave it unacknowledged.
                    warn!(
                        "buffer full at shutdown; one message left uncommitted and unacknowledged"
                    );
                    drop(env);
                } else {
                    if !waiting_logged {
                        warn!(
                            bytes = self.bytes,
                            max = self.config.max_size,
                            "buffer full: ingest waits for delivery (when_full = \"block\")"
                        );
                        metrics::counter!(m::BUFFER_FULL_WAITS).increment(1);
                        waiting_logged = true;
                    }
                    held = Some(env);
                }
            }
            if !ingest_open && held.is_none() && !self.committed.borrow().ingest_closed {
                self.committed.send_modify(|c| c.ingest_closed = true);
            }
            if !ingest_open && !control_open {
                break;
            }
            let can_ingest = ingest_open && held.is_none();
            tokio::select! {
                biased;
                c = control.recv(), if control_open => match c {
                    Some(c) => self.control(c),
                    None => control_open = false,
                },
                e = ingest.recv(), if can_ingest => match e {
                    Some(env) => held = Some(env),
                    None => ingest_open = false,
                },
            }
        }
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            warn!(error = %e, "final WAL checkpoint failed (harmless: the WAL is replayed at start)");
        }
        info!(records = self.records, bytes = self.bytes, "buffer closed");
    }

    /// Commits `first` and whatever else arrives within the commit interval, up to the
    /// configured number of records. Returns false once the ingest channel is closed.
    async fn group(
        &mut self,
        first: Envelope,
        ingest: &mut mpsc::Receiver<Envelope>,
        held: &mut Option<Envelope>,
    ) -> bool {
        let deadline = Instant::now() + self.config.commit_interval;
        let before = (self.records, self.bytes);
        let streams = self.stream_ids.len();
        let mut added_records = vec![0u64; streams];
        let mut added_bytes = vec![0u64; streams];
        let mut pending: Vec<Pending> = Vec::new();
        let mut dropped = 0u64;
        let mut open = true;
        let mut count = 0usize;

        let result: Result<i64, BufferError> = async {
            self.conn.execute_batch("BEGIN")?;
            count += self.admit(
                first,
                &mut pending,
                &mut added_records,
                &mut added_bytes,
                &mut dropped,
            )?;
            while count < self.config.commit_max_records {
                let next = match ingest.try_recv() {
                    Ok(env) => env,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {
                        match tokio::time::timeout_at(deadline, ingest.recv()).await {
                            Ok(Some(env)) => env,
                            Ok(None) => {
                                open = false;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                };
                if self.config.when_full == WhenFull::Block && !self.fits(&next) {
                    *held = Some(next);
                    break;
                }
                count += self.admit(
                    next,
                    &mut pending,
                    &mut added_records,
                    &mut added_bytes,
                    &mut dropped,
                )?;
            }
            self.conn.execute_batch("COMMIT")?;
            Ok(self.conn.last_insert_rowid())
        }
        .await;

        match result {
            Ok(last_id) => {
                let records: u64 = added_records.iter().sum();
                metrics::counter!(m::COMMITTED).increment(records);
                metrics::counter!(m::COMMITS).increment(1);
                if dropped > 0 {
                    metrics::counter!(m::BUFFER_DROPPED).increment(dropped);
                    error!(
                        dropped,
                        "buffer full: deleted the oldest undelivered records (when_full = \"drop_oldest\")"
                    );
                }
                self.publish_usage();
                self.committed.send_modify(|c| {
                    c.last_id = c.last_id.max(last_id);
                    for s in 0..streams {
                        c.records[s] += added_records[s];
                        c.payload_bytes[s] += added_bytes[s];
                    }
                });
                for p in pending {
                    if let Outcome::Rejected(reason) = p.outcome {
                        metrics::counter!(m::REJECTED, "reason" => reason.label()).increment(1);
                    }
                    p.ack.complete(p.outcome);
                }
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                (self.records, self.bytes) = before;
                error!(
                    error = %e,
                    messages = pending.len(),
                    "buffer commit failed: these messages are not stored and not acknowledged"
                );
                metrics::counter!(m::REJECTED, "reason" => "storage_error")
                    .increment(pending.len() as u64);
                drop(pending);
                // Do not spin on a failing disk.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        open
    }

    fn fits(&self, env: &Envelope) -> bool {
        let need: u64 = match &env.records {
            Ok(records) => records.iter().map(|r| r.accounted_bytes()).sum(),
            Err(_) => 0,
        };
        self.bytes + need <= self.config.max_size
    }

    /// Inserts one envelope's records inside the open transaction; returns how many.
    fn admit(
        &mut self,
        env: Envelope,
        pending: &mut Vec<Pending>,
        added_records: &mut [u64],
        added_bytes: &mut [u64],
        dropped: &mut u64,
    ) -> Result<usize, BufferError> {
        let records = match env.records {
            Ok(records) => records,
            Err(reason) => {
                pending.push(Pending {
                    ack: env.ack,
                    outcome: Outcome::Rejected(reason),
                });
                return Ok(0);
            }
        };
        let need: u64 = records.iter().map(|r| r.accounted_bytes()).sum();
        if self.bytes + need > self.config.max_size {
            match self.config.when_full {
                WhenFull::RejectNew => {
                    pending.push(Pending {
                        ack: env.ack,
                        outcome: Outcome::Rejected(Reject::BufferFull),
                    });
                    return Ok(0);
                }
                WhenFull::DropOldest => {
                    while self.bytes + need > self.config.max_size && self.records > 0 {
                        let (n, b) = store::delete_oldest(&self.conn, DROP_STEP)?;
                        if n == 0 {
                            break;
                        }
                        self.records -= n;
                        self.bytes = self.bytes.saturating_sub(b);
                        *dropped += n;
                    }
                }
                WhenFull::Block => {}
            }
        }
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO records(stream, arrival_ms, topic, client_id, partition_key, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let n = records.len();
        for r in &records {
            stmt.execute(params![
                self.stream_ids[r.stream],
                r.arrival_ms,
                r.topic,
                r.client_id,
                r.partition_key,
                r.payload
            ])?;
            added_records[r.stream] += 1;
            added_bytes[r.stream] += r.payload.len() as u64;
        }
        self.records += n as u64;
        self.bytes += need;
        pending.push(Pending {
            ack: env.ack,
            outcome: Outcome::Committed,
        });
        Ok(n)
    }

    fn control(&mut self, c: Control) {
        match c {
            Control::Intent {
                dest,
                last_id,
                key,
                done,
            } => {
                let r = store::set_intent(&self.conn, &self.destinations[dest].name, last_id, &key)
                    .map_err(BufferError::from);
                let _ = done.send(r);
            }
            Control::Delivered {
                dest,
                last_id,
                done,
            } => {
                let r = self.delivered(dest, last_id);
                let _ = done.send(r);
            }
        }
    }

    /// Moves a destination's position and deletes what every reader of a stream now holds.
    fn delivered(&mut self, dest: usize, last_id: i64) -> Result<(), BufferError> {
        self.conn.execute_batch("BEGIN")?;
        let result = (|| {
            store::set_delivered(&self.conn, &self.destinations[dest].name, last_id)?;
            let mut freed = (0u64, 0u64);
            for (stream, readers) in self.readers.iter().enumerate() {
                if !readers.contains(&dest) {
                    continue;
                }
                let everyone_has = readers
                    .iter()
                    .map(|&d| {
                        if d == dest {
                            last_id
                        } else {
                            self.destinations[d].delivered_id
                        }
                    })
                    .min()
                    .unwrap_or(0);
                if everyone_has > self.deleted_up_to[stream] {
                    let (n, b) = store::delete_range(
                        &self.conn,
                        self.stream_ids[stream],
                        self.deleted_up_to[stream],
                        everyone_has,
                    )?;
                    freed.0 += n;
                    freed.1 += b;
                }
            }
            Ok::<_, BufferError>(freed)
        })();
        match result.and_then(|freed| {
            self.conn.execute_batch("COMMIT")?;
            Ok(freed)
        }) {
            Ok((n, b)) => {
                self.destinations[dest].delivered_id = last_id;
                for (stream, readers) in self.readers.iter().enumerate() {
                    let everyone_has = readers
                        .iter()
                        .map(|&d| self.destinations[d].delivered_id)
                        .min()
                        .unwrap_or(0);
                    self.deleted_up_to[stream] = self.deleted_up_to[stream].max(everyone_has);
                }
                self.records = self.records.saturating_sub(n);
                self.bytes = self.bytes.saturating_sub(b);
                self.publish_usage();
                Ok(())
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn publish_usage(&self) {
        metrics::gauge!(m::BUFFER_RECORDS).set(self.records as f64);
        metrics::gauge!(m::BUFFER_BYTES).set(self.bytes as f64);
    }
}
