//! kill -9 and power cuts during load: what the buffer committed before the kill is delivered
//! after a restart, exactly once. With the front door nothing acknowledged is lost; with the
//! embedded rumqttd what it acknowledged but never handed over is counted and reported. A power
//! cut (the shim of `tests/powercut/`: every write not yet fsynced is gone) loses nothing
//! acknowledged with `synchronous = "full"`; what `"normal"` loses is measured and reported.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgehose_tests::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

const DEVICES: usize = 20;
const PER_DEVICE: u64 = 5_000;

type Seen = Arc<Mutex<HashSet<(String, u64)>>>;

/// Publishes PER_DEVICE messages as fast as acks allow and records which were acknowledged.
async fn device(port: u16, n: usize, acked: Seen) {
    let id = format!("crash-{n}");
    let mut opts = MqttOptions::new(&id, "127.0.0.1", port);
    opts.set_inflight(50);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let topic = format!("sensors/{id}/telemetry");
    let publisher = {
        let id = id.clone();
        tokio::spawn(async move {
            for seq in 0..PER_DEVICE {
                if client
                    .publish(&topic, QoS::AtLeastOnce, false, telemetry(&id, seq))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    };
    // Outgoing publishes leave in sequence order, so the k-th one is seq k.
    let mut next_seq = 0u64;
    let mut in_flight: HashMap<u16, u64> = HashMap::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Ok(event)) = tokio::time::timeout_at(end, eventloop.poll()).await {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                in_flight.insert(pkid, next_seq);
                next_seq += 1;
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(seq) = in_flight.remove(&ack.pkid) {
                    acked.lock().unwrap().insert((id.clone(), seq));
                }
                if next_seq == PER_DEVICE && in_flight.is_empty() {
                    break;
                }
            }
            _ => {}
        }
    }
    publisher.abort();
}

/// What the buffer file holds; with `lenient`, a file a power cut left unreadable holds
/// nothing (`synchronous = "normal"` can lose even the tables of a young buffer).
fn committed_in_buffer(db: &std::path::Path, lenient: bool) -> HashSet<(String, u64)> {
    let records = match try_buffered_payloads(db) {
        Ok(r) => r,
        Err(e) if lenient => {
            println!("the buffer file after the power cut: {e:#}");
            Vec::new()
        }
        Err(e) => panic!("{e:#}"),
    };
    device_seqs(&[Object {
        key: String::new(),
        records,
    }])
    .into_iter()
    .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// kill -9 of the front door.
    Kill9,
    /// kill -9 of the embedded rumqttd mode.
    Kill9Rumqttd,
    /// A power cut with this `buffer.synchronous`.
    PowerCut(&'static str),
}

#[test]
fn front_door_kill_9_during_load_loses_nothing_acknowledged() {
    let report = trials(20, Fault::Kill9);
    for line in &report {
        println!("{line}");
    }
}

#[test]
fn rumqttd_kill_9_during_load_loses_nothing_committed() {
    // The embedded rumqttd acks before edgehose commits: the gap the front door closes.
    for line in trials(3, Fault::Kill9Rumqttd) {
        println!("{line}");
    }
}

#[test]
fn a_power_cut_loses_nothing_acknowledged_with_synchronous_full() {
    for line in trials(5, Fault::PowerCut("full")) {
        println!("{line}");
    }
}

/// Not a guarantee but a measurement: what `synchronous = "normal"` loses at a power cut
/// (acknowledged messages of the commits since the last checkpoint), reported, not judged.
#[test]
fn what_a_power_cut_costs_with_synchronous_normal() {
    for line in trials(3, Fault::PowerCut("normal")) {
        println!("{line}");
    }
}

/// Runs `trials` trials of `fault` during load; returns one report line per trial. Panics on a
/// committed (or, with the front door, an acknowledged) message missing from the output, or on
/// a duplicate; with `PowerCut("normal")` only on a record delivered twice (what it lost is
/// reported).
fn trials(trials: u64, fault: Fault) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut report = Vec::new();
    let rumqttd = fault == Fault::Kill9Rumqttd;
    let strict = fault != Fault::PowerCut("normal");
    for trial in 0..trials {
        let dir = tempfile::tempdir().unwrap();
        let mut setup = Setup {
            rumqttd,
            ..Setup::default()
        };
        if let Fault::PowerCut(sync) = fault {
            setup.synchronous = sync;
            setup.env = powercut_env(dir.path());
        }
        let mut gw = Gateway::start(dir.path(), &setup).unwrap();
        let acked: Seen = Default::default();
        let tasks: Vec<_> = (0..DEVICES)
            .map(|n| rt.spawn(device(gw.mqtt_port, n, Arc::clone(&acked))))
            .collect();
        // A different moment each trial, while the load is running.
        let delay = 150 + (trial * 211 + std::process::id() as u64) % 500;
        std::thread::sleep(Duration::from_millis(delay));
        gw.kill9().unwrap();
        rt.block_on(async {
            for t in tasks {
                let _ = t.await;
            }
        });
        let discarded = match fault {
            Fault::PowerCut(_) => {
                // The restart runs on what the disk kept, without the shim.
                gw.env.clear();
                Some(powercut_apply(dir.path()))
            }
            _ => None,
        };

        // Committed (and durable) before the kill = delivered already + still in the buffer.
        let delivered_before: HashSet<_> = device_seqs(&read_objects(&gw.bucket_dir()).unwrap())
            .into_iter()
            .collect();
        let in_buffer = committed_in_buffer(&gw.db_path(), !strict);
        let committed: HashSet<_> = delivered_before.union(&in_buffer).cloned().collect();
        assert!(
            !committed.is_empty() || !strict,
            "trial {trial}: the kill came before any commit"
        );

        gw.spawn().unwrap();
        let status = gw.terminate().unwrap();
        assert!(status.success(), "log:\n{}", gw.log());

        let out = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
        let delivered: HashSet<_> = out.iter().cloned().collect();
        assert_eq!(
            out.len(),
            delivered.len(),
            "trial {trial}: duplicates after restart"
        );
        let lost_committed = committed.difference(&delivered).count();
        if strict {
            assert_eq!(lost_committed, 0, "trial {trial}: committed records lost");
        }
        let acked = acked.lock().unwrap();
        let acked_lost = acked.difference(&delivered).count();
        if !rumqttd && strict {
            assert_eq!(acked_lost, 0, "trial {trial}: acknowledged messages lost");
        }
        let cut = discarded
            .map(|b| format!(" (power cut: {b} bytes written but not synced were discarded)"))
            .unwrap_or_default();
        report.push(format!(
            "trial {trial}: kill after {delay} ms{cut}, acknowledged {}, committed {}, delivered {}, acknowledged-but-lost {acked_lost}, delivered-before-the-cut-but-lost {lost_committed}",
            acked.len(),
            committed.len(),
            delivered.len()
        ));
    }
    report
}

