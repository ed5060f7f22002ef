"""Malformed files, crashes mid-ingest and a full disk lose nothing and never half-commit."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import sha256
from zipfs.errors import ZipfsError
from zipfs.ingest import ingester as ingester_mod
from zipfs.ingest.ingester import Ingester
from zipfs.ingest.model import ingest_one
from zipfs.store import inodes
from zipfs.store.fsck import fsck
from zipfs.store.lmdb_store import Store


def _damaged(real: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, expected reason) built from the real file's header."""
    n = struct.unpack("<Q", real[:8])[0]
    header = json.loads(real[8:8 + n])
    name = next(k for k in header if k != "__metadata__")

    def with_header(h: dict) -> bytes:
        js = json.dumps(h).encode()
        return struct.pack("<Q", len(js)) + js + real[8 + n:]

    span = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    a, b = next((a, b) for a in span for b in span if a < b and span[a] == span[b])
    overlapping = dict(header)
    overlapping[b] = dict(header[b], data_offsets=header[a]["data_offsets"])
    unknown = dict(header)
    unknown[name] = dict(header[name], dtype="F31")
    return {
        "truncated": (real[: len(real) // 2], "past the"),
        "long-header": (struct.pack("<Q", len(real)) + real[8:], "runs past the end"),
        "bad-json": (real[:8] + b"{" + real[9:8 + n].replace(b":", b";", 3) + real[8 + n:], "not valid JSON"),
        "overlap": (with_header(overlapping), "overlap"),
        "unknown-dtype": (with_header(unknown), "unknown dtype"),
        "tiny": (b"\x05", "too short"),
    }


def _stored_opaque_and_exact(zipfs, tmp_path: Path, cases: dict[str, tuple[bytes, str]], suffix: str) -> None:
    """Ingest each case as one directory: every file opaque with its reason, exported exact."""
    src = tmp_path / "bad"
    src.mkdir()
    for case, (blob, _) in cases.items():
        (src / f"{case}{suffix}").write_bytes(blob)
    r = zipfs("ingest", str(src), "--name", "bad")
    assert r.code == 0, r.err
    for case, (_, reason) in cases.items():
        line = r.out.split(f"bad/{case}{suffix}:")[1]
        assert "opaque" in line.splitlines()[0] and re.search(reason, line.split("\n")[1]), (case, line)
    out = tmp_path / "out"
    assert zipfs("export", "bad", str(out)).code == 0
    for case in cases:
        assert sha256(out / f"{case}{suffix}") == sha256(src / f"{case}{suffix}")
    assert zipfs("verify").code == 0


def test_malformed_safetensors_are_stored_opaque_and_exact(models, tmp_path, zipfs):
    real = (models["minilm"] / "model.safetensors").read_bytes()
    _stored_opaque_and_exact(zipfs, tmp_path, _damaged(real), ".safetensors")


def _damaged_gguf(real: bytes, header_end: int) -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, expected reason) from the real GGUF: truncated, counts, types, offsets."""
    def patched(at: int, fmt: str, value: int) -> bytes:
        b = bytearray(real)
        struct.pack_into(fmt, b, at, value)
        return bytes(b)
    last_type = header_end - 12  # the last tensor info ends with its u32 type and u64 offset
    return {
        "truncated-header": (real[:header_end // 2], "past the end|cannot fit"),
        "truncated-data": (real[:len(real) - 4096], "past the end"),
        "version-1": (patched(4, "<I", 1), "version 1"),
        "tensor-count": (patched(8, "<Q", 1 << 50), "cannot fit"),
        "unknown-type": (patched(last_type, "<I", 77), "unknown tensor type"),
        "misaligned": (patched(last_type + 4, "<Q", struct.unpack_from("<Q", real, last_type + 4)[0] + 1),
                       "alignment"),
    }


def test_malformed_gguf_is_stored_opaque_and_exact(gguf_file, tmp_path, zipfs):
    from zipfs.formats import gguf
    real = gguf_file.read_bytes()
    cases = _damaged_gguf(real, gguf.parse(real[:4 << 20], len(real)).header_end)
    _stored_opaque_and_exact(zipfs, tmp_path, cases, ".gguf")


def test_failed_final_commit_leaves_nothing_visible_and_frees_its_chunks(models, store_path, monkeypatch):
    src = models["sre"] / "model.safetensors"

    def boom(self, *args):
        def op(txn):
            raise RuntimeError("simulated failure in the final commit")
        return op

    with Store(store_path) as store:
        with Ingester(store) as ing:
            ingest_one(ing, models["minilm"] / "config.json", "keep/config.json")
            monkeypatch.setattr(ingester_mod.Ingester, "_commit_file", boom)
            with pytest.raises(ZipfsError, match="simulated"):
                ingest_one(ing, src, "sre/model.safetensors")
            monkeypatch.undo()
        with store.read() as txn:
            assert [p for p, _ in inodes.walk(store, txn)] == ["keep", "keep/config.json"]
        report = fsck(store)
        assert report.clean and report.garbage == 0 and report.chunks == 1  # only keep/config.json's
        with Ingester(store) as ing:  # the retry writes them again
            r = ingest_one(ing, src, "sre/model.safetensors")
        assert r.reused_chunks == 0 and fsck(store).clean


def test_killed_ingest_process_leaves_a_consistent_store(models, store_path, zipfs):
    """SIGKILL a real ingest part-way: the store opens, verify passes, a re-ingest completes."""
    assert zipfs("ingest", str(models["minilm"] / "config.json"), "--name", "c.json").code == 0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "zipfs.cli", "--store", str(store_path), "ingest",
                             str(models["sre"]), "--name", "sre", "--workers", "1"],
                            env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline()  # the first file is committed; kill in the middle of the rest
    proc.kill()
    proc.wait()
    assert zipfs("verify").code == 0
    assert zipfs("ingest", str(models["sre"]), "--name", "sre").code == 0
    assert zipfs("verify").code == 0


def test_full_disk_fails_clearly_and_damages_nothing(models, small_fs, zipfs):
    store = small_fs / "store"
    zf = lambda *a: zipfs("--store", str(store), *a)  # noqa: E731 - later --store wins
    assert zf("ingest", str(models["minilm"] / "tokenizer.json"), "--name", "tok.json").code == 0
    r = zf("ingest", str(models["sre"] / "model.safetensors"), "--name", "big.safetensors")
    assert r.code == 1 and "no space left" in r.err.lower() and r.err.count("\n") == 1
    ls = zf("ls")
    assert ls.code == 0 and "tok.json" in ls.out and "big" not in ls.out
    assert zf("verify").code == 0
