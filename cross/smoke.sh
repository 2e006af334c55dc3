#!/usr/bin/env bash
# Smoke test of a cross-built edgehose under qemu-user: starts target/<TARGET>/dist/edgehose
# (emulated) with a `file` destination, publishes 200 QoS 1 messages to it with the host's
# firmware-sim (a real MQTT client), stops it with SIGTERM and checks that every message is in
# the output. Build first with cross/build.sh.
#   cross/smoke.sh [TARGET=aarch64-unknown-linux-gnu]
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-aarch64-unknown-linux-gnu}
case $target in
aarch64-*) qemu="qemu-aarch64 -L /usr/aarch64-linux-gnu" ;;
armv7-*) qemu="qemu-arm -L /usr/arm-linux-gnueabihf" ;;
*) echo "unsupported target $target" >&2; exit 2 ;;
esac
bin=target/$target/dist/edgehose
[ -x "$bin" ] || { echo "$bin missing: run cross/build.sh $target" >&2; exit 1; }
[ -x target/debug/firmware-sim ] || cargo build -j2 -p firmware-sim
scratch=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$scratch"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(port); admin=$(port)
cat > "$scratch/edgehose.toml" <<TOML
[ingress.frontdoor]
listen = "127.0.0.1:$mqtt"
[buffer]
path = "$scratch/data/buffer.db"
[admin]
listen = "127.0.0.1:$admin"
[streams.telemetry]
topics = ["sensors/+/telemetry"]
destinations = ["local"]
[destinations.local]
type = "file"
root = "$scratch/out"
bucket = "smoke"
buffer_interval = "1s"
compression = "gzip"
TOML
file "$bin" | cut -d, -f1-2
$qemu "$bin" --version
$qemu "$bin" run --config "$scratch/edgehose.toml" 2> "$scratch/edgehose.log" &
pid=$!
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null && break; sleep 0.1; done
target/debug/firmware-sim --port "$mqtt" --devices 4 --messages 50 --rate 0 --json > "$scratch/sim.json"
kill -TERM $pid; wait $pid
acked=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["acknowledged"])' "$scratch/sim.json")
found=$(find "$scratch/out/smoke" -name '*.gz' -exec zcat {} + | grep -c '"seq"')
echo "$target: $acked acknowledged, $found in $(find "$scratch/out/smoke" -name '*.gz' | wc -l) object(s) under $(find "$scratch/out/smoke" -name '*.gz' | head -1 | sed "s#$scratch/out/smoke/##")"
[ "$acked" = 200 ] && [ "$found" = 200 ] || { cat "$scratch/edgehose.log" >&2; exit 1; }
echo "smoke test passed"
