#!/usr/bin/env bash
# The benchmarks' own environment (outside the repo, cached): CPU torch, transformers and gguf to
# build the BF16 family, zipnn to compare against, matplotlib for the README plot. Prints the path of its python.
set -euo pipefail
venv="${ZIPFS_BENCH_VENV:-$HOME/.cache/zipfs-bench-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import zipnn, transformers, gguf, torch, boto3, minio, obstore, matplotlib' 2>/dev/null; then
    py=python3.11; command -v $py >/dev/null || py=python3
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0 >&2
    "$venv/bin/pip" install -q --disable-pip-version-check 'transformers>=4.45' gguf zipnn zstandard \
        numpy safetensors accelerate boto3 minio obstore matplotlib >&2
fi
echo "$venv/bin/python"
