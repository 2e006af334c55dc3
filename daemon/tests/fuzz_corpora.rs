//! Replays the fuzzers' committed corpora (`fuzz/corpus/<target>/`, the seeds and every input
//! a fuzzing run kept or that once found a bug) through the same entry points, so that they stay
//! regression tests in every `cargo test`. The fuzzing itself: `tests/fuzz.sh`.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no inputs", dir.display());
    for input in inputs {
        let data = std::fs::read(&input).expect("corpus input");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target}: {} fails", input.display());
    }
}

#[test]
fn codec_corpus() {
    replay("codec", edgehose::fuzz::codec);
}

#[test]
fn config_corpus() {
    replay("config", edgehose::fuzz::config);
}

#[test]
fn templates_corpus() {
    replay("templates", edgehose::fuzz::templates);
}

#[test]
fn block_corpus() {
    replay("block", edgehose::fuzz::block);
}

#[test]
fn kpl_corpus() {
    replay("kpl", edgehose::fuzz::kpl);
}

#[test]
fn auth_corpus() {
    replay("auth", edgehose::fuzz::auth);
}

#[test]
fn rules_corpus() {
    replay("rules", edgehose::fuzz::rules);
}

#[test]
fn tls_corpus() {
    replay("tls", edgehose::fuzz::tls_records);
}
