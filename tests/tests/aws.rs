//! Delivery to S3 and Kinesis through the real AWS SDK, against moto's server mode (a real
//! emulator process on loopback), read back independently with boto3 and aws-kinesis-agg.
//!
//! moto keeps everything in memory and slows as a stream grows, so these runs are modest.

use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;

use edgehose_tests::*;

const BUCKET: &str = "telemetry-bucket";
const STREAM: &str = "telemetry-stream";

fn s3_destination(endpoint: &str, extra: &str) -> String {
    format!(
        "type = \"s3\"\nbucket = \"{BUCKET}\"\nregion = \"us-east-1\"\nendpoint = \"{endpoint}\"\n\
         delivery_stream = \"{}\"\nbuffer_size = \"1MiB\"\nbuffer_interval = \"1s\"\n{extra}",
        Gateway::STREAM
    )
}

fn kinesis_destination(endpoint: &str, extra: &str) -> String {
    format!(
        "type = \"kinesis\"\nstream = \"{STREAM}\"\nregion = \"us-east-1\"\nendpoint = \"{endpoint}\"\n\
         buffer_interval = \"500ms\"\n{extra}"
    )
}

fn gunzip(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut out)
        .expect("a gzip object");
    out
}

/// (device, seq) of every record in the bucket; checks keys and encodings on the way.
fn bucket_seqs(moto: &Moto, gzip: bool) -> (usize, Vec<(String, u64)>) {
    let objects = moto.objects(BUCKET).unwrap();
    let mut lines = Vec::new();
    for o in &objects {
        let ext = if gzip { ".gz" } else { "" };
        assert!(
            is_firehose_key(&o.key, Gateway::STREAM, ext),
            "bad key {}",
            o.key
        );
        let body = if gzip {
            assert_eq!(o.encoding.as_deref(), Some("gzip"), "{}", o.key);
            gunzip(&o.body)
        } else {
            o.body.clone()
        };
        lines.extend(
            body.split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec),
        );
    }
    (objects.len(), seqs_of(lines.iter().map(Vec::as_slice)))
}

/// Each device's sequence numbers rise within each shard, in stream order.
fn assert_per_device_order(records: &[StreamRecord]) {
    let mut last: HashMap<String, u64> = HashMap::new();
    for StreamRecord { shard, data, .. } in records {
        for (device, seq) in seqs_of([data.as_slice()]) {
            if let Some(prev) = last.insert(format!("{shard}/{device}"), seq) {
                assert!(seq > prev, "{device}: {seq} after {prev} in {shard}");
            }
        }
    }
}

#[test]
fn s3_gets_every_message_once_in_firehose_layout_gzipped() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    let setup = Setup {
        destination: Some(s3_destination(&moto.endpoint(), "compression = \"gzip\"\n")),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let summary = run_sim(gw.mqtt_port, &["-n", "20", "-m", "300", "--rate", "0"]).unwrap();
    assert_eq!(summary["acknowledged"], 6000, "{summary}");
    assert!(gw.terminate().unwrap().success(), "{}", gw.log());
    let (objects, seqs) = bucket_seqs(&moto, true);
    assert!(objects >= 1);
    assert_exactly_once(&seqs, 20, 300, "dev");
    let (delivered, last, _) = delivery_position(&gw.db_path());
    assert_eq!(delivered, last, "nothing left undelivered");
}

#[test]
fn kinesis_gets_every_message_once_with_each_devices_order_kept() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_stream(STREAM, 2).unwrap();
    let setup = Setup {
        destination: Some(kinesis_destination(&moto.endpoint(), "")),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let summary = run_sim(gw.mqtt_port, &["-n", "10", "-m", "200", "--rate", "0"]).unwrap();
    assert_eq!(summary["acknowledged"], 2000, "{summary}");
    assert!(gw.terminate().unwrap().success(), "{}", gw.log());
    let records = moto.stream_records(STREAM, false).unwrap();
    // The partition key is the stream's template, ${topic(2)}: the device id.
    for r in &records {
        assert!(!r.aggregated);
        let (device, _) = &seqs_of([r.data.as_slice()])[0];
        assert_eq!(&r.key, device);
    }
    let shards: std::collections::HashSet<&str> =
        records.iter().map(|r| r.shard.as_str()).collect();
    assert_eq!(shards.len(), 2, "ten devices spread over both shards");
    assert_per_device_order(&records);
    let seqs = seqs_of(records.iter().map(|r| r.data.as_slice()));
    assert_exactly_once(&seqs, 10, 200, "dev");
}

