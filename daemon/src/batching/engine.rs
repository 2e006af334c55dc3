//! The destination loop: the one place that decides when a destination flushes, what a flush
//! holds, how failures are retried, and when the delivery position moves. Every destination
//! runs it; what differs (objects to `file`/`s3`, records to Kinesis) sits behind [`Delivery`],
//! and the buffer behind [`Journal`], so the loop runs in-process in tests with fakes and
//! `tokio::time::pause()`.
//!
//! The rules it keeps:
//! - **Deadlines are monotonic.** The interval hint counts from when the batch began to fill
//!   (the commit that brought its first record, seen on the monotonic clock), never from
//!   wall-clock arrival stamps, so an NTP step neither stalls nor rushes delivery. Records found
//!   in the file at start are dated from their stamps, clamped to `0..=interval`.
//! - **A chosen batch is fixed.** Once a flush has chosen its records (`after`, `last_id`,
//!   version) and recorded them as an intent, every retry (in this process or, through the
//!   intent, after a restart) delivers exactly those records under the same keys. Records that
//!   arrive meanwhile wait for the next batch.
//! - **An error is never "nothing there".** A failed read of the buffer, a failed put, a failed
//!   intent or position update leaves the position where it is and is retried with backoff.
//! - **Outages are visible.** While a batch waits for a retry the loop keeps watching commits,
//!   so the backlog gauges and `/healthz` stay current; a cheap probe of the endpoint runs
//!   every [`PROBE_EVERY`] and ends the wait as soon as the endpoint answers again.

use std::collections::VecDeque;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::DeliveryError;
use crate::buffer::Committed;
use crate::health::Health;
use crate::metrics as m;
use crate::reload::Hints;
use crate::shutdown::Shutdown;

/// Failed deliveries back off from this...
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// ...to at most this, for as long as the data is held.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// While a destination is down its endpoint is probed this often (one cheap request), so
/// delivery resumes within seconds of it coming back whatever the backoff has reached.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// A partially accepted batch (Kinesis) resends what failed after this, doubling while nothing
/// gets through and halving while some does...
pub const PARTIAL_MIN: Duration = Duration::from_millis(100);
/// ...up to this.
pub const PARTIAL_MAX: Duration = Duration::from_secs(5);
/// How often a caught-up destination moves its position past other streams' records.
pub const IDLE_ADVANCE: Duration = Duration::from_secs(5);
/// While an outage lasts, a reminder is logged at most this often (every failure is counted).
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Fill notes kept (one per observed commit, coalesced within [`NOTE_GRAIN`]).
const MAX_NOTES: usize = 8192;
const NOTE_GRAIN: Duration = Duration::from_millis(10);

/// What to put in the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Records after this id...
    pub after: i64,
    /// ...up to and including this one (a batch already chosen: an intent), or...
    pub until: Option<i64>,
    /// ...until the next record would pass this many bytes (a new batch).
    pub max_bytes: u64,
    /// The version its keys use.
    pub version: i64,
    /// The batch may have been (partly) delivered before: a restart found its intent.
    pub replay: bool,
}

/// A batch's extent, as the loop tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub last_id: i64,
    /// Records (error-output records included) and their bytes, delimiters included.
    pub records: u64,
    pub bytes: u64,
}

/// What a finished batch took, for the metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Objects (file/s3) or Kinesis requests' worth of batches delivered.
    pub objects: u64,
    /// Objects and records put again although the destination may already hold them.
    pub resent_objects: u64,
    pub resent_records: u64,
    /// Records that went to the error output, by error code.
    pub errors: Vec<(&'static str, u64)>,
}

/// The outcome of one attempt at a chosen batch.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    Done(Report),
    /// Some of the batch is not in yet (Kinesis entries failed or were throttled).
    Partial {
        progressed: bool,
        throttled: bool,
    },
}

