//! Assembling one batch: reads committed records from the buffer, in id order, into staged
//! objects (newline-delimited, optionally compressed): in memory while the batch's allowance
//! lasts (a remote sink's), else in files, fsynced for the `file` sink. Memory use does not
//! depend on the batch size: past the allowance, records stream from SQLite to the files.
//!
//! With dynamic partitioning (`!{partitionKeyFromQuery:NAME}` in the prefix) one batch becomes
//! one object per partition, plus an error object for records whose partition cannot be found
//! (not JSON, field missing, more than [`MAX_ACTIVE_PARTITIONS`]) in Firehose's error-record
//! shape (AWS-SEMANTICS 5, 8).

use std::cell::Cell;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use base64::Engine;
use bytes::Bytes;
use flate2::write::GzEncoder;
use hashbrown::HashMap;
use rusqlite::Connection;

use crate::buffer::store;
use crate::config::{BatchingConfig, Compression};
use crate::sinks::Staging;
use crate::templates::json_field::{self, Field};
use crate::templates::keys::PrefixTemplate;

/// Firehose's limit on partitions buffering at once (AWS-SEMANTICS 8); more go to the error
/// output.
pub const MAX_ACTIVE_PARTITIONS: usize = 500;

/// Firehose's error code for a record whose partition key could not be extracted.
pub const METADATA_EXTRACTION_FAILED: &str = "DynamicPartitioning.MetadataExtractionFailed";
/// ...and for a record over the active-partition limit.
pub const PARTITION_LIMIT: &str = "DynamicPartitioning.ActivePartitionsLimitExceeded";

/// One object of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub staging: Staging,
    /// One value per partition name; empty without dynamic partitioning.
    pub partition: Vec<String>,
    /// Error records (Firehose's error shape), rather than records.
    pub error: bool,
    pub records: u64,
    pub oldest_arrival_ms: i64,
}

/// A batch written to its staging files, ready for the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub parts: Vec<Part>,
    pub first_id: i64,
    pub last_id: i64,
    pub records: u64,
    /// Bytes before compression, delimiters included.
    pub bytes: u64,
    pub oldest_arrival_ms: i64,
    /// Records that went to the error output, by error code.
    pub errors: Vec<(&'static str, u64)>,
    /// The parts are written plain and still need this compression ([`compress`]) before
    /// they are put: with dynamic partitioning each part is compressed on its own, just
    /// before its put, so compression overlaps the puts of other parts.
    pub compress_parts: Compression,
}

#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("reading the buffer: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("writing the staged object: {0}")]
    Io(#[from] io::Error),
}

/// What to put in the batch.
#[derive(Debug, Clone, Copy)]
pub struct Selection<'a> {
    pub streams: &'a [i64],
    /// Records after this id...
    pub after: i64,
    /// ...up to and including this one (a batch being replayed), or...
    pub until: Option<i64>,
    /// ...until adding the next record would pass this many bytes (a new batch).
    pub max_bytes: Option<u64>,
}

/// How a batch is staged.
#[derive(Debug, Clone, Copy)]
pub struct Stage {
    /// Bytes of the batch's (compressed) objects that may be held in memory; an object
    /// that would pass it goes to its file, and so does everything after the allowance is
    /// spent. 0: files only.
    pub memory: usize,
    /// Files are fsynced (the `file` sink renames them into place); otherwise they are only a
    /// staging copy of what the buffer holds (a crash rebuilds them).
    pub sync: bool,
}

/// An object's bytes on their way to memory or, past the allowance, to its file.
struct Spill<'a> {
    out: Out,
    /// None: memory only (compressing a part already in memory).
    path: Option<PathBuf>,
    buffer: usize,
    allowance: &'a Cell<usize>,
}

enum Out {
    Memory(Vec<u8>),
    File(BufWriter<File>),
}

impl<'a> Spill<'a> {
    fn new(path: Option<PathBuf>, buffer: usize, allowance: &'a Cell<usize>) -> io::Result<Self> {
        let out = match &path {
            // Nothing may stay in memory: open the file now, so that its errors come first.
            Some(p) if allowance.get() == 0 => {
                Out::File(BufWriter::with_capacity(buffer, File::create(p)?))
            }
            _ => Out::Memory(Vec::new()),
        };
        Ok(Self {
            out,
            path,
            buffer,
            allowance,
        })
    }

