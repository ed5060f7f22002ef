#!/usr/bin/env python3
"""Compression benchmark: zipfs vs zstd-3, ZipNN and the BitX reference, on real model families.

Each family is ingested in order into a fresh store (base detection automatic); a file's zipfs
size is the bytes it added to the store. Baselines are measured in the same run on the same
files: zstd-3 on the whole file, ZipNN (its own package, in the benchmark environment from
tools/bench_env.sh) on the whole file, BitX (tools/bitx_reference.py) against the same base.
ZipNN and BitX apply to float safetensors only ("-" elsewhere). The GGUF family is the real
SmolLM2 Q4_1 file and the same file with its chat template edited (gguf's own writer: another
header length, the same tensors); the CDC family is that file stored opaque (a byte in front)
and again with bytes inserted in front and in the middle.
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
    #: what ZipNN is told the file holds; None: neither ZipNN nor BitX applies
    dtype: str | None = None


def families(models: dict[str, Path], bf16: dict[str, Path], smollm: dict[str, Path] | None,
             tmp: Path) -> dict[str, list[tuple[str, Path, Path, str | None]]]:
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
    gguf = next(fetch_models.fetch(["smollm2-gguf"])["smollm2-gguf"].glob("*.gguf"))
    edited = tmp / "edited-template.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(gguf), str(edited), "--force",
                    "--chat-template", "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"],
                   check=True, capture_output=True)
    out["SmolLM2-135M Q4_1 GGUF"] = [("q4_1", gguf, gguf, None), ("edited-template", edited, edited, "q4_1")]
    data = gguf.read_bytes()
    opaque, shifted = tmp / "opaque.bin", tmp / "shifted.bin"
    opaque.write_bytes(b"\x80" + data)
    mid = len(data) // 2
    shifted.write_bytes(b"\x80\x02" + data[:mid] + b"inserted" * 16 + data[mid:])
    out["opaque file, CDC (GGUF bytes behind a byte)"] = [("opaque", opaque, opaque, None),
                                                          ("insertions", shifted, shifted, None)]
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
    with tempfile.TemporaryDirectory(prefix="zipfs-bench-files-") as tmp:
        for fam, members in families(models, bf16, smollm, Path(tmp)).items():
            rows += measure(fam, members, args.runs)
    print_table(rows)


def measure(fam: str, members: list[tuple[str, Path, Path, str | None]], runs: int) -> list[Row]:
    """One family's rows: zipfs with and without deltas (runs times), then the baselines."""
    dtype = "float32" if "F32" in fam else "bfloat16" if "BF16" in fam else None
    fam_rows = [Row(fam, n, m.stat().st_size, b, dtype=dtype) for n, _, m, b in members]
    for _ in range(runs):
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
        if dtype:
            r.bitx = bitx_reference.compressed_size(paths[r.name], paths[r.base] if r.base else None)
    if dtype:
        for r, (size, secs) in zip(fam_rows, zipnn_sizes([(paths[r.name], dtype) for r in fam_rows]),
                                   strict=True):
            r.zipnn, r.zipnn_s = size, secs
    return fam_rows


def print_table(rows: list[Row]) -> None:
    mb = 1e6
    print("| family | file (base) | raw MB | zipfs | zipfs no-delta | BitX ref | ZipNN | zstd-3 |"
          " zipfs MB/s (no-delta) | ZipNN MB/s | zstd-3 MB/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for fam in dict.fromkeys(r.family for r in rows):
        fr = [r for r in rows if r.family == fam]
        for r in fr:
            zs, ps = statistics.median(r.zipfs_s), statistics.median(r.plain_s)
            bitx, zipnn = (f"{r.bitx / r.raw:.3f}", f"{r.zipnn / r.raw:.3f}") if r.dtype else ("-", "-")
            zipnn_speed = f"{r.raw / mb / r.zipnn_s:.0f}" if r.dtype else "-"
            print(f"| {fam} | {r.name} ({r.base or '-'}) | {r.raw / mb:.1f} | {r.zipfs / r.raw:.3f} | "
                  f"{r.plain / r.raw:.3f} | {bitx} | {zipnn} | "
                  f"{r.zstd / r.raw:.3f} | {r.raw / mb / zs:.0f} ({r.raw / mb / ps:.0f}) | "
                  f"{zipnn_speed} | {r.raw / mb / r.zstd_s:.0f} |")
        raw = sum(r.raw for r in fr)
        tot = {k: sum(getattr(r, k) for r in fr) / raw for k in ("zipfs", "plain", "bitx", "zipnn", "zstd")}
        bitx, zipnn = (f"{tot['bitx']:.3f}", f"{tot['zipnn']:.3f}") if fr[0].dtype else ("-", "-")
        print(f"| {fam} | **whole family** | {raw / mb:.1f} | **{tot['zipfs']:.3f}** | {tot['plain']:.3f} | "
              f"{bitx} | {zipnn} | {tot['zstd']:.3f} | | | |")


if __name__ == "__main__":
    main()
