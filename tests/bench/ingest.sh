#!/usr/bin/env bash
# Max sustained ingest: firmware-sim's devices publish 200-byte JSON at QoS 1 as fast as the
# gateway takes them, into edgehose (front door or embedded rumqttd) with a `file` destination. Reports,
# per run and as median [min-max] over the runs: the publish rate the devices saw (PUBACKs),
# the rate at which the buffer committed everything (first publish -> last commit), what
# rumqttd dropped before edgehose read it, and the daemon's peak RSS (VmHWM).
#
# Usage: tests/bench/ingest.sh [runs=3] [clients=100] [messages_per_client=5000] [qos=1]
# MODE=frontdoor (default: PUBACK after commit) or MODE=broker (embedded rumqttd, whose
# in-memory log is LOG_SEGMENT_SIZE (default 32MiB) x LOG_SEGMENT_COUNT (default 8)), or
# MODE=client (devices publish to mosquitto, edgehose subscribes and acks after commit;
# BROKER_INFLIGHT, default 20, is mosquitto's max_inflight_messages towards edgehose).
# ENGINE=raw (default: firmware-sim's lean MQTT writer) or ENGINE=rumqttc (a full client per
# device, heavier on the shared CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}; clients=${2:-100}; per=${3:-5000}; qos=${4:-1}
total=$((clients * per))

. ./tests/bench/lib.sh
bench_build

results=()
for run in $(seq "$runs"); do
    bench_start
    start=$(date +%s.%N)
    sim=$($bin/firmware-sim --port "$mqtt" --devices "$clients" --messages "$per" --rate 0 --engine "${ENGINE:-raw}" \
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
    bench_stop

    pub_rate=$(echo "$sim" | sed -E 's/.*"rate_msg_s":([0-9.]+).*/\1/')
    commit_rate=$(awk -v c="$committed" -v s="$start" -v e="$end" 'BEGIN {printf "%.0f", c / (e - s)}')
    echo "run $run: published $(printf %.0f "$pub_rate") msg/s, committed $commit_rate msg/s ($committed of $total), rumqttd dropped $dropped, peak RSS $((hwm / 1024)) MiB" >&2
    results+=("$(printf %.0f "$pub_rate") $commit_rate $dropped $hwm")
done

stats() { sort -n | awk '{a[NR]=$1} END {printf "%s [%s-%s]", a[int((NR+1)/2)], a[1], a[NR]}'; }
echo
echo "ingest (${MODE:-frontdoor}), $clients clients, 200-byte JSON, QoS $qos, $total messages per run, $runs runs: median [min-max]"
echo "  publish rate (PUBACKs)   : $(printf '%s\n' "${results[@]}" | cut -d' ' -f1 | stats) msg/s"
echo "  committed rate           : $(printf '%s\n' "${results[@]}" | cut -d' ' -f2 | stats) msg/s"
echo "  dropped by rumqttd       : $(printf '%s\n' "${results[@]}" | cut -d' ' -f3 | stats) messages"
echo "  daemon peak RSS (VmHWM)  : $(printf '%s\n' "${results[@]}" | cut -d' ' -f4 | stats) KiB"
