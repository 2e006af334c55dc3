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
