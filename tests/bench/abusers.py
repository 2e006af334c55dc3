"""Clients that abuse the front door, for tests/bench/abuse.sh: each mode sets up its abuse,
prints `ready ...` once it is in place, keeps it up (the flooding modes keep flooding) until
SIGTERM, then prints `done ...` with what it did.

Usage: abusers.py PORT MODE [N] [SIZE]
  filters   N sessions (default 400) x 50 topic filters each, matching nothing
  matching  the same, each session's first filter matching every device message (every
            committed message fanned out to every session; the abuser never reads, so each
            session's queue fills and drops its oldest)
  partial   N connections (default 200) each holding a half-sent PUBLISH of SIZE bytes (default
            300 KiB): all of it but the last byte sent; reconnects when the gateway closes one
  retained  retained QoS 0 messages of SIZE bytes (default 100 KB) on ever new topics, as fast
            as the socket takes them
  sessions  persistent sessions (clean session 0) with ever new client ids, each subscribing to
            one filter and leaving, as fast as they go
  malformed connections that send a malformed packet, as fast as they go (the log flood)
"""
import signal
import socket
import sys
import threading
import time


def remaining(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(s):
    b = s.encode() if isinstance(s, str) else s
    return len(b).to_bytes(2, "big") + b


def packet(kind, body):
    return bytes([kind]) + remaining(len(body)) + body


def connect(port, client_id, clean=True, keep_alive=0):
    s = socket.create_connection(("127.0.0.1", port))
    flags = 0x02 if clean else 0x00
    body = utf8("MQTT") + bytes([4, flags]) + keep_alive.to_bytes(2, "big") + utf8(client_id)
    s.sendall(packet(0x10, body))
    kind, _ = read_packet(s)
    assert kind == 0x20, "CONNACK"
    return s


def read_packet(sock):
    head = sock.recv(1)
    if not head:
        raise ConnectionError("closed")
    n, shift = 0, 0
    while True:
        b = sock.recv(1)[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    body = b""
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return head[0], body


def subscribe(s, topics):
    payload = b"".join(utf8(t) + b"\x00" for t in topics)
    s.sendall(packet(0x82, (1).to_bytes(2, "big") + payload))
    while True:
        kind, body = read_packet(s)
        if kind == 0x90:
            return sum(1 for c in body[2:] if c != 0x80)


stop = threading.Event()


def main():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    port, mode = int(sys.argv[1]), sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else None
    size = int(sys.argv[4]) if len(sys.argv) > 4 else None
    held, count = [], [0]

    if mode in ("filters", "matching"):
        total = 0
        for i in range(n or 400):
            s = connect(port, f"sub-{i}")
            topics = [f"x/{i}/{k}/+" for k in range(50)]
            if mode == "matching":
                topics[0] = "sensors/+/telemetry"
            total += subscribe(s, topics)
            held.append(s)
        print(f"ready {len(held)} sessions, {total} filters", flush=True)
    elif mode == "partial":
        size = size or 300 * 1024
        body_len = 2 + 1 + size

        def hold(i):
            while not stop.is_set():
                try:
                    s = connect(port, f"partial-{i}")
                    head = bytes([0x30]) + remaining(body_len) + utf8("p")
                    s.sendall(head + b"x" * (size - 1))
                    count[0] += 1
                    s.settimeout(0.5)
                    while not stop.is_set():
                        try:
                            if not s.recv(16):
                                break  # closed by the gateway: hold a new one
                        except socket.timeout:
                            pass
                    s.close()
                except OSError:
                    time.sleep(0.1)

        threads = [threading.Thread(target=hold, args=(i,), daemon=True) for i in range(n or 200)]
        for t in threads:
            t.start()
        while count[0] < len(threads):
            time.sleep(0.05)
        print(f"ready {len(threads)} half-sent PUBLISHes of {size} bytes", flush=True)
    else:
        def flood():
            i = 0
            s = connect(port, "retainer") if mode == "retained" else None
            blob = b"r" * (size or 100_000)
            while not stop.is_set():
                try:
                    if mode == "retained":
                        s.sendall(packet(0x31, utf8(f"sensors/ret-{i}/telemetry") + blob))
                    elif mode == "sessions":
                        c = connect(port, f"persistent-{i}", clean=False)
                        subscribe(c, [f"cmd/persistent-{i}/#"])
                        c.sendall(b"\xe0\x00")
                        c.close()
                    elif mode == "malformed":
                        c = connect(port, f"bad-{i}")
                        c.sendall(b"\xf0\x00")
                        c.recv(16)
                        c.close()
                    else:
                        raise SystemExit(f"unknown mode {mode}")
                    i += 1
                    count[0] = i
                except OSError:
                    time.sleep(0.01)
                    if mode == "retained":
                        s = connect(port, "retainer")

        threading.Thread(target=flood, daemon=True).start()
        while count[0] == 0:
            time.sleep(0.01)
        print(f"ready {mode} flood", flush=True)

    signal.sigwait([signal.SIGTERM, signal.SIGINT])
    stop.set()
    print(f"done {mode}: {count[0] or len(held)}", flush=True)


main()
