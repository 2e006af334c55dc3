#!/usr/bin/env bash
# The benchmark command: builds the release binaries (edgehose, firmware-sim, and the baseline
# relays rumqttd-relay and null-sub), makes sure Debian's mosquitto is there, and runs
# tests/bench/bench.py, which prints every figure of BENCHMARKS.md's main table with the
# rumqttd and mosquitto baselines measured in the same run.
#   tests/bench/bench.sh [--runs 3] [--json] [--quick] [--tls | --rules | --frugal]
# --frugal, --rules and --tls measure the daemon as it ships on a gateway: the `dist` profile
# (size-optimised, LTO), built here too (a few more minutes); its memory figures include the
# binary's code.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
    else
        echo "missing: sudo apt-get install mosquitto" >&2
        exit 1
    fi
fi
if [[ " $* " == *" --quick "* ]]; then
    # The quick mode only proves the harness runs end to end: debug binaries do (built as
    # tests/run.sh builds them, with --tests, so that nothing is compiled twice).
    cargo build --locked -j2 -p edgehose -p firmware-sim -p edgehose-tests --bins --tests >&2
    export BENCH_BIN=target/debug
else
    cargo build --locked --release -j2 -p edgehose -p firmware-sim -p edgehose-tests --bins >&2
    if [[ " $* " == *" --frugal "* || " $* " == *" --rules "* || " $* " == *" --tls "* ]]; then
        cargo build --locked --profile dist -j2 -p edgehose >&2
        export BENCH_EDGEHOSE=target/dist/edgehose
    fi
fi
exec python3 tests/bench/bench.py "$@"
