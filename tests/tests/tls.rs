//! The front door's TLS listener, device identity and IoT policies, against clients no one here
//! wrote (Debian's mosquitto_pub and mosquitto_sub, paho-mqtt) with certificates made by
//! `edgehose certs`: trusted devices publish; unknown, expired and revoked certificates, wrong
//! passwords and plain TCP on the TLS port are refused; a device stays under its own topics; a
//! certificate reloaded on SIGHUP serves the next handshake while open connections stay up;
//! garbage, stalled handshakes and a thousand idle TLS connections do not stop good devices.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use edgehose_tests::*;

/// For the operator "alice": publish to any device's topics.
const OPERATOR: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": ["iot:Connect", "iot:Publish"],
     "Resource": ["arn:aws:iot:*:*:client/alice", "arn:aws:iot:*:*:topic/sensors/*"]}
  ]
}"#;

const POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    {"Effect": "Allow", "Action": "iot:Connect",
     "Resource": "arn:aws:iot:eu-west-1:123456789012:client/${iot:Connection.Thing.ThingName}"},
    {"Effect": "Allow", "Action": ["iot:Publish", "iot:RetainPublish", "iot:Receive"],
     "Resource": "arn:aws:iot:eu-west-1:123456789012:topic/sensors/${iot:ClientId}/*"},
    {"Effect": "Allow", "Action": "iot:Subscribe",
     "Resource": "arn:aws:iot:eu-west-1:123456789012:topicfilter/sensors/${iot:ClientId}/*"}
  ]
}"#;

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("command runs")
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn certs(pki: &Path, args: &[&str]) -> String {
    ok(Command::new(bin("edgehose"))
        .args(["certs", "--dir"])
        .arg(pki)
        .args(args))
}

struct Site {
    _dir: tempfile::TempDir,
    pki: PathBuf,
    gw: Gateway,
    tls_port: u16,
}

