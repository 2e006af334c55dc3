//! Running under systemd, without systemd: the sd_notify protocol against a test NOTIFY_SOCKET
//! (READY, WATCHDOG, RELOADING, STOPPING in the right order; no watchdog pings while the buffer
//! writer is stuck), SIGHUP reloads, and journal-style log lines.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use edgehose_tests::*;

struct Notify {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl Notify {
    fn new(dir: &std::path::Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Self { socket, path }
    }

    /// Every message received within `within`, each split into its lines.
    fn drain(&self, within: Duration) -> Vec<String> {
        let end = Instant::now() + within;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.socket.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        out
    }
}

/// A gateway started as systemd would with `Type=notify` and `WatchdogSec=400ms`.
fn under_systemd(dir: &std::path::Path) -> (Notify, Gateway) {
    let notify = Notify::new(dir);
    let setup = Setup {
        env: vec![
            ("NOTIFY_SOCKET", notify.path.display().to_string()),
            ("WATCHDOG_USEC", "400000".to_string()),
        ],
        ..Setup::default()
    };
    let gw = Gateway::start(dir, &setup).unwrap();
    (notify, gw)
}

fn signal(gw: &Gateway, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &gw.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn sd_notify_ready_watchdog_reloading_stopping_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (notify, mut gw) = under_systemd(dir.path());
    let first = notify.drain(Duration::from_millis(1500));
    assert!(
        first[0].lines().any(|l| l == "READY=1"),
        "READY=1 comes first: {first:?}"
    );
    let pings = first.iter().filter(|m| m.trim() == "WATCHDOG=1").count();
    // Every 200 ms (half of WatchdogSec) for ~1.5 s.
    assert!(pings >= 4, "{first:?}");

    signal(&gw, "-HUP");
    let reload = notify.drain(Duration::from_millis(800));
    let pos = |what: &str| {
        reload
            .iter()
            .position(|m| m.lines().any(|l| l == what))
            .unwrap_or_else(|| panic!("no {what}: {reload:?}"))
    };
    assert!(pos("RELOADING=1") < pos("READY=1"), "{reload:?}");
    assert!(reload[pos("RELOADING=1")].contains("MONOTONIC_USEC="));

    signal(&gw, "-TERM");
    let end = notify.drain(Duration::from_millis(500));
    assert!(
        end.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "{end:?}"
    );
    assert!(gw.terminate_wait().unwrap().success());
}

#[test]
fn no_watchdog_pings_while_the_buffer_writer_is_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let (notify, mut gw) = under_systemd(dir.path());
    notify.drain(Duration::from_millis(500));
    // Another process holds SQLite's write lock: the writer's next commit waits on it.
    let lock = rusqlite::Connection::open(gw.db_path()).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let port = gw.mqtt_port;
    let publisher = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(publish(
            port,
            "stuck",
            vec![("sensors/d/telemetry".into(), telemetry("d", 0))],
        ))
    });
    std::thread::sleep(Duration::from_millis(300));
    let stuck = notify.drain(Duration::from_millis(1500));
    assert!(
        !stuck.iter().any(|m| m.trim() == "WATCHDOG=1"),
        "pinged while the writer was stuck: {stuck:?}; committed {}",
        gw.metric("edgehose_records_committed_total")
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    assert_eq!(
        publisher.join().unwrap(),
        1,
        "the message is taken once the lock goes"
    );
    let after = notify.drain(Duration::from_millis(1000));
    assert!(after.iter().any(|m| m.trim() == "WATCHDOG=1"), "{after:?}");
    assert!(gw.terminate().unwrap().success());
}

#[test]
fn sighup_applies_new_buffering_hints_and_names_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        buffer_interval: "300s",
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    run_sim(gw.mqtt_port, &["-n", "2", "-m", "5", "--rate", "0"]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        read_objects(&gw.bucket_dir()).unwrap().is_empty(),
        "held for 300 s"
    );

    // A broken config is refused, and the gateway keeps running on the old one.
    let good = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(
        &gw.config_path,
        good.replace("buffer_interval = \"300s\"", "buffer_interval = \"1000s\""),
    )
    .unwrap();
    signal(&gw, "-HUP");
    wait_until(Duration::from_secs(5), "the refusal", || {
        gw.log().contains("reload refused")
    })
    .unwrap();
    assert!(
        gw.log().contains("destinations.local.buffer_interval"),
        "{}",
        gw.log()
    );

    // Shorter hints apply at once; a new listen address waits for a restart, and says so.
    let listen = format!("127.0.0.1:{}", gw.mqtt_port);
    std::fs::write(
        &gw.config_path,
        good.replace("buffer_interval = \"300s\"", "buffer_interval = \"1s\"")
            .replace(&listen, "127.0.0.1:1"),
    )
    .unwrap();
    signal(&gw, "-HUP");
    wait_until(
        Duration::from_secs(10),
        "delivery under the new interval",
        || {
            read_objects(&gw.bucket_dir())
                .map(|o| !o.is_empty())
                .unwrap_or(false)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    let log = gw.log();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(
        log.contains("only after a restart") && log.contains("ingress"),
        "{log}"
    );
    // Still listening where it started.
    run_sim(gw.mqtt_port, &["-n", "1", "-m", "1", "--rate", "0"]).unwrap();
    assert!(gw.terminate().unwrap().success());
}

#[test]
fn journal_lines_carry_syslog_priorities_and_no_timestamps() {
    // JOURNAL_STREAM must name the device and inode of stderr; the harness's log file is it.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("edgehose.log");
    std::fs::write(&log, "").unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    use std::os::unix::fs::MetadataExt;
    let setup = Setup {
        env: vec![("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))],
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    assert!(gw.terminate().unwrap().success());
    let text = gw.log();
    let ready = text
        .lines()
        .find(|l| l.contains("edgehose ready"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(ready.starts_with("<6>edgehose: "), "{ready}");
    assert!(
        !text.lines().any(|l| l.starts_with("20")),
        "no timestamps: {text}"
    );
}
