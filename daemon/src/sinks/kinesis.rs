//! The `kinesis` sink: PutRecords to a Kinesis data stream within every limit (AWS-SEMANTICS
//! 11-17): at most 500 entries and 5 MiB per request, 1 MiB per record with its key.
//!
//! A batch is delivered whole before the destination moves on, one request at a time
//! ([`KinesisSink::put_round`]). After a partial failure only the failed entries are sent again;
//! the destination loop waits before each resend (longer while nothing gets through).
//! With `ordering = "per_key"` (the default) a request carries at most one entry per partition
//! key — per shard when aggregating — so a failed entry can never be overtaken by a later
//! record of its key, and each device's records keep their order in the stream.
//!
//! With aggregation, records are packed into KPL aggregates ([`super::kpl`]) grouped by the shard
//! their key hashes to (from ListShards), so every sub-record lands in its aggregate's shard. If
//! Kinesis reports a different shard (the stream was resharded), the map is reloaded and the
//! aggregate's records are sent again, regrouped: a consumer may see some twice, never miss one.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use aws_sdk_kinesis::Client;
use tracing::{debug, info, warn};

use super::aws::{describe, endpoint_label, sdk_config, sink_error};
use super::kpl::{self, Aggregator};
use crate::config::{KinesisConfig, Ordering, KINESIS_MAX_RECORD};
use crate::metrics as m;

/// PutRecords limits (AWS-SEMANTICS 11).
pub const MAX_ENTRIES: usize = 500;
pub const MAX_REQUEST_BYTES: usize = 5 * 1024 * 1024;
pub const MAX_KEY_CHARS: usize = 256;
/// Kinesis bills provisioned PUTs in 25 KB payload units (AWS-SEMANTICS 16).
pub const PUT_UNIT: usize = 25 * 1024;

/// One buffered record on its way to Kinesis.
#[derive(Debug, Clone)]
pub struct Rec {
    pub id: i64,
    pub arrival_ms: i64,
    pub key: String,
    pub data: Vec<u8>,
}

/// What one PutRecords round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Kinesis took some of the entries.
    pub progressed: bool,
    /// Some entries failed for lack of throughput.
    pub throttled: bool,
    /// Entries that failed (they stay pending).
    pub failed: u64,
}

/// What delivering a batch took.
#[derive(Debug, Default)]
pub struct Delivered {
    pub kinesis_records: u64,
    pub requests: u64,
    pub put_units: u64,
    /// Entries sent again after a partial failure.
    pub retried_entries: u64,
    /// Records sent a second time although Kinesis took them once (a stale shard map).
    pub duplicates: u64,
}

/// Why a record can never be put.
pub fn invalid(rec: &Rec) -> Option<(&'static str, String)> {
    let chars = rec.key.chars().count();
    if chars == 0 || chars > MAX_KEY_CHARS {
        return Some((
            "Kinesis.InvalidPartitionKey",
            format!("partition key is {chars} characters; Kinesis takes 1-256"),
        ));
    }
    let size = rec.data.len() + rec.key.len();
    if size as u64 > KINESIS_MAX_RECORD {
        return Some((
            "Kinesis.RecordTooLarge",
            format!("record is {size} bytes with its partition key; Kinesis takes at most 1 MiB"),
        ));
    }
    None
}

/// Open shards' hash-key ranges, sorted.
#[derive(Debug, Clone)]
struct ShardMap {
    ranges: Vec<(u128, u128, String)>,
}

impl ShardMap {
    fn shard_of(&self, key: &str) -> Option<usize> {
        let h = kpl::hash_key(key);
        self.ranges
            .iter()
            .position(|(lo, hi, _)| *lo <= h && h <= *hi)
    }
}

pub struct KinesisSink {
    client: Client,
    config: KinesisConfig,
    shards: Mutex<Option<ShardMap>>,
    endpoint: String,
}

/// One PutRecords entry being built.
struct Entry {
    /// Indexes into the pending records.
    members: Vec<usize>,
    key: String,
    agg: Option<Aggregator>,
    expected_shard: Option<String>,
    bytes: usize,
}

