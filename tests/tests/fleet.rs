//! The simulated fleet against the real gateway: 1,000 devices, each its own MQTT connection,
//! publish at a fixed rate for a bounded time, and the output holds every sequence number of
//! every device; the readings come from the drivers over the simulated bus.

use std::collections::HashSet;
use std::time::Duration;

use edgehose_tests::*;

#[test]
fn a_thousand_devices_at_a_fixed_rate_arrive_whole() {
    const DEVICES: usize = 1000;
    const PER_DEVICE: u64 = 10; // 2 msg/s for 5 s
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let summary = run_sim(
        gw.mqtt_port,
        &[
            "--devices",
            "1000",
            "--rate",
            "2",
            "--duration-secs",
            "5",
            "--profile",
            "greenhouse",
            "--timeout-secs",
            "60",
        ],
    )
    .unwrap();
    assert_eq!(summary["failed_devices"], 0, "{summary}");
    assert_eq!(
        summary["acknowledged"],
        DEVICES as u64 * PER_DEVICE,
        "{summary}"
    );
    assert!(gw.metric("edgehose_connections_total") >= DEVICES as f64);
    assert!(gw.terminate().unwrap().success());

    let objects = read_objects(&gw.bucket_dir()).unwrap();
    let seen: HashSet<(String, u64)> = device_seqs(&objects).into_iter().collect();
    let missing: Vec<_> = (0..DEVICES)
        .flat_map(|d| (0..PER_DEVICE).map(move |s| (format!("dev-{d}"), s)))
        .filter(|k| !seen.contains(k))
        .collect();
    assert!(
        missing.is_empty(),
        "{} missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    // Real readings from the drivers: greenhouse climate nodes have temperature, humidity and
    // pressure; room nodes have no BMP280.
    let records: Vec<serde_json::Value> = objects
        .iter()
        .flat_map(|o| o.records.iter())
        .map(|r| serde_json::from_slice(r).unwrap())
        .collect();
    let with_pressure = records
        .iter()
        .filter(|r| r.get("pressure_hpa").is_some())
        .count();
    assert!(with_pressure > records.len() / 2 && with_pressure < records.len());
    for r in &records {
        if let Some(t) = r.get("temperature_c").and_then(|t| t.as_f64()) {
            assert!((5.0..45.0).contains(&t), "{r}");
        }
    }
}

#[test]
fn devices_ride_out_a_gateway_restart_and_lose_nothing() {
    // 50 devices publish for 6 s; the gateway is killed (-9) after 2 s and comes back 1 s
    // later. The devices queue while offline, reconnect with backoff, resend what was not
    // acknowledged, and carry on with their sequence numbers.
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let port = gw.mqtt_port;
    let sim = std::thread::spawn(move || {
        run_sim(
            port,
            &[
                "--devices",
                "50",
                "--rate",
                "20",
                "--duration-secs",
                "6",
                "--timeout-secs",
                "60",
            ],
        )
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    gw.kill9().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    gw.spawn().unwrap();
    let summary = sim.join().unwrap().unwrap();
    assert_eq!(summary["failed_devices"], 0, "{summary}");
    assert!(summary["reconnects"].as_u64().unwrap() >= 50, "{summary}");
    assert!(gw.terminate().unwrap().success());
    let seen: HashSet<(String, u64)> = device_seqs(&read_objects(&gw.bucket_dir()).unwrap())
        .into_iter()
        .collect();
    let missing = (0..50)
        .flat_map(|d| (0..120).map(move |s| (format!("dev-{d}"), s)))
        .filter(|k| !seen.contains(k))
        .count();
    assert_eq!(missing, 0, "messages lost across the restart");
}

#[test]
fn devices_killed_mid_flight_resend_everything_unacknowledged() {
    // The same, but the kill lands while every device publishes flat out, so each has up to
    // 100 messages sent and unacknowledged (and more queued) at that moment: all of them must
    // be resent after the restart and acknowledged, none forgotten by the client.
    const DEVICES: usize = 10;
    const PER_DEVICE: u64 = 3000;
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway::start(dir.path(), &Setup::default()).unwrap();
    let port = gw.mqtt_port;
    let sim = std::thread::spawn(move || {
        run_sim(
            port,
            &[
                "--devices",
                &DEVICES.to_string(),
                "--messages",
                &PER_DEVICE.to_string(),
                "--rate",
                "0",
                "--timeout-secs",
                "120",
            ],
        )
    });
    wait_until(Duration::from_secs(60), "a third committed", || {
        gw.metric("edgehose_records_committed_total") >= (DEVICES as u64 * PER_DEVICE / 3) as f64
    })
    .unwrap();
    gw.kill9().unwrap();
    gw.spawn().unwrap();
    let summary = sim.join().unwrap().unwrap();
    assert_eq!(summary["failed_devices"], 0, "{summary}");
    assert!(gw.terminate().unwrap().success());
    let seqs = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
    let t = tally(&seqs, DEVICES, PER_DEVICE, "dev");
    assert_eq!(t.missing, 0, "messages lost across the restart: {t:?}");
}