impl Site {
    /// A CA with devices dev-a, dev-b, dev-c (revoked by the deny list), dev-d (revoked by
    /// the CRL), an expired device, a stranger's CA, a password user, and the gateway with
    /// TLS (client certificates optional, so password users can connect) and the device policy.
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let pki = d.join("pki");
        certs(
            &pki,
            &[
                "--host",
                "127.0.0.1",
                "--host",
                "localhost",
                "--device",
                "dev-a",
                "--device",
                "dev-b",
                "--device",
                "dev-c",
                "--device",
                "dev-d",
            ],
        );
        // Keys are for the service user only.
        for key in ["ca.key", "server.key", "devices/dev-a.key"] {
            let mode = std::fs::metadata(pki.join(key)).unwrap().permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                0o600,
                "{key}"
            );
        }
        // Made three days ago, valid for one: expired.
        ok(Command::new("faketime")
            .arg("3 days ago")
            .arg(bin("edgehose"))
            .args(["certs", "--dir"])
            .arg(&pki)
            .args(["--device", "old", "--days", "1"]));
        // dev-d revoked in the CRL only, dev-c in the deny list only.
        certs(&pki, &["--revoke", "dev-d"]);
        std::fs::copy(pki.join("ca.crl"), pki.join("crl-d.pem")).unwrap();
        certs(&pki, &["--revoke", "dev-c"]);
        let list = std::fs::read_to_string(pki.join("revoked.txt")).unwrap();
        let only_c: String = list
            .lines()
            .filter(|l| l.contains("dev-c"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(pki.join("revoked-c.txt"), only_c).unwrap();
        // A certificate whose common name is not its thing (as AWS-made IoT Core certificates
        // are): attached to thing sensor-9 in the things file.
        certs(&pki, &["--device", "aws-made"]);
        let der = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(pki.join("devices/aws-made.crt"))
            .output()
            .unwrap();
        let fp = String::from_utf8_lossy(&der.stdout)
            .split('=')
            .nth(1)
            .unwrap()
            .trim()
            .to_string();
        std::fs::write(pki.join("things.txt"), format!("{fp} sensor-9\n")).unwrap();
        // Another CA's device with a trusted device's name.
        certs(&d.join("stranger"), &["--device", "dev-a"]);
        ok(Command::new("mosquitto_passwd")
            .args(["-c", "-b"])
            .arg(d.join("passwd"))
            .args(["alice", "s3cret-pw"]));
        std::fs::write(d.join("device.json"), POLICY).unwrap();
        std::fs::write(d.join("operator.json"), OPERATOR).unwrap();

        let tls_port = free_port();
        let frontdoor = format!(
            "connect_timeout = \"3s\"\n\
             [ingress.frontdoor.auth]\n\
             password_file = \"{passwd}\"\n\
             [[ingress.frontdoor.auth.policies]]\n\
             file = \"{policy}\"\n\
             attach = [\"*\"]\n\
             [[ingress.frontdoor.auth.policies]]\n\
             file = \"{operator}\"\n\
             attach = [\"thing:alice\"]\n\
             [ingress.frontdoor.tls]\n\
             listen = \"127.0.0.1:{tls_port}\"\n\
             cert = \"{pki}/server.crt\"\n\
             key = \"{pki}/server.key\"\n\
             client_ca = \"{pki}/ca.crt\"\n\
             client_certs = \"optional\"\n\
             crl = [\"{pki}/crl-d.pem\"]\n\
             revoked = \"{pki}/revoked-c.txt\"\n\
             things = \"{pki}/things.txt\"\n",
            passwd = d.join("passwd").display(),
            policy = d.join("device.json").display(),
            operator = d.join("operator.json").display(),
            pki = pki.display(),
        );
        let setup = Setup {
            frontdoor: Box::leak(frontdoor.into_boxed_str()),
            buffer_interval: "60s",
            ..Setup::default()
        };
        let gw = Gateway::start(d, &setup).unwrap();
        Self {
            _dir: dir,
            pki,
            gw,
            tls_port,
        }
    }

    /// mosquitto_pub over TLS as `device` (a certificate under devices/, or none).
    fn publish(
        &self,
        version: &str,
        device: Option<&str>,
        client_id: &str,
        topic: &str,
        extra: &[&str],
    ) -> Output {
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.tls_port.to_string(),
            "-V",
            version,
        ])
        .arg("--cafile")
        .arg(self.pki.join("ca.crt"))
        .args(["-i", client_id, "-t", topic, "-q", "1"])
        .args(["-m", &format!("{{\"device\":\"{client_id}\",\"seq\":1}}")]);
        if let Some(dev) = device {
            cmd.arg("--cert")
                .arg(self.pki.join(format!("devices/{dev}.crt")))
                .arg("--key")
                .arg(self.pki.join(format!("devices/{dev}.key")));
        }
        cmd.args(extra);
        run(&mut cmd)
    }

    /// mosquitto_sub over TLS as `device` (its certificate under devices/, and its id as client
    /// id); the caller adds the topic and the rest.
    fn subscriber(&self, version: &str, device: &str) -> Command {
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &self.tls_port.to_string()])
            .args(["-V", version, "-i", device])
            .arg("--cafile")
            .arg(self.pki.join("ca.crt"))
            .arg("--cert")
            .arg(self.pki.join(format!("devices/{device}.crt")))
            .arg("--key")
            .arg(self.pki.join(format!("devices/{device}.key")));
        cmd
    }

    fn committed(&self) -> f64 {
        self.gw.metric("edgehose_records_committed_total")
    }

    fn refused(&self, action: &str, reason: &str) -> f64 {
        self.gw.metric(&format!(
            "edgehose_auth_refused_total{{action=\"{action}\",reason=\"{reason}\"}}"
        ))
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn trusted_devices_publish_and_everyone_else_is_refused() {
    let site = Site::start();
    // A trusted device, 3.1.1 and 5: committed when mosquitto_pub returns (QoS 1).
    for (i, v) in ["mqttv311", "mqttv5"].into_iter().enumerate() {
        let o = site.publish(v, Some("dev-a"), "dev-a", "sensors/dev-a/telemetry", &[]);
        assert!(o.status.success(), "{v}: {}", text(&o));
        assert_eq!(site.committed(), (i + 1) as f64, "{v}");
    }
    // A password user over TLS without a certificate (thing name = username).
    let alice = |pw: &str| {
        site.publish(
            "mqttv5",
            None,
            "alice",
            "sensors/alice/telemetry",
            &["-u", "alice", "-P", pw],
        )
    };
    let o = alice("s3cret-pw");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(site.committed(), 3.0);

    // Refused: each fails, nothing is committed, and it is counted by reason.
    let o = alice("wrong");
    assert!(!o.status.success());
    assert!(
        text(&o)
            .to_lowercase()
            .contains("bad user name or password"),
        "{}",
        text(&o)
    );
    assert_eq!(site.refused("connect", "bad_credentials"), 1.0);
    // No certificate and no password on a listener without anonymous access.
    let o = site.publish("mqttv5", None, "nobody", "sensors/nobody/telemetry", &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).to_lowercase().contains("not authorized"),
        "{}",
        text(&o)
    );
    for dev in ["old", "dev-c", "dev-d"] {
        let o = site.publish(
            "mqttv311",
            Some(dev),
            dev,
            &format!("sensors/{dev}/telemetry"),
            &[],
        );
        assert!(!o.status.success(), "{dev} was let in: {}", text(&o));
    }
    // A stranger's certificate with a trusted device's name.
    let mut cmd = Command::new("mosquitto_pub");
    let stranger = site.pki.parent().unwrap().join("stranger/devices");
    let o = run(cmd
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &site.tls_port.to_string(),
            "-i",
            "dev-a",
            "-q",
            "1",
        ])
        .args(["-t", "sensors/dev-a/telemetry", "-m", "{}"])
        .arg("--cafile")
        .arg(site.pki.join("ca.crt"))
        .arg("--cert")
        .arg(stranger.join("dev-a.crt"))
        .arg("--key")
        .arg(stranger.join("dev-a.key")));
    assert!(!o.status.success(), "a stranger's certificate was accepted");
    // Plain MQTT on the TLS port.
    let o = run(Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &site.tls_port.to_string(),
            "-i",
            "dev-a",
            "-q",
            "1",
        ])
        .args(["-t", "sensors/dev-a/telemetry", "-m", "{}"]));
    assert!(
        !o.status.success(),
        "plain MQTT on the TLS port was accepted"
    );
    assert_eq!(site.committed(), 3.0, "a refused client got a message in");
    // The revoked-list device got through the handshake and was stopped after it; the others
    // in the handshake (expired, CRL, unknown CA, plain TCP).
    assert_eq!(site.refused("connect", "revoked"), 1.0);
    assert!(site.refused("connect", "tls_handshake") >= 4.0);
    // And the gateway still serves.
    let o = site.publish(
        "mqttv5",
        Some("dev-b"),
        "dev-b",
        "sensors/dev-b/telemetry",
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(site.committed(), 4.0);
    let log = site.gw.log();
    assert!(
        !log.contains("s3cret-pw") && !log.contains("wrong\""),
        "a password reached the log"
    );
}

