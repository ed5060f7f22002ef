#!/usr/bin/env python3
"""The main job: fetch a real model family, ingest it into a fresh store, verify it, print savings.

Runs the real `zipfs` CLI, showing each command. The family: all-MiniLM-L6-v2 (base), a
byte-identical copy of it, and sre-embedding-model (a real fine-tune of it).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", help="store directory (default: a fresh temporary one)")
    args = ap.parse_args()
    models = fetch_models.fetch(["minilm", "gt-minilm", "sre"])
    with tempfile.TemporaryDirectory(prefix="zipfs-demo-") as tmp:
        store = Path(args.store) if args.store else Path(tmp) / "store"
        t0 = time.perf_counter()
        for role in ("minilm", "gt-minilm", "sre"):
            run(store, "ingest", str(models[role]), "--name", role)
        ingest_s = time.perf_counter() - t0
        run(store, "verify")
        run(store, "stats")
        s = json.loads(run(store, "stats", "--json", capture=True))
        raw_disk = sum(f.stat().st_size for r in ("minilm", "gt-minilm", "sre")
                       for f in models[r].rglob("*") if f.is_file())
        print(f"\n{raw_disk / 1e6:.1f} MB of model files stored in {s['stored_bytes'] / 1e6:.1f} MB "
              f"({s['ratio']:.3f} of raw, {100 * (1 - s['ratio']):.1f}% saved); "
              f"ingest {raw_disk / 1e6 / ingest_s:.0f} MB/s; every file verified by sha256")


if __name__ == "__main__":
    main()
