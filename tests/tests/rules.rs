//! IoT rules end to end: devices publish over MQTT to the real gateway, whose streams carry rule
//! SQL; the `file` destinations show what each rule selected, reshaped, dropped or failed on.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use edgehose_tests::*;
use serde_json::{json, Value};

/// Raw readings to the `telemetry` bucket (the harness's stream); a rule that keeps alarms,
/// reshaped, to `alerts`; its failures, as IoT Core's error-action messages, to `rule-errors`;
/// a rule with no error stream, whose failures are refused.
/// The body of a `file` destination writing `bucket` under the scratch directory's `out/`,
/// flushed every second.
fn file(dir: &Path, bucket: &str) -> String {
    format!(
        "type = \"file\"\nroot = \"{}\"\nbucket = \"{bucket}\"\nbuffer_interval = \"1s\"\n",
        dir.join("out").display()
    )
}

fn setup(dir: &Path) -> Setup {
    Setup {
        extra: format!(
            r#"
[streams.alarms]
sql = "SELECT topic(2) AS device, clientid() AS client, reading.t AS t, round(reading.t * 1.8 + 32) AS fahrenheit, upper(site) AS site FROM 'sensors/+/telemetry' WHERE alarm"
error_stream = "rule_errors"
destinations = ["alerts"]

[streams.rule_errors]
destinations = ["errors"]

[streams.strict]
sql = "SELECT VALUE reading FROM 'strict/#' WHERE alarm"
destinations = ["alerts"]

[destinations.alerts]
{alerts}
[destinations.errors]
{errors}
"#,
            alerts = file(dir, "alerts"),
            errors = file(dir, "rule-errors"),
        ),
        ..Setup::default()
    }
}