#[test]
fn a_device_stays_under_its_own_topics() {
    let site = Site::start();
    // Another device's topic: MQTT 5 gets PUBACK "Not authorized" (0x87) and stays connected;
    // 3.1.1 is disconnected (IoT Core's behaviour). Nothing is committed.
    let o = site.publish(
        "mqttv5",
        Some("dev-a"),
        "dev-a",
        "sensors/dev-b/telemetry",
        &[],
    );
    assert!(
        !o.status.success() || text(&o).contains("Not authorized"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("Not authorized") || text(&o).contains("135"),
        "{}",
        text(&o)
    );
    let o = site.publish(
        "mqttv311",
        Some("dev-a"),
        "dev-a",
        "sensors/dev-b/telemetry",
        &[],
    );
    assert!(
        !o.status.success(),
        "3.1.1 publish to another device's topic: {}",
        text(&o)
    );
    // Its certificate does not let it connect as another client id.
    let o = site.publish(
        "mqttv5",
        Some("dev-a"),
        "dev-b",
        "sensors/dev-b/telemetry",
        &[],
    );
    assert!(!o.status.success());
    assert!(
        text(&o).to_lowercase().contains("not authorized"),
        "{}",
        text(&o)
    );
    assert_eq!(site.committed(), 0.0);
    assert_eq!(site.refused("publish", "not_authorized"), 2.0);
    assert_eq!(site.refused("connect", "not_authorized"), 1.0);

    // Subscribing to `#` is refused (MQTT 5: 0x87; 3.1.1: 0x80); its own filter is granted.
    for v in ["mqttv5", "mqttv311"] {
        let o = run(site
            .subscriber(v, "dev-a")
            .args(["-t", "#", "-E", "-W", "10"]));
        assert!(
            text(&o).contains("All subscription requests were denied"),
            "{v}: subscribe to # was granted: {}",
            text(&o)
        );
    }
    assert_eq!(site.refused("subscribe", "not_authorized"), 2.0);

    // `edgehose policy test` gives the same answers.
    let test = |args: &[&str]| {
        Command::new(bin("edgehose"))
            .args(["policy", "test", "--config"])
            .arg(&site.gw.config_path)
            .arg("--cert")
            .arg(site.pki.join("devices/dev-a.crt"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = test(&["--client-id", "dev-a", "publish", "sensors/dev-a/telemetry"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).starts_with("ALLOW"), "{}", text(&o));
    let o = test(&["--client-id", "dev-a", "subscribe", "#"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).starts_with("DENY (no statement allows it)"),
        "{}",
        text(&o)
    );
    let o = test(&["--client-id", "dev-b", "connect"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

/// SHA-256 of the certificate the TLS port presents, by openssl s_client.
fn served_fingerprint(port: u16) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let _ = child.wait();
    let pem = out
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)
        .and_then(|s| s.split("-----END CERTIFICATE-----").next())
        .map(|b| format!("-----BEGIN CERTIFICATE-----{b}-----END CERTIFICATE-----\n"))
        .expect("s_client printed the server certificate");
    file_fingerprint_pem(&pem)
}

fn file_fingerprint_pem(pem: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_certificate_reloaded_on_sighup_serves_the_next_handshake_and_open_connections_stay() {
    let mut site = Site::start();
    let before = served_fingerprint(site.tls_port);
    assert_eq!(
        before,
        file_fingerprint_pem(&std::fs::read_to_string(site.pki.join("server.crt")).unwrap())
    );
    // dev-a subscribes to its own topics and stays connected.
    let sub = site
        .subscriber("mqttv5", "dev-a")
        .args(["-t", "sensors/dev-a/#", "-q", "1", "-C", "1", "-W", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "the subscriber to connect", || {
        site.gw.metric("edgehose_connections_total") >= 1.0
    })
    .unwrap();
    // A new server certificate, then SIGHUP.
    certs(&site.pki, &["--host", "127.0.0.1", "--host", "localhost"]);
    let renewed =
        file_fingerprint_pem(&std::fs::read_to_string(site.pki.join("server.crt")).unwrap());
    assert_ne!(before, renewed);
    ok(Command::new("kill").args(["-HUP", &site.gw.pid().to_string()]));
    wait_until(Duration::from_secs(30), "the TLS reload", || {
        site.gw
            .log()
            .contains("TLS certificates, CA, CRLs and revoked list reloaded")
    })
    .unwrap();
    assert_eq!(served_fingerprint(site.tls_port), renewed);
    // A new handshake works with the renewed certificate, and the subscriber connected before
    // the reload gets what alice (whose operator policy allows any sensors/ topic) publishes.
    let o = site.publish(
        "mqttv5",
        None,
        "alice",
        "sensors/dev-a/telemetry",
        &["-u", "alice", "-P", "s3cret-pw"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = sub.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the open connection lost: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"alice\""),
        "{}",
        text(&out)
    );
    site.gw.terminate().unwrap();
}

/// OpenSSL's client (mosquitto's) with each TLS version and AEAD the gateway negotiates, both
/// ways: a retained publish in, the same message out to a subscriber with the same settings
/// (the gateway's record layer against an implementation it was not written with).
#[test]
fn openssl_clients_with_each_tls_version_and_cipher_publish_and_receive() {
    let site = Site::start();
    let cases: [(&str, &[&str]); 4] = [
        ("tlsv1.3", &[]),
        ("tlsv1.2", &["--ciphers", "ECDHE-ECDSA-AES128-GCM-SHA256"]),
        ("tlsv1.2", &["--ciphers", "ECDHE-ECDSA-AES256-GCM-SHA384"]),
        ("tlsv1.2", &["--ciphers", "ECDHE-ECDSA-CHACHA20-POLY1305"]),
    ];
    for (i, (version, ciphers)) in cases.into_iter().enumerate() {
        let topic = "sensors/dev-a/telemetry";
        let mut args = vec!["--tls-version", version, "-r"];
        args.extend_from_slice(ciphers);
        let o = site.publish("mqttv5", Some("dev-a"), "dev-a", topic, &args);
        assert!(o.status.success(), "{version} {ciphers:?}: {}", text(&o));
        assert_eq!(site.committed(), (i + 1) as f64, "{version} {ciphers:?}");
        let o = run(site
            .subscriber("mqttv5", "dev-a")
            .args(["--tls-version", version])
            .args(ciphers)
            .args(["-t", topic, "-C", "1", "-W", "10"]));
        assert!(
            o.status.success() && text(&o).contains("\"seq\":1"),
            "{version} {ciphers:?}: the retained message did not come back: {}",
            text(&o)
        );
    }
}

#[test]
fn paho_publishes_over_mutual_tls_with_3_1_1_and_5() {
    let site = Site::start();
    let script = r#"
import sys, ssl, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
port, ca, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
for proto in (mqtt.MQTTv311, mqtt.MQTTv5):
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-b", protocol=proto)
    c.tls_set(ca_certs=ca, certfile=cert, keyfile=key, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    c.connect("127.0.0.1", port)
    c.loop_start()
    info = c.publish("sensors/dev-b/telemetry", '{"device":"dev-b","seq":%d}' % proto, qos=1)
    info.wait_for_publish(timeout=20)
    assert info.is_published(), proto
    c.disconnect()
    c.loop_stop()
print("ok")
"#;
    let o = run(Command::new(venv_python())
        .arg("-c")
        .arg(script)
        .arg(site.tls_port.to_string())
        .arg(site.pki.join("ca.crt"))
        .arg(site.pki.join("devices/dev-b.crt"))
        .arg(site.pki.join("devices/dev-b.key")));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(site.committed(), 2.0);
}

#[test]
fn garbage_stalled_handshakes_and_a_thousand_idle_tls_connections_do_not_stop_good_devices() {
    let site = Site::start();
    let addr = format!("127.0.0.1:{}", site.tls_port);
    // Garbage, a truncated ClientHello, and one that stalls after a few bytes.
    for bytes in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..],
        &[0x16, 0x03][..],
    ] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.write_all(bytes).unwrap();
    }
    // A thousand connections that never handshake, held open.
    let idle: Vec<std::net::TcpStream> = (0..1000)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    // A good device connects and publishes meanwhile.
    let o = site.publish(
        "mqttv5",
        Some("dev-a"),
        "dev-a",
        "sensors/dev-a/telemetry",
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(site.committed(), 1.0);
    // The idle ones are closed after the connect timeout (3 s here): their slots come back.
    wait_until(
        Duration::from_secs(60),
        "idle TLS connections to time out",
        || site.refused("connect", "tls_handshake_timeout") >= 1000.0,
    )
    .unwrap();
    drop(idle);
    let o = site.publish(
        "mqttv311",
        Some("dev-b"),
        "dev-b",
        "sensors/dev-b/telemetry",
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(site.committed(), 2.0);
}

#[test]
fn a_certificate_attached_to_a_thing_acts_as_that_thing() {
    let site = Site::start();
    // Its thing is sensor-9 (things.txt), not its common name.
    let o = site.publish(
        "mqttv5",
        Some("aws-made"),
        "sensor-9",
        "sensors/sensor-9/telemetry",
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(site.committed(), 1.0);
    let o = site.publish(
        "mqttv5",
        Some("aws-made"),
        "aws-made",
        "sensors/aws-made/telemetry",
        &[],
    );
    assert!(
        !o.status.success(),
        "connected as its common name: {}",
        text(&o)
    );
    assert!(
        text(&o).to_lowercase().contains("not authorized"),
        "{}",
        text(&o)
    );
    let o = Command::new(bin("edgehose"))
        .args(["policy", "test", "--config"])
        .arg(&site.gw.config_path)
        .arg("--cert")
        .arg(site.pki.join("devices/aws-made.crt"))
        .args(["--client-id", "sensor-9", "connect"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}
