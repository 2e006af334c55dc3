//! Blocks: how a segment stores records. One row of a segment table holds a run of records with
//! consecutive ids, encoded together and compressed with zstd. The buffer writer puts each
//! stream's records in blocks of their own ([`StreamBlocks`]), so that a destination reads only
//! its streams' blocks.
//!
//! Why: on an SD card every stored byte is written at least twice (WAL, then checkpoint), and
//! every commit rewrites whole pages. Telemetry from one fleet repeats itself (the same JSON
//! keys in every message), so a group commit's records compress several times over; and one
//! row per commit instead of one per record is also less work for SQLite.
//!
//! A record in a block's raw form, in id order (the first has the row's `first_id`):
//! `varint stream | zigzag varint arrival_ms - previous | varint key length | key |
//! varint payload length | payload`.
//!
//! Every stored byte is checksummed: zstd frames carry their content checksum, and a block
//! stored uncompressed ends with the CRC-32 of its raw form. Decoding allocates at most
//! [`MAX_RAW`], a limit known before reading, whatever a damaged frame header claims.

use std::io;
use std::ops::ControlFlow;

/// How a block's body is stored (the row's `codec` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// The raw form as is, without a checksum (written by earlier versions; read only).
    Stored = 0,
    Zstd = 1,
    /// The raw form followed by its CRC-32 (little-endian): what did not get smaller compressed.
    StoredCrc = 2,
}

/// The largest raw block a writer can produce: a block is cut once it reaches 1 MiB, so it
/// holds at most that plus one record (a payload of at most 256 MiB, `ingress.max_payload`'s
/// ceiling, with its key and framing).
pub const MAX_RAW: usize = (1 << 20) + (256 << 20) + (64 << 10);

/// zstd's fastest regular level: telemetry already shrinks several times over, and the buffer
/// writer's thread is the gateway's busiest.
const LEVEL: i32 = 1;

/// One block's records in their raw form, before they are numbered: a block's ids are implied
/// (consecutive from its `first_id`), so the writer may give them when the block is written.
#[derive(Default)]
struct Raw {
    buf: Vec<u8>,
    records: u64,
    prev_arrival: i64,
}

impl Raw {
    fn push(&mut self, stream: i64, arrival_ms: i64, key: &str, payload: &[u8]) {
        if self.buf.is_empty() {
            self.prev_arrival = 0;
        }
        self.records += 1;
        put_varint(&mut self.buf, stream as u64);
        put_varint(
            &mut self.buf,
            zigzag(arrival_ms.wrapping_sub(self.prev_arrival)),
        );
        self.prev_arrival = arrival_ms;
        put_varint(&mut self.buf, key.len() as u64);
        self.buf.extend_from_slice(key.as_bytes());
        put_varint(&mut self.buf, payload.len() as u64);
        self.buf.extend_from_slice(payload);
    }
}

/// Compresses raw blocks (one zstd context for all of a writer's blocks).
struct Packer {
    compressor: zstd::bulk::Compressor<'static>,
    compressed: Vec<u8>,
}

impl Packer {
    fn new() -> io::Result<Self> {
        Ok(Self {
            compressor: {
                let mut c = zstd::bulk::Compressor::new(LEVEL)?;
                // 4 bytes per block: a flipped bit on the card is detected, not decoded.
                c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
                c
            },
            compressed: Vec::new(),
        })
    }

    /// Compresses `raw` (left empty) into the body, which stays until the next pack.
    fn pack(&mut self, raw: &mut Vec<u8>) -> io::Result<(Codec, &[u8])> {
        let bound = zstd::zstd_safe::compress_bound(raw.len());
        self.compressed.clear();
        self.compressed.reserve(bound);
        self.compressor
            .compress_to_buffer(&raw[..], &mut self.compressed)?;
        let codec = if self.compressed.len() < raw.len() + 4 {
            Codec::Zstd
        } else {
            // `compressed` holds the body until the next pack either way.
            let crc = crc32fast::hash(raw);
            std::mem::swap(raw, &mut self.compressed);
            self.compressed.extend_from_slice(&crc.to_le_bytes());
            Codec::StoredCrc
        };
        raw.clear();
        Ok((codec, &self.compressed))
    }
}

/// Accumulates records into one block and compresses it.
pub struct BlockWriter {
    raw: Raw,
    first_id: i64,
    last_id: i64,
    packer: Packer,
}

/// A finished block, borrowed from its writer until the next record.
pub struct Block<'a> {
    pub first_id: i64,
    pub last_id: i64,
    pub codec: Codec,
    /// The one stream all its records belong to, if they do.
    pub stream: Option<i64>,
    pub body: &'a [u8],
}

impl BlockWriter {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            raw: Raw::default(),
            first_id: 0,
            last_id: 0,
            packer: Packer::new()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.raw.buf.is_empty()
    }

    /// Appends the record with id `id`, which must follow the previous one.
    pub fn push(&mut self, id: i64, stream: i64, arrival_ms: i64, key: &str, payload: &[u8]) {
        if self.raw.buf.is_empty() {
            self.first_id = id;
        } else {
            debug_assert_eq!(id, self.last_id + 1, "ids in a block are consecutive");
        }
        self.last_id = id;
        self.raw.push(stream, arrival_ms, key, payload);
    }

    /// Compresses what was pushed and starts a new block. None when nothing was pushed.
    pub fn finish(&mut self) -> io::Result<Option<Block<'_>>> {
        if self.raw.buf.is_empty() {
            return Ok(None);
        }
        self.raw.records = 0;
        let (codec, body) = self.packer.pack(&mut self.raw.buf)?;
        Ok(Some(Block {
            first_id: self.first_id,
            last_id: self.last_id,
            codec,
            stream: None,
            body,
        }))
    }
}

