"""Random byte ranges read back exact and decode only the chunks they overlap."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import fetch_models
from zipfs.ingest.ingester import Ingester
from zipfs.ingest.model import ingest_model
from zipfs.read.cache import ChunkCache
from zipfs.read.chunks import ChunkSource
from zipfs.read.reader import Reader
from zipfs.store.lmdb_store import Store


@pytest.fixture(scope="module", params=["standalone", "delta"])
def stored(request, tmp_path_factory):
    """The real fine-tune in a fresh store, standalone or as deltas against its real base;
    yields (store, layout, original bytes, points of interest, whether deltas are expected)."""
    models = fetch_models.fetch(["minilm", "sre"])
    src = models["sre"] / "model.safetensors"
    store = Store(tmp_path_factory.mktemp("ranges") / "store")
    with Ingester(store) as ing:
        if request.param == "delta":
            ingest_model(ing, models["minilm"], "minilm")
        report = ingest_model(ing, models["sre"], "sre")
    assert (report.base.name == "minilm") == (request.param == "delta")
    reader = Reader(store)
    layout = reader.layout("sre/model.safetensors")
    with store.read() as txn:
        rec = store.file_at(txn, "sre/model.safetensors")
    points = sorted({0, layout.size, *layout.starts, *(t.start for t in rec.tensors),
                     *(t.end for t in rec.tensors)})
    yield store, layout, Path(src).read_bytes(), points, request.param == "delta"
    store.close()


def offsets(points):
    near = hs.tuples(hs.sampled_from(points), hs.integers(-9, 9)).map(lambda p: max(0, p[0] + p[1]))
    return hs.one_of(near, hs.integers(0, points[-1] + 10))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=hs.data())
def test_random_ranges(stored, data):
    store, layout, original, points, deltas = stored
    off = data.draw(offsets(points))
    size = data.draw(hs.one_of(hs.integers(0, 64), hs.integers(0, 3 << 20), hs.just(len(original))))
    source = ChunkSource(store, ChunkCache(64 << 20))
    got = Reader(store, source).read(layout, off, size)
    assert got == original[off:off + size]
    touched = {cid for cid, *_ in layout.extents(off, size)}
    if deltas:  # each raw chunk costs at most itself and its (standalone) base
        assert len(touched) <= source.decoded <= 2 * len(touched)
    else:
        assert source.decoded == len(touched)


def test_cache_hits_decode_nothing(stored):
    store, layout, original, _, _ = stored
    source = ChunkSource(store, ChunkCache(64 << 20))
    reader = Reader(store, source)
    reader.read(layout, 1000, 5 << 20)
    first = source.decoded
    assert reader.read(layout, 2000, 4 << 20) == original[2000:2000 + (4 << 20)]
    assert source.decoded == first and source.cache.hits > 0


def test_cache_stays_within_its_bound(stored):
    store, layout, original, _, _ = stored
    source = ChunkSource(store, ChunkCache(3 << 20))
    reader = Reader(store, source)
    assert b"".join(reader.iter_file(layout)) == original
    assert source.cache.size <= 3 << 20


def test_reused_buffers_never_change_bytes_a_reader_holds(stored):
    """Served chunks go cold and their pooled memory is reused at once; a view someone still
    holds keeps its buffer out of the pool, so its bytes never change under it."""
    store, layout, original, _, _ = stored
    source = ChunkSource(store, ChunkCache(4 << 20))
    held = memoryview(source.get(layout.chunk_ids[3]))
    want = original[layout.starts[3]:layout.starts[4]]
    for i, cid in enumerate(layout.chunk_ids):
        data = source.get(cid)
        assert bytes(data) == original[layout.starts[i]:layout.starts[i + 1]]
        source.cache.demote(cid)
    assert bytes(held) == want
    # sequential use recycles: one slab of slots, never a slot per chunk decoded
    assert source.pool.mapped <= 32 << 20 < source.decoded_bytes
