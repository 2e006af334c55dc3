#!/usr/bin/env bash
# The systemd unit, checked: `systemd-analyze verify` (with ExecStart pointed at the binary the
# tests built) and `systemd-analyze security --offline`, which must rate it "OK" or better
# (exposure <= 1.9 of 10). Skipped where systemd-analyze is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v systemd-analyze >/dev/null; then
    echo "systemd-analyze not found: skipping the unit checks"
    exit 0
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed "s#/usr/bin/edgehose#$PWD/target/debug/edgehose#g" systemd/edgehose.service > "$dir/edgehose.service"
systemd-analyze verify "$dir/edgehose.service"
systemd-analyze security --offline=true --threshold=19 "$dir/edgehose.service" | tail -n1
