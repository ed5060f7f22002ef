"""Decode stored chunks: fetch payload, decode (with its base for deltas), verify checksum."""

from __future__ import annotations

import threading
import time

import blake3
import lmdb
import numpy as np

from zipfs.codec import chunk as codec
from zipfs.codec import widen
from zipfs.errors import CorruptChunkError
from zipfs.read._slots import Pool, Slot
from zipfs.read.cache import ChunkCache
from zipfs.store.lmdb_store import Store
from zipfs.store.records import FRAME, VERBATIM, ChunkRecord

DEFAULT_CACHE = 256 << 20
#: pooled buffer size: the ingest's chunk size. Larger chunks, and chunks under half a slot (they
#: would waste most of it), get a buffer of their own.
SLOT = 1 << 20
#: slots beyond what the cache holds: decodes in flight, evicted chunks a reader still holds
SLOT_SLACK = 64


class ChunkSource:
    """Decoded chunk bytes by chunk id, through a bounded cache. Thread-safe.

    A delta chunk's base is stored standalone (delta depth one), so one read decodes at most
    two chunks; base chunks are cached too, since every fine-tune of a base touches them.
    """

    def __init__(self, store: Store, cache: ChunkCache | None = None) -> None:
        self.store = store
        self.cache = cache if cache is not None else ChunkCache(DEFAULT_CACHE)
        self.pool = Pool(SLOT, self.cache.capacity // SLOT + SLOT_SLACK)
        self._lock = threading.Lock()
        #: chunks decoded (cache misses that ran the codec): tests assert on it
        self.decoded = 0
        self.decoded_bytes = 0
        #: thread-seconds spent decoding: next to wall time, how busy the decoders were
        self.decode_seconds = 0.0

    def get(self, chunk_id: int) -> bytes | memoryview:
        hit = self.cache.get(chunk_id)
        if hit is not None:
            return hit
        return self._decode(chunk_id, allow_delta=True)

    def base_bytes(self, base_id: int, off: int, xform: int, nbytes: int) -> bytes | memoryview:
        """The bytes a delta of `nbytes` is coded against: a slice of a standalone base chunk,
        widened when the base has a narrower dtype."""
        base = self.cache.get(base_id)
        if base is None:
            base = self._decode(base_id, allow_delta=False)
        need = nbytes // widen.FACTOR[xform]
        if off + need > len(base):
            raise CorruptChunkError(f"base chunk {base_id} is shorter than a delta needs")
        return widen.widen(memoryview(base)[off:off + need], xform)

    def advise(self, chunk_ids: list[int]) -> None:
        """Start reading these chunks' payloads (and their bases') from disk now, or fetching
        them from the store's remote (neighbours together): a decode that comes to them later
        finds them in the page cache, or fetched, instead of waiting."""
        views, far = [], []
        with self.store.read() as txn:
            for cid in chunk_ids:
                if cid not in self.cache:
                    local, remote = self._payloads(txn, cid)[1:]
                    views += local
                    far += remote
            self.store.willneed(*views)
            if far:
                self.store.prefetch_payloads(txn, far)

    def _payloads(self, txn: lmdb.Transaction,
                  chunk_id: int) -> tuple[ChunkRecord, list[memoryview], list[int]]:
        """A chunk's record, and of the payloads its decode reads (its own, and its base's
        unless that is cached) those in this store and the ids of those only its remote has."""
        rec = self.store.chunk(txn, chunk_id)
        views, far = [], []
        for cid in (chunk_id, rec.base) if rec.base and rec.base not in self.cache else (chunk_id,):
            view = self.store.local_payload(txn, cid)
            if view is None:
                far.append(cid)
            else:
                views.append(view)
        return rec, views, far

    def _decode(self, chunk_id: int, allow_delta: bool) -> memoryview:
        with self.store.read() as txn:
            # start reading this payload (and its base's) before decoding either
            rec, views, far = self._payloads(txn, chunk_id)
            self.store.willneed(*views)
            if far:
                self.store.prefetch_payloads(txn, far)
        base = None
        if rec.base:  # fetched first: one read transaction per thread at a time
            if not allow_delta:
                raise CorruptChunkError(
                    f"chunk {chunk_id} is a delta of a delta (base {rec.base}): store is inconsistent")
            base = self.base_bytes(rec.base, rec.base_off, rec.base_xform, rec.raw_len)
        t0 = time.perf_counter()  # after the base, which counts its own decode
        slot = self._slot(rec.raw_len)
        out = slot if slot is not None else np.empty(rec.raw_len, dtype=np.uint8)
        with self.store.read() as txn:
            # decoded straight from the map; only the C decoder touches the payload's bytes,
            # without the GIL, since the first touch may wait on the disk
            payload = self.store.local_payload(txn, chunk_id)
            fetched = payload is None
            if fetched:
                payload = self.store.payload(txn, chunk_id)
            if len(payload) != rec.stored_len:
                raise CorruptChunkError(f"chunk {chunk_id}: payload is {len(payload)} bytes, its record says "
                                        f"{rec.stored_len}")
            try:
                data = (self._verbatim(payload, out) if rec.kind == VERBATIM
                        else codec.decode_frame(payload, out) if rec.kind == FRAME
                        else codec.decode(payload, base, out))
            except CorruptChunkError as e:
                raise CorruptChunkError(f"chunk {chunk_id}: {e}") from None
        if codec.checksum(data) != rec.checksum:
            raise CorruptChunkError(f"chunk {chunk_id}: checksum mismatch, stored data is corrupt")
        if fetched and blake3.blake3(data).digest() != rec.hash:
            # another machine's record: its checksums are its own; the content address is what
            # this store's dedup trusts, so it is checked before anyone reads these bytes
            raise CorruptChunkError(f"chunk {chunk_id}: the bucket's bytes are not those its content address "
                                    "names")
        with self._lock:
            self.decoded += 1
            self.decoded_bytes += len(data)
            self.decode_seconds += time.perf_counter() - t0
        # a base chunk is done with once its delta is decoded: another fine-tune may ask again
        self.cache.put(chunk_id, data, SLOT if slot is not None else None, cold=not allow_delta)
        return data

    @staticmethod
    def _verbatim(payload: memoryview, out: memoryview | np.ndarray) -> memoryview:
        """A chunk stored as its own bytes (codec overhead would have made it larger)."""
        view = memoryview(out).cast("B")
        view[:] = payload
        return view.toreadonly()

    def _slot(self, n: int) -> Slot | None:
        """A pooled buffer for n decoded bytes: memory the cache is done with is reused before
        more is mapped, since touching fresh memory costs more than decoding into warm."""
        if n < SLOT // 2:
            return None
        slot = self.pool.take(n, grow=False)
        if slot is None and self.cache.reclaim(SLOT):
            slot = self.pool.take(n, grow=False)
        return slot if slot is not None else self.pool.take(n)
