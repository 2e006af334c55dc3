#!/usr/bin/env bash
# The Debian package, checked: builds the amd64 .deb with cargo-deb from the binaries the tests
# use (target/debug), checks its metadata, conffiles, maintainer scripts and contents with
# dpkg-deb, and, when run as root, installs it with dpkg, runs the installed binary against a
# real MQTT client, and purges it. tests/run.sh runs it; cross/package.sh builds the release
# packages (amd64, arm64, armhf).
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    echo "== installing cargo-deb $CARGO_DEB_VERSION"
    cargo install --locked -j2 -q "cargo-deb@$CARGO_DEB_VERSION"
fi
out=target/debian-test
rm -rf "$out"
# cargo-deb warns that dev builds are not for releases: this one only checks the packaging.
deb=$(cargo deb -p edgehose --no-build --profile dev -o "$out/" 2>/dev/null | tail -n1)
fail() { echo "package check failed: $*" >&2; exit 1; }

info=$(dpkg-deb --info "$deb")
for want in "Package: edgehose" "Architecture: amd64" "Depends: adduser, libc6" "Section: net"; do
    grep -q "$want" <<<"$info" || fail "control lacks '$want'"
done
contents=$(dpkg-deb --contents "$deb")
for path in ./usr/bin/edgehose ./etc/edgehose/edgehose.toml ./usr/lib/systemd/system/edgehose.service \
    ./usr/share/doc/edgehose/README.md ./usr/share/doc/edgehose/copyright; do
    grep -q " $path\$" <<<"$contents" || fail "$path not in the package"
done
grep -q '^-rwxr-xr-x .* ./usr/bin/edgehose$' <<<"$contents" || fail "the binary is not 0755"
ctl=$(mktemp -d)
dpkg-deb -e "$deb" "$ctl"
[ "$(head -n1 "$ctl/conffiles")" = /etc/edgehose/edgehose.toml ] || fail "conffiles: $(cat "$ctl/conffiles")"
grep -q '^/etc/edgehose/policies/device.json$' "$ctl/conffiles" || fail "the device policy is not a conffile"
grep -q 'edgehose certs --dir /etc/edgehose/tls' "$ctl/postinst" || fail "postinst does not make the TLS certificates"
grep -q 'adduser --system --group' "$ctl/postinst" || fail "postinst does not create the user"
grep -q 'deb-systemd-helper enable edgehose.service' "$ctl/postinst" || fail "postinst does not enable the unit"
grep -q 'rm -rf /var/lib/edgehose' "$ctl/postrm" || fail "postrm does not purge the state"
echo "package contents ok: $deb"

if [ "$(id -u)" != 0 ]; then
    echo "not root: skipping the dpkg install check"
    exit 0
fi
command -v adduser >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq adduser >/dev/null
dpkg --purge edgehose >/dev/null 2>&1 || true
dpkg -i "$deb" >/dev/null
trap 'kill $pid 2>/dev/null || true; dpkg --purge edgehose >/dev/null 2>&1 || true; rm -rf "$scratch"' EXIT
getent passwd edgehose >/dev/null || fail "user edgehose not created"
[ "$(stat -c '%a %U:%G' /etc/edgehose/edgehose.toml)" = "640 root:edgehose" ] || fail "config permissions"
/usr/bin/edgehose --version
/usr/bin/edgehose check-config --config /etc/edgehose/edgehose.toml
# The CA's key for root only, the server's for the service only.
[ "$(stat -c '%a %U' /etc/edgehose/tls/ca.key)" = "600 root" ] || fail "ca.key: $(stat -c '%a %U' /etc/edgehose/tls/ca.key)"
[ "$(stat -c '%a %U' /etc/edgehose/tls/server.key)" = "600 edgehose" ] || fail "server.key permissions"
# Enrolling a device, as the README says.
/usr/bin/edgehose certs --dir /etc/edgehose/tls --device pkg >/dev/null
[ "$(stat -c '%a' /etc/edgehose/tls/devices/pkg.key)" = 600 ] || fail "device key permissions"

# The installed binary, as the packaged user, on the packaged config's layout (ports moved to
# free ones, state in a scratch directory), with mosquitto_pub publishing to it.
scratch=$(mktemp -d)
chown edgehose:edgehose "$scratch"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt=$(port); admin=$(port); tls=$(port)
sed -e "s#127.0.0.1:1883#127.0.0.1:$mqtt#; s#0.0.0.0:8883#127.0.0.1:$tls#; s#127.0.0.1:9464#127.0.0.1:$admin#; s#/var/lib/edgehose#$scratch#g" \
    /etc/edgehose/edgehose.toml > "$scratch/edgehose.toml"
chown edgehose "$scratch/edgehose.toml"
runuser -u edgehose -- /usr/bin/edgehose run --config "$scratch/edgehose.toml" 2> "$scratch/log" &
pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null && break; sleep 0.1; done
# Two over mutual TLS with the enrolled device's certificate, one from a local process on the
# plain loopback listener.
t=/etc/edgehose/tls
for i in 1 2; do
    mosquitto_pub -h 127.0.0.1 -p "$tls" --cafile $t/ca.crt --cert $t/devices/pkg.crt --key $t/devices/pkg.key \
        -i pkg -q 1 -t sensors/pkg/telemetry -m "{\"device\":\"pkg\",\"seq\":$i}"
done
mosquitto_pub -p "$mqtt" -q 1 -t sensors/pkg/telemetry -m "{\"device\":\"pkg\",\"seq\":3}"
# Another device's topic is refused (the connection is closed: MQTT 3.1.1).
if mosquitto_pub -h 127.0.0.1 -p "$tls" --cafile $t/ca.crt --cert $t/devices/pkg.crt --key $t/devices/pkg.key \
    -i pkg -q 1 -t sensors/other/telemetry -m '{"device":"other","seq":1}' 2>/dev/null; then
    fail "a device published on another device's topic"
fi
kill -TERM $pid; wait $pid || true   # runuser reports the signal it passed on
n=$(find "$scratch/edgehose-telemetry" "$scratch/out" -name '*.gz' 2>/dev/null -exec zcat {} + | grep -c '"device":"pkg"' || true)
[ "$n" = 3 ] || { cat "$scratch/log" >&2; fail "expected 3 records from the installed binary, found $n"; }
dpkg --purge edgehose >/dev/null
getent passwd edgehose >/dev/null && fail "purge left the user"
[ -e /etc/edgehose/tls ] && fail "purge left the certificates"
echo "package install, run as user edgehose, and purge ok"
