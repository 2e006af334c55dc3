#!/usr/bin/env bash
# Release .deb packages for amd64, arm64 (Pi 3/4/5, 64-bit OS) and armhf (32-bit Raspberry Pi
# OS): builds each target with cross/build.sh (profile dist, linked against glibc 2.31 so the
# packages install on Debian 11 / Raspberry Pi OS Bullseye as well as Bookworm), then packs it
# with cargo-deb. Output: target/debian/edgehose_<version>-1_<arch>.deb
#   cross/package.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
command -v cargo-deb >/dev/null || cargo install --locked -j2 cargo-deb@3.8.0
GLIBC=${GLIBC-2.31} cross/build.sh "${targets[@]}"
for t in "${targets[@]}"; do
    cargo deb -p edgehose --no-build --target "$t" --profile dist -o target/debian/
done
ls -l target/debian/*.deb