/// How a destination delivers; the loop does the rest.
#[allow(async_fn_in_trait)]
pub trait Delivery {
    type Batch;
    /// Reads the records `plan` selects and makes them ready to put (staged objects, or
    /// records in memory). None when there are none. A read error is an error, never None.
    async fn prepare(&mut self, plan: Plan) -> Result<Option<Self::Batch>, DeliveryError>;
    fn extent(batch: &Self::Batch) -> Extent;
    /// Puts what of the batch is not in yet.
    async fn attempt(&mut self, batch: &mut Self::Batch) -> Result<Attempt, DeliveryError>;
    /// A cheap check that the endpoint answers (HeadBucket, ListShards, a directory).
    async fn probe(&mut self) -> Result<(), DeliveryError>;
}

/// What is buffered for the destination after a position.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub records: u64,
    pub bytes: u64,
    /// Arrival stamp (epoch ms) of the first of them.
    pub oldest_arrival_ms: Option<i64>,
}

/// The buffer as the loop sees it: reads of the backlog and the intent/delivered protocol.
#[allow(async_fn_in_trait)]
pub trait Journal {
    async fn backlog(&mut self, after: i64) -> Result<Backlog, DeliveryError>;
    /// Records that `last_id` (keys of `version`) is the batch in flight.
    async fn intent(&mut self, last_id: i64, version: i64) -> Result<(), DeliveryError>;
    /// Moves the position to `last_id` and clears the intent.
    async fn delivered(&mut self, last_id: i64) -> Result<(), DeliveryError>;
}

/// Cumulative counts of what the writer committed for the destination's streams. Signed: the
/// writer counts from its start, so records already in the file at start put the base below 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    records: i64,
    bytes: i64,
}

/// Which commits count: the destination's streams (config indexes), with delimiters or not.
#[derive(Debug, Clone)]
pub struct Streams {
    pub indexes: Vec<usize>,
    pub newline: bool,
}

impl Streams {
    fn counts(&self, c: &Committed) -> Counts {
        let newline = u64::from(self.newline);
        let mut t = Counts::default();
        for &s in &self.indexes {
            let records = c.records.get(s).copied().unwrap_or(0);
            t.records += records as i64;
            t.bytes += (c.payload_bytes.get(s).copied().unwrap_or(0) + newline * records) as i64;
        }
        t
    }
}

/// The loop's state.
enum State<B> {
    /// The backlog must be read from the file (at start, or when the counters and the file
    /// disagree: records dropped by `drop_oldest` or skipped as corrupt).
    Count,
    /// Nothing pending.
    Idle,
    /// Records pending; the interval hint counts from `since`.
    Filling { since: Instant },
    /// A batch is chosen; it is delivered whole before anything else.
    Flushing(Flight<B>),
}

struct Flight<B> {
    batch: Option<B>,
    extent: Extent,
    plan: Plan,
    /// The intent is in the file.
    recorded: bool,
    /// Every part is in; only the position is left to move.
    put: bool,
    /// Wait before resending after a partial attempt.
    partial_delay: Duration,
}

/// Failures since the last success.
struct Outage {
    since: Instant,
    since_wall_ms: i64,
    failures: u64,
    delay: Duration,
    retry_at: Instant,
    /// The endpoint failed (not the buffer or staging): probing it can end the wait.
    probe: bool,
    /// A probe answered but the retry it started failed (the probe is not enough to tell):
    /// the next wait is the full backoff, without probing.
    probed_ok: bool,
    logged_at: Instant,
}

/// What the loop needs besides its delivery and journal.
pub struct Inputs {
    pub name: String,
    pub streams: Streams,
    pub delivered_id: i64,
    pub version: i64,
    /// The intent found at start: (last id, version).
    pub intent: Option<(i64, i64)>,
    pub committed: watch::Receiver<Committed>,
    pub hints: watch::Receiver<Hints>,
    pub shutdown: Shutdown,
    pub health: Health,
}

