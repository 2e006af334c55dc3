#!/usr/bin/env bash
# The front door beside the embedded-rumqttd path, same machine, same run: max ingest (3 runs
# each), PUBACK latency at about half the front door's max rate, and memory at 10,000 msg/s.
# The load comes from firmware-sim's raw engine (ENGINE=rumqttc for the full client).
# Usage: tests/bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")"
for mode in frontdoor broker; do
    MODE=$mode ./ingest.sh 3 100 5000 1 2>/dev/null | tail -n 5
done
for mode in frontdoor broker; do
    MODE=$mode ./steady.sh 160000 20 2>/dev/null
    MODE=$mode ./steady.sh 10000 20 2>/dev/null
done
