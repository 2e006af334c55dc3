#!/usr/bin/env python3
"""The benchmark: every figure of BENCHMARKS.md's main table from one command, with the
baselines measured in the same invocation on the same load.

Run it through tests/bench/bench.sh, which builds the release binaries first:

    tests/bench/bench.sh [--runs 3] [--json] [--quick]

Each figure is measured --runs times (default 3) and reported as median [min-max]. --quick
runs every figure once with tiny loads (CI uses it so the harness cannot rot; it asserts
nothing about speed). --json prints one JSON document instead of the table.

BENCH_COMMIT_INTERVAL and BENCH_COMMIT_LINGER set buffer.commit_interval and
buffer.commit_linger_records to measure that trade-off (unset: the daemon's defaults).

Systems:
  edgehose   the release daemon, front door (PUBACK after the durable commit), `file`
             destination, everything else as configured by default (synchronous = "full")
  rumqttd    a standalone rumqttd 0.20 relaying to an in-process subscriber that does nothing
             (tests/src/bin/rumqttd-relay.rs): PUBACK from memory, nothing durable
  mosquitto  Debian's mosquitto (unlimited inflight and queue, no persistence, no log) relaying
             to one lean subscriber that does nothing (tests/src/bin/null-sub.rs: a plain
             socket and an MQTT codec, QoS 0 subscription, its CPU share reported: it is not
             what limits the relay)
The load is firmware-sim's realistic 200-byte JSON from 100 devices (--engine raw: a lean MQTT
writer per device, so the load generator leaves the daemon most of the 2 cores).

--rules (issue 16): QoS 1 ingest with three typical rules (a reshape, a filter, per-device
one-minute windows; each to a `file` destination of its own) alternated with topic routing
alone, then 10,000 devices at 1 msg/s with raw readings and one-minute per-device windows
(peak RSS beside the same fleet with topic routing alone, and the bytes and Kinesis PUT units
the aggregates save over the raw records of the same whole minutes).

The mTLS figures run the same daemon with its TLS listener (client certificates required,
ECDSA P-256 certificates from `edgehose certs`, TLS 1.3, no policies) and the same raw engine
over rustls; every device does a full handshake (no resumption), the client's share of it on
the same 2 cores.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.join(ROOT, os.environ.get("BENCH_BIN", "target/release"))
# The daemon under test: BENCH_EDGEHOSE, or BIN's (--dist: the profile that ships on a gateway).
EDGEHOSE = os.environ.get("BENCH_EDGEHOSE") or os.path.join(BIN, "edgehose")
CLK_TCK = os.sysconf("SC_CLK_TCK")


_next_port = [10_000 + (os.getpid() * 7919) % 22_000]


def free_port():
    """A loopback port that was free a moment ago, never the same one twice in this process:
    below the kernel's ephemeral range (32768-60999 by default), since asking for port 0 twice
    can return the same port, and an ephemeral one can be taken by any outgoing connection."""
    for _ in range(22_000):
        port = 10_000 + _next_port[0] % 22_000
        _next_port[0] += 1
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free loopback port in 10000..32000")


def commit_overrides():
    """Config lines for the BENCH_COMMIT_* and BENCH_SYNCHRONOUS overrides; none by default
    (the daemon's defaults)."""
    lines = []
    if "BENCH_COMMIT_INTERVAL" in os.environ:
        lines.append(f'commit_interval = "{os.environ["BENCH_COMMIT_INTERVAL"]}"')
    if "BENCH_COMMIT_LINGER" in os.environ:
        lines.append(f'commit_linger_records = {int(os.environ["BENCH_COMMIT_LINGER"])}')
    if "BENCH_SYNCHRONOUS" in os.environ:
        lines.append(f'synchronous = "{os.environ["BENCH_SYNCHRONOUS"]}"')
    return "\n".join(lines)


def now_ms():
    return time.time() * 1000.0


def proc_status(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def proc_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_written(pid):
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


# The main table's streams: topic routing to one `file` destination.
DEFAULT_STREAMS = """
[streams.telemetry]
topics = ["sensors/+/telemetry"]
partition_key = "${{topic(2)}}"
destinations = ["local"]
[destinations.local]
type = "file"
root = "{out}"
bucket = "bench"
buffer_size = "{size}"
buffer_interval = "{interval}"
"""


class Edgehose:
    """One `edgehose run` on a scratch directory with the benchmark config."""

    def __init__(self, root=None, interval="1s", size="5MiB", scratch=None, pki=None,
                 streams=None, wrap=()):
        self.scratch = scratch or tempfile.mkdtemp(prefix="edgehose-bench-")
        self.mqtt = free_port()
        self.admin = free_port()
        self.tls = free_port() if pki else None
        self.out = root or os.path.join(self.scratch, "out")
        tls = "" if not pki else f"""
[ingress.frontdoor.tls]
listen = "127.0.0.1:{self.tls}"
cert = "{pki}/server.crt"
key = "{pki}/server.key"
client_ca = "{pki}/ca.crt"
"""
        if streams is None:
            streams = DEFAULT_STREAMS
        config = f"""
[ingress]
mode = "frontdoor"
[ingress.frontdoor]
listen = "127.0.0.1:{self.mqtt}"
{tls}
[buffer]
path = "{self.scratch}/data/edgehose.db"
{commit_overrides()}
[admin]
listen = "127.0.0.1:{self.admin}"
{streams.format(out=self.out, size=size, interval=interval)}
"""
        self.config = os.path.join(self.scratch, f"edgehose-{self.mqtt}.toml")
        with open(self.config, "w") as f:
            f.write(config)
        self.log = open(os.path.join(self.scratch, "edgehose.log"), "a")
        self.started = time.time()
        self.proc = subprocess.Popen(
            [*wrap, EDGEHOSE, "run", "--config", self.config],
            stdout=subprocess.DEVNULL, stderr=self.log)
        self.ready_after = self.wait_ready()

    def wait_ready(self):
        end = time.time() + 30
        while time.time() < end:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/healthz", timeout=1)
                return time.time() - self.started
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.002)
        raise RuntimeError("edgehose did not start: " + open(self.log.name).read()[-2000:])

    def metric(self, name):
        """The metric's value, summed over its label sets."""
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/metrics", timeout=5).read()
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith("#") or " " not in line:
                continue
            key, value = line.rsplit(" ", 1)
            if key == name or key.startswith(name + "{"):
                total += float(value)
        return total

    def wait_metric(self, name, at_least, timeout=600):
        end = time.time() + timeout
        while time.time() < end:
            if self.metric(name) >= at_least:
                return time.time()
            time.sleep(0.01)
        raise RuntimeError(f"{name} did not reach {at_least}")

    @property
    def pid(self):
        return self.proc.pid

    def stop(self, keep=False):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        self.log.close()
        if not keep:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def kill9(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def sim(port, devices, messages, rate=0.0, qos=1, extra=(), pin=()):
    out = subprocess.run(
        [*pin, os.path.join(BIN, "firmware-sim"), "--port", str(port), "--devices", str(devices),
         "--messages", str(messages), "--rate", str(rate), "--qos", str(qos),
         "--engine", "raw", "--payload-size", "200", "--json", *extra],
        capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"firmware-sim failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout)


def start_mosquitto(port, scratch):
    """Debian's mosquitto on 127.0.0.1:`port` in its best configuration for a relay (unlimited
    inflight and queue, no persistence, no log), once it accepts connections."""
    conf = os.path.join(scratch, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                "max_queued_messages 0\nmax_inflight_messages 0\n"
                "persistence false\nlog_dest none\n"
                + ("user root\n" if os.geteuid() == 0 else ""))
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = subprocess.Popen([mosq, "-c", conf], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.02)
    return broker


def mosquitto_steady_cpu(rate, seconds, devices=100):
    """mosquitto's CPU per million QoS 1 messages under a steady load with no subscriber (its
    PUBACK from memory, nothing stored): what a lean C broker pays per message at that rate,
    the kernel's share (a read and a write per message) included."""
    port = free_port()
    scratch = tempfile.mkdtemp(prefix="mosquitto-steady-")
    broker = start_mosquitto(port, scratch)
    try:
        cpu0 = proc_cpu_s(broker.pid)
        s = sim(port, devices, max(1, int(rate / devices * seconds)), rate=rate / devices)
        return (proc_cpu_s(broker.pid) - cpu0) / s["published"] * 1e6
    finally:
        broker.kill()
        broker.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def relay_run(kind, total, qos, devices, per, info=None):
    """A baseline relay run: (delivered msg/s, devices' publish msg/s, received). With `info`
    (a dict), the mosquitto subscriber's CPU share over the run goes in info["sub_cpu_share"]."""
    port = free_port()
    scratch = tempfile.mkdtemp(prefix="relay-bench-")
    procs = []
    try:
        if kind == "rumqttd":
            relay = subprocess.Popen([os.path.join(BIN, "rumqttd-relay"), str(port), str(total)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(relay)
            relay.stderr.readline()  # "ready"
            time.sleep(0.2)
        else:
            procs.append(start_mosquitto(port, scratch))
            relay = subprocess.Popen([os.path.join(BIN, "null-sub"), str(port), str(total)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(relay)
            relay.stderr.readline()  # "ready"
        start = now_ms()
        broker_cpu0 = proc_cpu_s(procs[0].pid)
        s = sim(port, devices, per, qos=qos)
        # The relay prints its count once it has everything (or went idle), then keeps serving.
        r = json.loads(relay.stdout.readline())
        took = max(r["last_ms"] - start, 1)
        if info is not None and "cpu_s" in r:
            info["sub_cpu_share"] = r["cpu_s"] / (took / 1000.0)
            info["broker_cpu_share"] = (proc_cpu_s(procs[0].pid) - broker_cpu0) / (took / 1000.0)
        return r["received"] * 1000.0 / took, s["rate_msg_s"], r["received"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(scratch, ignore_errors=True)


def make_pki():
    """A CA, the server certificate for 127.0.0.1 and one device certificate, by edgehose certs."""
    pki = tempfile.mkdtemp(prefix="edgehose-bench-pki-")
    subprocess.run([os.path.join(BIN, "edgehose"), "certs", "--dir", pki, "--host", "127.0.0.1",
                    "--device", "fleet"], check=True, capture_output=True)
    return pki


def tls_args(pki):
    return ("--tls-ca", f"{pki}/ca.crt", "--tls-cert", f"{pki}/devices/fleet.crt",
            "--tls-key", f"{pki}/devices/fleet.key")


def edgehose_ingest(total, qos, devices, per, pki=None, streams=None, info=None):
    """(committed msg/s, devices' publish msg/s, peak RSS KiB, CPU s per million, committed).
    With `info` (a dict), the peak of the anonymous part of the RSS (RssAnon, sampled every
    20 ms; the rest is the binary's code, file-backed) goes in info["anon_peak_kib"]."""
    gw = Edgehose(pki=pki, streams=streams)
    stop = threading.Event()
    anon = [0]

    def sample():
        while not stop.wait(0.02):
            try:
                anon[0] = max(anon[0], proc_status(gw.pid, "RssAnon"))
            except (OSError, ValueError, TypeError):
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    if info is not None:
        sampler.start()
    try:
        cpu0 = proc_cpu_s(gw.pid)
        start = time.time()
        if pki:
            s = sim(gw.tls, devices, per, qos=qos, extra=tls_args(pki))
        else:
            s = sim(gw.mqtt, devices, per, qos=qos)
        sent = s["published"]
        if streams is None:
            done = gw.wait_metric("edgehose_records_committed_total", sent, timeout=120)
            committed = gw.metric("edgehose_records_committed_total")
        else:
            # With rules a message becomes several records (or none): count messages, each
            # committed once its PUBACK came (QoS 1 only).
            assert qos == 1
            done = gw.wait_metric("edgehose_messages_received_total", sent, timeout=120)
            done = max(done, start + s["elapsed_s"]) if "elapsed_s" in s else done
            committed = s["acknowledged"]
        cpu = proc_cpu_s(gw.pid) - cpu0
        hwm = proc_status(gw.pid, "VmHWM")
        if info is not None:
            stop.set()
            sampler.join()
            info["anon_peak_kib"] = anon[0]
        return committed / (done - start), s["rate_msg_s"], hwm, cpu / committed * 1e6, committed, sent
    finally:
        stop.set()
        gw.stop()


def cpu_jiffies():
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def steady(rate, seconds, devices=100, interval="1s", spread=None):
    """A steady load: PUBACK latencies, RSS samples, CPU and bytes written, and how busy the
    whole machine was (daemon and simulator together)."""
    gw = Edgehose(interval=interval)
    samples = []
    stop = threading.Event()

    def sample():
        while not stop.wait(5):
            samples.append(proc_status(gw.pid, "VmRSS"))

    t = threading.Thread(target=sample, daemon=True)
    try:
        cpu0, w0 = proc_cpu_s(gw.pid), proc_written(gw.pid)
        busy0, total0 = cpu_jiffies()
        t.start()
        extra = () if spread is None else ("--spread", str(spread))
        s = sim(gw.mqtt, devices, max(1, int(rate / devices * seconds)), rate=rate / devices,
                extra=extra)
        busy1, total1 = cpu_jiffies()
        gw.wait_metric("edgehose_records_committed_total", s["published"], timeout=60)
        stop.set()
        cpu = proc_cpu_s(gw.pid) - cpu0
        hwm = proc_status(gw.pid, "VmHWM")
        # Writes while the load ran (the objects it caused included), not the final flush.
        written = proc_written(gw.pid) - w0
        return {
            "rate": s["rate_msg_s"], "p50": s["puback_latency_ms_p50"],
            "p99": s["puback_latency_ms_p99"], "max": s["puback_latency_ms_max"],
            "hwm_kib": hwm, "rss_samples_kib": samples,
            "cpu_s_per_million": cpu / s["published"] * 1e6,
            "written_per_payload_byte": written / (s["published"] * 200.0),
            "machine_busy": (busy1 - busy0) / max(total1 - total0, 1),
        }
    finally:
        stop.set()
        gw.stop()


def delivered_latency(rate, seconds, interval_s=1):
    """publish -> delivered: each record's device timestamp against the moment its object
    appeared in the `file` destination (polled every 5 ms)."""
    gw = Edgehose(interval=f"{interval_s}s")
    seen = {}
    stop = threading.Event()
    bucket = os.path.join(gw.out, "bench")

    def watch():
        while not stop.is_set():
            for dirpath, _, files in os.walk(bucket):
                for name in files:
                    path = os.path.join(dirpath, name)
                    if path not in seen:
                        seen[path] = now_ms()
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        s = sim(gw.mqtt, 100, max(1, int(rate / 100 * seconds)), rate=rate / 100)
        gw.wait_metric("edgehose_records_delivered_total", s["published"],
                       timeout=interval_s * 5 + 30)
        time.sleep(0.05)
        stop.set()
        t.join()
        lat = []
        for path, at in seen.items():
            with open(path, "rb") as f:
                for line in f:
                    try:
                        lat.append(at - json.loads(line)["ts"])
                    except (ValueError, KeyError):
                        pass
        lat.sort()
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
        return {"p50": pick(0.5), "p99": pick(0.99), "max": lat[-1], "records": len(lat)}
    finally:
        stop.set()
        gw.stop()


def backlog(records):
    """Fill `records` while the destination cannot write, kill -9, restart writable: time to
    ready, to the first object, to the last record delivered."""
    first = Edgehose(root="/proc/edgehose-nowhere")
    scratch = first.scratch
    per = max(1, records // 100)
    sim(first.mqtt, 100, per)
    first.wait_metric("edgehose_records_committed_total", per * 100, timeout=300)
    first.kill9()
    gw = Edgehose(scratch=scratch)
    try:
        start = gw.started
        ready = gw.ready_after
        first_at = gw.wait_metric("edgehose_records_delivered_total", 1, timeout=300)
        done = gw.wait_metric("edgehose_records_delivered_total", per * 100, timeout=600)
        return {"ready_s": ready, "first_delivery_s": first_at - start,
                "drain_rate": per * 100 / (done - start), "hwm_kib": proc_status(gw.pid, "VmHWM")}
    finally:
        gw.stop()


def many_devices(devices, seconds, pki=None):
    gw = Edgehose(pki=pki)
    try:
        cpu0 = proc_cpu_s(gw.pid)
        if pki:
            s = sim(gw.tls, devices, seconds, rate=1.0, extra=("--spread", "5", *tls_args(pki)))
        else:
            s = sim(gw.mqtt, devices, seconds, rate=1.0, extra=("--spread", "5"))
        cpu = proc_cpu_s(gw.pid) - cpu0
        return {"acknowledged": s["acknowledged"], "hwm_kib": proc_status(gw.pid, "VmHWM"),
                "rss_end_kib": proc_status(gw.pid, "VmRSS"),
                "cpu_s": cpu, "cpu_share": cpu / max(s.get("elapsed_s", seconds), 1e-9),
                "failed_devices": s["failed_devices"]}
    finally:
        gw.stop()


def storm(devices, pki):
    """A reconnect storm: every device connects at once over mutual TLS (full handshakes),
    publishes one message and leaves; handshakes per second until the last CONNACK."""
    gw = Edgehose(pki=pki)
    try:
        cpu0 = proc_cpu_s(gw.pid)
        s = sim(gw.tls, devices, 1, extra=tls_args(pki))
        return {"connected": s["connected"], "connect_s": s["connect_s"],
                "rate": s["connected"] / max(s["connect_s"], 1e-9),
                "failed_devices": s["failed_devices"],
                "daemon_cpu_s": proc_cpu_s(gw.pid) - cpu0}
    finally:
        gw.stop()


def stripped_size(path):
    if not os.path.exists(path):
        return None
    strip = "strip"
    for arch, tool in (("aarch64", "aarch64-linux-gnu-strip"), ("armv7", "arm-linux-gnueabihf-strip")):
        if arch in path and shutil.which(tool):
            strip = tool
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "stripped")
        if subprocess.run([strip, "-o", out, path], capture_output=True).returncode != 0:
            return os.path.getsize(path)
        return os.path.getsize(out)


def summary(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "runs": len(v)}


def machine():
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    disk = subprocess.run(["df", "-T", ROOT], capture_output=True, text=True).stdout.splitlines()
    return {"cores": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30),
            "filesystem": disk[-1].split()[1] + " on " + disk[-1].split()[0] if disk else "?",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="every figure once, tiny loads (CI: the harness runs, speed not judged)")
    ap.add_argument("--tls", action="store_true",
                    help="only the TLS figures, beside plain TCP: QoS 1 ingest plain and over "
                         "mutual TLS (alternated), the reconnect storm, idle devices both ways")
    ap.add_argument("--rules", action="store_true",
                    help="only the IoT rules figures: QoS 1 ingest with three rules against "
                         "topic routing (alternated), 10,000 devices with one-minute windows "
                         "(RSS, bytes and PUT units saved)")
    ap.add_argument("--frugal", action="store_true",
                    help="only the Pi-scale figures (issue 15): peak ingest beside the relays, "
                         "latency at half load, CPU per message at 10,000 and 1,000 msg/s, "
                         "10,000 idle devices, the highest rate within a Pi-sized cgroup")
    a = ap.parse_args()
    if a.frugal:
        return main_frugal(a)
    if a.tls:
        return main_tls(a)
    if a.rules:
        return main_rules(a)
    runs = 1 if a.quick else a.runs
    q = a.quick
    per = 200 if q else 5000          # messages per device in ingest runs (100 devices)
    total = 100 * per
    log = (lambda *x: None) if a.json else (lambda *x: print(*x, file=sys.stderr, flush=True))
    fig, raw = {}, {}

    for qos in (1, 0):
        for system in ("edgehose", "rumqttd", "mosquitto"):
            rates, pubs, extra = [], [], []
            for r in range(runs):
                if system == "edgehose":
                    rate, pub, hwm, cpu, committed, sent = edgehose_ingest(total, qos, 100, per)
                    extra.append({"hwm_kib": hwm, "cpu_s_per_million": cpu,
                                  "committed": committed, "sent": sent})
                    log(f"ingest qos{qos} {system} run {r + 1}: {rate:,.0f} msg/s committed "
                        f"({committed:.0f} of {sent} sent), RSS {hwm // 1024} MiB")
                else:
                    try:
                        rate, pub, received = relay_run(system, total, qos, 100, per)
                    except RuntimeError as e:
                        # A relay that drops its publishers under this load has no figure.
                        extra.append({"error": str(e)[:300]})
                        log(f"ingest qos{qos} {system} run {r + 1}: failed: {str(e)[:200]}")
                        continue
                    extra.append({"received": received})
                    log(f"ingest qos{qos} {system} run {r + 1}: {rate:,.0f} msg/s delivered "
                        f"({received} of {total})")
                rates.append(rate)
                pubs.append(pub)
            raw[f"ingest_qos{qos}_{system}"] = {"rates": rates, "publish_rates": pubs, "runs": extra}
            fig[f"ingest_qos{qos}_{system}"] = summary(rates)

    # The same QoS 1 load over mutual TLS, alternated with nothing else in between.
    pki = make_pki()
    tls_rates, tls_extra = [], []
    for r in range(runs):
        rate, pub, hwm, cpu, committed, sent = edgehose_ingest(total, 1, 100, per, pki=pki)
        tls_rates.append(rate)
        tls_extra.append({"hwm_kib": hwm, "cpu_s_per_million": cpu, "committed": committed,
                          "sent": sent})
        log(f"ingest qos1 edgehose mTLS run {r + 1}: {rate:,.0f} msg/s committed "
            f"({committed:.0f} of {sent} sent)")
    raw["ingest_qos1_edgehose_mtls"] = {"rates": tls_rates, "runs": tls_extra}
    fig["ingest_qos1_mtls"] = summary(tls_rates)
    fig["ratio_mtls_vs_plain"] = (fig["ingest_qos1_mtls"]["median"]
                                  / fig["ingest_qos1_edgehose"]["median"])
    fig["mtls_lost"] = max(r["sent"] - r["committed"] for r in tls_extra)

    e1 = fig["ingest_qos1_edgehose"]["median"]
    ratio = lambda base: e1 / fig[base]["median"] if fig[base] else None
    fig["ratio_qos1_vs_rumqttd"] = ratio("ingest_qos1_rumqttd")
    fig["ratio_qos1_vs_mosquitto"] = ratio("ingest_qos1_mosquitto")
    fig["baseline_failures"] = {k: [r["error"] for r in v["runs"] if "error" in r]
                                for k, v in raw.items() if any("error" in r for r in v["runs"])}
    fig["qos0_lost"] = max(r["sent"] - r["committed"] for r in raw["ingest_qos0_edgehose"]["runs"])
    fig["qos1_lost"] = max(r["sent"] - r["committed"] for r in raw["ingest_qos1_edgehose"]["runs"])
    fig["rss_at_max_rate_mib"] = summary(
        [r["hwm_kib"] / 1024 for r in raw["ingest_qos1_edgehose"]["runs"]])
    fig["cpu_s_per_million_at_max_rate"] = summary(
        [r["cpu_s_per_million"] for r in raw["ingest_qos1_edgehose"]["runs"]])

    half = e1 / 2
    lat = [steady(half, 3 if q else 20) for _ in range(runs)]
    for k in ("p50", "p99", "max"):
        fig[f"latency_committed_half_rate_{k}_ms"] = summary([x[k] for x in lat])
    fig["half_rate_msg_s"] = summary([x["rate"] for x in lat])
    log(f"latency at {half:,.0f} msg/s: p99 {fmt(fig['latency_committed_half_rate_p99_ms'], ' ms', 1)}")

    dl = [delivered_latency(2000 if q else 10000, 3 if q else 20) for _ in range(runs)]
    for k in ("p50", "p99", "max"):
        fig[f"latency_delivered_{k}_ms"] = summary([x[k] for x in dl])
    log(f"publish -> delivered (1 s interval): p99 {fmt(fig['latency_delivered_p99_ms'], ' ms')}")

    st = [steady(2000 if q else 10000, 5 if q else 60) for _ in range(runs)]
    fig["rss_10k_mib"] = summary([x["hwm_kib"] / 1024 for x in st])
    fig["rss_10k_samples_mib"] = [round(s / 1024, 1) for s in st[0]["rss_samples_kib"]]
    fig["cpu_s_per_million_10k"] = summary([x["cpu_s_per_million"] for x in st])
    fig["written_per_payload_byte_10k"] = summary([x["written_per_payload_byte"] for x in st])
    log(f"10k msg/s: RSS {fmt(fig['rss_10k_mib'], ' MiB', 1)}, "
        f"written/payload {fmt(fig['written_per_payload_byte_10k'], '', 2)}")

    bl = [backlog(20_000 if q else 1_000_000) for _ in range(runs)]
    fig["backlog_records"] = 20_000 if q else 1_000_000
    fig["backlog_ready_s"] = summary([x["ready_s"] for x in bl])
    fig["backlog_first_delivery_s"] = summary([x["first_delivery_s"] for x in bl])
    fig["backlog_drain_rate"] = summary([x["drain_rate"] for x in bl])
    log(f"backlog: ready {fmt(fig['backlog_ready_s'], ' s', 3)}, "
        f"drain {fmt(fig['backlog_drain_rate'], ' rec/s')}")

    md = [many_devices(200 if q else 10_000, 3 if q else 20) for _ in range(runs)]
    fig["devices"] = 200 if q else 10_000
    fig["devices_rss_mib"] = summary([x["hwm_kib"] / 1024 for x in md])
    fig["devices_cpu_s"] = summary([x["cpu_s"] for x in md])
    fig["devices_acknowledged"] = min(x["acknowledged"] for x in md)
    log(f"{fig['devices']} devices: RSS {fmt(fig['devices_rss_mib'], ' MiB', 1)}")

    storm_devices = 200 if q else 10_000
    sm = [storm(storm_devices, pki) for _ in range(runs)]
    raw["storm"] = sm
    fig["storm_devices"] = storm_devices
    fig["storm_rate"] = summary([x["rate"] for x in sm])
    fig["storm_failed"] = max(x["failed_devices"] for x in sm)
    log(f"storm of {storm_devices} mTLS devices: {fmt(fig['storm_rate'], ' handshakes/s')}")
    mt = [many_devices(200 if q else 10_000, 3 if q else 20, pki=pki) for _ in range(runs)]
    raw["devices_mtls"] = mt
    fig["devices_mtls_rss_mib"] = summary([x["hwm_kib"] / 1024 for x in mt])
    fig["devices_mtls_acknowledged"] = min(x["acknowledged"] for x in mt)
    log(f"{fig['devices']} mTLS devices: RSS {fmt(fig['devices_mtls_rss_mib'], ' MiB', 1)}")
    shutil.rmtree(pki, ignore_errors=True)

    sizes = {}
    for name, path in [
        (f"x86_64 {os.path.basename(BIN)}", os.path.join(BIN, "edgehose")),
        ("x86_64 dist", os.path.join(ROOT, "target/x86_64-unknown-linux-gnu/dist/edgehose")),
        ("aarch64 dist", os.path.join(ROOT, "target/aarch64-unknown-linux-gnu/dist/edgehose")),
        ("armv7 dist", os.path.join(ROOT, "target/armv7-unknown-linux-gnueabihf/dist/edgehose")),
    ]:
        s = stripped_size(path)
        if s is not None:
            sizes[name] = round(s / 2**20, 1)
    fig["stripped_binary_mib"] = sizes

    doc = {"machine": machine(), "runs": runs, "quick": q, "binaries": BIN, "figures": fig,
           "raw": raw}
    # Correctness, never speed: every message the devices sent was committed.
    if fig["qos1_lost"] or fig["qos0_lost"] or fig["mtls_lost"]:
        print(f"messages lost: QoS 1 {fig['qos1_lost']}, QoS 0 {fig['qos0_lost']}, "
              f"mTLS {fig['mtls_lost']}", file=sys.stderr)
        sys.exit(1)
    if a.json:
        json.dump(doc, sys.stdout, indent=1)
        print()
        return
    print_table(doc)


def main_tls(a):
    runs = 1 if a.quick else a.runs
    per = 200 if a.quick else 5000
    total = 100 * per
    devices = 200 if a.quick else 10_000
    log = lambda *x: print(*x, file=sys.stderr, flush=True)
    pki = make_pki()
    plain, tls, lost = [], [], 0
    for r in range(runs):
        for kind in ("plain", "mtls"):
            rate, _, hwm, cpu, committed, sent = edgehose_ingest(
                total, 1, 100, per, pki=pki if kind == "mtls" else None)
            lost = max(lost, sent - committed)
            (plain if kind == "plain" else tls).append((rate, cpu, hwm))
            log(f"ingest qos1 {kind} run {r + 1}: {rate:,.0f} msg/s, {cpu:.2f} s CPU per million, "
                f"RSS {hwm / 1024:.1f} MiB")
    sm = []
    for r in range(runs):
        sm.append(storm(devices, pki))
        log(f"storm run {r + 1}: {sm[-1]}")
    idle_plain, idle_tls = [], []
    for r in range(runs):
        idle_plain.append(many_devices(devices, 3 if a.quick else 20))
        idle_tls.append(many_devices(devices, 3 if a.quick else 20, pki=pki))
        log(f"idle run {r + 1}: plain {idle_plain[-1]['hwm_kib'] / 1024:.1f} MiB, "
            f"mTLS {idle_tls[-1]['hwm_kib'] / 1024:.1f} MiB")
    shutil.rmtree(pki, ignore_errors=True)
    p, t = summary([x[0] for x in plain]), summary([x[0] for x in tls])
    m = machine()
    print(f"\nmachine: {m['cores']} cores, {m['cpu']}, {m['date']}; daemon {EDGEHOSE}; "
          f"median [min-max] of {runs} run(s)\n")
    rows = [
        ("QoS 1 ingest, 100 clients, plain TCP", fmt(p, " msg/s"), ""),
        ("  over mutual TLS (TLS 1.3, ECDSA P-256)", fmt(t, " msg/s"),
         f"= {t['median'] / p['median']:.2f}x plain (>= 0.75x)"),
        ("  CPU per million, plain / mTLS", f"{fmt(summary([x[1] for x in plain]), '', 2)} / "
         f"{fmt(summary([x[1] for x in tls]), '', 2)} s", ""),
        ("  lost (sent - committed, worst run)", f"{lost:.0f}", "0"),
        (f"mTLS reconnect storm, {devices:,} devices at once", fmt(summary([x["rate"] for x in sm]), " handshakes/s"),
         f">= 1,500/s ({max(x['failed_devices'] for x in sm)} failed, worst run)"),
        ("  daemon CPU over the storm", fmt(summary([x["daemon_cpu_s"] for x in sm]), " s", 1), ""),
        (f"{devices:,} idle devices, peak RSS, plain", fmt(summary([x["hwm_kib"] / 1024 for x in idle_plain]), " MiB", 1), ""),
        ("  over mutual TLS", fmt(summary([x["hwm_kib"] / 1024 for x in idle_tls]), " MiB", 1),
         f"<= 64 MiB ({min(x['acknowledged'] for x in idle_tls):,} acked, worst run)"),
    ]
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{w}}  {value:<{v}}  {target}")
    if lost:
        sys.exit(1)


# Issue 16's load: three typical rules, each to a destination of its own (a reshape of every
# reading, a filter keeping the warm ones, per-device one-minute aggregates), against topic
# routing alone (one stream, the main table's config).
THREE_RULES = """
[streams.reshaped]
sql = "SELECT topic(2) AS device, seq, temperature_c AS t, humidity_pct AS h, timestamp() AS at FROM 'sensors/+/telemetry'"
destinations = ["reshaped"]
[streams.warm]
sql = "SELECT * FROM 'sensors/+/telemetry' WHERE temperature_c > 22"
destinations = ["warm"]
[streams.per_minute]
sql = "SELECT topic(2) AS device, count(*) AS n, avg(temperature_c) AS t, max(temperature_c) AS t_max FROM 'sensors/+/telemetry' GROUP BY topic(2), STEP(ROWTIME BY INTERVAL '60' SECOND)"
destinations = ["aggregates"]
[destinations.reshaped]
type = "file"
root = "{out}"
bucket = "reshaped"
buffer_interval = "{interval}"
[destinations.warm]
type = "file"
root = "{out}"
bucket = "warm"
buffer_interval = "{interval}"
[destinations.aggregates]
type = "file"
root = "{out}"
bucket = "aggregates"
buffer_interval = "{interval}"
"""

def raw_copies(n):
    """n streams routing every reading by topic alone (no SQL), each to a `file` destination of
    its own: what storing and delivering a record costs, without any rule."""
    out = ""
    for i in range(n):
        out += f"""
[streams.copy{i}]
topics = ["sensors/+/telemetry"]
partition_key = "${{{{topic(2)}}}}"
destinations = ["copy{i}"]
[destinations.copy{i}]
type = "file"
root = "{{out}}"
bucket = "copy{i}"
buffer_interval = "{{interval}}"
"""
    return out


# Raw readings and their one-minute per-device aggregates, each to a destination of its own.
RAW_AND_MINUTES = """
[streams.telemetry]
topics = ["sensors/+/telemetry"]
destinations = ["raw"]
[streams.per_minute]
sql = "SELECT topic(2) AS device, count(*) AS n, avg(temperature_c) AS t, min(temperature_c) AS t_min, max(temperature_c) AS t_max, window_start() AS start FROM 'sensors/+/telemetry' GROUP BY topic(2), STEP(ROWTIME BY INTERVAL '60' SECOND)"
allowed_lateness = "2s"
destinations = ["aggregates"]
[destinations.raw]
type = "file"
root = "{out}"
bucket = "raw"
buffer_interval = "{interval}"
[destinations.aggregates]
type = "file"
root = "{out}"
bucket = "aggregates"
buffer_interval = "{interval}"
"""


def bucket_records(path):
    """(records, bytes) of the newline-delimited objects under `path`."""
    records = size = 0
    for dirpath, _, files in os.walk(path):
        if ".edgehose-staging" in dirpath:
            continue
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                for line in f:
                    if line.strip():
                        records += 1
                        size += len(line.rstrip(b"\n"))
    return records, size


def windowed_devices(devices, seconds, streams):
    """`devices` devices at 1 msg/s for `seconds` against `streams`: peak RSS, CPU, and (with
    RAW_AND_MINUTES) the raw and aggregate output of the whole minutes."""
    gw = Edgehose(streams=streams, interval="10s")
    try:
        cpu0 = proc_cpu_s(gw.pid)
        s = sim(gw.mqtt, devices, seconds, rate=1.0, extra=("--spread", "1"))
        cpu = proc_cpu_s(gw.pid) - cpu0
        hwm = proc_status(gw.pid, "VmHWM")
        out = {"acknowledged": s["acknowledged"], "hwm_kib": hwm, "cpu_s": cpu,
               "failed_devices": s["failed_devices"]}
        if streams and "per_minute" in streams:
            # Every minute that closed while the load ran, against the raw records of it.
            gw.wait_metric("edgehose_windows_emitted_total", 1, timeout=120)
            gw.stop(keep=True)
            rows = []
            for dirpath, _, files in os.walk(os.path.join(gw.out, "aggregates")):
                for name in files:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        rows += [json.loads(line) for line in f if line.strip()]
            full = [r for r in rows if r["n"] >= 55]  # whole minutes (a device's first and
            agg_bytes = sum(len(json.dumps(r, separators=(",", ":"))) for r in full)
            raw_records, raw_bytes = bucket_records(os.path.join(gw.out, "raw"))
            per_record = raw_bytes / max(raw_records, 1)
            covered = sum(r["n"] for r in full)  # last minutes are partial: left out)
            out.update({"windows": len(full), "raw_records_covered": covered,
                        "raw_bytes_covered": covered * per_record, "aggregate_bytes": agg_bytes,
                        # A Kinesis PUT payload unit is 25 KB of one record: each small
                        # record costs one.
                        "put_units_ratio": covered / max(len(full), 1),
                        "bytes_ratio": covered * per_record / max(agg_bytes, 1)})
        return out
    finally:
        gw.stop()


def main_rules(a):
    runs = 1 if a.quick else a.runs
    per = 200 if a.quick else 5000
    total = 100 * per
    devices = 200 if a.quick else 10_000
    seconds = 65 if a.quick else 130
    log = lambda *x: print(*x, file=sys.stderr, flush=True)
    plain, rules = [], []
    for r in range(runs):
        for kind in ("topics", "rules"):
            rate, _, hwm, cpu, committed, sent = edgehose_ingest(
                total, 1, 100, per, streams=THREE_RULES if kind == "rules" else None)
            (plain if kind == "topics" else rules).append((rate, cpu, hwm))
            log(f"ingest qos1 {kind} run {r + 1}: {rate:,.0f} msg/s, {cpu:.2f} s CPU per million, "
                f"RSS {hwm / 1024:.1f} MiB")
    win, base = [], []
    for r in range(runs):
        base.append(windowed_devices(devices, 5 if a.quick else 30, None))
        log(f"{devices} devices, topic routing, run {r + 1}: {base[-1]}")
        win.append(windowed_devices(devices, seconds, RAW_AND_MINUTES))
        log(f"{devices} devices, raw + one-minute windows, run {r + 1}: {win[-1]}")
    p, t = summary([x[0] for x in plain]), summary([x[0] for x in rules])
    m = machine()
    print(f"\nmachine: {m['cores']} cores, {m['cpu']}, {m['date']}; median [min-max] of {runs} run(s)\n")
    rows = [
        ("QoS 1 ingest, 100 clients, topic routing alone", fmt(p, " msg/s"), ""),
        ("  with three typical rules (reshape, filter, window)", fmt(t, " msg/s"),
         f"= {t['median'] / p['median']:.2f}x (>= 0.8x)"),
        ("  CPU per million, topics / rules", f"{fmt(summary([x[1] for x in plain]), '', 2)} / "
         f"{fmt(summary([x[1] for x in rules]), '', 2)} s", ""),
        ("  peak RSS, topics / rules", f"{fmt(summary([x[2] / 1024 for x in plain]), '', 1)} / "
         f"{fmt(summary([x[2] / 1024 for x in rules]), '', 1)} MiB", ""),
        (f"{devices:,} devices at 1 msg/s, topic routing, peak RSS",
         fmt(summary([x["hwm_kib"] / 1024 for x in base]), " MiB", 1), ""),
        ("  raw + one-minute windows per device, peak RSS",
         fmt(summary([x["hwm_kib"] / 1024 for x in win]), " MiB", 1),
         f"<= 48 MiB ({min(x['acknowledged'] for x in win):,} acked, worst run)"),
        ("  whole one-minute windows emitted", fmt(summary([x.get("windows", 0) for x in win])), ""),
        ("  raw bytes / aggregate bytes", fmt(summary([x.get("bytes_ratio", 0) for x in win]), "x", 1), ""),
        ("  Kinesis PUT units, raw / aggregates", fmt(summary([x.get("put_units_ratio", 0) for x in win]), "x", 1), ""),
    ]
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{w}}  {value:<{v}}  {target}")


def idle_devices(devices, seconds):
    """`devices` connect, publish one message each, then stay connected and silent for
    `seconds` (their second and last message comes at the end): RSS and CPU share while idle
    (measured over the middle of the quiet time)."""
    gw = Edgehose()
    out = {}

    def watch():
        time.sleep(seconds * 0.4)
        c0, t0 = proc_cpu_s(gw.pid), time.time()
        time.sleep(seconds * 0.4)
        out["idle_cpu_share"] = (proc_cpu_s(gw.pid) - c0) / (time.time() - t0)
        out["rss_kib"] = proc_status(gw.pid, "VmRSS")
        out["anon_kib"] = proc_status(gw.pid, "RssAnon")

    t = threading.Thread(target=watch, daemon=True)
    try:
        t.start()
        s = sim(gw.mqtt, devices, 2, rate=1.0 / seconds, extra=("--spread", "3"))
        t.join()
        out["hwm_kib"] = proc_status(gw.pid, "VmHWM")
        out["acknowledged"] = s["acknowledged"]
        return out
    finally:
        gw.stop()


class NoBudget(Exception):
    """This machine gives no cgroup budget (not root, no cgroup controllers)."""


class Budget:
    """A cgroup standing in for a small Pi: the daemon confined to one core (cpuset) at a CPU
    quota (CFS, 10 ms period so that the quota throttles in small slices, as a slower core
    would, rather than 70 ms stalls) under a memory ceiling. A stand-in, not a Pi: a Pi's core
    is slower at everything, its SD card slower than this disk. Needs root and cgroup v1 or v2."""

    def __init__(self, cpu_share=0.3, memory_mib=256, period_us=10_000):
        self.name = f"edgehose-bench-pi-{os.getpid()}-{time.monotonic_ns()}"
        self.cpu = os.cpu_count() - 1
        quota = int(period_us * cpu_share)
        mem = memory_mib * 2**20
        self.dirs, procs = [], []

        def write(path, value):
            with open(path, "w") as f:
                f.write(str(value))

        try:
            if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
                try:
                    write("/sys/fs/cgroup/cgroup.subtree_control", "+cpu +cpuset +memory")
                except OSError:
                    pass
                d = f"/sys/fs/cgroup/{self.name}"
                os.mkdir(d)
                self.dirs.append(d)
                write(f"{d}/cpu.max", f"{quota} {period_us}")
                write(f"{d}/cpuset.cpus", self.cpu)
                write(f"{d}/memory.max", mem)
                procs.append(f"{d}/cgroup.procs")
            else:
                for ctl, settings in (
                        ("cpu", [("cpu.cfs_period_us", period_us), ("cpu.cfs_quota_us", quota)]),
                        ("cpuset", [("cpuset.cpus", self.cpu), ("cpuset.mems", 0)]),
                        ("memory", [("memory.limit_in_bytes", mem)])):
                    d = f"/sys/fs/cgroup/{ctl}/{self.name}"
                    os.mkdir(d)
                    self.dirs.append(d)
                    for k, v in settings:
                        write(f"{d}/{k}", v)
                    procs.append(f"{d}/cgroup.procs")
        except OSError as e:
            self.remove()
            raise NoBudget(str(e)) from e
        # The daemon joins the cgroups before it starts (so do all its threads).
        self.wrap = ("sh", "-c", "for f in " + " ".join(procs)
                     + '; do echo $$ > "$f" || exit 1; done; exec "$@"', "sh")
        # The load generator stays off the daemon's core.
        self.pin = ("taskset", "-c", ",".join(str(c) for c in range(self.cpu)) or "0")

    def remove(self):
        for d in self.dirs:
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.05)
        self.dirs = []


def budget_step(rate, seconds, devices=100):
    """One steady run at `rate` inside a fresh Budget: whether the daemon sustained it."""
    b = Budget()
    gw = None
    try:
        gw = Edgehose(wrap=b.wrap)
        cpu0, t0 = proc_cpu_s(gw.pid), time.time()
        s = sim(gw.mqtt, devices, max(1, int(rate / devices * seconds)), rate=rate / devices,
                pin=b.pin)
        caught_up = True
        try:
            gw.wait_metric("edgehose_records_committed_total", s["published"], timeout=10)
        except RuntimeError:
            caught_up = False
        took = time.time() - t0
        r = {"target": rate, "rate": s["rate_msg_s"], "p99": s["puback_latency_ms_p99"],
             "max": s["puback_latency_ms_max"], "cpu_share": (proc_cpu_s(gw.pid) - cpu0) / took,
             "hwm_kib": proc_status(gw.pid, "VmHWM"), "caught_up": caught_up}
        r["ok"] = caught_up and r["rate"] >= 0.97 * rate and r["p99"] <= 50
        return r
    finally:
        if gw:
            gw.stop()
        b.remove()


def pi_budget(seconds, steps=(2_500, 5_000, 10_000, 20_000, 30_000, 40_000, 60_000, 80_000)):
    """The highest steady QoS 1 rate (100 devices) the daemon sustains inside a Budget with
    PUBACK p99 <= 50 ms and everything committed: rising steps, then one bisection."""
    best, tried = None, []
    for rate in steps:
        r = budget_step(rate, seconds)
        tried.append(r)
        print(f"  pi budget {rate:,} msg/s: {r}", file=sys.stderr, flush=True)
        if not r["ok"]:
            break
        best = r
    if best and not tried[-1]["ok"]:
        r = budget_step((best["target"] + tried[-1]["target"]) // 2, seconds)
        tried.append(r)
        print(f"  pi budget {r['target']:,} msg/s: {r}", file=sys.stderr, flush=True)
        if r["ok"]:
            best = r
    return best, tried


def main_frugal(a):
    """Issue 15's figures, same run: peak ingest beside the relays (mosquitto's subscriber CPU
    shown), latency at half load, CPU per message at everyday rates, idle devices, the Pi
    budget."""
    runs = 1 if a.quick else a.runs
    q = a.quick
    per = 200 if q else 5000
    total = 100 * per
    log = lambda *x: print(*x, file=sys.stderr, flush=True)
    fig = {}
    e1, anon, hwm1, cpu1 = [], [], [], []
    for r in range(runs):
        info = {}
        rate, _, hwm, cpu, committed, sent = edgehose_ingest(total, 1, 100, per, info=info)
        if committed < sent:
            raise SystemExit(f"QoS 1: {sent - committed:.0f} messages lost")
        e1.append(rate)
        hwm1.append(hwm / 1024)
        anon.append(info["anon_peak_kib"] / 1024)
        cpu1.append(cpu)
        log(f"qos1 edgehose run {r + 1}: {rate:,.0f} msg/s, RSS {hwm / 1024:.1f} MiB "
            f"(anon {info['anon_peak_kib'] / 1024:.1f})")
    fig["qos1"], fig["rss_max"], fig["anon_max"] = summary(e1), summary(hwm1), summary(anon)
    fig["cpu_max"] = summary(cpu1)
    for system in ("rumqttd", "mosquitto"):
        rates, subs, brokers = [], [], []
        for r in range(runs):
            info = {}
            try:
                rate, _, received = relay_run(system, total, 1, 100, per, info=info)
            except RuntimeError as e:
                log(f"qos1 {system} run {r + 1}: failed: {str(e)[:200]}")
                continue
            rates.append(rate)
            if "sub_cpu_share" in info:
                subs.append(info["sub_cpu_share"])
                brokers.append(info["broker_cpu_share"])
            log(f"qos1 {system} run {r + 1}: {rate:,.0f} msg/s ({received} of {total}) {info}")
        fig[f"qos1_{system}"] = summary(rates)
        if subs:
            fig[f"qos1_{system}_sub_cpu"] = summary(subs)
            fig[f"qos1_{system}_broker_cpu"] = summary(brokers)
    e0 = []
    for r in range(runs):
        rate, *_ = edgehose_ingest(total, 0, 100, per)
        e0.append(rate)
        log(f"qos0 edgehose run {r + 1}: {rate:,.0f} msg/s")
    fig["qos0"] = summary(e0)
    half = fig["qos1"]["median"] / 2
    lat = [steady(half, 3 if q else 20) for _ in range(runs)]
    fig["half_rate"] = summary([x["rate"] for x in lat])
    for k in ("p50", "p99", "max"):
        fig[f"half_{k}"] = summary([x[k] for x in lat])
    fig["half_busy"] = summary([x["machine_busy"] * 100 for x in lat])
    log(f"half load: {fig['half_p99']} p99, machine {fig['half_busy']} % busy")
    c10 = [steady(2000 if q else 10_000, 5 if q else 30) for _ in range(runs)]
    fig["cpu_10k"] = summary([x["cpu_s_per_million"] for x in c10])
    fig["p99_10k"] = summary([x["p99"] for x in c10])
    fig["cpu_10k_mosquitto"] = summary(
        [mosquitto_steady_cpu(2000 if q else 10_000, 5 if q else 30) for _ in range(runs)])
    c1 = [steady(200 if q else 1_000, 5 if q else 30, devices=200 if q else 1_000, spread=1)
          for _ in range(runs)]
    fig["cpu_1k"] = summary([x["cpu_s_per_million"] for x in c1])
    log(f"CPU per million: 10k {fig['cpu_10k']}, 1k {fig['cpu_1k']}")
    idle_n = 200 if q else 10_000
    idle = [idle_devices(idle_n, 10 if q else 30) for _ in range(runs)]
    fig["idle_devices"] = idle_n
    fig["idle_rss"] = summary([x["rss_kib"] / 1024 for x in idle])
    fig["idle_anon"] = summary([x["anon_kib"] / 1024 for x in idle])
    fig["idle_cpu"] = summary([x["idle_cpu_share"] * 100 for x in idle])
    fig["idle_acked"] = min(x["acknowledged"] for x in idle)
    log(f"idle: {fig['idle_rss']} MiB")
    pi = []
    try:
        for _ in range(runs):
            best, tried = pi_budget(3 if q else 10,
                                    steps=(1_000, 2_000) if q else (2_500, 5_000, 10_000, 20_000,
                                                                    30_000, 40_000, 60_000))
            pi.append((best, tried))
    except NoBudget as e:
        fig["pi_error"] = f"no cgroup budget here ({e})"
    if pi:
        fig["pi_step"] = summary([b["target"] if b else 0 for b, _ in pi])
        fig["pi_rate"] = summary([b["rate"] if b else 0 for b, _ in pi])
        fig["pi_p99"] = summary([b["p99"] if b else 0 for b, _ in pi])
        fig["pi_rss"] = summary([b["hwm_kib"] / 1024 if b else 0 for b, _ in pi])
        fig["pi_first_fail"] = [t[-1] for _, t in pi if not t[-1]["ok"]]
    m = machine()
    print(f"\nmachine: {m['cores']} cores, {m['cpu']}, {m['date']}; daemon {EDGEHOSE}; "
          f"median [min-max] of {runs} run(s)\n")
    qos1 = fig["qos1"]["median"]
    ratio = lambda k: f"edgehose = {qos1 / fig[k]['median']:.2f}x" if fig.get(k) else "-"
    rows = [
        ("QoS 1 ingest, 100 clients, durable commits", fmt(fig["qos1"], " msg/s"), ""),
        ("  rumqttd relay (PUBACK from memory)", fmt(fig.get("qos1_rumqttd"), " msg/s"),
         ratio("qos1_rumqttd") + " (>= 0.7x)"),
        ("  mosquitto relay, lean QoS 0 subscriber", fmt(fig.get("qos1_mosquitto"), " msg/s"),
         ratio("qos1_mosquitto")),
        ("    the subscriber's CPU (share of a core)", fmt(fig.get("qos1_mosquitto_sub_cpu"), "", 2),
         "well under 1: not the bottleneck"),
        ("    mosquitto's CPU (share of a core; it is single-threaded)",
         fmt(fig.get("qos1_mosquitto_broker_cpu"), "", 2), ""),
        ("QoS 0 ingest", fmt(fig["qos0"], " msg/s"), ">= 500,000"),
        ("peak RSS at the maximum QoS 1 rate", fmt(fig["rss_max"], " MiB", 1), "<= 24 MiB"),
        ("  of which anonymous (the rest: the binary's code)", fmt(fig["anon_max"], " MiB", 1), ""),
        ("CPU per million at the maximum rate", fmt(fig["cpu_max"], " s", 2), ""),
        (f"publish -> committed at {fmt(fig['half_rate'])} msg/s (half): p50",
         fmt(fig["half_p50"], " ms", 1), ""),
        ("  p99", fmt(fig["half_p99"], " ms", 1), "<= 10 ms"),
        ("  max", fmt(fig["half_max"], " ms", 1), "<= 50 ms"),
        ("  the machine's CPU busy meanwhile (daemon and simulator)",
         fmt(fig["half_busy"], " %"), ""),
        ("CPU per million at 10,000 msg/s (100 devices)", fmt(fig["cpu_10k"], " s", 1), "<= 6 s"),
        ("  PUBACK p99 there", fmt(fig["p99_10k"], " ms", 1), ""),
        ("  mosquitto, same load, no subscriber (PUBACK from memory)",
         fmt(fig["cpu_10k_mosquitto"], " s", 1), "a baseline"),
        ("CPU per million at 1,000 msg/s (1,000 devices)", fmt(fig["cpu_1k"], " s", 1),
         "within 2x of 10,000 msg/s"),
        (f"{idle_n:,} idle devices: RSS", fmt(fig["idle_rss"], " MiB", 1), "<= 40 MiB"),
        ("  of which anonymous", fmt(fig["idle_anon"], " MiB", 1), ""),
        ("  daemon CPU while idle (% of a core)", fmt(fig["idle_cpu"], " %", 2),
         f"<= 0.5% ({fig['idle_acked']:,} acked, worst run)"),
    ]
    if pi:
        rows += [
            ("Pi budget (1 core at 30%, 256 MiB; a stand-in): highest QoS 1 step held",
             fmt(fig["pi_step"], " msg/s"), ">= 20,000 with p99 <= 50 ms"),
            ("  the rate the simulator achieved at that step", fmt(fig["pi_rate"], " msg/s"), ""),
            ("  its PUBACK p99", fmt(fig["pi_p99"], " ms", 1), ""),
            ("  its peak RSS", fmt(fig["pi_rss"], " MiB", 1), ""),
        ]
    else:
        rows.append(("Pi budget", fig.get("pi_error", "-"), ""))
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{w}}  {value:<{v}}  {target}")
    for f in fig.get("pi_first_fail", []):
        print(f"  Pi budget, first rate not sustained: {f}")


def fmt(s, unit="", digits=0):
    if s is None:
        return "-"
    if isinstance(s, dict):
        f = f"{{:,.{digits}f}}"
        return f"{f.format(s['median'])} [{f.format(s['min'])}-{f.format(s['max'])}]{unit}"
    return f"{s:,.{digits}f}{unit}"


def print_table(doc):
    f, m = doc["figures"], doc["machine"]
    print(f"\nmachine: {m['cores']} cores, {m['cpu']}, {m['memory_gib']} GiB, {m['filesystem']}, "
          f"kernel {m['kernel']}, {m['date']}; median [min-max] of {doc['runs']} run(s)\n")
    rows = [
        ("sustained ingest, QoS 1, 100 clients, durable commits", fmt(f["ingest_qos1_edgehose"], " msg/s"),
         ">= 300,000"),
        ("  rumqttd relay (no durability), same load", fmt(f["ingest_qos1_rumqttd"], " msg/s"),
         f"edgehose = {fmt(f['ratio_qos1_vs_rumqttd'], 'x', 2)} (>= 0.6x)"),
        ("  mosquitto relay, same load", fmt(f["ingest_qos1_mosquitto"], " msg/s"),
         f"edgehose = {fmt(f['ratio_qos1_vs_mosquitto'], 'x', 2)} (>= 3x)"),
        ("  lost (sent - committed, worst run)", f"{f['qos1_lost']:.0f}", "0"),
        ("  the same over mutual TLS (TLS 1.3, ECDSA P-256)", fmt(f["ingest_qos1_mtls"], " msg/s"),
         f"= {fmt(f['ratio_mtls_vs_plain'], 'x', 2)} plain (>= 0.75x)"),
        ("sustained ingest, QoS 0", fmt(f["ingest_qos0_edgehose"], " msg/s"), ">= 400,000"),
        ("  rumqttd relay, QoS 0", fmt(f["ingest_qos0_rumqttd"], " msg/s"), ""),
        ("  mosquitto relay, QoS 0", fmt(f["ingest_qos0_mosquitto"], " msg/s"), ""),
        ("  lost (sent - committed, worst run)", f"{f['qos0_lost']:.0f}", "0"),
        (f"publish -> committed at {fmt(f['half_rate_msg_s'])} msg/s: p50",
         fmt(f["latency_committed_half_rate_p50_ms"], " ms", 1), ""),
        ("  p99", fmt(f["latency_committed_half_rate_p99_ms"], " ms", 1), "<= 20 ms"),
        ("  max", fmt(f["latency_committed_half_rate_max_ms"], " ms", 1), ""),
        ("publish -> delivered, file, 1 s interval: p50", fmt(f["latency_delivered_p50_ms"], " ms"), ""),
        ("  p99", fmt(f["latency_delivered_p99_ms"], " ms"), "<= 1,100 ms"),
        ("peak RSS at 10,000 msg/s", fmt(f["rss_10k_mib"], " MiB", 1), "<= 32 MiB"),
        ("  RSS every 5 s (first run)", " ".join(str(x) for x in f["rss_10k_samples_mib"]), "flat"),
        ("peak RSS at max rate", fmt(f["rss_at_max_rate_mib"], " MiB", 1), ""),
        ("CPU per message at 10,000 msg/s", fmt(f["cpu_s_per_million_10k"], " s/million", 2), "report"),
        ("CPU per message at max rate", fmt(f["cpu_s_per_million_at_max_rate"], " s/million", 2), "report"),
        ("bytes written per payload byte at 10,000 msg/s", fmt(f["written_per_payload_byte_10k"], "", 2),
         "<= 2.5"),
        (f"start-up with {f['backlog_records']:,} records: to ready", fmt(f["backlog_ready_s"], " s", 3),
         "<= 1 s"),
        ("  to first delivery", fmt(f["backlog_first_delivery_s"], " s", 3), ""),
        ("backlog drain to `file`", fmt(f["backlog_drain_rate"], " rec/s"), ">= 500,000"),
        (f"{f['devices']:,} devices at 1 msg/s: peak RSS", fmt(f["devices_rss_mib"], " MiB", 1), "report"),
        ("  daemon CPU over the run", fmt(f["devices_cpu_s"], " s", 1),
         f"{f['devices_acknowledged']:,} acked (worst run)"),
        (f"mTLS reconnect storm, {f['storm_devices']:,} devices at once", fmt(f["storm_rate"], " handshakes/s"),
         f">= 1,500/s ({f['storm_failed']} devices failed, worst run)"),
        (f"{f['devices']:,} idle mTLS devices: peak RSS", fmt(f["devices_mtls_rss_mib"], " MiB", 1),
         f"<= 64 MiB ({f['devices_mtls_acknowledged']:,} acked, worst run)"),
        ("stripped binary size", ", ".join(f"{k} {v} MiB" for k, v in f["stripped_binary_mib"].items()),
         "<= 10 MiB aarch64"),
    ]
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{w}}  {value:<{v}}  {target}")
    for name, errors in f["baseline_failures"].items():
        print(f"{name}: {len(errors)} run(s) failed: {errors[0]}")


if __name__ == "__main__":
    main()
