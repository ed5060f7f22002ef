#!/usr/bin/env python3
"""Rename of a directory holding N files through a zipfs mount, for this checkout or another.

    .venv/bin/python tools/bench_rename.py [--files 10000] [--code DIR]

--code runs the zipfs package found in DIR (e.g. a `git worktree` of an older commit, with the
built extensions copied in) so a before/after pair is measured on the same machine. The files are
ingested with the CLI, then the directory is renamed back and forth through the mount; prints
the median of 5 renames.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zipfs.fs.process import mounted  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]))
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=args.code)
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # `python -m` looks in the working directory first: no other zipfs there
        root = Path(tmp)
        src, store, mnt = root / "src", root / "store", root / "m"
        src.mkdir()
        for i in range(args.files):
            (src / f"f{i:05d}").write_bytes(b"")
        subprocess.run([sys.executable, "-m", "zipfs.cli", "--store", str(store), "ingest", str(src),
                        "--name", "dir"], env=env, check=True, stdout=subprocess.DEVNULL)
        with mounted(store, mnt, env={"PYTHONPATH": args.code}):  # the mount runs that code too
            times = []
            for k in range(5):
                a, b = ("dir", "dir2") if k % 2 == 0 else ("dir2", "dir")
                t0 = time.perf_counter()
                os.rename(mnt / a, mnt / b)
                times.append(time.perf_counter() - t0)
    print(f"{args.code}: rename of a directory of {args.files} files: median "
          f"{statistics.median(times) * 1000:.1f} ms ({', '.join(f'{t * 1000:.1f}' for t in times)})")


if __name__ == "__main__":
    main()
