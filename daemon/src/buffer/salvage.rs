//! A damaged buffer file at start: checked, and if damaged, salvaged instead of abandoned.
//!
//! At start the file gets `PRAGMA quick_check`: every page read once, so it costs a linear read
//! of the file (bounded by `buffer.max_size`). If SQLite cannot open it or the check finds damage, the
//! file (with its `-wal` and `-shm`) is moved aside as `<name>.damaged-<UTC time>`, a fresh
//! buffer is created in its place, and every row that can still be read is copied over with
//! its ids: the stream names, the destinations' positions (so nothing delivered is delivered
//! again, and nothing undelivered is skipped), and each segment's blocks. Rows that cannot be
//! read are reported at ERROR by id range and counted in `edgehose_buffer_corrupt_records_total`.
//! The gateway then starts serving devices on the fresh file.
//!
//! A file whose 100-byte header was wiped is first given a standard header again (page size
//! 4096, as edgehose creates its files) so that the pages behind it can be read.
//!
//! A marker file (`<name>.created`) records that a buffer was created here: a missing or
//! zero-length buffer file beside it is reported at ERROR instead of starting empty in silence.

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tracing::{error, info, warn};

use super::store::{self, is_corruption, SEGMENT_MAX_RECORDS};
use super::BufferError;
use crate::config::Synchronous;
use crate::metrics as m;

/// What happened to the file at start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Salvage {
    /// Where the damaged file went.
    pub moved_to: PathBuf,
    /// Rows copied, and id ranges lost.
    pub rows: u64,
    pub lost: Vec<(i64, i64)>,
}

fn marker(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".created");
    path.with_file_name(name)
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Checks the buffer file before it is opened for writing; salvages it if damaged.
pub fn check(path: &Path, sync: Synchronous) -> Result<Option<Salvage>, BufferError> {
    let expected = marker(path).exists();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if expected {
                error!(path = %path.display(), "the buffer file is missing although a buffer was created here: starting with an empty buffer; whatever it held is lost");
                metrics::counter!(m::BUFFER_LOST_FILES).increment(1);
            }
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
        Ok(meta) if meta.len() == 0 => {
            if expected {
                error!(path = %path.display(), "the buffer file is empty (zero bytes) although a buffer was created here: starting with an empty buffer; whatever it held is lost");
                metrics::counter!(m::BUFFER_LOST_FILES).increment(1);
            }
            return Ok(None);
        }
        Ok(_) => {}
    }
    let problem = match quick_check(path) {
        Ok(None) => return Ok(None),
        Ok(Some(p)) => p,
        Err(e) => e.to_string(),
    };
    error!(path = %path.display(), %problem, "the buffer file is damaged: moving it aside and copying what is readable into a fresh buffer");
    salvage(path, sync, &problem).map(Some)
}

