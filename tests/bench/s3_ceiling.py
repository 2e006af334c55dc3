"""The S3 emulator's own PutObject ceiling for the objects a drain produced: reads back every
object the gateway put into SRC_BUCKET, then puts the same bodies (same sizes) into a fresh
bucket with boto3 from a thread pool, at each concurrency given, and prints the best: what a
plain client does with the same objects, no gateway involved. Each concurrency is tried with
botocore's default request checksums (CRC32 on every PutObject) and without (`when_required`,
what the gateway sends), and the best of all is the ceiling.

Usage: s3_ceiling.py ENDPOINT SRC_BUCKET [concurrency ...]   (default: 1 2 4 8 16)
Prints one line: `ceiling: N objects, B bytes, best T s at concurrency C (O objects/s)`.
"""
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config

endpoint, src = sys.argv[1], sys.argv[2]
levels = [int(c) for c in sys.argv[3:]] or [1, 2, 4, 8, 16]


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
best = None
for checksums in ("when_supported", "when_required"):
    put = client(checksums)
    for c in levels:
        dst = f"ceiling-{c}-{checksums.replace('_', '-')}-{time.time_ns()}"
        put.create_bucket(Bucket=dst)
        start = time.time()
        with ThreadPoolExecutor(max_workers=c) as pool:
            list(pool.map(lambda ib: put.put_object(
                Bucket=dst, Key=f"o{ib[0]}", Body=ib[1],
                **({"ContentEncoding": "gzip"} if ib[1][:2] == b"\x1f\x8b" else {})),
                enumerate(bodies)))
        took = time.time() - start
        print(f"  concurrency {c}, checksums {checksums}: {took:.3f} s", file=sys.stderr)
        if best is None or took < best[0]:
            best = (took, c, checksums)
took, c, checksums = best
print(f"ceiling: {len(bodies)} objects, {sum(map(len, bodies))} bytes, best {took:.3f} s at "
      f"concurrency {c}, checksums {checksums} ({len(bodies) / took:.0f} objects/s)")