/// A block of the buffer file that the disk corrupted (one flipped bit) is skipped, logged and
/// counted after a restart; every other record is still delivered, nothing twice.
#[test]
fn a_corrupt_block_is_skipped_counted_and_the_rest_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        // Nothing is delivered before the kill.
        buffer_interval: "900s",
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    // Paced, so that the records spread over many commits (blocks).
    let s = run_sim(gw.mqtt_port, &["-n", "4", "-m", "500", "--rate", "400"]).unwrap();
    assert_eq!(s["acknowledged"], 2000, "{s}");
    gw.kill9().unwrap();

    let (first, last) = {
        let conn = rusqlite::Connection::open(gw.db_path()).unwrap();
        let seq: i64 = conn
            .query_row("SELECT max(seq) FROM segments", [], |r| r.get(0))
            .unwrap();
        let blocks: Vec<(i64, i64, Vec<u8>)> = conn
            .prepare(&format!(
                "SELECT first_id, last_id, body FROM seg_{seq} WHERE codec = 1 ORDER BY first_id"
            ))
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(blocks.len() >= 3, "{} blocks", blocks.len());
        let (first, last, mut body) = blocks[blocks.len() / 2].clone();
        let mid = body.len() / 2;
        body[mid] ^= 0x04;
        conn.execute(
            &format!("UPDATE seg_{seq} SET body = ?1 WHERE first_id = ?2"),
            rusqlite::params![body, first],
        )
        .unwrap();
        (first, last)
    };
    let lost = (last - first + 1) as usize;

    gw.spawn().unwrap();
    wait_until(
        Duration::from_secs(10),
        "the corrupt block reported",
        || gw.log().contains("cannot be read back"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    assert_eq!(
        gw.metric("edgehose_buffer_corrupt_records_total"),
        lost as f64
    );
    // SIGTERM delivers what is pending.
    assert!(gw.terminate().unwrap().success());
    let seqs = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
    let unique: HashSet<_> = seqs.iter().collect();
    assert_eq!(seqs.len(), unique.len(), "no duplicates");
    assert_eq!(seqs.len(), 2000 - lost, "everything but the corrupt block");
    assert_eq!(
        gw.log().matches("cannot be read back").count(),
        1,
        "logged once"
    );
}
