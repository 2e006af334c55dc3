//! The simulated fleet against the real gateway: 1,000 devices, each its own MQTT connection,
//! publish at a fixed rate for a bounded time, and the output holds every sequence number of
//! every device; the readings come from the drivers over the simulated bus.

use std::collections::HashSet;

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
