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
# s3-partitioned: one gzip object per device (100 per flush), drained once to warm up, then
# TRIALS times (default 5) from copies of the same filled buffer, each timed by the daemon's own
# log (its destination loop starting -> the last batch delivered) and paired with one run of
# s3_ceiling.py putting the same objects with boto3 at its best configuration (chosen first
# among concurrency CEILING_LEVELS, default 1 2 4 8 16, with and without request checksums);
# the median of the pairs' ratios is printed.
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
trap 'kill $moto_pid 2>/dev/null || true; rm -rf "$scratch"' EXIT
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

# One drain of the filled buffer into bucket $1 (s3 targets); sets start, ready_at, done_at
# (the script's clock), took (the daemon's own log: its destination loop starting to the last
# batch delivered, microsecond stamps, no polling in the figure), hwm and the metrics below.
drain() {
    rm -rf "$scratch/data"; cp -a "$scratch/filled" "$scratch/data"
    DEST_TOML=${DEST_TOML//\"bench\"/\"$1\"} bench_config > "$scratch/drain.toml"
    start=$(date +%s.%N)
    EDGEHOSE_LOG=info,edgehose::batching::engine=debug \
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
    kill -TERM "$pid"; wait "$pid" || true
    cp "$scratch/drain.log" "${KEEP_LOG:-/dev/null}" 2>/dev/null || true
    local first prepared last
    first=$(grep -m1 'destination started' "$scratch/drain.log" | awk '{print $1}')
    prepared=$(grep -m1 'batch prepared' "$scratch/drain.log" | awk '{print $1}')
    last=$(grep 'batch delivered' "$scratch/drain.log" | tail -1 | awk '{print $1}')
    took=$(awk -v a="$(date -d "$first" +%s.%N)" -v b="$(date -d "$last" +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
    # Counting the backlog and assembling the first batch, before its first put.
    before_put=$(awk -v a="$(date -d "$first" +%s.%N)" -v b="$(date -d "$prepared" +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
}
mv "$scratch/data" "$scratch/filled"

if [ "$target" != s3-partitioned ]; then
    drain bench
    awk -v s="$start" -v d="$done_at" -v n="$records" -v m="$hwm" -v t="$target" 'BEGIN {
        printf "%s: backlog of %d records delivered in %.1f s (%.0f records/s), peak RSS %d MiB\n",
            t, n, d - s, n / (d - s), m / 1024 }'
    case $target in
    s3) echo "objects: $objects" ;;
    *) awk -v u="${units:-0}" -v k="${krecs:-0}" -v r="${reqs:-0}" -v n="$records" 'BEGIN {
        printf "Kinesis records: %d, PutRecords requests: %d, PUT payload units: %d (%.1f per 1,000 readings)\n",
            k, r, u, u * 1000 / n }' ;;
    esac
    exit 0
fi

# s3-partitioned: a warm-up drain (whose objects the plain client puts), the plain client's
# best configuration chosen on them, then TRIALS pairs, alternated so that both see the same
# emulator state (moto slows as it fills) and machine: a drain of the same filled buffer into
# a fresh bucket, then one run of the plain client putting the warm-up's objects. The ratio is
# the median of the pairs' ratios.
rb create-bucket bench0
drain bench0
choice=$($venv/bin/python tests/bench/s3_ceiling.py "$endpoint" bench0 --choose ${CEILING_LEVELS:-})
echo "  plain client's best configuration: concurrency ${choice% *}, checksums ${choice#* }" >&2
times=(); puts=(); ceilings=(); ratios=()
for i in $(seq "${TRIALS:-5}"); do
    rb create-bucket "bench$i"
    drain "bench$i"
    c=$($venv/bin/python tests/bench/s3_ceiling.py "$endpoint" bench0 --runs 1 --checksums "${choice#* }" "${choice% *}" \
        | sed -E 's/.*median ([0-9.]+) s.*/\1/')
    echo "  pair $i: drain $objects objects in $took s (destination start -> last batch delivered; $before_put s of it before the first put), peak RSS $((hwm / 1024)) MiB; plain client $c s" >&2
    times+=("$took"); ceilings+=("$c")
    puts+=("$(awk -v t="$took" -v b="$before_put" 'BEGIN { printf "%.3f", t - b }')")
    ratios+=("$(awk -v t="$took" -v c="$c" 'BEGIN { printf "%.3f", c / t }')")
done
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { printf "%.3f [%.3f-%.3f]", v[int((NR + 1) / 2)], v[1], v[NR] }'; }
echo "s3-partitioned: $records records, $objects objects, drain median $(median "${times[@]}") s over ${#times[@]} runs (put_concurrency ${PUT_CONCURRENCY:-default}), of which the puts $(median "${puts[@]}") s"
echo "ceiling: the same $objects objects put by boto3 at concurrency ${choice% *}, checksums ${choice#* }: median $(median "${ceilings[@]}") s"
echo "drain vs a plain client putting the same objects: $(median "${ratios[@]}")x (median [min-max] of ${#ratios[@]} alternated pairs)"
