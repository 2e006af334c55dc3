//! The buffer's single writer: group commits of incoming envelopes, the bound and its policy,
//! and delivery positions. It runs on its own thread, so SQLite's blocking calls (and fsync)
//! never stall the async runtime. Acks are completed only after the commit that holds them.

use std::collections::VecDeque;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::block::StreamBlocks;
use super::store::{self, Segment, SegmentFormat};
use super::BufferError;
use crate::config::{BufferConfig, WhenFull};
use crate::message::{Ack, Envelope, Outcome};
use crate::metrics as m;
use crate::routing::Reject;

/// Capacity of the ingress -> writer channel, in envelopes. When it is full, ingress waits.
pub const INGEST_CHANNEL_CAPACITY: usize = 8192;
/// Capacity of the destinations -> writer channel (each destination has one request in flight).
pub const CONTROL_CHANNEL_CAPACITY: usize = 64;
/// Room kept under `buffer.max_size` for the pages a B-tree split may add beyond the estimate.
const PAGE_SLACK: u64 = 2 * 4096;
/// A segment takes at most this many records...
const SEGMENT_MAX_RECORDS: u64 = 65_536;
/// ...and at most this many bytes, or a sixteenth of the buffer bound if that is less, so that
/// dropping delivered segments keeps the file near its live size.
const SEGMENT_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// A block is closed at this many raw bytes even inside one commit, so readers decode blocks of
/// bounded size (and the writer's block buffers stay small: 1 MiB blocks cost ~3.5 MiB more peak
/// RSS at the maximum rate than 256 KiB ones, at the same rate; BENCHMARKS.md).
const BLOCK_MAX_RAW: usize = 256 * 1024;
/// A lingering group commits once nothing has arrived for this long.
const IDLE_COMMIT: Duration = Duration::from_millis(1);

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
    /// Answered at once: the writer's loop is alive (the systemd watchdog asks).
    Ping(oneshot::Sender<()>),
    /// The front door's persistent sessions and retained messages changed.
    SaveSessions {
        changes: Box<super::sessions::SessionChanges>,
        done: oneshot::Sender<Result<(), BufferError>>,
    },
}

/// The writer's view of the destinations it keeps positions for.
pub struct DestinationSlot {
    pub name: String,
    pub delivered_id: i64,
}

