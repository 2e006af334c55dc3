#!/usr/bin/env bash
# What a record costs beside what a rule costs: alternated rounds of bench.py's
# edgehose_ingest(500000, 1, 100, 5000) with topic routing to one stream (the main table's
# config), to two and to three streams (raw_copies: every reading stored and delivered two or
# three times, no SQL), and with THREE_RULES. Prints msg/s, CPU s per million and peak RSS of
# each, and its rate against one stream's in the same round.
#   tests/bench/copies.sh [ROUNDS]     (BENCH_EDGEHOSE: the binary, e.g. target/dist/edgehose)
# Needs target/release/firmware-sim (cargo build --release -p firmware-sim).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 - "${1:-3}" <<'PY'
import sys; sys.path.insert(0, 'tests/bench'); import bench
configs = [("one stream", None), ("two copies", bench.raw_copies(2)),
           ("three copies", bench.raw_copies(3)), ("three rules", bench.THREE_RULES)]
for rnd in range(int(sys.argv[1])):
    base = None
    for name, streams in configs:
        rate, _, hwm, cpu = bench.edgehose_ingest(500000, 1, 100, 5000, streams=streams)[:4]
        base = base or rate
        print(f"round {rnd + 1} {name:13s} {rate:9,.0f} msg/s = {rate / base:.2f}x  "
              f"CPU {cpu:.2f} s per million  RSS {hwm / 1024:.1f} MiB", flush=True)
PY
