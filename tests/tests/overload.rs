//! Publishers faster than delivery frees the buffer: under `block` the front door slows them
//! (PUBACKs wait, sockets are not read) instead of dropping anything, and memory stays bounded.

use std::collections::HashSet;

use edgehose_tests::*;

#[test]
fn overload_slows_publishers_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        max_size: "1MiB",
        when_full: "block",
        // Delivery only every 2 s, whatever is pending: the buffer fills in between.
        buffer_interval: "2s",
        buffer_size: "128MiB",
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    // ~40,000 x 300 bytes, compressed in the buffer about 3x, is still 4 times the bound.
    let summary = run_sim(
        gw.mqtt_port,
        &[
            "-n",
            "20",
            "-m",
            "2000",
            "--rate",
            "0",
            "--timeout-secs",
            "120",
        ],
    )
    .unwrap();
    assert_eq!(summary["acknowledged"], 40_000, "{summary}");
    assert!(
        gw.metric("edgehose_buffer_full_waits_total") >= 1.0,
        "the buffer never filled: no overload happened"
    );
    let rejected: f64 = gw
        .metrics()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("edgehose_messages_rejected_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(rejected, 0.0, "publishers are slowed, not refused");
    let rss_mib = gw.peak_rss_kib() / 1024;
    assert!(rss_mib < 64, "peak RSS {rss_mib} MiB");
    println!(
        "overload: {} msg/s acknowledged, PUBACK p99 {} ms, max {} ms, daemon peak RSS {rss_mib} MiB",
        summary["rate_msg_s"], summary["puback_latency_ms_p99"], summary["puback_latency_ms_max"]
    );
    assert!(gw.terminate().unwrap().success());
    let out = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
    let unique: HashSet<_> = out.iter().collect();
    assert_eq!(
        unique.len(),
        40_000,
        "every acknowledged message is delivered"
    );
    assert_eq!(out.len(), 40_000, "no duplicates");
}