#[test]
fn kpl_aggregates_deaggregate_with_aws_kinesis_agg_into_every_reading() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_stream(STREAM, 2).unwrap();
    let setup = Setup {
        destination: Some(kinesis_destination(
            &moto.endpoint(),
            "aggregation = true\naggregate_size = \"50KiB\"\n",
        )),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let summary = run_sim(gw.mqtt_port, &["-n", "40", "-m", "100", "--rate", "0"]).unwrap();
    assert_eq!(summary["acknowledged"], 4000, "{summary}");
    assert!(gw.terminate().unwrap().success(), "{}", gw.log());

    let raw = moto.stream_records(STREAM, false).unwrap();
    assert!(
        raw.iter().all(|r| r.aggregated),
        "every Kinesis record is an aggregate"
    );
    assert!(
        raw.len() < 4000 / 20,
        "{} Kinesis records for 4000 readings: aggregation packs many per record",
        raw.len()
    );
    let subs = moto.stream_records(STREAM, true).unwrap();
    // Every sub-record hashes into the shard its aggregate is in (moto splits the hash range
    // evenly: the top bit picks the shard of two), else the KCL would drop it.
    for r in &subs {
        let expected = format!("shardId-{:012}", md5_hash(&r.key) >> 127);
        assert_eq!(r.shard, expected, "sub-record {} in the wrong shard", r.key);
    }
    assert_per_device_order(&subs);
    let seqs = seqs_of(subs.iter().map(|r| r.data.as_slice()));
    assert_exactly_once(&seqs, 40, 100, "dev");
}

