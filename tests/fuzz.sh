#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers and encoders a device, a config file or the disk can
# reach (fuzz/, daemon/src/fuzz.rs): libFuzzer through the libfuzzer-sys crate, built the way
# cargo-fuzz builds (SanitizerCoverage, debug assertions, overflow checks) but on the stable
# toolchain and without installing cargo-fuzz.
#
#   tests/fuzz.sh [SECONDS] [TARGET...]   run each target for SECONDS (default 10) from its corpus
#   MERGE=1 tests/fuzz.sh 600 codec       ... and merge what it found into fuzz/corpus/codec
#   JOBS=2 tests/fuzz.sh 3600             ... with two fuzzing processes per target
#   FUZZ_PROFILE=quick tests/fuzz.sh 10   a build in about half the time (what tests/run.sh runs)
#
# A crash (panic, abort, timeout, an allocation over the RSS limit) stops the run with the input
# saved as target/fuzz/artifacts/<target>/crash-*; add it to fuzz/corpus/<target>/ once fixed,
# so that `cargo test` replays it (daemon/tests/fuzz_corpora.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-10}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(codec config templates block kpl auth rules tls)
jobs=${JOBS:-1}
profile=${FUZZ_PROFILE:-release}
triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR="$PWD/target/fuzz"
# What `cargo fuzz build --sanitizer none` passes (-Cllvm-args=... for SanitizerCoverage), with
# --target so that build scripts and proc macros are left uninstrumented.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"
echo "== building the fuzz targets (${targets[*]})"
cargo build --locked -j2 --profile "$profile" --manifest-path fuzz/Cargo.toml --target "$triple" \
    $(printf -- '--bin %s ' "${targets[@]}")

for t in "${targets[@]}"; do
    work="target/fuzz/corpus/$t"
    artifacts="target/fuzz/artifacts/$t/"
    mkdir -p "$work" "$artifacts"
    echo "== fuzzing $t for ${seconds}s (${jobs} job(s); committed corpus: $(ls fuzz/corpus/$t | wc -l) inputs)"
    log="$PWD/target/fuzz/$t.log"
    # libFuzzer writes its workers' logs (fuzz-N.log) to the current directory: one directory
    # per target, so that runs of different targets at once do not overwrite each other's.
    run="$PWD/target/fuzz/run/$t"
    mkdir -p "$run"
    rm -f "$run"/fuzz-*.log
    # -rss_limit_mb: a decoder must not allocate what a damaged header claims (the block
    # decoder's own limit is 257 MiB); -timeout: no input may take a second.
    if ! (cd "$run" && "$OLDPWD/target/fuzz/$triple/$profile/$t" "$OLDPWD/$work" "$OLDPWD/fuzz/corpus/$t" \
        -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=1024 -timeout=1 \
        -jobs="$jobs" -workers="$jobs" -artifact_prefix="$OLDPWD/$artifacts" -print_final_stats=1 \
        >"$log" 2>&1); then
        tail -n 40 "$log" "$run"/fuzz-*.log 2>/dev/null || true
        echo "fuzz target $t failed; input in $artifacts" >&2
        exit 1
    fi
    # (with -jobs, libFuzzer's worker logs repeat what the main log says: print each line once)
    grep -h -E '^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+.*DONE' "$log" "$run"/fuzz-*.log 2>/dev/null \
        | awk '!seen[$0]++' | sed "s/^/  $t: /" || true
    if [ "${MERGE:-0}" = 1 ]; then
        "target/fuzz/$triple/$profile/$t" -merge=1 "fuzz/corpus/$t" "$work" >/dev/null 2>&1
        echo "  merged: fuzz/corpus/$t now holds $(ls fuzz/corpus/$t | wc -l) inputs"
    fi
done
