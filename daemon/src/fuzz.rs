//! Entry points for coverage-guided fuzzing (`fuzz/`, libFuzzer through cargo-fuzz's layout):
//! each takes arbitrary bytes, drives one parser or encoder the way the gateway does, and checks
//! what must hold for every input. A panic here is a bug: an input a device, a config file or
//! the disk can produce would crash the gateway. The same functions replay the committed corpora
//! in `cargo test` (`tests/fuzz_corpora.rs`), so every input that once found a bug stays a test.

use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::BytesMut;

use crate::buffer::block::{BlockReader, BlockWriter, Codec as BlockCodec, StreamBlocks};
use crate::ingress::frontdoor::codec::{detect, Codec, CodecError, In};
use crate::ingress::frontdoor::filter_index::FilterIndex;
use crate::sinks::kpl;
use crate::templates::{json_field, keys, topic};

/// The front door's TLS record layer: see `ingress::frontdoor::tls_stream::fuzz_records`.
pub fn tls_records(data: &[u8]) {
    let _ = crate::ingress::frontdoor::tls_stream::fuzz_records(data);
}

/// IoT rule SQL: the first line is a statement, the rest a payload. Whatever the input, parsing
/// ends in a rule or an error with a position inside the statement, and applying a rule to any
/// payload ends in an outcome whose selected output is JSON.
pub fn rules(data: &[u8]) {
    use crate::rules::{value::Value, Applied, Context, Rule};
    let text = String::from_utf8_lossy(data);
    let (sql, payload) = text.split_once('\n').unwrap_or((&text, "{}"));
    let rule = match Rule::parse(sql) {
        Ok(rule) => rule,
        Err(e) => {
            assert!(e.position <= sql.len(), "{e} beyond {} bytes", sql.len());
            return;
        }
    };
    let doc = Value::parse(payload.as_bytes()).unwrap_or(Value::Undefined);
    let ctx = Context {
        topic: "sensors/dev-1/telemetry",
        client_id: Some("dev-1"),
        timestamp_ms: 1_700_000_000_000,
    };
    if let Applied::Selected(Some(out)) = rule.apply(&doc, &ctx) {
        serde_json::from_slice::<serde::de::IgnoredAny>(&out).expect("a rule writes JSON");
        // A windowed rule's input row reads back, accumulates and closes into JSON.
        if let Some(w) = rule.window() {
            let input = w.parse_row(&out).expect("an input row reads back");
            let mut accs = w.accumulators();
            for _ in 0..2 {
                for (acc, arg) in accs.iter_mut().zip(input.args()) {
                    acc.add(arg);
                }
            }
            if let Applied::Selected(Some(row)) = rule.close(input.keys(), &accs, 60_000, true) {
                serde_json::from_slice::<serde::de::IgnoredAny>(&row)
                    .expect("a window writes JSON");
            }
        }
    }
}

/// Who a device is and what it may do: an IoT policy document (then requests evaluated under
/// it), a password file, or a certificate's DER (its subject common name and serial), chosen by
/// the first byte. Whatever the input, loading ends in a document or an error, and every
/// request in a decision with a reason.
pub fn auth(data: &[u8]) {
    use crate::ingress::auth::{passwords::Passwords, policy, x509};
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let text = String::from_utf8_lossy(rest);
            let (doc, requests) = text.split_once('\n').unwrap_or((&text, ""));
            let Ok(p) = policy::Policy::parse("fuzz", doc) else {
                return;
            };
            let mut lines = requests.lines();
            let who = policy::Principal {
                client_id: lines.next().unwrap_or("dev").to_string(),
                thing_name: lines.next().map(str::to_string),
                common_name: None,
            };
            for name in lines.take(8) {
                for action in policy::Action::ALL {
                    let d = policy::evaluate([&p], &who, action, name);
                    assert!(!d.reason.is_empty());
                }
            }
        }
        1 => {
            if let Ok(p) = Passwords::parse(&String::from_utf8_lossy(rest)) {
                assert!(!p.verify("\u{0}no such user", b"x"));
            }
        }
        _ => {
            let _ = x509::subject_common_name(rest);
            let _ = x509::serial(rest);
        }
    }
}

/// The MQTT codec: a connection's bytes as they arrive, in two reads split where the input
/// says. Whatever the bytes, reading ends in packets, "need more" or an error; a packet the
/// codec returns is never larger than the limit it was given.
pub fn codec(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let Ok(Some(version)) = detect(data) else {
        return;
    };
    let codec = Codec {
        version,
        max_packet: 4096,
    };
    let split = (split as usize * data.len() / 255).min(data.len());
    let mut buf = BytesMut::from(&data[..split]);
    for more in [&data[split..], &[][..]] {
        buf.extend_from_slice(more);
        loop {
            let before = buf.len();
            match codec.read(&mut buf) {
                Ok(Some(packet)) => {
                    let used = before - buf.len();
                    assert!(used > 0, "a packet consumed no bytes");
                    assert!(used <= codec.max_packet + 5, "{used} bytes over the limit");
                    if let In::Publish { topic, .. } = &packet {
                        let _ = std::str::from_utf8(topic);
                    }
                }
                Ok(None) => break,
                Err(CodecError::TooLarge(_) | CodecError::Malformed(_)) => return,
                Err(CodecError::UnsupportedVersion(_)) => return,
            }
        }
    }
}

