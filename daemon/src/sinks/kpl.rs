//! The Kinesis Producer Library's aggregated record format (AWS-SEMANTICS 17): magic
//! `F3 89 9A C2`, a protobuf `AggregatedRecord`, then the MD5 of the protobuf bytes. The Kinesis
//! Client Library and Firehose de-aggregate it. Every sub-record must hash to the shard the outer
//! record lands in; [`super::kinesis`] groups records by shard to make sure.

use md5::{Digest, Md5};

pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// Magic and checksum around the protobuf body.
pub const OVERHEAD: usize = MAGIC.len() + 16;

#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<Record>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", required, tag = "3")]
    pub data: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Tag {
    #[prost(string, required, tag = "1")]
    pub key: String,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// Builds one aggregated record, tracking its encoded size as records are added.
#[derive(Debug, Default)]
pub struct Aggregator {
    record: AggregatedRecord,
    size: usize,
}

fn varint_len(v: u64) -> usize {
    prost::encoding::encoded_len_varint(v)
}

impl Aggregator {
    pub fn len(&self) -> usize {
        self.record.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.record.records.is_empty()
    }

    /// The size the aggregate would have with this record added, magic and checksum included.
    pub fn size_with(&self, key: &str, data: &[u8]) -> usize {
        let mut extra = 0;
        let index = self.key_index(key);
        if index.is_none() {
            extra += 1 + varint_len(key.len() as u64) + key.len();
        }
        let idx = index.unwrap_or(self.record.partition_key_table.len()) as u64;
        let inner = 1 + varint_len(idx) + 1 + varint_len(data.len() as u64) + data.len();
        extra += 1 + varint_len(inner as u64) + inner;
        OVERHEAD + self.size + extra
    }

    fn key_index(&self, key: &str) -> Option<usize> {
        // Recent keys are the likely ones; tables stay small (one per device in the aggregate).
        self.record
            .partition_key_table
            .iter()
            .rposition(|k| k == key)
    }

    pub fn add(&mut self, key: &str, data: &[u8]) {
        self.size = self.size_with(key, data) - OVERHEAD;
        let index = match self.key_index(key) {
            Some(i) => i,
            None => {
                self.record.partition_key_table.push(key.to_string());
                self.record.partition_key_table.len() - 1
            }
        };
        self.record.records.push(Record {
            partition_key_index: index as u64,
            explicit_hash_key_index: None,
            data: data.to_vec(),
            tags: Vec::new(),
        });
    }

    /// The partition key the outer record carries: the first sub-record's.
    pub fn first_key(&self) -> Option<&str> {
        self.record.partition_key_table.first().map(String::as_str)
    }

    /// What `encode().len()` is, computed without encoding (prost's exact length).
    pub fn encoded_len(&self) -> usize {
        use prost::Message;
        OVERHEAD + self.record.encoded_len()
    }

    pub fn encode(&self) -> Vec<u8> {
        use prost::Message;
        let body = self.record.encode_to_vec();
        let mut out = Vec::with_capacity(body.len() + OVERHEAD);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&body);
        out.extend_from_slice(&Md5::digest(&body));
        out
    }
}

/// Decodes an aggregated record (for tests and tools); None when `data` is not one.
pub fn decode(data: &[u8]) -> Option<AggregatedRecord> {
    use prost::Message;
    if data.len() < OVERHEAD || data[..4] != MAGIC {
        return None;
    }
    let (body, sum) = data[4..].split_at(data.len() - OVERHEAD);
    if Md5::digest(body).as_slice() != sum {
        return None;
    }
    AggregatedRecord::decode(body).ok()
}

/// The 128-bit hash Kinesis places a partition key by (AWS-SEMANTICS 12).
pub fn hash_key(key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(key.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_estimate_is_exact() {
        let mut a = Aggregator::default();
        for (k, d) in [("a", &b"x"[..]), ("bb", &[7u8; 300][..]), ("a", b"yz")] {
            let predicted = a.size_with(k, d);
            a.add(k, d);
            assert_eq!(a.encode().len(), predicted);
        }
    }

    #[test]
    fn round_trip_with_checksum() {
        let mut a = Aggregator::default();
        a.add("dev-1", b"{\"t\":1}");
        a.add("dev-2", b"{\"t\":2}");
        a.add("dev-1", b"{\"t\":3}");
        let bytes = a.encode();
        assert_eq!(bytes[..4], MAGIC);
        let r = decode(&bytes).unwrap();
        assert_eq!(r.partition_key_table, ["dev-1", "dev-2"]);
        let idx: Vec<u64> = r.records.iter().map(|r| r.partition_key_index).collect();
        assert_eq!(idx, [0, 1, 0]);
        assert_eq!(r.records[2].data, b"{\"t\":3}");
        let mut broken = bytes.clone();
        broken[6] ^= 1;
        assert!(decode(&broken).is_none());
    }

    #[test]
    fn md5_hash_key_matches_kinesis() {
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(hash_key("a"), 0x0cc175b9c0f1b6a831c399e269772661);
    }
}
