//! The SQLite file: schema, pragmas, and the queries both the writer and the destinations' readers
//! run. Only [`super::writer`] writes; destinations read through their own connections (WAL lets
//! readers and the one writer proceed together).
//!
//! Records live in segments: tables `seg_<n>` holding consecutive record ids, listed in
//! `segments`. Appending goes to the newest segment; a segment is dropped whole once every
//! destination has delivered past its last id. Dropping a table frees its pages without the
//! per-row work (and page rewrites) that deleting rows would cost.
//!
//! A segment's rows are blocks of records (see [`super::block`]): `(first_id, last_id, codec,
//! stream, body)`, one or more per stream and commit; a reader selects its streams' blocks by
//! the `stream` column. Segments written by earlier versions hold one row per record
//! (`SegmentFormat::Rows`) or blocks mixing streams (`SegmentFormat::Blocks`); they are read to
//! their end and never appended to.

use std::ops::ControlFlow;
use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::block::{Block, BlockReader};

use crate::config::Synchronous;
use crate::message::Emitting;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS segments (
    seq      INTEGER PRIMARY KEY,
    first_id INTEGER NOT NULL,
    last_id  INTEGER NOT NULL,
    records  INTEGER NOT NULL,
    format   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS streams (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS destinations (
    name         TEXT PRIMARY KEY,
    delivered_id INTEGER NOT NULL,
    fingerprint  TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    intent_last  INTEGER,
    intent_key   TEXT
);
CREATE TABLE IF NOT EXISTS windows (
    name               TEXT PRIMARY KEY,
    emitted_through_ms INTEGER NOT NULL,
    emitting_start_ms  INTEGER,
    emitting_upto_id   INTEGER,
    emitting_done      INTEGER
);
";

/// SQLite's page cache of the writer, in KiB (negative `cache_size` means KiB). The writer
/// appends: what it needs cached is the active segment's B-tree path and the small tables, not
/// the blocks it wrote (measured: 4 MiB and 1 MiB commit at the same rate; BENCHMARKS.md).
const CACHE_KIB: i64 = 1024;
/// A reader's page cache, in KiB: readers scan each block once, in order, so a cache only
/// holds what was already read (SQLite's default would be 2 MiB per connection).
const READER_CACHE_KIB: i64 = 256;

/// Opens (creating if needed) the buffer for writing.
pub fn open_writer(path: &Path, sync: Synchronous) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(super::sessions::SCHEMA)?;
    // Files from before blocks: their segments hold rows (format 0, the column's default).
    if !has_column(&conn, "segments", "format")? {
        conn.execute_batch("ALTER TABLE segments ADD COLUMN format INTEGER NOT NULL DEFAULT 0")?;
    }
    // Files from before windows were emitted in pieces: none is being emitted.
    if !has_column(&conn, "windows", "emitting_start_ms")? {
        conn.execute_batch(
            "ALTER TABLE windows ADD COLUMN emitting_start_ms INTEGER;
             ALTER TABLE windows ADD COLUMN emitting_upto_id INTEGER;
             ALTER TABLE windows ADD COLUMN emitting_done INTEGER;",
        )?;
    }
    Ok(conn)
}

fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
    let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
    for name in names {
        if name? == column {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Opens a read-only connection for a destination.
pub fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
    Ok(conn)
}

/// Maps stream names to their stable ids in the file, adding new ones.
pub fn stream_ids(conn: &Connection, names: &[String]) -> rusqlite::Result<Vec<i64>> {
    names
        .iter()
        .map(|name| {
            conn.execute(
                "INSERT OR IGNORE INTO streams(name) VALUES (?1)",
                params![name],
            )?;
            conn.query_row(
                "SELECT id FROM streams WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
        })
        .collect()
}

/// Names of streams the file knows but the config no longer has.
pub fn unknown_streams(conn: &Connection, known: &[i64]) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT id, name FROM streams")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, name) = row?;
        if !known.contains(&id) {
            out.push(name);
        }
    }
    Ok(out)
}

/// A destination's durable delivery state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationState {
    /// Every record of this destination's streams with an id at or below this is delivered.
    pub delivered_id: i64,
    /// Firehose's configuration version, used in object names.
    pub version: i64,
    /// A batch whose object may already be visible: (last id, object key).
    pub intent: Option<(i64, String)>,
}

