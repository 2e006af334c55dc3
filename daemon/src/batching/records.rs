//! Record delivery (Kinesis): a batch is read into memory (at most the size hint, one full
//! PutRecords request by default) and put one request at a time; each attempt sends what
//! Kinesis has not taken yet and reports whether it got anywhere, and the destination loop
//! decides when to resend. Records Kinesis can never take go to the destination's error output
//! (a local S3-layout directory, Firehose's error-record shape).

use std::ops::ControlFlow;
use std::path::PathBuf;

use tracing::{debug, warn};

use super::engine::{Attempt, Delivery, Extent, Plan, Report};
use super::journal::Reader;
use super::DeliveryError;
use crate::buffer::store;
use crate::metrics as m;
use crate::sinks::file::FileSink;
use crate::sinks::kinesis::{self, Delivered, KinesisSink, Rec};
use crate::sinks::Staging;
use crate::templates::keys::{BatchId, KeyPattern};

pub struct RecordDelivery {
    pub name: String,
    pub sink: KinesisSink,
    pub reader: Reader,
    pub streams: Vec<i64>,
    pub newline: bool,
    pub keys: KeyPattern,
    pub error_output_root: PathBuf,
}

pub struct RecordBatch {
    extent: Extent,
    version: i64,
    replay: bool,
    pending: Vec<Rec>,
    rejected: Vec<(Rec, &'static str, String)>,
    stats: Delivered,
}

impl Delivery for RecordDelivery {
    type Batch = RecordBatch;

    async fn prepare(&mut self, plan: Plan) -> Result<Option<RecordBatch>, DeliveryError> {
        let streams = self.streams.clone();
        let newline = u64::from(self.newline);
        let max = plan.max_bytes;
        let until = plan.until;
        let (records, bytes) = self
            .reader
            .read(move |c| {
                let mut out = Vec::new();
                let mut bytes = 0u64;
                store::scan(c, &streams, plan.after, until, |row| {
                    let len = row.payload.len() as u64 + newline;
                    if until.is_none() && !out.is_empty() && bytes + len > max {
                        return ControlFlow::Break(());
                    }
                    bytes += len;
                    out.push(Rec {
                        id: row.id,
                        arrival_ms: row.arrival_ms,
                        key: row.partition_key.to_string(),
                        data: row.payload.to_vec(),
                    });
                    ControlFlow::Continue(())
                })
                .map(|_| (out, bytes))
            })
            .await?;
        let Some(last_id) = records.last().map(|r| r.id) else {
            return Ok(None);
        };
        let n = records.len() as u64;
        let mut pending = Vec::with_capacity(records.len());
        let mut rejected = Vec::new();
        for rec in records {
            match kinesis::invalid(&rec) {
                Some((code, why)) => rejected.push((rec, code, why)),
                None => pending.push(rec),
            }
        }
        Ok(Some(RecordBatch {
            extent: Extent {
                last_id,
                records: n,
                bytes,
            },
            version: plan.version,
            replay: plan.replay,
            pending,
            rejected,
            stats: Delivered::default(),
        }))
    }

    fn extent(batch: &RecordBatch) -> Extent {
        batch.extent
    }

    async fn attempt(&mut self, batch: &mut RecordBatch) -> Result<Attempt, DeliveryError> {
        // Requests follow each other at once while every entry goes in; entries that fail
        // end the attempt, and the destination loop waits before resending them.
        let mut progressed = false;
        while !batch.pending.is_empty() {
            let round = self
                .sink
                .put_round(&mut batch.pending, &mut batch.stats, &self.name)
                .await;
            let round = match round {
                Ok(r) => r,
                // What went in stays in: report progress first, the error on the next attempt.
                Err(_) if progressed => {
                    return Ok(Attempt::Partial {
                        progressed,
                        throttled: false,
                    })
                }
                Err(e) => return Err(e.into()),
            };
            progressed |= round.progressed;
            if round.failed > 0 {
                return Ok(Attempt::Partial {
                    progressed,
                    throttled: round.throttled,
                });
            }
        }
        let mut report = Report {
            objects: 1,
            ..Report::default()
        };
        if !batch.rejected.is_empty() {
            self.write_errors(&batch.rejected, batch.version).await?;
            for (_, code, _) in &batch.rejected {
                match report.errors.iter_mut().find(|(c, _)| c == code) {
                    Some((_, n)) => *n += 1,
                    None => report.errors.push((code, 1)),
                }
            }
            batch.rejected.clear();
        }
        let s = &batch.stats;
        let name = self.name.clone();
        metrics::counter!(m::KINESIS_RECORDS, "destination" => name.clone())
            .increment(s.kinesis_records);
        metrics::counter!(m::KINESIS_REQUESTS, "destination" => name.clone()).increment(s.requests);
        metrics::counter!(m::KINESIS_PUT_UNITS, "destination" => name.clone())
            .increment(s.put_units);
        debug!(destination = %name, records = batch.extent.records, kinesis_records = s.kinesis_records, requests = s.requests, retried = s.retried_entries, "batch put");
        // A replayed batch may already be in the stream: Kinesis has no idempotent put.
        report.resent_records = s.duplicates
            + if batch.replay {
                batch.extent.records
            } else {
                0
            };
        Ok(Attempt::Done(report))
    }

    async fn probe(&mut self) -> Result<(), DeliveryError> {
        Ok(self.sink.check().await?)
    }
}

impl RecordDelivery {
    /// Writes records a Kinesis stream can never take to the error output, in Firehose's
    /// error-record shape, as one object put through the `file` sink.
    async fn write_errors(
        &self,
        rejected: &[(Rec, &'static str, String)],
        version: i64,
    ) -> Result<(), DeliveryError> {
        let sink = FileSink::new(&self.error_output_root, &self.name);
        let mut body = Vec::new();
        for (rec, code, why) in rejected {
            body.extend(super::assemble::error_record(
                rec.arrival_ms,
                code,
                why,
                &rec.data,
            ));
            warn!(destination = %self.name, id = rec.id, code, reason = %why, "record cannot go to Kinesis; written to the error output");
        }
        let first = &rejected[0].0;
        let key = self
            .keys
            .error_key(BatchId {
                destination: &self.name,
                version,
                first_id: first.id,
                last_id: rejected[rejected.len() - 1].0.id,
                oldest_arrival_ms: first.arrival_ms,
            })
            .unwrap_or_else(|| Ok(format!("processing-failed/{}", first.id)))?;
        sink.put(&Staging::Memory(body.into()), &key).await?;
        Ok(())
    }
}
