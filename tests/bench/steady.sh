#!/usr/bin/env bash
# Steady load: 100 devices publish 200-byte JSON at QoS 1 at a fixed rate for a fixed time into
# edgehose (embedded default: `file` destination, synchronous = "full"). Prints one line: the
# rate achieved, PUBACK latency p50/p99/max as the devices saw it, the daemon's peak RSS
# (VmHWM), and bytes the daemon wrote (/proc/PID/io write_bytes) per payload byte.
#
# Usage: tests/bench/steady.sh MSGS_PER_SECOND [seconds=20]
# MODE=frontdoor (default) or MODE=broker (embedded rumqttd), as in tests/bench/lib.sh.
# ENGINE=raw (default: firmware-sim's lean MQTT writer) or ENGINE=rumqttc (a full client per
# device, heavier on the shared CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
rate=${1:?messages per second}; secs=${2:-20}
devices=100
per_device=$(awk -v r="$rate" -v d="$devices" 'BEGIN {printf "%.3f", r / d}')
messages=$(awk -v r="$rate" -v d="$devices" -v s="$secs" 'BEGIN {printf "%d", r / d * s}')

. ./tests/bench/lib.sh
bench_build
bench_start
sim=$($bin/firmware-sim --port "$mqtt" --devices $devices --rate "$per_device" --messages "$messages" --engine "${ENGINE:-raw}" \
    --payload-size 200 --json)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
written=$(awk '/^write_bytes/ {print $2}' "/proc/$pid/io")
bench_stop
field() { echo "$sim" | sed -E "s/.*\"$1\":([0-9.]+).*/\1/"; }
printf '%s, %s msg/s target: achieved %.0f msg/s, PUBACK p50 %.1f ms p99 %.1f ms max %.1f ms, peak RSS %d MiB, %.1f bytes written per payload byte\n' \
    "${MODE:-frontdoor}" "$rate" "$(field rate_msg_s)" "$(field puback_latency_ms_p50)" \
    "$(field puback_latency_ms_p99)" "$(field puback_latency_ms_max)" $((hwm / 1024)) \
    "$(awk -v w="$written" -v p="$(field published)" 'BEGIN {print w / (p * 200)}')"