/// The config file: any text either parses into a config or gives an error naming its key.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match crate::config::parse(text) {
        Ok(_) => {}
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// The templates a config holds and the values they are evaluated on: a Firehose prefix, an
/// IoT Core partition-key template, a topic filter, and a JSON field path, each a line of the
/// input; the rest is a topic and a payload.
pub fn templates(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.splitn(6, '\n');
    let mut next = || lines.next().unwrap_or("");
    let (prefix, key, filter, path, topic_name, payload) =
        (next(), next(), next(), next(), next(), next());
    let at =
        chrono::DateTime::from_timestamp_millis((payload.len() as i64).wrapping_mul(1_234_567_891))
            .unwrap_or_default();
    for kind in [keys::PrefixKind::Object, keys::PrefixKind::Error] {
        if let Ok(p) = keys::PrefixTemplate::parse_as(prefix, kind) {
            let values: Vec<String> = p
                .partition_names()
                .iter()
                .map(|n| format!("{n}-{topic_name}"))
                .collect();
            if let Ok(out) = p.evaluate(at, "rnd", &values, "processing-failed") {
                assert!(out.chars().count() <= keys::MAX_PREFIX_LEN);
            }
        }
    }
    if let Ok(t) = topic::PartitionKeyTemplate::parse(key) {
        let _ = t.render(topic_name, Some("client"), at.timestamp_millis());
    }
    // Filters (space-separated, taken by five sessions in turn): the front door's trie finds
    // exactly the sessions (with their highest QoS) a scan of every filter finds, before and
    // after half of them unsubscribe.
    let mut pairs: Vec<(Arc<str>, topic::TopicFilter)> = Vec::new();
    for (i, text) in filter.split(' ').enumerate() {
        let session: Arc<str> = Arc::from(format!("s{}", i % 5));
        if let Ok(f) = topic::TopicFilter::parse(text) {
            if !pairs.iter().any(|(s, g)| *s == session && g == &f) {
                pairs.push((session, f));
            }
        }
    }
    let mut index = FilterIndex::default();
    for (i, (session, f)) in pairs.iter().enumerate() {
        index.insert(f, session, (i % 3) as u8);
    }
    for round in 0..2 {
        let mut found = Vec::new();
        index.matches(topic_name, &mut found);
        found.sort();
        let mut scan: std::collections::BTreeMap<Arc<str>, u8> = Default::default();
        for (i, (session, f)) in pairs.iter().enumerate() {
            let live = round == 0 || i % 2 == 1;
            if live && f.matches(topic_name) {
                let q = scan.entry(Arc::clone(session)).or_insert(0);
                *q = (*q).max((i % 3) as u8);
            }
        }
        let scan: Vec<(Arc<str>, u8)> = scan.into_iter().collect();
        assert_eq!(found, scan, "filters {pairs:?}, topic {topic_name:?}");
        for (session, f) in pairs.iter().step_by(2) {
            index.remove(f, session);
        }
    }
    // The single-pass lookup gives what a parsed document gives.
    let found = json_field::find(payload.as_bytes(), path).ok();
    let parsed = serde_json::from_str::<serde_json::Value>(payload)
        .ok()
        .map(|v| {
            let mut at = &v;
            for step in path.split('.') {
                match at.get(step) {
                    Some(next) => at = next,
                    None => return json_field::Field::Missing,
                }
            }
            match at {
                serde_json::Value::String(s) => json_field::Field::Scalar(s.clone()),
                serde_json::Value::Number(n) => json_field::Field::Scalar(n.to_string()),
                serde_json::Value::Bool(b) => json_field::Field::Scalar(b.to_string()),
                _ => json_field::Field::Other,
            }
        });
    assert_eq!(found, parsed, "{path:?} in {payload:?}");
}

