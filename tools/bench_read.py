#!/usr/bin/env python3
"""Read benchmark: the mount against a plain file on local disk and a squashfs image, same run.

Model: the SmolLM2-135M BF16 family (base, ft25, ft100; tools/make_bf16_family.py), or
`--model minilm` for the MiniLM family. The fine-tune is stored as deltas against its base.
Every cold measurement drops the page cache (as root) and remounts (an empty chunk cache).
Medians of --runs runs; speeds are also given as ratios to the plain file read in the same run.

    .venv/bin/python tools/bench_read.py [--runs 5] [--model smollm|minilm] [--cache-size 512M]
        [--parts workers,load]

Measures: cold sequential read (1 MiB reads) through the mount, of the raw file, through
squashfuse (mksquashfs -comp zstd); this machine's bound for the file, measured in the same run:
cores / (core-seconds per GB that FUSE costs to serve bytes the mount already holds, mount and
reader together + core-seconds per GB to decode the file's chunks in-process, one thread, page
cache dropped), and the mount as a fraction of it; the CPU seconds per GB of the mount process and
of the reading thread during the cold read; the mount with --workers 1 against the default;
from_pretrained through the mount vs a plain directory (cold, in a fresh process each); random
4 KiB and 1 MiB read latency p50/p99 on a cold mount; peak RSS of the mount process next to
--cache-size; cold sequential read while a background ingest runs (a model file just copied into
the mount; SmolLM2: ft25, which is not stored, so it is really delta-coded), as a ratio
to the idle read, with the copy's write throughput.
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
from zipfs.read.cache import ChunkCache  # noqa: E402
from zipfs.read.chunks import ChunkSource  # noqa: E402
from zipfs.read.reader import Reader  # noqa: E402
from zipfs.store.lmdb_store import Store  # noqa: E402

LOAD = r"""
import sys, time, torch
from transformers import AutoModel, AutoModelForCausalLM
cls = AutoModelForCausalLM if sys.argv[2] == "causal" else AutoModel
t = time.perf_counter(); m = cls.from_pretrained(sys.argv[1], dtype="auto"); dt = time.perf_counter() - t
print(dt, float(sum(p.float().sum() for p in m.parameters())))
"""


PARTS = ("workers", "load", "latency", "ingest")


class Samples(dict[str, list[float]]):
    """Measurements by name, one or more a run; the report takes their medians."""

    def add(self, key: str, value: float) -> None:
        self.setdefault(key, []).append(value)

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.items()}


def bench_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A scratch directory for one benchmark, under $ZIPFS_BENCH_DIR when set."""
    return tempfile.TemporaryDirectory(prefix=prefix, dir=os.environ.get("ZIPFS_BENCH_DIR"))


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def costed_read(path: Path, pid: int) -> tuple[float, float, float]:
    """(bytes/s, mount core-s per GB, reader core-s per GB) of one sequential read of path."""
    c0, t0 = cpu_seconds(pid), time.thread_time()
    wall = read_all(path)
    reader, mount = time.thread_time() - t0, cpu_seconds(pid) - c0
    gbs = path.stat().st_size / 1e9
    return gbs * 1e9 / wall, mount / gbs, reader / gbs


def decode_cost(store_path: Path, name: str) -> float:
    """Core-seconds per GB to decode every chunk of a stored file in this thread, page cache
    dropped first: what the mount must at least spend on it besides moving bytes through FUSE."""
    drop_caches()
    with Store(store_path) as s:
        source = ChunkSource(s, ChunkCache(512 << 20))
        layout = Reader(s, source).layout(name)
        t0 = time.thread_time()
        for cid in layout.chunk_ids:
            source.get(cid)
            source.cache.demote(cid)
        return (time.thread_time() - t0) / (layout.size / 1e9)


