"""The mount's decode threads (zipfs.fs.decoder), on a real store without FUSE: readers of one
chunk share a decode, prefetch fills the cache, a damaged chunk reaches every reader as an
error and never stops the threads."""

from pathlib import Path

import pytest
import trio

from zipfs.errors import CorruptChunkError
from zipfs.fs.decoder import Decoder
from zipfs.ingest.ingester import Ingester
from zipfs.ingest.model import ingest_model
from zipfs.read.cache import ChunkCache
from zipfs.read.chunks import ChunkSource
from zipfs.read.reader import Reader
from zipfs.store.lmdb_store import Store
from zipfs.store.records import u64key


@pytest.fixture
def stored(tmp_path: Path, models: dict[str, Path]):
    """A store holding the MiniLM base and its real fine-tune (deltas), and the fine-tune's layout."""
    with Store(tmp_path / "store") as s:
        with Ingester(s) as ing:
            ingest_model(ing, models["minilm"], "minilm")
            ingest_model(ing, models["sre"], "sre")
        yield s, Reader(s).layout("sre/model.safetensors")


def run(decoder: Decoder, fn) -> object:
    async def main():
        decoder.start()
        try:
            return await fn()
        finally:
            decoder.close()
    return trio.run(main)


def test_concurrent_readers_share_one_decode_and_get_the_exact_bytes(stored) -> None:
    store, layout = stored
    source = ChunkSource(store, ChunkCache(256 << 20))
    want = {cid: bytes(Reader(store).source.get(cid)) for cid in layout.chunk_ids[:40]}
    decoder = Decoder(source, threads=2, prefetch_max=64, demand_threads=1)

    async def readers():
        got: dict[tuple[int, int], bytes] = {}

        async def read(i: int, cid: int) -> None:
            got[i, cid] = bytes(await decoder.get(cid))

        async with trio.open_nursery() as n:
            for i in range(4):  # four readers of every chunk, all at once
                for cid in want:
                    n.start_soon(read, i, cid)
        return got

    got = run(decoder, readers)
    assert all(got[i, cid] == want[cid] for i in range(4) for cid in want)
    # one decode per chunk (and per base chunk a delta needs), not one per reader
    assert source.decoded <= 2 * len(want)
    assert decoder.inflight == 0


def test_prefetch_decodes_into_the_cache_without_a_reader(stored) -> None:
    store, layout = stored
    source = ChunkSource(store, ChunkCache(256 << 20))
    decoder = Decoder(source, threads=2, prefetch_max=1000)
    ids = list(dict.fromkeys(layout.chunk_ids))

    async def prefetch():
        decoder.prefetch(ids)
        decoder.prefetch(ids)  # queued or cached already: not queued twice
        with trio.fail_after(60):
            while decoder.prefetch_decoded < len(ids):
                await trio.sleep(0.01)

    run(decoder, prefetch)
    assert all(cid in source.cache for cid in ids)
    assert decoder.prefetch_queued == len(ids) and decoder.prefetch_decoded == len(ids)


def test_a_damaged_chunk_is_an_error_for_each_reader_and_the_threads_go_on(stored) -> None:
    store, layout = stored
    bad, good = layout.chunk_ids[0], layout.chunk_ids[-1]
    with store.read() as txn:
        payload = bytearray(store.payload(txn, bad))
    payload[len(payload) // 2] ^= 0xFF
    with store.env.begin(write=True) as txn:
        txn.put(u64key(bad), bytes(payload), db=store.db["payloads"])
    source = ChunkSource(store, ChunkCache(256 << 20))
    decoder = Decoder(source, threads=2, prefetch_max=64)

    async def readers():
        errors = []

        async def read() -> None:
            try:
                await decoder.get(bad)
            except CorruptChunkError as e:
                errors.append(str(e))

        decoder.prefetch([bad])  # a prefetch of it fails quietly; readers still get the error
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(read)
        return errors, bytes(await decoder.get(good))

    errors, data = run(decoder, readers)
    assert len(errors) == 3 and all(f"chunk {bad}" in e for e in errors), errors
    assert data == bytes(Reader(store).source.get(good))


def test_a_failing_read_ahead_neither_loses_the_decode_nor_a_thread(stored, monkeypatch) -> None:
    store, layout = stored
    source = ChunkSource(store, ChunkCache(256 << 20))

    def advise(ids: list[int]) -> None:
        raise OSError(5, "Input/output error")  # posix_fadvise on a failing disk

    monkeypatch.setattr(source, "advise", advise)
    decoder = Decoder(source, threads=1, prefetch_max=64)
    ids = list(dict.fromkeys(layout.chunk_ids))[:8]

    async def reads():
        decoder.prefetch(ids[1:])  # queued behind the demand read: its payloads get read ahead
        with trio.fail_after(30):
            return [bytes(await decoder.get(cid)) for cid in ids]

    got = run(decoder, reads)
    assert got == [bytes(Reader(store).source.get(cid)) for cid in ids]
