"""Deltas against an automatically found base: ratios on real pairs, detection, refusal, depth one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import sha256
from zipfs.formats import safetensors as st
from zipfs.store import stats
from zipfs.store.lmdb_store import Store


def tensors_of(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], bytes]], dict | None]:
    data = path.read_bytes()
    n = st.header_length(data[:8], len(data))
    h = st.parse_header(data[8:8 + n], len(data))
    return {t.name: (t.dtype.name, t.shape, data[t.start:t.end]) for t in h.tensors}, h.metadata


def write_variant(src: Path, dest: Path, fn) -> Path:
    """Rewrite each tensor of src with fn(name, dtype, shape, bytes) -> (dtype, shape, bytes)."""
    tensors, meta = tensors_of(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(st.build({k: fn(k, *v) for k, v in tensors.items()}, meta))
    return dest


def file_record(store_path: Path, name: str):
    with Store(store_path) as store, store.read() as txn:
        return store.file_at(txn, name)


def model_record(store_path: Path, name: str) -> dict:
    """A model's record as `stats --json` shows it (its base by name)."""
    with Store(store_path) as store:
        return stats.compute(store).models[name]


def weights_only(models, role: str, tmp_path: Path) -> Path:
    """The model's safetensors alone: no config, no README, no hint of its base."""
    d = tmp_path / f"{role}-bare"
    d.mkdir(exist_ok=True)
    shutil.copy(models[role] / "model.safetensors", d / "model.safetensors")
    return d


def permuted(models, tmp_path: Path) -> Path:
    """Same names, dtypes and shapes as the base, but the values of every tensor reversed: a
    same-architecture model whose weights are unrelated element by element."""
    return write_variant(models["minilm"] / "model.safetensors", tmp_path / "perm" / "model.safetensors",
                         lambda k, d, s, b: (d, s, np.frombuffer(b, dtype=np.uint8)
                                             .reshape(-1, st.DTYPES[d].width)[::-1].tobytes()))


def test_f32_fine_tune_is_stored_in_half_its_size(zipfs, models, store_path, tmp_path):
    assert zipfs("ingest", str(models["minilm"]), "--name", "minilm").code == 0
    r = zipfs("ingest", str(weights_only(models, "sre", tmp_path)), "--name", "sre")
    assert r.code == 0, r.err
    assert "base: minilm" in r.out
    rec = file_record(store_path, "sre/model.safetensors")
    assert rec.new_bytes <= 0.50 * rec.size, rec.new_bytes / rec.size
    assert model_record(store_path, "sre")["base"] == "minilm"
    out = tmp_path / "out"
    assert zipfs("export", "sre", str(out)).code == 0
    assert sha256(out / "model.safetensors") == sha256(models["sre"] / "model.safetensors")


def test_bf16_cast_pair_is_stored_in_a_fifth(zipfs, bf16_pair, store_path):
    assert zipfs("ingest", str(bf16_pair["minilm-bf16"]), "--name", "base.safetensors").code == 0
    assert zipfs("ingest", str(bf16_pair["sre-bf16"]), "--name", "tune.safetensors").code == 0
    rec = file_record(store_path, "tune.safetensors")
    assert rec.new_bytes <= 0.20 * rec.size, rec.new_bytes / rec.size
    assert zipfs("verify").code == 0


def test_unrelated_same_shaped_model_is_refused(zipfs, models, store_path, tmp_path):
    assert zipfs("ingest", str(permuted(models, tmp_path).parent), "--name", "perm").code == 0
    r = zipfs("ingest", str(weights_only(models, "sre", tmp_path)), "--name", "sre", "-v")
    assert r.code == 0, r.err
    assert "base candidate perm: 100% of tensor bytes match" in r.out
    assert "base: (none)" in r.out
    # in a store with the decoy and the real base, detection picks the real base
    other = ("--store", str(tmp_path / "store2"))
    assert zipfs(*other, "ingest", str(permuted(models, tmp_path).parent), "--name", "perm").code == 0
    assert zipfs(*other, "ingest", str(models["minilm"]), "--name", "minilm").code == 0
    r = zipfs(*other, "ingest", str(weights_only(models, "sre", tmp_path)), "--name", "sre")
    assert "base: minilm" in r.out


