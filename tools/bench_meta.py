#!/usr/bin/env python3
"""Metadata at scale: how zipfs's costs grow with the number of chunks and files.

For each size a synthetic store is built: files of 10 tensors of 4 KiB random bytes each (one
chunk per tensor; random, so nothing deduplicates), 1,000 files per directory, files = chunks /
10 up to --files-max. Measured on each (medians of --runs where it is cheap to repeat): mount
start (process start to mounted), `ls -R` and `find` through a fresh mount, stat p50/p99 of
random files on a fresh mount (cold lookups), `zipfs ls`, `gc`, `fsck`, LMDB bytes of metadata
(every table but payloads) per chunk and per file, and the mount's RSS after the `find`. The
table ends with each cost per chunk or file relative to the smallest size: 1.0 means linear.

    .venv/bin/python tools/bench_meta.py [--chunks 10000,100000,1000000] [--runs 3]

Root is not needed, but drops the page cache between runs when it is there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_read  # noqa: E402
from zipfs.fs.process import mounted, zipfs_cmd  # noqa: E402
from zipfs.store.lmdb_store import Store  # noqa: E402

TENSORS_PER_FILE = 10
TENSOR_BYTES = 4096
FILES_PER_DIR = 1000


def drop_caches() -> None:
    if os.geteuid() == 0:
        bench_read.drop_caches()


def make_tree(root: Path, files: int, seed: int) -> None:
    """`files` safetensors files of TENSORS_PER_FILE distinct random tensors each."""
    rng = np.random.default_rng(seed)
    for i in range(files):
        d = root / f"m{i // FILES_PER_DIR:04d}"
        d.mkdir(exist_ok=True)
        data = rng.integers(0, 256, size=(TENSORS_PER_FILE, TENSOR_BYTES), dtype=np.uint8)
        save_file({f"t{j}": data[j] for j in range(TENSORS_PER_FILE)}, str(d / f"f{i:06d}.safetensors"))


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def meta_bytes(store: Path) -> tuple[int, int, dict[str, int]]:
    """(bytes of every table but payloads, payload bytes, bytes per table), from LMDB's page counts."""
    with Store(store) as s:
        per = {}
        with s.env.begin() as txn:
            for name, db in s.db.items():
                st = txn.stat(db)
                per[name] = (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]
    payload = per.pop("payloads")
    return sum(per.values()), payload, per


def measure(work: Path, chunks: int, files_max: int, runs: int) -> dict[str, float]:
    files = max(1, min(files_max, chunks // TENSORS_PER_FILE))
    src, store, mnt = work / "src", work / "store", work / "mnt"
    src.mkdir()
    t0 = time.perf_counter()
    make_tree(src, files, seed=chunks)
    made = time.perf_counter() - t0
    ingest = timed(zipfs_cmd(store, "ingest", "--no-delta", str(src)))
    shutil.rmtree(src)
    with Store(store) as s, s.read() as txn:
        nchunks = txn.stat(s.db["chunks"])["entries"]
    out: dict[str, float] = {"chunks": nchunks, "files": files, "make_s": made, "ingest_s": ingest}
    res: dict[str, list[float]] = {}
    rng = random.Random(chunks)
    sample = [f"src/m{i // FILES_PER_DIR:04d}/f{i:06d}.safetensors" for i in
              (rng.randrange(files) for _ in range(min(1000, files)))]
    for _ in range(runs):
        for what, cmd in (("ls_R", ["ls", "-R"]), ("find", ["find"]), ("stat", None)):
            drop_caches()
            t0 = time.perf_counter()
            with mounted(store, mnt, "--read-only") as proc:
                res.setdefault("mount_start_s", []).append(time.perf_counter() - t0)
                if cmd is not None:
                    res.setdefault(f"{what}_s", []).append(timed([*cmd, str(mnt)]))
                    if what == "find":
                        for key, field in (("mount_rss_mb", "VmRSS"), ("mount_anon_mb", "RssAnon")):
                            res.setdefault(key, []).append(bench_read.status_kb(proc.pid, field) / 2**20)
                else:
                    lat = []
                    for p in sample:
                        t = time.perf_counter()
                        os.stat(mnt / p)
                        lat.append(time.perf_counter() - t)
                    lat.sort()
                    res.setdefault("stat_p50_ms", []).append(lat[len(lat) // 2] * 1e3)
                    res.setdefault("stat_p99_ms", []).append(lat[int(len(lat) * 0.99)] * 1e3)
        drop_caches()
        res.setdefault("zipfs_ls_s", []).append(timed(zipfs_cmd(store, "ls")))
        res.setdefault("gc_s", []).append(timed(zipfs_cmd(store, "gc")))
        res.setdefault("fsck_s", []).append(timed(zipfs_cmd(store, "fsck")))
    out |= {k: statistics.median(v) for k, v in res.items()}
    meta, payload, per = meta_bytes(store)
    out |= {"meta_bytes": meta, "payload_bytes": payload, "meta_per_chunk_b": meta / nchunks,
            "meta_per_file_b": meta / files}
    out |= {f"table_{k}_bytes": v for k, v in per.items() if v}
    shutil.rmtree(store)
    return out


PER_CHUNK = ("ingest_s", "fsck_s", "gc_s", "meta_bytes")
PER_FILE = ("mount_start_s", "ls_R_s", "find_s", "zipfs_ls_s", "mount_anon_mb")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", default="10000,100000,1000000")
    ap.add_argument("--files-max", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.chunks.split(",")):
        print(f"{n} chunks", file=sys.stderr)
        tmpdir = os.environ.get("ZIPFS_BENCH_DIR")
        with tempfile.TemporaryDirectory(prefix="zipfs-bench-meta-", dir=tmpdir) as tmp:
            rows.append(measure(Path(tmp), n, args.files_max, args.runs))
        print(json.dumps(rows[-1]), file=sys.stderr)
    first = rows[0]
    for r in rows:  # cost per unit relative to the smallest store: 1.0 is linear growth
        for k in PER_CHUNK:
            r[f"{k}_growth"] = (r[k] / r["chunks"]) / (first[k] / first["chunks"])
        for k in PER_FILE:
            r[f"{k}_growth"] = (r[k] / r["files"]) / (first[k] / first["files"])
    print(json.dumps(rows, indent=2))
    cols = [("chunks", "{:.0f}"), ("files", "{:.0f}"), ("ingest_s", "{:.1f}"), ("mount_start_s", "{:.2f}"),
            ("ls_R_s", "{:.2f}"), ("find_s", "{:.2f}"), ("stat_p50_ms", "{:.2f}"), ("stat_p99_ms", "{:.2f}"),
            ("zipfs_ls_s", "{:.2f}"), ("gc_s", "{:.2f}"), ("fsck_s", "{:.2f}"),
            ("meta_per_chunk_b", "{:.0f}"), ("meta_per_file_b", "{:.0f}"), ("mount_anon_mb", "{:.0f}")]
    print("\n| " + " | ".join(c for c, _ in cols) + " |\n|" + "---:|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f.format(r[c]) for c, f in cols) + " |")
    print("\ngrowth per chunk (ingest, fsck, gc, metadata bytes) and per file (mount start, ls -R, find, "
          "zipfs ls, mount memory), relative to the first row (1.0 = linear):")
    for r in rows:
        print(f"{r['chunks']:.0f} chunks: " + ", ".join(f"{k.removesuffix('_s')} {r[k + '_growth']:.2f}"
                                                     for k in PER_CHUNK + PER_FILE))


if __name__ == "__main__":
    main()
