//! A buffer file damaged while the gateway was down (a tired SD card, a power cut at the wrong
//! moment): the gateway moves it aside, salvages what is readable, counts and logs what is not,
//! and serves devices again within seconds. Nothing acknowledged after the restart is lost and
//! nothing is delivered twice.

use std::collections::HashSet;
use std::time::Duration;

use edgehose_tests::*;

const BEFORE: u64 = 6000;

/// Fills a stopped gateway's buffer with BEFORE acknowledged records (nothing delivered), with
/// the WAL checkpointed into the file, then applies `damage` to the file.
fn damaged(damage: &str) -> (tempfile::TempDir, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        buffer_interval: "900s",
        buffer_size: "128MiB",
        ..Setup::default()
    };
    let mut gw = Gateway::start(dir.path(), &setup).unwrap();
    // Paced so that records spread over many commits; big hex payloads fill pages and overflow
    // pages alike.
    let s = run_sim(
        gw.mqtt_port,
        &[
            "-n",
            "6",
            "-m",
            "1000",
            "--rate",
            "500",
            "--payload-size",
            "1500",
        ],
    )
    .unwrap();
    assert_eq!(s["acknowledged"], BEFORE, "{s}");
    gw.kill9().unwrap();
    let db = gw.db_path();
    {
        // Closing the last connection checkpoints the WAL into the file.
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")
            .unwrap();
    }
    let mut file = std::fs::read(&db).unwrap();
    let len = file.len();
    assert!(len > 64 * 4096, "{len} bytes");
    match damage {
        "header" => file[..100].fill(0),
        "page" => {
            // A page in the middle of the file: a leaf or an overflow page of the segment.
            let page = len / 4096 / 2;
            file[page * 4096..(page + 1) * 4096].fill(0);
        }
        "truncated" => file.truncate(len / 2 / 4096 * 4096),
        "empty" => file.clear(),
        "wal" => {
            // A WAL of garbage beside a sound file: SQLite must ignore it.
            let garbage: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7919 % 251) as u8).collect();
            std::fs::write(db.with_file_name("edgehose.db-wal"), garbage).unwrap();
        }
        other => panic!("{other}"),
    }
    std::fs::write(&db, &file).unwrap();
    (dir, gw)
}

/// Restarts on the damaged file, publishes 100 more, stops; returns (records from before the
/// restart delivered, lost records counted, log).
fn restart_and_deliver(gw: &mut Gateway) -> (usize, f64, String) {
    let started = std::time::Instant::now();
    gw.spawn().unwrap_or_else(|e| panic!("did not start: {e}"));
    assert!(started.elapsed() < Duration::from_secs(20));
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
            "50",
        ],
    )
    .unwrap();
    assert_eq!(s["acknowledged"], 100, "the gateway serves devices again");
    let lost = gw.metric("edgehose_buffer_corrupt_records_total");
    assert!(gw.terminate().unwrap().success(), "{}", gw.log());
    let seqs = device_seqs(&read_objects(&gw.bucket_dir()).unwrap());
    let unique: HashSet<_> = seqs.iter().collect();
    assert_eq!(seqs.len(), unique.len(), "nothing delivered twice");
    let after = seqs.iter().filter(|(d, _)| d == "dev-50").count();
    assert_eq!(
        after, 100,
        "everything acknowledged after the restart is delivered"
    );
    eprintln!(
        "delivered from before the restart: {}, counted lost: {lost}",
        seqs.len() - after
    );
    (seqs.len() - after, lost, gw.log())
}

#[test]
fn a_wiped_header_is_rewritten_and_every_record_salvaged() {
    let (_dir, mut gw) = damaged("header");
    let (before, lost, log) = restart_and_deliver(&mut gw);
    assert!(log.contains("buffer salvaged"), "{log}");
    assert_eq!((before as u64, lost), (BEFORE, 0.0), "{log}");
    let aside = std::fs::read_dir(gw.db_path().parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains(".damaged-"));
    assert!(aside, "the damaged file is kept aside");
}

#[test]
fn a_zeroed_page_loses_only_its_records_and_says_how_many() {
    let (_dir, mut gw) = damaged("page");
    let (before, lost, log) = restart_and_deliver(&mut gw);
    assert!(
        lost > 0.0 && (before as u64) < BEFORE,
        "{before} delivered, {lost} lost"
    );
    assert_eq!(
        before as f64 + lost,
        BEFORE as f64,
        "every record delivered or counted\n{log}"
    );
}

#[test]
fn a_file_truncated_to_half_is_salvaged_up_to_the_cut() {
    let (_dir, mut gw) = damaged("truncated");
    let (before, lost, log) = restart_and_deliver(&mut gw);
    assert!(log.contains("buffer salvaged"), "{log}");
    assert!(before > 0, "what precedes the cut is delivered");
    assert!(before as f64 + lost <= BEFORE as f64);
}

#[test]
fn a_zero_length_file_is_an_error_not_a_silent_fresh_start() {
    let (_dir, mut gw) = damaged("empty");
    let (before, _, log) = restart_and_deliver(&mut gw);
    assert_eq!(before, 0);
    assert!(log.contains("the buffer file is empty"), "{log}");
}

#[test]
fn a_garbage_wal_is_ignored_and_every_record_delivered() {
    let (_dir, mut gw) = damaged("wal");
    let (before, lost, log) = restart_and_deliver(&mut gw);
    assert_eq!((before as u64, lost), (BEFORE, 0.0), "{log}");
}
