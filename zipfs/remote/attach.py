"""A store's remote, opened: the bucket, the local payload cache, the fetch threads; and the
hooks through which the store reads a payload it has no local copy of."""

from __future__ import annotations

import threading
import time

import lmdb

from zipfs.remote import config, tables
from zipfs.remote.cache import Fetcher, Location, PayloadCache
from zipfs.remote.client import Bucket, MissingError
from zipfs.remote.config import RemoteError
from zipfs.store.lmdb_store import Store

CACHE_DIR = "remote-cache"


class Remote:
    def __init__(self, store: Store, cfg: config.RemoteConfig) -> None:
        self.store, self.cfg = store, cfg
        self.cache = PayloadCache(store.path / CACHE_DIR, cfg.cache_bytes)
        self._bucket: Bucket | None = None
        self._fetcher: Fetcher | None = None
        self._opening = threading.Lock()
        self._relocating = threading.Lock()
        self._synced = 0.0
        self._closed = False
        #: set when the process is going away: a push stops before its next pack
        self.stopping = threading.Event()

    @property
    def bucket(self) -> Bucket:
        """The client, made when first needed: a command that reads only what is here works
        without credentials or a reachable server."""
        with self._opening:
            if self._bucket is None:
                self._bucket = Bucket(self.cfg)
            return self._bucket

    @property
    def fetcher(self) -> Fetcher:
        bucket = self.bucket
        with self._opening:
            if self._closed:
                raise RemoteError("the store is closed")
            if self._fetcher is None:
                self._fetcher = Fetcher(bucket, self.cache)
            return self._fetcher

    def payload(self, txn: lmdb.Transaction, chunk_id: int) -> bytes | None:
        """The chunk's payload from the cache or the bucket; None when the bucket has none.

        A pack that gc repacked is gone while manifests still name it: the chunk is then found
        through the bucket's indexes, by its hash and payload checksum, and its location here
        is corrected."""
        loc = tables.location(self.store, txn, chunk_id)
        if loc is None:
            return None
        try:
            return self.fetcher.get(loc)
        except MissingError:
            moved = self._relocate(txn, chunk_id, loc)
            if moved is None:
                raise
            return self.fetcher.get(moved)

    def _relocate(self, txn: lmdb.Transaction, chunk_id: int, loc: Location) -> Location | None:
        """Where the bucket's indexes now put the payload that was at loc (None: nowhere)."""
        from zipfs.remote import layout
        from zipfs.remote.push import sync_index

        with self._relocating:
            if time.monotonic() - self._synced > 1.0:
                sync_index(self.store, self)
                self._synced = time.monotonic()
        h = self.store.chunk(txn, chunk_id).hash
        with self.store.read() as now:
            packs = [p for p in tables.packs_holding(self.store, now, h) if p != loc[0]]
        for pack in packs:
            key = layout.INDEX + pack
            for e in layout.parse_index(self.bucket.get(key), key):
                if e.hash == h.hex() and e.pcheck == loc[3] and e.length == loc[2]:
                    self.store.writer.call(lambda w, e=e: tables.put_location(self.store, w, chunk_id, e))
                    return (e.pack, e.off, e.length, e.pcheck)
        return None

    def prefetch(self, txn: lmdb.Transaction, chunk_ids: list[int]) -> None:
        locs = [loc for cid in chunk_ids if (loc := tables.location(self.store, txn, cid)) is not None]
        self.fetcher.prefetch(locs)

    def close(self) -> None:
        self.stopping.set()
        with self._opening:
            self._closed = True
        if self._fetcher is not None:
            self._fetcher.close()


def open_remote(store: Store) -> Remote | None:
    """Attach the store's remote, if it has one (its payload reads then fall back to it)."""
    cfg = config.load(store.path)
    if cfg is None:
        return None
    store.remote = Remote(store, cfg)
    return store.remote
