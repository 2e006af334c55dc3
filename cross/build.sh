#!/usr/bin/env bash
# Release builds for Raspberry Pi: aarch64 (Pi 3/4/5 with a 64-bit OS) and armv7 (32-bit
# Raspberry Pi OS), with the Rust targets from rustup and Debian's cross gcc as linker (the C
# parts, bundled SQLite and ring, are compiled by the same gcc). Profile `dist` (LTO, size).
#
#   cross/build.sh [TARGET...]          default: aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf
#   GLIBC=2.31 cross/build.sh           link against glibc 2.31 (Debian 11 / Raspberry Pi OS
#                                       Bullseye) with cargo-zigbuild and zig from PyPI
#
#   EDGEHOSE_FEATURES=broker cross/build.sh    include the embedded rumqttd (`ingress.mode =
#                                       "broker"`, a benchmark baseline; not a default feature)
#
# Output: target/<TARGET>/dist/{edgehose,firmware-sim}; sizes are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

gcc_for() {
    case $1 in
    aarch64-*) echo aarch64-linux-gnu ;;
    armv7-*) echo arm-linux-gnueabihf ;;
    x86_64-*) echo x86_64-linux-gnu ;;
    *) echo "unsupported target $1" >&2; exit 2 ;;
    esac
}

need=()
for t in "${targets[@]}"; do
    g=$(gcc_for "$t")
    [ "$g" = x86_64-linux-gnu ] && continue
    command -v "$g-gcc" >/dev/null || need+=("gcc-$g")
    # The cross gcc only recommends its C library headers; --no-install-recommends leaves them out.
    case $g in aarch64-*) a=arm64 ;; *) a=armhf ;; esac
    [ -e "/usr/$g/include/stdio.h" ] || need+=("libc6-dev-$a-cross")
done
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "missing: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
fi
rustup target add "${targets[@]}" >/dev/null
# The Pi build leaves out the embedded rumqttd unless asked for.
if [ "${EDGEHOSE_FEATURES:-}" = broker ]; then features="--features broker"; else features=""; fi

if [ -n "${GLIBC:-}" ]; then
    venv=target/zig-venv
    if [ ! -x "$venv/bin/cargo-zigbuild" ]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q 'ziglang>=0.13,<0.15' 'cargo-zigbuild>=0.19'
    fi
    export PATH="$PWD/$venv/bin:$PATH"
    for t in "${targets[@]}"; do
        cargo zigbuild --locked -j2 --profile dist --target "$t.$GLIBC" -p edgehose -p firmware-sim $features
    done
else
    for t in "${targets[@]}"; do
        cargo build --locked -j2 --profile dist --target "$t" -p edgehose -p firmware-sim $features
    done
fi

for t in "${targets[@]}"; do
    for b in edgehose firmware-sim; do
        f=target/$t/dist/$b
        printf '%-34s %-13s %6.1f MiB  needs glibc %s\n' "$t" "$b" \
            "$(echo "$(stat -c %s "$f") / 1048576" | bc -l)" \
            "$(objdump -T "$f" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1 | cut -d_ -f2)"
    done
done