    /// Flushes the object; a file with `sync` to the disk too.
    fn finish(self, sync: bool) -> io::Result<Staging> {
        match (self.out, self.path) {
            (Out::Memory(v), _) => Ok(Staging::Memory(Bytes::from(v))),
            (Out::File(w), Some(path)) => {
                let file = w.into_inner().map_err(|e| e.into_error())?;
                if sync {
                    file.sync_all()?;
                }
                Ok(Staging::File(path))
            }
            (Out::File(_), None) => Err(io::Error::other("a memory-only object has a file")),
        }
    }
}

impl Write for Spill<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_all(data)?;
        Ok(data.len())
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let held = match &mut self.out {
            Out::File(w) => return w.write_all(data),
            Out::Memory(v) => {
                let left = self.allowance.get();
                match &self.path {
                    Some(_) if data.len() > left => std::mem::take(v),
                    _ => {
                        self.allowance.set(left.saturating_sub(data.len()));
                        v.extend_from_slice(data);
                        return Ok(());
                    }
                }
            }
        };
        // Past the allowance: this object goes to its file, and what it held is free again.
        let path = self.path.as_ref().expect("checked above");
        let mut w = BufWriter::with_capacity(self.buffer, File::create(path)?);
        w.write_all(&held)?;
        w.write_all(data)?;
        self.allowance.set(self.allowance.get() + held.len());
        self.out = Out::File(w);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Out::File(w) => w.flush(),
            Out::Memory(_) => Ok(()),
        }
    }
}

enum Body<'a> {
    Plain(Spill<'a>),
    // Boxed: both encoders carry their state inline.
    Gzip(Box<GzEncoder<Spill<'a>>>),
    Snappy(Box<snap::write::FrameEncoder<Spill<'a>>>),
}

impl<'a> Body<'a> {
    fn new(out: Spill<'a>, compression: Compression) -> Self {
        match compression {
            Compression::None => Body::Plain(out),
            Compression::Gzip => Body::Gzip(Box::new(GzEncoder::new(
                out,
                flate2::Compression::default(),
            ))),
            Compression::Snappy => Body::Snappy(Box::new(snap::write::FrameEncoder::new(out))),
        }
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Body::Plain(w) => w.write_all(data),
            Body::Gzip(w) => w.write_all(data),
            Body::Snappy(w) => w.write_all(data),
        }
    }

    /// Flushes the body; a file with `sync` to the disk too.
    fn finish(self, sync: bool) -> io::Result<Staging> {
        let out = match self {
            Body::Plain(w) => w,
            Body::Gzip(w) => w.finish()?,
            Body::Snappy(w) => w
                .into_inner()
                .map_err(|e| io::Error::other(e.to_string()))?,
        };
        out.finish(sync)
    }
}

/// A part being written.
struct Open<'a> {
    body: Body<'a>,
    partition: Vec<String>,
    error: bool,
    records: u64,
    oldest_arrival_ms: i64,
}

