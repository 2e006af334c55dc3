//! The SQLite file: schema, pragmas, and the queries both the writer and the destinations' readers
//! run. Only [`super::writer`] writes; destinations read through their own connections (WAL lets
//! readers and the one writer proceed together).

use std::ops::ControlFlow;
use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::config::Synchronous;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    id            INTEGER PRIMARY KEY,
    stream        INTEGER NOT NULL,
    arrival_ms    INTEGER NOT NULL,
    topic         TEXT    NOT NULL,
    client_id     TEXT,
    partition_key TEXT    NOT NULL,
    payload       BLOB    NOT NULL
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
";

/// The byte count a stored row holds against `buffer.max_size`; keep in step with
/// [`crate::message::NewRecord::accounted_bytes`].
pub const ACCOUNTED_BYTES_SQL: &str = "length(payload) + length(topic) + length(partition_key) \
     + coalesce(length(client_id), 0) + 32";

/// Opens (creating if needed) the buffer for writing.
pub fn open_writer(path: &Path, sync: Synchronous) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        }
    }
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
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// Opens a read-only connection for a destination.
pub fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
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

/// Records held for streams the config no longer names: nobody will deliver them.
pub fn orphaned(conn: &Connection, known: &[i64]) -> rusqlite::Result<Vec<(String, u64)>> {
    let mut stmt = conn.prepare(
        "SELECT s.id, s.name, count(*) FROM records r JOIN streams s ON s.id = r.stream GROUP BY s.id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, u64>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, name, count) = row?;
        if !known.contains(&id) {
            out.push((name, count));
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

/// Records and accounted bytes held, for the buffer bound.
pub fn usage(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    conn.query_row(
        &format!("SELECT count(*), coalesce(sum({ACCOUNTED_BYTES_SQL}), 0) FROM records"),
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

pub fn max_id(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT coalesce(max(id), 0) FROM records", [], |r| r.get(0))
}

/// Deletes one stream's records in `(after, up_to]`; returns (records, accounted bytes) freed.
pub fn delete_range(
    conn: &Connection,
    stream: i64,
    after: i64,
    up_to: i64,
) -> rusqlite::Result<(u64, u64)> {
    let mut stmt = conn.prepare_cached(&format!(
        "DELETE FROM records WHERE id > ?1 AND id <= ?2 AND stream = ?3
         RETURNING {ACCOUNTED_BYTES_SQL}"
    ))?;
    let freed = sum_rows(stmt.query(params![after, up_to, stream])?)?;
    Ok(freed)
}

/// Deletes up to `limit` of the oldest records, whatever their stream (the `drop_oldest`
/// policy); returns (records, accounted bytes) freed.
pub fn delete_oldest(conn: &Connection, limit: u64) -> rusqlite::Result<(u64, u64)> {
    let mut stmt = conn.prepare_cached(&format!(
        "DELETE FROM records WHERE id IN (SELECT id FROM records ORDER BY id LIMIT ?1)
         RETURNING {ACCOUNTED_BYTES_SQL}"
    ))?;
    let freed = sum_rows(stmt.query(params![limit])?)?;
    Ok(freed)
}

fn sum_rows(mut rows: rusqlite::Rows<'_>) -> rusqlite::Result<(u64, u64)> {
    let (mut n, mut bytes) = (0u64, 0u64);
    while let Some(row) = rows.next()? {
        n += 1;
        bytes += row.get::<_, u64>(0)?;
    }
    Ok((n, bytes))
}

/// One buffered record as a destination reads it.
pub struct RowRef<'a> {
    pub id: i64,
    pub arrival_ms: i64,
    pub payload: &'a [u8],
}

/// Visits, in id order, the records of `streams` with `after < id <= until` (no upper bound
/// when `until` is None), until `visit` breaks. Returns the number visited.
pub fn scan(
    conn: &Connection,
    streams: &[i64],
    after: i64,
    until: Option<i64>,
    mut visit: impl FnMut(RowRef<'_>) -> ControlFlow<()>,
) -> rusqlite::Result<u64> {
    let list = streams
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT id, arrival_ms, payload FROM records
         WHERE id > ?1 AND id <= ?2 AND stream IN ({list}) ORDER BY id"
    ))?;
    let mut rows = stmt.query(params![after, until.unwrap_or(i64::MAX)])?;
    let mut n = 0;
    while let Some(row) = rows.next()? {
        let payload = row.get_ref(2)?.as_blob()?;
        n += 1;
        let flow = visit(RowRef {
            id: row.get(0)?,
            arrival_ms: row.get(1)?,
            payload,
        });
        if flow.is_break() {
            break;
        }
    }
    Ok(n)
}

/// What is pending for `streams` after `after`: (records, payload bytes, oldest arrival).
pub fn pending(
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

/// Arrival time of the first record of `streams` after `after`.
pub fn oldest_arrival(
    conn: &Connection,
    streams: &[i64],
    after: i64,
) -> rusqlite::Result<Option<i64>> {
    let mut oldest = None;
    scan(conn, streams, after, None, |row| {
        oldest = Some(row.arrival_ms);
        ControlFlow::Break(())
    })?;
    Ok(oldest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_rises_when_the_fingerprint_changes() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("b.db"), Synchronous::Full).unwrap();
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
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("b.db"), Synchronous::Full).unwrap();
        let a = stream_ids(&conn, &["x".into(), "y".into()]).unwrap();
        let b = stream_ids(&conn, &["y".into(), "z".into(), "x".into()]).unwrap();
        assert_eq!(a[0], b[2]);
        assert_eq!(a[1], b[0]);
        assert_ne!(b[1], a[0]);
        assert_ne!(b[1], a[1]);
    }
}