fn records(dir: &Path, bucket: &str) -> Vec<Value> {
    read_objects(&dir.join("out").join(bucket))
        .unwrap()
        .iter()
        .flat_map(|o| o.records.iter())
        .map(|r| serde_json::from_slice(r).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_select_reshape_drop_and_report_failures() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &setup(dir.path())).unwrap();

    // 30 readings, a third of them without an alarm; one more from a device whose firmware
    // sends the alarm as a number (the rule's WHERE gives an Int, not a Boolean: a failure).
    let mut messages = Vec::new();
    for seq in 0..30u64 {
        let alarm = seq % 3 != 1;
        let t = 31.5 + seq as f64;
        let payload = json!({"seq": seq, "alarm": alarm, "reading": {"t": t}, "site": "north"});
        messages.push((
            "sensors/dev-1/telemetry".to_string(),
            payload.to_string().into_bytes(),
        ));
    }
    messages.push((
        "sensors/dev-2/telemetry".to_string(),
        br#"{"seq":0,"alarm":1,"reading":{"t":50}}"#.to_vec(),
    ));
    assert_eq!(publish(gw.mqtt_port, "client-a", messages).await, 31);

    wait_until(
        Duration::from_secs(30),
        "alerts and the rule error delivered",
        || {
            gw.metric("edgehose_records_delivered_total{destination=\"alerts\"}") >= 10.0
                && gw.metric("edgehose_records_delivered_total{destination=\"errors\"}") >= 1.0
                && gw.metric("edgehose_records_delivered_total{destination=\"local\"}") >= 31.0
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{:?}\n{}", gw.metrics(), gw.log()));

    // The raw stream has every reading as it came.
    assert_eq!(records(dir.path(), "telemetry").len(), 31);
    // The rule kept the twenty alarms, reshaped.
    let mut alerts = records(dir.path(), "alerts");
    alerts.sort_by_key(|a| a["t"].as_f64().unwrap() as i64);
    assert_eq!(alerts.len(), 20, "{alerts:?}");
    assert_eq!(
        alerts[0],
        json!({"device": "dev-1", "client": "client-a", "t": 31.5, "fahrenheit": 89, "site": "NORTH"})
    );
    assert_eq!(alerts[19]["t"], json!(60.5));
    // The failure went to the error stream in IoT Core's error-action shape, with the
    // original payload.
    let errors = records(dir.path(), "rule-errors");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["ruleName"], "alarms");
    assert_eq!(errors[0]["topic"], "sensors/dev-2/telemetry");
    assert_eq!(errors[0]["clientId"], "client-a");
    let original = base64_decode(errors[0]["base64OriginalPayload"].as_str().unwrap());
    assert_eq!(original, br#"{"seq":0,"alarm":1,"reading":{"t":50}}"#);
    assert!(
        errors[0]["failures"][0]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("not a Boolean"),
        "{errors:?}"
    );
    // Counted: 10 dropped by WHERE, 1 failure.
    assert_eq!(
        gw.metric("edgehose_rule_dropped_total{stream=\"alarms\"}"),
        10.0
    );
    assert_eq!(
        gw.metric("edgehose_rule_failures_total{stream=\"alarms\"}"),
        1.0
    );

    // A rule with no error stream refuses what it fails on: an MQTT 5 device sees the PUBACK's
    // reason code (mosquitto_pub reports the failed publish); what it selects is stored.
    let pubv5 = |payload: &str| {
        Command::new("mosquitto_pub")
            .args(["-V", "5", "-q", "1", "-h", "127.0.0.1", "-p"])
            .arg(gw.mqtt_port.to_string())
            .args(["-i", "strict-dev", "-t", "strict/dev-3", "-m", payload])
            .output()
            .unwrap()
    };
    let refused = pubv5(r#"{"alarm":"maybe","reading":{"t":1}}"#);
    let said = String::from_utf8_lossy(&refused.stderr).to_string()
        + &String::from_utf8_lossy(&refused.stdout);
    assert!(
        said.to_lowercase().contains("implementation specific"),
        "mosquitto_pub said: {said}"
    );
    let kept = pubv5(r#"{"alarm":true,"reading":{"t":2}}"#);
    assert!(kept.status.success(), "{kept:?}");
    wait_until(Duration::from_secs(30), "the strict rule's record", || {
        records(dir.path(), "alerts")
            .iter()
            .any(|r| *r == json!({"t": 2}))
    })
    .unwrap();
    assert_eq!(
        gw.metric("edgehose_messages_rejected_total{reason=\"rule_failed\"}"),
        1.0
    );
    assert!(gw.terminate().unwrap().success());
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn check_config_names_the_rule_and_where_its_sql_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edgehose.toml");
    std::fs::write(
        &config,
        r#"
[streams.alarms]
sql = "SELECT temperature FROM 'sensors/+/telemetry' WHERE temperature >> 30"
destinations = ["local"]

[destinations.local]
type = "file"
root = "out"
bucket = "readings"
"#,
    )
    .unwrap();
    let out = Command::new(bin("edgehose"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("streams.alarms.sql"), "{err}");
    assert!(
        err.contains("at character 66: expected an expression, found \">\""),
        "{err}"
    );
}

/// A windowed rule (per device, 2 s tumbling windows) under a simulated fleet, with the gateway
/// killed (-9) in the middle of the load and restarted; the devices ride it out (resending what
/// was not acknowledged). Every window is emitted once, and its values equal a recomputation
/// from the raw output, which a second rule stamps with the same arrival time the windows use
/// (`timestamp()`): a message stored twice (acknowledged, then resent) is in both.
#[test]
fn windows_survive_kill_9_under_load_and_match_the_raw_output() {
    const DEVICES: usize = 10;
    const WINDOW_MS: i64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        extra: format!(
            r#"
[streams.per_device]
sql = "SELECT topic(2) AS device, count(*) AS n, sum(seq) AS seqsum, avg(temperature_c) AS t, window_start() AS start FROM 'sensors/+/telemetry' GROUP BY topic(2), STEP(ROWTIME BY INTERVAL '2' SECOND)"
allowed_lateness = "2s"
destinations = ["agg"]

[streams.raw]
sql = "SELECT topic(2) AS device, seq, temperature_c, timestamp() AS arrival FROM 'sensors/+/telemetry'"
destinations = ["raw"]

[destinations.agg]
{agg}
[destinations.raw]
{raw}
"#,
            agg = file(dir.path(), "windows"),
            raw = file(dir.path(), "raw"),
        ),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let port = gw.mqtt_port;
    let sim = std::thread::spawn(move || {
        run_sim(
            port,
            &[
                "--devices",
                &DEVICES.to_string(),
                "--rate",
                "20",
                "--duration-secs",
                "8",
                "--timeout-secs",
                "120",
            ],
        )
    });
    // Kill once windows have been emitted and others are open.
    wait_until(Duration::from_secs(60), "a window emitted", || {
        gw.metric("edgehose_windows_emitted_total{stream=\"per_device\"}") >= 1.0
    })
    .unwrap();
    gw.kill9().unwrap();
    gw.spawn().unwrap();
    let s = sim.join().unwrap().unwrap();
    assert_eq!(s["failed_devices"], 0, "{s}");

    let counted = |rows: &[Value]| -> u64 { rows.iter().map(|r| r["n"].as_u64().unwrap()).sum() };
    wait_until(
        Duration::from_secs(60),
        "every raw record in an emitted window",
        || {
            let raw = records(dir.path(), "raw").len() as u64;
            raw >= DEVICES as u64 * 160 && counted(&records(dir.path(), "windows")) == raw
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: raw {}, counted {}\n{}",
            records(dir.path(), "raw").len(),
            counted(&records(dir.path(), "windows")),
            gw.log()
        )
    });
    assert_eq!(
        gw.metric("edgehose_window_late_records_total{stream=\"per_device\"}"),
        0.0
    );

    // Recompute every window from the raw output.
    let mut expected: std::collections::BTreeMap<(String, i64), (u64, u64, f64)> =
        Default::default();
    for r in records(dir.path(), "raw") {
        let start = r["arrival"].as_i64().unwrap().div_euclid(WINDOW_MS) * WINDOW_MS;
        let e = expected
            .entry((r["device"].as_str().unwrap().to_string(), start))
            .or_default();
        e.0 += 1;
        e.1 += r["seq"].as_u64().unwrap();
        e.2 += r["temperature_c"].as_f64().unwrap();
    }
    let mut got = std::collections::BTreeMap::new();
    for r in records(dir.path(), "windows") {
        let key = (
            r["device"].as_str().unwrap().to_string(),
            r["start"].as_i64().unwrap(),
        );
        let value = (
            r["n"].as_u64().unwrap(),
            r["seqsum"].as_u64().unwrap(),
            r["t"].as_f64().unwrap(),
        );
        assert!(
            got.insert(key.clone(), value).is_none(),
            "window emitted twice: {key:?}"
        );
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (key, (n, seqsum, t)) in &got {
        let (en, eseqsum, esum_t) = expected[key];
        assert_eq!((*n, *seqsum), (en, eseqsum), "{key:?}");
        assert!(
            (t - esum_t / en as f64).abs() < 1e-6,
            "{key:?}: {t} vs {}",
            esum_t / en as f64
        );
    }
    assert!(gw.terminate().unwrap().success());
}

/// A closed window of thousands of groups is emitted in pieces (a bounded number of rows per
/// transaction); the gateway aborts between two pieces (a failpoint, as a kill -9 there) and,
/// restarted, carries on: every group is emitted exactly once, with the window its reading's
/// arrival puts it in.
#[test]
fn a_window_killed_between_its_pieces_emits_every_group_once() {
    const DEVICES: u64 = 5;
    const PER_DEVICE: u64 = 600;
    const WINDOW_MS: i64 = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let mut setup = Setup {
        extra: format!(
            r#"
[streams.per_reading]
sql = "SELECT topic(2) AS device, seq, count(*) AS n, window_start() AS start FROM 'sensors/+/telemetry' GROUP BY topic(2), seq, STEP(ROWTIME BY INTERVAL '10' SECOND)"
allowed_lateness = "10s"
destinations = ["agg"]

[streams.raw]
sql = "SELECT topic(2) AS device, seq, timestamp() AS arrival FROM 'sensors/+/telemetry'"
destinations = ["raw"]

[destinations.agg]
{agg}
[destinations.raw]
{raw}
"#,
            agg = file(dir.path(), "windows"),
            raw = file(dir.path(), "raw"),
        ),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    // Every reading in and acknowledged well before the windows close (their lateness).
    let s = run_sim(
        gw.mqtt_port,
        &[
            "-n",
            &DEVICES.to_string(),
            "-m",
            &PER_DEVICE.to_string(),
            "--rate",
            "0",
        ],
    )
    .unwrap();
    assert_eq!(s["acknowledged"], DEVICES * PER_DEVICE, "{s}");
    assert_eq!(
        gw.metric("edgehose_windows_emitted_total{stream=\"per_reading\"}"),
        0.0,
        "a window closed before the restart: the load took longer than the lateness"
    );
    assert!(gw.terminate().unwrap().success());

    // Restarted with the failpoint: the window holding most readings (over 1,000 groups, so
    // more than one piece) gets its first piece committed, then the process aborts.
    setup.env = vec![("EDGEHOSE_FAILPOINT", "window.between-pieces".into())];
    gw.env = setup.env.clone();
    gw.spawn().unwrap();
    // The window closes up to its length plus the lateness after the load began.
    wait_until(Duration::from_secs(90), "the failpoint's abort", || {
        gw.log().contains("failpoint window.between-pieces")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    let status = gw.terminate_wait().unwrap();
    assert!(!status.success());
    assert!(
        gw.log().contains("failpoint window.between-pieces"),
        "{}",
        gw.log()
    );

    gw.env.clear();
    gw.spawn().unwrap();
    let total = (DEVICES * PER_DEVICE) as usize;
    wait_until(
        Duration::from_secs(60),
        "every reading in an emitted window",
        || {
            records(dir.path(), "raw").len() >= total
                && records(dir.path(), "windows").len() >= total
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: raw {}, windows {}\n{}",
            records(dir.path(), "raw").len(),
            records(dir.path(), "windows").len(),
            gw.log()
        )
    });
    let arrival: std::collections::BTreeMap<(String, u64), i64> = records(dir.path(), "raw")
        .iter()
        .map(|r| {
            let key = (
                r["device"].as_str().unwrap().to_string(),
                r["seq"].as_u64().unwrap(),
            );
            (key, r["arrival"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(arrival.len(), total, "a reading stored twice");
    let windows = records(dir.path(), "windows");
    assert_eq!(windows.len(), total, "a group emitted twice");
    let mut seen = std::collections::BTreeSet::new();
    for w in &windows {
        let key = (
            w["device"].as_str().unwrap().to_string(),
            w["seq"].as_u64().unwrap(),
        );
        assert_eq!(w["n"], 1, "{w}");
        assert_eq!(
            w["start"].as_i64().unwrap(),
            arrival[&key].div_euclid(WINDOW_MS) * WINDOW_MS,
            "{w}"
        );
        assert!(seen.insert(key), "emitted twice: {w}");
    }
    assert_eq!(
        gw.metric("edgehose_window_late_records_total{stream=\"per_reading\"}"),
        0.0
    );
    assert!(gw.terminate().unwrap().success());
}

/// A full buffer under `drop_oldest` removes the oldest input rows of an open window while the
/// gateway is down; the window, rebuilt after the restart from what is left, says so.
#[test]
fn a_window_whose_inputs_drop_oldest_removed_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        max_size: "1MiB",
        when_full: "drop_oldest",
        // The raw stream's destination holds everything: the buffer fills.
        buffer_interval: "900s",
        buffer_size: "128MiB",
        extra: format!(
            r#"
[streams.per_device]
sql = "SELECT topic(2) AS device, count(*) AS n FROM 'sensors/+/telemetry' GROUP BY topic(2), STEP(ROWTIME BY INTERVAL '20' SECOND)"
allowed_lateness = "0s"
destinations = ["agg"]

[destinations.agg]
{}"#,
            file(dir.path(), "windows")
        ),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    // Publish early in a 20 s window, so that the burst (a second or two) stays inside it.
    wait_until(
        Duration::from_secs(30),
        "the first half of a window",
        || epoch_ms() % 20_000 < 10_000,
    )
    .unwrap();
    let s = run_sim(gw.mqtt_port, &["-n", "1", "-m", "32000", "--rate", "0"]).unwrap();
    assert_eq!(s["acknowledged"], 32_000);
    assert!(gw.metric("edgehose_buffer_dropped_total") > 0.0);
    // Down before the window closes: at the restart it is rebuilt from what the buffer kept.
    gw.kill9().unwrap();
    gw.spawn().unwrap();
    wait_until(Duration::from_secs(60), "the window emitted", || {
        !records(dir.path(), "windows").is_empty()
    })
    .unwrap();
    let rows = records(dir.path(), "windows");
    let n: u64 = rows.iter().map(|r| r["n"].as_u64().unwrap()).sum();
    assert!(n > 0 && n < 32_000, "{rows:?}");
    assert!(
        rows.iter().all(|r| r["inputs_dropped"] == json!(true)),
        "{rows:?}"
    );
    assert!(gw.metric("edgehose_window_rows_inputs_dropped_total{stream=\"per_device\"}") >= 1.0);
    assert!(gw.terminate().unwrap().success());
}
