#!/usr/bin/env python3
"""Which S3 client for the remote: 1 MiB ranged GETs from SeaweedFS (tools/s3server.py) with
obstore, boto3 and minio-py, 1, 8 and 16 in flight, medians of --runs, same run.

    $(bash tools/bench_env.sh) tools/bench_s3clients.py [--runs 5] [--mib 64]

Run it with the benchmarks' environment (it has all three clients); the object is random bytes
(nothing to compress on the way), read whole, in order, by a thread pool.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3server import ACCESS_KEY, SECRET_KEY, S3Server  # noqa: E402

BLOCK = 1 << 20


def clients(endpoint: str, bucket: str) -> dict:
    import boto3
    import minio
    import obstore
    from botocore.config import Config
    from obstore.store import S3Store

    ob = S3Store(bucket, endpoint=endpoint, region="us-east-1", access_key_id=ACCESS_KEY,
                 secret_access_key=SECRET_KEY, client_options={"allow_http": True},
                 virtual_hosted_style_request=False)
    b3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                      aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                      config=Config(max_pool_connections=32))
    mn = minio.Minio(endpoint.split("//")[1], access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)
    return {
        "obstore": lambda k, off: bytes(obstore.get_range(ob, k, start=off, length=BLOCK)),
        "boto3": lambda k, off: b3.get_object(Bucket=bucket, Key=k, Range=f"bytes={off}-{off + BLOCK - 1}")[
            "Body"].read(),
        "minio-py": lambda k, off: mn.get_object(bucket, k, offset=off, length=BLOCK).read(),
        "_put": lambda k, data: obstore.put(ob, k, data),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    size = args.mib * BLOCK
    with tempfile.TemporaryDirectory(prefix="zipfs-bench-s3-") as tmp, S3Server(Path(tmp)) as s3:
        c = clients(s3.endpoint, s3.bucket)
        c.pop("_put")("obj", os.urandom(size))
        print(f"| client | 1 in flight | 8 | 16 |  (GB/s, 1 MiB ranged GETs of a {args.mib} MiB object, "
              f"medians of {args.runs})\n|---|---|---|---|")
        for name, get in c.items():
            row = []
            for inflight in (1, 8, 16):
                speeds = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    with ThreadPoolExecutor(inflight) as pool:
                        got = sum(map(len, pool.map(partial(get, "obj"), range(0, size, BLOCK))))
                    assert got == size
                    speeds.append(size / (time.perf_counter() - t) / 1e9)
                row.append(f"{statistics.median(speeds):.2f}")
            print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