/// Marks that a buffer exists at `path` (after it was created).
pub fn mark_created(path: &Path) -> std::io::Result<()> {
    let m = marker(path);
    if !m.exists() {
        // Synced with its directory entry: after a power cut its absence must mean "never
        // created", not "not yet on the card".
        let mut f = std::fs::File::create(&m)?;
        std::io::Write::write_all(&mut f, b"edgehose buffer\n")?;
        f.sync_all()?;
        if let Some(dir) = m.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

/// None when SQLite finds the file sound; else what it found.
fn quick_check(path: &Path) -> rusqlite::Result<Option<String>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    let mut stmt = conn.prepare("PRAGMA quick_check(20)")?;
    let found: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if found.len() == 1 && found[0] == "ok" {
        Ok(None)
    } else {
        Ok(Some(found.join("; ")))
    }
}

fn salvage(path: &Path, sync: Synchronous, problem: &str) -> Result<Salvage, BufferError> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    let moved_to = sibling(path, &format!(".damaged-{stamp}"));
    std::fs::rename(path, &moved_to)?;
    for suffix in ["-wal", "-shm"] {
        let from = sibling(path, suffix);
        if from.exists() {
            std::fs::rename(&from, sibling(&moved_to, suffix))?;
        }
    }
    // Work on a copy: the damaged file stays as it was found, for whoever looks at it later.
    let work = sibling(path, ".salvaging");
    let _ = std::fs::remove_file(&work);
    std::fs::copy(&moved_to, &work)?;
    let wal = sibling(&moved_to, "-wal");
    if wal.exists() {
        std::fs::copy(&wal, sibling(&work, "-wal"))?;
    }
    if problem.contains("not a database") || header_wiped(&work)? {
        warn!("the buffer file's header is unreadable: writing a standard one to reach the pages behind it");
        restore_header(&work)?;
    }
    let mut out = Salvage {
        moved_to: moved_to.clone(),
        ..Salvage::default()
    };
    forget_unreachable_tables(&work);
    let new = store::open_writer(path, sync)?;
    match Connection::open_with_flags(&work, OpenFlags::SQLITE_OPEN_READ_WRITE) {
        Ok(old) => copy_readable(&old, &new, &mut out)?,
        Err(e) => error!(error = %e, "nothing of the damaged buffer file can be opened"),
    }
    drop(new);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(sibling(&work, suffix));
    }
    let lost: u64 = out.lost.iter().map(|(a, b)| (b - a + 1) as u64).sum();
    error!(
        moved_to = %moved_to.display(),
        rows = out.rows,
        lost_records = lost,
        lost_ranges = ?out.lost,
        "buffer salvaged: what was readable is in the fresh buffer; the lost records are counted in edgehose_buffer_corrupt_records_total"
    );
    Ok(out)
}

/// SQLite refuses a whole file whose schema names a table rooted beyond its end (a truncated
/// file): such tables are taken out of the (working copy's) schema so the others can be read.
fn forget_unreachable_tables(work: &Path) {
    let result = (|| -> rusqlite::Result<usize> {
        let conn = Connection::open(work)?;
        conn.pragma_update(None, "writable_schema", "ON")?;
        let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
        let n = conn.execute(
            "DELETE FROM sqlite_master WHERE rootpage > ?1",
            params![pages],
        )?;
        conn.pragma_update(None, "writable_schema", "OFF")?;
        Ok(n)
    })();
    match result {
        Ok(0) => {}
        Ok(n) => warn!(
            tables = n,
            "tables rooted beyond the end of the damaged file cannot be read"
        ),
        Err(e) => warn!(error = %e, "cannot read the damaged file's schema"),
    }
}

/// The first 16 bytes are not SQLite's magic string.
fn header_wiped(path: &Path) -> std::io::Result<bool> {
    let mut head = [0u8; 16];
    let mut f = std::fs::File::open(path)?;
    let n = std::io::Read::read(&mut f, &mut head)?;
    Ok(n < 16 || &head != b"SQLite format 3\0")
}