/// Loads a destination's state, creating it on first sight, and bumps its version when its
/// configuration fingerprint changed.
pub fn destination_state(
    conn: &Connection,
    name: &str,
    fingerprint: &str,
) -> rusqlite::Result<DestinationState> {
    let row = conn
        .query_row(
            "SELECT delivered_id, fingerprint, version, intent_last, intent_key
             FROM destinations WHERE name = ?1",
            params![name],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            },
        )
        .optional()?;
    match row {
        None => {
            // A new destination starts with whatever is still buffered.
            conn.execute(
                "INSERT INTO destinations(name, delivered_id, fingerprint, version)
                 VALUES (?1, 0, ?2, 1)",
                params![name, fingerprint],
            )?;
            Ok(DestinationState {
                delivered_id: 0,
                version: 1,
                intent: None,
            })
        }
        Some((delivered_id, old, mut version, last, key)) => {
            if old != fingerprint {
                version += 1;
                conn.execute(
                    "UPDATE destinations SET fingerprint = ?2, version = ?3 WHERE name = ?1",
                    params![name, fingerprint, version],
                )?;
            }
            Ok(DestinationState {
                delivered_id,
                version,
                intent: last.zip(key),
            })
        }
    }
}

/// Destinations in the file that the config no longer has: they must not hold back deletion.
pub fn forget_destinations_except(conn: &Connection, keep: &[String]) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare("SELECT name FROM destinations")?;
    let names: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut n = 0;
    for name in names.iter().filter(|n| !keep.contains(n)) {
        n += conn.execute("DELETE FROM destinations WHERE name = ?1", params![name])?;
    }
    Ok(n)
}

/// A window stage's progress: the end of the last window it emitted (0: none yet), and the
/// window it is part way through emitting, if any.
pub fn window_progress(conn: &Connection, name: &str) -> rusqlite::Result<(i64, Option<Emitting>)> {
    Ok(conn
        .query_row(
            "SELECT emitted_through_ms, emitting_start_ms, emitting_upto_id, emitting_done
             FROM windows WHERE name = ?1",
            params![name],
            |r| {
                let emitting = match (r.get(1)?, r.get(2)?, r.get::<_, Option<i64>>(3)?) {
                    (Some(start_ms), Some(upto_id), Some(done)) => Some(Emitting {
                        start_ms,
                        upto_id,
                        groups_done: done.max(0) as u64,
                    }),
                    _ => None,
                };
                Ok((r.get(0)?, emitting))
            },
        )
        .optional()?
        .unwrap_or((0, None)))
}

pub fn set_window_progress(
    conn: &Connection,
    name: &str,
    through_ms: i64,
    emitting: Option<Emitting>,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO windows(name, emitted_through_ms, emitting_start_ms, emitting_upto_id, emitting_done)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(name) DO UPDATE SET emitted_through_ms = excluded.emitted_through_ms,
             emitting_start_ms = excluded.emitting_start_ms,
             emitting_upto_id = excluded.emitting_upto_id,
             emitting_done = excluded.emitting_done",
        params![
            name,
            through_ms,
            emitting.map(|e| e.start_ms),
            emitting.map(|e| e.upto_id),
            emitting.map(|e| e.groups_done as i64),
        ],
    )?;
    Ok(())
}

/// Window stages the config no longer has: their state goes with their positions.
pub fn forget_windows_except(conn: &Connection, keep: &[String]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("SELECT name FROM windows")?;
    let names: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for name in names.iter().filter(|n| !keep.contains(n)) {
        conn.execute("DELETE FROM windows WHERE name = ?1", params![name])?;
    }
    Ok(())
}

pub fn set_intent(conn: &Connection, name: &str, last: i64, key: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE destinations SET intent_last = ?2, intent_key = ?3 WHERE name = ?1",
        params![name, last, key],
    )?;
    Ok(())
}

pub fn set_delivered(conn: &Connection, name: &str, last: i64) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE destinations SET delivered_id = ?2, intent_last = NULL, intent_key = NULL
         WHERE name = ?1",
        params![name, last],
    )?;
    Ok(())
}

