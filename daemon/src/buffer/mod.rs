//! The buffer: a SQLite file in WAL mode, the gateway's one durability point. Ingress sends
//! envelopes to the [`writer::Writer`], which group-commits them and only then completes their
//! acks; destinations read committed records through their own connections and report what
//! they delivered, and a segment of records is dropped once every destination has it.

pub mod block;
pub mod salvage;
pub mod sessions;
pub mod store;
pub mod writer;

use std::path::PathBuf;

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::Config;
use crate::message::Envelope;
pub use store::DestinationState;
pub use writer::{Committed, Control, DestinationSlot, Writer};

#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the buffer writer has stopped")]
    WriterGone,
}

/// Everything the rest of the daemon needs to talk to the buffer.
pub struct Buffer {
    pub path: PathBuf,
    /// Config stream index -> stream id in the file.
    pub stream_ids: Vec<i64>,
    /// Per destination (config order): its durable state at start.
    pub destinations: Vec<DestinationState>,
    pub ingest: mpsc::Sender<Envelope>,
    /// The window stages' commits (read by the writer even while the buffer is full).
    pub window_ingest: mpsc::Sender<Envelope>,
    pub control: mpsc::Sender<Control>,
    pub committed: watch::Receiver<Committed>,
    pub writer: std::thread::JoinHandle<()>,
    /// Health shared with the admin server and the destinations; the writer reports into it.
    pub health: crate::health::Health,
    /// The front door's persistent sessions and retained messages, as the last run left them.
    pub sessions: sessions::Saved,
    /// Per windowed stream (config order): where its window stage left off.
    pub windows: Vec<WindowState>,
}

/// A window stage's durable state at start.
#[derive(Debug, Clone)]
pub struct WindowState {
    /// The windowed stream's index.
    pub stream: usize,
    /// Its slot among the writer's positions.
    pub slot: usize,
    pub name: String,
    /// Every input row up to here is in an emitted window.
    pub position: i64,
    /// The end of the last window emitted.
    pub emitted_through_ms: i64,
    /// The window it was part way through emitting.
    pub emitting: Option<crate::message::Emitting>,
}

/// The position a window stage keeps in the buffer, beside the destinations'.
pub fn window_slot_name(stream: &str) -> String {
    format!("window:{stream}")
}

