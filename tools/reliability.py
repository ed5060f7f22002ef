#!/usr/bin/env python3
"""The reliability suite, runnable longer than in CI: parser fuzzing, corruption injection, and
concurrent ingest + rm + gc + reads followed by fsck. Prints its figures.

    .venv/bin/python tools/reliability.py [--fuzz 20000] [--corruptions 500] [--rounds 6]

The same functions run (smaller) in tests/test_reliability.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_models  # noqa: E402
from zipfs.errors import CorruptChunkError, FormatError  # noqa: E402
from zipfs.formats import safetensors as st  # noqa: E402
from zipfs.fs.process import zipfs_cmd  # noqa: E402
from zipfs.ingest.ingester import Ingester  # noqa: E402
from zipfs.ingest.model import ingest_model, ingest_one  # noqa: E402
from zipfs.read.cache import ChunkCache  # noqa: E402
from zipfs.read.chunks import ChunkSource  # noqa: E402
from zipfs.read.reader import FileLayout, Reader  # noqa: E402
from zipfs.store.lmdb_store import Store  # noqa: E402
from zipfs.store.records import u64key  # noqa: E402


def mutate(header: bytes, rng: random.Random) -> bytes:
    """One malformed variant of a real safetensors prefix (8-byte length + JSON + some data)."""
    b = bytearray(header)
    kind = rng.randrange(7)
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= rng.randint(1, 255)
    elif kind == 1:  # truncate
        b = b[: rng.randrange(len(b))]
    elif kind == 2:  # lie about the header length
        b[:8] = struct.pack("<Q", rng.choice([0, 1, 7, len(b), 2**63, 10**8 + 1, rng.randrange(2**64)]))
    elif kind == 3:  # rewrite a number inside the JSON
        text = b.decode("latin-1")
        digits = [i for i, c in enumerate(text) if c.isdigit() and i > 8]
        if digits:
            i = rng.choice(digits)
            b[i:i + 1] = str(rng.choice([0, 9, 10**12, -1])).encode()
    elif kind == 4:  # deep nesting
        depth = rng.randint(100, 5000)
        js = b"{" + b'"a":[' * depth + b"]" * depth + b"}"
        b = bytearray(struct.pack("<Q", len(js)) + js)
    elif kind == 5:  # random structure of valid JSON
        js = json.dumps({"t": {"dtype": rng.choice(["F32", "BF16", "X", 3]),
                               "shape": [rng.randint(-2, 10**9) for _ in range(rng.randint(0, 3))],
                               "data_offsets": [rng.randint(-1, 100), rng.randint(-1, 10**10)]}}).encode()
        b = bytearray(struct.pack("<Q", len(js)) + js + bytes(rng.randrange(64)))
    else:  # garbage
        b = bytearray(rng.randbytes(rng.randrange(1, 256)))
    return bytes(b)


def fuzz_parser(real: bytes, n: int, seed: int = 0) -> dict:
    """Parse n malformed variants: only FormatError may come out, each quickly, in bounded memory."""
    rng = random.Random(seed)
    n_len = struct.unpack("<Q", real[:8])[0]
    prefix = real[: 8 + n_len + 256]
    refused = accepted = 0
    worst = 0.0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(n):
        blob = mutate(prefix, rng)
        size = len(blob) if rng.random() < 0.5 else len(real)
        t0 = time.perf_counter()
        try:
            hl = st.header_length(blob[:8], size)
            h = st.parse_header(blob[8:8 + hl], size)
            st.segments(h, size)
            accepted += 1
        except FormatError:
            refused += 1
        worst = max(worst, time.perf_counter() - t0)
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    return {"inputs": n, "refused": refused, "accepted": accepted, "worst_seconds": worst,
            "rss_growth_bytes": rss_growth}


def corruption_trials(store: Store, path: str, original: bytes, n: int, seed: int = 0) -> dict:
    """Damage one random stored payload at a time (a bit flip or a truncation), in a chunk of the
    file or in the base chunk a delta of it needs; reads must fail or be exact, never wrong."""
    rng = random.Random(seed)
    with store.read() as txn:
        layout = FileLayout.of(store.file_at(txn, path))
        base_of = {c: store.chunk(txn, c).base for c in layout.chunk_ids}
    detected = exact = wrong = 0
    for _ in range(n):
        i = rng.randrange(len(layout.chunk_ids))
        target = layout.chunk_ids[i]
        cid = base_of[target] if base_of[target] and rng.random() < 0.5 else target
        with store.env.begin(write=True) as txn:
            good = bytes(txn.get(u64key(cid), db=store.db["payloads"]))
            bad = bytearray(good)
            if rng.random() < 0.2:
                bad = bad[: rng.randrange(len(bad))]
            else:
                bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
            txn.put(u64key(cid), bytes(bad), db=store.db["payloads"])
        try:
            start = layout.starts[i]
            got = Reader(store, ChunkSource(store, ChunkCache(8 << 20))).read(layout, start, 1 << 20)
            if got == original[start:start + len(got)]:
                exact += 1
            else:
                wrong += 1
        except CorruptChunkError:
            detected += 1
        finally:
            with store.env.begin(write=True) as txn:
                txn.put(u64key(cid), good, db=store.db["payloads"])
    return {"faults_injected": n, "detected": detected, "read_exact": exact, "wrong_bytes": wrong}


def churn(store_path: Path, model_dir: Path, rounds: int) -> dict:
    """Concurrent ingest, rm and gc in separate processes while this one reads and verifies."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    with Store(store_path) as store, Ingester(store) as ing:
        ingest_one(ing, model_dir / "model.safetensors", "keep/model.safetensors")
    want = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    cli = " ".join(zipfs_cmd(store_path))
    ingest_rm = (f"for i in $(seq 1 {rounds}); do {cli} ingest {model_dir} --name churn/m$i --workers 1 "
                 f">/dev/null; {cli} rm churn/m$((i-1)) >/dev/null 2>&1 || true; done")
    collect = f"for i in $(seq 1 {rounds * 2}); do {cli} gc >/dev/null; sleep 0.2; done"
    workers = [subprocess.Popen(["bash", "-c", script], env=env) for script in (ingest_rm, collect)]
    reads = 0
    with Store(store_path) as store:
        reader = Reader(store)
        while any(w.poll() is None for w in workers):
            layout = reader.layout("keep/model.safetensors")
            h = hashlib.sha256()
            for block in reader.iter_file(layout):
                h.update(block)
            if h.hexdigest() != want:
                raise AssertionError("a read during churn returned wrong bytes")
            reads += 1
    codes = [w.wait() for w in workers]
    fsck = subprocess.run([*zipfs_cmd(store_path), "fsck", "--scrub"], env=env, capture_output=True,
                          text=True)
    verify = subprocess.run([*zipfs_cmd(store_path), "verify"], env=env, capture_output=True, text=True)
    failed = verify.stdout.count("FAILED")
    return {"rounds": rounds, "full_reads_during_churn": reads, "worker_exit_codes": codes,
            "fsck_clean": fsck.returncode == 0, "fsck": fsck.stdout.strip().splitlines()[-1],
            "verify": verify.stdout.strip().splitlines()[-1], "files_lost": failed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fuzz", type=int, default=20000)
    ap.add_argument("--corruptions", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    models = fetch_models.fetch(["minilm", "sre"])
    real = (models["sre"] / "model.safetensors").read_bytes()
    report: dict[str, object] = {"parser_fuzz": fuzz_parser(real, args.fuzz)}
    with tempfile.TemporaryDirectory() as tmp:
        with Store(Path(tmp) / "c") as store:
            with Ingester(store) as ing:
                ingest_model(ing, models["minilm"] / "model.safetensors", "base.safetensors")
                ingest_model(ing, models["sre"] / "model.safetensors", "tune.safetensors")
            report["corruption"] = corruption_trials(store, "tune.safetensors", real, args.corruptions)
        report["churn"] = churn(Path(tmp) / "churn", models["sre"], args.rounds)
    print(json.dumps(report, indent=2))
    if report["corruption"]["wrong_bytes"] or not report["churn"]["fsck_clean"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
