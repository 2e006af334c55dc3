#!/usr/bin/env bash
# Runs every test of the workspace: installs what the tests need (Debian's mosquitto, when run
# as root), checks formatting and lints, builds the binaries the end-to-end tests start, and runs
# the unit and end-to-end tests. Usage: tests/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "== installing mosquitto (the external broker for client-mode tests)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
    else
        echo "mosquitto is missing: run 'sudo apt-get install mosquitto' (or run this as root)" >&2
        exit 1
    fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
if cargo clippy --version >/dev/null 2>&1; then
    echo "== cargo clippy"
    cargo clippy --locked -j2 --workspace --all-targets -- -D warnings
fi
echo "== building the binaries the end-to-end tests run"
cargo build --locked -j2 --workspace --bins
echo "== cargo test"
cargo test --locked -j2 --workspace
