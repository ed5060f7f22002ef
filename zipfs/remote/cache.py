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
#: payloads next to each other in a pack (at most this far apart) are fetched by one GET of
#: at most COALESCE_MAX bytes: an object store answers a request after tens of ms whatever its
#: size, and a fine-tune's deltas (a few hundred KiB each) lie in file order in their pack
COALESCE_GAP = 64 << 10
COALESCE_MAX = 8 << 20
#: prefetched payloads the disk cache did not keep (a cache smaller than the read-ahead) wait
#: in memory for their reader, up to this many bytes, oldest dropped first
READY_MAX = 64 << 20


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

    def put(self, name: str, data: bytes) -> bool:
        """Keep a checked payload; False when it is not kept (over the limit, a full disk)."""
        if len(data) > self.limit:
            return False
        tmp = self.root / f"{name}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.root / name)
        except OSError as e:  # a full disk costs the cache, not the read
            log.warning("cannot keep a fetched payload in the cache: %s", e.strerror)
            tmp.unlink(missing_ok=True)
            return False
        with self._lock:
            self.total += len(data) - self._sizes.pop(name, 0)
            self._sizes[name] = len(data)
            if self.total > self.limit:
                self._rescan()
                while self.total > self.limit and self._sizes:
                    old, size = self._sizes.popitem(last=False)
                    self.total -= size
                    (self.root / old).unlink(missing_ok=True)
        return True

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
        #: fetched, not in the disk cache, not yet read: name -> size (their futures stay in _inflight)
        self._ready: OrderedDict[str, int] = OrderedDict()
        self._ready_bytes = 0
        self.fetched = 0

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        with self._lock:  # fetches cancelled before they ran: their waiters get an error
            for f in self._inflight.values():
                if not f.done():
                    f.set_exception(RemoteError("the store was closed"))
            self._inflight.clear()

    @staticmethod
    def name(loc: Location) -> str:
        return f"{loc[0]}-{loc[1]}"

    def get(self, loc: Location) -> bytes:
        name = self.name(loc)
        with self._lock:
            fut = self._inflight.get(name)
            if fut is not None and name in self._ready:  # read ahead, kept for this reader
                self._ready_bytes -= self._ready.pop(name)
                del self._inflight[name]
        if fut is None:
            hit = self.cache.get(name, loc[2], loc[3])
            if hit is not None:
                return hit
            fut = self._start(loc)
        return fut.result()

    def prefetch(self, locs: list[Location]) -> None:
        """Start fetching these payloads (those not cached or in flight), neighbours in a pack
        by one ranged GET each run."""
        with self._lock:
            todo = sorted({loc for loc in locs if self.name(loc) not in self.cache
                           and self.name(loc) not in self._inflight})
            if len(self._inflight) >= MAX_QUEUED:
                return
            run: list[Location] = []
            for loc in todo + [("", 0, 0, 0)]:
                if run and (loc[0] != run[0][0] or loc[1] > run[-1][1] + run[-1][2] + COALESCE_GAP
                            or loc[1] + loc[2] - run[0][1] > COALESCE_MAX):
                    futures = {self.name(r): Future() for r in run}
                    self._inflight.update(futures)
                    self._submit(run, futures)
                    run = []
                if loc[0]:
                    run.append(loc)

    def _start(self, loc: Location) -> Future[bytes]:
        name = self.name(loc)
        with self._lock:
            fut = self._inflight.get(name)
            if fut is None:
                fut = self._inflight[name] = Future()
                self._submit([loc], {name: fut})
        return fut

    def _submit(self, run: list[Location], futures: dict[str, Future[bytes]]) -> None:
        """Queue one GET (under the lock); after close, its waiters get an error at once."""
        try:
            self._pool.submit(self._fetch_run, run, futures)
        except RuntimeError:
            for name, f in futures.items():
                f.set_exception(RemoteError("the store was closed"))
                self._inflight.pop(name, None)

    def _fetch_run(self, run: list[Location], futures: dict[str, Future[bytes]]) -> None:
        """One GET for payloads lying close together in one pack; each is checked on its own."""
        pack, start = run[0][0], run[0][1]
        try:
            try:
                data = self.bucket.get_range(PACKS + pack, start, run[-1][1] + run[-1][2] - start)
            except BaseException as e:  # every waiter gets the error
                for f in futures.values():
                    f.set_exception(e)
                return
            for loc in run:
                name, (_, off, length, pcheck) = self.name(loc), loc
                if futures[name].done():  # two entries at one offset (a damaged manifest)
                    continue
                piece = data[off - start:off - start + length]
                if len(piece) != length or xxhash.xxh3_64_intdigest(piece) != pcheck:
                    futures[name].set_exception(RemoteError(
                        f"remote {self.bucket.cfg.url}: the payload at {PACKS}{pack[:16]}… "
                        f"[{off}, +{length}) does not match its checksum"))
                    continue
                kept = self.cache.put(name, piece)
                self.fetched += 1
                futures[name].set_result(piece)
                if not kept:
                    with self._lock:
                        self._ready[name] = len(piece)
                        self._ready_bytes += len(piece)
        finally:
            with self._lock:
                for name, f in futures.items():
                    if not f.done():  # interrupted: nobody waits forever
                        f.set_exception(RemoteError(f"fetching {PACKS}{pack[:16]}… was interrupted"))
                    if self._inflight.get(name) is f and name not in self._ready:
                        del self._inflight[name]
                while self._ready_bytes > READY_MAX:
                    old, size = self._ready.popitem(last=False)
                    self._ready_bytes -= size
                    self._inflight.pop(old, None)