/// Opens the buffer file and starts its writer.
pub fn open(config: &Config) -> Result<Buffer, BufferError> {
    let path = config.buffer.path.clone();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    if salvage::check(&path, config.buffer.synchronous)?.is_some() {
        metrics::counter!(crate::metrics::BUFFER_SALVAGES).increment(1);
    }
    let conn = store::open_writer(&path, config.buffer.synchronous)?;
    salvage::mark_created(&path)?;
    let names: Vec<String> = config.streams.iter().map(|s| s.name.clone()).collect();
    let stream_ids = store::stream_ids(&conn, &names)?;
    for name in store::unknown_streams(&conn, &stream_ids)? {
        warn!(
            stream = %name,
            "stream is no longer configured: records of it still buffered will not be delivered"
        );
    }
    let window_streams: Vec<usize> = (0..config.streams.len())
        .filter(|&i| config.streams[i].window_input.is_some())
        .collect();
    let window_names: Vec<String> = window_streams
        .iter()
        .map(|&i| window_slot_name(&config.streams[i].name))
        .collect();
    let mut dest_names: Vec<String> = config.destinations.iter().map(|d| d.name.clone()).collect();
    dest_names.extend(window_names.iter().cloned());
    store::forget_windows_except(&conn, &window_names)?;
    if store::forget_destinations_except(&conn, &dest_names)? > 0 {
        info!("forgot the delivery positions of destinations no longer configured");
    }
    let mut states = Vec::new();
    let mut slots = Vec::new();
    for d in &config.destinations {
        let state = store::destination_state(&conn, &d.name, &d.fingerprint())?;
        slots.push(DestinationSlot {
            name: d.name.clone(),
            delivered_id: state.delivered_id,
        });
        states.push(state);
    }
    let mut windows = Vec::new();
    for (&stream, name) in window_streams.iter().zip(&window_names) {
        // A changed rule keeps the position: rows of the old rule that no longer parse are
        // skipped and counted.
        let state = store::destination_state(&conn, name, "window")?;
        let (emitted_through_ms, emitting) = store::window_progress(&conn, name)?;
        windows.push(WindowState {
            stream,
            slot: slots.len(),
            name: name.clone(),
            position: state.delivered_id,
            emitted_through_ms,
            emitting,
        });
        slots.push(DestinationSlot {
            name: name.clone(),
            delivered_id: state.delivered_id,
        });
    }
    // A table of sessions that cannot be read costs the sessions, not the buffer.
    let saved_sessions = sessions::load(&conn).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot read the saved MQTT sessions and retained messages: starting without them");
        sessions::Saved::default()
    });
    // Everything so far (the schema, streams and destinations of a new file) into the main
    // file and synced, whatever `synchronous` says: with "normal", a power cut before the first
    // automatic checkpoint could otherwise leave a file without its tables.
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    let (committed_tx, committed) = watch::channel(Committed::default());
    let health = crate::health::Health::default();
    let writer = Writer::new(
        conn,
        config.buffer.clone(),
        stream_ids.clone(),
        slots,
        committed_tx,
        health.clone(),
    )?;
    let (ingest, ingest_rx) = mpsc::channel(writer::INGEST_CHANNEL_CAPACITY);
    let (control, control_rx) = mpsc::channel(writer::CONTROL_CHANNEL_CAPACITY);
    let (window_ingest, window_rx) = mpsc::channel(writer::CONTROL_CHANNEL_CAPACITY);
    let writer = writer.spawn(ingest_rx, window_rx, control_rx)?;
    Ok(Buffer {
        path,
        stream_ids,
        destinations: states,
        ingest,
        window_ingest,
        control,
        committed,
        writer,
        health,
        sessions: saved_sessions,
        windows,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::message::{Ack, NewRecord, Outcome};
    use crate::routing::Reject;

    fn config(dir: &std::path::Path, extra: &str) -> Config {
        crate::config::parse(&format!(
            r#"
            [buffer]
            path = "{}/b.db"
            commit_interval = "1ms"
            {extra}
            [streams.a]
            topics = ["a/#"]
            destinations = ["d1", "d2"]
            [streams.b]
            topics = ["b/#"]
            destinations = ["d2"]
            [destinations.d1]
            type = "file"
            root = "out"
            bucket = "one"
            [destinations.d2]
            type = "file"
            root = "out"
            bucket = "two"
            "#,
            dir.display()
        ))
        .unwrap()
    }

    fn record(stream: usize, n: usize, size: usize) -> NewRecord {
        NewRecord {
            stream,
            arrival_ms: n as i64,
            partition_key: "x".into(),
            payload: vec![b'x'; size].into(),
        }
    }

    /// A record whose payload does not compress (pseudo-random bytes), for tests of the bound.
    fn noise(stream: usize, n: usize, size: usize) -> NewRecord {
        NewRecord {
            payload: block::noise(n as u64, size).into(),
            ..record(stream, n, 0)
        }
    }

    type Log = Arc<Mutex<Vec<(usize, Outcome)>>>;

    fn envelope(log: &Log, n: usize, records: Result<Vec<NewRecord>, Reject>) -> Envelope {
        let log = Arc::clone(log);
        Envelope::new(records, Ack::new(move |o| log.lock().unwrap().push((n, o))))
    }

    async fn delivered(b: &Buffer, dest: usize, last_id: i64) {
        let (done, rx) = tokio::sync::oneshot::channel();
        b.control
            .send(Control::Delivered {
                dest,
                last_id,
                done,
            })
            .await
            .unwrap();
        rx.await.unwrap().unwrap();
    }

    fn close(b: Buffer) {
        drop(b.ingest);
        drop(b.control);
        drop(b.window_ingest);
        b.writer.join().unwrap();
    }

    #[tokio::test]
    async fn buffers_of_earlier_formats_are_read_to_their_end_and_appended_in_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "");
        {
            // What earlier versions left: no `format` column in `segments`; a closed segment
            // of the first format (topic and client id columns) and an active one of the second
            // (one row per record).
            let conn = rusqlite::Connection::open(&cfg.buffer.path).unwrap();
            conn.execute_batch(
                "CREATE TABLE segments (seq INTEGER PRIMARY KEY, first_id INTEGER NOT NULL,
                   last_id INTEGER NOT NULL, records INTEGER NOT NULL);
                 CREATE TABLE streams (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
                 CREATE TABLE destinations (name TEXT PRIMARY KEY, delivered_id INTEGER NOT NULL,
                   fingerprint TEXT NOT NULL, version INTEGER NOT NULL, intent_last INTEGER,
                   intent_key TEXT);
                 CREATE TABLE seg_1 (id INTEGER PRIMARY KEY, stream INTEGER NOT NULL,
                   arrival_ms INTEGER NOT NULL, topic TEXT NOT NULL, client_id TEXT,
                   partition_key TEXT NOT NULL, payload BLOB NOT NULL);
                 CREATE TABLE seg_2 (id INTEGER PRIMARY KEY, stream INTEGER NOT NULL,
                   arrival_ms INTEGER NOT NULL, partition_key TEXT NOT NULL,
                   payload BLOB NOT NULL);
                 INSERT INTO segments VALUES (1, 1, 1, 1), (2, 2, 1, 0);
                 INSERT INTO streams(id, name) VALUES (1, 'a');
                 INSERT INTO seg_1 VALUES (1, 1, 5, 'a/x', NULL, 'k', x'6f6c64');
                 INSERT INTO seg_2 VALUES (2, 1, 6, 'k', x'6f6c6432');",
            )
            .unwrap();
        }
        let b = open(&cfg).unwrap();
        let log: Log = Default::default();
        b.ingest
            .send(envelope(&log, 0, Ok(vec![record(0, 0, 3)])))
            .await
            .unwrap();
        let mut committed = b.committed.clone();
        committed.wait_for(|c| c.last_id == 3).await.unwrap();
        close(b);
        let reader = store::open_reader(&cfg.buffer.path).unwrap();
        let mut seen = Vec::new();
        store::scan(&reader, &[1], 0, None, |row| {
            seen.push((row.id, row.payload.to_vec()));
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (1, b"old".to_vec()),
                (2, b"old2".to_vec()),
                (3, b"xxx".to_vec())
            ]
        );
        let formats: Vec<_> = store::segments_exact(&reader)
            .unwrap()
            .iter()
            .map(|s| (s.seq, s.first_id, s.last_id, s.format))
            .collect();
        use store::SegmentFormat::*;
        assert_eq!(
            formats,
            [(1, 1, 1, Rows), (2, 2, 2, Rows), (3, 3, 3, StreamBlocks)]
        );
    }

    /// Each commit's records go in as one block per stream, each block's ids consecutive and
    /// its stream in a column of its own (which readers select by); a reader of one stream
    /// gets its records in arrival order.
    #[tokio::test]
    async fn each_streams_records_go_in_blocks_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "");
        let b = open(&cfg).unwrap();
        let log: Log = Default::default();
        // One message routed to both streams, then one to each, interleaved.
        let mut records = vec![vec![record(0, 0, 3), record(1, 0, 4)]];
        for n in 1..200 {
            records.push(vec![record(n % 2, n, 3 + n % 5)]);
        }
        for (n, r) in records.into_iter().enumerate() {
            b.ingest.send(envelope(&log, n, Ok(r))).await.unwrap();
        }
        let mut committed = b.committed.clone();
        committed.wait_for(|c| c.last_id == 201).await.unwrap();
        assert_eq!(log.lock().unwrap().len(), 200);
        let ids = b.stream_ids.clone();
        close(b);
        let reader = store::open_reader(&cfg.buffer.path).unwrap();
        let blocks: Vec<(i64, i64, Option<i64>)> = reader
            .prepare("SELECT first_id, last_id, stream FROM seg_1 ORDER BY first_id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut next = 1;
        for &(first, last, stream) in &blocks {
            assert_eq!(first, next, "{blocks:?}");
            next = last + 1;
            // Which streams the block's records belong to, read by the records themselves.
            let count = |s: i64| {
                let mut n = 0;
                let mut r = block::BlockReader::new().unwrap();
                let (codec, body): (i64, Vec<u8>) = reader
                    .query_row(
                        "SELECT codec, body FROM seg_1 WHERE first_id = ?1",
                        [first],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .unwrap();
                let flow = r.visit(first, codec, &body, |d| {
                    n += usize::from(d.stream == s);
                    std::ops::ControlFlow::Continue(())
                });
                assert!(flow.unwrap().is_continue());
                n
            };
            let size = (last - first + 1) as usize;
            let stream = stream.unwrap();
            assert_eq!(count(stream), size, "{blocks:?}");
        }
        assert_eq!(next, 202);
        assert!(blocks.len() >= 2);
        for (stream, want) in [(ids[0], 0), (ids[1], 1)] {
            let mut arrivals = Vec::new();
            store::scan(&reader, &[stream], 0, None, |r| {
                arrivals.push(r.arrival_ms);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
            let expected: Vec<i64> = (0..200).filter(|n| n % 2 == want || *n == 0).collect();
            assert_eq!(arrivals, expected, "stream {stream}");
        }
    }

    /// The active segment of a buffer whose blocks mix streams (the format before) is read to
    /// its end; new records go to a segment of per-stream blocks.
    #[tokio::test]
    async fn a_buffer_of_mixed_blocks_is_read_and_appended_in_per_stream_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "");
        {
            let conn =
                store::open_writer(&cfg.buffer.path, crate::config::Synchronous::Full).unwrap();
            conn.execute_batch(
                "INSERT INTO streams(id, name) VALUES (1, 'a'), (2, 'b');
                 CREATE TABLE seg_1 (first_id INTEGER PRIMARY KEY, last_id INTEGER NOT NULL,
                   codec INTEGER NOT NULL, body BLOB NOT NULL);
                 INSERT INTO segments VALUES (1, 1, 0, 0, 1);",
            )
            .unwrap();
            let seg = store::segments(&conn).unwrap()[0];
            assert_eq!(seg.format, store::SegmentFormat::Blocks);
            let mut w = block::BlockWriter::new().unwrap();
            w.push(1, 1, 1, "k", b"a1");
            w.push(2, 2, 2, "k", b"b2");
            w.push(3, 1, 3, "k", b"a3");
            let block = w.finish().unwrap().unwrap();
            store::insert_block(&conn, &store::insert_block_sql(&seg), &block).unwrap();
        }
        let b = open(&cfg).unwrap();
        let log: Log = Default::default();
        b.ingest
            .send(envelope(
                &log,
                0,
                Ok(vec![record(0, 4, 2), record(1, 5, 2)]),
            ))
            .await
            .unwrap();
        let mut committed = b.committed.clone();
        committed.wait_for(|c| c.last_id == 5).await.unwrap();
        close(b);
        let reader = store::open_reader(&cfg.buffer.path).unwrap();
        for (stream, want) in [(1, vec![1, 3, 4]), (2, vec![2, 5])] {
            let mut ids = Vec::new();
            store::scan(&reader, &[stream], 0, None, |r| {
                ids.push(r.id);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
            assert_eq!(ids, want, "stream {stream}");
        }
        let formats: Vec<_> = store::segments_exact(&reader)
            .unwrap()
            .iter()
            .map(|s| (s.seq, s.first_id, s.last_id, s.format))
            .collect();
        use store::SegmentFormat::*;
        assert_eq!(formats, [(1, 1, 3, Blocks), (2, 4, 5, StreamBlocks)]);
    }

    #[tokio::test]
    async fn acks_complete_after_the_commit_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&config(dir.path(), "")).unwrap();
        let log: Log = Default::default();
        for n in 0..100 {
            let records = if n % 10 == 3 {
                Err(Reject::MalformedPayload)
            } else {
                Ok(vec![record(n % 2, n, 10)])
            };
            b.ingest.send(envelope(&log, n, records)).await.unwrap();
        }
        let mut committed = b.committed.clone();
        committed
            .wait_for(|c| c.records.iter().sum::<u64>() == 90)
            .await
            .unwrap();
        // Acks are completed right after the commit's watch update; wait for the last one.
        while log.lock().unwrap().len() < 100 {
            tokio::task::yield_now().await;
        }
        let log = log.lock().unwrap();
        assert_eq!(
            log.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            (0..100).collect::<Vec<_>>()
        );
        for (n, o) in log.iter() {
            let want = if n % 10 == 3 {
                Outcome::Rejected(Reject::MalformedPayload)
            } else {
                Outcome::Committed
            };
            assert_eq!(*o, want, "message {n}");
        }
        // Everything acked as committed is in the file.
        let conn = store::open_reader(&dir.path().join("b.db")).unwrap();
        assert_eq!(store::pending(&conn, &b.stream_ids, 0).unwrap().0, 90);
        close(b);
    }

    #[tokio::test]
    async fn segments_go_once_every_destination_has_them_and_a_restart_resumes() {
        let dir = tempfile::tempdir().unwrap();
        // A 2MiB bound gives 128KiB segments: 1KiB records fill one every ~120 records.
        let cfg = config(dir.path(), "max_size = \"2MiB\"");
        let b = open(&cfg).unwrap();
        let log: Log = Default::default();
        for n in 0..1000 {
            b.ingest
                .send(envelope(&log, n, Ok(vec![noise(0, n, 1000)])))
                .await
                .unwrap();
        }
        let mut committed = b.committed.clone();
        committed.wait_for(|c| c.last_id == 1000).await.unwrap();
        let path = dir.path().join("b.db");
        let segments = || store::segments(&store::open_reader(&path).unwrap()).unwrap();
        let before = segments().len();
        assert!(before > 5, "{before} segments");
        // One destination alone does not free anything.
        delivered(&b, 0, 1000).await;
        assert_eq!(segments().len(), before);
        // Both have delivered up to 500: the segments entirely below go.
        delivered(&b, 1, 500).await;
        let after = segments();
        assert!(after.len() < before);
        assert!(
            after[0].last_id > 500 && after[0].first_id <= 501,
            "{after:?}"
        );
        close(b);

        // A restart keeps the positions and what is left.
        let b = open(&cfg).unwrap();
        assert_eq!(b.destinations[0].delivered_id, 1000);
        assert_eq!(b.destinations[1].delivered_id, 500);
        assert_eq!(b.committed.borrow().last_id, 1000);
        let conn = store::open_reader(&path).unwrap();
        assert_eq!(store::pending(&conn, &b.stream_ids, 500).unwrap().0, 500);
        close(b);
    }

    #[tokio::test]
    async fn reject_new_refuses_at_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&config(
            dir.path(),
            "max_size = \"1MiB\"\nwhen_full = \"reject_new\"",
        ))
        .unwrap();
        let log: Log = Default::default();
        for n in 0..3000 {
            b.ingest
                .send(envelope(&log, n, Ok(vec![noise(0, n, 1000)])))
                .await
                .unwrap();
        }
        while log.lock().unwrap().len() < 3000 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let log = log.lock().unwrap();
        let first_rejected = log
            .iter()
            .position(|(_, o)| *o == Outcome::Rejected(Reject::BufferFull))
            .expect("some were rejected");
        assert!(first_rejected > 500, "rejected from {first_rejected} on");
        // Once full, everything after is refused (nothing frees space).
        assert!(log[first_rejected..]
            .iter()
            .all(|(_, o)| *o == Outcome::Rejected(Reject::BufferFull)));
        let conn = store::open_reader(&dir.path().join("b.db")).unwrap();
        assert!(store::used_bytes(&conn).unwrap() <= 1024 * 1024);
        drop(log);
        close(b);
    }

    #[tokio::test]
    async fn block_waits_for_delivery_instead_of_refusing() {
        let dir = tempfile::tempdir().unwrap();
        let b = open(&config(dir.path(), "max_size = \"1MiB\"")).unwrap();
        let log: Log = Default::default();
        let sender = {
            let ingest = b.ingest.clone();
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                for n in 0..3000 {
                    ingest
                        .send(envelope(&log, n, Ok(vec![noise(0, n, 1000)])))
                        .await
                        .unwrap();
                }
            })
        };
        // It stalls below 3000 until the destinations make room.
        let mut committed = b.committed.clone();
        let stalled = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            committed.wait_for(|c| c.last_id == 3000),
        )
        .await;
        assert!(stalled.is_err(), "3000KB went into a 1MiB buffer");
        let mut last = 0;
        while last < 3000 {
            last = b.committed.borrow().last_id;
            delivered(&b, 0, last).await;
            delivered(&b, 1, last).await;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        sender.await.unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 3000);
        assert!(log.iter().all(|(_, o)| *o == Outcome::Committed));
        drop(log);
        close(b);
    }
}