/// Reading a block back from the disk: any body, under any codec, decodes into records or an
/// error, allocating at most the limit fixed before reading. And records written by
/// [`BlockWriter`] and by the buffer writer's [`StreamBlocks`] read back as they were written.
pub fn block(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let mut reader = BlockReader::new().expect("zstd decompressor");
    let codec = i64::from(selector % 4);
    let _ = reader.visit(7, codec, body, |r| {
        assert!(r.id >= 7);
        ControlFlow::Continue(())
    });

    // Round trip: the input cut into records (key = first byte's worth, payload = the rest).
    let mut writer = BlockWriter::new().expect("zstd compressor");
    let mut expected = Vec::new();
    let mut rest = body;
    let mut id = 1_000;
    while let Some((&len, tail)) = rest.split_first() {
        let (chunk, tail) = tail.split_at((len as usize).min(tail.len()));
        let (key, payload) = chunk.split_at(chunk.len().min(usize::from(len % 8)));
        let key = String::from_utf8_lossy(key).into_owned();
        let arrival = i64::from(len).wrapping_mul(-977) + id;
        writer.push(id, i64::from(len % 3), arrival, &key, payload);
        expected.push((id, i64::from(len % 3), arrival, key, payload.to_vec()));
        id += 1;
        rest = tail;
    }

    // The same records through the buffer writer's per-stream blocks: each stream's come back
    // in the order pushed, numbered from where its block was placed.
    let mut streams = StreamBlocks::new(&[10, 11, 12]).expect("zstd compressor");
    for (_, stream, arrival, key, payload) in &expected {
        streams.push(*stream as usize, *arrival, key, payload);
    }
    assert_eq!(streams.records(), expected.len() as u64);
    let mut next = 1;
    for s in 0..3i64 {
        let want: Vec<_> = expected
            .iter()
            .filter(|e| e.1 == s)
            .enumerate()
            .map(|(i, e)| (next + i as i64, 10 + s, e.2, e.3.clone(), e.4.clone()))
            .collect();
        let Some(block) = streams.finish(s as usize, next).expect("compress") else {
            assert!(want.is_empty());
            continue;
        };
        let last = next + want.len() as i64 - 1;
        assert_eq!((block.first_id, block.last_id), (next, last));
        assert_eq!(block.stream, Some(10 + s));
        let (codec, body) = (block.codec as i64, block.body.to_vec());
        assert_eq!(read_back(&mut reader, next, codec, &body), want);
        next = last + 1;
    }
    assert_eq!(streams.records(), 0);

    let Some(block) = writer.finish().expect("compress") else {
        assert!(expected.is_empty());
        return;
    };
    assert_eq!(block.first_id, 1_000);
    assert_eq!(block.last_id, id - 1);
    let (codec, body) = (block.codec as i64, block.body.to_vec());
    assert_ne!(
        codec,
        BlockCodec::Stored as i64,
        "every block is checksummed"
    );
    assert_eq!(read_back(&mut reader, 1_000, codec, &body), expected);
}

/// A block just written, decoded: (id, stream, arrival, partition key, payload) per record.
fn read_back(
    reader: &mut BlockReader,
    first_id: i64,
    codec: i64,
    body: &[u8],
) -> Vec<(i64, i64, i64, String, Vec<u8>)> {
    let mut got = Vec::new();
    let _ = reader
        .visit(first_id, codec, body, |r| {
            got.push((
                r.id,
                r.stream,
                r.arrival_ms,
                r.partition_key.to_string(),
                r.payload.to_vec(),
            ));
            ControlFlow::Continue(())
        })
        .expect("a block just written reads back");
    got
}

/// KPL aggregation: records cut from the input aggregate into a record whose size the
/// aggregator predicted exactly, and which de-aggregates into the same records.
pub fn kpl(data: &[u8]) {
    let mut agg = kpl::Aggregator::default();
    let mut expected = Vec::new();
    let mut rest = data;
    let mut step = 0usize;
    while let Some((&len, tail)) = rest.split_first() {
        let (chunk, tail) = tail.split_at((len as usize).min(tail.len()));
        let (key, payload) = chunk.split_at(chunk.len().min(usize::from(len % 16)));
        let key = String::from_utf8_lossy(key).into_owned();
        let predicted = agg.size_with(&key, payload);
        agg.add(&key, payload);
        // prost's exact length (linear in the records so far) against the prediction: at each
        // of the first 64 steps, then at every power of two and at the last, so that an input
        // of thousands of records costs n log n, not n^2 (the encoding itself is checked
        // against it below).
        step += 1;
        if step <= 64 || step.is_power_of_two() || tail.is_empty() {
            assert_eq!(agg.encoded_len(), predicted, "size_with predicted the size");
        }
        expected.push((key, payload.to_vec()));
        rest = tail;
    }
    let encoded = agg.encode();
    assert_eq!(encoded.len(), agg.encoded_len());
    if expected.is_empty() {
        return;
    }
    let decoded = kpl::decode(&encoded).expect("an aggregate decodes");
    let got: Vec<(String, Vec<u8>)> = decoded
        .records
        .iter()
        .map(|r| {
            (
                decoded.partition_key_table[r.partition_key_index as usize].clone(),
                r.data.clone(),
            )
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(agg.first_key(), Some(expected[0].0.as_str()));
    // Any bytes: not an aggregate, or one that decodes without a panic.
    let _ = kpl::decode(data);
}
