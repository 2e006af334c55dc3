//! The front door against third-party MQTT clients (Debian's mosquitto_pub and mosquitto_sub,
//! built on libmosquitto): MQTT 3.1.1 and 5, QoS 0 and 1, subscribe and receive, retained
//! messages, MQTT 5 reason codes, and duplicate client ids.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use edgehose_tests::*;

fn pub_(port: u16, version: &str, args: &[&str]) -> Output {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version])
        .args(args)
        .output()
        .expect("mosquitto_pub (apt-get install mosquitto-clients)")
}

fn sub(port: u16, version: &str, filter: &str, count: usize) -> Child {
    Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", version])
        .args([
            "-t",
            filter,
            "-C",
            &count.to_string(),
            "-W",
            "20",
            "-F",
            "%r %t %p",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)")
}

fn lines(child: Child) -> Vec<String> {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn mosquitto_clients_publish_and_subscribe_with_3_1_1_and_5() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let port = gw.mqtt_port;

    for version in ["mqttv311", "mqttv5"] {
        let before = gw.metric("edgehose_connections_total");
        let subscriber = sub(port, version, "sensors/#", 2);
        wait_until(Duration::from_secs(10), "the subscriber to connect", || {
            gw.metric("edgehose_connections_total") > before
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        for qos in ["0", "1"] {
            let body = format!(r#"{{"device":"{version}","seq":{qos}}}"#);
            let out = pub_(
                port,
                version,
                &["-q", qos, "-t", "sensors/d1/telemetry", "-m", &body],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let got = lines(subscriber);
        assert_eq!(
            got,
            [
                format!(r#"0 sensors/d1/telemetry {{"device":"{version}","seq":0}}"#),
                format!(r#"0 sensors/d1/telemetry {{"device":"{version}","seq":1}}"#),
            ]
        );
    }

    // A retained message, published at QoS 1 (so it is committed when mosquitto_pub returns),
    // reaches a later subscriber with the retain flag.
    let out = pub_(
        port,
        "mqttv311",
        &[
            "-q",
            "1",
            "-r",
            "-t",
            "sensors/d2/telemetry",
            "-m",
            r#"{"device":"d2","seq":0}"#,
        ],
    );
    assert!(out.status.success());
    let got = lines(sub(port, "mqttv5", "sensors/+/telemetry", 1));
    assert_eq!(got, [r#"1 sensors/d2/telemetry {"device":"d2","seq":0}"#]);

    // MQTT 5 says why a publish was refused.
    let out = pub_(
        port,
        "mqttv5",
        &["-q", "1", "-t", "sensors/d1/telemetry", "-m", "not json"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Payload format invalid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(gw.terminate().unwrap().success());
    let mut seqs = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
    seqs.sort();
    assert_eq!(
        seqs,
        [
            ("d2".to_string(), 0),
            ("mqttv311".to_string(), 0),
            ("mqttv311".to_string(), 1),
            ("mqttv5".to_string(), 0),
            ("mqttv5".to_string(), 1),
        ]
    );
}

#[test]
fn a_second_connection_with_the_same_client_id_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let port = gw.mqtt_port.to_string();
    let args = [
        "-d",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-V",
        "mqttv5",
        "-i",
        "same-id",
    ];
    let first = Command::new("mosquitto_sub")
        .args(args)
        .args(["-t", "x/#"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(10), "the first connection", || {
        gw.metric("edgehose_connections_total") >= 1.0
    })
    .unwrap();
    let body = r#"{"device":"d3","seq":0}"#;
    let out = pub_(
        gw.mqtt_port,
        "mqttv5",
        &[
            "-i",
            "same-id",
            "-q",
            "1",
            "-t",
            "sensors/d3/telemetry",
            "-m",
            body,
        ],
    );
    assert!(out.status.success());
    // The older connection was told "session taken over" (reason 0x8E = 142) and closed.
    let done = first.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(log.contains("Received DISCONNECT (142)"), "{log}");
    assert!(gw.terminate().unwrap().success());
}

#[test]
fn paho_mqtt_publishes_and_subscribes_with_3_1_1_and_5() {
    // tests/run.sh makes this venv (python3 -m venv; pip install paho-mqtt).
    let python = std::env::var("EDGEHOSE_TEST_PYTHON").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/test-venv/bin/python"
        )
        .to_string()
    });
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} is missing: run tests/run.sh, which creates the venv with paho-mqtt"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/conformance/paho_check.py"
        ))
        .arg(gw.mqtt_port.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "paho check failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(gw.terminate().unwrap().success());
    let mut seqs = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
    seqs.sort();
    let want: Vec<(String, u64)> = ["paho-v311", "paho-v5"]
        .iter()
        .flat_map(|d| [(d.to_string(), 0), (d.to_string(), 1)])
        .collect();
    assert_eq!(seqs, want);
}

#[test]
fn a_persistent_qos_1_subscription_gets_what_was_published_while_offline() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let port = gw.mqtt_port;
    for (version, session) in [
        ("mqttv311", vec!["-c"]),
        ("mqttv5", vec!["-c", "-x", "300"]),
    ] {
        let id = format!("persistent-{version}");
        let topic = format!("sensors/{version}/telemetry");
        let port_s = port.to_string();
        // The same client id, QoS 1 subscription and persistent session both times.
        let mut session_args = vec![
            "-h",
            "127.0.0.1",
            "-p",
            &port_s,
            "-V",
            version,
            "-i",
            &id,
            "-q",
            "1",
            "-t",
            &topic,
        ];
        session_args.extend(&session);
        // Subscribe, then go away (-E: exit once subscribed).
        let out = Command::new("mosquitto_sub")
            .args(&session_args)
            .arg("-E")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Published while the subscriber is offline.
        for seq in 0..3 {
            let body = format!(r#"{{"device":"{version}","seq":{seq}}}"#);
            let out = pub_(port, version, &["-q", "1", "-t", &topic, "-m", &body]);
            assert!(out.status.success());
        }
        // Back with the same session: the three messages arrive, at QoS 1.
        let out = Command::new("mosquitto_sub")
            .args(&session_args)
            .args(["-C", "3", "-W", "10", "-F", "%q %p"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        let want: Vec<String> = (0..3)
            .map(|seq| format!(r#"1 {{"device":"{version}","seq":{seq}}}"#))
            .collect();
        assert_eq!(got, want, "{version}");
    }
    assert!(gw.terminate().unwrap().success());
}

#[test]
fn a_will_is_committed_when_a_device_vanishes_but_not_after_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let port = gw.mqtt_port.to_string();
    let will = |device: &str| {
        let topic = format!("sensors/{device}/telemetry");
        let payload = format!(r#"{{"device":"{device}","seq":0}}"#);
        Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                "mqttv311",
                "-t",
                "x/#",
            ])
            .args([
                "--will-topic",
                &topic,
                "--will-payload",
                &payload,
                "--will-qos",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // One device vanishes (SIGKILL: no DISCONNECT), the other says goodbye (SIGINT: DISCONNECT).
    let mut vanished = will("vanished");
    let mut polite = will("polite");
    wait_until(Duration::from_secs(10), "both connections", || {
        gw.metric("edgehose_connections_total") >= 2.0
    })
    .unwrap();
    vanished.kill().unwrap();
    vanished.wait().unwrap();
    Command::new("kill")
        .args(["-INT", &polite.id().to_string()])
        .status()
        .unwrap();
    polite.wait().unwrap();
    wait_until(Duration::from_secs(10), "the will to be committed", || {
        gw.metric("edgehose_records_committed_total") >= 1.0
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(gw.terminate().unwrap().success());
    let seqs = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
    assert_eq!(seqs, [("vanished".to_string(), 0)]);
}

#[test]
fn a_silent_connection_is_closed_after_one_and_a_half_keep_alives() {
    use rumqttc::mqttbytes::v4::{Connect, Packet};
    use std::io::{Read, Write};

    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.mqtt_port)).unwrap();
    let mut connect = Connect::new("silent");
    connect.keep_alive = 1;
    let mut buf = bytes::BytesMut::new();
    Packet::Connect(connect).write(&mut buf, 1024).unwrap();
    s.write_all(&buf).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let n = s.read_to_end(&mut rest).unwrap_or(0);
    let waited = started.elapsed();
    assert_eq!(
        n, 0,
        "closed without a packet (MQTT 3.1.1 has no server DISCONNECT)"
    );
    assert!(
        waited >= Duration::from_millis(1400) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );
    assert!(gw.terminate().unwrap().success());
}