/// How a segment's table holds its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentFormat {
    /// One row per record (versions before blocks): read, never appended to.
    Rows = 0,
    /// Blocks of consecutive records, compressed.
    Blocks = 1,
    /// Blocks as above, each with the one stream its records belong to in a column of its own
    /// (NULL: any stream), so that a reader skips other streams' blocks without reading them.
    StreamBlocks = 2,
}

impl SegmentFormat {
    fn from_column(v: i64) -> Self {
        match v {
            0 => Self::Rows,
            2 => Self::StreamBlocks,
            // 1, and any later format an older writer would also have taken for blocks.
            _ => Self::Blocks,
        }
    }

    /// The column of a segment's table holding the last id of each row.
    fn last_id_column(self) -> &'static str {
        match self {
            Self::Rows => "id",
            Self::Blocks | Self::StreamBlocks => "last_id",
        }
    }
}

/// One segment: the records with ids `first_id..=last_id` (none yet when `last_id < first_id`).
/// Ids within a segment are dense (every id in the range is a record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub seq: i64,
    pub first_id: i64,
    pub last_id: i64,
    pub records: u64,
    pub format: SegmentFormat,
}

impl Segment {
    pub fn table(&self) -> String {
        table(self.seq)
    }
}

fn table(seq: i64) -> String {
    format!("seg_{seq}")
}

/// All segments, oldest first, as listed. A closed segment's `last_id` and `records` are exact;
/// the active (newest) one's are only written when it closes (writing them at every commit would
/// rewrite a page per commit), so treat it as open-ended, or use [`segments_exact`].
pub fn segments(conn: &Connection) -> rusqlite::Result<Vec<Segment>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, first_id, last_id, records, format FROM segments ORDER BY seq",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Segment {
            seq: r.get(0)?,
            first_id: r.get(1)?,
            last_id: r.get(2)?,
            records: r.get(3)?,
            format: SegmentFormat::from_column(r.get(4)?),
        })
    })?;
    rows.collect()
}

/// All segments, oldest first, with the active one's `last_id` and `records` read from its table.
pub fn segments_exact(conn: &Connection) -> rusqlite::Result<Vec<Segment>> {
    let mut all = segments(conn)?;
    if let Some(active) = all.last_mut() {
        let column = active.format.last_id_column();
        let last: Option<i64> = conn.query_row(
            &format!("SELECT max({column}) FROM {}", active.table()),
            [],
            |r| r.get(0),
        )?;
        active.last_id = last.unwrap_or(active.first_id - 1);
        active.records = (active.last_id - active.first_id + 1) as u64;
    }
    Ok(all)
}

/// Creates an empty segment whose first record will get `first_id`.
pub fn create_segment(conn: &Connection, seq: i64, first_id: i64) -> rusqlite::Result<Segment> {
    conn.execute_batch(&format!(
        "CREATE TABLE {} (
            first_id INTEGER PRIMARY KEY,
            last_id  INTEGER NOT NULL,
            codec    INTEGER NOT NULL,
            stream   INTEGER,
            body     BLOB    NOT NULL
        )",
        table(seq)
    ))?;
    conn.execute(
        "INSERT INTO segments(seq, first_id, last_id, records, format)
         VALUES (?1, ?2, ?3, 0, ?4)",
        params![
            seq,
            first_id,
            first_id - 1,
            SegmentFormat::StreamBlocks as i64
        ],
    )?;
    Ok(Segment {
        seq,
        first_id,
        last_id: first_id - 1,
        records: 0,
        format: SegmentFormat::StreamBlocks,
    })
}

/// The statement that appends a block to a segment (for `prepare_cached`).
pub fn insert_block_sql(segment: &Segment) -> String {
    match segment.format {
        SegmentFormat::StreamBlocks => format!(
            "INSERT INTO {}(first_id, last_id, codec, body, stream) VALUES (?1, ?2, ?3, ?4, ?5)",
            segment.table()
        ),
        _ => format!(
            "INSERT INTO {}(first_id, last_id, codec, body) VALUES (?1, ?2, ?3, ?4)",
            segment.table()
        ),
    }
}

