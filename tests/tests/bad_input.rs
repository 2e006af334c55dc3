//! Bad input gets a clear error and loses nothing else: broken config names the key; oversized,
//! malformed, badly addressed and unroutable messages are refused and counted while the others
//! are delivered; a full buffer applies its policy; an unwritable destination keeps buffering.

use std::process::Command;
use std::time::Duration;

use edgehose_tests::*;

/// A directory laid out as a checkout after `./demo.sh`: the shipped policies under config/
/// and certificates from `edgehose certs` under data/pki (the shipped config's relative paths).
fn site() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("config/policies");
    std::fs::create_dir_all(&policies).unwrap();
    for p in ["device.json", "local.json"] {
        std::fs::copy(
            format!("{}/../config/policies/{p}", env!("CARGO_MANIFEST_DIR")),
            policies.join(p),
        )
        .unwrap();
    }
    let out = Command::new(bin("edgehose"))
        .args(["certs", "--dir"])
        .arg(dir.path().join("data/pki"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

fn check_config(text: &str) -> (bool, String) {
    let dir = site();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(bin("edgehose"))
        .current_dir(dir.path())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn shipped_config() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/edgehose.toml"
    ))
    .unwrap()
}

#[test]
fn check_config_accepts_the_shipped_default() {
    let (ok, err) = check_config(&shipped_config());
    assert!(ok, "{err}");
}

#[test]
fn check_config_names_the_key_and_the_problem() {
    let cases = [
        (
            "max_size = \"1GiB\"",
            "max_size = \"a lot\"",
            "buffer.max_size",
        ),
        (
            "when_full = \"block\"",
            "when_full = \"explode\"",
            "buffer.when_full",
        ),
        (
            "buffer_interval = \"60s\"",
            "buffer_interval = \"1h\"",
            "destinations.local.buffer_interval",
        ),
        (
            "buffer_size = \"5MiB\"",
            "buffer_size = \"512KiB\"",
            "destinations.local.buffer_size",
        ),
        (
            "listen = \"127.0.0.1:1883\"",
            "listen = \"localhost\"",
            "ingress.frontdoor.listen",
        ),
        (
            "receive_maximum = 64",
            "receive_maximum = 0",
            "ingress.frontdoor.receive_maximum",
        ),
        (
            "compression = \"none\"",
            "compression = \"lzma\"",
            "destinations.local.compression",
        ),
        (
            "destinations = [\"local\"]",
            "destinations = [\"s3\"]",
            "streams.telemetry.destinations[0]",
        ),
        ("[admin]", "[admin]\nport = 1", "admin.port"),
        (
            "client_certs = \"required\"",
            "client_certs = \"maybe\"",
            "ingress.frontdoor.tls.client_certs",
        ),
        (
            "attach = [\"*\"]",
            "attach = [\"everyone\"]",
            "ingress.frontdoor.auth.policies[0].attach",
        ),
    ];
    let base = shipped_config();
    for (from, to, key) in cases {
        assert!(
            base.contains(from),
            "the shipped config no longer has {from:?}"
        );
        let (ok, err) = check_config(&base.replacen(from, to, 1));
        assert!(!ok, "{to:?} was accepted");
        assert!(
            err.contains(&format!("`{key}`")),
            "{to:?}: error does not name {key}: {err}"
        );
    }
    let (ok, err) = check_config("this is not toml");
    assert!(!ok);
    assert!(!err.is_empty());
}

