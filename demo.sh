#!/usr/bin/env bash
# Runs edgehose on its embedded default (config/edgehose.toml: the front door with plain MQTT on
# 127.0.0.1:1883 and MQTT over mutual TLS on 127.0.0.1:8883, IoT policies, SQLite buffer under
# data/, Firehose-layout objects under out/) with a simulated fleet feeding it over mutual TLS,
# each device with its own certificate, then stops it cleanly. Usage: ./demo.sh [firmware-sim
# options]. Default: the greenhouse fleet profile (config/sim/greenhouse.toml), 200 devices at
# 1 msg/s each for 30 s, reading simulated SHT3x and BMP280 sensors through their drivers.
set -euo pipefail
cd "$(dirname "$0")"

cargo build --release -j2 -p edgehose -p firmware-sim
# A CA, the gateway's certificate and one certificate per simulated device (once).
if [ ! -e data/pki/devices/dev-199.crt ]; then
    ./target/release/edgehose certs --dir data/pki --host 127.0.0.1 --host localhost \
        $(for i in $(seq 0 199); do printf -- '--device dev-%d ' "$i"; done) | tail -n 2
fi
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
# Each device connects with its own certificate (client id = the certificate's name, which the
# device policy requires) and publishes under sensors/<its id>/.
./target/release/firmware-sim --host 127.0.0.1 --port 8883 --tls-ca data/pki/ca.crt \
    --tls-cert-dir data/pki/devices "$@"

echo "== metrics"
curl -s http://127.0.0.1:9464/metrics | grep -E '^edgehose_' || true
echo "== stopping the gateway (SIGTERM flushes every open batch)"
kill -TERM $gateway
wait $gateway
trap - EXIT
echo "== objects written, in Firehose's S3 layout"
find out -type f -not -path '*/.edgehose-staging/*' | sort | tail -n 20
