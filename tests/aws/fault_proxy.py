"""A fault-injecting HTTP proxy in front of an AWS emulator, for the partial-failure tests.

  fault_proxy.py LISTEN_PORT UPSTREAM_PORT [--kinesis-fail 0.2] [--s3-fail 0.2] [--seed 1]

Kinesis PutRecords: each entry fails with the given probability. A failed entry is removed from
the request before it is forwarded (the emulator never sees it) and answered with
ProvisionedThroughputExceededException in its place, so the response is exactly what Kinesis
returns on a partial failure. S3 PUT (object or part): with the given probability the request
fails with 500 InternalError, half of those BEFORE forwarding and half AFTER the emulator
stored it (a timeout after success, the case that tempts a client into writing a second copy).
  --down-after-puts N: after N S3 PUTs went through, the endpoint is "down": every request
  (HEAD included) gets 500 InternalError until a GET of /__heal (an endpoint dying in the
  middle of a flush and coming back). /__down takes it down at once.
Counts are summarised at /__stats.
"""
import argparse
import base64
import http.client
import json
import random
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

stats = {"kinesis_entries": 0, "kinesis_failed": 0, "s3_puts": 0, "s3_failed_before": 0,
         "s3_failed_after": 0, "refused_while_down": 0, "down": False}
lock = threading.Lock()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("listen", type=int)
    p.add_argument("upstream", type=int)
    p.add_argument("--kinesis-fail", type=float, default=0.0)
    p.add_argument("--s3-fail", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--down-after-puts", type=int, default=-1)
    args = p.parse_args()
    rng = random.Random(args.seed)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def forward(self, body):
            conn = http.client.HTTPConnection("127.0.0.1", args.upstream, timeout=60)
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("content-length", "connection", "transfer-encoding")}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            out = (r.status, r.getheaders(), data)
            conn.close()
            return out

        def reply(self, status, headers, body):
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in ("content-length", "connection", "transfer-encoding", "date",
                                     "server"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def read_body(self):
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return body
                    body += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def s3_error(self):
            body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                    b'<Message>injected by fault_proxy</Message></Error>')
            self.reply(500, [("Content-Type", "application/xml")], body)

        def handle_any(self):
            body = self.read_body()
            target = self.headers.get("X-Amz-Target", "")
            if self.path == "/__stats":
                with lock:
                    data = json.dumps(stats).encode()
                return self.reply(200, [("Content-Type", "application/json")], data)
            if self.path in ("/__heal", "/__down"):
                with lock:
                    stats["down"] = self.path == "/__down"
                    args.down_after_puts = -1
                return self.reply(200, [], b"ok")
            is_s3_put = self.command == "PUT" and not target
            with lock:
                if is_s3_put and args.down_after_puts >= 0:
                    if stats["s3_puts"] >= args.down_after_puts:
                        stats["down"] = True
                    else:
                        stats["s3_puts"] += 1
                down = stats["down"]
                if down:
                    stats["refused_while_down"] += 1
            if down:
                return self.s3_error()
            if target.endswith(".PutRecords") and args.kinesis_fail > 0:
                req = json.loads(body)
                keep, failed = [], []
                with lock:
                    for i, e in enumerate(req["Records"]):
                        (failed if rng.random() < args.kinesis_fail else keep).append(i)
                    stats["kinesis_entries"] += len(req["Records"])
                    stats["kinesis_failed"] += len(failed)
                results = [None] * len(req["Records"])
                if keep:
                    fwd = dict(req, Records=[req["Records"][i] for i in keep])
                    status, headers, data = self.forward(json.dumps(fwd).encode())
                    if status != 200:
                        return self.reply(status, headers, data)
                    upstream = json.loads(data)
                    for i, r in zip(keep, upstream["Records"]):
                        results[i] = r
                for i in failed:
                    results[i] = {"ErrorCode": "ProvisionedThroughputExceededException",
                                  "ErrorMessage": "Rate exceeded for shard (injected)"}
                out = {"FailedRecordCount": sum(1 for r in results if "ErrorCode" in r),
                       "Records": results}
                return self.reply(200, [("Content-Type", "application/x-amz-json-1.1")],
                                  json.dumps(out).encode())
            if is_s3_put and args.s3_fail > 0:
                with lock:
                    stats["s3_puts"] += 1
                    roll = rng.random()
                if roll < args.s3_fail / 2:
                    with lock:
                        stats["s3_failed_before"] += 1
                    return self.s3_error()
                if roll < args.s3_fail:
                    self.forward(body)
                    with lock:
                        stats["s3_failed_after"] += 1
                    return self.s3_error()
            status, headers, data = self.forward(body)
            self.reply(status, headers, data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

    server = ThreadingHTTPServer(("127.0.0.1", args.listen), Handler)
    server.daemon_threads = True
    print(json.dumps({"listening": args.listen}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
