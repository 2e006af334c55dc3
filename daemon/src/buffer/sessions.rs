//! The front door's persistent MQTT sessions and retained messages, kept in the buffer file so
//! that they survive a restart: a persistent session's filters, its queued QoS 1 messages (in
//! order, by a per-session sequence number), and when its device went offline (its expiry
//! keeps counting across a restart); every retained message.
//!
//! The front door sends what changed since its last save (`ingress/frontdoor/persist.rs`); the
//! buffer writer applies it in one transaction. Plain data here: the buffer knows nothing of
//! MQTT beyond these rows.

use bytes::Bytes;
use rusqlite::{params, Connection};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mqtt_sessions (
    client_id        TEXT PRIMARY KEY,
    offline_since_ms INTEGER
);
CREATE TABLE IF NOT EXISTS mqtt_session_filters (
    client_id TEXT    NOT NULL,
    filter    TEXT    NOT NULL,
    qos       INTEGER NOT NULL,
    PRIMARY KEY (client_id, filter)
);
CREATE TABLE IF NOT EXISTS mqtt_session_queue (
    client_id TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    topic     BLOB    NOT NULL,
    payload   BLOB    NOT NULL,
    qos       INTEGER NOT NULL,
    retain    INTEGER NOT NULL,
    dup       INTEGER NOT NULL,
    PRIMARY KEY (client_id, seq)
);
CREATE TABLE IF NOT EXISTS mqtt_retained (
    topic   BLOB PRIMARY KEY,
    payload BLOB NOT NULL
);
";

