#!/usr/bin/env python3
"""Read benchmark: the mount against a plain file on local disk and a squashfs image, same run.

Model: the SmolLM2-135M BF16 family (base, ft25, ft100; tools/make_bf16_family.py), or
`--model minilm` for the MiniLM family. The fine-tune is stored as deltas against its base.
Every cold measurement drops the page cache (as root) and remounts (an empty chunk cache).
Medians of --runs runs; speeds are also given as ratios to the plain file read in the same run.

    .venv/bin/python tools/bench_read.py [--runs 5] [--model smollm|minilm] [--cache-size 512M]

Measures: cold sequential read (1 MiB reads) through the mount, of the raw file, through
squashfuse (mksquashfs -comp zstd); from_pretrained through the mount vs a plain directory
(cold, in a fresh process each); random 4 KiB and 1 MiB read latency p50/p99 on a cold mount;
peak RSS of the mount process next to --cache-size; cold sequential read while a background
ingest runs (a model file just copied into the mount; SmolLM2: ft25, which is not stored, so it
is really delta-coded), as a ratio to the idle read, with the copy's write throughput.
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
import threading
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_models  # noqa: E402
from zipfs.fs.process import mounted, unmount, wait_for, zipfs_cmd  # noqa: E402
from zipfs.ingest.ingester import Ingester  # noqa: E402
from zipfs.ingest.model import ingest_model  # noqa: E402
from zipfs.store.lmdb_store import Store  # noqa: E402

LOAD = r"""
import sys, time, torch
from transformers import AutoModel, AutoModelForCausalLM
cls = AutoModelForCausalLM if sys.argv[2] == "causal" else AutoModel
t = time.perf_counter(); m = cls.from_pretrained(sys.argv[1], dtype="auto"); dt = time.perf_counter() - t
print(dt, float(sum(p.float().sum() for p in m.parameters())))
"""


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_all(path: Path, block: int = 1 << 20) -> float:
    """Seconds to read the file sequentially with `block`-sized reads."""
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(block):
            pass
    return time.perf_counter() - t0


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """Samples the mount's anonymous RSS (its own memory: cache, buffers, Python) every 20 ms.

    VmHWM also counts the LMDB map's file pages the mount has read, which are page cache the
    kernel reclaims at will, so both are reported.
    """

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, status_kb(self.pid, "RssAnon"))
            except OSError:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def read_during_ingest(store: Path, mnt: Path, src: Path, target: Path,
                       mount_opts: tuple[str, ...]) -> tuple[float, float, bool]:
    """(read bytes/s of target while src is ingested, write bytes/s of copying src in, whether the
    ingest was still running when the read ended); the copy is removed and collected after."""
    with mounted(store, mnt, *mount_opts):
        dest = mnt / "ingest-bench" / src.name
        dest.parent.mkdir()
        t0 = time.perf_counter()
        shutil.copyfile(src, dest)
        write_bps = src.stat().st_size / (time.perf_counter() - t0)
        drop_caches()
        read_bps = (mnt / target).stat().st_size / read_all(mnt / target)
        overlapped = os.getxattr(dest, "user.zipfs.state") != b"stored"
        subprocess.run(zipfs_cmd(store, "sync", "--wait", str(mnt)), check=True, capture_output=True)
    for cmd in (("rm", "ingest-bench"), ("gc",)):
        subprocess.run(zipfs_cmd(store, *cmd), check=True, capture_output=True)
    return read_bps, write_bps, overlapped


def load_time(model_dir: Path, kind: str) -> tuple[float, float]:
    r = subprocess.run([sys.executable, "-c", LOAD, str(model_dir), kind], check=True,
                       capture_output=True, text=True)
    secs, checksum = r.stdout.split()
    return float(secs), float(checksum)


@contextmanager
def squashfs(src: Path, work: Path):
    img, mnt = work / "family.sqfs", work / "sqfs"
    mnt.mkdir()
    subprocess.run(["mksquashfs", str(src), str(img), "-comp", "zstd", "-quiet", "-noappend"], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["squashfuse", str(img), str(mnt)], check=True)
    try:
        wait_for(lambda: os.path.ismount(mnt), 10, "squashfuse")
        yield mnt, img.stat().st_size
    finally:
        unmount(mnt)


def latencies(path: Path, size: int, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    total = path.stat().st_size
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(n):
            off = rng.randrange(0, total - size)
            t0 = time.perf_counter()
            os.pread(fd, size, off)
            out.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    return out


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", choices=["smollm", "minilm"], default="smollm")
    ap.add_argument("--cache-size", default="512M")
    ap.add_argument("--readahead-kb", type=int, default=1024)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_read drops the page cache and needs root")
    for tool in ("mksquashfs", "squashfuse", "fusermount3"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install squashfs-tools squashfuse fuse3")
    if args.model == "smollm":
        fam = fetch_models.cache_dir() / "smollm2-bf16"
        members = [("base", fam / "base"), ("ft100", fam / "ft100")]
        target, kind = "ft100", "causal"
        ingest_src = fam / "ft25" / "model.safetensors"
        if not (fam / "ft100" / "model.safetensors").exists():
            raise SystemExit("build it first: $(bash tools/bench_env.sh) tools/make_bf16_family.py")
    else:
        models = fetch_models.fetch(["minilm", "sre"])
        members = [("minilm", models["minilm"]), ("sre", models["sre"])]
        target, kind = "sre", "base"
        ingest_src = fetch_models.bf16_pair(models)["sre-bf16"]
    plain_dir = dict(members)[target]
    plain_file = plain_dir / "model.safetensors"
    size = plain_file.stat().st_size
    mount_opts = ("--cache-size", args.cache_size, "--readahead-kb", str(args.readahead_kb))
    res: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        res.setdefault(key, []).append(value)

    tmpdir = os.environ.get("ZIPFS_BENCH_DIR")
    with tempfile.TemporaryDirectory(prefix="zipfs-bench-read-", dir=tmpdir) as tmp:
        work = Path(tmp)
        store = work / "store"
        with Store(store) as s, Ingester(s) as ing:
            bases = [ingest_model(ing, src, name).base.name for name, src in members]
        print(f"stored {', '.join(f'{n} (base {b})' for (n, _), b in zip(members, bases, strict=True))}",
              file=sys.stderr)
        famdir = work / "family"
        famdir.mkdir()
        for name, src in members:
            shutil.copytree(src, famdir / name)
        mnt = work / "mnt"
        with squashfs(famdir, work) as (sq_mnt, sq_size):
            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}", file=sys.stderr)
                drop_caches()
                add("raw", size / read_all(plain_file))
                drop_caches()
                add("squashfs", size / read_all(sq_mnt / target / "model.safetensors"))
                drop_caches()
                with mounted(store, mnt, *mount_opts) as proc:
                    anon = AnonPeak(proc.pid)
                    add("mount", size / read_all(mnt / target / "model.safetensors"))
                    add("rss", status_kb(proc.pid, "VmHWM"))
                    add("anon", anon.stop())
                drop_caches()
                add("load_plain", load_time(plain_dir, kind)[0])
                drop_caches()
                with mounted(store, mnt, *mount_opts) as proc:
                    anon = AnonPeak(proc.pid)
                    add("load_mount", load_time(mnt / target, kind)[0])
                    add("rss", status_kb(proc.pid, "VmHWM"))
                    add("anon", anon.stop())
                drop_caches()
                with mounted(store, mnt, *mount_opts) as proc:
                    f = mnt / target / "model.safetensors"
                    res.setdefault("lat4k", []).extend(latencies(f, 4096, 200, run))
                    res.setdefault("lat1m", []).extend(latencies(f, 1 << 20, 50, run + 1000))
                    add("rss", status_kb(proc.pid, "VmHWM"))
                read_bps, write_bps, overlapped = read_during_ingest(
                    store, mnt, ingest_src, Path(target) / "model.safetensors", mount_opts)
                add("mount_ingesting", read_bps)
                add("write", write_bps)
                add("overlapped", overlapped)
                drop_caches()
                res.setdefault("raw4k", []).extend(latencies(plain_file, 4096, 200, run))
    med = {k: statistics.median(v) for k, v in res.items()}
    gb = 1e9
    report = {
        "file": f"{target}/model.safetensors", "size_mb": size / 1e6, "runs": args.runs,
        "cold_seq_mount_gbs": med["mount"] / gb, "cold_seq_raw_gbs": med["raw"] / gb,
        "cold_seq_squashfs_gbs": med["squashfs"] / gb,
        "mount_vs_raw": med["mount"] / med["raw"], "mount_vs_squashfs": med["mount"] / med["squashfs"],
        "from_pretrained_mount_s": med["load_mount"], "from_pretrained_plain_s": med["load_plain"],
        "from_pretrained_ratio": med["load_mount"] / med["load_plain"],
        "rand4k_p50_ms": pct(res["lat4k"], 0.5) * 1e3, "rand4k_p99_ms": pct(res["lat4k"], 0.99) * 1e3,
        "rand1m_p50_ms": pct(res["lat1m"], 0.5) * 1e3, "rand1m_p99_ms": pct(res["lat1m"], 0.99) * 1e3,
        "raw_rand4k_p50_ms": pct(res["raw4k"], 0.5) * 1e3, "raw_rand4k_p99_ms": pct(res["raw4k"], 0.99) * 1e3,
        "peak_rss_mb": max(res["rss"]) / 1e6, "peak_anon_rss_mb": max(res["anon"]) / 1e6,
        "cold_seq_during_ingest_gbs": med["mount_ingesting"] / gb,
        "during_ingest_vs_idle": med["mount_ingesting"] / med["mount"],
        "ingest_overlapped_reads": f"{sum(res['overlapped']):.0f}/{args.runs}",
        "copy_in_write_gbs": med["write"] / gb,
        "cache_size": args.cache_size,
        "squashfs_image_mb": sq_size / 1e6,
    }
    print(json.dumps(report, indent=2))
    print(f"\n| what | zipfs mount | plain file | squashfs |\n|---|---:|---:|---:|\n"
          f"| cold sequential read, GB/s | {report['cold_seq_mount_gbs']:.2f} | "
          f"{report['cold_seq_raw_gbs']:.2f} | {report['cold_seq_squashfs_gbs']:.2f} |\n"
          f"| mount / baseline | 1 | {report['mount_vs_raw']:.2f} | {report['mount_vs_squashfs']:.2f} |\n"
          f"| from_pretrained, s | {report['from_pretrained_mount_s']:.2f} | "
          f"{report['from_pretrained_plain_s']:.2f} | |\n"
          f"| random 4 KiB read p50 / p99, ms | {report['rand4k_p50_ms']:.2f} / "
          f"{report['rand4k_p99_ms']:.2f} | {report['raw_rand4k_p50_ms']:.2f} / "
          f"{report['raw_rand4k_p99_ms']:.2f} | |\n"
          f"| random 1 MiB read p50 / p99, ms | {report['rand1m_p50_ms']:.2f} / "
          f"{report['rand1m_p99_ms']:.2f} | | |\n"
          f"| cold sequential read while a copied-in file is ingested, GB/s | "
          f"{report['cold_seq_during_ingest_gbs']:.2f} ({report['during_ingest_vs_idle']:.2f}x idle) | | |\n"
          f"| copying a model file into the mount, GB/s | {report['copy_in_write_gbs']:.2f} | | |\n"
          f"| peak RSS of the mount, MB (cache {args.cache_size}): anonymous / with mapped store pages | "
          f"{report['peak_anon_rss_mb']:.0f} / {report['peak_rss_mb']:.0f} | | |")


if __name__ == "__main__":
    main()
