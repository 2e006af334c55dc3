//! Blocks: how a segment stores records. One row of a segment table holds a run of records with
//! consecutive ids, encoded together and compressed with zstd.
//!
//! Why: on an SD card every stored byte is written at least twice (WAL, then checkpoint), and
//! every commit rewrites whole pages. Telemetry from one fleet repeats itself (the same JSON
//! keys in every message), so a group commit's records compress several times over; and one
//! row per commit instead of one per record is also less work for SQLite.
//!
//! A record in a block's raw form, in id order (the first has the row's `first_id`):
//! `varint stream | zigzag varint arrival_ms - previous | varint key length | key |
//! varint payload length | payload`.

use std::io;
use std::ops::ControlFlow;

/// How a block's body is stored (the row's `codec` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// The raw form as is (what did not get smaller compressed).
    Stored = 0,
    Zstd = 1,
}

/// zstd's fastest regular level: telemetry already shrinks several times over, and the buffer
/// writer's thread is the gateway's busiest.
const LEVEL: i32 = 1;

/// Accumulates records into one block and compresses it.
pub struct BlockWriter {
    raw: Vec<u8>,
    first_id: i64,
    last_id: i64,
    prev_arrival: i64,
    compressor: zstd::bulk::Compressor<'static>,
    compressed: Vec<u8>,
}

/// A finished block, borrowed from its writer until the next record.
pub struct Block<'a> {
    pub first_id: i64,
    pub last_id: i64,
    pub codec: Codec,
    pub body: &'a [u8],
}

impl BlockWriter {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            raw: Vec::new(),
            first_id: 0,
            last_id: 0,
            prev_arrival: 0,
            compressor: {
                let mut c = zstd::bulk::Compressor::new(LEVEL)?;
                // 4 bytes per block: a flipped bit on the card is detected, not decoded.
                c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
                c
            },
            compressed: Vec::new(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Bytes of the raw form so far.
    pub fn raw_len(&self) -> usize {
        self.raw.len()
    }

    /// Appends the record with id `id`, which must follow the previous one.
    pub fn push(&mut self, id: i64, stream: i64, arrival_ms: i64, key: &str, payload: &[u8]) {
        if self.raw.is_empty() {
            self.first_id = id;
            self.prev_arrival = 0;
        } else {
            debug_assert_eq!(id, self.last_id + 1, "ids in a block are consecutive");
        }
        self.last_id = id;
        put_varint(&mut self.raw, stream as u64);
        put_varint(
            &mut self.raw,
            zigzag(arrival_ms.wrapping_sub(self.prev_arrival)),
        );
        self.prev_arrival = arrival_ms;
        put_varint(&mut self.raw, key.len() as u64);
        self.raw.extend_from_slice(key.as_bytes());
        put_varint(&mut self.raw, payload.len() as u64);
        self.raw.extend_from_slice(payload);
    }

    /// Compresses what was pushed and starts a new block. None when nothing was pushed.
    pub fn finish(&mut self) -> io::Result<Option<Block<'_>>> {
        if self.raw.is_empty() {
            return Ok(None);
        }
        let bound = zstd::zstd_safe::compress_bound(self.raw.len());
        self.compressed.clear();
        self.compressed.reserve(bound);
        self.compressor
            .compress_to_buffer(&self.raw[..], &mut self.compressed)?;
        let codec = if self.compressed.len() < self.raw.len() {
            Codec::Zstd
        } else {
            // `compressed` holds the body until the next finish either way.
            std::mem::swap(&mut self.raw, &mut self.compressed);
            Codec::Stored
        };
        self.raw.clear();
        Ok(Some(Block {
            first_id: self.first_id,
            last_id: self.last_id,
            codec,
            body: &self.compressed,
        }))
    }

    /// Forgets what was pushed (the transaction holding it rolled back).
    pub fn clear(&mut self) {
        self.raw.clear();
    }
}

/// One record as decoded from a block, borrowing the block's raw form.
pub struct Decoded<'a> {
    pub id: i64,
    pub stream: i64,
    pub arrival_ms: i64,
    pub partition_key: &'a str,
    pub payload: &'a [u8],
}

/// Reads blocks back; keeps its buffers between blocks.
pub struct BlockReader {
    decompressor: zstd::bulk::Decompressor<'static>,
    raw: Vec<u8>,
}