/// Writes a standard 100-byte database header for a 4096-byte-page WAL file over the first
/// 100 bytes (the rest of page 1, the schema's root, is left as found).
fn restore_header(path: &Path) -> std::io::Result<()> {
    let len = std::fs::metadata(path)?.len();
    let pages = len.div_ceil(4096) as u32;
    let mut h = [0u8; 100];
    h[..16].copy_from_slice(b"SQLite format 3\0");
    h[16..18].copy_from_slice(&4096u16.to_be_bytes());
    h[18] = 2; // WAL write version
    h[19] = 2; // WAL read version
    h[21] = 64;
    h[22] = 32;
    h[23] = 32;
    h[24..28].copy_from_slice(&1u32.to_be_bytes()); // change counter
    h[28..32].copy_from_slice(&pages.to_be_bytes());
    h[40..44].copy_from_slice(&1u32.to_be_bytes()); // schema cookie
    h[44..48].copy_from_slice(&4u32.to_be_bytes()); // schema format
    h[56..60].copy_from_slice(&1u32.to_be_bytes()); // UTF-8
    h[92..96].copy_from_slice(&1u32.to_be_bytes()); // version-valid-for = change counter
    h[96..100].copy_from_slice(&3_045_000u32.to_be_bytes());
    use std::io::{Seek, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(std::io::SeekFrom::Start(0))?;
    f.write_all(&h)?;
    f.sync_all()
}

/// Copies streams, destinations and segments, row by row, skipping what cannot be read.
fn copy_readable(old: &Connection, new: &Connection, out: &mut Salvage) -> rusqlite::Result<()> {
    let tx = new.unchecked_transaction()?;
    // Streams, destinations, MQTT sessions and retained messages: small tables, copied whole
    // or row by row.
    let tables = [
        ("streams", "id, name"),
        (
            "destinations",
            "name, delivered_id, fingerprint, version, intent_last, intent_key",
        ),
    ];
    for (table, columns) in tables.into_iter().chain(super::sessions::TABLES) {
        let n = columns.split(',').count();
        let exists = old
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |r| r.get::<_, i64>(0),
            )
            .map_or(true, |n| n > 0);
        if !exists {
            continue; // a file from before the table
        }
        let copied = (|| -> rusqlite::Result<u64> {
            let mut stmt = old.prepare(&format!("SELECT {columns} FROM {table}"))?;
            let mut rows = stmt.query([])?;
            let mut copied = 0;
            let marks = vec!["?"; n].join(", ");
            while let Some(row) = rows.next()? {
                let values: Vec<rusqlite::types::Value> =
                    (0..n).map(|i| row.get(i)).collect::<Result<_, _>>()?;
                tx.execute(
                    &format!("INSERT OR REPLACE INTO {table}({columns}) VALUES ({marks})"),
                    rusqlite::params_from_iter(values),
                )?;
                copied += 1;
            }
            Ok(copied)
        })();
        match copied {
            Ok(n) => info!(table, rows = n, "salvaged"),
            Err(e) if table.starts_with("mqtt_") => {
                error!(table, error = %e, "cannot read this table of the damaged buffer: persistent MQTT sessions or retained messages are lost")
            }
            Err(e) => {
                error!(table, error = %e, "cannot read this table of the damaged buffer: what it held is lost (destinations start over from what was salvaged; records may be delivered again)")
            }
        }
    }
    // Segments: as listed, or, if the list is unreadable, from the tables that exist.
    let listed = store::segments(old);
    let segments: Vec<(i64, Option<i64>, i64)> = match &listed {
        Ok(list) => list
            .iter()
            .map(|s| (s.seq, Some(s.first_id), s.format as i64))
            .collect(),
        Err(e) => {
            error!(error = %e, "cannot read the segment list of the damaged buffer; looking for segment tables");
            let mut stmt =
                old.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'seg\\_%' ESCAPE '\\'")?;
            let names: Vec<String> = stmt
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            names
                .iter()
                .filter_map(|n| n.strip_prefix("seg_")?.parse().ok())
                .map(|seq| (seq, None, store::SegmentFormat::Blocks as i64))
                .collect()
        }
    };
    let mut prev_end: Option<i64> = None;
    for (seq, first_id, format) in segments {
        let table = format!("seg_{seq}");
        let sql = old
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
                params![table],
                |r| r.get::<_, String>(0),
            )
            .optional();
        let sql = match sql {
            Ok(Some(sql)) => sql,
            // Its ids are counted lost with the gap before the next readable segment.
            Ok(None) => {
                error!(
                    segment = seq,
                    "a segment's table is gone from the damaged buffer"
                );
                continue;
            }
            Err(e) => {
                error!(segment = seq, error = %e, "a segment's table definition cannot be read");
                continue;
            }
        };
        tx.execute_batch(&sql)?;
        let first = first_id.unwrap_or(0);
        let (rows, lo, hi) = copy_rows(old, &tx, &table, first, first_id.is_some(), out)?;
        let (lo, hi) = (first_id.unwrap_or(lo), hi.max(first_id.unwrap_or(lo) - 1));
        // Ids between the end of what was read of the previous segment and this one's start
        // were in the previous segment's unreadable tail.
        if let Some(prev_hi) = prev_end {
            if lo > prev_hi + 1 {
                lost_range(prev_hi + 1, lo - 1, &table, out);
            }
        }
        prev_end = Some(hi);
        tx.execute(
            "INSERT INTO segments(seq, first_id, last_id, records, format) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![seq, lo, hi, (hi - lo + 1).max(0), format],
        )?;
        out.rows += rows;
    }
    tx.commit()
}

