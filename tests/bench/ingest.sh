#!/usr/bin/env bash
# Max sustained ingest: firmware-sim's devices publish 200-byte JSON at QoS 1 as fast as the
# gateway takes them, into edgehose on its embedded broker with a `file` destination. Reports,
# per run and as median [min-max] over the runs: the publish rate the devices saw (PUBACKs),
# the rate at which the buffer committed everything (first publish -> last commit), what
# rumqttd dropped before edgehose read it, and the daemon's peak RSS (VmHWM).
#
# Usage: tests/bench/ingest.sh [runs=3] [clients=100] [messages_per_client=5000] [qos=1]
# MODE=frontdoor (default: PUBACK after commit) or MODE=broker (embedded rumqttd, whose
# in-memory log is LOG_SEGMENT_SIZE (default 32MiB) x LOG_SEGMENT_COUNT (default 8)).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}; clients=${2:-100}; per=${3:-5000}; qos=${4:-1}
total=$((clients * per))

cargo build --release -j2 -p edgehose -p firmware-sim >&2
bin=target/release
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
    || echo $((20000 + RANDOM % 20000)); }
metric() { curl -s "http://127.0.0.1:$admin/metrics" | awk -v k="$1" '$1==k {print $2}' | tail -n1; }

results=()
for run in $(seq "$runs"); do
    scratch=$(mktemp -d)
    mqtt=$(free_port); admin=$(free_port)
    if [ "${MODE:-frontdoor}" = broker ]; then
        ingress="[ingress]
mode = \"broker\"
[ingress.broker]
listen = \"127.0.0.1:$mqtt\"
log_segment_size = \"${LOG_SEGMENT_SIZE:-32MiB}\"
log_segment_count = ${LOG_SEGMENT_COUNT:-8}"
    else
        ingress="[ingress]
mode = \"frontdoor\"
[ingress.frontdoor]
listen = \"127.0.0.1:$mqtt\""
    fi
    cat > "$scratch/bench.toml" <<TOML
$ingress
[buffer]
path = "$scratch/data/edgehose.db"
[admin]
listen = "127.0.0.1:$admin"
[streams.telemetry]
topics = ["sensors/+/telemetry"]
partition_key = "\${topic(2)}"
destinations = ["local"]
[destinations.local]
type = "file"
root = "$scratch/out"
bucket = "bench"
buffer_size = "5MiB"
buffer_interval = "1s"
TOML
    $bin/edgehose run --config "$scratch/bench.toml" 2> "$scratch/edgehose.log" &
    pid=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null && break; sleep 0.1; done

    start=$(date +%s.%N)
    sim=$($bin/firmware-sim --port "$mqtt" --devices "$clients" --messages "$per" --rate 0 \
        --qos "$qos" --payload-size 200 --json)
    # Committed + dropped-by-rumqttd accounts for every message rumqttd acknowledged.
    for _ in $(seq 600); do
        committed=$(metric edgehose_records_committed_total); committed=${committed:-0}
        dropped=$(metric edgehose_broker_dropped_total); dropped=${dropped:-0}
        [ $((${committed%.*} + ${dropped%.*})) -ge "$total" ] && break
        sleep 0.05
    done
    end=$(date +%s.%N)
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    kill -TERM "$pid"; wait "$pid" || true

    pub_rate=$(echo "$sim" | sed -E 's/.*"rate_msg_s":([0-9.]+).*/\1/')
    commit_rate=$(awk -v c="$committed" -v s="$start" -v e="$end" 'BEGIN {printf "%.0f", c / (e - s)}')
    echo "run $run: published $(printf %.0f "$pub_rate") msg/s, committed $commit_rate msg/s ($committed of $total), rumqttd dropped $dropped, peak RSS $((hwm / 1024)) MiB" >&2
    results+=("$(printf %.0f "$pub_rate") $commit_rate $dropped $hwm")
    rm -rf "$scratch"
done

stats() { sort -n | awk '{a[NR]=$1} END {printf "%s [%s-%s]", a[int((NR+1)/2)], a[1], a[NR]}'; }
echo
echo "ingest (${MODE:-frontdoor}), $clients clients, 200-byte JSON, QoS $qos, $total messages per run, $runs runs: median [min-max]"
echo "  publish rate (PUBACKs)   : $(printf '%s\n' "${results[@]}" | cut -d' ' -f1 | stats) msg/s"
echo "  committed rate           : $(printf '%s\n' "${results[@]}" | cut -d' ' -f2 | stats) msg/s"
echo "  dropped by rumqttd       : $(printf '%s\n' "${results[@]}" | cut -d' ' -f3 | stats) messages"
echo "  daemon peak RSS (VmHWM)  : $(printf '%s\n' "${results[@]}" | cut -d' ' -f4 | stats) KiB"
