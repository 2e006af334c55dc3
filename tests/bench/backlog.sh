#!/usr/bin/env bash
# Start-up and drain with a backlog: fills the buffer with N records (200-byte JSON, QoS 1) while
# the destination cannot write (its root is under /proc), kills the gateway (-9), then starts it
# with a writable destination (5MiB / 1s hints) and measures process start -> /healthz ready and
# -> every record delivered, and the daemon's peak RSS.
# Usage: tests/bench/backlog.sh [records=1000000]
set -euo pipefail
cd "$(dirname "$0")/../.."
records=${1:-1000000}
. ./tests/bench/lib.sh
bench_build
scratch=$(mktemp -d)
mqtt=$(free_port); admin=$(free_port)
bench_config /proc/edgehose-nowhere > "$scratch/fill.toml"
bench_config > "$scratch/drain.toml"

$bin/edgehose run --config "$scratch/fill.toml" 2> "$scratch/fill.log" &
pid=$!
bench_wait_ready
$bin/firmware-sim --port "$mqtt" --devices 100 --messages $((records / 100)) --rate 0 --engine raw \
    --payload-size 200 --json > /dev/null
kill -9 "$pid"; wait "$pid" 2>/dev/null || true
echo "buffer file with $records records: $(du -sh "$scratch/data" | cut -f1)" >&2

start=$(date +%s.%N)
$bin/edgehose run --config "$scratch/drain.toml" 2> "$scratch/drain.log" &
pid=$!
bench_wait_ready
ready=$(date +%s.%N)
until [ "$(metric 'edgehose_records_delivered_total{destination="local"}')" = "$records" ]; do
    sleep 0.02
done
done_at=$(date +%s.%N)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
bench_stop
awk -v s="$start" -v r="$ready" -v d="$done_at" -v n="$records" -v m="$hwm" 'BEGIN {
    printf "backlog of %d records: ready after %.3f s, all delivered after %.3f s (%.0f records/s), peak RSS %d MiB\n",
        n, r - s, d - s, n / (d - s), m / 1024 }'
