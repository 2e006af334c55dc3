//! The window stage (the Kinesis Data Analytics role): one task per windowed rule. It reads the
//! rule's input rows from the buffer once they are committed, keeps the open windows (tumbling,
//! by arrival time) in memory, and when a window closes writes one row per group to the rule's
//! stream, which routes to destinations like any other.
//!
//! Crash safety comes from the buffer, not from this task's memory: the input rows are records
//! the buffer holds until the stage's position passes them, and the stage commits a closed
//! window's rows *in the same transaction* as its progress ([`WindowCommit`]). A window goes
//! out [`EMIT_PIECE`] groups per transaction, each recording how far into the window it got
//! ([`Emitting`]: the window, the last input row it holds, the groups done); the last piece
//! moves the position and the end of the last window emitted. After a kill -9 the stage starts
//! again from that position, rebuilds the open windows from the rows after it (the window part
//! way through from its rows up to the one it closed at, whose groups come in the same
//! first-seen order), carries on after the groups already emitted, and skips rows of windows
//! already emitted: every window is emitted exactly once, with the values it would have had
//! without the crash.
//!
//! A window closes when the wall clock passes its end plus `allowed_lateness` (or, should the
//! wall clock have been stepped back, when its length plus the lateness has passed on the
//! monotonic clock since its first row was read) and every row committed by then has been
//! read. A row stamped inside a window already emitted (by a clock stepped back, or committed
//! later than the lateness) is counted as late and left out of the aggregates; the raw
//! streams still hold it.

mod close;
mod groups;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::buffer::{store, Committed, WindowState};
use crate::clock::now_ms;
use crate::message::{Ack, Emitting, Envelope, Outcome, WindowCommit};
use crate::metrics as m;
use crate::rules::Rule;
use crate::shutdown::Shutdown;
use close::Closing;
use groups::{Groups, Sizes};

/// A closed window is emitted this many groups (rows) per transaction: closing the windows of a
/// fleet of any size holds one piece's rows at a time, and keeps the writer for no longer than
/// one piece, between which ingest commits.
pub const EMIT_PIECE: usize = 1_000;

/// Rows read from the buffer at a time (a few blocks' worth: the rows of a chunk are held
/// together, one allocation each for payload and partition key).
const READ_CHUNK: usize = 4_096;

pub struct WindowStage {
    pub state: WindowState,
    /// The windowed stream's name (metric labels, logs).
    pub stream_name: String,
    pub rule: Arc<Rule>,
    /// The input stream's id in the file.
    pub input_stream_id: i64,
    pub allowed_lateness: Duration,
    pub buffer_path: PathBuf,
    /// The writer's channel for window commits ([`crate::buffer::Buffer::window_ingest`]).
    pub ingest: mpsc::Sender<Envelope>,
    pub committed: watch::Receiver<Committed>,
    pub shutdown: Shutdown,
}

struct Window {
    groups: Groups,
    /// The smallest input row id in the window: the position cannot pass it before emission.
    min_id: i64,
    /// When its first row was read, by the monotonic clock: the window has surely ended by
    /// this plus its length plus the lateness, whatever the wall clock says since.
    opened: tokio::time::Instant,
}

/// Input rows read back together: their payloads and partition keys end to end (three
/// allocations for a chunk rather than two a row).
#[derive(Default)]
struct Rows {
    /// Each row's id, arrival, and where its payload and partition key end.
    rows: Vec<(i64, i64, usize, usize)>,
    payloads: Vec<u8>,
    partition_keys: String,
}

/// One input row read back.
struct Row<'a> {
    id: i64,
    arrival_ms: i64,
    partition_key: &'a str,
    payload: &'a [u8],
}

impl Rows {
    fn push(&mut self, r: &store::RowRef<'_>) {
        self.payloads.extend_from_slice(r.payload);
        self.partition_keys.push_str(r.partition_key);
        let ends = (self.payloads.len(), self.partition_keys.len());
        self.rows.push((r.id, r.arrival_ms, ends.0, ends.1));
    }

    fn len(&self) -> usize {
        self.rows.len()
    }

    fn iter(&self) -> impl Iterator<Item = Row<'_>> {
        let mut from = (0, 0);
        self.rows
            .iter()
            .map(move |&(id, arrival_ms, payload, key)| {
                let row = Row {
                    id,
                    arrival_ms,
                    partition_key: &self.partition_keys[from.1..key],
                    payload: &self.payloads[from.0..payload],
                };
                from = (payload, key);
                row
            })
    }
}

