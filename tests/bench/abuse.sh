#!/usr/bin/env bash
# Each abuse of the front door that issue 12 lists, against a well-behaved fleet: the gateway
# (release build, defaults, a `file` destination) with firmware-sim's devices publishing
# 200-byte JSON at QoS 1, first alone, then while tests/bench/abusers.py keeps one abuse up:
#   filters    400 sessions x 50 topic filters matching nothing (20,000 filters)
#   matching   the same, every session's first filter matching every message (full fan-out)
#   partial    200 connections each holding a half-sent 300 KiB PUBLISH
#   retained   a flood of retained 100 KB messages on ever new topics
#   sessions   a flood of new persistent sessions (connect, subscribe, leave)
#   malformed  a flood of connections sending malformed packets (the log flood)
# Two loads per case: as fast as PUBACKs come (20 devices x 5,000), and paced (20 devices at
# 100 msg/s for 10 s, PUBACK p99 at an everyday rate). The issue's criterion: the well-behaved
# fleet's throughput and PUBACK p99 within 2x of the run alone.
# Usage: tests/bench/abuse.sh [runs=3] [case...]
# Prints per case: max rate and its PUBACK p99, paced PUBACK p99 (medians [min-max] over the
# runs), the gateway's peak RSS, and the ratios to `alone`.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
shift || true
cases=("$@")
[ ${#cases[@]} -gt 0 ] || cases=(filters matching partial retained sessions malformed)
. ./tests/bench/lib.sh
bench_build
field() { echo "$1" | sed -E "s/.*\"$2\":([0-9.]+).*/\1/"; }
median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
spread() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { printf "%.1f [%.1f-%.1f]", v[int((NR + 1) / 2)], v[1], v[NR] }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

declare -A rate p99 paced rss
for case in alone "${cases[@]}"; do
    rates=(); p99s=(); paceds=(); rsss=()
    for run in $(seq "$runs"); do
        bench_start
        abuser=
        if [ "$case" != alone ]; then
            python3 tests/bench/abusers.py "$mqtt" "$case" > "$scratch/abuser.out" 2>&1 &
            abuser=$!
            for _ in $(seq 1200); do grep -q '^ready' "$scratch/abuser.out" && break; sleep 0.05; done
            grep -q '^ready' "$scratch/abuser.out" || { cat "$scratch/abuser.out" >&2; exit 1; }
        fi
        max=$($bin/firmware-sim --port "$mqtt" --devices 20 --messages 5000 --rate 0 --engine raw \
            --payload-size 200 --json --first-device 1000)
        steady=$($bin/firmware-sim --port "$mqtt" --devices 20 --rate 100 --duration-secs 10 \
            --engine raw --payload-size 200 --json --first-device 2000 --spread 1)
        if [ -n "$abuser" ]; then kill -TERM "$abuser"; wait "$abuser" || true; fi
        rsss+=("$(awk '/VmHWM/ { printf "%.1f", $2 / 1024 }' "/proc/$pid/status")")
        bench_stop
        rates+=("$(field "$max" rate_msg_s)"); p99s+=("$(field "$max" puback_latency_ms_p99)")
        paceds+=("$(field "$steady" puback_latency_ms_p99)")
    done
    rate[$case]=$(median "${rates[@]}"); p99[$case]=$(median "${p99s[@]}")
    paced[$case]=$(median "${paceds[@]}"); rss[$case]=$(median "${rsss[@]}")
    line="$case: max $(spread "${rates[@]}") msg/s, its PUBACK p99 $(spread "${p99s[@]}") ms; paced 2,000 msg/s PUBACK p99 $(spread "${paceds[@]}") ms; peak RSS $(spread "${rsss[@]}") MiB"
    if [ "$case" != alone ]; then
        line="$line; vs alone: rate x$(ratio "${rate[$case]}" "${rate[alone]}"), p99 x$(ratio "${p99[$case]}" "${p99[alone]}"), paced p99 x$(ratio "${paced[$case]}" "${paced[alone]}")"
    fi
    echo "$line"
done
