"""The reliability suite at CI size (tools/reliability.py runs it longer): parser fuzzing,
unsafe names, payload corruption, and concurrent ingest + rm + gc + reads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

import reliability
from zipfs.errors import FormatError, ZipfsError
from zipfs.formats import safetensors as st
from zipfs.ingest.ingester import Ingester
from zipfs.ingest.model import ingest_model
from zipfs.store import names
from zipfs.store.lmdb_store import Store


def test_parser_fuzz_thousands_of_malformed_headers(models):
    real = (models["sre"] / "model.safetensors").read_bytes()
    r = reliability.fuzz_parser(real, 3000, seed=1)
    assert r["refused"] + r["accepted"] == 3000
    assert r["refused"] > 2000
    assert r["worst_seconds"] < 1.0
    assert r["rss_growth_bytes"] < 64 << 20


@settings(max_examples=1500, deadline=200)
@given(blob=hs.binary(max_size=300), size=hs.integers(0, 1 << 40))
def test_parser_never_raises_anything_but_format_error(blob, size):
    size = max(size, len(blob))
    try:
        n = st.header_length(blob[:8], size)
        st.segments(st.parse_header(blob[8:8 + n], size), size)
    except FormatError:
        pass


@pytest.mark.parametrize("bad", ["a/../b", "../x", "a/./b", "a//b", "a\0b", "x" * 256, "a/" + "y" * 300,
                                 "/".join(["d"] * 2100)])
def test_unsafe_names_are_refused(bad, zipfs, models):
    with pytest.raises(ZipfsError):
        names.normalize(bad)
    r = zipfs("ingest", str(models["minilm"] / "config.json"), "--name", bad)
    assert r.code == 1 and r.err.startswith("zipfs: error: invalid name")


def test_corrupted_payloads_are_always_detected(models, store_path):
    with Store(store_path) as store:
        with Ingester(store) as ing:
            ingest_model(ing, models["minilm"] / "model.safetensors", "base.safetensors")
            rep = ingest_model(ing, models["sre"] / "model.safetensors", "tune.safetensors")
        assert rep.base.name == "base.safetensors"
        real = (models["sre"] / "model.safetensors").read_bytes()
        r = reliability.corruption_trials(store, "tune.safetensors", real, 150, seed=2)
    assert r["wrong_bytes"] == 0
    assert r["detected"] >= 140  # a flip that leaves the decoded bytes intact is possible, rare


def test_concurrent_ingest_rm_gc_and_reads_leave_a_clean_store(models, store_path):
    r = reliability.churn(store_path, models["sre"], rounds=3)
    assert r["worker_exit_codes"] == [0, 0], r
    assert r["fsck_clean"], r
    assert r["files_lost"] == 0 and r["full_reads_during_churn"] > 0