def test_metadata_hint_names_the_base(zipfs, models, tmp_path):
    name = "sentence-transformers/all-MiniLM-L6-v2"
    assert zipfs("ingest", str(models["minilm"]), "--name", name).code == 0
    d = weights_only(models, "sre", tmp_path)
    (d / "README.md").write_text("---\nbase_model: sentence-transformers/all-MiniLM-L6-v2\n---\n# card\n")
    r = zipfs("ingest", str(d), "--name", "sre")
    assert "base: sentence-transformers/all-MiniLM-L6-v2 (metadata hint" in r.out


def test_no_delta_and_forced_base(zipfs, models, store_path, tmp_path):
    assert zipfs("ingest", str(models["minilm"]), "--name", "minilm").code == 0
    r = zipfs("ingest", str(models["sre"]), "--name", "plain", "--no-delta")
    assert "base: (none) (deltas disabled" in r.out
    assert file_record(store_path, "plain/model.safetensors").new_bytes > 0.8 * (86 << 20)
    r = zipfs("ingest", str(models["sre"]), "--name", "forced", "--base", "minilm")
    assert "base: minilm (--base" in r.out
    r = zipfs("ingest", str(models["sre"]), "--name", "x", "--base", "nope")
    assert r.code == 1 and "no such model" in r.err


def test_delta_depth_is_one_and_resized_tensors_still_pair(zipfs, models, store_path, tmp_path):
    """A fine-tune of a fine-tune codes against the root; grown embeddings pair their leading rows."""
    assert zipfs("ingest", str(models["minilm"]), "--name", "minilm").code == 0
    assert zipfs("ingest", str(models["sre"]), "--name", "sre").code == 0
    rng = np.random.default_rng(0)

    def tune_again(name, dtype, shape, raw):
        a = np.frombuffer(raw, dtype=np.float32 if dtype == "F32" else np.uint8).copy()
        if dtype == "F32":
            a += a * rng.standard_normal(a.size).astype(np.float32) * 1e-4
        if name == "embeddings.word_embeddings.weight":  # 7 added tokens
            extra = rng.standard_normal(7 * shape[1]).astype(np.float32) * 0.05
            return dtype, (shape[0] + 7, *shape[1:]), a.tobytes() + extra.tobytes()
        return dtype, shape, a.tobytes()

    src = write_variant(models["sre"] / "model.safetensors", tmp_path / "sre2" / "model.safetensors",
                        tune_again)
    r = zipfs("ingest", str(src.parent), "--name", "sre2", "--base", "sre")
    assert r.code == 0, r.err
    with Store(store_path) as store, store.read() as txn:
        rec = store.file_at(txn, "sre2/model.safetensors")
        emb = next(t for t in rec.tensors if t.name == "embeddings.word_embeddings.weight")
        deltas_in_emb = 0
        for start, cid in zip(rec.offsets.tolist(), rec.chunk_ids.tolist(), strict=True):
            cr = store.chunk(txn, cid)
            if cr.base:
                assert store.chunk(txn, cr.base).base == 0  # the base of a delta is standalone
                deltas_in_emb += emb.start <= start < emb.end
        assert deltas_in_emb >= 10  # the word embeddings (~45 MB) still pair with the base's
    assert zipfs("verify").code == 0


@pytest.mark.parametrize("base_role", ["minilm-bf16"])
def test_f32_fine_tune_of_a_bf16_base_codes_against_the_widened_base(zipfs, models, bf16_pair,
                                                                     store_path, base_role):
    assert zipfs("ingest", str(bf16_pair[base_role]), "--name", "b.safetensors").code == 0
    r = zipfs("ingest", str(models["sre"] / "model.safetensors"), "--name", "t.safetensors")
    assert "base: b.safetensors" in r.out
    rec = file_record(store_path, "t.safetensors")
    assert rec.new_bytes < 0.7 * rec.size
    assert zipfs("verify").code == 0
