//! Persistent MQTT sessions and retained messages survive a restart of the gateway, a clean
//! one (SIGTERM) and a kill -9 once they were saved: a device that subscribed with a persistent
//! session, went offline and comes back after the restart gets what was published meanwhile.
//! The clients are Debian's mosquitto_sub and mosquitto_pub.

use std::process::{Command, Stdio};
use std::time::Duration;

use edgehose_tests::*;

/// mosquitto_sub with a persistent session (`-c`) as `id`, QoS 1, to `round`'s topics.
fn keeper(
    port: u16,
    version: &str,
    id: &str,
    round: usize,
    extra: &[&str],
) -> std::process::Output {
    let data = format!("sensors/d{round}/telemetry");
    let cfg = format!("sensors/cfg{round}/telemetry");
    let mut args = vec!["-h", "127.0.0.1", "-V", version, "-c", "-i", id, "-q", "1"];
    args.extend(["-t", &data, "-t", &cfg, "-W", "20", "-F", "%r %t %p"]);
    if version == "mqttv5" {
        args.extend(["-x", "3600"]);
    }
    Command::new("mosquitto_sub")
        .args(["-p", &port.to_string()])
        .args(args)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("mosquitto_sub (apt-get install mosquitto-clients)")
}

fn publish(port: u16, args: &[&str]) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(args)
        .output()
        .expect("mosquitto_pub");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Messages saved for `client_id`'s session.
fn saved_messages(gw: &Gateway, client_id: &str) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(
        gw.db_path(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    conn.query_row(
        "SELECT count(*) FROM mqtt_session_queue WHERE client_id = ?1",
        [client_id],
        |r| r.get(0),
    )
    .unwrap_or(0)
}

#[test]
fn persistent_sessions_and_retained_messages_survive_restarts_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    for (round, version) in ["mqttv311", "mqttv5"].into_iter().enumerate() {
        let id = format!("keeper-{version}");
        // Subscribe with a persistent session and leave at once (-E: exit once subscribed).
        let out = keeper(gw.mqtt_port, version, &id, round, &["-E"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let retained = format!("sensors/cfg{round}/telemetry");
        let data = format!("sensors/d{round}/telemetry");
        publish(gw.mqtt_port, &["-r", "-t", &retained, "-m", r#"{"cfg":1}"#]);
        for seq in 0..5 {
            publish(
                gw.mqtt_port,
                &["-t", &data, "-m", &format!(r#"{{"seq":{seq}}}"#)],
            );
        }
        if round == 0 {
            // A clean stop saves everything.
            assert!(gw.terminate().unwrap().success(), "{}", gw.log());
        } else {
            // A kill -9 loses only what was not saved yet: wait until it is.
            wait_until(Duration::from_secs(20), "the queued messages saved", || {
                saved_messages(&gw, &id) >= 6
            })
            .unwrap();
            gw.kill9().unwrap();
        }
        gw.spawn().unwrap();
        assert!(
            gw.log().contains("restored persistent MQTT sessions"),
            "{}",
            gw.log()
        );
        // Back after the restart: the six messages published while it was offline (the
        // retained one among them), then the retained one again (it subscribes again).
        let out = keeper(gw.mqtt_port, version, &id, round, &["-C", "7"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            gw.log()
        );
        for seq in 0..5 {
            assert!(
                text.contains(&format!(r#"{{"seq":{seq}}}"#)),
                "{text}\n{}",
                gw.log()
            );
        }
        assert!(
            text.contains(r#"{"cfg":1}"#),
            "the retained message: {text}"
        );
        // A new subscriber also gets the retained message.
        let out = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &gw.mqtt_port.to_string(),
                "-V",
                version,
            ])
            .args(["-t", &retained, "-C", "1", "-W", "20"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"cfg":1}"#);
    }
    assert!(gw.terminate().unwrap().success());
}