/// The backlog's accounting: what the writer committed for the destination's streams minus
/// what it delivered (or found gone), when each pending record began to wait, and the gauges.
struct Tracker {
    name: String,
    streams: Streams,
    hints: Hints,
    hints_rx: watch::Receiver<Hints>,
    committed: watch::Receiver<Committed>,
    health: Health,
    health_slot: usize,
    /// Counts at or below the position (or known gone): pending = seen - base. Never more than
    /// the truth (a count reads the counters before the file), so "nothing pending" is true.
    base: Counts,
    /// Whether `base` has been established by reading the file.
    counted: bool,
    /// Latest committed counts and id seen.
    seen: Counts,
    seen_last_id: i64,
    ingest_closed: bool,
    /// (cumulative record number, when the commit bringing it was seen), ascending.
    notes: VecDeque<(i64, Instant)>,
}

impl Tracker {
    /// Reads the latest hints and commits; refreshes the gauges.
    fn observe(&mut self) {
        let h = *self.hints_rx.borrow_and_update();
        if h != self.hints {
            info!(destination = %self.name, size = h.size, interval = ?h.interval, "buffering hints changed");
            self.hints = h;
        }
        let (counts, last_id, closed) = {
            let c = self.committed.borrow_and_update();
            (self.streams.counts(&c), c.last_id, c.ingest_closed)
        };
        if counts.records > self.seen.records {
            let now = Instant::now();
            let first = self.seen.records + 1;
            match self.notes.back() {
                Some((_, at)) if now.duration_since(*at) < NOTE_GRAIN => {}
                _ if self.notes.len() >= MAX_NOTES => {}
                _ => self.notes.push_back((first, now)),
            }
        }
        self.seen = counts;
        self.seen_last_id = last_id;
        self.ingest_closed = closed;
        self.publish();
    }

    fn pending(&self) -> Counts {
        Counts {
            records: (self.seen.records - self.base.records).max(0),
            bytes: (self.seen.bytes - self.base.bytes).max(0),
        }
    }

    /// When the first pending record began to wait: the last note at or before it.
    fn fill_since(&self) -> Instant {
        let first = self.base.records + 1;
        let mut since = None;
        for &(n, at) in &self.notes {
            if n > first {
                break;
            }
            since = Some(at);
        }
        since
            .or_else(|| self.notes.front().map(|n| n.1))
            .unwrap_or_else(Instant::now)
    }

    /// Sets the base from a read of the file made after the counters `before` were seen.
    fn rebase(&mut self, before: Counts, b: Backlog) {
        self.counted = true;
        self.base = Counts {
            records: before.records - b.records as i64,
            bytes: before.bytes - b.bytes as i64,
        };
        let keep: VecDeque<_> = self
            .notes
            .iter()
            .copied()
            .filter(|&(n, _)| n > before.records)
            .collect();
        self.notes = keep;
        if b.records > 0 {
            let since = self.since_stamp(b.oldest_arrival_ms);
            self.notes.push_front((self.base.records + 1, since));
        }
        self.publish();
    }

    /// A batch of `extent` is delivered.
    fn delivered(&mut self, extent: Extent) {
        self.base.records += extent.records as i64;
        self.base.bytes += extent.bytes as i64;
        let first = self.base.records + 1;
        while self.notes.len() > 1 && self.notes[1].0 <= first {
            self.notes.pop_front();
        }
        self.publish();
    }

    /// A monotonic instant for a wall-clock arrival stamp found in the file: its age now,
    /// clamped to `0..=interval`, so that a wrong clock at most flushes at once or waits one
    /// interval.
    fn since_stamp(&self, arrival_ms: Option<i64>) -> Instant {
        let now = Instant::now();
        let age_ms = arrival_ms.map_or(0, |a| (crate::clock::now_ms() - a).max(0) as u64);
        let age = Duration::from_millis(age_ms).min(self.hints.interval);
        now.checked_sub(age).unwrap_or(now)
    }

