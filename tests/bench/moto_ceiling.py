"""moto's own ceiling, for comparison with the gateway's drain figures: boto3 puts N 200-byte
records into a fresh 4-shard stream in PutRecords requests of ENTRIES entries (500: full requests;
100: what per-key ordering gives with 100 devices), and 64 MiB objects into a bucket.

Usage: moto_ceiling.py ENDPOINT [records=100000] [entries=500]
"""
import sys
import time

import boto3

endpoint = sys.argv[1]
records = int(sys.argv[2]) if len(sys.argv) > 2 else 100000
entries = int(sys.argv[3]) if len(sys.argv) > 3 else 500
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
          aws_secret_access_key="test")
k = boto3.client("kinesis", **kw)
k.create_stream(StreamName="ceiling", ShardCount=4)
k.get_waiter("stream_exists").wait(StreamName="ceiling", WaiterConfig={"Delay": 0.2})
payload = b"x" * 200
start = time.time()
for i in range(0, records, entries):
    batch = [{"Data": payload, "PartitionKey": f"dev-{(i + j) % 100}"} for j in range(entries)]
    k.put_records(StreamName="ceiling", Records=batch)
took = time.time() - start
print(f"moto PutRecords: {records} records in {entries}-entry requests: {took:.1f} s "
      f"({records / took:.0f} records/s)")
s3 = boto3.client("s3", **kw)
s3.create_bucket(Bucket="ceiling")
body = b"y" * (64 * 1024 * 1024)
start = time.time()
for i in range(3):
    s3.put_object(Bucket="ceiling", Key=f"o{i}", Body=body)
took = time.time() - start
print(f"moto PutObject: 3 x 64 MiB in {took:.1f} s ({3 * 64 / took:.0f} MiB/s)")
