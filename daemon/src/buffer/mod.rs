//! The buffer: a SQLite file in WAL mode, the gateway's one durability point. Ingress sends
//! envelopes to the [`writer::Writer`], which group-commits them and only then completes their
//! acks; destinations read committed records through their own connections and report what
//! they delivered, and a segment of records is dropped once every destination has it.

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
    pub control: mpsc::Sender<Control>,
    pub committed: watch::Receiver<Committed>,
    pub writer: std::thread::JoinHandle<()>,
}

/// Opens the buffer file and starts its writer.
pub fn open(config: &Config) -> Result<Buffer, BufferError> {
    let path = config.buffer.path.clone();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let conn = store::open_writer(&path, config.buffer.synchronous)?;
    let names: Vec<String> = config.streams.iter().map(|s| s.name.clone()).collect();
    let stream_ids = store::stream_ids(&conn, &names)?;
    for name in store::unknown_streams(&conn, &stream_ids)? {
        warn!(
            stream = %name,
            "stream is no longer configured: records of it still buffered will not be delivered"
        );
    }
    let dest_names: Vec<String> = config.destinations.iter().map(|d| d.name.clone()).collect();
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
    let (committed_tx, committed) = watch::channel(Committed::default());
    let writer = Writer::new(
        conn,
        config.buffer.clone(),
        stream_ids.clone(),
        slots,
        committed_tx,
    )?;
    let (ingest, ingest_rx) = mpsc::channel(writer::INGEST_CHANNEL_CAPACITY);
    let (control, control_rx) = mpsc::channel(writer::CONTROL_CHANNEL_CAPACITY);
    let writer = writer.spawn(ingest_rx, control_rx)?;
    Ok(Buffer {
        path,
        stream_ids,
        destinations: states,
        ingest,
        control,
        committed,
        writer,
    })
}
