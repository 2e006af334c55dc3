//! Object delivery (`file`, `s3`): a batch is assembled from the buffer into staged objects
//! ([`super::assemble`]; in memory up to [`MEMORY_STAGING`] for `s3`, files otherwise), each
//! given its key ([`super::keys`]), and put to the sink, the batch's objects concurrently (at
//! most `put_concurrency` at once). An object that is in stays in: a retry puts only the
//! objects that failed, under the same keys.

use futures_util::stream::{self, StreamExt};

use super::assemble::{self, Selection, Stage};
use super::engine::{Attempt, Delivery, Extent, Plan, Report};
use super::journal::Reader;
use super::DeliveryError;
use crate::config::{BatchingConfig, Compression};
use crate::sinks::{ObjectSink, Staging};
use crate::templates::keys::{BatchId, KeyPattern};

pub struct ObjectDelivery {
    pub name: String,
    pub sink: ObjectSink,
    pub reader: Reader,
    /// Stream ids in the file.
    pub streams: Vec<i64>,
    pub batching: BatchingConfig,
    pub keys: KeyPattern,
    pub concurrency: usize,
}

/// Bytes of a batch's objects a remote sink's delivery keeps in memory rather than in staging
/// files (no file written and read back, no wear on an SD card for everyday batches); the rest
/// of a larger batch is staged in files, so memory does not grow with the buffering hints.
/// Room for a batch of the default size hint (5 MiB) whole, even when its partitions are held
/// plain until their puts.
pub const MEMORY_STAGING: usize = 8 << 20;

/// One staged object of a batch.
#[derive(Debug)]
struct Object {
    staging: Staging,
    key: String,
    records: u64,
    /// It is in the bucket.
    put: bool,
    /// It was (or may have been) put before: a retry, or a batch replayed after a restart.
    tried: bool,
    /// Still plain: compress with this before the put (dynamic partitions).
    compress: Compression,
}

pub struct ObjectBatch {
    extent: Extent,
    objects: Vec<Object>,
    errors: Vec<(&'static str, u64)>,
    /// Objects and records resent by earlier attempts of this batch.
    resent: (u64, u64),
}

impl Delivery for ObjectDelivery {
    type Batch = ObjectBatch;

    async fn prepare(&mut self, plan: Plan) -> Result<Option<ObjectBatch>, DeliveryError> {
        let path = self.sink.staging_path(&self.name);
        let streams = self.streams.clone();
        let mut batching = self.batching.clone();
        batching.size = plan.max_bytes;
        let prefix = self.keys.prefix.clone();
        // The `file` sink renames fsynced files into place; a remote one reads them back.
        let stage = match self.sink {
            ObjectSink::File(_) => Stage {
                memory: 0,
                sync: true,
            },
            #[cfg(feature = "aws")]
            ObjectSink::S3(_) => Stage {
                memory: MEMORY_STAGING,
                sync: false,
            },
        };
        let staged = self
            .reader
            .read(move |c| {
                assemble::assemble(
                    c,
                    Selection {
                        streams: &streams,
                        after: plan.after,
                        until: plan.until,
                        max_bytes: plan.until.is_none().then_some(plan.max_bytes),
                    },
                    &batching,
                    &prefix,
                    &path,
                    stage,
                )
            })
            .await?;
        let Some(staged) = staged else {
            return Ok(None);
        };
        let mut objects = Vec::with_capacity(staged.parts.len());
        for part in staged.parts {
            let batch = BatchId {
                destination: &self.name,
                version: plan.version,
                first_id: staged.first_id,
                last_id: staged.last_id,
                oldest_arrival_ms: part.oldest_arrival_ms,
            };
            let key = if part.error {
                self.keys
                    .error_key(batch)
                    .unwrap_or_else(|| self.keys.object_key(batch))?
            } else {
                self.keys.partition_key(batch, &part.partition)?
            };
            objects.push(Object {
                staging: part.staging,
                key,
                records: part.records,
                put: false,
                tried: plan.replay,
                compress: staged.compress_parts,
            });
        }
        Ok(Some(ObjectBatch {
            extent: Extent {
                last_id: staged.last_id,
                records: staged.records,
                bytes: staged.bytes,
            },
            objects,
            errors: staged.errors,
            resent: (0, 0),
        }))
    }

    fn extent(batch: &ObjectBatch) -> Extent {
        batch.extent
    }

    async fn attempt(&mut self, batch: &mut ObjectBatch) -> Result<Attempt, DeliveryError> {
        let sink = &self.sink;
        let todo: Vec<usize> = (0..batch.objects.len())
            .filter(|&i| !batch.objects[i].put)
            .collect();
        let objects = &batch.objects;
        let sync = matches!(sink, ObjectSink::File(_));
        // Each object is compressed (on the blocking pool) right before its put, so the
        // compression of one overlaps the puts of others.
        type Put = (usize, Option<Staging>, Result<(), DeliveryError>);
        let results: Vec<Put> = stream::iter(todo)
            .map(|i| async move {
                let o = &objects[i];
                let mut compressed = None;
                if o.compress != Compression::None {
                    let (staging, c) = (o.staging.clone(), o.compress);
                    let done =
                        tokio::task::spawn_blocking(move || assemble::compress(staging, c, sync))
                            .await
                            .map_err(std::io::Error::other)
                            .and_then(|r| r);
                    match done {
                        Ok(s) => compressed = Some(s),
                        Err(e) => return (i, None, Err(DeliveryError::Stage(e))),
                    }
                }
                let staging = compressed.as_ref().unwrap_or(&o.staging);
                let result = sink.put(staging, &o.key).await;
                if result.is_ok() {
                    crate::failpoint::hit("delivery.after-first-put");
                }
                (i, compressed, result.map_err(DeliveryError::from))
            })
            .buffer_unordered(self.concurrency.max(1))
            .collect()
            .await;
        let mut report = Report::default();
        let mut first_error = None;
        for (i, compressed, result) in results {
            let o = &mut batch.objects[i];
            if let Some(s) = compressed {
                o.staging = s;
                o.compress = Compression::None;
            }
            match result {
                Ok(()) => {
                    o.put = true;
                    if o.tried {
                        report.resent_objects += 1;
                        report.resent_records += o.records;
                    }
                    tracing::debug!(destination = %self.name, key = %o.key, records = o.records, "object delivered");
                }
                Err(e) => {
                    o.tried = true;
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            // What went in stays in; its resent counts go in the final report.
            batch.resent.0 += report.resent_objects;
            batch.resent.1 += report.resent_records;
            return Err(e);
        }
        report.objects = batch.objects.len() as u64;
        report.resent_objects += batch.resent.0;
        report.resent_records += batch.resent.1;
        report.errors = std::mem::take(&mut batch.errors);
        Ok(Attempt::Done(report))
    }

    async fn probe(&mut self) -> Result<(), DeliveryError> {
        Ok(self.sink.check().await?)
    }
}
