"""Reads what edgehose delivered to an S3 or Kinesis emulator, with boto3 (independent of the
Rust SDK), and prints it as JSON on stdout.

  read_back.py s3 ENDPOINT BUCKET
      -> [{"key", "content_encoding", "body" (base64, as stored)}]
  read_back.py kinesis ENDPOINT STREAM [--deaggregate]
      -> [{"shard", "partition_key", "data" (base64), "aggregated"}]
     With --deaggregate, KPL-aggregated records are expanded with the aws-kinesis-agg package
     (awslabs' own de-aggregator), one entry per sub-record.
"""
import base64
import json
import sys

import boto3
from botocore.config import Config


def client(service, endpoint):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5}),
    )


def s3(endpoint, bucket):
    c = client("s3", endpoint)
    out = []
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            obj = c.get_object(Bucket=bucket, Key=o["Key"])
            out.append(
                {
                    "key": o["Key"],
                    "content_encoding": obj.get("ContentEncoding"),
                    "etag": obj.get("ETag", "").strip('"'),
                    "body": base64.b64encode(obj["Body"].read()).decode(),
                }
            )
    return out


def kinesis(endpoint, stream, deaggregate):
    c = client("kinesis", endpoint)
    out = []
    shards = c.list_shards(StreamName=stream)["Shards"]
    for shard in shards:
        it = c.get_shard_iterator(
            StreamName=stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while it:
            r = c.get_records(ShardIterator=it, Limit=10000)
            records = r["Records"]
            for rec in records:
                data = rec["Data"]
                aggregated = data[:4] == b"\xf3\x89\x9a\xc2"
                if deaggregate and aggregated:
                    from aws_kinesis_agg.deaggregator import iter_deaggregate_records

                    event = {
                        "kinesis": {
                            "kinesisSchemaVersion": "1.0",
                            "partitionKey": rec["PartitionKey"],
                            "sequenceNumber": rec["SequenceNumber"],
                            "data": base64.b64encode(data).decode(),
                            "approximateArrivalTimestamp": 0,
                        }
                    }
                    for sub in iter_deaggregate_records([event]):
                        sub_data = sub["kinesis"]["data"]
                        if isinstance(sub_data, bytes):
                            sub_data = sub_data.decode()
                        out.append(
                            {
                                "shard": shard["ShardId"],
                                "partition_key": sub["kinesis"]["partitionKey"],
                                "data": sub_data,
                                "aggregated": True,
                            }
                        )
                else:
                    out.append(
                        {
                            "shard": shard["ShardId"],
                            "partition_key": rec["PartitionKey"],
                            "data": base64.b64encode(data).decode(),
                            "aggregated": aggregated,
                        }
                    )
            if not records and r.get("MillisBehindLatest", 0) == 0:
                break
            it = r.get("NextShardIterator")
    return out


def main():
    kind, endpoint, name = sys.argv[1:4]
    if kind == "s3":
        result = s3(endpoint, name)
    elif kind == "kinesis":
        result = kinesis(endpoint, name, "--deaggregate" in sys.argv)
    elif kind == "create-bucket":
        client("s3", endpoint).create_bucket(Bucket=name)
        result = "ok"
    elif kind == "create-stream":
        shards = int(sys.argv[4]) if len(sys.argv) > 4 else 1
        c = client("kinesis", endpoint)
        c.create_stream(StreamName=name, ShardCount=shards)
        c.get_waiter("stream_exists").wait(StreamName=name, WaiterConfig={"Delay": 0.2})
        result = "ok"
    else:
        sys.exit(f"unknown command {kind}")
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