    /// Pushes the gauges and the health entry.
    fn publish(&self) {
        let pending = self.pending();
        let age = if pending.records == 0 || !self.counted {
            0.0
        } else {
            Instant::now()
                .duration_since(self.fill_since())
                .as_secs_f64()
        };
        let name = self.name.clone();
        metrics::gauge!(m::BACKLOG_RECORDS, "destination" => name.clone())
            .set(pending.records as f64);
        metrics::gauge!(m::BACKLOG_BYTES, "destination" => name.clone()).set(pending.bytes as f64);
        metrics::gauge!(m::BACKLOG_AGE, "destination" => name).set(age);
        self.health.update(self.health_slot, |d| {
            d.backlog_records = pending.records as u64;
            d.backlog_bytes = pending.bytes as u64;
            d.oldest_age_seconds = age;
        });
    }
}

pub struct Engine<D: Delivery, J: Journal> {
    delivery: D,
    journal: J,
    name: String,
    delivered_id: i64,
    version: i64,
    shutdown: Shutdown,
    t: Tracker,
    state: State<D::Batch>,
    outage: Option<Outage>,
    last_advance: Instant,
}

impl<D: Delivery, J: Journal> Engine<D, J> {
    pub fn new(delivery: D, journal: J, inputs: Inputs) -> Self {
        let hints = *inputs.hints.borrow();
        let health_slot = inputs.health.add_destination(&inputs.name);
        let state = match inputs.intent {
            Some((last_id, version)) => State::Flushing(Flight {
                batch: None,
                extent: Extent {
                    last_id,
                    records: 0,
                    bytes: 0,
                },
                plan: Plan {
                    after: inputs.delivered_id,
                    until: Some(last_id),
                    max_bytes: u64::MAX,
                    version,
                    replay: true,
                },
                recorded: true,
                put: false,
                partial_delay: PARTIAL_MIN,
            }),
            None => State::Count,
        };
        Self {
            delivery,
            journal,
            name: inputs.name.clone(),
            delivered_id: inputs.delivered_id,
            version: inputs.version,
            shutdown: inputs.shutdown,
            t: Tracker {
                name: inputs.name,
                streams: inputs.streams,
                hints,
                hints_rx: inputs.hints,
                committed: inputs.committed,
                health: inputs.health,
                health_slot,
                base: Counts::default(),
                counted: false,
                seen: Counts::default(),
                seen_last_id: 0,
                ingest_closed: false,
                notes: VecDeque::new(),
            },
            state,
            outage: None,
            last_advance: Instant::now(),
        }
    }

    /// Reports the start-up check of the endpoint: up, or down with why (until a delivery
    /// succeeds). Records stay buffered either way.
    pub fn checked(&mut self, result: Result<(), String>) {
        let up = result.is_ok();
        metrics::gauge!(m::DESTINATION_UP, "destination" => self.name.clone()).set(if up {
            1.0
        } else {
            0.0
        });
        if let Err(message) = result {
            let since = crate::clock::now_ms();
            self.t.health.update(self.t.health_slot, |d| {
                d.up = false;
                d.down_since_ms = Some(since);
                d.last_error = Some(message);
            });
        }
    }

    /// The position the destination has reached.
    pub fn delivered_id(&self) -> i64 {
        self.delivered_id
    }

