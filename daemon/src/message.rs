//! What ingress hands the buffer: one [`Envelope`] per MQTT message, carrying the routed records
//! and an [`Ack`] that the buffer completes only after the commit that holds them.

use std::fmt;

use crate::routing::Reject;

/// One row-to-be of the buffer: a message as routed to one stream. The topic and the client id
/// have done their work by now (routing, the partition key) and are not stored: no destination
/// reads them, and every stored byte is written twice on an SD card (WAL and checkpoint).
#[derive(Debug, Clone)]
pub struct NewRecord {
    pub stream: usize,
    pub arrival_ms: i64,
    pub partition_key: String,
    /// Shares the connection's read buffer where the codec allowed it (no copy per message).
    pub payload: bytes::Bytes,
}

impl NewRecord {
    /// Bytes this record counts against `buffer.max_size` before SQLite counts its pages: its
    /// data uncompressed plus a fixed per-record cost (an overestimate: blocks are compressed).
    pub fn accounted_bytes(&self) -> u64 {
        accounted_bytes(self.payload.len(), self.partition_key.len())
    }
}

/// Per-record overhead (framing, the block's share of its row), for estimating a transaction's
/// size against the buffer bound before SQLite reports its pages.
pub const ROW_OVERHEAD: u64 = 32;

pub fn accounted_bytes(payload: usize, text: usize) -> u64 {
    (payload + text) as u64 + ROW_OVERHEAD
}

/// How a message ended: committed to SQLite, or refused (and why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Rejected(Reject),
}

type AckFn = Box<dyn FnOnce(Outcome) + Send>;

/// Completes a message's acknowledgement. The buffer calls it once the commit holding the
/// message returned (or once it refused the message), in the order messages arrived. Dropping
/// an `Ack` without completing it acknowledges nothing: an MQTT broker will then redeliver.
#[derive(Default)]
pub struct Ack(Option<AckFn>);

impl Ack {
    /// An ack nobody waits for (QoS 0, or a broker that already sent its PUBACK).
    pub fn none() -> Self {
        Self(None)
    }

    pub fn new(f: impl FnOnce(Outcome) + Send + 'static) -> Self {
        Self(Some(Box::new(f)))
    }

    pub fn complete(self, outcome: Outcome) {
        if let Some(f) = self.0 {
            f(outcome)
        }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Ack(pending)"
        } else {
            "Ack(none)"
        })
    }
}

/// One MQTT message on its way into the buffer. `records` is empty when ingress refused the
/// message; it still travels through the buffer so that acknowledgements keep arrival order.
#[derive(Debug)]
pub struct Envelope {
    pub records: Result<Vec<NewRecord>, Reject>,
    pub ack: Ack,
    /// From the window stage: its position and emitted windows, committed in the same
    /// transaction as the records (the closed windows' rows), so that a window is emitted
    /// exactly once whatever crashes. Boxed: a device's envelope waiting in its connection's
    /// task or the ingest channel carries one pointer for it, not the whole progress.
    pub window: Option<Box<WindowCommit>>,
}

/// An envelope's size: every connection's task may hold one while the ingest channel is full,
/// and the channel holds up to its capacity of them; 10,000 devices notice each extra word.
pub const ENVELOPE_SIZE: usize = std::mem::size_of::<Envelope>();
const _: () = assert!(ENVELOPE_SIZE <= 48, "keep device envelopes small");

impl Envelope {
    pub fn new(records: Result<Vec<NewRecord>, Reject>, ack: Ack) -> Self {
        Self {
            records,
            ack,
            window: None,
        }
    }
}

/// A window stage's progress: its buffer position (every input row up to `position` is in an
/// emitted window or none) and the end of the last window it emitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowCommit {
    /// The stage's slot among the writer's positions (after the destinations').
    pub slot: usize,
    pub position: i64,
    pub emitted_through_ms: i64,
    /// How far into the window being emitted this commit got; `None` once it is whole.
    pub emitting: Option<Emitting>,
}

/// A closed window emitted in pieces (a bounded number of rows per transaction, so that closing
/// the windows of a large fleet holds neither its rows nor the writer at once). After a crash
/// the stage rebuilds the window from the same input rows (ids up to `upto_id`), whose groups
/// come in the same first-seen order, and carries on after `groups_done`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Emitting {
    /// The window's start.
    pub start_ms: i64,
    /// The last input row id read when it closed: later rows of the window are late.
    pub upto_id: i64,
    /// Its groups emitted so far, in first-seen order.
    pub groups_done: u64,
}

impl Emitting {
    /// Whether an input row (its window's start, its id) comes too late for this emission: a
    /// row of this window committed after it closed, or of an earlier one (every window before
    /// this one was emitted before it closed).
    pub fn is_past(&self, window_start_ms: i64, id: i64) -> bool {
        window_start_ms < self.start_ms || (window_start_ms == self.start_ms && id > self.upto_id)
    }
}
