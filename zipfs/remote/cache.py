"""Payloads fetched from the bucket, kept on local disk within a size limit (least recently used
goes first), and the threads that fetch them.

A directory of files, not LMDB: LMDB's data file never shrinks (an evicted payload would leave
its pages behind, and the limit would bound nothing on disk), its one writer would serialise
fetches that run in parallel, and a cache needs no fsync. Only payloads the bucket holds are
here, so evicting one loses nothing; payloads not yet uploaded live in LMDB and are never
evicted. Every payload is checked (length and xxh3) when fetched and again when read back from
this directory: a damaged cache file is dropped and fetched again, never decoded.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import xxhash

from zipfs.remote.client import Bucket
from zipfs.remote.config import RemoteError
from zipfs.remote.layout import PACKS

log = logging.getLogger("zipfs.remote")

#: (pack, offset, length, payload xxh3): where one payload lies in the bucket
Location = tuple[str, int, int, int]
#: fetches in flight at once: object stores answer each GET after a round trip, so sequential
#: reads need many in flight to approach the link's rate (DESIGN.md: 8-16)
FETCHERS = 16
#: prefetches queued beyond these are dropped (a reader asking for them fetches on demand)
MAX_QUEUED = 256


class PayloadCache:
    """Verified payloads on disk under root, at most `limit` bytes (0: nothing is kept)."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root, self.limit = root, limit
        self._lock = threading.Lock()
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.total = 0
        try:
            root.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise RemoteError(f"cannot create the payload cache {root}: {e.strerror}") from None
        self._rescan()

    def _rescan(self) -> None:
        """What is on disk, oldest first (other processes sharing the store add and evict too)."""
        found = []
        with os.scandir(self.root) as it:
            for d in it:
                if d.name.endswith(".tmp"):
                    continue
                try:
                    st = d.stat()
                except FileNotFoundError:
                    continue
                found.append((st.st_mtime_ns, d.name, st.st_size))
        found.sort()
        self._sizes = OrderedDict((n, s) for _, n, s in found)
        self.total = sum(self._sizes.values())

    def __contains__(self, name: str) -> bool:
        return name in self._sizes

    def get(self, name: str, length: int, pcheck: int) -> bytes | None:
        path = self.root / name
        try:
            with open(path, "rb") as f:
                data = f.read(length + 1)
        except FileNotFoundError:
            with self._lock:
                self.total -= self._sizes.pop(name, 0)
            return None
        except OSError as e:
            raise RemoteError(f"cannot read the payload cache {path}: {e.strerror}") from None
        if len(data) != length or xxhash.xxh3_64_intdigest(data) != pcheck:
            log.warning("payload cache file %s is damaged; fetching it again", path)
            self._drop(name)
            return None
        try:
            os.utime(path)  # recency, for this process and the others
        except OSError:
            pass
        with self._lock:
            if name in self._sizes:
                self._sizes.move_to_end(name)
        return data

    def put(self, name: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        tmp = self.root / f"{name}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.root / name)
        except OSError as e:  # a full disk costs the cache, not the read
            log.warning("cannot keep a fetched payload in the cache: %s", e.strerror)
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            self.total += len(data) - self._sizes.pop(name, 0)
            self._sizes[name] = len(data)
            if self.total > self.limit:
                self._rescan()
                while self.total > self.limit and self._sizes:
                    old, size = self._sizes.popitem(last=False)
                    self.total -= size
                    (self.root / old).unlink(missing_ok=True)

    def _drop(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)
        with self._lock:
            self.total -= self._sizes.pop(name, 0)


class Fetcher:
    """Payloads by location: from the cache, else one ranged GET (concurrent askers of one
    payload share it), checked before anyone sees it."""

    def __init__(self, bucket: Bucket, cache: PayloadCache, threads: int = FETCHERS) -> None:
        self.bucket, self.cache = bucket, cache
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="zipfs-fetch")
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[bytes]] = {}
        self.fetched = 0

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    @staticmethod
    def name(loc: Location) -> str:
        return f"{loc[0]}-{loc[1]}"

    def get(self, loc: Location) -> bytes:
        hit = self.cache.get(self.name(loc), loc[2], loc[3])
        if hit is not None:
            return hit
        return self._start(loc).result()

    def prefetch(self, locs: list[Location]) -> None:
        for loc in locs:
            name = self.name(loc)
            if name not in self.cache and len(self._inflight) < MAX_QUEUED:
                self._start(loc)

    def _start(self, loc: Location) -> Future[bytes]:
        name = self.name(loc)
        with self._lock:
            fut = self._inflight.get(name)
            if fut is None:
                fut = self._inflight[name] = self._pool.submit(self._fetch, name, loc)
        return fut

    def _fetch(self, name: str, loc: Location) -> bytes:
        try:
            pack, off, length, pcheck = loc
            data = self.bucket.get_range(PACKS + pack, off, length)
            if len(data) != length or xxhash.xxh3_64_intdigest(data) != pcheck:
                raise RemoteError(f"remote {self.bucket.cfg.url}: the payload at {PACKS}{pack[:16]}… "
                                  f"[{off}, +{length}) does not match its checksum")
            self.cache.put(name, data)
            self.fetched += 1
            return data
        finally:
            with self._lock:
                self._inflight.pop(name, None)
