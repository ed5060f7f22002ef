#!/usr/bin/env python3
"""Ingest benchmark: how fast a model family goes into a store, and where the CPU time goes.

Each run ingests the family in order into a fresh store, the way `zipfs ingest` does (base
detection automatic, deltas on). Per model: MB/s (wall), MB/s per core (wall / cores used: the
encode threads, --workers, default all cores), MB per CPU-second of the whole process, and the
stored/raw ratio. Medians of --runs runs.

With --stages, one more run (not in the medians) wraps the pipeline's stages and sums each one's
thread CPU time, per MB of the model: the profile of an ingest, without a sampling profiler.
Nested stages are included in their callers (zstd inside the plane coding inside encode); base
detection's own trial codings count only as base detection.

    .venv/bin/python tools/bench_ingest.py [--model smollm|minilm] [--runs 5] [--stages] [--workers N]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_models  # noqa: E402
from zipfs.codec import chunk as codec  # noqa: E402
from zipfs.ingest import encoding, ingester  # noqa: E402
from zipfs.ingest import model as model_mod  # noqa: E402
from zipfs.ingest.ingester import Ingester  # noqa: E402
from zipfs.ingest.model import ingest_model  # noqa: E402
from zipfs.store import writer  # noqa: E402
from zipfs.store.lmdb_store import Store  # noqa: E402

BASE_DETECTION = "  base detection (sampled deltas)"
#: (owner, attribute, stage name): the functions --stages times
STAGES = [(ingester.Ingester, "_prepare", "chunk: read, hash, look up, encode (encode thread)"),
          (ingester, "pread_exact", "  read the chunk"),
          (ingester, "resolve_base", "  decode the base chunk"),
          (encoding, "delta", "  delta coding"),
          (encoding, "plain", "  standalone coding"),
          (codec, "_zstd_plane", "    zstd of byte planes (entropy, LZ tries)"),
          (ingester.Ingester, "_ingest_fd", "file: plan, hand out chunks, commit (main thread)"),
          (model_mod, "choose_base", BASE_DETECTION),
          (writer.Writer, "_commit", "LMDB commits (writer thread)")]


def family(model: str) -> list[tuple[str, Path]]:
    if model == "minilm":
        m = fetch_models.fetch(["minilm", "sre"])
        return [("minilm", m["minilm"]), ("sre", m["sre"])]
    fam = fetch_models.cache_dir() / "smollm2-bf16"
    if not (fam / "ft100" / "model.safetensors").exists():
        raise SystemExit("build it first: $(bash tools/bench_env.sh) tools/make_bf16_family.py")
    return [(k, fam / k) for k in ("base", "ft25", "ft100")]


def run(members: list[tuple[str, Path]], workers: int | None,
        each: Callable[[str], None] = lambda _: None) -> list[dict[str, float]]:
    """Ingest the family once into a fresh store: per model its size, wall and CPU seconds."""
    out = []
    with tempfile.TemporaryDirectory(prefix="zipfs-bench-ingest-") as tmp, Store(Path(tmp) / "s") as store, \
            Ingester(store, workers=workers) as ing:
        for name, src in members:
            each(name)
            c0, t0 = time.process_time(), time.perf_counter()
            rep = ingest_model(ing, src, name)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            out.append({"size": sum(f.size for f in rep.files), "new": sum(f.new_bytes for f in rep.files),
                        "wall": wall, "cpu": cpu, "base": rep.base.name or "-"})
    return out


@contextmanager
def timed_stages() -> Iterator[dict[str, Counter[str]]]:
    """Wrap STAGES so each call adds its thread CPU time to the counter under "now" of the
    yielded dict (replace it to start counting anew)."""
    spent: dict[str, Counter[str]] = {"now": Counter()}
    lock = threading.Lock()
    detecting = threading.local()  # inside base detection: its trial codings are its own
    saved = []
    for owner, attr, name in STAGES:
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))

        def timed(*a: object, _fn: Callable = fn, _name: str = name, **kw: object) -> object:
            if getattr(detecting, "on", False):
                return _fn(*a, **kw)
            detecting.on = _name == BASE_DETECTION
            t = time.thread_time()
            try:
                return _fn(*a, **kw)
            finally:
                detecting.on = False
                with lock:
                    spent["now"][_name] += time.thread_time() - t

        setattr(owner, attr, functools.wraps(fn)(timed))
    try:
        yield spent
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["smollm", "minilm"], default="smollm")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, help="encode threads (default: all cores)")
    ap.add_argument("--stages", action="store_true", help="one more run, with CPU time per stage")
    args = ap.parse_args()
    members = family(args.model)
    cores = args.workers or os.cpu_count() or 1
    runs = [run(members, args.workers) for _ in range(args.runs)]
    print(f"| model (base) | MB | MB/s | MB/s per core ({cores}) | MB per CPU-s | stored / raw |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, (name, _) in enumerate(members):
        rows = [r[k] for r in runs]
        size = rows[0]["size"] / 1e6
        wall = statistics.median(r["wall"] for r in rows)
        cpu = statistics.median(r["cpu"] for r in rows)
        print(f"| {name} ({rows[0]['base']}) | {size:.1f} | {size / wall:.0f} | {size / wall / cores:.0f} | "
              f"{size / cpu:.0f} | {rows[0]['new'] / rows[0]['size']:.4f} |")
    if not args.stages:
        return
    per_model: dict[str, Counter[str]] = {}
    with timed_stages() as spent:
        def each(name: str) -> None:
            spent["now"] = per_model[name] = Counter()

        sizes = run(members, args.workers, each)
    print("\nCPU ms per MB of each model, by stage (one run; nested stages are inside their callers):")
    print("| stage | " + " | ".join(n for n, _ in members) + " |")
    print("|---|" + "---:|" * len(members))
    for _, _, stage in STAGES:
        vals = [per_model[n].get(stage, 0.0) * 1e3 / (s["size"] / 1e6) for (n, _), s in zip(members, sizes,
                                                                                             strict=True)]
        print(f"| {stage} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