#[test]
fn check_config_names_the_file_and_the_problem_of_what_the_config_points_to() {
    let base = shipped_config();
    let cases = [
        // A policy the gateway cannot honour exactly is refused, naming the statement.
        (
            "file = \"config/policies/device.json\"",
            "file = \"bad.json\"",
            Some(
                r#"{"Statement":[{"Effect":"Allow","Action":"iot:Publish","Resource":"*","Condition":{"Bool":{"x":"true"}}}]}"#,
            ),
            "bad.json: Statement[0]: Condition is not supported",
        ),
        (
            "file = \"config/policies/device.json\"",
            "file = \"bad.json\"",
            Some(
                r#"{"Statement":[{"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:r:1:topic/${iot:Foo}"}]}"#,
            ),
            "${iot:Foo} is not supported",
        ),
        (
            "# password_file = \"data/passwd\"",
            "password_file = \"bad.passwd\"",
            Some("alice:plaintext\n"),
            "bad.passwd: line 1 (\"alice\")",
        ),
        (
            "key = \"data/pki/server.key\"",
            "key = \"data/pki/missing.key\"",
            None,
            "missing.key",
        ),
    ];
    for (from, to, file, says) in cases {
        assert!(
            base.contains(from),
            "the shipped config no longer has {from:?}"
        );
        let dir = site();
        if let Some(body) = file {
            let name = to.split('"').nth(1).unwrap();
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let path = dir.path().join("c.toml");
        std::fs::write(&path, base.replacen(from, to, 1)).unwrap();
        let out = Command::new(bin("edgehose"))
            .current_dir(dir.path())
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{to:?} was accepted");
        assert!(err.contains(says), "{to:?}: {err}");
        assert!(
            !err.contains("plaintext"),
            "a password reached the output: {err}"
        );
    }
}

#[test]
fn run_refuses_a_broken_config_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        shipped_config().replace("mode = \"frontdoor\"", "mode = \"bridge\""),
    )
    .unwrap();
    let out = Command::new(bin("edgehose"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`ingress.mode`"));
}

#[test]
fn refused_messages_are_counted_and_do_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let good = |seq| ("sensors/d1/telemetry".to_string(), telemetry("d1", seq));
    let messages = vec![
        good(0),
        ("sensors/d1/telemetry".into(), vec![b'x'; 200 * 1024]),
        good(1),
        (
            "sensors/d1/telemetry".into(),
            b"{\"device\": \"d1\", broken".to_vec(),
        ),
        good(2),
        ("elsewhere/d1".into(), telemetry("d1", 99)),
        good(3),
        ("sensors/1/2/3/4/5/6/7/8/9".into(), telemetry("d1", 98)),
        good(4),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(rt.block_on(publish(gw.mqtt_port, "bad-input", messages)), 9);
    wait_until(Duration::from_secs(10), "all nine messages counted", || {
        gw.metric("edgehose_messages_received_total") >= 9.0
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let m = gw.metrics().unwrap();
    let rejected = |reason: &str| {
        m.get(&format!(
            "edgehose_messages_rejected_total{{reason=\"{reason}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    assert_eq!(rejected("payload_too_large"), 1.0, "{m:?}");
    assert_eq!(rejected("malformed_payload"), 1.0, "{m:?}");
    assert_eq!(rejected("no_route"), 1.0, "{m:?}");
    assert_eq!(rejected("bad_topic"), 1.0, "{m:?}");
    assert_eq!(m["edgehose_records_committed_total"], 5.0);
    assert!(gw.terminate().unwrap().success());
    let seqs = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
    assert_eq!(
        seqs,
        (0..5).map(|s| ("d1".to_string(), s)).collect::<Vec<_>>()
    );
}

/// A destination that never flushes by itself, and a 1MiB buffer.
fn full_buffer_setup(when_full: &'static str) -> Setup {
    Setup {
        max_size: "1MiB",
        when_full,
        buffer_interval: "900s",
        buffer_size: "128MiB",
        ..Setup::default()
    }
}

#[test]
fn reject_new_refuses_what_does_not_fit_and_keeps_what_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &full_buffer_setup("reject_new")).unwrap();
    // 32,000 x ~300 bytes, ~3x smaller compressed in the buffer, = ~3MB against a 1MiB bound.
    let s = run_sim(gw.mqtt_port, &["-n", "4", "-m", "8000", "--rate", "0"]).unwrap();
    assert_eq!(s["acknowledged"], 32_000);
    wait_until(Duration::from_secs(10), "all messages counted", || {
        gw.metric("edgehose_messages_received_total") >= 32_000.0
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let rejected = gw.metric("edgehose_messages_rejected_total{reason=\"buffer_full\"}");
    let committed = gw.metric("edgehose_records_committed_total");
    assert!(rejected > 0.0, "nothing was rejected");
    assert_eq!(rejected + committed, 32_000.0);
    assert!(gw.metric("edgehose_buffer_bytes") <= 1024.0 * 1024.0);
    // /healthz says the buffer does not take writes, and why.
    let (status, body) = http_get(gw.admin_port, "/healthz").unwrap();
    assert_eq!(status, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "failing", "{body}");
    assert!(
        health["buffer"]["error"].as_str().unwrap().contains("full"),
        "{body}"
    );
    // An MQTT 5 device is told why (reason code 0x97, Quota exceeded).
    let out = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &gw.mqtt_port.to_string(),
            "-V",
            "mqttv5",
            "-q",
            "1",
        ])
        .args([
            "-t",
            "sensors/d1/telemetry",
            "-m",
            r#"{"device":"late","seq":0}"#,
        ])
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Quota exceeded"), "{stderr}");
    assert_eq!(
        gw.metric("edgehose_messages_rejected_total{reason=\"buffer_full\"}"),
        rejected + 1.0
    );
    assert!(gw.terminate().unwrap().success());
    let delivered = device_seqs(&read_objects(&gw.bucket_dir()).unwrap()).len();
    assert_eq!(
        delivered as f64, committed,
        "every committed record is delivered at shutdown"
    );
}

#[test]
fn drop_oldest_keeps_the_newest_and_counts_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &full_buffer_setup("drop_oldest")).unwrap();
    let s = run_sim(gw.mqtt_port, &["-n", "1", "-m", "32000", "--rate", "0"]).unwrap();
    assert_eq!(s["acknowledged"], 32_000);
    wait_until(Duration::from_secs(10), "all messages committed", || {
        gw.metric("edgehose_records_committed_total") >= 32_000.0
    })
    .unwrap();
    let dropped = gw.metric("edgehose_buffer_dropped_total");
    assert!(dropped > 0.0, "nothing was dropped");
    assert!(gw.terminate().unwrap().success());
    let seqs = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
    assert_eq!(seqs.len() as f64, 32_000.0 - dropped);
    // What survives is the newest, in order.
    let first = 32_000 - seqs.len() as u64;
    assert_eq!(
        seqs,
        (first..32_000)
            .map(|s| ("dev-0".to_string(), s))
            .collect::<Vec<_>>()
    );
}

#[test]
fn an_unwritable_destination_keeps_the_data_buffered_and_counts_errors() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        // Not creatable, even for root.
        root: "/proc/edgehose-test-out",
        buffer_interval: "0s",
        shutdown_timeout: "3s",
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let s = run_sim(gw.mqtt_port, &["-n", "2", "-m", "50", "--rate", "0"]).unwrap();
    assert_eq!(s["acknowledged"], 100);
    wait_until(Duration::from_secs(10), "a delivery error", || {
        gw.metric("edgehose_delivery_errors_total{destination=\"local\"}") >= 1.0
    })
    .unwrap();
    assert_eq!(http_get(gw.admin_port, "/healthz").unwrap().0, 200);
    assert!(gw.log().contains("delivery failed"));
    // Shutdown gives up on the destination after its timeout and keeps the data.
    assert!(gw.terminate().unwrap().success());
    assert_eq!(buffered_records(&gw.db_path()), 100);
}

#[test]
fn messages_rumqttd_drops_behind_a_blocked_buffer_are_counted() {
    // A full buffer under `block` and a destination that flushes only every 3 s: ingress stops
    // reading rumqttd, whose small log then overflows and drops what it already acknowledged.
    // The drops show as gaps in rumqttd's log offsets once ingress reads again.
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        rumqttd: true,
        broker_log: ("64KiB", 2),
        buffer_interval: "3s",
        ..full_buffer_setup("block")
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let s = run_sim(gw.mqtt_port, &["-n", "4", "-m", "10000", "--rate", "0"]).unwrap();
    let acked = s["acknowledged"].as_f64().unwrap();
    assert_eq!(acked, 40_000.0);
    // Every acknowledged message is either read off the link or counted as dropped.
    let counted = wait_until(
        Duration::from_secs(30),
        "received + dropped = acknowledged",
        || {
            gw.metric("edgehose_messages_received_total")
                + gw.metric("edgehose_broker_dropped_total")
                == acked
        },
    );
    if let Err(e) = counted {
        panic!(
            "{e}: received {} dropped {} committed {}",
            gw.metric("edgehose_messages_received_total"),
            gw.metric("edgehose_broker_dropped_total"),
            gw.metric("edgehose_records_committed_total")
        );
    }
    let gw_dropped = gw.metric("edgehose_broker_dropped_total");
    assert!(gw_dropped > 0.0);
    assert!(gw.metric("edgehose_buffer_full_waits_total") >= 1.0);
    assert!(gw.log().contains("rumqttd dropped acknowledged messages"));
    assert!(gw.terminate().unwrap().success());
    // What was read off the link is delivered.
    let delivered = device_seqs(&read_objects(&gw.bucket_dir()).unwrap()).len() as f64;
    assert_eq!(delivered, acked - gw_dropped);
}

/// The disk refuses every commit (the `buffer.commit` failpoint stands in for a full or failing
/// SD card): MQTT 5 devices get PUBACK "Unspecified error" instead of a closed socket, 3.1.1
/// devices get no PUBACK (the connection closes, so they resend), nothing is acknowledged as
/// stored, and /healthz says the buffer does not take writes.
#[test]
fn a_disk_that_refuses_commits_gives_mqtt_5_devices_a_reason_code() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        env: vec![("EDGEHOSE_FAILPOINT", "buffer.commit:fail".into())],
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let publish = |version: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &gw.mqtt_port.to_string()])
            .args(["-V", version, "-q", "1", "-t", "sensors/d1/telemetry"])
            .args(["-m", r#"{"device":"d1","seq":0}"#])
            .output()
            .expect("mosquitto_pub (apt-get install mosquitto-clients)")
    };
    let out = publish("mqttv5");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Unspecified error"), "{stderr}");
    let out = publish("mqttv311");
    assert!(
        !out.status.success(),
        "a 3.1.1 publish must not look stored"
    );
    let (status, body) = http_get(gw.admin_port, "/healthz").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("commits fail"), "{body}");
    assert!(gw.metric("edgehose_messages_rejected_total{reason=\"storage_error\"}") >= 2.0);
    assert!(gw.terminate().unwrap().success());
    assert_eq!(buffered_records(&gw.db_path()), 0);
}
