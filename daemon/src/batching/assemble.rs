//! Assembling one batch: reads committed records from the buffer, in id order, into staged
//! object files (newline-delimited, optionally compressed), and fsyncs them. Memory use does not
//! depend on the batch size: records stream from SQLite to the files.
//!
//! With dynamic partitioning (`!{partitionKeyFromQuery:NAME}` in the prefix) one batch becomes
//! one object per partition, plus an error object for records whose partition cannot be found
//! (not JSON, field missing, more than [`MAX_ACTIVE_PARTITIONS`]) in Firehose's error-record
//! shape (AWS-SEMANTICS 5, 8).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use base64::Engine;
use flate2::write::GzEncoder;
use rusqlite::Connection;

use crate::buffer::store;
use crate::config::{BatchingConfig, Compression};
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
    pub path: PathBuf,
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

enum Body {
    Plain(BufWriter<File>),
    // Boxed: both encoders carry their state inline.
    Gzip(Box<GzEncoder<BufWriter<File>>>),
    Snappy(Box<snap::write::FrameEncoder<BufWriter<File>>>),
}

impl Body {
    fn new(path: &Path, compression: Compression, buffer: usize) -> io::Result<Self> {
        let file = BufWriter::with_capacity(buffer, File::create(path)?);
        Ok(match compression {
            Compression::None => Body::Plain(file),
            Compression::Gzip => Body::Gzip(Box::new(GzEncoder::new(
                file,
                flate2::Compression::default(),
            ))),
            Compression::Snappy => Body::Snappy(Box::new(snap::write::FrameEncoder::new(file))),
        })
    }

    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Body::Plain(w) => w.write_all(data),
            Body::Gzip(w) => w.write_all(data),
            Body::Snappy(w) => w.write_all(data),
        }
    }

    /// Flushes the body; with `sync`, to the disk too.
    fn finish(self, sync: bool) -> io::Result<()> {
        let file = match self {
            Body::Plain(w) => w.into_inner().map_err(|e| e.into_error())?,
            Body::Gzip(w) => w.finish()?.into_inner().map_err(|e| e.into_error())?,
            Body::Snappy(w) => w
                .into_inner()
                .map_err(|e| io::Error::other(e.to_string()))?
                .into_inner()
                .map_err(|e| e.into_error())?,
        };
        if sync {
            file.sync_all()?;
        }
        Ok(())
    }
}

/// A part being written.
struct Open {
    part: Part,
    body: Body,
}

/// Where a record goes: a partition, or the error object with a code and message.
enum Placement {
    Partition(Vec<String>),
    Error(&'static str, String),
}

/// Reads the partition values of one record: each name is a (dotted) JSON field whose value is
/// a string, number or boolean.
fn partition_of(payload: &[u8], names: &[String]) -> Placement {
    let mut values = Vec::with_capacity(names.len());
    for name in names {
        let text = match json_field::find(payload, name) {
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

/// Writes the selected records to files named after `base` (`base` itself without dynamic
/// partitioning). Returns None (and leaves no file) when there are none. With `sync` the files
/// are fsynced (the `file` sink renames them into place); without, they are only a staging
/// copy of what the buffer holds (the `s3` sink uploads them; a crash rebuilds them).
pub fn assemble(
    conn: &Connection,
    selection: Selection<'_>,
    batching: &BatchingConfig,
    prefix: &PrefixTemplate,
    base: &Path,
    sync: bool,
) -> Result<Option<Staged>, AssembleError> {
    let partition_names = prefix.partition_names();
    if let Some(dir) = base.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let partitioned = !partition_names.is_empty();
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
    let mut by_partition: HashMap<Vec<String>, usize> = HashMap::new();
    let mut error_part: Option<usize> = None;
    let mut io_error = None;
    // Opens the next part file: `base` itself for a batch of one object.
    let open_part = |open: &mut Vec<Open>,
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
            body: Body::new(&path, stream_compression, buffer)?,
            part: Part {
                path,
                partition,
                error,
                records: 0,
                oldest_arrival_ms: arrival_ms,
            },
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
            let placement = if partitioned {
                match partition_of(row.payload, partition_names) {
                    Placement::Partition(p) if !by_partition.contains_key(&p) => {
                        if by_partition.len() >= MAX_ACTIVE_PARTITIONS {
                            Placement::Error(
                                PARTITION_LIMIT,
                                format!("more than {MAX_ACTIVE_PARTITIONS} active partitions"),
                            )
                        } else if let Err(e) =
                            prefix.evaluate(chrono::DateTime::UNIX_EPOCH, "xxxxxxxxxxx", &p, "")
                        {
                            Placement::Error(METADATA_EXTRACTION_FAILED, e.to_string())
                        } else {
                            Placement::Partition(p)
                        }
                    }
                    p => p,
                }
            } else {
                Placement::Partition(Vec::new())
            };
            let result = (|| -> io::Result<()> {
                let (index, line) = match placement {
                    Placement::Partition(p) => {
                        let index = match by_partition.get(&p) {
                            Some(&i) => i,
                            None => {
                                let n = open_part(&mut open, p.clone(), false, row.arrival_ms)?;
                                by_partition.insert(p, n);
                                n
                            }
                        };
                        (index, None)
                    }
                    Placement::Error(code, message) => {
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
                o.part.records += 1;
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
        o.body.finish(sync && !compress_later)?;
        staged.parts.push(o.part);
    }
    if staged.records == 0 {
        if !partitioned {
            let _ = std::fs::remove_file(base);
        }
        return Ok(None);
    }
    Ok(Some(staged))
}

/// Compresses a finished plain file in place (through a sibling file and a rename); with
/// `sync`, fsyncs the result.
pub fn compress(path: &Path, compression: Compression, sync: bool) -> io::Result<()> {
    let tmp = path.with_extension("z");
    {
        let mut input = io::BufReader::new(File::open(path)?);
        let mut body = Body::new(&tmp, compression, 64 * 1024)?;
        let mut w = BodyWriter(&mut body);
        io::copy(&mut input, &mut w)?;
        body.finish(sync)?;
    }
    std::fs::rename(&tmp, path)
}

struct BodyWriter<'a>(&'a mut Body);

impl Write for BodyWriter<'_> {
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

    #[test]
    fn snappy_bodies_use_the_framing_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.part");
        let mut body = Body::new(&path, Compression::Snappy, 1024).unwrap();
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
