#!/usr/bin/env python3
"""Remote benchmark: a mount backed by an S3 bucket against one backed by the local LMDB store
and against a plain ranged download of the raw file from the same server, same run.

    .venv/bin/python tools/bench_remote.py [--runs 5] [--model smollm|minilm]

The server is SeaweedFS (`weed mini`, tools/s3server.py) on loopback, started and stopped here.
Machine A ingests the family into a store with the bucket as its remote (each ingest pushes:
ingest-and-push throughput, logical bytes per second). Machine B is an empty store with the same
remote: every run empties its payload cache, drops the page cache and mounts it, so the cold
read fetches every chunk from the bucket. The local mount serves a store holding the same family
in LMDB. The download reads the raw file (one object in the same bucket) with 1 MiB ranged GETs,
16 in flight, as the mount's fetchers do. Medians of --runs; ratios within each run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_models  # noqa: E402
from bench_read import drop_caches, read_all  # noqa: E402
from s3server import S3Server  # noqa: E402
from zipfs.fs.process import ROOT, mounted, zipfs_cmd  # noqa: E402
from zipfs.ingest.ingester import Ingester  # noqa: E402
from zipfs.ingest.model import ingest_model  # noqa: E402
from zipfs.remote import config  # noqa: E402
from zipfs.remote.client import Bucket  # noqa: E402
from zipfs.store.lmdb_store import Store  # noqa: E402


def family(model: str) -> tuple[list[tuple[str, Path]], str]:
    if model == "smollm":
        fam = fetch_models.cache_dir() / "smollm2-bf16"
        if not (fam / "ft100" / "model.safetensors").exists():
            raise SystemExit("build it first: $(bash tools/bench_env.sh) tools/make_bf16_family.py")
        return [("base", fam / "base"), ("ft100", fam / "ft100")], "ft100"
    models = fetch_models.fetch(["minilm", "sre"])
    return [("minilm", models["minilm"]), ("sre", models["sre"])], "sre"


def download(bucket: Bucket, key: str, size: int, block: int = 1 << 20, inflight: int = 16) -> float:
    """Seconds to fetch the object with ranged GETs, `inflight` at a time."""
    t = time.perf_counter()
    with ThreadPoolExecutor(inflight) as pool:
        got = sum(len(b) for b in pool.map(lambda off: bucket.get_range(key, off, min(block, size - off)),
                                           range(0, size, block)))
    assert got == size
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", choices=["smollm", "minilm"], default="smollm")
    ap.add_argument("--cache-size", default="512M", help="the mounts' decoded-chunk cache")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_remote drops the page cache and needs root")
    members, target = family(args.model)
    plain = dict(members)[target] / "model.safetensors"
    size = plain.stat().st_size
    logical = sum(p.stat().st_size for _, d in members for p in d.rglob("*") if p.is_file())
    res: dict[str, list[float]] = {}
    tmpdir = os.environ.get("ZIPFS_BENCH_DIR")
    with tempfile.TemporaryDirectory(prefix="zipfs-bench-remote-", dir=tmpdir) as tmp:
        work = Path(tmp)
        with S3Server(work / "s3") as s3:
            os.environ.update(s3.env)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            url = f"s3://{s3.bucket}/bench"

            def zipfs(store: Path, *a: str) -> str:
                return subprocess.run(zipfs_cmd(store, *a), env=env, check=True, capture_output=True,
                                      text=True).stdout

            a, b, local = work / "a", work / "b", work / "local"
            zipfs(a, "remote", "set", url, "--endpoint", s3.endpoint)
            t = time.perf_counter()
            for name, src in members:
                zipfs(a, "ingest", str(src), "--name", name)
            ingest_push = time.perf_counter() - t
            with Store(local) as s, Ingester(s) as ing:
                t = time.perf_counter()
                for name, src in members:
                    ingest_model(ing, src, name)
                ingest_local = time.perf_counter() - t
                with s.read() as txn:
                    local_bytes = sum(r.stored_len for _, r in s.iter_chunks(txn))
            bucket = Bucket(config.load(a))
            bucket_bytes = sum(o.size for o in bucket.list(""))
            bucket.put("raw/model.safetensors", plain.read_bytes())
            zipfs(b, "remote", "set", url, "--endpoint", s3.endpoint, "--cache-size", "4G")
            name = f"{target}/model.safetensors"
            opts = ("--cache-size", args.cache_size)
            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}", file=sys.stderr)
                shutil.rmtree(b / "remote-cache", ignore_errors=True)
                drop_caches()
                with mounted(b, work / "mb", *opts):
                    res.setdefault("remote_mount", []).append(size / read_all(work / "mb" / name) / 1e9)
                drop_caches()
                with mounted(local, work / "ml", *opts):
                    res.setdefault("local_mount", []).append(size / read_all(work / "ml" / name) / 1e9)
                drop_caches()  # the server's files too: every read here starts cold
                seconds = download(bucket, "raw/model.safetensors", size)
                res.setdefault("download", []).append(size / seconds / 1e9)
                res.setdefault("remote/local", []).append(res["remote_mount"][-1] / res["local_mount"][-1])
                res.setdefault("remote/download", []).append(res["remote_mount"][-1] / res["download"][-1])
    med = {k: statistics.median(v) for k, v in res.items()}
    med.update(ingest_push_mb_s=logical / ingest_push / 1e6, ingest_local_mb_s=logical / ingest_local / 1e6,
               bucket_bytes=bucket_bytes, local_bytes=local_bytes)
    print(json.dumps({"model": args.model, "file_bytes": size, "runs": args.runs, "median": med,
                      "all": res}, indent=1))
    rows = [
        ("cold read, mount backed by the bucket", f"{med['remote_mount']:.2f} GB/s", "1"),
        ("cold read, mount backed by local LMDB", f"{med['local_mount']:.2f} GB/s",
         f"remote/local {med['remote/local']:.2f}"),
        ("ranged download of the raw file, 16 in flight", f"{med['download']:.2f} GB/s",
         f"remote/download {med['remote/download']:.2f}"),
        ("ingest + push / ingest alone (logical)",
         f"{med['ingest_push_mb_s']:.0f} / {med['ingest_local_mb_s']:.0f} MB/s",
         f"{med['ingest_push_mb_s'] / med['ingest_local_mb_s']:.2f}"),
        ("bucket bytes / local store payload bytes", f"{bucket_bytes / 1e6:.1f} / {local_bytes / 1e6:.1f} MB",
         f"{bucket_bytes / local_bytes:.3f}"),
    ]
    print(f"\n| {target} ({size / 1e6:.0f} MB), medians of {args.runs} runs | figure | ratio |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")

if __name__ == "__main__":
    main()
