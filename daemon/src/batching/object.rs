//! Assembling one batch: reads committed records from the buffer, in id order, into a staged
//! object file (newline-delimited, optionally gzip), and fsyncs it. Memory use does not depend on
//! the batch size: records stream from SQLite to the file.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use rusqlite::Connection;

use crate::buffer::store;
use crate::config::{BatchingConfig, Compression};

/// A batch written to its staging file, ready for the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub path: PathBuf,
    pub first_id: i64,
    pub last_id: i64,
    pub records: u64,
    /// Bytes before compression, delimiters included.
    pub bytes: u64,
    pub oldest_arrival_ms: i64,
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
    Gzip(GzEncoder<BufWriter<File>>),
}

impl Body {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Body::Plain(w) => w.write_all(data),
            Body::Gzip(w) => w.write_all(data),
        }
    }

    fn finish(self) -> io::Result<()> {
        let file = match self {
            Body::Plain(w) => w.into_inner().map_err(|e| e.into_error())?,
            Body::Gzip(w) => w.finish()?.into_inner().map_err(|e| e.into_error())?,
        };
        file.sync_all()
    }
}

/// Writes the selected records to `path`. Returns None (and leaves no file) when there are none.
pub fn assemble(
    conn: &Connection,
    selection: Selection<'_>,
    batching: &BatchingConfig,
    path: &Path,
) -> Result<Option<Staged>, AssembleError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = BufWriter::with_capacity(256 * 1024, File::create(path)?);
    let mut body = match batching.compression {
        Compression::None => Body::Plain(file),
        Compression::Gzip => Body::Gzip(GzEncoder::new(file, flate2::Compression::default())),
    };
    let delimiter: &[u8] = if batching.newline { b"\n" } else { b"" };
    let mut staged = Staged {
        path: path.to_path_buf(),
        first_id: 0,
        last_id: 0,
        records: 0,
        bytes: 0,
        oldest_arrival_ms: 0,
    };
    let mut io_error = None;
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
            if let Err(e) = body
                .write_all(row.payload)
                .and_then(|_| body.write_all(delimiter))
            {
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
    body.finish()?;
    if staged.records == 0 {
        std::fs::remove_file(path)?;
        return Ok(None);
    }
    Ok(Some(staged))
}
