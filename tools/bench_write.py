#!/usr/bin/env python3
"""Write benchmark: copying model files into a mount against local disk, same run.

The store holds the family's base first, so a copied-in fine-tune is really ingested as deltas
in the background (a training job saving checkpoints). Each run, with the mount's ingest queue
drained before each step unless said otherwise, times (close included everywhere):
- `cp` to local disk followed by `sync` of the copy (the durable baseline; the mount's close is
  durable too), and `cp` alone (page cache only);
- `cp` into the mount, idle; `cp -p` into the mount; `cp` while the previous copy is still being
  ingested;
- Python `write()` of 1 MiB blocks, into the mount and to local disk (+ fsync);
- `os.utime` and an open for writing right after closing a file whose ingest has not finished;
- `save_pretrained` of the model into the mount and into a plain directory (SmolLM2 only; one
  untimed save first, `sync` before each timed one, the order alternating between runs);
- the p50 latency of a 1 MiB `write()` into the mount.
Medians of --runs runs. As root (it drops the page cache).

    .venv/bin/python tools/bench_write.py [--runs 5] [--model smollm|minilm]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ingest  # noqa: E402
from bench_meta import timed  # noqa: E402

from bench_read import Samples, bench_dir, drop_caches  # noqa: E402
from zipfs.fs.process import mounted, zipfs_cmd  # noqa: E402
from zipfs.ingest.ingester import Ingester  # noqa: E402
from zipfs.ingest.model import ingest_model  # noqa: E402
from zipfs.store.lmdb_store import Store  # noqa: E402

SAVE = r"""
import os, sys, time, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
m.save_pretrained(sys.argv[2])  # the first save of a process pays for more than its writes
for dest in sys.argv[3:]:
    os.sync()
    t = time.perf_counter(); m.save_pretrained(dest); print(time.perf_counter() - t, flush=True)
"""


def write_blocks(src: Path, dest: Path, fsync: bool, block: int = 1 << 20) -> tuple[float, float]:
    """(seconds to write src's bytes, already in memory, to dest in `block`-sized write()s, close
    included; the median seconds of one write())."""
    data = memoryview(src.read_bytes())
    lat = []
    t0 = time.perf_counter()
    with open(dest, "wb", buffering=0) as f:
        for off in range(0, len(data), block):
            t = time.perf_counter()
            f.write(data[off:off + block])
            lat.append(time.perf_counter() - t)
        if fsync:
            os.fsync(f.fileno())
    return time.perf_counter() - t0, statistics.median(lat)


def after_close(src: Path, dest: Path) -> tuple[float, float]:
    """(utime, open-for-write) seconds right after closing a copy whose ingest has not finished."""
    shutil.copyfile(src, dest)
    t0 = time.perf_counter()
    os.utime(dest, (1_700_000_000, 1_700_000_000))
    t1 = time.perf_counter()
    os.close(os.open(dest, os.O_WRONLY))
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", choices=["smollm", "minilm"], default="smollm")
    args = ap.parse_args()
    members = bench_ingest.family(args.model)
    base_name, base_dir = members[0]
    model_dir = members[1][1]
    src = model_dir / "model.safetensors"
    size = src.stat().st_size
    res = Samples()
    add = res.add
    with bench_dir("zipfs-bench-write-") as tmp:
        work = Path(tmp)
        store, mnt, local = work / "store", work / "mnt", work / "local"
        local.mkdir()
        with Store(store) as s, Ingester(s) as ing:
            ingest_model(ing, base_dir, base_name)
        with mounted(store, mnt):
            def drained() -> None:
                subprocess.run(zipfs_cmd(store, "sync", "--wait", str(mnt)), check=True, capture_output=True)

            def clean() -> None:
                drained()
                for d in (mnt / "w", local):
                    shutil.rmtree(d, ignore_errors=True)
                    d.mkdir()
                drained()
                drop_caches()
                src.read_bytes()  # the source comes from the page cache, for every target alike

            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}", file=sys.stderr)
                clean()
                add("cp_local", timed(["cp", str(src), str(local / "a")]))
                clean()
                add("cp_sync_local", timed(["bash", "-c", f'cp "{src}" "{local}/a" && sync "{local}/a"']))
                clean()
                add("cp_mount", timed(["cp", str(src), str(mnt / "w" / "a")]))
                clean()
                add("cp_p_mount", timed(["cp", "-p", str(src), str(mnt / "w" / "a")]))
                clean()
                shutil.copyfile(src, mnt / "w" / "first")
                add("cp_mount_ingesting", timed(["cp", str(src), str(mnt / "w" / "a")]))
                utime_s, open_s = after_close(src, mnt / "w" / "b")
                add("utime_after_close", utime_s)
                add("open_after_close", open_s)
                clean()
                secs, one = write_blocks(src, mnt / "w" / "a", fsync=False)
                add("write_mount", secs)
                add("one_write_p50", one)
                clean()
                add("write_local_fsync", write_blocks(src, local / "a", fsync=True)[0])
                if args.model == "smollm":
                    clean()
                    dests = [("save_local", local / "m"), ("save_mount", mnt / "w" / "m")]
                    dests = dests if run % 2 == 0 else dests[::-1]
                    r = subprocess.run([sys.executable, "-c", SAVE, str(model_dir), str(local / "warm"),
                                        *(str(d) for _, d in dests)], check=True, capture_output=True,
                                       text=True)
                    for (key, _), secs in zip(dests, r.stdout.split(), strict=True):
                        add(key, float(secs))
            clean()
    med = res.medians()
    gbs = {k: size / v / 1e9 for k, v in med.items() if k.startswith(("cp", "write"))}
    report = {"file": str(src), "size_mb": size / 1e6, "runs": args.runs, "seconds": med, "gb_per_s": gbs,
              "cp_mount_vs_cp_sync": med["cp_sync_local"] / med["cp_mount"],
              "cp_ingesting_vs_cp_sync": med["cp_sync_local"] / med["cp_mount_ingesting"],
              "cp_p_vs_cp_mount": med["cp_p_mount"] / med["cp_mount"]}
    if "save_mount" in med:
        report["save_pretrained_mount_vs_plain"] = med["save_mount"] / med["save_local"]
    print(json.dumps(report, indent=2))
    print(f"\n| what ({size / 1e6:.0f} MB, medians of {args.runs}) | seconds | GB/s |\n|---|---:|---:|")
    for key, what in (("cp_local", "`cp` to local disk (page cache)"),
                      ("cp_sync_local", "`cp` + `sync` to local disk"),
                      ("cp_mount", "`cp` into the mount, idle"),
                      ("cp_p_mount", "`cp -p` into the mount"),
                      ("cp_mount_ingesting", "`cp` into the mount while the previous copy is ingested"),
                      ("write_mount", "Python write() of 1 MiB blocks into the mount, close included"),
                      ("write_local_fsync", "Python write() of 1 MiB blocks to local disk + fsync"),
                      ("save_local", "save_pretrained into a plain directory"),
                      ("save_mount", "save_pretrained into the mount"),
                      ("one_write_p50", "one 1 MiB write() into the mount, p50"),
                      ("utime_after_close", "utime right after close, ingest pending"),
                      ("open_after_close", "open for writing right after close, ingest pending")):
        if key in med:
            print(f"| {what} | {med[key]:.4f} | {gbs[key]:.2f} |" if key in gbs else
                  f"| {what} | {med[key]:.4f} | |")


if __name__ == "__main__":
    main()