impl KinesisSink {
    pub async fn new(config: &KinesisConfig) -> Self {
        let sdk = sdk_config(&config.aws).await;
        let mut builder = aws_sdk_kinesis::config::Builder::from(&sdk);
        if let Some(e) = &config.aws.endpoint {
            builder = builder.endpoint_url(e);
        }
        let endpoint = endpoint_label(&config.aws, "AWS_ENDPOINT_URL_KINESIS", &sdk);
        Self {
            client: Client::from_conf(builder.build()),
            config: config.clone(),
            shards: Mutex::new(None),
            endpoint,
        }
    }

    pub fn describe(&self) -> String {
        format!("kinesis://{} ({})", self.config.stream, self.endpoint)
    }

    /// Whether the stream exists and is reachable; loads the shard map when aggregating.
    pub async fn check(&self) -> Result<(), super::SinkError> {
        let map = self.load_shards().await?;
        info!(stream = %self.config.stream, shards = map.ranges.len(), "Kinesis stream reachable");
        *self.shards.lock().unwrap_or_else(|p| p.into_inner()) = Some(map);
        Ok(())
    }

    async fn load_shards(&self) -> Result<ShardMap, super::SinkError> {
        let mut ranges = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let req = match &token {
                Some(t) => self.client.list_shards().next_token(t),
                None => self.client.list_shards().stream_name(&self.config.stream),
            };
            let out = req.send().await.map_err(|e| {
                let mut message = describe("ListShards", &e);
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception())
                {
                    message = format!("stream {:?} does not exist ({message})", self.config.stream);
                }
                super::SinkError::Remote(message)
            })?;
            for shard in out.shards() {
                let open = shard
                    .sequence_number_range()
                    .is_some_and(|r| r.ending_sequence_number().is_none());
                let Some(range) = shard.hash_key_range() else {
                    continue;
                };
                let (Ok(lo), Ok(hi)) = (
                    range.starting_hash_key().parse::<u128>(),
                    range.ending_hash_key().parse::<u128>(),
                ) else {
                    continue;
                };
                if open {
                    ranges.push((lo, hi, shard.shard_id().to_string()));
                }
            }
            token = out.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        ranges.sort();
        Ok(ShardMap { ranges })
    }

    fn shard_map(&self) -> Option<ShardMap> {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends one PutRecords request built from the front of `pending` (in order, within the
    /// limits and the ordering rule) and removes from `pending` what Kinesis took. A request
    /// that fails whole is an error; entries that fail are left in `pending` for the caller to
    /// send again after a wait (the destination loop decides how long).
    pub async fn put_round(
        &self,
        pending: &mut Vec<Rec>,
        stats: &mut Delivered,
        destination: &str,
    ) -> Result<Round, super::SinkError> {
        if self.config.aggregation && self.shard_map().is_none() {
            // Without the shard map aggregates group by partition key, which is always safe.
            if let Ok(map) = self.load_shards().await {
                *self.shards.lock().unwrap_or_else(|p| p.into_inner()) = Some(map);
            }
        }
        let map = if self.config.aggregation {
            self.shard_map()
        } else {
            None
        };
        let entries = self.build_request(pending, map.as_ref());
        let request: Vec<PutRecordsRequestEntry> = entries
            .iter()
            .filter_map(|e| {
                let data = match &e.agg {
                    Some(a) => a.encode(),
                    None => pending[e.members[0]].data.clone(),
                };
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(data))
                    .partition_key(&e.key)
                    .build()
                    .ok()
            })
            .collect();
        stats.requests += 1;
        let response = self
            .client
            .put_records()
            .stream_name(&self.config.stream)
            .set_records(Some(request))
            .send()
            .await
            .map_err(|e| sink_error("PutRecords", &e))?;
        let mut done: HashSet<usize> = HashSet::new();
        let mut throttled = false;
        let mut failed = 0u64;
        let mut stale = false;
        for (entry, result) in entries.iter().zip(response.records()) {
            if let Some(code) = result.error_code() {
                failed += 1;
                throttled |= code == "ProvisionedThroughputExceededException";
                debug!(destination, code, message = ?result.error_message(), "entry failed");
                continue;
            }
            if let (Some(expected), Some(got)) = (&entry.expected_shard, result.shard_id()) {
                if expected != got {
                    // Kinesis put the aggregate elsewhere: the shard map is stale, and a
                    // consumer would drop the sub-records that do not belong there.
                    stale = true;
                    stats.duplicates += entry.members.len() as u64;
                    continue;
                }
            }
            stats.kinesis_records += 1;
            stats.put_units += entry.bytes.div_ceil(PUT_UNIT) as u64;
            done.extend(entry.members.iter().copied());
        }
        // Entries the response did not account for (it should list all) count as failed.
        failed += entries.len().saturating_sub(response.records().len()) as u64;
        stats.retried_entries += failed;
        if failed > 0 {
            metrics::counter!(m::KINESIS_FAILED_ENTRIES, "destination" => destination.to_string())
                .increment(failed);
        }
        if stale {
            warn!(destination, "Kinesis placed an aggregate on another shard; reloading the shard map and resending its records");
            match self.load_shards().await {
                Ok(map) => *self.shards.lock().unwrap_or_else(|p| p.into_inner()) = Some(map),
                Err(e) => {
                    warn!(destination, error = %e, "cannot reload the shard map; aggregating by partition key");
                    *self.shards.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
            }
        }
        let mut i = 0;
        pending.retain(|_| {
            let keep = !done.contains(&i);
            i += 1;
            keep
        });
        Ok(Round {
            progressed: !done.is_empty(),
            throttled,
            failed,
        })
    }

    /// Chooses the next request's entries from the pending records, in order, within the
    /// PutRecords limits and the ordering rule.
    fn build_request(&self, pending: &[Rec], map: Option<&ShardMap>) -> Vec<Entry> {
        let per_key = self.config.ordering == Ordering::PerKey;
        let aggregate = self.config.aggregation;
        let mut entries: Vec<Entry> = Vec::new();
        // The open entry of each group (a partition key; a shard when aggregating by map).
        let mut open: HashMap<Group<'_>, usize> = HashMap::new();
        let mut blocked: HashSet<Group<'_>> = HashSet::new();
        let mut total = 0usize;
        for (i, rec) in pending.iter().enumerate() {
            let shard = map.and_then(|m| m.shard_of(&rec.key));
            let group = match (aggregate, shard) {
                (true, Some(s)) => Group::Shard(s),
                _ => Group::Key(&rec.key),
            };
            if blocked.contains(&group) {
                continue;
            }
            if aggregate {
                if let Some(&e) = open.get(&group) {
                    let entry = &mut entries[e];
                    let agg = entry.agg.as_mut().expect("aggregate entry");
                    let size = agg.size_with(&rec.key, &rec.data);
                    let grows = size - entry.bytes;
                    if size <= self.config.aggregate_size as usize
                        && total + grows <= MAX_REQUEST_BYTES
                    {
                        agg.add(&rec.key, &rec.data);
                        entry.bytes = size;
                        entry.members.push(i);
                        total += grows;
                        continue;
                    }
                    // Full: in per-key order the group waits for the next request.
                    open.remove(&group);
                    if per_key {
                        blocked.insert(group);
                        continue;
                    }
                }
            } else if per_key && open.contains_key(&group) {
                // One entry per key per request.
                blocked.insert(group);
                continue;
            }
            if entries.len() == MAX_ENTRIES {
                if per_key {
                    blocked.insert(group);
                    continue;
                }
                break;
            }
            let (agg, bytes) = if aggregate {
                let mut a = Aggregator::default();
                let size = a.size_with(&rec.key, &rec.data);
                a.add(&rec.key, &rec.data);
                (Some(a), size + rec.key.len())
            } else {
                (None, rec.data.len() + rec.key.len())
            };
            if total + bytes > MAX_REQUEST_BYTES || bytes as u64 > KINESIS_MAX_RECORD {
                if per_key && !entries.is_empty() {
                    blocked.insert(group);
                    continue;
                }
                if !entries.is_empty() {
                    break;
                }
                if bytes as u64 > KINESIS_MAX_RECORD {
                    // A lone record whose aggregate framing pushes it over: send it plain.
                    entries.push(Entry {
                        members: vec![i],
                        key: rec.key.clone(),
                        agg: None,
                        expected_shard: None,
                        bytes: rec.data.len() + rec.key.len(),
                    });
                    break;
                }
            }
            total += bytes;
            open.insert(group, entries.len());
            entries.push(Entry {
                members: vec![i],
                key: rec.key.clone(),
                agg,
                expected_shard: if aggregate {
                    shard.and_then(|s| map.map(|m| m.ranges[s].2.clone()))
                } else {
                    None
                },
                bytes,
            });
        }
        entries
    }
}

/// What a request holds at most one entry of, in per-key order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Group<'a> {
    Key(&'a str),
    Shard(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: i64, key: &str, len: usize) -> Rec {
        Rec {
            id,
            arrival_ms: 0,
            key: key.into(),
            data: vec![b'x'; len],
        }
    }

    async fn sink(aggregation: bool, ordering: Ordering) -> KinesisSink {
        KinesisSink::new(&KinesisConfig {
            stream: "s".into(),
            aws: crate::config::AwsConfig {
                region: Some("us-east-1".into()),
                endpoint: Some("http://127.0.0.1:9".into()),
            },
            aggregation,
            aggregate_size: 50 * 1024,
            ordering,
            error_output_root: "errors".into(),
        })
        .await
    }

    #[tokio::test]
    async fn requests_respect_the_limits() {
        let s = sink(false, Ordering::None).await;
        let pending: Vec<Rec> = (0..1200).map(|i| rec(i, &format!("k{i}"), 100)).collect();
        let entries = s.build_request(&pending, None);
        assert_eq!(entries.len(), MAX_ENTRIES);
        let big: Vec<Rec> = (0..20).map(|i| rec(i, "k", 1024 * 1024 - 1)).collect();
        let entries = s.build_request(&big, None);
        assert_eq!(entries.len(), 5, "5 MiB per request");
        let total: usize = entries.iter().map(|e| e.bytes).sum();
        assert!(total <= MAX_REQUEST_BYTES);
    }

    #[tokio::test]
    async fn per_key_order_sends_one_entry_per_key() {
        let s = sink(false, Ordering::PerKey).await;
        let pending = vec![
            rec(1, "a", 10),
            rec(2, "a", 10),
            rec(3, "b", 10),
            rec(4, "a", 10),
        ];
        let entries = s.build_request(&pending, None);
        let members: Vec<usize> = entries.iter().map(|e| e.members[0]).collect();
        assert_eq!(members, [0, 2]);
    }

    #[tokio::test]
    async fn aggregates_group_by_shard_and_keep_order() {
        let s = sink(true, Ordering::PerKey).await;
        let half = u128::MAX / 2;
        let map = ShardMap {
            ranges: vec![(0, half, "s0".into()), (half + 1, u128::MAX, "s1".into())],
        };
        let pending: Vec<Rec> = (0..300)
            .map(|i| rec(i, &format!("dev-{}", i % 30), 200))
            .collect();
        let entries = s.build_request(&pending, Some(&map));
        assert!(entries.len() <= 2, "one aggregate per shard");
        for e in &entries {
            let agg = e.agg.as_ref().unwrap();
            let shard = map.shard_of(&e.key).unwrap();
            for &m in &e.members {
                assert_eq!(map.shard_of(&pending[m].key), Some(shard));
            }
            assert!(agg.encode().len() <= 50 * 1024);
            assert!(e.members.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(
                e.expected_shard.as_deref(),
                Some(map.ranges[shard].2.as_str())
            );
        }
    }

    #[test]
    fn invalid_records_are_named() {
        assert!(invalid(&rec(1, "", 1)).is_some());
        assert!(invalid(&rec(1, &"k".repeat(257), 1)).is_some());
        assert!(invalid(&rec(1, "k", 1024 * 1024)).is_some());
        assert!(invalid(&rec(1, "k", 1024 * 1024 - 1)).is_none());
    }
}
