"""The S3 emulator's own PutObject ceiling for the objects a drain produced: reads back every
object the gateway put into SRC_BUCKET, then puts the same bodies (same sizes) into fresh
buckets with boto3 from a thread pool: what a plain client does with the same objects, no
gateway involved.

It first tries every concurrency given, each with botocore's default request checksums (CRC32
on every PutObject) and without (`when_required`, what the gateway sends), once each, and
chooses the fastest configuration; then it runs that configuration RUNS times and reports the
median and range. (Taking the best of all the tries as the figure would compare the minimum of
many noisy samples with the gateway's median.) With `--checksums X` and one concurrency it
runs that configuration without trying others; with `--choose` it only tries and prints the
chosen configuration (`C X`).

Usage: s3_ceiling.py ENDPOINT SRC_BUCKET [--runs N] [--checksums X] [--choose] [concurrency ...]
       (default: 3 runs; concurrency 1 2 4 8 16)
Prints one line: `ceiling: N objects, B bytes, median T s [min-max] over R runs at concurrency
C, checksums X (O objects/s)`.
"""
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config

args = sys.argv[1:]
endpoint, src = args[0], args[1]
rest = args[2:]
runs, fixed, choose = 3, None, False
while rest[:1] and rest[0].startswith("--"):
    if rest[0] == "--runs":
        runs, rest = int(rest[1]), rest[2:]
    elif rest[0] == "--checksums":
        fixed, rest = rest[1], rest[2:]
    elif rest[0] == "--choose":
        choose, rest = True, rest[1:]
    else:
        sys.exit(f"unknown option {rest[0]}")
levels = [int(c) for c in rest] or [1, 2, 4, 8, 16]


def client(checksums):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(max_pool_connections=max(levels) + 4, s3={"addressing_style": "path"},
                      request_checksum_calculation=checksums))


s3 = client("when_supported")
bodies = []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=src):
    for o in page.get("Contents", []):
        bodies.append(s3.get_object(Bucket=src, Key=o["Key"])["Body"].read())
clients = {m: client(m) for m in ("when_supported", "when_required")}


def put_all(c, checksums):
    put = clients[checksums]
    dst = f"ceiling-{c}-{checksums.replace('_', '-')}-{time.time_ns()}"
    put.create_bucket(Bucket=dst)
    start = time.time()
    with ThreadPoolExecutor(max_workers=c) as pool:
        list(pool.map(lambda ib: put.put_object(
            Bucket=dst, Key=f"o{ib[0]}", Body=ib[1],
            **({"ContentEncoding": "gzip"} if ib[1][:2] == b"\x1f\x8b" else {})),
            enumerate(bodies)))
    return time.time() - start


if fixed:
    c, checksums = levels[0], fixed
else:
    tries = []
    for checksums in clients:
        for c in levels:
            took = put_all(c, checksums)
            print(f"  try: concurrency {c}, checksums {checksums}: {took:.3f} s", file=sys.stderr)
            tries.append((took, c, checksums))
    _, c, checksums = min(tries)
    if choose:
        print(c, checksums)
        sys.exit(0)
times = [put_all(c, checksums) for _ in range(runs)]
print(f"  chosen: concurrency {c}, checksums {checksums}: " +
      ", ".join(f"{t:.3f}" for t in times) + " s", file=sys.stderr)
med = statistics.median(times)
print(f"ceiling: {len(bodies)} objects, {sum(map(len, bodies))} bytes, median {med:.3f} s "
      f"[{min(times):.3f}-{max(times):.3f}] over {runs} runs at concurrency {c}, checksums "
      f"{checksums} ({len(bodies) / med:.0f} objects/s)")
