"""A store's remote, opened: the bucket, the local payload cache, the fetch threads; and the
hooks through which the store reads a payload it has no local copy of."""

from __future__ import annotations

import lmdb

from zipfs.remote import config, tables
from zipfs.remote.cache import Fetcher, PayloadCache
from zipfs.remote.client import Bucket
from zipfs.store.lmdb_store import Store

CACHE_DIR = "remote-cache"


class Remote:
    def __init__(self, store: Store, cfg: config.RemoteConfig) -> None:
        self.store, self.cfg = store, cfg
        self.bucket = Bucket(cfg)
        self.cache = PayloadCache(store.path / CACHE_DIR, cfg.cache_bytes)
        self.fetcher = Fetcher(self.bucket, self.cache)

    def payload(self, txn: lmdb.Transaction, chunk_id: int) -> bytes | None:
        """The chunk's payload from the cache or the bucket; None when the bucket has none."""
        loc = tables.location(self.store, txn, chunk_id)
        return None if loc is None else self.fetcher.get(loc)

    def prefetch(self, txn: lmdb.Transaction, chunk_ids: list[int]) -> None:
        locs = [loc for cid in chunk_ids if (loc := tables.location(self.store, txn, cid)) is not None]
        self.fetcher.prefetch(locs)

    def close(self) -> None:
        self.fetcher.close()


def open_remote(store: Store) -> Remote | None:
    """Attach the store's remote, if it has one (its payload reads then fall back to it)."""
    cfg = config.load(store.path)
    if cfg is None:
        return None
    store.remote = Remote(store, cfg)
    return store.remote
