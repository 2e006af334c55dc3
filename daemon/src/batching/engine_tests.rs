//! The destination loop with a fake buffer and a fake delivery, in paused time: every wait here
//! is on a condition; time only passes when every task is idle.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

use super::*;
use crate::sinks::SinkError;

const SIZE: u64 = 1000;
const INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Rec {
    id: i64,
    stream: usize,
    arrival_ms: i64,
    len: u64,
}

#[derive(Default)]
struct World {
    records: Vec<Rec>,
    position: i64,
    intents: Vec<(i64, i64)>,
    /// Every batch put: (first id, last id, plan).
    puts: Vec<(i64, i64, Plan)>,
    prepares: Vec<Plan>,
    /// The endpoint refuses puts and probes.
    down: bool,
    /// The next this many reads of the buffer fail.
    failing_reads: u32,
    /// The next this many attempts take only half of what is left.
    partial: u32,
    probes: u32,
    attempts: u32,
    /// Successful reads of the backlog.
    counts: u32,
}

/// Shared between the test, the fakes and the committed-counters channel.
#[derive(Clone)]
struct Fake {
    world: Arc<Mutex<World>>,
    committed: Arc<watch::Sender<Committed>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Fake {
    fn new() -> Self {
        Self {
            world: Default::default(),
            committed: Arc::new(
                watch::channel(Committed {
                    records: vec![0, 0],
                    payload_bytes: vec![0, 0],
                    ..Default::default()
                })
                .0,
            ),
            changed: Arc::new(watch::channel(0).0),
        }
    }

    fn w(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Commits `n` records of `len` bytes to `stream` (0 is the destination's).
    fn commit(&self, stream: usize, n: usize, len: u64, arrival_ms: i64) {
        let mut w = self.w();
        let mut last = w.records.last().map_or(0, |r| r.id);
        for _ in 0..n {
            last += 1;
            w.records.push(Rec {
                id: last,
                stream,
                arrival_ms,
                len,
            });
        }
        drop(w);
        self.committed.send_modify(|c| {
            c.last_id = last;
            c.records[stream] += n as u64;
            c.payload_bytes[stream] += n as u64 * len;
        });
    }

    /// Records as the file holds them before the engine starts (not in the counters).
    fn preload(&self, n: usize, len: u64, arrival_ms: i64) {
        self.commit(0, n, len, arrival_ms);
        self.committed.send_modify(|c| {
            c.records = vec![0, 0];
            c.payload_bytes = vec![0, 0];
        });
    }

    async fn until(&self, what: &str, cond: impl Fn(&World) -> bool) {
        let mut rx = self.changed.subscribe();
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            if cond(&self.w()) {
                return;
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep_until(deadline) => panic!("never happened: {what}"),
            }
        }
    }

    fn delivered_ids(&self) -> Vec<i64> {
        let w = self.w();
        let mut ids = Vec::new();
        for &(first, last, _) in &w.puts {
            ids.extend(
                w.records
                    .iter()
                    .filter(|r| r.stream == 0 && r.id >= first && r.id <= last)
                    .map(|r| r.id),
            );
        }
        ids
    }
}

struct FakeJournal(Fake);

impl Journal for FakeJournal {
    async fn backlog(&mut self, after: i64) -> Result<Backlog, DeliveryError> {
        let mut w = self.0.w();
        if w.failing_reads > 0 {
            w.failing_reads -= 1;
            drop(w);
            self.0.bump();
            return Err(DeliveryError::Read(rusqlite::Error::InvalidQuery));
        }
        let mine: Vec<&Rec> = w
            .records
            .iter()
            .filter(|r| r.stream == 0 && r.id > after)
            .collect();
        let backlog = Backlog {
            records: mine.len() as u64,
            bytes: mine.iter().map(|r| r.len).sum(),
            oldest_arrival_ms: mine.first().map(|r| r.arrival_ms),
        };
        w.counts += 1;
        drop(w);
        self.0.bump();
        Ok(backlog)
    }

    async fn intent(&mut self, last_id: i64, version: i64) -> Result<(), DeliveryError> {
        self.0.w().intents.push((last_id, version));
        self.0.bump();
        Ok(())
    }

    async fn delivered(&mut self, last_id: i64) -> Result<(), DeliveryError> {
        let mut w = self.0.w();
        assert!(last_id >= w.position, "the position went back");
        w.position = last_id;
        drop(w);
        self.0.bump();
        Ok(())
    }
}

struct FakeBatch {
    first: i64,
    extent: Extent,
    plan: Plan,
    left: u64,
}

struct FakeDelivery(Fake);

impl Delivery for FakeDelivery {
    type Batch = FakeBatch;

    async fn prepare(&mut self, plan: Plan) -> Result<Option<FakeBatch>, DeliveryError> {
        let mut w = self.0.w();
        w.prepares.push(plan);
        if w.failing_reads > 0 {
            w.failing_reads -= 1;
            drop(w);
            self.0.bump();
            return Err(DeliveryError::Read(rusqlite::Error::InvalidQuery));
        }
        let mut chosen: Vec<Rec> = Vec::new();
        let mut bytes = 0;
        for r in w
            .records
            .iter()
            .filter(|r| r.stream == 0 && r.id > plan.after)
        {
            match plan.until {
                Some(u) if r.id > u => break,
                None if !chosen.is_empty() && bytes + r.len > plan.max_bytes => break,
                _ => {}
            }
            bytes += r.len;
            chosen.push(*r);
        }
        drop(w);
        self.0.bump();
        Ok(chosen.last().map(|last| FakeBatch {
            first: chosen[0].id,
            extent: Extent {
                last_id: last.id,
                records: chosen.len() as u64,
                bytes,
            },
            plan,
            left: chosen.len() as u64,
        }))
    }

    fn extent(batch: &FakeBatch) -> Extent {
        batch.extent
    }

    async fn attempt(&mut self, batch: &mut FakeBatch) -> Result<Attempt, DeliveryError> {
        let mut w = self.0.w();
        w.attempts += 1;
        let result = if w.down {
            Err(DeliveryError::Sink(SinkError::Remote(
                "connection refused".into(),
            )))
        } else if w.partial > 0 && batch.left > 1 {
            w.partial -= 1;
            batch.left /= 2;
            Ok(Attempt::Partial {
                progressed: true,
                throttled: true,
            })
        } else {
            w.puts.push((batch.first, batch.extent.last_id, batch.plan));
            Ok(Attempt::Done(Report {
                objects: 1,
                resent_records: if batch.plan.replay {
                    batch.extent.records
                } else {
                    0
                },
                ..Report::default()
            }))
        };
        drop(w);
        self.0.bump();
        result
    }

    async fn probe(&mut self) -> Result<(), DeliveryError> {
        let mut w = self.0.w();
        w.probes += 1;
        if w.down {
            Err(DeliveryError::Sink(SinkError::Remote(
                "connection refused".into(),
            )))
        } else {
            Ok(())
        }
    }
}

struct Running {
    trigger: crate::shutdown::Trigger,
    hints: watch::Sender<Hints>,
    health: Health,
    task: tokio::task::JoinHandle<Engine<FakeDelivery, FakeJournal>>,
}

fn start(fake: &Fake, delivered_id: i64, intent: Option<(i64, i64)>) -> Running {
    let (trigger, shutdown) = crate::shutdown::channel();
    let (hints, hints_rx) = watch::channel(Hints {
        size: SIZE,
        interval: INTERVAL,
    });
    fake.w().position = delivered_id;
    let health = Health::default();
    health.set_ready();
    let engine = Engine::new(
        FakeDelivery(fake.clone()),
        FakeJournal(fake.clone()),
        Inputs {
            name: "d".into(),
            streams: Streams {
                indexes: vec![0],
                newline: false,
            },
            delivered_id,
            version: 3,
            intent,
            committed: fake.committed.subscribe(),
            hints: hints_rx,
            shutdown,
            health: health.clone(),
        },
    );
    Running {
        trigger,
        hints,
        health,
        task: tokio::spawn(engine.run()),
    }
}

async fn stop(fake: &Fake, r: Running) -> i64 {
    r.trigger.begin();
    fake.committed.send_modify(|c| c.ingest_closed = true);
    r.task.await.unwrap().delivered_id()
}

#[tokio::test(start_paused = true)]
async fn the_interval_counts_from_the_first_commit_on_the_monotonic_clock() {
    let fake = Fake::new();
    let r = start(&fake, 0, None);
    fake.until("counted", |w| w.counts == 1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let t0 = Instant::now();
    // Stamps a day in the past and a day in the future (a stepped clock) change nothing.
    fake.commit(0, 1, 10, 0);
    fake.commit(0, 1, 10, crate::clock::now_ms() + 86_400_000);
    fake.until("delivered", |w| !w.puts.is_empty()).await;
    let waited = t0.elapsed();
    assert!(
        waited >= INTERVAL && waited < INTERVAL + Duration::from_secs(1),
        "{waited:?}"
    );
    assert_eq!(fake.delivered_ids(), [1, 2]);
    assert_eq!(fake.w().intents, [(2, 3)]);
    assert_eq!(stop(&fake, r).await, 2);
}

#[tokio::test(start_paused = true)]
async fn the_size_hint_flushes_at_once_and_leftovers_keep_their_own_start() {
    let fake = Fake::new();
    let r = start(&fake, 0, None);
    fake.until("counted", |w| w.counts == 1).await;
    let t0 = Instant::now();
    fake.commit(0, 25, 100, 0); // 2,500 bytes: two full batches and a half
    fake.until("two batches", |w| w.puts.len() == 2).await;
    assert!(t0.elapsed() < Duration::from_secs(1));
    let (first, last, _) = fake.w().puts[0];
    assert_eq!((first, last), (1, 10));
    // The rest arrived with the first commit: it is due one interval after that.
    fake.until("the rest", |w| w.puts.len() == 3).await;
    let waited = t0.elapsed();
    assert!(waited >= INTERVAL && waited < INTERVAL + Duration::from_secs(1));
    assert_eq!(fake.delivered_ids(), (1..=25).collect::<Vec<_>>());
    stop(&fake, r).await;
}

#[tokio::test(start_paused = true)]
async fn a_retried_batch_is_the_same_batch_and_a_probe_ends_a_long_backoff() {
    let fake = Fake::new();
    fake.w().down = true;
    let r = start(&fake, 0, None);
    fake.commit(0, 5, 100, 0);
    // Let the backoff reach its ceiling: ~1+2+4+...+60 s.
    fake.until("a long outage", |w| w.attempts >= 9).await;
    let h = r.health.report();
    assert_eq!(h.status, "degraded");
    assert!(!h.destinations[0].up && h.destinations[0].down_since_ms.is_some());
    assert_eq!(h.destinations[0].backlog_records, 5);
    // Records keep arriving during the outage: the gauges follow.
    fake.commit(0, 3, 100, 0);
    fake.commit(1, 4, 100, 0); // another stream's: not this destination's backlog
    let probes = fake.w().probes;
    fake.until("probed", |w| w.probes > probes).await;
    assert_eq!(r.health.report().destinations[0].backlog_records, 8);
    // The endpoint comes back: delivery resumes within a probe interval, not a 60 s backoff.
    let back = Instant::now();
    fake.w().down = false;
    fake.until("delivered", |w| !w.puts.is_empty()).await;
    assert!(back.elapsed() <= PROBE_EVERY + Duration::from_millis(100));
    // The batch chosen before the outage, unchanged by what arrived since.
    let (first, last, _) = fake.w().puts[0];
    assert_eq!((first, last), (1, 5));
    let first_batches = fake.w().prepares.iter().filter(|p| p.after == 0).count();
    assert_eq!(first_batches, 1, "the batch was rebuilt");
    fake.until("the rest", |w| w.puts.len() == 2).await;
    assert_eq!(fake.delivered_ids(), (1..=8).collect::<Vec<_>>());
    assert_eq!(r.health.report().status, "ok");
    stop(&fake, r).await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_read_is_never_taken_for_nothing_there() {
    let fake = Fake::new();
    fake.preload(5, 10, crate::clock::now_ms());
    // The first count fails, then the first prepare.
    fake.w().failing_reads = 2;
    let r = start(&fake, 0, None);
    // Records also arrive meanwhile from another stream: a caught-up destination would move
    // its position over them; this one must not.
    fake.commit(1, 3, 10, 0);
    fake.until("retried", |w| w.failing_reads == 0).await;
    assert_eq!(fake.w().position, 0);
    assert_eq!(r.health.report().destinations[0].failures, 2);
    fake.until("delivered", |w| !w.puts.is_empty()).await;
    assert_eq!(fake.delivered_ids(), [1, 2, 3, 4, 5]);
    assert_eq!(stop(&fake, r).await, 8);
}

#[tokio::test(start_paused = true)]
async fn a_batch_in_flight_at_a_crash_is_replayed_exactly_then_the_rest_follows() {
    let fake = Fake::new();
    fake.preload(15, 10, crate::clock::now_ms() - 3_600_000);
    // A crash left an intent for 1..=10 under version 2 (the version is now 3).
    let r = start(&fake, 0, Some((10, 2)));
    fake.until("replayed", |w| !w.puts.is_empty()).await;
    let (first, last, plan) = fake.w().puts[0];
    assert_eq!((first, last, plan.version, plan.replay), (1, 10, 2, true));
    assert_eq!(plan.until, Some(10));
    // No second intent for the replay; the rest is an old backlog: flushed at once.
    fake.until("the rest", |w| w.puts.len() == 2).await;
    let (first, last, plan) = fake.w().puts[1];
    assert_eq!((first, last, plan.version, plan.replay), (11, 15, 3, false));
    assert_eq!(fake.w().intents, [(15, 3)]);
    assert_eq!(stop(&fake, r).await, 15);
}

#[tokio::test(start_paused = true)]
async fn new_hints_apply_to_the_batch_filling_now() {
    let fake = Fake::new();
    let r = start(&fake, 0, None);
    fake.until("counted", |w| w.counts == 1).await;
    let t0 = Instant::now();
    fake.commit(0, 1, 10, 0);
    tokio::time::sleep(Duration::from_secs(10)).await;
    r.hints.send_replace(Hints {
        size: SIZE,
        interval: Duration::from_secs(15),
    });
    fake.until("delivered", |w| !w.puts.is_empty()).await;
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_secs(15) && waited < Duration::from_secs(16));
    stop(&fake, r).await;
}

#[tokio::test(start_paused = true)]
async fn partial_progress_resends_the_rest_without_an_outage() {
    let fake = Fake::new();
    fake.w().partial = 3;
    let r = start(&fake, 0, None);
    fake.commit(0, 10, 100, 0);
    fake.until("delivered", |w| !w.puts.is_empty()).await;
    assert_eq!(fake.w().attempts, 4);
    let h = r.health.report();
    assert!(h.destinations[0].up);
    assert_eq!(h.destinations[0].failures, 0);
    stop(&fake, r).await;
}

#[tokio::test(start_paused = true)]
async fn records_gone_from_the_file_are_recounted_not_waited_for() {
    let fake = Fake::new();
    let r = start(&fake, 0, None);
    fake.commit(0, 10, 100, 0);
    fake.until("delivered", |w| !w.puts.is_empty()).await;
    // 5 more are counted, but drop_oldest takes them before they are read.
    fake.commit(0, 5, 100, 0);
    fake.w().records.retain(|r| r.id <= 10);
    fake.until("recounted", |w| w.prepares.len() >= 2).await;
    // The backlog then reads 0, and the destination is caught up at the last commit.
    tokio::time::sleep(IDLE_ADVANCE * 2).await;
    assert_eq!(r.health.report().destinations[0].backlog_records, 0);
    assert_eq!(fake.w().puts.len(), 1);
    assert_eq!(stop(&fake, r).await, 15);
}

#[tokio::test(start_paused = true)]
async fn shutdown_flushes_everything_ignoring_the_hints() {
    let fake = Fake::new();
    let r = start(&fake, 0, None);
    fake.commit(0, 3, 10, 0);
    fake.until("intent-free wait", |w| w.puts.is_empty()).await;
    let t0 = Instant::now();
    assert_eq!(stop(&fake, r).await, 3);
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(fake.delivered_ids(), [1, 2, 3]);
}