/// Appends a block to a segment of the block format.
pub fn insert_block(conn: &Connection, sql: &str, block: &Block<'_>) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(sql)?;
    let (first, last, codec) = (block.first_id, block.last_id, block.codec as i64);
    if stmt.parameter_count() == 5 {
        stmt.execute(params![first, last, codec, block.body, block.stream])?;
    } else {
        stmt.execute(params![first, last, codec, block.body])?;
    }
    Ok(())
}

pub fn update_segment(conn: &Connection, s: &Segment) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE segments SET last_id = ?2, records = ?3 WHERE seq = ?1")?
        .execute(params![s.seq, s.last_id, s.records])?;
    Ok(())
}

pub fn drop_segment(conn: &Connection, seq: i64) -> rusqlite::Result<()> {
    conn.execute_batch(&format!("DROP TABLE IF EXISTS {}", table(seq)))?;
    conn.execute("DELETE FROM segments WHERE seq = ?1", params![seq])?;
    Ok(())
}

/// Bytes of the file in use (pages not on the free list): what `buffer.max_size` bounds.
pub fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: u64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: u64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(pages.saturating_sub(free) * size)
}

/// One buffered record as a destination reads it.
pub struct RowRef<'a> {
    pub id: i64,
    pub arrival_ms: i64,
    pub partition_key: &'a str,
    pub payload: &'a [u8],
}

