"""Real files, every format: GGUF stored tensor-aware below zstd -3, an edited GGUF or a shifted
opaque file costing only the chunks around the edit, no real file stored larger than zstd -3
of it, tiny files at their own size, and the GGUF loaded by transformers through the mount."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

import fetch_models
from conftest import sha256, tiny_gguf
from zipfs.fs.process import mounted
from zipfs.ingest.ingester import Ingester
from zipfs.ingest.model import ingest_model, ingest_one
from zipfs.read.reader import Reader
from zipfs.store.lmdb_store import Store

#: what storing a file in ~1 MiB chunks may cost over one zstd -3 frame of the whole file: the
#: chunk headers and the matches zstd would have found across chunk boundaries
CHUNKING_SLACK = 0.001


def stored_alone(path: Path, tmp: Path) -> int:
    """Bytes a file takes in a fresh store of its own."""
    with Store(tmp / "s") as store, Ingester(store) as ing:
        return ingest_one(ing, path, path.name).new_bytes


def zstd3(path: Path) -> int:
    return len(zstandard.ZstdCompressor(level=3).compress(path.read_bytes()))


def test_gguf_is_stored_below_zstd3_and_reads_back_exact(gguf_file, tmp_path, zipfs):
    r = zipfs("ingest", str(gguf_file), "--name", "smol.gguf")
    assert r.code == 0, r.err
    assert "gguf" in r.out
    with Store(tmp_path / "store") as store, store.read() as txn:
        rec = store.file_at(txn, "smol.gguf")
        assert rec.kind == "gguf" and len(rec.tensors) == 272
    size = gguf_file.stat().st_size
    ratio = rec.new_bytes / size
    assert ratio <= 0.91, ratio
    assert rec.new_bytes < zstd3(gguf_file)
    with Store(tmp_path / "store") as store:
        reader = Reader(store)
        data = b"".join(reader.iter_file(reader.layout("smol.gguf")))
    assert hashlib.sha256(data).hexdigest() == sha256(gguf_file)


def test_edited_chat_template_adds_under_one_percent(gguf_file, tmp_path, zipfs):
    edited = tmp_path / "edited.gguf"
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}" * 3
    r = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(gguf_file), str(edited),
                        "--chat-template", template, "--force"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert edited.stat().st_size != gguf_file.stat().st_size  # the header length changed
    assert zipfs("ingest", str(gguf_file), "--name", "orig").code == 0
    assert zipfs("ingest", str(edited), "--name", "edited").code == 0
    with Store(tmp_path / "store") as store, store.read() as txn:
        rec = store.file_at(txn, "edited")
    assert rec.new_bytes < 0.01 * edited.stat().st_size, rec.new_bytes
    assert "0 failed" in zipfs("verify").out


def test_insertions_in_an_opaque_file_cost_about_two_chunks(gguf_file, tmp_path, zipfs):
    """A .bin-style file no parser understands: a byte in front and bytes in the middle."""
    data = gguf_file.read_bytes()
    plain, shifted = tmp_path / "pytorch_model.bin", tmp_path / "edited.bin"
    plain.write_bytes(b"\x80" + data)  # not GGUF any more: stored opaque
    mid = len(data) // 2
    shifted.write_bytes(b"\x80\x02" + data[:mid] + b"inserted by an edit" * 7 + data[mid:])
    assert zipfs("ingest", str(plain), "--name", "a").code == 0
    r = zipfs("ingest", str(shifted), "--name", "b")
    assert r.code == 0 and "opaque" in r.out
    with Store(tmp_path / "store") as store, store.read() as txn:
        rec = store.file_at(txn, "b")
    assert rec.new_bytes < 0.05 * shifted.stat().st_size, rec.new_bytes
    assert "0 failed" in zipfs("verify").out


def test_no_real_file_is_stored_larger_than_zstd3(models, bf16_pair, gguf_file, tmp_path):
    files = [f for role in ("minilm", "gt-minilm", "sre") for f in sorted(models[role].rglob("*"))
             if f.is_file()] + list(bf16_pair.values()) + [gguf_file]
    worst = []
    for i, f in enumerate(files):
        stored, z = stored_alone(f, tmp_path / str(i)), zstd3(f)
        assert stored <= z + CHUNKING_SLACK * f.stat().st_size, (f, stored, z)
        if f.stat().st_size < 4096:  # tiny files: their own bytes, no codec or frame overhead
            assert stored <= f.stat().st_size, (f, stored)
        worst.append((stored / z, f.name))
    assert len(files) > 20


def test_transformers_loads_the_gguf_from_the_mount(gguf_file, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    with Store(store) as s, Ingester(s) as ing:
        ingest_model(ing, gguf_file.parent, "smollm2")

    def logits(directory: Path) -> torch.Tensor:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file.name).eval()
        with torch.no_grad():
            return model(**tok("zipfs serves GGUF files", return_tensors="pt")).logits

    expected = logits(gguf_file.parent)
    with mounted(store, mnt):
        got = mnt / "smollm2" / gguf_file.name
        assert sha256(got) == sha256(gguf_file)
        out = subprocess.run(["cat", str(got)], capture_output=True, check=True).stdout
        assert hashlib.sha256(out).hexdigest() == sha256(gguf_file)
        assert torch.equal(logits(mnt / "smollm2"), expected)
    assert fetch_models.cache_dir() != tmp_path


def test_a_gguf_changed_in_a_few_blocks_is_stored_as_xor_deltas(gguf_file, tmp_path, zipfs):
    """Same quantization, a few blocks of every quantized tensor changed (as a light fine-tune
    moves some scales): the stored file is found as the base and the tensors code as deltas."""
    from zipfs.formats import gguf
    data = bytearray(gguf_file.read_bytes())
    for t in gguf.parse(bytes(data[:4 << 20]), len(data)).tensors:
        if t.dtype.layout is not None:
            for at in range(t.start, t.end, t.dtype.layout.block_bytes * 97):
                data[at] ^= 1  # the low byte of the block's f16 scale: one ulp
    changed = tmp_path / "tuned.gguf"
    changed.write_bytes(bytes(data))
    assert zipfs("ingest", str(gguf_file), "--name", "orig").code == 0
    r = zipfs("ingest", str(changed), "--name", "tuned")
    assert r.code == 0 and "base: orig" in r.out, r.out
    with Store(tmp_path / "store") as store, store.read() as txn:
        rec = store.file_at(txn, "tuned")
        deltas = sum(store.chunk(txn, int(c)).base != 0 for c in rec.chunk_ids)
    assert deltas > 50 and rec.new_bytes < 0.05 * len(data), (deltas, rec.new_bytes)
    assert "0 failed" in zipfs("verify").out


def test_many_tiny_tensors_stay_within_zstd3_and_far_repeats_dedup(tmp_path):
    """Hostile shapes of valid files: a GGUF of 20,000 tiny tensors (a chunk each would cost more
    than the tensor) stays within zstd -3; an opaque file made of one 700 KB block repeated
    (repeats further apart than a chunk) is stored as a few chunks used again and again, within
    twice zstd -3 (which finds them in its window; chunks are coded apart for random access)."""
    n = 20000
    tensors = [(f"blk.{i}.norm".encode(), [32], 0, 128 * i) for i in range(n)]
    tiny = tmp_path / "tiny.gguf"
    tiny.write_bytes(tiny_gguf(tensors=tensors, data_256s=n // 2))
    block = np.random.default_rng(5).integers(0, 256, 700_000, dtype=np.uint8).tobytes()
    rep = tmp_path / "repeated.bin"
    rep.write_bytes((block * 24)[:16 << 20])
    reports = []
    for i, f in enumerate((tiny, rep)):
        with Store(tmp_path / f"s{i}") as store, Ingester(store) as ing:
            reports.append(ingest_one(ing, f, f.name))
    t, r = reports
    assert t.new_bytes <= zstd3(tiny) + CHUNKING_SLACK * tiny.stat().st_size and t.chunks < 64, t
    assert r.new_bytes <= 2 * zstd3(rep) and r.reused_chunks >= 0.8 * r.chunks, r


def test_many_small_tensors_of_an_adapter_still_code_as_planes_and_deltas(bf16_pair, tmp_path, zipfs):
    """A LoRA-style file: hundreds of tensors of 24 KiB (rows of the real BF16 MiniLM, and of its
    real fine-tune). They keep chunks of their own: the second version is stored as deltas."""
    from zipfs.formats import safetensors as st
    for role, out in (("minilm-bf16", "a"), ("sre-bf16", "b")):
        data = bf16_pair[role].read_bytes()
        header = st.parse_header(data[8:8 + st.header_length(data[:8], len(data))], len(data))
        pieces = {}
        for t in header.tensors:
            if len(t.shape) == 2 and t.shape[1] == 384:
                step = 32 * 384 * 2  # 32 rows of BF16
                for k, i in enumerate(range(t.start, t.end - step + 1, step)):
                    pieces[f"{t.name}.lora.{k}"] = ("BF16", (32, 384), data[i:i + step])
        (tmp_path / out).mkdir()
        (tmp_path / out / "adapter_model.safetensors").write_bytes(st.build(dict(list(pieces.items())[:400])))
    assert zipfs("ingest", str(tmp_path / "a"), "--name", "a").code == 0
    r = zipfs("ingest", str(tmp_path / "b"), "--name", "b")
    assert r.code == 0 and "base: a" in r.out, r.out
    with Store(tmp_path / "store") as store, store.read() as txn:
        a, b = (store.file_at(txn, f"{m}/adapter_model.safetensors") for m in "ab")
        deltas = sum(store.chunk(txn, int(c)).base != 0 for c in b.chunk_ids)
    assert len(b.chunk_ids) > 400 and deltas > 300, (len(b.chunk_ids), deltas)
    assert b.new_bytes < 0.6 * a.new_bytes < 0.8 * b.size, (a.new_bytes, b.new_bytes, b.size)