impl BlockReader {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            decompressor: zstd::bulk::Decompressor::new()?,
            raw: Vec::new(),
        })
    }

    /// Visits the records of one block in id order until `visit` breaks.
    pub fn visit(
        &mut self,
        first_id: i64,
        codec: i64,
        body: &[u8],
        mut visit: impl FnMut(Decoded<'_>) -> ControlFlow<()>,
    ) -> io::Result<ControlFlow<()>> {
        let raw: &[u8] = match codec {
            c if c == Codec::Stored as i64 => body,
            c if c == Codec::Zstd as i64 => {
                let size = zstd::zstd_safe::get_frame_content_size(body)
                    .ok()
                    .flatten()
                    .ok_or_else(|| corrupt("zstd frame without its size"))?;
                self.raw.clear();
                self.raw.reserve(size as usize);
                self.decompressor
                    .decompress_to_buffer(body, &mut self.raw)?;
                &self.raw
            }
            other => return Err(corrupt(&format!("unknown block codec {other}"))),
        };
        let mut at = 0usize;
        let mut id = first_id;
        let mut arrival = 0i64;
        while at < raw.len() {
            let stream = get_varint(raw, &mut at)? as i64;
            arrival = arrival.wrapping_add(unzigzag(get_varint(raw, &mut at)?));
            let key = get_bytes(raw, &mut at)?;
            let partition_key =
                std::str::from_utf8(key).map_err(|_| corrupt("partition key is not UTF-8"))?;
            let payload = get_bytes(raw, &mut at)?;
            let flow = visit(Decoded {
                id,
                stream,
                arrival_ms: arrival,
                partition_key,
                payload,
            });
            if flow.is_break() {
                return Ok(flow);
            }
            id += 1;
        }
        Ok(ControlFlow::Continue(()))
    }
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("corrupt block: {what}"))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], at: &mut usize) -> io::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at).ok_or_else(|| corrupt("truncated"))?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(corrupt("varint too long"))
}

fn get_bytes<'a>(buf: &'a [u8], at: &mut usize) -> io::Result<&'a [u8]> {
    let len = get_varint(buf, at)? as usize;
    let end = at
        .checked_add(len)
        .filter(|&e| e <= buf.len())
        .ok_or_else(|| corrupt("truncated"))?;
    let out = &buf[*at..end];
    *at = end;
    Ok(out)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Bytes that do not compress (xorshift), for tests that need stored sizes to be real.
#[cfg(test)]
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(first_id: i64, codec: Codec, body: &[u8]) -> Vec<(i64, i64, i64, String, Vec<u8>)> {
        let mut out = Vec::new();
        let _ = BlockReader::new()
            .unwrap()
            .visit(first_id, codec as i64, body, |r| {
                out.push((
                    r.id,
                    r.stream,
                    r.arrival_ms,
                    r.partition_key.to_string(),
                    r.payload.to_vec(),
                ));
                ControlFlow::Continue(())
            })
            .unwrap();
        out
    }

    #[test]
    fn records_come_back_as_pushed() {
        let mut w = BlockWriter::new().unwrap();
        assert!(w.finish().unwrap().is_none());
        let mut want = Vec::new();
        for i in 0..200i64 {
            // Arrival times may go backwards (clock steps) and be negative.
            let arrival = 1_795_705_478_000 + (i % 7) * 3
                - 10 * (i % 2)
                - if i == 5 { 2_000_000_000_000 } else { 0 };
            let key = if i % 3 == 0 {
                String::new()
            } else {
                format!("dev-{i}")
            };
            let payload = format!(r#"{{"device":"dev-{i}","seq":{i},"t":21.5}}"#).into_bytes();
            w.push(41 + i, i % 4, arrival, &key, &payload);
            want.push((41 + i, i % 4, arrival, key, payload));
        }
        let b = w.finish().unwrap().unwrap();
        assert_eq!((b.first_id, b.last_id, b.codec), (41, 240, Codec::Zstd));
        let raw_len: usize = want.iter().map(|w| w.4.len() + w.3.len() + 4).sum();
        assert!(b.body.len() * 3 < raw_len, "{} of {raw_len}", b.body.len());
        let (codec, body) = (b.codec, b.body.to_vec());
        assert_eq!(read_all(41, codec, &body), want);
        assert!(w.is_empty());

        // The next block starts afresh.
        w.push(241, 0, 7, "k", b"x");
        let b = w.finish().unwrap().unwrap();
        assert_eq!((b.first_id, b.last_id), (241, 241));
        let (codec, body) = (b.codec, b.body.to_vec());
        assert_eq!(
            read_all(241, codec, &body),
            [(241, 0, 7, "k".into(), b"x".to_vec())]
        );
    }

    #[test]
    fn what_does_not_compress_is_stored() {
        let mut w = BlockWriter::new().unwrap();
        let payload = noise(7, 4096);
        w.push(1, 1, 5, "", &payload);
        let b = w.finish().unwrap().unwrap();
        assert_eq!(b.codec, Codec::Stored);
        let body = b.body.to_vec();
        assert_eq!(read_all(1, Codec::Stored, &body)[0].4, payload);
    }

    #[test]
    fn a_visit_stops_when_asked_and_corruption_is_an_error() {
        let mut w = BlockWriter::new().unwrap();
        for i in 1..=10 {
            w.push(i, 0, i, "k", b"payload payload payload");
        }
        let b = w.finish().unwrap().unwrap();
        let (codec, body) = (b.codec as i64, b.body.to_vec());
        let mut r = BlockReader::new().unwrap();
        let mut seen = 0;
        let flow = r
            .visit(1, codec, &body, |_| {
                seen += 1;
                if seen == 3 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
        assert!(flow.is_break());
        assert_eq!(seen, 3);
        assert!(r
            .visit(
                1,
                codec,
                &body[..body.len() / 2],
                |_| ControlFlow::Continue(())
            )
            .is_err());
        let err = r
            .visit(1, Codec::Stored as i64, &[0x05, 0x80], |_| {
                ControlFlow::Continue(())
            })
            .unwrap_err();
        assert!(err.to_string().contains("corrupt block"), "{err}");
        assert!(r.visit(1, 9, &body, |_| ControlFlow::Continue(())).is_err());
    }
}
