#!/usr/bin/env bash
# Runs every test of the workspace: installs what the tests need (Debian's mosquitto, when run
# as root), checks formatting and lints, builds the binaries the end-to-end tests start, and runs
# the unit and end-to-end tests. Usage: tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# mosquitto: the external broker for client-mode and simulator TLS tests; mosquitto-clients:
# third-party MQTT 3.1.1 and 5 clients for the front door's conformance tests; openssl: makes
# the test CA and certificates.
if { ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; } \
    || ! command -v mosquitto_sub >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo "== installing mosquitto, mosquitto-clients and openssl"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients openssl >/dev/null
    else
        echo "missing: run 'sudo apt-get install mosquitto mosquitto-clients openssl' (or run this as root)" >&2
        exit 1
    fi
fi

# libfaketime steps the daemon's wall clock in the clock tests.
if [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ] && [ "$(id -u)" = 0 ]; then
    echo "== installing faketime (libfaketime)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends faketime >/dev/null
fi

# g++: libfuzzer-sys compiles libFuzzer (C++) for the fuzz run at the end.
if ! command -v c++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== installing g++ (for libFuzzer)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi

# systemd-analyze checks the service unit (tests/systemd-unit.sh).
if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "== installing systemd (for systemd-analyze)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

# A Python venv with paho-mqtt (the second third-party client of the conformance tests), moto's
# server mode (the S3 and Kinesis emulator of the AWS tests; boto3 comes with it and reads the
# output back) and aws-kinesis-agg (awslabs' de-aggregator, to check KPL aggregates).
venv=target/test-venv
if [ ! -x "$venv/bin/python" ] \
    || ! "$venv/bin/python" -c 'import paho.mqtt, moto.server, aws_kinesis_agg' 2>/dev/null; then
    echo "== creating $venv with paho-mqtt, moto[server] and aws-kinesis-agg"
    if ! python3 -m venv "$venv" 2>/dev/null; then
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
            python3 -m venv "$venv"
        else
            echo "python3 -m venv failed: install python3-venv" >&2
            exit 1
        fi
    fi
    "$venv/bin/pip" install -q 'paho-mqtt>=2,<3' 'moto[server]>=5,<6' 'aws-kinesis-agg>=1.2,<2'
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
if cargo clippy --version >/dev/null 2>&1; then
    echo "== cargo clippy"
    cargo clippy --locked -j2 --workspace --all-targets -- -D warnings
fi
echo "== checking the gateway on its default features (what ships: without the embedded rumqttd), and with the file destination only (the fuzz targets' build)"
cargo clippy --locked -j2 -p edgehose -- -D warnings
cargo clippy --locked -j2 -p edgehose --no-default-features -- -D warnings
echo "== checking firmware-sim's hardware build (real I2C through linux-embedded-hal)"
cargo clippy --locked -j2 -p firmware-sim --features hardware -- -D warnings
echo "== building the binaries the end-to-end tests run, and the tests"
# With --tests the binaries get the features the tests' dev-dependencies unify (tokio's
# test-util), so `cargo test` below compiles nothing again (without it: ~10 minutes twice).
cargo build --locked -j2 --workspace --bins --tests
echo "== the systemd unit"
tests/systemd-unit.sh
echo "== the Debian package"
tests/package.sh
echo "== the benchmark harness, quick mode (every figure once, tiny loads; speed not judged)"
tests/bench/bench.sh --quick > target/bench-quick.txt
tail -n 30 target/bench-quick.txt
# The Pi-scale figures too (a cgroup budget where this machine allows one; without, it says so).
tests/bench/bench.sh --frugal --quick > target/bench-frugal-quick.txt
tail -n 30 target/bench-frugal-quick.txt
echo "== cargo test"
status=0
cargo test --locked -j2 --workspace --no-fail-fast || status=$?
# Coverage-guided fuzzing, briefly: each target for 15 s from its committed corpus (a bounded
# run; long runs and their figures: RELIABILITY.md). After the tests, so that a failure in
# either is reported.
echo "== fuzzing (tests/fuzz.sh, 15 s per target)"
FUZZ_PROFILE=quick tests/fuzz.sh 15 || status=$?
exit "$status"