/// The buffer writer's open blocks: one per stream, so that each block holds one stream's
/// records and a destination reads (and decompresses) only the blocks of its own streams.
/// A block's records are numbered when it is written ([`StreamBlocks::finish`]): the ids of
/// one transaction go to its blocks in the order they are written, each block's consecutive.
pub struct StreamBlocks {
    /// By stream (config order): its records not yet written, and its id in the file.
    open: Vec<(Raw, i64)>,
    packer: Packer,
}

impl StreamBlocks {
    /// `stream_ids`: each config stream's id in the file.
    pub fn new(stream_ids: &[i64]) -> io::Result<Self> {
        Ok(Self {
            open: stream_ids.iter().map(|&id| (Raw::default(), id)).collect(),
            packer: Packer::new()?,
        })
    }

    /// Appends a record to stream `stream`'s (config index) open block.
    pub fn push(&mut self, stream: usize, arrival_ms: i64, key: &str, payload: &[u8]) {
        let (raw, id) = &mut self.open[stream];
        raw.push(*id, arrival_ms, key, payload);
    }

    /// Bytes of stream `stream`'s open block so far.
    pub fn raw_len(&self, stream: usize) -> usize {
        self.open[stream].0.buf.len()
    }

    /// Records in all open blocks.
    pub fn records(&self) -> u64 {
        self.open.iter().map(|(r, _)| r.records).sum()
    }

    /// The streams whose open blocks hold records.
    pub fn pending(&self) -> impl Iterator<Item = usize> + '_ {
        self.open
            .iter()
            .enumerate()
            .filter(|(_, (r, _))| r.records > 0)
            .map(|(s, _)| s)
    }

    /// Numbers stream `stream`'s open block from `first_id`, compresses it and starts a new
    /// one. None when it holds nothing.
    pub fn finish(&mut self, stream: usize, first_id: i64) -> io::Result<Option<Block<'_>>> {
        let (raw, id) = &mut self.open[stream];
        if raw.records == 0 {
            return Ok(None);
        }
        let last_id = first_id + raw.records as i64 - 1;
        let stream_id = *id;
        raw.records = 0;
        let (codec, body) = self.packer.pack(&mut raw.buf)?;
        Ok(Some(Block {
            first_id,
            last_id,
            codec,
            stream: Some(stream_id),
            body,
        }))
    }

    /// Forgets what was pushed (the transaction holding it rolled back).
    pub fn clear(&mut self) {
        for (raw, _) in &mut self.open {
            raw.buf.clear();
            raw.records = 0;
        }
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
            c if c == Codec::StoredCrc as i64 => {
                let (raw, crc) = body
                    .split_last_chunk::<4>()
                    .ok_or_else(|| corrupt("shorter than its checksum"))?;
                if crc32fast::hash(raw) != u32::from_le_bytes(*crc) {
                    return Err(corrupt("checksum mismatch"));
                }
                raw
            }
            c if c == Codec::Zstd as i64 => {
                let size = zstd::zstd_safe::get_frame_content_size(body)
                    .ok()
                    .flatten()
                    .ok_or_else(|| corrupt("zstd frame without its size"))?;
                if size > MAX_RAW as u64 {
                    return Err(corrupt(&format!("zstd frame claims {size} bytes")));
                }
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
    fn what_does_not_compress_is_stored_with_a_checksum() {
        let mut w = BlockWriter::new().unwrap();
        let payload = noise(7, 4096);
        w.push(1, 1, 5, "", &payload);
        let b = w.finish().unwrap().unwrap();
        assert_eq!(b.codec, Codec::StoredCrc);
        let mut body = b.body.to_vec();
        assert_eq!(read_all(1, Codec::StoredCrc, &body)[0].4, payload);
        // One flipped bit anywhere is caught.
        for at in [0, 2000, body.len() - 1] {
            body[at] ^= 0x04;
            let err = BlockReader::new()
                .unwrap()
                .visit(1, Codec::StoredCrc as i64, &body, |_| {
                    ControlFlow::Continue(())
                })
                .unwrap_err();
            assert!(err.to_string().contains("checksum"), "{err}");
            body[at] ^= 0x04;
        }
    }

    #[test]
    fn a_damaged_frame_header_cannot_make_the_reader_allocate_what_it_claims() {
        let mut w = BlockWriter::new().unwrap();
        w.push(1, 0, 1, "k", b"payload payload payload payload");
        let b = w.finish().unwrap().unwrap();
        assert_eq!(b.codec, Codec::Zstd);
        let mut body = b.body.to_vec();
        // Frame header: magic (4), descriptor, [window], content size. Claim 2^56 bytes.
        let mut huge = body[..5].to_vec();
        huge[4] = 0xE0 | (body[4] & 0x1F) & !0x03; // 8-byte content size, single segment
        huge.extend_from_slice(&(1u64 << 56).to_le_bytes());
        body = huge;
        let err = BlockReader::new()
            .unwrap()
            .visit(1, Codec::Zstd as i64, &body, |_| ControlFlow::Continue(()))
            .unwrap_err();
        assert!(err.to_string().contains("claims"), "{err}");
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