    /// Runs until shutdown has begun, ingest is closed and everything is delivered.
    pub async fn run(mut self) -> Self {
        tracing::debug!(destination = %self.name, delivered_id = self.delivered_id, "destination started");
        if let State::Flushing(f) = &self.state {
            info!(destination = %self.name, last_id = f.extent.last_id, "replaying the batch that was in flight");
        }
        loop {
            self.t.observe();
            let stopping = self.shutdown.is_begun() && self.t.ingest_closed;
            match std::mem::replace(&mut self.state, State::Idle) {
                State::Count => {
                    self.state = State::Count;
                    if let Some(at) = self.retry_at() {
                        self.wait(Some(at), true).await;
                        continue;
                    }
                    // Counters first: whatever commits during the read is then counted twice
                    // at worst (pending overstated until the next count), never missed.
                    let before = self.t.seen;
                    let started = Instant::now();
                    match self.journal.backlog(self.delivered_id).await {
                        Ok(b) => {
                            tracing::debug!(destination = %self.name, records = b.records, took = ?started.elapsed(), "backlog counted");
                            self.t.rebase(before, b);
                            self.state = State::Idle;
                        }
                        Err(e) => self.failed(e),
                    }
                }
                State::Idle => {
                    if self.t.pending().records > 0 {
                        let since = self.t.fill_since();
                        self.state = State::Filling { since };
                        continue;
                    }
                    self.caught_up(stopping).await;
                    if stopping {
                        break;
                    }
                    self.wait(None, false).await;
                }
                State::Filling { since } => {
                    let pending = self.t.pending();
                    if pending.records == 0 {
                        continue; // Idle
                    }
                    self.state = State::Filling { since };
                    let due = since + self.t.hints.interval;
                    let full = pending.bytes as u64 >= self.t.hints.size;
                    if !(stopping || full || Instant::now() >= due) {
                        self.wait(Some(due), false).await;
                        continue;
                    }
                    if let Some(at) = self.retry_at() {
                        self.wait(Some(at), true).await;
                        continue;
                    }
                    let plan = Plan {
                        after: self.delivered_id,
                        until: None,
                        max_bytes: self.t.hints.size,
                        version: self.version,
                        replay: false,
                    };
                    let started = Instant::now();
                    match self.delivery.prepare(plan).await {
                        Ok(Some(batch)) => {
                            let extent = D::extent(&batch);
                            tracing::debug!(destination = %self.name, records = extent.records, last_id = extent.last_id, took = ?started.elapsed(), "batch prepared");
                            self.state = State::Flushing(Flight {
                                batch: Some(batch),
                                extent,
                                plan: Plan {
                                    until: Some(extent.last_id),
                                    ..plan
                                },
                                recorded: false,
                                put: false,
                                partial_delay: PARTIAL_MIN,
                            });
                        }
                        // The counters say pending, the file says none (dropped or corrupt
                        // records): count again.
                        Ok(None) => self.state = State::Count,
                        Err(e) => self.failed(e),
                    }
                }
                State::Flushing(mut flight) => {
                    if let Some(at) = self.retry_at() {
                        self.state = State::Flushing(flight);
                        self.wait(Some(at), true).await;
                        continue;
                    }
                    match self.fly(&mut flight).await {
                        Ok(None) => {
                            let wait = jitter(flight.partial_delay, 0.5);
                            self.state = State::Flushing(flight);
                            self.wait(Some(Instant::now() + wait), true).await;
                        }
                        Ok(Some(report)) => {
                            self.landed(&flight, report);
                            self.state = if self.t.counted {
                                State::Idle
                            } else {
                                State::Count
                            };
                        }
                        Err(e) => {
                            self.state = State::Flushing(flight);
                            self.failed(e);
                        }
                    }
                }
            }
        }
        info!(destination = %self.name, delivered_id = self.delivered_id, "destination stopped");
        self
    }

