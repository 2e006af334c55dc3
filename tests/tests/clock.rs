//! The wall clock steps under a running gateway (libfaketime on the daemon process; NTP's step
//! after boot on a Pi without an RTC): flush deadlines run on the monotonic clock and do not
//! move, records keep the stamps they arrived with, and the step is logged and counted.

use std::time::Duration;

use edgehose_tests::*;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

fn delivered(gw: &Gateway) -> f64 {
    gw.metric("edgehose_records_delivered_total{destination=\"local\"}")
}

/// Steps the daemon's wall clock to `offset` (libfaketime syntax, e.g. "-1h") and waits until
/// the daemon has noticed `steps` steps.
fn step(gw: &Gateway, file: &std::path::Path, offset: &str, steps: f64) {
    std::fs::write(file, offset).unwrap();
    wait_until(Duration::from_secs(20), "the step to be noticed", || {
        gw.metric("edgehose_clock_steps_total") >= steps
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
}

#[test]
fn clock_steps_neither_stall_nor_misdate_delivery() {
    if !std::path::Path::new(LIBFAKETIME).exists() {
        panic!("{LIBFAKETIME} is missing: install Debian's faketime (tests/run.sh does)");
    }
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+0").unwrap();
    let setup = Setup {
        buffer_interval: "3s",
        env: vec![
            ("LD_PRELOAD", LIBFAKETIME.into()),
            ("FAKETIME_TIMESTAMP_FILE", offset.display().to_string()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into()),
            ("FAKETIME_NO_CACHE", "1".into()),
        ],
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    let publish = |first: &str| {
        let s = run_sim(
            gw.mqtt_port,
            &[
                "-n",
                "1",
                "-m",
                "100",
                "--rate",
                "0",
                "--first-device",
                first,
            ],
        )
        .unwrap();
        assert_eq!(s["acknowledged"], 100);
    };

    publish("0");
    wait_until(Duration::from_secs(15), "the first batch", || {
        delivered(&gw) >= 100.0
    })
    .unwrap();

    // NTP steps the clock back an hour. What arrives next is still flushed on the 3 s hint,
    // not an hour later.
    step(&gw, &offset, "-1h", 1.0);
    publish("1");
    wait_until(
        Duration::from_secs(15),
        "a batch after the step back",
        || delivered(&gw) >= 200.0,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));

    // Records acknowledged before a step forward keep their stamps: their objects are dated
    // when they arrived (an hour back), not a day ahead.
    publish("2");
    step(&gw, &offset, "+1d", 2.0);
    wait_until(
        Duration::from_secs(15),
        "a batch after the step forward",
        || delivered(&gw) >= 300.0,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", gw.log()));
    assert!(gw.log().contains("the wall clock stepped"));
    assert!(gw.terminate().unwrap().success());

    // A record stamped after the step would be dated a day from now (the offset is "+1d");
    // dev-2's arrived an hour back (today, or yesterday shortly after midnight).
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
        .format("%Y/%m/%d")
        .to_string();
    let objects = read_objects(&gw.bucket_dir()).unwrap();
    let mut dev2 = 0;
    for o in &objects {
        let seqs = device_seqs(std::slice::from_ref(o));
        if seqs.iter().any(|(d, _)| d == "dev-2") {
            assert!(!o.key.starts_with(&tomorrow), "{} dated a day ahead", o.key);
            dev2 += seqs.iter().filter(|(d, _)| d == "dev-2").count();
        }
    }
    assert_eq!(dev2, 100);
    assert_exactly_once(&device_seqs(&objects), 3, 100, "dev");
}
