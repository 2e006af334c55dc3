#!/usr/bin/env bash
# Alternated A/B of two edgehose binaries on the rules benchmark's load: each round runs bench.py's
# edgehose_ingest(500000, 1, 100, 5000) with topic routing alone, then with THREE_RULES, for
# binary A, then for binary B. Prints msg/s, CPU s per million and peak RSS of each, and the ratio.
#   tests/bench/ab_rules.sh A B [ROUNDS]     (e.g. two `cargo build --profile dist` binaries)
# Needs target/release/firmware-sim (cargo build --release -p firmware-sim).
set -euo pipefail
cd "$(dirname "$0")/../.."
for round in $(seq 1 "${3:-3}"); do
  for bin in "$1" "$2"; do
    BENCH_EDGEHOSE="$bin" python3 -c "
import sys; sys.path.insert(0, 'tests/bench'); import bench
t = bench.edgehose_ingest(500000, 1, 100, 5000)
r = bench.edgehose_ingest(500000, 1, 100, 5000, streams=bench.THREE_RULES)
print('round $round $bin', 'topics %.0f msg/s cpuM %.2f rss %.1f | rules %.0f msg/s cpuM %.2f rss %.1f | ratio %.3f' % (t[0], t[3], t[2] / 1024, r[0], r[3], r[2] / 1024, r[0] / t[0]), flush=True)
"
  done
done
