# Shared by the benchmark scripts: build, pick ports, write a scratch config, start and stop
# the gateway. Source it from a script that has done `cd` to the repository root.

bench_build() {
    cargo build --release -j2 -p edgehose -p firmware-sim >&2
    bin=target/release
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null \
        || echo $((20000 + RANDOM % 20000))
}

# Prints a gateway config for the current scratch, mqtt and admin, delivering under the
# `file` root $1 (default $scratch/out), or to the destination body in $DEST_TOML. MODE=frontdoor (default) or MODE=broker (embedded
# rumqttd, its log LOG_SEGMENT_SIZE x LOG_SEGMENT_COUNT, default 32MiB x 8), or MODE=client
# (edgehose subscribes to Debian's mosquitto on $mqtt, which allows BROKER_INFLIGHT QoS 1
# messages in flight to it, default 20 as mosquitto's own default; devices publish to mosquitto).
bench_config() {
    local root=${1:-$scratch/out}
    if [ "${MODE:-frontdoor}" = client ]; then
        cat <<TOML
[ingress]
mode = "client"
[ingress.client]
host = "127.0.0.1"
port = $mqtt
client_id = "edgehose-bench"
topics = ["sensors/+/telemetry"]
TOML
    elif [ "${MODE:-frontdoor}" = broker ]; then
        cat <<TOML
[ingress]
mode = "broker"
[ingress.broker]
listen = "127.0.0.1:$mqtt"
log_segment_size = "${LOG_SEGMENT_SIZE:-32MiB}"
log_segment_count = ${LOG_SEGMENT_COUNT:-8}
TOML
    else
        cat <<TOML
[ingress]
mode = "frontdoor"
[ingress.frontdoor]
listen = "127.0.0.1:$mqtt"
TOML
    fi
    cat <<TOML
[buffer]
path = "$scratch/data/edgehose.db"
[admin]
listen = "127.0.0.1:$admin"
[streams.telemetry]
topics = ["sensors/+/telemetry"]
partition_key = "\${topic(2)}"
destinations = ["local"]
[destinations.local]
TOML
    if [ -n "${DEST_TOML:-}" ]; then
        printf '%s\n' "$DEST_TOML"
    else
        cat <<TOML
type = "file"
root = "$root"
bucket = "bench"
buffer_size = "5MiB"
buffer_interval = "1s"
TOML
    fi
}

# The Python venv with moto (the S3/Kinesis emulator) that tests/run.sh also uses.
bench_venv() {
    venv=target/test-venv
    if ! "$venv/bin/python" -c 'import moto.server, boto3' 2>/dev/null; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q 'paho-mqtt>=2,<3' 'moto[server]>=5,<6' 'aws-kinesis-agg>=1.2,<2'
    fi
}

bench_wait_ready() {
    for _ in $(seq 2000); do
        curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null && return 0
        sleep 0.005
    done
    echo "edgehose did not start:" >&2
    cat "$scratch"/*.log >&2
    return 1
}

# Starts edgehose with `bench_config` on a fresh scratch directory; sets scratch, mqtt, admin
# and pid.
bench_start() {
    scratch=$(mktemp -d)
    mqtt=$(free_port); admin=$(free_port)
    broker_pid=
    if [ "${MODE:-frontdoor}" = client ]; then
        printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages %s\n' \
            "$mqtt" "${BROKER_INFLIGHT:-20}" > "$scratch/mosquitto.conf"
        "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$scratch/mosquitto.conf" 2> "$scratch/mosquitto.log" &
        broker_pid=$!
        sleep 0.3
    fi
    bench_config > "$scratch/bench.toml"
    $bin/edgehose run --config "$scratch/bench.toml" 2> "$scratch/edgehose.log" &
    pid=$!
    bench_wait_ready
    if [ -n "$broker_pid" ]; then
        for _ in $(seq 200); do
            grep -q "connected to the external broker" "$scratch/edgehose.log" && break
            sleep 0.05
        done
        sleep 0.3   # the SUBSCRIBE registered before the first publish
    fi
}

bench_stop() {
    kill -TERM "$pid"
    wait "$pid" || true
    if [ -n "${broker_pid:-}" ]; then kill "$broker_pid"; wait "$broker_pid" || true; fi
    rm -rf "$scratch"
}

metric() {
    curl -s "http://127.0.0.1:$admin/metrics" | awk -v k="$1" '$1==k {print $2}' | tail -n1
}