pub struct Writer {
    /// `/healthz`: whether the buffer takes writes, and why not.
    health: crate::health::Health,
    health_state: Option<String>,
    conn: Connection,
    config: BufferConfig,
    /// Config stream index -> stream id in the file.
    stream_ids: Vec<i64>,
    destinations: Vec<DestinationSlot>,
    /// Oldest first; the last one is the active segment, the only one appended to.
    segments: VecDeque<Segment>,
    /// Accounted bytes appended to the active segment.
    active_bytes: u64,
    /// The INSERT statement for the active segment.
    insert_sql: String,
    /// The records of the open transaction not yet inserted: they go in as a block per stream,
    /// numbered as each block is inserted.
    block: StreamBlocks,
    linger: Linger,
    segment_max_bytes: u64,
    /// Bytes of the file in use, measured after the last commit.
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
        destinations: Vec<DestinationSlot>,
        committed: watch::Sender<Committed>,
        health: crate::health::Health,
    ) -> Result<Self, BufferError> {
        let mut segments: VecDeque<Segment> = store::segments_exact(&conn)?.into();
        if segments.is_empty() {
            segments.push_back(store::create_segment(&conn, 1, 1)?);
        }
        let last_id = segments.back().map_or(0, |s| s.last_id);
        let streams = stream_ids.len();
        committed.send_modify(|c| {
            c.last_id = last_id;
            c.records = vec![0; streams];
            c.payload_bytes = vec![0; streams];
        });
        let mut w = Self {
            insert_sql: store::insert_block_sql(segments.back().expect("created above")),
            block: StreamBlocks::new(&stream_ids)?,
            linger: Linger::new(config.commit_linger_records),
            bytes: store::used_bytes(&conn)?,
            conn,
            segment_max_bytes: (config.max_size / 16).clamp(64 * 1024, SEGMENT_MAX_BYTES),
            config,
            stream_ids,
            destinations,
            segments,
            active_bytes: 0,
            committed,
            health,
            health_state: None,
        };
        // A buffer written by an earlier version: new records go to a segment of blocks that
        // say their stream.
        if w.active().format != SegmentFormat::StreamBlocks {
            w.execute_in_transaction(|w| w.rotate())?;
        }
        // What every destination already has may be dropped now.
        w.execute_in_transaction(|w| w.drop_delivered_segments())?;
        w.publish_usage();
        Ok(w)
    }

    /// Records some destination has not delivered yet. Ids are dense within a segment (segments
    /// are only ever dropped whole), so this is exact.
    fn undelivered(&self) -> u64 {
        let everyone_has = self.everyone_has();
        self.segments
            .iter()
            .map(|s| {
                if s.first_id > everyone_has {
                    s.records
                } else {
                    (s.last_id - everyone_has).max(0) as u64
                }
            })
            .sum()
    }

    fn active(&mut self) -> &mut Segment {
        self.segments
            .back_mut()
            .expect("there is always an active segment")
    }

    fn execute_in_transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, BufferError>,
    ) -> Result<T, BufferError> {
        self.conn.execute_batch("BEGIN")?;
        let segments = self.segments.clone();
        match f(self).and_then(|t| {
            self.conn.execute_batch("COMMIT")?;
            Ok(t)
        }) {
            Ok(t) => {
                self.bytes = store::used_bytes(&self.conn)?;
                Ok(t)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.segments = segments;
                Err(e)
            }
        }
    }

    /// Runs the writer on a thread of its own until every channel is closed. `windows` carries
    /// the window stages' commits: read even while the buffer is full under `block` (ingest is
    /// not read then), since a window's commit is what lets the buffer drop the rows the window
    /// held; behind device messages in `ingest` it could wait for ever.
    pub fn spawn(
        self,
        ingest: mpsc::Receiver<Envelope>,
        windows: mpsc::Receiver<Envelope>,
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
                rt.block_on(self.run(ingest, windows, control));
            })
    }

    fn has_room(&self) -> bool {
        self.config.when_full != WhenFull::Block || self.bytes < self.config.max_size
    }

    async fn run(
        mut self,
        mut ingest: mpsc::Receiver<Envelope>,
        mut windows: mpsc::Receiver<Envelope>,
        mut control: mpsc::Receiver<Control>,
    ) {
        let mut held: Option<Envelope> = None;
        let mut ingest_open = true;
        let mut windows_open = true;
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
                    self.set_health(Some(
                        "full: ingest waits for delivery (when_full = \"block\")".into(),
                    ));
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
            if !ingest_open && !control_open && !windows_open {
                break;
            }
            let can_ingest = ingest_open && held.is_none();
            tokio::select! {
                biased;
                c = control.recv(), if control_open => match c {
                    Some(c) => self.control(c),
                    None => control_open = false,
                },
                w = windows.recv(), if windows_open => match w {
                    // Committed whatever the bound: a window's rows are few and small, and its
                    // commit frees what it held. Each in a group of its own.
                    Some(env) => {
                        let mut next = Some(env);
                        while let Some(env) = next.take() {
                            let mut none = mpsc::channel(1).1;
                            self.group(env, &mut none, &mut next).await;
                        }
                    }
                    None => windows_open = false,
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
        info!(
            undelivered = self.undelivered(),
            bytes = self.bytes,
            "buffer closed"
        );
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
        let streams = self.stream_ids.len();
        let mut g = Group {
            added_records: vec![0u64; streams],
            added_bytes: vec![0u64; streams],
            txn_bytes: 0,
            pending: Vec::new(),
            dropped: 0,
            window_moves: Vec::new(),
        };
        let saved_segments = self.segments.clone();
        let saved_active_bytes = self.active_bytes;
        let mut open = true;
        let mut count = 0usize;
        let mut close = Close::Other;
        let linger = self.linger.target();
        // Many senders trickling in (not a lone sender's learned window, which arrives at once
        // and is committed as soon as it is there): the group takes what arrived once per
        // IDLE_COMMIT instead of waking for every envelope, which at everyday rates cost the
        // writer a context switch and the sender a futex call per message.
        let coalesce = linger == self.config.commit_linger_records;
        // When this group last woke for an envelope (or found some after a pause).
        let mut woke_at: Option<Instant> = None;

        let result: Result<(), BufferError> = async {
            self.conn.execute_batch("BEGIN")?;
            count += self.admit(first, &mut g)?;
            while count < self.config.commit_max_records {
                // The interval bounds the group even when envelopes keep coming: a group that
                // waits for `commit_max_records` under load would hold its first acks too long.
                if count % 64 == 0 && Instant::now() >= deadline {
                    break;
                }
                let next = match ingest.try_recv() {
                    Ok(env) => env,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                    // Nothing waiting. A group big enough already is committed now; a small
                    // one lingers until the deadline, so light traffic still gets few commits
                    // (few page rewrites on an SD card), but not once nothing has come for
                    // IDLE_COMMIT: then its senders are likely waiting for these very acks (a
                    // window smaller than the linger, one broker connection).
                    Err(mpsc::error::TryRecvError::Empty) if count >= linger => {
                        close = Close::Linger;
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) if coalesce && woke_at.is_some() => {
                        // Pause until IDLE_COMMIT after the last wake-up, then take what came;
                        // nothing in that time ends the group as idle.
                        let until = woke_at.take().map_or(deadline, |w| w + IDLE_COMMIT);
                        let until = until.min(deadline);
                        let now = Instant::now();
                        if until > now {
                            // The writer's own thread: nothing else waits on it meanwhile.
                            std::thread::sleep(until - now);
                        }
                        match ingest.try_recv() {
                            Ok(env) => {
                                woke_at = Some(Instant::now());
                                env
                            }
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                open = false;
                                break;
                            }
                            Err(mpsc::error::TryRecvError::Empty) => {
                                if until < deadline {
                                    close = Close::Idle;
                                }
                                break;
                            }
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let idle = Instant::now() + IDLE_COMMIT;
                        match tokio::time::timeout_at(idle.min(deadline), ingest.recv()).await {
                            Ok(Some(env)) => {
                                woke_at = Some(Instant::now());
                                env
                            }
                            Ok(None) => {
                                open = false;
                                break;
                            }
                            Err(_) => {
                                if idle < deadline {
                                    close = Close::Idle;
                                }
                                break;
                            }
                        }
                    }
                };
                if self.config.when_full == WhenFull::Block && !self.fits(&mut g, need(&next))? {
                    *held = Some(next);
                    break;
                }
                count += self.admit(next, &mut g)?;
            }
            self.flush_blocks()?;
            // The active segment's row is not touched here (that would rewrite its page at every
            // commit); it is written when the segment closes and recomputed at start.
            if crate::failpoint::fails("buffer.commit") {
                return Err(BufferError::Io(std::io::Error::other(
                    "failpoint buffer.commit: the disk refused the write",
                )));
            }
            self.conn.execute_batch("COMMIT")?;
            self.bytes = store::used_bytes(&self.conn)?;
            Ok(())
        }
        .await;

        self.linger.observe(close, count);
        match result {
            Ok(()) => {
                for (slot, position) in g.window_moves.drain(..) {
                    self.destinations[slot].delivered_id = position;
                }
                let records: u64 = g.added_records.iter().sum();
                metrics::counter!(m::COMMITTED).increment(records);
                metrics::counter!(m::COMMITS).increment(1);
                if g.dropped > 0 {
                    metrics::counter!(m::BUFFER_DROPPED).increment(g.dropped);
                    error!(
                        dropped = g.dropped,
                        "buffer full: dropped the oldest undelivered records (when_full = \"drop_oldest\")"
                    );
                }
                self.publish_usage();
                let last_id = self.segments.back().map_or(0, |s| s.last_id);
                self.committed.send_modify(|c| {
                    c.last_id = last_id;
                    for s in 0..streams {
                        c.records[s] += g.added_records[s];
                        c.payload_bytes[s] += g.added_bytes[s];
                    }
                });
                let full = g
                    .pending
                    .iter()
                    .any(|p| p.outcome == Outcome::Rejected(Reject::BufferFull));
                self.set_health(full.then(|| {
                    "full: new messages are refused (when_full = \"reject_new\")".to_string()
                }));
                for p in g.pending {
                    if let Outcome::Rejected(reason) = p.outcome {
                        metrics::counter!(m::REJECTED, "reason" => reason.label()).increment(1);
                    }
                    p.ack.complete(p.outcome);
                }
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.block.clear();
                self.segments = saved_segments;
                self.active_bytes = saved_active_bytes;
                self.bytes = store::used_bytes(&self.conn).unwrap_or(self.bytes);
                error!(
                    error = %e,
                    messages = g.pending.len(),
                    "buffer commit failed: these messages are not stored and not acknowledged"
                );
                metrics::counter!(m::REJECTED, "reason" => "storage_error")
                    .increment(g.pending.len() as u64);
                self.set_health(Some(format!("commits fail: {e}")));
                drop(g.pending);
                // Do not spin on a failing disk.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        open
    }

    /// Tells `/healthz` whether the buffer takes writes (only when that changes).
    fn set_health(&mut self, state: Option<String>) {
        if state != self.health_state {
            self.health.set_buffer_error(state.clone());
            self.health_state = state;
        }
    }

    /// Inserts one envelope's records inside the open transaction; returns how many.
    fn admit(&mut self, env: Envelope, g: &mut Group) -> Result<usize, BufferError> {
        let records = match env.records {
            Ok(records) => records,
            Err(reason) => {
                g.pending.push(Pending {
                    ack: env.ack,
                    outcome: Outcome::Rejected(reason),
                });
                return Ok(0);
            }
        };
        let need: u64 = records.iter().map(|r| r.accounted_bytes()).sum();
        if !self.fits(g, need)? {
            match self.config.when_full {
                WhenFull::RejectNew => {
                    g.pending.push(Pending {
                        ack: env.ack,
                        outcome: Outcome::Rejected(Reject::BufferFull),
                    });
                    return Ok(0);
                }
                WhenFull::DropOldest => {
                    while self.segments.len() > 1 && !self.fits(g, need)? {
                        g.dropped += self.drop_oldest_segment()?;
                    }
                }
                WhenFull::Block => {}
            }
        }
        let n = records.len();
        for r in &records {
            // The records not yet inserted take their ids in the active segment.
            if self.active().records + self.block.records() >= SEGMENT_MAX_RECORDS
                || self.active_bytes >= self.segment_max_bytes
            {
                self.rotate()?;
            }
            self.block
                .push(r.stream, r.arrival_ms, &r.partition_key, &r.payload);
            if self.block.raw_len(r.stream) >= BLOCK_MAX_RAW {
                self.flush_stream(r.stream)?;
            }
            self.active_bytes += r.accounted_bytes();
            g.added_records[r.stream] += 1;
            g.added_bytes[r.stream] += r.payload.len() as u64;
        }
        g.txn_bytes += need;
        if let Some(w) = env.window {
            // The window stage's progress, in the transaction of the rows it emitted.
            let name = &self.destinations[w.slot].name;
            store::set_delivered(&self.conn, name, w.position)?;
            store::set_window_progress(&self.conn, name, w.emitted_through_ms, w.emitting)?;
            g.window_moves.push((w.slot, w.position));
        }
        g.pending.push(Pending {
            ack: env.ack,
            outcome: Outcome::Committed,
        });
        Ok(n)
    }

    /// Whether `need` more bytes fit under the bound. Away from the bound an estimate does (raw
    /// sizes, which compression only shrinks); near it, the file's pages are counted (inside the
    /// transaction, so they include it).
    fn fits(&mut self, g: &mut Group, need: u64) -> Result<bool, BufferError> {
        let limit = self.config.max_size.saturating_sub(PAGE_SLACK);
        if self.bytes + g.txn_bytes + need <= limit - limit / 8 {
            return Ok(true);
        }
        // Near the bound: insert what is pending so the file's pages count it exactly.
        self.flush_blocks()?;
        self.bytes = store::used_bytes(&self.conn)?;
        g.txn_bytes = 0;
        Ok(self.bytes + need <= limit)
    }

    /// Inserts the records pushed so far, a block per stream, into the active segment.
    fn flush_blocks(&mut self) -> Result<(), BufferError> {
        loop {
            let Some(stream) = self.block.pending().next() else {
                return Ok(());
            };
            self.flush_stream(stream)?;
        }
    }

    /// Inserts stream `stream`'s records pushed so far as the active segment's next block,
    /// numbered from the segment's next id.
    fn flush_stream(&mut self, stream: usize) -> Result<(), BufferError> {
        let first_id = self.active().last_id + 1;
        let last_id = match self.block.finish(stream, first_id)? {
            Some(block) => {
                store::insert_block(&self.conn, &self.insert_sql, &block)?;
                block.last_id
            }
            None => return Ok(()),
        };
        let active = self.active();
        active.records += (last_id - first_id + 1) as u64;
        active.last_id = last_id;
        Ok(())
    }

    /// Closes the active segment and starts the next (inside the open transaction).
    fn rotate(&mut self) -> Result<(), BufferError> {
        self.flush_blocks()?;
        let active = *self.active();
        store::update_segment(&self.conn, &active)?;
        let next = store::create_segment(&self.conn, active.seq + 1, active.last_id + 1)?;
        self.insert_sql = store::insert_block_sql(&next);
        self.segments.push_back(next);
        self.active_bytes = 0;
        Ok(())
    }

    /// Drops the oldest closed segment (`drop_oldest`); returns the undelivered records it held.
    fn drop_oldest_segment(&mut self) -> Result<u64, BufferError> {
        let Some(oldest) = self.segments.pop_front() else {
            return Ok(0);
        };
        let everyone_has = self.everyone_has();
        // Ids are dense within a segment.
        let lost = (oldest.last_id - everyone_has.max(oldest.first_id - 1)).max(0) as u64;
        store::drop_segment(&self.conn, oldest.seq)?;
        Ok(lost)
    }

    /// The id up to which every destination has delivered.
    fn everyone_has(&self) -> i64 {
        self.destinations
            .iter()
            .map(|d| d.delivered_id)
            .min()
            .unwrap_or(i64::MAX)
    }

    /// Drops the closed segments every destination is done with.
    fn drop_delivered_segments(&mut self) -> Result<(), BufferError> {
        let everyone_has = self.everyone_has();
        while self.segments.len() > 1 && self.segments[0].last_id <= everyone_has {
            let seq = self.segments[0].seq;
            store::drop_segment(&self.conn, seq)?;
            self.segments.pop_front();
        }
        Ok(())
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
            Control::Ping(done) => {
                let _ = done.send(());
            }
            Control::SaveSessions { changes, done } => {
                let r = self.execute_in_transaction(|w| {
                    super::sessions::save(&w.conn, &changes).map_err(BufferError::from)
                });
                let _ = done.send(r);
            }
            Control::Delivered {
                dest,
                last_id,
                done,
            } => {
                let before = self.destinations[dest].delivered_id;
                let r = self.execute_in_transaction(|w| {
                    store::set_delivered(&w.conn, &w.destinations[dest].name, last_id)?;
                    w.destinations[dest].delivered_id = last_id;
                    w.drop_delivered_segments()
                });
                if r.is_err() {
                    self.destinations[dest].delivered_id = before;
                }
                self.publish_usage();
                let _ = done.send(r);
            }
        }
    }

    fn publish_usage(&self) {
        metrics::gauge!(m::BUFFER_RECORDS).set(self.undelivered() as f64);
        metrics::gauge!(m::BUFFER_BYTES).set(self.bytes as f64);
    }
}

/// Why a group stopped collecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// It held the linger and nothing more was waiting.
    Linger,
    /// Nothing arrived for IDLE_COMMIT.
    Idle,
    /// The interval, the record limit, the bound, or the end of ingest.
    Other,
}

/// The linger a group waits for, learned from how groups end. A lone fast sender whose window
/// is below the configured linger makes every group end idle at the same size (its window):
/// after three such groups that size becomes the linger, so the next groups commit as soon as
/// they hold it instead of waiting IDLE_COMMIT each. Any other ending forgets it, and every
/// PROBE_EVERY-th group waits for the configured linger again to check the pattern still holds
/// (moderate traffic from many senders would otherwise keep a small learned size forever,
/// each group committing as soon as the channel is momentarily empty).
#[derive(Debug)]
struct Linger {
    configured: usize,
    learned: Option<usize>,
    last_idle: usize,
    streak: u32,
    since_probe: u32,
    probing: bool,
}

const PROBE_EVERY: u32 = 16;

impl Linger {
    fn new(configured: usize) -> Self {
        Self {
            configured,
            learned: None,
            last_idle: 0,
            streak: 0,
            since_probe: 0,
            probing: false,
        }
    }

    /// The linger for the next group.
    fn target(&mut self) -> usize {
        match self.learned {
            Some(_) if self.since_probe >= PROBE_EVERY => {
                self.probing = true;
                self.configured
            }
            Some(learned) => learned,
            None => self.configured,
        }
    }

    /// How the group that [`Self::target`] was asked for ended, holding `count` records.
    fn observe(&mut self, close: Close, count: usize) {
        let probing = std::mem::take(&mut self.probing);
        if let Some(learned) = self.learned {
            let holds = if probing {
                close == Close::Idle && count == learned
            } else {
                close == Close::Linger && count == learned
            };
            if holds {
                self.since_probe = if probing { 0 } else { self.since_probe + 1 };
                return;
            }
            self.learned = None;
            self.streak = 0;
        }
        if close != Close::Idle {
            self.streak = 0;
            return;
        }
        if count == self.last_idle {
            self.streak += 1;
        } else {
            self.last_idle = count;
            self.streak = 1;
        }
        if self.streak >= 3 && count > 0 {
            self.learned = Some(count);
            self.since_probe = 0;
        }
    }
}

/// The state of one group commit.
struct Group {
    added_records: Vec<u64>,
    added_bytes: Vec<u64>,
    /// Accounted bytes this transaction added, on top of the last measured use.
    txn_bytes: u64,
    pending: Vec<Pending>,
    dropped: u64,
    /// Window stages' positions this transaction moves (applied once it commits).
    window_moves: Vec<(usize, i64)>,
}

fn need(env: &Envelope) -> u64 {
    match &env.records {
        Ok(records) => records.iter().map(|r| r.accounted_bytes()).sum(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::{Close, Linger, PROBE_EVERY};

    #[test]
    fn a_lone_senders_window_becomes_the_linger_and_other_endings_forget_it() {
        let mut l = Linger::new(128);
        let group = |l: &mut Linger, close: Close, count: usize| {
            let target = l.target();
            l.observe(close, count);
            target
        };
        assert_eq!(l.target(), 128);
        l.observe(Close::Other, 0);
        // A sender with a window of 64: groups end idle at 64.
        assert_eq!(group(&mut l, Close::Idle, 64), 128);
        assert_eq!(group(&mut l, Close::Idle, 64), 128);
        assert_eq!(
            group(&mut l, Close::Idle, 64),
            128,
            "two are not yet a pattern"
        );
        // Learned: groups now end at the learned size, which keeps it, and a probe now and then
        // (configured linger again) ends idle at the same size.
        for n in 0..40 {
            let target = l.target();
            if target == 128 {
                assert!(n >= PROBE_EVERY as usize, "probe after {n}");
                l.observe(Close::Idle, 64);
            } else {
                assert_eq!(target, 64);
                l.observe(Close::Linger, 64);
            }
        }
        assert_eq!(group(&mut l, Close::Linger, 64), 64);
        // More senders: a group holds more when the channel empties.
        assert_eq!(group(&mut l, Close::Linger, 90), 64);
        assert_eq!(l.target(), 128);
        l.observe(Close::Other, 100);
        // Idle endings at varying sizes (ordinary light traffic) teach nothing.
        for n in [12, 30, 12, 7, 30] {
            assert_eq!(group(&mut l, Close::Idle, n), 128);
        }
        // The interval or any other ending forgets it.
        for _ in 0..3 {
            group(&mut l, Close::Idle, 20);
        }
        assert_eq!(group(&mut l, Close::Other, 20), 20);
        assert_eq!(l.target(), 128);
        l.observe(Close::Other, 100);

        // The trap the probe avoids: a size of 1 learned while few devices trickle in, then
        // steady traffic from many, where a group of 1 commits whenever the channel is empty.
        for _ in 0..3 {
            group(&mut l, Close::Idle, 1);
        }
        for _ in 0..PROBE_EVERY {
            assert_eq!(group(&mut l, Close::Linger, 1), 1);
        }
        // The probe waits for the configured linger and gets a full group: forgotten.
        assert_eq!(group(&mut l, Close::Linger, 128), 128);
        assert_eq!(l.target(), 128);
    }
}