/// Visits, in id order, the records of `streams` with `after < id <= until` (no upper bound
/// when `until` is None), until `visit` breaks. Reads one consistent snapshot. Returns the
/// number visited.
pub fn scan(
    conn: &Connection,
    streams: &[i64],
    after: i64,
    until: Option<i64>,
    mut visit: impl FnMut(RowRef<'_>) -> ControlFlow<()>,
) -> rusqlite::Result<u64> {
    let until = until.unwrap_or(i64::MAX);
    let list = streams
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let tx = conn.unchecked_transaction()?;
    let mut n = 0;
    let mut blocks: Option<BlockReader> = None;
    let segments = segments(&tx)?;
    let active = segments.last().map(|s| s.seq);
    for seg in segments {
        // The active segment's listed last_id lags: it may hold more.
        let done = seg.last_id <= after && Some(seg.seq) != active;
        if done || seg.first_id > until {
            continue;
        }
        let flow = match seg.format {
            SegmentFormat::Rows => scan_rows(&tx, &seg, &list, after, until, &mut n, &mut visit)?,
            SegmentFormat::Blocks | SegmentFormat::StreamBlocks => {
                let reader = match &mut blocks {
                    Some(r) => r,
                    None => blocks.insert(BlockReader::new().map_err(io_error)?),
                };
                let active = Some(seg.seq) == active;
                scan_blocks(
                    &tx, &seg, active, reader, streams, after, until, &mut n, &mut visit,
                )?
            }
        };
        if flow.is_break() {
            break;
        }
    }
    tx.finish()?;
    Ok(n)
}

fn scan_rows(
    tx: &Connection,
    seg: &Segment,
    list: &str,
    after: i64,
    until: i64,
    n: &mut u64,
    visit: &mut impl FnMut(RowRef<'_>) -> ControlFlow<()>,
) -> rusqlite::Result<ControlFlow<()>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT id, arrival_ms, payload, partition_key FROM {}
         WHERE id > ?1 AND id <= ?2 AND stream IN ({list}) ORDER BY id",
        seg.table()
    ))?;
    let mut rows = stmt.query(params![after, until])?;
    while let Some(row) = rows.next()? {
        let payload = row.get_ref(2)?.as_blob()?;
        let partition_key = row.get_ref(3)?.as_str()?;
        *n += 1;
        let flow = visit(RowRef {
            id: row.get(0)?,
            arrival_ms: row.get(1)?,
            partition_key,
            payload,
        });
        if flow.is_break() {
            return Ok(flow);
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// What a block scan needs besides the segment: the reader, the selection and the visitor.
struct BlockScan<'a, V> {
    reader: &'a mut BlockReader,
    streams: &'a [i64],
    after: i64,
    until: i64,
    n: &'a mut u64,
    visit: &'a mut V,
}

impl<V: FnMut(RowRef<'_>) -> ControlFlow<()>> BlockScan<'_, V> {
    /// Decodes one block's records into the visitor. Ok(Continue) to go on to the next block.
    fn block(
        &mut self,
        seq: i64,
        first_id: i64,
        last_id: i64,
        codec: i64,
        body: &[u8],
    ) -> ControlFlow<()> {
        let (after, until, streams) = (self.after, self.until, self.streams);
        let n = &mut *self.n;
        let visit = &mut *self.visit;
        let mut past_until = false;
        let mut visited = first_id - 1;
        let result = self.reader.visit(first_id, codec, body, |r| {
            visited = r.id;
            if r.id > until {
                past_until = true;
                return ControlFlow::Break(());
            }
            if r.id <= after || !streams.contains(&r.stream) {
                return ControlFlow::Continue(());
            }
            *n += 1;
            visit(RowRef {
                id: r.id,
                arrival_ms: r.arrival_ms,
                partition_key: r.partition_key,
                payload: r.payload,
            })
        });
        match result {
            _ if past_until => ControlFlow::Continue(()),
            Ok(flow) => flow,
            Err(e) => {
                // The disk returned something else than was written. Retrying cannot help and
                // must not wedge the destinations: the rest of the block is skipped, once
                // logged and counted.
                report_lost(seq, visited + 1, last_id, &e.to_string());
                ControlFlow::Continue(())
            }
        }
    }
}

/// SQLite found the file damaged (as opposed to an I/O error, which may pass).
pub fn is_corruption(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// The highest id a segment may hold, for skipping over damage: exact for a closed segment,
/// else read from its table, else the most a segment can take.
fn segment_end(tx: &Connection, seg: &Segment, active: bool) -> i64 {
    if !active {
        return seg.last_id;
    }
    tx.query_row(
        &format!("SELECT max(last_id) FROM {}", seg.table()),
        [],
        |r| r.get::<_, Option<i64>>(0),
    )
    .ok()
    .flatten()
    .unwrap_or(seg.first_id + SEGMENT_MAX_RECORDS - 1)
}

/// A segment can hold at most this many records (the writer's cut).
pub const SEGMENT_MAX_RECORDS: i64 = 65_536;

#[allow(clippy::too_many_arguments)]
fn scan_blocks(
    tx: &Connection,
    seg: &Segment,
    active: bool,
    reader: &mut BlockReader,
    streams: &[i64],
    after: i64,
    until: i64,
    n: &mut u64,
    visit: &mut impl FnMut(RowRef<'_>) -> ControlFlow<()>,
) -> rusqlite::Result<ControlFlow<()>> {
    let mut scan = BlockScan {
        reader,
        streams,
        after,
        until,
        n,
        visit,
    };
    // The first id not yet handled.
    let mut next = seg.first_id;
    let fast = (|| -> rusqlite::Result<ControlFlow<()>> {
        // The block holding `after + 1` starts at or before it: find that start by rowid,
        // then read forward.
        let start: Option<i64> = tx
            .prepare_cached(&format!(
                "SELECT max(first_id) FROM {} WHERE first_id <= ?1",
                seg.table()
            ))?
            .query_row(params![after.saturating_add(1)], |r| r.get(0))?;
        let start = start.unwrap_or(i64::MIN);
        next = next.max(start);
        // Other streams' blocks are passed over by their stream column, unread.
        let only = match seg.format {
            SegmentFormat::StreamBlocks => {
                let list = streams.iter().map(|s| s.to_string()).collect::<Vec<_>>();
                format!("AND (stream IS NULL OR stream IN ({}))", list.join(","))
            }
            _ => String::new(),
        };
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT first_id, last_id, codec, body FROM {}
             WHERE first_id >= ?1 AND first_id <= ?2 {only} ORDER BY first_id",
            seg.table()
        ))?;
        let mut rows = stmt.query(params![start, until])?;
        while let Some(row) = rows.next()? {
            let first_id: i64 = row.get(0)?;
            let last_id: i64 = row.get(1)?;
            let codec: i64 = row.get(2)?;
            let body = row.get_ref(3)?.as_blob()?;
            let flow = scan.block(seg.seq, first_id, last_id, codec, body);
            next = last_id + 1;
            if flow.is_break() {
                return Ok(flow);
            }
        }
        Ok(ControlFlow::Continue(()))
    })();
    match fast {
        Err(e) if is_corruption(&e) => {
            let end = segment_end(tx, seg, active).min(until);
            scan_damaged(tx, seg, &mut scan, next, end, &e)
        }
        other => other,
    }
}

/// The way to the row keyed `pos` is damaged: the first key that a read from further on
/// reaches (stepping 1, 2, 4, ... ids ahead), or None if none is reachable up to `end`.
/// `next(p)` reads the first (key, last id) at or after `p`.
pub fn skip_damage(
    pos: i64,
    end: i64,
    next: impl Fn(i64) -> rusqlite::Result<Option<(i64, i64)>>,
) -> rusqlite::Result<Option<i64>> {
    let mut step = 1;
    loop {
        let probe = pos.saturating_add(step);
        if probe > end {
            return Ok(None);
        }
        match next(probe) {
            Ok(found) => return Ok(found.map(|(first, _)| first)),
            Err(e) if is_corruption(&e) => step = step.saturating_mul(2),
            Err(e) => return Err(e),
        }
    }
}

/// Reads a segment whose table SQLite found damaged, one block at a time from `from`: a block
/// whose body cannot be read, and ids whose blocks cannot even be listed (a damaged leaf page),
/// are reported lost by id range; everything readable is visited.
fn scan_damaged(
    tx: &Connection,
    seg: &Segment,
    scan: &mut BlockScan<'_, impl FnMut(RowRef<'_>) -> ControlFlow<()>>,
    from: i64,
    end: i64,
    first_error: &rusqlite::Error,
) -> rusqlite::Result<ControlFlow<()>> {
    tracing::error!(segment = seg.seq, from_id = from, error = %first_error, "the buffer file is damaged; reading this segment block by block to save what is readable");
    let table = seg.table();
    let next_block = |pos: i64| -> rusqlite::Result<Option<(i64, i64)>> {
        tx.query_row(
            &format!("SELECT first_id, last_id FROM {table} WHERE first_id >= ?1 ORDER BY first_id LIMIT 1"),
            params![pos],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
    };
    let after = scan.after;
    // Ranges wholly at or below the reader's position are not its loss.
    let lost = |first: i64, last: i64, why: &str| {
        if last > after {
            report_lost(seg.seq, first, last, why);
        }
    };
    let mut pos = from;
    while pos <= end {
        match next_block(pos) {
            Ok(None) => break,
            Ok(Some((first, last))) => {
                if first > pos {
                    // Blocks whose row is gone with its page.
                    lost(pos, (first - 1).min(end), "block rows missing");
                }
                if first > end {
                    break;
                }
                let body = tx.query_row(
                    &format!("SELECT codec, body FROM {table} WHERE first_id = ?1"),
                    params![first],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
                );
                match body {
                    Ok((codec, body)) => {
                        if scan.block(seg.seq, first, last, codec, &body).is_break() {
                            return Ok(ControlFlow::Break(()));
                        }
                    }
                    Err(e) if is_corruption(&e) => lost(first, last, &e.to_string()),
                    Err(e) => return Err(e),
                }
                pos = last + 1;
            }
            Err(e) if is_corruption(&e) => {
                let resume = skip_damage(pos, end, next_block)?;
                let stop = resume.map_or(end, |r| r - 1).min(end);
                lost(pos, stop, &e.to_string());
                match resume {
                    Some(r) if r <= end => pos = r,
                    _ => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// Logs (at ERROR) and counts records the file cannot give back (ids `first..=last`, all
/// streams), once per process and range.
fn report_lost(seq: i64, first: i64, last: i64, error: &str) {
    if last < first {
        return;
    }
    static SEEN: std::sync::Mutex<Vec<(i64, i64)>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if seen.contains(&(seq, first)) {
        return;
    }
    seen.push((seq, first));
    let records = (last - first + 1).max(0) as u64;
    tracing::error!(
        segment = seq,
        first_id = first,
        last_id = last,
        records,
        %error,
        "records of the buffer file cannot be read back (disk corruption?): they are skipped"
    );
    metrics::counter!(crate::metrics::BUFFER_CORRUPT).increment(records);
}

fn io_error(e: std::io::Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
}

/// What is pending for `streams` after `after`: (records, payload bytes, arrival stamp of the
/// first).
pub fn backlog(
    conn: &Connection,
    streams: &[i64],
    after: i64,
) -> rusqlite::Result<(u64, u64, Option<i64>)> {
    let mut n = 0;
    let mut bytes = 0;
    let mut oldest = None;
    scan(conn, streams, after, None, |row| {
        n += 1;
        bytes += row.payload.len() as u64;
        oldest.get_or_insert(row.arrival_ms);
        ControlFlow::Continue(())
    })?;
    Ok((n, bytes, oldest))
}

/// What is pending for `streams` after `after`: (records, payload bytes).
pub fn pending(conn: &Connection, streams: &[i64], after: i64) -> rusqlite::Result<(u64, u64)> {
    backlog(conn, streams, after).map(|(n, bytes, _)| (n, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("b.db"), Synchronous::Full).unwrap();
        (dir, conn)
    }

    #[test]
    fn version_rises_when_the_fingerprint_changes() {
        let (_dir, conn) = db();
        let s = destination_state(&conn, "d", "a").unwrap();
        assert_eq!((s.delivered_id, s.version, s.intent), (0, 1, None));
        assert_eq!(destination_state(&conn, "d", "a").unwrap().version, 1);
        assert_eq!(destination_state(&conn, "d", "b").unwrap().version, 2);
        set_intent(&conn, "d", 7, "k").unwrap();
        assert_eq!(
            destination_state(&conn, "d", "b").unwrap().intent,
            Some((7, "k".to_string()))
        );
        set_delivered(&conn, "d", 7).unwrap();
        let s = destination_state(&conn, "d", "b").unwrap();
        assert_eq!((s.delivered_id, s.intent), (7, None));
    }

    #[test]
    fn stream_ids_are_stable() {
        let (_dir, conn) = db();
        let a = stream_ids(&conn, &["x".into(), "y".into()]).unwrap();
        let b = stream_ids(&conn, &["y".into(), "z".into(), "x".into()]).unwrap();
        assert_eq!(a[0], b[2]);
        assert_eq!(a[1], b[0]);
        assert_ne!(b[1], a[0]);
        assert_ne!(b[1], a[1]);
        assert_eq!(unknown_streams(&conn, &[b[0], b[1]]).unwrap(), ["x"]);
    }

    #[test]
    fn scan_crosses_segments_and_blocks_in_id_order_and_filters_streams() {
        let (_dir, conn) = db();
        let mut id = 1;
        let mut w = super::super::block::BlockWriter::new().unwrap();
        for seq in 1..=3 {
            let mut seg = create_segment(&conn, seq, id).unwrap();
            // Two blocks of two records per segment.
            for _ in 0..2 {
                for _ in 0..2 {
                    w.push(id, id % 2, id * 10, "k", id.to_string().as_bytes());
                    seg.last_id = id;
                    seg.records += 1;
                    id += 1;
                }
                let block = w.finish().unwrap().unwrap();
                insert_block(&conn, &insert_block_sql(&seg), &block).unwrap();
            }
            update_segment(&conn, &seg).unwrap();
        }
        let mut seen = Vec::new();
        scan(&conn, &[0], 2, Some(11), |r| {
            seen.push((
                r.id,
                r.arrival_ms,
                String::from_utf8(r.payload.to_vec()).unwrap(),
            ));
            ControlFlow::Continue(())
        })
        .unwrap();
        let ids: Vec<i64> = seen.iter().map(|s| s.0).collect();
        assert_eq!(ids, [4, 6, 8, 10]);
        assert_eq!(seen[0].1, 40);
        assert_eq!(seen[0].2, "4");
        // Starting inside a block, and stopping inside one.
        let mut ids = Vec::new();
        scan(&conn, &[0, 1], 5, Some(6), |r| {
            ids.push(r.id);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(ids, [6]);
        assert_eq!(pending(&conn, &[0, 1], 6).unwrap().0, 6);
        assert_eq!(backlog(&conn, &[1], 9).unwrap().2, Some(110));
        drop_segment(&conn, 1).unwrap();
        assert_eq!(pending(&conn, &[0, 1], 0).unwrap().0, 8);

        // Blocks added to the active segment after its row was last written are still found,
        // and segments_exact reads its real extent.
        w.push(13, 0, 130, "k", b"1");
        let block = w.finish().unwrap().unwrap();
        let active = segments(&conn).unwrap()[1];
        assert_eq!(active.seq, 3);
        insert_block(&conn, &insert_block_sql(&active), &block).unwrap();
        assert_eq!(pending(&conn, &[0, 1], 12).unwrap().0, 1);
        let exact = segments_exact(&conn).unwrap();
        assert_eq!((exact[1].last_id, exact[1].records), (13, 5));
        assert_eq!(segments(&conn).unwrap()[1].last_id, 12);
        assert_eq!(segments(&conn).unwrap().len(), 2);
        assert!(used_bytes(&conn).unwrap() > 0);
    }

    #[test]
    fn a_corrupt_block_is_skipped_and_the_rest_is_read() {
        let (_dir, conn) = db();
        let mut w = super::super::block::BlockWriter::new().unwrap();
        let mut seg = create_segment(&conn, 1, 1).unwrap();
        for b in 0..3 {
            for i in 1..=10 {
                let id = b * 10 + i;
                let payload = format!(r#"{{"device":"dev-{i}","seq":{id},"t":21.5}}"#);
                w.push(id, 1, id, "k", payload.as_bytes());
            }
            let block = w.finish().unwrap().unwrap();
            assert_eq!(block.codec, super::super::block::Codec::Zstd);
            insert_block(&conn, &insert_block_sql(&seg), &block).unwrap();
        }
        seg.last_id = 30;
        seg.records = 30;
        update_segment(&conn, &seg).unwrap();
        // One bit flips in the middle block, as an SD card might.
        let mut body: Vec<u8> = conn
            .query_row("SELECT body FROM seg_1 WHERE first_id = 11", [], |r| {
                r.get(0)
            })
            .unwrap();
        let mid = body.len() / 2;
        body[mid] ^= 0x10;
        conn.execute(
            "UPDATE seg_1 SET body = ?1 WHERE first_id = 11",
            params![body],
        )
        .unwrap();
        let mut ids = Vec::new();
        let n = scan(&conn, &[1], 0, None, |r| {
            ids.push(r.id);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(n, 20);
        assert_eq!(ids, (1..=10).chain(21..=30).collect::<Vec<_>>());
    }

    #[test]
    fn a_damaged_overflow_page_loses_its_block_only_and_the_rest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.db");
        let mut w = super::super::block::BlockWriter::new().unwrap();
        let payloads: Vec<Vec<u8>> = (0..6)
            .map(|i| super::super::block::noise(100 + i, 10_000))
            .collect();
        {
            let conn = open_writer(&path, Synchronous::Full).unwrap();
            let mut seg = create_segment(&conn, 1, 1).unwrap();
            for (i, p) in payloads.iter().enumerate() {
                let id = i as i64 + 1;
                w.push(id, 1, id, "k", p);
                let block = w.finish().unwrap().unwrap();
                insert_block(&conn, &insert_block_sql(&seg), &block).unwrap();
                seg.last_id = id;
                seg.records += 1;
            }
            update_segment(&conn, &seg).unwrap();
            conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")
                .unwrap();
        }
        // Zero the page holding the middle of record 3's body: the first of its overflow pages,
        // so SQLite itself finds the chain broken.
        let mut file = std::fs::read(&path).unwrap();
        let needle = &payloads[2][2500..2532];
        let at = file
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap();
        let page = 4096;
        let start = at / page * page;
        file[start..start + page].fill(0);
        std::fs::write(&path, &file).unwrap();

        let conn = open_reader(&path).unwrap();
        let mut ids = Vec::new();
        scan(&conn, &[1], 0, None, |r| {
            assert_eq!(r.payload, &payloads[r.id as usize - 1][..]);
            ids.push(r.id);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(ids, [1, 2, 4, 5, 6]);
        // From inside the damage too, and with a bound.
        let mut ids = Vec::new();
        scan(&conn, &[1], 2, Some(5), |r| {
            ids.push(r.id);
            ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(ids, [4, 5]);
    }
}
