#!/usr/bin/env bash
# Backlog drain to an AWS emulator: fills the buffer with N records (200-byte JSON from 100
# devices) while the destination cannot write, then starts the gateway with an S3 or Kinesis
# destination pointed at moto's server mode on loopback and measures the time until every
# record is delivered. moto, not the gateway, bounds these figures (it keeps everything in
# memory in one Python process and slows as a stream grows); the script also reports moto's own
# ceiling, measured with boto3 doing the same puts without the gateway.
# Usage: tests/bench/aws_drain.sh [records=1000000] [s3|s3-partitioned|kinesis|kinesis-agg]
#        (ORDERING=none for Kinesis requests filled regardless of partition keys;
#         PUT_CONCURRENCY=n for the s3 targets' put_concurrency, default the daemon's)
# s3-partitioned: one gzip object per device (100 per flush); after the drain, s3_ceiling.py
# puts the same objects with boto3 at its best concurrency, and the ratio is printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
records=${1:-1000000}
target=${2:-s3}
. ./tests/bench/lib.sh
bench_build
bench_venv
scratch=$(mktemp -d)
mqtt=$(free_port); admin=$(free_port); moto=$(free_port)
endpoint="http://127.0.0.1:$moto"
$venv/bin/moto_server -H 127.0.0.1 -p "$moto" > "$scratch/moto.log" 2>&1 &
moto_pid=$!
trap 'kill $moto_pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "$endpoint/moto-api/" >/dev/null && break; sleep 0.1; done
rb() { $venv/bin/python tests/aws/read_back.py "$1" "$endpoint" "${@:2}" > /dev/null; }

DEST_TOML= bench_config /proc/edgehose-nowhere > "$scratch/fill.toml"
case $target in
s3)
    rb create-bucket bench
    DEST_TOML="type = \"s3\"
bucket = \"bench\"
region = \"us-east-1\"
endpoint = \"$endpoint\"
buffer_size = \"64MiB\"
buffer_interval = \"1s\"
compression = \"gzip\"
${PUT_CONCURRENCY:+put_concurrency = $PUT_CONCURRENCY}" ;;
s3-partitioned)
    rb create-bucket bench
    DEST_TOML="type = \"s3\"
bucket = \"bench\"
region = \"us-east-1\"
endpoint = \"$endpoint\"
buffer_size = \"64MiB\"
buffer_interval = \"0s\"
compression = \"${COMPRESSION:-gzip}\"
prefix = \"device=!{partitionKeyFromQuery:device}/\"
error_output_prefix = \"errors/!{firehose:error-output-type}/\"
${PUT_CONCURRENCY:+put_concurrency = $PUT_CONCURRENCY}" ;;
kinesis|kinesis-agg)
    rb create-stream bench 4
    DEST_TOML="type = \"kinesis\"
stream = \"bench\"
region = \"us-east-1\"
endpoint = \"$endpoint\"
ordering = \"${ORDERING:-per_key}\"
aggregation = $([ "$target" = kinesis-agg ] && echo true || echo false)" ;;
*) echo "unknown target $target" >&2; exit 2 ;;
esac
export DEST_TOML
bench_config > "$scratch/drain.toml"
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_EC2_METADATA_DISABLED=true

DEST_TOML= $bin/edgehose run --config "$scratch/fill.toml" 2> "$scratch/fill.log" &
pid=$!
bench_wait_ready
$bin/firmware-sim --port "$mqtt" --devices 100 --messages $((records / 100)) --rate 0 --engine raw \
    --payload-size 200 --json > /dev/null
kill -9 "$pid"; wait "$pid" 2>/dev/null || true

start=$(date +%s.%N)
$bin/edgehose run --config "$scratch/drain.toml" 2> "$scratch/drain.log" &
pid=$!
bench_wait_ready
ready_at=$(date +%s.%N)
until [ "$(metric 'edgehose_records_delivered_total{destination="local"}')" = "$records" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then cat "$scratch/drain.log" >&2; exit 1; fi
    sleep 0.1
done
done_at=$(date +%s.%N)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
units=$(metric 'edgehose_kinesis_put_units_total{destination="local"}')
krecs=$(metric 'edgehose_kinesis_records_total{destination="local"}')
reqs=$(metric 'edgehose_kinesis_requests_total{destination="local"}')
objects=$(metric 'edgehose_batches_delivered_total{destination="local"}')
cp "$scratch/drain.log" "${KEEP_LOG:-/dev/null}" 2>/dev/null || true
bench_stop
awk -v s="$start" -v d="$done_at" -v n="$records" -v m="$hwm" -v t="$target" 'BEGIN {
    printf "%s: backlog of %d records delivered in %.1f s (%.0f records/s), peak RSS %d MiB\n",
        t, n, d - s, n / (d - s), m / 1024 }'
case $target in
s3) echo "objects: $objects" ;;
s3-partitioned)
    echo "objects: $objects, put in $(awk -v r="$ready_at" -v d="$done_at" 'BEGIN { printf "%.3f", d - r }') s from ready to the last delivered"
    ceiling=$($venv/bin/python tests/bench/s3_ceiling.py "$endpoint" bench)
    echo "$ceiling"
    awk -v r="$ready_at" -v d="$done_at" -v c="$(echo "$ceiling" | sed -E 's/.*best ([0-9.]+) s.*/\1/')" 'BEGIN {
        printf "drain vs a plain client putting the same objects: %.2fx (ceiling %.3f s / drain %.3f s)\n", c / (d - r), c, d - r }' ;;
*) awk -v u="${units:-0}" -v k="${krecs:-0}" -v r="${reqs:-0}" -v n="$records" 'BEGIN {
    printf "Kinesis records: %d, PutRecords requests: %d, PUT payload units: %d (%.1f per 1,000 readings)\n",
        k, r, u, u * 1000 / n }' ;;
esac