/// Where a record goes: a partition, or the error object with a code and message.
enum Placement {
    Partition(Vec<String>),
    Error(&'static str, String),
}

/// Where one record goes.
enum Target {
    /// A part already open.
    Open(usize),
    /// A part to open, for this partition.
    New(Vec<String>),
    /// The error object, with a code and message.
    Error(&'static str, String),
}

/// Partition names with their paths split into steps, once per batch.
fn paths(names: &[String]) -> Vec<(&str, Vec<&str>)> {
    names
        .iter()
        .map(|n| (n.as_str(), n.split('.').collect()))
        .collect()
}

/// Reads the partition values of one record: each name is a (dotted) JSON field whose value is
/// a string, number or boolean.
fn partition_of(payload: &[u8], paths: &[(&str, Vec<&str>)]) -> Placement {
    let mut values = Vec::with_capacity(paths.len());
    for (name, steps) in paths {
        let text = match json_field::find_steps(payload, steps) {
            Ok(Field::Scalar(text)) => text,
            Ok(Field::Missing) => {
                return Placement::Error(
                    METADATA_EXTRACTION_FAILED,
                    format!("record has no field {name:?}"),
                )
            }
            Ok(Field::Other) => {
                return Placement::Error(
                    METADATA_EXTRACTION_FAILED,
                    format!("field {name:?} is not a string, number or boolean"),
                )
            }
            Err(e) => {
                return Placement::Error(
                    METADATA_EXTRACTION_FAILED,
                    format!("record is not JSON: {e}"),
                )
            }
        };
        if text.is_empty() || text.chars().any(|c| c.is_control() || c == '/') {
            return Placement::Error(
                METADATA_EXTRACTION_FAILED,
                format!("field {name:?} is empty or holds '/' or control characters"),
            );
        }
        values.push(text);
    }
    Placement::Partition(values)
}

/// One record in Firehose's error-output shape (AWS-SEMANTICS 5), newline-terminated.
pub fn error_record(arrival_ms: i64, code: &str, message: &str, payload: &[u8]) -> Vec<u8> {
    let mut line = serde_json::to_vec(&serde_json::json!({
        "attemptsMade": 1,
        "arrivalTimestamp": arrival_ms,
        "errorCode": code,
        "errorMessage": message,
        "attemptEndingTimestamp": crate::clock::now_ms(),
        "rawData": base64::engine::general_purpose::STANDARD.encode(payload),
    }))
    .unwrap_or_default();
    line.push(b'\n');
    line
}

/// Writes the selected records to objects in memory, while `stage.memory` lasts, or to files
/// named after `base` (`base` itself without dynamic partitioning). Returns None (and leaves
/// no file) when there are none.
pub fn assemble(
    conn: &Connection,
    selection: Selection<'_>,
    batching: &BatchingConfig,
    prefix: &PrefixTemplate,
    base: &Path,
    stage: Stage,
) -> Result<Option<Staged>, AssembleError> {
    let partition_names = prefix.partition_names();
    let allowance = Cell::new(stage.memory);
    if let Some(dir) = base.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partitioned = !partition_names.is_empty();
    let paths = paths(partition_names);
    // One big buffer for a single object; small ones when up to 500 files are open.
    let buffer = if partitioned { 8 * 1024 } else { 256 * 1024 };
    // Compressors hold ~300 KiB of state each: partitions are written plain, compressed after.
    let stream_compression = if partitioned {
        Compression::None
    } else {
        batching.compression
    };
    let delimiter: &[u8] = if batching.newline { b"\n" } else { b"" };
    let mut staged = Staged {
        parts: Vec::new(),
        first_id: 0,
        last_id: 0,
        records: 0,
        bytes: 0,
        oldest_arrival_ms: 0,
        errors: Vec::new(),
        compress_parts: if partitioned {
            batching.compression
        } else {
            Compression::None
        },
    };
    let mut open: Vec<Open> = Vec::new();
    let mut by_partition: HashMap<Vec<String>, usize> = HashMap::default();
    let mut error_part: Option<usize> = None;
    let mut io_error = None;
    // Opens the next part file: `base` itself for a batch of one object.
    let open_part = |open: &mut Vec<_>,
                     partition: Vec<String>,
                     error: bool,
                     arrival_ms: i64|
     -> io::Result<usize> {
        let n = open.len();
        let path = if n == 0 && !partitioned {
            base.to_path_buf()
        } else {
            base.with_extension(format!("{n}.part"))
        };
        open.push(Open {
            body: Body::new(
                Spill::new(Some(path), buffer, &allowance)?,
                stream_compression,
            ),
            partition,
            error,
            records: 0,
            oldest_arrival_ms: arrival_ms,
        });
        Ok(n)
    };
    store::scan(
        conn,
        selection.streams,
        selection.after,
        selection.until,
        |row| {
            let len = (row.payload.len() + delimiter.len()) as u64;
            if let Some(max) = selection.max_bytes {
                if staged.records > 0 && staged.bytes + len > max {
                    return ControlFlow::Break(());
                }
            }
            let target = if !partitioned {
                // One object: the first part, once open.
                match open.is_empty() {
                    false => Target::Open(0),
                    true => Target::New(Vec::new()),
                }
            } else {
                match partition_of(row.payload, &paths) {
                    Placement::Partition(p) => match by_partition.get(&p) {
                        Some(&i) => Target::Open(i),
                        None if by_partition.len() >= MAX_ACTIVE_PARTITIONS => Target::Error(
                            PARTITION_LIMIT,
                            format!("more than {MAX_ACTIVE_PARTITIONS} active partitions"),
                        ),
                        None => match prefix.evaluate(
                            chrono::DateTime::UNIX_EPOCH,
                            "xxxxxxxxxxx",
                            &p,
                            "",
                        ) {
                            Err(e) => Target::Error(METADATA_EXTRACTION_FAILED, e.to_string()),
                            Ok(_) => Target::New(p),
                        },
                    },
                    Placement::Error(code, message) => Target::Error(code, message),
                }
            };
            let result = (|| -> io::Result<()> {
                let (index, line) = match target {
                    Target::Open(i) => (i, None),
                    Target::New(p) => {
                        let n = open_part(&mut open, p.clone(), false, row.arrival_ms)?;
                        by_partition.insert(p, n);
                        (n, None)
                    }
                    Target::Error(code, message) => {
                        match staged.errors.iter_mut().find(|(c, _)| *c == code) {
                            Some((_, n)) => *n += 1,
                            None => staged.errors.push((code, 1)),
                        }
                        let index = match error_part {
                            Some(i) => i,
                            None => {
                                let n = open_part(&mut open, Vec::new(), true, row.arrival_ms)?;
                                error_part = Some(n);
                                n
                            }
                        };
                        let line = error_record(row.arrival_ms, code, &message, row.payload);
                        (index, Some(line))
                    }
                };
                let o = &mut open[index];
                match line {
                    Some(line) => o.body.write_all(&line)?,
                    None => {
                        o.body.write_all(row.payload)?;
                        o.body.write_all(delimiter)?;
                    }
                }
                o.records += 1;
                Ok(())
            })();
            if let Err(e) = result {
                io_error = Some(e);
                return ControlFlow::Break(());
            }
            if staged.records == 0 {
                staged.first_id = row.id;
                staged.oldest_arrival_ms = row.arrival_ms;
            }
            staged.last_id = row.id;
            staged.records += 1;
            staged.bytes += len;
            ControlFlow::Continue(())
        },
    )?;
    if let Some(e) = io_error {
        return Err(e.into());
    }
    let compress_later = staged.compress_parts != Compression::None;
    for o in open {
        staged.parts.push(Part {
            staging: o.body.finish(stage.sync && !compress_later)?,
            partition: o.partition,
            error: o.error,
            records: o.records,
            oldest_arrival_ms: o.oldest_arrival_ms,
        });
    }
    if staged.records == 0 {
        if !partitioned {
            let _ = std::fs::remove_file(base);
        }
        return Ok(None);
    }
    Ok(Some(staged))
}

/// Compresses a finished plain object: a file in place (through a sibling file and a rename;
/// with `sync`, fsynced), or in memory.
pub fn compress(staging: Staging, compression: Compression, sync: bool) -> io::Result<Staging> {
    let nothing = Cell::new(0);
    let unlimited = Cell::new(usize::MAX);
    match staging {
        Staging::File(path) => {
            let tmp = path.with_extension("z");
            {
                let mut input = io::BufReader::new(File::open(&path)?);
                let out = Spill::new(Some(tmp.clone()), 64 * 1024, &nothing)?;
                let mut body = Body::new(out, compression);
                io::copy(&mut input, &mut BodyWriter(&mut body))?;
                body.finish(sync)?;
            }
            std::fs::rename(&tmp, &path)?;
            Ok(Staging::File(path))
        }
        Staging::Memory(data) => {
            let mut body = Body::new(Spill::new(None, 0, &unlimited)?, compression);
            body.write_all(&data)?;
            body.finish(false)
        }
    }
}

struct BodyWriter<'a, 'b>(&'a mut Body<'b>);

impl Write for BodyWriter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_values_come_from_json_fields() {
        let names = vec!["device".to_string(), "loc.site".to_string()];
        let names = paths(&names);
        match partition_of(br#"{"device":"d1","loc":{"site":7}}"#, &names) {
            Placement::Partition(v) => assert_eq!(v, ["d1", "7"]),
            Placement::Error(_, m) => panic!("{m}"),
        }
        for bad in [
            &b"not json"[..],
            br#"{"device":"d1"}"#,
            br#"{"device":"a/b","loc":{"site":1}}"#,
            br#"{"device":{},"loc":{"site":1}}"#,
        ] {
            assert!(matches!(
                partition_of(bad, &names),
                Placement::Error(METADATA_EXTRACTION_FAILED, _)
            ));
        }
    }

