//! The whole pipeline on the embedded default: real edgehose process, real MQTT clients
//! (firmware-sim), real SQLite file, Firehose-layout objects in a real directory.

use std::collections::HashMap;

use edgehose_tests::*;

#[test]
fn fifty_clients_twenty_thousand_messages_arrive_exactly_once_in_firehose_layout() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let summary = run_sim(
        gw.mqtt_port,
        &[
            "--devices",
            "50",
            "--messages",
            "400",
            "--rate",
            "0",
            "--qos",
            "1",
        ],
    )
    .unwrap();
    assert_eq!(summary["acknowledged"], 20_000, "{summary}");
    let status = gw.terminate().unwrap();
    assert!(status.success(), "exit status {status}; log:\n{}", gw.log());

    let objects = read_objects(&gw.bucket_dir()).unwrap();
    assert!(
        objects.len() > 1,
        "a 1MiB size hint over ~5MB should give several objects"
    );
    for o in &objects {
        assert!(
            is_firehose_key(&o.key, Gateway::STREAM, ""),
            "bad key {}",
            o.key
        );
    }
    assert_exactly_once(&device_seqs(&objects), 50, 400, "dev");
    // Records of one device keep their order within each object.
    for o in &objects {
        let mut last: HashMap<String, u64> = HashMap::new();
        for (d, s) in device_seqs(std::slice::from_ref(o)) {
            if let Some(prev) = last.insert(d.clone(), s) {
                assert!(s > prev, "{d}: {s} after {prev} in {}", o.key);
            }
        }
    }
    // Nothing is left behind: no staging files; the buffer holds nothing undelivered.
    let staging = dir.path().join("out/.edgehose-staging");
    let leftovers = std::fs::read_dir(staging.join(Gateway::BUCKET))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0);
    let (delivered_id, last_id, segments) = delivery_position(&gw.db_path());
    assert_eq!(
        delivered_id, last_id,
        "the destination is at the end of the buffer"
    );
    assert_eq!(
        segments, 1,
        "delivered segments are dropped (the active one stays)"
    );
}

#[test]
fn gzip_objects_get_gz_keys_and_decode_to_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        compression: "gzip",
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let summary = run_sim(gw.mqtt_port, &["-n", "5", "-m", "200", "--rate", "0"]).unwrap();
    assert_eq!(summary["acknowledged"], 1000);
    assert!(gw.terminate().unwrap().success());
    let objects = read_objects(&gw.bucket_dir()).unwrap();
    assert!(!objects.is_empty());
    for o in &objects {
        assert!(
            is_firehose_key(&o.key, Gateway::STREAM, ".gz"),
            "bad key {}",
            o.key
        );
    }
    assert_exactly_once(&device_seqs(&objects), 5, 200, "dev");
}

#[test]
fn the_interval_flushes_without_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    run_sim(gw.mqtt_port, &["-n", "2", "-m", "10", "--rate", "0"]).unwrap();
    // buffer_interval = 1s: the object appears while the gateway keeps running.
    wait_until(std::time::Duration::from_secs(10), "an object", || {
        read_objects(&gw.bucket_dir())
            .map(|o| !o.is_empty())
            .unwrap_or(false)
    })
    .unwrap();
    assert_eq!(
        gw.metric("edgehose_records_delivered_total{destination=\"local\"}"),
        20.0
    );
    assert_eq!(
        gw.metric("edgehose_batches_delivered_total{destination=\"local\"}"),
        1.0
    );
    assert!(gw.terminate().unwrap().success());
}

#[test]
fn mqtt_5_devices_are_taken_on_the_same_port() {
    mqtt_5_publish(false);
}

#[test]
fn mqtt_5_devices_are_taken_on_rumqttds_v5_listener() {
    mqtt_5_publish(true);
}

/// 50 QoS 1 publishes from an MQTT 5 client: to the front door's one port, or to the embedded
/// rumqttd's separate v5 listener.
fn mqtt_5_publish(rumqttd: bool) {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::{mqttbytes::QoS, AsyncClient, Event, MqttOptions};

    let dir = tempfile::tempdir().unwrap();
    let v5_port = free_port();
    let setup = Setup {
        rumqttd,
        listen_v5: rumqttd.then_some(v5_port),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let v5 = if rumqttd { v5_port } else { gw.mqtt_port };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acked = rt.block_on(async {
        let (client, mut eventloop) =
            AsyncClient::new(MqttOptions::new("v5-dev", "127.0.0.1", v5), 16);
        // Publish from a task: the event loop must be polled for the requests to go out.
        tokio::spawn(async move {
            for seq in 0..50 {
                let payload = telemetry("v5-dev", seq);
                if client
                    .publish("sensors/v5-dev/telemetry", QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let mut acked = 0;
        while acked < 50 {
            match tokio::time::timeout(std::time::Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        acked
    });
    assert_eq!(acked, 50);
    assert!(gw.terminate().unwrap().success());
    let seqs = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
    assert_eq!(
        seqs,
        (0..50)
            .map(|s| ("v5-dev".to_string(), s))
            .collect::<Vec<_>>()
    );
}
