//! Client mode against a real external broker (Debian's mosquitto): edgehose acks a QoS 1
//! message only after committing it, so after a kill -9 the broker redelivers whatever was not
//! committed and nothing is lost.

use std::collections::HashSet;
use std::time::Duration;

use edgehose_tests::*;

const DEVICES: usize = 5;
const PER_DEVICE: u64 = 2_000;

#[test]
fn kill_9_in_client_mode_loses_nothing_the_broker_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(dir.path()).unwrap();
    let setup = Setup {
        client_of: Some(broker.port),
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the gateway's subscription",
        || gw.log().contains("connected to the external broker"),
    )
    .unwrap();
    // Give the SUBSCRIBE a moment to be registered before the first publish.
    std::thread::sleep(Duration::from_millis(300));

    // Devices publish to mosquitto at a steady rate, across the kill and the restart.
    let port = broker.port;
    let publisher = std::thread::spawn(move || {
        run_sim(
            port,
            &[
                "-n",
                &DEVICES.to_string(),
                "-m",
                &PER_DEVICE.to_string(),
                "--rate",
                "1000",
            ],
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    gw.kill9().unwrap();
    let committed_at_kill = buffered_records(&gw.db_path());
    std::thread::sleep(Duration::from_millis(500));
    gw.spawn().unwrap();

    let summary = publisher.join().unwrap().unwrap();
    assert_eq!(
        summary["acknowledged"],
        (DEVICES as u64 * PER_DEVICE),
        "{summary}"
    );
    let total = DEVICES * PER_DEVICE as usize;
    // buffer_interval = 1s: everything reaches the output while the gateway runs.
    wait_until(
        Duration::from_secs(30),
        "every message in the output",
        || {
            let objects = read_objects(&gw.bucket_dir()).unwrap_or_default();
            device_seqs(&objects)
                .into_iter()
                .collect::<HashSet<_>>()
                .len()
                >= total
        },
    )
    .unwrap();
    assert!(gw.terminate().unwrap().success(), "log:\n{}", gw.log());

    let out = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
    let unique: HashSet<_> = out.iter().cloned().collect();
    let missing: Vec<_> = (0..DEVICES)
        .flat_map(|d| (0..PER_DEVICE).map(move |s| (format!("dev-{d}"), s)))
        .filter(|k| !unique.contains(k))
        .collect();
    println!(
        "committed at kill (still buffered): {committed_at_kill}, delivered {} records, {} unique, {} redelivered duplicates",
        out.len(),
        unique.len(),
        out.len() - unique.len()
    );
    assert!(
        missing.is_empty(),
        "{} messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}