    /// A buffer of `n` JSON records from three devices, in blocks of 10.
    fn buffer(n: i64) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn =
            store::open_writer(&dir.path().join("b.db"), crate::config::Synchronous::Full).unwrap();
        let mut seg = store::create_segment(&conn, 1, 1).unwrap();
        let mut w = crate::buffer::block::BlockWriter::new().unwrap();
        for id in 1..=n {
            let payload = format!(
                r#"{{"device":"d{}","n":{id},"pad":"{}"}}"#,
                id % 3,
                "x".repeat(40)
            );
            w.push(id, 0, id * 10, "", payload.as_bytes());
            seg.last_id = id;
            seg.records += 1;
            if id % 10 == 0 || id == n {
                let block = w.finish().unwrap().unwrap();
                store::insert_block(&conn, &store::insert_block_sql(&seg), &block).unwrap();
            }
        }
        store::update_segment(&conn, &seg).unwrap();
        (dir, conn)
    }

    fn bytes_of(s: &Staging) -> Vec<u8> {
        match s {
            Staging::File(p) => std::fs::read(p).unwrap(),
            Staging::Memory(b) => b.to_vec(),
        }
    }

    #[test]
    fn objects_stay_in_memory_while_the_allowance_lasts_then_spill_whole() {
        let (dir, conn) = buffer(300);
        let batching = BatchingConfig {
            size: 1 << 20,
            interval: std::time::Duration::from_secs(60),
            compression: Compression::Gzip,
            newline: true,
        };
        let prefix = PrefixTemplate::parse("d=!{partitionKeyFromQuery:device}/").unwrap();
        let all = Selection {
            streams: &[0],
            after: 0,
            until: None,
            max_bytes: None,
        };
        let run = |name: &str, memory: usize| {
            let base = dir.path().join(name).join("o.part");
            let stage = Stage {
                memory,
                sync: false,
            };
            let staged = assemble(&conn, all, &batching, &prefix, &base, stage)
                .unwrap()
                .unwrap();
            let files = std::fs::read_dir(base.parent().unwrap()).unwrap().count();
            (staged, files)
        };
        // Files only: the reference.
        let (files, n) = run("files", 0);
        assert_eq!(n, 3);
        assert!(files
            .parts
            .iter()
            .all(|p| matches!(p.staging, Staging::File(_))));
        // Everything fits: no file is written.
        let (memory, n) = run("memory", 1 << 20);
        assert_eq!(n, 0);
        assert!(memory
            .parts
            .iter()
            .all(|p| matches!(p.staging, Staging::Memory(_))));
        // Room for about one object: the others go to their files, each whole.
        let one = bytes_of(&files.parts[0].staging).len();
        let (mixed, n) = run("mixed", one + one / 2);
        let in_memory = mixed
            .parts
            .iter()
            .filter(|p| matches!(p.staging, Staging::Memory(_)))
            .count();
        assert_eq!((in_memory, n), (1, 2));
        for staged in [&memory, &mixed] {
            assert_eq!(staged.records, 300);
            for (a, b) in files.parts.iter().zip(&staged.parts) {
                assert_eq!(a.partition, b.partition);
                assert_eq!(a.records, b.records);
                assert_eq!(bytes_of(&a.staging), bytes_of(&b.staging));
                // Compressed later, in memory or in place (files: once), to the same bytes.
                let plain = bytes_of(&b.staging);
                let z = compress(b.staging.clone(), Compression::Gzip, false).unwrap();
                let mut back = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::GzDecoder::new(&bytes_of(&z)[..]),
                    &mut back,
                )
                .unwrap();
                assert_eq!(back, plain);
            }
        }
    }

    #[test]
    fn snappy_bodies_use_the_framing_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.part");
        let none = Cell::new(0);
        let out = Spill::new(Some(path.clone()), 1024, &none).unwrap();
        let mut body = Body::new(out, Compression::Snappy);
        body.write_all(b"{\"a\":1}\n").unwrap();
        body.write_all(b"{\"a\":2}\n").unwrap();
        body.finish(true).unwrap();
        let raw = std::fs::read(&path).unwrap();
        // The stream identifier chunk that starts every framed snappy stream.
        assert_eq!(&raw[..10], b"\xff\x06\x00\x00sNaPpY");
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut snap::read::FrameDecoder::new(&raw[..]), &mut out).unwrap();
        assert_eq!(out, b"{\"a\":1}\n{\"a\":2}\n");
    }

    #[test]
    fn error_records_have_firehose_shape() {
        let line = error_record(5, "Code", "msg", b"raw");
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["arrivalTimestamp"], 5);
        assert_eq!(v["errorCode"], "Code");
        assert_eq!(v["errorMessage"], "msg");
        assert_eq!(v["attemptsMade"], 1);
        assert_eq!(v["rawData"], "cmF3");
        assert!(v["attemptEndingTimestamp"].as_i64().unwrap() > 0);
        assert_eq!(line.last(), Some(&b'\n'));
    }
}