/// The tables and columns salvage copies from a damaged file.
pub const TABLES: [(&str, &str); 4] = [
    ("mqtt_sessions", "client_id, offline_since_ms"),
    ("mqtt_session_filters", "client_id, filter, qos"),
    (
        "mqtt_session_queue",
        "client_id, seq, topic, payload, qos, retain, dup",
    ),
    ("mqtt_retained", "topic, payload"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedMessage {
    pub seq: u64,
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueChange {
    /// Replace every saved message of the session with these.
    Rewrite(Vec<SavedMessage>),
    /// Forget the saved messages before `keep_from` (sent and acknowledged, or dropped), and
    /// add these (all after what was saved).
    Append {
        keep_from: u64,
        added: Vec<SavedMessage>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSession {
    pub client_id: String,
    /// When its device went offline (wall clock, ms); None while connected.
    pub offline_since_ms: Option<i64>,
    /// None: unchanged since the last save.
    pub filters: Option<Vec<(String, u8)>>,
    pub queue: QueueChange,
}

/// What changed since the last save.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionChanges {
    pub sessions: Vec<SavedSession>,
    /// Sessions that ended (clean start, expiry, or no longer persistent).
    pub removed: Vec<String>,
    /// Retained messages set (Some) or cleared (None), by topic.
    pub retained: Vec<(Bytes, Option<Bytes>)>,
}

impl SessionChanges {
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.removed.is_empty() && self.retained.is_empty()
    }
}

/// What the file holds, as the front door restores it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Every session with its filters and its whole queue (`QueueChange::Rewrite`).
    pub sessions: Vec<SavedSession>,
    pub retained: Vec<(Bytes, Bytes)>,
}

/// Applies `changes` (the caller holds the transaction).
pub fn save(conn: &Connection, changes: &SessionChanges) -> rusqlite::Result<()> {
    for id in &changes.removed {
        for table in [
            "mqtt_sessions",
            "mqtt_session_filters",
            "mqtt_session_queue",
        ] {
            conn.prepare_cached(&format!("DELETE FROM {table} WHERE client_id = ?1"))?
                .execute([id])?;
        }
    }
    let mut add = conn.prepare_cached(
        "INSERT OR REPLACE INTO mqtt_session_queue (client_id, seq, topic, payload, qos, retain, dup)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for s in &changes.sessions {
        conn.prepare_cached(
            "INSERT OR REPLACE INTO mqtt_sessions (client_id, offline_since_ms) VALUES (?1, ?2)",
        )?
        .execute(params![s.client_id, s.offline_since_ms])?;
        if let Some(filters) = &s.filters {
            conn.prepare_cached("DELETE FROM mqtt_session_filters WHERE client_id = ?1")?
                .execute([&s.client_id])?;
            for (f, q) in filters {
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO mqtt_session_filters (client_id, filter, qos) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![s.client_id, f, q])?;
            }
        }
        let added = match &s.queue {
            QueueChange::Rewrite(all) => {
                conn.prepare_cached("DELETE FROM mqtt_session_queue WHERE client_id = ?1")?
                    .execute([&s.client_id])?;
                all
            }
            QueueChange::Append { keep_from, added } => {
                conn.prepare_cached(
                    "DELETE FROM mqtt_session_queue WHERE client_id = ?1 AND seq < ?2",
                )?
                .execute(params![s.client_id, *keep_from as i64])?;
                added
            }
        };
        for m in added {
            add.execute(params![
                s.client_id,
                m.seq as i64,
                &m.topic[..],
                &m.payload[..],
                m.qos,
                m.retain,
                m.dup
            ])?;
        }
    }
    for (topic, payload) in &changes.retained {
        match payload {
            Some(p) => conn
                .prepare_cached(
                    "INSERT OR REPLACE INTO mqtt_retained (topic, payload) VALUES (?1, ?2)",
                )?
                .execute(params![&topic[..], &p[..]])?,
            None => conn
                .prepare_cached("DELETE FROM mqtt_retained WHERE topic = ?1")?
                .execute([&topic[..]])?,
        };
    }
    Ok(())
}

/// Reads every saved session and retained message.
pub fn load(conn: &Connection) -> rusqlite::Result<Saved> {
    let mut saved = Saved::default();
    let ids: Vec<(String, Option<i64>)> = conn
        .prepare("SELECT client_id, offline_since_ms FROM mqtt_sessions ORDER BY client_id")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut filters = conn.prepare(
        "SELECT filter, qos FROM mqtt_session_filters WHERE client_id = ?1 ORDER BY filter",
    )?;
    let mut queue = conn.prepare(
        "SELECT seq, topic, payload, qos, retain, dup FROM mqtt_session_queue
         WHERE client_id = ?1 ORDER BY seq",
    )?;
    for (client_id, offline_since_ms) in ids {
        let f: Vec<(String, u8)> = filters
            .query_map([&client_id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let q: Vec<SavedMessage> = queue
            .query_map([&client_id], |r| {
                Ok(SavedMessage {
                    seq: r.get::<_, i64>(0)? as u64,
                    topic: Bytes::from(r.get::<_, Vec<u8>>(1)?),
                    payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                    qos: r.get(3)?,
                    retain: r.get(4)?,
                    dup: r.get(5)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        saved.sessions.push(SavedSession {
            client_id,
            offline_since_ms,
            filters: Some(f),
            queue: QueueChange::Rewrite(q),
        });
    }
    saved.retained = conn
        .prepare("SELECT topic, payload FROM mqtt_retained")?
        .query_map([], |r| {
            Ok((
                Bytes::from(r.get::<_, Vec<u8>>(0)?),
                Bytes::from(r.get::<_, Vec<u8>>(1)?),
            ))
        })?
        .collect::<Result<_, _>>()?;
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, payload: &'static str) -> SavedMessage {
        SavedMessage {
            seq,
            topic: Bytes::from_static(b"t/1"),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: 1,
            retain: false,
            dup: seq == 1,
        }
    }

    #[test]
    fn changes_apply_incrementally_and_load_back() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let first = SessionChanges {
            sessions: vec![SavedSession {
                client_id: "dev-1".into(),
                offline_since_ms: None,
                filters: Some(vec![("cmd/dev-1/#".into(), 1)]),
                queue: QueueChange::Rewrite(vec![msg(1, "a"), msg(2, "b")]),
            }],
            removed: vec![],
            retained: vec![(
                Bytes::from_static(b"cfg/1"),
                Some(Bytes::from_static(b"v1")),
            )],
        };
        save(&conn, &first).unwrap();
        // Message 1 was acknowledged, 3 and 4 arrived; the device went offline.
        save(
            &conn,
            &SessionChanges {
                sessions: vec![SavedSession {
                    client_id: "dev-1".into(),
                    offline_since_ms: Some(1_000),
                    filters: None,
                    queue: QueueChange::Append {
                        keep_from: 2,
                        added: vec![msg(3, "c"), msg(4, "d")],
                    },
                }],
                removed: vec!["gone".into()],
                retained: vec![
                    (
                        Bytes::from_static(b"cfg/2"),
                        Some(Bytes::from_static(b"v2")),
                    ),
                    (Bytes::from_static(b"cfg/1"), None),
                ],
            },
        )
        .unwrap();
        let saved = load(&conn).unwrap();
        assert_eq!(saved.sessions.len(), 1);
        let s = &saved.sessions[0];
        assert_eq!(s.offline_since_ms, Some(1_000));
        assert_eq!(s.filters, Some(vec![("cmd/dev-1/#".into(), 1)]));
        assert_eq!(
            s.queue,
            QueueChange::Rewrite(vec![msg(2, "b"), msg(3, "c"), msg(4, "d")])
        );
        assert_eq!(
            saved.retained,
            [(Bytes::from_static(b"cfg/2"), Bytes::from_static(b"v2"))]
        );
        save(
            &conn,
            &SessionChanges {
                removed: vec!["dev-1".into()],
                ..SessionChanges::default()
            },
        )
        .unwrap();
        assert!(load(&conn).unwrap().sessions.is_empty());
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM mqtt_session_queue", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
    }
}