fn md5_hash(key: &str) -> u128 {
    let out = std::process::Command::new(venv_python())
        .args([
            "-c",
            "import hashlib,sys; print(int.from_bytes(hashlib.md5(sys.argv[1].encode()).digest(), 'big'))",
            key,
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn an_outage_loses_nothing_and_the_backlog_drains() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    moto.create_stream(STREAM, 1).unwrap();
    // The gateway reaches the emulator through a proxy that can go away and come back: moto
    // itself forgets everything when restarted.
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    for (name, destination) in [
        ("s3", s3_destination(&endpoint, "")),
        ("kinesis", kinesis_destination(&endpoint, "")),
    ] {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let setup = Setup {
            destination: Some(destination),
            shutdown_timeout: "60s",
            ..Setup::default()
        };
        let mut proxy = Some(FaultProxy::start_on(port, moto.port, &[]).unwrap());
        let mut gw = Gateway::start(&sub, &setup).unwrap();
        // Before the outage.
        run_sim(gw.mqtt_port, &["-n", "5", "-m", "100", "--rate", "0"]).unwrap();
        wait_until(Duration::from_secs(20), "first deliveries", || {
            gw.metric("edgehose_records_delivered_total{destination=\"local\"}") >= 1.0
        })
        .unwrap();
        // During: the endpoint is gone; devices keep publishing and get their PUBACKs.
        drop(proxy.take());
        let during = run_sim(
            gw.mqtt_port,
            &["-n", "5", "-m", "100", "--rate", "0", "--first-device", "5"],
        )
        .unwrap();
        assert_eq!(
            during["acknowledged"], 500,
            "ingress is not blocked by the outage"
        );
        wait_until(Duration::from_secs(20), "a failed delivery", || {
            gw.metric("edgehose_delivery_errors_total{destination=\"local\"}") >= 1.0
        })
        .unwrap();
        assert!(gw.metric("edgehose_destination_backlog_records{destination=\"local\"}") > 0.0);
        assert_eq!(
            gw.metric("edgehose_destination_up{destination=\"local\"}"),
            0.0
        );
        // After: the endpoint returns and the backlog drains.
        let _back = FaultProxy::start_on(port, moto.port, &[]).unwrap();
        wait_until(Duration::from_secs(90), "the backlog to drain", || {
            gw.metric("edgehose_records_delivered_total{destination=\"local\"}") >= 1000.0
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
        assert_eq!(
            gw.metric("edgehose_destination_backlog_records{destination=\"local\"}"),
            0.0
        );
        assert!(gw.terminate().unwrap().success());
        let seqs = if name == "s3" {
            bucket_seqs(&moto, false).1
        } else {
            let r = moto.stream_records(STREAM, false).unwrap();
            seqs_of(r.iter().map(|r| r.data.as_slice()))
        };
        let t = tally(&seqs, 10, 100, "dev");
        eprintln!("{name}: outage: {t:?}");
        assert_eq!(t.missing, 0, "{name}: records lost");
    }
}

#[test]
fn partial_failures_resend_only_the_failed_entries_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    moto.create_stream(STREAM, 2).unwrap();
    let proxy = FaultProxy::start(
        moto.port,
        &["--kinesis-fail", "0.2", "--s3-fail", "0.4", "--seed", "7"],
    )
    .unwrap();

    // Kinesis: 20% of PutRecords entries fail (throttled).
    let sub = dir.path().join("kinesis");
    std::fs::create_dir_all(&sub).unwrap();
    let setup = Setup {
        destination: Some(kinesis_destination(&proxy.endpoint(), "")),
        ..Setup::default()
    };
    let mut gw = Gateway::start(&sub, &setup).unwrap();
    run_sim(gw.mqtt_port, &["-n", "50", "-m", "30", "--rate", "0"]).unwrap();
    assert!(gw.terminate().unwrap().success(), "{}", gw.log());
    let stats = proxy.stats().unwrap();
    let failed = stats["kinesis_failed"].as_u64().unwrap();
    let entries = stats["kinesis_entries"].as_u64().unwrap();
    assert!(failed > 0, "{stats}");
    // Only failed entries were sent again: every entry the proxy saw is a record once, plus one
    // resend per failure.
    assert_eq!(entries, 1500 + failed, "{stats}");
    let records = moto.stream_records(STREAM, false).unwrap();
    assert_per_device_order(&records);
    let t = tally(
        &seqs_of(records.iter().map(|r| r.data.as_slice())),
        50,
        30,
        "dev",
    );
    eprintln!("kinesis with 20% failed entries: {failed} resent of {entries}, {t:?}");
    assert_eq!(
        t,
        Tally {
            missing: 0,
            duplicates: 0
        }
    );

    // S3: 40% of PUTs fail, half of them after the object was stored.
    let sub = dir.path().join("s3");
    std::fs::create_dir_all(&sub).unwrap();
    let setup = Setup {
        destination: Some(s3_destination(
            &proxy.endpoint(),
            "compression = \"gzip\"\n",
        )),
        ..Setup::default()
    };
    let mut gw = Gateway::start(&sub, &setup).unwrap();
    run_sim(gw.mqtt_port, &["-n", "10", "-m", "500", "--rate", "0"]).unwrap();
    assert!(gw.terminate().unwrap().success(), "{}", gw.log());
    let stats = proxy.stats().unwrap();
    let (objects, seqs) = bucket_seqs(&moto, true);
    let t = tally(&seqs, 10, 500, "dev");
    eprintln!("s3 with 40% failed PUTs: {stats}, {objects} objects, {t:?}");
    assert!(
        stats["s3_failed_after"].as_u64().unwrap() + stats["s3_failed_before"].as_u64().unwrap()
            > 0,
        "{stats}"
    );
    // A retried batch overwrites its own key: no copies even when a PUT failed after storing.
    assert_eq!(
        t,
        Tally {
            missing: 0,
            duplicates: 0
        }
    );
}

#[test]
fn a_missing_bucket_is_reported_and_the_gateway_keeps_buffering() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    let setup = Setup {
        destination: Some(s3_destination(&moto.endpoint(), "")),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    wait_until(Duration::from_secs(20), "the startup check", || {
        gw.log().contains("destination is not usable yet")
    })
    .unwrap();
    let log = gw.log();
    assert!(
        log.contains(&format!("bucket \\\"{BUCKET}\\\" does not exist"))
            || log.contains(&format!("bucket \"{BUCKET}\" does not exist")),
        "{log}"
    );
    // /healthz says which destination is down and why, from the start-up check on.
    let health = || {
        let (_, body) = http_get(gw.admin_port, "/healthz").unwrap();
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let h = health();
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["destinations"][0]["up"], false, "{h}");
    assert!(h["destinations"][0]["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("does not exist")));
    assert_eq!(
        gw.metric("edgehose_destination_up{destination=\"local\"}"),
        0.0
    );
    let summary = run_sim(gw.mqtt_port, &["-n", "2", "-m", "50", "--rate", "0"]).unwrap();
    assert_eq!(
        summary["acknowledged"], 100,
        "ingress keeps taking messages"
    );
    moto.create_bucket(BUCKET).unwrap();
    wait_until(
        Duration::from_secs(60),
        "delivery once the bucket exists",
        || gw.metric("edgehose_records_delivered_total{destination=\"local\"}") >= 100.0,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    let h = health();
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(
        gw.metric("edgehose_destination_up{destination=\"local\"}"),
        1.0
    );
    assert!(gw.terminate().unwrap().success());
    assert_exactly_once(&bucket_seqs(&moto, false).1, 2, 50, "dev");
}

#[test]
fn dynamic_partitioning_writes_one_object_per_device_and_errors_to_the_error_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    let setup = Setup {
        destination: Some(s3_destination(
            &moto.endpoint(),
            "prefix = \"device=!{partitionKeyFromQuery:device}/\"\n\
             error_output_prefix = \"errors/!{firehose:error-output-type}/\"\n\
             compression = \"gzip\"\n",
        )),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    run_sim(gw.mqtt_port, &["-n", "5", "-m", "50", "--rate", "0"]).unwrap();
    // JSON without the partition field: Firehose sends such records to the error output.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let orphans: Vec<(String, Vec<u8>)> = (0..10)
        .map(|i| {
            (
                "sensors/x/telemetry".to_string(),
                format!("{{\"seq\":{i}}}").into_bytes(),
            )
        })
        .collect();
    assert_eq!(rt.block_on(publish(gw.mqtt_port, "orphan", orphans)), 10);
    assert!(gw.terminate().unwrap().success(), "{}", gw.log());

    let objects = moto.objects(BUCKET).unwrap();
    let mut seqs = Vec::new();
    let mut errors = Vec::new();
    for o in &objects {
        let body = gunzip(&o.body);
        let lines: Vec<&[u8]> = body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        if let Some(rest) = o.key.strip_prefix("errors/processing-failed/") {
            assert!(rest.split('/').count() == 5, "{}", o.key);
            for l in lines {
                let v: serde_json::Value = serde_json::from_slice(l).unwrap();
                assert_eq!(
                    v["errorCode"],
                    "DynamicPartitioning.MetadataExtractionFailed"
                );
                assert!(v["arrivalTimestamp"].as_i64().unwrap() > 0);
                use base64::Engine;
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(v["rawData"].as_str().unwrap())
                    .unwrap();
                errors.push(String::from_utf8(raw).unwrap());
            }
            continue;
        }
        // device=<id>/yyyy/MM/dd/HH/<name>: every record of the object is that device's.
        let (partition, rest) = o.key.split_once('/').unwrap();
        let device = partition
            .strip_prefix("device=")
            .expect("a device partition");
        assert!(is_firehose_key(rest, Gateway::STREAM, ".gz"), "{}", o.key);
        for (d, s) in seqs_of(lines) {
            assert_eq!(d, device, "{}", o.key);
            seqs.push((d, s));
        }
    }
    assert_exactly_once(&seqs, 5, 50, "dev");
    errors.sort();
    assert_eq!(errors.len(), 10, "{errors:?}");
    assert!(errors.contains(&"{\"seq\":0}".to_string()));
}

#[test]
fn large_batches_go_up_by_multipart_upload() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    let setup = Setup {
        destination: Some(
            s3_destination(&moto.endpoint(), "multipart_threshold = \"5MiB\"\n")
                .replace("buffer_size = \"1MiB\"", "buffer_size = \"12MiB\"")
                .replace("buffer_interval = \"1s\"", "buffer_interval = \"60s\""),
        ),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let summary = run_sim(gw.mqtt_port, &["-n", "20", "-m", "2000", "--rate", "0"]).unwrap();
    assert_eq!(summary["acknowledged"], 40_000);
    assert!(gw.terminate().unwrap().success(), "{}", gw.log());
    let objects = moto.objects(BUCKET).unwrap();
    assert!(
        objects
            .iter()
            .any(|o| o.body.len() > 5 * 1024 * 1024 && o.etag.contains('-')),
        "an object over the threshold was put in parts: {:?}",
        objects
            .iter()
            .map(|o| (o.body.len(), &o.etag))
            .collect::<Vec<_>>()
    );
    assert_exactly_once(&bucket_seqs(&moto, false).1, 20, 2000, "dev");
}

#[test]
fn records_kinesis_cannot_take_go_to_the_error_output() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_stream(STREAM, 1).unwrap();
    let errors_root = dir.path().join("errors");
    let setup = Setup {
        destination: Some(kinesis_destination(
            &moto.endpoint(),
            &format!("error_output_root = \"{}\"\n", errors_root.display()),
        )),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    // `sensors//telemetry` matches `sensors/+/telemetry`, and its ${topic(2)} is empty: Kinesis
    // refuses an empty partition key.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let messages = vec![
        ("sensors/dev-0/telemetry".to_string(), telemetry("dev-0", 0)),
        ("sensors//telemetry".to_string(), telemetry("nobody", 0)),
        ("sensors/dev-0/telemetry".to_string(), telemetry("dev-0", 1)),
    ];
    assert_eq!(rt.block_on(publish(gw.mqtt_port, "c", messages)), 3);
    assert!(gw.terminate().unwrap().success(), "{}", gw.log());
    let records = moto.stream_records(STREAM, false).unwrap();
    assert_eq!(
        seqs_of(records.iter().map(|r| r.data.as_slice())),
        [("dev-0".to_string(), 0), ("dev-0".to_string(), 1)]
    );
    let mut found = Vec::new();
    let mut stack = vec![errors_root.join("local")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                found.push(p);
            }
        }
    }
    assert_eq!(found.len(), 1, "{found:?}");
    let rel = found[0].strip_prefix(errors_root.join("local")).unwrap();
    assert!(rel.starts_with("processing-failed"), "{rel:?}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&found[0]).unwrap()).unwrap();
    assert_eq!(v["errorCode"], "Kinesis.InvalidPartitionKey");
}

#[test]
fn region_and_endpoints_come_from_the_environment_when_the_config_has_none() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    moto.create_stream(STREAM, 1).unwrap();
    let cases = [
        (
            "s3",
            format!(
                "type = \"s3\"\nbucket = \"{BUCKET}\"\ndelivery_stream = \"{}\"\n",
                Gateway::STREAM
            ),
            vec![
                ("AWS_REGION", "us-east-1".to_string()),
                // The S3-specific variable beats the general one (which points nowhere).
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:9".to_string()),
                ("AWS_ENDPOINT_URL_S3", moto.endpoint()),
            ],
        ),
        (
            "kinesis",
            format!("type = \"kinesis\"\nstream = \"{STREAM}\"\n"),
            vec![
                ("AWS_DEFAULT_REGION", "us-east-1".to_string()),
                ("AWS_ENDPOINT_URL", moto.endpoint()),
            ],
        ),
    ];
    for (name, destination, env) in cases {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let setup = Setup {
            destination: Some(destination),
            env,
            ..Setup::default()
        };
        let mut gw = Gateway::start(&sub, &setup).unwrap();
        run_sim(gw.mqtt_port, &["-n", "2", "-m", "20", "--rate", "0"]).unwrap();
        assert!(gw.terminate().unwrap().success());
        assert_eq!(
            gw.metric("edgehose_delivery_errors_total{destination=\"local\"}"),
            0.0
        );
        let seqs = if name == "s3" {
            bucket_seqs(&moto, false).1
        } else {
            let r = moto.stream_records(STREAM, false).unwrap();
            seqs_of(r.iter().map(|r| r.data.as_slice()))
        };
        assert_exactly_once(&seqs, 2, 20, "dev");
        assert!(!gw.log().contains("not usable"), "{}", gw.log());
    }
}

#[test]
fn an_endpoint_in_the_config_beats_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    let setup = Setup {
        destination: Some(s3_destination(&moto.endpoint(), "")),
        env: vec![
            ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9".to_string()),
            ("AWS_REGION", "eu-north-1".to_string()),
        ],
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    run_sim(gw.mqtt_port, &["-n", "2", "-m", "20", "--rate", "0"]).unwrap();
    assert!(gw.terminate().unwrap().success());
    assert_exactly_once(&bucket_seqs(&moto, false).1, 2, 20, "dev");
}

/// A partitioned gzip destination whose objects (one per device) go through a proxy that dies
/// after a few PUTs, in the middle of a flush.
fn partitioned_setup(endpoint: &str) -> Setup {
    Setup {
        destination: Some(s3_destination(
            endpoint,
            "prefix = \"device=!{partitionKeyFromQuery:device}/\"\n\
             error_output_prefix = \"errors/!{firehose:error-output-type}/\"\n\
             compression = \"gzip\"\nput_concurrency = 2\n",
        )),
        shutdown_timeout: "60s",
        ..Setup::default()
    }
}

/// (device, seq) of every record in the partitioned bucket, and the number of objects.
fn partitioned_seqs(moto: &Moto) -> (usize, Vec<(String, u64)>) {
    let objects = moto.objects(BUCKET).unwrap();
    let mut lines = Vec::new();
    for o in &objects {
        assert!(o.key.starts_with("device="), "{}", o.key);
        lines.extend(
            gunzip(&o.body)
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(<[u8]>::to_vec),
        );
    }
    (objects.len(), seqs_of(lines.iter().map(Vec::as_slice)))
}

#[test]
fn an_endpoint_dying_mid_flush_leaves_every_record_once_and_delivery_resumes_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    // 7 objects of the first flush (20 partitions) go in, then the endpoint is down.
    let proxy = FaultProxy::start(moto.port, &["--down-after-puts", "7"]).unwrap();
    let mut gw = Gateway::start(dir.path(), &partitioned_setup(&proxy.endpoint())).unwrap();
    let s = run_sim(gw.mqtt_port, &["-n", "20", "-m", "50", "--rate", "0"]).unwrap();
    assert_eq!(s["acknowledged"], 1000);
    wait_until(Duration::from_secs(30), "the endpoint to go down", || {
        proxy.stats().is_ok_and(|s| s["down"] == true)
    })
    .unwrap();
    // Devices keep publishing during the outage; the backlog gauges follow the commits.
    let s = run_sim(
        gw.mqtt_port,
        &[
            "-n",
            "20",
            "-m",
            "50",
            "--rate",
            "0",
            "--first-device",
            "20",
        ],
    )
    .unwrap();
    assert_eq!(s["acknowledged"], 1000);
    let backlog = || gw.metric("edgehose_destination_backlog_records{destination=\"local\"}");
    wait_until(
        Duration::from_secs(10),
        "the backlog gauge to count the new records",
        || backlog() >= 1000.0,
    )
    .unwrap_or_else(|e| panic!("{e}: backlog {}", backlog()));
    wait_until(Duration::from_secs(30), "a failed delivery", || {
        gw.metric("edgehose_delivery_errors_total{destination=\"local\"}") >= 1.0
    })
    .unwrap();
    let (status, body) = http_get(gw.admin_port, "/healthz").unwrap();
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "degraded", "{body}");
    assert_eq!(health["destinations"][0]["up"], false, "{body}");
    assert!(health["destinations"][0]["down_since_ms"]
        .as_i64()
        .is_some());
    // Let the backoff grow past the probe interval: failures 1, 2, 4, 8 s apart.
    wait_until(Duration::from_secs(60), "a long backoff", || {
        gw.metric("edgehose_delivery_errors_total{destination=\"local\"}") >= 5.0
    })
    .unwrap();
    let delivered_before = gw.metric("edgehose_records_delivered_total{destination=\"local\"}");
    http_get(proxy.port, "/__heal").unwrap();
    let healed = std::time::Instant::now();
    wait_until(Duration::from_secs(30), "delivery to resume", || {
        gw.metric("edgehose_records_delivered_total{destination=\"local\"}") > delivered_before
    })
    .unwrap();
    let resumed = healed.elapsed();
    assert!(
        resumed <= Duration::from_secs(5),
        "delivery resumed {resumed:?} after the endpoint came back"
    );
    wait_until(Duration::from_secs(30), "the backlog to drain", || {
        gw.metric("edgehose_records_delivered_total{destination=\"local\"}") >= 2000.0
    })
    .unwrap();
    // Only the objects that failed were put again (same keys); the 7 that went in were not.
    let resent = gw.metric("edgehose_objects_resent_total{destination=\"local\"}");
    assert!((1.0..=13.0).contains(&resent), "{resent} objects resent");
    assert!(gw.log().contains("delivery recovered"));
    assert!(gw.terminate().unwrap().success());
    let (_, seqs) = partitioned_seqs(&moto);
    assert_exactly_once(&seqs, 40, 50, "dev");
}

#[test]
fn a_crash_between_intent_and_delivery_replays_the_same_objects() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path()).unwrap();
    moto.create_bucket(BUCKET).unwrap();
    let mut setup = partitioned_setup(&moto.endpoint());
    setup.env = vec![("EDGEHOSE_FAILPOINT", "delivery.after-first-put".into())];
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let s = run_sim(gw.mqtt_port, &["-n", "20", "-m", "50", "--rate", "0"]).unwrap();
    assert_eq!(s["acknowledged"], 1000);
    // The failpoint aborts the process once the first object of the first flush is in.
    let status = gw.terminate_wait().unwrap();
    assert!(!status.success());
    assert!(gw.log().contains("failpoint delivery.after-first-put"));
    let (objects_at_crash, _) = partitioned_seqs(&moto);
    assert!(
        (1..20).contains(&objects_at_crash),
        "{objects_at_crash} objects"
    );
    let (delivered, intent): (i64, Option<i64>) = rusqlite::Connection::open(gw.db_path())
        .unwrap()
        .query_row(
            "SELECT delivered_id, intent_last FROM destinations",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(delivered, 0);
    assert!(intent.is_some(), "the batch's intent is in the file");
    // Restarted without the failpoint: the batch is rebuilt and put under the same keys.
    gw.env.clear();
    gw.spawn().unwrap();
    wait_until(Duration::from_secs(30), "the replay", || {
        gw.metric("edgehose_records_delivered_total{destination=\"local\"}") >= 1000.0
    })
    .unwrap();
    let resent = gw.metric("edgehose_objects_resent_total{destination=\"local\"}");
    assert_eq!(
        resent, 20.0,
        "every object of the replayed batch is counted as resent"
    );
    assert_eq!(
        gw.metric("edgehose_records_resent_total{destination=\"local\"}"),
        1000.0
    );
    assert!(gw.terminate().unwrap().success());
    let (objects, seqs) = partitioned_seqs(&moto);
    assert_eq!(objects, 20, "one object per device, none twice");
    assert_exactly_once(&seqs, 20, 50, "dev");
}
