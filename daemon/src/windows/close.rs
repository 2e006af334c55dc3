//! A closed window's rows: one per group, made by the rule from the group's key values and
//! accumulators, stamped with the window's end, a piece of the window's groups at a time, their
//! payloads end to end in one buffer that the piece's records share (rather than a vector each
//! with room to spare).

use std::ops::Range;

use bytes::Bytes;
use tracing::warn;

use super::groups::Groups;
use crate::message::NewRecord;
use crate::rules::value::Value;
use crate::rules::{Applied, Rule};

/// What closing a window needs besides its groups.
pub struct Closing<'a> {
    pub rule: &'a Rule,
    /// The windowed stream's name (logs).
    pub label: &'a str,
    /// The windowed stream, which the rows go to.
    pub stream: usize,
    pub window_ms: i64,
    /// Windows starting before this may lack rows `drop_oldest` removed.
    pub incomplete_before: i64,
    pub incomplete: &'a metrics::Counter,
}

impl Closing<'_> {
    /// The rows of `groups` (a range of the window's group numbers, in first-seen order) of the
    /// window starting at `start`; the payload buffer starts `payload_bytes` big (the last
    /// piece's size).
    pub fn rows(
        &self,
        start: i64,
        window: &Groups,
        groups: Range<usize>,
        payload_bytes: usize,
    ) -> Vec<NewRecord> {
        let mut records = Vec::with_capacity(groups.len());
        let mut payloads = Vec::with_capacity(payload_bytes);
        let mut ends = Vec::with_capacity(groups.len());
        let dropped = start < self.incomplete_before;
        for (key, partition_key, accs) in window.range(groups) {
            if dropped {
                self.incomplete.increment(1);
            }
            // The key's values, from the JSON they were grouped by.
            let keys = match Value::parse(key) {
                Ok(Value::Array(keys)) => keys,
                _ => {
                    warn!(stream = %self.label, window_start_ms = start, "a group's key could not be read back");
                    continue;
                }
            };
            match self.rule.close(&keys, accs, start, dropped) {
                Applied::Selected(Some(payload)) => {
                    payloads.extend_from_slice(&payload);
                    ends.push(payloads.len());
                    records.push(NewRecord {
                        stream: self.stream,
                        arrival_ms: start + self.window_ms,
                        partition_key: partition_key.to_string(),
                        payload: Bytes::new(),
                    });
                }
                Applied::Selected(None) | Applied::Dropped => {}
                Applied::Failed(e) => {
                    warn!(stream = %self.label, window_start_ms = start, error = %e, "a closed window's row could not be made");
                }
            }
        }
        let payloads = Bytes::from(payloads);
        let mut from = 0;
        for (record, end) in records.iter_mut().zip(ends) {
            record.payload = payloads.slice(from..end);
            from = end;
        }
        records
    }
}