    /// One step of a chosen batch: prepare it (a replay), record its intent, put it, move the
    /// position. Ok(None): partly in, try again after a short wait.
    async fn fly(&mut self, f: &mut Flight<D::Batch>) -> Result<Option<Report>, DeliveryError> {
        if f.batch.is_none() && !f.put {
            match self.delivery.prepare(f.plan).await? {
                Some(batch) => {
                    f.extent = Extent {
                        // The intent's id stays the batch's end even if its last records went.
                        last_id: f.extent.last_id,
                        ..D::extent(&batch)
                    };
                    f.batch = Some(batch);
                }
                // Everything the intent named is gone (dropped): move past it.
                None => f.put = true,
            }
        }
        if !f.recorded {
            self.journal
                .intent(f.extent.last_id, f.plan.version)
                .await?;
            f.recorded = true;
            crate::failpoint::hit("delivery.after-intent");
        }
        let mut report = Report::default();
        if !f.put {
            let batch = f.batch.as_mut().expect("a prepared batch");
            match self.delivery.attempt(batch).await? {
                Attempt::Done(r) => {
                    report = r;
                    f.put = true;
                    f.batch = None;
                }
                Attempt::Partial {
                    progressed,
                    throttled,
                } => {
                    if progressed {
                        self.recovered();
                        f.partial_delay = (f.partial_delay / 2).max(PARTIAL_MIN);
                    } else {
                        f.partial_delay = (f.partial_delay * 2).min(PARTIAL_MAX);
                    }
                    if throttled {
                        metrics::counter!(m::THROTTLED, "destination" => self.name.clone())
                            .increment(1);
                    }
                    return Ok(None);
                }
            }
        }
        self.journal.delivered(f.extent.last_id).await?;
        self.delivered_id = f.extent.last_id;
        Ok(Some(report))
    }

    /// A batch is delivered and the position moved.
    fn landed(&mut self, f: &Flight<D::Batch>, report: Report) {
        self.recovered();
        let name = self.name.clone();
        tracing::debug!(destination = %name, records = f.extent.records, objects = report.objects, last_id = f.extent.last_id, "batch delivered");
        for (code, n) in &report.errors {
            warn!(destination = %name, code, records = n, "records went to the error output");
            metrics::counter!(m::ERROR_RECORDS, "destination" => name.clone(), "code" => *code)
                .increment(*n);
        }
        metrics::counter!(m::DELIVERED_RECORDS, "destination" => name.clone())
            .increment(f.extent.records);
        metrics::counter!(m::DELIVERED_BATCHES, "destination" => name.clone())
            .increment(report.objects);
        metrics::counter!(m::DELIVERED_BYTES, "destination" => name.clone())
            .increment(f.extent.bytes);
        if report.resent_records > 0 || report.resent_objects > 0 {
            info!(destination = %name, objects = report.resent_objects, records = report.resent_records, "records were put again (objects under the same keys; Kinesis consumers may see them twice)");
        }
        metrics::counter!(m::RESENT_RECORDS, "destination" => name.clone())
            .increment(report.resent_records);
        metrics::counter!(m::RESENT_OBJECTS, "destination" => name)
            .increment(report.resent_objects);
        if self.t.counted {
            self.t.delivered(f.extent);
        }
    }

    /// Caught up: every record of the destination's streams up to the last commit is
    /// delivered. Saying so (now and then) lets segments shared with other streams go.
    async fn caught_up(&mut self, stopping: bool) {
        let last = self.t.seen_last_id;
        if last > self.delivered_id && (stopping || self.last_advance.elapsed() >= IDLE_ADVANCE) {
            self.last_advance = Instant::now();
            match self.journal.delivered(last).await {
                Ok(()) => self.delivered_id = last,
                Err(e) => {
                    warn!(destination = %self.name, error = %e, "cannot record the delivery position")
                }
            }
        }
    }

    fn retry_at(&self) -> Option<Instant> {
        self.outage
            .as_ref()
            .map(|o| o.retry_at)
            .filter(|&at| at > Instant::now())
    }

