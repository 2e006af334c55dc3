#!/usr/bin/env bash
# Runs edgehose on its embedded default (embedded MQTT broker on 127.0.0.1:1883, SQLite buffer
# under data/, Firehose-layout objects under out/) with a simulated fleet feeding it, then stops
# it cleanly. Usage: ./demo.sh [firmware-sim options]
# Default: the greenhouse fleet profile (config/sim/greenhouse.toml), 200 devices at 1 msg/s
# each for 30 s, reading simulated SHT3x and BMP280 sensors through their drivers.
set -euo pipefail
cd "$(dirname "$0")"

cargo build --release -j2 -p edgehose -p firmware-sim
./target/release/edgehose check-config --config config/edgehose.toml
./target/release/edgehose run --config config/edgehose.toml &
gateway=$!
trap 'kill -TERM $gateway 2>/dev/null || true; wait $gateway 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    curl -sf http://127.0.0.1:9464/healthz >/dev/null 2>&1 && break
    sleep 0.1
done

if [ $# -eq 0 ]; then
    set -- --profile greenhouse --devices 200 --rate 1 --duration-secs 30
fi
./target/release/firmware-sim --host 127.0.0.1 --port 1883 "$@"

echo "== metrics"
curl -s http://127.0.0.1:9464/metrics | grep -E '^edgehose_' || true
echo "== stopping the gateway (SIGTERM flushes every open batch)"
kill -TERM $gateway
wait $gateway
trap - EXIT
echo "== objects written, in Firehose's S3 layout"
find out -type f -not -path '*/.edgehose-staging/*' | sort | tail -n 20