fn lost_range(a: i64, b: i64, table: &str, out: &mut Salvage) {
    if b >= a {
        error!(
            table,
            first_id = a,
            last_id = b,
            "records of the damaged buffer cannot be read: lost"
        );
        metrics::counter!(m::BUFFER_CORRUPT).increment((b - a + 1) as u64);
        out.lost.push((a, b));
    }
}

/// Copies a segment table's rows by rowid from `from`, stepping over what cannot be read.
/// Returns (rows copied, lowest id, highest id covered).
fn copy_rows(
    old: &Connection,
    new: &Connection,
    table: &str,
    from: i64,
    known_start: bool,
    out: &mut Salvage,
) -> rusqlite::Result<(u64, i64, i64)> {
    // Blocks end at `last_id`; rows (earlier format) are one id each.
    let has_last = old
        .prepare(&format!("SELECT last_id FROM {table} LIMIT 0"))
        .is_ok();
    let end_col = if has_last { "last_id" } else { "rowid" };
    let next = |pos: i64| -> rusqlite::Result<Option<(i64, i64)>> {
        old.query_row(
            &format!(
                "SELECT rowid, {end_col} FROM {table} WHERE rowid >= ?1 ORDER BY rowid LIMIT 1"
            ),
            params![pos],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
    };
    let end = from + SEGMENT_MAX_RECORDS - 1;
    let mut pos = from;
    let mut rows = 0;
    let (mut lo, mut hi) = (i64::MAX, from - 1);
    let mut lost = |a: i64, b: i64| lost_range(a, b, table, out);
    loop {
        match next(pos) {
            Ok(None) => break,
            Ok(Some((id, last))) => {
                if id > pos && (pos > from || known_start) {
                    lost(pos, id - 1);
                }
                let row = old.query_row(
                    &format!("SELECT * FROM {table} WHERE rowid = ?1"),
                    params![id],
                    |r| {
                        (0..r.as_ref().column_count())
                            .map(|i| r.get::<_, rusqlite::types::Value>(i))
                            .collect::<Result<Vec<_>, _>>()
                    },
                );
                match row {
                    Ok(values) => {
                        let marks = vec!["?"; values.len()].join(", ");
                        new.execute(
                            &format!("INSERT INTO {table} VALUES ({marks})"),
                            rusqlite::params_from_iter(values),
                        )?;
                        rows += 1;
                    }
                    Err(e) if is_corruption(&e) => lost(id, last),
                    Err(e) => return Err(e),
                }
                lo = lo.min(id);
                hi = hi.max(last);
                pos = last + 1;
            }
            Err(e) if is_corruption(&e) => {
                match store::skip_damage(pos, end, next)? {
                    Some(r) => {
                        lost(pos, r - 1);
                        hi = hi.max(r - 1);
                        pos = r;
                    }
                    None => {
                        // The damage reaches the segment's end: how far it went is unknown
                        // beyond the ids the next segment starts at; the writer's next id
                        // comes after every salvaged segment.
                        warn!(table, from_id = pos, "cannot read the rest of this segment");
                        break;
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok((rows, lo.min(hi + 1), hi))
}