    /// Counts a failure and schedules the retry. Throttling slows the destination down without
    /// counting as a failure of the data.
    fn failed(&mut self, e: DeliveryError) {
        let now = Instant::now();
        let name = self.name.clone();
        let new = || Outage {
            since: now,
            since_wall_ms: crate::clock::now_ms(),
            failures: 0,
            delay: RETRY_MIN,
            retry_at: now,
            probe: false,
            probed_ok: false,
            logged_at: now,
        };
        if let Some(after) = e.throttled() {
            metrics::counter!(m::THROTTLED, "destination" => name).increment(1);
            let delay = after.unwrap_or(PARTIAL_MAX).clamp(PARTIAL_MIN, RETRY_MAX);
            self.outage.get_or_insert_with(new).retry_at = now + jitter(delay, 0.2);
            return;
        }
        metrics::counter!(m::DELIVERY_ERRORS, "destination" => name.clone()).increment(1);
        metrics::gauge!(m::DESTINATION_UP, "destination" => name.clone()).set(0.0);
        let o = self.outage.get_or_insert_with(new);
        let first = o.failures == 0;
        o.failures += 1;
        let wait = jitter(o.delay, 0.2);
        o.retry_at = now + wait;
        o.delay = (o.delay * 2).min(RETRY_MAX);
        o.probe = e.is_endpoint() && !std::mem::take(&mut o.probed_ok);
        let message = e.to_string();
        if first {
            o.logged_at = now;
            if e.is_endpoint() {
                warn!(destination = %name, error = %message, retry_in = ?wait, "delivery failed; the batch stays buffered and is retried (the endpoint is probed every 2s)");
            } else {
                error!(destination = %name, error = %message, retry_in = ?wait, "delivery failed: cannot read or stage the next batch; its records stay buffered and it is retried");
            }
        } else if now.duration_since(o.logged_at) >= LOG_EVERY {
            o.logged_at = now;
            warn!(destination = %name, error = %message, failures = o.failures, down_for = ?now.duration_since(o.since), retry_in = ?wait, "delivery still failing");
        }
        let (since, failures) = (o.since_wall_ms, o.failures);
        self.t.health.update(self.t.health_slot, |d| {
            d.up = false;
            d.down_since_ms = Some(since);
            d.failures = failures;
            d.last_error = Some(message);
        });
    }

    /// A success ends the outage.
    fn recovered(&mut self) {
        if let Some(o) = self.outage.take() {
            if o.failures > 0 {
                info!(destination = %self.name, failures = o.failures, down_for = ?o.since.elapsed(), "delivery recovered");
            }
        }
        metrics::gauge!(m::DESTINATION_UP, "destination" => self.name.clone()).set(1.0);
        self.t.health.update(self.t.health_slot, |d| {
            d.up = true;
            d.down_since_ms = None;
            d.failures = 0;
            d.last_error = None;
        });
    }

    /// Waits for the deadline, new hints, shutdown, or a commit. With `hold` (a retry or a
    /// partial resend waiting) commits only refresh the gauges and the wait goes on; while the
    /// endpoint is down it is probed, and an answer ends the wait at once.
    async fn wait(&mut self, until: Option<Instant>, hold: bool) {
        let probing = hold && self.outage.as_ref().is_some_and(|o| o.probe);
        let shutting_down = self.shutdown.is_begun();
        let mut shutdown = self.shutdown.clone();
        let t = &mut self.t;
        let delivery = &mut self.delivery;
        let sleep = async {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let probe = async {
            if !probing {
                return std::future::pending::<()>().await;
            }
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                if delivery.probe().await.is_ok() {
                    return;
                }
            }
        };
        tokio::pin!(sleep, probe);
        let probed = loop {
            tokio::select! {
                r = t.committed.changed() => {
                    if r.is_err() {
                        // The writer is gone; nothing more will arrive.
                        (&mut sleep).await;
                        break false;
                    }
                    if !hold {
                        break false;
                    }
                    t.observe();
                }
                _ = &mut sleep => break false,
                _ = t.hints_rx.changed() => break false,
                _ = shutdown.wait(), if !shutting_down => break false,
                _ = &mut probe => break true,
            }
        };
        if probed {
            info!(destination = %self.name, "the endpoint answers again; retrying now");
            if let Some(o) = &mut self.outage {
                o.retry_at = Instant::now();
                o.probed_ok = true;
            }
        }
    }
}

/// `d` scaled by a random factor in `1-spread..1+spread`.
fn jitter(d: Duration, spread: f64) -> Duration {
    d.mul_f64(rand::rng().random_range(1.0 - spread..1.0 + spread))
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