impl WindowStage {
    pub async fn run(self) {
        let WindowStage {
            state,
            stream_name: label,
            rule,
            input_stream_id,
            allowed_lateness,
            buffer_path,
            ingest,
            mut committed,
            mut shutdown,
        } = self;
        let w = rule.window().expect("a windowed rule").clone();
        let len = w.window_ms;
        let lateness = allowed_lateness.as_millis() as i64;
        let late = metrics::counter!(m::WINDOW_LATE, "stream" => label.clone());
        let skipped = metrics::counter!(m::WINDOW_BAD_ROWS, "stream" => label.clone());
        let emitted = metrics::counter!(m::WINDOWS_EMITTED, "stream" => label.clone());
        let open_gauge = metrics::gauge!(m::WINDOWS_OPEN, "stream" => label.clone());
        let incomplete = metrics::counter!(m::WINDOWS_INCOMPLETE, "stream" => label.clone());
        let mut open: BTreeMap<i64, Window> = BTreeMap::new();
        let per_group = w.accumulators().len();
        // The last closed window's size: the next is made as big from the start.
        let mut sizes = Sizes::default();
        let mut payload_bytes = 0;
        let mut position = state.position;
        let mut emitted_through = state.emitted_through_ms;
        // The closed window part way through its emission, if any (one at a time, oldest first).
        let mut emitting = state.emitting;
        let mut read_upto = position;
        // Windows starting before this may lack rows `drop_oldest` removed.
        let mut incomplete_before = i64::MIN;
        let mut conn: Option<Connection> = None;
        let mut backoff = Duration::from_millis(100);
        info!(stream = %label, position, emitted_through_ms = emitted_through, emitting = ?emitting, "window stage starting");
        loop {
            if shutdown.is_begun() {
                break;
            }
            // 1. Read every input row committed so far.
            let last = committed.borrow().last_id;
            if last > read_upto {
                let path = buffer_path.clone();
                let stream = input_stream_id;
                let mut c = conn.take();
                let after = read_upto;
                let read = tokio::task::spawn_blocking(move || {
                    let result = (|| {
                        let c = match &mut c {
                            Some(c) => c,
                            None => c.insert(store::open_reader(&path)?),
                        };
                        // Records after the position gone from the buffer: `drop_oldest`
                        // removed a segment the stage still needed.
                        let gap = store::segments(c)?
                            .first()
                            .is_some_and(|s| s.first_id > after + 1);
                        let mut rows = Rows::default();
                        store::scan(c, &[stream], after, Some(last), |r| {
                            rows.push(&r);
                            if rows.len() >= READ_CHUNK {
                                ControlFlow::Break(())
                            } else {
                                ControlFlow::Continue(())
                            }
                        })?;
                        Ok::<_, rusqlite::Error>((gap, rows))
                    })();
                    (c, result)
                })
                .await;
                let rows = match read {
                    Ok((c, Ok((gap, rows)))) => {
                        if gap {
                            // Every window that may hold a row of the removed range says so:
                            // those open now and those starting before the first row after it.
                            let horizon = rows.rows.first().map_or_else(now_ms, |r| r.1);
                            incomplete_before = incomplete_before.max(horizon);
                            warn!(stream = %label, "window stage: input rows were dropped from the full buffer (drop_oldest) before they were aggregated; the windows they belonged to are marked inputs_dropped");
                        }
                        conn = c;
                        backoff = Duration::from_millis(100);
                        rows
                    }
                    Ok((_, Err(e))) => {
                        // A failed read never moves the position: retried from the same place.
                        warn!(stream = %label, error = %e, "window stage: cannot read its input rows; retrying");
                        pause(&mut shutdown, backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                    Err(e) => {
                        error!(stream = %label, error = %e, "window stage: the read task failed");
                        pause(&mut shutdown, backoff).await;
                        continue;
                    }
                };
                let full = rows.len() >= READ_CHUNK;
                for row in rows.iter() {
                    read_upto = row.id;
                    let start = row.arrival_ms.div_euclid(len) * len;
                    if start + len <= emitted_through
                        || emitting.is_some_and(|e| e.is_past(start, row.id))
                    {
                        late.increment(1);
                        continue;
                    }
                    let Some(input) = w.parse_row(row.payload) else {
                        skipped.increment(1);
                        continue;
                    };
                    // A new window is sized like the last one closed, or like one still open
                    // if that is bigger (after a start, none has closed yet).
                    let like = if open.contains_key(&start) {
                        sizes
                    } else {
                        open.values().fold(sizes, |s, w| s.max(w.groups.sizes()))
                    };
                    let window = open.entry(start).or_insert_with(|| Window {
                        min_id: row.id,
                        groups: Groups::new(per_group, like),
                        opened: tokio::time::Instant::now(),
                    });
                    window.min_id = window.min_id.min(row.id);
                    let accs = window
                        .groups
                        .get_or_add(&input.key, row.partition_key, || w.accumulators());
                    for (acc, arg) in accs.iter_mut().zip(input.args()) {
                        acc.add(arg);
                    }
                }
                if full {
                    continue;
                }
                read_upto = read_upto.max(last);
                open_gauge.set(open.len() as f64);
            }

            // 2. Emit the oldest closed window, a piece at a time. A window starts its emission
            // only once the stage has caught up (rows committed meanwhile are read first); the
            // rows it holds are fixed then, and the pieces after the first need no catching up.
            let now = now_ms();
            // By the wall clock (windows are spans of arrival time), or, if the wall clock was
            // stepped back, by the monotonic time since the window's first row was read.
            let span = Duration::from_millis((len + lateness) as u64);
            let next = match emitting {
                // Carrying on (after a restart, once every row it held is read again).
                Some(e) => (read_upto >= e.upto_id).then_some(e),
                None => open
                    .iter()
                    .next()
                    .filter(|(start, w)| {
                        *start + len + lateness <= now || w.opened.elapsed() >= span
                    })
                    .filter(|_| committed.borrow().last_id <= read_upto)
                    .map(|(start, _)| Emitting {
                        start_ms: *start,
                        upto_id: read_upto,
                        groups_done: 0,
                    }),
            };
            if let Some(e) = next {
                let start = e.start_ms;
                let closing = Closing {
                    rule: &rule,
                    label: &label,
                    stream: state.stream,
                    window_ms: len,
                    incomplete_before,
                    incomplete: &incomplete,
                };
                // A window with no rows left to rebuild it from (`drop_oldest` removed them, or
                // a changed rule reads none) ends with no more rows.
                let total = open.get(&start).map_or(0, |w| w.groups.len());
                let from = (e.groups_done as usize).min(total);
                let to = (from + EMIT_PIECE).min(total);
                let records = match open.get(&start) {
                    Some(w) => closing.rows(start, &w.groups, from..to, payload_bytes),
                    None => Vec::new(),
                };
                payload_bytes = records.iter().map(|r| r.payload.len()).sum();
                let whole = to == total;
                let (new_position, through, after) = if whole {
                    let remaining_min = open
                        .iter()
                        .filter(|(s, _)| **s != start)
                        .map(|(_, w)| w.min_id)
                        .min();
                    let p = remaining_min.map_or(read_upto, |m| m - 1).max(position);
                    (p, start + len, None)
                } else {
                    let e = Emitting {
                        groups_done: to as u64,
                        ..e
                    };
                    (position, emitted_through, Some(e))
                };
                let (tx, rx) = oneshot::channel();
                let env = Envelope {
                    records: Ok(records),
                    ack: Ack::new(move |o| {
                        let _ = tx.send(o);
                    }),
                    window: Some(Box::new(WindowCommit {
                        slot: state.slot,
                        position: new_position,
                        emitted_through_ms: through,
                        emitting: after,
                    })),
                };
                if ingest.send(env).await.is_err() {
                    break;
                }
                match rx.await {
                    Ok(Outcome::Committed) => {
                        if !whole {
                            crate::failpoint::hit("window.between-pieces");
                        }
                        emitting = after;
                        if whole {
                            if let Some(w) = open.remove(&start) {
                                sizes = w.groups.sizes();
                            }
                            // A minute's groups and rows, freed at once: give the pages back
                            // rather than let the next minute's allocations land beside them.
                            crate::memory::release_freed();
                            emitted.increment(1);
                            position = new_position;
                            emitted_through = through;
                            open_gauge.set(open.len() as f64);
                        }
                        backoff = Duration::from_millis(100);
                    }
                    other => {
                        warn!(stream = %label, outcome = ?other, "window stage: a closed window's rows were not stored; retrying");
                        pause(&mut shutdown, backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
                continue;
            }

            // 3. Wait for new rows, the next window's close, or shutdown.
            let wait = match open.iter().next() {
                Some((start, w)) => {
                    let by_wall = Duration::from_millis(
                        (start + len + lateness - now).clamp(1, 60_000) as u64,
                    );
                    by_wall
                        .min(span.saturating_sub(w.opened.elapsed()))
                        .max(Duration::from_millis(1))
                }
                None => Duration::from_secs(60),
            };
            let last_seen = read_upto;
            let closed = tokio::select! {
                _ = shutdown.wait() => true,
                _ = tokio::time::sleep(wait) => false,
                r = committed.wait_for(|c| c.last_id > last_seen || c.ingest_closed) => {
                    r.map_or(true, |c| c.ingest_closed && c.last_id <= last_seen)
                }
            };
            if closed {
                break;
            }
        }
        info!(stream = %label, open = open.len(), "window stage stopped; open windows are rebuilt from the buffer at the next start");
    }
}

/// Sleeps `d`, or less if shutdown begins.
async fn pause(shutdown: &mut Shutdown, d: Duration) {
    tokio::select! {
        _ = shutdown.wait() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::buffer::{self, Buffer};
    use crate::config::Config;
    use crate::routing::Router;

    fn config(dir: &std::path::Path) -> Config {
        crate::config::parse(&format!(
            r#"
            [buffer]
            path = "{dir}/b.db"
            commit_interval = "1ms"
            [streams.daily]
            sql = "SELECT topic(2) AS device, count(*) AS n, sum(v) AS v FROM 's/+' GROUP BY topic(2), STEP(ROWTIME BY INTERVAL '1' DAY)"
            allowed_lateness = "0s"
            destinations = ["d"]
            [destinations.d]
            type = "file"
            root = "{dir}/out"
            bucket = "bucket"
            "#,
            dir = dir.display()
        ))
        .unwrap()
    }

    async fn publish(router: &Router, b: &Buffer, device: &str, values: &[i64]) {
        for v in values {
            let (tx, rx) = oneshot::channel();
            let env = crate::ingress::admit(
                router,
                format!("s/{device}").as_bytes(),
                &Bytes::from(format!("{{\"v\":{v}}}")),
                Some(device),
                Ack::new(move |o| {
                    let _ = tx.send(o);
                }),
            );
            b.ingest.send(env).await.unwrap();
            assert_eq!(rx.await.unwrap(), Outcome::Committed);
        }
    }

    /// The rows the stage wrote into the windowed stream.
    fn emitted(b: &Buffer, stream: usize) -> Vec<serde_json::Value> {
        let conn = store::open_reader(&b.path).unwrap();
        let mut out = Vec::new();
        store::scan(&conn, &[b.stream_ids[stream]], 0, None, |r| {
            out.push(serde_json::from_slice(r.payload).unwrap());
            ControlFlow::Continue(())
        })
        .unwrap();
        out
    }

    fn stage(cfg: &Config, b: &Buffer, shutdown: Shutdown) -> WindowStage {
        let w = b.windows[0].clone();
        let stream = &cfg.streams[w.stream];
        WindowStage {
            state: w.clone(),
            stream_name: stream.name.clone(),
            rule: stream.rule.clone().unwrap(),
            input_stream_id: b.stream_ids[stream.window_input.unwrap()],
            allowed_lateness: stream.allowed_lateness,
            buffer_path: b.path.clone(),
            ingest: b.window_ingest.clone(),
            committed: b.committed.clone(),
            shutdown,
        }
    }

    /// Sends one row per device (all before waiting for their commits), in this order.
    async fn publish_each(router: &Router, b: &Buffer, devices: impl Iterator<Item = String>) {
        let mut acks = Vec::new();
        for device in devices {
            let (tx, rx) = oneshot::channel();
            let env = crate::ingress::admit(
                router,
                format!("s/{device}").as_bytes(),
                &Bytes::from_static(b"{\"v\":1}"),
                Some(&device),
                Ack::new(move |o| {
                    let _ = tx.send(o);
                }),
            );
            b.ingest.send(env).await.unwrap();
            acks.push(rx);
        }
        for rx in acks {
            assert_eq!(rx.await.unwrap(), Outcome::Committed);
        }
    }

    async fn wait_for_rows(b: &Buffer, stream: usize, n: usize) -> Vec<serde_json::Value> {
        for _ in 0..10_000 {
            let rows = emitted(b, stream);
            if rows.len() >= n {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{n} rows never came: {}", emitted(b, stream).len());
    }

    /// A window of 2,500 groups goes out in pieces of [`EMIT_PIECE`] rows, each group once, and
    /// the stage's state in the file says no window is part way through afterwards.
    #[tokio::test(start_paused = true)]
    async fn a_large_window_is_emitted_in_pieces_each_group_once() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let b = buffer::open(&cfg).unwrap();
        let router = Router::new(cfg.streams.clone(), cfg.ingress.limits);
        publish_each(&router, &b, (0..2_500).map(|i| format!("d{i:04}"))).await;
        let inputs_upto = b.committed.borrow().last_id;
        let (trigger, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(stage(&cfg, &b, shutdown).run());
        let daily = b.windows[0].stream;
        tokio::time::sleep(Duration::from_secs(86_500)).await;
        let rows = wait_for_rows(&b, daily, 2_500).await;
        let devices: std::collections::BTreeSet<_> =
            rows.iter().map(|r| r["device"].as_str().unwrap()).collect();
        assert_eq!((rows.len(), devices.len()), (2_500, 2_500));
        trigger.begin();
        task.await.unwrap();
        let conn = store::open_reader(&b.path).unwrap();
        let (through, emitting) = store::window_progress(&conn, &b.windows[0].name).unwrap();
        assert_eq!(emitting, None);
        assert!(through > 0);
        // Three pieces, so three transactions; each flushes a block of its own.
        let blocks: i64 = conn
            .query_row(
                "SELECT count(*) FROM seg_1 WHERE first_id > ?1",
                [inputs_upto],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(blocks, 3);
    }

    /// A stage restarted part way through a window (as after a kill -9 between two pieces)
    /// rebuilds it from the same rows and emits only the groups not yet emitted; a row of that
    /// window committed after it closed is late, not a new group.
    #[tokio::test(start_paused = true)]
    async fn a_window_part_way_through_carries_on_after_the_groups_already_emitted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let b = buffer::open(&cfg).unwrap();
        let router = Router::new(cfg.streams.clone(), cfg.ingress.limits);
        publish_each(&router, &b, (0..2_500).map(|i| format!("d{i:04}"))).await;
        let upto_id = b.committed.borrow().last_id;
        // Committed after the window closed: late.
        publish(&router, &b, "latecomer", &[5]).await;
        let day = 86_400_000;
        let (trigger, shutdown) = crate::shutdown::channel();
        let mut stage = stage(&cfg, &b, shutdown);
        stage.state.emitting = Some(Emitting {
            start_ms: now_ms().div_euclid(day) * day,
            upto_id,
            groups_done: 1_000,
        });
        let task = tokio::spawn(stage.run());
        let daily = b.windows[0].stream;
        let rows = wait_for_rows(&b, daily, 1_500).await;
        let devices: Vec<_> = rows.iter().map(|r| r["device"].as_str().unwrap()).collect();
        let expected: Vec<_> = (1_000..2_500).map(|i| format!("d{i:04}")).collect();
        assert_eq!(devices, expected);
        // Nothing more comes, the late row included.
        tokio::time::sleep(Duration::from_secs(90_000)).await;
        assert_eq!(emitted(&b, daily).len(), 1_500);
        trigger.begin();
        task.await.unwrap();
        let conn = store::open_reader(&b.path).unwrap();
        assert_eq!(
            store::window_progress(&conn, &b.windows[0].name).unwrap().1,
            None
        );
    }

    /// A day-long window is emitted a day after its first row by the monotonic clock (here
    /// paused and advanced), even though the wall clock, which defines the window, has not
    /// moved: a wall clock stepped back holds no window open.
    #[tokio::test(start_paused = true)]
    async fn a_window_closes_on_the_monotonic_clock_when_the_wall_clock_lags() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let b = buffer::open(&cfg).unwrap();
        let router = Router::new(cfg.streams.clone(), cfg.ingress.limits);
        publish(&router, &b, "a", &[1, 2, 3]).await;
        publish(&router, &b, "b", &[10]).await;
        let (trigger, shutdown) = crate::shutdown::channel();
        let task = tokio::spawn(stage(&cfg, &b, shutdown).run());
        let daily = b.windows[0].stream;

        tokio::time::sleep(Duration::from_secs(86_000)).await;
        assert!(
            emitted(&b, daily).is_empty(),
            "closed before its day was over"
        );
        tokio::time::sleep(Duration::from_secs(500)).await;
        for _ in 0..1000 {
            if !emitted(&b, daily).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut rows = emitted(&b, daily);
        rows.sort_by_key(|r| r["device"].as_str().unwrap().to_string());
        assert_eq!(
            rows,
            [
                serde_json::json!({"device": "a", "n": 3, "v": 6}),
                serde_json::json!({"device": "b", "n": 1, "v": 10})
            ]
        );
        trigger.begin();
        task.await.unwrap();
    }
}