def fuse_cost(work: Path, mount_opts: tuple[str, ...], size: int = 1 << 30) -> float:
    """Core-seconds per GB, mount and reader together, to read a file whose one chunk the
    mount holds decoded (a file of zeros): the price of FUSE itself."""
    store, mnt, zeros = work / "zeros-store", work / "zeros-mnt", work / "zeros"
    with open(zeros, "wb") as f:
        f.truncate(size)
    subprocess.run(zipfs_cmd(store, "ingest", str(zeros)), check=True, capture_output=True)
    zeros.unlink()
    costs = []
    with mounted(store, mnt, *mount_opts) as proc:
        read_all(mnt / "zeros")  # decodes the chunk into the mount's cache
        for _ in range(3):
            drop_caches()
            _, mount, reader = costed_read(mnt / "zeros", proc.pid)
            costs.append(mount + reader)
    shutil.rmtree(store)
    return statistics.median(costs)


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
    ap.add_argument("--json", type=Path, help="also write the report here (tools/plot_read.py plots it)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"what to measure besides the cold reads and the bound: {','.join(PARTS)}")
    args = ap.parse_args()
    parts = set(args.parts.split(",")) - {""}
    if parts - set(PARTS):
        raise SystemExit(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))}")
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
    res = Samples()
    add = res.add
    with bench_dir("zipfs-bench-read-") as tmp:
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
        name = f"{target}/model.safetensors"
        with squashfs(famdir, work) as (sq_mnt, sq_size):
            for run in range(args.runs):
                print(f"run {run + 1}/{args.runs}", file=sys.stderr)
                drop_caches()
                add("raw", size / read_all(plain_file))
                drop_caches()
                add("squashfs", size / read_all(sq_mnt / name))
                for workers, key in ((None, "mount"), (1, "mount_w1")):
                    if key == "mount_w1" and "workers" not in parts:
                        continue
                    drop_caches()
                    opts = mount_opts if workers is None else (*mount_opts, "--workers", str(workers))
                    with mounted(store, mnt, *opts) as proc:
                        anon = AnonPeak(proc.pid)
                        bps, mount_cpu, reader_cpu = costed_read(mnt / name, proc.pid)
                        add(key, bps)
                        add(f"{key}_cpu", mount_cpu)
                        add(f"{key}_reader_cpu", reader_cpu)
                        add("rss", status_kb(proc.pid, "VmHWM"))
                        add("anon", anon.stop())
                add("decode_cost", decode_cost(store, name))
                add("fuse_cost", fuse_cost(work, mount_opts))
                if "load" in parts:
                    drop_caches()
                    add("load_plain", load_time(plain_dir, kind)[0])
                    drop_caches()
                    with mounted(store, mnt, *mount_opts) as proc:
                        anon = AnonPeak(proc.pid)
                        add("load_mount", load_time(mnt / target, kind)[0])
                        add("rss", status_kb(proc.pid, "VmHWM"))
                        add("anon", anon.stop())
                if "latency" in parts:
                    drop_caches()
                    with mounted(store, mnt, *mount_opts) as proc:
                        f = mnt / name
                        res.setdefault("lat4k", []).extend(latencies(f, 4096, 200, run))
                        res.setdefault("lat1m", []).extend(latencies(f, 1 << 20, 50, run + 1000))
                        add("rss", status_kb(proc.pid, "VmHWM"))
                    drop_caches()
                    res.setdefault("raw4k", []).extend(latencies(plain_file, 4096, 200, run))
                if "ingest" in parts:
                    read_bps, write_bps, overlapped = read_during_ingest(
                        store, mnt, ingest_src, Path(name), mount_opts)
                    add("mount_ingesting", read_bps)
                    add("write", write_bps)
                    add("overlapped", overlapped)
    med = res.medians()
    gb = 1e9
    cores = os.cpu_count() or 1
    bound = cores / (med["fuse_cost"] + med["decode_cost"]) * gb
    report: dict[str, object] = {
        "model": args.model, "file": name, "size_mb": size / 1e6, "runs": args.runs, "cores": cores,
        "cold_seq_mount_gbs": med["mount"] / gb, "cold_seq_raw_gbs": med["raw"] / gb,
        "cold_seq_squashfs_gbs": med["squashfs"] / gb,
        "mount_vs_raw": med["mount"] / med["raw"], "mount_vs_squashfs": med["mount"] / med["squashfs"],
        "fuse_core_s_per_gb": med["fuse_cost"], "decode_core_s_per_gb": med["decode_cost"],
        "bound_gbs": bound / gb, "mount_vs_bound": med["mount"] / bound,
        "mount_core_s_per_gb": med["mount_cpu"], "reader_core_s_per_gb": med["mount_reader_cpu"],
        "peak_rss_mb": max(res["rss"]) / 1e6, "peak_anon_rss_mb": max(res["anon"]) / 1e6,
        "cache_size": args.cache_size, "squashfs_image_mb": sq_size / 1e6,
    }
    rows = [("cold sequential read, GB/s", f"{med['mount'] / gb:.2f}", f"{med['raw'] / gb:.2f}",
             f"{med['squashfs'] / gb:.2f}", f"{bound / gb:.2f}"),
            ("mount / each", "1", f"{report['mount_vs_raw']:.2f}", f"{report['mount_vs_squashfs']:.2f}",
             f"{report['mount_vs_bound']:.2f}"),
            ("core-seconds per GB: mount process / reader",
             f"{med['mount_cpu']:.2f} / {med['mount_reader_cpu']:.2f}", "", "", "")]
    if "workers" in parts:
        report |= {"cold_seq_mount_workers1_gbs": med["mount_w1"] / gb,
                   "workers_default_vs_1": med["mount"] / med["mount_w1"]}
        rows.append(("cold sequential read with --workers 1, GB/s (default / 1)",
                     f"{med['mount_w1'] / gb:.2f} ({report['workers_default_vs_1']:.2f}x)", "", "", ""))
    if "load" in parts:
        report |= {"from_pretrained_mount_s": med["load_mount"], "from_pretrained_plain_s": med["load_plain"],
                   "from_pretrained_ratio": med["load_mount"] / med["load_plain"]}
        rows.append(("from_pretrained, s", f"{med['load_mount']:.2f}", f"{med['load_plain']:.2f}", "", ""))
    if "latency" in parts:
        ms = {f"{key}_p{p}": pct(res[key], p / 100) * 1e3
              for key in ("lat4k", "lat1m", "raw4k") for p in (50, 99)}
        report |= {f"rand_{k}_ms": v for k, v in ms.items()}
        rows += [("random 4 KiB read p50 / p99, ms", f"{ms['lat4k_p50']:.2f} / {ms['lat4k_p99']:.2f}",
                  f"{ms['raw4k_p50']:.2f} / {ms['raw4k_p99']:.2f}", "", ""),
                 ("random 1 MiB read p50 / p99, ms", f"{ms['lat1m_p50']:.2f} / {ms['lat1m_p99']:.2f}",
                  "", "", "")]
    if "ingest" in parts:
        report |= {"cold_seq_during_ingest_gbs": med["mount_ingesting"] / gb,
                   "during_ingest_vs_idle": med["mount_ingesting"] / med["mount"],
                   "ingest_overlapped_reads": f"{sum(res['overlapped']):.0f}/{args.runs}",
                   "copy_in_write_gbs": med["write"] / gb}
        during = f"{med['mount_ingesting'] / gb:.2f} ({report['during_ingest_vs_idle']:.2f}x idle)"
        rows += [("cold sequential read while a copied-in file is ingested, GB/s", during, "", "", ""),
                 ("copying a model file into the mount, GB/s", f"{med['write'] / gb:.2f}", "", "", "")]
    rows.append((f"peak RSS of the mount, MB (cache {args.cache_size}): anonymous / with mapped store pages",
                 f"{report['peak_anon_rss_mb']:.0f} / {report['peak_rss_mb']:.0f}", "", "", ""))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| what | zipfs mount | plain file | squashfs | bound |\n|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")

if __name__ == "__main__":
    main()
